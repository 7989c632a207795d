"""Generated image folders for the tests: a few classes of synthetic colour pictures.

Each class has its own dominant colour and a bright shape of its own, with
noise, so a network separates them in a few dozen steps; the files come in
every supported format and mode, and a few non-image files sit beside them.
"""

from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from configs import image_folder as image_folder_config

CLASSES = ('circle', 'cross', 'square')  # sorted: the labels are 0, 1, 2
COLOURS = {'circle': (200, 40, 40), 'cross': (40, 200, 40), 'square': (40, 40, 200)}
FORMATS = ('png', 'jpg', 'bmp', 'gif', 'png')


def picture(name: str, rng: np.random.Generator, size: tuple[int, int] = (40, 30)) -> np.ndarray:
  """A noisy picture of class ``name``: its colour, and its shape drawn bright in the middle.

  The shapes (a disk, a plus, a frame) look the same mirrored and a few pixels
  shifted, so flips and crops keep the class.
  """
  h, w = size
  pixels = rng.normal(60, 20, (h, w, 3)) + np.asarray(COLOURS[name]) * 0.6
  y, x = np.mgrid[:h, :w]
  dy, dx = (y - (h - 1) / 2) / h, (x - (w - 1) / 2) / w
  shape = {'circle': dy ** 2 + dx ** 2 < 0.08,
           'cross': (np.abs(dy) < 0.08) | (np.abs(dx) < 0.08),
           'square': (np.maximum(np.abs(dy), np.abs(dx)) > 0.3) &
                     (np.maximum(np.abs(dy), np.abs(dx)) < 0.4)}[name]
  pixels[shape] += 90
  return np.clip(pixels, 0, 255).astype(np.uint8)


def save(pixels: np.ndarray, path: Path, mode: str = 'RGB') -> Path:
  image = Image.fromarray(pixels, 'RGB')
  if path.suffix == '.gif':
    image = image.convert('P')
  elif mode != 'RGB':
    image = image.convert(mode)
  image.save(path)
  return path


def make_folder(root: Path, per_class: dict[str, int] | None = None, seed: int = 0,
                classes=CLASSES) -> Path:
  """``root/train/<class>/`` and ``root/test/<class>/``, images of mixed formats and sizes."""
  per_class = per_class or {'train': 12, 'test': 4}
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for name in classes:
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        size = (40, 30) if i % 2 else (24, 36)  # landscape and portrait
        mode = ('RGB', 'L', 'RGBA')[i % 3] if FORMATS[i % 5] == 'png' else 'RGB'
        save(picture(name, rng, size), folder / f'{name}_{i}.{FORMATS[i % 5]}', mode)
  (root / 'train' / 'README.txt').write_text('not an image')
  (root / 'train' / CLASSES[0] / '.DS_Store').write_bytes(b'\0\1')
  return root


def folder_config(folder: Path, **overrides) -> ml_collections.ConfigDict:
  """configs/image_folder.py (normalisation, pad-crop and flip) on a generated folder, small:
  16x16, batch 8, 2 epochs, one device, no checkpoints and no compilation cache of its own."""
  config = image_folder_config.get_config()
  config.update(dict(data_dir=str(folder), image_size=16, batch_size=8, num_epochs=2,
                     parallelism='none', progress=False, checkpoint_every_steps=0,
                     compilation_cache='off'))
  config.update(overrides)
  return config
