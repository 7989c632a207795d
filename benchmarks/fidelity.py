"""gnet-jax and the PyTorch original trained side by side, step by step.

    python -m benchmarks.fidelity --image_size 28 --epochs 1 --out runs/fidelity_28
    python -m benchmarks.fidelity --config configs/fashion_mnist.py --steps 200 --out DIR
    python -m benchmarks.fidelity --config configs/quickstart.py --config.learning_rate=0.01 ...

Both networks start from the **same weights** (gnet-jax's initial parameters,
converted with ``gnet_jax.interop.params_to_torch`` and loaded into the d2l
PyTorch GoogLeNet of ``gnet_jax/torch_reference.py``) and see the **same batches
in the same order** (``gnet_jax.input_pipeline.train_batches``, the order
``train.py`` uses). Each uint8 batch is turned into float32 pixels once, by
gnet-jax's own ``input_pipeline.preprocess`` (jitted), and PyTorch gets that very array
in NCHW, so the inputs are bitwise equal. gnet-jax trains with the step
``train.py`` takes (``train.make_train_step``); PyTorch with ``torch.optim.SGD``
(or ``Adam``, mirroring the config) and ``nn.CrossEntropyLoss()``.

Per logging interval it prints both training losses and their relative
difference |jax - torch| / |torch| (and how far apart the parameters are); at
each epoch end both test accuracies. ``--out`` receives ``fidelity.json``
(every step's two losses, the epoch-end evaluations, the first step at which
the relative loss difference exceeds 1e-4, 1e-2 and 10%) and ``fidelity.png``
(the two loss curves overlaid; their relative difference on a log axis).

Recipe: the config's (default ``configs/fashion_mnist.py``: the d2l reference,
plain SGD lr 0.1, batch 128, no momentum, no auxiliary heads). SGD with
momentum/Nesterov and Adam are mirrored in PyTorch; auxiliary heads
(``aux_weight > 0``), bfloat16 and augmentation are refused, the original
has none of them.

Device: CPU by default; where JAX runs on a GPU and PyTorch sees CUDA, PyTorch
runs on the GPU too. Both compute in full float32 (no TF32) so that the
comparison measures the frameworks, not a reduced-precision mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from benchmarks import harness

REPO = harness.REPO

warnings.filterwarnings('ignore', message='.*load_module.*', category=DeprecationWarning)

THRESHOLDS = (1e-4, 1e-2, 1e-1)
TORCH_HINT = 'pip install torch==2.13.0'


class UsageError(Exception):
  """Bad input: printed as one ``error: ...`` line, exit status 2."""


# ----------------------------------------------------------------------------- setup


def apply_xla_defaults() -> None:
  """gnet-jax's per-platform XLA flags, as train.py sets them (before JAX starts)."""
  from gnet_jax import xla_flags
  xla_flags.apply_defaults()


def import_torch():
  try:
    import torch
  except ImportError as e:
    raise UsageError(f'PyTorch is needed for the comparison and is not importable ({e}); '
                     f'{TORCH_HINT}') from None
  return torch


def load_config(path: str, overrides: list[str]):
  """The config of ``path`` with ``--config.KEY=VALUE`` overrides, parsed as ``train.py``
  parses them (ml_collections' config flag, mistakes as one message)."""
  from absl import flags
  from ml_collections import config_flags
  from gnet_jax import cli
  from gnet_jax.errors import ConfigError
  for item in overrides:
    if not item.startswith('--config.') or '=' not in item:
      raise UsageError(f'unexpected argument {item!r}; overrides look like --config.KEY=VALUE')
  argv = ['fidelity', f'--config={path}', *overrides]
  values = flags.FlagValues()  # not absl's global FLAGS: fidelity_seeds calls this in-process
  config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  try:
    cli.parse_config_flags(argv, values, path)
  except (ConfigError, flags.Error) as e:
    raise UsageError(str(e)) from None
  return values.config


def check_recipe(config) -> None:
  """Refuses what the PyTorch reference cannot mirror, naming it."""
  unsupported = []
  if config.aux_weight > 0:
    unsupported.append(f'aux_weight={config.aux_weight} (auxiliary heads: the d2l original '
                       'has none)')
  if config.dtype != 'float32':
    unsupported.append(f'dtype={config.dtype} (the comparison is in float32)')
  if config.augment_crop != 'none' or config.augment_flip:
    unsupported.append('augmentation (PyTorch gets the same pixels, unaugmented)')
  if unsupported:
    raise UsageError('not supported by the side-by-side comparison: ' + '; '.join(unsupported) +
                     ' (set --config.aux_weight=0 / --config.dtype=float32 / '
                     "--config.augment_crop=none --config.augment_flip=false)")


