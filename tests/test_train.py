"""The train and eval steps: learning, metric bookkeeping, jit agreement, aux loss, determinism."""

import functools
import json
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, TinyNet, make_images
from gnet_jax import input_pipeline, models, state as state_lib, train
from configs import default

SPEC = input_pipeline.dataset_spec('fashion_mnist')

BATCH = 8


def small_config(**overrides):
  config = default.get_config()
  config.image_size = 28
  config.batch_size = BATCH
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def batch():
  images, labels = make_images(BATCH, seed=5)
  return {'image': images[..., None], 'label': labels.astype(np.int32)}


@pytest.fixture(scope='module')
def setup():
  """One compiled train step of TinyNet, shared by the tests below (GoogLeNet is not the point)."""
  config = small_config()
  model, tx = TinyNet(), state_lib.create_optimizer(config)
  state = state_lib.create_train_state(config, SPEC, model, tx)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, image_size=28))
  return config, model, tx, state, step


@pytest.fixture(scope='module')
def logits_fn(setup):
  """Jitted forward pass of the same network."""
  model = setup[1]
  return jax.jit(lambda params, images: model.apply({'params': params},
                                                     input_pipeline.preprocess(images, 28)))


def test_loss_goes_down_on_a_fixed_batch(setup, batch):
  _, _, _, state, step = setup
  state = jax.device_put(state)
  losses = []
  for _ in range(8):
    before = float(state.metrics['loss_sum'])
    state = step(state, batch)
    losses.append(float(state.metrics['loss_sum']) - before)
  assert int(state.step) == 8 and int(state.metrics['count']) == 8 * BATCH
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.95 * losses[0], losses


def test_metrics_match_a_direct_recomputation(setup, logits_fn, batch):
  _, _, _, state, step = setup
  new = step(jax.device_put(state), batch)
  logits = logits_fn(state.params, batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  correct = int(np.sum(np.argmax(logits, -1) == batch['label']))
  np.testing.assert_allclose(float(new.metrics['loss_sum']), float(loss) * BATCH, rtol=1e-5)
  assert int(new.metrics['correct']) == correct
  assert int(new.metrics['count']) == BATCH
  assert int(new.step) == 1


def test_eval_step_counts_only_unmasked_examples(setup, logits_fn, batch):
  _, model, _, state, _ = setup
  eval_step = jax.jit(functools.partial(train.eval_step, model=model, image_size=28))
  mask = np.arange(BATCH) < 5
  sums = eval_step(state.params, {**batch, 'mask': mask})
  logits = logits_fn(state.params, batch['image'])[:5]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'][:5])
  assert int(sums['count']) == 5
  assert int(sums['correct']) == int(np.sum(np.argmax(logits, -1) == batch['label'][:5]))
  np.testing.assert_allclose(float(sums['loss_sum']), float(losses.sum()), rtol=1e-5)


class SmallInception(nn.Module):
  """A small network with an Inception block, so the step can also run un-jitted.

  (Running the full GoogLeNet op by op takes minutes on a small CPU.)
  """

  @nn.compact
  def __call__(self, x, train=False, example_keys=None):
    x = models.Inception(4, (4, 6), (2, 3), 3)(nn.Conv(8, (3, 3), strides=(4, 4))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope='module')
def small_inception_steps(batch):
  """Two SGD steps of SmallInception, eager and jitted (chex.variants below)."""
  model, tx = SmallInception(), optax.sgd(0.1, momentum=0.9)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  state = state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                               rng=jax.random.key_data(jax.random.key(0)),
                               metrics=state_lib.zero_metrics())
  return state, functools.partial(train.train_step, model=model, tx=tx, image_size=28)


