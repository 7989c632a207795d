"""Streaming input (``--config.input=stream``): decode rate, bounded memory, training speed.

    python -m benchmarks.stream decode      # images/s per worker at 96 and 224, cores for 20,000/s
    python -m benchmarks.stream memory      # peak RSS of a streamed run the memory path refuses
    python -m benchmarks.stream throughput  # training img/s, stream against memory, one small set

Each part generates its JPEG folder under ``--out`` (kept, so a second run
reuses it) and prints a markdown table; ``--json`` writes the numbers.

- ``decode``: ``stream.decode_file`` (Pillow decode, RGB, shorter side scaled,
  centre crop: what a Grain worker does per test image; and with a resized
  crop and a flip, per training image) on one thread, over
  ``--decode-images`` photo-sized JPEGs (500x375, ImageNet's typical size),
  at each ``--sizes``; then the host cores that would keep an accelerator fed
  at ``--target`` images/s.
- ``memory``: ``train.py`` on a generated folder with ``input=stream``, in a
  child process whose resident memory (and that of its Grain workers) is
  sampled every 20 ms, at two folder sizes (``--images`` and four times as
  many): a bound holds when the peak does not grow with the folder. The
  memory check is lowered (``GNET_JAX_MEMORY_LIMIT_MB``) so that the memory
  path refuses the larger folder, which the script checks.
- ``throughput``: ``train.py`` with ``input=memory`` and ``input=stream`` on
  the same folder, alternately for ``--rounds`` rounds; the last epoch's
  examples/s of each (``metrics.jsonl``), medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

PHOTO = (375, 500)  # height, width: ImageNet's most common size


def photo(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
  """A smooth colour picture with fine noise: it compresses and decodes like a photo."""
  h, w = size
  y, x = np.mgrid[:h, :w] / max(h, w)
  freq = rng.uniform(2, 8, 3)
  phase = rng.uniform(0, 6.3, 3)
  channels = [127 + 100 * np.sin(freq[c] * (x + y * (c + 1)) * 3.1 + phase[c]) for c in range(3)]
  pixels = np.stack(channels, -1) + rng.normal(0, 8, (h, w, 3))
  return np.clip(pixels, 0, 255).astype(np.uint8)


def make_folder(root: Path, per_class: dict[str, int], size: tuple[int, int],
                classes: int = 10) -> Path:
  """``root/{train,test}/c<k>/`` with JPEG photos; kept when already complete."""
  from PIL import Image

  done = root / '.complete'
  if done.exists():
    return root
  rng = np.random.default_rng(0)
  for split, n in per_class.items():
    for k in range(classes):
      folder = root / split / f'c{k}'
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(-(-n // classes)):  # at least one image per class
        Image.fromarray(photo(rng, size)).save(folder / f'{i:06d}.jpg', quality=90)
  done.touch()
  return root


# ----------------------------------------------------------------------------- decode


def decode_rates(folder: Path, sizes: list[int], seconds: float, augment: bool
                 ) -> dict[int, float]:
  """Images/s of ``stream.decode_file`` on one thread at each size (as many passes as fit);
  ``augment``: with a resized crop and a flip, as a Grain worker does for training."""
  from gnet_jax import image_folder, stream

  files = [(str(p), 0) for p in sorted((folder / 'train').rglob('*.jpg'))]
  image_folder.load_rgb(files[0][0], sizes[0])  # imports and Pillow's first-use setup
  options = ({'augment': stream.Augment('resized', 0, True)} if augment else {})
  rng = np.random.default_rng(0)
  rates = {}
  for size in sizes:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      for record in files:
        stream.decode_file(record, size, rng=rng, **options)
      count += len(files)
    rates[size] = count / (time.perf_counter() - start)
  return rates


def run_decode(args) -> dict:
  folder = make_folder(args.out / f'photos_{args.decode_images}', {'train': args.decode_images},
                       PHOTO, classes=1)
  plain = decode_rates(folder, args.sizes, args.seconds, augment=False)
  augmented = decode_rates(folder, args.sizes, args.seconds, augment=True)
  rows = [(f'{s}x{s}', f'{plain[s]:.0f}', f'{args.target / plain[s]:.0f}',
           f'{augmented[s]:.0f}', f'{args.target / augmented[s]:.0f}') for s in args.sizes]
  print(harness.markdown_table(
      ['image size', 'decode + fit, images/s per worker', f'cores for {args.target:,}/s',
       'decode + resized crop + flip, images/s per worker', f'cores for {args.target:,}/s'],
      rows))
  return {'decode_images_per_s': plain, 'decode_augment_images_per_s': augmented,
          'target': args.target, 'source': f'{PHOTO[1]}x{PHOTO[0]}'}


# ----------------------------------------------------------------------------- training runs


def train_command(folder: Path, workdir: Path, input_kind: str, args) -> list[str]:
  """``train.py`` on ``folder``; ``input_kind``: 'memory', 'stream' or 'stream_cache'."""
  return [sys.executable, str(harness.REPO / 'train.py'), '--config',
          str(harness.REPO / 'configs' / 'image_folder.py'), f'--config.data_dir={folder}',
          f'--config.input={input_kind.split("_")[0]}',
          f'--config.stream_cache={input_kind == "stream_cache"}',
          f'--config.data_workers={args.workers}',
          f'--config.image_size={args.image_size}', f'--config.batch_size={args.batch}',
          f'--config.num_epochs={args.epochs}', '--config.progress=False',
          '--config.log_every_steps=0', f'--workdir={workdir}']


def run_sampled(cmd: list[str], env: dict[str, str]) -> dict:
  """Runs ``cmd``; its exit status, output and peak RSS (its own, and with its children's)."""
  import psutil

  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **env}, cwd=harness.REPO)
  main = psutil.Process(proc.pid)
  own = total = 0
  while proc.poll() is None:
    try:
      rss = main.memory_info().rss
      children = sum(c.memory_info().rss for c in main.children(recursive=True))
    except psutil.Error:
      break
    own, total = max(own, rss), max(total, rss + children)
    time.sleep(0.02)
  out = proc.communicate()[0]
  return {'returncode': proc.returncode, 'output': out, 'peak_rss': own, 'peak_rss_tree': total}


