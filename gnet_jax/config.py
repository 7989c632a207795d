"""Checks of every config value and of the workdir, before any work starts.

One table, ``RULES``, says what each key allows; ``validate`` applies it and
raises ``ConfigError`` naming the key, the value and what is allowed.
``check_workdir`` refuses a workdir that is a file, cannot be written, or sits
on a disk without room for the checkpoints. Nothing here writes anything.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import ml_collections

from gnet_jax.errors import ConfigError, WorkdirError

# Every stage pads its convolutions and pools, so any image of at least 1x1
# pixels reaches the classifier as a 1x1 map (checked in tests/test_config.py).
MIN_IMAGE_SIZE = 1


def _int(lo: int | None = None, hi: int | None = None) -> tuple[type, Callable[[Any], bool], str]:
  def ok(v):
    return (lo is None or v >= lo) and (hi is None or v <= hi)
  allowed = ('an integer' + (f' >= {lo}' if lo is not None and hi is None else '') +
             (f' from {lo} to {hi}' if lo is not None and hi is not None else ''))
  return int, ok, allowed


def _float(lo: float, hi: float | None = None, lo_open: bool = False):
  def ok(v):
    return (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
  bound = f'> {lo}' if lo_open else f'>= {lo}'
  return float, ok, f'a number {bound}' + (f' and <= {hi}' if hi is not None else '')


@dataclasses.dataclass(frozen=True)
class _OneOf:
  """A rule's check for a key naming one of a few choices; ``choices(key)`` reads them back."""

  choices: tuple[str, ...]

  def __call__(self, value: Any) -> bool:
    return value in self.choices


def _choice(*choices: str) -> tuple[type, _OneOf, str]:
  return str, _OneOf(choices), 'one of ' + ', '.join(repr(c) for c in choices)


def _bool():
  return bool, (lambda v: True), 'True or False'


def _str():
  return str, (lambda v: True), 'a string'


RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    # Any name is a tensorflow-datasets set with data_source='tfds' (checked in validate).
    'dataset': _str(),
    'data_source': _choice('auto', 'idx', 'tfds'),
    'data_dir': _str(),
    'input': _choice('auto', 'memory', 'stream'),
    'data_workers': _int(0, 256),
    'stream_cache': _bool(),
    'train_split': _str(),
    'test_split': _str(),
    'image_size': _int(MIN_IMAGE_SIZE, 1024),
    'train_examples': _int(-1),
    'eval_examples': _int(-1),
    'normalize': _bool(),
    'normalize_stats': _choice('training_set', 'imagenet'),
    'augment_crop': _choice('none', 'pad', 'resized'),
    'augment_padding': _int(0, 256),
    'augment_flip': _bool(),
    'model': _choice('d2l', 'inception_v1'),
    'transform_input': _bool(),
    'init_from': _str(),
    'trainable': _str(),  # 'all', 'head' or one of BLOCKS[model] (checked in validate)
    'pretrained_lr_multiplier': _float(0.0, lo_open=True),
    'bn_stats': _choice('update', 'frozen'),
    'aux_weight': _float(0.0),
    'dtype': _choice('float32', 'bfloat16'),
    'kernels': _choice('auto', 'xla', 'custom'),
    'bias_init': _choice('zeros', 'torch'),
    'optimizer': _choice('sgd', 'adam'),
    'learning_rate': _float(0.0, lo_open=True),
    'lr_schedule': _choice('constant', 'warmup_cosine', 'step'),
    'warmup_epochs': _float(0.0),
    'lr_decay_epochs': _int(1),
    'lr_decay_factor': _float(0.0, 1.0, lo_open=True),
    'weight_decay': _float(0.0),
    'momentum': _float(0.0, 1.0),
    'nesterov': _bool(),
    'batch_size': _int(1),
    'eval_batch_size': _int(0),
    'num_epochs': _int(1),
    'seed': _int(0, 2**32 - 1),
    'parallelism': _choice('auto', 'none', 'pmap', 'sharded'),
    'num_devices': _int(0),
    'distributed': _bool(),
    'coordinator_address': _str(),
    'num_processes': _int(1),
    'process_id': _int(0),
    'checkpoint_every_steps': _int(0),
    'max_checkpoints': _int(0),
    'progress': _bool(),
    'log_every_steps': _int(-1),
    'profile_steps': _int(0),
    'compilation_cache': _str(),
}


