"""Streaming input with Grain: image folders and tensorflow-datasets sets larger than memory.

``--config.input=stream`` reads the training and test images while training
instead of decoding them all first (``input_pipeline``, the ``memory`` path).
Grain does the work: a ``MapDataset`` over the split's records (an image
folder's ``(path, label)`` list, or tensorflow-datasets' ArrayRecord
``data_source``), shuffled per epoch from the seed (``shuffle`` before
``repeat``: Grain draws epoch ``e``'s order from ``(seed, e)``), decoded and
fitted by ``image_folder``'s functions, batched, one slice per JAX process,
and read ahead by Grain's threads and (``config.data_workers``) worker
processes. Only Grain reads ahead: its iterator state, saved with every
checkpoint (``checkpoint.save``'s ``data`` item), is then the position of the
last batch the step consumed, and a resumed run sees the same batches.

Batches have the memory path's layout: a global batch of ``batch_size``
examples of which process ``i`` holds rows ``[i * B / P, (i + 1) * B / P)``,
the last partial batch of an epoch dropped; evaluation batches cover the
split once, zero-padded, with ``mask`` marking the real examples.

Nothing here imports JAX at module level or starts a JAX backend: Grain's
worker processes (started with spawn) unpickle these functions and import
this module, and must not take an accelerator's memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from gnet_jax import image_folder
from gnet_jax.errors import CheckpointError, ConfigError, DatasetError

INPUTS = ('auto', 'memory', 'stream')
# Training images decoded to estimate the channel statistics (``normalize``): a bounded
# sample, evenly spaced over the listing, instead of a pass that would hold every image.
STATS_SAMPLE = 1024
# Batches read ahead by each worker process; kept small because a batched element holds a
# whole (local) batch. Without workers, the training process reads one batch ahead per thread.
PREFETCH_BATCHES = 2
MAX_THREADS = 8
DATA_ITEM = 'data'  # the checkpoint item holding Grain's iterator state


@dataclasses.dataclass(frozen=True)
class StreamData:
  """What a streaming run reads: random-access records per split and how one becomes an image."""

  train: Any  # len() and [i]: a split's records (nothing decoded)
  test: Any
  decode: Callable[[Any], dict]  # record -> {'image': uint8 HWC, 'label': int32}
  spec: Any  # input_pipeline.DatasetSpec
  source: str  # human-readable: where the data comes from

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.spec.image_shape)


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Augment:
  """Host-side training augmentation, the config's ``augment_*`` keys (see ``augment_pixels``)."""

  crop: str = 'none'  # 'none', 'pad' or 'resized'
  padding: int = 0
  flip: bool = False

  @property
  def active(self) -> bool:
    return self.crop != 'none' or self.flip

  @classmethod
  def from_config(cls, config) -> 'Augment':
    return cls(config.augment_crop, config.augment_padding, config.augment_flip)


# torchvision's RandomResizedCrop defaults, as gnet_jax/augment.py's on the device.
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def resized_crop_box(width: int, height: int, rng: np.random.Generator
                     ) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params``: a box of 8-100% of the area, aspect 3/4-4/3.

  Ten tries, then the centre crop at the nearest allowed aspect, as torchvision does.
  """
  area = width * height
  log_ratio = (np.log(RESIZED_CROP_RATIO[0]), np.log(RESIZED_CROP_RATIO[1]))
  for _ in range(10):
    target = area * rng.uniform(*RESIZED_CROP_SCALE)
    ratio = np.exp(rng.uniform(*log_ratio))
    w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  ratio = width / height
  if ratio < RESIZED_CROP_RATIO[0]:
    w, h = width, int(round(width / RESIZED_CROP_RATIO[0]))
  elif ratio > RESIZED_CROP_RATIO[1]:
    w, h = int(round(height * RESIZED_CROP_RATIO[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def resized_crop(image, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """A random box of the full-size Pillow ``image`` (``resized_crop_box``) resized to ``size``
  (width, height): cut before any resizing, so the crop keeps the source's detail."""
  from PIL import Image
  box = resized_crop_box(*image.size, rng)
  return np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=box), np.uint8)


def augment_pixels(pixels: np.ndarray, augment: Augment, rng: np.random.Generator) -> np.ndarray:
  """``pad`` crop and flip of uint8 HWC pixels (``resized`` crops happen earlier, on the source).

  The same operations as ``gnet_jax/augment.py`` on the device: zero-pad by
  ``padding`` and cut the image's size back at a random place; mirror
  left-right with probability 1/2.
  """
  h, w = pixels.shape[:2]
  if augment.crop == 'pad' and augment.padding:
    p = augment.padding
    padded = np.pad(pixels, ((p, p), (p, p), (0, 0)))
    dy, dx = rng.integers(0, 2 * p + 1, 2)
    pixels = padded[dy:dy + h, dx:dx + w]
  if augment.flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels)


def decode_file(record: tuple[str, int], image_size: int, augment: Augment | None = None,
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """An image folder's ``(path, label)`` as training sees it (``image_folder.load_rgb``).

  With ``augment`` and ``rng`` (training), augmented on the host: a ``resized``
  crop is cut from the full-size file, then resized to ``image_size``.
  """
  path, label = record
  if augment is None or not augment.active:
    return {'image': image_folder.load_rgb(path, image_size), 'label': np.int32(label)}
  image = image_folder.read_image(path, 'RGB')
  if augment.crop == 'resized':
    pixels = resized_crop(image, (image_size, image_size), rng)
  else:
    pixels = np.asarray(image_folder.fit_square(image, image_size), np.uint8)
  return {'image': augment_pixels(pixels, augment, rng), 'label': np.int32(label)}


def decode_tfds(record: dict, image_size: int | None, fixed: bool,
                augment: Augment | None = None, rng: np.random.Generator | None = None
                ) -> dict[str, np.ndarray]:
  """A tensorflow-datasets record as the memory path reads it (``input_pipeline.load_tfds``).

  Sets of one stored size keep it (the device resizes); with ``augment``, as ``decode_file``.
  """
  image = record['image']
  pixels = np.asarray(image, np.uint8).reshape(image.shape[:2] + (-1,))
  channels = pixels.shape[-1]
  if augment is not None and augment.active and augment.crop == 'resized':
    size = (pixels.shape[1], pixels.shape[0]) if fixed else (image_size, image_size)
    pixels = resized_crop(image_folder.to_image(pixels), size, rng).reshape(
        size[::-1] + (channels,))
  elif not fixed:
    pixels = image_folder.fit_array(pixels, image_size)
  if augment is not None and augment.active:
    pixels = augment_pixels(pixels, augment, rng)
  return {'image': pixels, 'label': np.int32(record['label'])}


def _decode_augmented(record: Any, rng: np.random.Generator, decode: Callable,
                      augment: Augment) -> dict[str, np.ndarray]:
  return decode(record, augment=augment, rng=rng)


def decode_pixels(record: tuple[np.ndarray, int], augment: Augment | None = None,
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """A ``PixelFile`` record (pixels already fitted): augmented as the device augments
  in-memory images, a ``resized`` crop cut from the fitted pixels: what ``decode_tfds``
  does to a set of one stored size."""
  pixels, label = record
  return decode_tfds({'image': pixels, 'label': label}, None, fixed=True, augment=augment,
                     rng=rng)


class PixelFile:
  """A split's fitted pixels in one ``.npy`` file on disk, read an example at a time.

  ``np.load(mmap_mode='r')`` maps the file: the page cache holds what is read,
  the process holds nothing. Pickled (for Grain's workers) as its path and
  labels; each process maps the file itself.
  """

  def __init__(self, path: str | os.PathLike, labels: np.ndarray):
    self.path, self.labels, self._pixels = str(path), np.asarray(labels, np.int32), None

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    if self._pixels is None:
      self._pixels = np.load(self.path, mmap_mode='r')
    return np.array(self._pixels[index]), int(self.labels[index])

  def __getstate__(self) -> dict:
    return {'path': self.path, 'labels': self.labels}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state['path'], state['labels'])


def cached_split(files: tuple[tuple[Path, int], ...], image_size: int, path: Path,
                 progress: bool = False) -> PixelFile:
  """``files`` decoded and fitted once into ``path`` (a ``.npy`` of uint8 [N, S, S, 3]).

  Written a row at a time through a memory map (memory bounded whatever the
  split's size) to a temporary name, then renamed: an interrupted build leaves
  no file that looks complete. A damaged image stops it, naming the file.
  """
  labels = np.array([label for _, label in files], np.int32)
  if path.is_file():
    return PixelFile(path, labels)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f'{path.stem}.{os.getpid()}.partial.npy')
  try:
    rows = np.lib.format.open_memmap(partial, 'w+', np.uint8,
                                     (len(files), image_size, image_size, 3))
    image_folder.decode_into(rows, files, f'decoding {path.name}', progress)
    rows.flush()
    del rows
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)
  return PixelFile(path, labels)


