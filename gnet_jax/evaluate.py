"""Evaluate a checkpoint: ``python -m gnet_jax.evaluate --workdir DIR [--step N]``.

Restores the newest readable checkpoint in ``DIR/checkpoints`` (or step ``N``),
rebuilds the model from the config saved with it (test data whose classes or image
shape differ from the checkpoint's are refused), and prints accuracy and loss
over the whole test split plus a confusion matrix, also saved as
``DIR/confusion.png``, and draws the first test images with their true and
predicted classes as ``DIR/predictions.png`` (misclassified ones in red). It
runs the same evaluation as training (``train.evaluate``) on one device,
whatever layout trained the checkpoint (checkpoints are layout-free).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np


# Test images drawn in predictions.png (a 4 x 8 grid).
NUM_EXAMPLES = 32


def evaluate_checkpoint(workdir: str | Path, step: int | None = None,
                        num_examples: int = NUM_EXAMPLES) -> dict:
  """Accuracy, loss and confusion matrix of a checkpoint over the full test split.

  Also ``examples``: the first ``num_examples`` test images (uint8 NHWC), their
  labels and the predicted classes, for ``plot_predictions``. The evaluation
  step only returns sums, so these come from a separate jitted forward pass
  (``predict.make_predict_fn``, the one ``python -m gnet_jax.predict`` uses).
  """
  from gnet_jax import input_pipeline, state as state_lib, stream, train

  config, spec = state_lib.read_run(workdir, step)
  # A run that streamed (its checkpoint has a stream position) is evaluated streaming.
  if stream.choose_input(config, stream.saved_stream(workdir))[0] == 'stream':
    return _evaluate_streamed(workdir, step, num_examples, config, spec)
  # The full test split, whatever eval_examples the run used; no training data needed.
  data = input_pipeline.load_dataset(config.dataset, config.data_source, config.data_dir,
                                     train_examples=0, eval_examples=-1,
                                     splits=(config.train_split, config.test_split),
                                     image_size=config.image_size)
  state, config, step, spec, runner, model, eval_fn = _restore_for(workdir, step, spec,
                                                                   data.spec)
  result = train.evaluate(runner, eval_fn, runner.put_state(state.variables), data.test_images,
                          data.test_labels, train.eval_batch_size(config, 1))
  images = data.test_images[:num_examples]
  labels = np.asarray(data.test_labels[:num_examples])
  return _with_examples(result, images, labels, model, state, config, step, spec)


def _restore_for(workdir, step, spec, data_spec):
  """The checkpoint, restored and compiled for evaluation, once ``data_spec`` (the data read
  now) is known to be the data it was trained on: other classes would be mislabelled
  without a word, so they are refused (as a resume refuses them) before anything is
  restored or compiled."""
  import ml_collections

  from gnet_jax import input_pipeline, parallel, state as state_lib, train

  input_pipeline.check_same_data(
      spec, data_spec, f'the checkpoint in {Path(workdir).absolute() / "checkpoints"}',
      'evaluate it on the data it was trained on (the same class folders and --config.image_size),'
      ' or train a run on this data')
  state, config, step, spec = state_lib.load_checkpoint(workdir, step)
  runner = parallel.make_runner(ml_collections.ConfigDict(
      {'batch_size': config.batch_size, 'parallelism': 'none', 'num_devices': 0}))
  model = state_lib.create_model(config, spec)
  return state, config, step, spec, runner, model, train.compile_eval(
      runner, model, config.image_size, spec)


def _evaluate_streamed(workdir, step, num_examples, config, spec) -> dict:
  """``evaluate_checkpoint`` for a run that streamed: the test split read with Grain."""
  import ml_collections

  from gnet_jax import stream, train

  quick = ml_collections.ConfigDict(config.to_dict())
  quick.normalize, quick.train_examples, quick.eval_examples = False, 0, -1  # the saved spec's
  data = stream.load(quick)
  state, config, step, spec, runner, model, eval_fn = _restore_for(workdir, step, spec,
                                                                   data.spec)
  result = train.evaluate_batches(runner, eval_fn, runner.put_state(state.variables),
                                  stream.eval_batches(data, train.eval_batch_size(config, 1),
                                                      config.data_workers))
  first = [data.decode(data.test[i]) for i in range(min(num_examples, len(data.test)))]
  images = (np.stack([e['image'] for e in first]) if first
            else np.zeros((0,) + tuple(spec.image_shape), np.uint8))
  labels = np.asarray([e['label'] for e in first], np.int32)
  return _with_examples(result, images, labels, model, state, config, step, spec)


def _with_examples(result, images, labels, model, state, config, step, spec) -> dict:
  """``result`` with the run's identity and ``examples``: images, labels and predictions."""
  from gnet_jax import predict

  predict_fn = predict.make_predict_fn(model, state.variables, config.image_size,
                                       spec.normalization)
  examples = {'images': images, 'labels': labels,
              'predictions': (predict_fn(images).argmax(-1) if len(images)
                              else np.zeros((0,), np.int64))}
  return {**result, 'step': step, 'config': config, 'class_names': spec.class_names,
          'examples': examples}


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
                   path: str | os.PathLike) -> Any:
  """The confusion matrix as a heat map, counts written in; returns the (closed) figure."""
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
  return fig


