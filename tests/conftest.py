"""Shared test setup: 8 virtual CPU devices, fast compiles, a persistent compilation cache, tiny IDX data."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# Before jax initialises its backends (chex.set_n_cpu_devices sets XLA_FLAGS for us),
# and for subprocesses started by tests, which inherit the environment.
import chex

chex.set_n_cpu_devices(8)


def _xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA knows ``flag``: it aborts the process on an unknown one."""
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                         env={**os.environ, 'XLA_FLAGS': flag}, capture_output=True)
  return probe.returncode == 0


# Tests check values, not speed. LLVM at -O0, and XLA's older loop emitters instead of its
# fusion emitters, compile GoogLeNet's train step about 5x sooner (11 s -> 2 s here; each
# step then runs about 2.5x slower, and tests take few). The probe runs once, in the first
# process; pytest-xdist's workers and the tests' subprocesses inherit its answer.
if 'GNET_JAX_TEST_XLA_FLAGS' not in os.environ:
  _fast = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
  os.environ['GNET_JAX_TEST_XLA_FLAGS'] = ' '.join(
      _fast if _xla_accepts(' '.join(_fast)) else filter(_xla_accepts, _fast))
for _flag in os.environ['GNET_JAX_TEST_XLA_FLAGS'].split():
  if _flag not in os.environ['XLA_FLAGS'].split():
    os.environ['XLA_FLAGS'] += ' ' + _flag
_CACHE = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                               os.path.join(tempfile.gettempdir(), 'gnet_jax_test_cache'))
# Programs that compile in over 0.1 s are shared across the run's processes; writing the
# thousands of smaller ones costs more than reading them back saves.
_MIN_COMPILE_S = os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# Three workers share two cores: PyTorch's OpenMP pool would only spin against them
# (tests that compare with PyTorch set its thread count themselves).
os.environ.setdefault('OMP_NUM_THREADS', '1')
# Image folders' decode caches (~/.cache/gnet_jax/image_folder) in a folder of this run's own,
# for its subprocesses too: the user's cache is left alone.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='gnet_jax_test_cache_home_')
atexit.register(shutil.rmtree, os.environ['XDG_CACHE_HOME'], ignore_errors=True)

import gzip  # noqa: E402
from pathlib import Path  # noqa: E402

from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gnet_jax import cli, models, ops  # noqa: E402

cli.collect_garbage_less_often()  # as the commands do: tests trace GoogLeNet often

jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', float(_MIN_COMPILE_S))

REPO = Path(__file__).resolve().parent.parent

# The longest files (as measured under pytest-xdist on the 2-core VM) start first, longest
# first, so that the three workers of pyproject's addopts (--no-loadscope-reorder keeps this
# order) end together instead of one of them running the notebook alone at the end.
SLOW_FILES = ('test_export.py', 'test_accelerator_report.py', 'test_inception_v1.py',
              'test_finetune.py', 'test_workdir.py', 'test_stream.py', 'test_own_data.py',
              'test_transformations.py', 'test_notebook.py', 'test_train.py', 'test_imagenet.py',
              'test_benchmarks.py', 'test_ops.py', 'test_replay.py', 'test_cli.py',
              'test_parallel.py', 'test_multihost.py', 'test_checkpoint.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable otherwise


def child_env(devices: int = 1, **overrides: str) -> dict[str, str]:
  """This environment for a child process with ``devices`` CPU devices instead of the tests'
  8: one, as a user's command has (an image-folder run would otherwise shard a batch of 8
  over 8 devices on 2 cores), or 2 per process of a two-process run."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={devices}')
  return {**os.environ, 'XLA_FLAGS': ' '.join(flags), **overrides}


def run_python(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
  """``python ARGS`` in the repository as a user runs it (one device), output captured."""
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=child_env(**env))


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
  """Writes ``array`` (uint8 images [N, H, W] or labels [N]) as an IDX file."""
  magic = 2051 if array.ndim == 3 else 2049
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  data = header + array.astype(np.uint8).tobytes()
  if compress:
    path = path.with_name(path.name + '.gz')
    path.write_bytes(gzip.compress(data))
  else:
    path.write_bytes(data)
  return path


def make_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """A small learnable 10-class problem: class k lights up a horizontal band at row k."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
  for i, k in enumerate(labels):
    top = 1 + int(k) * (size - 4) // 10
    images[i, top:top + 3, 2:-2] = 255
  return images, labels


def write_idx_dataset(folder: Path, n_train: int = 96, n_test: int = 40,
                      compress: bool = True) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  for split, n, seed in (('train', n_train, 0), ('t10k', n_test, 1)):
    images, labels = make_images(n, seed)
    write_idx(folder / f'{split}-images-idx3-ubyte', images, compress)
    write_idx(folder / f'{split}-labels-idx1-ubyte', labels, compress)
  return folder


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory) -> Path:
  """A tiny synthetic MNIST-like dataset as gzipped IDX files (96 train, 40 test)."""
  return write_idx_dataset(tmp_path_factory.mktemp('idx'))