class TestStepVariants(chex.TestCase):
  """The train step gives the same state with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_steps(self):
    state, step = self._setup
    variant_step = self.variant(step)
    for _ in range(2):
      state = variant_step(state, self._batch)
    chex.assert_tree_all_finite(state)
    chex.assert_trees_all_close(state, self._reference, rtol=1e-5, atol=1e-6)
    assert int(state.step) == 2


@pytest.fixture(autouse=True)
def _variants_setup(request, small_inception_steps, batch):
  if request.cls is TestStepVariants:
    state, step = small_inception_steps
    request.instance._setup, request.instance._batch = small_inception_steps, batch
    reference = state
    for _ in range(2):
      reference = jax.jit(step)(reference, batch)
    request.instance._reference = reference


def test_aux_heads_enter_the_training_loss(batch):
  """Total loss = main + w * aux: with plain SGD each parameter's step is linear in w."""
  weights = (0.0, 0.3, 1.0, 2.5)
  config = small_config(aux_weight=0.3, momentum=0.0)
  model, tx = TinyNet(aux_heads=True), state_lib.create_optimizer(config)
  state = state_lib.create_train_state(config, SPEC, model, tx)
  assert 'aux1' in state.params
  moves, losses = [], []
  for w in weights:
    new = jax.jit(functools.partial(train.train_step, model=model, tx=tx, image_size=28,
                                    aux_weight=w))(state, batch)
    moves.append(jax.tree.map(lambda a, b: np.float64(b) - np.float64(a), state.params,
                              new.params))
    losses.append(float(new.metrics['loss_sum']))
  # The aux head learns only through its term: not at all at w = 0, in proportion to w.
  assert all(np.all(m == 0) for m in jax.tree.leaves(moves[0]['aux1']))
  for w, move in zip(weights[1:], moves[1:]):
    chex.assert_trees_all_close(jax.tree.map(lambda m: m / w, move['aux1']),
                                jax.tree.map(lambda m: m / weights[1], moves[1]['aux1']),
                                rtol=1e-4, atol=2e-7)  # float32 params: steps of ~1e-5
  # The shared trunk gets the main gradient plus w times the aux one.
  aux_part = lambda i: jax.tree.map(lambda m, m0: (m - m0) / weights[i], moves[i]['conv'],
                                    moves[0]['conv'])
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(aux_part(1))) > 1e-4
  for i in (2, 3):
    chex.assert_trees_all_close(aux_part(i), aux_part(1), rtol=1e-3, atol=3e-7)
  # The reported training loss is the main head's cross-entropy, whatever the weight.
  logits = jax.jit(lambda p, x: model.apply({'params': p}, input_pipeline.preprocess(x, 28)))(
      state.params, batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  np.testing.assert_allclose(losses, [float(loss) * BATCH] * len(weights), rtol=1e-5)


# ----------------------------------------------------------------------------- the loop

LOOP_CHILD = '''
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import conftest  # 8 CPU devices, the test compilation cache
from conftest import TinyNet
from test_train import loop_config
from gnet_jax import train
train.train_and_evaluate(loop_config({idx!r}), {workdir!r}, model=TinyNet(aux_heads=True))
print('torch imported:', 'torch' in sys.modules)  # TensorBoard's writer must not import it
'''


def loop_config(idx_dir, **overrides):
  """The real loop on TinyNet: 2 epochs of 4 steps, aux head, Adam-free SGD with momentum."""
  settings = dict(data_source='idx', data_dir=str(idx_dir), num_epochs=2, train_examples=32,
                  eval_examples=12, progress=False, aux_weight=0.3, log_every_steps=2)
  return small_config(**{**settings, **overrides})


def test_training_is_deterministic_across_processes(idx_dir, tmp_path, monkeypatch):
  # The train step is traced once for the whole run (then AOT-compiled), never re-traced.
  monkeypatch.setattr(train, 'train_step', chex.assert_max_traces(train.train_step, n=1))
  first = train.train_and_evaluate(loop_config(idx_dir), tmp_path / 'a',
                                   model=TinyNet(aux_heads=True))
  child = subprocess.run([sys.executable, '-c', LOOP_CHILD.format(
      repo=str(REPO), tests=str(REPO / 'tests'), idx=str(idx_dir), workdir=str(tmp_path / 'b'))],
      capture_output=True, text=True, timeout=300)
  assert child.returncode == 0, child.stderr[-3000:]
  assert child.stdout.splitlines()[-1] == 'torch imported: False'  # a second of start-up
  timing = ('examples_per_sec', 'seconds')
  rows = [[{k: v for k, v in json.loads(line).items() if k not in timing}
           for line in (tmp_path / run / 'metrics.jsonl').read_text().splitlines()]
          for run in ('a', 'b')]
  assert rows[0] == rows[1] and [r['epoch'] for r in rows[0]] == [1, 2]
  assert first['step'] == 2 * 32 // BATCH
  assert (tmp_path / 'a' / 'steps.jsonl').read_text() == (tmp_path / 'b' / 'steps.jsonl').read_text()


def test_intra_epoch_points_come_from_the_running_sums(idx_dir, tmp_path):
  train.train_and_evaluate(loop_config(idx_dir, num_epochs=1, log_every_steps=1), tmp_path,
                           model=TinyNet(aux_heads=True))
  points = [json.loads(line) for line in (tmp_path / 'steps.jsonl').read_text().splitlines()]
  (epoch,) = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [p['step'] for p in points] == [1, 2, 3, 4]
  assert [p['epoch_progress'] for p in points] == [0.25, 0.5, 0.75, 1.0]
  # The four one-step intervals average to the epoch's loss and accuracy.
  np.testing.assert_allclose(np.mean([p['train_loss'] for p in points]), epoch['train_loss'],
                             rtol=1e-5)
  np.testing.assert_allclose(np.mean([p['train_acc'] for p in points]), epoch['train_acc'])


def test_profile_steps_writes_a_trace(idx_dir, tmp_path, capsys):
  train.train_and_evaluate(loop_config(idx_dir, num_epochs=1, profile_steps=1), tmp_path,
                           model=TinyNet(aux_heads=True))
  traces = list((tmp_path / 'profile').rglob('*.xplane.pb'))
  assert traces and traces[0].stat().st_size > 1000
  assert 'profiler trace of steps 3-3 written to' in capsys.readouterr().out
