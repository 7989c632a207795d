"""IDX and tfds reading, validation errors, and batch order."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_images, write_idx, write_idx_dataset
from gnet_jax import input_pipeline as ip


@pytest.mark.parametrize('compress', [True, False])
def test_read_idx_round_trip(tmp_path, compress):
  images, labels = make_images(5, seed=3)
  img = ip.read_idx(write_idx(tmp_path / 'a-images', images, compress), 'images')
  lab = ip.read_idx(write_idx(tmp_path / 'a-labels', labels, compress), 'labels')
  assert img.shape == (5, 28, 28, 1) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[..., 0], images)
  assert lab.dtype == np.int32
  np.testing.assert_array_equal(lab, labels)


def test_load_dataset_from_gz_and_raw_folders(tmp_path):
  gz = ip.load_dataset('mnist', 'idx', str(write_idx_dataset(tmp_path / 'gz', 30, 10)))
  raw = ip.load_dataset('mnist', 'idx', str(write_idx_dataset(tmp_path / 'raw', 30, 10, False)))
  assert gz.train_images.shape == (30, 28, 28, 1) and gz.test_labels.shape == (10,)
  np.testing.assert_array_equal(gz.train_images, raw.train_images)
  np.testing.assert_array_equal(gz.test_labels, raw.test_labels)
  assert 'idx files in' in gz.source


def test_torchvision_layout(tmp_path):
  write_idx_dataset(tmp_path / 'FashionMNIST' / 'raw', 20, 10, compress=False)
  data = ip.load_dataset('fashion_mnist', 'idx', str(tmp_path))
  assert len(data.train_labels) == 20
  assert data.source.endswith('FashionMNIST/raw')


def test_subset(idx_dir):
  data = ip.load_dataset('mnist', 'idx', str(idx_dir), train_examples=17, eval_examples=5)
  assert (len(data.train_labels), len(data.test_labels)) == (17, 5)


def _broken_copy(idx_dir: Path, tmp_path: Path) -> Path:
  return Path(shutil.copytree(idx_dir, tmp_path / 'broken'))


def _rewrite(path: Path, change) -> None:
  data = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(change(data)))


@pytest.mark.parametrize('case, expected', [
    ('missing_file', 'IDX files missing: t10k-labels-idx1-ubyte'),
    ('truncated', 'truncated'),
    ('bad_gzip', 'cannot be read'),
    ('bad_deflate_block', 'cannot be read'),
    ('bad_crc', 'cannot be read'),
    ('wrong_magic', 'magic number 2049, expected 2051'),
    ('count_mismatch', 'holds 96 images but'),
    ('label_range', 'labels outside 0..9'),
])
def test_bad_files_give_clear_errors(idx_dir, tmp_path, case, expected):
  folder = _broken_copy(idx_dir, tmp_path)
  images = folder / 'train-images-idx3-ubyte.gz'
  labels = folder / 'train-labels-idx1-ubyte.gz'
  if case == 'missing_file':
    (folder / 't10k-labels-idx1-ubyte.gz').unlink()
  elif case == 'truncated':
    _rewrite(images, lambda d: d[:-100])
  elif case == 'bad_gzip':
    images.write_bytes(images.read_bytes()[:50])
  elif case == 'bad_deflate_block':  # a gzip header, then a block of the reserved type: zlib.error
    images.write_bytes(images.read_bytes()[:10] + b'\xff' * 100)
  elif case == 'bad_crc':  # a whole stream whose checksum disagrees
    data = bytearray(images.read_bytes())
    data[-8] ^= 0xFF
    images.write_bytes(bytes(data))
  elif case == 'wrong_magic':
    shutil.copy(labels, images)
  elif case == 'count_mismatch':
    _rewrite(labels, lambda d: d[:4] + (95).to_bytes(4, 'big') + d[8:-1])
  elif case == 'label_range':
    _rewrite(labels, lambda d: d[:-1] + bytes([12]))
  with pytest.raises(ip.DatasetError, match=expected) as info:
    ip.load_dataset('mnist', 'idx', str(folder))
  message = str(info.value)
  assert '\n' not in message
  if case != 'missing_file':
    assert str(folder) in message  # names the file


def test_missing_folder_and_files(tmp_path):
  # Unknown dataset or data_source names are config.validate's (tests/test_config.py).
  with pytest.raises(ip.DatasetError, match='does not exist'):
    ip.load_dataset('mnist', 'idx', str(tmp_path / 'nowhere'))
  with pytest.raises(ip.DatasetError, match='no IDX files for mnist'):
    ip.load_dataset('mnist', 'idx', str(tmp_path))


def test_auto_prefers_idx_in_data_dir(idx_dir):
  data = ip.load_dataset('mnist', 'auto', str(idx_dir))
  assert str(idx_dir) in data.source


def test_tfds_source_under_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    data = ip.load_dataset('fashion_mnist', 'tfds')
  assert data.train_images.shape == (12, 28, 28, 1)
  assert data.train_images.dtype == np.uint8
  assert data.test_labels.dtype == np.int32
  assert 0 <= data.train_labels.min() and data.train_labels.max() < 10
  assert 'tensorflow-datasets' in data.source


def test_epoch_permutations_deterministic_and_distinct():
  a0, a1 = ip.epoch_permutation(0, 0, 100), ip.epoch_permutation(0, 1, 100)
  np.testing.assert_array_equal(a0, ip.epoch_permutation(0, 0, 100))
  assert not np.array_equal(a0, a1)
  assert not np.array_equal(a0, ip.epoch_permutation(1, 0, 100))
  np.testing.assert_array_equal(np.sort(a1), np.arange(100))


def test_train_batches_drop_last_resume_and_process_slices():
  images, labels = make_images(50, seed=0)
  images = images[..., None]
  full = list(ip.train_batches(images, labels, 16, seed=0, epoch=2))
  assert len(full) == 3 == ip.steps_per_epoch(50, 16)
  assert all(b['image'].shape == (16, 28, 28, 1) for b in full)
  order = ip.epoch_permutation(0, 2, 50)
  np.testing.assert_array_equal(full[1]['label'], labels[order[16:32]])
  resumed = list(ip.train_batches(images, labels, 16, seed=0, epoch=2, start_step=2))
  np.testing.assert_array_equal(resumed[0]['image'], full[2]['image'])
  halves = [list(ip.train_batches(images, labels, 16, 0, 2, process_index=i, process_count=2))
            for i in range(2)]
  for step in range(3):
    joined = np.concatenate([halves[0][step]['label'], halves[1][step]['label']])
    np.testing.assert_array_equal(joined, full[step]['label'])


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_cover_every_example_once(process_count):
  images, labels = make_images(37, seed=0)
  images = images[..., None]
  seen = []
  for p in range(process_count):
    for batch in ip.eval_batches(images, labels, 8, p, process_count):
      assert batch['image'].shape == (8 // process_count, 28, 28, 1)
      seen.extend(batch['label'][batch['mask']].tolist())
  assert sorted(seen) == sorted(labels.tolist())


def test_preprocess_matches_torch_antialiased_bilinear_resize():
  torch = pytest.importorskip('torch')
  images = make_images(2, seed=1)[0][..., None]
  for size in (96, 20):  # up and down (where antialiasing matters)
    ours = np.asarray(ip.preprocess(images, size))
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, size=(size, size),
        mode='bilinear', antialias=True, align_corners=False).permute(0, 2, 3, 1).numpy()
    assert ours.dtype == np.float32 and ours.shape == (2, size, size, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_available_memory_comes_from_psutil_off_linux_too(monkeypatch):
  import collections
  import pathlib

  import psutil

  def no_proc(self, *args, **kwargs):  # as on macOS or Windows: there is no /proc/meminfo
    raise FileNotFoundError(str(self))

  monkeypatch.setattr(pathlib.Path, 'read_text', no_proc)
  memory = collections.namedtuple('svmem', 'total available')(8 * 2**30, 3 * 2**30)
  monkeypatch.setattr(psutil, 'virtual_memory', lambda: memory)
  assert ip.available_memory() == 3 * 2**30
  with pytest.raises(ip.DatasetError, match='3.0 GiB is available'):
    ip.check_fits_in_memory('big', 4 * 2**20, (32, 32, 3))  # 12 GiB


class FakeBuilder:
  """A tensorflow-datasets builder as _tfds_sources uses it: prepared or not, sizes known."""

  data_dir = '/data/cifar10/3.0.2'

  def __init__(self, prepared, read_error=None, prepare_error=None, sizes=(50000, 10000)):
    from types import SimpleNamespace as NS
    self.prepared, self.read_error, self.prepare_error = prepared, read_error, prepare_error
    self.prepare_calls = 0
    self.info = NS(features={'image': NS(shape=(32, 32, 3)), 'label': NS(names=['a', 'b'])},
                   splits={'train': NS(num_examples=sizes[0]),
                           'test': NS(num_examples=sizes[1])} if sizes else {})

  def is_prepared(self):
    return self.prepared

  def download_and_prepare(self):
    self.prepare_calls += 1
    if self.prepare_error:
      raise self.prepare_error
    self.prepared = True

  def as_data_source(self, split):
    if self.read_error:
      raise self.read_error
    return [{'image': np.zeros((32, 32, 3), np.uint8), 'label': 1}] * 3


def _with_builder(monkeypatch, builder):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(tfds, 'builder', lambda name, data_dir=None: builder)
  return builder


def test_tfds_memory_is_checked_before_downloading(monkeypatch):
  builder = _with_builder(monkeypatch, FakeBuilder(prepared=False))
  monkeypatch.setattr(ip, 'available_memory', lambda: 2**27)
  with pytest.raises(ip.DatasetError, match=r'60000 images of 32x32x3 need 0.2 GiB in memory, '
                                            r'and 0.1 GiB is available'):
    ip.load_dataset('cifar10', 'tfds')
  assert builder.prepare_calls == 0  # refused before downloading anything
  monkeypatch.setattr(ip, 'available_memory', lambda: 2**34)
  data = ip.load_dataset('cifar10', 'tfds')
  assert builder.prepare_calls == 1 and data.train_images.shape == (3, 32, 32, 3)


@pytest.mark.parametrize('builder, expected', [
    (dict(prepared=True, read_error=ValueError("Unknown split 'trian'. Should be one of "
                                               "['test', 'train'].")),
     r"cannot read cifar10 splits train, test from /data/cifar10/3.0.2 \(ValueError: Unknown "
     r"split 'trian'.*--config.train_split"),
    (dict(prepared=True, read_error=NotImplementedError('Random access data source for file '
                                                        'format FileFormat.TFRECORD')),
     r'\(NotImplementedError: Random access data source for file format FileFormat.TFRECORD\)'),
    (dict(prepared=False, prepare_error=ModuleNotFoundError("No module named 'tensorflow'")),
     r"cifar10 is not prepared in /data/cifar10/3.0.2, and preparing it needs TensorFlow "
     r"\(No module named 'tensorflow'\): pip install -e '.\[tfds\]'"),
    (dict(prepared=False, prepare_error=OSError('Name or service not known'), sizes=None),
     r'could not download and prepare cifar10 \(OSError: Name or service not known\); check '
     'the internet connection'),
])
def test_tfds_errors_are_passed_on_with_their_cause(monkeypatch, builder, expected):
  _with_builder(monkeypatch, FakeBuilder(**builder))
  with pytest.raises(ip.DatasetError, match=expected):
    ip.load_dataset('cifar10', 'tfds')
