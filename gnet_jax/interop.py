"""PyTorch weight import and export for the d2l GoogLeNet.

The d2l book builds the network as ``nn.Sequential(b1, b2, b3, b4, b5,
nn.Linear(1024, num_classes))``; its ``state_dict`` keys are ``0.0.weight``
(b1's conv), ``1.0.*`` and ``1.2.*`` (b2's convs), ``2.I.p1_1.weight`` ...
``4.I.p4_2.bias`` (the Inception blocks of b3, b4, b5) and ``5.weight``,
``5.bias`` (the classifier). ``params_from_torch`` maps them one to one onto the
Flax tree of ``gnet_jax.models.GoogLeNet`` (conv kernels OIHW -> HWIO, the
Linear weight transposed) and ``params_to_torch`` goes back. Both are plain
NumPy: torch is needed only to read or write ``.pt`` files.

The d2l model has no auxiliary heads, so an imported tree has none either;
``merge_params`` grafts it onto a freshly initialised aux-enabled tree.

Command line (needs the ``interop`` extra, i.e. PyTorch)::

  python -m gnet_jax.interop import MODEL.pt --workdir DIR [--config configs/X.py]
  python -m gnet_jax.interop export DIR OUT.pt
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np

from gnet_jax.models import B3_BLOCKS, B4_BLOCKS, B5_BLOCKS

# The Inception convs in the order PyTorch registers (and saves) them, with kernel sizes.
INCEPTION_CONVS = (('p1_1', 1), ('p2_1', 1), ('p2_2', 3), ('p3_1', 1), ('p3_2', 5), ('p4_2', 1))
# Top-level subtrees of an aux-enabled Flax model that the d2l model lacks.
AUX_HEADS = ('aux1', 'aux2')


class StateDictError(ValueError):
  """A state dict (or parameter tree) that is not the d2l GoogLeNet; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Layer:
  """One PyTorch layer with parameters and where it lives in the Flax tree."""

  torch_prefix: str  # e.g. '2.0.p1_1'
  flax_path: tuple[str, ...]  # e.g. ('b3', 'inception1', 'p1_1')
  weight_shape: tuple[int, ...]  # PyTorch layout: OIHW for a conv, (out, in) for Linear

  @property
  def is_conv(self) -> bool:
    return len(self.weight_shape) == 4

  def torch_shapes(self) -> dict[str, tuple[int, ...]]:
    return {f'{self.torch_prefix}.weight': self.weight_shape,
            f'{self.torch_prefix}.bias': self.weight_shape[:1]}


def layers(in_channels: int, num_classes: int) -> list[Layer]:
  """Every parametrised layer of the d2l GoogLeNet, in PyTorch ``state_dict`` order."""
  out = [Layer('0.0', ('b1', 'conv'), (64, in_channels, 7, 7)),
         Layer('1.0', ('b2', 'conv1'), (64, 64, 1, 1)),
         Layer('1.2', ('b2', 'conv2'), (192, 64, 3, 3))]
  channels = 192
  for seq_index, stage, blocks in ((2, 'b3', B3_BLOCKS), (3, 'b4', B4_BLOCKS),
                                   (4, 'b5', B5_BLOCKS)):
    for i, (c1, c2, c3, c4) in enumerate(blocks):
      in_of = {'p1_1': channels, 'p2_1': channels, 'p2_2': c2[0], 'p3_1': channels,
               'p3_2': c3[0], 'p4_2': channels}
      out_of = {'p1_1': c1, 'p2_1': c2[0], 'p2_2': c2[1], 'p3_1': c3[0], 'p3_2': c3[1],
                'p4_2': c4}
      for name, k in INCEPTION_CONVS:
        out.append(Layer(f'{seq_index}.{i}.{name}', (stage, f'inception{i + 1}', name),
                         (out_of[name], in_of[name], k, k)))
      channels = c1 + c2[1] + c3[1] + c4
  out.append(Layer('5', ('head',), (num_classes, channels)))
  return out


