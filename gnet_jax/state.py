"""The one place that turns a config into things: model, optimizer, initial train state.

Everything here is built on the host (NumPy leaves); placing it on devices is
``gnet_jax.parallel``'s job.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gnet_jax import checkpoint, config as config_lib, inception_v1, input_pipeline, models
from gnet_jax.errors import CheckpointError, ConfigError

# Validated names (``config.RULES``) -> what they stand for.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Each takes the config and the learning rate (a float, or an optax schedule).
OPTIMIZERS = {
    'sgd': lambda c, lr: optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov),
    'adam': lambda c, lr: (optax.adamw(lr, weight_decay=c.weight_decay) if c.weight_decay
                           else optax.adam(lr)),
}


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: params, optimizer, RNG, BatchNorm statistics, the epoch's sums.

  ``metrics`` holds the current epoch's sums on device, so nothing is read back
  to the host per step and a checkpoint taken mid-epoch carries them along.
  ``batch_stats`` is the model's running statistics (``inception_v1``'s
  BatchNorm), updated by the train step; empty for the d2l network, which has
  none (and for checkpoints written before the field existed).
  """

  step: jax.Array  # int32, global step count
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key data (checkpoint-friendly)
  metrics: dict[str, jax.Array]
  batch_stats: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    """What ``model.apply`` takes: ``{'params': ...}``, and ``'batch_stats'`` if there are any."""
    return model_variables({'params': self.params, 'batch_stats': self.batch_stats})


def model_variables(tree: Any) -> dict:
  """``model.apply``'s variables from either a bare params tree or ``{'params', 'batch_stats'}``.

  Evaluation and prediction take either, so callers holding only a network's
  params (the d2l one has no other state) need not wrap them. Empty
  collections are dropped.
  """
  variables = dict(tree) if isinstance(tree, Mapping) and 'params' in tree else {'params': tree}
  return {k: v for k, v in variables.items() if k == 'params' or jax.tree.leaves(v)}


def zero_metrics() -> dict[str, np.ndarray]:
  """The epoch's sums at its start; ``nonfinite_step`` is the first step with a NaN/inf loss (0 = none)."""
  return {'loss_sum': np.float32(0), 'correct': np.int32(0), 'count': np.int32(0),
          'nonfinite': np.int32(0), 'nonfinite_step': np.int32(0)}


