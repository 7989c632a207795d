"""What a run reports: the epoch line, ``metrics.jsonl``, ``steps.jsonl``, ``curves.png``,
TensorBoard events, the progress bar and an optional profiler trace.

Only process 0 writes. Intra-epoch points are read from the running sums the
train step keeps on device, a few scalars every ``log_every_steps`` steps, so
the loop never syncs with the host per step.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import tqdm

TB_DIR = 'tensorboard'
PROFILE_DIR = 'profile'
EPOCH_TAGS = ('train_loss', 'train_acc', 'test_loss', 'test_acc', 'examples_per_sec',
              'learning_rate')
INTERVAL_TAGS = ('train_loss', 'train_acc', 'learning_rate')


def epoch_line(m: dict, num_epochs: int, device: str) -> str:
  """The reference's per-epoch report, e.g. ``epoch 3/10: loss 0.262, train acc 0.900, ...``."""
  return (f'epoch {m["epoch"]}/{num_epochs}: loss {m["train_loss"]:.3f}, '
          f'train acc {m["train_acc"]:.3f}, test acc {m["test_acc"]:.3f}, '
          f'{m["examples_per_sec"]:.1f} examples/sec on {device}')


def _atomic_write(path: Path, write) -> None:
  """Writes through a temporary file and a rename, so a crash never leaves half a file."""
  tmp = path.with_name(f'.{path.name}.tmp')
  write(tmp)
  os.replace(tmp, path)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
  """Rewrites a ``.jsonl`` file: one JSON object per row."""
  text = ''.join(json.dumps(m, sort_keys=True) + '\n' for m in rows)
  _atomic_write(Path(path), lambda p: p.write_text(text))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(history: list[dict], path: str | os.PathLike, points: list[dict] = ()) -> Any:
  """Train loss, train acc and test acc against epoch, like the d2l live plot.

  ``points`` (rows of ``steps.jsonl``) add the intra-epoch training loss and
  accuracy, so a short run draws a curve rather than a few dots. Returns the
  (closed) figure, so a test can read what was drawn.
  """
  import matplotlib
  import matplotlib.ticker
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
  if points:
    x = [p['epoch_progress'] for p in points]
    ax.plot(x, [p['train_loss'] for p in points], '-', color='C0', label='train loss')
    ax.plot(x, [p['train_acc'] for p in points], '--', color='C1', label='train acc')
  else:
    epochs = [m['epoch'] for m in history]
    ax.plot(epochs, [m['train_loss'] for m in history], '-', marker='o', markersize=3,
            color='C0', label='train loss')
    ax.plot(epochs, [m['train_acc'] for m in history], '--', marker='o', markersize=3,
            color='C1', label='train acc')
  ax.plot([m['epoch'] for m in history], [m['test_acc'] for m in history], '-.', marker='o',
          markersize=3, color='C2', label='test acc')
  ax.set_xlabel('epoch')
  ax.set_xlim(0, max([m['epoch'] for m in history] + [1]) + 0.05)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _atomic_write(Path(path), lambda p: fig.savefig(p, format='png'))
  plt.close(fig)
  return fig


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm.tqdm:
  """A tqdm bar on stderr; off when disabled or when stderr is not a terminal."""
  return tqdm.tqdm(total=total, desc=desc, leave=False, unit='step',
                   disable=not enabled or not sys.stderr.isatty())


def resolve_log_every(log_every_steps: int, steps_per_epoch: int) -> int:
  """Steps between intra-epoch points: -1 = about 5 per epoch, 0 = none."""
  if log_every_steps < 0:
    return max(1, math.ceil(steps_per_epoch / 5))
  return log_every_steps


def tensorboard_writer(workdir: Path, purge_step: int | None):
  """A TensorBoard event writer for ``workdir/tensorboard``.

  tensorboardX: it writes TensorBoard's own event format with only numpy and
  protobuf, where Flax's ``flax.metrics.tensorboard`` and clu need TensorFlow
  (1.4 GB) and torch's writer needs torch. ``purge_step`` makes TensorBoard drop
  the events an interrupted run wrote after the checkpoint being resumed, so a
  resumed run shows each step once.
  """
  SummaryWriter = _import_tensorboardx().SummaryWriter
  # Event files are named by the second they were opened in; the suffix keeps a run
  # resumed within the same second from overwriting the file of the run it resumes.
  return SummaryWriter(str(workdir / TB_DIR), purge_step=purge_step, flush_secs=30,
                       filename_suffix=f'.{os.getpid()}.{purge_step or 0}')


