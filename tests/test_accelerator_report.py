"""``benchmarks/accelerator_report.py --smoke``: every path of the accelerator report, on CPU.

The smoke run is checked for what its report says (rows of both dtypes, both
kernel sets, several batch sizes, PyTorch beside gnet-jax, correctness checks
with numbers, the book's run), never for its speed; the helpers are checked
for reporting a correctness failure as one, and for the peaks table.
"""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

HAS_TORCH = importlib.util.find_spec('torch') is not None


def _load():
  spec = importlib.util.spec_from_file_location(
      'accelerator_report', REPO / 'benchmarks' / 'accelerator_report.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up by name
  spec.loader.exec_module(module)
  return module


report_lib = _load()


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp('accelerator_report')
  # A budget no shared test machine overruns: only torch.compile (its own 20 s cap) may skip.
  cmd = [sys.executable, str(REPO / 'benchmarks' / 'accelerator_report.py'), '--smoke',
         '--out', str(out), '--budget-s', '1200']
  if not HAS_TORCH:
    cmd.append('--no-torch')
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc.stdout, json.loads((out / 'report.json').read_text()), (out / 'report.md').read_text()


def test_smoke_checks_correctness_with_numbers(smoke):
  stdout, report, _ = smoke
  assert stdout.strip().splitlines()[-1].startswith('PASS: correctness 5/5 checks passed')
  names = [c['check'] for c in report['correctness']]
  assert sum('device vs host CPU' in n for n in names) == 2
  assert sum('kernels=custom vs xla' in n for n in names) == 1
  assert sum(n.startswith('bfloat16 vs float32') for n in names) == 2
  for c in report['correctness']:
    assert c['status'] == 'pass', c
    for key, limit in c['limits'].items():
      assert isinstance(c[key], float) and math.isfinite(c[key]) and c[key] <= limit, c
  assert report['passed'] is True
  assert report['precision']['jax']['float32_mode'] == 'float32'  # XLA:CPU rounds nothing


def test_smoke_measures_both_dtypes_kernel_sets_and_batches(smoke):
  _, report, markdown = smoke
  rows = report['jax_rows']
  assert all(r['status'] == 'ok' for r in rows), rows
  assert {r['dtype'] for r in rows} == {'float32', 'bfloat16'}
  assert {r['kernels'] for r in rows} == {'xla', 'custom'}
  assert {r['batch'] for r in rows} == {2, 4}
  for r in rows:
    assert r['img_per_s'] > 0 and r['tflops'] > 0 and r['step_ms'] > 0
    assert r['compile_cold_s'] > 0 and r['compile_warm_s'] > 0 and r['warm_cache_hit'] is True
    assert r['rss_peak_bytes'] > 0 and r['program_bytes'] > 0
    assert r['peak_fraction'] is None  # no datasheet peak for a CPU
  assert '| gnet-jax | kernels=xla | 32 | 2 | float32 |' in markdown
  assert '| gnet-jax | kernels=custom | 32 | 2 | bfloat16 |' in markdown


@pytest.mark.skipif(not HAS_TORCH, reason='needs torch')
def test_smoke_runs_pytorch_beside_gnet_jax(smoke):
  _, report, markdown = smoke
  ok = [r for r in report['torch_rows'] if r['status'] == 'ok']
  assert {r['variant'] for r in ok} >= {'eager NCHW', 'eager channels_last'}
  assert {r['dtype'] for r in ok} == {'float32', 'bfloat16'} and {r['batch'] for r in ok} == {2, 4}
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
  assert '| PyTorch | eager channels_last | 32 | 4 | bfloat16 |' in markdown


def test_smoke_runs_the_books_config(smoke):
  _, report, markdown = smoke
  book = report['book_run']
  assert book['status'] == 'ok' and book['returncode'] == 0, '\n'.join(book.get('tail', []))
  assert 'configs/fashion_mnist.py' in book['command']
  assert [e['epoch'] for e in book['epochs']] == [1, 2]
  assert book['final_line'].startswith('epoch 2/2: loss ') and book['wall_s'] > 0
  assert "## The book's run" in markdown and 'epoch 2/2' in markdown


def test_a_correctness_failure_is_a_failure_not_a_skip():
  logits = np.linspace(-1, 1, 20).reshape(2, 10)
  grads = {'conv': {'kernel': np.ones((3, 3))}}
  same = report_lib.compare_outputs('same', 'xla', (logits, grads), (logits, grads))
  assert same['status'] == 'pass' and same['logits_err'] == 0.0
  wrong = report_lib.compare_outputs('wrong', 'xla', (logits, {'conv': {'kernel': 2 * grads[
      'conv']['kernel']}}), (logits, grads))
  assert wrong['status'] == 'FAIL' and wrong['grads_err'] == 1.0
  assert wrong['worst_leaf'] == "['conv']['kernel']"
  nan = report_lib.check('nan', 'xla', {'loss_err': 0.05}, loss_err=float('nan'))
  assert nan['status'] == 'FAIL'
  report = {'correctness': [same], 'skipped': []}
  assert report_lib.correctness_passed(report)
  assert not report_lib.correctness_passed({**report, 'correctness': [same, wrong]})
  skipped = {'task': 'correctness: logits and gradients, kernels=xla', 'reason': 'budget'}
  assert not report_lib.correctness_passed({**report, 'skipped': [skipped]})
  assert not report_lib.correctness_passed({'correctness': [], 'skipped': []})


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
