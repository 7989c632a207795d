"""Hand-written ops used for speed must equal the stock ones they replace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnet_jax import models


def _stock_pool(x, stride):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))


def _reference_grad(x: np.ndarray, g: np.ndarray, stride: int) -> np.ndarray:
  """PyTorch's rule in NumPy: the first maximum in window order (row by row) gets the gradient."""
  n, h, w, c = x.shape
  ho, wo = g.shape[1:3]
  dx = np.zeros_like(x)
  for b in range(n):
    for ch in range(c):
      for i in range(ho):
        for j in range(wo):
          best, where = -np.inf, None
          for di in range(3):
            for dj in range(3):
              r, s = i * stride + di - 1, j * stride + dj - 1
              if 0 <= r < h and 0 <= s < w and x[b, r, s, ch] > best:
                best, where = x[b, r, s, ch], (r, s)
          dx[b, where[0], where[1], ch] += g[b, i, j, ch]
  return dx


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [1, 4, 7])
def test_max_pool_forward_and_grad_match_stock(size, stride):
  kx, kg = jax.random.split(jax.random.key(size * 10 + stride))
  x = jax.random.normal(kx, (2, size, size, 3))  # continuous: no ties
  y = models.max_pool_3x3(x, stride)
  np.testing.assert_array_equal(y, _stock_pool(x, stride))
  g = jax.random.normal(kg, y.shape)
  ours = jax.vjp(lambda v: models.max_pool_3x3(v, stride), x)[1](g)[0]
  stock = jax.vjp(lambda v: _stock_pool(v, stride), x)[1](g)[0]
  np.testing.assert_allclose(ours, stock, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours, _reference_grad(np.asarray(x), np.asarray(g), stride),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('stride', [1, 2])
def test_max_pool_ties_go_to_first_max_in_window_order(stride):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, (2, 6, 7, 2)).astype(np.float32)  # many ties
  x[0, :, :, 0] = 1.0  # every window a tie
  y = models.max_pool_3x3(jnp.asarray(x), stride)
  g = rng.normal(size=y.shape).astype(np.float32)
  ours = jax.vjp(lambda v: models.max_pool_3x3(v, stride), jnp.asarray(x))[1](jnp.asarray(g))[0]
  np.testing.assert_allclose(ours, _reference_grad(x, g, stride), rtol=1e-6, atol=1e-6)


def test_max_pool_grad_under_jit_and_second_order_shapes():
  x = jax.random.normal(jax.random.key(0), (3, 9, 9, 4))
  loss = lambda v: jnp.sum(models.max_pool_3x3(v, 2) ** 2)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x),
                             jax.grad(lambda v: jnp.sum(_stock_pool(v, 2) ** 2))(x),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('hw,k', [(7, 3), (4, 5), (2, 3), (2, 5), (1, 3), (1, 5), (3, 1)])
def test_apply_conv_matches_flax_conv_values_and_grads(hw, k):
  """The hand-written conv (im2col gradients, dead taps sliced away) is ``nn.Conv``'s math."""
  kx, kk, kb, kg = jax.random.split(jax.random.key(hw * 10 + k), 4)
  x = jax.random.normal(kx, (3, hw, hw, 4))
  kernel = jax.random.normal(kk, (k, k, 4, 5))
  bias = jax.random.normal(kb, (5,))
  g = jax.random.normal(kg, (3, hw, hw, 5))
  stock = nn.Conv(5, (k, k), padding=((k // 2, k // 2),) * 2)
  # Full float32 passes: on GPU/TPU the default precision rounds matmuls and
  # convolutions through TF32/bf16, differently for each, and this compares the math.
  with jax.default_matmul_precision('float32'):
    ours_y, ours_vjp = jax.vjp(lambda *a: models.apply_conv(*a, dtype=jnp.float32),
                               x, kernel, bias)
    ref_y, ref_vjp = jax.vjp(
        lambda x_, k_, b_: stock.apply({'params': {'kernel': k_, 'bias': b_}}, x_),
        x, kernel, bias)
    ours_grads, ref_grads = ours_vjp(g), ref_vjp(g)
  np.testing.assert_allclose(ours_y, ref_y, rtol=1e-5, atol=1e-5)
  for ours, ref in zip(ours_grads, ref_grads):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-5)
