"""The pure, jit-friendly step functions and the training loop.

The step functions take the whole state and a batch and return the new state.
``axis_name`` switches on the collectives needed under ``jax.pmap``; without it
the same code runs under plain or sharded ``jax.jit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gnet_jax import (augment, checkpoint, config as config_lib, finetune, inception_v1,
                      input_pipeline, metrics as metrics_lib, parallel, preemption,
                      state as state_lib, stream, workdir as workdir_lib, xla_flags)
from gnet_jax.errors import ConfigError, DatasetError, NonFiniteLossError
from gnet_jax.state import TrainState

# A data set spec's per-channel (mean, std), or None for images in [0, 1].
Normalization = tuple[tuple[float, ...], tuple[float, ...]] | None
# Called after every step with the global step number (tests inject signals here).
AfterStep = Callable[[int], None]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _example_offset(batch_size: int, axis_name: str | None) -> jax.Array:
  """Index of this shard's first example in the global batch (0 without pmap)."""
  if axis_name is None:
    return jnp.int32(0)
  return jax.lax.axis_index(axis_name) * batch_size


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: Any,
               tx: optax.GradientTransformation, image_size: int, aux_weight: float = 0.0,
               normalization: Normalization = None, augment_crop: str = 'none',
               augment_flip: bool = False, augment_padding: int = 0,
               axis_name: str | None = None) -> TrainState:
  """One optimizer step on ``batch``; adds the batch's loss and accuracy to ``state.metrics``.

  The loss is the mean over the (global) batch. Under ``jax.pmap`` pass
  ``axis_name``: gradients are averaged with ``pmean`` and metric sums added
  with ``psum``, so the result equals a single-device step on the whole batch.
  Each example's randomness (augmentation, the model's) comes from a key of
  (seed, step, its index in the global batch), the same on any device count.
  A model with BatchNorm (``state.batch_stats`` not empty) normalises with the
  batch's statistics and stores the updated running ones; under ``pmap`` it is
  cloned with ``axis_name`` so its batch moments span every device, as one
  device's would (under sharded ``jit`` they do already).
  """
  labels = batch['label']
  batch_size = labels.shape[0]
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  example_ids = _example_offset(batch_size, axis_name) + jnp.arange(batch_size)
  example_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(example_ids)
  images = augment.augment(input_pipeline.preprocess(batch['image'], image_size, normalization),
                           example_keys, augment_crop, augment_flip, augment_padding)

  has_stats = bool(jax.tree.leaves(state.batch_stats))
  if has_stats and axis_name is not None and getattr(model, 'axis_name', '') is None:
    model = model.clone(axis_name=axis_name)

  def loss_fn(params):
    if has_stats:
      out, updated = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                 train=True, example_keys=example_keys, mutable=['batch_stats'])
      batch_stats = updated['batch_stats']
    else:
      out = model.apply({'params': params}, images, train=True, example_keys=example_keys)
      batch_stats = state.batch_stats
    logits, aux = out if isinstance(out, tuple) else (out, [])
    main = jnp.mean(cross_entropy(logits, labels))
    total = main + aux_weight * sum(jnp.mean(cross_entropy(a, labels)) for a in aux)
    return total, (main, logits, batch_stats)

  (total, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32)
  sums = {'loss_sum': loss * batch_size, 'correct': correct, 'count': jnp.int32(batch_size),
          'nonfinite': (~jnp.isfinite(total)).astype(jnp.int32)}
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    sums = jax.lax.psum(sums, axis_name)
  # Tracked on device so the loop needs no per-step host sync: the number of the
  # first step with a NaN/inf loss, as a sum that receives a single nonzero term.
  sums['nonfinite_step'] = jnp.where(
      (sums['nonfinite'] > 0) & (state.metrics['nonfinite_step'] == 0), state.step + 1, 0)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_metrics = jax.tree.map(lambda a, b: a + b.astype(a.dtype), state.metrics, sums)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       metrics=new_metrics, batch_stats=batch_stats)


