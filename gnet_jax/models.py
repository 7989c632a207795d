"""GoogLeNet (the compact Inception network of *Dive into Deep Learning*) in Flax linen.

Layout is NHWC throughout. Every Conv and Dense kernel is Xavier-uniform
initialised, as the original does with ``nn.init.xavier_uniform_``; biases start
at zero. (PyTorch's own default bias init is uniform in +-1/sqrt(fan_in), so a
freshly built PyTorch model differs from ours in its biases unless they are
copied over, e.g. with ``gnet_jax.interop``.)
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()

# (c1, (c2_reduce, c2), (c3_reduce, c3), c4) of each Inception block, per stage.
B3_BLOCKS = ((64, (96, 128), (16, 32), 32), (128, (128, 192), (32, 96), 64))
B4_BLOCKS = (
    (192, (96, 208), (16, 48), 64),
    (160, (112, 224), (24, 64), 64),
    (128, (128, 256), (24, 64), 64),
    (112, (144, 288), (32, 64), 64),
    (256, (160, 320), (32, 128), 128),
)
B5_BLOCKS = ((256, (160, 320), (32, 128), 128), (384, (192, 384), (48, 128), 128))
# Inception blocks of b4 (1-based) whose outputs feed the auxiliary heads.
AUX_TAPS = (1, 4)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  # The elementwise maximum of the 9 views is one loop fusion; XLA:CPU's
  # reduce-window, which nn.max_pool becomes, was slower in the train step.
  return functools.reduce(jnp.maximum, _window_views(x, stride))


def _max_pool_3x3_fwd(x, stride):
  views = _window_views(x, stride)
  y = functools.reduce(jnp.maximum, views)
  # Window offset (0..8) of each output's first maximum in window order, the
  # element PyTorch's max-pool routes the gradient to. int8 keeps the residual
  # at a quarter of y's size.
  first = jnp.full(y.shape, 8, jnp.int8)
  for k in range(7, -1, -1):
    first = jnp.where(views[k] == y, jnp.int8(k), first)
  return y, (first, x.shape)


def _max_pool_3x3_bwd(stride, residuals, g):
  """Each input sums the gradients of the outputs whose first maximum it is.

  XLA:CPU lowers the stock gradient (select-and-scatter) to reduce-window +
  iota + scatter, about a third of a 96x96 training step. Here it is
  elementwise: 9 shifted reads of the spread-out output gradient and window
  offsets, compared and summed in one loop fusion.
  """
  first, (_, h, w, _) = residuals
  ho, wo = g.shape[1:3]
  # Output o reads padded input q = stride * o + d at offset d. Spread the
  # outputs `stride` apart and pad by 2: then input i (q = i + 1) meets the
  # output that read it at offset d at index i + 3 - d.
  spread = ((0, 0, 0), (2, h + 1 - stride * (ho - 1), stride - 1),
            (2, w + 1 - stride * (wo - 1), stride - 1), (0, 0, 0))
  g_spread = jax.lax.pad(g, jnp.zeros((), g.dtype), spread)
  first_spread = jax.lax.pad(first, jnp.int8(-1), spread)
  # Materialise the two padded arrays: fused into the sum below, each of its
  # 9 reads would re-evaluate the padding bounds (1.12x slower step at 96x96).
  g_spread, first_spread = jax.lax.optimization_barrier((g_spread, first_spread))
  dx = None
  for di in range(3):
    for dj in range(3):
      window = (slice(None), slice(3 - di, 3 - di + h), slice(3 - dj, 3 - dj + w))
      term = jnp.where(first_spread[window] == 3 * di + dj, g_spread[window], 0)
      dx = term if dx is None else dx + term
  return (dx,)


_max_pool_3x3.defvjp(_max_pool_3x3_fwd, _max_pool_3x3_bwd)


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """3x3 max-pool with padding 1, as ``nn.MaxPool2d(3, stride, padding=1)``.

  Same values as ``nn.max_pool``; forward and gradient are hand-written (see
  ``_max_pool_3x3_bwd``) because XLA:CPU's own are slow.
  """
  return _max_pool_3x3(x, stride)


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      kernel_init=xavier_uniform,
      bias_init=nn.initializers.zeros,
      dtype=dtype,
      name=name,
  )


class ConvParams(nn.Module):
  """The kernel and bias of a stride-1 'same' ``conv`` (same names, shapes and init), unapplied.

  Lets a parent apply several convolutions that read the same input as one.
  """

  features: int
  kernel: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    k = self.param('kernel', xavier_uniform, (self.kernel, self.kernel, in_features, self.features))
    return k, self.param('bias', nn.initializers.zeros, (self.features,))


def _lax_conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((ph, ph), (pw, pw)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _im2col_conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  kh, kw, cin, cout = kernel.shape
  return jax.lax.dot_general(_patches(x, kh, kw), kernel.reshape(kh * kw * cin, cout),
                             (((3,), (0,)), ((), ())))


def _patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """im2col for a stride-1 'same' conv: [N, H, W, kh*kw*C], taps in HWIO order."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                         axis=-1)


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 convolution with 'same' padding (odd kernel), NHWC x HWIO -> NHWC.

  Same values as ``lax.conv_general_dilated``. On maps not larger than the
  kernel the forward pass and the input gradient are matrix products over
  im2col patches, because XLA:CPU swaps the operands of such convolutions and
  runs them slowly; elsewhere XLA's own convolutions are used. (An earlier
  version also computed the kernel gradient over im2col patches; inside the
  whole train step, with this project's CPU flags, XLA's own was faster.)
  """
  if _map_larger_than_kernel(x, kernel):
    return _lax_conv_same(x, kernel)
  return _im2col_conv_same(x, kernel)


def _map_larger_than_kernel(x: jax.Array, kernel: jax.Array) -> bool:
  # XLA swaps the operands of a convolution whose kernel is not smaller than
  # its input (here: 3x3 on 2x2, 5x5 on 4x4), which is slow on CPU.
  return x.shape[1] > kernel.shape[0] and x.shape[2] > kernel.shape[1]


def _conv_same_fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _conv_same_bwd(residuals, g):
  x, kernel = residuals
  # XLA's own kernel gradient: measured inside the whole train step it beats
  # dW as one matmul over im2col patches (1.10x at 96x96, 1.03x at 28x28),
  # the patches being a 9x/25x copy of the input.
  dkernel = jax.vjp(lambda k: _lax_conv_same(x, k), kernel)[1](g)[0]
  if _map_larger_than_kernel(x, kernel):  # XLA's own input gradient is fast here (1.1x at 96)
    dx = jax.vjp(lambda v: _lax_conv_same(v, kernel), x)[1](g)[0]
  else:  # the 'same' conv of g with the kernel flipped in space and in/out swapped
    dx = _im2col_conv_same(g, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def apply_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Dtype) -> jax.Array:
  """What ``nn.Conv`` (stride 1, 'same' padding) computes with these parameters.

  Kernel taps that can only ever read padding (a 5x5 kernel on a 2x2 map, say)
  are sliced away first: they add exact zeros, and their gradient is zero
  either way, so the result is unchanged and the work shrinks.
  """
  x, kernel, bias = (a.astype(dtype) for a in (x, kernel, bias))
  kh, kw = kernel.shape[:2]
  live_h, live_w = min(kh // 2, x.shape[1] - 1), min(kw // 2, x.shape[2] - 1)
  kernel = kernel[kh // 2 - live_h:kh // 2 + live_h + 1, kw // 2 - live_w:kw // 2 + live_w + 1]
  if kernel.shape[:2] == (1, 1):
    y = jnp.einsum('nhwc,co->nhwo', x, kernel[0, 0])  # a 1x1 conv is a matmul
  else:
    y = conv_same(x, kernel)
  return y + bias


class Inception(nn.Module):
  """Four parallel branches over one input, concatenated on the channel axis.

  Conv names follow the d2l PyTorch module (``p1_1``, ``p2_1``, ``p2_2``,
  ``p3_1``, ``p3_2``, ``p4_2``) so weights map one to one.
  """

  c1: int
  c2: tuple[int, int]
  c3: tuple[int, int]
  c4: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dtype
    # p1_1, p2_1 and p3_1 all read x: run them as one 1x1 convolution (fewer,
    # larger matmuls, x read once) and split the result. Each keeps its own
    # parameters under its own name, so the parameter tree is unchanged.
    widths = (self.c1, self.c2[0], self.c3[0])
    fused = [ConvParams(c, 1, name=n)(x.shape[-1]) for c, n in zip(widths, ('p1_1', 'p2_1', 'p3_1'))]
    y = nn.relu(apply_conv(x, *(jnp.concatenate(t, axis=-1) for t in zip(*fused)), dtype=d))
    p1, p2, p3 = jnp.split(y, np.cumsum(widths)[:2], axis=-1)
    p2 = nn.relu(apply_conv(p2, *ConvParams(self.c2[1], 3, name='p2_2')(p2.shape[-1]), dtype=d))
    p3 = nn.relu(apply_conv(p3, *ConvParams(self.c3[1], 5, name='p3_2')(p3.shape[-1]), dtype=d))
    p4 = nn.relu(conv(self.c4, 1, 'p4_2', d)(max_pool_3x3(x, 1)))
    return jnp.concatenate([p1, p2, p3, p4], axis=-1)


class Stem(nn.Module):
  """Stages b1 and b2: plain convolutions and pooling before the Inception stages."""

  stage: int  # 1 or 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.stage == 1:
      x = nn.relu(conv(64, 7, 'conv', self.dtype, stride=2)(x))
    else:
      x = nn.relu(conv(64, 1, 'conv1', self.dtype)(x))
      x = nn.relu(apply_conv(x, *ConvParams(192, 3, name='conv2')(x.shape[-1]), dtype=self.dtype))
    return max_pool_3x3(x, 2)


class InceptionStage(nn.Module):
  """A run of Inception blocks, then either a stride-2 max-pool or global average pool.

  Returns the stage output and the outputs of the blocks listed in ``taps``
  (for the auxiliary heads).
  """

  blocks: Sequence[tuple]
  final: str  # 'max_pool' or 'global_avg_pool'
  taps: Sequence[int] = ()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    tapped = []
    for i, (c1, c2, c3, c4) in enumerate(self.blocks, start=1):
      x = Inception(c1, c2, c3, c4, dtype=self.dtype, name=f'inception{i}')(x)
      if i in self.taps:
        tapped.append(x)
    if self.final == 'max_pool':
      x = max_pool_3x3(x, 2)
    else:
      x = jnp.mean(x, axis=(1, 2))
    return x, tapped


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """``nn.AdaptiveAvgPool2d(out)`` for NHWC: averages over the same bins PyTorch uses.

  Written by hand because Flax has no adaptive pool; bins are
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


