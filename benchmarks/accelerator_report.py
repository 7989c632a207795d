"""One command that measures gnet-jax on whatever accelerator JAX sees (GPU, TPU or CPU).

    python -m benchmarks.accelerator_report --out report/              # 480 s budget
    python -m benchmarks.accelerator_report --smoke --out /tmp/smoke   # every path, tiny, on CPU

In order of importance, within ``--budget-s`` (compiles included):

1. correctness on the device: one float32 train step (``train.make_train_step``
   at 'highest' precision: loss and parameter update) against the host CPU,
   ``kernels=custom`` against ``kernels=xla``, and bfloat16 against float32
   after a few SGD steps;
2. training throughput (float32 / bfloat16, ``kernels=xla`` / ``custom``,
   96x96 and 224x224, batch 128 to 1024): img/s, step time, FLOP/s and the
   fraction of the device's peak, memory, compile time with an empty and a
   warm persistent cache, the float32 matmul precision in force;
3. the PyTorch original on the same device (eager NCHW and channels_last,
   ``torch.compile``; float32 and bfloat16 autocast), and gnet-jax's ratio to
   the fastest variant at equal precision and batch; then torchvision's
   GoogLeNet (``--config.model=inception_v1``, aux heads on) at 224x224 against
   ``torchvision.models.googlenet`` the same way;
4. the book's run, ``train.py --config configs/fashion_mnist.py``, and the
   same for more seeds: the final test accuracies' spread beside the book's
   0.886 (one run is a draw, not the recipe's result).

What does not fit the budget is listed as skipped. Writes ``report.json`` and
``report.md`` to ``--out``; exits 1 when a correctness check fails or cannot
run. Each framework runs in worker processes of its own (``benchmarks.harness``),
so that a compile that overruns the budget can be stopped without losing the
rows already measured, and the two never hold device memory at the same time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness

DTYPES = ('float32', 'bfloat16')
KERNEL_SETS = ('xla', 'custom')
TORCH_EAGER = ('eager NCHW', 'eager channels_last')
TORCH_COMPILED = ('compile', 'compile max-autotune')


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to measure: sizes, batches (ascending), steps per row, correctness shapes, seeds."""
  sizes: tuple[int, ...]
  batches: tuple[int, ...]
  warmup: int
  steps: int
  sgd_steps: int  # bfloat16 vs float32 check, at (sizes[0], batches[0])
  book_seeds: int  # the book's run for seeds 0 .. book_seeds - 1
  larger_dtypes: tuple[str, ...] = DTYPES  # dtypes of the rows beyond the first batch
  custom_everywhere: bool = True  # kernels=custom beyond the correctness rows' shape
  # kernel sets of the first shape's rows and their bfloat16-vs-float32 check
  first_kernels: tuple[str, ...] = KERNEL_SETS
  book_overrides: tuple[str, ...] = ()
  # (size, batch) rows of torchvision's GoogLeNet (model=inception_v1) in ``larger_dtypes``
  inception_v1: tuple[tuple[int, int], ...] = ()


FULL = Plan(sizes=(96, 224), batches=(128, 256, 512, 1024), warmup=3, steps=10, sgd_steps=3,
            book_seeds=5, inception_v1=((224, 128),))
# Every code path at sizes that compile in seconds on a small CPU.
# The smoke runs each kind of task once (one batch, one seed, the bfloat16 rows and check
# with XLA's kernels only): tests/test_accelerator_report.py checks the plan's loops on FULL.
SMOKE = Plan(sizes=(32,), batches=(2,), warmup=1, steps=2, sgd_steps=2, book_seeds=1,
             larger_dtypes=('float32',), custom_everywhere=False, first_kernels=('xla',),
             book_overrides=('--config.image_size=32', '--config.batch_size=4',
                             '--config.num_epochs=2', '--config.train_examples=8',
                             '--config.eval_examples=8', '--config.data_source=idx'),
             inception_v1=((32, 2),))
SMOKE_BUDGET_S = 600  # a cap for slow, shared machines; a quiet 2-core VM needs a few minutes
# torch.compile is tried on CPU only if it fits this; it never does (it takes minutes there),
# so the smoke checks only that it is stopped and reported as skipped.
SMOKE_TORCH_COMPILE_CAP_S = 2
BOOK_TEST_ACC = 0.886  # d2l 8.4, the PyTorch run's last epoch
BOOK_TARGET_ACC = 0.88

# Correctness tolerances, as max|a - b| <= tol * max|b| (per output, per parameter leaf).
# float32 at 'highest' precision on two devices differs only in summation order (~1e-6).
TOL_FLOAT32 = 1e-3
# bfloat16 keeps 8 mantissa bits. After a few SGD steps from the same start its mean loss
# stays within a few percent of float32's, and its parameter update within ~25% in L2 norm
# over all parameters: at 32x32, batch 2, the smoke run measures ~3e-5 and ~0.11 (single deep
# layers differ more, where ReLUs of zero-bias units flip). A wrong cast or kernel is off by O(1).
TOL_BF16_LOSS = 0.05
TOL_BF16_UPDATE = 0.25

# Dense peak TFLOP/s per JAX device, by device kind (lower case, first match wins), from the
# vendors' datasheets: NVIDIA H100 / H200 / A100 / L4 (their "with sparsity" figures halved)
# and T4 (no TF32 or bfloat16 tensor cores); Google Cloud's TPU system-architecture pages
# (bfloat16 per chip; TPU v2 and v3 show each of a chip's two TensorCores as a device, so
# half a chip). On TPU, float32 matmuls at the default precision run as one bfloat16 pass,
# hence the same 'float32' and 'bfloat16' figures there. Unknown kinds get no fraction.
PEAK_TFLOPS = (
    (r'h100 pcie', {'fp32': 51.2, 'tf32': 378.0, 'bf16': 756.0}),
    (r'h100 nvl', {'fp32': 60.0, 'tf32': 417.5, 'bf16': 835.5}),
    (r'h100|h200|gh200', {'fp32': 66.9, 'tf32': 494.7, 'bf16': 989.4}),
    (r'a100', {'fp32': 19.5, 'tf32': 156.0, 'bf16': 312.0}),
    (r'\bl4\b', {'fp32': 30.3, 'tf32': 60.0, 'bf16': 121.0}),
    (r'\bt4\b', {'fp32': 8.1}),
    (r'tpu v2', {'fp32': 22.5, 'bf16': 22.5}),
    (r'tpu v3', {'fp32': 61.5, 'bf16': 61.5}),
    (r'tpu v4', {'fp32': 275.0, 'bf16': 275.0}),
    (r'tpu v5 ?lite|tpu v5e', {'fp32': 197.0, 'bf16': 197.0}),
    (r'tpu v6 ?lite|tpu v6e', {'fp32': 918.0, 'bf16': 918.0}),
)


