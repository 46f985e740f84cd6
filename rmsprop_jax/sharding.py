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
  spec: PartitionSpec,
  shape: tuple[int, ...],
  mesh,
  axis: str,
  fits=lambda dim, ways: True,
) -> PartitionSpec:
  """``spec`` also split over ``axis``, on the first dimension that stays
  evenly divisible (and for which ``fits(dim, ways)``); unchanged if
  ``axis`` is already used or none fits."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if any(axis in quantization._axes(e) for e in entries):
    return spec
  for dim, entry in enumerate(entries):
    names = quantization._axes(entry)
    ways = math.prod(mesh.shape[a] for a in names) * mesh.shape[axis]
    if shape[dim] % ways == 0 and fits(dim, ways):
      # The parameter's own axes first: each of its shards is then split
      # further among the devices holding it (no permutation needed).
      entries[dim] = axis if not names else (*names, axis)
      return PartitionSpec(*entries)
  return spec


def _code_shardings(q, spec: PartitionSpec, mesh) -> Any:
  """The shardings of an 8-bit code whose codes are laid out by ``spec``
  (the parameter's, with ZeRO-1's axis): its scales follow them on the
  axes before the blocks, and on the blocks' first axis where that is cut
  in whole blocks (else they are replicated along it: XLA then gathers
  the block maxima at each update)."""
  shape = tuple(q.shape)
  k, _, _ = quantization.block_layout(shape)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  last = None
  if k < len(shape) and quantization._split_in_whole_blocks(
    entries, mesh, shape
  ):
    last = entries[k]
  scale = PartitionSpec(*entries[:k], last)
  return quantization.Blockwise8bit(
    NamedSharding(mesh, PartitionSpec(*entries)),
    NamedSharding(mesh, scale),
    shape,
  )


def state_shardings(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  zero1_axis: str | None = None,
) -> Any:
  """The shardings of ``tx.init(params)``'s state, as a tree like it.

  Every state array shaped like a parameter (moments, momentum, in any
  float ``nu_dtype``) gets that parameter's sharding; everything else (step
  counts, hyperparameters) is replicated on the parameters' mesh. An 8-bit
  ``nu`` (:class:`rmsprop_jax.quantization.Blockwise8bit`) keeps its codes
  in the parameter's shape and sharding, and its block scales
  (:func:`rmsprop_jax.quantization.scale_shape`) are split along with them
  wherever each shard holds whole blocks: on the axes before the blocks'
  (:func:`rmsprop_jax.quantization.block_layout`), and on their first axis
  when each shard of it is a multiple of 256 elements. The update then
  needs no communication; a parameter split inside its blocks (a last axis
  of 384 split in two) keeps its scales whole along that axis, and XLA
  gathers them at each update.

  Args:
    tx: the optimizer (any optax transformation whose state holds
      parameter-shaped trees, as ``rmsprop_jax.rmsprop``'s; not with
      ``packing=True``, a single-device speed option).
    params: the parameters, as ``jax.Array`` values or as
      ``jax.ShapeDtypeStruct`` values with a ``sharding``.
    zero1_axis: a mesh axis (e.g. ``'data'``) to split the state over as
      well, where the parameter is not split over it already (ZeRO-1): on
      the first dimension that stays evenly divisible (with an 8-bit
      ``nu``, in whole blocks), else not at all.

  Returns:
    A tree of shardings with the structure of the state, for ``jax.jit``'s
    ``out_shardings`` (``jax.jit(tx.init, out_shardings=...)``) or
    ``jax.device_put``.

  Raises:
    ValueError: if a parameter has no sharding (neither a ``jax.Array`` nor
      a ``jax.ShapeDtypeStruct`` with one), if the state is packed, if the parameters' shardings are not
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
  packed = [
    x
    for x in jax.tree.leaves(
      state,
      is_leaf=lambda x: isinstance(x, (packing.Packed, packing.PackedState)),
    )
    if isinstance(x, (packing.Packed, packing.PackedState))
  ]
  if packed:
    raise ValueError(
      'state_shardings: the state is packed (packing=True stacks small '
      'leaves into shared arrays, a single-device CPU speed option that '
      'buys nothing on a mesh); build the optimizer with packing=False '
      '(the default on several devices) for a sharded state.'
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

  # With an 8-bit code, ZeRO-1 splits each parameter's other state arrays
  # (mu, the momentum buffer) where it splits its code, in whole blocks:
  # arrays of one parameter split differently would move at every update.
  any_coded = any(
    isinstance(x, quantization.Blockwise8bit)
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, quantization.Blockwise8bit)
    )
  )

  def follow(leaf, param, sharding):
    if isinstance(leaf, optax.MaskedNode):  # optax.masked's masked-out leaf.
      return leaf
    coded = isinstance(leaf, quantization.Blockwise8bit)
    if not isinstance(sharding, NamedSharding):
      if coded:
        # A replicated (or single-device) parameter: so is its code.
        return quantization.Blockwise8bit(sharding, sharding, leaf.shape)
      return sharding
    spec = sharding.spec
    if zero1_axis is not None:
      shape = tuple(param.shape)
      spec = _with_axis(
        spec,
        shape,
        sharding.mesh,
        zero1_axis,
        lambda d, w: not any_coded or quantization._blocks_fit(shape, d, w),
      )
    if coded:
      return _code_shardings(leaf, spec, sharding.mesh)
    return NamedSharding(sharding.mesh, spec)

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
    transform_non_params=lambda x: jax.tree.map(lambda _: replicated, x),
    is_leaf=lambda x: isinstance(
      x, (quantization.Blockwise8bit, optax.MaskedNode)
    ),
  )