class Head:
  """The first ``count`` records of a random-access source (``train_examples``/``eval_examples``).

  Written here because a tfds data source cannot be sliced; picklable for the workers.
  """

  def __init__(self, source: Any, count: int):
    self.source, self.count = source, min(count, len(source)) if count >= 0 else len(source)

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int):
    return self.source[index]


def _folder(config) -> StreamData:
  from gnet_jax import input_pipeline

  listing = image_folder.scan(config.data_dir)
  records = {split: [(str(path), label) for path, label in listing.files[split]]
             for split in image_folder.SPLITS}
  shape = (config.image_size, config.image_size, 3)
  spec = input_pipeline.DatasetSpec('image_folder', shape, listing.class_names)
  ignored = f'; {listing.ignored} non-image files ignored' if listing.ignored else ''
  if config.stream_cache:
    folder = image_folder.default_cache_dir()
    key = image_folder.cache_key(listing, config.image_size)
    train, test = (cached_split(listing.files[split], config.image_size,
                                folder / f'{key}-{split}.npy', progress=config.progress)
                   for split in image_folder.SPLITS)
    return StreamData(train, test, decode_pixels, spec,
                      f'image folder {config.data_dir} (streamed from pixels decoded once into '
                      f'{folder}{ignored})')
  return StreamData(records['train'], records['test'],
                    functools.partial(decode_file, image_size=config.image_size), spec,
                    f'image folder {config.data_dir} (streamed{ignored})')


