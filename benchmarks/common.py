"""What every suite shares: the environment record, timing, and writing."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import pathlib
import platform
import textwrap
import time
from typing import Callable

import jax
import jaxlib
import numpy as np


def environment() -> dict:
  """Device, versions and date: recorded with every result."""
  import optax

  import rmsprop_jax

  env = {
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'
    ),
    'backend': jax.default_backend(),
    'devices': [d.device_kind for d in jax.devices()],
    'cpu': platform.processor() or platform.machine(),
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'optax': optax.__version__,
    'rmsprop_jax': getattr(rmsprop_jax, '__version__', 'source'),
  }
  try:
    import torch

    env['torch'] = torch.__version__
  except ImportError:
    env['torch'] = None
  # Settings of the C allocator and of XLA change the timings (glibc's
  # MALLOC_* tunables decide whether XLA's temporary buffers are mapped
  # afresh at every step): recorded when set.
  settings = {
    k: v for k, v in os.environ.items() if k.startswith(('MALLOC_', 'XLA_'))
  }
  if settings:
    env['settings'] = settings
  return env


def from_examples(name: str):
  """The module ``examples/<name>.py``, whose models and data the
  benchmarks reuse (``examples/`` is not a package)."""
  import importlib
  import sys

  folder = str(pathlib.Path(__file__).resolve().parent.parent / 'examples')
  sys.path.insert(0, folder)
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(folder)


def adding_gru(length: int = 20, hidden: int = 16):
  """The recurrent task of ``examples/adding_gru.py``, shorter and smaller,
  as the convergence suite and the low-memory study train it: ``init(key)``,
  ``loss(params, key, batch_size=32)`` (the MSE on a fresh batch),
  ``mse(params, x, y)`` and ``batch(key, n)``."""
  adding = from_examples('adding_gru')
  model = adding.GRURegressor(hidden)

  def init(key):
    return model.init(key, jax.numpy.zeros((1, length, 2)))

  def mse(params, x, y):
    return jax.numpy.mean((model.apply(params, x) - y) ** 2)

  def batch(key, n):
    return adding.adding_batch(key, n, length)

  def loss(params, key, batch_size=32):
    return mse(params, *batch(key, batch_size))

  return init, loss, mse, batch


def compile_uncached(lowered):
  """``lowered.compile()``, always by XLA: a debug option that changes no
  code gets a value of its own, so that a persistent compilation cache
  (``JAX_COMPILATION_CACHE_DIR``, whose key includes the compile options)
  never answers in XLA's place and a compile time is one."""
  return lowered.compile(
    {'xla_debug_buffer_assignment_show_max': str(next(_SALT))}
  )


_SALT = itertools.count(1_000_000 + time.time_ns() % 1_000_000_000)


def calibrate(call: Callable[[], None], target_s: float) -> int:
  """How many back-to-back calls take about ``target_s`` (after warm-up)."""
  call()
  start = time.perf_counter()
  call()
  once = max(time.perf_counter() - start, 1e-7)
  return max(1, int(target_s / once))


# A side whose repeats spread more than this (slowest / fastest) was
# disturbed: another process took the CPU, or PyTorch's threads fought
# XLA's for the cores.
UNSTABLE_SPREAD = 2.0


def alternate(
  timers: dict[str, Callable[[int], float]],
  counts: dict[str, int],
  repeats: int,
  spreads: dict[str, float] | None = None,
) -> dict[str, float]:
  """Median seconds per call of each timer, taking turns, order flipped.

  Each ``timers[name](n)`` runs ``n`` calls and returns their total seconds.
  Taking turns within one process, and reversing the order every round, puts
  every side under the same machine noise; the median resists outliers.
  ``spreads``, if given, receives each side's slowest over fastest repeat.
  """
  names = list(timers)
  samples = {name: [] for name in names}
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      samples[name].append(timers[name](counts[name]) / counts[name])
  if spreads is not None:
    spreads.update(
      {name: float(max(s) / min(s)) for name, s in samples.items()}
    )
  return {name: float(np.median(s)) for name, s in samples.items()}


def write_json(path: pathlib.Path, payload: dict) -> None:
  path.write_text(json.dumps(payload, indent=1, default=float) + '\n')


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = [
    '| ' + ' | '.join(header) + ' |',
    '|' + '|'.join('---' for _ in header) + '|',
  ]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def environment_markdown(env: dict) -> str:
  devices = ', '.join(sorted(set(env['devices'])))
  return (
    f'Machine: {env["backend"]} ({devices}'
    f', {env["cpu_count"]} host cores); jax {env["jax"]}, optax '
    f'{env["optax"]}, torch {env["torch"]}, Python {env["python"]}; '
    f'{env["date"]}.'
    + ''.join(f' With `{k}={v}`.' for k, v in env.get('settings', {}).items())
    + '\n'
  )


def pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def suptitle(fig, text: str, fontsize: float) -> None:
  """``fig.suptitle(text)``, wrapped to the figure's width (about 12
  characters an inch at 10-11 pt): one line where it fits, never cut off
  at the sides of a narrow figure."""
  fig.suptitle(
    textwrap.fill(text, int(fig.get_figwidth() * 12)), fontsize=fontsize
  )
