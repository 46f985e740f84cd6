"""Construction-time checks of hyperparameters.

Only concrete values are checked. A schedule (a callable) or a traced value
(``optax.inject_hyperparams``, ``jax.vmap`` over hyperparameters) is left alone
so that those keep working; the maths then does whatever the value implies.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _concrete(value: Any) -> np.ndarray | None:
  """Returns ``value`` as a float64 array, or None if it cannot be checked."""
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    return None


def check_non_negative(owner: str, name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every element of ``value`` is >= 0."""
  x = _concrete(value)
  if x is not None and not np.all(x >= 0):  # NaN fails too.
    raise ValueError(
        f'{owner}: `{name}` must be >= 0 (valid range [0, inf)), got {value!r}.'
    )


def check_decay(owner: str, name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every element of ``value`` is in [0, 1)."""
  x = _concrete(value)
  if x is not None and not np.all((x >= 0) & (x < 1)):
    raise ValueError(
        f'{owner}: `{name}` must be in [0, 1), got {value!r}.'
    )


def is_python_zero(value: Any) -> bool:
  """True for a plain Python/NumPy scalar equal to zero.

  Used only to leave out a transformation whose every output would be
  unchanged (weight decay 0, momentum 0), the way PyTorch and Keras keep no
  buffer for them. Arrays, including concrete ``jax.Array`` values, never
  count: ``inject_hyperparams`` passes concrete arrays to ``init`` and traced
  ones to ``update``, and both calls must build the same state structure.
  """
  return isinstance(value, (int, float, np.number)) and not isinstance(
      value, bool) and value == 0
