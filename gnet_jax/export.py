"""A trained run as a file other programs use: ``python -m gnet_jax.export``.

::

  python -m gnet_jax.export --workdir DIR --format onnx --out model.onnx [--step N]
  python -m gnet_jax.export --workdir DIR --format jax --out model.jax [--batchnorm keep]

Both formats hold the network of the newest readable checkpoint (or ``--step``'s)
with its weights, and take a batch of any size of float32 images in [0, 1] at
the run's ``image_size``: the run's normalisation (and ``inception_v1``'s
``transform_input``) happens inside, so the caller only scales pixels. They
return the logits. The *input contract* (``contract``: image size, channels,
value range, layout, the normalisation inside, how a photo was prepared) and
the class names travel with the model:

- ``onnx``: the PyTorch twin of the network (the d2l one in
  ``torch_reference``, torchvision's GoogLeNet for ``inception_v1``; weights
  converted exactly by ``interop`` and ``inception_v1``) exported by
  ``torch.onnx.export`` (its ``torch.export``-based exporter, onnxscript);
  NCHW, as ONNX image models are; the contract as JSON under the
  ``gnet_jax`` key of the model's ``metadata_props``.
- ``jax``: ``jax.export`` of the Flax network (serialized StableHLO for CPU,
  CUDA and TPU in one file, the batch dimension symbolic); NHWC, as JAX is;
  plain JAX runs it (``jax.export.deserialize(data).call(images)``) without
  this package. The contract goes beside it as ``OUT.json``.

``--batchnorm fold`` (default) folds ``inception_v1``'s BatchNorm into its
convolutions (``inception_v1.fold_batchnorm``; for ONNX PyTorch's
``fuse_conv_bn_eval``); ``keep`` leaves the BatchNorm layers in. Files are
written under a temporary name beside ``--out`` and renamed into place, so a
failed export leaves nothing behind; a bad input is one ``error:`` line and
exit status 2. Choices and what is checked: docs/export.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gnet_jax import torch_files
from gnet_jax.errors import DependencyError, InputError

FORMATS = ('onnx', 'jax')
BATCHNORM = ('fold', 'keep')
# Where a ``--format jax`` artifact runs: one file lowered for each.
PLATFORMS = ('cpu', 'cuda', 'tpu')
LAYOUTS = {'onnx': 'NCHW', 'jax': 'NHWC'}
INPUT_NAME, OUTPUT_NAME = 'images', 'logits'
# The key of the ONNX metadata entry, and of nothing else: the contract is one JSON document.
METADATA_KEY = 'gnet_jax'
# What each format needs beyond the core install (module -> pip name), all in the `export` extra.
NEEDS = {'onnx': {'torch': 'torch', 'onnx': 'onnx', 'onnxscript': 'onnxscript'},
         'jax': {'flatbuffers': 'flatbuffers'}}
AUX_HEADS = ('aux1', 'aux2')  # training-only heads, both models' names


def metadata_path(out: str | os.PathLike) -> Path:
  """Where ``--format jax`` puts the contract: ``OUT.json`` beside the artifact."""
  return Path(f'{os.fspath(out)}.json')


def _preparation(spec, image_size: int) -> str:
  """How predict turns a photo into one input image, in words (the contract's ``prepare``)."""
  size = spec.image_shape[0]
  if spec.image_shape[-1] == 3:
    steps = (f'read as RGB; shorter side scaled to {spec.resize_to or size} (bilinear), the '
             f'centre {size}x{size} cut out')
  else:
    steps = ('read as grey (transparent pixels on white); inverted if the background is light '
             f'(the model saw light objects on dark); fitted into {size}x{size} keeping the '
             "aspect ratio, padded with the background's brightness")
  if size != image_size:
    steps += f'; resized to {image_size}x{image_size} (bilinear, antialiased)'
  return steps + '; divided by 255'


def contract(config: Any, spec: Any, step: int, fmt: str, batchnorm: str) -> dict:
  """The exported model's input contract and class names, as JSON-ready data.

  What a program needs to feed the model and read its answer without this
  package: input name, layout, shape (``'batch'`` for the free dimension),
  dtype, value range, the normalisation the model applies itself, how a photo
  was prepared in training and ``predict``; output name and meaning; class names.
  """
  size, channels = int(config.image_size), int(spec.image_shape[-1])
  layout = LAYOUTS[fmt]
  shape = (['batch', channels, size, size] if layout == 'NCHW'
           else ['batch', size, size, channels])
  norm = spec.normalization
  return {
      'format': fmt,
      'exported_by': 'gnet-jax (python -m gnet_jax.export)',
      'model': config.model,
      'step': int(step),
      'dataset': spec.name,
      'batchnorm': ('none' if config.model != 'inception_v1'
                    else {'fold': 'folded', 'keep': 'kept'}[batchnorm]),
      'input': {
          'name': INPUT_NAME, 'layout': layout, 'shape': shape, 'dtype': 'float32',
          'image_size': size, 'channels': channels,
          'color': 'RGB' if channels == 3 else 'grey',
          'value_range': [0.0, 1.0],
          'normalization': None if norm is None else {
              'mean': [float(v) for v in norm[0]], 'std': [float(v) for v in norm[1]],
              'inside_model': True},
          'transform_input': bool(config.model == 'inception_v1' and config.transform_input),
          'prepare': _preparation(spec, size),
      },
      'output': {'name': OUTPUT_NAME, 'shape': ['batch', spec.num_classes], 'dtype': 'float32',
                 'meaning': 'logits: softmax gives the class probabilities; index i is '
                            'class_names[i]'},
      'class_names': list(spec.class_names),
  }


def _without_aux_heads(variables: Mapping[str, Any]) -> dict:
  """Each collection without the training-only aux heads (``aux1``, ``aux2``)."""
  return {name: {k: v for k, v in tree.items() if k not in AUX_HEADS}
          for name, tree in variables.items()}


def inference_network(config: Any, spec: Any, variables: Mapping[str, Any], batchnorm: str
                      ) -> tuple[Any, dict]:
  """``(model, variables)`` for inference: no aux heads, float32, XLA's stock kernels.

  Stock kernels (``kernels='xla'``) lower the same for every platform; with
  ``batchnorm='fold'`` an ``inception_v1`` network gets its BatchNorm folded
  into the convolutions.
  """
  import ml_collections

  from gnet_jax import inception_v1, state as state_lib

  config = ml_collections.ConfigDict(config.to_dict())
  config.update(aux_weight=0.0, kernels='xla', dtype='float32')
  model = state_lib.create_model(config, spec)
  trees = _without_aux_heads(variables)
  if config.model == 'inception_v1' and batchnorm == 'fold':
    return model.clone(batchnorm_folded=True), {'params': inception_v1.fold_batchnorm(trees)}
  return model, state_lib.model_variables(trees)


def logits_function(model: Any, variables: Mapping[str, Any],
                    normalization: Any) -> Callable[[Any], Any]:
  """float32 NHWC images in [0, 1] -> logits, the weights held as constants.

  The normalisation is ``input_pipeline.preprocess``'s arithmetic, so a model
  fed ``preprocess(images, size)`` without it computes what ``predict`` does.
  """
  import jax.numpy as jnp

  mean, std = ((None, None) if normalization is None
               else (np.asarray(v, np.float32) for v in normalization))

  def logits(images):
    x = images.astype(jnp.float32)
    if mean is not None:
      x = (x - jnp.asarray(mean)) / jnp.asarray(std)
    return model.apply(variables, x)

  return logits


def to_jax(config: Any, spec: Any, variables: Mapping[str, Any], batchnorm: str = 'fold'
           ) -> bytes:
  """The serialized ``jax.export`` artifact: StableHLO for ``PLATFORMS``, batch symbolic."""
  import jax

  model, variables = inference_network(config, spec, variables, batchnorm)
  fn = logits_function(model, variables, spec.normalization)
  size, channels = int(config.image_size), int(spec.image_shape[-1])
  batch, = jax.export.symbolic_shape('batch')
  images = jax.ShapeDtypeStruct((batch, size, size, channels), np.float32)
  exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(images)
  return bytes(exported.serialize())


def torch_network(config: Any, spec: Any, variables: Mapping[str, Any],
                  batchnorm: str = 'fold') -> Any:
  """The run's network in PyTorch with its weights, in eval mode, NCHW in [0, 1] -> logits.

  d2l: ``torch_reference.googlenet`` loaded with ``interop.params_to_torch``;
  ``inception_v1``: torchvision's GoogLeNet loaded with
  ``inception_v1.variables_to_torchvision``, its BatchNorm fused into the
  convolutions by ``torch.nn.utils.fusion.fuse_conv_bn_eval`` when
  ``batchnorm='fold'``. The normalisation goes in front
  (``torch_reference.Standardize``).
  """
  import torch

  from gnet_jax import inception_v1, interop, torch_reference

  trees = _without_aux_heads(variables)
  if config.model == 'inception_v1':
    torch_reference.torchvision_models()  # registers torchvision without its C extension
    googlenet = importlib.import_module('torchvision.models.googlenet')
    state_dict = inception_v1.variables_to_torchvision(trees)
    net = googlenet.GoogLeNet(num_classes=spec.num_classes, aux_logits=False,
                              transform_input=bool(config.transform_input), init_weights=False)
    net.load_state_dict(state_dict)
    net.eval()
    if batchnorm == 'fold':
      for unit in net.modules():
        if isinstance(unit, googlenet.BasicConv2d):
          unit.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(unit.conv, unit.bn)
          unit.bn = torch.nn.Identity()
  else:
    state_dict = interop.params_to_torch(trees['params'])
    net = torch_reference.googlenet(*interop.state_dict_io(state_dict))
    net.load_state_dict(state_dict)
  layers = [] if spec.normalization is None else [torch_reference.Standardize(*spec.normalization)]
  return torch.nn.Sequential(*layers, net).eval()


def to_onnx(config: Any, spec: Any, variables: Mapping[str, Any], meta: Mapping[str, Any],
            batchnorm: str = 'fold') -> bytes:
  """The ONNX model (one file, weights inside), batch dynamic, ``meta`` in its metadata.

  ``torch.onnx.export(dynamo=True)`` without its graph optimiser, whose rewrite
  rules would fuse a kept BatchNorm; constants are folded and unused nodes
  dropped by onnxscript's own passes instead, so ``batchnorm`` alone decides.
  """
  import onnxscript.optimizer
  import torch
  from onnxscript import ir

  net = torch_network(config, spec, variables, batchnorm)
  size, channels = int(config.image_size), int(spec.image_shape[-1])
  example = torch.zeros((2, channels, size, size))  # batch 2: torch.export specialises a 1
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', FutureWarning)  # torch.export's own pytree deprecations
    program = torch.onnx.export(
        net, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},),
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=False, verbose=False)
  onnxscript.optimizer.fold_constants(program.model)
  onnxscript.optimizer.remove_unused_nodes(program.model)
  program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
  program.model.doc_string = (f'GoogLeNet ({config.model}) exported by gnet-jax; input contract '
                              f'and class names: metadata_props[{METADATA_KEY!r}] (JSON)')
  return ir.to_proto(program.model).SerializeToString()


