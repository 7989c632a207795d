"""gnet_jax.ops: the hand-written ('custom') kernels equal XLA's stock ('xla') ones."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnet_jax import ops


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


def test_auto_is_custom_on_cpu_only():
  assert ops.resolve('auto', 'cpu') == 'custom'
  assert ops.resolve('auto', 'gpu') == 'xla' and ops.resolve('auto', 'tpu') == 'xla'
  assert ops.resolve('xla', 'cpu') == 'xla' and ops.resolve('custom', 'tpu') == 'custom'
  # config.validate refuses any other value (tests/test_config.py).


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [1, 4, 7])
def test_max_pool_custom_equals_xla_and_pytorch_rule(size, stride):
  kx, kg = jax.random.split(jax.random.key(size * 10 + stride))
  x = jax.random.normal(kx, (2, size, size, 3))  # continuous: no ties
  y = ops.max_pool_3x3(x, stride, 'custom')
  np.testing.assert_array_equal(y, ops.max_pool_3x3(x, stride, 'xla'))
  g = jax.random.normal(kg, y.shape)
  ours = jax.vjp(lambda v: ops.max_pool_3x3(v, stride, 'custom'), x)[1](g)[0]
  stock = jax.vjp(lambda v: ops.max_pool_3x3(v, stride, 'xla'), x)[1](g)[0]
  np.testing.assert_allclose(ours, stock, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours, _reference_grad(np.asarray(x), np.asarray(g), stride),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('stride', [1, 2])
def test_max_pool_ties_go_to_first_max_in_window_order(stride):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, (2, 6, 7, 2)).astype(np.float32)  # many ties
  x[0, :, :, 0] = 1.0  # every window a tie
  y = ops.max_pool_3x3(jnp.asarray(x), stride, 'custom')
  g = rng.normal(size=y.shape).astype(np.float32)
  ours = jax.vjp(lambda v: ops.max_pool_3x3(v, stride, 'custom'),
                 jnp.asarray(x))[1](jnp.asarray(g))[0]
  np.testing.assert_allclose(ours, _reference_grad(x, g, stride), rtol=1e-6, atol=1e-6)


def test_max_pool_padding_never_wins():
  x = -1.0 - jnp.arange(16.0).reshape(1, 4, 4, 1)  # all negative: a zero pad would win
  for kernels in ('xla', 'custom'):
    same = ops.max_pool_3x3(x, 1, kernels)
    assert float(same[0, 0, 0, 0]) == -1.0  # max of the 2x2 valid corner window
    assert float(same[0, 3, 3, 0]) == -11.0
    down = ops.max_pool_3x3(x, 2, kernels)
    np.testing.assert_array_equal(np.asarray(down[0, :, :, 0]), [[-1, -2], [-5, -6]])


def _conv_case(hw, k, cin=4, cout=5):
  kx, kk, kb, kg = jax.random.split(jax.random.key(hw * 10 + k), 4)
  return (jax.random.normal(kx, (3, hw, hw, cin)), jax.random.normal(kk, (k, k, cin, cout)),
          jax.random.normal(kb, (cout,)), jax.random.normal(kg, (3, hw, hw, cout)))


@pytest.mark.parametrize('hw,k', [(7, 3), (4, 5), (2, 3), (2, 5), (1, 3), (1, 5), (3, 1)])
def test_conv_custom_equals_xla_values_and_grads(hw, k):
  """im2col forward and gradients, dead taps sliced away: the same math as lax.conv."""
  x, kernel, bias, g = _conv_case(hw, k)
  # Full float32 passes: on GPU/TPU the default precision rounds matmuls and
  # convolutions through TF32/bf16, differently for each, and this compares the math.
  with jax.default_matmul_precision('float32'):
    outs = {kind: jax.vjp(lambda *a, kind=kind: ops.conv(*a, kernels=kind), x, kernel, bias)
            for kind in ('xla', 'custom')}
    grads = {kind: vjp(g) for kind, (_, vjp) in outs.items()}
  np.testing.assert_allclose(outs['custom'][0], outs['xla'][0], rtol=1e-5, atol=1e-5)
  for ours, ref in zip(grads['custom'], grads['xla']):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-5)


def test_conv_1x1_shared_input_splits_like_separate_convs():
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 6))
  weights = [(jax.random.normal(jax.random.key(i), (1, 1, 6, c)), jnp.full((c,), 0.1 * i))
             for i, c in enumerate((3, 4, 2), start=1)]
  with jax.default_matmul_precision('float32'):
    fused = ops.conv_1x1_shared_input(x, weights, kernels='custom')
    separate = ops.conv_1x1_shared_input(x, weights, kernels='xla')
  chex.assert_shape(fused, [(2, 5, 5, 3), (2, 5, 5, 4), (2, 5, 5, 2)])
  chex.assert_trees_all_close(fused, separate, atol=1e-5)


@pytest.mark.parametrize('hw,k', [(6, 3), (2, 3), (3, 5)])  # large and small maps
@pytest.mark.parametrize('stride', [1, 2])
def test_forward_mode_agrees_between_kernels(hw, k, stride):
  """``jvp``, ``jacfwd`` and ``linearize`` through conv and pool: 'custom' equals 'xla'."""
  x, kernel, bias, _ = _conv_case(hw, k)
  x_dot, kernel_dot = jnp.cos(x), jnp.sin(kernel)

  def f(kind, v, kern):
    return ops.max_pool_3x3(ops.conv(v, kern, bias, kernels=kind), stride, kind)

  @functools.partial(jax.jit, static_argnums=0)  # one program each, not ~100 eager ones
  def transforms(kind):
    g = functools.partial(f, kind)
    _, tangent = jax.jvp(g, (x, kernel), (x_dot, kernel_dot))
    _, linear = jax.linearize(g, x, kernel)
    along = lambda t: g(x + t[0] * x_dot, kernel + t[1] * kernel_dot)
    return tangent, linear(x_dot, kernel_dot), jax.jacfwd(along)(jnp.zeros(2))

  with jax.default_matmul_precision('float32'):
    custom, xla = transforms('custom'), transforms('xla')
  assert float(jnp.abs(xla[0]).max()) > 0.1  # a real tangent, not zeros
  chex.assert_trees_all_close(custom, xla, rtol=1e-5, atol=1e-4)
  chex.assert_trees_all_close(custom[1], custom[0], rtol=1e-5, atol=1e-4)  # linearize == jvp
  # jacfwd's two columns are the tangents along each argument alone; they add up to jvp's.
  np.testing.assert_allclose(custom[2].sum(-1), custom[0], rtol=1e-4, atol=1e-4)


def test_second_order_agrees_between_kernels():
  """A Hessian-vector product through conv and pool: reverse-over-reverse works for both."""
  x, kernel, bias, _ = _conv_case(5, 3)
  v = jax.random.normal(jax.random.key(9), kernel.shape)

  def hvp(kind):
    loss = lambda k: jnp.sum(ops.max_pool_3x3(ops.conv(x, k, bias, kernels=kind), 2, kind) ** 2)
    return jax.grad(lambda k: jnp.vdot(jax.grad(loss)(k), v))(kernel)

  with jax.default_matmul_precision('float32'):
    custom, xla = jax.jit(lambda: hvp('custom'))(), jax.jit(lambda: hvp('xla'))()
  assert float(jnp.abs(xla).max()) > 1.0  # a real second-order term, not zeros
  np.testing.assert_allclose(custom, xla, rtol=1e-4, atol=1e-3)


def test_adaptive_avg_pool_matches_pytorch_bins():
  x = jnp.arange(2 * 5 * 3 * 1, dtype=jnp.float32).reshape(2, 5, 3, 1)
  out = ops.adaptive_avg_pool(x, 4)
  chex.assert_shape(out, (2, 4, 4, 1))
  # PyTorch's bins for 5 -> 4 are [0,2), [1,3), [2,4), [3,5); for 3 -> 4: [0,1), [0,2), [1,3), [2,3).
  xs = np.asarray(x[0, :, :, 0])
  assert float(out[0, 1, 1, 0]) == pytest.approx(xs[1:3, 0:2].mean())
  assert float(out[0, 3, 3, 0]) == pytest.approx(xs[3:5, 2:3].mean())


@pytest.mark.parametrize('window, stride, padding, ceil_mode', [
    (3, 2, 0, True), (2, 2, 0, True), (3, 1, 1, True), (3, 2, 1, False), (2, 2, 1, True)])
def test_max_pool_is_pytorchs_in_both_modes(window, stride, padding, ceil_mode):
  """Values and gradient of ``nn.MaxPool2d`` on even and odd sizes; (2, 2, 1, ceil) at 5 is
  the case where PyTorch drops a last window that would start in the right padding."""
  torch = pytest.importorskip('torch')  # the suite runs without PyTorch too (README)
  for size in (5, 6, 7, 14, 15):
    x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3)).astype(np.float32)
    g_shape = (2, ops.pool_output_size(size, window, stride, padding, ceil_mode),
               ops.pool_output_size(size + 1, window, stride, padding, ceil_mode), 3)
    g = np.random.default_rng(size + 1).normal(size=g_shape).astype(np.float32)
    y, vjp = jax.vjp(lambda v: ops.max_pool(v, window, stride, padding, ceil_mode=ceil_mode),
                     jnp.asarray(x))
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, window, stride, padding, ceil_mode=ceil_mode)
    yt.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(y, yt.detach().numpy().transpose(0, 2, 3, 1), err_msg=size)
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], xt.grad.numpy().transpose(0, 2, 3, 1))
  assert ops.pool_output_size(5, 2, 2, 1, ceil_mode=True) == 3  # not (5 + 2 - 2 + 1) // 2 + 1
  assert ops.max_pool(jnp.zeros((1, 2, 5, 1)), 3, 2, ceil_mode=True).shape == (1, 1, 2, 1)
  with pytest.raises(ValueError, match='a 1x5 map is too small for a 3x3 max-pool'):
    ops.max_pool(jnp.zeros((1, 1, 5, 1)), 3, 2, ceil_mode=True)


def test_max_pool_stride_1_padding_1_is_max_pool_3x3():
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  np.testing.assert_array_equal(ops.max_pool(x, 3, 1, 1, ceil_mode=True),
                                ops.max_pool_3x3(x, 1, 'xla'))


def test_dropout_mask_follows_the_examples_key_alone():
  x = jnp.ones((3, 4, 5))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
  y = ops.dropout(x, 0.5, keys)
  assert set(np.unique(np.asarray(y))) == {0.0, 2.0}  # kept values scaled by 1 / keep
  np.testing.assert_array_equal(ops.dropout(x[1:], 0.5, keys[1:]), y[1:])  # batch split
  assert not np.array_equal(y[0], y[1])
  assert ops.dropout(x, 0.5, None) is x and ops.dropout(x, 0.0, keys) is x
