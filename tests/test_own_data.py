"""Your own data: image folders and tensorflow-datasets sets through the real loop and commands.

In-process runs of ``train_and_evaluate`` on TinyNet cover schedules,
augmentation and normalisation (exact resume, independence of the device
count, the spec saved with the checkpoint); one end-to-end ``train.py`` run of
GoogLeNet on a generated three-class folder, then ``predict``, checks what a
user does; a broken folder is refused with one error line.
"""

import json
import os
import signal

import chex
import jax
import numpy as np
import optax
import pytest

from conftest import TinyNet, run_python
from configs import default
from gnet_jax import checkpoint, input_pipeline, preemption, state as state_lib, train
from gnet_jax.errors import DatasetError
from image_folders import CLASSES, folder_config, make_folder

TIMING_KEYS = ('examples_per_sec', 'seconds')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('own') / 'shapes', {'train': 16, 'test': 6})


def run(config, workdir, after_step=None):
  return train.train_and_evaluate(config, workdir, model=TinyNet(num_classes=3),
                                  after_step=after_step)


def history(workdir, name='metrics.jsonl'):
  rows = [json.loads(line) for line in (workdir / name).read_text().splitlines()]
  return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def final_state(workdir, config):
  spec = input_pipeline.DatasetSpec.from_json(checkpoint.read_dataset_spec(workdir))
  model = TinyNet(num_classes=spec.num_classes)
  target = state_lib.create_train_state(config, spec, model, state_lib.create_optimizer(config))
  return checkpoint.restore_from_workdir(workdir, target)[0]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, folder):
  """An uninterrupted 2-epoch run with a warmup-cosine schedule, augmentation and normalisation."""
  workdir = tmp_path_factory.mktemp('reference')
  run(folder_config(folder), workdir)
  return workdir


def test_folder_run_saves_its_data_identity(reference, folder):
  config, spec = state_lib.read_run(reference)
  assert spec.name == 'image_folder' and spec.class_names == CLASSES
  assert spec.image_shape == (16, 16, 3) and config.dataset == 'image_folder'
  data = input_pipeline.load_dataset('image_folder', data_dir=str(folder), image_size=16)
  mean, std = input_pipeline.channel_stats(data.train_images)
  np.testing.assert_allclose(spec.normalization[0], mean)
  np.testing.assert_allclose(spec.normalization[1], std)
  assert len(mean) == 3 and all(0.1 < m < 0.9 for m in mean) and all(s > 0.05 for s in std)


def test_learning_rate_follows_the_schedule_in_the_logs(reference, folder):
  config = folder_config(folder)
  schedule = state_lib.learning_rate_schedule(config, steps_per_epoch=6)
  points = history(reference, 'steps.jsonl')
  assert [p['step'] for p in points] == [2, 4, 6, 8, 10, 12]  # about 5 points per epoch
  for p in points:
    assert p['learning_rate'] == pytest.approx(float(schedule(p['step'] - 1)), rel=1e-6)
  rates = [p['learning_rate'] for p in points]
  assert rates[0] < 0.5 * max(rates) and max(rates) > 0.9e-3  # warmup
  assert rates[-1] < 0.1 * max(rates)  # the last step's rate; the cosine reaches 0 after it
  assert history(reference)[-1]['learning_rate'] == rates[-1]


def test_schedule_augmentation_and_normalisation_resume_exactly(reference, folder, tmp_path):
  config = folder_config(folder)
  workdir = tmp_path / 'stopped'
  sigterm_at_8 = lambda step: step == 8 and os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(preemption.Interrupted):
    run(config, workdir, after_step=sigterm_at_8)
  run(config, workdir)
  chex.assert_trees_all_equal(final_state(workdir, config), final_state(reference, config))
  assert history(workdir) == history(reference)
  assert history(workdir, 'steps.jsonl') == history(reference, 'steps.jsonl')


def test_augmentation_does_not_depend_on_the_device_count(folder, tmp_path):
  config = folder_config(folder, num_epochs=1, lr_schedule='constant')
  run(config, tmp_path / 'one')
  run(folder_config(folder, num_epochs=1, lr_schedule='constant', parallelism='pmap',
                    num_devices=4), tmp_path / 'four')
  one, four = final_state(tmp_path / 'one', config), final_state(tmp_path / 'four', config)
  chex.assert_trees_all_close(four.params, one.params, atol=2e-6, rtol=2e-5)
  without = tmp_path / 'no_augment'
  run(folder_config(folder, num_epochs=1, lr_schedule='constant', augment_crop='none',
                    augment_flip=False), without)
  assert float(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.abs(a - b).max(), final_state(without, config).params, one.params))[0]) > 1e-4


def test_resume_on_other_data_is_refused(reference, folder, tmp_path):
  import shutil
  other = shutil.copytree(folder, tmp_path / 'other')
  for split in ('train', 'test'):
    (other / split / 'square').rename(other / split / 'squares')
  workdir = shutil.copytree(reference, tmp_path / 'run')
  with pytest.raises(Exception, match=r"trained on other data \(class_names: \('circle', "
                                      r"'cross', 'square'\) in checkpoint"):
    run(folder_config(other, num_epochs=3), workdir)