def eval_step(variables: Any, batch: dict[str, jax.Array], *, model: Any, image_size: int,
              num_classes: int = 10, normalization: Normalization = None,
              axis_name: str | None = None) -> dict[str, jax.Array]:
  """Sums over the real (unmasked) examples of ``batch``: loss, correct, count and confusion.

  ``variables``: ``state.variables`` (BatchNorm uses the running statistics,
  which stay as they are), or a bare params tree for a network without them.
  """
  logits = model.apply(state_lib.model_variables(variables),
                       input_pipeline.preprocess(batch['image'], image_size, normalization))
  mask, labels = batch['mask'], batch['label']
  predicted = jnp.argmax(logits, -1)
  losses = cross_entropy(logits, labels)
  sums = {'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0)),
          'correct': jnp.sum((predicted == labels) & mask).astype(jnp.int32),
          'count': jnp.sum(mask).astype(jnp.int32),
          # rows: true class, columns: predicted class
          'confusion': jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, predicted].add(
              mask.astype(jnp.int32))}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def evaluate(runner: parallel.Runner, eval_fn: Callable, variables: Any, images: np.ndarray,
             labels: np.ndarray, batch_size: int) -> dict[str, Any]:
  """Loss, accuracy and confusion matrix over a whole split; every example counted once.

  The one evaluation path: training calls it after each epoch and
  ``python -m gnet_jax.evaluate`` on a checkpoint. ``variables`` as ``eval_step``
  takes them, placed by ``runner``.
  """
  return evaluate_batches(runner, eval_fn, variables, input_pipeline.eval_batches(
      images, labels, batch_size, jax.process_index(), jax.process_count()))


