"""Training and inference throughput of gnet-jax next to the PyTorch original.

    python benchmarks/throughput.py                      # sizes 28 and 96, batch 128
    python benchmarks/throughput.py --sizes 224 --json out.json

Each framework (and, on CPU, gnet-jax with XLA's own flags as well as with
gnet-jax's defaults) runs in its own worker process, so that peak memory,
threads and allocator state are its own. The parent alternates the workers
step by step: every worker trains (forward, backward, SGD update) on the same
random batch, one timed step at a time, round after round, then the same for
inference. Only one worker computes at any moment, and slow phases of a shared
machine hit all of them alike.

Runs on whatever JAX sees (CPU, GPU or TPU); PyTorch runs on the matching
device when it has one (CUDA), else its column is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import flops  # noqa: E402

# name -> environment tweaks. 'gnet-jax' is what `train.py` runs with (kernels=auto and
# the per-platform defaults of gnet_jax.xla_flags); the others change one thing.
JAX_VARIANTS = {
    'gnet-jax': {},
    'gnet-jax kernels=xla': {'GNET_BENCH_KERNELS': 'xla'},
    'gnet-jax kernels=custom': {'GNET_BENCH_KERNELS': 'custom'},
    'gnet-jax XLA defaults': {'GNET_JAX_XLA_DEFAULTS': '0'},
    # glibc malloc without mmap for big blocks (no page faults on each step's
    # fresh temporaries); these are read at process start, so only a launcher
    # can set them. Opt-in: --jax-variants 'gnet-jax,gnet-jax + malloc env'.
    'gnet-jax + malloc env': {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': '68719476736'},
    # without returning the compiler's freed heap to the OS after compiling (peak memory)
    'gnet-jax no heap trim': {'GNET_BENCH_NO_TRIM': '1'},
}
DEFAULT_CPU_VARIANTS = ('gnet-jax', 'gnet-jax kernels=xla')
DEFAULT_ACCEL_VARIANTS = ('gnet-jax', 'gnet-jax kernels=custom')
# The PyTorch original in both memory layouts: contiguous NCHW as its DataLoader
# delivers (the seed as written), and channels_last (PyTorch's faster CPU path).
# Ratios are against the faster of the two.
TORCH_VARIANTS = {'PyTorch NCHW (as written)': {'GNET_BENCH_TORCH_LAYOUT': 'nchw'},
                  'PyTorch channels_last': {'GNET_BENCH_TORCH_LAYOUT': 'channels_last'}}


# ----------------------------------------------------------------------------- workers


def _reply(obj: dict) -> None:
  sys.stdout.write(json.dumps(obj) + '\n')
  sys.stdout.flush()


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _random_batch(batch: int, size: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8),
          rng.integers(0, 10, batch).astype(np.int32))


def build_googlenet(size: int, kernels: str = 'auto'):
  """GoogLeNet, its optimizer and host state from the project's factory (``state.build``).

  The default config (the reference recipe: plain SGD at 0.1, seed 0) at
  ``size`` x ``size``, as ``train.py`` would build it. Imports JAX.
  """
  from gnet_jax import config as config_lib, state as state_lib

  config = config_lib.default_config()
  config.update(image_size=size, kernels=kernels)
  config_lib.validate(config)
  return state_lib.build(config)


def jax_worker(args) -> None:
  """Serves 'train'/'eval'/'done' requests on stdin for gnet-jax."""
  from gnet_jax import xla_flags
  added = xla_flags.apply_defaults()  # before jax starts, as train.py does

  import functools

  import jax
  import numpy as np

  from gnet_jax import train

  t0 = time.perf_counter()
  device = jax.devices()[0]
  model, tx, host_state = build_googlenet(args.size, os.environ.get('GNET_BENCH_KERNELS', 'auto'))
  state = jax.device_put(host_state, device)
  images, labels = _random_batch(args.batch, args.size)
  batch = jax.device_put({'image': images, 'label': labels}, device)
  eval_batch = jax.device_put({'image': images, 'label': labels,
                               'mask': np.ones(args.batch, bool)}, device)
  init_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, image_size=args.size),
                 donate_argnums=0).lower(state, batch).compile()
  evaluate = jax.jit(functools.partial(train.eval_step, model=model, image_size=args.size)
                     ).lower(state.params, eval_batch).compile()
  compile_s = time.perf_counter() - t0
  if not os.environ.get('GNET_BENCH_NO_TRIM'):
    xla_flags.return_freed_memory()  # as train.py does once its steps are compiled
  _reply({'ready': True, 'init_s': init_s, 'compile_s': compile_s,
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'added_flags': added,
          'device': f'{device.platform}:{device.device_kind}', 'num_devices': jax.device_count()})

  for line in sys.stdin:
    task, count = line.split()
    times = []
    for _ in range(int(count)):
      t = time.perf_counter()
      if task == 'train':
        state = step(state, batch)
        jax.block_until_ready(state)
      elif task == 'eval':
        jax.block_until_ready(evaluate(state.params, eval_batch))
      else:
        break
      times.append(time.perf_counter() - t)
    if task == 'done':
      stats = device.memory_stats() or {}
      peak = stats.get('peak_bytes_in_use') if device.platform != 'cpu' else None
      _reply({'peak_rss': _peak_rss_bytes(), 'device_peak': peak})
      return
    _reply({'times': times})


def torch_worker(args) -> None:
  """Serves 'train'/'eval'/'done' requests on stdin for the PyTorch original (d2l code)."""
  import torch
  from torch.nn import functional as F

  from gnet_jax.torch_reference import googlenet

  t0 = time.perf_counter()
  device = torch.device(args.torch_device)
  torch.manual_seed(0)
  layout = os.environ.get('GNET_BENCH_TORCH_LAYOUT', 'nchw')
  memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  net = googlenet().to(device, memory_format=memory_format)
  optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
  images, labels = _random_batch(args.batch, args.size)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(
      device, memory_format=memory_format).contiguous(memory_format=memory_format)
  y = torch.from_numpy(labels).long().to(device)
  init_s = time.perf_counter() - t0
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def train_step():
    net.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()

  def eval_step():
    net.eval()
    with torch.no_grad():
      logits = net(x)
      F.cross_entropy(logits, y, reduction='sum'), (logits.argmax(1) == y).sum()

  _reply({'ready': True, 'init_s': init_s, 'compile_s': None,
          'device': f'{device.type}:{torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}',
          'threads': torch.get_num_threads()})
  for line in sys.stdin:
    task, count = line.split()
    if task == 'done':
      peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else None
      _reply({'peak_rss': _peak_rss_bytes(), 'device_peak': peak})
      return
    times = []
    for _ in range(int(count)):
      t = time.perf_counter()
      (train_step if task == 'train' else eval_step)()
      sync()
      times.append(time.perf_counter() - t)
    _reply({'times': times})


class Worker:
  """A worker process driven over pipes, one JSON line per request."""

  def __init__(self, name: str, kind: str, args, env: dict[str, str]):
    self.name = name
    cmd = [sys.executable, __file__, '--worker', kind, '--size', str(args.size_now),
           '--batch', str(args.batch), '--torch-device', args.torch_device]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, **env}, cwd=REPO)
    self.info = self._read()
    self.times: dict[str, list[float]] = {'train': [], 'eval': []}
    self.first: dict[str, float] = {}

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.name} worker exited (status {self.proc.wait()})')
    return json.loads(line)

  def run(self, task: str, count: int = 1) -> list[float]:
    self.proc.stdin.write(f'{task} {count}\n')
    self.proc.stdin.flush()
    return self._read().get('times', [])

  def finish(self) -> dict:
    self.proc.stdin.write('done 0\n')
    self.proc.stdin.flush()
    result = self._read()
    self.proc.wait()
    return result


# ----------------------------------------------------------------------------- driver


def machine_info(jax_info: dict | None, torch_info: dict | None) -> dict:
  cpu = platform.processor() or 'unknown'
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  versions = {'python': platform.python_version()}
  for module in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'numpy'):
    try:
      versions[module] = __import__(module).__version__
    except ImportError:
      pass
  return {'cpu': cpu, 'cores': os.cpu_count(), 'os': platform.platform(),
          'jax_device': (jax_info or {}).get('device'),
          'torch_device': (torch_info or {}).get('device'),
          'torch_threads': (torch_info or {}).get('threads'), 'versions': versions}


def torch_device_for(platform: str) -> str | None:
  """PyTorch's device matching JAX's platform, or None when there is none."""
  try:
    import torch
  except ImportError:
    return None
  if platform == 'cpu':
    return 'cpu'
  if platform == 'gpu' and torch.cuda.is_available():
    return 'cuda'
  return None


def jax_platform() -> str:
  out = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                       capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def summarize(times: list[float], batch: int) -> dict:
  rates = [batch / t for t in times]
  return {'median': statistics.median(rates), 'min': min(rates), 'max': max(rates),
          'steps': len(rates)}


def bench_size(args, size: int, variants: list[str], use_torch: bool) -> dict:
  args.size_now = size
  workers = []
  for name in variants:
    workers.append(Worker(name, 'jax', args, JAX_VARIANTS[name]))
  if use_torch:
    workers += [Worker(name, 'torch', args, env) for name, env in TORCH_VARIANTS.items()]
  result = {'size': size, 'batch': args.batch, 'steps': args.steps, 'tasks': {}}
  round_ratios: dict[str, dict[str, list[float]]] = {}
  for task in args.tasks:
    for w in workers:  # warm-up, untimed after the first step
      t = time.perf_counter()
      w.run(task, 1)
      w.first[task] = time.perf_counter() - t
      w.run(task, max(args.warmup - 1, 0))
    # Rounds of interleaved steps (one step of each worker in turn), until the ratios'
    # spread over rounds is within --spread or the time budget is spent.
    deadline = time.monotonic() + args.budget_s
    ratios = round_ratios.setdefault(task, {w.name: [] for w in workers})
    for round_index in range(args.max_rounds):
      start = {w.name: len(w.times[task]) for w in workers}
      for _ in range(args.steps):
        for w in workers:
          w.times[task] += w.run(task, 1)
      medians = {w.name: statistics.median(w.times[task][start[w.name]:]) for w in workers}
      torch_times = [medians[name] for name in TORCH_VARIANTS if name in medians]
      for w in workers:
        if torch_times:
          ratios[w.name].append(min(torch_times) / medians[w.name])
      spreads = [(max(r) - min(r)) / statistics.median(r) for r in ratios.values() if r]
      if round_index + 1 >= args.min_rounds and (
          not spreads or max(spreads) <= args.spread or time.monotonic() > deadline):
        break
  for w in workers:
    end = w.finish()
    entry = {'compile_s': w.info.get('compile_s'), 'init_s': w.info['init_s'],
             'first_step_s': w.first, 'peak_rss_bytes': end['peak_rss'],
             'device_peak_bytes': end['device_peak'], 'device': w.info['device']}
    if 'xla_flags' in w.info:
      entry['xla_flags'] = w.info['xla_flags']
    for task in args.tasks:
      stats = summarize(w.times[task], args.batch)
      per_image = flops.train_flops(size) if task == 'train' else flops.forward_flops(size)
      stats['gflops'] = stats['median'] * per_image / 1e9
      result['tasks'].setdefault(task, {})[w.name] = {**stats, **entry}
  for task, rows in result['tasks'].items():
    for name, row in rows.items():
      r = round_ratios[task][name]
      row['vs_torch'] = statistics.median(r) if r else None
      row['vs_torch_range'] = (min(r), max(r)) if r else None
      row['rounds'] = len(r)
  result['_infos'] = {w.name: w.info for w in workers}
  return result


def format_table(results: list[dict], machine: dict) -> str:
  v = machine['versions']
  lines = [
      f"machine: {machine['cpu']}, {machine['cores']} cores; JAX device {machine['jax_device']}; "
      f"PyTorch device {machine['torch_device'] or 'n/a'}"
      + (f" ({machine['torch_threads']} threads)" if machine['torch_threads'] else ''),
      'versions: ' + ', '.join(f'{k} {val}' for k, val in v.items()),
      f"load average (1 min) before / after: {machine['load_before']:.2f} / "
      f"{machine['load_after']:.2f}",
      '',
      '| size | task | framework | img/s median | min-max | vs faster PyTorch | GFLOP/s | '
      'compile s | first step s | peak memory |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    for task, rows in r['tasks'].items():
      for name, s in rows.items():
        ratio = (f"{s['vs_torch']:.2f}x ({s['vs_torch_range'][0]:.2f}-"
                 f"{s['vs_torch_range'][1]:.2f}, {s['rounds']} rounds)"
                 if s['vs_torch'] is not None else '-')
        compile_s = f"{s['compile_s']:.1f}" if s['compile_s'] is not None else '-'
        mem = s['device_peak_bytes'] or s['peak_rss_bytes']
        kind = 'device' if s['device_peak_bytes'] else 'RSS'
        lines.append(
            f"| {r['size']} | {task} | {name} | {s['median']:.1f} | "
            f"{s['min']:.1f}-{s['max']:.1f} | {ratio} | {s['gflops']:.1f} | {compile_s} | "
            f"{s['first_step_s'][task]:.1f} | {mem / 2**30:.2f} GiB {kind} |")
  lines.append('')
  if results:
    flags = '; '.join(f"{n}: '{i['xla_flags']}'" for n, i in results[0]['_infos'].items()
                      if 'xla_flags' in i)
    lines.append(f"batch {results[0]['batch']}, float32, {results[0]['steps']} timed steps "
                 'per round after warm-up, interleaved across frameworks; vs faster PyTorch: '
                 'median over rounds of the per-round ratio to the faster PyTorch layout, '
                 'with its range; GFLOP/s from the analytic '
                 'count (benchmarks/flops.py); compile s: XLA compile of the train and eval '
                 'steps; peak memory: the worker process (CPU) or device allocator peak.')
    lines.append(f'XLA_FLAGS seen by the gnet-jax workers: {flags}')
  return '\n'.join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='28,96', help='comma-separated image sizes (e.g. 224)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10,
                      help='timed steps per framework, task and round')
  parser.add_argument('--min-rounds', type=int, default=3, help='rounds at least')
  parser.add_argument('--max-rounds', type=int, default=8, help='rounds at most')
  parser.add_argument('--spread', type=float, default=0.1,
                      help='stop once every ratio varies by at most this much over rounds')
  parser.add_argument('--budget-s', type=float, default=900,
                      help='stop adding rounds for a task after this many seconds')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (>= 1)')
  parser.add_argument('--tasks', default='train,eval', help="'train', 'eval' or both")
  parser.add_argument('--jax-variants', default=None,
                      help='comma-separated from: ' + ', '.join(JAX_VARIANTS) +
                      f" (default: {', '.join(DEFAULT_CPU_VARIANTS)} on CPU, "
                      f"{', '.join(DEFAULT_ACCEL_VARIANTS)} elsewhere)")
  parser.add_argument('--no-torch', action='store_true', help='leave the PyTorch column out')
  parser.add_argument('--json', help='also write the results to this file')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--size', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--torch-device', default='cpu', help=argparse.SUPPRESS)
  return parser


def _jax_variants(args, platform: str, parser: argparse.ArgumentParser) -> list[str]:
  """The gnet-jax columns: ``--jax-variants``, else the platform's defaults."""
  if args.jax_variants is None:
    return list(DEFAULT_CPU_VARIANTS if platform == 'cpu' else DEFAULT_ACCEL_VARIANTS)
  variants = [v.strip() for v in args.jax_variants.split(',') if v.strip()]
  unknown = set(variants) - set(JAX_VARIANTS)
  if unknown:
    parser.error(f'unknown --jax-variants {sorted(unknown)}; choose from {list(JAX_VARIANTS)}')
  return variants


