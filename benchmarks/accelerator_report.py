"""One command that measures gnet-jax on whatever accelerator JAX sees (GPU, TPU or CPU).

    python benchmarks/accelerator_report.py --out report/              # 480 s budget
    python benchmarks/accelerator_report.py --smoke --out /tmp/smoke   # every path, tiny, on CPU

In order of importance, within ``--budget-s`` (compiles included):

1. correctness on the device: GoogLeNet's logits and gradients against the
   host CPU (float32 at 'highest' precision), ``kernels=custom`` against
   ``kernels=xla``, and bfloat16 against float32 after a few SGD steps;
2. training throughput (float32 / bfloat16, ``kernels=xla`` / ``custom``,
   96x96 and 224x224, batch 128 to 1024): img/s, step time, FLOP/s and the
   fraction of the device's peak, memory, compile time with an empty and a
   warm persistent cache, the float32 matmul precision in force;
3. the PyTorch original on the same device (eager NCHW and channels_last,
   ``torch.compile``; float32 and bfloat16 autocast), and gnet-jax's ratio to
   the fastest variant at equal precision and batch;
4. the book's run: ``train.py --config configs/fashion_mnist.py`` (10 epochs).

What does not fit the budget is listed as skipped. Writes ``report.json`` and
``report.md`` to ``--out``; exits 1 when a correctness check fails or cannot
run. Each framework runs in worker processes of its own (``--worker``),
driven over pipes one JSON line per request, so that a compile that overruns
the budget can be stopped without losing the rows already measured, and the
two frameworks never hold device memory at the same time.
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
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import flops  # noqa: E402
import throughput  # noqa: E402  (its random batch, machine description and device helpers)

DTYPES = ('float32', 'bfloat16')
KERNEL_SETS = ('xla', 'custom')
TORCH_EAGER = ('eager NCHW', 'eager channels_last')
TORCH_COMPILED = ('compile', 'compile max-autotune')


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to measure: sizes, batches (ascending), steps per row, correctness shapes."""
  sizes: tuple[int, ...]
  batches: tuple[int, ...]
  warmup: int
  steps: int
  check_batch: int  # logits/gradients check, device vs host CPU
  sgd_steps: int  # bfloat16 vs float32 check, at (sizes[0], batches[0])
  custom_everywhere: bool = True  # kernels=custom beyond the correctness rows' shape
  book_overrides: tuple[str, ...] = ()


FULL = Plan(sizes=(96, 224), batches=(128, 256, 512, 1024), warmup=3, steps=10, check_batch=16,
            sgd_steps=3)
# Every code path at sizes that compile in seconds on a small CPU.
SMOKE = Plan(sizes=(32,), batches=(2, 4), warmup=1, steps=2, check_batch=2, sgd_steps=2,
             custom_everywhere=False,
             book_overrides=('--config.image_size=32', '--config.batch_size=4',
                             '--config.num_epochs=2', '--config.train_examples=8',
                             '--config.eval_examples=8', '--config.data_source=idx'))
SMOKE_BUDGET_S = 600  # a cap for slow, shared machines; a quiet 2-core VM needs a few minutes
SMOKE_TORCH_COMPILE_CAP_S = 20  # torch.compile is tried on CPU only if it fits this
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


# ----------------------------------------------------------------------------- workers


def serve(handlers: dict[str, Callable[[dict], Any]]) -> None:
  """A worker's loop: one JSON request per stdin line, one JSON reply per line.

  Replies go to the original stdout; anything a library prints goes to stderr,
  so it can never be mistaken for a reply.
  """
  replies = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  for line in sys.stdin:
    request = json.loads(line)
    try:
      reply = handlers[request['op']](request)
    except Exception as e:  # noqa: BLE001  reported per request; the worker carries on
      text = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'
      oom = 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower()
      reply = {'status': 'oom' if oom else 'error', 'error': text[:500]}
    replies.write(json.dumps(reply) + '\n')


