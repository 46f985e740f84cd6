"""Shared test helpers.

Comparisons against PyTorch and Keras skip when those are not installed,
except in CI (``CI=true``), where a missing peer is an error: CI must run
them.
"""

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


@pytest.fixture
def x64():
  """Runs the test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield
