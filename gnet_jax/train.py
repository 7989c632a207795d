"""Train state, the jit-compiled train and eval steps, and the training loop.

The step functions are pure: they take the whole state and a batch and return
the new state. ``axis_name`` switches on the collectives needed under
``jax.pmap``; without it the same code runs under plain or sharded ``jax.jit``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gnet_jax import checkpoint, input_pipeline, metrics as metrics_lib, models, parallel

EPOCH_METRICS = ('loss_sum', 'correct', 'count')


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: params, optimizer, RNG and the epoch's running sums.

  ``metrics`` holds the current epoch's sums on device, so nothing is read back
  to the host per step and a checkpoint taken mid-epoch carries them along.
  """

  step: jax.Array  # int32, global step count
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key data (checkpoint-friendly)
  metrics: dict[str, jax.Array]


def zero_metrics() -> dict[str, np.ndarray]:
  """The epoch's sums at its start; ``nonfinite_step`` is the first step with a NaN/inf loss (0 = none)."""
  return {'loss_sum': np.float32(0), 'correct': np.int32(0), 'count': np.int32(0),
          'nonfinite': np.int32(0), 'nonfinite_step': np.int32(0)}


def compute_dtype(config: ml_collections.ConfigDict):
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if config.dtype not in dtypes:
    raise ValueError(f'unknown dtype {config.dtype!r}; choose float32 or bfloat16')
  return dtypes[config.dtype]


