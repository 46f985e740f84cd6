"""Where the optimizer state lives on a device mesh.

The moments and the momentum buffer are elementwise in the parameters, so
the natural home of each is its parameter's sharding: then the update needs
no communication at all. Eagerly, and under ``jit`` on a mesh with
``Explicit`` axes, ``tx.init`` already puts them there. Under ``jit`` with
``Auto`` axes, and for ``jax.eval_shape``-based initialisation (building a
large model's state without materialising it on one device), JAX cannot know
it: :func:`state_shardings` gives the state's shardings in one call, for
``out_shardings``.

ZeRO-1 (Rajbhandari et al. 2020, stage 1): parameters replicated over the
data-parallel axis keep their full copy on every device, but their optimizer
state need not. ``state_shardings(tx, params, zero1_axis='data')`` also
splits each state array over that axis, so each device holds 1/N of it.
XLA then computes each device's slice of the update from its slice of the
(replicated) gradient, and gathers the updates (an all-gather) to apply
them to the replicated parameters.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rmsprop_jax import packing, quantization


def _sharding_of(x: Any) -> jax.sharding.Sharding:
  sharding = getattr(x, 'sharding', None)
  if sharding is None:
    raise ValueError(
      'state_shardings: every parameter must be a jax.Array or a '
      f'jax.ShapeDtypeStruct with a sharding; got {type(x).__name__} '
      'without one.'
    )
  return sharding


def _with_axis(
  spec: PartitionSpec, shape: tuple[int, ...], mesh, axis: str
) -> PartitionSpec:
  """``spec`` also split over ``axis``, on the first dimension that stays
  evenly divisible; unchanged if ``axis`` is already used or none fits."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {
    a
    for e in entries
    if e is not None
    for a in (e if isinstance(e, tuple) else (e,))
  }
  if axis in used:
    return spec
  for dim, entry in enumerate(entries):
    names = (
      () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    )
    ways = math.prod(mesh.shape[a] for a in names) * mesh.shape[axis]
    if shape[dim] % ways == 0:
      # The parameter's own axes first: each of its shards is then split
      # further among the devices holding it (no permutation needed).
      entries[dim] = axis if not names else (*names, axis)
      return PartitionSpec(*entries)
  return spec


def state_shardings(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  zero1_axis: str | None = None,
) -> Any:
  """The shardings of ``tx.init(params)``'s state, as a tree like it.

  Every state array shaped like a parameter (moments, momentum) gets that
  parameter's sharding; everything else (step counts, hyperparameters) is
  replicated on the parameters' mesh.

  Args:
    tx: the optimizer (any optax transformation whose state holds
      parameter-shaped trees, as ``rmsprop_jax.rmsprop``'s by default; not
      with packing=True or an 8-bit ``nu``).
    params: the parameters, as ``jax.Array`` values or as
      ``jax.ShapeDtypeStruct`` values with a ``sharding``.
    zero1_axis: a mesh axis (e.g. ``'data'``) to split the state over as
      well, where the parameter is not split over it already (ZeRO-1): on
      the first dimension that stays evenly divisible, else not at all.

  Returns:
    A tree of shardings with the structure of the state, for ``jax.jit``'s
    ``out_shardings`` (``jax.jit(tx.init, out_shardings=...)``) or
    ``jax.device_put``.

  Raises:
    ValueError: if a parameter has no sharding (neither a ``jax.Array`` nor
      a ``jax.ShapeDtypeStruct`` with one), if the state is packed or holds
      an 8-bit ``nu``, if the parameters' shardings are not
      ``NamedSharding`` on a concrete mesh (or replicated), or if
      ``zero1_axis`` is not an axis of that mesh.

  Examples:
    >>> import jax, jax.numpy as jnp, rmsprop_jax
    >>> tx = rmsprop_jax.rmsprop(1e-3, momentum=0.9)
    >>> params = {'w': jnp.zeros((4, 2))}
    >>> shardings = rmsprop_jax.state_shardings(tx, params)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
  """
  shardings = jax.tree.map(_sharding_of, params)
  abstract_params = jax.tree.map(
    lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
    params,
    shardings,
  )
  state = jax.eval_shape(tx.init, abstract_params)
  odd = [
    x
    for x in jax.tree.leaves(
      state,
      is_leaf=lambda x: isinstance(
        x, (packing.Packed, packing.PackedState, quantization.Blockwise8bit)
      ),
    )
    if not isinstance(x, jax.ShapeDtypeStruct)
  ]
  if odd:
    raise ValueError(
      'state_shardings: the state holds '
      f'{type(odd[0]).__name__} parts (packed small leaves or an 8-bit '
      'nu), which are not laid out like the parameters; build the '
      'optimizer with packing=False and a float nu_dtype for a sharded '
      'state.'
    )
  first = jax.tree.leaves(shardings)[0]
  mesh = getattr(first, 'mesh', None)
  if isinstance(mesh, jax.sharding.Mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
  elif first.is_fully_replicated:
    replicated = first
  else:
    raise ValueError(
      'state_shardings: the parameters need NamedSharding on a concrete Mesh.'
    )

  def follow(leaf, param, sharding):
    if zero1_axis is None or not isinstance(sharding, NamedSharding):
      return sharding
    return NamedSharding(
      sharding.mesh,
      _with_axis(sharding.spec, tuple(param.shape), sharding.mesh, zero1_axis),
    )

  if zero1_axis is not None and (
    mesh is None or zero1_axis not in mesh.axis_names
  ):
    raise ValueError(f'state_shardings: the mesh has no axis {zero1_axis!r}.')
  return optax.tree_map_params(
    tx,
    follow,
    state,
    abstract_params,
    shardings,
    transform_non_params=lambda _: replicated,
  )
