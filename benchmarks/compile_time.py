"""Compile time of the jitted, donated step on trees of many leaves.

XLA compiles one kernel per distinct leaf computation, so a tree of
thousands of leaves can take longer to compile than to train a while.
This suite compiles the step a user writes (``update`` +
``optax.apply_updates``, params and state donated) for ``rmsprop_jax`` with
``packing=True`` (the default compiles optax's own program) and
for ``optax.rmsprop``, taking turns, and reports the median seconds of each.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks import common

VARIANTS = {
  'plain': {},
  'centered+momentum': {'centered': True, 'momentum': 0.9},
}
# The small shapes of one transformer-like block: a layer repeated many
# times is how models reach thousands of leaves.
BLOCK = [
  (16, 16),
  (16,),
  (16, 64),
  (64,),
  (64, 16),
  (16,),
  (16,),
  (16,),
  (4, 16, 4),
  (4, 4),
  (16, 3),
  (3,),
  (8, 8),
  (8,),
  (32,),
  (32, 2),
  (2,),
  (5, 5),
  (5,),
  (12,),
  (12, 12),
  (7, 3),
  (3, 7),
  (24,),
  (1,),
]


def trees(quick: bool) -> dict[str, list[tuple[int, ...]]]:
  if quick:
    return {
      '10 distinct': [(64 + i,) for i in range(10)],
      '25 in 1 block': BLOCK,
    }
  return {
    '1000 x 64': [(64,)] * 1000,
    '1000 distinct': [(64 + i,) for i in range(1000)],
    '10000 x 64': [(64,)] * 10000,
    '10000 in 400 blocks': BLOCK * 400,
  }


def compile_seconds(tx, shapes) -> float:
  """Seconds to lower and compile one donated train-style step."""
  params = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, params)
  start = time.perf_counter()
  common.compile_uncached(
    jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
  )
  return time.perf_counter() - start


def run(out, *, quick, log=print) -> dict:
  rows = []
  repeats = 1
  for tree_name, shapes in trees(quick).items():
    for variant, kwargs in VARIANTS.items():
      # 'ours' is the opt-in packed layout: without packing, rmsprop
      # compiles optax's own program.
      sides = {
        'ours': lambda kwargs=kwargs: rmsprop_jax.rmsprop(
          1e-3, packing=True, **kwargs
        ),
        'optax': lambda kwargs=kwargs: optax.rmsprop(1e-3, **kwargs),
      }
      times = {name: [] for name in sides}
      for _ in range(repeats):
        for name, make in sides.items():
          # A fresh transformation and function each time: no cache hit.
          times[name].append(compile_seconds(make(), shapes))
      median = {name: float(np.median(t)) for name, t in times.items()}
      rows.append(
        {
          'tree': tree_name,
          'leaves': len(shapes),
          'params': int(sum(np.prod(s) for s in shapes)),
          'variant': variant,
          'compile_s': median,
          'all_s': times,
          'speedup_vs_optax': median['optax'] / median['ours'],
        }
      )
      log(
        f'{tree_name:>20} {variant:>17}: compile {median["ours"]:.3g} s, '
        f'optax {median["optax"]:.3g} s'
      )
  payload = {
    'environment': common.environment(),
    'settings': {'quick': quick, 'repeats': repeats},
    'rows': rows,
  }
  common.write_json(out / 'compile.json', payload)
  (out / 'compile.md').write_text(markdown(payload))
  return payload


def markdown(payload) -> str:
  header = ['tree', 'leaves', 'variant', 'packed s', 'optax s', 'optax / ours']
  rows = [
    [
      r['tree'],
      r['leaves'],
      r['variant'],
      f'{r["compile_s"]["ours"]:.3g}',
      f'{r["compile_s"]["optax"]:.3g}',
      f'{r["speedup_vs_optax"]:.2f}x',
    ]
    for r in payload['rows']
  ]
  return (
    '# Compile time\n\n'
    + common.environment_markdown(payload['environment'])
    + '\n'
    + (
      f'Median of {payload["settings"]["repeats"]} compiles'
      if payload['settings']['repeats'] > 1
      else 'One compile'
    )
    + ' of the '
    'jitted, donated step (update + apply_updates), each side in '
    'turn, of `rmsprop(..., packing=True)` ("packed") and '
    '`optax.rmsprop`; above 1x means packed compiles faster. (Without '
    'packing, the default, rmsprop compiles optax\'s own program.) "distinct": every leaf '
    'its own shape; "blocks": a block of 25 small shapes repeated.\n\n'
    + common.markdown_table(header, rows)
  )
