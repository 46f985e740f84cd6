"""What the package ships: one version, its type information, its licence."""

import importlib.metadata
import pathlib

import rmsprop_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_installed_version_is_the_one_written_in_the_package():
  assert importlib.metadata.version('rmsprop_jax') == rmsprop_jax.__version__


def test_type_information_and_licence_ship():
  assert (pathlib.Path(rmsprop_jax.__file__).parent / 'py.typed').exists()
  assert 'py.typed' in (ROOT / 'pyproject.toml').read_text()
  licence = (ROOT / 'LICENSE').read_text()
  assert 'Apache License' in licence and 'Version 2.0' in licence
  assert 'Apache-2.0' in (ROOT / 'pyproject.toml').read_text()


def test_the_changelog_has_this_version():
  """A release has its dated section; a development version (``.dev``)
  lists its changes under Unreleased."""
  import re

  changelog = (ROOT / 'CHANGELOG.md').read_text()
  version = rmsprop_jax.__version__
  if '.dev' in version:
    assert '## [Unreleased]' in changelog
  else:
    assert re.search(
      rf'^## \[{re.escape(version)}\] - \d{{4}}-\d\d-\d\d$', changelog, re.M
    )
  # Every release section is dated.
  for line in re.findall(r'^## \[(?!Unreleased).*$', changelog, re.M):
    assert re.search(r' - \d{4}-\d\d-\d\d$', line), line


def _run(*args: str, timeout: int = 300):
  import subprocess
  import sys

  return subprocess.run(
    [sys.executable, '-m', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_the_tree_passes_its_lint():
  """ruff, configured in pyproject.toml (pyflakes, bugbear, pycodestyle
  errors, import order), over the package, tests, examples and benchmarks."""
  from conftest import require

  require('ruff')
  result = _run('ruff', 'check', '.')
  assert result.returncode == 0, result.stdout[-3000:]


def test_the_tree_is_formatted():
  from conftest import require

  require('ruff')
  result = _run('ruff', 'format', '--check', '.')
  assert result.returncode == 0, result.stdout[-3000:]


def test_the_package_type_checks():
  """mypy, configured in pyproject.toml, over rmsprop_jax/."""
  from conftest import require

  require('mypy')
  result = _run('mypy', timeout=600)
  assert result.returncode == 0, result.stdout[-3000:]
  assert 'Success' in result.stdout


def test_every_examples_block_is_a_doctest():
  """pytest runs the package's doctests (--doctest-modules over
  rmsprop_jax/); a docstring's Example: or Examples: section (both render
  as examples) must hold one, or it would show code that nothing runs."""
  import doctest
  import importlib
  import pkgutil
  import re

  config = (ROOT / 'pyproject.toml').read_text()
  assert '--doctest-modules' in config and '"rmsprop_jax"' in config
  header = re.compile(r'^( *)Examples?[ \t]*::?[ \t]*$', re.M)
  finder = doctest.DocTestFinder()
  blocks = 0
  for info in pkgutil.iter_modules(rmsprop_jax.__path__, 'rmsprop_jax.'):
    module = importlib.import_module(info.name)
    for test in finder.find(module, module=module):
      for match in header.finditer(test.docstring or ''):
        blocks += 1
        # The section runs to the next line indented as little as its header.
        rest = test.docstring[match.end() :]
        end = re.search(rf'^ {{0,{len(match.group(1))}}}\S', rest, re.M)
        section = rest[: end.start() if end else None]
        assert '>>>' in section, f'{test.name}: an example that never runs'
        assert test.examples, test.name
  assert blocks >= 15
