"""``model=inception_v1`` in training: BatchNorm statistics, fine-tuning controls, ``init_from``.

torchvision's GoogLeNet runs from 15x15; these tests feed it 32x32 RGB
pictures (``image_folders``), batch 4, one to three steps, so that each
compiled step is shared by the tests of this module (module-scoped fixtures).
"""

from __future__ import annotations

import functools
import os
import signal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
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
                log_every_steps=0)
  config.update(overrides)
  return config


def batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, len(image_folders.CLASSES), n * BATCH)
  images = np.stack([image_folders.picture(image_folders.CLASSES[k], rng, (SIZE, SIZE))
                     for k in labels])
  return [{'image': images[i * BATCH:(i + 1) * BATCH],
           'label': labels[i * BATCH:(i + 1) * BATCH].astype(np.int32)} for i in range(n)]


class SmallBatchNormNet(nn.Module):
  """Two of inception_v1's conv units and a classifier: the train step's handling of BatchNorm
  (statistics, moments pooled across devices) in a network that compiles in a second, for
  tests where GoogLeNet's 57 BatchNorms are not the point."""

  num_classes: int = len(image_folders.CLASSES)
  axis_name: str | None = None  # see inception_v1.BatchNorm: the train step sets it under pmap

  @nn.compact
  def __call__(self, x, train: bool = False, example_keys=None):
    unit = functools.partial(inception_v1.BasicConv, use_running_average=not train,
                             axis_name=self.axis_name)
    x = unit(8, 3, 2, name='conv1')(x)
    x = unit(8, 3, name='conv2')(x)
    return nn.Dense(self.num_classes, name='fc')(jnp.mean(x, (1, 2)))


@functools.lru_cache(maxsize=None)
def built(small: bool = False, **overrides):
  """Config, model, optimizer and initial state: inception_v1, or ``SmallBatchNormNet``."""
  config = make_config(**overrides)
  model = SmallBatchNormNet() if small else state_lib.create_model(config, SPEC)
  tx = state_lib.create_optimizer(config)
  return config, model, tx, state_lib.create_train_state(config, SPEC, model, tx)


@functools.lru_cache(maxsize=None)
def stepper(mode: str, num_devices: int, **overrides):
  """The runner and its compiled train step, once per layout, model and config."""
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
  evaluate = lambda variables: train.evaluate(  # noqa: E731
      runner, eval_fn, runner.put_state(variables), images, labels, BATCH)
  trained = evaluate(one_device.variables)
  assert evaluate(one_device.variables)['loss'] == trained['loss']  # nothing updated
  # Other statistics, other numbers: evaluation reads them (and not the batch's).
  fresh = {'params': one_device.params, 'batch_stats': built()[3].batch_stats}
  assert evaluate(fresh)['loss'] != trained['loss']


@pytest.mark.parametrize('mode', ['pmap', 'sharded'])
def test_one_and_four_devices_agree_on_params_and_statistics(mode):
  """One step of ``SmallBatchNormNet`` (one example per device: under pmap BatchNorm must pool
  the devices' moments), to float rounding measured against how far the step moved each
  leaf; a BatchNorm that saw one device's example alone would be off by the whole update."""
  start = built(small=True)[3]
  one, four = run_steps('none', 1, steps=1, small=True), run_steps(mode, 4, steps=1, small=True)
  for name in ('params', 'batch_stats'):
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), getattr(start, name),
                         getattr(one, name))
    off = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), getattr(four, name),
                       getattr(one, name))
    assert all(m > 0 for m in jax.tree.leaves(moved)), name
    worst = max(jax.tree.leaves(jax.tree.map(lambda o, m: o / m, off, moved)))
    assert worst < 1e-4, (name, worst)
  chex.assert_trees_all_close(four.metrics, one.metrics, rtol=1e-5)


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return image_folders.make_folder(tmp_path_factory.mktemp('pictures'),
                                   {'train': 4, 'test': 2})


def loop_config(folder, **overrides):
  return make_config(**{'dataset': 'image_folder', 'data_dir': str(folder), 'num_epochs': 1,
                        'train_examples': 8, 'max_checkpoints': 0, **overrides})