def last_epoch_rate(workdir: Path) -> float:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return rows[-1]['examples_per_sec']


def run_memory(args) -> dict:
  args = argparse.Namespace(**{**vars(args), 'epochs': 1})  # the peak comes in the first epoch
  limit_mb = args.memory_limit_mb
  env = {'GNET_JAX_MEMORY_LIMIT_MB': str(limit_mb)}
  results = []
  for scale in (1, 4):
    n = args.images * scale
    folder = make_folder(args.out / f'memory_{n}_{args.source_size}px',
                         {'train': n, 'test': n // 10}, (args.source_size, args.source_size))
    decoded = (n + n // 10) * 3 * args.image_size ** 2
    refused = run_sampled(train_command(folder, Path(tempfile.mkdtemp()), 'memory', args), env)
    run = run_sampled(train_command(folder, Path(tempfile.mkdtemp()), 'stream', args), env)
    if run['returncode']:
      sys.exit(f'the streamed run failed:\n{run["output"][-3000:]}')
    results.append({'images': n + n // 10, 'decoded_mib': decoded / 2**20,
                    'memory_path_refused': refused['returncode'] == 2 and 'error:' in
                    refused['output'], 'peak_rss_mib': run['peak_rss'] / 2**20,
                    'peak_rss_with_workers_mib': run['peak_rss_tree'] / 2**20})
  print(f'memory check lowered to {limit_mb} MiB (GNET_JAX_MEMORY_LIMIT_MB); '
        f'{args.image_size}x{args.image_size}, batch {args.batch}, 1 epoch, '
        f'{args.workers} worker(s)')
  print(harness.markdown_table(
      ['images', 'decoded in memory, MiB', 'memory path', 'stream: peak RSS, MiB',
       'with workers, MiB'],
      [(r['images'], f"{r['decoded_mib']:.0f}", 'refused' if r['memory_path_refused']
        else 'accepted', f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_with_workers_mib']:.0f}")
       for r in results]))
  return {'memory_limit_mb': limit_mb, 'runs': results}


def run_throughput(args) -> dict:
  folder = make_folder(args.out / f'throughput_{args.images}_{args.source_size}px',
                       {'train': args.images, 'test': args.images // 10},
                       (args.source_size, args.source_size))
  rates = {'memory': [], 'stream': [], 'stream_cache': []}
  for _ in range(args.rounds):
    for kind in rates:  # alternately, so a busy phase hits each
      workdir = Path(tempfile.mkdtemp())
      run = run_sampled(train_command(folder, workdir, kind, args), {})
      if run['returncode']:
        sys.exit(f'the {kind} run failed:\n{run["output"][-3000:]}')
      rates[kind].append(last_epoch_rate(workdir))
  ratios = {kind: [r / m for m, r in zip(rates['memory'], rates[kind])] for kind in rates}
  print(f'{args.images} training images, {args.image_size}x{args.image_size}, batch {args.batch}, '
        f'{args.epochs} epochs (the last one timed), {args.workers} worker(s), '
        f'{args.rounds} rounds')
  names = {'memory': 'memory', 'stream': 'stream', 'stream_cache': 'stream, stream_cache=True'}
  print(harness.markdown_table(
      ['input', 'training img/s (median, min-max)', 'vs memory'],
      [(names[kind], harness.fmt_range(harness.summary(rates[kind])),
        f'{statistics.median(ratios[kind]):.2f} ({min(ratios[kind]):.2f}-'
        f'{max(ratios[kind]):.2f})') for kind in rates]))
  return {'examples_per_sec': rates, 'ratio': ratios}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('part', choices=('decode', 'memory', 'throughput'))
  parser.add_argument('--out', type=Path,
                      default=Path(tempfile.gettempdir()) / 'gnet_jax_stream_bench')
  parser.add_argument('--json', type=Path, default=None)
  parser.add_argument('--sizes', type=int, nargs='+', default=[96, 224])
  parser.add_argument('--decode-images', type=int, default=200)
  parser.add_argument('--seconds', type=float, default=10.0, help='decode: time per size')
  parser.add_argument('--target', type=int, default=20000, help='decode: images/s to feed')
  parser.add_argument('--images', type=int, default=2000, help='training images (memory: '
                      'the smaller folder)')
  parser.add_argument('--source-size', type=int, default=64, help='side of generated JPEGs')
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--workers', type=int, default=0)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--memory-limit-mb', type=float, default=5.0)
  args = parser.parse_args(argv)
  machine = harness.machine_info()
  print('\n'.join(harness.machine_lines(machine)), flush=True)
  result = {'decode': run_decode, 'memory': run_memory, 'throughput': run_throughput}[args.part](
      args)
  harness.write_json(args.json, {'machine': machine, 'args': vars(args),
                                 **result})
  return 0


if __name__ == '__main__':
  sys.exit(main())
