"""Fine-tuning from trained weights: ``--config.init_from=PATH`` starts a run from them.

``PATH`` is a torchvision GoogLeNet state dict (``.pth``, read with
``torch.load(weights_only=True)``: tensors only, no code from the file) for
``model=inception_v1``, or a gnet-jax workdir whose newest checkpoint was
trained with the same ``model``. Each top-level block of the new run's
network (``conv1`` ... ``inception5b``, ``fc``, ``aux1``, ``aux2``) is taken
when the source has it with the same shapes, and keeps its fresh
initialisation otherwise: a classifier for another number of classes, aux
heads the file lacks. The classifiers (``config.HEADS``) are fresh too when
the source is known to classify other classes than the run's, even as many
(a workdir trained on other class folders; a 1,000-class ``.pth`` file is
ImageNet's): their rows would name the wrong classes. ``describe`` says which
in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from gnet_jax import config as config_lib, inception_v1, state as state_lib, torch_files
from gnet_jax.errors import StateDictError


class Initialised(NamedTuple):
  """What ``initialise`` did: the new host state and which blocks came from where."""

  state: state_lib.TrainState
  taken: list[str]  # blocks whose params (and statistics) came from the source
  fresh: list[str]  # blocks the source lacks or has in another shape
  unused: list[str]  # blocks of the source this network has not (e.g. aux heads)
  reasons: list[str]


def load_variables(config: ml_collections.ConfigDict, path: str | os.PathLike) -> dict:
  """``{'params', 'batch_stats'}`` from ``path`` for a run of ``config.model``; host arrays.

  A leading ``~`` is the home folder (a shell leaves ``--config.init_from=~/...`` as is).
  """
  return load_source(config, path)[0]


def load_source(config: ml_collections.ConfigDict, path: str | os.PathLike
                ) -> tuple[dict, tuple[str, ...] | None]:
  """``load_variables`` and the class names the source classifies, where known (else None)."""
  where = Path(path).expanduser()
  if where.is_dir():
    saved, spec = state_lib.read_run(where)
    if saved.model != config.model:
      raise StateDictError(f'--config.init_from={path} is a workdir of a {saved.model} run; this '
                           f'run trains {config.model}: give a {config.model} workdir, or set '
                           f'--config.model={saved.model}')
    state = state_lib.load_checkpoint(where).state
    return {'params': state.params, 'batch_stats': state.batch_stats}, spec.class_names
  if not where.exists():
    raise StateDictError(f'--config.init_from={path}: no such file or folder')
  if config.model != 'inception_v1':
    raise StateDictError(f'--config.init_from={path}: a torchvision state dict fits '
                         f'model inception_v1 (torchvision\'s GoogLeNet), not {config.model}; '
                         'add --config.model=inception_v1')
  state_dict = torch_files.read_state_dict(where, source=f'--config.init_from={path}')
  try:  # a DataParallel checkpoint's keys have a 'module.' prefix
    variables = inception_v1.variables_from_torchvision(
        torch_files.strip_prefix(state_dict, 'module.')[0])
  except StateDictError as e:
    raise StateDictError(f'--config.init_from={path}: {e}') from None
  imagenet = inception_v1.imagenet_classes()
  num_classes = np.shape(variables['params']['fc']['kernel'])[-1]
  return variables, (imagenet if num_classes == len(imagenet) else None)


def _shapes(tree: Any) -> Any:
  return jax.tree.map(np.shape, tree)


def initialise(config: ml_collections.ConfigDict, state: state_lib.TrainState,
               tx: Any, class_names: tuple[str, ...] | None = None) -> Initialised:
  """``state`` (a fresh host state) with every block ``config.init_from`` has in its shapes.

  ``class_names``: the run's classes; a source known to classify others gives fresh heads.
  """
  source, source_classes = load_source(config, config.init_from)
  other_classes = (class_names is not None and source_classes is not None
                   and tuple(source_classes) != tuple(class_names))
  params, stats = dict(state.params), dict(state.batch_stats)
  taken, fresh, reasons = [], [], []
  order = config_lib.BLOCKS[config.model] + config_lib.HEADS[config.model]
  for name in sorted(state.params, key=lambda n: order.index(n) if n in order else len(order)):
    theirs = source['params'].get(name)
    if theirs is None:
      fresh.append(name)
      reasons.append(f'{name}: not in the source')
      continue
    difference = _difference(theirs, params[name])
    if not difference and other_classes and name in config_lib.HEADS[config.model]:
      difference = 'the source classifies other classes'
    if difference:
      fresh.append(name)
      reasons.append(f'{name}: {difference}')
      continue
    taken.append(name)
    params[name] = jax.tree.map(np.asarray, theirs)
    if name in stats:
      stats[name] = jax.tree.map(np.asarray, source['batch_stats'][name])
  unused = [name for name in source['params'] if name not in params]
  new = state.replace(params=params, batch_stats=stats,
                      opt_state=state_lib.init_opt_state(tx, params))
  return Initialised(new, taken, fresh, unused, reasons)


def _difference(theirs: Any, ours: Any) -> str:
  """'' when two blocks' params have the same names and shapes, else the first difference."""
  flat_theirs = {jax.tree_util.keystr(p): np.shape(v)
                 for p, v in jax.tree_util.tree_flatten_with_path(theirs)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(ours)[0]:
    key = jax.tree_util.keystr(path)
    if key not in flat_theirs:
      return f'no {key} in the source'
    if flat_theirs[key] != np.shape(leaf):
      return f'{key} is {flat_theirs[key]} in the source, {np.shape(leaf)} here'
  return '' if len(flat_theirs) == len(jax.tree.leaves(ours)) else 'other parameters'


def describe(path: str, result: Initialised) -> str:
  """The one line a run prints: which blocks were taken from ``path`` and which are fresh."""
  line = f'init_from {path}: taken {", ".join(result.taken) or "nothing"}'
  line += f'; fresh {", ".join(result.fresh)}' if result.fresh else '; nothing fresh'
  if result.reasons:
    line += f' ({"; ".join(result.reasons)})'
  if result.unused:
    line += f'; not used {", ".join(result.unused)}'
  return line
