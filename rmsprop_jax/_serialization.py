"""Flax serialization of the state parts that are not optax's (packed small
leaves, the 8-bit code), so that ``flax.serialization`` and
``flax.training.checkpoints`` save them, restore them into a target of the
same layout, and raise, naming the conversion to call, where the layouts
differ (never handing back a target left at its fresh values).

Registered the first time such a state is created, only if Flax is installed:
the library itself does not need Flax.
"""

from __future__ import annotations

import importlib.util

import jax

_registered = False
_PACKED_KEY = 'packed_small_leaves'


def register_with_flax() -> None:
  """Registers the state types with ``flax.serialization`` (once)."""
  global _registered
  if _registered or importlib.util.find_spec('flax') is None:
    return
  _registered = True
  from flax import serialization  # pylint: disable=g-import-not-at-top

  from rmsprop_jax import (
    packing,  # pylint: disable=g-import-not-at-top
    quantization,  # pylint: disable=g-import-not-at-top
  )

  def check_restored(target, state):
    """Raises if every array in ``state`` is the target's own: the
    checkpoint held nothing for this part, and the restore (Flax's
    Orbax-backed ``restore_checkpoint`` fills keys missing from the
    checkpoint with the target's values) would hand back a fresh state."""
    own = {id(x) for x in jax.tree.leaves(target)}
    leaves = jax.tree.leaves(state)
    if leaves and all(id(x) in own for x in leaves):
      raise ValueError(
        f'rmsprop_jax: the checkpoint holds nothing for the packed or 8-bit '
        f'optimizer state at {serialization.current_path()} (it was saved '
        'in another layout, e.g. by optax.rmsprop or by this optimizer '
        'with packing=False or another nu_dtype); restoring would leave '
        'the fresh state there. Restore it into the state of the optimizer '
        'that saved it, then convert: '
        '`rmsprop_jax.pack_state(state, tx, params)`.'
      )

  def restore_packed_state(target, state):
    check_restored(target, state)
    if not isinstance(state, dict) or set(state) != {_PACKED_KEY}:
      raise ValueError(
        f'rmsprop_jax: cannot restore a plain (optax-layout) optimizer '
        f'state into the packed state of an optimizer built with '
        f'packing=True (at {serialization.current_path()}). Restore it '
        'into the state of the same optimizer with packing=False (or of '
        'optax.rmsprop), then convert it: '
        '`rmsprop_jax.pack_state(state, tx, params)`.'
      )
    return packing.PackedState(
      serialization.from_state_dict(
        target.inner, state[_PACKED_KEY], name=_PACKED_KEY
      )
    )

  def restore_children(state, names, children, rebuild):
    check_restored(children, state)
    if not isinstance(state, dict) or set(state) != set(names):
      raise ValueError(
        f'rmsprop_jax: the checkpoint at {serialization.current_path()} '
        f'holds {_keys(state)}, where this optimizer keeps '
        f'{sorted(names)}: it was saved by an optimizer with another '
        'packing of small leaves or another nu_dtype. Restore it into the '
        'optimizer that saved it, then convert with '
        'rmsprop_jax.unpack_state(state) and '
        'rmsprop_jax.pack_state(state, tx, params).'
      )
    return rebuild(
      [
        serialization.from_state_dict(x, state[k], name=k)
        for k, x in zip(names, children)
      ]
    )

  serialization.register_serialization_state(
    packing.PackedState,
    lambda s: {_PACKED_KEY: serialization.to_state_dict(s.inner)},
    restore_packed_state,
    override=True,
  )
  serialization.register_serialization_state(
    packing.Packed,
    lambda p: {
      k: serialization.to_state_dict(x)
      for k, x in zip(p.keys(), p.stacks + p.rest)
    },
    lambda t, s: restore_children(
      s,
      t.keys(),
      t.stacks + t.rest,
      lambda c: packing.Packed(
        c[: len(t.stacks)], c[len(t.stacks) :], t.layout, t.treedef
      ),
    ),
    override=True,
  )
  serialization.register_serialization_state(
    quantization.Blockwise8bit,
    lambda q: {
      'codes': serialization.to_state_dict(q.codes),
      'scale': serialization.to_state_dict(q.scale),
    },
    lambda t, s: restore_children(
      s,
      ['codes', 'scale'],
      [t.codes, t.scale],
      lambda c: quantization.Blockwise8bit(c[0], c[1], t.shape),
    ),
    override=True,
  )


def _keys(state) -> str:
  if isinstance(state, dict):
    return str(sorted(state))
  return f'an array of shape {getattr(state, "shape", "?")}'