def make_model(config: ml_collections.ConfigDict) -> models.GoogLeNet:
  return models.GoogLeNet(num_classes=input_pipeline.NUM_CLASSES,
                          aux_heads=config.aux_weight > 0, dtype=compute_dtype(config))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Plain SGD as in the reference (momentum and Nesterov when asked), or Adam.

  Adam gets this normalisation-free network off its initial plateau within a
  few hundred steps, where SGD needs a few epochs; the quickstart uses it.
  """
  name = config.get('optimizer', 'sgd')
  if name == 'sgd':
    return optax.sgd(config.learning_rate, momentum=config.momentum or None,
                     nesterov=bool(config.get('nesterov', False)))
  if name == 'adam':
    return optax.adam(config.learning_rate)
  raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam' (--config.optimizer=...)")


def create_train_state(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                       model: models.GoogLeNet, tx: optax.GradientTransformation) -> TrainState:
  """The initial state, on the host (NumPy leaves): placement is the runner's job."""
  size = config.image_size
  params = models.init_params(model, config.seed, (size, size, image_shape[-1]))
  opt_state = jax.tree.map(np.asarray, jax.device_get(tx.init(params)))
  return TrainState(step=np.int32(0), params=params, opt_state=opt_state,
                    rng=np.asarray(jax.random.key_data(jax.random.key(config.seed))),
                    metrics=zero_metrics())


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """uint8 NHWC at stored size -> float32 in [0, 1] at ``image_size`` (on device).

  Bilinear with antialiasing, as torchvision's ``Resize`` does by default.
  """
  x = images.astype(jnp.float32) / 255.0
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]),
                         method='bilinear', antialias=True)
  return x


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _example_offset(batch_size: int, axis_name: str | None) -> jax.Array:
  """Index of this shard's first example in the global batch (0 without pmap)."""
  if axis_name is None:
    return jnp.int32(0)
  return jax.lax.axis_index(axis_name) * batch_size


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.GoogLeNet,
               tx: optax.GradientTransformation, image_size: int, aux_weight: float = 0.0,
               axis_name: str | None = None) -> TrainState:
  """One SGD step on ``batch``; adds the batch's loss and accuracy to ``state.metrics``.

  The loss is the mean over the (global) batch. Under ``jax.pmap`` pass
  ``axis_name``: gradients are averaged with ``pmean`` and metric sums added
  with ``psum``, so the result equals a single-device step on the whole batch.
  """
  images = preprocess(batch['image'], image_size)
  labels = batch['label']
  batch_size = labels.shape[0]
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  example_ids = _example_offset(batch_size, axis_name) + jnp.arange(batch_size)
  example_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(example_ids)

  def loss_fn(params):
    out = model.apply({'params': params}, images, train=True, example_keys=example_keys)
    logits, aux = out if isinstance(out, tuple) else (out, [])
    main = jnp.mean(cross_entropy(logits, labels))
    total = main + aux_weight * sum(jnp.mean(cross_entropy(a, labels)) for a in aux)
    return total, (main, logits)

  (total, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
                       metrics=new_metrics)


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: models.GoogLeNet,
              image_size: int, axis_name: str | None = None) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions over the real (unmasked) examples of ``batch``."""
  logits = model.apply({'params': params}, preprocess(batch['image'], image_size))
  mask = batch['mask']
  losses = cross_entropy(logits, batch['label'])
  sums = {'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0)),
          'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) & mask).astype(jnp.int32),
          'count': jnp.sum(mask).astype(jnp.int32)}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def evaluate(runner: parallel.Runner, params: Any, data: input_pipeline.Dataset,
             batch_size: int) -> dict[str, float]:
  """Loss and accuracy over the whole test split; every example counted exactly once."""
  totals = None
  for batch in input_pipeline.eval_batches(data.test_images, data.test_labels, batch_size,
                                           jax.process_index(), jax.process_count()):
    sums = runner.eval_step(params, runner.put_batch(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    return {'loss': math.nan, 'accuracy': math.nan, 'count': 0}
  totals = runner.to_host(totals)
  count = int(totals['count'])
  return {'loss': float(totals['loss_sum']) / max(count, 1),
          'accuracy': float(totals['correct']) / max(count, 1), 'count': count}


def _eval_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  size = config.get('eval_batch_size', 0) or config.batch_size
  return -(-size // num_devices) * num_devices  # round up to a multiple of the devices


class NonFiniteLossError(ValueError):
  """The loss became NaN or inf; the last good checkpoint is kept."""


class Interrupted(Exception):
  """Stopped by SIGTERM/SIGINT after saving a checkpoint; exit with ``exit_code`` (128 + signal)."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class _StopRequest:
  """Turns the first SIGTERM/SIGINT into a request to stop at the next step boundary.

  A second SIGINT aborts at once. With several processes the handlers are not
  installed: a signal on one host must not make hosts save different steps, so
  there orbax's preemption sync point (``reached_preemption``) decides instead.
  """

  def __init__(self, manager, multi_host: bool):
    self.signum = None
    self._manager = manager
    self._multi_host = multi_host
    self._previous = {}

  def __enter__(self) -> '_StopRequest':
    if not self._multi_host and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    if self.signum is not None:
      if signum == signal.SIGINT:
        print('second interrupt: aborting at once, without a checkpoint', file=sys.stderr,
              flush=True)
        os._exit(128 + signum)
      return
    self.signum = signum
    print(f'{signal.Signals(signum).name} received: saving a checkpoint at the next step '
          'boundary, then stopping (Ctrl-C again aborts at once)', file=sys.stderr, flush=True)

  def requested(self, step: int) -> bool:
    if self._multi_host and self.signum is None and self._manager.reached_preemption(step):
      self.signum = signal.SIGTERM
    return self.signum is not None


def _test_hook(step: int, manager) -> None:
  """For tests only: ``GNET_JAX_TEST_SIGNAL=STEP:KILL|TERM|INT`` signals this process after STEP.

  KILL waits for pending checkpoint writes first, so the newest checkpoint on
  disk is known; it simulates a crash at a precise, reproducible point.
  """
  hook = os.environ.get('GNET_JAX_TEST_SIGNAL')
  if not hook:
    return
  at, name = hook.split(':')
  if step == int(at):
    if name == 'KILL':
      manager.wait_until_finished()
    os.kill(os.getpid(), getattr(signal, f'SIG{name}'))


