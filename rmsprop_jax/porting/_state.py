"""The optimizer-state code every framework's port shares: building a
preset's state from the source's moments, reading them back, and checking
that a port continues the source's run."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import packing as packing_lib
from rmsprop_jax.porting import _tree

# The optax state fields a port fills: the per-parameter moments, and counts.
_MOMENTS = ('nu', 'mu', 'trace')
# The optax classes that hold them (ScaleByRms..., ScaleByRStdDev...,
# TraceState); Adam's mu and nu, say, are not RMSprop's.
_RMSPROP_STATES = ('ScaleByRms', 'ScaleByRStdDev', 'TraceState')


def plain_state(tx, params):
  """``tx``'s state in optax's layout (unpacked, float moments)."""
  return packing_lib.unpack_state(tx.init(params))


def split(path):
  """(field, parameter path) of a state leaf: ('nu', ('dense', 'kernel')),
  ('count', ()), or (None, ()) for anything else."""
  keys = _tree.path_keys(path)
  names = [getattr(k, 'name', None) for k in path]
  for i, name in enumerate(names):
    if name in _MOMENTS:
      return name, keys[i + 1 :]
    if name == 'count':
      return 'count', ()
  return None, ()


def has_field(tx, params, field) -> bool:
  flat, _ = jax.tree_util.tree_flatten_with_path(
    jax.eval_shape(lambda: plain_state(tx, params))
  )
  return any(split(path)[0] == field for path, _ in flat)


def variant_message(owner, field, name, source=None) -> str:
  what = {
    'mu': 'a centered mean (centered=True)',
    'trace': 'a momentum buffer (momentum > 0)',
    'nu': 'a second moment',
  }[field]
  message = (
    f'{owner}: {name!r}: one side has {what} and the other not: the '
    'optimizers are different variants; build the preset with the '
    "source optimizer's hyperparameters"
  )
  message += f': {source}.' if source else '.'
  if field == 'trace':
    message += (
      ' (Under optax.inject_hyperparams a momentum of 0 is injected as an '
      "array and keeps a buffer: pass static_args=('momentum',).)"
    )
  return message


def build_state(owner, tx, params, values, count, lenient=False, source=None):
  """tx.init(params), its moments filled from ``values`` (keyed by (field,
  parameter path)) and every step count set to ``count``. ``lenient``
  (for a reference that only some parameters' sources fit): moments without
  a source keep their initial values, and sources without a moment are
  dropped."""
  plain = plain_state(tx, params)
  fields = {field for field, _ in values}
  flat, treedef = jax.tree_util.tree_flatten_with_path(plain)
  present = {split(path)[0] for path, _ in flat}
  for field in _MOMENTS:
    if not lenient and (field in fields) != (field in present):
      name = next(
        (v[2] for k, v in values.items() if k[0] == field), 'every parameter'
      )
      raise ValueError(variant_message(owner, field, name, source))
  leaves, seen = [], set()
  for path, leaf in flat:
    field, param_path = split(path)
    if field == 'count':
      leaves.append(
        jnp.asarray(min(count, np.iinfo(np.int32).max), jnp.result_type(leaf))
      )
    elif field in _MOMENTS and (field, param_path) in values:
      seen.add((field, param_path))
      leaves.append(
        _tree.laid_out(owner, values[field, param_path], leaf, param_path)
      )
    elif field in _MOMENTS and not lenient:
      if ('nu', param_path) in values:  # The parameter has state, not this.
        raise ValueError(
          variant_message(owner, field, values['nu', param_path][2], source)
        )
      raise ValueError(
        f'{owner}: no source for the JAX parameter '
        f'{param_path} (not in param_map).'
      )
    else:
      leaves.append(leaf)
  extra = set(values) - seen
  if extra and not lenient:
    field, path = sorted(extra)[0]
    if any(k[1] == path for k in seen):  # The parameter is there, not this.
      raise ValueError(
        variant_message(owner, field, values[field, path][2], source)
      )
    raise ValueError(
      f'{owner}: {values[field, path][2]!r} maps to {path}, '
      'which is not in the parameters.'
    )
  return packing_lib.pack_state(jax.tree.unflatten(treedef, leaves), tx, params)


def step(owner, count, step):
  if step is not None:
    return int(step)
  if count is None:
    raise ValueError(
      f'{owner}: this state keeps no step count (a constant '
      'learning rate): pass step=, the number of steps taken.'
    )
  return count


def read_state(state):
  """({field: [parameter-shaped trees]}, count) of a state in any layout.
  A field may come in several trees (``optax.multi_transform`` keeps one
  state per label, each masked to its own leaves)."""
  plain = packing_lib.unpack_state(state)
  moments: dict[str, list[Any]] = {}
  counts: set[int] = set()

  def visit(node):
    if isinstance(node, tuple) and hasattr(node, '_fields'):
      kind = type(node).__name__
      for field in node._fields:
        value = getattr(node, field)
        if field in _MOMENTS and kind.startswith(_RMSPROP_STATES):
          moments.setdefault(field, []).append(value)
        elif field == 'count':
          counts.add(int(value))
        else:
          visit(value)
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, Mapping):
      for child in node.values():
        visit(child)

  visit(plain)
  return moments, max(counts) if counts else None


def moment(trees, path, owner, name):
  """The moment of the parameter at ``path``, from whichever tree holds it
  (not masked out)."""
  for tree in trees:
    try:
      value = _tree.get(tree, path)
    except (KeyError, IndexError, TypeError):
      continue
    if hasattr(value, 'shape'):
      return value
  raise ValueError(f'{owner}: no state for {name!r} at {tuple(path)}.')


def probe(params, seed=0):
  """A tree like ``params``: fixed, varied values of both signs, drawn on
  the host by NumPy (``jax.random`` would compile a program per shape)."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    treedef,
    [
      jnp.asarray(rng.standard_normal(jnp.shape(x)).astype(jnp.result_type(x)))
      for x in leaves
    ],
  )