@pytest.fixture(scope='module')
def uninterrupted(folder, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('whole')
  train.train_and_evaluate(loop_config(folder), workdir)
  return workdir


def final_state(workdir):
  return state_lib.load_checkpoint(workdir).state


def test_resume_with_batch_stats_is_exact(folder, tmp_path):
  """Stopped mid-epoch and resumed, ``SmallBatchNormNet``'s run equals an uninterrupted one."""
  config, model = loop_config(folder), SmallBatchNormNet()
  tx = state_lib.create_optimizer(config)
  sigterm_at_1 = lambda step: step == 1 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
  train.train_and_evaluate(config, tmp_path / 'whole', model=model)
  with pytest.raises(preemption.Interrupted):  # mid-epoch: 2 steps per epoch
    train.train_and_evaluate(config, tmp_path / 'resumed', model=model, after_step=sigterm_at_1)
  assert checkpoint.checkpoint_dir(tmp_path / 'resumed').joinpath('1').is_dir()
  train.train_and_evaluate(config, tmp_path / 'resumed', model=model)
  target = state_lib.create_train_state(config, SPEC, model, tx)
  resumed, whole = (checkpoint.restore_from_workdir(tmp_path / name, target)[0]
                    for name in ('resumed', 'whole'))
  assert int(resumed.step) == int(whole.step) == 2
  assert jax.tree.leaves(whole.batch_stats)
  chex.assert_trees_all_equal(resumed, whole)  # params, statistics, optimizer, rng: bitwise


def test_evaluate_and_predict_read_the_running_statistics(uninterrupted, folder):
  """evaluate.py gives the loop's own test numbers; predict.py the same classes (both need them)."""
  import json
  from gnet_jax import evaluate, predict
  result = evaluate.evaluate_checkpoint(uninterrupted)
  last = json.loads((uninterrupted / 'metrics.jsonl').read_text().splitlines()[-1])
  assert (result['accuracy'], result['loss']) == (last['test_acc'], last['test_loss'])
  files = sorted(p for p in (folder / 'test').rglob('*') if p.suffix in ('.png', '.jpg'))
  answers = predict.predict_images(uninterrupted, files)
  right = [a['top'][0]['name'] == f.parent.name for a, f in zip(answers, files)]
  assert len(files) == result['count'] and np.mean(right) == result['accuracy']


# ----------------------------------------------------------------------------- fine-tuning


def leaves_by_path(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_block_tables_are_the_models_top_level_names():
  from gnet_jax import config as config_lib
  for name in ('d2l', 'inception_v1'):
    config = make_config(model=name, aux_weight=0.3, image_size=SIZE)
    model = state_lib.create_model(config, SPEC)
    params = state_lib.init_params(model, 0, (SIZE, SIZE, 3))
    assert set(params) == set(config_lib.BLOCKS[name] + config_lib.HEADS[name]), name
  assert config_lib.BLOCKS['inception_v1'] + config_lib.HEADS['inception_v1'] == (
      inception_v1.LAYERS + inception_v1.AUX_HEADS)


def test_optimizer_freezes_scales_and_keeps_the_head_exactly():
  """multi_transform: frozen leaves get 0, the trained blocks lr x multiplier, the heads lr."""
  params = built()[3].params
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  plain = make_config(momentum=0.0)
  tuned = make_config(momentum=0.0, trainable='inception5a', pretrained_lr_multiplier=0.3)
  # Each update as one program (eager, its ~300 small ops would each compile on their own).
  first_update = lambda tx: leaves_by_path(jax.device_get(
      jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)))
  expected = first_update(state_lib.create_optimizer(plain))
  tx = state_lib.create_optimizer(tuned)
  got = first_update(tx)
  scaled = first_update(optax.sgd(0.05 * 0.3))  # what the pretrained blocks must get
  for key, update in got.items():
    block = key.split("'")[1]
    if block in ('fc', 'aux1', 'aux2'):
      np.testing.assert_array_equal(update, expected[key], err_msg=key)
    elif block in ('inception5a', 'inception5b'):
      np.testing.assert_array_equal(update, scaled[key], err_msg=key)
      np.testing.assert_allclose(update, 0.3 * expected[key], rtol=1e-6, err_msg=key)
    else:
      assert not np.any(update), key
  assert not jax.tree.leaves(tx.init(params).inner_states['frozen'])  # no state for frozen


def assert_blocks(start, end, frozen: tuple[str, ...], trained: tuple[str, ...]) -> None:
  """Frozen blocks' params and statistics bit-identical; trained ones' params moved.

  From the seed's initialisation a frozen backbone (BatchNorm on running
  statistics 0 and 1 over N(0, 0.01^2) kernels) passes almost nothing on, so a
  trained block's kernels may move by less than a float32 ulp: each trained
  block must move somewhere (its BatchNorm and Dense biases do).
  """
  for name in frozen:
    chex.assert_trees_all_equal(end.params[name], start.params[name])
    if name in start.batch_stats:
      chex.assert_trees_all_equal(end.batch_stats[name], start.batch_stats[name])
  for name in trained:
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), start.params[name], end.params[name])
    assert any(jax.tree.leaves(moved)), name