def peak_tflops(device_kind: str, dtype: str, float32_mode: str) -> float | None:
  """The datasheet peak for a row, or None for an unknown device or precision."""
  key = 'bf16' if dtype == 'bfloat16' else {'float32': 'fp32', 'tf32': 'tf32',
                                            'bf16': 'bf16'}.get(float32_mode)
  for pattern, peaks in PEAK_TFLOPS:
    if re.search(pattern, device_kind.lower()):
      return peaks.get(key) if key else None
  return None


def rounding_mode(errors: dict[str, float]) -> str:
  """'float32', 'tf32' or 'bf16' from float32 products' errors against float64.

  TF32 keeps 10 mantissa bits (errors ~5e-4 on these probes), bfloat16 7
  (~4e-3), float32 23 (~1e-7): measured, because the settings that decide it
  (XLA's per-platform defaults, cuDNN's, a GPU without TF32) are not all visible.
  """
  worst = max(errors.values())
  return 'float32' if worst < 1e-5 else 'tf32' if worst < 2e-3 else 'bf16'


def rel_err(got, ref) -> float:
  """max|got - ref| / max|ref|: the tolerance measure of every check."""
  import numpy as np
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
  return diff / scale if scale > 0 else diff


def worst_leaf(got, ref) -> tuple[float, str]:
  """The largest ``rel_err`` over matching leaves of two trees, and that leaf's path."""
  import jax
  pairs = zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref))
  return max(((rel_err(g, r), jax.tree_util.keystr(path)) for (path, g), r in pairs),
             default=(0.0, ''))


