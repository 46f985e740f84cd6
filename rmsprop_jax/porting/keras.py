"""Keras 3: ``keras.optimizers.RMSprop`` (state from its variables, by the
model variables' paths)."""

from __future__ import annotations

from typing import Any

import numpy as np
import optax

from rmsprop_jax.porting import _state, _tree
from rmsprop_jax.porting._tree import ParamMap


def import_keras_state(
  optimizer: Any,
  param_map: ParamMap,
  tx: optax.GradientTransformation,
  params: Any,
  check: bool = True,
) -> Any:
  """The state of ``tx`` (``presets.keras``) from a built Keras 3
  ``keras.optimizers.RMSprop``: its ``*_velocity``, ``*_momentum`` and
  ``*_average_gradient`` variables and its ``iteration``.

  ``param_map`` is keyed by the Keras variables' paths
  (``model.trainable_variables[i].path``, e.g. ``'sequential/dense/kernel'``).
  With ``check`` (default), ``tx``'s next step from the imported state must
  be the Keras optimizer's (its ``rho``, ``momentum``, ``epsilon``,
  ``centered``, ``weight_decay`` and current learning rate), as in
  :func:`import_torch_state`. Raises ``ValueError`` as
  :func:`import_torch_state`, and ``TypeError`` for a Keras optimizer other
  than RMSprop.
  """
  owner = 'import_keras_state'
  _check_keras_rmsprop(owner, optimizer)
  found = {v.name: v for v in optimizer.variables}
  values = {}
  for name, (path, perm) in param_map.items():
    key = name.replace('/', '_')
    if f'{key}_velocity' not in found:
      raise ValueError(_keras_missing(owner, name, found))
    for field, suffix in (('nu', 'velocity'), ('mu', 'average_gradient')):
      if f'{key}_{suffix}' in found:
        values[field, tuple(path)] = (
          _tree.to_numpy(found[f'{key}_{suffix}'].value),
          perm,
          name,
        )
    if f'{key}_momentum' in found:  # The step taken: the lr is inside.
      values['trace', tuple(path)] = (
        -_tree.to_numpy(found[f'{key}_momentum'].value),
        perm,
        name,
      )
  count = int(np.asarray(found['iteration'].value))
  state = _state.build_state(owner, tx, params, values, count)
  if check:
    from rmsprop_jax import presets

    hyper = dict(
      learning_rate=float(np.asarray(optimizer.learning_rate)),
      rho=float(optimizer.rho),
      momentum=float(optimizer.momentum),
      epsilon=float(optimizer.epsilon),
      centered=bool(optimizer.centered),
      weight_decay=(
        None
        if optimizer.weight_decay is None
        else float(optimizer.weight_decay)
      ),
    )
    _state.check_next_step(
      owner,
      tx,
      state,
      lambda lr: presets.keras(**dict(hyper, learning_rate=lr)),
      lambda ref: _state.build_state(owner, ref, params, values, count),
      params,
      'presets.keras',
      hyper,
      count,
    )
  return state


def export_keras_state(
  state: Any, optimizer: Any, param_map: ParamMap, step: int | None = None
) -> None:
  """Assigns ``state`` (of ``presets.keras``) to a built Keras 3
  ``RMSprop``'s variables, in place; the inverse of
  :func:`import_keras_state`. ``step`` (Keras' ``iteration``, which its
  learning-rate schedules read) is needed only where ``state`` keeps no step
  count."""
  owner = 'export_keras_state'
  _check_keras_rmsprop(owner, optimizer)
  found = {v.name: v for v in optimizer.variables}
  moments, count = _state.read_state(state)
  count = _state.step(owner, count, step)
  for name in param_map:
    if f'{name.replace("/", "_")}_velocity' not in found:
      raise ValueError(_keras_missing(owner, name, found))
  for name, (path, perm) in param_map.items():
    key = name.replace('/', '_')
    for field, suffix in (
      ('nu', 'velocity'),
      ('mu', 'average_gradient'),
      ('trace', 'momentum'),
    ):
      if (field in moments) != (f'{key}_{suffix}' in found):
        raise ValueError(_state.variant_message(owner, field, name))
      if field in moments:
        value = _tree.from_jax(
          _state.moment(moments[field], path, owner, name), perm
        )
        found[f'{key}_{suffix}'].assign(-value if field == 'trace' else value)
  found['iteration'].assign(count)


def _check_keras_rmsprop(owner, optimizer):
  name = type(optimizer).__name__
  if name != 'RMSprop' or not hasattr(optimizer, 'rho'):
    raise TypeError(
      f'{owner}: this is a Keras {name} optimizer, not '
      'RMSprop: its state is not RMSprop state.'
    )


def _keras_missing(owner, name, found) -> str:
  known = sorted(
    k[: -len('_velocity')] for k in found if k.endswith('_velocity')
  )
  return (
    f'{owner}: the Keras optimizer has no state for {name!r} (its '
    f'variables are named after the paths {known[:6]}, "/" as "_"; '
    'is the optimizer built, and is this the model it trains?).'
  )
