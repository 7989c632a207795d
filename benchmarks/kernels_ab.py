"""The train step with ``gnet_jax/ops.py`` as committed at a revision against today's, side by side.

    python benchmarks/kernels_ab.py --against c638eba              # 96x96, batch 128
    python benchmarks/kernels_ab.py --against c638eba --size 28 --rounds 7

Answers "did this kernel change cost speed?": both train steps (GoogLeNet,
``kernels=auto``, as ``train.py`` compiles it) are built in one process, the
old one from ``git show REV:gnet_jax/ops.py`` swapped in while it is traced,
and timed in alternating rounds, so that drift of the machine hits both
alike. Prints each round's img/s and the ratio today / REV with its range.
Run it on a quiet machine (1-minute load below 1, nothing else running).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / 'benchmarks')]

import throughput  # noqa: E402
import xla_flag_sweep  # noqa: E402  (sets the XLA flags train.py uses before JAX starts)


def ops_at(rev: str):
  """``gnet_jax/ops.py`` as committed at ``rev``, imported as a module of its own."""
  source = subprocess.run(['git', 'show', f'{rev}:gnet_jax/ops.py'], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
  path = Path(tempfile.mkdtemp()) / f'ops_at_{rev}.py'
  path.write_text(source)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def models_using(ops_module):
  """Traces ``gnet_jax.models`` with ``ops_module`` in place of ``gnet_jax.ops``."""
  from gnet_jax import models
  saved, models.ops = models.ops, ops_module
  try:
    yield
  finally:
    models.ops = saved


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--against', required=True, help='git revision of the old gnet_jax/ops.py')
  parser.add_argument('--size', type=int, default=96)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per variant and round')
  args = parser.parse_args()

  load = os.getloadavg()[0]
  old_ops = ops_at(args.against)
  with models_using(old_ops):
    old = list(xla_flag_sweep.compiled_train_step(args.size, args.batch))
  new = list(xla_flag_sweep.compiled_train_step(args.size, args.batch))
  info = throughput.machine_info(None, None)
  print(f"{info['cpu']}, {info['cores']} cores, {info['os']}; jax {info['versions']['jax']}; "
        f'1-minute load before: {load:.2f}')
  print(f'{args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps per round\n')
  print(f'| round | {args.against} img/s | today img/s | today / {args.against} |\n|---|---|---|---|')
  ratios = []
  for r in range(args.rounds):
    rates = []
    for variant in (old, new) if r % 2 == 0 else (new, old):  # alternate who goes first
      seconds, variant[1] = xla_flag_sweep.median_step_seconds(*variant, args.steps)
      rates.append((variant is new, args.batch / seconds))
    rate = dict(rates)
    ratios.append(rate[True] / rate[False])
    print(f'| {r + 1} | {rate[False]:.1f} | {rate[True]:.1f} | {ratios[-1]:.3f} |', flush=True)
  print(f'\ntoday / {args.against}: {statistics.median(ratios):.3f}x '
        f'(range {min(ratios):.3f}-{max(ratios):.3f} over {args.rounds} rounds); '
        f'1-minute load after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
