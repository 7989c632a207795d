"""The measurement harness and ``python -m benchmarks.throughput`` (never timed in the suite).

The harness is driven through real worker processes whose "steps" take known
times (a small module in a temp folder, on the workers' PYTHONPATH): img/s,
ratios, ranges, GFLOP/s and the table must come out exactly; a worker that
fails or overruns its deadline is reported, not waited for. One tiny run of
the script itself (torchvision's GoogLeNet, ``--model inception_v1``, at 32x32,
batch 2, on both sides) checks that its table and its JSON agree and that the
FLOP count is XLA's forward and backward count.
"""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time

import pytest

from benchmarks import harness, throughput
from conftest import REPO
from gnet_jax import models, ops, xla_flags

HAS_TORCH = importlib.util.find_spec('torch') is not None
HAS_TORCHVISION = HAS_TORCH and importlib.util.find_spec('torchvision') is not None

FAKE_SIDE = '''
import time

class Side:
  """Steps that take the given times, cycled (time.sleep: real wall time is not needed)."""
  def __init__(self, size, batch, seconds, flops=False, **_):
    self.seconds, self.calls, self.batch = seconds, 0, batch
  def info(self, req):
    print('library chatter on stdout')  # must not be taken for a reply
    return {'init_s': 0.1, 'compile_s': 2.0, 'device': 'cpu:fake', 'xla_flags': '',
            'flops': {'train': 3e9, 'eval': 1e9}}
  def train(self, req):
    times = [self.seconds[(self.calls + i) % len(self.seconds)] for i in range(req['count'])]
    self.calls += req['count']
    return {'times': times}
  eval = train
  def finish(self, req):
    return {'peak_rss': 3 * 2**30, 'device_peak': None}
  def fail(self, req):
    raise ValueError('no such thing')
  def hang(self, req):
    time.sleep(60)
'''


@pytest.fixture
def fake_env(tmp_path):
  (tmp_path / 'fake_side.py').write_text(FAKE_SIDE)
  return {'PYTHONPATH': str(tmp_path)}


def fake(seconds, batch=None) -> throughput.Variant:
  return throughput.Variant('fake_side:Side', {'seconds': seconds}, batch=batch)


def test_rounds_give_exact_rates_ratios_and_table(fake_env, monkeypatch):
  """Known step times in, exact img/s, ratios with ranges, GFLOP/s and table cells out."""
  for key, value in fake_env.items():
    monkeypatch.setenv(key, value)
  variants = {'gnet-jax': fake([0.5, 0.25, 1.0]), 'half batch': fake([0.5], batch=2),
              'PyTorch NCHW (as written)': fake([1.0]), 'PyTorch channels_last': fake([0.8])}
  args = argparse.Namespace(batch=4, steps=3, warmup=1, tasks=['train'], budget_s=60,
                            min_rounds=2, max_rounds=5, spread=0.1, torch_device='cpu',
                            model='d2l', aux_weight=0.0)
  reference = list(throughput.TORCH_VARIANTS)
  result = throughput.bench_size(args, 16, variants, reference)
  rows = result['tasks']['train']
  jax_row = rows['gnet-jax']
  # The warm-up takes the first 0.5 s; each round then times 0.25, 1.0, 0.5 s at batch 4.
  assert jax_row['img_per_s'] == {'median': 8.0, 'min': 4.0, 'max': 16.0, 'n': 6}
  assert jax_row['rounds'] == 2 and jax_row['first_step_s'] == 0.5  # ratios agree: no 3rd round
  assert jax_row['gflops'] == pytest.approx(8.0 * 3e9 / 1e9)
  # Per round: each one's median img/s over the faster PyTorch's (4 / 0.8 = 5 img/s).
  assert jax_row['ratio']['median'] == pytest.approx(8.0 / 5.0)
  assert rows['half batch']['img_per_s']['median'] == 4.0 and rows['half batch']['batch'] == 2
  assert rows['half batch']['ratio']['median'] == pytest.approx(0.8)
  assert rows['PyTorch NCHW (as written)']['ratio']['median'] == pytest.approx(0.8)
  assert rows['PyTorch channels_last']['ratio'] == {'median': 1.0, 'min': 1.0, 'max': 1.0, 'n': 2}
  assert result['workers']['gnet-jax']['peak_rss'] == 3 * 2**30
  line = next(l for l in throughput.table([result], reference).splitlines()
              if l.startswith('| 16 | train | gnet-jax |'))
  assert line == ('| 16 | train | gnet-jax | 4 | 8.0 | 4.0-16.0 | 1.60x (1.60-1.60), 2 rounds '
                  '| 24.0 | 2.0 | 0.5 | 3.00 GiB RSS |')


def test_a_failing_or_hanging_worker_is_reported_not_waited_for(fake_env):
  worker = harness.Worker('fake_side:Side', {'size': 1, 'batch': 1, 'seconds': [0.1]}, fake_env,
                          'fake')
  assert worker.call({'op': 'info'})['device'] == 'cpu:fake'  # stdout chatter went to stderr
  assert worker.ask({'op': 'fail'}) == {'status': 'error', 'error': 'ValueError: no such thing'}
  with pytest.raises(harness.WorkerDied, match='fake: ValueError: no such thing'):
    worker.call({'op': 'fail'})
  t0 = time.monotonic()
  assert worker.ask({'op': 'hang'}, deadline=time.monotonic() + 1) is None
  assert time.monotonic() - t0 < 20 and worker.proc.poll() is not None  # stopped, not waited


