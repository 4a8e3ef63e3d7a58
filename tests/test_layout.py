"""The package's architecture: the library a JAX project imports, the trainer apart, no import cycles.

`densenet_jax` (models, kernel sets, weights) imports neither TensorFlow nor ml_collections and nothing
of `densenet_jax.train` (the trainer behind train.py); no module imports itself back through others;
no module is longer than 400 lines.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGE = REPO / 'densenet_jax'
MAX_LINES = 400


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob('*.py'))}
LIBRARY = sorted(name for name in MODULES if not name.startswith('densenet_jax.train'))


def imported_modules(name: str) -> set[str]:
  """The densenet_jax modules `name` imports anywhere in its source (functions and TYPE_CHECKING too)."""
  path = MODULES[name]
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # from . import x / from .x import y
        anchor = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
        base = f'{anchor}.{base}' if base else anchor
      for alias in node.names:
        # `from P import m` imports the module P.m where there is one, else a name of P.
        found.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in MODULES else base)
  return {module for module in found if module in MODULES and module != name}


def test_no_import_cycles():
  graph = {name: imported_modules(name) for name in MODULES}
  done, on_path = set(), []

  def visit(name: str) -> None:
    if name in on_path:
      cycle = on_path[on_path.index(name) :] + [name]
      pytest.fail(f'import cycle: {" -> ".join(cycle)}')
    if name in done:
      return
    on_path.append(name)
    for imported in sorted(graph[name]):
      visit(imported)
    on_path.pop()
    done.add(name)

  for name in sorted(graph):
    visit(name)
  # The check sees the edges that matter: the loop imports the checkpoints, which import steps.
  assert 'densenet_jax.train.checkpoints' in graph['densenet_jax.train.loop']
  assert 'densenet_jax.train.steps' in graph['densenet_jax.train.checkpoints']


def test_the_library_imports_nothing_of_the_trainer():
  assert 'densenet_jax.train.loop' not in LIBRARY and 'densenet_jax.models' in LIBRARY
  for name in LIBRARY:
    trainer = sorted(m for m in imported_modules(name) if m.startswith('densenet_jax.train'))
    assert not trainer, f'{name} imports {trainer}'


def test_importing_the_library_pulls_in_neither_tensorflow_nor_ml_collections():
  """In a fresh interpreter: every library module imported, then what else was."""
  code = (
    'import importlib, sys\n'
    f'for name in {LIBRARY!r}:\n'
    '  importlib.import_module(name)\n'
    "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'ml_collections', 'torch')"
    ' if m in sys.modules))\n'
  )
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == '[]'


@pytest.mark.parametrize('name', sorted(MODULES))
def test_no_module_is_longer_than_400_lines(name):
  lines = len(MODULES[name].read_text().splitlines())
  assert lines <= MAX_LINES, f'{MODULES[name].relative_to(REPO)} has {lines} lines: split it by concern'
