"""Turns a ``train.py`` run into committed evidence: its metrics, the d2l-style plot, the facts of the run.

    python -m benchmarks.reproduction --workdir runs/book --name book_96 \\
        --command 'python train.py --config configs/fashion_mnist.py --workdir runs/book' \\
        --commit c638eba

Copies ``metrics.jsonl`` and ``steps.jsonl`` to ``docs/data/NAME/``, draws
``docs/img/NAME.png`` (train loss and train accuracy at the run's intra-epoch
points, test accuracy per epoch, as the book's plot), writes
``docs/data/NAME/run.json`` (command, commit, machine, versions, wall time,
how many processes the run took) and prints the epoch table of
``docs/reproduction.md`` with the book's published line beside the last epoch.
Works on an unfinished run too: it says how many epochs are in.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from benchmarks import harness
from gnet_jax import metrics

REPO = harness.REPO

# Dive into Deep Learning, section 8.4 (GoogLeNet), the PyTorch run's last line:
# Fashion-MNIST at 96x96, SGD lr 0.1, batch 128, 10 epochs.
BOOK = {'train_loss': 0.262, 'train_acc': 0.900, 'test_acc': 0.886}
TARGET_TEST_ACC = 0.88


def run_facts(workdir: Path, history: list[dict], command: str, commit: str) -> dict:
  """What a reader needs to rerun and judge the run; the processes are counted by their
  TensorBoard event files: one per process that trained, named ``....PID.PURGE_STEP`` by
  ``metrics.tensorboard_writer`` (the hparams file of a fresh start has no such suffix)."""
  config = json.loads((workdir / 'config.json').read_text())
  events = [f for f in (workdir / 'tensorboard').glob('events.out.tfevents.*')
            if re.search(r'\.\d+\.\d+$', f.name)]
  reached = next((m['epoch'] for m in history if m['test_acc'] >= TARGET_TEST_ACC), None)
  info = harness.machine_info()
  return {
      'command': command, 'commit': commit,
      'machine': f"{info['cpu']}, {info['cores']} cores, {info['os']}",
      'versions': info['versions'],
      'epochs_done': len(history), 'num_epochs': config['num_epochs'],
      'train_seconds': round(sum(m['seconds'] for m in history), 1),
      'processes': len(events),
      f'first_epoch_test_acc_at_least_{TARGET_TEST_ACC}': reached,
      'final': {k: history[-1][k] for k in ('train_loss', 'train_acc', 'test_loss', 'test_acc')}
               if history else None,
      'book': BOOK, 'config': config,
  }


def epoch_table(history: list[dict], num_epochs: int) -> str:
  rows = ['| epoch | train loss | train acc | test acc | examples/sec |', '|---|---|---|---|---|']
  rows += [f"| {m['epoch']} | {m['train_loss']:.3f} | {m['train_acc']:.3f} | {m['test_acc']:.3f} "
           f"| {m['examples_per_sec']:.1f} |" for m in history]
  if history and history[-1]['epoch'] == num_epochs:
    rows.append(f"| book (d2l 8.4, PyTorch), epoch {num_epochs} | {BOOK['train_loss']:.3f} "
                f"| {BOOK['train_acc']:.3f} | {BOOK['test_acc']:.3f} | |")
  return '\n'.join(rows)


def collect(workdir: Path, name: str, command: str, commit: str, docs: Path) -> dict:
  """Copies the run's files under ``docs``, draws the plot, returns the run's facts."""
  history = metrics.read_jsonl(workdir / 'metrics.jsonl')
  points = metrics.read_jsonl(workdir / 'steps.jsonl')
  if not history:
    raise SystemExit(f'error: {workdir / "metrics.jsonl"} has no finished epoch yet')
  data = docs / 'data' / name
  data.mkdir(parents=True, exist_ok=True)
  for file in ('metrics.jsonl', 'steps.jsonl'):
    shutil.copyfile(workdir / file, data / file)
  (docs / 'img').mkdir(parents=True, exist_ok=True)
  metrics.plot_curves(history, docs / 'img' / f'{name}.png',
                      [p for p in points if p['step'] <= history[-1]['step']])
  facts = run_facts(workdir, history, command, commit)
  (data / 'run.json').write_text(json.dumps(facts, indent=2, sort_keys=True) + '\n')
  return facts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', type=Path, required=True, help="the run's --workdir")
  parser.add_argument('--name', default='book_96', help='folder under docs/data, image in docs/img')
  parser.add_argument('--command', required=True, help='the exact command that trained the run')
  parser.add_argument('--commit', required=True, help='the commit the run trained with')
  parser.add_argument('--docs', type=Path, default=REPO / 'docs')
  args = parser.parse_args()
  facts = collect(args.workdir, args.name, args.command, args.commit, args.docs)
  history = metrics.read_jsonl(args.docs / 'data' / args.name / 'metrics.jsonl')
  print(f"{facts['epochs_done']} of {facts['num_epochs']} epochs, "
        f"{facts['train_seconds'] / 3600:.2f} h of training in {facts['processes']} process(es); "
        f"{facts['machine']}\n")
  print(epoch_table(history, facts['num_epochs']))


if __name__ == '__main__':
  main()
