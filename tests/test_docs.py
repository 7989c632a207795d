"""README.md and docs/*.md held to the code, so that a reader can act on what they say.

Checked: the README's config-key table (keys, defaults, allowed values)
against ``configs/default.py`` and ``config.RULES``; every ``python ...``
command printed in the docs (its script or module, its flags, its
``--config`` file and ``--config.KEY=VALUE`` overrides); the module map of
docs/architecture.md against the import graph of ``gnet_jax``; the
names, paths and key lists the docs point at; and the links between them. The docs are read as text and
the code as source (``ast``) or as light imports (the configs and their
rules): nothing here trains, compiles or starts a process.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import ml_collections
import pytest

from configs import default
from gnet_jax import config as config_lib
from gnet_jax.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / 'gnet_jax'
README = REPO / 'README.md'
DOCS = [README, *sorted((REPO / 'docs').glob('*.md'))]
MODULES = sorted(p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__')
# Top-level folders of the repository that the docs name paths in.
REPO_DIRS = ('.ci', 'benchmarks', 'configs', 'docs', 'gnet_jax', 'notebooks', 'tests')


def rel(path: Path) -> str:
  return str(path.relative_to(REPO))


# ----------------------------------------------------------------------------- markdown


def section(text: str, heading: str) -> str:
  """The text under ``heading`` (a whole line, e.g. ``'### Config keys'``) up to the next
  heading of the same or a higher level."""
  level = len(heading) - len(heading.lstrip('#'))
  lines = text.splitlines()
  assert heading in lines, f'heading {heading!r} not found'
  start = lines.index(heading) + 1
  end = start
  while end < len(lines):
    marks = len(lines[end]) - len(lines[end].lstrip('#'))
    if 0 < marks <= level and lines[end][marks:marks + 1] == ' ':
      break
    end += 1
  return '\n'.join(lines[start:end])


def table_rows(text: str) -> list[list[str]]:
  """The body rows of the first markdown table in ``text``, each a list of stripped cells."""
  rows = []
  for line in text.splitlines():
    if line.startswith('|'):
      rows.append([cell.strip() for cell in line.strip().strip('|').split('|')])
    elif rows:
      break
  assert len(rows) >= 2 and set(''.join(rows[1])) <= set('-: '), 'no markdown table found'
  return rows[2:]


def code_spans(text: str) -> list[str]:
  """Inline code (single backticks), whitespace normalised; spans may cross line breaks."""
  return [' '.join(span.split()) for span in re.findall(r'`([^`]+)`', text)]


FENCE = re.compile(r'^```([\w-]*)\n(.*?)^```', re.S | re.M)


def without_fences(text: str) -> str:
  return FENCE.sub('', text)


def paragraph_with(text: str, marker: str) -> str:
  """The paragraph (lines between blank lines) of ``text`` that contains ``marker``."""
  found = [p for p in re.split(r'\n\s*\n', text) if marker in p]
  assert len(found) == 1, f'{len(found)} paragraphs contain {marker!r}'
  return found[0]


# ----------------------------------------------------------------------------- the config


def default_config() -> ml_collections.ConfigDict:
  return default.get_config()


def load_config_file(path: Path) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f'doc_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def rule_choices(rule) -> set[str] | None:
  """The values a rule allows when it allows a fixed few, else None.

  Read from the rule itself, whatever its shape: a part with a ``choices``
  attribute (a check object, or the rule's own field), else an allowed-values
  text of the form "one of 'a', 'b'".
  """
  parts = [rule]
  if isinstance(rule, (tuple, list)):
    parts += list(rule)
  elif dataclasses.is_dataclass(rule):
    parts += [getattr(rule, f.name) for f in dataclasses.fields(rule)]
  elif hasattr(rule, '__dict__'):
    parts += list(vars(rule).values())
  for part in parts:
    found = getattr(part, 'choices', None)
    if found is not None and not callable(found):
      return set(found)
  for part in parts:
    if isinstance(part, str) and part.startswith('one of '):
      return set(re.findall(r"'([^']*)'", part))
  return None


def shown_value(token: str):
  """A default as the README shows it: `text` is a string (`''` the empty one), else a literal."""
  token = token.strip()
  if len(token) >= 2 and token[0] == token[-1] == '`':
    inner = token[1:-1]
    return '' if inner in ("''", '""') else inner
  try:
    return ast.literal_eval(token)
  except (ValueError, SyntaxError):
    return token


def readme_key_table() -> dict[str, tuple[object, str]]:
  """``{key: (default as shown, meaning)}`` from the README's config-key table."""
  table = {}
  for row in table_rows(section(README.read_text(), '### Config keys')):
    assert len(row) == 3, row
    key_cell, default_cell, meaning = row
    keys = code_spans(key_cell)
    defaults = [d for d in re.split(r',\s*', default_cell) if d]
    if len(defaults) == 1:
      defaults *= len(keys)
    assert keys and len(defaults) == len(keys), f'row {row}: one default per key, or one for all'
    for key, shown in zip(keys, defaults):
      assert key not in table, f'{key} has two rows'
      table[key] = (shown_value(shown), meaning)
  return table


def test_readme_key_table_lists_every_key_and_no_other():
  table, config = readme_key_table(), default_config()
  assert set(config.keys()) == set(config_lib.RULES), 'configs/default.py and RULES disagree'
  assert not set(config.keys()) - set(table), 'keys missing from the README table'
  assert not set(table) - set(config.keys()), 'README table rows for keys that do not exist'


def test_readme_key_table_shows_each_default():
  config = default_config()
  for key, (shown, _) in readme_key_table().items():
    expected = config[key]
    assert type(shown) is type(expected) and shown == expected, (
        f'README shows {key} = {shown!r}; configs/default.py says {expected!r}')


def test_readme_key_table_lists_the_allowed_values_of_each_choice():
  """Where a rule allows a fixed few values, the README's meaning names exactly those.

  The values it names are the meaning's code spans that are bare words and not
  config keys (e.g. `data_dir` in data_source's row is a key, not a choice).
  """
  keys, checked = set(default_config().keys()), 0
  for key, (_, meaning) in readme_key_table().items():
    allowed = rule_choices(config_lib.RULES[key])
    if allowed is None:
      continue
    named = {s for s in code_spans(meaning) if re.fullmatch(r'\w+', s)} - keys
    assert named == allowed, f'README names {sorted(named)} for {key}; the rule allows {sorted(allowed)}'
    checked += 1
  assert checked >= 5  # dataset, data_source, dtype, optimizer, parallelism, kernels, bias_init


def test_rule_choices_reads_each_shape_of_rule():
  class Check:
    choices = ('a', 'b')

    def __call__(self, value):
      return value in self.choices

  assert rule_choices((str, Check(), 'one of ...')) == {'a', 'b'}
  assert rule_choices((str, lambda v: True, "one of 'x', 'y'")) == {'x', 'y'}
  assert rule_choices((int, lambda v: True, 'an integer >= 0')) is None


# ----------------------------------------------------------------------------- commands


@dataclasses.dataclass
class Command:
  where: str  # the doc file
  argv: list[str]  # from the token after ``python``: ``['-m', 'gnet_jax.evaluate', ...]``

  def __str__(self):
    return f'{self.where}: python {" ".join(self.argv)}'


def lex(line: str) -> list[str]:
  lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def python_commands(shell: str, where: str) -> list[Command]:
  """Every ``python`` invocation in a piece of shell, quoted ones (``--command "..."``) too."""
  found = []
  for line in shell.replace('\\\n', ' ').splitlines():
    if not re.search(r'\bpython', line):
      continue
    tokens = lex(line)
    for i, token in enumerate(tokens):
      if ' ' in token:
        found += python_commands(token, where)
      elif re.fullmatch(r'(.*/)?python(3(\.\d+)?)?', token):
        argv = []
        for arg in tokens[i + 1:]:
          if set(arg) <= set(';&|()'):
            break
          argv.append(arg)
        found.append(Command(where, argv))
  return found


def printed_commands() -> list[Command]:
  """The ``python ...`` commands of the README and docs/: code blocks and inline code."""
  commands = []
  for doc in DOCS:
    text = doc.read_text()
    for match in FENCE.finditer(text):
      if match.group(1) not in ('python', 'py'):  # shell blocks; untagged ones hold commands too
        commands += python_commands(match.group(2), rel(doc))
    for span in code_spans(without_fences(text)):
      if re.match(r'(\S*/)?python3?\s', span):
        commands += python_commands(span, rel(doc))
  return commands


@dataclasses.dataclass
class Flags:
  """What a script's command line accepts, read from its source."""
  options: set[str]  # '--workdir', '-h', ...
  config_flags: set[str]  # flags that take a config file and --FLAG.KEY=VALUE overrides


def _call_name(node: ast.Call) -> str:
  func = node.func
  return func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', '')


def _first_string(node: ast.Call) -> str | None:
  if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
    return node.args[0].value
  return None


def _flags_in(tree: ast.AST) -> Flags:
  flags = Flags({'-h', '--help'}, set())
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    name = _call_name(node)
    if name == 'add_argument':
      flags.options |= {a.value for a in node.args
                        if isinstance(a, ast.Constant) and str(a.value).startswith('-')}
    elif name.startswith('DEFINE_') and (flag := _first_string(node)):
      flags.options.add(f'--{flag}')
      if name in ('DEFINE_bool', 'DEFINE_boolean'):
        flags.options.add(f'--no{flag}')
      if name.startswith('DEFINE_config_'):
        flags.config_flags.add(flag)
  return flags


def cli_helper_flags() -> dict[str, Flags]:
  """Flags that each function of ``gnet_jax/cli.py`` adds to the parser it is given."""
  tree = ast.parse((PACKAGE / 'cli.py').read_text())
  return {node.name: _flags_in(node) for node in tree.body if isinstance(node, ast.FunctionDef)}


def script_flags(path: Path) -> Flags:
  """The flags ``path`` defines (absl or argparse), with those its ``cli.*`` helpers add.

  An argparse script that defines ``--config`` and hands what it does not know
  on (``parse_known_args``) takes ``--config.KEY=VALUE`` overrides too
  (``benchmarks.fidelity``).
  """
  tree = ast.parse(path.read_text())
  flags = _flags_in(tree)
  helpers = cli_helper_flags()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
        isinstance(node.func.value, ast.Name) and node.func.value.id == 'cli' and
        node.func.attr in helpers):
      flags.options |= helpers[node.func.attr].options
  calls = {_call_name(n) for n in ast.walk(tree) if isinstance(n, ast.Call)}
  if '--config' in flags.options and 'parse_known_args' in calls:
    flags.config_flags.add('config')
  return flags


def override_value(value: str, current):
  """``--config.KEY=VALUE``'s value as the key's type, as ml_collections parses it."""
  if isinstance(current, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'{value!r} is not a bool')
    return value.lower() in ('true', '1')
  if isinstance(current, (int, float)):
    return type(current)(value)
  return value


# pytest options whose value is the next token (``-n 0``), not a test path.
PYTEST_VALUE_OPTIONS = {'-n', '-k', '-m', '-p', '-c', '-W', '--dist', '--maxfail', '--durations'}


def check_command(command: Command) -> list[str]:
  """What is wrong with one printed command (empty when it would parse)."""
  argv = command.argv
  if argv[:2] == ['-m', 'pytest']:
    args = argv[2:]
    paths = [arg for i, arg in enumerate(args) if not arg.startswith('-')
             and not (i and args[i - 1] in PYTEST_VALUE_OPTIONS)]
    return [f'{path.split("::")[0]} does not exist' for path in paths
            if not (REPO / path.split('::')[0]).exists()]
  if argv[:1] == ['-m']:
    module = argv[1] if len(argv) > 1 else ''
    if not module.startswith(('gnet_jax.', 'benchmarks.')):
      return []  # venv, pip, ...: not the project's
    path, args = REPO / f'{module.replace(".", "/")}.py', argv[2:]
  elif argv and argv[0].endswith('.py'):
    path, args = REPO / argv[0], argv[1:]
  else:
    return [f'neither a script nor -m MODULE: {argv[:1]}']
  if not path.is_file():
    return [f'{rel(path) if path.is_relative_to(REPO) else path} does not exist']
  flags, problems = script_flags(path), []
  config_files, overrides = {}, {}
  for i, arg in enumerate(args):
    if not arg.startswith('-'):  # a flag's value or a positional: .py files are read, so exist
      if arg.endswith('.py') and not (REPO / arg).exists():
        problems.append(f'{arg} does not exist')
      continue
    name, _, value = arg.partition('=')
    base, _, key = name.partition('.')
    if key and base[2:] in flags.config_flags:
      overrides[key] = value
    elif name not in flags.options:
      problems.append(f'{name} is not a flag of {rel(path)}')
    elif name[2:] in flags.config_flags:
      config_files[name[2:]] = value or (args[i + 1] if i + 1 < len(args) else '')
  if problems or not overrides:
    return problems
  file = config_files.get('config')
  config = load_config_file(REPO / file) if file else default_config()
  for key, value in overrides.items():
    if key not in config:
      problems.append(f'--config.{key}: no such config key')
    elif '$' not in value:  # a shell variable: its value is not printed
      try:
        config[key] = override_value(value, config[key])
      except ValueError as e:
        problems.append(f'--config.{key}={value}: {e}')
  if not problems:
    try:
      config_lib.validate(config)
    except ConfigError as e:
      problems.append(str(e))
  return problems


