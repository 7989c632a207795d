"""The one measurement harness of ``benchmarks/``: workers, interleaved rounds, machine, tables.

- **Workers**: each variant runs in a process of its own (``Worker``), so that
  its ``XLA_FLAGS``, threads, allocator and peak memory are its own. A worker
  is ``python -m benchmarks.harness --serve MODULE:FACTORY KWARGS``: it builds
  ``FACTORY(**KWARGS)`` and answers one JSON request per stdin line with one
  JSON line (the request's ``op`` names the method), with a deadline per
  request on the parent's side.
- **Interleaved rounds** (``interleaved_rounds``): one step of each worker in
  turn, round after round, so that a slow phase of a shared machine hits all
  variants alike; img/s as medians with their range, and each round's ratio
  to a reference, reported as the median over rounds with its min-max.
- **The step**: gnet-jax's train and eval steps as ``train.py`` builds them
  (``state.build``, ``parallel.make_runner``, ``train.make_train_step``,
  ``train.compile_eval``; ``JaxSteps``), optionally traced with
  ``gnet_jax/ops.py`` as committed at a revision (``ops_at``).
- **Machine** (``machine_info``), FLOPs from XLA's cost analysis
  (``model_flops``), a markdown table (``markdown_table``) and JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'torch', 'numpy')


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info(**extra: Any) -> dict:
  """CPU model, cores, OS, the 1-minute load now, and package versions (read without importing)."""
  versions = {'python': platform.python_version()}
  for package in PACKAGES:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      versions[package] = importlib.metadata.version(package)
  return {'cpu': cpu_model(), 'cores': os.cpu_count(), 'os': platform.platform(),
          'load_before': os.getloadavg()[0], 'versions': versions, **extra}


def machine_lines(machine: dict) -> list[str]:
  """The machine as the head of a printed report."""
  devices = ', '.join(f'{k} {v}' for k, v in machine.items() if k.endswith('device') and v)
  lines = [f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['os']}"
           + (f'; {devices}' if devices else ''),
           'versions: ' + ', '.join(f'{k} {v}' for k, v in machine['versions'].items()),
           f"load average (1 min) before: {machine['load_before']:.2f}"
           + (f" / after: {machine['load_after']:.2f}" if 'load_after' in machine else '')]
  if machine['load_before'] >= 1.0:
    lines.append('warning: the machine was busy before the run (1-minute load >= 1); rerun on '
                 'a quiet machine for numbers to quote')
  return lines


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def jax_platform() -> str:
  """JAX's default backend, asked in a child process (the driver never starts JAX)."""
  out = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                       capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def torch_device(platform: str, no_torch: bool = False) -> tuple[str | None, str | None]:
  """PyTorch's device matching JAX's ``platform`` ('cpu', or 'cuda' on a GPU), or None and
  the reason PyTorch's columns are empty."""
  if no_torch:
    return None, 'PyTorch left out (--no-torch)'
  try:
    import torch
  except ImportError:
    return None, 'torch is not installed'
  if platform == 'cpu':
    return 'cpu', None
  if platform != 'gpu':
    return None, f'PyTorch has no device for JAX platform {platform!r}'
  return ('cuda', None) if torch.cuda.is_available() else (
      None, 'this torch build sees no CUDA device')


# ----------------------------------------------------------------------------- statistics


def summary(values: Iterable[float]) -> dict:
  """Median, min, max and count: a number with its range."""
  values = list(values)
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
          'n': len(values)}


def relative_spread(values: list[float]) -> float:
  return (max(values) - min(values)) / statistics.median(values)


def interleaved_rounds(workers: dict[str, Worker], op: str, batches: dict[str, int],
                       reference: list[str], *, steps: int, min_rounds: int, max_rounds: int,
                       max_spread: float, budget_s: float) -> dict[str, dict]:
  """Rounds of ``steps`` timed steps, one step of each worker in turn.

  Each round gives every worker's median img/s and its ratio to the fastest
  of ``reference``; rounds are added until every ratio varies by at most
  ``max_spread`` over rounds (after ``min_rounds``), ``max_rounds`` or
  ``budget_s``. Returns per worker its img/s per step and its ratios, each as
  ``summary`` (median and range).
  """
  times: dict[str, list[float]] = {name: [] for name in workers}
  ratios: dict[str, list[float]] = {name: [] for name in workers}
  deadline = time.monotonic() + budget_s
  for round_index in range(max_rounds):
    start = {name: len(t) for name, t in times.items()}
    for _ in range(steps):
      for name, worker in workers.items():
        times[name] += worker.call({'op': op, 'count': 1})['times']
    rates = {name: batches[name] / statistics.median(t[start[name]:])
             for name, t in times.items()}
    best = max(rates[name] for name in reference)
    for name in workers:
      ratios[name].append(rates[name] / best)
    if round_index + 1 >= min_rounds and (
        max(relative_spread(r) for r in ratios.values()) <= max_spread
        or time.monotonic() > deadline):
      break
  return {name: {'img_per_s': summary(batches[name] / t for t in times[name]),
                 'ratio': summary(ratios[name]), 'rounds': len(ratios[name])}
          for name in workers}


