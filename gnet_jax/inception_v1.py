"""torchvision's GoogLeNet (Inception v1) in Flax linen, and its weights both ways.

``InceptionV1`` is ``torchvision.models.googlenet`` layer for layer: every
convolution without bias, then BatchNorm (eps 1e-3) and ReLU; max-pools in
ceil mode; the Inception "5x5" branch with the 3x3 kernel torchvision actually
has (pytorch/vision#906); optional auxiliary heads on 4a and 4d; dropout 0.2
before the classifier; ``transform_input``. It shares ``models.Inception`` and
``models.AuxHead`` with the d2l network, with ``BasicConv`` as their conv unit.
NHWC throughout; the Flax parameter paths spell torchvision's ``state_dict``
keys (``inception3a.branch2.0.conv.weight`` is
``params/inception3a/branch2_0/conv/kernel``), so ``variables_from_torchvision``
and ``variables_to_torchvision`` are a renaming and a transpose per tensor.

A torchvision state dict is read with NumPy only (torch is needed to read or
write the ``.pth`` file, not here). ``imagenet_classes`` gives the 1,000 class
names that ``GoogLeNet_Weights.IMAGENET1K_V1`` classifies into.
"""

from __future__ import annotations

import collections
import functools
import importlib.resources
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gnet_jax import models, ops
from gnet_jax.errors import StateDictError

Dtype = Any

# torchvision's Inception blocks by name; the channel counts are the paper's (and the d2l table's).
BLOCKS = dict(zip(('inception3a', 'inception3b', 'inception4a', 'inception4b', 'inception4c',
                   'inception4d', 'inception4e', 'inception5a', 'inception5b'),
                  models.B3_BLOCKS + models.B4_BLOCKS + models.B5_BLOCKS))