def expected_state_dict_shapes(in_channels: int, num_classes: int) -> dict[str, tuple[int, ...]]:
  """Key -> shape of the d2l GoogLeNet's ``state_dict``, in PyTorch's order."""
  shapes = {}
  for layer in layers(in_channels, num_classes):
    shapes.update(layer.torch_shapes())
  return shapes


def _to_numpy(key: str, value: Any) -> np.ndarray:
  """A torch tensor or array-like -> a new float32 NumPy array (never a view of ``value``)."""
  if hasattr(value, 'detach'):  # a torch.Tensor; duck-typed so torch is not imported
    value = value.detach().cpu()
    if str(value.dtype) != 'torch.float32':
      if not value.is_floating_point():
        raise StateDictError(f'state dict key {key!r} has dtype {value.dtype}; '
                             'expected a floating-point tensor')
      value = value.float()  # bfloat16/float16 have no lossless NumPy view
    value = value.numpy()
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.floating):
    raise StateDictError(f'state dict key {key!r} has dtype {array.dtype}; '
                         'expected floating point')
  return np.array(array, dtype=np.float32, copy=True)


def _shape_of(value: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in value.shape) if hasattr(value, 'shape') else np.shape(value)


def _check_keys(found: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                what: str, hint: str = '') -> None:
  """Raises ``StateDictError`` naming every missing, unexpected or mis-shaped key."""
  missing = [k for k in expected if k not in found]
  extra = [k for k in found if k not in expected]
  problems = []
  if missing:
    problems.append(f'missing {what} ' + ', '.join(
        f'{k!r} (shape {expected[k]})' for k in missing[:8]) +
        (f' and {len(missing) - 8} more' if len(missing) > 8 else ''))
  if extra:
    problems.append(f'unexpected {what} ' + ', '.join(repr(k) for k in extra[:8]) +
                    (f' and {len(extra) - 8} more' if len(extra) > 8 else ''))
  for k in expected:
    if k in found and _shape_of(found[k]) != expected[k]:
      problems.append(f'{what} {k!r} has shape {_shape_of(found[k])}, expected {expected[k]}')
  if problems:
    message = 'not a d2l GoogLeNet: ' + '; '.join(problems)
    if hint and (missing or extra):
      message += f' ({hint})'
    raise StateDictError(message)


def _infer_io(found: Mapping[str, Any], in_key: str, in_axis: int, out_key: str, out_axis: int,
              in_ndim: int, what: str) -> tuple[int, int]:
  """(in_channels, num_classes) read off the first conv and the classifier."""
  for key, ndim in ((in_key, in_ndim), (out_key, 2)):
    if key not in found:
      raise StateDictError(f'not a d2l GoogLeNet: missing {what} {key!r}')
    if len(_shape_of(found[key])) != ndim:
      raise StateDictError(f'{what} {key!r} has shape {_shape_of(found[key])}; '
                           f'expected {ndim} dimensions')
  return _shape_of(found[in_key])[in_axis], _shape_of(found[out_key])[out_axis]