def _torch_device(args, platform: str) -> str | None:
  """PyTorch's device for the run (None: no PyTorch column); sets ``args.torch_device``."""
  torch_device = None if args.no_torch else torch_device_for(platform)
  args.torch_device = torch_device or 'cpu'
  if torch_device is None and not args.no_torch:
    print(f'note: no PyTorch device for JAX platform {platform!r}; PyTorch column left out',
          file=sys.stderr)
  return torch_device


def _load_before() -> float:
  """The 1-minute load average now, with a warning when the machine is already busy."""
  load = os.getloadavg()[0]
  if load >= 1.0:
    print(f'warning: 1-minute load is {load:.2f} before the run: the machine is busy, '
          'and PyTorch suffers more from load than XLA; ratios will flatter gnet-jax. Rerun '
          'on a quiet machine (load < 1, nothing else running).', file=sys.stderr)
  return load


def _machine(results: list[dict], variants: list[str], platform: str,
             load_before: float) -> dict:
  """The machine description for the table, with the load after the run (warned when high)."""
  first = results[0]['_infos']
  torch_info = next((first[n] for n in TORCH_VARIANTS if n in first), None)
  machine = machine_info(first.get(variants[0]) if variants else None, torch_info)
  machine.update(platform=platform, load_before=load_before, load_after=os.getloadavg()[0])
  if machine['load_after'] >= 1.5:
    print(f"warning: 1-minute load {machine['load_after']:.2f} at the end (the benchmark's own "
          'workers count too; above ~1.5 on 2 cores something else ran)', file=sys.stderr)
  return machine


def _write_json(path: str | None, machine: dict, results: list[dict]) -> None:
  if path:
    Path(path).write_text(json.dumps({'machine': machine, 'results': results}, indent=2) + '\n')


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.worker:  # a worker process serving one framework, started by bench_size
    (jax_worker if args.worker == 'jax' else torch_worker)(args)
    return 0

  args.tasks = [t for t in args.tasks.split(',') if t]
  args.warmup = max(args.warmup, 1)
  platform = jax_platform()
  variants = _jax_variants(args, platform, parser)
  torch_device = _torch_device(args, platform)
  load_before = _load_before()
  results = [bench_size(args, int(s), variants, torch_device is not None)
             for s in args.sizes.split(',') if s]
  machine = _machine(results, variants, platform, load_before)
  print(format_table(results, machine))
  _write_json(args.json, machine, results)
  return 0


if __name__ == '__main__':
  sys.exit(main())