def check_request(fmt: str, batchnorm: str, out: str | os.PathLike) -> list[Path]:
  """The files to write; refuses a bad format, ``--batchnorm`` or output path, or a missing
  package, before anything is read."""
  if fmt not in FORMATS:
    raise InputError(f'--format {fmt!r} is not one of {", ".join(FORMATS)}')
  if batchnorm not in BATCHNORM:
    raise InputError(f'--batchnorm {batchnorm!r} is not one of {", ".join(BATCHNORM)}')
  paths = [torch_files.check_writable(out, f'model.{fmt}')]
  if fmt == 'jax':
    paths.append(metadata_path(out))
    if paths[1].is_dir():
      raise InputError(f'{paths[1]} is a folder, and --format jax writes its contract there '
                       '(OUT.json beside OUT); choose another --out')
  _check_installed(fmt, NEEDS[fmt])
  return paths


def _check_installed(fmt: str, needs: Mapping[str, str]) -> None:
  missing = [pip for module, pip in needs.items() if importlib.util.find_spec(module) is None]
  if missing:
    raise DependencyError(
        f'--format {fmt} needs {", ".join(missing)}: pip install "gnet-jax[export]" (on a '
        'machine without a GPU install the CPU build of torch first: pip install torch '
        '--index-url https://download.pytorch.org/whl/cpu)')