def test_the_docs_print_commands_of_every_kind():
  commands = printed_commands()
  heads = {c.argv[0] if c.argv[0] != '-m' else c.argv[1] for c in commands if c.argv}
  assert {'train.py', 'gnet_jax.evaluate', 'gnet_jax.predict', 'gnet_jax.interop', 'pytest',
          'benchmarks.throughput', 'benchmarks.fidelity'} <= heads, sorted(heads)
  assert len(commands) >= 40


def test_every_printed_python_command_parses():
  problems = [f'{command}\n    {p}' for command in printed_commands()
              for p in check_command(command)]
  assert not problems, 'commands in the docs that do not parse:\n' + '\n'.join(problems)


@pytest.mark.parametrize('line,expected', [
    ('python train.py --config configs/quickstart.py --config.num_epochs=3', []),
    ('python train.py --config configs/quickstart.py --epochs 3', ['--epochs is not a flag']),
    ('python train.py --config configs/nothere.py', ['configs/nothere.py does not exist']),
    ('python train.py --config configs/quickstart.py --config.epochs=3', ['no such config key']),
    ('python train.py --config configs/quickstart.py --config.kernels=fast', ['kernels must be']),
    ('python -m gnet_jax.evaluate --workdir runs/x --step 3', []),
    ('python -m gnet_jax.evaluate --workdir runs/x --steps 3', ['--steps is not a flag']),
    ('python -m gnet_jax.nothere --workdir runs/x', ['gnet_jax/nothere.py does not exist']),
    ('python -m benchmarks.throughput --sizes 28 --min-rounds 3', []),
    ('python -m benchmarks.throughput --size_list 28', ['--size_list is not a flag']),
    ('python -m benchmarks.fidelity --epochs 1 --config.image_size=28', []),
    ('python -m benchmarks.kernels_ab --against HEAD', ['benchmarks/kernels_ab.py does not exist']),
    ('python -m pytest tests/test_nothere.py', ['tests/test_nothere.py does not exist']),
    ('python -m pytest -q -n 0 -k resume tests/test_nothere.py', ['test_nothere.py does not exist']),
    ('python -m pytest -q -n 0 -k resume tests/test_docs.py', []),
])
def test_check_command_catches_what_a_reader_would_hit(line, expected):
  [command] = python_commands(line, 'example')
  problems = check_command(command)
  assert len(problems) == len(expected), problems
  for problem, part in zip(problems, expected):
    assert part in problem


