"""The package's shape: no import circle among gnet_jax's modules, models.py holds modules only."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'gnet_jax'


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
  """gnet_jax modules that ``path`` imports, at top level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == 'gnet_jax':
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('gnet_jax.'):
      found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('gnet_jax.')}
  return (found & modules) - {path.stem}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 'open':
        return stack[stack.index(d):] + [d]
      if d not in state and (circle := visit(d)):
        return circle
    state[m] = 'done'
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state and (circle := visit(m)):
      return circle
  return None


def test_find_circle_finds_one():
  assert find_circle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_circle({'a': {'b'}, 'b': set()}) is None


def test_no_import_circle_in_gnet_jax():
  modules = {p.stem for p in PACKAGE.glob('*.py')} - {'__init__'}
  graph = {m: imports_of(PACKAGE / f'{m}.py', modules) for m in modules}
  assert 'checkpoint' in graph and 'train' not in graph['checkpoint']
  assert find_circle(graph) is None, ' -> '.join(find_circle(graph))


def test_models_holds_modules_only():
  text = (PACKAGE / 'models.py').read_text()
  assert 'custom_vjp' not in text
  assert len(text.splitlines()) <= 210
