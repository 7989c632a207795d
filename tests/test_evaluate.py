"""``python -m gnet_jax.evaluate``'s prediction grid (``predictions.png``) and its examples.

The checkpoint is an untrained step-0 GoogLeNet (quickstart config, written
with ``checkpoint.save_state``): the plumbing is what is tested, not accuracy.
"""

import numpy as np
import pytest

from conftest import make_images, pixels_of_color, read_png

from gnet_jax import evaluate


@pytest.fixture(scope='module')
def workdir(quickstart_checkpoint):
  return quickstart_checkpoint


@pytest.fixture(scope='module')
def result(workdir):
  # More examples than the 40 test images: all of them, over two forward batches.
  return evaluate.evaluate_checkpoint(workdir, num_examples=64)


def test_examples_are_the_first_test_images_with_predictions(result, idx_dir):
  assert {'loss', 'accuracy', 'count', 'confusion', 'step', 'config', 'class_names',
          'examples'} <= set(result)
  examples = result['examples']
  images, labels = make_images(40, seed=1)  # conftest's test split
  np.testing.assert_array_equal(examples['images'][..., 0], images)
  np.testing.assert_array_equal(examples['labels'], labels)
  assert examples['predictions'].shape == (40,)
  assert ((examples['predictions'] >= 0) & (examples['predictions'] < 10)).all()


def test_example_predictions_agree_with_the_evaluation(result):
  # Over the whole split, the forward pass's predictions rebuild the eval step's confusion.
  examples = result['examples']
  confusion = np.zeros((10, 10), np.int64)
  np.add.at(confusion, (examples['labels'], examples['predictions']), 1)
  np.testing.assert_array_equal(confusion, result['confusion'])


def test_plot_predictions_writes_a_grid(tmp_path, result):
  examples = result['examples']
  labels = examples['labels'][:32]
  predictions = labels.copy()
  predictions[::5] = (predictions[::5] + 1) % 10  # 7 mistakes among 32, to mark in red
  path = tmp_path / 'predictions.png'
  fig = evaluate.plot_predictions(examples['images'][:32], labels, predictions,
                                  result['class_names'], 'fashion_mnist, step 0: the first 32',
                                  path)
  assert read_png(path).shape == (750, 1200, 3)  # 8 x 4 subplots of 1.5 x 1.75 in, at 100 dpi
  names = result['class_names']
  for i, ax in enumerate(fig.axes):  # each image under its own title, mistakes in red
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), examples['images'][i][..., 0])
    assert ax.get_title() == f'true: {names[labels[i]]}\npred: {names[predictions[i]]}'
    assert (ax.title.get_color() == 'red') == (i % 5 == 0)
  assert fig.get_suptitle().endswith('7 of 32 misclassified (red)')
  # The red frames reach the file: seven frames of red pixels, none when all are right.
  red = pixels_of_color(read_png(path), 'red', tolerance=60)
  evaluate.plot_predictions(examples['images'][:32], labels, labels, names, 'right', path)
  assert red > 7 * 1000 and pixels_of_color(read_png(path), 'red', tolerance=60) < 50


def test_plot_predictions_handles_a_partial_row(tmp_path, result):
  examples = result['examples']
  path = tmp_path / 'few.png'
  fig = evaluate.plot_predictions(examples['images'][:3], examples['labels'][:3],
                                  examples['predictions'][:3], result['class_names'], 'three',
                                  path)
  assert len(fig.axes) == 3  # one row of three, no empty cells
  pixels = read_png(path)
  assert pixels.shape == (225, 450, 3)  # 3 x 1 subplots of 1.5 x 1.75 in (+0.5 in), 100 dpi
  assert pixels.min() < 50 and pixels.max() > 200  # images drawn, not a blank canvas


def test_command_saves_predictions_beside_confusion(workdir, capsys):
  assert evaluate.main(['--workdir', str(workdir)]) == 0
  out = capsys.readouterr().out
  assert f'saved {workdir / "confusion.png"}' in out
  assert f'saved {workdir / "predictions.png"}' in out
  assert read_png(workdir / 'predictions.png').shape == (750, 1200, 3)  # the first 32 images
  confusion = read_png(workdir / 'confusion.png')
  assert confusion.shape == (600, 700, 3)  # 7 x 6 in at 100 dpi
  assert pixels_of_color(confusion, '#08306b', tolerance=30) > 100  # the largest count's cell


@pytest.mark.parametrize('saved_classes, saved_shape, named', [
    (('circle', 'cross', 'star'), (16, 16, 3), "class_names: ('circle', 'cross', 'star') in "
                                               "checkpoint, ('circle', 'cross', 'square') now"),
    (('circle', 'cross', 'square'), (16, 16, 1), 'image_shape: (16, 16, 1) in checkpoint, '
                                                 '(16, 16, 3) now'),
])
def test_other_data_is_refused_not_mislabelled(tmp_path, saved_classes, saved_shape, named):
  """An image folder whose classes (or image shape) differ from the run's: refused, as resume does.

  The check comes before the state is restored or anything compiled, so a tiny
  stand-in state is enough.
  """
  from configs import image_folder as image_folder_config
  from gnet_jax import checkpoint
  from gnet_jax.errors import CheckpointError
  from image_folders import make_folder

  folder = make_folder(tmp_path / 'folder', {'train': 1, 'test': 1})
  config = image_folder_config.get_config()
  config.data_dir, config.image_size = str(folder), 16
  manager = checkpoint.open_manager(tmp_path / 'run')
  checkpoint.save(manager, 0, {'w': np.zeros(2, np.float32)}, config,
                  {'name': 'image_folder', 'image_shape': list(saved_shape),
                   'class_names': list(saved_classes), 'normalization': None})
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(CheckpointError, match='was trained on other data') as e:
    evaluate.evaluate_checkpoint(tmp_path / 'run')
  assert named in str(e.value)