def tree_rel_norm(got, ref) -> float:
  """||got - ref|| / ||ref|| in L2 over all leaves of two trees."""
  import jax
  import numpy as np
  pairs = [(np.asarray(g, np.float64), np.asarray(r, np.float64))
           for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
  num = sum(float(np.sum((g - r) ** 2)) for g, r in pairs)
  den = sum(float(np.sum(r ** 2)) for _, r in pairs)
  return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def check(name: str, kernels: str, limits: dict[str, float], **values: Any) -> dict:
  """A correctness entry: passed when every limited value is within its limit (NaN fails)."""
  passed = all(isinstance(values.get(k), float) and values[k] <= limit
               for k, limit in limits.items())
  return {'check': name, 'kernels': kernels, **values, 'limits': limits,
          'status': 'pass' if passed else 'FAIL'}


def compare_steps(name: str, kernels: str, got: dict, ref: dict) -> dict:
  """``check`` of two train steps' loss and parameter update at the float32 tolerance."""
  update_err, leaf = worst_leaf(got['update'], ref['update'])
  return check(name, kernels, {'loss_err': TOL_FLOAT32, 'update_err': TOL_FLOAT32},
               loss_err=rel_err(got['loss'], ref['loss']), update_err=update_err,
               worst_leaf=leaf)


# ----------------------------------------------------------------------------- workers


class JaxBench:
  """A worker: gnet-jax on JAX's default device (probe, correctness checks, training rows)."""

  def __init__(self, sizes: list[int], inception_sizes: tuple[int, ...] = ()):
    from gnet_jax import xla_flags
    xla_flags.apply_defaults()  # before JAX starts, as train.py does
    import jax
    self.jax, self.sizes, self.inception_sizes = jax, sizes, inception_sizes
    self.device, self.host = jax.devices()[0], jax.devices('cpu')[0]
    self.compiled: dict[tuple, tuple] = {}
    self.sgd_runs: dict[tuple, dict] = {}
    self.step_results: dict[str, dict] = {}
    self.cache_hits = 0
    jax.monitoring.register_event_listener(self._on_event)

  def _on_event(self, event: str, **_) -> None:
    if event == '/jax/compilation_cache/cache_hits':
      self.cache_hits += 1

  def _compiled(self, size: int, batch: int, dtype: str, kernels: str, on_host: bool = False,
                check: bool = False, model: str = 'd2l'):
    """(steps, compiled train step, compile seconds), compiled once per shape and device.

    The correctness checks compile at 'highest' precision and the rows at the
    default, except on a CPU, where XLA rounds nothing at either setting and
    the rows' compiled float32 steps serve the checks too.
    """
    highest = check and self.device.platform != 'cpu'
    key = (size, batch, dtype, kernels, on_host, highest, model)
    if key not in self.compiled:
      aux = harness.INCEPTION_AUX_WEIGHT if model == 'inception_v1' else 0.0
      steps = harness.JaxSteps.build(harness.gnet_config(size, batch, dtype, kernels, model, aux),
                                     devices=[self.host if on_host else self.device])
      with self.jax.default_matmul_precision('highest' if highest else None):
        self.compiled[key] = (steps, *steps.compile())
    return self.compiled[key]

  def probe(self, _: dict) -> dict:
    """The device, how float32 dots and convolutions round, and GoogLeNet's FLOPs per size."""
    import jax.numpy as jnp
    import numpy as np
    lax, put = self.jax.lax, self.jax.device_put
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    x, k = rng.standard_normal((1, 16, 16, 64)), rng.standard_normal((3, 3, 64, 64))
    conv = lambda d, **p: np.asarray(lax.conv_general_dilated(  # noqa: E731
        put(x, d), put(k, d), (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), **p))
    errors = {'dot': rel_err(jnp.dot(put(a, self.device), put(b, self.device)), a @ b),
              'conv': rel_err(conv(self.device), conv(self.host, precision='highest'))}
    setting = getattr(self.jax.config, 'jax_default_matmul_precision', None)
    return {'status': 'ok', 'platform': self.device.platform,
            'device_kind': self.device.device_kind, 'num_devices': self.jax.device_count(),
            'matmul_precision_setting': setting or 'default', 'float32_errors': errors,
            'float32_mode': rounding_mode(errors),
            'flops': {**{str(s): harness.model_flops(s) for s in self.sizes},
                      **{flops_key(s, 'inception_v1'): harness.model_flops(s, 'inception_v1')
                         for s in self.inception_sizes}}}

  def step_check(self, req: dict) -> dict:
    """float32 train step: device against host CPU (not applicable on a CPU), then custom vs xla."""
    size, batch, kernels = req['size'], req['batch'], req['kernels']
    got = self._sgd_run(*self._compiled(size, batch, 'float32', kernels, check=True)[:2], 1,
                        seed=1)
    self.step_results[kernels] = got
    name = 'float32 train step (loss, update): device vs host CPU'
    if self.device == self.host:
      checks = [{'check': name, 'kernels': kernels, 'status': 'n/a',
                 'note': 'the device is the host CPU: nothing to compare'}]
    else:
      ref = self._sgd_run(*self._compiled(size, batch, 'float32', kernels, True, True)[:2], 1,
                          seed=1)
      checks = [compare_steps(name, kernels, got, ref)]
    if set(self.step_results) == set(KERNEL_SETS):
      checks.append(compare_steps('float32 train step: kernels=custom vs xla, device', 'custom',
                                  self.step_results['custom'], self.step_results['xla']))
    return {'status': 'ok', 'checks': checks}

  def bf16_check(self, req: dict) -> dict:
    """bfloat16 against float32 after the same few SGD steps (runs kept by ``row``)."""
    key = (req['size'], req['batch'], req['kernels'])
    f32, bf16 = self.sgd_runs.get(key + ('float32',)), self.sgd_runs.get(key + ('bfloat16',))
    if f32 is None or bf16 is None:
      return {'status': 'error', 'error': 'the float32 or bfloat16 row did not run'}
    leaf_err, leaf = worst_leaf(bf16['update'], f32['update'])
    return {'status': 'ok', 'checks': [check(
        f"bfloat16 vs float32 after {req['steps']} SGD steps", req['kernels'],
        {'loss_err': TOL_BF16_LOSS, 'update_err': TOL_BF16_UPDATE},
        loss_err=abs(bf16['loss'] - f32['loss']) / abs(f32['loss']),
        update_err=tree_rel_norm(bf16['update'], f32['update']), worst_leaf=leaf,
        worst_leaf_err=leaf_err, loss_float32=f32['loss'], loss_bfloat16=bf16['loss'])]}

  def _sgd_run(self, steps, compiled, count: int, seed: int = 10) -> dict:
    """``count`` SGD steps from the initial state on fixed random batches: their mean loss
    and the parameter update."""
    import numpy as np
    state = steps.state()
    for i in range(count):
      state = compiled(state, steps.batch(seed=seed + i))
    end = steps.runner.to_host(state)
    return {'loss': float(end.metrics['loss_sum']) / float(end.metrics['count']),
            'update': self.jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old),
                                        end.params, steps.host_state.params)}

  def row(self, req: dict) -> dict:
    """One training row: cold and warm-cache compile, optional SGD check, timed steps."""
    size, batch, dtype, kernels = req['size'], req['batch'], req['dtype'], req['kernels']
    peak_before = self._allocator_peak()
    steps, compiled, cold_s = self._compiled(size, batch, dtype, kernels,
                                             model=req.get('model', 'd2l'))
    self.jax.clear_caches()  # the next compile can only come from the persistent cache
    hits = self.cache_hits
    _, warm_s = steps.compile()
    if req.get('sgd_steps'):
      self.sgd_runs[(size, batch, kernels, dtype)] = self._sgd_run(steps, compiled,
                                                                   req['sgd_steps'])
    state, data, times = steps.state(), steps.batch(), []
    for i in range(req['warmup'] + req['steps']):
      t0 = time.perf_counter()
      state = self.jax.block_until_ready(compiled(state, data))
      if i >= req['warmup']:
        times.append(time.perf_counter() - t0)
    del state
    memory = {**program_memory(compiled), **self._allocator_peak()}
    # The allocator keeps a process-wide high-water mark: it is this row's only if it rose.
    memory['peak_is_row'] = _peak(memory) > _peak(peak_before)
    return {'status': 'ok', 'step_s': times, 'compile_cold_s': cold_s, 'compile_warm_s': warm_s,
            'warm_cache_hit': self.cache_hits > hits, **memory}

  def _allocator_peak(self) -> dict:
    stats = self.device.memory_stats() if self.device.platform != 'cpu' else None
    if stats and 'peak_bytes_in_use' in stats:
      return {'device_peak_bytes': int(stats['peak_bytes_in_use'])}
    return {'rss_peak_bytes': harness.peak_rss_bytes()}


def _peak(memory: dict) -> int:
  return memory.get('device_peak_bytes') or memory.get('rss_peak_bytes') or 0


def program_memory(compiled) -> dict:
  """Bytes XLA's buffer assignment gives the compiled step (arguments + temporaries + outputs)."""
  try:
    m = compiled.memory_analysis()
    return {'program_bytes': int(m.argument_size_in_bytes + m.temp_size_in_bytes
                                 + m.output_size_in_bytes - m.alias_size_in_bytes)}
  except Exception:  # noqa: BLE001  not every backend reports it
    return {'program_bytes': None}


