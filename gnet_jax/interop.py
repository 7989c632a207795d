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

The commands also take torchvision's GoogLeNet (``googlenet-1378be20.pth``,
the ImageNet weights), told apart by its keys (``conv1.conv.weight``): it
becomes a ``model=inception_v1`` run through ``inception_v1``'s conversion,
with ImageNet's spec (the 1,000 class names, 224x224 cut from 256, ImageNet's
mean and std) when it has 1,000 classes; export writes a run's state dict in
the form its ``config.model`` has.

Command line (needs the ``interop`` extra, i.e. PyTorch)::

  python -m gnet_jax.interop import MODEL.pt --workdir DIR [--config configs/X.py]
  python -m gnet_jax.interop export DIR OUT.pt    (or: export --workdir DIR --out OUT.pt)
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from gnet_jax import torch_files
from gnet_jax.errors import ConfigError, InputError, StateDictError
from gnet_jax.models import B3_BLOCKS, B4_BLOCKS, B5_BLOCKS

if TYPE_CHECKING:
  from gnet_jax import input_pipeline

# The Inception convs in the order PyTorch registers (and saves) them, with kernel sizes.
INCEPTION_CONVS = (('p1_1', 1), ('p2_1', 1), ('p2_2', 3), ('p3_1', 1), ('p3_2', 5), ('p4_2', 1))
# Top-level subtrees of an aux-enabled Flax model that the d2l model lacks.
AUX_HEADS = ('aux1', 'aux2')


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
  torch = torch_files.import_torch()
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


# ----------------------------------------------------------------------------- .pt files

# d2l 2.x (the LazyConv2d edition) names the Inception convs b1_1 ... b4_2 instead of p1_1 ... p4_2.
_D2L2_CONV = re.compile(r'^([234]\.\d+)\.b([1-4]_[12])\.(weight|bias)$')


def load_torch_file(path: str | os.PathLike, *, trust_pickle: bool = False
                    ) -> tuple[dict[str, Any], list[str]]:
  """A ``.pt``/``.pth`` file (``torch_files.read_state_dict``) as a d2l-keyed state dict, and
  notes on any key changes (``normalize_keys``)."""
  return normalize_keys(torch_files.read_state_dict(path, trust_pickle=trust_pickle))