def _quarantine(manager, workdir: Path, step: int) -> None:
  """Moves a damaged checkpoint that a new one is about to replace to ``damaged_checkpoints/``.

  Orbax never overwrites a step, and a damaged checkpoint is never deleted by
  this program: it stays for the user to inspect or remove.
  """
  if jax.process_index() == 0:
    dest = workdir / 'damaged_checkpoints' / str(step)
    n = 1
    while dest.exists():
      dest, n = workdir / 'damaged_checkpoints' / f'{step}.{n}', n + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(checkpoint.checkpoint_dir(workdir) / str(step), dest)
    checkpoint.warn(f'moved the unreadable checkpoint at step {step} to {dest} '
                    'before saving a new one at that step')
  manager.reload()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains ``config`` for ``num_epochs``, writing metrics, curves and checkpoints to ``workdir``.

  Continues from the newest readable checkpoint in ``workdir`` if there is one
  (same epoch, position, permutation and numbers as an uninterrupted run).
  Returns the last epoch's metrics.
  """
  workdir = Path(workdir).absolute()
  runner = parallel.make_runner(config)
  is_main = jax.process_index() == 0
  data = input_pipeline.load_dataset(config.dataset, config.data_source, config.data_dir,
                                     config.train_examples, config.eval_examples)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(data.train_labels), config.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {config.batch_size} is larger than the training set '
                     f'({len(data.train_labels)} examples); lower --config.batch_size')
  model, tx = make_model(config), make_optimizer(config)
  host_state = create_train_state(config, data.image_shape, model, tx)

  # Resume: the newest readable checkpoint, checked against this config first.
  start_step, damaged, restored = 0, [], None
  if checkpoint.checkpoint_dir(workdir).is_dir():
    reader = checkpoint.open_manager(workdir, read_only=True)
    try:
      restored = checkpoint.restore(reader, host_state, config)
    finally:
      reader.close()
    if restored is not None:
      host_state, _, start_step, damaged = restored
  total_steps = config.num_epochs * steps_per_epoch
  history = [m for m in metrics_lib.read_jsonl(workdir / 'metrics.jsonl')
             if m['epoch'] <= start_step // steps_per_epoch] if start_step else []
  if start_step >= total_steps:
    if is_main:
      print(f'nothing to do: {workdir} holds a run trained for {start_step // steps_per_epoch} '
            f'epoch(s) (step {start_step}), num_epochs is {config.num_epochs}; raise '
            '--config.num_epochs to train further')
    return history[-1] if history else {}

  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json(indent=2) + '\n')
    print(f'data: {data.source} ({len(data.train_labels)} train, {len(data.test_labels)} test)')
    print(runner.describe(config.batch_size))
    if restored is not None and not start_step:
      print('starting from the step-0 checkpoint in the workdir (e.g. imported weights)')
    elif start_step:
      print(f'resuming from the checkpoint at step {start_step} (epoch '
            f'{start_step // steps_per_epoch + 1}, step {start_step % steps_per_epoch} of '
            f'{steps_per_epoch})')

  state = runner.put_state(host_state)
  step_fn = runner.train_step(train_step, model=model, tx=tx, image_size=config.image_size,
                              aux_weight=float(config.aux_weight))
  eval_fn = runner.eval_step_fn(eval_step, model=model, image_size=config.image_size)
  runner = runner.with_eval(eval_fn)
  eval_batch_size = _eval_batch_size(config, runner.num_devices)

  # Compile ahead so that the examples/sec of the first epoch excludes it.
  t0 = time.perf_counter()
  first = next(input_pipeline.train_batches(data.train_images, data.train_labels,
                                            config.batch_size, config.seed, 0, 0,
                                            jax.process_index(), jax.process_count()))
  compiled_step = step_fn.lower(state, runner.put_batch(first)).compile()
  logging.info('train step compiled in %.1f s', time.perf_counter() - t0)

  every = int(config.get('checkpoint_every_steps', 0))
  manager = checkpoint.open_manager(workdir, int(config.get('max_checkpoints', 3)),
                                    keep_steps=damaged)
  last_saved = start_step if start_step else None

  def save(step: int) -> None:
    """Checks the loss stayed finite (one small host read), then starts an async save."""
    nonlocal last_saved
    bad = int(runner.to_host(state.metrics['nonfinite_step']))
    if bad:
      manager.wait_until_finished()
      good = manager.latest_step()
      kept = (f'the last good checkpoint is step {good} in {manager.directory}'
              if good is not None else 'no checkpoint was saved')
      raise NonFiniteLossError(
          f'the training loss became NaN or inf at step {bad} (epoch '
          f'{(bad - 1) // steps_per_epoch + 1}); stopped without saving; {kept}. '
          'Lower --config.learning_rate or check the data')
    if step in damaged and step in manager.all_steps():
      _quarantine(manager, workdir, step)
    checkpoint.save(manager, step, runner.to_host(state), config)
    last_saved = step

  def stop(step: int) -> None:
    if last_saved != step:
      save(step)
    manager.wait_until_finished()
    name = signal.Signals(stop_request.signum).name
    epoch, position = divmod(step, steps_per_epoch)
    raise Interrupted(
        f'stopped by {name} at step {step} (epoch {epoch + 1}, step {position} of '
        f'{steps_per_epoch}); checkpoint saved in {manager.directory / str(step)}; '
        'rerun the same command to resume', 128 + stop_request.signum)

  summary = history[-1] if history else {}
  step = start_step
  stop_request = _StopRequest(manager, multi_host=jax.process_count() > 1)
  try:
    with stop_request:
      for epoch in range(start_step // steps_per_epoch, config.num_epochs):
        position = step - epoch * steps_per_epoch
        batches = input_pipeline.train_batches(data.train_images, data.train_labels,
                                               config.batch_size, config.seed, epoch, position,
                                               jax.process_index(), jax.process_count())
        start = time.perf_counter()
        bar = metrics_lib.progress_bar(steps_per_epoch,
                                       f'epoch {epoch + 1}/{config.num_epochs}',
                                       enabled=config.progress and is_main)
        bar.update(position)
        for batch in batches:
          state = compiled_step(state, runner.put_batch(batch))
          step += 1
          bar.update(1)
          if every and step % every == 0 and step % steps_per_epoch:
            save(step)  # the epoch's last step is saved below, after its bookkeeping
          _test_hook(step, manager)
          if step % steps_per_epoch and stop_request.requested(step):
            stop(step)
        sums = runner.to_host(state.metrics)  # the one host sync of the epoch
        seconds = time.perf_counter() - start
        bar.close()
        if int(sums['nonfinite_step']):
          save(step)  # raises NonFiniteLossError, naming the step
        test = evaluate(runner, state.params, data, eval_batch_size)
        summary = {
            'epoch': epoch + 1,
            'step': step,
            'train_loss': float(sums['loss_sum']) / int(sums['count']),
            'train_acc': float(sums['correct']) / int(sums['count']),
            'test_loss': test['loss'],
            'test_acc': test['accuracy'],
            # Examples trained in this process's run (less than an epoch after a resume).
            'examples_per_sec': (steps_per_epoch - position) * config.batch_size / seconds,
            'seconds': seconds,
        }
        state = state.replace(metrics=runner.put_state(zero_metrics()))
        history.append(summary)
        if is_main:
          print(metrics_lib.epoch_line(summary, config.num_epochs, runner.device_label))
          metrics_lib.write_jsonl(workdir / 'metrics.jsonl', history)
          metrics_lib.plot_curves(history, workdir / 'curves.png')
        save(step)
        if stop_request.requested(step):
          stop(step)
  finally:
    manager.close()  # waits for the last save to be written
  return summary