class JaxBench:
  """gnet-jax on JAX's default device: precision probe, correctness checks, training rows."""

  def __init__(self):
    import jax
    from configs import default
    from gnet_jax import input_pipeline, state as state_lib

    self.jax = jax
    self.device = jax.devices()[0]
    self.host = jax.devices('cpu')[0]
    self.spec = input_pipeline.dataset_spec('fashion_mnist')
    self.config = default.get_config()
    self.host_state = None  # built once: the parameters do not depend on size or dtype
    self.sgd_runs: dict[tuple, dict] = {}
    self.grads: dict[str, Any] = {}
    self.cache_hits = 0
    jax.monitoring.register_event_listener(self._on_event)
    self._state_lib = state_lib

  def _on_event(self, event: str, **_) -> None:
    if event == '/jax/compilation_cache/cache_hits':
      self.cache_hits += 1

  def _build(self, size: int, dtype: str, kernels: str):
    """Model, optimizer and host state through ``state.build``, as train.py makes them."""
    config = self.config.copy_and_resolve_references()
    config.image_size, config.dtype, config.kernels = size, dtype, kernels
    model, tx = (self._state_lib.create_model(config, self.spec),
                 self._state_lib.create_optimizer(config))
    if self.host_state is None:
      self.host_state = self._state_lib.build(config, self.spec)[2]
    return model, tx, self.host_state

  def probe(self, _: dict) -> dict:
    """The device, and whether float32 dots and convolutions round like TF32 or bfloat16."""
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    dot = np.asarray(jnp.dot(jax_put(a, self.device), jax_put(b, self.device)))
    x, k = rng.standard_normal((1, 16, 16, 64)), rng.standard_normal((3, 3, 64, 64))
    conv = np.asarray(self.jax.lax.conv_general_dilated(
        jax_put(x, self.device), jax_put(k, self.device), (1, 1), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    ref_conv = np.asarray(self.jax.lax.conv_general_dilated(
        jax_put(x, self.host), jax_put(k, self.host), (1, 1), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest'))
    errors = {'dot': rel_err(dot, a @ b), 'conv': rel_err(conv, ref_conv)}
    setting = getattr(self.jax.config, 'jax_default_matmul_precision', None)
    return {'status': 'ok', 'platform': self.device.platform,
            'device_kind': self.device.device_kind, 'num_devices': self.jax.device_count(),
            'matmul_precision_setting': setting or 'default', 'float32_errors': errors,
            'float32_mode': rounding_mode(errors)}

  def grads_check(self, req: dict) -> dict:
    """float32 logits and gradients at 'highest' precision: device against host CPU."""
    import functools
    size, kernels = req['size'], req['kernels']
    model, _, state = self._build(size, 'float32', kernels)
    images, labels = throughput._random_batch(req['batch'], size, seed=1)
    fn = self.jax.jit(functools.partial(loss_and_grads, model=model, image_size=size))
    args = (state.params, images, labels)
    with self.jax.default_matmul_precision('highest'):
      got = self.jax.device_get(fn(*jax_put(args, self.device)))
      same = self.device == self.host
      ref = got if same else self.jax.device_get(fn(*jax_put(args, self.host)))
    self.grads[kernels] = got
    checks = [compare_outputs('float32 logits and gradients: device vs host CPU', kernels,
                              got, ref, note='the device is the host CPU' if same else '')]
    if len(self.grads) == 2:
      checks.append(compare_outputs('float32 logits and gradients: kernels=custom vs xla, device',
                                    'custom', self.grads['custom'], self.grads['xla']))
    return {'status': 'ok', 'checks': checks}

  def _sgd_run(self, step, state, size: int, batch: int, steps: int) -> dict:
    """``steps`` SGD steps on fixed random batches: mean loss and the parameter update."""
    import numpy as np
    device_state = jax_put(state, self.device)
    for i in range(steps):
      images, labels = throughput._random_batch(batch, size, seed=10 + i)
      device_state = step(device_state, jax_put({'image': images, 'label': labels}, self.device))
    end = self.jax.device_get(device_state)
    update = self.jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old),
                               end.params, state.params)
    return {'loss': float(end.metrics['loss_sum']) / float(end.metrics['count']),
            'update': update}

  def bf16_check(self, req: dict) -> dict:
    """bfloat16 against float32 after the same few SGD steps (runs kept by ``row``)."""
    key = (req['size'], req['batch'], req['kernels'])
    f32, bf16 = self.sgd_runs.get(key + ('float32',)), self.sgd_runs.get(key + ('bfloat16',))
    if f32 is None or bf16 is None:
      return {'status': 'error', 'error': 'the float32 or bfloat16 row did not run'}
    update_err = tree_rel_norm(bf16['update'], f32['update'])
    leaf_err, leaf = worst_leaf(bf16['update'], f32['update'])
    loss_err = abs(bf16['loss'] - f32['loss']) / abs(f32['loss'])
    return {'status': 'ok', 'checks': [check(
        f"bfloat16 vs float32 after {req['steps']} SGD steps", req['kernels'],
        {'loss_err': TOL_BF16_LOSS, 'update_err': TOL_BF16_UPDATE}, loss_err=loss_err,
        update_err=update_err, worst_leaf=leaf, worst_leaf_err=leaf_err, loss_float32=f32['loss'],
        loss_bfloat16=bf16['loss'])]}

  def _compile(self, model, tx, size: int, state, batch) -> tuple[Any, float]:
    import functools
    from gnet_jax import train
    step = self.jax.jit(functools.partial(train.train_step, model=model, tx=tx, image_size=size),
                        donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return compiled, time.perf_counter() - t0

  def row(self, req: dict) -> dict:
    """One training row: cold and warm-cache compile, optional SGD check, timed steps."""
    size, batch, dtype, kernels = req['size'], req['batch'], req['dtype'], req['kernels']
    model, tx, host_state = self._build(size, dtype, kernels)
    peak_before = self._allocator_peak()
    images, labels = throughput._random_batch(batch, size)
    data = jax_put({'image': images, 'label': labels}, self.device)
    state = jax_put(host_state, self.device)
    step, cold_s = self._compile(model, tx, size, state, data)
    self.jax.clear_caches()  # the next compile can only come from the persistent cache
    hits = self.cache_hits
    _, warm_s = self._compile(model, tx, size, state, data)
    warm_hit = self.cache_hits > hits
    if req.get('sgd_steps'):
      self.sgd_runs[(size, batch, kernels, dtype)] = self._sgd_run(
          step, host_state, size, batch, req['sgd_steps'])
    times = []
    for i in range(req['warmup'] + req['steps']):
      t0 = time.perf_counter()
      state = step(state, data)
      self.jax.block_until_ready(state)
      if i >= req['warmup']:
        times.append(time.perf_counter() - t0)
    memory = {**program_memory(step), **self._allocator_peak()}
    del state
    # The allocator only keeps a process-wide high-water mark: it is this row's peak only
    # when the row raised it.
    memory['peak_is_row'] = _peak(memory) > _peak(peak_before)
    return {'status': 'ok', 'step_s': times, 'compile_cold_s': cold_s, 'compile_warm_s': warm_s,
            'warm_cache_hit': warm_hit, **memory}

  def _allocator_peak(self) -> dict:
    stats = self.device.memory_stats() if self.device.platform != 'cpu' else None
    if stats and 'peak_bytes_in_use' in stats:
      return {'device_peak_bytes': int(stats['peak_bytes_in_use'])}
    return {'rss_peak_bytes': throughput._peak_rss_bytes()}


def compare_outputs(name: str, kernels: str, got, ref, note: str = '') -> dict:
  """``check`` of (logits, gradients) pairs at the float32 tolerance."""
  grads_err, leaf = worst_leaf(got[1], ref[1])
  return check(name, kernels, {'logits_err': TOL_FLOAT32, 'grads_err': TOL_FLOAT32},
               logits_err=rel_err(got[0], ref[0]), grads_err=grads_err, worst_leaf=leaf,
               note=note)


def _peak(memory: dict) -> int:
  return memory.get('device_peak_bytes') or memory.get('rss_peak_bytes') or 0


def jax_put(tree, device):
  import jax
  return jax.device_put(tree, device)


def loss_and_grads(params, images, labels, *, model, image_size: int):
  """Logits and the gradient of the mean cross-entropy, as ``train.train_step`` computes them."""
  import jax
  import jax.numpy as jnp
  from gnet_jax import input_pipeline, train
  x = input_pipeline.preprocess(images, image_size)

  def loss_fn(p):
    logits = model.apply({'params': p}, x)
    return jnp.mean(train.cross_entropy(logits, labels)), logits

  (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return logits, grads


def program_memory(compiled) -> dict:
  """Bytes XLA's buffer assignment gives the compiled step (arguments + temporaries + outputs)."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)
    return {'program_bytes': int(total)}
  except Exception:  # noqa: BLE001  not every backend reports it
    return {'program_bytes': None}


def jax_worker() -> None:
  from gnet_jax import xla_flags
  xla_flags.apply_defaults()  # before JAX starts, as train.py does
  bench = JaxBench()
  serve({'probe': bench.probe, 'grads_check': bench.grads_check, 'row': bench.row,
         'bf16_check': bench.bf16_check})


class TorchBench:
  """The PyTorch original (gnet_jax/torch_reference.py) on the device matching JAX's."""

  def __init__(self, device: str):
    import torch
    self.torch = torch
    self.device = torch.device(device)
    if self.device.type == 'cuda':
      torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    dynamo = getattr(torch, '_dynamo', None)
    if dynamo is not None:  # one compile per row (static shapes); never fall back to eager
      for name in ('recompile_limit', 'cache_size_limit'):
        if hasattr(dynamo.config, name):
          setattr(dynamo.config, name, 64)

  def probe(self, _: dict) -> dict:
    """Versions, device and the float32 precision settings (TF32) in force."""
    torch = self.torch
    cuda = self.device.type == 'cuda'
    settings = {}
    if cuda:
      conv = getattr(getattr(torch.backends.cudnn, 'conv', None), 'fp32_precision', None)
      matmul = getattr(torch.backends.cuda.matmul, 'fp32_precision', None)
      settings = {'cudnn_benchmark': torch.backends.cudnn.benchmark,
                  'cudnn_conv_fp32': conv or ('tf32' if torch.backends.cudnn.allow_tf32
                                              else 'ieee'),
                  'matmul_fp32': matmul or ('tf32' if torch.backends.cuda.matmul.allow_tf32
                                            else 'ieee')}
    return {'status': 'ok', 'version': torch.__version__, 'threads': torch.get_num_threads(),
            'device': f"{self.device.type}:{torch.cuda.get_device_name() if cuda else 'cpu'}",
            'float32_settings': settings, 'float32_mode': rounding_mode(self._errors())}

  def _errors(self) -> dict[str, float]:
    """float32 matmul and convolution on the device against float64 on the host."""
    torch = self.torch
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=gen), torch.randn(256, 256, generator=gen)
    x, k = torch.randn(1, 64, 16, 16, generator=gen), torch.randn(64, 64, 3, 3, generator=gen)
    on = lambda t: t.to(self.device)  # noqa: E731
    conv = torch.nn.functional.conv2d
    return {'dot': rel_err((on(a) @ on(b)).cpu(), a.double() @ b.double()),
            'conv': rel_err(conv(on(x), on(k), padding=1).cpu(),
                            conv(x.double(), k.double(), padding=1))}

  def _setup(self, req: dict):
    """Fresh network, optimizer and batch for one row, in the row's layout and mode."""
    torch = self.torch
    from gnet_jax.torch_reference import googlenet
    torch.manual_seed(0)
    layout = (torch.contiguous_format if req['variant'] == 'eager NCHW'
              else torch.channels_last)
    net = googlenet().to(self.device, memory_format=layout)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    images, labels = throughput._random_batch(req['batch'], req['size'])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(self.device)
    x = x.contiguous(memory_format=layout)
    y = torch.from_numpy(labels).long().to(self.device)
    if req['variant'].startswith('compile'):
      mode = 'max-autotune' if 'max-autotune' in req['variant'] else None
      net = torch.compile(net, mode=mode, dynamic=False)
    return net, optimizer, x, y

  def row(self, req: dict) -> dict:
    """One training row: the first step (compile included) apart, then timed steps."""
    torch = self.torch
    from torch.nn import functional as F
    net, optimizer, x, y = self._setup(req)
    cuda = self.device.type == 'cuda'
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=req['dtype'] == 'bfloat16')

    def step():
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = F.cross_entropy(net(x), y)
      loss.backward()
      optimizer.step()
      if cuda:
        torch.cuda.synchronize()

    times = []
    for i in range(1 + req['warmup'] + req['steps']):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    memory = ({'device_peak_bytes': int(torch.cuda.max_memory_allocated())} if cuda
              else {'rss_peak_bytes': throughput._peak_rss_bytes()})
    del net, optimizer
    if cuda:
      torch.cuda.empty_cache()
    first = times[0] if req['variant'].startswith('compile') else None
    return {'status': 'ok', 'step_s': times[1 + req['warmup']:], 'compile_cold_s': first,
            **memory}


def torch_worker(device: str) -> None:
  bench = TorchBench(device)
  serve({'probe': bench.probe, 'row': bench.row})


# ----------------------------------------------------------------------------- driver


def line_queue(stream) -> queue.Queue:
  """The lines of ``stream`` as they come, read by a thread (None at the end)."""
  lines: queue.Queue = queue.Queue()

  def pump():
    for line in stream:
      lines.put(line)
    lines.put(None)

  threading.Thread(target=pump, daemon=True).start()
  return lines


class Worker:
  """A ``--worker`` process; ``ask`` waits for its reply at most until a deadline."""

  def __init__(self, kind: str, env: dict[str, str], torch_device: str = 'cpu'):
    self.kind = kind
    cmd = [sys.executable, __file__, '--worker', kind, '--torch-device', torch_device]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=REPO)
    self.lines = line_queue(self.proc.stdout)

  def ask(self, request: dict, deadline: float) -> dict | None:
    """The reply, or None when the worker died or the deadline passed (then it is stopped)."""
    try:
      self.proc.stdin.write(json.dumps(request) + '\n')
      self.proc.stdin.flush()
      line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
    except queue.Empty:  # past the deadline: stop it now, mid-compile or not
      self.proc.kill()
      line = None
    except BrokenPipeError:
      line = None
    if line is None:
      self.close()
      return None
    return json.loads(line)

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


@dataclasses.dataclass
class Task:
  """One request to a worker ('jax' or 'torch'), or the book's run ('book')."""
  worker: str
  label: str
  request: dict = dataclasses.field(default_factory=dict)
  group: tuple = ()  # rows of one group after an out-of-memory row are skipped


def jax_row(size: int, batch: int, dtype: str, kernels: str, plan: Plan, sgd: bool = False
            ) -> Task:
  request = {'op': 'row', 'size': size, 'batch': batch, 'dtype': dtype, 'kernels': kernels,
             'warmup': plan.warmup, 'steps': plan.steps,
             'sgd_steps': plan.sgd_steps if sgd else 0}
  return Task('jax', f'gnet-jax {size}px batch {batch} {dtype} kernels={kernels}', request,
              ('jax', size, dtype, kernels))


def torch_row(size: int, batch: int, dtype: str, variant: str, plan: Plan) -> Task:
  request = {'op': 'row', 'size': size, 'batch': batch, 'dtype': dtype, 'variant': variant,
             'warmup': plan.warmup, 'steps': plan.steps}
  return Task('torch', f'PyTorch {size}px batch {batch} {dtype} {variant}', request,
              ('torch', size, dtype, variant))


def correctness_tasks(plan: Plan) -> list[Task]:
  """Logits/gradients per kernel set, then the rows whose SGD steps feed the bfloat16 check."""
  size, batch = plan.sizes[0], plan.batches[0]
  tasks = [Task('jax', 'precision probe', {'op': 'probe'})]
  tasks += [Task('jax', f'correctness: logits and gradients, kernels={k}',
                 {'op': 'grads_check', 'size': size, 'batch': plan.check_batch, 'kernels': k})
            for k in KERNEL_SETS]
  for kernels in KERNEL_SETS:
    tasks += [jax_row(size, batch, dtype, kernels, plan, sgd=True) for dtype in DTYPES]
    tasks.append(Task('jax', f'correctness: bfloat16 vs float32, kernels={kernels}',
                      {'op': 'bf16_check', 'size': size, 'batch': batch, 'kernels': kernels,
                       'steps': plan.sgd_steps}))
  return tasks


def plan_tasks(plan: Plan, torch_device: str | None, on_cpu: bool) -> list[Task]:
  """Everything, most important first.

  Correctness and the first size and batch of both frameworks, the book's
  run, the other sizes at the first batch, larger batches, then
  torch.compile's max-autotune. On CPU torch.compile goes last: it compiles
  for minutes there.
  """
  first, rest = plan.batches[0], plan.batches[1:]
  now = TORCH_EAGER + (() if on_cpu else TORCH_COMPILED[:1])

  def torch_rows(sizes, batches, variants) -> list[Task]:
    return [torch_row(s, b, d, v, plan) for b in batches for s in sizes for d in DTYPES
            for v in variants] if torch_device else []

  tasks = correctness_tasks(plan)
  tasks += [Task('torch', 'PyTorch probe', {'op': 'probe'})] if torch_device else []
  tasks += torch_rows(plan.sizes[:1], (first,), now)
  tasks.append(Task('book', "the book's run: configs/fashion_mnist.py"))
  tasks += [jax_row(s, first, d, 'xla', plan) for s in plan.sizes[1:] for d in DTYPES]
  tasks += torch_rows(plan.sizes[1:], (first,), now)
  tasks += [jax_row(s, b, d, 'xla', plan) for b in rest for s in plan.sizes for d in DTYPES]
  if plan.custom_everywhere:
    tasks += [jax_row(s, b, d, 'custom', plan) for b in plan.batches for s in plan.sizes
              for d in DTYPES if (s, b) != (plan.sizes[0], first)]
  tasks += torch_rows(plan.sizes, rest, now)
  tasks += torch_rows(plan.sizes, (first,), TORCH_COMPILED if on_cpu else TORCH_COMPILED[1:])
  return tasks


class Runner:
  """Runs tasks in order within the budget, keeping every result and every skip."""

  def __init__(self, args, plan: Plan, env: dict[str, str], torch_device: str | None):
    self.args, self.plan, self.env, self.torch_device = args, plan, env, torch_device
    self.start = time.monotonic()
    self.deadline = self.start + args.budget_s
    self.windows: dict[str, float] = {}  # e.g. torch.compile's cap in --smoke
    self.worker: Worker | None = None
    self.cost: dict[tuple, float] = {}  # seconds the last task of a kind took
    self.oom_groups: set[tuple] = set()
    self.report: dict[str, Any] = {'correctness': [], 'jax_rows': [], 'torch_rows': [],
                                   'skipped': [], 'precision': {}, 'book_run': None}

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

  def _worker_for(self, task: Task) -> Worker:
    current = self.worker
    if current is None or current.kind != task.worker or current.proc.poll() is not None:
      if current is not None:
        current.close()
      self.worker = Worker(task.worker, self.env, self.torch_device or 'cpu')
    return self.worker

  def run(self, tasks: list[Task]) -> None:
    for task in tasks:
      kind = (task.worker, task.request.get('op'), task.request.get('variant'))
      (deadline, limit), now = self._deadline(task), time.monotonic()
      if task.group and task.group in self.oom_groups:
        self.skip(task, 'a smaller batch of this kind ran out of device memory')
      elif now + self.cost.get(kind, 0.0) > deadline:
        self.skip(task, f'{limit}: {max(deadline - now, 0):.0f} s left, the last such task '
                        f'took {self.cost.get(kind, 0.0):.0f} s')
      elif task.worker == 'book':
        self._close_worker()
        self.report['book_run'] = book_run(self, deadline)
      else:
        reply = self._worker_for(task).ask(task.request, deadline)
        self.cost[kind] = time.monotonic() - now
        if reply is None:
          self._lost(task, deadline, limit)
        else:
          self._record(task, reply)
    self._close_worker()

  def _lost(self, task: Task, deadline: float, limit: str) -> None:
    """A task whose worker was stopped at the deadline, or died."""
    self.worker = None
    if time.monotonic() >= deadline:
      self.skip(task, f'{limit}: reached while it ran; stopped')
    elif task.request['op'] == 'row':
      self.skip(task, 'the worker process exited (see its messages above)')
    else:  # a correctness check that crashes is a failure
      self._record(task, {'status': 'error', 'error': 'the worker process exited'})

  def _close_worker(self) -> None:
    if self.worker is not None:
      self.worker.close()
      self.worker = None

  def _record(self, task: Task, reply: dict) -> None:
    op = task.request['op']
    if op == 'probe':
      self.report['precision'][task.worker] = reply
      self.log(f'{task.label}: {json.dumps(reply)}')
    elif op in ('grads_check', 'bf16_check'):
      checks = reply.get('checks') or [{'check': task.label, 'status': 'FAIL',
                                        'kernels': task.request.get('kernels'),
                                        'error': reply.get('error', 'no result')}]
      self.report['correctness'] += checks
      for c in checks:
        values = ', '.join(f'{k} {c[k]:.2e}' for k in c.get('limits', {}))
        self.log(f"{c['status'].upper()} {c['check']} (kernels={c.get('kernels')}): "
                 f"{values or c.get('error')}")
    else:
      row = summarize_row(task, reply, self.report['precision'])
      self.report[f'{task.worker}_rows'].append(row)
      if reply['status'] == 'oom':
        self.oom_groups.add(task.group)
      self.log(f"{task.label}: " + (f"{row['img_per_s']:.1f} img/s, step {row['step_ms']:.1f} ms"
                                    if reply['status'] == 'ok' else
                                    f"{reply['status']}: {reply.get('error')}"))


def float32_mode(worker: str, precision: dict) -> str:
  """How the framework's float32 products round on this device (its probe's measurement)."""
  return precision.get(worker, {}).get('float32_mode', 'float32')


def summarize_row(task: Task, reply: dict, precision: dict) -> dict:
  """A table row: the request, img/s from the median step, FLOP/s, peak fraction, memory."""
  req = task.request
  row = {k: req[k] for k in ('size', 'batch', 'dtype', 'kernels', 'variant') if k in req}
  row['framework'] = 'gnet-jax' if task.worker == 'jax' else 'PyTorch'
  row['status'] = reply['status']
  if reply['status'] != 'ok':
    return {**row, 'error': reply.get('error')}
  step = statistics.median(reply['step_s'])
  img_per_s = req['batch'] / step
  tflops = img_per_s * flops.train_flops(req['size']) / 1e12
  mode = 'bf16' if req['dtype'] == 'bfloat16' else float32_mode(task.worker, precision)
  peak = peak_tflops(precision.get('jax', {}).get('device_kind', ''), req['dtype'], mode)
  return {**row, 'img_per_s': img_per_s, 'step_ms': step * 1e3,
          'step_ms_range': [min(reply['step_s']) * 1e3, max(reply['step_s']) * 1e3],
          'timed_steps': len(reply['step_s']), 'tflops': tflops, 'compute': mode,
          'peak_tflops': peak, 'peak_fraction': tflops / peak if peak else None,
          **{k: reply.get(k) for k in ('compile_cold_s', 'compile_warm_s', 'warm_cache_hit',
                                       'program_bytes', 'device_peak_bytes', 'rss_peak_bytes',
                                       'peak_is_row') if k in reply}}


def add_ratios(report: dict, torch_note: str | None) -> None:
  """gnet-jax's img/s over the fastest PyTorch variant at equal size, batch and dtype."""
  for row in report['jax_rows']:
    if row['status'] != 'ok':
      continue
    rivals = [t for t in report['torch_rows'] if t['status'] == 'ok' and
              (t['size'], t['batch'], t['dtype']) == (row['size'], row['batch'], row['dtype'])]
    if rivals:
      best = max(rivals, key=lambda t: t['img_per_s'])
      row['vs_torch'] = row['img_per_s'] / best['img_per_s']
      row['vs_torch_variant'] = best['variant']
    else:
      row['vs_torch'] = None
      row['vs_torch_note'] = torch_note or 'no PyTorch row at this size, batch and dtype'


EPOCH_RE = re.compile(r'epoch (\d+)/(\d+): .*test acc ([0-9.]+)')


def book_command(runner: Runner, workdir: Path) -> list[str]:
  cmd = [sys.executable, str(REPO / 'train.py'), '--config', str(REPO / 'configs' /
                                                                 'fashion_mnist.py'),
         '--workdir', str(workdir), '--config.num_devices=1', '--config.progress=False',
         *runner.plan.book_overrides]
  if runner.args.data_dir:
    cmd.append(f'--config.data_dir={runner.args.data_dir}')
  return cmd


def book_run(runner: Runner, deadline: float) -> dict:
  """``train.py`` on the book's config: its epoch lines, wall time, time to test acc 0.88."""
  # A fresh workdir, never a resume; its checkpoints (~100 MB) stay out of --out.
  workdir = Path(tempfile.mkdtemp(prefix='gnet_jax_report_book_'))
  try:
    result = _run_book(runner, deadline, workdir)
    if (workdir / 'metrics.jsonl').is_file():
      shutil.copy(workdir / 'metrics.jsonl', Path(runner.args.out) / 'book_run_metrics.jsonl')
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  runner.log(f"book run: {result['status']}, {result['wall_s']:.1f} s, "
             f"final: {result['final_line']}")
  return result


def _run_book(runner: Runner, deadline: float, workdir: Path) -> dict:
  cmd = book_command(runner, workdir)
  runner.log('book run: ' + ' '.join(cmd[1:]))
  t0 = time.monotonic()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=runner.env, cwd=REPO)
  lines, epochs, tail, stopped = line_queue(proc.stdout), [], [], False
  while True:
    try:
      line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
    except queue.Empty:
      proc.kill()
      stopped = True
      break
    if line is None:
      break
    line = line.rstrip()
    tail = (tail + [line])[-15:]
    print(f'  book| {line}', flush=True)
    if m := EPOCH_RE.search(line):
      epochs.append({'epoch': int(m[1]), 'of': int(m[2]), 'test_acc': float(m[3]),
                     'at_s': time.monotonic() - t0, 'line': line})
  rc = proc.wait()
  reached = next((e['at_s'] for e in epochs if e['test_acc'] >= BOOK_TARGET_ACC), None)
  status = ('stopped at the budget' if stopped else 'ok' if rc == 0 else
            'not run (bad input, e.g. no data: see tail)' if rc == 2 else 'failed')
  result = {'status': status, 'returncode': rc, 'command': ' '.join(cmd[1:]),
            'wall_s': time.monotonic() - t0, 'epochs': epochs,
            'final_line': epochs[-1]['line'] if epochs else None,
            'target_test_acc': BOOK_TARGET_ACC, 'time_to_target_s': reached}
  if status != 'ok':
    result['tail'] = tail
  return result