def state_dict_io(state_dict: Mapping[str, Any]) -> tuple[int, int]:
  """(in_channels, num_classes) of a d2l GoogLeNet state dict."""
  return _infer_io(state_dict, '0.0.weight', 1, '5.weight', 0, 4, 'state dict key')


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
  """The Flax ``params`` of ``GoogLeNet`` (without aux heads) from a d2l PyTorch state dict.

  Values may be torch tensors or NumPy arrays (torch is not imported); the
  result holds new float32 NumPy arrays. The input channel count and the
  number of classes come from ``0.0.weight`` and ``5.weight``; build the model
  with ``GoogLeNet(num_classes=...)`` to match. Raises ``StateDictError``
  naming any missing, unexpected or mis-shaped key.
  """
  in_channels, num_classes = state_dict_io(state_dict)
  _check_keys(state_dict, expected_state_dict_shapes(in_channels, num_classes), 'state dict key',
              hint='keys must be exactly those of the d2l nn.Sequential; '
              'load_torch_file also accepts module./net. prefixes')
  params: dict = {}
  for layer in layers(in_channels, num_classes):
    weight = _to_numpy(f'{layer.torch_prefix}.weight', state_dict[f'{layer.torch_prefix}.weight'])
    bias = _to_numpy(f'{layer.torch_prefix}.bias', state_dict[f'{layer.torch_prefix}.bias'])
    kernel = weight.transpose(2, 3, 1, 0) if layer.is_conv else weight.T  # OIHW->HWIO, (o,i)->(i,o)
    node = params
    for name in layer.flax_path:
      node = node.setdefault(name, {})
    node['kernel'] = np.ascontiguousarray(kernel)
    node['bias'] = bias
  return params


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple, Any]]:
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def _unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Accepts ``{'params': tree}`` (the ``variables`` of ``model.init``) as well as the tree."""
  if set(params) == {'params'}:
    return params['params']
  return params


def params_to_torch(params: Mapping[str, Any], *, numpy: bool = False) -> dict[str, Any]:
  """A d2l PyTorch state dict from the Flax ``params`` of ``GoogLeNet``.

  Aux heads (``aux1``/``aux2``) have no counterpart in the d2l model and are
  left out. Returns an ``OrderedDict`` in PyTorch's key order, of contiguous
  float32 torch tensors, or of NumPy arrays with ``numpy=True`` (no torch
  needed). ``load_state_dict`` of the reference network accepts it as is.
  """
  params = _unwrap_params(params)
  flat = {'/'.join(path): value for path, value in _flatten(params) if path[0] not in AUX_HEADS}
  in_channels, num_classes = _infer_io(flat, 'b1/conv/kernel', 2, 'head/kernel', 1, 4,
                                       'parameter')
  expected = {}
  for layer in layers(in_channels, num_classes):
    path = '/'.join(layer.flax_path)
    shape = layer.weight_shape
    expected[f'{path}/kernel'] = (shape[2], shape[3], shape[1], shape[0]) if layer.is_conv \
        else (shape[1], shape[0])
    expected[f'{path}/bias'] = shape[:1]
  _check_keys(flat, expected, 'parameter')
  state_dict: dict[str, Any] = collections.OrderedDict()
  for layer in layers(in_channels, num_classes):
    path = '/'.join(layer.flax_path)
    kernel = np.asarray(flat[f'{path}/kernel'], dtype=np.float32)
    weight = kernel.transpose(3, 2, 0, 1) if layer.is_conv else kernel.T  # HWIO->OIHW
    state_dict[f'{layer.torch_prefix}.weight'] = np.array(weight, order='C', copy=True)
    state_dict[f'{layer.torch_prefix}.bias'] = np.array(flat[f'{path}/bias'], dtype=np.float32,
                                                         order='C', copy=True)
  if numpy:
    return state_dict
  torch = _import_torch()
  return collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items())


def merge_params(imported: Mapping[str, Any], target: Mapping[str, Any]) -> dict:
  """``target`` with every leaf of ``imported`` put in; subtrees only in ``target`` are kept.

  For fine-tuning with aux heads: ``target`` is a freshly initialised
  aux-enabled tree, ``imported`` the result of ``params_from_torch``; the aux
  heads keep their fresh initialisation. Shapes must agree leaf by leaf.
  """
  merged = dict(target)
  for name, value in imported.items():
    if name not in target:
      raise StateDictError(f'parameter {name!r} is not in the target tree')
    if isinstance(value, Mapping):
      merged[name] = merge_params(value, target[name])
    else:
      if _shape_of(value) != _shape_of(target[name]):
        raise StateDictError(f'parameter {name!r} has shape {_shape_of(value)}, '
                             f'the target has {_shape_of(target[name])}')
      merged[name] = value
  return merged


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(
        'PyTorch is needed to read or write .pt files: pip install "gnet-jax[interop]" '
        '(on a machine without a GPU, first install the CPU build: pip install torch '
        '--index-url https://download.pytorch.org/whl/cpu)') from None
  return torch
