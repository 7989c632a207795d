"""gnet_jax.state: building the model, optimizer and initial state from a config."""

from typing import Any

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from configs import default, quickstart
from gnet_jax import checkpoint, config as config_lib, input_pipeline, models, state
from gnet_jax.errors import CheckpointError

SPEC = input_pipeline.dataset_spec('fashion_mnist')


def trunk(params):
  return {k: v for k, v in params.items() if not k.startswith('aux')}


def test_trunk_init_does_not_depend_on_aux_heads():
  plain = state.init_params(models.GoogLeNet(), 7, (28, 28, 1))
  with_aux = state.init_params(models.GoogLeNet(aux_heads=True), 7, (28, 28, 1))
  assert {'aux1', 'aux2'} <= set(with_aux)
  chex.assert_trees_all_equal(plain, trunk(with_aux))


def test_init_depends_on_seed_and_path_only():
  a = state.init_params(models.GoogLeNet(), 0, (96, 96, 1))
  again = state.init_params(models.GoogLeNet(), 0, (28, 28, 1))  # input size changes no shape
  chex.assert_trees_all_equal(a, again)
  other = state.init_params(models.GoogLeNet(), 1, (28, 28, 1))
  assert not np.array_equal(a['b1']['conv']['kernel'], other['b1']['conv']['kernel'])
  # Two leaves of the same shape get different values (seeded by their path).
  p = a['b4']
  assert not np.array_equal(p['inception2']['p4_2']['kernel'][:, :, :1],
                            p['inception3']['p4_2']['kernel'][:, :, :1])


def test_init_traces_a_model_once_per_image_shape(monkeypatch):
  """The traced shapes are kept per (model, image shape): equal models share them, another
  shape or model is traced afresh, and each call still gets new arrays."""
  traced = []
  real_eval_shape = jax.eval_shape
  monkeypatch.setattr(jax, 'eval_shape', lambda *a, **k: traced.append(1) or real_eval_shape(*a, **k))
  state._memoised_variable_shapes.cache_clear()
  first = state.init_params(models.GoogLeNet(num_classes=7), 0, (8, 8, 1))
  again = state.init_params(models.GoogLeNet(num_classes=7), 0, (8, 8, 1))  # an equal model
  assert len(traced) == 1
  chex.assert_trees_all_equal(first, again)
  assert first['head']['kernel'] is not again['head']['kernel']
  state.init_params(models.GoogLeNet(num_classes=7), 0, (9, 9, 1))
  state.init_params(models.GoogLeNet(num_classes=5), 0, (8, 8, 1))
  assert len(traced) == 3
  listed = ListWidths(widths=[3])  # unhashable: traced every time, as before
  assert state.init_params(listed, 0, (4, 4, 1))['Dense_0']['kernel'].shape == (1, 3)
  state.init_params(listed, 0, (4, 4, 1))
  assert len(traced) == 5


class ListWidths(nn.Module):
  widths: Any

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.widths[0])(x)


def test_xavier_uniform_bounds_and_zero_biases():
  params = state.init_params(models.GoogLeNet(), 0, (28, 28, 1))
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if path[-1].key == 'bias':
      assert not np.any(leaf), jax.tree_util.keystr(path)
      continue
    receptive = np.prod(leaf.shape[:-2])
    bound = np.sqrt(6 / (receptive * (leaf.shape[-2] + leaf.shape[-1])))
    assert np.abs(leaf).max() <= bound
    if leaf.size >= 1000:  # enough samples to fill the interval and match its std
      assert np.abs(leaf).max() > 0.95 * bound
      np.testing.assert_allclose(leaf.std(), bound / np.sqrt(3), rtol=0.1)


def test_torch_bias_init_is_uniform_in_one_over_sqrt_fan_in():
  zeros = state.init_params(models.GoogLeNet(), 0, (28, 28, 1))
  params = state.init_params(models.GoogLeNet(), 0, (28, 28, 1), bias_init='torch')
  kernels = {jax.tree_util.keystr(p[:-1]): leaf
             for p, leaf in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == 'kernel'}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if path[-1].key != 'bias':
      continue
    fan_in = np.prod(kernels[jax.tree_util.keystr(path[:-1])].shape[:-1])
    assert np.abs(leaf).max() <= 1 / np.sqrt(fan_in)
    if leaf.size >= 256:
      assert np.abs(leaf).max() > 0.9 / np.sqrt(fan_in)
  # Weights are the same draws as with zero biases.
  kernel_of = lambda t: [leaf for p, leaf in jax.tree_util.tree_leaves_with_path(t)
                         if p[-1].key == 'kernel']
  chex.assert_trees_all_equal(kernel_of(zeros), kernel_of(params))


