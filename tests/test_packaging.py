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
  assert f'## [{rmsprop_jax.__version__}]' in (
      ROOT / 'CHANGELOG.md').read_text()


def test_the_tree_passes_its_lint():
  """ruff, configured in pyproject.toml (pyflakes, bugbear, pycodestyle
  errors, import order), over the package, tests, examples and benchmarks."""
  import subprocess
  import sys

  from conftest import require
  require('ruff')
  result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '.'],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stdout[-3000:]