def tfds_sources(dataset: str, data_dir: str | None, splits: tuple[str, str]) -> list:
  """One random-access source per split (``tfds.data_source``: ArrayRecord, no TensorFlow).

  With a ``data_dir``, tfds builds TFRecord unless told otherwise, and
  ``data_source`` cannot read TFRecord: ArrayRecord is asked for explicitly.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DatasetError(f"{dataset} needs tensorflow-datasets: pip install -e '.[tfds]'") from None
  kwargs = {'builder_kwargs': {'file_format': 'array_record'}} if data_dir else {}
  try:
    return [tfds.data_source(dataset, split=split, data_dir=data_dir or None, **kwargs)
            for split in splits]
  except NotImplementedError as e:  # prepared as TFRecord
    raise DatasetError(f'{dataset} in {data_dir} is prepared as TFRecord ({e}); streaming reads '
                       'ArrayRecord: prepare it again into an empty --config.data_dir, or use '
                       '--config.input=memory') from None
  except Exception as e:  # tfds raises many types for unknown names, splits and files
    raise DatasetError(f'cannot stream {dataset} splits {", ".join(splits)} '
                       f'({type(e).__name__}: {" ".join(str(e).split())[:300]}); check the name '
                       'and --config.train_split / --config.test_split') from None


def _tfds(config) -> StreamData:
  from gnet_jax import input_pipeline

  data_dir = config.data_dir if config.data_source == 'tfds' else None
  train, test = tfds_sources(config.dataset, data_dir or None,
                             (config.train_split, config.test_split))
  features = train.dataset_info.features
  if 'image' not in features or 'label' not in features or not hasattr(features['label'],
                                                                        'names'):
    raise DatasetError(f'{config.dataset} is not an image classification set: gnet-jax needs '
                       f"an 'image' and a class 'label' feature; it has {', '.join(features)}")
  stored = tuple(features['image'].shape)
  fixed = all(d is not None for d in stored)
  shape = stored if fixed else (config.image_size, config.image_size, stored[-1] or 3)
  spec = input_pipeline.SPECS.get(config.dataset) or input_pipeline.DatasetSpec(
      config.dataset, shape, tuple(features['label'].names))
  return StreamData(train, test,
                    functools.partial(decode_tfds, image_size=config.image_size, fixed=fixed),
                    spec, f'tensorflow-datasets {config.dataset} (streamed)')


def load(config) -> StreamData:
  """The config's data set as streaming sources; the normalisation's statistics from a sample."""
  from gnet_jax import input_pipeline

  if config.dataset == 'image_folder':
    data = _folder(config)
  elif config.dataset in input_pipeline.SPECS and config.data_source != 'tfds':
    raise ConfigError(f'--config.input=stream reads image folders and tensorflow-datasets sets; '
                      f'{config.dataset} from IDX files fits in memory: use --config.input=memory '
                      '(or auto), or --config.data_source=tfds')
  elif config.stream_cache:
    raise ConfigError('--config.stream_cache decodes image folders once; tensorflow-datasets '
                      'sets stream from their own ArrayRecord files: leave it False')
  else:
    data = _tfds(config)
  data = dataclasses.replace(data, train=Head(data.train, config.train_examples),
                             test=Head(data.test, config.eval_examples))
  if config.normalize and config.normalize_stats == 'training_set' and len(data.train):
    sample = sample_images(data.train, data.decode, STATS_SAMPLE)
    data = dataclasses.replace(data, spec=dataclasses.replace(
        data.spec, normalization=input_pipeline.channel_stats(sample)))
  return data


def sample_images(source: Any, decode: Callable, count: int) -> np.ndarray:
  """``count`` images evenly spaced over ``source`` (all if fewer), decoded in threads."""
  rows = np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).astype(int))
  with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
    return np.stack(list(pool.map(lambda i: decode(source[int(i)])['image'], rows)))


def bytes_decoded(config) -> tuple[int, str]:
  """Bytes the memory path would hold for the config's data set, and what it is (for ``auto``)."""
  if config.dataset == 'image_folder':
    listing = image_folder.scan(config.data_dir)
    count = sum(map(len, listing.files.values()))
    return count * 3 * config.image_size ** 2, f'{count} images at {config.image_size}x' \
        f'{config.image_size}x3'
  from gnet_jax import input_pipeline

  # The builder's metadata only: choosing must not download or prepare anything.
  data_dir = config.data_dir if config.data_source == 'tfds' else None
  builder = input_pipeline._tfds_builder(config.dataset, data_dir or None)
  stored, _ = input_pipeline._tfds_spec(config.dataset, builder)
  sizes = input_pipeline._known_split_sizes(builder, config.dataset,
                                            (config.train_split, config.test_split))
  if sizes is None:
    raise DatasetError(f'{config.dataset}: split sizes unknown before it is prepared')
  pixels = int(np.prod([d or config.image_size for d in stored[:2]])) * (stored[-1] or 3)
  return sum(sizes) * pixels, f'{sum(sizes)} images of {pixels} bytes'


