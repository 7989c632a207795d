"""The train and eval steps: learning, metric bookkeeping, jit agreement, aux loss, determinism."""

import functools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_images
from gnet_jax import models, train
from configs import default

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
  """One compiled train step for the plain network, shared by the tests below."""
  config = small_config()
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.create_train_state(config, (28, 28, 1), model, tx)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, image_size=28))
  return config, model, tx, state, step


@pytest.fixture(scope='module')
def logits_fn(setup):
  """Jitted plain forward pass (eager GoogLeNet is slow on a small CPU)."""
  model = setup[1]
  return jax.jit(lambda params, images: model.apply({'params': params},
                                                     train.preprocess(images, 28)))


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


class TinyNet(nn.Module):
  """A small network with GoogLeNet's call signature, so the step can also run un-jitted.

  (Running the full GoogLeNet op by op takes minutes on a small CPU.)
  """

  @nn.compact
  def __call__(self, x, train=False, example_keys=None):
    x = models.Inception(4, (4, 6), (2, 3), 3)(nn.Conv(8, (3, 3), strides=(4, 4))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_jit_and_eager_steps_agree(batch):
  model, tx = TinyNet(), optax.sgd(0.1, momentum=0.9)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  state = train.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)),
                           metrics=train.zero_metrics())
  step = functools.partial(train.train_step, model=model, tx=tx, image_size=28)
  eager, jitted = state, state
  for _ in range(2):
    eager = step(eager, batch)
    jitted = jax.jit(step)(jitted, batch)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)


def test_aux_heads_enter_the_training_loss(batch):
  config = small_config(aux_weight=0.3)
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.create_train_state(config, (28, 28, 1), model, tx)
  assert 'aux1' in state.params
  new = jax.jit(functools.partial(train.train_step, model=model, tx=tx, image_size=28,
                                  aux_weight=0.3))(state, batch)
  # The aux heads get gradients only through the aux loss term.
  for head in ('aux1', 'aux2'):
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params[head],
                         new.params[head])
    assert max(jax.tree.leaves(moved)) > 0, head
  # The reported training loss is the main head's cross-entropy.
  logits = jax.jit(lambda p, x: model.apply({'params': p}, train.preprocess(x, 28)))(
      state.params, batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  np.testing.assert_allclose(float(new.metrics['loss_sum']), float(loss) * BATCH, rtol=1e-5)


def test_preprocess_matches_torch_antialiased_bilinear_resize():
  torch = pytest.importorskip('torch')
  images = make_images(2, seed=1)[0][..., None]
  for size in (96, 20):  # up and down (where antialiasing matters)
    ours = np.asarray(train.preprocess(images, size))
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, size=(size, size),
        mode='bilinear', antialias=True, align_corners=False).permute(0, 2, 3, 1).numpy()
    assert ours.dtype == np.float32 and ours.shape == (2, size, size, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_training_is_deterministic(idx_dir, tmp_path):
  config = small_config(data_source='idx', data_dir=str(idx_dir), num_epochs=2,
                        train_examples=32, eval_examples=12, progress=False)
  first = train.train_and_evaluate(config, tmp_path / 'a')
  second = train.train_and_evaluate(config, tmp_path / 'b')
  timing = ('examples_per_sec', 'seconds')
  assert {k: v for k, v in first.items() if k not in timing} == {
      k: v for k, v in second.items() if k not in timing}
  lines = (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['epoch'] for l in lines] == [1, 2]
  assert first['step'] == 2 * 32 // BATCH