@pytest.fixture(scope='session')
def quickstart_checkpoint(tmp_path_factory, idx_dir) -> Path:
  """A step-0 checkpoint of the quickstart config on the tiny data (no training: a second)."""
  from configs import quickstart
  from gnet_jax import checkpoint, state as state_lib

  config = quickstart.get_config()
  config.data_dir, config.data_source = str(idx_dir), 'idx'
  folder = tmp_path_factory.mktemp('quickstart_step0')
  checkpoint.save_state(folder, state_lib.build(config)[2], config)
  return folder


@pytest.fixture(scope='session')
def book_run(tmp_path_factory, idx_dir) -> Path:
  """The book's recipe (plain SGD lr 0.1) at 28x28 on the tiny IDX data: 4 steps of batch 8,
  checkpoints at 2 and 4, evaluated at 4 (replayed by test_replay, exported by test_export)."""
  from configs import default
  from gnet_jax import train

  config = default.get_config()
  config.update(image_size=28, batch_size=8, train_examples=32, num_epochs=1,
                checkpoint_every_steps=2, data_source='idx', data_dir=str(idx_dir),
                progress=False, max_checkpoints=0, num_devices=1)
  workdir = tmp_path_factory.mktemp('book_run')
  train.train_and_evaluate(config, workdir)
  return workdir


class TinyNet(nn.Module):
  """GoogLeNet's calling convention and aux head on a network that compiles in a second.

  Drives the real training loop, steps and layouts in tests where GoogLeNet
  itself is not the point.
  """

  num_classes: int = 10
  aux_heads: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, example_keys=None):
    d = self.dtype
    x = nn.Conv(16, (3, 3), strides=(2, 2), dtype=d, name='conv')(x.astype(d))
    x = ops.max_pool_3x3(nn.relu(x), 2)
    logits = nn.Dense(self.num_classes, dtype=d, name='head')(jnp.mean(x, (1, 2)))
    logits = logits.astype(jnp.float32)
    if not self.aux_heads:
      return logits
    head = models.AuxHead(self.num_classes, dtype=d, name='aux1')
    if not train and not self.is_initializing():
      return logits
    keys = None if example_keys is None else jax.vmap(
        lambda k: jax.random.fold_in(k, 1))(example_keys)
    return logits, [head(x, keys).astype(jnp.float32)]


def read_png(path: Path) -> np.ndarray:
  """A PNG file's RGB pixels, decoded (height, width, 3): plot tests check what was drawn."""
  from PIL import Image
  with Image.open(path) as image:
    assert image.format == 'PNG', image.format
    return np.asarray(image.convert('RGB'))


def pixels_of_color(pixels: np.ndarray, color: str | tuple[float, ...], tolerance: int = 40) -> int:
  """How many pixels are within ``tolerance`` (per channel) of a matplotlib ``color``."""
  from matplotlib import colors
  rgb = np.round(np.asarray(colors.to_rgb(color)) * 255).astype(int)
  return int(np.sum(np.abs(pixels.astype(int) - rgb).max(-1) <= tolerance))