def test_python_commands_finds_quoted_and_continued_commands():
  shell = ('for i in 0 1; do X=1 \\\n  python train.py --config configs/quickstart.py & done; wait\n'
           'gcloud ssh --command "cd gnet-jax && python train.py --config c.py"  # python notes')
  found = [c.argv for c in python_commands(shell, 'example')]
  assert found == [['train.py', '--config', 'configs/quickstart.py'],
                   ['train.py', '--config', 'c.py']]


# ----------------------------------------------------------------------------- module map


def imports_of(path: Path) -> set[str]:
  """The gnet_jax modules ``path`` imports, at top level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom):
      module = node.module or ''
      if module == 'gnet_jax' or (node.level == 1 and not module):
        found |= {a.name for a in node.names}
      elif module.startswith('gnet_jax.') or node.level == 1:
        found.add(module.split('.')[-1] if node.level else module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('gnet_jax.')}
  return (found & set(MODULES)) - {path.stem}


def module_map() -> list[tuple[str, set[str]]]:
  """``(module, imports from gnet_jax)`` per row of docs/architecture.md's module table."""
  text = section((REPO / 'docs' / 'architecture.md').read_text(), '## The modules')
  rows = []
  for row in table_rows(text):
    assert len(row) == 3, row
    names = [s[:-3] for s in code_spans(row[0]) if s.endswith('.py')]
    imports = {s for s in code_spans(row[2]) if s in MODULES}
    assert names and (imports or row[2] == 'nothing'), row
    rows += [(name, imports) for name in names]
  return rows


