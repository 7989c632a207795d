"""Shared test setup: 8 virtual CPU devices, a persistent compilation cache, tiny IDX data."""

import os
import tempfile

# Before jax initialises its backends (chex.set_n_cpu_devices sets XLA_FLAGS for us),
# and for subprocesses started by tests, which inherit the environment.
import chex

chex.set_n_cpu_devices(8)
_CACHE = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                               os.path.join(tempfile.gettempdir(), 'gnet_jax_test_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import gzip  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

REPO = Path(__file__).resolve().parent.parent


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
