"""``python -m gnet_jax.predict``: image conversion, top-3 output, --json, --invert, clear errors.

The checkpoint is an untrained step-0 GoogLeNet (quickstart config, written
with ``checkpoint.save_state``): the plumbing is what is tested, not accuracy.
Every model call predicts the same two images, so the whole module compiles
one forward pass (the persistent compilation cache serves the repeats).
"""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_images

from gnet_jax import checkpoint, predict, state as state_lib
from gnet_jax.input_pipeline import dataset_spec

NAMES = dataset_spec('fashion_mnist').class_names


@pytest.fixture(scope='module')
def workdir(quickstart_checkpoint):
  return quickstart_checkpoint


@pytest.fixture(scope='module')
def pngs(tmp_path_factory):
  """A dataset-like image (light on dark) and the same image dark on light."""
  folder = tmp_path_factory.mktemp('pngs')
  images, _ = make_images(1, seed=3)
  light, dark = folder / 'light.png', folder / 'dark.png'
  Image.fromarray(images[0], 'L').save(light)
  Image.fromarray(255 - images[0], 'L').save(dark)
  return images[0], light, dark


@pytest.fixture(scope='module')
def results(workdir, pngs):
  _, light, dark = pngs
  return predict.predict_images(workdir, [light, dark])


def test_top3_are_class_names_with_sorted_probabilities(results, pngs):
  assert [r['path'] for r in results] == [str(pngs[1]), str(pngs[2])]
  for r in results:
    assert r['step'] == 0
    assert len(r['top']) == 3
    probs = [t['probability'] for t in r['top']]
    assert probs == sorted(probs, reverse=True)
    assert all(0 < p <= 1 for p in probs)
    assert sum(probs) <= 1 + 1e-6
    for t in r['top']:
      assert t['name'] == NAMES[t['class']]
    assert len({t['class'] for t in r['top']}) == 3


def test_all_probabilities_sum_to_one(workdir, pngs):
  config = checkpoint.read_newest_config(workdir)
  host, _, _, _ = state_lib.load_checkpoint(workdir)
  model = state_lib.create_model(config, dataset_spec(config.dataset))
  images = np.stack([pngs[0], 255 - pngs[0]])[..., None]
  probs = predict.make_predict_fn(model, host.params, config.image_size)(images)
  assert probs.shape == (2, 10)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert (probs > 0).all()


def test_dark_on_light_is_inverted_automatically(results):
  light, dark = results
  assert (light['inverted'], dark['inverted']) == (False, True)
  assert light['top'] == dark['top']  # inverted back, it is the same image


def test_invert_no_keeps_the_image(workdir, pngs):
  _, light, dark = pngs
  light_r, dark_r = predict.predict_images(workdir, [light, dark], invert='no')
  assert (light_r['inverted'], dark_r['inverted']) == (False, False)
  assert dark_r['top'] != light_r['top']
  assert predict.load_image(dark, invert='no')[0].max() == 255 - pngs[0].min()


def test_load_image_matches_the_dataset(pngs):
  image, light, dark = pngs
  for path, invert in ((light, 'auto'), (dark, 'auto'), (light, 'no'), (dark, 'yes')):
    pixels, _ = predict.load_image(path, invert=invert)
    assert pixels.dtype == np.uint8 and pixels.shape == (28, 28, 1)
    np.testing.assert_array_equal(pixels[..., 0], image)
  assert predict.load_image(light, invert='yes')[1] is True


def test_photo_is_fitted_keeping_its_aspect_and_padded_with_background(tmp_path):
  # A wide RGB JPEG: dark bar on white paper, twice as wide as high.
  photo = np.full((60, 120, 3), 250, np.uint8)
  photo[20:40, 20:100] = 10
  path = tmp_path / 'photo.jpg'
  Image.fromarray(photo, 'RGB').save(path, quality=95)
  pixels, inverted = predict.load_image(path)
  assert inverted and pixels.shape == (28, 28, 1)
  rows = pixels[..., 0].mean(axis=1)
  assert rows[:7].max() < 20 and rows[-7:].max() < 20  # padding: the (inverted) background
  assert pixels[14, 5:23, 0].min() > 200  # the bar, light now, not stretched to the top


def test_transparent_drawing_is_put_on_white_then_inverted(tmp_path):
  canvas = np.zeros((40, 40, 4), np.uint8)  # fully transparent
  canvas[10:30, 18:22] = (0, 0, 0, 255)  # a black stroke
  path = tmp_path / 'drawing.png'
  Image.fromarray(canvas, 'RGBA').save(path)
  pixels, inverted = predict.load_image(path)
  assert inverted
  assert pixels[0, 0, 0] == 0 and pixels[14, 14, 0] == 255