def torch_optimizer(torch, config, parameters):
  """The PyTorch twin of ``state.create_optimizer(config)``."""
  if config.optimizer == 'adam':
    return torch.optim.Adam(parameters, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8)
  return torch.optim.SGD(parameters, lr=config.learning_rate, momentum=float(config.momentum),
                         nesterov=config.nesterov)


def machine_lines(torch, torch_device: str) -> list[str]:
  import jax
  devices = jax.devices()
  machine = harness.machine_info(
      jax_device=f'{jax.default_backend()} {devices[0].device_kind} x{len(devices)}',
      torch_device=f'{torch_device} ({torch.get_num_threads()} threads)')
  lines = harness.machine_lines(machine)
  if os.environ.get('XLA_FLAGS'):
    lines.append(f'XLA_FLAGS={os.environ["XLA_FLAGS"]}')
  return lines


def pick_torch_device(torch) -> str:
  import jax
  if jax.default_backend() == 'gpu':
    if torch.cuda.is_available():
      return 'cuda'
    print('warning: JAX runs on a GPU but PyTorch sees no CUDA device; PyTorch runs on the CPU '
          '(slow). Install a CUDA build of torch, or run JAX on the CPU with JAX_PLATFORMS=cpu',
          file=sys.stderr)
  return 'cpu'


def setup_torch(torch, device: str) -> None:
  torch.set_default_dtype(torch.float32)
  torch.set_num_threads(os.cpu_count() or 1)
  # Full float32 on both sides: no TF32 for convolutions or matmuls.
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  if device == 'cuda':
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def load_data(config, data_dir: str | None):
  from gnet_jax import input_pipeline
  source = 'idx' if data_dir else config.data_source
  return input_pipeline.load_dataset(config.dataset, source, data_dir or config.data_dir or None,
                                     config.train_examples, config.eval_examples)


def torch_net(torch, params, in_channels: int, num_classes: int, device: str):
  """The d2l PyTorch GoogLeNet holding exactly ``params`` (gnet-jax's tree)."""
  from gnet_jax import interop, torch_reference
  net = torch_reference.googlenet(in_channels, num_classes)
  state_dict = interop.params_to_torch(params, numpy=True)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return net.to(device)


@functools.cache
def jitted_preprocess(image_size: int):
  import jax
  from gnet_jax import input_pipeline
  return jax.jit(functools.partial(input_pipeline.preprocess, image_size=image_size))


def torch_input(torch, images_uint8, image_size: int, device: str):
  """gnet-jax's own preprocessing of a uint8 NHWC batch, as an NCHW float32 tensor."""
  import numpy as np
  x = np.asarray(jitted_preprocess(image_size)(images_uint8))
  return torch.from_numpy(np.array(x.transpose(0, 3, 1, 2), order='C')).to(device)


def torch_evaluate(torch, net, data, batch_size: int, image_size: int, device: str) -> dict:
  from gnet_jax import input_pipeline
  net.eval()
  correct, count, loss_sum = 0, 0, 0.0
  with torch.no_grad():
    for batch in input_pipeline.eval_batches(data.test_images, data.test_labels, batch_size):
      logits = net(torch_input(torch, batch['image'], image_size, device))
      labels = torch.from_numpy(batch['label']).long().to(device)
      mask = torch.from_numpy(batch['mask']).to(device)
      losses = torch.nn.functional.cross_entropy(logits, labels, reduction='none')
      loss_sum += float(losses[mask].sum())
      correct += int(((logits.argmax(-1) == labels) & mask).sum())
      count += int(mask.sum())
  net.train()
  return {'loss': loss_sum / max(count, 1), 'accuracy': correct / max(count, 1), 'count': count}


