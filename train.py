"""Train GoogLeNet: ``python train.py --config configs/quickstart.py [--workdir DIR] [--config.KEY=VALUE]``.

This file only parses flags; the work is in ``gnet_jax.train``.
"""

import sys
import warnings
from pathlib import Path

# ml_collections' config loader uses a deprecated importlib call on Python >= 3.11.
warnings.filterwarnings('ignore', message='.*load_module.*', category=DeprecationWarning)

# Per-platform XLA defaults (docs/performance.md) must be in XLA_FLAGS before JAX
# starts; GNET_JAX_XLA_DEFAULTS=0 opts out. Standard library only: JAX is not imported.
from gnet_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gnet_jax import cli  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where metrics, plots and checkpoints go '
                    '(default: runs/<config name>).')
flags.DEFINE_bool('summary', False, 'Print each stage\'s output shape, parameters and FLOPs, '
                  'then exit.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config_path = config_flags.get_config_filename(FLAGS['config'])
  workdir = FLAGS.workdir or str(Path('runs') / Path(config_path).stem)
  sys.exit(cli.run_command(cli.train, FLAGS.config, workdir, summary=FLAGS.summary))


if __name__ == '__main__':
  cli.collect_garbage_less_often()
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli.parse_flags)
