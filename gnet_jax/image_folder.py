"""Your own images: ``DIR/train/<class>/`` and ``DIR/test/<class>/`` into uint8 arrays.

The layout torchvision's ``ImageFolder`` and tensorflow-datasets' ``ImageFolder``
read: one sub-folder per class, named after it; class names are the folder
names, sorted, and a class's label is its index in that order. Every image
(PNG, JPEG, BMP, GIF; any size and mode) becomes RGB, is scaled so that its
shorter side is ``image_size`` and centre-cropped to a square (no stretching,
as torchvision's ``Resize`` + ``CenterCrop``), once, at load; the arrays stay
uint8 in memory. The decoded arrays are cached under ``~/.cache/gnet_jax``,
keyed by the folder's listing (names, sizes, modification times) and the image
size, so a second run decodes nothing. Other files (``.txt``, ``.DS_Store``)
are ignored and counted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from gnet_jax.errors import DatasetError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
SPLITS = ('train', 'test')
CACHE_VERSION = 2  # bump when the decoding below changes what an image becomes


@dataclasses.dataclass(frozen=True)
class Listing:
  """What a folder holds, from its names alone (nothing decoded)."""

  root: Path
  class_names: tuple[str, ...]
  files: dict[str, tuple[tuple[Path, int], ...]]  # split -> ((path, label), ...)
  ignored: int  # non-image files skipped


def _class_folders(split_dir: Path) -> dict[str, list[Path]]:
  """Class name -> its image files (sorted); non-image files are returned under ''."""
  classes = {}
  ignored = []
  for entry in sorted(split_dir.iterdir()):
    if entry.is_dir() and not entry.name.startswith('.'):
      files = sorted(p for p in entry.rglob('*') if p.is_file())
      classes[entry.name] = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
      ignored += [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    elif entry.is_file():
      ignored.append(entry)
  classes[''] = ignored
  return classes


def scan(root: str | os.PathLike) -> Listing:
  """Lists ``root``'s two splits, checking the layout before anything is decoded."""
  root = Path(root)
  if not root.is_dir():
    raise DatasetError(f'data_dir {root} is not a folder; set --config.data_dir to a folder '
                       'holding train/<class>/ and test/<class>/ image folders')
  found, ignored = {}, 0
  for split in SPLITS:
    split_dir = root / split
    if not split_dir.is_dir():
      raise DatasetError(f'{split_dir} is missing; an image folder needs train/ and test/, '
                         'each with one sub-folder of images per class')
    classes = _class_folders(split_dir)
    ignored += len(classes.pop(''))
    if not any(classes.values()):
      raise DatasetError(f'{split_dir} holds no images ({", ".join(IMAGE_SUFFIXES)}) in class '
                         'sub-folders; put each class\'s images in a folder named after it')
    for name, files in classes.items():
      if not files:
        raise DatasetError(f'{split_dir / name} is an empty class folder; add images of '
                           f'{name!r} or remove the folder')
    found[split] = classes
  train_names, test_names = sorted(found['train']), sorted(found['test'])
  if train_names != test_names:
    only_train = sorted(set(train_names) - set(test_names))
    only_test = sorted(set(test_names) - set(train_names))
    raise DatasetError(f'{root}: train/ and test/ have different classes (only in train: '
                       f'{only_train or "none"}; only in test: {only_test or "none"}); give both '
                       'splits the same class folders')
  if len(train_names) < 2:
    raise DatasetError(f'{root / "train"} has a single class ({train_names[0]!r}); a classifier '
                       'needs at least two class folders')
  files = {split: tuple((path, label) for label, name in enumerate(train_names)
                        for path in found[split][name]) for split in SPLITS}
  return Listing(root, tuple(train_names), files, ignored)


def fit_square(image, image_size: int):
  """A Pillow image scaled so its shorter side is ``image_size``, centre-cropped to a square."""
  from PIL import Image, ImageOps
  return ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.BILINEAR)


