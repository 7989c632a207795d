"""MNIST-family data: IDX files or tensorflow-datasets into memory, then batches.

The whole dataset (70,000 28x28 uint8 images) fits in a few tens of MB, so it
is read once into NumPy and batched by indexing. Images stay uint8 at their
stored size; conversion to float and resizing happen on device, inside the
jitted step (``preprocess``), so the host does no per-image work.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gnet_jax.errors import CheckpointError, DatasetError

NUM_CLASSES = 10

# File stems of the four standard IDX files; each may also end in ".gz".
IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
# Folders where a copy may already be on disk: Debian's dataset package and
# the layouts torchvision's MNIST / FashionMNIST classes download into.
WELL_KNOWN_DIRS = {
    'fashion_mnist': ('/usr/share/datasets/fashion-mnist',),
    'mnist': ('/usr/share/datasets/mnist',),
}
TORCHVISION_SUBDIRS = {'mnist': 'MNIST/raw', 'fashion_mnist': 'FashionMNIST/raw'}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the model and the reports need to know about a dataset, without reading it."""

  name: str
  image_shape: tuple[int, int, int]  # stored (H, W, C)
  class_names: tuple[str, ...]
  # Per-channel (mean, std) of the training images in [0, 1], subtracted and divided
  # by in ``preprocess``; None feeds [0, 1] as the book does.
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
  # How a photo becomes an image of ``image_shape`` in predict: its shorter side resized to
  # ``resize_to``, then the centre cropped (torchvision's ImageNet evaluation: 256, then 224).
  # None (older specs too): the shorter side resized to the image size itself, as image
  # folders are read.
  resize_to: int | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, saved: dict) -> 'DatasetSpec':
    norm, resize_to = saved.get('normalization'), saved.get('resize_to')
    return cls(saved['name'], tuple(saved['image_shape']), tuple(saved['class_names']),
               (tuple(norm[0]), tuple(norm[1])) if norm else None,
               None if resize_to is None else int(resize_to))


SPECS = {
    'mnist': DatasetSpec('mnist', (28, 28, 1), tuple(str(i) for i in range(10))),
    'fashion_mnist': DatasetSpec('fashion_mnist', (28, 28, 1), (
        'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
        'Bag', 'Ankle boot')),
}


def dataset_spec(name: str) -> DatasetSpec:
  """The spec of ``config.dataset`` (its allowed names: ``config.RULES``)."""
  return SPECS[name]


def check_same_data(saved: DatasetSpec, now: DatasetSpec, what: str, fix: str) -> None:
  """Refuses data ``now`` whose classes or image shape differ from ``saved`` (a checkpoint's).

  A model trained on other classes would name every prediction wrongly, and
  silently. Normalisation is not compared: its statistics, recomputed from the
  same images by another Pillow or libjpeg, may differ in the last bits; the
  checkpoint's own values are the ones to use. ``what`` names the checkpoint,
  ``fix`` what the user can do.
  """
  diff = [f'{field}: {getattr(saved, field)!r} in checkpoint, {getattr(now, field)!r} now'
          for field in ('name', 'image_shape', 'class_names')
          if getattr(saved, field) != getattr(now, field)]
  if diff:
    raise CheckpointError(f'{what} was trained on other data ({"; ".join(diff)}); {fix}')


@dataclasses.dataclass(frozen=True)
class Dataset:
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str  # human-readable: where the data came from
  spec: DatasetSpec

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


# ----------------------------------------------------------------------------- IDX


def _read_bytes(path: Path) -> bytes:
  try:
    if path.suffix == '.gz':
      with gzip.open(path, 'rb') as f:
        return f.read()
    return path.read_bytes()
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise DatasetError(f'{path}: cannot be read ({e}); the file is damaged, '
                       'download it again') from None


