"""``python -m benchmarks.reproduction``: a run's files become the committed evidence of docs/reproduction.md."""

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import reproduction
from gnet_jax import metrics


def _fake_run(workdir, epochs_done: int, num_epochs: int = 2):
  """A workdir as train.py leaves it: config, per-epoch metrics, intra-epoch points, 2 processes."""
  # A run resumed once: two processes, each with its writer, and the fresh start's hparams
  # file beside them, as train.py's RunLog leaves them.
  for purge_step in (None, 468):
    writer = metrics.tensorboard_writer(workdir, purge_step)
    if purge_step is None:
      writer.add_hparams({'batch_size': 128}, {}, name='.', global_step=0)
    writer.add_scalar('train/loss', 1.0, purge_step or 1)
    writer.close()
  assert len(list((workdir / 'tensorboard').iterdir())) == 3
  (workdir / 'config.json').write_text(json.dumps({'num_epochs': num_epochs, 'image_size': 96}))
  history = [{'epoch': e, 'step': 468 * e, 'train_loss': 1.0 / e, 'train_acc': 0.8 + 0.05 * e,
              'test_loss': 0.5, 'test_acc': 0.85 + 0.02 * e, 'examples_per_sec': 60.0 + e,
              'seconds': 1000.0 + e} for e in range(1, epochs_done + 1)]
  points = [{'epoch_progress': s / 468, 'step': s, 'train_loss': 2.0 - s / 1000,
             'train_acc': 0.1 + s / 2000} for s in range(94, 468 * num_epochs + 1, 94)]
  metrics.write_jsonl(workdir / 'metrics.jsonl', history)
  metrics.write_jsonl(workdir / 'steps.jsonl', points)
  return history


def test_collect_copies_plots_and_states_the_run(tmp_path):
  history = _fake_run(tmp_path / 'run', epochs_done=2)
  facts = reproduction.collect(tmp_path / 'run', 'book_test', 'python train.py ...', 'abc1234',
                               tmp_path / 'docs')
  data = tmp_path / 'docs' / 'data' / 'book_test'
  assert metrics.read_jsonl(data / 'metrics.jsonl') == history
  assert json.loads((data / 'run.json').read_text()) == json.loads(json.dumps(facts))
  assert facts['train_seconds'] == 2003.0 and facts['processes'] == 2
  assert facts['epochs_done'] == 2 and facts['commit'] == 'abc1234'
  assert facts['first_epoch_test_acc_at_least_0.88'] == 2  # 0.87 after epoch 1, 0.89 after 2
  assert facts['final']['test_acc'] == pytest.approx(0.89) and 'jax' in facts['versions']
  pixels = np.asarray(Image.open(tmp_path / 'docs' / 'img' / 'book_test.png').convert('RGB'))
  assert pixels.shape == (350, 500, 3)
  # The three curves are drawn: blue (loss), orange (train acc), green (test acc) pixels.
  for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
    assert (np.abs(pixels.astype(int) - rgb).sum(-1) < 60).sum() > 50, rgb


def test_table_puts_the_book_beside_the_last_epoch_only_when_finished(tmp_path):
  history = _fake_run(tmp_path / 'run', epochs_done=1)
  partial = reproduction.epoch_table(history, num_epochs=2)
  assert '| 1 | 1.000 | 0.850 | 0.870 | 61.0 |' in partial and 'book' not in partial
  full = reproduction.epoch_table(history + [dict(history[0], epoch=2)], num_epochs=2)
  assert full.splitlines()[-1] == '| book (d2l 8.4, PyTorch), epoch 2 | 0.262 | 0.900 | 0.886 | |'


def test_no_finished_epoch_is_a_clear_error(tmp_path):
  _fake_run(tmp_path / 'run', epochs_done=0)
  with pytest.raises(SystemExit, match='no finished epoch'):
    reproduction.collect(tmp_path / 'run', 'x', 'cmd', 'abc', tmp_path / 'docs')
