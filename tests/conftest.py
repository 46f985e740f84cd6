"""Shared test helpers.

Comparisons against PyTorch and Keras skip when those are not installed,
except in CI (``CI=true``), where a missing peer is an error: CI must run
them.
"""

import functools
import importlib
import os

# Keras must pick its backend before it is first imported.
os.environ.setdefault('KERAS_BACKEND', 'jax')

import jax
import pytest


def require(module: str):
  """Imports ``module``; skips the test if absent, unless running in CI."""
  if os.environ.get('CI', '').lower() == 'true':
    return importlib.import_module(module)
  return pytest.importorskip(module)


@functools.cache
def timm_rmsprop_tf():
  """timm's ``RMSpropTF`` class, read from the installed timm without
  running timm's package ``__init__`` (which imports torchvision, whose
  build on the package index does not match the CPU torch used here).
  timm is installed with ``pip install --no-deps``."""
  import importlib.util
  import pathlib
  import sys
  import types

  require('torch')
  spec = importlib.util.find_spec('timm')
  if spec is None:
    if os.environ.get('CI', '').lower() == 'true':
      raise ImportError('timm is not installed: pip install --no-deps timm')
    pytest.skip('timm is not installed (pip install --no-deps timm)')
  root = pathlib.Path(spec.submodule_search_locations[0])
  # Empty parent packages, so that rmsprop_tf's relative imports resolve.
  for name, path in (('timm', root), ('timm.optim', root / 'optim')):
    if name not in sys.modules:
      module = types.ModuleType(name)
      module.__path__ = [str(path)]
      sys.modules[name] = module
  return importlib.import_module('timm.optim.rmsprop_tf').RMSpropTF


@pytest.fixture
def x64():
  """Runs the test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield
