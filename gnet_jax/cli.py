"""Command-line glue shared by ``train.py``: clear errors instead of tracebacks."""

from __future__ import annotations

import sys

import ml_collections
from absl import flags

from gnet_jax.input_pipeline import DatasetError


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config mistakes as one clear line and exit status 2.

  ml_collections reports an unknown ``--config.KEY`` as a bare AttributeError
  and a config file that fails to load only when the config is first used;
  both are caught here, before any work starts.
  """
  hint = ('config keys are listed in configs/default.py and the README; '
          'override one with --config.KEY=VALUE')
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    _fail(f'unknown config key in {" ".join(bad) or "the overrides"} ({e}); {hint}')
  except flags.Error as e:
    _fail(f'{e}; {hint}' if '--config.' in str(e) else str(e))
  if 'config' in flags.FLAGS:
    try:
      flags.FLAGS.config.keys()  # raises the deferred load error, if any
    except (OSError, ImportError, SyntaxError) as e:
      _fail(' '.join(str(e).split()) + ' (pass --config configs/<name>.py)')
  return rest


def run(config: ml_collections.ConfigDict, workdir: str, summary: bool = False) -> int:
  """Runs the command; a known kind of bad input is an ``error:`` line and exit status 2."""
  from gnet_jax import checkpoint, models, parallel, train  # imported late: keeps --help fast

  try:
    if summary:
      size = config.image_size
      print(models.summary(train.make_model(config), (size, size, 1)))
      return 0
    parallel.maybe_initialize_distributed(config)
    train.train_and_evaluate(config, workdir)
    return 0
  except train.Interrupted as e:  # a checkpoint was saved; the message says how to resume
    print(e, file=sys.stderr)
    return e.exit_code
  except (DatasetError, ValueError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