def test_build_takes_classes_and_channels_from_the_dataset():
  config = quickstart.get_config()
  model, tx, host = state.build(config)
  assert model.num_classes == SPEC.num_classes and model.aux_heads
  chex.assert_shape(host.params['b1']['conv']['kernel'], (7, 7, SPEC.image_shape[-1], 64))
  chex.assert_shape(host.params['head']['kernel'], (1024, 10))
  assert int(host.step) == 0 and set(host.metrics) == set(state.zero_metrics())
  assert isinstance(host.params['head']['bias'], np.ndarray)  # built on the host
  chex.assert_trees_all_equal_structs(host.opt_state, tx.init(host.params))


def test_optimizers():
  config = default.get_config()
  params = {'w': np.ones(3, np.float32)}
  grads = {'w': np.full(3, 2.0, np.float32)}
  updates, _ = state.create_optimizer(config).update(grads, state.create_optimizer(config)
                                                     .init(params), params)
  np.testing.assert_allclose(updates['w'], -0.2)  # plain SGD at 0.1
  config.optimizer = 'adam'
  assert isinstance(state.create_optimizer(config), optax.GradientTransformation)


def test_lookup_tables_cover_exactly_the_allowed_names():
  """config.RULES is the one list of allowed names; the factory's tables map each to a thing."""
  assert set(state.OPTIMIZERS) == set(config_lib.choices('optimizer'))
  assert set(state.DTYPES) == set(config_lib.choices('dtype'))
  assert set(input_pipeline.SPECS) == set(config_lib.LOCAL_DATASETS) - {'image_folder'}


def test_load_checkpoint_reads_an_older_config_with_defaults(tmp_path):
  """A checkpoint saved before some keys existed loads with those keys as they were then."""
  config = quickstart.get_config()
  host = state.build(config)[2]
  older = {k: v for k, v in config.to_dict().items()
           if k not in ('bias_init', 'kernels', 'compilation_cache')}
  manager = checkpoint.open_manager(tmp_path)
  checkpoint.save(manager, 0, host, older)
  manager.wait_until_finished()
  manager.close()
  restored, saved, step, spec = state.load_checkpoint(tmp_path)
  # The missing keys read as the run ran before they existed (config.BEFORE_KEY_EXISTED).
  assert step == 0 and saved.to_dict() == {**config.to_dict(), 'compilation_cache': 'off'}
  chex.assert_trees_all_equal(restored.params, host.params)


def _save_without_spec(workdir, config, damage=None):
  """A checkpoint whose data set item is missing (``damage=None``) or unreadable."""
  manager = checkpoint.open_manager(workdir)
  spec = None if damage is None else {'name': config['dataset'], 'image_shape': [8, 8, 3],
                                      'class_names': ['a', 'b'], 'normalization': None}
  checkpoint.save(manager, 0, {'w': np.zeros(2, np.float32)}, config, spec)
  manager.wait_until_finished()
  manager.close()
  if damage is not None:
    for f in (workdir / 'checkpoints' / '0' / 'dataset').rglob('*'):
      if f.is_file():
        f.write_text(damage)


@pytest.mark.parametrize('damage', [None, '{"name": "image_folder"', '{"name": "x"}'])
def test_read_run_without_a_readable_spec(tmp_path, damage):
  """The MNIST family falls back on its fixed spec; any other data set is a clear error."""
  mnist = quickstart.get_config().to_dict()
  _save_without_spec(tmp_path / 'mnist', mnist, damage)
  assert state.read_run(tmp_path / 'mnist')[1] == SPEC
  folder = {**mnist, 'dataset': 'image_folder', 'data_dir': str(tmp_path)}
  _save_without_spec(tmp_path / 'folder', folder, damage)
  with pytest.raises(CheckpointError, match=r"data set description \(its classes and image "
                                            r"shape\) is missing or damaged.*--step"):
    state.read_run(tmp_path / 'folder')
  normalized = {**mnist, 'normalize': True}  # the fixed spec lacks the run's statistics
  _save_without_spec(tmp_path / 'normalized', normalized, damage)
  with pytest.raises(CheckpointError, match='missing or damaged'):
    state.read_run(tmp_path / 'normalized')


def test_a_config_lacking_a_key_every_checkpoint_saves_is_damaged(tmp_path):
  older = {k: v for k, v in quickstart.get_config().to_dict().items() if k != 'learning_rate'}
  _save_without_spec(tmp_path, older)
  with pytest.raises(CheckpointError, match='no readable checkpoint'):
    state.read_run(tmp_path)
