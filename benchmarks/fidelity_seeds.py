"""Curves over seeds: gnet-jax and the PyTorch original, each trained on its own.

    python -m benchmarks.fidelity_seeds --out runs/fidelity_seeds          # train (resumable)
    python -m benchmarks.fidelity_seeds --out runs/fidelity_seeds --summarize \\
        --plot docs/img/fidelity_seeds.png

Unlike ``benchmarks.fidelity`` (same start, same batches), every run here is
independent, the way a user would train either network:

- ``torch``: the d2l PyTorch GoogLeNet (``gnet_jax/torch_reference.py``) with its
  own initialisation (``torch.manual_seed(seed)``, Xavier-uniform weights,
  PyTorch's default uniform biases), its own shuffling (``torch.randperm``
  from a generator seeded with ``seed``), ``torch.optim.SGD`` and
  ``nn.CrossEntropyLoss``;
- ``jax``: gnet-jax as ``train.py`` trains it (``state.build(config)``, the
  project's permutation ``input_pipeline.train_batches``, ``train.train_step``),
  with its default zero biases;
- ``jax-torchbias``: the same with ``bias_init='torch'`` (PyTorch's default
  bias initialisation).

Recipe: ``configs/fashion_mnist.py`` (SGD lr 0.1, batch 128) at 28x28 for 3
epochs, seeds 0, 1, 2 unless told otherwise. Each run is written to
``OUT/runs/<name>_seed<S>.json`` as soon as it ends and skipped when present,
so an interrupted sweep continues where it stopped. One run at a time.
``--summarize`` prints the table (test accuracy per epoch, every run and each
framework's min-max) and draws the band plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import fidelity

FRAMEWORKS = ('torch', 'jax', 'jax-torchbias')
LABELS = {'torch': 'PyTorch original', 'jax': 'gnet-jax (zero biases)',
          'jax-torchbias': "gnet-jax (bias_init='torch')"}
COLORS = {'torch': 'tab:orange', 'jax': 'tab:blue', 'jax-torchbias': 'tab:green'}


def run_one(name: str, seed: int, config, torch, data, epochs: int) -> dict:
  from gnet_jax import input_pipeline, torch_reference

  size, batch_size = config.image_size, config.batch_size
  n = len(data.train_labels)
  spe = input_pipeline.steps_per_epoch(n, batch_size)
  losses, accs, evals = [], [], []
  t0 = time.perf_counter()
  if name == 'torch':
    torch.manual_seed(seed)
    net = torch_reference.googlenet(data.image_shape[-1], 10)
    opt = torch.optim.SGD(net.parameters(), lr=config.learning_rate)
    criterion = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
      order = torch.randperm(n, generator=gen).numpy()
      for s in range(spe):
        idx = order[s * batch_size:(s + 1) * batch_size]
        x = fidelity.torch_input(torch, data.train_images[idx], size, 'cpu')
        y = torch.from_numpy(data.train_labels[idx]).long()
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        loss = criterion(logits, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        accs.append(float((logits.argmax(-1) == y).float().mean()))
      ev = fidelity.torch_evaluate(torch, net, data, batch_size, size, 'cpu')
      evals.append(_epoch_record(epoch, losses, accs, spe, ev, t0))
      print(f'  {name} seed {seed} epoch {epoch + 1}: {evals[-1]}', flush=True)
  else:
    config = config.copy_and_resolve_references()
    config.seed = seed
    config.bias_init = 'torch' if name == 'jax-torchbias' else 'zeros'
    jstate, _, step, evaluate = fidelity.jax_side(config, data.spec)
    for epoch in range(epochs):
      for batch in input_pipeline.train_batches(data.train_images, data.train_labels,
                                                batch_size, seed, epoch):
        jstate, loss, acc = step(jstate, batch)
        losses.append(loss)
        accs.append(acc)
      ev = evaluate(jstate.params, data, batch_size)
      evals.append(_epoch_record(epoch, losses, accs, spe, ev, t0))
      print(f'  {name} seed {seed} epoch {epoch + 1}: {evals[-1]}', flush=True)
  return {'name': name, 'label': LABELS[name], 'seed': seed, 'image_size': size,
          'batch_size': batch_size, 'learning_rate': config.learning_rate,
          'steps_per_epoch': spe, 'epochs': evals, 'train_loss': losses,
          'train_acc': accs, 'wall_seconds': time.perf_counter() - t0}


def _epoch_record(epoch, losses, accs, spe, ev, t0) -> dict:
  import numpy as np
  return {'epoch': epoch + 1, 'train_loss': float(np.mean(losses[-spe:])),
          'train_acc': float(np.mean(accs[-spe:])), 'test_loss': ev['loss'],
          'test_acc': ev['accuracy'], 'seconds': round(time.perf_counter() - t0, 1)}


def train_all(args) -> int:
  torch = fidelity.import_torch()
  fidelity.apply_xla_defaults()
  config = fidelity.load_config(args.config, args.overrides)
  config.image_size = args.image_size
  fidelity.setup_torch(torch, 'cpu')
  for line in fidelity.machine_lines(torch, 'cpu'):
    print(line)
  data = fidelity.load_data(config, args.data_dir)
  if args.train_examples is not None or args.eval_examples is not None:
    from gnet_jax import input_pipeline
    data = input_pipeline.subset(data, -1 if args.train_examples is None else args.train_examples,
                                 -1 if args.eval_examples is None else args.eval_examples)
  runs = Path(args.out) / 'runs'
  runs.mkdir(parents=True, exist_ok=True)
  (Path(args.out) / 'machine.json').write_text(json.dumps(
      fidelity.machine_lines(torch, 'cpu'), indent=1) + '\n')
  # The two main curves first (seed by seed), the bias-init variant last.
  order = ([(s, n) for s in args.seeds for n in args.frameworks if n != 'jax-torchbias'] +
           [(s, n) for s in args.seeds for n in args.frameworks if n == 'jax-torchbias'])
  for seed, name in order:
    path = runs / f'{name}_seed{seed}.json'
    if path.exists():
      print(f'{path} exists; skipped')
      continue
    print(f'{LABELS[name]}, seed {seed}: {args.epochs} epochs at {config.image_size}x'
          f'{config.image_size}', flush=True)
    result = run_one(name, seed, config, torch, data, args.epochs)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(result) + '\n')
    os.replace(tmp, path)
  return 0


# ----------------------------------------------------------------------------- summary


def load_runs(out: Path) -> dict[str, list[dict]]:
  groups = {name: [] for name in FRAMEWORKS}
  for path in sorted((out / 'runs').glob('*.json')):
    r = json.loads(path.read_text())
    groups[r['name']].append(r)
  return {k: sorted(v, key=lambda r: r['seed']) for k, v in groups.items() if v}


def table(groups) -> str:
  epochs = max(len(r['epochs']) for runs in groups.values() for r in runs)
  head = ('| run | seed | ' + ' | '.join(f'test acc ep {e}' for e in range(1, epochs + 1)) +
          f' | train loss ep {epochs} |')
  lines = [head, '|' + '---|' * (epochs + 3)]
  for name, runs in groups.items():
    for r in runs:
      accs = [f"{e['test_acc']:.3f}" for e in r['epochs']] + ['-'] * (epochs - len(r['epochs']))
      loss = f"{r['epochs'][-1]['train_loss']:.3f}" if len(r['epochs']) == epochs else '-'
      lines.append(f"| {LABELS[name]} | {r['seed']} | " + ' | '.join(accs) + f' | {loss} |')
    full = [r for r in runs if len(r['epochs']) == epochs]
    if len(full) > 1:
      cells = []
      for e in range(epochs):
        v = [r['epochs'][e]['test_acc'] for r in full]
        cells.append(f'{min(v):.3f}-{max(v):.3f}')
      v = [r['epochs'][-1]['train_loss'] for r in full]
      lines.append(f'| **{LABELS[name]}, range** | {len(full)} seeds | ' + ' | '.join(cells) +
                   f' | {min(v):.3f}-{max(v):.3f} |')
  return '\n'.join(lines)


def plot(groups, path: Path, window: int) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
  for name, runs in groups.items():
    color = COLORS[name]
    # Training loss, mean over `window` steps, band = min..max over seeds.
    curves = []
    for r in runs:
      loss = np.asarray(r['train_loss'])
      k = len(loss) // window
      curves.append(loss[:k * window].reshape(k, window).mean(1))
    m = min(len(c) for c in curves)
    c = np.stack([x[:m] for x in curves])
    spe = runs[0]['steps_per_epoch']
    x = (np.arange(m) + 0.5) * window / spe
    ax1.fill_between(x, c.min(0), c.max(0), color=color, alpha=0.25, lw=0)
    for row in c:
      ax1.plot(x, row, color=color, lw=0.6, alpha=0.6)
    ax1.plot([], [], color=color, lw=6, alpha=0.4, label=f'{LABELS[name]} ({len(runs)} seeds)')
    # Test accuracy per epoch.
    e = min(len(r['epochs']) for r in runs)
    acc = np.asarray([[r['epochs'][i]['test_acc'] for i in range(e)] for r in runs])
    ep = np.arange(1, e + 1)
    ax2.fill_between(ep, acc.min(0), acc.max(0), color=color, alpha=0.25, lw=0)
    for row in acc:
      ax2.plot(ep, row, 'o-', color=color, lw=0.8, ms=3, alpha=0.8)
    ax2.plot([], [], color=color, lw=6, alpha=0.4, label=LABELS[name])
  r0 = next(iter(groups.values()))[0]
  ax1.set_xlabel('epoch')
  ax1.set_ylabel(f'training loss (mean of {window} steps)')
  ax1.set_title(f"training loss, min-max band over seeds ({r0['image_size']}x{r0['image_size']},"
                f" SGD lr {r0['learning_rate']}, batch {r0['batch_size']})", fontsize=9)
  ax1.legend(fontsize=8)
  ax2.set_xlabel('epoch')
  ax2.set_ylabel('test accuracy')
  ax2.set_xticks(range(1, max(len(r['epochs']) for rs in groups.values() for r in rs) + 1))
  ax2.set_title('test accuracy after each epoch, min-max band over seeds', fontsize=9)
  ax2.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarize(args) -> int:
  out = Path(args.out)
  groups = load_runs(out)
  if not groups:
    print(f'error: no runs in {out / "runs"}; train first (without --summarize)',
          file=sys.stderr)
    return 2
  text = table(groups)
  print(text)
  (out / 'seeds.md').write_text(text + '\n')
  summary = {name: [{'seed': r['seed'], 'epochs': r['epochs'],
                     'wall_seconds': r['wall_seconds']} for r in runs]
             for name, runs in groups.items()}
  (out / 'seeds_summary.json').write_text(json.dumps(summary, indent=1) + '\n')
  plot(groups, Path(args.plot) if args.plot else out / 'fidelity_seeds.png', args.window)
  print(f"wrote {out / 'seeds.md'}, {out / 'seeds_summary.json'} and "
        f"{args.plot or out / 'fidelity_seeds.png'}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=str(fidelity.REPO / 'configs' / 'fashion_mnist.py'))
  parser.add_argument('--image_size', type=int, default=28)
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--frameworks', nargs='+', default=list(FRAMEWORKS), choices=FRAMEWORKS)
  parser.add_argument('--out', default='runs/fidelity_seeds')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--train_examples', type=int, default=None)
  parser.add_argument('--eval_examples', type=int, default=None)
  parser.add_argument('--summarize', action='store_true',
                      help='print the table and draw the plot from the runs in --out')
  parser.add_argument('--plot', default=None, help='where the band plot goes (with --summarize)')
  parser.add_argument('--window', type=int, default=26, help='steps per point of the loss curve')
  args, args.overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  try:
    return summarize(args) if args.summarize else train_all(args)
  except fidelity.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