# ----------------------------------------------------------------------------- output


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
  return '\n'.join(lines)


def fmt_range(s: dict | None, fmt: str = '.1f', unit: str = '') -> str:
  """``median (min-max)`` of a ``summary``; '-' for none."""
  if not s:
    return '-'
  return f"{s['median']:{fmt}}{unit} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def gib(n: int | None) -> str:
  return f'{n / 2**30:.2f}' if n else '-'


def write_json(path: str | Path | None, obj: Any) -> None:
  if path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + '\n')


# ----------------------------------------------------------------------------- workers


def line_queue(stream: Iterable[str]) -> queue.Queue:
  """The lines of ``stream`` as they come, read by a thread (None at the end)."""
  lines: queue.Queue = queue.Queue()

  def pump():
    for line in stream:
      lines.put(line)
    lines.put(None)

  threading.Thread(target=pump, daemon=True).start()
  return lines


class WorkerDied(RuntimeError):
  pass


class Worker:
  """A process serving ``factory(**kwargs)``'s methods, one JSON request and reply per line."""

  def __init__(self, factory: str, kwargs: dict | None = None, env: dict[str, str] | None = None,
               name: str = ''):
    self.name, self.factory = name or factory, factory
    cmd = [sys.executable, '-m', 'benchmarks.harness', '--serve', factory,
           json.dumps(kwargs or {})]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, **(env or {})}, cwd=REPO)
    self.lines = line_queue(self.proc.stdout)

  def ask(self, request: dict, deadline: float | None = None) -> dict | None:
    """The reply, or None when the worker died or ``deadline`` (monotonic) passed: then it is
    stopped, mid-compile or not."""
    try:
      self.proc.stdin.write(json.dumps(request) + '\n')
      self.proc.stdin.flush()
      timeout = None if deadline is None else max(deadline - time.monotonic(), 0.1)
      line = self.lines.get(timeout=timeout)
    except queue.Empty:
      self.proc.kill()
      line = None
    except BrokenPipeError:
      line = None
    if line is None:
      self.close()
      return None
    return json.loads(line)

  def call(self, request: dict) -> dict:
    """``ask`` without a deadline, where a failure ends the measurement."""
    reply = self.ask(request)
    if reply is None or reply.get('status') in ('error', 'oom'):
      raise WorkerDied(f'{self.name}: {reply and reply.get("error") or "the worker exited"} '
                       '(its messages are above)')
    return reply

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