def jax_side(config, spec) -> tuple[Any, Any, Callable, Callable]:
  """gnet-jax as ``train.py`` trains it, on one device: ``(state, model, step, evaluate)``.

  ``step(state, batch) -> (state, loss, accuracy)`` is ``train.make_train_step``
  with the running sums zeroed first, so that they hold this step's alone;
  ``evaluate(params, data, batch_size)`` is ``train.evaluate``.
  """
  import jax
  import numpy as np
  from gnet_jax import parallel, state as state_lib, train
  model, tx, host_state = state_lib.build(config, spec)
  runner = parallel.make_runner(config, jax.devices()[:1])
  step_fn = train.make_train_step(runner, model, tx, config, spec)
  eval_fn = train.compile_eval(runner, model, config.image_size, spec)

  def step(state, batch):
    zero = runner.put_state(state_lib.zero_metrics())
    state = step_fn(state.replace(metrics=zero), runner.put_batch(batch))
    sums = runner.to_host(state.metrics)
    count = np.float32(sums['count'])  # float32 division, as on the device
    return state, float(np.float32(sums['loss_sum']) / count), float(sums['correct'] / count)

  def evaluate(params, data, batch_size: int) -> dict:
    result = train.evaluate(runner, eval_fn, params, data.test_images, data.test_labels,
                            batch_size)
    return {k: result[k] for k in ('loss', 'accuracy', 'count')}

  return runner.put_state(host_state), model, step, evaluate


def relative_difference(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-30)


def first_exceeding(rel: list[float], steps: list[int]) -> dict[str, int | None]:
  out = {}
  for t in THRESHOLDS:
    out[f'{t:g}'] = next((s for s, r in zip(steps, rel) if not r <= t), None)  # NaN counts
  return out


# ----------------------------------------------------------------------------- side by side


def param_rel_diff(params, net) -> float:
  """||p_jax - p_torch|| / ||p_torch|| over all parameters (in PyTorch's layout)."""
  import jax
  import numpy as np
  from gnet_jax import interop
  ours = interop.params_to_torch(jax.device_get(params), numpy=True)
  theirs = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
  num = sum(float(np.sum((ours[k].astype(np.float64) - theirs[k]) ** 2)) for k in theirs)
  den = sum(float(np.sum(theirs[k].astype(np.float64) ** 2)) for k in theirs)
  return math.sqrt(num / max(den, 1e-300))


CONTROL_FRACTION = 1e-4


def nudge_one_ulp(params, seed: int, fraction: float = CONTROL_FRACTION):
  """``params`` with a random ``fraction`` of the entries moved one float32 ulp up or down.

  With 1e-4 (about 600 of GoogLeNet's 6 million weights) the two copies start
  ~1e-9 apart (relative 2-norm), as far as gnet-jax and PyTorch are after one step.
  """
  import jax
  import numpy as np
  rng = np.random.default_rng([seed, 12345])

  def nudge(x):
    x = np.asarray(x, np.float32)
    moved = rng.random(x.shape) < fraction
    up = rng.random(x.shape) < 0.5
    nudged = np.where(up, np.nextafter(x, np.float32(np.inf)),
                      np.nextafter(x, np.float32(-np.inf)))
    return np.where(moved, nudged, x).astype(np.float32)
  return jax.tree.map(nudge, jax.device_get(params))


def torch_param_rel_diff(a, b) -> float:
  sa, sb = a.state_dict(), b.state_dict()
  num = sum(float(((sa[k].double() - sb[k].double()) ** 2).sum()) for k in sb)
  den = sum(float((sb[k].double() ** 2).sum()) for k in sb)
  return math.sqrt(num / max(den, 1e-300))


def side_by_side(args, config, torch) -> dict:
  import jax

  device = pick_torch_device(torch)
  setup_torch(torch, device)
  with jax.default_matmul_precision('float32'):  # no TF32/bf16 passes on accelerators
    return _side_by_side(args, config, torch, device)


def _side_by_side(args, config, torch, device: str) -> dict:
  """Set both networks up from one start, train them in lockstep, sum the run up."""
  header = machine_lines(torch, device)
  for line in header:
    print(line)
  data = load_data(config, args.data_dir)
  steps_per_epoch, total_steps = run_length(args, config, data)
  print_setup(config, data, steps_per_epoch, total_steps)
  sides = Sides.create(torch, config, data, device, args.control)
  trace = Trace.empty(args.control)
  t0 = time.perf_counter()
  print_columns(args.control)
  train_in_lockstep(args, config, data, sides, trace, steps_per_epoch, total_steps)
  result = summarize(header, config, device, steps_per_epoch, trace, time.perf_counter() - t0)
  print_summary(result)
  return result


