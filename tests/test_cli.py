"""train.py as a user runs it: clear errors. test_workdir.py runs it end to end (killed and
resumed), and test_notebook.py its ``--summary``."""

import pytest

from conftest import run_python


def run_train(*args, timeout=600):
  """Runs train.py as a user would: one CPU device (not the tests' 8 virtual ones)."""
  return run_python('train.py', *args, timeout=timeout)


@pytest.mark.parametrize('args, expected', [
    (['--config.not_a_key=1'], 'unknown config key --config.not_a_key'),
    (['--config.batch_size=abc'], "--config.batch_size=abc: invalid literal"),
    (['--config.data_source=idx', '--config.data_dir=/nonexistent/fmnist'],
     'data_dir /nonexistent/fmnist does not exist'),
    (['--config.dataset=cifar'], "--config.dataset='cifar' is not allowed with data_source "
                                 "'auto'; use one of 'mnist', 'fashion_mnist', 'image_folder', "
                                 'or add --config.data_source=tfds'),
    (['--config.batch_size=0'], '--config.batch_size=0 is not allowed; batch_size must be an '
                                'integer >= 1'),
    (['--config.num_epochs=-1'], 'num_epochs must be an integer >= 1'),
])
def test_bad_input_is_one_clear_error(args, expected, tmp_path):
  result = run_train('--config', 'configs/quickstart.py', '--workdir', str(tmp_path), *args)
  assert result.returncode == 2
  assert expected in result.stderr
  assert 'Traceback' not in result.stderr
  assert result.stderr.startswith('error: ')
  assert not any(tmp_path.iterdir())  # nothing written to the workdir


@pytest.mark.parametrize('source, overrides, expected', [
    ('def get_config(:\n', [], 'bad.py, line 1: SyntaxError: invalid syntax'),
    ('import no_such_module\n', ['--config.batch_size=8'],
     "bad.py, line 1: ModuleNotFoundError: No module named 'no_such_module'"),
    ('x = 1\n', ['--config.batch_size=8'], 'bad.py: it defines no get_config() function'),
    ('def get_config():\n  return 8\n', [],
     'bad.py: get_config() returned int, not an ml_collections.ConfigDict'),
    (None, ['--config.batch_size=8'], 'bad.py: no such file'),
    ('from configs.quickstart import get_config\n', ['--config.batch_sz=8', '--config.lr=1'],
     'unknown config key --config.batch_sz (did you mean batch_size?), --config.lr;'),
    # get_config() itself fails: the file, the line in it and the exception, no traceback.
    ('def get_config():\n  return undefined_name\n', [],
     "bad.py, line 2: NameError: name 'undefined_name' is not defined"),
    ('from configs import default\ndef get_config():\n  config = default.get_config()\n'
     '  config.lock()\n  config.not_a_key = 1\n  return config\n', ['--config.batch_size=8'],
     "bad.py, line 5: AttributeError: config has no key 'not_a_key'"),
    ('from configs import default\ndef get_config():\n  config = default.get_config()\n'
     '  config.batch_size = config.bogus\n  return config\n', [],
     "bad.py, line 4: AttributeError: config has no key 'bogus'"),
    ('def get_config():\n  raise ValueError("no such recipe")\n', [],
     'bad.py, line 2: ValueError: no such recipe'),
    ('x = 1\ny = x.missing\n', [], "bad.py, line 2: AttributeError: 'int' object has no "
                                   "attribute 'missing'"),
])
def test_config_file_mistakes_are_named(tmp_path, source, overrides, expected):
  config_file = tmp_path / 'bad.py'
  if source is not None:
    config_file.write_text(source)
  result = run_train('--config', str(config_file), '--workdir', str(tmp_path / 'run'), *overrides)
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, result.stderr
  assert expected in result.stderr
  assert not (tmp_path / 'run').exists()


def test_config_file_argument_reaches_get_config(tmp_path):
  from gnet_jax import cli
  config_file = tmp_path / 'sized.py'
  config_file.write_text('from configs import default\ndef get_config(size):\n'
                         '  config = default.get_config()\n  config.image_size = int(size)\n'
                         '  return config\n')
  config, problem = cli.load_config_file(f'{config_file}:32')
  assert problem is None and config.image_size == 32
  config, problem = cli.load_config_file(str(config_file))  # no argument for get_config(size)
  assert config is None and problem.startswith(f'cannot load the config file {config_file}: '
                                               'TypeError: get_config() missing 1 required')


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'run').write_text('x')
  result = run_train('--config', 'configs/quickstart.py', '--workdir', str(tmp_path / 'run'))
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr.startswith(f'error: --workdir {tmp_path / "run"} is a file')


def test_missing_config_file():
  result = run_train('--config', 'configs/nope.py')
  assert result.returncode == 2
  assert 'configs/nope.py' in result.stderr and 'Traceback' not in result.stderr


def test_every_command_collects_garbage_less_often_before_its_work():
  """train.py, the python -m gnet_jax.* commands and the benchmark workers set the GC
  thresholds first thing in their __main__ block (tracing GoogLeNet is 10-20% faster)."""
  import ast
  import gc

  from conftest import REPO
  from gnet_jax import cli
  before = gc.get_threshold()
  try:
    gc.set_threshold(700, 10, 10)
    cli.collect_garbage_less_often()
    assert gc.get_threshold() == cli.GC_THRESHOLDS != (700, 10, 10)
  finally:
    gc.set_threshold(*before)
  commands = [REPO / 'train.py', REPO / 'benchmarks' / 'harness.py'] + [
      REPO / 'gnet_jax' / f'{name}.py' for name in ('evaluate', 'predict', 'interop', 'export')]
  for path in commands:
    main_block = next(node for node in ast.parse(path.read_text()).body
                      if isinstance(node, ast.If) and '__main__' in ast.unparse(node.test))
    calls = [ast.unparse(n.func) for n in ast.walk(main_block) if isinstance(n, ast.Call)]
    assert 'cli.collect_garbage_less_often' in calls, path
    first = calls.index('cli.collect_garbage_less_often')
    assert not any('run' in c or 'main' in c for c in calls[:first]), (path, calls)
