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


def attribute_chain(node: ast.AST) -> list[str]:
  """``jax.lax.conv`` -> ['jax', 'lax', 'conv']; [] for anything but a dotted name."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []


def test_models_holds_modules_only():
  """models.py: Flax modules, shape tables and ``summary``; kernels and gradients are ops'."""
  import flax.linen as nn
  from gnet_jax import models

  path = PACKAGE / 'models.py'
  tree = ast.parse(path.read_text())
  classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
  assert 'GoogLeNet' in classes
  assert all(issubclass(getattr(models, name), nn.Module) for name in classes), classes
  assert [n.name for n in tree.body if isinstance(n, ast.FunctionDef)] == ['summary']
  names = [attribute_chain(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
  names += [[n.id] for n in ast.walk(tree) if isinstance(n, ast.Name)]
  custom_rules = {'.'.join(c) for c in names if any(p.startswith('custom_') for p in c)}
  raw_ops = {'.'.join(c) for c in names if 'lax' in c}
  assert not custom_rules and not raw_ops, custom_rules | raw_ops
  modules = {p.stem for p in PACKAGE.glob('*.py')} - {'__init__'}
  assert imports_of(path, modules) == {'ops'}
  assert len(path.read_text().splitlines()) <= 210
