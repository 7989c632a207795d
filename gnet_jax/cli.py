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

  ml_collections reports a config file that does not load (a syntax error, no
  ``get_config``) and an unknown ``--config.KEY`` alike, as whatever Python
  raised, some of it only when the config is first used; ``config_mistake``
  finds which it was.
  """
  try:
    rest = flag_values(argv)
  except (AttributeError, KeyError, OSError, SyntaxError, ImportError) as e:
    raise ConfigError(config_mistake(argv, e)) from None
  except flags.Error as e:
    if '--config.' not in str(e):
      raise
    raise ConfigError(f'{e}; {CONFIG_HINT}') from None
  if 'config' in flag_values and flag_values['config'].value is not None:
    try:
      flag_values.config.keys()  # raises the deferred load error, if any
    except (AttributeError, KeyError, OSError) as e:  # OSError: the file, loaded lazily
      raise ConfigError(config_mistake(argv, e)) from None
  return rest


def config_mistake(argv: list[str], error: BaseException,
                   default_file: str | None = None) -> str:
  """The message for a config that failed to parse: the file's own problem, else unknown keys.

  ``default_file``: the config file loaded when ``argv`` names none.
  """
  import difflib

  config, problem = load_config_file(_config_argument(argv) or default_file)
  if problem:
    return problem
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
  unknown = [key for key in overrides if key.split('.')[0] not in (config or ())]
  if config is None or not unknown:  # not a key we can name: pass on what ml_collections said
    return f'bad --config override ({" ".join(str(error).split())}); {CONFIG_HINT}'
  named = []
  for key in unknown:
    close = difflib.get_close_matches(key, list(config), n=1)
    named.append(f'--config.{key}' + (f' (did you mean {close[0]}?)' if close else ''))
  return f'unknown config key {", ".join(named)}; {CONFIG_HINT}'


def _config_argument(argv: list[str]) -> str | None:
  """The value given to ``--config`` (``--config X`` or ``--config=X``), if any."""
  for i, arg in enumerate(argv):
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
  return None


def load_config_file(given: str | None) -> tuple[Any, str | None]:
  """``(config, None)`` from a ``--config`` value, or ``(None, what is wrong with the file)``.

  Loads the file as ml_collections does (``path[:argument]``, ``get_config``
  called with the argument) but on its own, so that a file's own mistake is
  not reported as an override's. ``(None, None)`` for no file.
  """
  import importlib.util
  import ml_collections

  if given is None:
    return None, None
  path, *argument = given.split(':', 1)
  prefix = f'cannot load the config file {path}'
  fix = 'pass --config configs/<name>.py'
  if not os.path.isfile(path):
    return None, f'{prefix}: no such file ({fix})'
  try:
    spec = importlib.util.spec_from_file_location('gnet_jax_config_check', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except (SyntaxError, ImportError) as e:
    where = f' at line {e.lineno}' if isinstance(e, SyntaxError) and e.lineno else ''
    return None, f'{prefix}: {type(e).__name__}: {e.msg if where else e}{where} ({fix})'
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    return None, (f'{prefix}: it defines no get_config() function; a config file returns its '
                  'settings from get_config(), as configs/mnist.py does')
  config = get_config(*argument)
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    return None, (f'{prefix}: get_config() returned {type(config).__name__}, not an '
                  'ml_collections.ConfigDict (start from configs/default.get_config())')
  return config, None


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
