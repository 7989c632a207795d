"""Command-line glue shared by ``train.py``: clear errors instead of tracebacks."""

from __future__ import annotations

import sys

import ml_collections
from absl import flags

from gnet_jax.input_pipeline import DatasetError


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config mistakes (unknown key, wrong type) as one clear line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if 'config' in message and ('has no attribute' in message or 'Could not override' in message
                                or 'not found' in message or 'type' in message.lower()):
      message += ('\n(config keys are listed in configs/default.py and the README; '
                  'override one with --config.KEY=VALUE)')
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


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