def write_smoke_data(folder: Path, train: int = 8, test: int = 8) -> Path:
  """Random Fashion-MNIST-shaped IDX files, so --smoke needs no dataset."""
  import numpy as np
  from gnet_jax import input_pipeline
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  arrays = {'train_images': rng.integers(0, 256, (train, 28, 28)),
            'train_labels': rng.integers(0, 10, train),
            'test_images': rng.integers(0, 256, (test, 28, 28)),
            'test_labels': rng.integers(0, 10, test)}
  for key, array in arrays.items():
    magic = input_pipeline.IMAGES_MAGIC if array.ndim == 3 else input_pipeline.LABELS_MAGIC
    header = b''.join(n.to_bytes(4, 'big') for n in (magic, *array.shape))
    (folder / input_pipeline.IDX_FILES[key]).write_bytes(header + array.astype(np.uint8).tobytes())
  return folder


# ----------------------------------------------------------------------------- report


def _gib(n: int | None) -> str:
  return f'{n / 2**30:.2f}' if n else '-'


def _num(x: float | None, fmt: str) -> str:
  return format(x, fmt) if x is not None else '-'


def row_line(r: dict) -> str:
  name = f"kernels={r['kernels']}" if 'kernels' in r else r['variant']
  head = f"| {r['framework']} | {name} | {r['size']} | {r['batch']} | {r['dtype']} |"
  if r['status'] != 'ok':
    return head + f" {r['status']}: {r.get('error', '')} |" + ' |' * 9
  memory = (f"{_gib(r.get('device_peak_bytes'))} device" if r.get('device_peak_bytes')
            else f"{_gib(r.get('rss_peak_bytes'))} RSS")
  memory = memory if r.get('peak_is_row', True) else f'<= {memory}'  # an earlier row's peak
  ratio = (f"{r['vs_torch']:.2f}x ({r['vs_torch_variant']})" if r.get('vs_torch')
           else r.get('vs_torch_note', '') if r['framework'] == 'gnet-jax' else '')
  warm = _num(r.get('compile_warm_s'), '.1f') + ('' if r.get('warm_cache_hit', True) else ' (miss)')
  return (head + f" {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {r['tflops']:.3g} | "
          f"{_num(r['peak_fraction'] and 100 * r['peak_fraction'], '.1f')} | {r['compute']} | "
          f"{memory} | {_gib(r.get('program_bytes'))} | {_num(r.get('compile_cold_s'), '.1f')} | "
          f"{warm} | {ratio} |")