def evaluate_batches(runner: parallel.Runner, eval_fn: Callable, variables: Any,
                     batches: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
  """``evaluate`` over given batches (with ``mask``): the memory path's or a stream's."""
  totals = None
  for batch in batches:
    sums = eval_fn(variables, runner.put_batch(batch))  # no per-batch host sync
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    return {'loss': math.nan, 'accuracy': math.nan, 'count': 0, 'confusion': None}
  totals = runner.to_host(totals)
  count = int(totals['count'])
  return {'loss': float(totals['loss_sum']) / max(count, 1),
          'accuracy': float(totals['correct']) / max(count, 1), 'count': count,
          'confusion': np.asarray(totals['confusion'])}


def compile_eval(runner: parallel.Runner, model: Any, image_size: int,
                 spec: input_pipeline.DatasetSpec) -> Callable:
  return runner.eval_step_fn(eval_step, model=model, image_size=image_size,
                             num_classes=spec.num_classes, normalization=spec.normalization)


def eval_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  size = config.eval_batch_size or config.batch_size
  return -(-size // num_devices) * num_devices  # round up to a multiple of the devices


def check_finite(sums: dict[str, Any], manager, steps_per_epoch: int) -> None:
  """The NaN guard: raises ``NonFiniteLossError`` naming the first bad step, if any."""
  bad = int(sums['nonfinite_step'])
  if not bad:
    return
  manager.wait_until_finished()
  good = manager.latest_step()
  kept = (f'the last good checkpoint is step {good} in {manager.directory}'
          if good is not None else 'no checkpoint was saved')
  raise NonFiniteLossError(
      f'the training loss became NaN or inf at step {bad} (epoch '
      f'{(bad - 1) // steps_per_epoch + 1}); stopped without saving; {kept}. '
      'Lower --config.learning_rate or check the data')


# ----------------------------------------------------------------------------- the loop


def load_data(config: ml_collections.ConfigDict, train_examples: int | None = None
              ) -> input_pipeline.Dataset:
  """The config's data set, its spec carrying the normalisation if asked.

  ``normalize_stats='training_set'``: the training images' channel statistics;
  ``'imagenet'``: ImageNet's (RGB only: ``ConfigError`` otherwise), which
  ImageNet weights were trained with.
  """
  data = input_pipeline.load_dataset(
      config.dataset, config.data_source, config.data_dir,
      config.train_examples if train_examples is None else train_examples, config.eval_examples,
      splits=(config.train_split, config.test_split), image_size=config.image_size,
      progress=config.progress and sys.stderr.isatty() and jax.process_index() == 0)
  if config.normalize and config.normalize_stats == 'imagenet':
    stats = imagenet_stats(data.spec)
    data = dataclasses.replace(data, spec=dataclasses.replace(data.spec, normalization=stats))
  elif config.normalize and len(data.train_images):
    stats = input_pipeline.channel_stats(data.train_images)
    data = dataclasses.replace(data, spec=dataclasses.replace(data.spec, normalization=stats))
  return data


def _load_data(config: ml_collections.ConfigDict, kind: str = 'memory'
               ) -> tuple[input_pipeline.Dataset | stream.StreamData, int]:
  """The data (in memory, or ``stream.StreamData`` for ``kind='stream'``) and steps per epoch."""
  if kind == 'stream':
    data = stream.load(config)
    stream.check_readable(data)
    if config.normalize and config.normalize_stats == 'imagenet':
      data = dataclasses.replace(data, spec=dataclasses.replace(
          data.spec, normalization=imagenet_stats(data.spec)))
    count = len(data.train)
  else:
    data = load_data(config)
    count = len(data.train_labels)
  steps = input_pipeline.steps_per_epoch(count, config.batch_size)
  if steps == 0:
    raise ConfigError(f'--config.batch_size={config.batch_size} is larger than the training set '
                      f'({count} examples); lower --config.batch_size')
  return data, steps


def imagenet_stats(spec: input_pipeline.DatasetSpec) -> tuple:
  """ImageNet's channel statistics, for RGB data only (``ConfigError`` otherwise)."""
  if spec.image_shape[-1] != 3:
    raise ConfigError(f'--config.normalize_stats=imagenet needs RGB images; {spec.name} '
                      f'images have {spec.image_shape[-1]} channel(s): use training_set')
  return (inception_v1.IMAGENET_MEAN, inception_v1.IMAGENET_STD)


def _check_same_data(workdir: Path, step: int, spec: input_pipeline.DatasetSpec
                     ) -> input_pipeline.DatasetSpec:
  """The spec a resumed run goes on with: the data's, checked against the checkpoint's.

  Classes and image shape must match exactly (``input_pipeline.check_same_data``).
  The normalisation is the checkpoint's own: statistics recomputed from the same
  images by another Pillow or libjpeg may differ in the last bits, and the run
  trained with the saved ones. A checkpoint without a readable spec (older, or
  damaged) keeps the data's.
  """
  saved = checkpoint.read_dataset_spec(workdir, step)
  try:
    old = input_pipeline.DatasetSpec.from_json(saved)
  except (AttributeError, KeyError, TypeError, ValueError, IndexError):  # None, or damaged
    return spec
  input_pipeline.check_same_data(old, spec, f'the checkpoint at step {step} in {workdir}',
                                 'resume with the same data, or use a new --workdir')
  return dataclasses.replace(spec, normalization=old.normalization)


def _restore_or_init(workdir: Path, init: TrainState, config: ml_collections.ConfigDict
                     ) -> tuple[TrainState, int, list[int], bool]:
  """The newest readable checkpoint of ``workdir`` checked against ``config``, else ``init``.

  Returns ``(host_state, step, damaged_steps, restored)``.
  """
  if not checkpoint.checkpoint_dir(workdir).is_dir():
    return init, 0, [], False
  reader = checkpoint.open_manager(workdir, read_only=True)
  try:
    restored = checkpoint.restore(reader, init, config)
  finally:
    reader.close()
  if restored is None:
    return init, 0, [], False
  host_state, _, step, damaged = restored
  return host_state, step, damaged, True


def make_train_step(runner: parallel.Runner, model: Any, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, spec: input_pipeline.DatasetSpec,
                    host_augment: bool = False) -> Callable:
  """``train_step`` with the config's settings, placed by ``runner``: the step a run takes
  (``benchmarks/replay.py`` replays a run's steps with it). ``host_augment``: the
  batches come augmented (a stream's workers did it), so the step does not."""
  return runner.train_step(train_step, model=model, tx=tx, image_size=config.image_size,
                           aux_weight=float(config.aux_weight),
                           normalization=spec.normalization,
                           augment_crop='none' if host_augment else config.augment_crop,
                           augment_flip=config.augment_flip and not host_augment,
                           augment_padding=config.augment_padding)


def _compile_train_step(runner, model, tx, config, spec, state, first_batch,
                        host_augment: bool = False) -> Callable:
  """AOT-compiled train step, so the first epoch's examples/sec excludes compilation."""
  t0 = time.perf_counter()
  step_fn = make_train_step(runner, model, tx, config, spec, host_augment)
  compiled = step_fn.lower(state, runner.put_batch(first_batch)).compile()
  if jax.process_index() == 0:
    since_start = xla_flags.seconds_since_process_start()
    print(f'train step compiled in {time.perf_counter() - t0:.1f} s'
          + (f' ({since_start:.1f} s after the process started)' if since_start else ''),
          flush=True)
  return compiled


def _save(manager, workdir: Path, step: int, state: TrainState, runner: parallel.Runner,
          config: ml_collections.ConfigDict, spec: input_pipeline.DatasetSpec,
          damaged: list[int], steps_per_epoch: int, data_iterator: Any = None) -> None:
  """NaN guard, then an async checkpoint of ``step`` (a damaged one at that step moved aside).

  ``data_iterator``: a streaming run's, whose position is saved with the state.
  """
  check_finite(runner.to_host({'nonfinite_step': state.metrics['nonfinite_step']}), manager,
               steps_per_epoch)
  if step in damaged and step in manager.all_steps():
    checkpoint.quarantine(manager, workdir, step)
  checkpoint.save(manager, step, runner.to_host(state), config, spec.to_json(), data_iterator)


def _initial_state(config: ml_collections.ConfigDict, spec: input_pipeline.DatasetSpec,
                   model: Any, tx: optax.GradientTransformation
                   ) -> tuple[TrainState, finetune.Initialised | None]:
  """The fresh host state, with ``config.init_from``'s weights where it names a source.

  Read before anything is written: a bad ``init_from`` stops the run with
  nothing in the workdir.
  """
  init = state_lib.create_train_state(config, spec, model, tx)
  if not config.init_from:
    return init, None
  initialised = finetune.initialise(config, init, tx, spec.class_names)
  return initialised.state, initialised


def _choose_input(config: ml_collections.ConfigDict, workdir: str | Path) -> str:
  """'memory' or 'stream' (``stream.choose_input``); an ``auto`` run that streams says why."""
  kind, why = stream.choose_input(config, stream.saved_stream(workdir))
  if config.input == 'auto' and kind == 'stream' and jax.process_index() == 0:
    print(f'input: stream ({why})', flush=True)
  return kind


def _batch_sources(kind: str, data: Any, spec: input_pipeline.DatasetSpec,
                   config: ml_collections.ConfigDict, steps_per_epoch: int, num_devices: int,
                   cleanup: contextlib.ExitStack) -> tuple[Callable, Callable, dict, Any]:
  """This process's training batches (``batches(epoch, position)``), a fresh pass over the
  test split (``test_batches()``), a batch to compile with, and the Grain iterator whose
  position a checkpoint saves (None in memory)."""
  index, count = jax.process_index(), jax.process_count()
  test_size = eval_batch_size(config, num_devices)
  if kind != 'stream':
    batches = lambda epoch, position: input_pipeline.train_batches(  # noqa: E731
        data.train_images, data.train_labels, config.batch_size, config.seed, epoch, position,
        index, count)
    test_batches = lambda: input_pipeline.eval_batches(  # noqa: E731
        data.test_images, data.test_labels, test_size, index, count)
    return batches, test_batches, next(batches(0, 0)), None
  data = dataclasses.replace(data, spec=spec)  # the checkpoint's normalisation
  # One Grain iterator over every epoch's batches; only Grain reads ahead, so its state is
  # the position of the last batch consumed, saved with each checkpoint.
  data_iterator = stream.iterate(stream.train_dataset(
      data, config.batch_size, config.seed, config.num_epochs, index, count,
      stream.Augment.from_config(config)), config.data_workers)
  cleanup.callback(stream.close, data_iterator)
  batches = lambda epoch, position: itertools.islice(  # noqa: E731
      data_iterator, steps_per_epoch - position)
  test_batches = lambda: stream.eval_batches(data, test_size, config.data_workers,  # noqa: E731
                                             index, count)
  return (batches, test_batches, _empty_batch(config.batch_size // count, spec.image_shape),
          data_iterator)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       model: Any = None, after_step: AfterStep | None = None) -> dict:
  """Trains ``config`` for ``num_epochs``, writing metrics, curves and checkpoints to ``workdir``.

  Continues from the newest readable checkpoint in ``workdir`` if there is one
  (same epoch, position, permutation and numbers as an uninterrupted run).
  ``model`` replaces the config's GoogLeNet (tests use a small network).
  A workdir that another run is training in is refused (``gnet_jax.workdir``).
  Returns the last epoch's metrics.
  """
  config_lib.validate(config)
  xla_flags.enable_compilation_cache(config.compilation_cache)
  runner = parallel.make_runner(config)
  kind = _choose_input(config, workdir)
  data, steps_per_epoch = _load_data(config, kind)  # first: the model's classes come from it
  spec = data.spec
  model = model or state_lib.create_model(config, spec)
  tx = state_lib.create_optimizer(config, steps_per_epoch)
  init, initialised = _initial_state(config, spec, model, tx)
  workdir = config_lib.check_workdir(workdir, checkpoint.bytes_needed(init, config))
  parallel.check_shared_workdir(workdir)
  # From here on this run alone writes to the workdir: a second run is refused here,
  # having written nothing into it, and a dead run's lock is gone with its process.
  with workdir_lib.hold(workdir), contextlib.ExitStack() as cleanup:
    host_state, start_step, damaged, restored = _restore_or_init(workdir, init, config)
    if restored:
      spec = _check_same_data(workdir, start_step, spec)
    elif initialised and jax.process_index() == 0:
      print(finetune.describe(config.init_from, initialised), flush=True)
    log = metrics_lib.RunLog(workdir, config, steps_per_epoch, start_step, runner.device_label,
                             state_lib.learning_rate_schedule(config, steps_per_epoch))
    if start_step >= config.num_epochs * steps_per_epoch:
      return log.nothing_to_do(start_step)
    log.start(data.source, runner.describe(config.batch_size), restored)

    state = runner.put_state(host_state)
    batches, test_batches, first_batch, data_iterator = _batch_sources(
        kind, data, spec, config, steps_per_epoch, runner.num_devices, cleanup)
    compiled_step = _compile_train_step(runner, model, tx, config, spec, state, first_batch,
                                        host_augment=kind == 'stream')
    eval_fn = compile_eval(runner, model, config.image_size, spec)
    xla_flags.return_freed_memory()  # the compiler's scratch memory: 0.5 GiB less peak RSS
    manager = checkpoint.open_manager(workdir, config.max_checkpoints, keep_steps=damaged)
    if data_iterator is not None and restored:
      stream.restore_position(manager, start_step, data_iterator, jax.process_index(),
                              jax.process_count())
    save = lambda step, state: _save(manager, workdir, step, state, runner, config,  # noqa: E731
                                     spec, damaged, steps_per_epoch, data_iterator)
    profiler = metrics_lib.Profiler(workdir, config.profile_steps, start_step)
    step, summary = start_step, log.last_epoch()
    with contextlib.closing(log), contextlib.closing(manager), profiler, preemption.StopRequest(
        manager, multi_host=jax.process_count() > 1) as stop, _damaged_files(
            kind, manager, workdir, lambda: step):
      for epoch in range(start_step // steps_per_epoch, config.num_epochs):
        position = step - epoch * steps_per_epoch
        log.start_epoch(epoch, position, runner.to_host(state.metrics))
        for batch in batches(epoch, position):
          state = compiled_step(state, runner.put_batch(batch))
          step += 1
          log.after_step(step, lambda: runner.to_host(state.metrics))
          profiler.after_step(step, state)
          if after_step:
            after_step(step)
          if step % steps_per_epoch:  # the epoch's last step is saved below, after evaluation
            stopping = stop.requested(step)
            if stopping or (config.checkpoint_every_steps and
                            step % config.checkpoint_every_steps == 0):
              save(step, state)
            if stopping:
              raise stop.interrupted(step, steps_per_epoch)
        sums = runner.to_host(state.metrics)  # the epoch's one full host read
        check_finite(sums, manager, steps_per_epoch)
        test = evaluate_batches(runner, eval_fn, state.variables, test_batches())
        summary = log.end_epoch(epoch, step, sums, test)
        state = state.replace(metrics=runner.put_state(state_lib.zero_metrics()))
        save(step, state)
        if stop.requested(step):
          raise stop.interrupted(step, steps_per_epoch)
    return summary


def _empty_batch(local_batch: int, image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """A batch of this process's shape, to compile the step without reading the stream."""
  return {'image': np.zeros((local_batch,) + tuple(image_shape), np.uint8),
          'label': np.zeros((local_batch,), np.int32)}


@contextlib.contextmanager
def _damaged_files(kind: str, manager, workdir: Path, step: Callable[[], int]):
  """A streaming run's unreadable file: the error says where the run stands and how to go on."""
  try:
    yield
  except DatasetError as e:
    if kind != 'stream':
      raise
    manager.wait_until_finished()
    raise stream.damaged(e, step(), manager.latest_step(), workdir) from None
