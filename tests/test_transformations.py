"""GoogLeNet's modules under every JAX transformation, with either kernel set.

Logits, gradients and an SGD step, forward mode (``jvp``, ``linearize``,
``jacfwd``), second order (Hessian-vector products forward-over-reverse and
reverse-over-reverse) and ``vmap`` of ``grad`` through a network built from
GoogLeNet's own modules: 'custom' (the CPU default) must give what 'xla' gives. The kernels' own rules are tested op
by op in ``test_ops.py``.

The network is GoogLeNet cut to one narrow Inception block per stage (``Trunk``):
the same modules and every kernel path the full network takes at 28x28 (the
7x7 stride-2 stem, max-pools of stride 1 and 2, the three shared 1x1s, 3x3 and
5x5 convolutions on maps larger than the kernel and on maps smaller than it,
the global average pool), at a tenth of the full network's compile time (two
kernel sets x seven transformations of the full network took minutes here).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnet_jax import models, state

# One narrow block per Inception stage: (c1, (c2_reduce, c2), (c3_reduce, c3), c4).
BLOCK = (8, (8, 12), (4, 8), 4)


class Trunk(nn.Module):
  """b1, b2, one block of b3 (then a stride-2 pool) and one of b5 (then the global pool)."""

  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x):
    x = models.Stem(1, kernels=self.kernels, name='b1')(x)   # 28 -> 14 -> 7
    x = models.Stem(2, kernels=self.kernels, name='b2')(x)   # 3x3 on 7x7, pool -> 4
    # At 4x4 the 3x3 map is larger than its kernel and the 5x5 smaller; pool -> 2.
    x, _ = models.InceptionStage((BLOCK,), 'max_pool', kernels=self.kernels, name='b3')(x)
    # At 2x2 both are smaller than their kernels; then the global average pool.
    x, _ = models.InceptionStage((BLOCK,), 'global_avg_pool', kernels=self.kernels,
                                 name='b5')(x)
    return nn.Dense(10, name='head')(x)



@pytest.fixture(scope='module')
def transformations():
  """Forward-mode, second-order and batched transformations of the 28x28 ``Trunk``.

  For each kernel choice, one jitted function returns: ``jvp`` and ``linearize``
  of the logits along a direction in parameter space, ``jacfwd`` along three
  such directions, a Hessian-vector product forward-over-reverse and the same
  reverse-over-reverse (``grad`` of ``grad``), and per-example gradients
  (``vmap`` of ``grad``). 'custom' must support them all, as 'xla' does.
  """
  params = state.init_params(Trunk(), 5, (28, 28, 1), bias_init='torch')
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(2, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray([3, 8])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), 3 * len(leaves))
  directions = [jax.tree.unflatten(treedef, [0.01 * jax.random.normal(k, p.shape)
                                             for k, p in zip(keys[i::3], leaves)])
                for i in range(3)]
  v = directions[0]

  def run(kernels):
    model = Trunk(kernels=kernels)
    logits = lambda p, images=x: model.apply({'params': p}, images)

    def loss(p, images=x, y=labels):
      return -jnp.mean(jax.nn.log_softmax(logits(p, images))[jnp.arange(len(y)), y])

    along = lambda t: logits(jax.tree.map(lambda p, *d: p + sum(ti * di for ti, di in zip(t, d)),
                                          params, *directions))
    one_example = lambda p, image, y: loss(p, image[None], y[None])
    return {
        'logits': logits(params),
        'jvp': jax.jvp(logits, (params,), (v,))[1],
        'linearize': jax.linearize(logits, params)[1](v),
        'jacfwd': jax.jacfwd(along)(jnp.zeros(3)),
        'hvp_fwd_rev': jax.jvp(jax.grad(loss), (params,), (v,))[1],
        'hvp_rev_rev': jax.grad(lambda p: _tree_vdot(jax.grad(loss)(p), v))(params),
        'per_example_grads': jax.vmap(jax.grad(one_example), in_axes=(None, 0, 0))(
            params, x, labels),
        'grad': jax.grad(loss)(params),
    }

  with jax.default_matmul_precision('float32'):
    results = {k: jax.jit(run, static_argnums=0)(k) for k in ('xla', 'custom')}
  return {**results, 'params': params}


def _tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_close_to_scale(ours, ref, rtol):
  """Every leaf within ``rtol`` of the largest magnitude of its reference leaf."""
  for name, a, b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(ours),
                        jax.tree.leaves(ref)):
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale + 1e-7,
                               err_msg=jax.tree_util.keystr(name[0]))


@pytest.mark.parametrize('name', ['jvp', 'linearize', 'jacfwd', 'hvp_fwd_rev', 'hvp_rev_rev',
                                  'per_example_grads'])
def test_every_transformation_agrees_between_kernels(transformations, name):
  xla, custom = transformations['xla'][name], transformations['custom'][name]
  assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(xla)) > 1e-4  # not zeros
  _assert_close_to_scale(custom, xla, rtol=2e-4)


def test_logits_gradients_and_step_agree_between_kernels(transformations):
  xla, custom = transformations['xla'], transformations['custom']
  chex.assert_tree_all_finite(custom)
  chex.assert_trees_all_close(custom['logits'], xla['logits'], atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(xla['logits']).max()) > 1e-3  # real logits, not a degenerate comparison
  chex.assert_trees_all_close(custom['grad'], xla['grad'], atol=1e-5, rtol=1e-5)
  step = lambda grads: jax.tree.map(lambda p, g: p - 0.1 * g, transformations['params'], grads)
  chex.assert_trees_all_close(step(custom['grad']), step(xla['grad']), atol=1e-5, rtol=1e-5)


def test_transformations_are_consistent(transformations):
  """The two Hessian-vector products agree, linearize equals jvp, jacfwd's first column
  is jvp along the same direction, and per-example gradients average to the gradient."""
  custom = transformations['custom']
  _assert_close_to_scale(custom['hvp_fwd_rev'], custom['hvp_rev_rev'], rtol=2e-4)
  np.testing.assert_allclose(custom['linearize'], custom['jvp'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(custom['jacfwd'][..., 0], custom['jvp'], rtol=1e-5, atol=1e-6)
  mean = jax.tree.map(lambda g: g.mean(0), custom['per_example_grads'])
  _assert_close_to_scale(mean, custom['grad'], rtol=1e-5)
