"""Model structure: stage shapes, parameter tree, Inception branches, aux heads, kernel choice."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnet_jax import models, ops, state

STAGES = ('b1', 'b2', 'b3', 'b4', 'b5', 'head')


def stage_shapes(model: models.GoogLeNet, size: int, channels: int = 1) -> dict:
  """Each stage's output shape, from an abstract (compile-free) trace."""
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)['params']

  def run(params, x):
    _, state = model.apply({'params': params}, x, capture_intermediates=True, mutable=True)
    return state['intermediates']

  inter = jax.eval_shape(run, params, x)
  shapes = {}
  for name in STAGES:
    out = inter[name]['__call__'][0]
    out = out[0] if isinstance(out, tuple) else out  # Inception stages return (x, taps)
    shapes[name] = out
  return shapes


@pytest.mark.parametrize('size, expected', [
    (96, [(24, 24, 64), (12, 12, 192), (6, 6, 480), (3, 3, 832), (1024,), (10,)]),
    (28, [(7, 7, 64), (4, 4, 192), (2, 2, 480), (1, 1, 832), (1024,), (10,)]),
])
def test_stage_output_shapes(size, expected):
  shapes = stage_shapes(models.GoogLeNet(), size)
  for name, shape in zip(STAGES, expected):
    chex.assert_shape(shapes[name], (2, *shape))


def _conv(x, p, pad):
  y = jax.lax.conv_general_dilated(x, p['kernel'], (1, 1), [(pad, pad)] * 2,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jax.nn.relu(y + p['bias'])


@pytest.mark.parametrize('kernels', ['xla', 'custom'])
def test_inception_branches_and_concatenation_order(kernels):
  block = models.Inception(3, (4, 5), (2, 6), 7, kernels=kernels)
  x = jax.random.normal(jax.random.key(1), (2, 5, 7, 8))
  params = jax.jit(block.init)(jax.random.key(2), x)['params']
  # Non-zero biases, so a bias mix-up between branches would show.
  params = jax.tree.map(lambda p: p + 0.1 * np.arange(p.size).reshape(p.shape) / p.size, params)
  # Full float32 passes, so that on GPU/TPU the fused 1x1 matmul and the
  # reference's convolutions are not rounded through TF32/bf16 differently.
  with jax.default_matmul_precision('float32'):
    out = jax.jit(block.apply)({'params': params}, x)
  chex.assert_shape(out, (2, 5, 7, 3 + 5 + 6 + 7))

  @jax.jit
  def by_hand(p, x):
    return jnp.concatenate([
        _conv(x, p['p1_1'], 0),
        _conv(_conv(x, p['p2_1'], 0), p['p2_2'], 1),
        _conv(_conv(x, p['p3_1'], 0), p['p3_2'], 2),
        _conv(ops.max_pool_3x3(x, 1, 'xla'), p['p4_2'], 0),
    ], -1)

  with jax.default_matmul_precision('float32'):
    expected = by_hand(params, x)
  chex.assert_trees_all_close(out, expected, atol=1e-5)


def test_aux_heads_only_when_enabled():
  plain = state.init_params(models.GoogLeNet(), 0, (28, 28, 1))
  aux_model = models.GoogLeNet(aux_heads=True)
  aux = state.init_params(aux_model, 0, (28, 28, 1))
  assert 'aux1' not in plain and {'aux1', 'aux2'} <= set(aux)
  chex.assert_shape(aux['aux1']['fc1']['kernel'], (4 * 4 * 128, 1024))
  chex.assert_shape(aux['aux2']['conv']['kernel'], (1, 1, 528, 128))
  x = jnp.ones((2, 28, 28, 1))
  train_out = jax.eval_shape(lambda p: aux_model.apply({'params': p}, x, train=True), aux)
  logits, heads = train_out
  chex.assert_shape([logits, *heads], (2, 10))
  # At evaluation the heads are not computed: NaN aux weights leave the logits finite and
  # equal to those of the same network without heads.
  poisoned = {**aux, 'aux1': jax.tree.map(lambda p: p * jnp.nan, aux['aux1']),
              'aux2': jax.tree.map(lambda p: p * jnp.nan, aux['aux2'])}
  shared = {k: v for k, v in aux.items() if not k.startswith('aux')}
  apply = jax.jit(lambda m, p: m.apply({'params': p}, x), static_argnums=0)
  eval_logits = apply(aux_model, poisoned)
  assert bool(jnp.all(jnp.isfinite(eval_logits)))
  chex.assert_trees_all_close(eval_logits, apply(models.GoogLeNet(), shared), atol=1e-6)


def test_summary_lists_stages_params_and_flops():
  text = models.summary(models.GoogLeNet(), (96, 96, 1))
  for stage in STAGES:
    assert stage in text
  assert '5,977,530' in text
  assert 'float32[1,3,3,832]' in text
  assert 'flops' in text.lower()


def test_parameter_tree_and_count():
  params = state.init_params(models.GoogLeNet(), 0, (96, 96, 1))
  assert state.count_params(params) == 5_977_530
  assert sorted(params) == ['b1', 'b2', 'b3', 'b4', 'b5', 'head']
  assert sorted(params['b4']) == [f'inception{i}' for i in range(1, 6)]
  assert sorted(params['b3']['inception1']) == ['p1_1', 'p2_1', 'p2_2', 'p3_1', 'p3_2', 'p4_2']
  assert sorted(params['b2']) == ['conv1', 'conv2']
  chex.assert_shape(params['b1']['conv']['kernel'], (7, 7, 1, 64))
  chex.assert_shape(params['b3']['inception1']['p3_2']['kernel'], (5, 5, 16, 32))


