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
  be the Keras optimizer's whole update, as in :func:`import_torch_state`:
  its ``rho``, ``momentum``, ``epsilon``, ``centered`` and current learning
  rate, its ``weight_decay`` and the variables it excludes from it
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
    _check_keras_step(owner, optimizer, param_map, tx, state, params, values)
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


class _Shown(str):
  """Text shown as it is in an argument list."""

  def __repr__(self) -> str:
    return str(self)


def _check_keras_step(owner, optimizer, param_map, tx, state, params, values):
  """Raises unless ``tx`` continues the Keras optimizer's whole update (see
  :func:`import_keras_state`)."""
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
  count = int(np.asarray(optimizer.iterations.value))
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
    by_key = {
      v.path.replace('/', '_'): v
      for v in getattr(optimizer, '_trainable_variables', [])
    }
    decayed = {}
    for name, (path, _) in param_map.items():
      variable = by_key.get(name.replace('/', '_'))
      decayed[tuple(path)] = variable is None or bool(
        optimizer._use_weight_decay(variable)
      )
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
