"""The network's pooling and convolution kernels, each in two formulations.

``xla``: XLA's stock ops (``lax.reduce_window`` max-pool, ``lax.conv``). They
support every transformation (``jax.jvp``, ``jacfwd``, second order) and are
what XLA tunes on GPU and TPU.

``custom``: hand-written forms that run faster on XLA:CPU (measured in
docs/performance.md): a max-pool whose forward pass is one elementwise fusion
and whose gradient avoids select-and-scatter, 'same' convolutions as im2col
matmuls on maps not larger than their kernel, the three 1x1 convolutions that
read an Inception block's input as one matmul, and dead kernel taps sliced
away. The max-pool and the small-map convolution are ``jax.custom_jvp``
functions whose tangent is a linear map of stock ops chosen so that JAX's own
transposition of it is the fast gradient. So they support every transformation
the stock ops do (forward and reverse mode, ``vmap``, any order), with the
same values (tested in ``tests/test_ops.py`` and ``tests/test_transformations.py``).

``auto`` (the default) picks ``custom`` on CPU and ``xla`` elsewhere. Both give
the same values and gradients up to float32 rounding (tested).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp


def resolve(kernels: str, backend: str | None = None) -> str:
  """``'xla'`` or ``'custom'`` for a ``kernels`` setting on ``backend`` (default: JAX's).

  ``kernels`` is ``config.kernels``, whose allowed values ``config.RULES`` checks.
  """
  if kernels == 'auto':
    return 'custom' if (backend or jax.default_backend()) == 'cpu' else 'xla'
  return kernels


# ----------------------------------------------------------------------------- max-pool


def _window_views(x: jax.Array, stride: int) -> list[jax.Array]:
  """The 9 strided views of ``x`` (padded by 1 with -inf) that a 3x3 window reads.

  View ``3 * di + dj`` holds, for every output position, the input element at
  window offset ``(di, dj)``; the views come in PyTorch's window order (row by
  row). Padding with -inf means padding never wins a maximum, as in PyTorch.
  """
  n, h, w, c = x.shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  xp = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 0)))
  return [jax.lax.slice(xp, (0, di, dj, 0),
                        (n, di + stride * (ho - 1) + 1, dj + stride * (wo - 1) + 1, c),
                        (1, stride, stride, 1))
          for di in range(3) for dj in range(3)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool_3x3_custom(x: jax.Array, stride: int) -> jax.Array:
  # The elementwise maximum of the 9 views is one loop fusion; XLA:CPU's
  # reduce-window was slower in the train step.
  return functools.reduce(jnp.maximum, _window_views(x, stride))


def _first_max_offsets(views: list[jax.Array], y: jax.Array) -> jax.Array:
  """Window offset (0..8) of each output's first maximum in window order.

  That is the element PyTorch's max-pool routes the gradient to. int8 keeps it
  at a quarter of ``y``'s size.
  """
  first = jnp.full(y.shape, 8, jnp.int8)
  for k in range(7, -1, -1):
    first = jnp.where(views[k] == y, jnp.int8(k), first)
  return first


def _spread(stride: int, h: int, w: int, ho: int, wo: int):
  """Padding that puts output ``o`` at ``2 + stride * o`` on an ``(h + 4) x (w + 4)`` grid.

  Output ``o`` reads padded input ``q = stride * o + d`` at window offset ``d``,
  so on this grid input ``i`` (``q = i + 1``) meets the output that read it at
  offset ``d`` at index ``i + 3 - d``: nine plain shifts, no strides.
  """
  return ((0, 0, 0), (2, h + 1 - stride * (ho - 1), stride - 1),
          (2, w + 1 - stride * (wo - 1), stride - 1), (0, 0, 0))


@_max_pool_3x3_custom.defjvp
def _max_pool_jvp(stride, primals, tangents):
  (x,), (x_dot,) = primals, tangents
  views = _window_views(x, stride)
  y = functools.reduce(jnp.maximum, views)
  return y, _max_pool_tangent(x_dot, _first_max_offsets(views, y), stride)


def _max_pool_tangent(x_dot: jax.Array, first: jax.Array, stride: int) -> jax.Array:
  """Each output's tangent is the input tangent at its first maximum.

  Written as the transpose of the gradient we want, so that reverse mode (JAX
  transposes this linear map) is elementwise: XLA:CPU lowers the stock gradient
  (select-and-scatter) to reduce-window + iota + scatter, about a third of a
  96x96 training step. Transposed, this reads: spread the output gradient onto
  the grid of ``_spread`` once, then each input sums the 9 shifted gradients
  whose first maximum it is, in one loop fusion.
  """
  n, h, w, c = x_dot.shape
  ho, wo = first.shape[1:3]
  spread = _spread(stride, h, w, ho, wo)
  first_spread = jax.lax.pad(first, jnp.int8(-1), spread)
  grid_h, grid_w = first_spread.shape[1:3]
  total = None
  for di in range(3):
    for dj in range(3):
      # Placing x_dot at offset (3 - di, 3 - dj) transposes to reading window (di, dj).
      placed = jax.lax.pad(x_dot, jnp.zeros((), x_dot.dtype),
                           ((0, 0, 0), (3 - di, grid_h - 3 + di - h, 0),
                            (3 - dj, grid_w - 3 + dj - w, 0), (0, 0, 0)))
      term = jnp.where(first_spread == 3 * di + dj, placed, jnp.zeros((), x_dot.dtype))
      total = term if total is None else total + term
  # Transposed, this barrier materialises the spread gradient: fused into the sum,
  # each of its 9 reads would re-evaluate the padding bounds (1.12x slower step at 96x96).
  total = jax.lax.optimization_barrier(total)
  # The transpose of spreading the outputs: take every stride-th element from 2 on.
  return jax.lax.slice(total, (0, 2, 2, 0),
                       (n, 3 + stride * (ho - 1), 3 + stride * (wo - 1), c),
                       (1, stride, stride, 1))


def max_pool_3x3(x: jax.Array, stride: int, kernels: str = 'auto') -> jax.Array:
  """3x3 max-pool with padding 1 (never chosen), as ``nn.MaxPool2d(3, stride, padding=1)``."""
  if resolve(kernels) == 'custom':
    return _max_pool_3x3_custom(x, stride)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, stride, stride, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


def pool_output_size(size: int, window: int, stride: int, padding: int = 0,
                     ceil_mode: bool = False) -> int:
  """PyTorch's pooled length: ``nn.MaxPool2d``'s formula, with ``ceil_mode``'s exception.

  In ceil mode the last window may hang over the padded end, but it must start
  inside the input or its left padding, or PyTorch drops it.
  """
  span = size + 2 * padding - window
  out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
  if ceil_mode and (out - 1) * stride >= size + padding:
    out -= 1
  return out


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0, *,
             ceil_mode: bool = False) -> jax.Array:
  """``nn.MaxPool2d(window, stride, padding, ceil_mode=...)`` for NHWC, any input size.

  Explicit -inf padding: ``padding`` on both sides, and on the far side as much
  more as the windows that ceil mode adds reach (Flax's 'SAME' agrees with
  neither PyTorch mode on odd sizes). XLA's ``reduce_window``, so every
  transformation works.
  """
  pads = [(0, 0)]
  for size in x.shape[1:3]:
    out = pool_output_size(size, window, stride, padding, ceil_mode)
    if out < 1:
      raise ValueError(f'a {x.shape[1]}x{x.shape[2]} map is too small for a {window}x{window} '
                       f'max-pool (stride {stride}, padding {padding}): no output, as in PyTorch')
    pads.append((padding, (out - 1) * stride + window - size - padding))
  pads.append((0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), pads)


# ----------------------------------------------------------------------------- convolution


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((ph, ph), (pw, pw)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """im2col for a stride-1 'same' conv: [N, H, W, kh*kw*C], taps in HWIO order."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                         axis=-1)


