"""Does a small folder gain from pretrained weights? Fine-tuning against training from scratch.

    python -m benchmarks.transfer --json docs/data/transfer.json --plot docs/img/transfer.png
    python -m benchmarks.transfer --image-size 32 --pretrain-epochs 1 --epochs 2 --seeds 0   # smoke

No ImageNet file can be downloaded here, so the pretraining is done on data
that is: ``inception_v1`` is trained from scratch on a *source* folder made of
Fashion-MNIST's classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat).
The *target* is a small folder of the other five classes (Sandal, Shirt,
Sneaker, Bag, Ankle boot: ``--target-per-class`` training images each). On
the target, each recipe trains for the same number of steps, from each seed
(the overrides are pinned here, so a changed config file cannot change a
recipe):

- ``fine-tune, SGD 0.01``: ``configs/finetune.py``'s first recipe (SGD with
  momentum at 0.01), ``init_from`` the source run: a new classifier for the
  five target classes, the pretrained blocks at a tenth of its rate,
  BatchNorm statistics updating; the same with the statistics frozen, and
  with only the head training (``trainable=head``);
- ``scratch, SGD 0.01``: the same recipe without ``init_from`` (every layer at
  the full rate, since nothing is pretrained);
- ``scratch, own-data recipe``: ``configs/image_folder.py`` (Adam, warmup and
  cosine, pad-crop and flip), the project's recipe for a folder trained from
  scratch, with ``model=inception_v1``;
- ``fine-tune, own-data recipe``: the same from the source run, its input
  normalised as the source run's was;
- ``fine-tune, Adam 1e-3``: ``configs/finetune.py`` as shipped (Adam with
  decoupled weight decay at 1e-3, pretrained blocks at a tenth of it), and the
  same with the pretrained blocks at the full rate.

The source run uses ``configs/finetune.py`` with SGD (as above), statistics
updating and every layer at the full rate.

Prints the test accuracy after the last epoch per recipe (median, min and max
over seeds) and writes every run's per-epoch test accuracy to ``--json``;
``--plot`` draws them.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from gnet_jax import xla_flags

xla_flags.apply_defaults()

from benchmarks import harness  # noqa: E402
from benchmarks.own_data_recipes import make_folder  # noqa: E402
from configs import finetune as finetune_config, image_folder as image_folder_config  # noqa: E402
from gnet_jax import metrics, train  # noqa: E402

SOURCE_CLASSES, TARGET_CLASSES = range(0, 5), range(5, 10)
# configs/image_folder.py's recipe on inception_v1, fed as the source run was (finetune.py's input).
SAME_INPUT = {'model': 'inception_v1', 'normalize_stats': 'imagenet', 'transform_input': True}
# configs/finetune.py's optimizer before it was measured here: SGD with momentum at 0.01.
SGD = {'optimizer': 'sgd', 'learning_rate': 0.01, 'momentum': 0.9}


def target_recipes(source_run: Path) -> dict[str, tuple]:
  """Name -> (config module, overrides) of each recipe trained on the target folder."""
  return {
      'fine-tune, SGD 0.01, BatchNorm frozen': (
          finetune_config, dict(SGD, init_from=str(source_run), bn_stats='frozen')),
      'fine-tune, SGD 0.01, head only': (
          finetune_config, dict(SGD, init_from=str(source_run), trainable='head',
                                bn_stats='frozen')),
      'scratch, SGD 0.01': (finetune_config, dict(SGD, bn_stats='update',
                                                  pretrained_lr_multiplier=1.0)),
      'scratch, own-data recipe (configs/image_folder.py)': (
          image_folder_config, {'model': 'inception_v1'}),
      'fine-tune, SGD 0.01': (finetune_config, dict(SGD, init_from=str(source_run),
                                                    bn_stats='update')),
      'fine-tune, own-data recipe': (image_folder_config, dict(SAME_INPUT,
                                                               init_from=str(source_run))),
      'fine-tune, Adam 1e-3, pretrained x 0.1 (configs/finetune.py)': (
          finetune_config, {'init_from': str(source_run), 'bn_stats': 'update',
                            'optimizer': 'adam', 'learning_rate': 1e-3, 'momentum': 0.0}),
      'fine-tune, Adam 1e-3, pretrained x 1': (
          finetune_config, {'init_from': str(source_run), 'bn_stats': 'update',
                            'optimizer': 'adam', 'learning_rate': 1e-3, 'momentum': 0.0,
                            'pretrained_lr_multiplier': 1.0}),
  }


def train_run(module, overrides: dict, folder: Path, workdir: Path, image_size: int,
              epochs: int, seed: int, batch_size: int) -> list[dict]:
  """One ``train.train_and_evaluate`` run (resumed if its workdir holds one); its epoch rows."""
  config = module.get_config()
  config.update(overrides)
  config.data_dir, config.image_size, config.num_epochs = str(folder), image_size, epochs
  config.seed, config.batch_size, config.progress = seed, batch_size, False
  train.train_and_evaluate(config, workdir)
  return metrics.read_jsonl(workdir / 'metrics.jsonl')


def plot(results: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  colours = {}
  for r in results:
    colour = colours.setdefault(r['recipe'], f'C{len(colours)}')
    ax.plot(range(1, len(r['test_acc']) + 1), r['test_acc'], '-', color=colour, alpha=0.8,
            label=r['recipe'] if r['seed'] == results[0]['seed'] else None)
  ax.set_xlabel('epoch on the target folder')
  ax.set_ylabel('test accuracy (5 classes)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', type=Path, default=harness.REPO / 'runs' / 'transfer')
  parser.add_argument('--source-per-class', type=int, default=1000)
  parser.add_argument('--target-per-class', type=int, default=20)
  parser.add_argument('--test-per-class', type=int, default=100)
  parser.add_argument('--image-size', type=int, default=64)
  parser.add_argument('--pretrain-epochs', type=int, default=3)
  parser.add_argument('--epochs', type=int, default=15, help='epochs on the target folder')
  parser.add_argument('--batch-size', type=int, default=20)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--json', type=Path)
  parser.add_argument('--plot', type=Path)
  args = parser.parse_args()
  machine = harness.machine_info()

  source = make_folder(args.out / 'source', args.source_per_class, args.test_per_class,
                       SOURCE_CLASSES)
  target = make_folder(args.out / 'target', args.target_per_class, args.test_per_class,
                       TARGET_CLASSES)
  source_run = args.out / 'source_run'
  pretrain = train_run(finetune_config, dict(SGD, bn_stats='update', pretrained_lr_multiplier=1.0),
                       source, source_run, args.image_size, args.pretrain_epochs, 0, 32)
  results = []
  for seed in [int(s) for s in args.seeds.split(',')]:
    for i, (name, (module, overrides)) in enumerate(target_recipes(source_run).items()):
      rows = train_run(module, overrides, target, args.out / f'seed{seed}_recipe{i}',
                       args.image_size, args.epochs, seed, args.batch_size)
      results.append({'recipe': name, 'seed': seed, 'overrides': overrides,
                      'test_acc': [r['test_acc'] for r in rows],
                      'train_loss': [r['train_loss'] for r in rows]})

  print('\n'.join(harness.machine_lines(machine)))
  steps = args.epochs * (5 * args.target_per_class // args.batch_size)
  print(f"\nsource: {5 * args.source_per_class} images, {args.pretrain_epochs} epochs, test acc "
        f"{pretrain[-1]['test_acc']:.3f}; target: {5 * args.target_per_class} training images, "
        f'{steps} steps of batch {args.batch_size}, {5 * args.test_per_class} test images, '
        f'{args.image_size}x{args.image_size}\n')
  rows = []
  for name in target_recipes(source_run):
    finals = [r['test_acc'][-1] for r in results if r['recipe'] == name]
    rows.append([name, f'{statistics.median(finals):.3f}', f'{min(finals):.3f}-{max(finals):.3f}',
                 len(finals)])
  print(harness.markdown_table(['recipe', 'test acc, last epoch (median)', 'min-max', 'seeds'],
                               rows))
  harness.write_json(args.json, {'machine': machine, 'args': {k: str(v) for k, v in
                                                              vars(args).items()},
                                 'source_test_acc': [r['test_acc'] for r in pretrain],
                                 'runs': results})
  if args.plot:
    plot(results, args.plot)


if __name__ == '__main__':
  main()
