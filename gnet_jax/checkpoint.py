"""Orbax checkpoints of the whole train state: open, save, restore with fallback, config check.

A checkpoint lives in ``<workdir>/checkpoints/<step>/`` and holds two items:
``state`` (the ``TrainState`` as host NumPy arrays, one replica) and ``config``
(the config that produced it, as JSON). Saving one unreplicated host copy makes
checkpoints layout-free: a state saved under ``pmap`` or ``sharded`` on N
devices restores on one device and vice versa, because restoring reads plain
arrays whose shapes and dtypes come from the target and the current runner then
places them (``runner.put_state``).

In memory (``input=memory``) the data position needs no storage of its own: it
follows from ``state.step`` (epoch = step // steps_per_epoch, position = step %
steps_per_epoch), and the epoch's running metric sums travel in
``state.metrics``. A streaming run also saves its Grain iterator's state (the
``data`` item, ``gnet_jax.stream``), read back by ``stream.restore_position``.

Damaged checkpoints (missing, truncated or zeroed files) are skipped with a
warning, newest first; nothing here ever deletes one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gnet_jax import config as config_lib
from gnet_jax.errors import CheckpointError

CHECKPOINT_DIR = 'checkpoints'
# dataset: a DatasetSpec as JSON (older checkpoints lack it); data: a streaming run's Grain
# iterator state, one JSON file per process (memory runs and older checkpoints have none).
ITEMS = ('state', 'config', 'dataset', 'data')

# Config keys that may change between a checkpoint and the run resuming from it:
# how long to train, how to report, how to checkpoint, where the data folder is
# and how the work is spread over devices and hosts. Every other key shapes the
# model, the data, the optimizer or the order of examples, so a change would
# silently break exact resumption; such a resume is refused. ``init_from`` only
# starts a run: a resumed one continues from its checkpoint, whatever file it names.
RESUMABLE_CHANGES = frozenset({
    'num_epochs', 'progress', 'checkpoint_every_steps', 'max_checkpoints',
    'eval_batch_size', 'data_dir', 'parallelism', 'num_devices', 'distributed',
    'coordinator_address', 'num_processes', 'process_id', 'kernels', 'log_every_steps',
    'profile_steps', 'compilation_cache', 'init_from', 'input',
})
# ``input`` may go from 'auto' to the path the run took and back; a change of the path itself
# (memory <-> stream) is refused by ``train``, which knows which one the checkpoint used.


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir).absolute() / CHECKPOINT_DIR


def open_manager(workdir: str | Path, max_to_keep: int = 3, keep_steps: Sequence[int] = (),
                 read_only: bool = False) -> ocp.CheckpointManager:
  """The ``CheckpointManager`` of ``workdir`` (saves asynchronously).

  ``max_to_keep`` newest checkpoints are kept (0 = all); ``keep_steps`` are
  never removed by the manager (used for damaged checkpoints that must survive
  until a newer good one exists). Leftover half-written temporary folders are
  left alone (``cleanup_tmp_directories`` stays off) so nothing is deleted
  behind the user's back. ``read_only`` only skips creating the folder: orbax's
  own read-only mode logs warnings on every open, and readers never call save.
  """
  policy = ocp.checkpoint_managers.LatestN(max_to_keep or None)
  if keep_steps:
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [policy, ocp.checkpoint_managers.CustomSteps(list(keep_steps))])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=True, create=not read_only,
      cleanup_tmp_directories=False)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def host_tree(tree: Any) -> Any:
  """Every leaf as a NumPy array (0-d arrays, not NumPy scalars, which orbax rejects)."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def config_dict(config: ml_collections.ConfigDict | dict) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return dict(config)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict | dict, dataset: dict | None = None,
         data_iterator: Any = None) -> None:
  """Starts saving ``state`` (one unreplicated replica, host or device) at ``step``.

  ``dataset`` (a ``DatasetSpec.to_json()``: class names, image shape,
  normalisation) is saved beside it, so commands on the run need only the
  workdir. ``data_iterator``: a streaming run's Grain iterator, whose position
  (the batches consumed so far) is saved as the ``data`` item, written now,
  before the loop reads on. Returns once the data is copied; writing goes on
  in the background. Call ``manager.wait_until_finished()`` before relying on it.
  """
  items = {'state': ocp.args.StandardSave(host_tree(state)),
           'config': ocp.args.JsonSave(config_dict(config))}
  if dataset is not None:
    items['dataset'] = ocp.args.JsonSave(dataset)
  if data_iterator is not None:
    import grain
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def bytes_needed(state: Any, config: ml_collections.ConfigDict) -> int:
  """Disk space the run's checkpoints may take: the kept copies of ``state`` plus one being written."""
  size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
  kept = config.max_checkpoints or config.num_epochs
  return size * (kept + 1)


def config_differences(saved: dict, config: ml_collections.ConfigDict | dict) -> list[str]:
  """Keys whose value differs between ``saved`` and ``config`` and may not change on resume."""
  current = config_dict(config)
  keys = sorted((set(saved) | set(current)) - RESUMABLE_CHANGES)
  missing = object()
  return [k for k in keys if saved.get(k, missing) != current.get(k, missing)]


