"""gnet_jax.config: every key's type and range, and the workdir, checked before any work."""

import os
import shutil
from collections import namedtuple

import jax
import ml_collections
import jax.numpy as jnp
import pytest

from configs import default, quickstart
from gnet_jax import cli, config as config_lib, models
from gnet_jax.errors import ConfigError, WorkdirError


def test_every_default_key_has_a_rule_and_passes():
  config = default.get_config()
  assert set(config.keys()) == set(config_lib.RULES)
  config_lib.validate(config)
  config_lib.validate(quickstart.get_config())


@pytest.mark.parametrize('key,value,allowed', [
    ('batch_size', 0, 'an integer >= 1'),
    ('batch_size', -5, 'an integer >= 1'),
    ('num_epochs', -1, 'an integer >= 1'),
    ('num_epochs', 0, 'an integer >= 1'),
    ('image_size', 0, f'an integer from {config_lib.MIN_IMAGE_SIZE} to 1024'),
    ('learning_rate', 0.0, 'a number > 0.0'),
    ('learning_rate', -0.1, 'a number > 0.0'),
    ('momentum', 1.5, 'a number >= 0.0 and <= 1.0'),
    ('eval_batch_size', -1, 'an integer >= 0'),
    ('train_examples', -2, 'an integer >= -1'),
    ('eval_examples', -3, 'an integer >= -1'),
    ('checkpoint_every_steps', -1, 'an integer >= 0'),
    ('max_checkpoints', -1, 'an integer >= 0'),
    ('aux_weight', -0.3, 'a number >= 0.0'),
    ('num_devices', -1, 'an integer >= 0'),
    ('num_processes', 0, 'an integer >= 1'),
    ('profile_steps', -1, 'an integer >= 0'),
    ('log_every_steps', -2, 'an integer >= -1'),
    ('seed', -1, 'an integer from 0 to 4294967295'),
    ('dtype', 'float16', "one of 'float32', 'bfloat16'"),
    ('kernels', 'fast', "one of 'auto', 'xla', 'custom'"),
    ('optimizer', 'rmsprop', "one of 'sgd', 'adam'"),
    ('parallelism', 'tpu', "one of 'auto', 'none', 'pmap', 'sharded'"),
    ('data_source', 'web', "one of 'auto', 'idx', 'tfds'"),
    ('bias_init', 'ones', "one of 'zeros', 'torch'"),
])
def test_out_of_range_values_name_key_value_and_allowed(key, value, allowed):
  config = default.get_config()
  config.unlock()[key] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config)
  assert str(e.value) == f'--config.{key}={value!r} is not allowed; {key} must be {allowed}'


def test_wrong_types_and_combinations():
  untyped = lambda **kw: ml_collections.ConfigDict({**default.get_config().to_dict(), **kw})
  config = untyped(batch_size=12.5)  # e.g. from a config file
  with pytest.raises(ConfigError, match='batch_size must be an integer'):
    config_lib.validate(config)
  config = untyped(progress='yes')
  with pytest.raises(ConfigError, match='progress must be True or False'):
    config_lib.validate(config)
  config = default.get_config()
  config.learning_rate = 1  # an int where a float is expected is fine
  config_lib.validate(config)
  config.train_examples = 0
  with pytest.raises(ConfigError, match='train_examples=0 leaves nothing to train on'):
    config_lib.validate(config)
  config = default.get_config()
  config.process_id, config.num_processes = 2, 2
  with pytest.raises(ConfigError, match='process_id=2 is not allowed with num_processes 2'):
    config_lib.validate(config)
  config = quickstart.get_config()
  config.momentum = 0.9
  with pytest.raises(ConfigError, match='momentum and nesterov apply to sgd only'):
    config_lib.validate(config)
  config = default.get_config().unlock()
  del config['kernels']
  with pytest.raises(ConfigError, match='config key kernels is missing'):
    config_lib.validate(config)


def _last_map_shape(model: models.GoogLeNet, size: int) -> tuple[int, ...]:
  """The shape of b4's output, the last map before the global pool (an abstract trace)."""
  x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  run = lambda p, x: model.apply(p, x, capture_intermediates=True, mutable=True)[1]
  return jax.eval_shape(run, params, x)['intermediates']['b4']['__call__'][0][0].shape


def test_min_image_size_is_the_true_minimum():
  """Every stage pads, so a 1x1 image reaches the classifier as a 1x1 map; 0 leaves no pixel."""
  size = config_lib.MIN_IMAGE_SIZE
  for aux in (False, True):
    model = models.GoogLeNet(aux_heads=aux)
    x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda p, x: model.apply(p, x, train=True), params, x)
    assert (out[0] if aux else out).shape == (2, 10)
  # The stock ops trace even an empty image, so the map itself shows the limit.
  assert _last_map_shape(models.GoogLeNet(kernels='xla'), size) == (2, 1, 1, 832)
  assert _last_map_shape(models.GoogLeNet(kernels='xla'), size - 1) == (2, 0, 0, 832)


