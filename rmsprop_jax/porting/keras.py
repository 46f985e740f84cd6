"""Keras 3: ``keras.optimizers.RMSprop`` (state from its variables, by the
model variables' paths)."""

from __future__ import annotations

from typing import Any

import jax
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
  be the Keras optimizer's whole update, as in :func:`import_torch_state`
  (at any positive learning rate): its ``rho``, ``momentum``, ``epsilon``,
  ``centered``, its ``weight_decay`` and the variables it excludes from it
  (``exclude_from_weight_decay``: ``weight_decay_mask`` here), and its
  ``clipnorm`` (each variable on its own: :func:`rmsprop_jax.clip_by_norm`),
  ``global_clipnorm`` (``optax.clip_by_global_norm``) or ``clipvalue``
  (``optax.clip``) chained before the preset. The message names the
  optimizer to build.

  Raises:
    ValueError: as :func:`import_torch_state`; with ``check``, for an
      optimizer with ``use_ema`` (its parameter average is not part of
      ``tx``'s state: carry it yourself, or pass ``check=False`` to import
      the moments alone) or ``gradient_accumulation_steps`` (its
      accumulators are not ported).
    TypeError: for a Keras optimizer other than RMSprop.
  """
  owner = 'import_keras_state'
  _check_keras_rmsprop(owner, optimizer)
  params = _tree.plain(params)
  values = {}
  indices = _keras_indices(owner, optimizer, param_map)
  for name, slots in _keras_slots(optimizer, indices).items():
    path, perm = param_map[name]
    for field, slot in _FIELDS:
      if slot in slots:  # Keras' momentum is the step taken: lr inside.
        value = _tree.to_numpy(slots[slot].value)
        values[field, tuple(path)] = (
          -value if field == 'trace' else value,
          perm,
          name,
        )
  count = int(np.asarray(optimizer.iterations.value))
  if not check:
    return _state.build_state(owner, tx, params, values, count)
  make_ref, source, lr, scales = _keras_reference(
    owner, optimizer, param_map, params, indices
  )
  state = _state.build_state(owner, tx, params, values, count, source=source)
  _state.check_next_step(
    owner,
    tx,
    state,
    make_ref,
    lambda ref: _state.build_state(owner, ref, params, values, count),
    params,
    source,
    lr,
    count,
    scales=scales,
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
  moments, count = _state.read_state(state)
  count = _state.step(owner, count, step)
  indices = _keras_indices(owner, optimizer, param_map)
  for name, slots in _keras_slots(optimizer, indices).items():
    path, perm = param_map[name]
    for field, slot in _FIELDS:
      if (field in moments) != (slot in slots):
        raise ValueError(_state.variant_message(owner, field, name))
      if field in moments:
        value = _tree.from_jax(
          _state.moment(moments[field], path, owner, name), perm
        )
        slots[slot].assign(-value if field == 'trace' else value)
  optimizer.iterations.assign(count)


# The optax state field of each of Keras' RMSprop slots.
_FIELDS = (
  ('nu', 'velocity'),
  ('mu', 'average_gradient'),
  ('trace', 'momentum'),
)


def _keras_indices(owner, optimizer, param_map) -> dict[str, int]:
  """{param_map name: the optimizer's index of its variable}, each name
  matched to the model variable with that path (or, failing that, the one
  whose path with "/" as "_" is the name's). Two variables whose paths read
  the same with "/" as "_" are told apart by their exact paths."""
  variables = list(getattr(optimizer, '_trainable_variables', None) or [])
  exact: dict[str, list[int]] = {}
  loose: dict[str, list[int]] = {}
  for i, variable in enumerate(variables):
    exact.setdefault(variable.path, []).append(i)
    loose.setdefault(variable.path.replace('/', '_'), []).append(i)
  out: dict[str, int] = {}
  taken: dict[int, str] = {}
  for name in param_map:
    found = exact.get(name) or loose.get(name.replace('/', '_'), [])
    if not found:
      known = [v.path for v in variables[:6]]
      raise ValueError(
        f'{owner}: the Keras optimizer has no state for {name!r} (its '
        f'variables have the paths {known}{"..." if len(variables) > 6 else ""}; '
        'key param_map by model.trainable_variables[i].path; is the '
        'optimizer built, and is this the model it trains?).'
      )
    if len(found) > 1:
      raise ValueError(
        f'{owner}: {name!r} could be any of the variables '
        f'{[variables[i].path for i in found]}: key param_map by their '
        'exact paths.'
      )
    i = found[0]
    if i in taken:
      raise ValueError(
        f'{owner}: {taken[i]!r} and {name!r} both name the variable '
        f'{variables[i].path!r}.'
      )
    taken[i] = name
    out[name] = i
  return out


def _keras_slots(optimizer, indices) -> dict:
  """{param_map name: {slot: Keras variable}}, the slots taken by the
  optimizer's own index of the variable, as Keras' update does."""
  out: dict[str, dict] = {}
  for name, i in indices.items():
    slots = {'velocity': optimizer._velocities[i]}
    if optimizer._momentums:
      slots['momentum'] = optimizer._momentums[i]
    if optimizer._average_gradients:
      slots['average_gradient'] = optimizer._average_gradients[i]
    out[name] = slots
  return out


def _check_keras_rmsprop(owner, optimizer):
  name = type(optimizer).__name__
  if name != 'RMSprop' or not hasattr(optimizer, 'rho'):
    raise TypeError(
      f'{owner}: this is a Keras {name} optimizer, not '
      'RMSprop: its state is not RMSprop state.'
    )


class _Shown(str):
  """Text shown as it is in an argument list."""

  def __repr__(self) -> str:
    return str(self)


def _keras_reference(owner, optimizer, param_map, params, indices):
  """(make_ref(lr), the expression that builds it, the current learning
  rate, gradient scales to probe at) for the Keras optimizer's whole update
  (see :func:`import_keras_state`): its clip, its RMSprop step and its
  weight decay with the exclusions (``indices``: :func:`_keras_indices`)."""
  import optax

  from rmsprop_jax import presets, transform

  for flag, why in (
    ('use_ema', 'keeps an average of the parameters'),
    ('gradient_accumulation_steps', 'accumulates gradients'),
  ):
    if getattr(optimizer, flag, None):
      raise ValueError(
        f'{owner}: the Keras optimizer {why} ({flag}='
        f"{getattr(optimizer, flag)!r}), which tx's state does not hold "
        '(see presets.keras for where it goes); pass check=False to import '
        'the RMSprop moments alone.'
      )
  lr = float(np.asarray(optimizer.learning_rate))
  hyper: dict[str, Any] = dict(
    rho=float(optimizer.rho),
    momentum=float(optimizer.momentum),
    epsilon=float(optimizer.epsilon),
    centered=bool(optimizer.centered),
  )
  shown = dict(hyper)
  if optimizer.weight_decay is not None:
    hyper['weight_decay'] = shown['weight_decay'] = float(
      optimizer.weight_decay
    )
    variables = optimizer._trainable_variables
    decayed = {
      tuple(path): bool(optimizer._use_weight_decay(variables[indices[name]]))
      for name, (path, _) in param_map.items()
    }
    excluded = [n for n, (p, _) in param_map.items() if not decayed[tuple(p)]]
    if excluded:
      hyper['weight_decay_mask'] = jax.tree_util.tree_map_with_path(
        lambda path, _: decayed.get(_tree.path_keys(path), True), params
      )
      shown['weight_decay_mask'] = _Shown(
        f'<a tree like params, False at {", ".join(excluded)}>'
      )
  arguments = ', '.join(f'{k}={v!r}' for k, v in shown.items())
  source = f'presets.keras(learning_rate={lr!r}, {arguments})'
  clip, name = None, ''
  scales: tuple[float, ...] = (1.0,)
  grads = _state.probe(params)
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  norms = [float(np.linalg.norm(g)) for g in leaves if g.size]
  biggest = max((float(np.max(np.abs(g))) for g in leaves if g.size), default=1)
  if optimizer.clipnorm and optimizer.clipnorm > 0:
    c = float(optimizer.clipnorm)
    clip, name = transform.clip_by_norm(c), f'rmsprop_jax.clip_by_norm({c!r})'
    scales = (0.5 * c / max(norms), 2 * c / min(norms), c / np.median(norms))
  elif optimizer.global_clipnorm and optimizer.global_clipnorm > 0:
    c = float(optimizer.global_clipnorm)
    clip = optax.clip_by_global_norm(c)
    name = f'optax.clip_by_global_norm({c!r})'
    total = float(np.sqrt(sum(n * n for n in norms)))
    scales = (0.5 * c / total, 2 * c / total)
  elif optimizer.clipvalue and optimizer.clipvalue > 0:
    c = float(optimizer.clipvalue)
    clip, name = optax.clip(c), f'optax.clip({c!r})'
    scales = (0.5 * c / biggest, 2 * c / biggest, 20 * c / biggest)
  if clip is None:
    make_ref = lambda rate: presets.keras(rate, **hyper)
  else:
    make_ref = lambda rate: optax.chain(clip, presets.keras(rate, **hyper))
    source = f'optax.chain({name}, {source})'
  return make_ref, source, lr, scales