def run_length(args, config, data) -> tuple[int, int]:
  """Steps per epoch and steps to train (``--steps``, else ``--epochs`` whole epochs)."""
  from gnet_jax import input_pipeline
  n_train = len(data.train_labels)
  steps_per_epoch = input_pipeline.steps_per_epoch(n_train, config.batch_size)
  if steps_per_epoch == 0:
    raise UsageError(f'batch_size {config.batch_size} is larger than the training set '
                     f'({n_train} examples); lower --config.batch_size or raise --train_examples')
  return steps_per_epoch, args.steps if args.steps else args.epochs * steps_per_epoch


def print_setup(config, data, steps_per_epoch: int, total_steps: int) -> None:
  size = config.image_size
  print(f'data: {data.source} ({len(data.train_labels)} train, {len(data.test_labels)} test), '
        f'{size}x{size}, batch {config.batch_size}, {total_steps} steps '
        f'({steps_per_epoch}/epoch)')
  recipe = (f'{config.optimizer} lr {config.learning_rate}'
            + (f', momentum {config.momentum}' if config.momentum else '')
            + (', nesterov' if config.nesterov else '') + f', seed {config.seed}'
            + f', bias_init {config.bias_init}')
  print(f'recipe: {recipe}')


@dataclasses.dataclass
class Sides:
  """gnet-jax and the PyTorch original (and with ``--control`` a second PyTorch copy)."""

  torch: Any
  device: str
  image_size: int
  state: Any  # gnet-jax's TrainState, on device
  step_fn: Callable  # (state, batch) -> (state, this step's mean loss, accuracy)
  eval_fn: Callable  # (params, data, batch_size) -> loss, accuracy, count
  net: Any
  optimizer: Any
  criterion: Any
  control: Any = None
  control_optimizer: Any = None

  @classmethod
  def create(cls, torch, config, data, device: str, control: bool) -> Sides:
    """Both networks from gnet-jax's initial parameters (the factory's ``state.build``)."""
    import jax
    state, model, step, evaluate = jax_side(config, data.spec)
    host_state = jax.device_get(state)
    size, channels = config.image_size, data.image_shape[-1]

    net = torch_net(torch, host_state.params, channels, model.num_classes, device)
    sides = cls(torch=torch, device=device, image_size=size, state=state, step_fn=step,
                eval_fn=evaluate,
                net=net, optimizer=torch_optimizer(torch, config, net.parameters()),
                criterion=torch.nn.CrossEntropyLoss())
    if control:  # PyTorch against itself, from nearly the same weights
      sides.control = torch_net(torch, nudge_one_ulp(host_state.params, config.seed), channels,
                                model.num_classes, device)
      sides.control_optimizer = torch_optimizer(torch, config, sides.control.parameters())
    return sides


@dataclasses.dataclass
class Trace:
  """What the run records: every step's losses, parameter distances, evaluations, step time."""

  record: dict[str, list]
  params_diff: list[dict] = dataclasses.field(default_factory=list)
  evals: list[dict] = dataclasses.field(default_factory=list)
  t_jax: float = 0.0
  t_torch: float = 0.0

  @classmethod
  def empty(cls, control: bool) -> Trace:
    record = {'steps': [], 'jax_loss': [], 'torch_loss': [], 'rel_diff': []}
    if control:
      record.update(control_loss=[], control_rel_diff=[])
    return cls(record)


def print_columns(control: bool) -> None:
  print(f"\n{'step':>6} {'epoch':>5} {'gnet-jax loss':>14} {'PyTorch loss':>14} "
        f"{'rel. diff':>10} {'param diff':>10}" +
        (f" {'ctl loss':>12} {'ctl diff':>10} {'ctl param':>10}" if control else ''))


def epoch_ends(step_no: int, steps_per_epoch: int, total_steps: int) -> bool:
  """Whether ``step_no`` closes an epoch (or the run, which may stop mid-epoch)."""
  return step_no % steps_per_epoch == 0 or step_no == total_steps