def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
  """Reads one IDX file: ``kind='images'`` -> uint8 [N, rows, cols, 1], ``'labels'`` -> int32 [N].

  Checks the magic number and that the file holds exactly the data its header
  announces, so a truncated or swapped file fails here, naming the file.
  """
  path = Path(path)
  data = _read_bytes(path)
  magic, ndim = (IMAGES_MAGIC, 3) if kind == 'images' else (LABELS_MAGIC, 1)
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DatasetError(f'{path}: only {len(data)} bytes, too short for an IDX header; '
                       'the file is truncated, download it again')
  found = int.from_bytes(data[:4], 'big')
  if found != magic:
    raise DatasetError(f'{path}: magic number {found}, expected {magic} for IDX {kind}; '
                       f'this is not an IDX {kind} file (wrong file, or files swapped?)')
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
  expected = int(np.prod(dims))
  if len(data) - header != expected:
    raise DatasetError(f'{path}: header announces {dims} ({expected} bytes of data) but the '
                       f'file holds {len(data) - header}; the file is truncated or damaged, '
                       'download it again')
  array = np.frombuffer(data, np.uint8, offset=header).reshape(dims)
  if kind == 'images':
    return array[..., None]
  return array.astype(np.int32)


def find_idx_files(folder: str | os.PathLike, dataset: str) -> dict[str, Path] | None:
  """The four IDX files in ``folder`` (or its torchvision ``<Name>/raw`` subfolder), else None.

  A folder holding only some of the files is an error, naming the missing ones.
  """
  folder = Path(folder)
  for candidate in (folder, folder / TORCHVISION_SUBDIRS[dataset]):
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
      for name in (stem, stem + '.gz'):
        if (candidate / name).is_file():
          found[key] = candidate / name
          break
      else:
        missing.append(stem + '[.gz]')
    if not missing:
      return found
    if found:
      raise DatasetError(f'{candidate}: IDX files missing: {", ".join(missing)}; '
                         'put all four standard files in that folder')
  return None


def load_idx(files: dict[str, Path], dataset: str) -> Dataset:
  arrays = {key: read_idx(path, key.split('_')[1]) for key, path in files.items()}
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    if len(images) != len(labels):
      raise DatasetError(f'{files[f"{split}_images"]} holds {len(images)} images but '
                         f'{files[f"{split}_labels"]} holds {len(labels)} labels; '
                         'the two files are from different datasets or splits')
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise DatasetError(f'{files[f"{split}_labels"]}: labels outside 0..{NUM_CLASSES - 1} '
                         f'(found {labels.min()}..{labels.max()}); wrong or damaged file')
  folder = files['train_images'].parent
  return Dataset(arrays['train_images'], arrays['train_labels'], arrays['test_images'],
                 arrays['test_labels'], source=f'idx files in {folder}', spec=SPECS[dataset])


# ----------------------------------------------------------------------------- TFDS


def _tfds_missing_hint(dataset: str) -> str:
  if dataset in SPECS:
    return 'or point --config.data_dir at a folder with the four IDX files'
  return f'or prepare {dataset} on a machine with internet and copy its data_dir here'


