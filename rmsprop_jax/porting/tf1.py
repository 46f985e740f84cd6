"""TF1: ``tf.compat.v1.train.RMSPropOptimizer`` slot values."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import optax

from rmsprop_jax.porting import _state, _tree
from rmsprop_jax.porting._tree import ParamMap


def import_tf1_slots(
  slots: Mapping[str, Mapping[str, Any]],
  step: int,
  param_map: ParamMap,
  tx: optax.GradientTransformation,
  params: Any,
) -> Any:
  """The state of ``tx`` (``presets.tf1``) from TF1 ``RMSPropOptimizer``
  slot values: ``{variable name: {'rms': ..., 'momentum': ...,
  'mg': ...}}`` (``optimizer.get_slot(var, name)`` evaluated), and the
  global step the learning rate schedule continues from. TF1 keeps a
  ``momentum`` slot even for ``momentum=0``, where it holds no state: it is
  then ignored. Raises ``ValueError`` as :func:`import_torch_state`."""
  params = _tree.plain(params)
  has_trace = _state.has_field(tx, params, 'trace')
  values = {}
  for name, (path, perm) in param_map.items():
    if name not in slots or 'rms' not in slots[name]:
      raise ValueError(f'import_tf1_slots: no rms slot for {name!r}.')
    entry = slots[name]
    values['nu', tuple(path)] = (_tree.to_numpy(entry['rms']), perm, name)
    if 'mg' in entry:
      values['mu', tuple(path)] = (_tree.to_numpy(entry['mg']), perm, name)
    if 'momentum' in entry and has_trace:
      values['trace', tuple(path)] = (
        -_tree.to_numpy(entry['momentum']),
        perm,
        name,
      )
  return _state.build_state('import_tf1_slots', tx, params, values, step)


def export_tf1_slots(state: Any, param_map: ParamMap) -> dict:
  """TF1 slot values from ``state`` (of ``presets.tf1``): the inverse of
  :func:`import_tf1_slots` (a zero ``momentum`` slot without momentum)."""
  moments, _ = _state.read_state(state)
  out = {}
  for name, (path, perm) in param_map.items():
    get = lambda field, path=path, name=name, perm=perm: _tree.from_jax(
      _state.moment(moments[field], path, 'export_tf1_slots', name), perm
    )
    entry = {'rms': get('nu')}
    entry['momentum'] = (
      -get('trace') if 'trace' in moments else np.zeros_like(entry['rms'])
    )
    if 'mu' in moments:
      entry['mg'] = get('mu')
    out[name] = entry
  return out