def train_in_lockstep(args, config, data, sides: Sides, trace: Trace, steps_per_epoch: int,
                      total_steps: int) -> None:
  """The same batches, in ``train.py``'s order, through both; stops early on a NaN/inf loss."""
  from gnet_jax import input_pipeline
  step_no, finite = 0, True
  for epoch in range(math.ceil(total_steps / steps_per_epoch)):
    for batch in input_pipeline.train_batches(data.train_images, data.train_labels,
                                              config.batch_size, config.seed, epoch):
      if step_no == total_steps:
        break
      step_no += 1
      jloss, tloss = step_both(sides, trace, step_no, batch)
      if (step_no == 1 or step_no % args.log_every == 0
          or epoch_ends(step_no, steps_per_epoch, total_steps)):
        log_step(sides, trace, step_no, epoch)
      finite = math.isfinite(jloss) and math.isfinite(tloss)
      if not finite:
        print(f'warning: non-finite loss at step {step_no} (gnet-jax {jloss}, PyTorch {tloss});'
              ' stopping', file=sys.stderr)
        break
    if step_no and epoch_ends(step_no, steps_per_epoch, total_steps):
      evaluate_both(sides, trace, data, config.batch_size, epoch, step_no, steps_per_epoch)
    if step_no == total_steps or not finite:
      break


def torch_step(net, optimizer, criterion, x, y) -> float:
  """One PyTorch SGD/Adam step; returns the batch's mean loss."""
  optimizer.zero_grad(set_to_none=True)
  loss = criterion(net(x), y)
  loss.backward()
  optimizer.step()
  return float(loss.item())


def step_both(sides: Sides, trace: Trace, step_no: int, batch) -> tuple[float, float]:
  """One step of each network on ``batch``, timed and recorded; returns both losses."""
  torch = sides.torch
  s0 = time.perf_counter()
  sides.state, jloss, _ = sides.step_fn(sides.state, batch)
  s1 = time.perf_counter()
  x = torch_input(torch, batch['image'], sides.image_size, sides.device)
  y = torch.from_numpy(batch['label']).long().to(sides.device)
  tloss = torch_step(sides.net, sides.optimizer, sides.criterion, x, y)
  s2 = time.perf_counter()
  if step_no > 1:  # the first jax step includes the compilation
    trace.t_jax, trace.t_torch = trace.t_jax + s1 - s0, trace.t_torch + s2 - s1
  record = trace.record
  record['steps'].append(step_no)
  record['jax_loss'].append(jloss)
  record['torch_loss'].append(tloss)
  record['rel_diff'].append(relative_difference(jloss, tloss))
  if sides.control is not None:
    closs = torch_step(sides.control, sides.control_optimizer, sides.criterion, x, y)
    record['control_loss'].append(closs)
    record['control_rel_diff'].append(relative_difference(closs, tloss))
  return jloss, tloss


def log_step(sides: Sides, trace: Trace, step_no: int, epoch: int) -> None:
  """The step's line: both losses, their difference, how far apart the parameters are."""
  record = trace.record
  pdiff = param_rel_diff(sides.state.params, sides.net)
  trace.params_diff.append({'step': step_no, 'param_rel_diff': pdiff})
  line = ''
  if sides.control is not None:
    cdiff = torch_param_rel_diff(sides.control, sides.net)
    trace.params_diff[-1]['control_param_rel_diff'] = cdiff
    line = (f" {record['control_loss'][-1]:12.7f} {record['control_rel_diff'][-1]:10.3e}"
            f' {cdiff:10.3e}')
  print(f"{step_no:6d} {epoch + 1:5d} {record['jax_loss'][-1]:14.7f} "
        f"{record['torch_loss'][-1]:14.7f} {record['rel_diff'][-1]:10.3e} "
        f'{pdiff:10.3e}' + line, flush=True)


def evaluate_both(sides: Sides, trace: Trace, data, batch_size: int, epoch: int, step_no: int,
                  steps_per_epoch: int) -> None:
  """Both test accuracies at an epoch's end (or the run's, mid-epoch)."""
  ej = sides.eval_fn(sides.state.params, data, batch_size)
  et = torch_evaluate(sides.torch, sides.net, data, batch_size, sides.image_size, sides.device)
  trace.evals.append({'epoch': epoch + 1, 'step': step_no, 'partial_epoch':
                      step_no % steps_per_epoch != 0, 'jax': ej, 'torch': et})
  print(f'  epoch {epoch + 1} end (step {step_no}): test accuracy gnet-jax '
        f"{ej['accuracy']:.4f}, PyTorch {et['accuracy']:.4f} (test loss {ej['loss']:.4f} / "
        f"{et['loss']:.4f}, {ej['count']} examples)", flush=True)


