"""Generated image folders for the tests: a few classes of synthetic colour pictures.

Each class has its own dominant colour and a bright square in its own corner,
with noise, so a small model separates them in a few epochs; the files come in
every supported format and mode, and a few non-image files sit beside them.
"""

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ('circle', 'cross', 'square')  # sorted: the labels are 0, 1, 2
COLOURS = {'circle': (200, 40, 40), 'cross': (40, 200, 40), 'square': (40, 40, 200)}
FORMATS = ('png', 'jpg', 'bmp', 'gif', 'png')


def picture(name: str, rng: np.random.Generator, size: tuple[int, int] = (40, 30)) -> np.ndarray:
  h, w = size
  pixels = rng.normal(60, 20, (h, w, 3))
  pixels += np.asarray(COLOURS[name]) * 0.6
  corner = CLASSES.index(name)
  ys, xs = (slice(0, h // 2), slice(0, w // 2)) if corner == 0 else (
      (slice(0, h // 2), slice(w // 2, w)) if corner == 1 else (slice(h // 2, h), slice(0, w // 2)))
  pixels[ys, xs] += 80
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
