"""Smoke test of the benchmark script (one tiny step per framework), and the profiling tools.

Benchmarks are never timed in the test suite: ``benchmarks/throughput.py`` runs
end to end and prints its table, whose fields must agree with each other and
with its JSON; with workers of known step times its img/s, ratios and GFLOP/s
must come out exactly; the flag sweep and the step profile are checked for
what they name and how they sort kernels.
"""

import argparse
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

HAS_TORCH = importlib.util.find_spec('torch') is not None


def _table_row(table: str, size: int, task: str, name: str) -> list[str]:
  """The cells of one row of throughput.py's markdown table."""
  prefix = f'| {size} | {task} | {name} |'
  line = next(line for line in table.splitlines() if line.startswith(prefix))
  return [cell.strip() for cell in line.strip('|').split('|')]


def test_throughput_script_runs_one_tiny_step_and_prints_table(tmp_path):
  out = tmp_path / 'result.json'
  cmd = [sys.executable, str(REPO / 'benchmarks' / 'throughput.py'), '--sizes', '16',
         '--batch', '2', '--steps', '1', '--warmup', '1', '--tasks', 'train',
         '--min-rounds', '2', '--max-rounds', '2',
         '--jax-variants', 'gnet-jax kernels=xla', '--json', str(out)]
  if not HAS_TORCH:
    cmd.append('--no-torch')
  # Workers inherit conftest's persistent compilation cache through the environment.
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout
  assert '| size | task | framework | img/s median |' in table
  assert 'machine:' in table and 'versions:' in table
  assert 'load average (1 min) before / after' in table
  rows = json.loads(out.read_text())['results'][0]['tasks']['train']
  flops = _load('flops')
  names = ['gnet-jax kernels=xla'] + (
      ['PyTorch NCHW (as written)', 'PyTorch channels_last'] if HAS_TORCH else [])
  assert sorted(rows) == sorted(names)
  for name in names:
    row = rows[name]
    assert row['steps'] == 2  # 2 rounds of 1 timed step
    assert 0 < row['min'] <= row['median'] <= row['max']
    assert row['gflops'] == pytest.approx(row['median'] * flops.train_flops(16) / 1e9, rel=1e-12)
    assert row['peak_rss_bytes'] > 2**20 and row['first_step_s']['train'] > 0
    # The table prints the JSON's numbers.
    cells = _table_row(table, 16, 'train', name)
    assert cells[3] == f"{row['median']:.1f}" and cells[4] == f"{row['min']:.1f}-{row['max']:.1f}"
    assert cells[6] == f"{row['gflops']:.1f}"
  assert rows['gnet-jax kernels=xla']['compile_s'] > 0
  if HAS_TORCH:
    for name in names:
      low, high = rows[name]['vs_torch_range']
      assert rows[name]['rounds'] == 2 and low <= rows[name]['vs_torch'] <= high
    # Each round's ratio is to the faster PyTorch layout: it is 1, the other at most 1.
    assert max(rows[n]['vs_torch_range'][1] for n in names[1:]) == pytest.approx(1.0)


class FakeWorker:
  """A worker whose steps take known times: ``SECONDS[name]``, cycled, one value per step."""

  SECONDS = {'gnet-jax': (0.5, 0.25, 1.0), 'PyTorch NCHW (as written)': (1.0,),
             'PyTorch channels_last': (0.8,)}

  def __init__(self, name, kind, args, env):
    self.name, self.calls = name, 0
    self.info = {'init_s': 0.1, 'compile_s': 2.0 if kind == 'jax' else None,
                 'device': 'cpu:fake'}
    self.times = {'train': [], 'eval': []}
    self.first = {}

  def run(self, task, count=1):
    cycle = self.SECONDS[self.name]
    times = [cycle[(self.calls + i) % len(cycle)] for i in range(count)]
    self.calls += count
    return times

  def finish(self):
    return {'peak_rss': 3 * 2**30, 'device_peak': None}