def plot_predictions(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                     names: Sequence[str], title: str, path: str | os.PathLike,
                     columns: int = 8) -> Any:
  """A grid of test images titled 'true / predicted' (d2l's ``predict_ch3``); mistakes in red.

  A misclassified image gets a red title and a red frame, so the errors stand
  out at a glance; correct ones have a plain black title and no frame.
  Returns the (closed) figure, so a test can read what was drawn.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  n = len(images)
  rows = max(1, -(-n // columns))
  cols = min(columns, max(n, 1))
  fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.75 * rows + 0.5), dpi=100,
                           squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.set_xticks([])
    ax.set_yticks([])
    if i >= n:
      ax.axis('off')
      continue
    ax.imshow(images[i][..., 0] if images[i].shape[-1] == 1 else images[i], cmap='gray',
              vmin=0, vmax=255)
    wrong = int(predictions[i]) != int(labels[i])
    ax.set_title(f'true: {names[int(labels[i])]}\npred: {names[int(predictions[i])]}',
                 fontsize=7, color='red' if wrong else 'black')
    for spine in ax.spines.values():
      spine.set_visible(wrong)
      spine.set_color('red')
      spine.set_linewidth(2.5)
  wrong = int(np.sum(np.asarray(predictions) != np.asarray(labels)))
  fig.suptitle(f'{title}: {wrong} of {n} misclassified (red)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, format='png')
  plt.close(fig)
  return fig


def run(args: argparse.Namespace) -> int:
  result = evaluate_checkpoint(args.workdir, args.step)
  config, names = result['config'], result['class_names']
  print(f'checkpoint: step {result["step"]} in {Path(args.workdir).absolute() / "checkpoints"}')
  print(f'test accuracy {result["accuracy"]:.4f}, test loss {result["loss"]:.4f} '
        f'over {result["count"]} examples ({config.dataset} test split, '
        f'{config.image_size}x{config.image_size})')
  print(format_confusion(result['confusion'], names))
  path = Path(args.workdir) / 'confusion.png'
  plot_confusion(result['confusion'], names,
                 f'{config.dataset}, step {result["step"]}: test accuracy '
                 f'{result["accuracy"]:.4f}', path)
  print(f'saved {path}')
  examples = result['examples']
  path = Path(args.workdir) / 'predictions.png'
  plot_predictions(examples['images'], examples['labels'], examples['predictions'], names,
                   f'{config.dataset}, step {result["step"]}: the first '
                   f'{len(examples["labels"])} test images', path)
  print(f'saved {path}')
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m gnet_jax.evaluate',
      description='Evaluate a checkpoint on the full test split and plot its confusion matrix.')
  from gnet_jax import cli
  cli.add_checkpoint_flags(parser, 'evaluate')
  args = parser.parse_args(argv)
  return cli.run_command(run, args)


if __name__ == '__main__':
  from gnet_jax import cli
  cli.collect_garbage_less_often()
  cli.quiet_logs()
  sys.exit(main())