def correctness_lines(report: dict) -> list[str]:
  lines = ['| check | kernels | measured | limit | result |', '|---|---|---|---|---|']
  for c in report['correctness']:
    measured = ', '.join(f'{k} {c[k]:.2e}' for k in c.get('limits', {})) or c.get('error', '')
    limits = ', '.join(f'{v:g}' for v in c.get('limits', {}).values())
    lines.append(f"| {c['check']} | {c.get('kernels', '')} | {measured} | {limits} | "
                 f"{c['status']} |")
  return lines


def format_markdown(report: dict) -> str:
  m, p = report['machine'], report['precision']
  jax_p, torch_p = p.get('jax', {}), p.get('torch', {})
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
           f"result: {'PASS' if report['passed'] else 'FAIL'}", '', '## Correctness', '',
           *correctness_lines(report), '', '## Training throughput', '',
           '| framework | variant | size | batch | dtype | img/s | step ms | TFLOP/s | % of peak '
           '| compute | peak memory GiB | XLA program GiB | compile s (empty cache) | '
           'compile s (warm cache) | vs fastest PyTorch |', '|---' * 15 + '|']
  lines += [row_line(r) for r in report['jax_rows'] + report['torch_rows']]
  lines += ['', 'img/s from the median of the timed steps after warm-up; TFLOP/s from '
            'benchmarks/flops.py (a training step as 3x the forward pass); % of peak against '
            'the datasheet figure for the compute column (none for unknown devices); peak '
            "memory: the device allocator's high-water mark in the worker process (PyTorch: reset "
            'per row), or the process RSS on CPU; "<=" where an earlier row of the same process '
            "set it; XLA program: XLA's buffer assignment for the step (arguments, temporaries, "
            'outputs).', '', "## The book's run", '']
  book = report['book_run']
  lines += ['not run (budget)'] if book is None else [
      f"`{book['command']}`: {book['status']}, {book['wall_s']:.1f} s wall time (process "
      f"start to exit); final line: `{book['final_line']}`; test accuracy "
      f"{book['target_test_acc']} " + (f"reached {book['time_to_target_s']:.1f} s after launch"
                                       if book['time_to_target_s'] else 'not reached')]
  skipped = [f"- {s['task']}: {s['reason']}" for s in report['skipped']] or ['- nothing']
  lines += ['', '## Skipped', '', *skipped]
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- main