def normalize_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Maps the key spellings of common variants onto the d2l ``nn.Sequential`` keys.

  Removes a ``module.`` prefix (``DataParallel``/``DistributedDataParallel``)
  and a ``net.`` prefix (d2l 2.x's ``GoogleNet`` class keeps its layers in
  ``self.net``), each only when every key has it, and renames d2l 2.x's
  Inception convs ``b1_1`` ... ``b4_2`` to ``p1_1`` ... ``p4_2``. Returns the
  new dict and a note per change made.
  """
  out, notes = dict(state_dict), []
  for prefix in ('module.', 'net.'):
    out, removed = torch_files.strip_prefix(out, prefix)
    if removed:
      notes.append(f'removed the {prefix!r} prefix of every key')
  renamed = {}
  for key, value in out.items():
    m = _D2L2_CONV.match(key)
    renamed[f'{m[1]}.p{m[2]}.{m[3]}' if m else key] = value
  if list(renamed) != list(out):
    notes.append("renamed the Inception convs b1_1 ... b4_2 (d2l 2.x) to p1_1 ... p4_2")
  return renamed, notes


# ----------------------------------------------------------------------------- checkpoints


def import_to_checkpoint(path: str | os.PathLike, workdir: str | os.PathLike,
                         config: Any, *, trust_pickle: bool = False) -> dict:
  """Writes the PyTorch model at ``path`` as a step-0 checkpoint of ``config`` in ``workdir``.

  ``train.py --config <same config> --workdir <workdir>`` then fine-tunes from
  it and ``python -m gnet_jax.evaluate --workdir <workdir>`` evaluates it.
  The model must fit the config's data: 1 input channel (MNIST and
  Fashion-MNIST are grayscale) and 10 classes. With ``config.aux_weight > 0``
  the aux heads, absent from the d2l model, start freshly initialised. The
  workdir's lock is held while writing (``gnet_jax.workdir``): a workdir a run
  is training in is refused. Returns a summary (``in_channels``, ``num_classes``,
  ``notes``, ``checkpoint``).
  """
  from gnet_jax import (checkpoint, config as config_lib, input_pipeline,  # late: not for NumPy use
                        state as state_lib, workdir as workdir_lib)

  state_dict, notes = load_torch_file(path, trust_pickle=trust_pickle)
  if is_torchvision(state_dict):
    return import_torchvision(path, state_dict, notes, workdir, config)
  _check_is_googlenet(path, state_dict)
  config_lib.validate(config)
  imported = params_from_torch(state_dict)
  in_channels, num_classes = state_dict_io(state_dict)
  if config.dataset not in input_pipeline.SPECS:
    raise StateDictError(f'importing into a {config.dataset!r} run is not supported: the d2l '
                         'weights carry over into MNIST-family runs (--config.dataset=mnist or '
                         'fashion_mnist); params_from_torch converts them for your own code')
  spec = input_pipeline.dataset_spec(config.dataset)
  if num_classes != spec.num_classes:
    raise StateDictError(
        f'{path} classifies into {num_classes} classes (5.weight is '
        f'{_shape_of(state_dict["5.weight"])}), but {spec.name} has '
        f'{spec.num_classes}; train.py and gnet_jax.evaluate cannot use it '
        '(params_from_torch converts it for your own code)')
  if in_channels != spec.image_shape[-1]:
    raise StateDictError(
        f'{path} expects {in_channels}-channel images (0.0.weight is '
        f'{_shape_of(state_dict["0.0.weight"])}), but {spec.name} images have '
        f'{spec.image_shape[-1]}; train.py and gnet_jax.evaluate cannot use it (params_from_torch '
        'converts it for your own code)')
  model, tx, state = state_lib.build(config, spec)
  params = merge_params(imported, state.params)
  state = state.replace(params=params, opt_state=state_lib.init_opt_state(tx, params))
  if getattr(model, 'aux_heads', False):
    notes.append('aux heads (aux1, aux2) are freshly initialised: the d2l model has none')
  with workdir_lib.hold(Path(workdir).absolute()):  # not into a workdir a run is training in
    folder = checkpoint.save_state(workdir, state, config)
  return {'in_channels': in_channels, 'num_classes': num_classes, 'notes': notes,
          'checkpoint': folder, 'tensors': len(state_dict)}


# torchvision's GoogLeNet has this key and the d2l network has not ('0.0.weight' there).
TORCHVISION_KEY = 'conv1.conv.weight'
D2L_KEY = '0.0.weight'
# torchvision's ImageNet evaluation: the shorter side to 256, the centre 224x224.
IMAGENET_SIZE, IMAGENET_RESIZE = 224, 256


def is_torchvision(state_dict: Mapping[str, Any]) -> bool:
  """Whether a state dict is torchvision's GoogLeNet (else it is read as the d2l network's)."""
  return TORCHVISION_KEY in state_dict


def _check_is_googlenet(path: str | os.PathLike, state_dict: Mapping[str, Any]) -> None:
  """Refuses a state dict with neither network's first convolution, naming its first keys."""
  if D2L_KEY not in state_dict:
    keys = list(state_dict)
    raise StateDictError(
        f'{path} is neither the d2l GoogLeNet (first key {D2L_KEY!r}) nor torchvision\'s '
        f'(first key {TORCHVISION_KEY!r}): its first keys are '
        f'{", ".join(map(repr, keys[:5]))}{f" and {len(keys) - 5} more" if len(keys) > 5 else ""}')