def check_next_step(
  owner,
  tx,
  state,
  make_ref,
  build,
  params,
  source,
  lr,
  count,
  members=None,
  scales=(1.0,),
):
  """Raises unless ``tx``'s next step from the imported ``state`` is the
  source's: the same update and the same new moments (``nu``, ``mu``) on
  the leaves in ``members`` (default: all).

  The source's optimizer is ``make_ref(lr)`` (its state ``build(ref)``),
  ``lr`` its current learning rate. The step is taken at random parameters
  (so that weight decay shows on every leaf, zero biases included) and on a
  probe gradient at each of ``scales`` (where a clip acts and where it does
  not). Where the updates differ, the source's step is measured at rates 0
  and 1: ``tx``'s step may be the source's rule at another positive rate (a
  schedule that differs from the source's own rates passes: a loop may set
  PyTorch's ``lr`` before or after each step, so the group's ``lr`` need
  not be the next step's), but not another rule (decay, eps, weight decay
  or its mask, momentum or its placement, a clip). Caution's mask and
  corrected weight decay are not affine in the rate: there the step must be
  the source's at ``lr``. ``source`` is the expression that builds the
  source's optimizer, for the message.
  """
  at = probe(params, seed=1)
  paths = [
    _tree.path_keys(path)
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  members = set(paths) if members is None else set(members)
  pick = lambda tree: np.concatenate(
    [
      np.ravel(np.asarray(x, np.float64))
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
      if _tree.path_keys(path) in members
    ]
  )
  dtypes = {jnp.result_type(x) for x in jax.tree.leaves(params)}
  tolerance = 1e3 * max(float(jnp.finfo(d).eps) for d in dtypes)

  def off(a, b):
    return float(np.max(np.abs(a - b), initial=0.0)) / max(
      float(np.max(np.abs(b), initial=0.0)), 1e-300
    )

  def moments(new_state):
    found, _ = read_state(new_state)
    return {
      field: np.concatenate(
        [
          np.ravel(np.asarray(moment(found[field], p, owner, p), np.float64))
          for p in paths
          if p in members
        ]
      )
      for field in ('nu', 'mu')
      if field in found
    }

  def refuse(worst):
    raise ValueError(
      f'{owner}: tx does not continue this run: its next step from the '
      "imported state is not the source optimizer's at any learning rate "
      f'(off by {worst:.2g}, relative; round-off would be below '
      f'{tolerance:.1g}). The source is {source} at step {count}: build '
      'tx so (the learning rate may be a schedule; with caution or '
      f'corrected weight decay it must give {lr!r} at step {count}), or '
      'pass check=False to change the rule on purpose.'
    )

  base = probe(params)
  for scale in scales:
    grads = jax.tree.map(lambda g, scale=scale: g * scale, base)
    ours, ours_state = tx.update(grads, state, at)

    def step_at(rate, grads=grads):
      ref = make_ref(rate)
      return ref.update(grads, build(ref), at)

    ref, ref_state = step_at(lr)
    theirs = moments(ref_state)
    mine = moments(ours_state)
    worst = max(
      [off(mine[f], theirs[f]) for f in theirs if f in mine], default=0.0
    )
    if worst > tolerance:
      refuse(worst)
    u = pick(ours)
    if off(u, pick(ref)) <= tolerance:
      continue
    # Another learning rate, or another rule? The source's step is affine
    # in its rate (but for caution's mask and corrected weight decay).
    a = pick(step_at(0.0)[0])
    b = pick(step_at(1.0)[0]) - a
    rate = float(np.dot(u - a, b) / max(np.dot(b, b), 1e-300))
    worst = off(u, a + rate * b)
    if worst > tolerance:
      refuse(min(worst, off(u, pick(ref))))
    if lr > 0 and not rate > tolerance * lr:
      raise ValueError(
        f"{owner}: tx's learning rate at step {count} is {rate:.3g}, where "
        f"the source's is {lr!r}: a step at rate 0 shows nothing of the "
        'rule (its eps, weight decay or momentum), so it cannot be checked. '
        f'The source is {source}.'
      )