class TorchBench:
  """A worker: the PyTorch original (gnet_jax/torch_reference.py) on the device matching JAX's."""

  def __init__(self, device: str):
    import torch
    self.torch, self.device = torch, torch.device(device)
    if self.device.type == 'cuda':
      torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    dynamo = getattr(torch, '_dynamo', None)
    if dynamo is not None:  # one compile per row (static shapes); never fall back to eager
      for name in ('recompile_limit', 'cache_size_limit'):
        if hasattr(dynamo.config, name):
          setattr(dynamo.config, name, 64)

  def probe(self, _: dict) -> dict:
    """Versions, device and the float32 precision settings (TF32) in force."""
    torch, cuda = self.torch, self.device.type == 'cuda'
    settings = {}
    if cuda:
      conv = getattr(getattr(torch.backends.cudnn, 'conv', None), 'fp32_precision', None)
      matmul = getattr(torch.backends.cuda.matmul, 'fp32_precision', None)
      settings = {'cudnn_benchmark': torch.backends.cudnn.benchmark,
                  'cudnn_conv_fp32': conv or ('tf32' if torch.backends.cudnn.allow_tf32
                                              else 'ieee'),
                  'matmul_fp32': matmul or ('tf32' if torch.backends.cuda.matmul.allow_tf32
                                            else 'ieee')}
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=gen), torch.randn(256, 256, generator=gen)
    x, k = torch.randn(1, 64, 16, 16, generator=gen), torch.randn(64, 64, 3, 3, generator=gen)
    on, conv2d = (lambda t: t.to(self.device)), torch.nn.functional.conv2d
    errors = {'dot': rel_err((on(a) @ on(b)).cpu(), a.double() @ b.double()),
              'conv': rel_err(conv2d(on(x), on(k), padding=1).cpu(),
                              conv2d(x.double(), k.double(), padding=1))}
    return {'status': 'ok', 'version': torch.__version__, 'threads': torch.get_num_threads(),
            'device': f"{self.device.type}:{torch.cuda.get_device_name() if cuda else 'cpu'}",
            'float32_settings': settings, 'float32_mode': rounding_mode(errors)}

  def row(self, req: dict) -> dict:
    """One training row (``throughput.TorchSide``): the first step (compile included) apart,
    then timed steps."""
    from benchmarks.throughput import TorchSide
    cuda, variant = self.device.type == 'cuda', req['variant']
    compile_mode = (('max-autotune' if 'max-autotune' in variant else 'default')
                    if variant.startswith('compile') else None)
    model = req.get('model', 'd2l')
    side = TorchSide(req['size'], req['batch'], 'nchw' if variant == 'eager NCHW' else
                     'channels_last', str(self.device), req['dtype'], compile_mode, model,
                     harness.INCEPTION_AUX_WEIGHT if model == 'inception_v1' else 0.0)
    if cuda:
      self.torch.cuda.reset_peak_memory_stats()
    times = side.train({'count': 1 + req['warmup'] + req['steps']})['times']
    memory = ({'device_peak_bytes': int(self.torch.cuda.max_memory_allocated())} if cuda
              else {'rss_peak_bytes': harness.peak_rss_bytes()})
    del side
    if cuda:
      self.torch.cuda.empty_cache()
    return {'status': 'ok', 'step_s': times[1 + req['warmup']:],
            'compile_cold_s': times[0] if compile_mode else None, **memory}


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
  """One request to a worker ('jax' or 'torch'), or one of the book's runs ('book')."""
  worker: str
  label: str
  request: dict = dataclasses.field(default_factory=dict)
  group: tuple = ()  # rows of one group after an out-of-memory row are skipped


def flops_key(size: int, model: str = 'd2l') -> str:
  """The probe's FLOP count key: the size for the d2l network, 'inception_v1 SIZE' for it."""
  return str(size) if model == 'd2l' else f'{model} {size}'


def model_request(model: str) -> tuple[dict, str]:
  """A row's request entry and label part for ``model`` (none for the d2l network)."""
  return ({}, '') if model == 'd2l' else ({'model': model}, f'{model} ')


def jax_row(size: int, batch: int, dtype: str, kernels: str, plan: Plan, sgd: bool = False,
            model: str = 'd2l') -> Task:
  extra, name = model_request(model)
  request = {'op': 'row', 'size': size, 'batch': batch, 'dtype': dtype, 'kernels': kernels,
             'warmup': plan.warmup, 'steps': plan.steps, 'sgd_steps': plan.sgd_steps * sgd,
             **extra}
  return Task('jax', f'gnet-jax {name}{size}px batch {batch} {dtype} kernels={kernels}', request,
              ('jax', model, size, dtype, kernels))


def torch_row(size: int, batch: int, dtype: str, variant: str, plan: Plan, model: str = 'd2l'
              ) -> Task:
  extra, name = model_request(model)
  request = {'op': 'row', 'size': size, 'batch': batch, 'dtype': dtype, 'variant': variant,
             'warmup': plan.warmup, 'steps': plan.steps, **extra}
  return Task('torch', f'PyTorch {name}{size}px batch {batch} {dtype} {variant}', request,
              ('torch', model, size, dtype, variant))


def book_task(seed: int) -> Task:
  return Task('book', f"the book's run: configs/fashion_mnist.py, seed {seed}", {'seed': seed})


