"""gnet_jax.metrics: TensorBoard events (read back with TensorBoard's own reader), curves, jsonl."""

import json
import os
import signal

import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import TinyNet, pixels_of_color, read_png
from gnet_jax import metrics, preemption, train
from test_train import loop_config


def scalars(workdir):
  acc = event_accumulator.EventAccumulator(str(workdir / metrics.TB_DIR),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}, acc


def test_resolve_log_every():
  assert metrics.resolve_log_every(-1, 468) == 94  # about 5 points per epoch
  assert metrics.resolve_log_every(-1, 3) == 1
  assert metrics.resolve_log_every(0, 468) == 0 and metrics.resolve_log_every(10, 468) == 10


def test_tensorboard_events_survive_a_resume_without_duplicates(idx_dir, tmp_path):
  """Stopped by SIGTERM after step 5 (checkpoint 5), resumed: every step appears once."""
  config = loop_config(idx_dir, log_every_steps=2)  # 2 epochs of 4 steps
  sigterm_at_5 = lambda step: step == 5 and os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(preemption.Interrupted):
    train.train_and_evaluate(config, tmp_path, model=TinyNet(aux_heads=True),
                             after_step=sigterm_at_5)
  train.train_and_evaluate(config, tmp_path, model=TinyNet(aux_heads=True))
  # One event file per run, even when the resume opens its writer in the same second.
  for purge_step in (0, 6):  # the first run's file, and the resumed run's (purging from 6)
    assert len(list((tmp_path / metrics.TB_DIR).glob(f'events.out.tfevents.*.{purge_step}'))) == 1
  steps, acc = scalars(tmp_path)
  for tag in metrics.EPOCH_TAGS:
    assert steps[f'epoch/{tag}'] == [4, 8], tag
  for tag in metrics.INTERVAL_TAGS:
    assert steps[f'interval/{tag}'] == [2, 4, 6, 8], tag
  assert 'config' in ''.join(acc.Tags()['tensors'])  # the resolved config, as text
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  tb = {e.step: e.value for e in acc.Scalars('epoch/test_acc')}
  assert [tb[r['step']] for r in rows] == pytest.approx([r['test_acc'] for r in rows])
  points = [json.loads(line) for line in (tmp_path / 'steps.jsonl').read_text().splitlines()]
  assert [p['step'] for p in points] == [2, 4, 6, 8]


def test_curves_have_intra_epoch_points(tmp_path):
  history = [{'epoch': 1, 'train_loss': 2.0, 'train_acc': 0.2, 'test_acc': 0.3},
             {'epoch': 2, 'train_loss': 1.0, 'train_acc': 0.6, 'test_acc': 0.7}]
  points = [{'epoch_progress': i / 5, 'train_loss': 2.3 - i / 10, 'train_acc': i / 10}
            for i in range(1, 11)]
  drawn = {'with': metrics.plot_curves(history, tmp_path / 'with.png', points),
           'without': metrics.plot_curves(history, tmp_path / 'without.png')}
  lines = {name: {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                  for line in fig.axes[0].get_lines()} for name, fig in drawn.items()}
  assert lines['with']['train loss'] == ([p['epoch_progress'] for p in points],
                                         [p['train_loss'] for p in points])
  assert lines['with']['train acc'] == ([p['epoch_progress'] for p in points],
                                        [p['train_acc'] for p in points])
  assert lines['without']['train loss'] == ([1, 2], [2.0, 1.0])
  assert lines['without']['train acc'] == ([1, 2], [0.2, 0.6])
  for name in ('with', 'without'):
    assert lines[name]['test acc'] == ([1, 2], [0.3, 0.7])
    pixels = read_png(tmp_path / f'{name}.png')
    assert pixels.shape == (350, 500, 3)  # 5 x 3.5 in at 100 dpi
    for color in ('C0', 'C1', 'C2'):  # each curve reached the file, not just the axes
      assert pixels_of_color(pixels, color) > 150, (name, color)  # a legend entry alone: < 70


def test_jsonl_round_trip_is_atomic(tmp_path):
  rows = [{'epoch': 1, 'x': 0.5}, {'epoch': 2, 'x': 0.25}]
  metrics.write_jsonl(tmp_path / 'm.jsonl', rows)
  assert metrics.read_jsonl(tmp_path / 'm.jsonl') == rows
  assert not list(tmp_path.glob('.*.tmp'))
  assert metrics.read_jsonl(tmp_path / 'missing.jsonl') == []
  line = metrics.epoch_line({'epoch': 3, 'train_loss': 0.2624, 'train_acc': 0.9, 'test_acc': 0.886,
                             'examples_per_sec': 512.34}, 10, 'cpu:0')
  assert line == ('epoch 3/10: loss 0.262, train acc 0.900, test acc 0.886, '
                  '512.3 examples/sec on cpu:0')


def test_intra_epoch_points_restart_with_each_epoch(idx_dir, tmp_path):
  """6 steps per epoch, a point every 4: at 4 and the end of each epoch, never 2 steps after it."""
  config = loop_config(idx_dir, train_examples=48, log_every_steps=4)
  train.train_and_evaluate(config, tmp_path, model=TinyNet(aux_heads=True))
  points = [json.loads(line) for line in (tmp_path / 'steps.jsonl').read_text().splitlines()]
  assert [p['step'] for p in points] == [4, 6, 10, 12]
  assert [p['epoch_progress'] for p in points] == pytest.approx([4 / 6, 1, 10 / 6, 2])