def _reason(error: BaseException) -> str:
  """A one-line reason from orbax/tensorstore errors, which are often pages long."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[0] if lines else ''
  if len(text) > 200:
    text = text[:197] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _quiet_late_read_callbacks() -> None:
  """Drops 'Event loop is closed' noise left by a failed restore.

  When one read of a damaged checkpoint fails, orbax closes its event loop
  while tensorstore still completes the other reads; their callbacks then
  raise into ``sys.unraisablehook``, printing dozens of tracebacks that say
  nothing about the damage (already reported in one line). Other unraisable
  exceptions still reach the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, '_gnet_quiet', False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and (
        'Event loop is closed' in str(unraisable.exc_value)):
      return
    previous(unraisable)

  hook._gnet_quiet = True
  sys.unraisablehook = hook


def warn(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr, flush=True)


def read_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config saved at ``step``, as saved; keys added since it was written get the value
  that reproduces how it ran (``config.with_defaults``), never today's default.

  Every saved config is read through this function, so nothing else needs a
  fallback for a missing key. One that lacks a key every checkpoint saves is
  damaged: ``CheckpointError`` (``restore`` then tries the next older step).
  """
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  filled = config_lib.with_defaults(saved)
  missing = sorted(set(config_lib.RULES) - set(filled))
  if missing:
    raise CheckpointError(f'its config lacks {", ".join(missing)}, which every checkpoint saves')
  return filled


def restore(manager: ocp.CheckpointManager, target: Any,
            config: ml_collections.ConfigDict | dict | None = None,
            step: int | None = None) -> tuple[Any, dict, int, list[int]] | None:
  """Restores the newest readable checkpoint (or exactly ``step``) into ``target``'s structure.

  ``target`` is a host state (NumPy leaves) giving structure, shapes and dtypes;
  the result is on the host, ready for ``runner.put_state``. With ``config``,
  the checkpoint's config must agree on every key outside ``RESUMABLE_CHANGES``.

  Returns ``(state, saved_config, step, damaged_steps)``, or None when there is
  no checkpoint at all. Unreadable checkpoints newer than the one restored are
  reported with a warning and listed in ``damaged_steps``; if none is readable,
  raises ``CheckpointError`` (nothing is deleted either way).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  where = manager.directory
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'no checkpoint for step {step} in {where}; available steps: '
                            f'{", ".join(map(str, sorted(steps))) or "none"}')
    steps = [step]
  if not steps:
    return None
  target = host_tree(target)
  _quiet_late_read_callbacks()
  damaged = []
  for s in steps:
    # Orbax reports damage through many exception types (ValueError, FileNotFoundError,
    # tensorstore and JSON errors, ...); any failure to read means "try the next one".
    try:
      saved_config = read_config(manager, s)
    except Exception as e:  # pylint: disable=broad-except
      damaged.append(s)
      warn(f'checkpoint at step {s} in {where} cannot be read ({_reason(e)}); '
           'trying the next older one')
      continue
    if config is not None:
      diff = config_differences(saved_config, config)
      if diff:
        current = config_dict(config)
        detail = ', '.join(f'{k}: {saved_config.get(k, "<unset>")!r} in checkpoint, '
                           f'{current.get(k, "<unset>")!r} now' for k in diff)
        raise CheckpointError(
            f'the checkpoint at step {s} in {where} was made with a different config '
            f'({detail}); resume with the same values, or use a new --workdir')
    try:
      restored = _restore_state(manager, s, target)
      if int(restored.step) != s:
        raise ValueError(f'state says step {int(restored.step)}')
    except Exception as e:  # pylint: disable=broad-except
      damaged.append(s)
      warn(f'checkpoint at step {s} in {where} cannot be read ({_reason(e)}); '
           'trying the next older one')
      continue
    if damaged:
      warn(f'restored the checkpoint at step {s} instead; the unreadable one(s) at step(s) '
           f'{", ".join(map(str, damaged))} are kept until newer checkpoints replace them')
    return restored, saved_config, s, damaged
  raise CheckpointError(
      f'no readable checkpoint in {where} (tried step(s) {", ".join(map(str, steps))}; '
      'see the warnings above); nothing was deleted: move the folder away to start afresh')


def _restore_state(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """The ``state`` item of ``step`` in ``target``'s structure.

  A field of a dataclass ``target`` that the checkpoint lacks and that is empty
  in ``target`` (``batch_stats`` of a network without BatchNorm, in a
  checkpoint written before the field existed) keeps ``target``'s value: orbax
  refuses a target with a key the checkpoint has not.
  """
  absent = []
  if dataclasses.is_dataclass(target):
    handler = ocp.StandardCheckpointHandler()  # the manager knows item handlers only once used
    try:
      saved = handler.metadata(Path(manager.directory) / str(step) / 'state').tree
    finally:
      handler.close()
    absent = [f.name for f in dataclasses.fields(target) if isinstance(saved, Mapping)
              and f.name not in saved and not jax.tree.leaves(getattr(target, f.name))]
  if not absent:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target))).state
  fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)
            if f.name not in absent}
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(fields))).state
  return target.replace(**restored)