def plan_tasks(plan: Plan, torch_device: str | None, on_cpu: bool) -> list[Task]:
  """Everything, most important first.

  Correctness (with gnet-jax's first size and batch), PyTorch there, the
  book's run, both frameworks at the other sizes, torchvision's GoogLeNet
  (``plan.inception_v1``) in both frameworks, the book's other seeds,
  larger batches, then torch.compile's max-autotune. On a CPU, in that order
  within each kind: gnet-jax, PyTorch, the book's runs, then all of
  torch.compile (it compiles for minutes there).
  """
  size, first, rest = plan.sizes[0], plan.batches[0], plan.batches[1:]
  now = TORCH_EAGER + (() if on_cpu else TORCH_COMPILED[:1])

  def torch_rows(sizes, batches, variants, dtypes=DTYPES) -> list[Task]:
    return [torch_row(s, b, d, v, plan) for b in batches for s in sizes for d in dtypes
            for v in variants] if torch_device else []

  tasks = [Task('jax', 'precision probe', {'op': 'probe'})]
  for kernels in KERNEL_SETS:
    tasks.append(Task('jax', f'correctness: float32 train step, kernels={kernels}',
                      {'op': 'step_check', 'size': size, 'batch': first, 'kernels': kernels}))
  for kernels in plan.first_kernels:
    tasks += [jax_row(size, first, dtype, kernels, plan, sgd=True) for dtype in DTYPES]
    tasks.append(Task('jax', f'correctness: bfloat16 vs float32, kernels={kernels}',
                      {'op': 'bf16_check', 'size': size, 'batch': first, 'kernels': kernels,
                       'steps': plan.sgd_steps}))
  tasks += [Task('torch', 'PyTorch probe', {'op': 'probe'})] if torch_device else []
  tasks += torch_rows(plan.sizes[:1], (first,), now)
  tasks.append(book_task(0))
  tasks += [jax_row(s, first, d, 'xla', plan) for s in plan.sizes[1:] for d in DTYPES]
  tasks += torch_rows(plan.sizes[1:], (first,), now)
  for s, b in plan.inception_v1:
    tasks += [jax_row(s, b, d, 'xla', plan, model='inception_v1') for d in plan.larger_dtypes]
    tasks += [torch_row(s, b, d, v, plan, 'inception_v1') for d in plan.larger_dtypes
              for v in now] if torch_device else []
  tasks += [book_task(seed) for seed in range(1, plan.book_seeds)]
  tasks += [jax_row(s, b, d, 'xla', plan) for b in rest for s in plan.sizes
            for d in plan.larger_dtypes]
  if plan.custom_everywhere:
    tasks += [jax_row(s, b, d, 'custom', plan) for b in plan.batches for s in plan.sizes
              for d in DTYPES if (s, b) != (size, first)]
  tasks += torch_rows(plan.sizes, rest, now, plan.larger_dtypes)
  tasks += torch_rows(plan.sizes, (first,), TORCH_COMPILED if on_cpu else TORCH_COMPILED[1:])
  if on_cpu:
    # No accelerator's memory to hand over: one worker of each kind (each start imports and
    # compiles again), gnet-jax's tasks, then PyTorch's, then the book's runs, torch.compile.
    compiled = lambda t: t.request.get('variant', '').startswith('compile')
    tasks.sort(key=lambda t: (t.worker != 'jax', t.worker == 'book' or compiled(t)))
  return tasks


# ----------------------------------------------------------------------------- the book's run


EPOCH_RE = re.compile(r'epoch (\d+)/(\d+): .*test acc ([0-9.]+)')


def book_command(runner: Runner, workdir: Path, seed: int) -> list[str]:
  cmd = [sys.executable, str(harness.REPO / 'train.py'), '--config',
         str(harness.REPO / 'configs' / 'fashion_mnist.py'), '--workdir', str(workdir),
         '--config.num_devices=1', '--config.progress=False', *runner.plan.book_overrides]
  cmd += [f'--config.seed={seed}'] if seed else []
  cmd += [f'--config.data_dir={runner.args.data_dir}'] if runner.args.data_dir else []
  return cmd


def book_run(runner: Runner, deadline: float, seed: int) -> dict:
  """``train.py`` on the book's config: its epoch lines, wall time, time to test acc 0.88."""
  # A fresh workdir, never a resume; its checkpoints (~100 MB) stay out of --out.
  workdir = Path(tempfile.mkdtemp(prefix='gnet_jax_report_book_'))
  try:
    cmd = book_command(runner, workdir, seed)
    runner.log('book run: ' + ' '.join(cmd[1:]))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=runner.env, cwd=harness.REPO)
    lines, epochs, tail, stopped = harness.line_queue(proc.stdout), [], [], False
    while True:
      try:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
      except queue.Empty:
        proc.kill()
        stopped = True
        break
      if line is None:
        break
      tail = (tail + [line.rstrip()])[-15:]
      print(f'  book| {tail[-1]}', flush=True)
      if m := EPOCH_RE.search(line):
        epochs.append({'epoch': int(m[1]), 'of': int(m[2]), 'test_acc': float(m[3]),
                       'at_s': time.monotonic() - t0, 'line': tail[-1]})
    rc = proc.wait()
    if (workdir / 'metrics.jsonl').is_file():
      shutil.copy(workdir / 'metrics.jsonl',
                  Path(runner.args.out) / f'book_run_seed{seed}_metrics.jsonl')
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  status = ('stopped at the budget' if stopped else 'ok' if rc == 0 else
            'not run (bad input, e.g. no data: see tail)' if rc == 2 else 'failed')
  result = {'status': status, 'returncode': rc, 'seed': seed, 'command': ' '.join(cmd[1:]),
            'wall_s': time.monotonic() - t0, 'epochs': epochs,
            'final_line': epochs[-1]['line'] if epochs else None,
            'final_test_acc': epochs[-1]['test_acc'] if status == 'ok' and epochs else None,
            'target_test_acc': BOOK_TARGET_ACC, 'time_to_target_s': next(
                (e['at_s'] for e in epochs if e['test_acc'] >= BOOK_TARGET_ACC), None)}
  if status != 'ok':
    result['tail'] = tail
  runner.log(f"book run, seed {seed}: {status}, {result['wall_s']:.1f} s, final: "
             f"{result['final_line']}")
  return result


def seed_spread(runs: list[dict]) -> dict | None:
  """The final test accuracies of the book's finished runs: min, median, max, and the seeds."""
  finished = [r for r in runs if r['final_test_acc'] is not None]
  if not finished:
    return None
  return {**harness.summary(r['final_test_acc'] for r in finished),
          'seeds': [r['seed'] for r in finished], 'book': BOOK_TEST_ACC}


