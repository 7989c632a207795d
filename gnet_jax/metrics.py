"""Per-epoch reporting: the printed line, ``metrics.jsonl``, ``curves.png`` and the progress bar."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import tqdm


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


def write_jsonl(path: str | os.PathLike, history: list[dict]) -> None:
  """Rewrites ``metrics.jsonl``: one JSON object per finished epoch."""
  text = ''.join(json.dumps(m, sort_keys=True) + '\n' for m in history)
  _atomic_write(Path(path), lambda p: p.write_text(text))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
  """Train loss, train acc and test acc against epoch, like the d2l live plot."""
  import matplotlib
  import matplotlib.ticker
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  epochs = [m['epoch'] for m in history]
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
  for key, label, style in (('train_loss', 'train loss', '-'), ('train_acc', 'train acc', '--'),
                            ('test_acc', 'test acc', '-.')):
    ax.plot(epochs, [m[key] for m in history], style, marker='o', markersize=3, label=label)
  ax.set_xlabel('epoch')
  ax.set_xlim(0.5, max(epochs) + 0.5)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _atomic_write(Path(path), lambda p: fig.savefig(p, format='png'))
  plt.close(fig)


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm.tqdm:
  """A tqdm bar on stderr; off when disabled or when stderr is not a terminal."""
  return tqdm.tqdm(total=total, desc=desc, leave=False, unit='step',
                   disable=not enabled or not sys.stderr.isatty())