def test_choices_and_defaults_come_from_the_one_table_and_file():
  assert config_lib.choices('kernels') == ('auto', 'xla', 'custom')
  assert config_lib.choices('data_source') == ('auto', 'idx', 'tfds')
  assert config_lib.default_config() == default.get_config()
  # An older checkpoint's config: the keys it lacks read as before they existed, the rest as saved.
  old = {k: v for k, v in quickstart.get_config().to_dict().items()
         if k not in ('bias_init', 'compilation_cache')}
  filled = config_lib.with_defaults(old)
  assert filled == {**quickstart.get_config().to_dict(), 'compilation_cache': 'off'}
  config_lib.validate(ml_collections.ConfigDict(filled))


# The keys of configs/default.py when checkpoints were first written (commit 6e34f5c).
FIRST_CHECKPOINT_KEYS = (
    'dataset', 'data_source', 'data_dir', 'image_size', 'train_examples', 'eval_examples',
    'aux_weight', 'dtype', 'learning_rate', 'momentum', 'nesterov', 'batch_size',
    'eval_batch_size', 'num_epochs', 'seed', 'parallelism', 'distributed', 'coordinator_address',
    'num_processes', 'process_id', 'checkpoint_every_steps', 'max_checkpoints', 'progress')


def test_an_old_checkpoint_reads_as_it_ran_not_with_todays_defaults(monkeypatch):
  """Keys a checkpoint saved stay as saved; keys it lacks get the value from before they existed.

  Today's defaults may change (here: normalisation, a schedule and PyTorch's
  bias init turned on, Adam); an old run must not change with them.
  """
  changed = default.get_config()
  changed.update(dict(normalize=True, lr_schedule='warmup_cosine', bias_init='torch',
                      optimizer='adam', learning_rate=0.5, augment_flip=True))
  monkeypatch.setattr(config_lib, 'default_config', lambda: changed)
  first = {k: v for k, v in default.get_config().to_dict().items() if k in FIRST_CHECKPOINT_KEYS}
  filled = config_lib.with_defaults(first)
  assert set(filled) == set(config_lib.RULES)  # every key added since is in the table
  config_lib.validate(ml_collections.ConfigDict(filled))
  assert {k: filled[k] for k in ('normalize', 'lr_schedule', 'bias_init', 'optimizer',
                                 'augment_flip', 'augment_crop', 'weight_decay')} == {
      'normalize': False, 'lr_schedule': 'constant', 'bias_init': 'zeros', 'optimizer': 'sgd',
      'augment_flip': False, 'augment_crop': 'none', 'weight_decay': 0.0}
  assert filled['learning_rate'] == 0.1  # saved: read as saved
  # A key every checkpoint saves is not made up when missing: the config is damaged.
  assert 'learning_rate' not in config_lib.with_defaults(
      {k: v for k, v in first.items() if k != 'learning_rate'})


def test_workdir_checks(tmp_path, monkeypatch):
  assert config_lib.check_workdir(tmp_path / 'new' / 'run') == tmp_path / 'new' / 'run'
  assert not (tmp_path / 'new').exists()  # checking writes nothing
  (tmp_path / 'file').write_text('x')
  with pytest.raises(WorkdirError, match='is a file, not a folder'):
    config_lib.check_workdir(tmp_path / 'file')
  with pytest.raises(WorkdirError, match='is a file, not a folder'):
    config_lib.check_workdir(tmp_path / 'file' / 'run')
  usage = namedtuple('usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))
  with pytest.raises(WorkdirError, match=r'1 MiB free on its disk, this run needs about 95 MiB'):
    config_lib.check_workdir(tmp_path, needed_bytes=100_000_000)
  monkeypatch.setattr(os, 'access', lambda path, mode: False)
  with pytest.raises(WorkdirError, match='is not writable by this user'):
    config_lib.check_workdir(tmp_path / 'x')


@pytest.mark.parametrize('key,value', [('batch_size', 0), ('batch_size', -5), ('num_epochs', -1),
                                       ('image_size', 0)])
def test_bad_values_stop_the_command_before_any_work(key, value, tmp_path, capsys):
  config = quickstart.get_config()
  config[key] = value
  assert cli.run_command(cli.train, config, str(tmp_path / 'run')) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --config.{key}={value} is not allowed; {key} must be ')
  assert not (tmp_path / 'run').exists()


def test_workdir_that_is_a_file_stops_the_command(tmp_path, capsys):
  (tmp_path / 'run').write_text('notes')
  assert cli.run_command(cli.train, quickstart.get_config(), str(tmp_path / 'run')) == 2
  assert 'is a file, not a folder' in capsys.readouterr().err
  assert (tmp_path / 'run').read_text() == 'notes'


def test_a_bug_keeps_its_traceback(monkeypatch):
  def broken(*args):
    raise ValueError('a bug, not bad input')
  with pytest.raises(ValueError, match='a bug'):
    cli.run_command(broken)
