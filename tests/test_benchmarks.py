"""Smoke test of the benchmark script (one tiny step per framework), and the profiling tools.

Benchmarks are never timed in the test suite: ``benchmarks/throughput.py`` runs
end to end and prints its table; the flag sweep and the step profile are
checked for what they name and how they sort kernels.
"""

import importlib.util
import json
import subprocess
import sys

from conftest import REPO

HAS_TORCH = importlib.util.find_spec('torch') is not None


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
  assert '| 16 | train | gnet-jax kernels=xla |' in table
  assert 'load average (1 min) before / after' in table
  rows = json.loads(out.read_text())['results'][0]['tasks']['train']
  assert rows['gnet-jax kernels=xla']['steps'] == 2 and rows['gnet-jax kernels=xla']['median'] > 0
  if HAS_TORCH:
    assert '| 16 | train | PyTorch NCHW (as written) |' in table
    assert '| 16 | train | PyTorch channels_last |' in table
    assert rows['gnet-jax kernels=xla']['rounds'] == 2 and 'x (' in table
    low, high = rows['gnet-jax kernels=xla']['vs_torch_range']
    assert low <= rows['gnet-jax kernels=xla']['vs_torch'] <= high


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
