"""``model=inception_v1`` in training: BatchNorm statistics through the step, devices and checkpoints.

torchvision's GoogLeNet runs from 15x15; these tests feed it 32x32 RGB
pictures (``image_folders``), batch 4, one to three steps, so that each
compiled step is shared by the tests of this module (module-scoped fixtures).
"""

from __future__ import annotations

import functools
import os
import signal

import chex
import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from gnet_jax import checkpoint, inception_v1, input_pipeline, parallel, preemption
from gnet_jax import state as state_lib, train
import image_folders

SIZE, BATCH = 32, 4
SPEC = input_pipeline.DatasetSpec('image_folder', (SIZE, SIZE, 3), image_folders.CLASSES)


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.update(model='inception_v1', image_size=SIZE, batch_size=BATCH, learning_rate=0.05,
                momentum=0.9, aux_weight=0.3, parallelism='none', progress=False,
                log_every_steps=0, compilation_cache='off')
  config.update(overrides)
  return config


def batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, len(image_folders.CLASSES), n * BATCH)
  images = np.stack([image_folders.picture(image_folders.CLASSES[k], rng, (SIZE, SIZE))
                     for k in labels])
  return [{'image': images[i * BATCH:(i + 1) * BATCH],
           'label': labels[i * BATCH:(i + 1) * BATCH].astype(np.int32)} for i in range(n)]


@functools.lru_cache(maxsize=None)
def built(**overrides):
  config = make_config(**overrides)
  model, tx = state_lib.create_model(config, SPEC), state_lib.create_optimizer(config)
  return config, model, tx, state_lib.create_train_state(config, SPEC, model, tx)


@functools.lru_cache(maxsize=None)
def stepper(mode: str, num_devices: int, **overrides):
  """The runner and its compiled train step, once per layout and config."""
  config, model, tx, _ = built(**overrides)
  runner = parallel.make_runner(ml_collections.ConfigDict(
      {'num_devices': num_devices, 'parallelism': mode, 'batch_size': BATCH}))
  return runner, train.make_train_step(runner, model, tx, config, SPEC)


def run_steps(mode: str, num_devices: int, steps: int = 2, **overrides) -> state_lib.TrainState:
  """Host state after ``steps`` train steps under ``mode`` on ``num_devices`` CPU devices."""
  runner, step = stepper(mode, num_devices, **overrides)
  state = runner.put_state(built(**overrides)[3])
  for batch in batches(steps):
    state = step(state, runner.put_batch(batch))
  return runner.to_host(state)


@pytest.fixture(scope='module')
def one_device():
  return run_steps('none', 1)


# ----------------------------------------------------------------------------- model and init


def test_config_builds_inception_v1_initialised_as_torchvision():
  config, model, _, state = built()
  assert isinstance(model, inception_v1.InceptionV1)
  assert (model.num_classes, model.aux_logits, model.transform_input) == (3, True, False)
  kernels = {jax.tree_util.keystr(p): v for p, v in
             jax.tree_util.tree_flatten_with_path(state.params)[0] if p[-1].key == 'kernel'}
  everything = np.concatenate([v.ravel() for v in kernels.values()])
  assert abs(everything.std() - 0.01) < 1e-4 and abs(everything.mean()) < 1e-4
  bn = state.params['inception4a']['branch2_1']['bn']
  assert np.all(bn['scale'] == 1) and np.all(bn['bias'] == 0)
  stats = state.batch_stats['aux1']['conv']['bn']
  assert np.all(stats['mean'] == 0) and np.all(stats['var'] == 1)
  assert np.all(state.params['fc']['bias'] == 0)  # bias_init zeros
  # Seeded by path: the backbone starts the same with or without the aux heads.
  without_aux = built(aux_weight=0.0)[3]
  assert 'aux1' not in without_aux.params
  chex.assert_trees_all_equal(without_aux.params['inception5b'], state.params['inception5b'])


def test_d2l_stays_the_default_without_statistics():
  config = default.get_config()
  assert config.model == 'd2l' and not config.transform_input
  spec = input_pipeline.dataset_spec('fashion_mnist')
  config.image_size = 28
  model = state_lib.create_model(config, spec)
  assert not isinstance(model, inception_v1.InceptionV1)
  assert state_lib.create_train_state(config, spec, model,
                                      state_lib.create_optimizer(config)).batch_stats == {}