def _tfds_builder(dataset: str, data_dir: str | None):
  """tensorflow-datasets' builder of ``dataset`` (nothing read or downloaded yet)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DatasetError(f"{dataset} needs tensorflow-datasets: pip install -e '.[tfds]' "
                       f'(and internet to download it); {_tfds_missing_hint(dataset)}') from None
  try:
    return tfds.builder(dataset, data_dir=data_dir or None)
  except Exception as e:  # tfds raises DatasetNotFoundError and others for unknown names
    raise DatasetError(f'tensorflow-datasets has no data set {dataset!r} ({e}); see '
                       'https://www.tensorflow.org/datasets/catalog for the names') from None


def _known_split_sizes(builder, dataset: str, splits: tuple[str, str]) -> list[int] | None:
  """Each split's example count from the builder's metadata, or None while tfds has none.

  tfds knows the sizes of a set it has not prepared only when its metadata came
  with it; a split name it cannot parse is an error here, before any download.
  """
  try:
    return [builder.info.splits[split].num_examples for split in splits]
  except KeyError:  # "splits is empty": not generated yet, sizes unknown
    return None
  except ValueError as e:  # an unknown split name, or a slice tfds cannot parse
    raise DatasetError(f'{dataset}: {" ".join(str(e).split())}; check --config.train_split '
                       'and --config.test_split') from None


def _prepare(builder, dataset: str) -> None:
  """Downloads and prepares ``dataset`` (tfds needs TensorFlow and internet for it)."""
  try:
    builder.download_and_prepare()
  except ImportError as e:  # TensorFlow: the tfds extra installs tensorflow-cpu
    raise DatasetError(
        f'{dataset} is not prepared in {builder.data_dir}, and preparing it needs TensorFlow '
        f"({e}): pip install -e '.[tfds]' (adds TensorFlow); "
        f'{_tfds_missing_hint(dataset)}') from None
  except Exception as e:  # network and download errors come in many types; the cause is named
    raise DatasetError(f'could not download and prepare {dataset} ({type(e).__name__}: '
                       f'{" ".join(str(e).split())[:300]}); check the internet connection; '
                       f'{_tfds_missing_hint(dataset)}') from None


def _tfds_sources(builder, dataset: str, splits: tuple[str, str]) -> dict:
  """One random-access source per split of a prepared set (reading needs no TensorFlow)."""
  try:
    return {split: builder.as_data_source(split=split) for split in splits}
  except Exception as e:  # a bad split name, another file format, damaged files: named
    raise DatasetError(f'cannot read {dataset} splits {", ".join(splits)} from '
                       f'{builder.data_dir} ({type(e).__name__}: '
                       f'{" ".join(str(e).split())[:300]}); check the split names '
                       '(--config.train_split / --config.test_split), or remove that folder '
                       'to prepare the set again') from None


def _tfds_spec(dataset: str, builder) -> tuple[tuple, tuple[str, ...]]:
  """The image feature's shape and the class names, or an error for a non-classification set."""
  features = builder.info.features
  if 'image' not in features or 'label' not in features or not hasattr(
      features['label'], 'names'):
    raise DatasetError(f'{dataset} is not an image classification set: gnet-jax needs an '
                       f"'image' and a class 'label' feature; it has {', '.join(features)}")
  return tuple(features['image'].shape), tuple(features['label'].names)


# The share of available memory a data set decoded into memory may take.
MEMORY_SHARE = 0.8
# Caps the memory the checks below see, in MiB (to try streaming on a small machine's terms).
MEMORY_LIMIT_ENV = 'GNET_JAX_MEMORY_LIMIT_MB'


def available_memory() -> int:
  """Bytes of memory this machine can still give without swapping, on any OS (psutil).

  ``$GNET_JAX_MEMORY_LIMIT_MB``, when set, caps it.
  """
  import psutil
  have = int(psutil.virtual_memory().available)
  limit = os.environ.get(MEMORY_LIMIT_ENV, '').strip()
  if limit:
    try:
      have = min(have, int(float(limit) * 2**20))
    except ValueError:
      raise DatasetError(f'{MEMORY_LIMIT_ENV}={limit!r} is not a number of MiB') from None
  return have


def check_fits_in_memory(what: str, num_images: int, shape: tuple[int, int, int]) -> None:
  """Refuses, before reading, data whose uint8 arrays would not fit in memory."""
  need, have = num_images * int(np.prod(shape)), available_memory()
  if have and need > MEMORY_SHARE * have:
    raise DatasetError(
        f'{what}: {num_images} images of {shape[0]}x{shape[1]}x{shape[2]} need '
        f'{need / 2**30:.1f} GiB in memory, and {have / 2**30:.1f} GiB is available; use a '
        'slice of the splits (e.g. --config.train_split=train[:25%]), a smaller '
        '--config.image_size, or stream it from disk: --config.input=stream')