def create_model(config: ml_collections.ConfigDict, spec: input_pipeline.DatasetSpec,
                 axis_name: str | None = None) -> nn.Module:
  """``config.model`` (checked by ``config.validate``) for the dataset's classes.

  ``d2l``: the book's GoogLeNet; ``inception_v1``: torchvision's, whose
  BatchNorm averages its batch moments over ``axis_name`` when given (the train
  step sets it under ``pmap`` itself); frozen blocks' BatchNorm (``trainable``,
  ``bn_stats``) keeps its running statistics. ``transform_input`` needs RGB images
  (torchvision's ImageNet constants are per RGB channel): ``ConfigError``.
  """
  dtype = DTYPES[config.dtype]
  if config.model == 'inception_v1':
    if config.transform_input and spec.image_shape[-1] != 3:
      raise ConfigError(f'--config.transform_input=True needs RGB images (ImageNet\'s three '
                        f'channel statistics); {spec.name} images have {spec.image_shape[-1]} '
                        'channel(s): leave transform_input False')
    return inception_v1.InceptionV1(
        num_classes=spec.num_classes, aux_logits=config.aux_weight > 0,
        transform_input=config.transform_input, axis_name=axis_name, dtype=dtype,
        kernels=config.kernels, frozen_batch_stats=frozen_bn_blocks(config))
  return models.GoogLeNet(num_classes=spec.num_classes, aux_heads=config.aux_weight > 0,
                          dtype=dtype, kernels=config.kernels)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> Callable[[int], float]:
  """The learning rate of each step (counted from 0) under ``config.lr_schedule``.

  ``warmup_cosine``: linear from 0 over ``warmup_epochs``, then a cosine down
  to 0 at the run's last step (the Flax ImageNet example's schedule). ``step``:
  times ``lr_decay_factor`` after every ``lr_decay_epochs`` epochs.
  """
  lr = config.learning_rate
  if config.lr_schedule == 'warmup_cosine':
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = max(config.num_epochs * steps_per_epoch, warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
  if config.lr_schedule == 'step':
    return optax.exponential_decay(lr, config.lr_decay_epochs * steps_per_epoch,
                                   config.lr_decay_factor, staircase=True)
  return optax.constant_schedule(lr)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """Plain SGD as in the reference (momentum and Nesterov when asked), or Adam.

  Adam gets this normalisation-free network off its initial plateau within a
  few hundred steps, where SGD needs a few epochs; the quickstart uses it.
  A constant learning rate stays a plain float (the optimizer state of the
  book's recipe is what it always was); a schedule counts steps in the
  optimizer state, so a resumed run continues it exactly. ``weight_decay``:
  decoupled for Adam (AdamW), added to SGD's gradient (L2, as PyTorch's SGD).
  ``steps_per_epoch`` only scales a schedule's epochs to steps.
  """
  lr = (config.learning_rate if config.lr_schedule == 'constant'
        else learning_rate_schedule(config, steps_per_epoch))
  if config.trainable == 'all' and config.pretrained_lr_multiplier == 1.0:
    return _optimizer(config, lr)
  multiplier = config.pretrained_lr_multiplier
  scaled = lr * multiplier if isinstance(lr, float) else lambda count: multiplier * lr(count)
  # Frozen leaves get zero updates (optax.masked would pass their raw gradients through).
  return optax.multi_transform(
      {'head': _optimizer(config, lr), 'pretrained': _optimizer(config, scaled),
       'frozen': optax.set_to_zero()},
      functools.partial(param_labels, config))


def _optimizer(config: ml_collections.ConfigDict, lr: float | Callable
               ) -> optax.GradientTransformation:
  tx = OPTIMIZERS[config.optimizer](config, lr)
  if config.weight_decay and config.optimizer == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  return tx


def _frozen(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The blocks ``config.trainable`` leaves out: every block before the named one."""
  blocks = config_lib.BLOCKS[config.model]
  if config.trainable == 'all':
    return ()
  return blocks if config.trainable == 'head' else blocks[:blocks.index(config.trainable)]


def param_labels(config: ml_collections.ConfigDict, params: Any) -> Any:
  """Each leaf's label for ``optax.multi_transform``: ``head``, ``pretrained`` or ``frozen``.

  By its top-level name: the model's heads (``gnet_jax.config.HEADS``) always train at
  the learning rate; blocks before ``config.trainable`` are frozen; the others
  train at ``pretrained_lr_multiplier`` times it.
  """
  heads, frozen = config_lib.HEADS[config.model], _frozen(config)

  def label(path, _):
    name = path[0].key
    if name in heads:
      return 'head'
    if name not in config_lib.BLOCKS[config.model]:
      raise ValueError(f'parameter {jax.tree_util.keystr(path)} is in no block of '
                       f'{config.model}; --config.trainable needs one')
    return 'frozen' if name in frozen else 'pretrained'

  return jax.tree_util.tree_map_with_path(label, params)


def frozen_bn_blocks(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Top-level blocks whose BatchNorm uses its running statistics in training too.

  Frozen blocks' always (their statistics must not move either); with
  ``bn_stats='frozen'`` every block's and head's.
  """
  if config.bn_stats == 'frozen':
    return config_lib.BLOCKS[config.model] + config_lib.HEADS[config.model]
  return _frozen(config)


def _path_seed(seed: int, path: tuple) -> list[int]:
  """NumPy seed words for one parameter: the run's seed and a digest of its path.

  Seeding by path (not by position in the tree) keeps a parameter's initial
  value the same whatever else the tree holds, e.g. with or without aux heads.
  """
  digest = hashlib.sha256(jax.tree_util.keystr(path).encode()).digest()
  return [seed, *np.frombuffer(digest[:16], np.uint32).tolist()]


def init_params(model: nn.Module, seed: int, image_shape: Sequence[int],
                bias_init: str = 'zeros') -> dict:
  """``model``'s initial params at ``image_shape``: ``init_variables(...)['params']``."""
  return init_variables(model, seed, image_shape, bias_init)['params']


def variable_shapes(model: nn.Module, image_shape: tuple[int, ...]) -> dict:
  """``jax.eval_shape(model.init)`` at ``image_shape``: the variables' shapes and dtypes.

  Memoised for hashable models (Flax modules compare by their fields): tracing
  GoogLeNet's init costs 0.1-0.3 s, and a process that builds the same model
  again (evaluate after train, the tests) gets the same answer.
  """
  try:
    hash(model)
  except TypeError:  # a field that is a list or dict: nothing to key the memo on
    return _trace_variable_shapes(model, image_shape)
  return _memoised_variable_shapes(model, image_shape)


def _trace_variable_shapes(model: nn.Module, image_shape: tuple[int, ...]) -> dict:
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


_memoised_variable_shapes = functools.lru_cache(maxsize=16)(_trace_variable_shapes)


def init_variables(model: nn.Module, seed: int, image_shape: Sequence[int],
                   bias_init: str = 'zeros') -> dict:
  """``{'params', 'batch_stats'}`` for ``model`` at ``image_shape``; ``batch_stats`` may be empty.

  Kernels Xavier-uniform, as the d2l training code; for ``InceptionV1``
  N(0, 0.01^2) as torchvision's ``init_weights`` (its truncation at +-2 is
  200 standard deviations out: none in effect), BatchNorm scale 1 and bias 0,
  running mean 0 and variance 1. Dense and conv biases zero (or PyTorch-default).

  Shapes come from ``jax.eval_shape``; values are sampled with NumPy, because
  compiling threefry sampling for ~130 leaves costs 15-25 s on a small CPU and
  this costs well under a second. Each leaf gets a generator seeded by
  ``(seed, its path)``, so the result depends only on the seed and the
  parameter's name, never on the device count, backend or the other leaves.
  ``bias_init='torch'`` draws biases uniform in +-1/sqrt(fan_in), PyTorch's
  default for Conv2d and Linear (the d2l original re-initialises only weights).
  Returns host (NumPy) arrays. ``bias_init`` is ``config.bias_init``, checked by
  ``config.validate``.
  """
  abstract_variables = variable_shapes(model, tuple(image_shape))
  abstract = abstract_variables['params']
  torchvision_init = isinstance(model, inception_v1.InceptionV1)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  kernel_shapes = {path[:-1]: leaf.shape for path, leaf in flat
                   if getattr(path[-1], 'key', None) == 'kernel'}

  def init(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    rng = np.random.default_rng(_path_seed(seed, path))
    in_bn = len(path) > 1 and getattr(path[-2], 'key', None) == 'bn'
    if in_bn and name in ('scale', 'bias'):  # inception_v1's BatchNorm
      return (np.ones if name == 'scale' else np.zeros)(leaf.shape, np.float32)
    if name == 'kernel' and torchvision_init:
      return rng.normal(0.0, 0.01, size=leaf.shape).astype(np.float32)
    if name == 'kernel':
      receptive = int(np.prod(leaf.shape[:-2]))
      fan_in, fan_out = leaf.shape[-2] * receptive, leaf.shape[-1] * receptive
      bound = np.sqrt(6.0 / (fan_in + fan_out))
      return rng.uniform(-bound, bound, size=leaf.shape).astype(np.float32)
    if name == 'bias':
      if bias_init == 'zeros':
        return np.zeros(leaf.shape, np.float32)
      fan_in = int(np.prod(kernel_shapes[path[:-1]][:-1]))
      return rng.uniform(-1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in), leaf.shape).astype(np.float32)
    raise ValueError(f'no initializer for parameter {jax.tree_util.keystr(path)}')

  stats = jax.tree_util.tree_map_with_path(  # running mean 0, variance 1
      lambda path, leaf: (np.ones if path[-1].key == 'var' else np.zeros)(leaf.shape, np.float32),
      abstract_variables.get('batch_stats', {}))
  return {'params': jax.tree_util.tree_map_with_path(init, abstract), 'batch_stats': stats}


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def init_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
  """``tx.init(params)`` on the host, jitted: eager, its ~260 small ops cost ~2 s of start-up."""
  return jax.tree.map(np.asarray, jax.device_get(jax.jit(tx.init)(params)))


def create_train_state(config: ml_collections.ConfigDict, spec: input_pipeline.DatasetSpec,
                       model: nn.Module, tx: optax.GradientTransformation) -> TrainState:
  """The initial state, on the host: placement is the runner's job."""
  size = config.image_size
  variables = init_variables(model, config.seed, (size, size, spec.image_shape[-1]),
                             config.bias_init)
  params = variables['params']
  opt_state = init_opt_state(tx, params)
  return TrainState(step=np.int32(0), params=params, opt_state=opt_state,
                    rng=np.asarray(jax.random.key_data(jax.random.key(config.seed))),
                    metrics=zero_metrics(), batch_stats=variables['batch_stats'])


def build(config: ml_collections.ConfigDict, spec: input_pipeline.DatasetSpec | None = None,
          steps_per_epoch: int = 1
          ) -> tuple[nn.Module, optax.GradientTransformation, TrainState]:
  """Model, optimizer and initial host state for ``config`` and its data set's ``spec``.

  Without ``spec``, the MNIST family's fixed one (``input_pipeline.dataset_spec``).
  """
  spec = spec or input_pipeline.dataset_spec(config.dataset)
  model, tx = create_model(config, spec), create_optimizer(config, steps_per_epoch)
  return model, tx, create_train_state(config, spec, model, tx)


class Checkpoint(NamedTuple):
  """A trained run as commands read it: state, config, step and the data it was trained on."""

  state: TrainState
  config: ml_collections.ConfigDict
  step: int
  spec: input_pipeline.DatasetSpec


def load_checkpoint(workdir: str | Path, step: int | None = None) -> Checkpoint:
  """The newest readable (or exactly ``step``'s) checkpoint of ``workdir``, on the host.

  The state's structure comes from the config and data set spec saved with the
  checkpoint (checked like any other, ``config.validate``); checkpoints from
  before specs were saved use the MNIST family's fixed spec. Raises
  ``CheckpointError`` when there is none.
  """
  config, spec = read_run(workdir, step)
  state, _, restored_step = checkpoint.restore_from_workdir(
      workdir, build(config, spec)[2], step)
  return Checkpoint(state, config, restored_step, spec)


def read_run(workdir: str | Path, step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, input_pipeline.DatasetSpec]:
  """The config and data set spec of ``workdir``'s newest checkpoint (or ``step``'s).

  Reads two small JSON items, no arrays: commands check their input against it
  before building anything. Without a readable spec (older checkpoints, or a
  damaged item) only the MNIST family's fixed spec applies; any other data set
  is a ``CheckpointError`` saying what to do.
  """
  config = checkpoint.read_newest_config(workdir, step)
  config_lib.validate(config)
  saved_spec = checkpoint.read_dataset_spec(workdir, step)
  if saved_spec is not None:
    try:
      return config, input_pipeline.DatasetSpec.from_json(saved_spec)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):  # readable, damaged
      pass
  # Checkpoints from before specs were saved: the MNIST family's fixed spec is theirs, unless
  # the run normalised (its statistics were only ever in the spec).
  if config.dataset in input_pipeline.SPECS and not config.normalize:
    return config, input_pipeline.dataset_spec(config.dataset)
  raise CheckpointError(
      f'the checkpoint{f" at step {step}" if step is not None else ""} in {workdir}: its data '
      f'set description (its classes and image shape{", normalisation" * config.normalize}) '
      f'is missing or damaged, and a {config.dataset} run cannot do without it; choose another '
      'checkpoint of the run with --step, or resume training in this workdir (train.py with '
      'the same --config and --workdir, a higher --config.num_epochs if it finished), which '
      'writes it with its next checkpoint')