# The top-level layers in the order the input passes them (the aux heads branch off after
# inception4a and inception4d): for "train from this layer onwards".
LAYERS = ('conv1', 'conv2', 'conv3', *BLOCKS, 'fc')
AUX_HEADS = ('aux1', 'aux2')
# The six convolutions of a torchvision Inception block, as Flax names (``branch2.0`` ->
# ``branch2_0``: a Flax name has no dots), in ``models.Inception``'s order.
BRANCHES = ('branch1', 'branch2_0', 'branch2_1', 'branch3_0', 'branch3_1', 'branch4_1')
# ImageNet's channel mean and std, which ``transform_input`` undoes (torchvision's constants).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BatchNorm(nn.Module):
  """BatchNorm over every axis but the last, keeping its statistics as PyTorch does.

  Not ``flax.linen.BatchNorm``: both normalise a batch with its biased variance,
  but PyTorch averages the *unbiased* one (times n / (n - 1), n the values per
  channel) into ``running_var`` and Flax the biased one, so after a training
  step Flax's statistics differ from torchvision's (most in the aux heads' 4x4
  maps, where n is small). Statistics live in the ``batch_stats`` collection as
  ``mean`` and ``var``. ``momentum`` is Flax's (0.9 is PyTorch's 0.1).
  ``axis_name``: under ``pmap`` or ``shard_map`` the batch moments are averaged
  over that axis, so 1 and 4 devices compute the same numbers (under sharded
  ``jit`` they are global already; leave it None).
  """

  use_running_average: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-3
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    xc = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in float32 or wider
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes, n = tuple(range(x.ndim - 1)), x.size // features
      mean = jnp.mean(xc, axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
        n *= jax.lax.psum(1, self.axis_name)
      # Two passes (mean, then the mean squared deviation) as PyTorch, not E[x^2] - E[x]^2.
      var = jnp.mean(jnp.square(xc - mean), axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
      if n < 2:
        raise ValueError(f'BatchNorm needs more than one value per channel to train, got {n} '
                         '(as PyTorch: a batch of one 1x1 map)')
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * (n / (n - 1))
    y = (xc - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


class BasicConv(nn.Module):
  """torchvision's ``BasicConv2d``: convolution without bias (padded ``k // 2``), BatchNorm, ReLU.

  A conv unit for ``models.Inception`` and ``models.AuxHead`` (``weights`` and
  ``activate``, as ``models.Conv``). Parameters ``conv/kernel``, ``bn/scale``,
  ``bn/bias``; statistics ``bn/mean``, ``bn/var``.
  """

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'
  use_running_average: bool = True
  axis_name: str | None = None
  # Inference only: BatchNorm folded into the convolution (``fold_batchnorm``), which then
  # has a bias and no BatchNorm follows it.
  batchnorm_folded: bool = False

  def setup(self):
    self.conv = models.Conv(self.features, self.kernel_size, self.stride, self.dtype,
                            self.kernels, use_bias=self.batchnorm_folded)
    if not self.batchnorm_folded:
      self.bn = BatchNorm(self.use_running_average, axis_name=self.axis_name, dtype=self.dtype)

  def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    return self.conv.weights(in_features)

  def activate(self, y: jax.Array) -> jax.Array:
    return nn.relu(y if self.batchnorm_folded else self.bn(y))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.activate(ops.conv(x, *self.weights(x.shape[-1]), stride=self.stride,
                                  dtype=self.dtype, kernels=self.kernels))


def transform_input(x: jax.Array) -> jax.Array:
  """torchvision's ``transform_input``: ImageNet-normalised input to ``(raw - 0.5) / 0.5``.

  The weights ported from the paper's TensorFlow model expect that range.
  """
  std, mean = np.array(IMAGENET_STD), np.array(IMAGENET_MEAN)  # float64, as torch's Python floats
  return x * (std / 0.5).astype(x.dtype) + ((mean - 0.5) / 0.5).astype(x.dtype)


class InceptionV1(nn.Module):
  """torchvision's ``GoogLeNet``: ``googlenet(aux_logits=..., transform_input=...)`` in Flax.

  Input NHWC (3 channels for ImageNet weights), any size from 15x15. In
  training (``train=True``) BatchNorm normalises with the batch's statistics
  and updates ``batch_stats`` (apply with ``mutable=['batch_stats']``);
  otherwise it uses them. Dropout (0.2 before the classifier, 0.7 in the aux
  heads) runs in training when ``example_keys`` (one key per example, as for
  ``models.GoogLeNet``) is given: per-example keys rather than Flax's 'dropout'
  RNG, so an example's masks do not depend on how the batch is split across
  devices. Without them there is none (a deterministic training step).
  ``frozen_batch_stats`` names top-level layers (``LAYERS``, ``AUX_HEADS``)
  whose BatchNorms use and keep their running statistics in training too, as
  torchvision's layers put in ``eval()`` mode (fine-tuning with frozen layers).

  Returns the logits, or with ``aux_logits`` in training ``(logits, [aux1,
  aux2])``: the d2l ``GoogLeNet``'s order (aux1 on 4a, aux2 on 4d), so the train
  step treats both alike; torchvision returns ``(logits, aux2, aux1)``.
  """

  num_classes: int = 1000
  aux_logits: bool = True
  transform_input: bool = False
  dropout_rate: float = 0.2
  aux_dropout_rate: float = 0.7
  axis_name: str | None = None  # see BatchNorm
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'  # see gnet_jax.ops
  frozen_batch_stats: tuple[str, ...] = ()
  batchnorm_folded: bool = False  # inference with ``fold_batchnorm``'s params (see BasicConv)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_keys: jax.Array | None = None):
    d, k = self.dtype, self.kernels
    unknown = sorted(set(self.frozen_batch_stats) - set(LAYERS + AUX_HEADS))
    if unknown:
      raise ValueError(f'frozen_batch_stats names no layer: {unknown}; the layers are '
                       f'{", ".join(LAYERS + AUX_HEADS)}')

    def unit(layer: str):  # the conv unit of a top-level layer: its BatchNorm trains unless frozen
      return functools.partial(BasicConv, dtype=d, kernels=k, axis_name=self.axis_name,
                               use_running_average=not train or layer in self.frozen_batch_stats,
                               batchnorm_folded=self.batchnorm_folded)

    def conv(features: int, kernel_size: int, layer: str, stride: int = 1) -> BasicConv:
      return unit(layer)(features, kernel_size, stride, name=layer)

    def inception(layer: str) -> models.Inception:
      return models.Inception(*BLOCKS[layer], d, k, unit=unit(layer), c3_kernel=3, names=BRANCHES,
                              name=layer)

    def aux(layer: str) -> models.AuxHead:
      return models.AuxHead(self.num_classes, self.aux_dropout_rate, d, k, unit=unit(layer),
                            channels_first=True, name=layer)

    keys = [None] * 3 if example_keys is None or not train else [  # one stream per dropout
        jax.vmap(lambda key, i=i: jax.random.fold_in(key, i))(example_keys) for i in range(3)]
    aux_heads = self.aux_logits and (train or self.is_initializing())
    x = x.astype(d)
    if self.transform_input:
      x = transform_input(x)
    x = conv(64, 7, 'conv1', stride=2)(x)
    x = ops.max_pool(x, 3, 2, ceil_mode=True)
    x = conv(64, 1, 'conv2')(x)
    x = conv(192, 3, 'conv3')(x)
    x = ops.max_pool(x, 3, 2, ceil_mode=True)
    x = inception('inception3a')(x)
    x = inception('inception3b')(x)
    x = ops.max_pool(x, 3, 2, ceil_mode=True)
    x = inception('inception4a')(x)
    aux1 = aux('aux1')(x, keys[1]) if aux_heads else None
    x = inception('inception4b')(x)
    x = inception('inception4c')(x)
    x = inception('inception4d')(x)
    aux2 = aux('aux2')(x, keys[2]) if aux_heads else None
    x = inception('inception4e')(x)
    x = ops.max_pool(x, 2, 2, ceil_mode=True)
    x = inception('inception5a')(x)
    x = inception('inception5b')(x)
    x = ops.dropout(jnp.mean(x, axis=(1, 2)), self.dropout_rate, keys[0])
    out = jnp.promote_types(d, jnp.float32)  # logits in float32 (float64 for a float64 model)
    logits = nn.Dense(self.num_classes, dtype=d, name='fc')(x).astype(out)
    if not (self.aux_logits and train):
      return logits
    return logits, [aux1.astype(out), aux2.astype(out)]


# ----------------------------------------------------------------------------- weights


def state_dict_shapes(num_classes: int = 1000, aux_logits: bool = True
                      ) -> dict[str, tuple[int, ...]]:
  """Key -> shape of torchvision's ``googlenet(...).state_dict()``, in its order.

  ``num_batches_tracked`` (one per BatchNorm, shape ``()``) included.
  """
  shapes: dict[str, tuple[int, ...]] = {}

  def basic_conv(prefix: str, out: int, inp: int, k: int) -> None:
    shapes[f'{prefix}.conv.weight'] = (out, inp, k, k)
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{prefix}.bn.{name}'] = (out,)
    shapes[f'{prefix}.bn.num_batches_tracked'] = ()

  basic_conv('conv1', 64, 3, 7)
  basic_conv('conv2', 64, 64, 1)
  basic_conv('conv3', 192, 64, 3)
  channels, taps = 192, {}
  for block, (c1, c2, c3, c4) in BLOCKS.items():
    for torch_name, out, inp, k in (
        ('branch1', c1, channels, 1), ('branch2.0', c2[0], channels, 1),
        ('branch2.1', c2[1], c2[0], 3), ('branch3.0', c3[0], channels, 1),
        ('branch3.1', c3[1], c3[0], 3), ('branch4.1', c4, channels, 1)):
      basic_conv(f'{block}.{torch_name}', out, inp, k)
    channels = c1 + c2[1] + c3[1] + c4
    taps[block] = channels
  if aux_logits:
    for head, block in (('aux1', 'inception4a'), ('aux2', 'inception4d')):
      basic_conv(f'{head}.conv', 128, taps[block], 1)
      shapes[f'{head}.fc1.weight'], shapes[f'{head}.fc1.bias'] = (1024, 2048), (1024,)
      shapes[f'{head}.fc2.weight'], shapes[f'{head}.fc2.bias'] = (num_classes, 1024), (num_classes,)
  shapes['fc.weight'], shapes['fc.bias'] = (num_classes, 1024), (num_classes,)
  return shapes


def flax_location(key: str) -> tuple[str, tuple[str, ...]] | None:
  """(collection, path) of a torchvision key in ``InceptionV1``'s variables; None if it has none.

  ``inception3a.branch2.0.bn.running_var`` -> ``('batch_stats', ('inception3a',
  'branch2_0', 'bn', 'var'))``; ``num_batches_tracked`` -> None.
  """
  *modules, leaf = key.split('.')
  path: list[str] = []
  for part in modules:  # a Sequential's index joins its parent's name: branch2.0 -> branch2_0
    if part.isdigit() and path:
      path[-1] += f'_{part}'
    else:
      path.append(part)
  if path and path[-1] == 'bn':
    name = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
            'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var'),
            'num_batches_tracked': None}[leaf]
  else:
    name = {'weight': ('params', 'kernel'), 'bias': ('params', 'bias')}[leaf]
  return None if name is None else (name[0], (*path, name[1]))


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in value.shape) if hasattr(value, 'shape') else np.shape(value)