def load_tfds(dataset: str, data_dir: str | None, splits: tuple[str, str] = ('train', 'test'),
              image_size: int | None = None, progress: bool = False) -> Dataset:
  """Any tensorflow-datasets image classification set, both splits in memory as uint8.

  Images of a fixed stored size stay at it (resized on the device); sets of
  varying sizes are fitted to ``image_size`` squares while read (shorter side,
  centre crop, as ``image_folder``).
  """
  import tqdm

  from gnet_jax import image_folder

  builder = _tfds_builder(dataset, data_dir)
  stored, class_names = _tfds_spec(dataset, builder)
  fixed = all(d is not None for d in stored)
  shape = stored if fixed else (image_size, image_size, stored[-1] or 3)
  what = f'{dataset} ({", ".join(splits)})'
  if not builder.is_prepared():  # tfds's own test: the prepared folder and its metadata
    sizes = _known_split_sizes(builder, dataset, splits)
    if sizes is not None:  # refused before a download it could not hold
      check_fits_in_memory(what, sum(sizes), shape)
    _prepare(builder, dataset)
  sources = _tfds_sources(builder, dataset, splits)
  check_fits_in_memory(what, sum(len(sources[s]) for s in splits), shape)
  arrays = []
  for split in splits:
    source = sources[split]
    images = np.zeros((len(source),) + shape, np.uint8)
    labels = np.zeros(len(source), np.int32)
    for i in tqdm.trange(len(source), desc=f'reading {split}', disable=not progress,
                         leave=False):
      record = source[i]
      pixels = np.asarray(record['image'], np.uint8).reshape(record['image'].shape[:2] + (-1,))
      images[i] = pixels if fixed else image_folder.fit_array(pixels, image_size)
      labels[i] = int(record['label'])
    arrays += [images, labels]
  spec = SPECS.get(dataset) or DatasetSpec(dataset, shape, class_names)
  return Dataset(*arrays, source=f'tensorflow-datasets {dataset} in {builder.data_dir}', spec=spec)


def load_image_folder(data_dir: str, image_size: int, progress: bool = False) -> Dataset:
  """``data_dir``'s train/ and test/ class folders (see ``gnet_jax.image_folder``)."""
  from gnet_jax import image_folder

  listing = image_folder.scan(data_dir)
  check_fits_in_memory(str(data_dir), sum(map(len, listing.files.values())),
                       (image_size, image_size, 3))
  arrays, cached = image_folder.load(listing, image_size, progress=progress)
  how = 'decoded once, from the cache' if cached else 'decoded'
  ignored = f'; {listing.ignored} non-image files ignored' if listing.ignored else ''
  return Dataset(arrays['train_images'], arrays['train_labels'], arrays['test_images'],
                 arrays['test_labels'], source=f'image folder {data_dir} ({how}{ignored})',
                 spec=DatasetSpec('image_folder', (image_size, image_size, 3),
                                  listing.class_names))


# ----------------------------------------------------------------------------- choice


def _load_idx_or_none(dataset: str, data_source: str, data_dir: str | None) -> Dataset | None:
  """Local IDX files for the MNIST family (``idx``/``auto``), None to try tensorflow-datasets."""
  if data_source == 'tfds' or dataset not in SPECS:
    return None
  if data_dir and data_source == 'idx' and not Path(data_dir).is_dir():
    raise DatasetError(f'data_dir {data_dir} does not exist; set --config.data_dir to the '
                       'folder holding the four IDX files')
  folders = [data_dir] if data_dir else []
  if data_source == 'auto' or not data_dir:
    folders += list(WELL_KNOWN_DIRS[dataset])
  files = next((f for d in folders if d and Path(d).is_dir()
                for f in [find_idx_files(d, dataset)] if f), None)
  if files is None and data_source == 'idx':
    hint = (' (apt-get install dataset-fashion-mnist puts Fashion-MNIST in '
            '/usr/share/datasets/fashion-mnist)') if dataset == 'fashion_mnist' else ''
    raise DatasetError(f'no IDX files for {dataset} in {", ".join(map(str, folders))}; '
                       f'put train-images-idx3-ubyte[.gz] and its three siblings in '
                       f'--config.data_dir{hint}')
  return load_idx(files, dataset) if files else None