def export_run(workdir: str | os.PathLike, fmt: str, out: str | os.PathLike,
               step: int | None = None, batchnorm: str = 'fold') -> dict:
  """Exports ``workdir``'s newest readable checkpoint (or ``step``'s) as ``fmt`` to ``out``.

  Everything is checked before the checkpoint is read (``check_request``), and
  the files are written whole. Returns what ``export_checkpoint`` returns.
  """
  from gnet_jax import state as state_lib

  check_request(fmt, batchnorm, out)
  return export_checkpoint(state_lib.load_checkpoint(workdir, step), fmt, out, batchnorm)


def export_checkpoint(checkpoint: Any, fmt: str, out: str | os.PathLike,
                      batchnorm: str = 'fold') -> dict:
  """Writes a loaded checkpoint (``state.load_checkpoint``'s) as ``fmt`` to ``out``, whole.

  Returns the contract and the paths written, with their sizes in bytes.
  """
  paths = check_request(fmt, batchnorm, out)
  state, config, step, spec = checkpoint
  if fmt == 'onnx' and config.model == 'inception_v1':  # torchvision's GoogLeNet is the twin
    _check_installed(fmt, {'torchvision': 'torchvision'})
  meta = contract(config, spec, step, fmt, batchnorm)
  if fmt == 'onnx':
    files = {paths[0]: to_onnx(config, spec, state.variables, meta, batchnorm)}
  else:
    files = {paths[0]: to_jax(config, spec, state.variables, batchnorm),
             paths[1]: (json.dumps(meta, indent=2) + '\n').encode()}
  torch_files.write_whole(files)
  return {'contract': meta, 'paths': list(files), 'bytes': [len(b) for b in files.values()]}


