"""Images/s of the data path alone: host batches -> device -> float and resized on device.

    python benchmarks/input_pipeline.py [--sizes 28,96] [--batch 128] [--seconds 3]

Measures, for one epoch's worth of shuffled batches (or ``--seconds``,
whichever ends first), the stages ``train.py`` runs per step without the
model: (1) gathering a batch on the host (``input_pipeline.train_batches``),
(2) plus the copy to the device (``Runner.put_batch``), (3) plus the
on-device conversion and resize the train step starts with
(``input_pipeline.preprocess``). Compare with the training throughput of
``benchmarks/throughput.py``: the data path should be orders of magnitude faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gnet_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gnet_jax import config as config_lib, input_pipeline, parallel  # noqa: E402


def load_images(dataset: str) -> tuple[np.ndarray, np.ndarray, str]:
  try:
    data = input_pipeline.load_dataset(dataset, 'idx')
    return data.train_images, data.train_labels, data.source
  except input_pipeline.DatasetError:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (60000, 28, 28, 1)).astype(np.uint8),
            rng.integers(0, 10, 60000).astype(np.int32), 'synthetic 60000 x 28x28 uint8')


def rate(stage, images, labels, batch: int, seconds: float) -> float:
  count, start = 0, time.perf_counter()
  last = None
  for b in input_pipeline.train_batches(images, labels, batch, seed=0, epoch=0):
    last = stage(b)
    count += len(b['label'])
    if time.perf_counter() - start > seconds:
      break
  jax.block_until_ready(last)
  return count / (time.perf_counter() - start)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='28,96')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--seconds', type=float, default=3.0, help='time limit per measurement')
  parser.add_argument('--dataset', default='fashion_mnist', choices=sorted(input_pipeline.SPECS))
  args = parser.parse_args(argv)

  images, labels, source = load_images(args.dataset)
  config = config_lib.default_config()
  config.update(parallelism='none', batch_size=args.batch)
  runner = parallel.make_runner(config)
  device = runner.devices[0]
  print(f'data: {source}; device: {device.platform}:{device.device_kind}; batch {args.batch}; '
        f'load average {os.getloadavg()[0]:.2f}')
  print('| stage | image size | images/s |')
  print('|---|---|---|')
  host = rate(lambda b: b, images, labels, args.batch, args.seconds)
  print(f'| host batches (gather + shuffle) | {images.shape[1]} | {host:,.0f} |')
  put = rate(runner.put_batch, images, labels, args.batch, args.seconds)
  print(f'| + copy to device | {images.shape[1]} | {put:,.0f} |')
  for size in (int(s) for s in args.sizes.split(',') if s):
    prep = jax.jit(lambda im, size=size: input_pipeline.preprocess(im, size))
    stage = lambda b, prep=prep: prep(runner.put_batch(b)['image'])
    rate(stage, images[:4 * args.batch], labels[:4 * args.batch], args.batch, 0)  # compile
    full = rate(stage, images, labels, args.batch, args.seconds)
    print(f'| + to float, resize on device | {size} | {full:,.0f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
