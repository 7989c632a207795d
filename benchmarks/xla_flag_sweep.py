"""gnet-jax's train step under different XLA:CPU flags and batch sizes, one process each.

    python benchmarks/xla_flag_sweep.py               # 96x96, the sweep in docs/performance.md
    python benchmarks/xla_flag_sweep.py --size 28 --steps 10

XLA reads ``XLA_FLAGS`` once, when its backend starts, so every variant runs
in a fresh worker process (this script with ``--worker``). The baseline (the
flags ``train.py`` uses) runs first and last, so that drift of the machine
during the sweep shows. Prints img/s (median of the timed steps) and the
worker's peak RSS; screening only: for ratios that hold, use
``benchmarks/throughput.py``, which interleaves frameworks step by step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
YNN = '--xla_cpu_experimental_ynn_fusion_type='

# name -> (extra XLA flags, batch size or None for --batch). The baseline's own YNN
# setting (gnet_jax.xla_flags: off) is replaced where a variant names the flag.
VARIANTS = {
    'baseline (train.py: YNNPACK off)': ('', None),
    'YNNPACK dots only': (YNN + 'individual_dot', None),
    'YNNPACK convolutions only': (YNN + 'individual_convolution', None),
    'YNNPACK dots and convolutions': (YNN + 'individual_dot,individual_convolution', None),
    'YNNPACK dot fusions': (YNN + 'dot', None),
    'YNNPACK elementwise + reduce fusions': (YNN + 'eltwise,reduce', None),
    'XNNPACK dot fusions': ('--xla_cpu_experimental_xnn_fusion_type=dot', None),
    'oneDNN dot fusions': ('--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot',
                           None),
    'oneDNN custom calls': ('--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true',
                            None),
    'XNNPACK off': ('--xla_cpu_use_xnnpack=false', None),
    'old fusion emitters': ('--xla_cpu_use_fusion_emitters=false', None),
    'batch split: 64 per step': ('', 64),
    'batch split: 32 per step': ('', 32),
}


def compiled_train_step(size: int, batch: int):
  """GoogLeNet's donated, AOT-compiled train step as ``train.py`` builds it, a state, a batch.

  Imports JAX: call it once ``XLA_FLAGS`` is final. ``profile_step.py`` uses it too.
  """
  from gnet_jax import xla_flags
  xla_flags.apply_defaults()  # leaves a value the caller put in XLA_FLAGS alone

  import jax
  import throughput

  from gnet_jax import train

  model, tx, host_state = throughput.build_googlenet(size)  # the benchmark's own model and state
  state = jax.device_put(host_state)
  images, labels = throughput._random_batch(batch, size)  # the benchmark's own batch
  arrays = jax.device_put({'image': images, 'label': labels})
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, image_size=size),
                 donate_argnums=0).lower(state, arrays).compile()
  xla_flags.return_freed_memory()  # as train.py does
  return step, state, arrays


def median_step_seconds(step, state, arrays, steps: int):
  """Two untimed steps, then the median wall time of ``steps`` steps; returns it and the state."""
  import jax

  for _ in range(2):
    state = step(state, arrays)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state = jax.block_until_ready(step(state, arrays))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2], state


def worker(size: int, batch: int, steps: int) -> None:
  seconds, _ = median_step_seconds(*compiled_train_step(size, batch), steps)
  print(json.dumps({'img_s': batch / seconds,
                    'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=96)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=6, help='timed steps per variant')
  parser.add_argument('--only', help='comma-separated variant names (default: all)')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.size, args.batch, args.steps)

  names = args.only.split(',') if args.only else list(VARIANTS)
  names = names + [names[0]] if names[0] == next(iter(VARIANTS)) else names
  print(f'load average (1 min) before: {os.getloadavg()[0]:.2f}')
  print(f'\n{args.size}x{args.size}, {args.steps} timed steps per variant\n')
  print('| variant | XLA_FLAGS added | batch | img/s | peak RSS |\n|---|---|---|---|---|')
  for name in names:
    flags, batch = VARIANTS[name]
    batch = batch or args.batch
    env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + flags).strip())
    proc = subprocess.run([sys.executable, __file__, '--worker', '--size', str(args.size),
                           '--batch', str(batch), '--steps', str(args.steps)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
      print(f'| {name} | `{flags}` | {batch} | failed: {proc.stderr.strip().splitlines()[-1]} | |')
      continue
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f'| {name} | `{flags or "-"}` | {batch} | {result["img_s"]:.1f} | '
          f'{result["peak_rss_gib"]:.2f} GiB |', flush=True)
  print(f'\nload average (1 min) after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  sys.path.insert(0, str(REPO))
  main()