def _import_tensorboardx() -> Any:
  """tensorboardX without torch.

  Its writer module imports torch wherever torch is installed (a second of every
  run's start-up on a machine that has it for ``interop``), only to accept torch
  tensors, which a run never passes. ``None`` in ``sys.modules`` makes that
  optional import fail at once, as where torch is absent: 0.1 s instead of 1 s.
  This runs on the main thread, where nothing imports torch meanwhile.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    return importlib.import_module('tensorboardX')
  sys.modules['torch'] = None
  try:
    return importlib.import_module('tensorboardX')
  finally:
    del sys.modules['torch']


class RunLog:
  """The reports of one run in ``workdir``, carried over from the run it resumes."""

  def __init__(self, workdir: Path, config: ml_collections.ConfigDict, steps_per_epoch: int,
               start_step: int, device_label: str,
               learning_rate: Callable[[int], float] | None = None):
    self.workdir, self.config = workdir, config
    # The learning rate of step i (from 0); a constant one without a schedule.
    self.learning_rate = learning_rate or (lambda i: config.learning_rate)
    self.steps_per_epoch, self.start_step, self.device = steps_per_epoch, start_step, device_label
    self.is_main = jax.process_index() == 0
    self.log_every = resolve_log_every(config.log_every_steps, steps_per_epoch)
    start_epoch = start_step // steps_per_epoch
    self.history = [m for m in read_jsonl(workdir / 'metrics.jsonl')
                    if m['epoch'] <= start_epoch] if start_step else []
    self.points = [p for p in read_jsonl(workdir / 'steps.jsonl')
                   if p['step'] <= start_step] if start_step else []
    self._writer, self._purge_step = None, None
    self._bar, self._last = None, None

  @property
  def writer(self):
    """The TensorBoard writer, opened at its first use: importing it costs ~1 s of start-up."""
    if self._writer is None:
      self._writer = tensorboard_writer(self.workdir, self._purge_step)
      if not self.start_step:
        self._writer.add_text('config', '```\n' + self.config.to_json(indent=2) + '\n```', 0)
        self._writer.add_hparams(_hparams(self.config), {}, name='.', global_step=0)
    return self._writer

  def last_epoch(self) -> dict:
    return self.history[-1] if self.history else {}

  def nothing_to_do(self, step: int) -> dict:
    if self.is_main:
      print(f'nothing to do: {self.workdir} holds a run trained for '
            f'{step // self.steps_per_epoch} epoch(s) (step {step}), num_epochs is '
            f'{self.config.num_epochs}; raise --config.num_epochs to train further')
    return self.last_epoch()

  def start(self, data_source: str, layout: str, restored: bool) -> None:
    """Writes ``config.json``, opens the TensorBoard writer and says what the run does."""
    if not self.is_main:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    (self.workdir / 'config.json').write_text(self.config.to_json(indent=2) + '\n')
    self._purge_step = self.start_step + 1 if restored else None
    _import_tensorboardx()  # now (0.1 s), not at the first scalar, inside an epoch's timing
    print(f'data: {data_source}')
    print(layout)
    if restored and not self.start_step:
      print('starting from the step-0 checkpoint in the workdir (e.g. imported weights)')
    elif self.start_step:
      s, n = self.start_step, self.steps_per_epoch
      print(f'resuming from the checkpoint at step {s} (epoch {s // n + 1}, step {s % n} of {n})')

  def start_epoch(self, epoch: int, position: int, sums: dict) -> None:
    self._epoch, self._position, self._last = epoch, position, sums
    self._time = time.perf_counter()
    self._bar = progress_bar(self.steps_per_epoch, f'epoch {epoch + 1}/{self.config.num_epochs}',
                             enabled=self.config.progress and self.is_main)
    self._bar.update(position)

  def after_step(self, step: int, read_sums: Callable[[], dict]) -> None:
    """Advances the bar; every ``log_every`` steps of the epoch reads the sums and logs the interval.

    Counted from the epoch's start, so every epoch has its points at the same
    places and none covers only the first steps after an epoch's end (468
    steps, every 94: 94, 188, 282, 376 and the end, 468).
    """
    self._bar.update(1)
    position = step % self.steps_per_epoch
    if self.log_every and position and position % self.log_every == 0:
      self._interval(step, read_sums())

  def _interval(self, step: int, sums: dict) -> None:
    count = int(sums['count']) - int(self._last['count'])
    if count <= 0:
      return
    point = {'step': step, 'epoch_progress': step / self.steps_per_epoch,
             'train_loss': (float(sums['loss_sum']) - float(self._last['loss_sum'])) / count,
             'train_acc': (int(sums['correct']) - int(self._last['correct'])) / count,
             'learning_rate': float(self.learning_rate(step - 1))}  # the interval's last step's
    self._last = sums
    if not self.is_main:
      return
    self.points.append(point)
    for tag in INTERVAL_TAGS:
      self.writer.add_scalar(f'interval/{tag}', point[tag], step)
    with open(self.workdir / 'steps.jsonl', 'a') as f:
      f.write(json.dumps(point, sort_keys=True) + '\n')

  def end_epoch(self, epoch: int, step: int, sums: dict, test: dict) -> dict:
    """The epoch's summary: printed, appended to the files and TensorBoard, plotted."""
    seconds = time.perf_counter() - self._time
    self._bar.close()
    if self.log_every:
      self._interval(step, sums)
    count = int(sums['count'])
    summary = {
        'epoch': epoch + 1, 'step': step,
        'train_loss': float(sums['loss_sum']) / count,
        'train_acc': float(sums['correct']) / count,
        'test_loss': test['loss'], 'test_acc': test['accuracy'],
        # Examples trained in this process's run (less than an epoch after a resume).
        'examples_per_sec': (self.steps_per_epoch - self._position) * self.config.batch_size
                            / seconds,
        'seconds': seconds,
        'learning_rate': float(self.learning_rate(step - 1)),  # the epoch's last step's
    }
    self.history.append(summary)
    if self.is_main:
      print(epoch_line(summary, self.config.num_epochs, self.device))
      for tag in EPOCH_TAGS:
        self.writer.add_scalar(f'epoch/{tag}', summary[tag], step)
      self.writer.flush()
      write_jsonl(self.workdir / 'metrics.jsonl', self.history)
      if self.points:  # steps.jsonl is appended to; rewrite it once per epoch, cut at resume
        write_jsonl(self.workdir / 'steps.jsonl', self.points)
      plot_curves(self.history, self.workdir / 'curves.png', self.points)
    return summary

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  keys = ('dataset', 'image_size', 'optimizer', 'learning_rate', 'momentum', 'batch_size',
          'aux_weight', 'dtype', 'seed', 'num_epochs', 'bias_init')
  return {k: config[k] for k in keys if k in config}


class Profiler:
  """A ``jax.profiler`` trace of ``num_steps`` steps after two warm-up steps, into ``workdir/profile``.

  Open it with ``tensorboard --logdir WORKDIR/profile`` (the profile plugin,
  ``pip install tensorboard-plugin-profile``) or in XProf.
  """

  def __init__(self, workdir: Path, num_steps: int, start_step: int):
    self.folder = workdir / PROFILE_DIR
    self.num_steps = num_steps if jax.process_index() == 0 else 0
    self.begin = start_step + 2
    self.active = False

  def __enter__(self) -> 'Profiler':
    return self

  def after_step(self, step: int, state: Any) -> None:
    if not self.num_steps:
      return
    if step == self.begin:
      jax.block_until_ready(state)
      jax.profiler.start_trace(str(self.folder))
      self.active = True
    elif self.active and step == self.begin + self.num_steps:
      self._stop(state)

  def _stop(self, state: Any) -> None:
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    print(f'profiler trace of steps {self.begin + 1}-{self.begin + self.num_steps} written to '
          f'{self.folder}; view it with: tensorboard --logdir {self.folder}')

  def __exit__(self, *exc) -> None:
    if self.active:
      self._stop(None)
