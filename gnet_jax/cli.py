"""Command-line glue shared by ``train.py`` and the ``python -m gnet_jax.*`` commands.

Bad input (``gnet_jax.errors.InputError``) becomes one ``error: ...`` line and
exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
from typing import Any, Callable

from absl import flags

from gnet_jax.errors import ConfigError, InputError

CONFIG_HINT = ('config keys are listed in configs/default.py and the README; '
               'override one with --config.KEY=VALUE')


# CPython's default, (700, 10, 10), may run a full collection every 70,000 net allocations.
# Tracing and lowering GoogLeNet allocates millions of short-lived objects and frees nearly
# all of them by reference count, so those passes find little while walking every live object
# (all of jax's): 10-20% of the trace and lowering time on this project's 2-core VM.
GC_THRESHOLDS = (10_000, 10, 10)


def collect_garbage_less_often() -> None:
  """``gc.set_threshold(*GC_THRESHOLDS)`` for a command's process: cycles are still
  collected, 14x less often. Commands call it first thing; the library never does."""
  gc.set_threshold(*GC_THRESHOLDS)


def quiet_logs() -> None:
  """Hides routine absl/orbax log lines and ml_collections' deprecation warning."""
  from absl import logging as absl_logging
  warnings.filterwarnings('ignore', message='.*load_module.*', category=DeprecationWarning)
  absl_logging.set_verbosity(absl_logging.ERROR)


def parse_config_flags(argv: list[str], flag_values: flags.FlagValues,
                       default_file: str | None = None) -> list[str]:
  """absl flag parsing; config mistakes raise ``ConfigError`` before any work starts.

  ml_collections reports a config file that does not load (a syntax error, no
  ``get_config``, an exception inside it) and an unknown ``--config.KEY``
  alike, as whatever Python raised, some of it only when the config is first
  used; ``config_mistake`` finds which it was. ``default_file``: the config
  file the flag loads when ``argv`` names none.
  """
  try:
    rest = flag_values(argv)
    if 'config' in flag_values and flag_values['config'].value is not None:
      flag_values.config.keys()  # raises the deferred load error, if any
  except Exception as e:  # pylint: disable=broad-except  (whatever the config file raised)
    _, problem = load_config_file(_config_argument(argv) or default_file)
    if problem:
      raise ConfigError(problem) from None
    if isinstance(e, flags.Error):
      if '--config.' not in str(e):
        raise
      raise ConfigError(f'{e}; {CONFIG_HINT}') from None
    if isinstance(e, (AttributeError, KeyError, OSError)):  # an override's key
      raise ConfigError(config_mistake(argv, e, default_file)) from None
    raise
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

  Loads ``path[:argument]`` with ml_collections' own loader (the parser behind
  ``config_flags.DEFINE_config_file``), on its own, so that a file's own
  mistake is not reported as an override's. Anything the file raises (a syntax
  error, a failed import, a ``NameError`` or an unknown key inside
  ``get_config()``) is named with the line of the file it came from.
  ``(None, None)`` for no file.
  """
  import ml_collections
  # ConfigFileFlagParser is the public class behind DEFINE_config_file (the package's
  # __init__ exports only the DEFINE_* functions); its parse() is the path:argument loader.
  from ml_collections.config_flags import config_flags

  if given is None:
    return None, None
  path = given.split(':', 1)[0]
  prefix = f'cannot load the config file {path}'
  fix = 'pass --config configs/<name>.py'
  if not os.path.isfile(path):
    return None, f'{prefix}: no such file ({fix})'
  try:
    with warnings.catch_warnings():  # its importlib call is deprecated on Python >= 3.11
      warnings.simplefilter('ignore', DeprecationWarning)
      config = config_flags.ConfigFileFlagParser('gnet_jax_check', lock_config=False).parse(given)
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's file)
    return None, _file_error(path, e)
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    try:  # the loader's stand-in for a file it could not open raises its OSError when used
      getattr(config, 'keys', None)
    except OSError as e:
      return None, f'{prefix}: {" ".join(str(e.__cause__ or e).split())} ({fix})'
    return None, (f'{prefix}: get_config() returned {type(config).__name__}, not an '
                  'ml_collections.ConfigDict (start from configs/default.get_config())')
  return config, None


def _file_error(path: str, error: BaseException) -> str:
  """One line for an exception raised while loading config file ``path``: where and what."""
  # The loader re-raises a TypeError/ValueError as a new one holding the traceback as text;
  # the original is its __context__.
  if (isinstance(error, (TypeError, ValueError)) and error.__context__ is not None
      and str(error).startswith('Error whilst parsing config file')):
    error = error.__context__
  prefix = f'cannot load the config file {path}'
  if isinstance(error, AttributeError) and error.name == 'get_config' and not _line_in(
      path, error):
    return (f'{prefix}: it defines no get_config() function; a config file returns its '
            'settings from get_config(), as configs/mnist.py does')
  if isinstance(error, SyntaxError) and error.lineno and _same_file(error.filename, path):
    line, message = error.lineno, error.msg
  else:
    line, message = _line_in(path, error), str(error)
  key = _missing_key(error)
  if key is not None:
    message = f'config has no key {key!r} (configs/default.py lists every key)'
  where = f', line {line}' if line else ''
  return f'{prefix}{where}: {type(error).__name__}: {" ".join(message.split())}; fix the file'


def _line_in(path: str, error: BaseException) -> int | None:
  """The line of ``path`` that ``error`` went through last (the innermost such frame)."""
  import traceback

  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if _same_file(frame.filename, path)]
  return lines[-1] if lines else None


def _same_file(name: str | None, path: str) -> bool:
  return bool(name) and os.path.isfile(name) and os.path.samefile(name, path)


def _missing_key(error: BaseException) -> str | None:
  """The key of a ConfigDict's AttributeError for a key it lacks, else None.

  A ConfigDict raises ``AttributeError(KeyError(...))`` for both an unknown
  key read and a new key set while locked; its message lists every field, too
  long for one line, so only the key is named.
  """
  import re

  if not isinstance(error, AttributeError) or not error.args or not isinstance(
      error.args[0], KeyError):
    return None
  text = str(error.args[0].args[0]) if error.args[0].args else ''
  found = re.match(r'Key "(.+?)" does not exist', text)
  return found.group(1) if found else (error.name or text or None)


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
  from gnet_jax import config as config_lib

  config_lib.validate(config)  # before JAX is imported: a mistake is named at once
  from gnet_jax import input_pipeline, models, parallel, state, train as tr

  if summary:
    spec = (input_pipeline.dataset_spec(config.dataset) if config.dataset in input_pipeline.SPECS
            else tr.load_data(config, train_examples=0).spec)  # classes from the data itself
    size = config.image_size
    print(models.summary(state.create_model(config, spec), (size, size, spec.image_shape[-1])))
    return 0
  parallel.maybe_initialize_distributed(config)
  tr.train_and_evaluate(config, workdir)
  return 0