# Data sets read without tensorflow-datasets (IDX files, or an image folder).
LOCAL_DATASETS = ('mnist', 'fashion_mnist', 'image_folder')

# Every key's default; a config file overrides some of them.
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / 'configs' / 'default.py'


def choices(key: str) -> tuple[str, ...]:
  """The names ``key`` allows, from ``RULES``: lookup tables keyed by them are tested against it."""
  return RULES[key][1].choices


def default_config() -> ml_collections.ConfigDict:
  """A fresh copy of ``configs/default.py``'s config (every key, its default value)."""
  spec = importlib.util.spec_from_file_location('gnet_jax_default_config', DEFAULT_CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# Keys added to configs/default.py after checkpoints were first written, each with the value
# that reproduces what a run did before the key existed. A checkpoint that lacks one is read
# with this value, never with today's default, which may change. A new key gets a line here
# (tests/test_config.py checks that every key is either here or in the first checkpoints).
BEFORE_KEY_EXISTED: dict[str, Any] = {
    'num_devices': 0,  # every device
    'optimizer': 'sgd',  # the only optimizer (with the momentum and nesterov keys)
    'kernels': 'auto',  # speed only: every kernel set gives the same numbers (tests/test_ops.py)
    'bias_init': 'zeros',  # Flax's default, the only init
    'log_every_steps': 0,  # epoch ends only: no steps.jsonl
    'profile_steps': 0,  # no profiler trace
    'compilation_cache': 'off',  # no persistent compilation cache
    'train_split': 'train',
    'test_split': 'test',
    'normalize': False,  # images in [0, 1], as the book
    'augment_crop': 'none',
    'augment_padding': 4,  # unused without augment_crop='pad'
    'augment_flip': False,
    'lr_schedule': 'constant',
    'warmup_epochs': 0.0,  # unused with a constant rate
    'lr_decay_epochs': 30,  # unused with a constant rate
    'lr_decay_factor': 0.1,  # unused with a constant rate
    'weight_decay': 0.0,
    'model': 'd2l',  # the only network
    'transform_input': False,  # inception_v1's only; d2l has none
    'init_from': '',  # initialised from the seed
    'trainable': 'all',
    'pretrained_lr_multiplier': 1.0,
    'bn_stats': 'update',  # inception_v1's only; d2l has no BatchNorm
    'normalize_stats': 'training_set',  # the training images' own statistics
    'input': 'memory',  # decoded into memory, the only input path
    'data_workers': 0,  # unused in memory
    'stream_cache': False,  # no streaming
}

# Each model's blocks in forward order (``trainable`` names one: it and every later one
# train) and its classifier heads, which always train: top-level names of its params.
BLOCKS: dict[str, tuple[str, ...]] = {
    'd2l': ('b1', 'b2', 'b3', 'b4', 'b5'),
    'inception_v1': ('conv1', 'conv2', 'conv3', 'inception3a', 'inception3b', 'inception4a',
                     'inception4b', 'inception4c', 'inception4d', 'inception4e', 'inception5a',
                     'inception5b'),
}
HEADS: dict[str, tuple[str, ...]] = {'d2l': ('head', 'aux1', 'aux2'),
                                     'inception_v1': ('fc', 'aux1', 'aux2')}


def with_defaults(saved: dict) -> dict:
  """``saved`` (a checkpoint's config) as saved, with the keys it lacks from ``BEFORE_KEY_EXISTED``.

  A checkpoint written before a key existed ran as that key's value in the
  table, so its config reads as if it had been saved with it. A key every
  checkpoint has saved stays missing when absent (``validate`` names it).
  """
  return {**{k: v for k, v in BEFORE_KEY_EXISTED.items() if k not in saved}, **saved}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` for the first key whose value is missing, mistyped or out of range."""
  for key, (kind, ok, allowed) in RULES.items():
    if key not in config:
      raise ConfigError(f'config key {key} is missing; add it to the config file '
                        f'(configs/default.py lists every key; allowed: {allowed})')
    value = config[key]
    typed = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      typed = True
    if not typed or not ok(value):
      raise ConfigError(f'--config.{key}={value!r} is not allowed; {key} must be {allowed}')
  if config.dataset not in LOCAL_DATASETS and config.data_source != 'tfds':
    raise ConfigError(f'--config.dataset={config.dataset!r} is not allowed with data_source '
                      f'{config.data_source!r}; use one of {", ".join(map(repr, LOCAL_DATASETS))}, '
                      'or add --config.data_source=tfds for a tensorflow-datasets set')
  if config.dataset == 'image_folder' and not config.data_dir:
    raise ConfigError('--config.dataset=image_folder needs --config.data_dir=DIR, the folder '
                      'holding train/<class>/ and test/<class>/')
  if config.train_examples == 0:
    raise ConfigError('--config.train_examples=0 leaves nothing to train on; use -1 (all) '
                      'or a positive number')
  if config.process_id >= config.num_processes:
    raise ConfigError(f'--config.process_id={config.process_id} is not allowed with '
                      f'num_processes {config.num_processes}; use 0 to {config.num_processes - 1}')
  if config.transform_input and config.model != 'inception_v1':
    raise ConfigError(f'--config.transform_input=True applies to inception_v1 (torchvision\'s '
                      f'GoogLeNet); model {config.model} has no such step: leave it False or set '
                      '--config.model=inception_v1')
  allowed = ('all', 'head', *BLOCKS[config.model])
  if config.trainable not in allowed:
    raise ConfigError(f'--config.trainable={config.trainable!r} is not allowed with model '
                      f'{config.model}; use one of {", ".join(map(repr, allowed))} (a block name: '
                      'it and every later block train, the heads always do)')
  if config.bn_stats != 'update' and config.model != 'inception_v1':
    raise ConfigError(f'--config.bn_stats={config.bn_stats!r} applies to inception_v1; model '
                      f'{config.model} has no BatchNorm: leave it \'update\'')
  if config.normalize_stats != 'training_set' and not config.normalize:
    raise ConfigError(f'--config.normalize_stats={config.normalize_stats!r} needs '
                      '--config.normalize=True (without it images stay in [0, 1])')
  if config.optimizer == 'adam' and (config.momentum or config.nesterov):
    raise ConfigError('momentum and nesterov apply to sgd only; set --config.momentum=0 '
                      '--config.nesterov=False with --config.optimizer=adam')


def check_workdir(workdir: str | os.PathLike, needed_bytes: int = 0) -> Path:
  """The workdir as an absolute path, if it can hold this run's output; else ``WorkdirError``.

  Checks without writing: an existing file is refused, as is a folder (or the
  nearest existing parent of a new one) that this user cannot write, or a disk
  with less free space than ``needed_bytes``.
  """
  path = Path(workdir).absolute()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'--workdir {path} is a file, not a folder; choose another --workdir')
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise WorkdirError(f'--workdir {path}: {existing} is a file, not a folder; '
                       'choose another --workdir')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f'--workdir {path}: {existing} is not writable by this user; '
                       'choose another --workdir or fix its permissions')
  free = shutil.disk_usage(existing).free
  if needed_bytes and free < needed_bytes:
    raise WorkdirError(f'--workdir {path}: {free / 2**20:.0f} MiB free on its disk, this run '
                       f'needs about {needed_bytes / 2**20:.0f} MiB for its checkpoints; free '
                       'some space, lower --config.max_checkpoints or choose another --workdir')
  return path
