"""Checks of hyperparameters (at construction) and of trees (at trace time).

Only concrete hyperparameter values are checked. A schedule (a callable) or a
traced value (``optax.inject_hyperparams``, ``jax.vmap`` over hyperparameters)
is left alone so that those keep working; the maths then does whatever the
value implies.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_nnx_variable(x: Any) -> bool:
  """Whether ``x`` is a Flax NNX variable (``nnx.Param``, an
  ``nnx.Optimizer``'s ``OptVariable``); never, without ``flax.nnx``
  imported."""
  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Variable)


def nnx_values(tree: Any) -> Any:
  """``tree`` with each Flax NNX variable (an ``nnx.Optimizer``'s
  ``opt_state`` holds ``OptVariable`` and ``OptArray`` wrappers, its
  parameters ``Param``) replaced by its value; without ``flax.nnx``
  imported there are none."""
  return jax.tree.map(
    lambda x: x.get_value() if is_nnx_variable(x) else x,
    tree,
    is_leaf=is_nnx_variable,
  )


def concrete(value: Any) -> np.ndarray | None:
  """Returns ``value`` as a float64 array, or None if it cannot be checked."""
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value, dtype=np.float64)
  except OverflowError:  # An int beyond float64: as good as infinite.
    return np.asarray(np.inf)
  except (TypeError, ValueError):
    return None


def check_type(
  owner: str,
  name: str,
  value: Any,
  *,
  schedule: bool = False,
  optional: bool = False,
) -> None:
  """Raises ``TypeError`` unless ``value`` is a real number, a scalar array
  (concrete or traced), or, where ``schedule``, a schedule (a callable);
  ``None`` only where ``optional``. Strings, booleans and complex numbers
  are refused; an array of another shape than ``()`` raises ``ValueError``.
  """
  if value is None:
    if optional:
      return
    raise TypeError(f'{owner}: `{name}` must be a number, not None.')
  if isinstance(value, type):  # float, jnp.float32: callable, not schedules.
    raise TypeError(
      f'{owner}: `{name}` must be a number, not the type {value.__name__}.'
    )
  if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
    if schedule:
      return
    check_not_schedule(owner, **{name: value})
  what = (
    f'a {type(value).__name__}'
    if not hasattr(value, 'dtype')
    else f'an array of dtype {value.dtype}'
  )
  real = lambda dtype: (
    jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
  )
  if isinstance(value, (bool, np.bool_)) or not (
    isinstance(value, (int, float, np.number, np.ndarray, jax.Array))
    and real(getattr(value, 'dtype', type(value)))
  ):
    expected = 'a real number, a scalar array' + (
      ' or a schedule (step -> value)' if schedule else ''
    )
    raise TypeError(
      f'{owner}: `{name}` must be {expected}, not {what} ({value!r}).'
    )
  if jnp.issubdtype(getattr(value, 'dtype', type(value)), jnp.unsignedinteger):
    raise TypeError(
      f'{owner}: `{name}` must be a float or a signed integer, '
      f'not {what} ({value!r}): negating it, as the update '
      'does, wraps around.'
    )
  if np.shape(value) != ():
    raise ValueError(
      f'{owner}: `{name}` must be a scalar, not an array of '
      f'shape {np.shape(value)}.'
    )


def check_bool(owner: str, **flags: Any) -> None:
  """Raises ``TypeError`` unless each value is ``True`` or ``False``: a
  string such as ``'False'`` is truthy, and would silently turn the option
  on."""
  for name, value in flags.items():
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(
        f'{owner}: `{name}` must be True or False, not '
        f'{value!r} ({type(value).__name__}).'
      )


def check_mask(owner: str, name: str, mask: Any) -> None:
  """Raises ``TypeError`` unless ``mask`` is None, a callable, or a tree of
  booleans (Python, NumPy or boolean arrays), as ``optax.masked`` takes."""
  if mask is None or callable(mask):
    return
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(mask)):
    raise TypeError(
      f'{owner}: `{name}` is a single value ({mask!r}), not a tree like the '
      'parameters. Under optax.inject_hyperparams a mask function is called '
      "with the step count, as if it were a schedule: pass static_args=('"
      f"{name}',) to inject_hyperparams."
    )
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    dtype = getattr(leaf, 'dtype', None)
    if not (
      isinstance(leaf, (bool, np.bool_))
      or (dtype is not None and dtype == np.bool_)
    ):
      raise TypeError(
        f'{owner}: `{name}` must be a tree of booleans like the '
        f'parameters, or a function of the parameters returning one; the '
        f'leaf at {_path(path)} is a {type(leaf).__name__} ({leaf!r}).'
      )


def check_non_negative(owner: str, name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every element of ``value`` is finite and
  >= 0."""
  x = concrete(value)
  if x is not None and not np.all((x >= 0) & np.isfinite(x)):  # And NaN.
    raise ValueError(
      f'{owner}: `{name}` must be finite and >= 0 (valid range [0, inf)), '
      f'got {value!r}.'
    )


def check_decay(owner: str, name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every element of ``value`` is in [0, 1)."""
  x = concrete(value)
  if x is not None and not np.all((x >= 0) & (x < 1)):
    raise ValueError(f'{owner}: `{name}` must be in [0, 1), got {value!r}.')


def is_python_zero(value: Any) -> bool:
  """True for a plain Python/NumPy scalar equal to zero.

  Used only to leave out a transformation whose every output would be
  unchanged (weight decay 0, momentum 0), the way PyTorch and Keras keep no
  buffer for them. Arrays, including concrete ``jax.Array`` values, never
  count: ``inject_hyperparams`` passes concrete arrays to ``init`` and traced
  ones to ``update``, and both calls must build the same state structure.
  """
  return (
    isinstance(value, (int, float, np.number))
    and not isinstance(value, bool)
    and value == 0
  )


def _path(path) -> str:
  return jax.tree_util.keystr(path) or '(the root)'


def check_float_leaves(owner: str, what: str, tree: Any) -> None:
  """Raises ``TypeError`` for a leaf that is not a float or complex array.

  Runs in Python while tracing: it costs nothing per step.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not (hasattr(leaf, 'dtype') or isinstance(leaf, (int, float, complex))):
      raise TypeError(
        f'{owner}: the {what} leaf at {_path(path)} is a '
        f'{type(leaf).__name__}, not an array.'
      )
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f'{owner}: the {what} leaf at {_path(path)} has dtype {dtype}; '
        f'RMSprop needs floating-point (or complex) {what}. Cast it, or '
        'keep it out of the optimizer with optax.masked or '
        'optax.multi_transform.'
      )


def same_structure(a: Any, b: Any) -> bool:
  """Whether two pytrees have the same structure (node types, keys, arity)."""
  # Typed Any: jaxlib's stub for PyTreeDef declares no comparison.
  structure: Any = jax.tree.structure(a)
  return bool(structure == jax.tree.structure(b))


def _children(x: Any) -> list | None:
  """``x``'s children as (key, child) pairs, or None for a leaf."""
  flat = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[
    0
  ]
  if len(flat) == 1 and flat[0][0] == () and flat[0][1] is x:
    return None
  return [(p[0], c) for p, c in flat]


def _kind(x: Any) -> str:
  if hasattr(x, 'shape') and _children(x) is None:
    return f'an array of shape {tuple(np.shape(x))}'
  return f'a {type(x).__name__}'


def first_difference(a: Any, b: Any) -> str:
  """Where two trees' structures first differ, in a few words (a path and
  the two node kinds or keys), never a whole tree definition."""
  queue: list[tuple[tuple, Any, Any]] = [((), a, b)]
  while queue:
    path, x, y = queue.pop(0)
    kx, ky = _children(x), _children(y)
    where = jax.tree_util.keystr(path) or '(the root)'
    if kx is None and ky is None:
      continue
    if kx is None or ky is None or type(x) is not type(y):
      return f'at {where}: {_kind(x)} against {_kind(y)}'
    keys_x = [jax.tree_util.keystr((k,)) for k, _ in kx]
    keys_y = [jax.tree_util.keystr((k,)) for k, _ in ky]
    if keys_x != keys_y:
      return (
        f'at {where}: {type(x).__name__} with children '
        f'{", ".join(keys_x[:4]) or "none"} against '
        f'{", ".join(keys_y[:4]) or "none"}'
      )
    queue += [((*path, k), cx, cy) for (k, cx), (_, cy) in zip(kx, ky)]
  return 'in their static data (e.g. a recorded shape or layout)'


def check_same_tree(
  owner: str, what: str, tree: Any, ref_what: str, ref: Any
) -> None:
  """Raises ``ValueError`` unless ``tree`` matches ``ref``'s structure and
  shapes, naming the first leaves that differ."""
  paths = lambda t: {
    _path(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]
  }
  got, want = paths(tree), paths(ref)
  if not same_structure(tree, ref):
    missing = [k for k in want if k not in got][:3]
    extra = [k for k in got if k not in want][:3]
    detail = '; '.join(
      part
      for part in (
        f'missing from the {what}: {", ".join(missing)}' if missing else '',
        f'not in the {ref_what}: {", ".join(extra)}' if extra else '',
      )
      if part
    ) or first_difference(tree, ref)
    raise ValueError(
      f'{owner}: the {what} tree does not match the {ref_what} tree ({detail}).'
    )
  for key, x in got.items():
    if np.shape(x) != np.shape(want[key]):
      raise ValueError(
        f'{owner}: the {what} leaf at {key} has shape {np.shape(x)}, the '
        f'{ref_what} leaf {np.shape(want[key])}.'
      )


def as_dtype(
  value: Any,
  owner: str = '',
  name: str = 'dtype',
) -> np.dtype | None:
  """``value`` as a dtype (``None`` stays ``None``). Accepts an array too:
  ``optax.inject_hyperparams`` takes a dtype such as ``jnp.bfloat16`` for a
  schedule (it is callable) and passes its value, an array of that dtype.
  Raises ``ValueError``, naming ``owner`` and ``name``, for anything that is
  not a dtype."""
  if value is None:
    return None
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return jnp.dtype(value.dtype)
  try:
    return jnp.dtype(value)
  except TypeError:
    raise ValueError(
      f'{owner}: `{name}` must be a dtype such as jnp.bfloat16, not {value!r}.'
    ) from None


def check_not_schedule(owner: str, **values: Any) -> None:
  """Raises ``ValueError`` for a callable where a number is needed (only
  learning rates and weight decays take schedules)."""
  for name, value in values.items():
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
      raise ValueError(
        f'{owner}: `{name}` must be a number or an array, not a schedule '
        '(only the learning rate and the weight decay take schedules; '
        'for others, use optax.inject_hyperparams).'
      )


def check_float_dtype(owner: str, name: str, dtype: Any) -> None:
  """Raises ``ValueError`` unless ``dtype`` is None or a float dtype."""
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f'{owner}: `{name}` must be a floating-point dtype, not {dtype}.'
    )