def test_16_bit_png_is_scaled_not_clipped(tmp_path, pngs):
  path = tmp_path / 'wide.png'
  Image.fromarray(pngs[0].astype(np.uint16) * 257).save(path)
  assert Image.open(path).mode.startswith('I')
  pixels, inverted = predict.load_image(path)
  assert not inverted
  np.testing.assert_array_equal(pixels[..., 0], pngs[0])


def test_16_bit_values_below_256_stay_dark(tmp_path):
  path = tmp_path / 'dim.png'
  Image.fromarray(np.full((28, 28), 255, np.uint16)).save(path)  # 255 of 65535: near black
  pixels, inverted = predict.load_image(path, invert='no')
  assert not inverted and pixels.max() == 1


def test_invert_is_refused_for_colour_runs_not_ignored(tmp_path):
  from gnet_jax.errors import InputError
  from gnet_jax.input_pipeline import DatasetSpec
  spec = DatasetSpec('image_folder', (8, 8, 3), ('a', 'b'))
  path = tmp_path / 'red.png'
  Image.fromarray(np.full((8, 8, 3), (200, 0, 0), np.uint8)).save(path)
  pixels, inverted = predict.load_for(spec, path)
  assert pixels.shape == (8, 8, 3) and pixels[0, 0, 0] == 200 and not inverted
  for invert in ('yes', 'no'):
    with pytest.raises(InputError, match=f'--invert {invert} applies to grey runs'):
      predict.load_for(spec, path, invert)


def test_one_reader_opens_every_file(tmp_path, monkeypatch, pngs):
  """predict and the image folders both open files through image_folder.read_image."""
  from gnet_jax import image_folder
  from gnet_jax.input_pipeline import DatasetSpec
  opened = []
  read = image_folder.read_image
  monkeypatch.setattr(image_folder, 'read_image',
                      lambda path, *a, **k: opened.append(path) or read(path, *a, **k))
  predict.load_image(pngs[1])
  predict.load_for(DatasetSpec('image_folder', (8, 8, 3), ('a', 'b')), pngs[1])
  image_folder.load_rgb(pngs[2], 8)
  assert opened == [pngs[1], pngs[1], pngs[2]]


def test_cli_prints_top3(workdir, pngs, capsys):
  _, light, dark = pngs
  assert predict.main(['--workdir', str(workdir), str(light), str(dark)]) == 0
  out = capsys.readouterr().out
  assert 'checkpoint: step 0 in' in out
  assert f'{dark} (inverted: dark on light)' in out
  assert sum(line.startswith('  1. ') for line in out.splitlines()) == 2
  assert any(name in out for name in NAMES) and '%' in out


def test_cli_json(workdir, pngs, capsys, results):
  _, light, dark = pngs
  assert predict.main(['--workdir', str(workdir), '--json', str(light), str(dark)]) == 0
  doc = json.loads(capsys.readouterr().out)
  assert [d['path'] for d in doc] == [str(light), str(dark)]
  assert [d['inverted'] for d in doc] == [False, True]
  assert [[t['class'] for t in d['top']] for d in doc] == [
      [t['class'] for t in r['top']] for r in results]
  assert set(doc[0]['top'][0]) == {'class', 'name', 'probability'}


def _error(capsys, argv):
  code = predict.main(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith('error: ') and len(err.strip().splitlines()) == 1, err
  assert 'Traceback' not in err
  return err


def test_text_file_named_png_is_a_clear_error(workdir, tmp_path, capsys):
  fake = tmp_path / 'x.png'
  fake.write_text('not an image\n')
  err = _error(capsys, ['--workdir', str(workdir), str(fake)])
  assert str(fake) in err and 'not an image' in err


def test_missing_path_is_a_clear_error(workdir, tmp_path, capsys, pngs):
  missing = tmp_path / 'nope.png'
  err = _error(capsys, ['--workdir', str(workdir), str(pngs[1]), str(missing)])
  assert f'{missing}: no such file' in err


def test_folder_is_a_clear_error(workdir, tmp_path, capsys):
  err = _error(capsys, ['--workdir', str(workdir), str(tmp_path)])
  assert 'is a folder' in err


def test_workdir_without_checkpoints_is_a_clear_error(tmp_path, capsys, pngs):
  empty = tmp_path / 'empty'
  empty.mkdir()
  err = _error(capsys, ['--workdir', str(empty), str(pngs[1])])
  assert 'no checkpoints in' in err and 'train first' in err


def test_missing_step_is_a_clear_error(workdir, capsys, pngs):
  err = _error(capsys, ['--workdir', str(workdir), '--step', '7', str(pngs[1])])
  assert 'no checkpoint for step 7' in err and 'available steps: 0' in err


def test_bad_invert_value_is_refused(workdir, pngs, capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(['--workdir', str(workdir), '--invert', 'maybe', str(pngs[1])])
  assert e.value.code == 2
  assert "invalid choice: 'maybe'" in capsys.readouterr().err