def choose_input(config, saved_stream: bool | None = None) -> tuple[str, str]:
  """``(memory or stream, why)``: the config's, or for ``auto`` what fits in memory.

  ``saved_stream``: whether the checkpoint being resumed streamed (None: no
  checkpoint, or one that has not trained yet). A resumed ``auto`` run keeps
  its choice, so that memory free today cannot change the order of its
  examples; a resume that names the other path is refused.
  """
  from gnet_jax import input_pipeline

  if saved_stream is not None:
    saved = 'stream' if saved_stream else 'memory'
    if config.input not in ('auto', saved):
      raise CheckpointError(f'the run in this --workdir was trained with input={saved}; '
                            f'--config.input={config.input} would read its examples in another '
                            f'order: resume with --config.input={saved} (or auto), or use a new '
                            '--workdir')
    return saved, 'as the checkpoint being resumed'
  if config.input != 'auto':
    return config.input, 'as configured'
  if config.dataset in input_pipeline.SPECS and config.data_source != 'tfds':
    return 'memory', f'{config.dataset} from IDX files fits in memory'
  try:
    need, what = bytes_decoded(config)
  except DatasetError:
    return 'memory', 'not readable as a stream'  # the memory path names the problem
  have = input_pipeline.available_memory()
  fits = not have or need <= input_pipeline.MEMORY_SHARE * have
  return ('memory' if fits else 'stream',
          f'{what} take {need / 2**30:.2f} GiB decoded, {"within" if fits else "over"} '
          f'{input_pipeline.MEMORY_SHARE:.0%} of the {have / 2**30:.2f} GiB available')


def saved_stream(workdir: str | os.PathLike) -> bool | None:
  """Whether the newest checkpoint in ``workdir`` streamed; None without one past step 0."""
  from gnet_jax import checkpoint

  folder = checkpoint.checkpoint_dir(workdir)
  try:
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  except OSError:  # none yet, or unreadable: the workdir checks that follow say so
    return None
  if not steps or steps[-1] == 0:
    return None
  return (folder / str(steps[-1]) / DATA_ITEM).is_dir()


# ----------------------------------------------------------------------------- datasets


def train_dataset(data: StreamData, batch_size: int, seed: int, num_epochs: int,
                  process_index: int = 0, process_count: int = 1,
                  augment: Augment | None = None):
  """This process's training batches of every epoch, in order, as one ``grain.MapDataset``.

  Element ``k`` is global step ``k``'s batch (this process's rows of it), so
  the position of an iterator over it is the step. ``augment``: host-side
  augmentation through ``random_map``, whose generator Grain seeds with the
  seed and the example's index in the run: the same draws after a resume and
  with any number of workers or processes.
  """
  import grain

  n = len(data.train)
  kept = n // batch_size * batch_size  # the last partial batch of each epoch is dropped
  epochs = grain.MapDataset.source(data.train).shuffle(seed=seed).repeat(num_epochs)
  examples = grain.MapDataset.concatenate([epochs[e * n:e * n + kept] for e in range(num_epochs)])
  local = batch_size // process_count
  # Local batches g * P + i make up global batch g: process i takes every P-th.
  if augment is not None and augment.active:
    decoded = examples.random_map(functools.partial(_decode_augmented, decode=data.decode,
                                                    augment=augment), seed=seed)
  else:
    decoded = examples.map(data.decode)
  return decoded.batch(local, drop_remainder=True)[process_index::process_count]


def _padding(index: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  del index
  return {'image': np.zeros(shape, np.uint8), 'label': np.int32(0), 'mask': np.bool_(False)}


def _with_mask(element: dict) -> dict:
  return {**element, 'mask': np.bool_(True)}


def eval_dataset(data: StreamData, batch_size: int, process_index: int = 0,
                 process_count: int = 1):
  """The test split once, in order, zero-padded to whole batches; ``mask`` marks real examples."""
  import grain

  n = len(data.test)
  padded = -(-n // batch_size) * batch_size
  examples = grain.MapDataset.source(data.test).map(data.decode).map(_with_mask)
  if padded > n:
    pad = grain.MapDataset.range(padded - n).map(
        functools.partial(_padding, shape=data.image_shape))
    examples = grain.MapDataset.concatenate([examples, pad])
  return examples.batch(batch_size // process_count)[process_index::process_count]


def iterate(dataset, workers: int):
  """A checkpointable iterator over ``dataset``: Grain's threads, and ``workers`` processes.

  Each batch is decoded by one thread, so as many batches are read ahead as
  there are threads: memory bounded by a few batches, whatever the data set's
  size. With worker processes each decodes one batch at a time (one core each).
  """
  import grain

  threads = 1 if workers else max(1, min(MAX_THREADS, os.cpu_count() or 1))
  it = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(threads, PREFETCH_BATCHES)))
  if workers:
    # Grain's workers read absl flags of their own; a program that parsed none (a notebook,
    # pytest) would fail on the first one, so the defaults are marked as parsed.
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=PREFETCH_BATCHES),
                        worker_init_fn=functools.partial(die_with_parent, os.getpid()))
  return iter(it)


