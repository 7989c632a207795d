"""gnet_jax.image_folder: layout checks, decoding to RGB squares, the decode cache."""

import os
import shutil

import numpy as np
import pytest

from gnet_jax import image_folder
from gnet_jax.errors import DatasetError
from image_folders import CLASSES, make_folder, picture, save


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('folder') / 'shapes')


def test_scan_names_classes_sorted_and_counts_ignored_files(folder):
  listing = image_folder.scan(folder)
  assert listing.class_names == CLASSES
  assert len(listing.files['train']) == 36 and len(listing.files['test']) == 12
  assert listing.ignored == 2  # README.txt and .DS_Store
  labels = [label for path, label in listing.files['train']]
  assert labels == sorted(labels) and set(labels) == {0, 1, 2}
  for path, label in listing.files['test']:
    assert path.parent.name == CLASSES[label]


def test_load_makes_rgb_squares_and_caches_them(folder, tmp_path):
  listing = image_folder.scan(folder)
  arrays, cached = image_folder.load(listing, 16, cache_dir=tmp_path)
  assert not cached
  assert arrays['train_images'].shape == (36, 16, 16, 3)
  assert arrays['train_images'].dtype == np.uint8 and arrays['test_labels'].dtype == np.int32
  np.testing.assert_array_equal(arrays['test_labels'], [l for _, l in listing.files['test']])
  # Red, green and blue classes: the dominant channel of each image is its class's.
  dominant = arrays['train_images'].reshape(36, -1, 3).mean(1).argmax(-1)
  mono = np.asarray(['_' in p.name and int(p.stem.split('_')[1]) % 3 == 1 and p.suffix == '.png'
                     for p, _ in listing.files['train']])  # grey ('L') files have no colour
  np.testing.assert_array_equal(dominant[~mono], arrays['train_labels'][~mono])
  again, cached = image_folder.load(listing, 16, cache_dir=tmp_path)
  assert cached
  for key in arrays:
    np.testing.assert_array_equal(again[key], arrays[key])
  assert len(list(tmp_path.glob('*.npz'))) == 1


@pytest.mark.parametrize('damage', ['empty', 'cut_after_header', 'cut_in_half', 'cut_at_end',
                                    'flipped_byte', 'other_arrays'])
def test_damaged_cache_is_decoded_again_and_rewritten(folder, tmp_path, damage):
  listing = image_folder.scan(folder)
  fresh, _ = image_folder.load(listing, 8, cache_dir=tmp_path)
  cache = next(tmp_path.glob('*.npz'))
  data = cache.read_bytes()
  if damage == 'other_arrays':  # a readable file, but not this folder's arrays
    np.savez(cache, train_images=fresh['train_images'][:3])
  elif damage == 'flipped_byte':  # inside the first array's pixels: only the zip CRC can tell
    middle = data.index(b'\x93NUMPY') + 200
    cache.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
  else:
    cut = {'empty': 0, 'cut_after_header': 10, 'cut_in_half': len(data) // 2,
           'cut_at_end': len(data) - 30}[damage]
    cache.write_bytes(data[:cut])
  again, cached = image_folder.load(listing, 8, cache_dir=tmp_path)
  assert not cached
  for key in fresh:
    np.testing.assert_array_equal(again[key], fresh[key])
  assert cache.read_bytes() == data  # rewritten whole
  assert image_folder.load(listing, 8, cache_dir=tmp_path)[1]


def test_unwritable_cache_leaves_no_partial_file(folder, tmp_path, monkeypatch):
  def full_disk(file, **arrays):
    file.write(b'PK\x03\x04 half an archive')
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(image_folder.np, 'savez', full_disk)
  arrays, cached = image_folder.load(image_folder.scan(folder), 8, cache_dir=tmp_path)
  assert not cached and arrays['train_images'].shape == (36, 8, 8, 3)
  assert list(tmp_path.iterdir()) == []


def test_cache_follows_the_folder_and_the_size(folder, tmp_path):
  copy = shutil.copytree(folder, tmp_path / 'copy')
  listing = image_folder.scan(copy)
  key = image_folder.cache_key(listing, 16)
  assert image_folder.cache_key(listing, 24) != key
  victim = next(p for p, _ in listing.files['train'])
  os.utime(victim, ns=(0, 12345))
  assert image_folder.cache_key(image_folder.scan(copy), 16) != key


