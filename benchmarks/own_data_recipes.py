"""Which recipe suits a small image folder? ``configs/image_folder.py`` against simpler ones.

    python -m benchmarks.own_data_recipes                        # the table in docs/own_data.md
    python -m benchmarks.own_data_recipes --epochs 5 --image-size 32 --train-per-class 50
    python -m benchmarks.own_data_recipes --epochs 30 --only 3,4   # augmentation or not, 30 epochs

Makes an image folder from Fashion-MNIST (the first N training and test images
of each class, written as PNG files under ``--out``; grey, so the folder's RGB
images have three equal channels) and trains GoogLeNet on it with each recipe
through ``train.train_and_evaluate``, one after the other, from the same seed.
Prints the test accuracy after the last epoch and the best epoch's, per recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gnet_jax import xla_flags

xla_flags.apply_defaults()

from configs import image_folder as image_folder_config  # noqa: E402
from benchmarks import harness  # noqa: E402
from gnet_jax import cli, input_pipeline, metrics, train  # noqa: E402

# Name -> overrides of configs/image_folder.py; the last is the config as shipped.
PLAIN = {'normalize': False, 'augment_crop': 'none', 'augment_flip': False, 'weight_decay': 0.0,
         'lr_schedule': 'constant'}
RECIPES = {
    'book: SGD 0.1, constant': dict(PLAIN, optimizer='sgd', learning_rate=0.1),
    'Adam 1e-3, constant': dict(PLAIN, optimizer='adam'),
    'Adam, warmup + cosine, weight decay, normalised': {'augment_crop': 'none',
                                                         'augment_flip': False},
    'configs/image_folder.py (+ pad-crop, flip)': {},
}


def make_folder(root: Path, train_per_class: int, test_per_class: int,
                classes: range = range(10)) -> Path:
  """The first N images of each of ``classes`` in both splits.

  Written as ``root/{train,test}/<class>/i.png``; files already there are kept.
  """
  from PIL import Image

  data = input_pipeline.load_dataset('fashion_mnist', 'idx')
  names = [n.replace('/', '-') for n in data.spec.class_names]
  for split, images, labels, n in (('train', data.train_images, data.train_labels,
                                    train_per_class),
                                   ('test', data.test_images, data.test_labels, test_per_class)):
    for label in classes:
      folder = root / split / names[label]
      folder.mkdir(parents=True, exist_ok=True)
      for i in [i for i in range(len(labels)) if labels[i] == label][:n]:
        if not (folder / f'{i}.png').exists():
          Image.fromarray(images[i][..., 0], 'L').save(folder / f'{i}.png')
  return root


def run(name: str, overrides: dict, folder: Path, workdir: Path, args) -> dict:
  config = image_folder_config.get_config()
  config.update(overrides)
  config.data_dir, config.image_size, config.num_epochs = str(folder), args.image_size, args.epochs
  config.progress = False
  train.train_and_evaluate(config, workdir)
  history = metrics.read_jsonl(workdir / 'metrics.jsonl')
  return {'recipe': name, 'overrides': overrides, 'final_test_acc': history[-1]['test_acc'],
          'best_test_acc': max(m['test_acc'] for m in history),
          'final_train_loss': history[-1]['train_loss'],
          'seconds': sum(m['seconds'] for m in history)}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', type=Path, default=harness.REPO / 'runs' / 'own_data_recipes')
  parser.add_argument('--train-per-class', type=int, default=100)
  parser.add_argument('--test-per-class', type=int, default=50)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--only', help='comma-separated recipe numbers (1-based, as in the table)')
  parser.add_argument('--json', type=Path, help='also write the results here')
  args = parser.parse_args()

  folder = make_folder(args.out / 'folder', args.train_per_class, args.test_per_class)
  results = []
  chosen = [int(i) for i in args.only.split(',')] if args.only else range(1, len(RECIPES) + 1)
  for i, (name, overrides) in enumerate(RECIPES.items(), start=1):
    if i in chosen:
      results.append(run(name, overrides, folder, args.out / f'recipe{i}_{args.epochs}', args))
  machine = harness.machine_info()
  print(f"\n{machine['cpu']}, {machine['cores']} cores; "
        f'{args.train_per_class} train / {args.test_per_class} test images per class, '
        f'{args.image_size}x{args.image_size}, {args.epochs} epochs, batch 32\n')
  print('| recipe | test acc, last epoch | best epoch | train loss, last epoch |\n|---|---|---|---|')
  for r in results:
    print(f"| {r['recipe']} | {r['final_test_acc']:.3f} | {r['best_test_acc']:.3f} "
          f"| {r['final_train_loss']:.3f} |")
  if args.json:
    args.json.write_text(json.dumps(results, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_command(main))  # bad input (data, config): one error line, exit status 2