def load_dataset(dataset: str, data_source: str = 'auto', data_dir: str | None = None,
                 train_examples: int = -1, eval_examples: int = -1, *,
                 splits: tuple[str, str] = ('train', 'test'), image_size: int | None = None,
                 progress: bool = False) -> Dataset:
  """Loads ``dataset`` from the source the config names; ``auto`` prefers local IDX files.

  ``image_folder`` reads ``data_dir``'s class folders; any other name than the
  MNIST family is a tensorflow-datasets set. The values are the config's,
  checked by ``config.validate``; ``image_size`` is needed where images are
  fitted while read (image folders, tensorflow-datasets sets of varying size).
  """
  data_dir = data_dir or None
  if dataset == 'image_folder':
    data = load_image_folder(data_dir, image_size, progress)
  else:
    data = _load_idx_or_none(dataset, data_source, data_dir)
    if data is None:
      data = load_tfds(dataset, data_dir if data_source == 'tfds' else None, splits,
                       image_size, progress)
  if train_examples >= 0 or eval_examples >= 0:
    data = subset(data, train_examples, eval_examples)
  logging.info('dataset %s: %d train / %d test examples of shape %s from %s', dataset,
               len(data.train_labels), len(data.test_labels), data.image_shape, data.source)
  return data


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of uint8 ``images`` scaled to [0, 1].

  Summed in float64 one chunk at a time, so a large set needs no float copy.
  """
  channels = images.shape[-1]
  total, squares, count = np.zeros(channels), np.zeros(channels), 0
  for start in range(0, len(images), 4096):
    chunk = images[start:start + 4096].reshape(-1, channels).astype(np.float64) / 255.0
    total += chunk.sum(0)
    squares += (chunk ** 2).sum(0)
    count += len(chunk)
  mean = total / max(count, 1)
  std = np.sqrt(np.maximum(squares / max(count, 1) - mean ** 2, 0.0))
  return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


def subset(data: Dataset, train_examples: int, eval_examples: int) -> Dataset:
  """The first ``train_examples`` / ``eval_examples`` of each split (-1 keeps all)."""
  tr = slice(None) if train_examples < 0 else slice(train_examples)
  te = slice(None) if eval_examples < 0 else slice(eval_examples)
  return dataclasses.replace(
      data, train_images=data.train_images[tr], train_labels=data.train_labels[tr],
      test_images=data.test_images[te], test_labels=data.test_labels[te])


# ----------------------------------------------------------------------------- batches


def preprocess(images: jax.Array, image_size: int,
               normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
               ) -> jax.Array:
  """uint8 NHWC at stored size -> float32 in [0, 1] at ``image_size`` (on device).

  Runs inside the jitted steps (training, evaluation, prediction), so the host
  hands over uint8 batches and does no per-image work. Bilinear with
  antialiasing, as torchvision's ``Resize`` does by default. ``normalization``
  (a spec's per-channel mean and std) then centres and scales each channel.
  """
  x = images.astype(jnp.float32) / 255.0
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]),
                         method='bilinear', antialias=True)
  if normalization is not None:
    mean, std = (jnp.asarray(v, jnp.float32) for v in normalization)
    x = (x - mean) / std
  return x


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The training order of ``epoch``: a function of seed and epoch only."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return num_examples // batch_size  # the last partial batch is dropped


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                  epoch: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Global batches of ``epoch`` from ``start_step`` on; this process's share of each.

  The global batch is the same whatever the process count; process ``i`` gets
  rows ``[i * B / P, (i + 1) * B / P)`` of it.
  """
  order = epoch_permutation(seed, epoch, len(labels))
  local = batch_size // process_count
  for step in range(start_step, steps_per_epoch(len(labels), batch_size)):
    idx = order[step * batch_size:(step + 1) * batch_size]
    idx = idx[process_index * local:(process_index + 1) * local]
    yield {'image': images[idx], 'label': labels[idx]}


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The whole split in order, the last batch zero-padded; ``mask`` marks real examples."""
  local = batch_size // process_count
  n = len(labels)
  for start in range(0, n, batch_size):
    rows = np.arange(start + process_index * local, start + (process_index + 1) * local)
    valid = rows < n
    rows = np.where(valid, rows, 0)
    yield {'image': np.where(valid[:, None, None, None], images[rows], 0).astype(np.uint8),
           'label': np.where(valid, labels[rows], 0).astype(np.int32),
           'mask': valid}
