"""Command-line glue shared by ``train.py`` and the ``python -m gnet_jax.*`` commands.

Bad input (``gnet_jax.errors.InputError``) becomes one ``error: ...`` line and
exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable

from absl import flags

from gnet_jax.errors import ConfigError, InputError

CONFIG_HINT = ('config keys are listed in configs/default.py and the README; '
               'override one with --config.KEY=VALUE')


def quiet_logs() -> None:
  """Hides routine absl/orbax log lines and ml_collections' deprecation warning."""
  from absl import logging as absl_logging
  warnings.filterwarnings('ignore', message='.*load_module.*', category=DeprecationWarning)
  absl_logging.set_verbosity(absl_logging.ERROR)


def parse_config_flags(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
  """absl flag parsing; config mistakes raise ``ConfigError`` before any work starts.

  ml_collections reports an unknown ``--config.KEY`` as a bare AttributeError
  and a config file that fails to load only when the config is first used;
  both are turned into a clear message here.
  """
  from ml_collections import config_flags

  try:
    rest = flag_values(argv)
  except (AttributeError, KeyError) as e:
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    raise ConfigError(f'unknown config key in {" ".join(bad) or "the overrides"} ({e}); '
                      f'{CONFIG_HINT}') from None
  except flags.Error as e:
    if '--config.' not in str(e):
      raise
    raise ConfigError(f'{e}; {CONFIG_HINT}') from None
  if 'config' in flag_values and flag_values['config'].value is not None:
    try:
      flag_values.config.keys()  # raises the deferred load error, if any
    except (AttributeError, KeyError) as e:  # an override of an unknown key, applied lazily
      raise ConfigError(f'unknown config key {str(e).strip(chr(34) + chr(39))}; '
                        f'{CONFIG_HINT}') from None
    except (OSError, ImportError, SyntaxError) as e:
      path = config_flags.get_config_filename(flag_values['config'])
      reason = 'no such file' if not os.path.isfile(path) else ' '.join(str(e).split())
      raise ConfigError(f'cannot load the config file {path}: {reason} '
                        '(pass --config configs/<name>.py)') from None
  return rest


def parse_flags(argv: list[str]) -> list[str]:
  """``train.py``'s flag parser for ``absl.app.run``: config mistakes exit with status 2."""
  try:
    return parse_config_flags(argv, flags.FLAGS)
  except ConfigError as e:
    fail(str(e))
  except flags.Error as e:
    fail(str(e))


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def add_checkpoint_flags(parser, use: str) -> None:
  """``--workdir`` and ``--step``, as every command on a trained run takes them."""
  parser.add_argument('--workdir', required=True, help="the training run's --workdir")
  parser.add_argument('--step', type=int, default=None,
                      help=f'checkpoint step to {use} (default: the newest readable one)')


def run_command(fn: Callable[..., int], *args: Any, **kwargs: Any) -> int:
  """Runs a command; ``InputError`` -> ``error:`` line and 2, ``Interrupted`` -> its exit code.

  Output piped into a program that stops reading (``| head``) ends quietly.
  """
  from gnet_jax import preemption

  try:
    return fn(*args, **kwargs)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 1
  except preemption.Interrupted as e:  # a checkpoint was saved; the message says how to resume
    print(e, file=sys.stderr)
    return e.exit_code
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


def train(config, workdir: str, summary: bool = False) -> int:
  """``train.py``'s work: the shape table, or a training run."""
  from gnet_jax import config as config_lib, input_pipeline, models, parallel, state, train as tr

  config_lib.validate(config)
  if summary:
    spec = (input_pipeline.dataset_spec(config.dataset) if config.dataset in input_pipeline.SPECS
            else tr.load_data(config, train_examples=0).spec)  # classes from the data itself
    size = config.image_size
    print(models.summary(state.create_model(config, spec), (size, size, spec.image_shape[-1])))
    return 0
  parallel.maybe_initialize_distributed(config)
  tr.train_and_evaluate(config, workdir)
  return 0
