"""``python -m benchmarks.accelerator_report --smoke``: every path of the report, on CPU.

The smoke run is checked for what its report says (rows of both dtypes,
PyTorch beside gnet-jax, correctness checks of both kernel sets with numbers,
the book's run and its spread), never for its speed; it runs each kind of task
once, and the full plan's loops (batches, seeds, kernel sets) are checked on
the plan itself;
on a CPU the device-vs-host comparison has nothing to compare and must say so
instead of passing; in-process, a second virtual CPU device stands in for an
accelerator, so that comparison runs the step on both. The helpers are
checked for reporting a correctness failure as one, and for the peaks table.
The smoke run shares the suite's persistent compilation cache (conftest), so a
second run compiles little.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import accelerator_report as report_lib
from conftest import REPO

HAS_TORCH = importlib.util.find_spec('torch') is not None


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp('accelerator_report')
  # A budget no shared test machine overruns: only torch.compile (its own cap) may skip.
  cmd = [sys.executable, '-m', 'benchmarks.accelerator_report', '--smoke', '--out', str(out),
         '--budget-s', '1200']
  if not HAS_TORCH:
    cmd.append('--no-torch')
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc.stdout, json.loads((out / 'report.json').read_text()), (out / 'report.md').read_text()


def test_smoke_checks_correctness_with_numbers(smoke):
  stdout, report, markdown = smoke
  assert stdout.strip().splitlines()[-1].startswith(
      'PASS: correctness 2/2 checks passed (2 not applicable)')
  by_name = {}
  for c in report['correctness']:
    by_name.setdefault(c['check'], []).append(c)
  # On a CPU the device is the host: reported as not applicable, never counted as a pass.
  host = by_name.pop('float32 train step (loss, update): device vs host CPU')
  assert [(c['kernels'], c['status']) for c in host] == [('xla', 'n/a'), ('custom', 'n/a')]
  assert all('limits' not in c and 'host CPU' in c['note'] for c in host)
  assert '| float32 train step (loss, update): device vs host CPU | xla |' in markdown
  [kernels] = by_name.pop('float32 train step: kernels=custom vs xla, device')
  bf16 = by_name.pop('bfloat16 vs float32 after 2 SGD steps')
  assert not by_name and [c['kernels'] for c in bf16] == ['xla']
  for c in [kernels, *bf16]:
    assert c['status'] == 'pass' and c['limits'], c
    for key, limit in c['limits'].items():
      assert isinstance(c[key], float) and math.isfinite(c[key]) and c[key] <= limit, c
  # Two kernel sets compute the same step, but not bit for bit: a real comparison.
  assert kernels['update_err'] > 0 and kernels['worst_leaf']
  assert report['passed'] is True
  assert report['precision']['jax']['float32_mode'] == 'float32'  # XLA:CPU rounds nothing


def test_smoke_measures_both_dtypes_kernel_sets_and_batches(smoke):
  _, report, markdown = smoke
  assert all(r['status'] == 'ok' for r in report['jax_rows']), report['jax_rows']
  rows = [r for r in report['jax_rows'] if r['model'] == 'd2l']
  assert sorted((r['batch'], r['dtype'], r['kernels']) for r in rows) == [
      (2, 'bfloat16', 'xla'), (2, 'float32', 'xla')]
  flops = report['precision']['jax']['flops']['32']
  assert 2.5 * flops['eval'] < flops['train'] < 3.5 * flops['eval']  # forward + backward
  for r in rows:
    low, high = r['img_per_s_range']
    assert 0 < low <= r['img_per_s'] <= high and r['step_ms'] > 0
    assert r['tflops'] == pytest.approx(r['img_per_s'] * flops['train'] / 1e12)
    assert r['compile_cold_s'] > 0 and r['compile_warm_s'] > 0 and r['warm_cache_hit'] is True
    assert r['rss_peak_bytes'] > 0 and r['program_bytes'] > 0
    assert r['peak_fraction'] is None  # no datasheet peak for a CPU
  assert '| gnet-jax | kernels=xla | 32 | 2 | float32 |' in markdown
  assert '| gnet-jax | kernels=xla | 32 | 2 | bfloat16 |' in markdown


def test_smoke_trains_inception_v1_beside_torchvisions_googlenet(smoke):
  """The 224x224 row of a GPU report, at the smoke's 32x32: torchvision's GoogLeNet in both
  frameworks, with its own FLOP count and a finite ratio to PyTorch."""
  _, report, markdown = smoke
  [row] = [r for r in report['jax_rows'] if r['model'] == 'inception_v1']
  assert (row['status'], row['size'], row['batch'], row['dtype']) == ('ok', 32, 2, 'float32')
  flops = report['precision']['jax']['flops']
  assert flops['inception_v1 32']['train'] != flops['32']['train']
  assert row['tflops'] == pytest.approx(row['img_per_s'] * flops['inception_v1 32']['train'] / 1e12)
  assert '| gnet-jax | inception_v1, kernels=xla | 32 | 2 | float32 |' in markdown
  if HAS_TORCH:
    torch_rows = [r for r in report['torch_rows'] if r['model'] == 'inception_v1']
    assert {r['variant'] for r in torch_rows if r['status'] == 'ok'} == {
        'eager NCHW', 'eager channels_last'}
    assert math.isfinite(row['vs_torch']) and row['vs_torch'] > 0
    assert '| PyTorch | inception_v1, eager channels_last | 32 | 2 | float32 |' in markdown


@pytest.mark.skipif(not HAS_TORCH, reason='needs torch')
def test_smoke_runs_pytorch_beside_gnet_jax(smoke):
  _, report, markdown = smoke
  ok = [r for r in report['torch_rows'] if r['status'] == 'ok']
  assert {r['variant'] for r in ok} >= {'eager NCHW', 'eager channels_last'}
  assert {(r['batch'], r['dtype']) for r in ok} >= {(2, 'float32'), (2, 'bfloat16')}
  # torch.compile either measured or skipped with its reason, never silently missing
  compiled = {(r['variant'], r['dtype']) for r in ok if r['variant'].startswith('compile')}
  skipped = {s['task'] for s in report['skipped']}
  for variant in ('compile', 'compile max-autotune'):
    for dtype in ('float32', 'bfloat16'):
      assert (variant, dtype) in compiled or f'PyTorch 32px batch 2 {dtype} {variant}' in skipped
  assert all(s['task'].startswith('PyTorch') and 'compile' in s['task'] for s in report['skipped'])
  for r in report['jax_rows']:
    assert r['vs_torch'] > 0 and r['vs_torch_variant'] in {'eager NCHW', 'eager channels_last',
                                                           'compile', 'compile max-autotune'}
  assert '| PyTorch | eager channels_last | 32 | 2 | bfloat16 |' in markdown


def test_smoke_runs_the_books_config_and_reports_its_spread(smoke):
  _, report, markdown = smoke
  [run] = report['book_runs']
  assert run['seed'] == 0 and run['status'] == 'ok' and run['returncode'] == 0, '\n'.join(
      run.get('tail', []))
  assert 'configs/fashion_mnist.py' in run['command'] and '--config.seed' not in run['command']
  assert [e['epoch'] for e in run['epochs']] == [1, 2]
  assert run['final_line'].startswith('epoch 2/2: loss ') and run['wall_s'] > 0
  assert run['final_test_acc'] == run['epochs'][-1]['test_acc']
  acc = run['final_test_acc']
  spread = report['book_seed_spread']
  assert (spread['min'], spread['median'], spread['max'], spread['n'], spread['book']) == (
      acc, acc, acc, 1, 0.886)
  assert "## The book's run" in markdown and 'epoch 2/2' in markdown
  assert f"over 1 seed(s) [0]: min {acc:.3f}" in markdown and '0.886' in markdown


def test_the_full_plan_runs_every_kernel_set_and_dtype_first():
  tasks = report_lib.plan_tasks(report_lib.FULL, 'cuda', on_cpu=False)
  first = [(t.request['kernels'], t.request['dtype']) for t in tasks
           if t.worker == 'jax' and t.request.get('op') == 'row' and (t.request['size'], t.request['batch']) == (96, 128)
           and t.request.get('model', 'd2l') == 'd2l']
  assert sorted(first) == [(k, d) for k in ('custom', 'xla') for d in ('bfloat16', 'float32')]
  checks = [t.request['kernels'] for t in tasks if t.request.get('op') == 'bf16_check']
  assert checks == ['xla', 'custom']


def test_the_device_vs_host_check_runs_the_step_on_both(monkeypatch):
  """The accelerator's path, in-process: a second (virtual) CPU device stands in for the
  device, so the check compiles and runs the train step on it and on the host CPU."""
  import jax
  monkeypatch.setenv('XLA_FLAGS', os.environ['XLA_FLAGS'])  # restored after the test
  bench = report_lib.JaxBench(sizes=[32])
  bench.device = jax.devices('cpu')[1]
  [host_check] = bench.step_check({'size': 32, 'batch': 2, 'kernels': 'xla'})['checks']
  # Two compiles of one step (the host's may come from the persistent cache, compiled under
  # other XLA flags): equal within the float32 tolerance, not necessarily bit for bit.
  assert host_check['status'] == 'pass' and host_check['limits'], host_check
  assert all(math.isfinite(host_check[k]) for k in host_check['limits'])
  ran_on = {key[4]: steps.runner.devices for key, (steps, _, _) in bench.compiled.items()}
  assert ran_on == {False: (jax.devices('cpu')[1],), True: (jax.devices('cpu')[0],)}


def test_a_correctness_failure_is_a_failure_not_a_skip():
  step = {'loss': 2.3, 'update': {'conv': {'kernel': np.ones((3, 3))}}}
  same = report_lib.compare_steps('same', 'xla', step, step)
  assert same['status'] == 'pass' and same['loss_err'] == 0.0 and same['update_err'] == 0.0
  wrong = report_lib.compare_steps('wrong', 'xla', {**step, 'update': {'conv': {
      'kernel': 2 * np.ones((3, 3))}}}, step)
  assert wrong['status'] == 'FAIL' and wrong['update_err'] == 1.0
  assert wrong['worst_leaf'] == "['conv']['kernel']"
  assert report_lib.compare_steps('loss', 'xla', {**step, 'loss': 2.4}, step)['status'] == 'FAIL'
  nan = report_lib.check('nan', 'xla', {'loss_err': 0.05}, loss_err=float('nan'))
  assert nan['status'] == 'FAIL'
  na = {'check': 'device vs host CPU', 'status': 'n/a'}
  passed = report_lib.correctness_passed
  assert passed({'correctness': [same, na], 'skipped': []})
  assert not passed({'correctness': [na], 'skipped': []})  # nothing compared is no pass
  assert not passed({'correctness': [same, wrong], 'skipped': []})
  skipped = {'task': 'correctness: float32 train step, kernels=xla', 'reason': 'budget'}
  assert not passed({'correctness': [same], 'skipped': [skipped]})
  assert not passed({'correctness': [], 'skipped': []})


def test_seed_spread_counts_finished_runs_only():
  runs = [{'seed': s, 'final_test_acc': a} for s, a in ((0, 0.87), (1, 0.89), (2, 0.85))]
  spread = report_lib.seed_spread(runs + [{'seed': 3, 'final_test_acc': None}])
  assert (spread['min'], spread['median'], spread['max'], spread['seeds']) == (
      0.85, 0.87, 0.89, [0, 1, 2])
  assert report_lib.seed_spread([{'seed': 0, 'final_test_acc': None}]) is None


def test_the_plan_puts_correctness_first_and_the_seeds_after_the_first_book_run():
  tasks = report_lib.plan_tasks(report_lib.FULL, 'cuda', on_cpu=False)
  labels = [t.label for t in tasks]
  assert labels[0] == 'precision probe' and labels[1].startswith('correctness')
  book = [i for i, t in enumerate(tasks) if t.worker == 'book']
  assert [tasks[i].request['seed'] for i in book] == [0, 1, 2, 3, 4]
  assert book[1] > labels.index('gnet-jax 224px batch 128 bfloat16 kernels=xla')
  assert book[-1] < labels.index('gnet-jax 96px batch 256 float32 kernels=xla')
  assert labels[-1].endswith('compile max-autotune')
  inception = [l for l in labels if 'inception_v1' in l]  # after the first book run
  assert inception == ['gnet-jax inception_v1 224px batch 128 float32 kernels=xla',
                       'gnet-jax inception_v1 224px batch 128 bfloat16 kernels=xla'] + [
      f'PyTorch inception_v1 224px batch 128 {d} {v}' for d in ('float32', 'bfloat16')
      for v in ('eager NCHW', 'eager channels_last', 'compile')]
  assert book[0] < labels.index(inception[0]) and labels.index(inception[-1]) < book[1]


def test_peaks_by_device_kind():
  peak = report_lib.peak_tflops
  assert peak('NVIDIA H200', 'bfloat16', 'bf16') == 989.4
  assert peak('NVIDIA H100 80GB HBM3', 'float32', 'tf32') == 494.7
  assert peak('NVIDIA H100 80GB HBM3', 'float32', 'float32') == 66.9
  assert peak('NVIDIA A100-SXM4-40GB', 'float32', 'tf32') == 156.0
  assert peak('NVIDIA L4', 'bfloat16', 'bf16') == 121.0
  assert peak('NVIDIA L40S', 'bfloat16', 'bf16') is None  # not an L4
  assert peak('Tesla T4', 'bfloat16', 'bf16') is None  # no bfloat16 tensor cores
  assert peak('TPU v5 lite', 'float32', 'bf16') == 197.0
  assert peak('TPU v6 lite', 'bfloat16', 'bf16') == 918.0
  assert peak('cpu', 'float32', 'float32') is None


def test_on_a_cpu_each_kind_of_worker_starts_once_before_the_books_run():
  """No device memory to hand over on a CPU: all of gnet-jax's tasks in one worker, then
  PyTorch's eager ones in one, the book's run, and torch.compile's (minutes there) last."""
  tasks = report_lib.plan_tasks(report_lib.SMOKE, 'cpu', on_cpu=True)
  kinds = ['torch.compile' if t.request.get('variant', '').startswith('compile') else t.worker
           for t in tasks]
  runs = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
  assert runs == ['jax', 'torch', 'book', 'torch.compile']
  # Within a kind, the order of importance stays: the probe, then the correctness checks.
  assert [t.request['op'] for t in tasks[:3]] == ['probe', 'step_check', 'step_check']