def test_module_map_has_one_row_per_module():
  documented = [name for name, _ in module_map()]
  assert len(documented) == len(set(documented)), 'a module has two rows'
  unlisted, extra = sorted(set(MODULES) - set(documented)), sorted(set(documented) - set(MODULES))
  assert not unlisted, f'modules without a row in docs/architecture.md: {unlisted}'
  assert not extra, f'rows in docs/architecture.md for modules that do not exist: {extra}'


def test_module_map_imports_are_the_import_graph():
  wrong = []
  for name, documented in module_map():
    actual = imports_of(PACKAGE / f'{name}.py')
    if documented != actual:
      wrong.append(f'{name}: not listed {sorted(actual - documented)}, '
                   f'listed but not imported {sorted(documented - actual)}')
  assert not wrong, 'docs/architecture.md\'s imports column:\n' + '\n'.join(wrong)


def test_module_map_lists_each_module_below_what_it_imports():
  seen = set()
  for name, imports in module_map():
    assert imports <= seen, f'{name} imports {sorted(imports - seen)}, listed below it'
    seen.add(name)


def test_modules_without_a_test_file_are_the_ones_the_docs_name():
  text = (REPO / 'docs' / 'architecture.md').read_text()
  named = {s for s in code_spans(paragraph_with(text, '`tests/test_<module>.py`'))
           if s in MODULES}
  missing = {m for m in MODULES if not (REPO / 'tests' / f'test_{m}.py').exists()}
  assert named == missing, (f'docs/architecture.md says {sorted(named)} have no test file; '
                            f'the modules without one are {sorted(missing)}')


def test_readme_project_layout_names_every_module():
  text = section(README.read_text(), '## Project layout')
  unnamed = sorted(set(MODULES) - set(code_spans(text)))
  assert not unnamed, f"the README's project layout does not name {unnamed}"


# ----------------------------------------------------------------------------- names and paths


