"""Evaluate a checkpoint: ``python -m gnet_jax.evaluate --workdir DIR [--step N]``.

Restores the newest readable checkpoint in ``DIR/checkpoints`` (or step ``N``),
rebuilds the model from the config saved with it, and prints accuracy and loss
over the whole test split plus a confusion matrix, also saved as
``DIR/confusion.png``. Runs on one device whatever layout trained the
checkpoint (checkpoints are layout-free).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

CLASS_NAMES = {
    'mnist': [str(i) for i in range(10)],
    'fashion_mnist': ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                      'Sneaker', 'Bag', 'Ankle boot'],
}


def _predict(params, batch, *, model, image_size):
  """Predicted class and per-example loss: enough for accuracy, loss and the confusion matrix."""
  from gnet_jax import train

  logits = model.apply({'params': params}, train.preprocess(batch['image'], image_size))
  return logits.argmax(-1), train.cross_entropy(logits, batch['label'])


def evaluate_checkpoint(workdir: str | Path, step: int | None = None) -> dict:
  """Accuracy, loss and confusion matrix of a checkpoint over the full test split."""
  import jax

  from gnet_jax import checkpoint, input_pipeline, train

  state, config, step = checkpoint.restore_latest(workdir, step)
  # The full test split, whatever eval_examples the run used; no training data needed.
  data = input_pipeline.load_dataset(config.dataset, config.data_source, config.data_dir,
                                     train_examples=0, eval_examples=-1)
  device = jax.devices()[0]
  params = jax.device_put(state.params, device)
  predict = jax.jit(functools.partial(_predict, model=train.make_model(config),
                                      image_size=config.image_size))
  batch_size = config.get('eval_batch_size', 0) or config.batch_size
  outputs = []
  for batch in input_pipeline.eval_batches(data.test_images, data.test_labels, batch_size):
    preds, losses = predict(params, jax.device_put(
        {'image': batch['image'], 'label': batch['label']}, device))
    outputs.append((preds, losses, batch['label'], batch['mask']))  # no per-batch host sync
  confusion = np.zeros((input_pipeline.NUM_CLASSES,) * 2, np.int64)
  loss_sum, count = 0.0, 0
  for preds, losses, labels, mask in outputs:
    preds, losses = np.asarray(preds)[mask], np.asarray(losses)[mask]
    np.add.at(confusion, (labels[mask], preds), 1)
    loss_sum += float(losses.astype(np.float64).sum())
    count += int(mask.sum())
  return {'step': step, 'config': config, 'count': count,
          'accuracy': float(np.trace(confusion)) / max(count, 1),
          'loss': loss_sum / max(count, 1), 'confusion': confusion}


def format_confusion(confusion: np.ndarray, names: Sequence[str]) -> str:
  """Rows: true class, columns: predicted class, with the class names as a legend."""
  width = max(5, len(str(int(confusion.max()))) + 1)
  lines = ['confusion matrix (rows: true class, columns: predicted class)',
           'true\\pred' + ''.join(f'{j:>{width}}' for j in range(len(names)))]
  for i, row in enumerate(confusion):
    lines.append(f'{i:>9}' + ''.join(f'{int(v):>{width}}' for v in row))
  lines.append('classes: ' + ', '.join(f'{i} {n}' for i, n in enumerate(names)))
  return '\n'.join(lines)


def plot_confusion(confusion: np.ndarray, names: Sequence[str], title: str,
                   path: str | os.PathLike) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
  ax.imshow(confusion, cmap='Blues')
  threshold = confusion.max() / 2 if confusion.size else 0
  for (i, j), v in np.ndenumerate(confusion):
    ax.text(j, i, str(int(v)), ha='center', va='center', fontsize=7,
            color='white' if v > threshold else 'black')
  ticks = range(len(names))
  ax.set_xticks(ticks, names, rotation=45, ha='right', fontsize=8)
  ax.set_yticks(ticks, names, fontsize=8)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, format='png')
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m gnet_jax.evaluate',
      description='Evaluate a checkpoint on the full test split and plot its confusion matrix.')
  parser.add_argument('--workdir', required=True, help='the training run\'s --workdir')
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step to evaluate (default: the newest readable one)')
  args = parser.parse_args(argv)

  from gnet_jax import checkpoint
  from gnet_jax.input_pipeline import DatasetError

  try:
    result = evaluate_checkpoint(args.workdir, args.step)
  except (checkpoint.CheckpointError, DatasetError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  config = result['config']
  names = CLASS_NAMES.get(config.dataset, [str(i) for i in range(10)])
  print(f'checkpoint: step {result["step"]} in {checkpoint.checkpoint_dir(args.workdir)}')
  print(f'test accuracy {result["accuracy"]:.4f}, test loss {result["loss"]:.4f} '
        f'over {result["count"]} examples ({config.dataset} test split, '
        f'{config.image_size}x{config.image_size})')
  print(format_confusion(result['confusion'], names))
  path = Path(args.workdir) / 'confusion.png'
  plot_confusion(result['confusion'], names,
                 f'{config.dataset}, step {result["step"]}: test accuracy '
                 f'{result["accuracy"]:.4f}', path)
  print(f'saved {path}')
  return 0


if __name__ == '__main__':
  # ml_collections pulls in a deprecated importlib call on Python >= 3.11.
  warnings.filterwarnings('ignore', message='.*load_module.*', category=DeprecationWarning)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs routine warnings
  sys.exit(main())