def _im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  kh, kw, cin, cout = kernel.shape
  return jax.lax.dot_general(_patches(x, kh, kw), kernel.reshape(kh * kw * cin, cout),
                             (((3,), (0,)), ((), ())))


def _map_larger_than_kernel(x: jax.Array, kernel: jax.Array) -> bool:
  # XLA swaps the operands of a convolution whose kernel is not smaller than
  # its input (here: 3x3 on 2x2, 5x5 on 4x4), which is slow on CPU.
  return x.shape[1] > kernel.shape[0] and x.shape[2] > kernel.shape[1]


@jax.custom_jvp
def _conv_same_custom(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' convolution: XLA's own on large maps, im2col matmuls on small ones."""
  return _conv_same_by_map_size(x, kernel)


def _conv_same_by_map_size(x: jax.Array, kernel: jax.Array) -> jax.Array:
  if _map_larger_than_kernel(x, kernel):
    return _lax_conv(x, kernel)
  return _im2col_conv(x, kernel)


@_conv_same_custom.defjvp
def _conv_same_jvp(primals, tangents):
  (x, kernel), (x_dot, kernel_dot) = primals, tangents
  # Linear in each tangent; JAX transposes these two terms into the gradient:
  # the input's through the same form as the forward pass (XLA's own conv
  # gradient on large maps, 1.1x at 96x96; a matmul on small ones), the
  # kernel's always through XLA's own kernel gradient, which beat dW as one
  # matmul over im2col patches inside the train step (1.10x at 96x96), the
  # patches being a 9x/25x copy.
  y_dot = _conv_same_by_map_size(x_dot, kernel) + _lax_conv(x, kernel_dot)
  return _conv_same_custom(x, kernel), y_dot


def _live_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``kernel`` without the taps that can only ever read padding (5x5 on a 2x2 map, say).

  They add exact zeros and get a zero gradient either way, so slicing them off
  changes no value and shrinks the work.
  """
  kh, kw = kernel.shape[:2]
  live_h, live_w = min(kh // 2, x.shape[1] - 1), min(kw // 2, x.shape[2] - 1)
  return kernel[kh // 2 - live_h:kh // 2 + live_h + 1, kw // 2 - live_w:kw // 2 + live_w + 1]


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *, stride: int = 1,
         dtype=jnp.float32, kernels: str = 'auto') -> jax.Array:
  """``nn.Conv`` with padding ``k // 2`` (PyTorch's ``padding=k // 2``): NHWC x HWIO + bias.

  ``bias=None``: no bias (a convolution followed by BatchNorm).
  """
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if stride != 1 or resolve(kernels) == 'xla':
    y = _lax_conv(x, kernel, stride)
  else:
    kernel = _live_taps(x, kernel)
    if kernel.shape[:2] == (1, 1):
      y = jnp.einsum('nhwc,co->nhwo', x, kernel[0, 0])  # a 1x1 conv is a matmul
    else:
      y = _conv_same_custom(x, kernel)
  return y if bias is None else y + bias.astype(dtype)


def conv_1x1_shared_input(x: jax.Array, weights: Sequence[tuple[jax.Array, jax.Array]], *,
                          dtype=jnp.float32, kernels: str = 'auto') -> list[jax.Array]:
  """Several 1x1 convolutions of the same ``x``, one output per ``(kernel, bias)``.

  ``custom`` runs them as one matmul over the concatenated kernels (fewer,
  larger matmuls, ``x`` read once) and splits the result; ``xla`` runs each.
  """
  if resolve(kernels) == 'xla':
    return [conv(x, k, b, dtype=dtype, kernels='xla') for k, b in weights]
  kernel = jnp.concatenate([k for k, _ in weights], axis=-1)
  bias = None if weights[0][1] is None else jnp.concatenate([b for _, b in weights], axis=-1)
  y = conv(x, kernel, bias, dtype=dtype, kernels='custom')
  splits, total = [], 0
  for k, _ in weights[:-1]:
    total += k.shape[-1]
    splits.append(total)
  return jnp.split(y, splits, axis=-1)


# ----------------------------------------------------------------------------- average pool


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """``nn.AdaptiveAvgPool2d(out)`` for NHWC: averages over the same bins PyTorch uses.

  Written here because neither Flax nor lax has an adaptive pool; bins are
  [floor(i*H/out), ceil((i+1)*H/out)), so inputs smaller than ``out`` work too.
  """
  def pool_axis(x, axis):
    size = x.shape[axis]
    parts = []
    for i in range(out):
      lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
      parts.append(jnp.mean(jax.lax.slice_in_dim(x, lo, hi, axis=axis), axis=axis, keepdims=True))
    return jnp.concatenate(parts, axis=axis)

  return pool_axis(pool_axis(x, 1), 2)


# ----------------------------------------------------------------------------- dropout


def dropout(x: jax.Array, rate: float, example_keys: jax.Array | None) -> jax.Array:
  """Inverted dropout whose mask for example ``i`` comes from ``example_keys[i]`` alone.

  Not Flax's ``nn.Dropout`` (one 'dropout' key per call): a per-example key
  makes an example's mask independent of how the batch is split across
  devices, so 1 and 4 devices train alike. ``example_keys=None`` (evaluation)
  or ``rate=0`` leaves ``x`` unchanged.
  """
  if example_keys is None or rate <= 0:
    return x
  keep = 1.0 - rate
  mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(example_keys)
  return jnp.where(mask, x / keep, 0).astype(x.dtype)