def write_smoke_data(folder: Path, train: int = 8, test: int = 8) -> Path:
  """Random Fashion-MNIST-shaped IDX files, so --smoke needs no dataset."""
  import numpy as np
  from gnet_jax import input_pipeline
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  for key, shape in (('train_images', (train, 28, 28)), ('train_labels', (train,)),
                     ('test_images', (test, 28, 28)), ('test_labels', (test,))):
    array = rng.integers(0, 256 if len(shape) == 3 else 10, shape).astype(np.uint8)
    magic = input_pipeline.IMAGES_MAGIC if array.ndim == 3 else input_pipeline.LABELS_MAGIC
    header = b''.join(n.to_bytes(4, 'big') for n in (magic, *array.shape))
    (folder / input_pipeline.IDX_FILES[key]).write_bytes(header + array.tobytes())
  return folder


# ----------------------------------------------------------------------------- driver


class Runner:
  """Runs tasks in order within the budget, keeping every result and every skip."""

  def __init__(self, args, plan: Plan, env: dict[str, str], torch_device: str | None):
    self.args, self.plan, self.env, self.torch_device = args, plan, env, torch_device
    self.start = time.monotonic()
    self.deadline = self.start + args.budget_s
    self.windows: dict[str, float] = {}  # e.g. torch.compile's cap in --smoke
    self.worker: harness.Worker | None = None
    self.cost: dict[tuple, float] = {}  # seconds the last task of a kind took
    self.oom_groups: set[tuple] = set()
    self.report: dict[str, Any] = {'correctness': [], 'jax_rows': [], 'torch_rows': [],
                                   'skipped': [], 'precision': {}, 'book_runs': []}

  def log(self, text: str) -> None:
    print(f'[{time.monotonic() - self.start:6.1f} s] {text}', flush=True)

  def skip(self, task: Task, reason: str) -> None:
    self.report['skipped'].append({'task': task.label, 'reason': reason})
    self.log(f'SKIP {task.label}: {reason}')

  def _deadline(self, task: Task) -> tuple[float, str]:
    """When the task must be done, and what that limit is called in a skip reason."""
    if self.args.smoke and task.request.get('variant', '').startswith('compile'):
      window = self.windows.setdefault('torch.compile',
                                       time.monotonic() + SMOKE_TORCH_COMPILE_CAP_S)
      if window < self.deadline:
        return window, f'torch.compile gets {SMOKE_TORCH_COMPILE_CAP_S} s in --smoke'
    return self.deadline, 'budget'

  def _worker_for(self, task: Task) -> harness.Worker:
    current = self.worker
    if current is None or current.name != task.worker or current.proc.poll() is not None:
      self._close_worker()
      factory, kwargs = (('benchmarks.accelerator_report:JaxBench',
                          {'sizes': list(self.plan.sizes),
                           'inception_sizes': [s for s, _ in self.plan.inception_v1]})
                         if task.worker == 'jax' else
                         ('benchmarks.accelerator_report:TorchBench',
                          {'device': self.torch_device or 'cpu'}))
      self.worker = harness.Worker(factory, kwargs, self.env, task.worker)
    return self.worker

  def _close_worker(self) -> None:
    if self.worker is not None:
      self.worker.close()
      self.worker = None

  def run(self, tasks: list[Task]) -> None:
    for task in tasks:
      kind = (task.worker, task.request.get('op'), task.request.get('variant'),
              task.request.get('model'))
      (deadline, limit), now = self._deadline(task), time.monotonic()
      if task.group and task.group in self.oom_groups:
        self.skip(task, 'a smaller batch of this kind ran out of device memory')
      elif now + self.cost.get(kind, 0.0) > deadline:
        self.skip(task, f'{limit}: {max(deadline - now, 0):.0f} s left, the last such task '
                        f'took {self.cost.get(kind, 0.0):.0f} s')
      elif task.worker == 'book':
        self._close_worker()
        self.report['book_runs'].append(book_run(self, deadline, task.request['seed']))
        self.cost[kind] = time.monotonic() - now
      else:
        reply = self._worker_for(task).ask(task.request, deadline)
        self.cost[kind] = time.monotonic() - now
        if reply is not None:
          self._record(task, reply)
        else:
          self.worker = None
          if time.monotonic() >= deadline:
            self.skip(task, f'{limit}: reached while it ran; stopped')
          elif task.request['op'] == 'row':
            self.skip(task, 'the worker process exited (see its messages above)')
          else:  # a correctness check that crashes is a failure
            self._record(task, {'status': 'error', 'error': 'the worker process exited'})
    self._close_worker()

  def _record(self, task: Task, reply: dict) -> None:
    op = task.request['op']
    if op == 'probe':
      self.report['precision'][task.worker] = reply
      self.log(f'{task.label}: {json.dumps(reply)}')
    elif op in ('step_check', 'bf16_check'):
      checks = reply.get('checks') or [{'check': task.label, 'status': 'FAIL',
                                        'kernels': task.request.get('kernels'),
                                        'error': reply.get('error', 'no result')}]
      self.report['correctness'] += checks
      for c in checks:
        values = ', '.join(f'{k} {c[k]:.2e}' for k in c.get('limits', {}))
        self.log(f"{c['status'].upper()} {c['check']} (kernels={c.get('kernels')}): "
                 f"{values or c.get('note') or c.get('error')}")
    else:
      row = summarize_row(task, reply, self.report['precision'])
      self.report[f'{task.worker}_rows'].append(row)
      if reply['status'] == 'oom':
        self.oom_groups.add(task.group)
      self.log(f'{task.label}: ' + (f"{row['img_per_s']:.1f} img/s, step {row['step_ms']:.1f} ms"
                                    if reply['status'] == 'ok' else
                                    f"{reply['status']}: {reply.get('error')}"))