def torchvision_spec(num_classes: int, image_size: int = IMAGENET_SIZE
                     ) -> 'input_pipeline.DatasetSpec':
  """The data set spec an imported torchvision GoogLeNet predicts with.

  1,000 classes: ImageNet's (the class names ``inception_v1.imagenet_classes``,
  224x224 cut from a 256 resize, ImageNet's mean and std), what
  ``GoogLeNet_Weights.IMAGENET1K_V1`` was evaluated with. Otherwise classes
  named by number at ``image_size``, cut the same way (the shorter side at
  256/224 of it) with the same mean and std: torchvision's conventions.
  """
  from gnet_jax import inception_v1, input_pipeline

  norm = (tuple(inception_v1.IMAGENET_MEAN), tuple(inception_v1.IMAGENET_STD))
  if num_classes == 1000:
    return input_pipeline.DatasetSpec('imagenet', (IMAGENET_SIZE, IMAGENET_SIZE, 3),
                                      inception_v1.imagenet_classes(), norm, IMAGENET_RESIZE)
  return input_pipeline.DatasetSpec(
      'torchvision', (image_size, image_size, 3), tuple(str(i) for i in range(num_classes)),
      norm, image_size * IMAGENET_RESIZE // IMAGENET_SIZE)


def _torchvision_run(config: Any, num_classes: int, notes: list[str]
                     ) -> tuple[Any, 'input_pipeline.DatasetSpec']:
  """The config and spec of the run a torchvision file becomes; notes for each key changed.

  ``model=inception_v1`` and ImageNet's mean and std whatever the config said.
  With an image folder (``--config.data_dir``) of as many classes, its class
  names and layout, so ``evaluate`` and ``train.py`` use it; else 1,000 classes
  are ImageNet (224x224; evaluation data: tensorflow-datasets' ``imagenet2012``)
  and other counts numbered classes.
  """
  import ml_collections

  from gnet_jax import config as config_lib, image_folder, input_pipeline

  config = ml_collections.ConfigDict(config.to_dict())  # a copy the import may change
  changes: dict[str, Any] = {'model': 'inception_v1', 'normalize': True,
                             'normalize_stats': 'imagenet'}
  norm = torchvision_spec(num_classes).normalization
  if config.dataset == 'image_folder' and config.data_dir:
    listing = image_folder.scan(config.data_dir)
    if len(listing.class_names) != num_classes:
      raise StateDictError(
          f'the network classifies into {num_classes} classes, but the image folder '
          f'{config.data_dir} has {len(listing.class_names)}; give the folder it was trained on, '
          'or leave --config.data_dir out (1,000 classes: ImageNet\'s names; else numbers)')
    spec = input_pipeline.DatasetSpec('image_folder', (config.image_size,) * 2 + (3,),
                                      listing.class_names, norm)
  else:
    if num_classes == 1000:
      changes.update(image_size=IMAGENET_SIZE, dataset='imagenet2012', data_source='tfds',
                     data_dir='', train_split='train', test_split='validation')
    spec = torchvision_spec(num_classes, changes.get('image_size', config.image_size))
  changed = [f'{key}={value!r}' for key, value in changes.items() if config[key] != value]
  config.update(changes)
  if changed:
    notes.append(f"the run's config has {', '.join(changed)}: torchvision's GoogLeNet"
                 + (' on ImageNet' if spec.name == 'imagenet' else ''))
  if spec.name == 'imagenet' and not config.transform_input:
    notes.append('--config.transform_input=False: torchvision\'s ImageNet weights '
                 '(googlenet-1378be20.pth) were trained with it True (configs/finetune.py sets '
                 'it); keep False only for a network trained without it')
  if spec.name == 'torchvision' and config.dataset == 'image_folder' and not config.data_dir:
    raise ConfigError(
        f'a {num_classes}-class torchvision GoogLeNet goes with an image folder of as many '
        'classes: add --config.data_dir=DIR (its class folders name the predictions), or give '
        'a --config whose data set it classifies')
  config_lib.validate(config)
  return config, spec


def import_torchvision(path: str | os.PathLike, state_dict: Mapping[str, Any], notes: list[str],
                       workdir: str | os.PathLike, config: Any) -> dict:
  """Writes torchvision's GoogLeNet (``state_dict``, from ``path``) as a step-0 checkpoint.

  A ``model=inception_v1`` run of ``config`` (see ``_torchvision_run``) with
  the file's params and BatchNorm statistics (``inception_v1.
  variables_from_torchvision``, which names the first missing and unexpected
  keys of another network's). Aux heads the file has but the run does not train
  (``aux_weight`` 0) are left out, and ones the run trains but the file lacks
  start fresh, each with a note. Everything is checked before the workdir's
  lock is taken, so a refused import writes nothing.
  """
  from gnet_jax import checkpoint, inception_v1, state as state_lib, workdir as workdir_lib

  try:
    variables = inception_v1.variables_from_torchvision(state_dict)
  except StateDictError as e:
    raise StateDictError(f'{path}: {e}') from None
  num_classes, has_aux = inception_v1.state_dict_layout(state_dict)
  config, spec = _torchvision_run(config, num_classes, notes)
  model, tx, state = state_lib.build(config, spec)
  wants_aux = bool(getattr(model, 'aux_logits', False))
  if has_aux and not wants_aux:
    for collection in variables.values():
      for head in inception_v1.AUX_HEADS:
        collection.pop(head, None)
    notes.append('left out the aux heads (aux1, aux2): --config.aux_weight=0 trains none')
  elif wants_aux and not has_aux:
    notes.append('aux heads (aux1, aux2) are freshly initialised: the file has none')
  params = merge_params(variables['params'], state.params)
  batch_stats = merge_params(variables['batch_stats'], state.batch_stats)
  state = state.replace(params=params, batch_stats=batch_stats,
                        opt_state=state_lib.init_opt_state(tx, params))
  with workdir_lib.hold(Path(workdir).absolute()):  # not into a workdir a run is training in
    folder = checkpoint.save_state(workdir, state, config, spec.to_json())
  return {'in_channels': 3, 'num_classes': num_classes, 'notes': notes, 'checkpoint': folder,
          'tensors': len(state_dict), 'network': "torchvision's GoogLeNet", 'spec': spec.name,
          'config': config}


def export_from_checkpoint(workdir: str | os.PathLike, out: str | os.PathLike,
                           step: int | None = None) -> dict:
  """Saves ``workdir``'s newest readable checkpoint (or ``step``'s) as a PyTorch state dict.

  A ``model=inception_v1`` run: torchvision's GoogLeNet state dict (params and
  running statistics; the aux heads when the run has them; ``num_batches_tracked``
  the checkpoint's step), which ``googlenet(num_classes=..., aux_logits=...)
  .load_state_dict(strict=True)`` accepts. A d2l run: the d2l network's params,
  aux heads left out. Returns a summary.
  """
  from gnet_jax import inception_v1, state as state_lib  # late import, as above

  torch_files.check_writable(out)
  state, config, restored_step, _ = state_lib.load_checkpoint(workdir, step)
  params = state.params
  dropped: list[str] = []
  if config.model == 'inception_v1':
    state_dict = inception_v1.variables_to_torchvision(
        {'params': params, 'batch_stats': state.batch_stats},
        num_batches_tracked=int(restored_step), numpy=True)
    network = "torchvision's GoogLeNet"
  else:
    dropped = [name for name in AUX_HEADS if name in params]
    state_dict = params_to_torch(params, numpy=True)
    network = 'the d2l GoogLeNet'
  torch_files.save_state_dict(state_dict, out)
  return {'step': restored_step, 'tensors': len(state_dict), 'dropped': dropped,
          'network': network, 'aux_logits': any(k.startswith('aux1.') for k in state_dict),
          'num_classes': int(state_dict['fc.weight' if 'fc.weight' in state_dict
                                        else '5.weight'].shape[0])}


# ----------------------------------------------------------------------------- command line

USAGE = """\
usage: python -m gnet_jax.interop import MODEL.pt --workdir DIR [--config CONFIG.py]
                                         [--config.KEY=VALUE ...] [--trust_pickle]
       python -m gnet_jax.interop export DIR OUT.pt [--step N]
       python -m gnet_jax.interop export --workdir DIR --out OUT.pt [--step N]

import: reads a d2l GoogLeNet or torchvision's GoogLeNet (e.g. googlenet-1378be20.pth, the
  ImageNet weights) saved by PyTorch (a state dict, a dict wrapping one under 'state_dict',
  'model_state_dict' or 'model', or with --trust_pickle a whole pickled nn.Module) and writes
  a step-0 checkpoint in DIR for train.py, python -m gnet_jax.evaluate and predict. --config
  defaults to configs/default.py (configs/finetune.py for torchvision's GoogLeNet, which
  becomes a model=inception_v1 run; with 1,000 classes its predictions are ImageNet's).
export: writes DIR's newest checkpoint (or --step N) as a PyTorch state dict that the d2l
  nn.Sequential (a d2l run) or torchvision.models.googlenet (an inception_v1 run) loads
  with load_state_dict.
"""


def _explicit_config(argv: list[str]) -> bool:
  return any(a == '--config' or a.startswith('--config=') for a in argv[1:])


def _default_config_path(argv: list[str] | None = None) -> str | None:
  """configs/default.py; configs/finetune.py when ``argv`` imports torchvision's GoogLeNet.

  The file is looked at (``torch.load(weights_only=True)``) only for an import
  without ``--config``; one that cannot be read is left for the import to refuse.
  """
  from gnet_jax import config as config_lib
  path = config_lib.DEFAULT_CONFIG_FILE
  if (argv and len(argv) > 2 and argv[1] == 'import' and not argv[2].startswith('-')
      and not _explicit_config(argv)):
    try:
      if is_torchvision(load_torch_file(argv[2])[0]):
        path = path.parent / 'finetune.py'
    except InputError:
      pass
  return str(path) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
  """The command line; a bad input is one ``error:`` line and exit status 2."""
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  if any(a in ('-h', '--help', '-help', '--helpfull') for a in argv[1:]):
    print(USAGE)
    return 0
  default_config = _default_config_path(argv)
  fv = flags.FlagValues()  # private: no clash with train.py's global flags
  from gnet_jax import cli  # pylint: disable=import-outside-toplevel

  try:
    with warnings.catch_warnings():
      # ml_collections' config loader uses a deprecated importlib call on Python >= 3.11.
      warnings.filterwarnings('ignore', message='.*load_module.*', category=DeprecationWarning)
      # Reads the --config.KEY=VALUE overrides from sys_argv when the default config loads.
      config_flags.DEFINE_config_file('config', default_config,
                                      'Config file (configs/*.py) the checkpoint is for.',
                                      flag_values=fv, lock_config=True, sys_argv=argv)
      flags.DEFINE_string('workdir', None, 'import: where the checkpoint goes; export: the '
                          'run to export.', flag_values=fv)
      flags.DEFINE_string('out', None, 'export: the .pth file to write.', flag_values=fv)
      flags.DEFINE_bool('trust_pickle', False, 'import: allow full unpickling (runs code from '
                        'the file) to read a whole pickled nn.Module.', flag_values=fv)
      flags.DEFINE_integer('step', None, 'export: the checkpoint step (default: newest).',
                           flag_values=fv)
      args = cli.parse_config_flags(argv, fv)[1:]
  except (AttributeError, KeyError) as e:  # the default config loads, overrides applied, above
    print(f'error: {cli.config_mistake(argv, e, default_config)}', file=sys.stderr)
    return 2
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except flags.Error as e:
    print(f'error: {torch_files.first_line(e)}\n{USAGE}', file=sys.stderr)
    return 2
  return cli.run_command(_run, args, fv)


def _run(args: list[str], fv) -> int:
  from ml_collections import config_flags

  config = fv.config
  if len(args) == 2 and args[0] == 'import':
    if not fv.workdir:
      raise StateDictError('import needs --workdir DIR (an empty or new folder)')
    if config is None:
      raise StateDictError('import needs --config CONFIG.py (configs/default.py not found)')
    result = import_to_checkpoint(args[1], fv.workdir, config, trust_pickle=fv.trust_pickle)
    for note in result['notes']:
      print(f'note: {note}')
    config_file = config_flags.get_config_filename(fv['config'])
    if 'spec' in result:  # torchvision's GoogLeNet
      print(f'imported {result["tensors"]} tensors from {args[1]} (torchvision\'s GoogLeNet, '
            f'{result["num_classes"]} classes: {result["spec"]}) into {result["checkpoint"]}')
      print(f'predict:   python -m gnet_jax.predict --workdir {fv.workdir} IMAGE.jpg')
      print(f'fine-tune: python train.py --config {config_file} --config.data_dir=DIR '
            f'--config.init_from={fv.workdir} --workdir NEW_DIR')
    else:
      print(f'imported {result["tensors"]} tensors from {args[1]} ({result["in_channels"]} '
            f'input channel(s), {result["num_classes"]} classes) into {result["checkpoint"]}')
      print(f'evaluate:  python -m gnet_jax.evaluate --workdir {fv.workdir}')
      print(f'fine-tune: python train.py --config {config_file} --workdir {fv.workdir} '
            '(with the same config overrides as this import)')
  elif args and args[0] == 'export':
    if len(args) == 3 and not fv.workdir and not fv.out:
      workdir, out = args[1], args[2]
    elif len(args) == 1 and fv.workdir and fv.out:
      workdir, out = fv.workdir, fv.out
    else:
      print(f'error: export takes DIR OUT.pt, or --workdir DIR --out OUT.pt\n{USAGE}',
            file=sys.stderr)
      return 2
    result = export_from_checkpoint(workdir, out, fv.step)
    if result['dropped']:
      print(f'note: left out {", ".join(result["dropped"])} (training-only aux heads, '
            'absent from the d2l model)')
    print(f'exported the checkpoint at step {result["step"]} of {workdir} to {out} '
          f'({result["tensors"]} tensors of {result["network"]}, {result["num_classes"]} '
          f'classes{", with aux heads" if result["aux_logits"] else ""})')
  else:
    print(f'error: unexpected arguments: {" ".join(args) or "(none)"}\n{USAGE}',
          file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  from gnet_jax import cli
  cli.collect_garbage_less_often()
  cli.quiet_logs()
  sys.exit(main())
