"""GoogLeNet (the compact Inception network of *Dive into Deep Learning*) in Flax linen.

Modules only, NHWC throughout; ``Inception`` and ``AuxHead`` also serve
torchvision's GoogLeNet (``gnet_jax.inception_v1``) with its conv unit. The
pooling and convolution arithmetic lives in ``gnet_jax.ops`` (``kernels`` picks
XLA's stock ops or the hand-written CPU forms); initial weights come from
``gnet_jax.state.init_params``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gnet_jax import ops

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


class Conv(nn.Module):
  """A square convolution padded by ``k // 2`` then ReLU: every d2l conv, a *conv unit*.

  Same parameters (``kernel`` HWIO, ``bias``) as ``nn.Conv``. A conv unit has
  ``weights`` (what ``ops`` convolves with, so a parent can hand several that read
  one input to ``ops`` together) and ``activate`` (what follows the convolution).
  """

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'
  use_bias: bool = True

  @nn.compact
  def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    k = self.kernel_size
    kernel = self.param('kernel', xavier_uniform, (k, k, in_features, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,)) if self.use_bias else None
    return kernel, bias

  def activate(self, y: jax.Array) -> jax.Array:
    return nn.relu(y)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.activate(ops.conv(x, *self.weights(x.shape[-1]), stride=self.stride,
                                  dtype=self.dtype, kernels=self.kernels))


class Inception(nn.Module):
  """Four parallel branches over one input, concatenated on the channel axis.

  Conv names follow the d2l PyTorch module (``p1_1`` ... ``p4_2``) so weights
  map one to one; ``unit``, ``c3_kernel`` and ``names`` make it torchvision's.
  """

  c1: int
  c2: tuple[int, int]
  c3: tuple[int, int]
  c4: int
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'
  unit: Any = Conv  # the conv unit class (``Conv``; torchvision's adds BatchNorm)
  c3_kernel: int = 5  # branch 3's "5x5" (torchvision's GoogLeNet has 3x3 there)
  names: tuple[str, ...] = ('p1_1', 'p2_1', 'p2_2', 'p3_1', 'p3_2', 'p4_2')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, n = functools.partial(self.unit, dtype=self.dtype, kernels=self.kernels), self.names
    first = [conv(self.c1, 1, name=n[0]), conv(self.c2[0], 1, name=n[1]),
             conv(self.c3[0], 1, name=n[3])]
    # Branches 1-3 open with a 1x1 conv of x; ops may run the three as one matmul.
    p1, p2, p3 = (c.activate(y) for c, y in zip(first, ops.conv_1x1_shared_input(
        x, [c.weights(x.shape[-1]) for c in first], dtype=self.dtype, kernels=self.kernels)))
    # Path 1: 1x1. Path 2: 1x1 then 3x3. Path 3: 1x1 then 5x5. Path 4: 3x3 max-pool then 1x1.
    p2 = conv(self.c2[1], 3, name=n[2])(p2)
    p3 = conv(self.c3[1], self.c3_kernel, name=n[4])(p3)
    p4 = conv(self.c4, 1, name=n[5])(ops.max_pool_3x3(x, 1, self.kernels))
    return jnp.concatenate([p1, p2, p3, p4], axis=-1)


class Stem(nn.Module):
  """Stages b1 and b2: plain convolutions and pooling before the Inception stages."""

  stage: int  # 1 or 2
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv, dtype=self.dtype, kernels=self.kernels)
    if self.stage == 1:
      x = conv(64, 7, stride=2, name='conv')(x)
    else:
      x = conv(192, 3, name='conv2')(conv(64, 1, name='conv1')(x))
    return ops.max_pool_3x3(x, 2, self.kernels)


class InceptionStage(nn.Module):
  """A run of Inception blocks, then a stride-2 max-pool or the global average pool.

  Returns the stage output and the outputs of the blocks listed in ``taps``
  (for the auxiliary heads).
  """

  blocks: Sequence[tuple]
  final: str  # 'max_pool' or 'global_avg_pool'
  taps: Sequence[int] = ()
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    tapped = []
    for i, (c1, c2, c3, c4) in enumerate(self.blocks, start=1):
      x = Inception(c1, c2, c3, c4, self.dtype, self.kernels, name=f'inception{i}')(x)
      if i in self.taps:
        tapped.append(x)
    if self.final == 'max_pool':
      return ops.max_pool_3x3(x, 2, self.kernels), tapped
    return jnp.mean(x, axis=(1, 2)), tapped


class AuxHead(nn.Module):
  """Auxiliary classifier of the original GoogLeNet (used only in training).

  Dropout masks are drawn per example from ``example_keys`` rather than from a
  module RNG stream, so the mask an example gets does not depend on how the
  batch is split across devices. ``channels_first``: flatten in NCHW order, as
  torchvision does, so that ``fc1``'s weight maps one to one.
  """

  num_classes: int
  dropout_rate: float = 0.7
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'
  unit: Any = Conv
  channels_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, example_keys: jax.Array | None) -> jax.Array:
    x = ops.adaptive_avg_pool(x, 4)
    x = self.unit(128, 1, dtype=self.dtype, kernels=self.kernels, name='conv')(x)
    x = (x.transpose(0, 3, 1, 2) if self.channels_first else x).reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(1024, kernel_init=xavier_uniform, dtype=self.dtype, name='fc1')(x))
    x = ops.dropout(x, self.dropout_rate, example_keys)
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
  kernels: str = 'auto'  # see gnet_jax.ops

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_keys: jax.Array | None = None):
    """Returns logits, or ``(logits, [aux1, aux2])`` when training with aux heads."""
    d, k = self.dtype, self.kernels
    x = Stem(1, d, k, name='b1')(x.astype(d))
    x = Stem(2, d, k, name='b2')(x)
    x, _ = InceptionStage(B3_BLOCKS, 'max_pool', (), d, k, name='b3')(x)
    x, taps = InceptionStage(B4_BLOCKS, 'max_pool', AUX_TAPS if self.aux_heads else (), d, k,
                             name='b4')(x)
    x, _ = InceptionStage(B5_BLOCKS, 'global_avg_pool', (), d, k, name='b5')(x)
    logits = nn.Dense(self.num_classes, kernel_init=xavier_uniform, dtype=d, name='head')(x)
    logits = logits.astype(jnp.float32)
    if not self.aux_heads:
      return logits
    heads = [AuxHead(self.num_classes, dtype=d, kernels=k, name=f'aux{i}') for i in (1, 2)]
    if not train and not self.is_initializing():
      return logits
    keys = [None, None] if example_keys is None else [
        jax.vmap(lambda key, i=i: jax.random.fold_in(key, i))(example_keys) for i in (1, 2)]
    aux = [h(t, key).astype(jnp.float32) for h, t, key in zip(heads, taps, keys)]
    return logits, aux


def summary(model: GoogLeNet, image_shape: Sequence[int]) -> str:
  """A per-stage table of output shapes, parameters and FLOPs (``nn.tabulate``)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  tab = nn.tabulate(model, jax.random.key(0), depth=1, compute_flops=True,
                    console_kwargs={'width': 140, 'force_terminal': False})
  return tab(x)