def summarize(header: list[str], config, device: str, steps_per_epoch: int, trace: Trace,
              wall_seconds: float) -> dict:
  """``fidelity.json``'s content."""
  record = trace.record
  timed = max(len(record['steps']) - 1, 1)
  control = 'control_rel_diff' in record
  return {
      'machine': header,
      'config': json.loads(config.to_json()),
      'torch_device': device,
      'image_size': config.image_size, 'batch_size': config.batch_size,
      'steps_per_epoch': steps_per_epoch,
      'num_steps': len(record['steps']),
      'first_step_rel_diff_exceeds': first_exceeding(record['rel_diff'], record['steps']),
      **({'control_first_step_rel_diff_exceeds': first_exceeding(
          record['control_rel_diff'], record['steps'])} if control else {}),
      'max_rel_diff': max(record['rel_diff'], default=float('nan')),
      'step_seconds': {'jax': trace.t_jax / timed, 'torch': trace.t_torch / timed},
      'wall_seconds': wall_seconds,
      'evals': trace.evals,
      'param_rel_diff': trace.params_diff,
      **record,
  }


def print_summary(result: dict) -> None:
  crossings = result['first_step_rel_diff_exceeds']
  print('\nfirst step where |loss_jax - loss_torch| / loss_torch exceeds: ' + ', '.join(
      f"{k}: {v if v is not None else 'never'}" for k, v in crossings.items()) +
      f' (of {len(result["steps"])} steps)')
  if 'control_first_step_rel_diff_exceeds' in result:
    print('control (PyTorch vs PyTorch, start 1 ulp apart in 0.01% of the weights), first step '
          'exceeding: ' + ', '.join(
        f"{k}: {v if v is not None else 'never'}"
        for k, v in result['control_first_step_rel_diff_exceeds'].items()))
  print(f"seconds/step: gnet-jax {result['step_seconds']['jax']:.3f}, PyTorch "
        f"{result['step_seconds']['torch']:.3f}")


# ----------------------------------------------------------------------------- plot