def serve(target: Any) -> None:
  """A worker's loop: ``{'op': NAME, ...}`` calls ``target.NAME(request)``; errors are replies.

  Replies go to the original stdout; anything a library prints goes to stderr,
  so it can never be mistaken for a reply.
  """
  replies = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  for line in sys.stdin:
    request = json.loads(line)
    try:
      reply = getattr(target, request['op'])(request)
    except Exception as e:  # noqa: BLE001  reported per request; the worker carries on
      text = str(e).strip()
      oom = 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()
      reply = {'status': 'oom' if oom else 'error',
               'error': f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'[:500]}
    replies.write(json.dumps(reply, default=float) + '\n')


def load_factory(spec: str) -> Callable:
  module, _, name = spec.partition(':')
  return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------- gnet-jax


def random_batch(batch: int, size: int, seed: int = 0, channels: int = 1) -> tuple[Any, Any]:
  """uint8 images and int32 labels, as the data pipeline hands them to a step."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (batch, size, size, channels)).astype(np.uint8),
          rng.integers(0, 10, batch).astype(np.int32))


# The networks a benchmark can train: the book's GoogLeNet on Fashion-MNIST's shape, and
# torchvision's (``--config.model=inception_v1``) on ImageNet's (3 channels, 1,000 classes).
MODELS = ('d2l', 'inception_v1')
# inception_v1's aux heads train, at the paper's loss weight, as torchvision.models.googlenet()
# builds them (aux_logits=True) unless a benchmark is told otherwise.
INCEPTION_AUX_WEIGHT = 0.3


def gnet_config(size: int, batch: int, dtype: str = 'float32', kernels: str = 'auto',
                model: str = 'd2l', aux_weight: float = 0.0, **more: Any) -> Any:
  """The default config (the book's recipe: plain SGD lr 0.1, seed 0) on one device, for
  ``model`` (aux heads on when ``aux_weight`` > 0)."""
  from gnet_jax import config as config_lib
  config = config_lib.default_config()
  config.update(image_size=size, batch_size=batch, dtype=dtype, kernels=kernels, num_devices=1,
                parallelism='none', model=model, aux_weight=aux_weight, **more)
  config_lib.validate(config)
  return config


def data_spec(config: Any) -> Any:
  """The data set spec a benchmark's random batches stand for: the config's data set for the
  d2l network, ImageNet's shape, classes and normalisation for ``inception_v1``."""
  from gnet_jax import inception_v1, input_pipeline
  if config.model != 'inception_v1':
    return input_pipeline.dataset_spec(config.dataset)
  size = config.image_size
  return input_pipeline.DatasetSpec(
      'random imagenet-like', (size, size, 3), tuple(str(i) for i in range(1000)),
      (inception_v1.IMAGENET_MEAN, inception_v1.IMAGENET_STD))


def ops_at(rev: str) -> Any:
  """``gnet_jax/ops.py`` as committed at ``rev`` (``git show``, so ``GIT_DIR`` is honoured),
  imported as a module of its own."""
  source = subprocess.run(['git', 'show', f'{rev}:gnet_jax/ops.py'], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
  path = Path(tempfile.mkdtemp()) / f"ops_at_{rev.replace('/', '_')}.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def models_using(ops_module: Any) -> Iterator[None]:
  """Traces ``gnet_jax.models`` with ``ops_module`` in place of ``gnet_jax.ops`` (None: as is)."""
  from gnet_jax import models
  saved = models.ops
  models.ops = ops_module or saved
  try:
    yield
  finally:
    models.ops = saved


@dataclasses.dataclass
class JaxSteps:
  """gnet-jax's train and eval steps exactly as ``train.py`` makes them, on one device.

  ``train_fn`` is ``train.make_train_step`` (jitted, state donated; compile it
  with ``compile``), ``eval_fn`` is ``train.compile_eval``; ``state`` and
  ``batch`` are placed by the runner. With ``ops`` (a module from ``ops_at``)
  GoogLeNet is traced with those kernels.
  """

  config: Any
  runner: Any
  model: Any
  tx: Any
  host_state: Any
  train_fn: Callable
  eval_fn: Callable
  spec: Any
  ops: Any = None

  @classmethod
  def build(cls, config, ops=None, devices: list | None = None) -> JaxSteps:
    """Steps for ``config`` (one of ``gnet_config``), on ``devices`` (default: JAX's first).

    The initial state depends only on the config's seed (``state.init_params``
    seeds each parameter by its path), so steps built for other sizes, dtypes
    or devices start from the same parameters.
    """
    from gnet_jax import parallel, state as state_lib, train
    spec = data_spec(config)
    runner = parallel.make_runner(config, devices)
    model, tx, host_state = state_lib.build(config, spec)
    return cls(config, runner, model, tx, host_state,
               train.make_train_step(runner, model, tx, config, spec),
               train.compile_eval(runner, model, config.image_size, spec), spec, ops)

  def batch(self, seed: int = 0, eval_mask: bool = False) -> Any:
    import numpy as np
    images, labels = random_batch(self.config.batch_size, self.config.image_size, seed,
                                  self.spec.image_shape[-1])
    batch = {'image': images, 'label': labels}
    if eval_mask:
      batch['mask'] = np.ones(len(labels), bool)
    return self.runner.put_batch(batch)

  def state(self) -> Any:
    return self.runner.put_state(self.host_state)

  def compile(self, fn: Callable | None = None, *args) -> tuple[Any, float]:
    """The AOT-compiled train step (or ``fn`` at ``args``) and the seconds compiling took."""
    t0 = time.perf_counter()
    with models_using(self.ops):
      compiled = (fn or self.train_fn).lower(*(args or (self.state(), self.batch()))).compile()
    return compiled, time.perf_counter() - t0


def model_flops(size: int, model: str = 'd2l') -> dict[str, float]:
  """FLOPs per image from XLA's cost analysis of ``model`` (stock ops, batch 1).

  ``eval``: the forward pass; ``train``: the gradient of the loss (forward and
  backward, in inference mode: no aux heads, dropout or batch moments). XLA
  counts a multiply-add as 2 and leaves out the positions a convolution reads
  only padding from. The same count for every variant and framework, so that
  FLOP/s compare like img/s.
  """
  import jax
  import jax.numpy as jnp
  from gnet_jax import state as state_lib, train
  config = gnet_config(size, 1, kernels='xla', model=model)
  spec = data_spec(config)
  net = state_lib.create_model(config, spec)
  x = jax.ShapeDtypeStruct((1, size, size, spec.image_shape[-1]), jnp.float32)
  variables = state_lib.variable_shapes(net, x.shape[1:])  # traced once per process and shape
  params, rest = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)

  def loss(p, rest, x, y):
    return jnp.mean(train.cross_entropy(net.apply({'params': p, **rest}, x), y))

  forward = jax.jit(lambda p, rest, x: net.apply({'params': p, **rest}, x)).lower(params, rest, x)
  backward = jax.jit(jax.grad(loss)).lower(params, rest, x, labels)
  return {'eval': float(forward.cost_analysis()['flops']),
          'train': float(backward.cost_analysis()['flops'])}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description='a benchmark worker (started by Worker)')
  parser.add_argument('--serve', required=True, help='MODULE:FACTORY')
  parser.add_argument('kwargs', help='the factory keyword arguments, as JSON')
  args = parser.parse_args(argv)
  serve(load_factory(args.serve)(**json.loads(args.kwargs)))
  return 0


if __name__ == '__main__':
  from gnet_jax import cli
  cli.collect_garbage_less_often()  # as the commands whose work a worker times
  sys.exit(main())