class AuxHead(nn.Module):
  """Auxiliary classifier of the original GoogLeNet (used only in training).

  Dropout masks are drawn per example from ``example_keys`` rather than from a
  module RNG stream, so the mask an example gets does not depend on how the
  batch is split across devices.
  """

  num_classes: int
  dropout_rate: float = 0.7
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, example_keys: jax.Array | None) -> jax.Array:
    x = adaptive_avg_pool(x, 4)
    x = nn.relu(conv(128, 1, 'conv', self.dtype)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(1024, kernel_init=xavier_uniform, dtype=self.dtype, name='fc1')(x))
    if example_keys is not None and self.dropout_rate > 0:
      keep = 1.0 - self.dropout_rate
      mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(example_keys)
      x = jnp.where(mask, x / keep, 0).astype(x.dtype)
    return nn.Dense(self.num_classes, kernel_init=xavier_uniform, dtype=self.dtype, name='fc2')(x)


class GoogLeNet(nn.Module):
  """The d2l GoogLeNet: b1..b5 then a Dense classifier.

  ``aux_heads=True`` adds the two auxiliary classifiers (on b4's first and fourth
  Inception outputs); they only exist in the parameter tree when enabled and
  are only computed when ``train=True``.
  """

  num_classes: int = 10
  aux_heads: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_keys: jax.Array | None = None):
    """Returns logits, or ``(logits, [aux1, aux2])`` when training with aux heads."""
    d = self.dtype
    x = x.astype(d)
    x = Stem(1, dtype=d, name='b1')(x)
    x = Stem(2, dtype=d, name='b2')(x)
    x, _ = InceptionStage(B3_BLOCKS, 'max_pool', dtype=d, name='b3')(x)
    x, taps = InceptionStage(B4_BLOCKS, 'max_pool', taps=AUX_TAPS if self.aux_heads else (),
                             dtype=d, name='b4')(x)
    x, _ = InceptionStage(B5_BLOCKS, 'global_avg_pool', dtype=d, name='b5')(x)
    logits = nn.Dense(self.num_classes, kernel_init=xavier_uniform, dtype=d, name='head')(x)
    logits = logits.astype(jnp.float32)
    if not self.aux_heads:
      return logits
    heads = [AuxHead(self.num_classes, dtype=d, name=f'aux{i}') for i in (1, 2)]
    if not train and not self.is_initializing():
      return logits
    keys = [None, None] if example_keys is None else [
        jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(example_keys) for i in (1, 2)]
    aux = [h(t, k).astype(jnp.float32) for h, t, k in zip(heads, taps, keys)]
    return logits, aux