def plot(result: dict, path: Path) -> Any:
  """The two loss curves over each other, their relative difference below; returns the figure."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  steps = np.asarray(result['steps'])
  jl, tl = np.asarray(result['jax_loss']), np.asarray(result['torch_loss'])
  rel = np.asarray(result['rel_diff'])
  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                 gridspec_kw={'height_ratios': [3, 2]})
  ax1.plot(steps, tl, color='tab:orange', lw=2.2, alpha=0.7, label='PyTorch original')
  ax1.plot(steps, jl, color='tab:blue', lw=0.9, label='gnet-jax')
  for e in result['evals']:
    ax1.axvline(e['step'], color='0.8', lw=0.8, zorder=0)
    ax1.annotate(f"test acc\njax {e['jax']['accuracy']:.3f}\ntorch {e['torch']['accuracy']:.3f}",
                 (e['step'], ax1.get_ylim()[1]), ha='right', va='top', fontsize=8,
                 xytext=(-3, -3), textcoords='offset points')
  ax1.set_ylabel('training loss (per step)')
  size = result['image_size']
  ax1.set_title(f"gnet-jax vs PyTorch original, same start and batches ({size}x{size}, batch "
                f"{result['batch_size']}, {result['config']['optimizer']} lr "
                f"{result['config']['learning_rate']})", fontsize=10)
  ax1.legend(loc='center right')
  floor = 1e-9
  ax2.semilogy(steps, np.maximum(rel, floor), color='tab:red', lw=0.8,
               label='|loss_jax - loss_torch| / loss_torch')
  if result.get('control_rel_diff'):
    ax2.semilogy(steps, np.maximum(np.asarray(result['control_rel_diff']), floor),
                 color='0.5', lw=0.6, alpha=0.8,
                 label='control: PyTorch vs PyTorch, start 1 ulp apart in 0.01% of weights (loss)')
  if result.get('param_rel_diff'):
    ps = [p['step'] for p in result['param_rel_diff']]
    pv = [max(p['param_rel_diff'], floor) for p in result['param_rel_diff']]
    ax2.semilogy(ps, pv, 'o-', color='tab:green', ms=3, lw=1,
                 label='||params_jax - params_torch|| / ||params_torch||')
    cp = [(p['step'], max(p['control_param_rel_diff'], floor))
          for p in result['param_rel_diff'] if 'control_param_rel_diff' in p]
    if cp:
      ax2.semilogy(*zip(*cp), 's--', color='0.3', ms=3, lw=1,
                   label='control: PyTorch vs PyTorch (params)')
  for t in THRESHOLDS:
    ax2.axhline(t, color='0.6', lw=0.8, ls='--')
    first = result['first_step_rel_diff_exceeds'].get(f'{t:g}')
    if first is not None:
      ax2.plot([first], [t], 'k|', ms=10)
      ax2.annotate(f'> {t:g} from step {first}', (first, t), fontsize=8, xytext=(-4, 3),
                   textcoords='offset points', ha='right',
                   bbox={'boxstyle': 'square,pad=0.1', 'fc': 'white', 'ec': 'none', 'alpha': 0.8})
  ax2.set_ylim(floor / 2, 10)
  ax2.set_xlabel('step')
  ax2.set_ylabel('relative difference')
  ax2.legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return fig


# ----------------------------------------------------------------------------- main


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=str(REPO / 'configs' / 'fashion_mnist.py'),
                      help='config file (default: configs/fashion_mnist.py, the reference '
                           'recipe); --config.KEY=VALUE overrides any key')
  length = parser.add_mutually_exclusive_group()
  length.add_argument('--steps', type=int, default=0, help='train this many steps')
  length.add_argument('--epochs', type=int, default=1, help='train this many epochs (default 1)')
  parser.add_argument('--image_size', type=int, default=0,
                      help="resize to this size (default: the config's)")
  parser.add_argument('--out', default='runs/fidelity', help='folder for fidelity.json/.png')
  parser.add_argument('--log_every', type=int, default=25, help='print every N steps')
  parser.add_argument('--train_examples', type=int, default=None,
                      help='first N training examples only (tiny runs)')
  parser.add_argument('--eval_examples', type=int, default=None,
                      help='first N test examples only')
  parser.add_argument('--seed', type=int, default=None, help="initial weights and batch order "
                      "(default: the config's)")
  parser.add_argument('--data_dir', default=None, help='folder with the four IDX files')
  parser.add_argument('--replot', action='store_true',
                      help='only redraw OUT/fidelity.png from OUT/fidelity.json')
  parser.add_argument('--control', action='store_true',
                      help='also train a second PyTorch copy whose start differs by one float32 '
                           'ulp in 0.01%% of the weights: how fast PyTorch diverges from '
                           'itself (50%% slower)')
  args, rest = parser.parse_known_args(argv)
  return args, rest


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if args.replot:
    source = Path(args.out) / 'fidelity.json'
    if not source.is_file():
      print(f'error: {source} does not exist; run without --replot first', file=sys.stderr)
      return 2
    plot(json.loads(source.read_text()), Path(args.out) / 'fidelity.png')
    print(f'wrote {Path(args.out) / "fidelity.png"}')
    return 0
  try:
    if args.steps < 0 or args.epochs < 1 or args.log_every < 1:
      raise UsageError('--steps must be >= 0, --epochs and --log_every >= 1')
    config = load_config(args.config, overrides)
    for key, value in (('image_size', args.image_size or None), ('seed', args.seed),
                       ('train_examples', args.train_examples),
                       ('eval_examples', args.eval_examples)):
      if value is not None:
        config[key] = value
    from gnet_jax import config as config_lib
    from gnet_jax.errors import ConfigError
    try:
      config_lib.validate(config)
    except ConfigError as e:
      raise UsageError(str(e)) from None
    check_recipe(config)
    torch = import_torch()
    if 'jax' not in sys.modules:  # too late otherwise (e.g. called from the test suite)
      apply_xla_defaults()
    from gnet_jax.errors import InputError
    try:
      result = side_by_side(args, config, torch)
    except InputError as e:
      raise UsageError(str(e)) from None
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'fidelity.json').write_text(json.dumps(result, indent=1) + '\n')
  plot(result, out / 'fidelity.png')
  print(f'wrote {out / "fidelity.json"} and {out / "fidelity.png"}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