def to_image(pixels: np.ndarray):
  """uint8 HWC pixels (1 or 3 channels) as a Pillow image."""
  from PIL import Image
  return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def fit_array(pixels: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 HWC pixels of any size fitted to an ``image_size`` square (``fit_square``)."""
  fitted = fit_square(to_image(pixels), image_size)
  return np.asarray(fitted, np.uint8).reshape(image_size, image_size, pixels.shape[-1])


# Pillow's modes for 16-bit grey (PNG, TIFF); 'I' is 32-bit int, 'F' 32-bit float.
SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N')


def _to_eight_bits(image, path: Path):
  """A wide grey image as 8-bit 'L', scaled by its bit depth (x/257: 65535 -> 255).

  Never by the image's own maximum: a dim 16-bit image must stay dim. 'I'
  (32-bit int; older Pillows open 16-bit PNGs so) is read as 16-bit data when
  every value fits in 0..65535, and refused otherwise; 'F' (32-bit float) has
  no range a file states, so it is refused: an 8- or 16-bit file says what
  white is.
  """
  from PIL import Image

  if image.mode == 'F':
    raise DatasetError(f'{path}: 32-bit float pixels have no fixed range for white; save the '
                       'image as an 8- or 16-bit PNG')
  wide = np.asarray(image, np.int64)
  if image.mode == 'I' and wide.size and (wide.min() < 0 or wide.max() > 65535):
    raise DatasetError(f'{path}: 32-bit pixel values up to {wide.max()} (from {wide.min()}), '
                       'beyond 16 bits; save the image as an 8- or 16-bit PNG')
  return Image.fromarray(np.rint(wide / 257).astype(np.uint8), 'L')


def read_image(path: str | os.PathLike, mode: str, background: str | None = None):
  """One image file as a Pillow image in ``mode`` ('RGB' or 'L'), 8 bits per channel.

  The one place a file is opened, for training's folders and for predict:
  turned upright as shown (EXIF orientation), 16-bit (and 32-bit int) grey
  scaled by its bit depth, palette and alpha resolved (``background``: the
  colour transparent pixels are put on; None drops alpha). Raises
  ``DatasetError`` naming the file when it is missing or cannot be decoded.
  """
  from PIL import Image, ImageOps, UnidentifiedImageError

  path = Path(path)
  if not path.exists():
    raise DatasetError(f'{path}: no such file')
  if path.is_dir():
    raise DatasetError(f'{path}: is a folder, not an image file')
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)  # phone photos: upright as shown
      if image.mode in SIXTEEN_BIT_MODES + ('I', 'F'):
        image = _to_eight_bits(image, path)
      if background is not None and (image.mode in ('RGBA', 'LA', 'PA')
                                     or 'transparency' in image.info):
        rgba = image.convert('RGBA')
        image = Image.alpha_composite(Image.new('RGBA', rgba.size, background), rgba)
      elif image.mode == 'P':  # a palette's colours, not its indices' brightness
        image = image.convert('RGBA')
      return image.convert(mode)
  except UnidentifiedImageError:
    raise DatasetError(f'{path}: not an image Pillow can read; use a PNG or JPEG file instead') \
        from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # damaged, huge
    raise DatasetError(f'{path}: cannot be read as an image ({e}); replace it') from None


def resize_and_crop(image, image_size: int, resize_to: int):
  """torchvision's ``Resize(resize_to)`` then ``CenterCrop(image_size)`` on a Pillow image.

  The shorter side becomes ``resize_to`` and the longer ``int(resize_to * long /
  short)`` (Pillow's bilinear filter, which widens on downscaling: antialiased),
  then the centre ``image_size`` square is cut at ``round((side - image_size) /
  2)``: torchvision's arithmetic, so an ImageNet network sees what it saw in
  its evaluation.
  """
  from PIL import Image

  if resize_to < image_size:
    raise ValueError(f'resize_to {resize_to} is smaller than the crop {image_size}')
  w, h = image.size
  short, long = min(w, h), max(w, h)
  new_long = int(resize_to * long / short)
  size = (resize_to, new_long) if w <= h else (new_long, resize_to)
  if size != image.size:
    image = image.resize(size, Image.Resampling.BILINEAR)
  left, top = (int(round((side - image_size) / 2.0)) for side in size)
  return image.crop((left, top, left + image_size, top + image_size))


def load_rgb(path: str | os.PathLike, image_size: int, resize_to: int | None = None
             ) -> np.ndarray:
  """One file as training sees it: uint8 ``[image_size, image_size, 3]``.

  ``read_image`` in RGB (alpha dropped), the shorter side scaled to
  ``image_size`` and the centre cropped; with ``resize_to`` (a spec's, e.g.
  256 for ImageNet's 224) the shorter side scaled to that and the centre
  ``image_size`` square cropped (``resize_and_crop``).
  """
  image = read_image(path, 'RGB')
  fitted = (fit_square(image, image_size) if resize_to is None
            else resize_and_crop(image, image_size, resize_to))
  return np.asarray(fitted, np.uint8)


def cache_key(listing: Listing, image_size: int) -> str:
  """A digest of every file's relative path, size and modification time, and the image size."""
  digest = hashlib.sha256(f'{CACHE_VERSION} {image_size}'.encode())
  for split in SPLITS:
    for path, label in listing.files[split]:
      stat = path.stat()
      digest.update(f'{split}/{path.relative_to(listing.root)} {label} {stat.st_size} '
                    f'{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return Path(base) / 'gnet_jax' / 'image_folder'


def decode_into(rows: np.ndarray, files: tuple[tuple[Path, int], ...], desc: str,
                progress: bool) -> None:
  """``files`` decoded and fitted (``load_rgb``) into ``rows`` (uint8 [N, S, S, 3]: an array,
  or a memory map on disk), in order."""
  import tqdm

  # Pillow releases the GIL while it decodes, so threads use every core.
  with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
    decoded = pool.map(lambda f: load_rgb(f[0], rows.shape[1]), files)
    for i, pixels in enumerate(tqdm.tqdm(decoded, total=len(files), desc=desc, unit='img',
                                         disable=not progress, leave=False)):
      rows[i] = pixels


def _decode_split(files: tuple[tuple[Path, int], ...], image_size: int, desc: str,
                  progress: bool) -> tuple[np.ndarray, np.ndarray]:
  images = np.zeros((len(files), image_size, image_size, 3), np.uint8)
  decode_into(images, files, desc, progress)
  return images, np.asarray([label for _, label in files], np.int32)


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """Atomically (a reader never sees half a file); a cache that cannot be written is skipped."""
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix='.tmp', delete=False) as f:
      tmp = f.name
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning('image folder cache not written (%s); the next run decodes again', e)
    if tmp is not None:  # a full disk: leave no partial file behind
      Path(tmp).unlink(missing_ok=True)


def _read_cache(path: Path, listing: Listing, image_size: int) -> dict[str, np.ndarray] | None:
  """The cached arrays, or None when the file is missing, damaged or not what ``listing`` holds.

  A damaged cache (a full disk, a copy cut short) must cost one more decode,
  never the run: zip's CRC check catches flipped bytes, and the arrays' names,
  shapes and dtypes are checked against the listing.
  """
  if not path.is_file():
    return None
  try:
    with np.load(path) as saved:
      arrays = {k: saved[k] for k in saved.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    logging.warning('image folder cache %s unreadable (%s); decoding again', path, e)
    return None
  expected = {}
  for split in SPLITS:
    n = len(listing.files[split])
    expected[f'{split}_images'] = ((n, image_size, image_size, 3), np.uint8)
    expected[f'{split}_labels'] = ((n,), np.int32)
  found = {k: (a.shape, a.dtype) for k, a in arrays.items()}
  if found != expected:
    logging.warning('image folder cache %s holds other arrays than the folder; decoding again',
                    path)
    return None
  return arrays


def load(listing: Listing, image_size: int, cache_dir: str | os.PathLike | None = None,
         progress: bool = False) -> tuple[dict[str, np.ndarray], bool]:
  """The two splits as uint8 images and int32 labels; ``True`` when they came from the cache."""
  cache = Path(cache_dir or default_cache_dir()) / f'{cache_key(listing, image_size)}.npz'
  arrays = _read_cache(cache, listing, image_size)
  if arrays is not None:
    return arrays, True
  arrays = {}
  for split in SPLITS:
    arrays[f'{split}_images'], arrays[f'{split}_labels'] = _decode_split(
        listing.files[split], image_size, f'decoding {split}', progress)
  _write_cache(cache, arrays)
  return arrays, False