def _xavier_uniform_np(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Xavier/Glorot uniform for an HWIO conv or (in, out) dense kernel.

  Sampled with NumPy on purpose: compiling threefry sampling for ~130 leaves
  costs 15-25 s on a small CPU, this costs well under a second. Same bound
  as ``nn.initializers.xavier_uniform`` and PyTorch's ``xavier_uniform_``.
  """
  receptive = int(np.prod(shape[:-2]))
  fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
  bound = np.sqrt(6.0 / (fan_in + fan_out))
  return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def init_params(model: GoogLeNet, seed: int, image_shape: Sequence[int]) -> dict:
  """Xavier-uniform kernels and zero biases for ``model`` at ``image_shape`` (H, W, C).

  Same distributions as ``model.init``, but without tracing the forward pass
  for values: shapes come from ``jax.eval_shape``. Each leaf gets its own NumPy
  generator seeded by ``(seed, leaf index)``, so the result depends only on the
  seed, never on the device count or backend. Returns host (NumPy) arrays.
  """
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  values = []
  for index, (path, leaf) in enumerate(leaves):
    name = getattr(path[-1], 'key', str(path[-1]))
    if name == 'kernel':
      values.append(_xavier_uniform_np(np.random.default_rng([seed, index]), leaf.shape))
    elif name == 'bias':
      values.append(np.zeros(leaf.shape, np.float32))
    else:
      raise ValueError(f'no initializer for parameter {jax.tree_util.keystr(path)}')
  return treedef.unflatten(values)


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def summary(model: GoogLeNet, image_shape: Sequence[int]) -> str:
  """A per-stage table of output shapes, parameters and FLOPs (``nn.tabulate``)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  tab = nn.tabulate(model, jax.random.key(0), depth=1, compute_flops=True,
                    console_kwargs={'width': 140, 'force_terminal': False})
  return tab(x)