def run(args: argparse.Namespace) -> int:
  result = export_run(args.workdir, args.format, args.out, args.step, args.batchnorm)
  meta = result['contract']
  inp = meta['input']
  norm = inp['normalization']
  batchnorm = 'no BatchNorm' if meta['batchnorm'] == 'none' else f'BatchNorm {meta["batchnorm"]}'
  print(f'exported step {meta["step"]} of {args.workdir} ({meta["model"]}, {batchnorm}) to '
        f'{result["paths"][0]} ({result["bytes"][0] / 2**20:.1f} MiB)')
  print(f'input  {inp["name"]}: {inp["dtype"]} {inp["layout"]} '
        f'[{", ".join(map(str, inp["shape"]))}], {inp["color"]} in [0, 1]'
        + (f', normalised inside (mean {norm["mean"]}, std {norm["std"]})' if norm else ''))
  print(f'output {meta["output"]["name"]}: [{", ".join(map(str, meta["output"]["shape"]))}] '
        f'over {len(meta["class_names"])} classes')
  print('contract and class names: ' + (f'{result["paths"][1]}' if args.format == 'jax' else
                                        f'metadata_props[{METADATA_KEY!r}]'))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a bad input is one ``error:`` line and exit status 2."""
  from gnet_jax import cli

  parser = argparse.ArgumentParser(
      prog='python -m gnet_jax.export',
      description='Write a trained run as an ONNX model or a jax.export artifact, with its '
                  'input contract and class names.')
  cli.add_checkpoint_flags(parser, 'export')
  parser.add_argument('--format', required=True, help=f'one of {", ".join(FORMATS)}')
  parser.add_argument('--out', required=True,
                      help='the file to write (--format jax also writes OUT.json)')
  parser.add_argument('--batchnorm', default='fold',
                      help='inception_v1: fold (into the convolutions, default) or keep')
  return cli.run_command(run, parser.parse_args(argv))


if __name__ == '__main__':
  from gnet_jax import cli
  cli.collect_garbage_less_often()
  cli.quiet_logs()
  sys.exit(main())