def test_load_rgb_converts_modes_and_keeps_aspect(tmp_path):
  rng = np.random.default_rng(0)
  wide = picture('circle', rng, (20, 60))
  wide[:, :20] = 0  # a black left third: a centre crop cuts it away
  for mode in ('RGB', 'L', 'RGBA'):
    out = image_folder.load_rgb(save(wide, tmp_path / f'w_{mode}.png', mode), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[:, :2].mean() > 40  # the black third was cropped, not squeezed in
  gif = image_folder.load_rgb(save(wide, tmp_path / 'w.gif'), 10)
  assert gif.shape == (10, 10, 3)
  sixteen = tmp_path / 'deep.png'
  from PIL import Image
  Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(sixteen)
  assert image_folder.load_rgb(sixteen, 4).min() == 255  # scaled, not clipped to 255 by luck


def _broken(tmp_path, what):
  root = make_folder(tmp_path / what, {'train': 2, 'test': 1})
  if what == 'no_train':
    shutil.rmtree(root / 'train')
  elif what == 'no_test':
    shutil.rmtree(root / 'test')
  elif what == 'empty_class':
    for p in (root / 'train' / 'cross').iterdir():
      p.unlink()
  elif what == 'class_mismatch':
    (root / 'test' / 'square').rename(root / 'test' / 'squares')
  elif what == 'single_class':
    for split in ('train', 'test'):
      for name in ('cross', 'square'):
        shutil.rmtree(root / split / name)
  elif what == 'no_images':
    for split in ('train', 'test'):
      shutil.rmtree(root / split)
      (root / split / 'circle').mkdir(parents=True)
      (root / split / 'circle' / 'notes.txt').write_text('x')
  return root


@pytest.mark.parametrize('what, message', [
    ('no_train', r'train is missing; an image folder needs train/ and test/'),
    ('no_test', r'test is missing'),
    ('empty_class', r'train/cross is an empty class folder'),
    ('class_mismatch', r"different classes \(only in train: \['square'\]; only in test: "
                       r"\['squares'\]\)"),
    ('single_class', r"a single class \('circle'\); a classifier needs at least two"),
    ('no_images', r'train holds no images'),
])
def test_broken_layouts_are_named(tmp_path, what, message):
  with pytest.raises(DatasetError, match=message):
    image_folder.scan(_broken(tmp_path, what))


def test_unreadable_image_is_named(tmp_path):
  root = make_folder(tmp_path / 'bad', {'train': 2, 'test': 1})
  bad = root / 'train' / 'cross' / 'broken.jpg'
  bad.write_bytes(b'not a jpeg at all')
  with pytest.raises(DatasetError, match=r'broken.jpg: not an image Pillow can read'):
    image_folder.load(image_folder.scan(root), 8, cache_dir=tmp_path / 'cache')
  assert not (tmp_path / 'cache').exists()  # nothing cached from a failed load


def test_sixteen_bit_images_are_scaled_by_their_bit_depth(tmp_path):
  """A 16-bit pixel of 200 is dark (200/65535), whatever the image's own maximum."""
  from PIL import Image
  dim = tmp_path / 'dim.png'  # every value <= 255: once read as if it were 8-bit
  Image.fromarray(np.array([[0, 200], [255, 128]], np.uint16)).save(dim)
  assert Image.open(dim).mode == 'I;16'
  assert image_folder.load_rgb(dim, 2).max() == 1  # 255 / 257 -> 1
  bright = tmp_path / 'bright.png'
  Image.fromarray(np.array([[512, 65535], [257 * 100, 0]], np.uint16)).save(bright)
  np.testing.assert_array_equal(image_folder.read_image(bright, 'L'), [[2, 255], [100, 0]])


def test_thirty_two_bit_images(tmp_path):
  """'I' (32-bit int) reads as 16-bit data when it fits; beyond 65535, and 'F', are refused."""
  from PIL import Image
  fits = tmp_path / 'fits.tif'
  Image.fromarray(np.array([[0, 200], [25700, 65535]], np.int32)).save(fits)
  assert Image.open(fits).mode == 'I'
  np.testing.assert_array_equal(image_folder.read_image(fits, 'L'), [[0, 1], [100, 255]])
  wide = tmp_path / 'wide.tif'
  Image.fromarray(np.array([[0, 70000]], np.int32)).save(wide)
  with pytest.raises(DatasetError, match=r'wide.tif: 32-bit pixel values up to 70000'):
    image_folder.read_image(wide, 'RGB')
  floats = tmp_path / 'floats.tif'
  Image.fromarray(np.array([[0.0, 0.5]], np.float32)).save(floats)
  with pytest.raises(DatasetError, match=r'floats.tif: 32-bit float pixels'):
    image_folder.read_image(floats, 'RGB')