def save_state(workdir: str | Path, state: Any, config: ml_collections.ConfigDict,
               dataset: dict | None = None) -> Path:
  """Writes ``state`` (e.g. imported weights) as a checkpoint plus ``config.json`` in ``workdir``.

  ``train.py`` with the same workdir and config then continues from it (a
  step-0 state fine-tunes from the start), and ``gnet_jax.evaluate`` evaluates
  it. ``dataset``: the data set spec saved with it (as ``save``; without one the
  MNIST family's fixed spec applies). Refuses a workdir that already has
  checkpoints. Returns the step folder.
  """
  workdir = Path(workdir)
  steps = _existing_steps(workdir)
  if steps:
    raise CheckpointError(f'{checkpoint_dir(workdir)} already holds checkpoints (steps '
                          f'{", ".join(map(str, steps))}); choose an empty --workdir')
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json(indent=2) + '\n')
  step = int(np.asarray(jax.device_get(state.step)))
  manager = open_manager(workdir, max_to_keep=config.max_checkpoints)
  try:
    save(manager, step, state, config, dataset)
    manager.wait_until_finished()
  finally:
    manager.close()
  return checkpoint_dir(workdir) / str(step)


def _existing_steps(workdir: str | Path) -> list[int]:
  folder = checkpoint_dir(workdir)
  if not folder.is_dir():
    return []
  manager = open_manager(workdir, read_only=True)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def _open_existing(workdir: str | Path) -> ocp.CheckpointManager:
  if not checkpoint_dir(workdir).is_dir():
    raise CheckpointError(f'no checkpoints in {checkpoint_dir(workdir)}; train first '
                          f'(python train.py --config ... --workdir {workdir})')
  return open_manager(workdir, read_only=True)


def read_newest_config(workdir: str | Path, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with the newest readable checkpoint of ``workdir`` (or ``step``'s).

  Callers build the restore target from it (``gnet_jax.state.load_checkpoint``).
  """
  manager = _open_existing(workdir)
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f'no checkpoint for step {step} in {manager.directory}; available '
                              f'steps: {", ".join(map(str, sorted(steps))) or "none"}')
      steps = [step]
    if not steps:
      raise CheckpointError(f'no checkpoints in {manager.directory}; train first')
    for s in steps:
      try:
        return ml_collections.ConfigDict(read_config(manager, s))
      except Exception:  # pylint: disable=broad-except  (restore_from_workdir warns about it)
        continue
    # None readable: restore() reports every step and raises CheckpointError.
    restore(manager, {}, step=step)
    raise CheckpointError(f'no readable checkpoint in {manager.directory}')
  finally:
    manager.close()


def read_dataset_spec(workdir: str | Path, step: int | None = None) -> dict | None:
  """The data set spec saved with the newest checkpoint (or ``step``'s) that has one.

  None for checkpoints saved before specs were (the MNIST family's fixed spec
  applies to them).
  """
  manager = _open_existing(workdir)
  try:
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    for s in steps:
      if not (checkpoint_dir(workdir) / str(s) / 'dataset').is_dir():
        continue
      try:
        return manager.restore(s, args=ocp.args.Composite(
            dataset=ocp.args.JsonRestore())).dataset
      except Exception:  # pylint: disable=broad-except  (damaged: restore() reports it)
        continue
    return None
  finally:
    manager.close()


def restore_from_workdir(workdir: str | Path, target: Any, step: int | None = None
                         ) -> tuple[Any, ml_collections.ConfigDict, int]:
  """``restore`` on ``workdir``'s checkpoints; ``(state, saved_config, step)``, or CheckpointError."""
  manager = _open_existing(workdir)
  try:
    restored = restore(manager, target, step=step)
    if restored is None:
      raise CheckpointError(f'no checkpoints in {manager.directory}; train first')
    state, saved_config, restored_step, _ = restored
    return state, ml_collections.ConfigDict(saved_config), restored_step
  finally:
    manager.close()


def quarantine(manager: ocp.CheckpointManager, workdir: str | Path, step: int) -> Path | None:
  """Moves a damaged checkpoint that a new one is about to replace to ``damaged_checkpoints/``.

  Orbax never overwrites a step, and a damaged checkpoint is never deleted by
  this program: it stays for the user to inspect or remove. With several
  processes only process 0 moves it, and every process waits for the move
  before any reloads the checkpoint list.
  """
  workdir, dest = Path(workdir).absolute(), None
  if jax.process_index() == 0:
    dest = workdir / 'damaged_checkpoints' / str(step)
    n = 1
    while dest.exists():
      dest, n = workdir / 'damaged_checkpoints' / f'{step}.{n}', n + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(checkpoint_dir(workdir) / str(step), dest)
    warn(f'moved the unreadable checkpoint at step {step} to {dest} before saving a new one '
         'at that step')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'gnet_jax quarantine {step}')
  manager.reload()
  return dest