def test_transform_input_needs_rgb_and_inception_v1():
  from gnet_jax import config as config_lib
  from gnet_jax.errors import ConfigError
  grey = input_pipeline.dataset_spec('fashion_mnist')
  with pytest.raises(ConfigError, match='needs RGB images'):
    state_lib.create_model(make_config(transform_input=True), grey)
  bad = default.get_config()
  bad.transform_input = True
  with pytest.raises(ConfigError, match='applies to inception_v1'):
    config_lib.validate(bad)
  assert state_lib.create_model(make_config(transform_input=True), SPEC).transform_input


# ----------------------------------------------------------------------------- the step


def test_train_step_updates_the_running_statistics(one_device):
  start = built()[3]
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), start.batch_stats,
                       one_device.batch_stats)
  assert all(jax.tree.leaves(moved)), 'every BatchNorm (aux heads too) updates its statistics'
  assert int(one_device.step) == 2


def test_evaluation_uses_the_running_statistics_without_changing_them(one_device):
  config, model, _, _ = built()
  runner = parallel.make_runner(ml_collections.ConfigDict(
      {'num_devices': 1, 'parallelism': 'none', 'batch_size': BATCH}))
  eval_fn = train.compile_eval(runner, model, SIZE, SPEC)
  images = np.concatenate([b['image'] for b in batches(2)])
  labels = np.concatenate([b['label'] for b in batches(2)])
  result = train.evaluate(runner, eval_fn, runner.put_state(one_device.variables), images,
                          labels, BATCH)
  logits = model.apply(one_device.variables, input_pipeline.preprocess(images, SIZE))
  expected = float(np.mean(train.cross_entropy(logits, labels)))
  np.testing.assert_allclose(result['loss'], expected, rtol=1e-5)
  # Other statistics, other logits: evaluation reads them.
  fresh = {'params': one_device.params, 'batch_stats': built()[3].batch_stats}
  assert not np.allclose(model.apply(fresh, input_pipeline.preprocess(images, SIZE)), logits)


@pytest.mark.parametrize('mode', ['pmap', 'sharded'])
def test_one_and_four_devices_agree_on_params_and_statistics(mode):
  """One step (one example per device: under pmap BatchNorm must pool the devices' moments).

  To float rounding, measured against how far the step moved each leaf: the
  gradient reaches conv1 back through 60 BatchNorms over maps of four values
  per channel (1x1 at 32x32), which amplify a summation order's last bits to
  ~3e-4 of the update; a BatchNorm that saw one device's example alone would
  be off by the whole update.
  """
  start = built()[3]
  one, four = run_steps('none', 1, steps=1), run_steps(mode, 4, steps=1)
  for name in ('params', 'batch_stats'):
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), getattr(start, name),
                         getattr(one, name))
    off = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), getattr(four, name),
                       getattr(one, name))
    assert all(m > 0 for m in jax.tree.leaves(moved)), name
    worst = max(jax.tree.leaves(jax.tree.map(lambda o, m: o / m, off, moved)))
    assert worst < 2e-3, (name, worst)
  chex.assert_trees_all_close(four.metrics, one.metrics, rtol=1e-5)


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return image_folders.make_folder(tmp_path_factory.mktemp('pictures'),
                                   {'train': 4, 'test': 2})


def loop_config(folder, **overrides):
  return make_config(dataset='image_folder', data_dir=str(folder), num_epochs=2,
                     checkpoint_every_steps=1, max_checkpoints=0, **overrides)


@pytest.fixture(scope='module')
def uninterrupted(folder, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('whole')
  train.train_and_evaluate(loop_config(folder), workdir)
  return workdir


def final_state(workdir):
  return state_lib.load_checkpoint(workdir).state


def test_resume_with_batch_stats_is_exact(folder, uninterrupted, tmp_path):
  config = loop_config(folder)
  sigterm_at_4 = lambda step: step == 4 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
  with pytest.raises(preemption.Interrupted):  # mid-epoch: 3 steps per epoch
    train.train_and_evaluate(config, tmp_path, after_step=sigterm_at_4)
  assert checkpoint.checkpoint_dir(tmp_path).joinpath('4').is_dir()
  train.train_and_evaluate(config, tmp_path)
  resumed, whole = final_state(tmp_path), final_state(uninterrupted)
  assert int(resumed.step) == int(whole.step) == 6
  assert jax.tree.leaves(whole.batch_stats)
  chex.assert_trees_all_equal(resumed, whole)  # params, statistics, optimizer, rng: bitwise
