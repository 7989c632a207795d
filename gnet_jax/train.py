"""Train state, the jit-compiled train and eval steps, and the training loop.

The step functions are pure: they take the whole state and a batch and return
the new state. ``axis_name`` switches on the collectives needed under
``jax.pmap``; without it the same code runs under plain or sharded ``jax.jit``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gnet_jax import input_pipeline, metrics as metrics_lib, models, parallel

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
  return {'loss_sum': np.float32(0), 'correct': np.int32(0), 'count': np.int32(0)}


def compute_dtype(config: ml_collections.ConfigDict):
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if config.dtype not in dtypes:
    raise ValueError(f'unknown dtype {config.dtype!r}; choose float32 or bfloat16')
  return dtypes[config.dtype]


def make_model(config: ml_collections.ConfigDict) -> models.GoogLeNet:
  return models.GoogLeNet(num_classes=input_pipeline.NUM_CLASSES,
                          aux_heads=config.aux_weight > 0, dtype=compute_dtype(config))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Plain SGD as in the reference; momentum (and Nesterov) only when the config asks."""
  return optax.sgd(config.learning_rate, momentum=config.momentum or None,
                   nesterov=bool(config.get('nesterov', False)))


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

  grads, (loss, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
  correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32)
  sums = {'loss_sum': loss * batch_size, 'correct': correct, 'count': jnp.int32(batch_size)}
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    sums = jax.lax.psum(sums, axis_name)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains ``config`` for ``num_epochs``, writing metrics and curves to ``workdir``.

  Returns the last epoch's metrics.
  """
  workdir = Path(workdir)
  runner = parallel.make_runner(config)
  is_main = jax.process_index() == 0
  data = input_pipeline.load_dataset(config.dataset, config.data_source, config.data_dir,
                                     config.train_examples, config.eval_examples)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(data.train_labels), config.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {config.batch_size} is larger than the training set '
                     f'({len(data.train_labels)} examples); lower --config.batch_size')
  model, tx = make_model(config), make_optimizer(config)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json(indent=2) + '\n')
    print(f'data: {data.source} ({len(data.train_labels)} train, {len(data.test_labels)} test)')
    print(runner.describe(config.batch_size))

  state = runner.put_state(create_train_state(config, data.image_shape, model, tx))
  step_fn = runner.train_step(train_step, model=model, tx=tx, image_size=config.image_size,
                              aux_weight=float(config.aux_weight))
  eval_fn = runner.eval_step_fn(eval_step, model=model, image_size=config.image_size)
  runner = runner.with_eval(eval_fn)
  eval_batch_size = _eval_batch_size(config, runner.num_devices)

  history: list[dict] = []

  # Compile ahead so that the examples/sec of the first epoch excludes it.
  t0 = time.perf_counter()
  first = next(input_pipeline.train_batches(data.train_images, data.train_labels,
                                            config.batch_size, config.seed, 0, 0,
                                            jax.process_index(), jax.process_count()))
  compiled_step = step_fn.lower(state, runner.put_batch(first)).compile()
  logging.info('train step compiled in %.1f s', time.perf_counter() - t0)

  summary = {}
  for epoch in range(config.num_epochs):
    batches = input_pipeline.train_batches(data.train_images, data.train_labels,
                                           config.batch_size, config.seed, epoch, 0,
                                           jax.process_index(), jax.process_count())
    start = time.perf_counter()
    bar = metrics_lib.progress_bar(steps_per_epoch, f'epoch {epoch + 1}/{config.num_epochs}',
                                   enabled=config.progress and is_main)
    for batch in batches:
      state = compiled_step(state, runner.put_batch(batch))
      bar.update(1)
    sums = runner.to_host(state.metrics)  # the one host sync of the epoch
    seconds = time.perf_counter() - start
    bar.close()
    test = evaluate(runner, state.params, data, eval_batch_size)
    summary = {
        'epoch': epoch + 1,
        'step': int(runner.to_host(state.step)),
        'train_loss': float(sums['loss_sum']) / int(sums['count']),
        'train_acc': float(sums['correct']) / int(sums['count']),
        'test_loss': test['loss'],
        'test_acc': test['accuracy'],
        'examples_per_sec': int(sums['count']) / seconds,
        'seconds': seconds,
    }
    state = state.replace(metrics=runner.put_state(zero_metrics()))
    history.append(summary)
    if is_main:
      print(metrics_lib.epoch_line(summary, config.num_epochs, runner.device_label))
      metrics_lib.write_jsonl(workdir / 'metrics.jsonl', history)
      metrics_lib.plot_curves(history, workdir / 'curves.png')
  return summary