def test_variants_ops_at_first_and_the_sweep_expanded():
  parser = argparse.ArgumentParser()
  args = argparse.Namespace(jax_variants='gnet-jax kernels=xla,sweep', ops_at=['c638eba'])
  variants = throughput.choose_variants(args, 'cpu', parser)
  names = list(variants)
  assert names[:3] == ['gnet-jax ops@c638eba', 'gnet-jax kernels=xla', 'gnet-jax']
  assert names[3:] == list(throughput.SWEEP)
  assert variants['gnet-jax ops@c638eba'].kwargs == {'ops_at': 'c638eba'}
  for wrong in ('gnet-jax,fastest', ''):
    args.jax_variants, args.ops_at = wrong, []
    with pytest.raises(SystemExit):
      throughput.choose_variants(args, 'cpu', parser)


def test_the_sweep_names_only_flags_this_jaxlib_knows():
  # XLA aborts the worker on an unknown flag; a renamed flag would show as a failed worker.
  names = {f.split('=')[0][2:] for v in throughput.SWEEP.values() for f in v.xla_flags.split()}
  assert names and all(xla_flags.xla_knows_flag(n) for n in names), names


def test_ops_at_a_revision_is_its_own_module_swapped_in_and_back():
  old = harness.ops_at('HEAD')  # the committed version, as a module of its own
  assert old is not ops and old.__name__ == 'ops_at_HEAD' and old.__file__ != ops.__file__
  with harness.models_using(old):
    assert models.ops is old
  assert models.ops is ops


def test_aux_weight_is_refused_for_the_books_network_and_defaults_on_for_inception_v1():
  with pytest.raises(SystemExit):
    throughput.parse_args(['--aux-weight', '0.3'])
  with pytest.raises(SystemExit):
    throughput.parse_args(['--model', 'inception_v1', '--aux-weight', '-1'])
  assert throughput.parse_args([])[0].aux_weight == 0.0
  args = throughput.parse_args(['--model', 'inception_v1'])[0]
  assert args.aux_weight == harness.INCEPTION_AUX_WEIGHT > 0
  assert 'aux heads on' in throughput.model_line(args)
  args.aux_weight = 0.0
  assert 'aux heads off' in throughput.model_line(args)


@pytest.mark.skipif(not HAS_TORCHVISION, reason='needs torch and torchvision')
def test_throughput_script_trains_inception_v1_beside_torchvisions_googlenet(tmp_path):
  """The 224x224 row's command at 32x32, batch 2, one step per round: both sides train
  torchvision's GoogLeNet (3 channels, 1,000 classes, aux heads); the table, the JSON and
  the machine they ran on agree. The book's network takes the same path through the
  harness (``--model`` only picks the sides' network), as accelerator_report's smoke runs."""
  out = tmp_path / 'result.json'
  cmd = [sys.executable, '-m', 'benchmarks.throughput', '--model', 'inception_v1', '--sizes',
         '32', '--batch', '2', '--steps', '1', '--warmup', '1', '--tasks', 'train',
         '--min-rounds', '2', '--max-rounds', '2', '--jax-variants', 'gnet-jax kernels=xla',
         '--json', str(out)]
  if not HAS_TORCH:
    cmd.append('--no-torch')
  # Workers inherit conftest's persistent compilation cache through the environment.
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout
  assert 'machine:' in table and 'versions: python' in table and 'load average' in table
  assert 'model: inception_v1' in table and 'aux heads on, loss weight 0.3' in table
  saved = json.loads(out.read_text())
  assert saved['machine']['versions']['jax'] and saved['machine']['cores'] > 0
  [result] = saved['results']
  assert (result['model'], result['aux_weight']) == ('inception_v1', 0.3)
  flops = result['flops_per_image']  # torchvision's network, not the book's at this size
  assert flops['train'] != pytest.approx(harness.model_flops(32)['train'], rel=0.01)
  assert 2.5 * flops['eval'] < flops['train'] < 3.5 * flops['eval']  # forward + backward
  rows = result['tasks']['train']
  names = ['gnet-jax kernels=xla'] + (list(throughput.TORCH_VARIANTS) if HAS_TORCH else [])
  assert sorted(rows) == sorted(names)
  for name in names:
    row = rows[name]
    rate = row['img_per_s']
    assert rate['n'] == 2 and 0 < rate['min'] <= rate['median'] <= rate['max']
    assert row['gflops'] == pytest.approx(rate['median'] * flops['train'] / 1e9, rel=1e-12)
    assert result['workers'][name]['peak_rss'] > 2**20 and row['first_step_s'] > 0
    line = next(l for l in table.splitlines() if l.startswith(f'| 32 | train | {name} |'))
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[4:6] == [f"{rate['median']:.1f}", f"{rate['min']:.1f}-{rate['max']:.1f}"]
    assert cells[7] == f"{row['gflops']:.1f}"
    ratio = row['ratio']
    assert row['rounds'] == 2 and math.isfinite(ratio['median'])
    assert 0 < ratio['min'] <= ratio['median'] <= ratio['max']
    assert f"{ratio['median']:.2f}x" in line
  assert result['workers']['gnet-jax kernels=xla']['compile_s'] > 0
  if HAS_TORCH:  # each round's ratio is to the faster PyTorch layout: it is 1, the other <= 1
    assert max(rows[n]['ratio']['max'] for n in throughput.TORCH_VARIANTS) == pytest.approx(1.0)


def test_the_pytorch_device_follows_jax_or_says_why_there_is_none():
  assert harness.torch_device('cpu', no_torch=True) == (None, 'PyTorch left out (--no-torch)')
  device, note = harness.torch_device('tpu')
  assert device is None and 'tpu' in note
  if HAS_TORCH:
    assert harness.torch_device('cpu') == ('cpu', None)