def _float32(key: str, value: Any) -> np.ndarray:
  """A torch tensor or array-like -> a new float32 NumPy array (torch is not imported)."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if not value.is_floating_point():
      raise StateDictError(f'{key!r} has dtype {value.dtype}; expected floating point')
    value = value.float().numpy()
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.floating):
    raise StateDictError(f'{key!r} has dtype {array.dtype}; expected floating point')
  return np.array(array, dtype=np.float32, copy=True)


def _check(found: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str,
           optional: tuple[str, ...] = ()) -> None:
  """Raises ``StateDictError`` naming the first missing, unexpected and mis-shaped keys."""
  def listed(keys: list[str], shown: Any) -> str:
    more = f' and {len(keys) - 5} more' if len(keys) > 5 else ''
    return ', '.join(shown(k) for k in keys[:5]) + more

  missing = [k for k in expected if k not in found and not k.endswith(optional)]
  extra = [k for k in found if k not in expected]
  wrong = [k for k in expected if k in found and _shape(found[k]) != expected[k]]
  problems = []
  if missing:
    problems.append(f'missing {what}s ' + listed(missing, lambda k: f'{k!r} {expected[k]}'))
  if extra:
    problems.append(f'unexpected {what}s ' + listed(extra, repr))
  if wrong:
    problems.append(listed(wrong, lambda k: f'{k!r} has shape {_shape(found[k])}, '
                           f'expected {expected[k]}'))
  if problems:
    raise StateDictError("not torchvision's GoogLeNet: " + '; '.join(problems))


def state_dict_layout(state_dict: Mapping[str, Any]) -> tuple[int, bool]:
  """``(num_classes, aux_logits)`` of a torchvision GoogLeNet state dict: the model to build."""
  fc = state_dict.get('fc.weight')
  num_classes = _shape(fc)[0] if fc is not None and len(_shape(fc)) == 2 else 1000
  return num_classes, any(k.startswith(('aux1.', 'aux2.')) for k in state_dict)


def variables_from_torchvision(state_dict: Mapping[str, Any]) -> dict:
  """``{'params': ..., 'batch_stats': ...}`` of ``InceptionV1`` from a torchvision state dict.

  With or without the aux heads (build ``InceptionV1(num_classes, aux_logits)``
  from ``state_dict_layout``); ``num_batches_tracked`` may be absent (files from
  before PyTorch 0.4.1) and is dropped. Conv weights OIHW -> HWIO, Linear
  weights transposed, BatchNorm ``weight`` -> ``scale``; new float32 NumPy
  arrays. Another network's state dict raises ``StateDictError`` naming its
  first missing and unexpected keys.
  """
  expected = state_dict_shapes(*state_dict_layout(state_dict))
  _check(state_dict, expected, 'state dict key', optional=('num_batches_tracked',))
  variables: dict = {'params': {}, 'batch_stats': {}}
  for key in expected:
    location = flax_location(key)
    if location is None:
      continue
    collection, path = location
    value = _float32(key, state_dict[key])
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T  # Linear (out, in) -> Dense (in, out)
    node = variables[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return variables


def variables_to_torchvision(variables: Mapping[str, Any], *, num_batches_tracked: int = 0,
                             numpy: bool = False) -> dict[str, Any]:
  """torchvision's GoogLeNet state dict from ``InceptionV1``'s ``params`` and ``batch_stats``.

  Aux heads are written when the tree has them. ``googlenet(num_classes=...,
  aux_logits=...).load_state_dict(..., strict=True)`` accepts the result: an
  ``OrderedDict`` in torchvision's key order of contiguous torch tensors, or of
  NumPy arrays with ``numpy=True`` (no torch needed). Each BatchNorm's
  ``num_batches_tracked`` (which PyTorch reads only with ``momentum=None``) is
  ``num_batches_tracked``.
  """
  if not {'params', 'batch_stats'} <= set(variables):
    raise StateDictError("expected InceptionV1's variables {'params': ..., 'batch_stats': ...}, "
                         f'got a tree with {sorted(variables)}')
  flat = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      flat[(collection, tuple(p.key for p in path))] = leaf
  aux = any(path[0] in ('aux1', 'aux2') for _, path in flat)
  kernel = flat.get(('params', ('fc', 'kernel')))
  num_classes = _shape(kernel)[-1] if kernel is not None else 1000
  shapes = state_dict_shapes(num_classes, aux)
  flax_shapes = {}
  for key, shape in shapes.items():
    location = flax_location(key)
    if location is not None:
      flax_shapes['/'.join((location[0], *location[1]))] = (
          shape[2:] + shape[1::-1] if len(shape) == 4 else shape[::-1])
  _check({'/'.join((c, *p)): v for (c, p), v in flat.items()}, flax_shapes, 'variable')
  state_dict: dict[str, Any] = collections.OrderedDict()
  for key in shapes:
    location = flax_location(key)
    if location is None:
      state_dict[key] = np.array(num_batches_tracked, np.int64)
      continue
    value = np.asarray(flat[location], np.float32)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif value.ndim == 2:
      value = value.T
    state_dict[key] = np.array(value, order='C', copy=True)
  if numpy:
    return state_dict
  import torch  # pylint: disable=import-outside-toplevel
  return collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items())


def fold_batchnorm(variables: Mapping[str, Any], epsilon: float = 1e-3) -> dict:
  """``InceptionV1(batchnorm_folded=True)``'s params from ``{'params', 'batch_stats'}``.

  Each BatchNorm on its running statistics is an affine map per channel,
  ``scale * (y - mean) / sqrt(var + eps) + bias``, so it goes into the
  convolution before it: the kernel times ``s = scale / sqrt(var + eps)`` per
  output channel, and a bias ``bias - mean * s`` (in float64, stored float32).
  For inference (an exported network): one op less per convolution, the same
  logits up to float rounding.
  """
  if not {'params', 'batch_stats'} <= set(variables):
    raise StateDictError("expected InceptionV1's variables {'params': ..., 'batch_stats': ...}, "
                         f'got a tree with {sorted(variables)}')

  def fold(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict:
    if 'bn' in params and 'conv' in params:  # a BasicConv
      bn = params['bn']
      s = np.asarray(bn['scale'], np.float64) / np.sqrt(
          np.asarray(stats['bn']['var'], np.float64) + epsilon)
      kernel = np.asarray(params['conv']['kernel'], np.float64) * s  # HWIO: O is the last axis
      bias = np.asarray(bn['bias'], np.float64) - np.asarray(stats['bn']['mean'], np.float64) * s
      return {'conv': {'kernel': kernel.astype(np.float32), 'bias': bias.astype(np.float32)}}
    return {name: fold(value, stats.get(name, {})) if isinstance(value, Mapping)
            else np.asarray(value) for name, value in params.items()}

  return fold(variables['params'], variables['batch_stats'])


# ----------------------------------------------------------------------------- class names


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
  """The 1,000 ImageNet class names, in the order of the ImageNet weights' logits.

  Shipped with the package (``imagenet_classes.txt``, torchvision's
  ``GoogLeNet_Weights.IMAGENET1K_V1.meta['categories']``), so predicting with
  imported weights needs neither torchvision nor a download.
  """
  text = importlib.resources.files('gnet_jax').joinpath('imagenet_classes.txt').read_text('utf-8')
  return tuple(text.splitlines())
