"""Shared test helpers.

Comparisons against PyTorch and Keras skip when those are not installed,
except in CI (``CI=true``), where a missing peer is an error: CI must run
them.

Hypothesis draws fresh examples on every run, in CI as on a new user's
machine: the run's seed is drawn at random (or taken from
``pytest --hypothesis-seed=N``), printed in the header and again after a
failure, and rerunning with that seed reproduces the failure. No example
database is kept, so a clone's result never depends on its history.

Most of the suite's time is XLA compiling, and many tests compile a
program that another test already compiled: an update for two initial
states (the start of the accumulator is an input, not part of the
program), the same reference step in several files. The run therefore
keeps JAX's persistent compilation cache in a fresh temporary folder,
shared by the pytest-xdist workers and the processes the tests launch, and
deletes it at the end: a program identical, as JAX lowered it, to one
already compiled in this run is loaded instead of compiled again. Every
distinct program still compiles and an executable from the cache is the
one XLA compiled (the same bits). Nothing is read from an earlier run: a
run killed without cleanup (SIGTERM, SIGKILL) leaves its folder in the
temporary directory, and no later run reads it.
"""

import functools
import importlib
import os
import secrets
import shutil
import tempfile

# Keras must pick its backend before it is first imported.
os.environ.setdefault('KERAS_BACKEND', 'jax')

import hypothesis
import jax
import pytest
from hypothesis import core as hypothesis_core

hypothesis.settings.register_profile(
  'rmsprop',
  deadline=None,
  max_examples=25,
  derandomize=False,
  database=None,
  print_blob=True,
)
hypothesis.settings.load_profile('rmsprop')

# Not a test module: a worker that tests/test_multiprocess.py launches as a
# fresh interpreter (it reads its command line at import, and
# --doctest-modules would import it).
collect_ignore = ['_multiprocess_worker.py']


def pytest_configure(config):
  """Draws the run's Hypothesis seed, unless ``--hypothesis-seed`` gave it;
  a pytest-xdist worker takes the controller's, so that the seed printed
  reruns every worker's examples."""
  seed = config.getoption('--hypothesis-seed', default=None)
  workerinput = getattr(config, 'workerinput', {})
  if seed is None:
    seed = workerinput.get('hypothesis_seed')
  seed = int(seed) if seed is not None else secrets.randbits(32)
  hypothesis_core.global_force_seed = seed
  config.stash[_SEED] = seed
  _use_compilation_cache(config)


_SEED = pytest.StashKey[int]()
_CACHE = pytest.StashKey[str]()
# Set while a test run's cache exists: a pytest that a test launches (the
# 8-device tests) joins its parent's cache instead of making its own.
_CACHE_ENV = 'RMSPROP_JAX_TEST_COMPILATION_CACHE'


def _use_compilation_cache(config):
  """This run's persistent compilation cache (see the module docstring):
  made by the first pytest of the run, which deletes it at the end; its
  xdist workers and the processes tests launch find the same folder in the
  environment. Every entry is kept, however fast it compiled."""
  folder = os.environ.get(_CACHE_ENV)  # xdist workers inherit it too.
  if folder is None:
    folder = tempfile.mkdtemp(prefix='rmsprop_jax-tests-xla-cache-')
    config.stash[_CACHE] = folder  # This process made it: it deletes it.
  os.environ[_CACHE_ENV] = folder
  settings = {
    'jax_compilation_cache_dir': folder,
    'jax_persistent_cache_min_compile_time_secs': 0,
    'jax_persistent_cache_min_entry_size_bytes': 0,
  }
  for name, value in settings.items():
    os.environ[name.upper()] = str(value)  # For the processes tests launch.
    jax.config.update(name, value)


def pytest_unconfigure(config):
  folder = config.stash.get(_CACHE, None)
  if folder is not None:
    shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config):
  """pytest-xdist's ``-n auto``: one worker more than the cores it counts.

  A worker sometimes waits: on the processes a test launches (the 8-device
  and multi-process tests), on Orbax's writes, and at the end of the run,
  when the last test files leave a core idle. Measured on 2 cores, three
  workers keep the cores busier (idle 1 % of the run against 3 %) and the
  run takes about 4 % less time. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` or ``-n
  N`` still decide, and ``-n logical`` is pytest-xdist's own count."""
  if config.option.numprocesses != 'auto' or os.environ.get(
    'PYTEST_XDIST_AUTO_NUM_WORKERS'
  ):
    return None  # pytest-xdist's own hook decides.
  from xdist.plugin import pytest_xdist_auto_num_workers as cores

  return cores(config) + 1


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """pytest-xdist: each worker draws the controller's Hypothesis seed."""
  node.workerinput['hypothesis_seed'] = node.config.stash[_SEED]


def _seed_line(config) -> str:
  seed = config.stash[_SEED]
  return (
    f'Hypothesis seed: {seed} (rerun the same examples with '
    f'`pytest --hypothesis-seed={seed}`)'
  )


def pytest_report_header(config):
  return _seed_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  if exitstatus != 0:
    terminalreporter.write_line(_seed_line(config))


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


@pytest.fixture
def keras64(x64):
  """Keras 3 on its JAX backend, with float64 variables."""
  keras = require('keras')
  if keras.backend.backend() != 'jax':
    pytest.skip('Keras must run on its JAX backend (KERAS_BACKEND=jax).')
  old = keras.config.floatx()
  keras.config.set_floatx('float64')
  yield keras
  keras.config.set_floatx(old)


# The files that take longest start first, so that pytest-xdist's workers
# (``--dist loadfile``: a worker is handed its next file when its current
# one has two tests or fewer left) end together instead of one waiting on a
# long file started last; the many short files come last and fill the gaps.
# Roughly longest first, from the worker-seconds of several runs on 2 cores
# (they vary by a third from run to run with the machine's load).
# ``--no-loadscope-reorder`` (addopts) keeps this order: by default
# pytest-xdist orders the files by their number of tests, which started the
# one-test files that launch interpreters (test_sharding.py, about a
# minute) last, alone on one core. Order only: every test still runs, and
# each file's tests keep their order.
_LONGEST_FIRST = (
  'test_compat_matrix.py',  # 149 s in a fast hour (209 to 319 s, 5 leaves)
  'test_examples.py',  # 84 s in a fast hour (117 to 184 s)
  'test_benchmarks.py',  # 74 s in a fast hour (105 to 154 s)
  'test_multiprocess.py',  # 68 s in a fast hour (92 to 112 s)
  'test_optax_parity.py',  # 92 to 151 s
  'test_robustness.py',  # 48 to 70 s
  'test_low_memory_state.py',  # 46 to 72 s
  'test_sharding.py',  # 50 s (54 to 85 s when jax.random drew its data)
  'test_packaging.py',  # 30 to 40 s (mypy, cold)
  'test_packing.py',  # 32 to 44 s
  'test_dtypes.py',  # 29 to 45 s
  'test_optax_state.py',  # 29 to 39 s
  'test_porting.py',  # 18 to 29 s
  'test_docs.py',  # 12 to 16 s (the documentation build)
  'test_state_across_devices.py',  # 12 to 16 s
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