HEAD_ONLY = dict(trainable='head', bn_stats='frozen')  # configs/finetune.py's "head" variant


def test_trainable_head_freezes_every_other_parameter_and_every_statistic():
  """With frozen BatchNorm statistics too: only the heads' parameters get updates, and every
  BatchNorm keeps its running statistics (the mechanism a train step with a frozen block
  shows bit for bit in ``test_trainable_block_freezes_the_earlier_blocks_only``)."""
  from gnet_jax import config as config_lib
  config, model, tx, start = built(**HEAD_ONLY)
  assert set(model.frozen_batch_stats) == set(inception_v1.LAYERS + inception_v1.AUX_HEADS)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), start.params)
  updates = tx.update(grads, tx.init(start.params), start.params)[0]
  for block in config_lib.BLOCKS['inception_v1']:
    assert not any(np.any(u) for u in jax.tree.leaves(updates[block])), block
  for head in ('fc', 'aux1', 'aux2'):
    assert all(np.all(u != 0) for u in jax.tree.leaves(updates[head])), head


def test_trainable_block_freezes_the_earlier_blocks_only():
  from gnet_jax import config as config_lib
  start, end = built(trainable='inception5a')[3], run_steps('none', 1, trainable='inception5a')
  blocks = config_lib.BLOCKS['inception_v1']
  assert_blocks(start, end, blocks[:blocks.index('inception5a')],
                ('inception5a', 'inception5b', 'fc', 'aux1', 'aux2'))
  for name in ('inception5a', 'inception5b'):  # their BatchNorm still learns its statistics
    assert np.any(end.batch_stats[name]['branch1']['bn']['mean']
                  != start.batch_stats[name]['branch1']['bn']['mean'])


def test_fine_tuning_keys_are_checked():
  from gnet_jax import config as config_lib
  from gnet_jax.errors import ConfigError
  for overrides, message in ((dict(trainable='inception9z'), "trainable='inception9z'"),
                             (dict(model='d2l', trainable='fc'), "use one of 'all', 'head', 'b1'"),
                             (dict(model='d2l', bn_stats='frozen'), 'has no BatchNorm'),
                             (dict(normalize_stats='imagenet'), 'needs --config.normalize=True')):
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(make_config(**overrides))


# ----------------------------------------------------------------------------- init_from


@pytest.fixture(scope='module')
def torchvision_file(tmp_path_factory):
  """torchvision's GoogLeNet with random weights, ImageNet's 1,000 classes and aux heads."""
  torch = pytest.importorskip('torch')
  from gnet_jax import torch_reference
  torch.manual_seed(0)
  net = torch_reference.torchvision_models().googlenet(weights=None, aux_logits=True,
                                                       init_weights=True)
  path = tmp_path_factory.mktemp('torchvision') / 'googlenet.pth'
  torch.save(net.state_dict(), path)
  return path


def test_init_from_a_torchvision_file_takes_the_backbone_and_says_which(
    folder, torchvision_file, tmp_path, capsys):
  import torch
  from gnet_jax import config as config_lib
  config = loop_config(folder, init_from=str(torchvision_file), num_epochs=1, **HEAD_ONLY)
  train.train_and_evaluate(config, tmp_path)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('init_from')]
  blocks = config_lib.BLOCKS['inception_v1']
  assert lines == [f'init_from {torchvision_file}: taken {", ".join(blocks)}; fresh fc, aux1, '
                   "aux2 (fc: ['bias'] is (1000,) in the source, (3,) here; aux1: ['fc2']['bias'] "
                   "is (1000,) in the source, (3,) here; aux2: ['fc2']['bias'] is (1000,) in the "
                   "source, (3,) here)"]
  imported = inception_v1.variables_from_torchvision(
      torch.load(torchvision_file, weights_only=True))
  end = final_state(tmp_path)
  assert int(end.step) == 2
  for name in blocks:  # taken, and (trainable=head) kept bit for bit through both steps
    chex.assert_trees_all_equal(end.params[name], imported['params'][name])
    chex.assert_trees_all_equal(end.batch_stats[name], imported['batch_stats'][name])
  assert not np.array_equal(end.params['aux1']['conv']['conv']['kernel'],
                            imported['params']['aux1']['conv']['conv']['kernel'])


def save_torch(obj, path):
  import torch
  torch.save(obj, path)
  return path


@pytest.mark.parametrize('source, message', [
    ('d2l_state_dict', "not torchvision's GoogLeNet: missing state dict keys 'conv1.conv.weight'"),
    ('d2l_workdir', 'is a workdir of a d2l run; this run trains inception_v1'),
    ('list', 'holds a list, not a state dict'),
    ('text', 'not a PyTorch file torch.load can read'),
    ('missing', 'no such file or folder'),
])
def test_bad_init_from_is_one_error_line_and_writes_nothing(folder, quickstart_checkpoint,
                                                            tmp_path, capsys, source, message):
  pytest.importorskip('torch')
  from gnet_jax import cli, torch_reference
  path = {'d2l_state_dict': lambda: save_torch(torch_reference.googlenet().state_dict(),
                                               tmp_path / 'd2l.pth'),
          'd2l_workdir': lambda: quickstart_checkpoint,
          'list': lambda: save_torch([1, 2, 3], tmp_path / 'list.pth'),
          'text': lambda: (tmp_path / 'notes.pth').write_text('hello') and tmp_path / 'notes.pth',
          'missing': lambda: tmp_path / 'nothing.pth'}[source]()
  workdir = tmp_path / 'run'
  config = loop_config(folder, init_from=str(path))
  status = cli.run_command(lambda: train.train_and_evaluate(config, workdir) and 0)
  err = capsys.readouterr().err
  assert status == 2 and not workdir.exists()
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], err


def test_init_from_a_file_without_aux_heads_leaves_them_fresh(torchvision_file, tmp_path,
                                                              monkeypatch):
  import torch
  from gnet_jax import finetune
  state_dict = torch.load(torchvision_file, weights_only=True)
  save_torch({k: v for k, v in state_dict.items() if not k.startswith('aux')},
             tmp_path / 'no_aux.pth')
  monkeypatch.setenv('HOME', str(tmp_path))
  path = '~/no_aux.pth'  # as a shell passes --config.init_from=~/no_aux.pth
  config, _, tx, state = built()
  done = finetune.initialise(make_config(init_from=path), state, tx)
  assert done.fresh == ['fc', 'aux1', 'aux2'] and not done.unused
  assert 'aux1: not in the source' in finetune.describe(path, done)
  chex.assert_trees_all_equal(done.state.params['aux1'], state.params['aux1'])
  imported = inception_v1.variables_from_torchvision(state_dict)
  chex.assert_trees_all_equal(done.state.params['conv1'], imported['params']['conv1'])
  chex.assert_trees_all_equal(done.state.batch_stats['inception3a'],
                              imported['batch_stats']['inception3a'])


def test_init_from_reads_a_training_checkpoint_of_a_data_parallel_model(torchvision_file,
                                                                       tmp_path):
  """The weights under 'model_state_dict' beside the optimizer's, every key 'module.'-prefixed
  (torch's DataParallel), read as the plain file is; a whole pickled model is refused, naming
  the flag and the conversion that can read it."""
  import torch
  from gnet_jax import finetune, torch_reference
  from gnet_jax.errors import StateDictError
  state_dict = torch.load(torchvision_file, weights_only=True)
  wrapped = save_torch({'epoch': 3, 'optimizer': {'lr': 0.1},
                        'model_state_dict': {f'module.{k}': v for k, v in state_dict.items()}},
                       tmp_path / 'checkpoint.pth')
  config = make_config()
  got, classes = finetune.load_source(config, wrapped)
  want, want_classes = finetune.load_source(config, torchvision_file)
  chex.assert_trees_all_equal(got, want)
  assert classes == want_classes and len(classes) == 1000
  net = torch_reference.torchvision_models().googlenet(weights=None, aux_logits=False,
                                                       init_weights=False)
  whole = save_torch(net, tmp_path / 'whole.pth')
  with pytest.raises(StateDictError) as refused:
    finetune.load_source(config, whole)
  assert str(refused.value).startswith(f'--config.init_from={whole} holds pickled Python objects')
  assert f'python -m gnet_jax.interop import {whole} --workdir DIR --trust_pickle' in str(
      refused.value)


def test_imagenet_normalisation_is_fixed_and_needs_rgb(folder, idx_dir):
  from gnet_jax.errors import ConfigError
  data = train.load_data(loop_config(folder, normalize=True, normalize_stats='imagenet'))
  assert data.spec.normalization == (inception_v1.IMAGENET_MEAN, inception_v1.IMAGENET_STD)
  own = train.load_data(loop_config(folder, normalize=True))
  assert own.spec.normalization != data.spec.normalization
  grey = make_config(model='d2l', aux_weight=0.0, dataset='fashion_mnist', data_source='idx',
                     data_dir=str(idx_dir), normalize=True, normalize_stats='imagenet')
  with pytest.raises(ConfigError, match='normalize_stats=imagenet needs RGB images'):
    train.load_data(grey)


def test_finetune_config_is_torchvisions_pretrained_setup():
  from configs import finetune as finetune_config
  from gnet_jax import config as config_lib
  config = finetune_config.get_config()
  config.data_dir = '/photos'
  config_lib.validate(config)
  model = state_lib.create_model(config, SPEC)
  assert isinstance(model, inception_v1.InceptionV1) and model.transform_input
  assert (config.image_size, config.normalize_stats) == (224, 'imagenet')
  assert model.frozen_batch_stats == ()  # statistics update (measured: docs/finetune.md)
  config.bn_stats = 'frozen'
  frozen = state_lib.create_model(config, SPEC)
  assert frozen.frozen_batch_stats == inception_v1.LAYERS + inception_v1.AUX_HEADS


@pytest.mark.parametrize('source_classes, fresh', [
    (('x', 'y', 'z'), ['fc', 'aux1', 'aux2']),  # as many classes, other ones: new classifiers
    (image_folders.CLASSES, []),                # the run's own classes: everything taken
    (None, []),                                 # unknown (a .pth file of another size): shapes
])
def test_a_source_of_other_classes_gives_fresh_classifiers(monkeypatch, source_classes, fresh):
  from gnet_jax import finetune
  config, _, tx, state = built()
  source = {'params': jax.tree.map(lambda x: np.asarray(x) + 1, state.params),
            'batch_stats': state.batch_stats}
  monkeypatch.setattr(finetune, 'load_source', lambda *_: (source, source_classes))
  done = finetune.initialise(make_config(init_from='/source'), state, tx, image_folders.CLASSES)
  assert done.fresh == fresh
  for name in state.params:
    want = state.params[name] if name in fresh else source['params'][name]
    chex.assert_trees_all_equal(done.state.params[name], want)
  if fresh:
    assert 'fc: the source classifies other classes' in finetune.describe('/source', done)