def test_throughput_numbers_follow_from_the_step_times(monkeypatch):
  """Known step times in, exact img/s, ratios, GFLOP/s and table cells out."""
  throughput, flops = _load('throughput'), _load('flops')
  monkeypatch.setattr(throughput, 'Worker', FakeWorker)
  args = argparse.Namespace(batch=4, steps=3, warmup=1, tasks=['train'], budget_s=60,
                            min_rounds=2, max_rounds=5, spread=0.1)
  result = throughput.bench_size(args, 16, ['gnet-jax'], use_torch=True)
  rows = result['tasks']['train']
  jax_row = rows['gnet-jax']
  # The warm-up takes the first 0.5 s; each round then times 0.25, 1.0, 0.5 s at batch 4.
  assert (jax_row['median'], jax_row['min'], jax_row['max']) == (8.0, 4.0, 16.0)
  assert jax_row['steps'] == 6 and jax_row['rounds'] == 2  # the ratios agree: no third round
  assert jax_row['gflops'] == pytest.approx(8.0 * flops.train_flops(16) / 1e9)
  # Per round: the faster PyTorch (0.8 s) over each one's median step.
  assert jax_row['vs_torch'] == pytest.approx(0.8 / 0.5)
  assert rows['PyTorch NCHW (as written)']['vs_torch'] == pytest.approx(0.8)
  assert rows['PyTorch channels_last']['vs_torch'] == pytest.approx(1.0)
  assert rows['PyTorch channels_last']['median'] == pytest.approx(4 / 0.8)
  machine = {'cpu': 'fake', 'cores': 2, 'jax_device': 'cpu:fake', 'torch_device': 'cpu',
             'torch_threads': 2, 'versions': {}, 'load_before': 0.0, 'load_after': 0.0}
  cells = _table_row(throughput.format_table([result], machine), 16, 'train', 'gnet-jax')
  assert cells[3:8] == ['8.0', '4.0-16.0', '1.60x (1.60-1.60, 2 rounds)',
                        f'{8.0 * flops.train_flops(16) / 1e9:.1f}', '2.0']
  assert cells[9] == '3.00 GiB RSS'


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_flag_sweep_names_only_flags_this_jaxlib_knows():
  # XLA aborts the worker on an unknown flag; a renamed flag would show as a failed row.
  from gnet_jax import xla_flags
  sweep = _load('xla_flag_sweep')
  names = {f.split('=')[0][2:] for flags, _ in sweep.VARIANTS.values() for f in flags.split()}
  assert names and all(xla_flags.xla_knows_flag(n) for n in names), names
  assert next(iter(sweep.VARIANTS.values())) == ('', None)  # the baseline comes first


def test_profile_sorts_kernels_into_kinds():
  kind = _load('profile_step')._fusion_kind
  relu_bwd = 'jit(train_step)/transpose(jvp(GoogLeNet))/b2/select_n'
  assert kind('add_select_fusion.1', 'fusion', relu_bwd) == 'ReLU/max-pool backward (selects)'
  assert kind('transpose_copy_fusion.37', 'fusion', '') == 'layout transposes/copies'
  assert kind('maximum_pad_fusion.4', 'fusion', 'jit(train_step)/jvp(GoogLeNet)/b1/pad') == \
      'padding (fused with ReLU/adds), forward'
  assert kind('dot.65', 'dot', relu_bwd) == 'matmul (traced)'


def test_kernels_ab_traces_the_model_with_an_older_ops_module():
  """kernels_ab.py: ``ops.py`` of a revision is imported on its own and swapped in, then restored."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import kernels_ab
  from gnet_jax import models, ops

  old = kernels_ab.ops_at('HEAD')  # the committed version, as a module of its own
  assert old is not ops and old.__name__ == 'ops_at_HEAD'
  assert old.max_pool_3x3 is not ops.max_pool_3x3 and old.__file__ != ops.__file__
  with kernels_ab.models_using(old):
    assert models.ops is old
  assert models.ops is ops