def top_level_names(module: str) -> set[str]:
  names = set()
  for node in ast.parse((PACKAGE / f'{module}.py').read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, ast.Assign):
      names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names.add(node.target.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names |= {(a.asname or a.name).split('.')[0] for a in node.names}
  return names


FILE_SUFFIXES = {'py', 'json', 'jsonl', 'png', 'md', 'ipynb', 'txt', 'pt', 'sh'}


def test_module_attributes_named_in_the_docs_exist():
  """`ops.max_pool_3x3`, `gnet_jax.state.init_params(...)`: the module defines the name."""
  missing = []
  for doc in DOCS:
    for span in code_spans(without_fences(doc.read_text())):
      match = re.match(r'(?:gnet_jax\.)?(\w+)\.(\w+)', span)
      if not match or match.group(1) not in MODULES or match.group(2) in FILE_SUFFIXES:
        continue
      module, name = match.groups()
      if name not in top_level_names(module):
        missing.append(f'{rel(doc)}: `{span}` ({module}.py defines no {name})')
  assert not missing, '\n'.join(missing)


def heading_anchors(text: str) -> set[str]:
  """The anchors GitHub gives a markdown file's headings (code blocks left out)."""
  anchors = set()
  for line in without_fences(text).splitlines():
    match = re.match(r'#{1,6} (.+)', line)
    if match:
      words = re.sub(r'[^\w\- ]', '', match.group(1).strip().lower())
      anchors.add(words.replace(' ', '-'))
  return anchors


def test_heading_anchors_are_githubs():
  text = '# A: b, c\n## 2. Curves: 3 epochs at 28x28\n```\n# not a heading\n```\n### The book\'s `x.py`\n'
  assert heading_anchors(text) == {'a-b-c', '2-curves-3-epochs-at-28x28', 'the-books-xpy'}


def test_links_between_the_docs_reach_their_file_and_heading():
  """`[text](other.md#heading)`, `[text](#heading)`, `[text](img/x.png)`: the file exists and,
  for a markdown file, so does the heading (sections move between the README and docs/)."""
  broken = []
  for doc in DOCS:
    for target in re.findall(r'\]\(([^)\s]+)\)', without_fences(doc.read_text())):
      if re.match(r'[a-z]+:', target):
        continue  # https://...
      path, _, anchor = target.partition('#')
      file = (doc.parent / path).resolve() if path else doc
      if not file.exists():
        broken.append(f'{rel(doc)}: {target} (no such file)')
      elif anchor and file.suffix == '.md' and anchor not in heading_anchors(file.read_text()):
        broken.append(f'{rel(doc)}: {target} (no such heading)')
  assert not broken, 'links in the docs that lead nowhere:\n' + '\n'.join(broken)


def test_repository_paths_named_in_the_docs_exist():
  """Files and folders of the repository the docs name; a command's arguments are left to
  the command test (an ``--out`` folder is written by the command)."""
  pattern = re.compile(rf'(?<![\w/.])(?:{"|".join(map(re.escape, REPO_DIRS))})/[\w./<>-]*[\w/]')
  arguments = {arg for command in printed_commands() for arg in command.argv}
  missing = []
  for doc in DOCS:
    for path in set(pattern.findall(doc.read_text())) - arguments:
      if '<' not in path and not (REPO / path).exists():
        missing.append(f'{rel(doc)}: {path}')
  assert not missing, 'paths in the docs that do not exist:\n' + '\n'.join(sorted(missing))


def resumable_changes() -> set[str]:
  """``checkpoint.RESUMABLE_CHANGES``, read from the source (importing it starts orbax)."""
  for node in ast.parse((PACKAGE / 'checkpoint.py').read_text()).body:
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, ast.AnnAssign) else [])
    if any(isinstance(t, ast.Name) and t.id == 'RESUMABLE_CHANGES' for t in targets):
      value = node.value
      if isinstance(value, ast.Call) and value.args:  # frozenset({...})
        value = value.args[0]
      return set(ast.literal_eval(value))
  raise AssertionError('checkpoint.py defines no RESUMABLE_CHANGES')


def test_runs_doc_lists_every_key_that_may_change_on_resume():
  paragraph = paragraph_with((REPO / 'docs' / 'runs.md').read_text(),
                             '`checkpoint.RESUMABLE_CHANGES`')
  bullet = paragraph[paragraph.index('**Config changes**'):].split('\n- ')[0]
  keys = set(default_config().keys())
  listed, resumable = {s for s in code_spans(bullet) if s in keys}, resumable_changes()
  assert listed == resumable, (f'docs/runs.md lists {sorted(listed - resumable)} that may not '
                               f'change, omits {sorted(resumable - listed)} that may')