def summarize_row(task: Task, reply: dict, precision: dict) -> dict:
  """A table row: the request, img/s from the median step, FLOP/s, peak fraction, memory."""
  req = task.request
  row = {k: req[k] for k in ('size', 'batch', 'dtype', 'kernels', 'variant') if k in req}
  row['model'] = req.get('model', 'd2l')
  row.update(framework='gnet-jax' if task.worker == 'jax' else 'PyTorch', status=reply['status'])
  if reply['status'] != 'ok':
    return {**row, 'error': reply.get('error')}
  step = statistics.median(reply['step_s'])
  rates = harness.summary(req['batch'] / t for t in reply['step_s'])
  img_per_s = rates['median']
  jax_p = precision.get('jax', {})
  flops = jax_p.get('flops', {}).get(flops_key(req['size'], row['model']), {}).get('train')
  tflops = img_per_s * flops / 1e12 if flops else None
  mode = ('bf16' if req['dtype'] == 'bfloat16' else
          precision.get(task.worker, {}).get('float32_mode', 'float32'))
  peak = peak_tflops(jax_p.get('device_kind', ''), req['dtype'], mode)
  return {**row, 'img_per_s': img_per_s, 'img_per_s_range': [rates['min'], rates['max']],
          'step_ms': step * 1e3,
          'timed_steps': len(reply['step_s']), 'tflops': tflops, 'compute': mode,
          'peak_tflops': peak, 'peak_fraction': tflops / peak if peak and tflops else None,
          **{k: reply[k] for k in ('compile_cold_s', 'compile_warm_s', 'warm_cache_hit',
                                   'program_bytes', 'device_peak_bytes', 'rss_peak_bytes',
                                   'peak_is_row') if k in reply}}


def add_ratios(report: dict, torch_note: str | None) -> None:
  """gnet-jax's img/s over the fastest PyTorch variant at equal model, size, batch and dtype."""
  for row in report['jax_rows']:
    if row['status'] != 'ok':
      continue
    rivals = [t for t in report['torch_rows'] if t['status'] == 'ok' and
              (t['model'], t['size'], t['batch'], t['dtype'])
              == (row['model'], row['size'], row['batch'], row['dtype'])]
    if rivals:
      best = max(rivals, key=lambda t: t['img_per_s'])
      row.update(vs_torch=row['img_per_s'] / best['img_per_s'], vs_torch_variant=best['variant'])
    else:
      row.update(vs_torch=None,
                 vs_torch_note=torch_note or 'no PyTorch row at this model, size, batch and dtype')


def correctness_passed(report: dict) -> bool:
  """True only when checks ran and all passed; 'n/a' counts neither way; a check skipped or
  broken is a failure."""
  unchecked = [s for s in report['skipped'] if s['task'].startswith('correctness')]
  statuses = [c['status'] for c in report['correctness']]
  return (not unchecked and 'pass' in statuses and
          all(s in ('pass', 'n/a') for s in statuses))


# ----------------------------------------------------------------------------- report


def _num(x: float | None, fmt: str) -> str:
  return format(x, fmt) if x is not None else '-'


def row_cells(r: dict) -> list:
  variant = f"kernels={r['kernels']}" if 'kernels' in r else r['variant']
  model = '' if r.get('model', 'd2l') == 'd2l' else f"{r['model']}, "
  head = [r['framework'], model + variant, r['size'], r['batch'], r['dtype']]
  if r['status'] != 'ok':
    return head + [f"{r['status']}: {r.get('error', '')}"] + [''] * 9
  memory = (f"{harness.gib(r.get('device_peak_bytes'))} device" if r.get('device_peak_bytes')
            else f"{harness.gib(r.get('rss_peak_bytes'))} RSS")
  ratio = (f"{r['vs_torch']:.2f}x ({r['vs_torch_variant']})" if r.get('vs_torch')
           else r.get('vs_torch_note', '') if r['framework'] == 'gnet-jax' else '')
  warm = _num(r.get('compile_warm_s'), '.1f') + ('' if r.get('warm_cache_hit', True) else ' (miss)')
  low, high = r['img_per_s_range']
  return head + [f"{r['img_per_s']:.1f} ({low:.1f}-{high:.1f})", f"{r['step_ms']:.1f}",
                 _num(r['tflops'], '.3g'),
                 _num(r['peak_fraction'] and 100 * r['peak_fraction'], '.1f'), r['compute'],
                 memory if r.get('peak_is_row', True) else f'<= {memory}',
                 harness.gib(r.get('program_bytes')), _num(r.get('compile_cold_s'), '.1f'),
                 warm, ratio]


def book_lines(report: dict) -> list[str]:
  lines = []
  for b in report['book_runs']:
    reached = (f"reached {b['time_to_target_s']:.1f} s after launch" if b['time_to_target_s']
               else 'not reached')
    lines.append(f"- seed {b['seed']}: `{b['command']}`: {b['status']}, {b['wall_s']:.1f} s "
                 f"wall time (process start to exit); final line: `{b['final_line']}`; test "
                 f"accuracy {b['target_test_acc']} {reached}")
  spread = report['book_seed_spread']
  lines.append('' if spread is None else
               f"\nFinal test accuracy over {spread['n']} seed(s) {spread['seeds']}: min "
               f"{spread['min']:.3f}, median {spread['median']:.3f}, max {spread['max']:.3f} "
               f"(the book's PyTorch run: {BOOK_TEST_ACC}).")
  return lines or ['not run (budget)']