def die_with_parent(parent: int, worker_index: int = 0, worker_count: int = 1) -> None:
  """In a Grain worker: ends it when the training process dies (Linux), even by ``kill -9``.

  Written here because Grain's workers do not watch their parent: after a
  killed run they would live on, holding memory and shared-memory segments.
  """
  del worker_index, worker_count
  if not sys.platform.startswith('linux'):
    return
  import ctypes
  import signal
  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
  if os.getppid() != parent:  # died before the call
    os._exit(1)


def close(iterator) -> None:
  """Stops an iterator's worker processes now, not at garbage collection."""
  closer = getattr(iterator, 'close', None)
  if closer is not None:
    closer()


def eval_batches(data: StreamData, batch_size: int, workers: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """``eval_dataset``'s batches, its worker processes stopped at the end."""
  it = iterate(eval_dataset(data, batch_size, process_index, process_count), workers)
  try:
    yield from it
  finally:
    close(it)


# ----------------------------------------------------------------------------- checkpoints


def data_item_dir(checkpoint_dir: Path, step: int) -> Path:
  return Path(checkpoint_dir) / str(step) / DATA_ITEM


def restore_position(manager, step: int, iterator, process_index: int = 0,
                     process_count: int = 1) -> None:
  """Sets ``iterator`` to the position saved with the checkpoint at ``step``.

  Refuses a checkpoint saved by another number of processes (Grain keeps one
  state per process) with a ``CheckpointError``; a step-0 checkpoint without a
  position (imported weights) starts at the beginning.
  """
  import grain
  import orbax.checkpoint as ocp

  folder = data_item_dir(manager.directory, step)
  if not folder.is_dir():
    if step == 0:
      return
    raise CheckpointError(f'the checkpoint at step {step} in {manager.directory} has no stream '
                          'position (it was saved by input=memory); resume with the input it was '
                          'trained with, or use a new --workdir')
  mine = folder / f'process_{process_index}-of-{process_count}.json'
  if not mine.is_file():
    saved = sorted(p.name for p in folder.glob('process_*.json'))
    raise CheckpointError(f'the checkpoint at step {step} in {manager.directory} was streamed by '
                          f'another number of processes ({", ".join(saved) or "none"}; now '
                          f'{process_count}); resume with the same number of processes, or use '
                          'a new --workdir')
  manager.restore(step, args=ocp.args.Composite(
      **{DATA_ITEM: grain.checkpoint.CheckpointRestore(iterator)}))
  state = iterator.get_state()
  if isinstance(state, dict) and 'next_index' in state and state['next_index'] != step:
    raise CheckpointError(f'the checkpoint at step {step} in {manager.directory} holds stream '
                          f'position {state["next_index"]}, not {step}; it is damaged: move it '
                          'away to resume from the one before')


def check_readable(data: StreamData) -> None:
  """Refuses an empty split (nothing to stream) before anything is compiled."""
  for name, split in (('training', data.train), ('test', data.test)):
    if not len(split):
      raise DatasetError(f'{data.source}: the {name} split is empty')


def damaged(error: DatasetError, step: int, latest: int | None, workdir: Path) -> DatasetError:
  """The error for a file found unreadable mid-run: what, where the run stands, how to go on."""
  kept = (f'the checkpoint at step {latest} in {workdir} is intact' if latest is not None
          else 'no checkpoint was saved yet')
  return DatasetError(f'{error} (found while training step {step + 1}); stopped; {kept}: '
                      'replace the file with a readable image of the same name and rerun the '
                      'same command to continue from it (removing it instead changes the order '
                      'of the examples)')