def test_schedules():
  config = default.get_config()
  config.update(dict(lr_schedule='warmup_cosine', warmup_epochs=1.0, num_epochs=4,
                     learning_rate=0.4))
  cosine = state_lib.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.2)
  assert float(cosine(10)) == pytest.approx(0.4)
  assert float(cosine(25)) == pytest.approx(0.2, rel=1e-5)  # half way down the cosine
  assert float(cosine(40)) == pytest.approx(0.0, abs=1e-7)
  config.update(dict(lr_schedule='step', lr_decay_epochs=2, lr_decay_factor=0.5))
  steps = state_lib.learning_rate_schedule(config, steps_per_epoch=10)
  assert [float(steps(i)) for i in (0, 19, 20, 39, 40)] == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])


def test_book_recipe_optimizer_is_unchanged():
  """Constant rate, no weight decay: exactly optax.sgd(0.1), the state the book's runs saved."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  params = {'w': np.ones(3, np.float32)}
  tx = state_lib.create_optimizer(config, steps_per_epoch=468)
  ref = optax.sgd(0.1)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(ref.init(params))
  grads = {'w': np.full(3, 2.0, np.float32)}
  np.testing.assert_array_equal(tx.update(grads, tx.init(params), params)[0]['w'],
                                ref.update(grads, ref.init(params), params)[0]['w'])


@pytest.mark.parametrize('optimizer, expected', [('sgd', -0.1 * (2.0 + 0.5)),
                                                 ('adam', -0.1 * (1.0 + 0.5))])
def test_weight_decay(optimizer, expected):
  """SGD adds wd * param to the gradient; AdamW decays decoupled from Adam's normalised step."""
  config = default.get_config()
  config.update(dict(optimizer=optimizer, learning_rate=0.1, weight_decay=0.5))
  tx = state_lib.create_optimizer(config)
  params, grads = {'w': np.ones(2, np.float32)}, {'w': np.full(2, 2.0, np.float32)}
  np.testing.assert_allclose(tx.update(grads, tx.init(params), params)[0]['w'], expected,
                             rtol=1e-4)


# ----------------------------------------------------------------------------- tensorflow-datasets


def test_tfds_set_by_name_trains_with_its_classes(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = default.get_config()
  config.update(dict(dataset='cifar10', data_source='tfds', image_size=16, batch_size=4,
                     num_epochs=1, progress=False, parallelism='none', optimizer='adam',
                     learning_rate=1e-3, compilation_cache='off', normalize=True))
  with tfds.testing.mock_data(num_examples=12):
    summary = train.train_and_evaluate(config, tmp_path, model=TinyNet(num_classes=10))
  assert summary['epoch'] == 1 and np.isfinite(summary['train_loss'])
  _, spec = state_lib.read_run(tmp_path)
  assert spec.name == 'cifar10' and spec.image_shape == (32, 32, 3)
  assert len(spec.class_names) == 10 and spec.normalization is not None


def test_tfds_images_of_varying_size_are_fitted(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=5):
    data = input_pipeline.load_dataset('oxford_flowers102', 'tfds', image_size=20)
  assert data.train_images.shape == (5, 20, 20, 3) and data.spec.image_shape == (20, 20, 3)
  assert data.spec.num_classes == 102
  monkeypatch.setattr(input_pipeline, 'available_memory', lambda: 1000)
  with tfds.testing.mock_data(num_examples=5):
    with pytest.raises(DatasetError, match=r'10 images of 20x20x3 need 0.0 GiB in memory, and '
                                           r'0.0 GiB is available; use a slice of the splits'):
      input_pipeline.load_dataset('oxford_flowers102', 'tfds', image_size=20)


def test_a_set_without_class_labels_is_named():
  class Builder:
    class info:
      features = {'image': None, 'objects': None}
  with pytest.raises(DatasetError, match="coco is not an image classification set: .* it has "
                                         "image, objects"):
    input_pipeline._tfds_spec('coco', Builder)


# ----------------------------------------------------------------------------- train.py end to end


def test_train_py_learns_a_folder_and_predict_names_the_class(folder, tmp_path):
  workdir = tmp_path / 'run'
  # A decode cache of its own (XDG_CACHE_HOME), not the one this module's in-process runs fill.
  trained = run_python('train.py', '--config', 'configs/image_folder.py', '--workdir',
                       str(workdir), f'--config.data_dir={folder}', '--config.image_size=16',
                       '--config.batch_size=8', '--config.num_epochs=6',
                       XDG_CACHE_HOME=str(tmp_path / 'cache'))
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert f'data: image folder {folder} (decoded; 2 non-image files ignored)' in trained.stdout
  last = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])
  assert last['epoch'] == 6 and last['test_acc'] >= 0.9, trained.stdout
  image = folder / 'test' / 'cross' / 'cross_1.jpg'
  predicted = run_python('-m', 'gnet_jax.predict', '--workdir', str(workdir), '--json', str(image))
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  top = json.loads(predicted.stdout)[0]['top']
  assert top[0]['name'] == 'cross' and [t['name'] for t in top] != ['cross'] * 3


def test_train_py_refuses_a_broken_folder_with_one_line(tmp_path):
  root = make_folder(tmp_path / 'broken', {'train': 2, 'test': 1})
  (root / 'test' / 'square').rename(root / 'test' / 'squares')
  workdir = tmp_path / 'run'
  result = run_python('train.py', '--config', 'configs/image_folder.py', '--workdir', str(workdir),
                    f'--config.data_dir={root}')
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines == [f"error: {root}: train/ and test/ have different classes (only in train: "
                   f"['square']; only in test: ['squares']); give both splits the same class "
                   'folders'], result.stderr
  assert not workdir.exists()