def format_markdown(report: dict) -> str:
  m, p = report['machine'], report['precision']
  jax_p, torch_p = p.get('jax', {}), p.get('torch', {})
  checks = [[c['check'], c.get('kernels', ''),
             ', '.join(f'{k} {c[k]:.2e}' for k in c.get('limits', {}))
             or c.get('note') or c.get('error', ''),
             ', '.join(f'{v:g}' for v in c.get('limits', {}).values()), c['status']]
            for c in report['correctness']]
  lines = [f"# gnet-jax accelerator report{' (--smoke)' if report['settings']['smoke'] else ''}",
           '', f"JAX device: {jax_p.get('device_kind')} ({jax_p.get('platform')}); host "
           f"{m['cpu']}, {m['cores']} cores; "
           f"PyTorch: {torch_p.get('device') or report['torch_note']}",
           'versions: ' + ', '.join(f'{k} {v}' for k, v in m['versions'].items()),
           f"float32 matmul precision: jax_default_matmul_precision="
           f"{jax_p.get('matmul_precision_setting')}, measured rounding "
           f"{jax_p.get('float32_mode')} ({jax_p.get('float32_errors')}); PyTorch "
           f"{torch_p.get('float32_settings') or 'n/a'}",
           f"{report['elapsed_s']:.0f} s of a {report['settings']['budget_s']:.0f} s budget; "
           f"load average (1 min) before {m['load_before']:.2f}; "
           f"result: {'PASS' if report['passed'] else 'FAIL'}", '', '## Correctness', '',
           harness.markdown_table(['check', 'kernels', 'measured', 'limit', 'result'], checks),
           '', '## Training throughput', '', harness.markdown_table(
               ['framework', 'variant', 'size', 'batch', 'dtype', 'img/s', 'step ms', 'TFLOP/s',
                '% of peak', 'compute', 'peak memory GiB', 'XLA program GiB',
                'compile s (empty cache)', 'compile s (warm cache)', 'vs fastest PyTorch'],
               [row_cells(r) for r in report['jax_rows'] + report['torch_rows']]),
           '', "img/s: the median over the timed steps after warm-up (min-max); step ms: "
           "the median step; TFLOP/s from XLA's "
           "cost analysis of the row's network (benchmarks.harness.model_flops; "
           'inception_v1 rows: torchvision\'s GoogLeNet, aux heads on at loss weight '
           f'{harness.INCEPTION_AUX_WEIGHT:g} in both frameworks); % of peak against '
           'the datasheet figure for the compute column (none for unknown devices); peak '
           "memory: the device allocator's high-water mark in the worker process (PyTorch: reset "
           'per row), or the process RSS on CPU; "<=" where an earlier row of the same process '
           "set it; XLA program: XLA's buffer assignment for the step (arguments, temporaries, "
           "outputs).", '', "## The book's run", '', *book_lines(report), '', '## Skipped', '',
           *([f"- {s['task']}: {s['reason']}" for s in report['skipped']] or ['- nothing'])]
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- main


def child_env(args) -> dict[str, str]:
  """The workers' environment: a fresh persistent compilation cache (so 'empty cache' is true),
  caching every program. --smoke pins JAX to the CPU and keeps a cache it is given (its
  numbers mean nothing; repeated smoke runs then compile little)."""
  env = {'JAX_COMPILATION_CACHE_DIR': args.cache_dir,
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  if args.smoke:
    env['JAX_PLATFORMS'] = 'cpu'
  return {**os.environ, **env}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='accelerator_report', help='folder for report.json/.md')
  parser.add_argument('--budget-s', type=float, default=None,
                      help=f'wall-clock budget, compiles included (default 480; '
                      f'{SMOKE_BUDGET_S} with --smoke)')
  parser.add_argument('--smoke', action='store_true',
                      help='every code path at tiny sizes on the CPU (minutes on a 2-core VM)')
  parser.add_argument('--book-seeds', type=int, default=None,
                      help=f"the book's run for seeds 0 .. N-1, budget allowing (default "
                      f'{FULL.book_seeds}; {SMOKE.book_seeds} with --smoke)')
  parser.add_argument('--data-dir', default='',
                      help="Fashion-MNIST IDX folder for the book's run (default: train.py's "
                      'search: /usr/share/datasets/fashion-mnist, then tensorflow-datasets)')
  parser.add_argument('--no-torch', action='store_true', help='leave PyTorch out')
  args = parser.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = SMOKE_BUDGET_S if args.smoke else 480.0
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  plan = SMOKE if args.smoke else FULL
  if args.book_seeds is not None:
    plan = dataclasses.replace(plan, book_seeds=max(args.book_seeds, 1))
  machine = harness.machine_info()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.smoke and not args.data_dir:
    args.data_dir = str(write_smoke_data(out / 'smoke_data'))
  platform = 'cpu' if args.smoke else harness.jax_platform()
  torch_device, torch_note = harness.torch_device(platform, args.no_torch)
  given_cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') if args.smoke else None
  args.cache_dir = given_cache or tempfile.mkdtemp(prefix='gnet_jax_report_xla_cache_')
  try:
    runner = Runner(args, plan, child_env(args), torch_device)
    runner.log(f'JAX platform {platform}; PyTorch on {torch_device or torch_note}; budget '
               f'{args.budget_s:.0f} s; compilation cache {args.cache_dir}'
               + ('' if given_cache else ' (empty)'))
    runner.run(plan_tasks(plan, torch_device, on_cpu=platform == 'cpu'))
  finally:
    if not given_cache:
      shutil.rmtree(args.cache_dir, ignore_errors=True)
  report = runner.report
  add_ratios(report, torch_note)
  report.update(machine=machine, torch_note=torch_note, passed=correctness_passed(report),
                book_seed_spread=seed_spread(report['book_runs']),
                elapsed_s=time.monotonic() - runner.start,
                settings={'smoke': args.smoke, 'budget_s': args.budget_s,
                          'plan': dataclasses.asdict(plan), 'torch_device': torch_device,
                          'argv': sys.argv[1:]})
  harness.write_json(out / 'report.json', report)
  markdown = format_markdown(report)
  (out / 'report.md').write_text(markdown)
  statuses = [c['status'] for c in report['correctness']]
  print('\n' + markdown)
  print(f"{'PASS' if report['passed'] else 'FAIL'}: correctness {statuses.count('pass')}/"
        f"{len(statuses) - statuses.count('n/a')} checks passed ({statuses.count('n/a')} not "
        f"applicable); {len(report['skipped'])} tasks skipped; report in {out}/report.md and "
        'report.json', flush=True)
  return 0 if report['passed'] else 1


if __name__ == '__main__':
  sys.exit(main())