def torch_device_and_note(platform: str, no_torch: bool) -> tuple[str | None, str | None]:
  """PyTorch's device for JAX's platform, or None and the reason its column is empty."""
  if no_torch:
    return None, 'PyTorch left out (--no-torch)'
  device = throughput.torch_device_for(platform)
  if device is not None:
    return device, None
  try:
    import torch  # noqa: F401
  except ImportError:
    return None, 'torch is not installed'
  if platform == 'gpu':
    return None, 'this torch build sees no CUDA device'
  return None, f'PyTorch has no device for JAX platform {platform!r}'


def child_env(args) -> dict[str, str]:
  """The workers' environment: a fresh persistent compilation cache (so 'empty cache' is
  true), caching every program; --smoke pins JAX to the CPU."""
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': args.cache_dir,
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  if args.smoke:
    env['JAX_PLATFORMS'] = 'cpu'
  return env


def correctness_passed(report: dict) -> bool:
  """True only when checks ran and all passed: a check skipped or broken is a failure."""
  unchecked = [s for s in report['skipped'] if s['task'].startswith('correctness')]
  return (bool(report['correctness']) and not unchecked and
          all(c['status'] == 'pass' for c in report['correctness']))


def finish(runner: Runner, torch_note: str | None, torch_device: str | None) -> dict:
  """The report: results, machine, settings, and whether every correctness check passed."""
  report, args = runner.report, runner.args
  add_ratios(report, torch_note)
  jax_p, torch_p = report['precision'].get('jax', {}), report['precision'].get('torch', {})
  machine = throughput.machine_info({'device': f"{jax_p.get('platform')}:"
                                               f"{jax_p.get('device_kind')}"},
                                    {'device': torch_p.get('device'),
                                     'threads': torch_p.get('threads')} if torch_p else None)
  report.update(machine=machine, torch_note=torch_note, passed=correctness_passed(report),
                elapsed_s=time.monotonic() - runner.start,
                settings={'smoke': args.smoke, 'budget_s': args.budget_s,
                          'plan': dataclasses.asdict(runner.plan), 'torch_device': torch_device,
                          'argv': sys.argv[1:]})
  return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='accelerator_report', help='folder for report.json/.md')
  parser.add_argument('--budget-s', type=float, default=None,
                      help=f'wall-clock budget, compiles included (default 480; '
                      f'{SMOKE_BUDGET_S} with --smoke)')
  parser.add_argument('--smoke', action='store_true',
                      help='every code path at tiny sizes on the CPU (minutes on a 2-core VM)')
  parser.add_argument('--data-dir', default='',
                      help="Fashion-MNIST IDX folder for the book's run (default: train.py's "
                      'search: /usr/share/datasets/fashion-mnist, then tensorflow-datasets)')
  parser.add_argument('--no-torch', action='store_true', help='leave PyTorch out')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--torch-device', default='cpu', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = SMOKE_BUDGET_S if args.smoke else 480.0
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.worker:
    jax_worker() if args.worker == 'jax' else torch_worker(args.torch_device)
    return 0
  plan = SMOKE if args.smoke else FULL
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.smoke and not args.data_dir:
    args.data_dir = str(write_smoke_data(out / 'smoke_data'))
  platform = 'cpu' if args.smoke else throughput.jax_platform()
  torch_device, torch_note = torch_device_and_note(platform, args.no_torch)
  args.cache_dir = tempfile.mkdtemp(prefix='gnet_jax_report_xla_cache_')
  try:
    runner = Runner(args, plan, child_env(args), torch_device)
    runner.log(f'JAX platform {platform}; PyTorch on {torch_device or torch_note}; budget '
               f'{args.budget_s:.0f} s; compilation cache {args.cache_dir} (empty)')
    runner.run(plan_tasks(plan, torch_device, on_cpu=platform == 'cpu'))
  finally:
    shutil.rmtree(args.cache_dir, ignore_errors=True)
  report = finish(runner, torch_note, torch_device)
  (out / 'report.json').write_text(json.dumps(report, indent=2) + '\n')
  markdown = format_markdown(report)
  (out / 'report.md').write_text(markdown)
  print('\n' + markdown)
  print(f"{'PASS' if report['passed'] else 'FAIL'}: correctness "
        f"{sum(c['status'] == 'pass' for c in report['correctness'])}/"
        f"{len(report['correctness'])} checks passed; {len(report['skipped'])} tasks skipped; "
        f"report in {out}/report.md and report.json", flush=True)
  return 0 if report['passed'] else 1


if __name__ == '__main__':
  sys.exit(main())
