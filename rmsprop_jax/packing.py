"""Packing small leaves into stacks, so that a step over a tree of many small
parameters runs as a few large array operations.

XLA:CPU runs each leaf's update as its own kernel, and every array crossing
the ``jit`` boundary costs dispatch time: on a tree of thousands of small
leaves that per-leaf cost, not memory traffic, is the step time.
:func:`pack_small_leaves` wraps an elementwise transformation so that it sees
one stacked array per group of small leaves of the same dtype and shape (a
model's repeated layers) in place of the leaves; its state (the moments and
the momentum) stays stacked between steps. Each step stacks the small
gradients (one copy) and slices the updates back out (one copy), so packing
pays only below a leaf size: :data:`PACK_MAX_SIZE`, measured with
``python -m benchmarks`` (see the benchmarks in the documentation).

Stacking keeps each leaf's shape, so XLA computes every element with the same
code as on the separate leaf, and packing changes no bit. (Flattening would
not: XLA:CPU contracts ``nu - mu**2`` into a fused multiply-add for some
shapes and not for others, e.g. a (4, 3) leaf against the same 12 values
flattened, 1 ulp apart.) It changes the state's layout, which is why
packing is opt-in (``rmsprop(..., packing=True)``): a packed state is not
``optax.rmsprop``'s.
:func:`unpack_state` turns it into optax's layout (to save a checkpoint any
optax user can read, or to inspect it), and :func:`pack_state` turns an
optax-layout state (a restored optax checkpoint) into the packed one. The
packing depends only on the parameters' shapes and dtypes, never on the
backend or the number of devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _serialization, _validation, quantization

# Largest leaf (in elements) that is packed, and most leaves in one stack.
# Measured on a 2-core CPU against optax's per-leaf step (jitted, donated):
# - 2,000 leaves of 64 elements: 1.5x faster (2.1x centered + momentum);
#   300 of 1,024: 1.5x (2.9x); 16 of 1,024: the same (1.5x); but 16 of
#   4,096: 0.6x (1.25x), as the two copies outweigh the per-leaf saving.
# - Slicing the leaves back out costs XLA:CPU one kernel per distinct row of
#   a stack shape (equal stacks share them): compile time grows with the
#   rows per stack. 8 rows keep most of the speed of 32 (1.5x against 1.6x
#   on a model of 40 repeated blocks) at a third of the compile time, close
#   to optax's (4.4 s against 3.4 s; 4 rows: 3.7 s, but only 1.4x faster).
PACK_MAX_SIZE = 1024
"""The largest leaf, in elements, that ``packing=True`` stacks (1,024)."""
PACK_MAX_ROWS = 8
"""The most leaves in one stack (8)."""


class _Slot(NamedTuple):
  """Where one leaf of the original tree lives in a :class:`Packed` tree."""

  group: int  # Index into ``Packed.stacks``, or -1 for a leaf kept as is.
  row: int  # Row in that stack, or index into ``Packed.rest``.


class Layout(NamedTuple):
  """The static description of a packing: hashable, so it lives in treedefs.

  It leaves out the tree's own structure, so that gradients (plain arrays)
  and parameters (e.g. Flax ``nnx.Param`` variables) pack alike.
  """

  slots: tuple[_Slot, ...]  # One per original leaf, in leaf order.
  groups: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) per stack.
  shapes: tuple[tuple[int, ...], ...]  # Each original leaf's shape.


@jax.tree_util.register_pytree_with_keys_class
class Packed:
  """A tree like the parameters, with its small leaves stacked.

  ``stacks[k]`` has shape ``(n_k, *shape_k)``: the ``n_k`` small leaves of
  dtype and shape ``layout.groups[k]``, one per row; ``rest`` holds the other
  leaves unchanged, in leaf order. ``treedef`` (static, with ``layout``) is
  the structure of the parameters the tree stands for: :func:`unpack`
  rebuilds it.
  """

  def __init__(self, stacks, rest, layout: Layout, treedef: Any):
    self.stacks = tuple(stacks)
    self.rest = tuple(rest)
    self.layout = layout
    self.treedef = treedef

  def keys(self) -> list[str]:
    """The names of the children, in order (also their checkpoint keys)."""
    return [
      f'{_group_name(*group)}_{g}' for g, group in enumerate(self.layout.groups)
    ] + [f'leaf_{i}' for i in range(len(self.rest))]

  def tree_flatten_with_keys(self):
    children = self.stacks + self.rest
    return (
      [(jax.tree_util.GetAttrKey(k), x) for k, x in zip(self.keys(), children)],
      (self.layout, self.treedef),
    )

  @classmethod
  def tree_unflatten(cls, aux, children):
    layout, treedef = aux
    n = len(layout.groups)
    return cls(children[:n], children[n:], layout, treedef)

  def __eq__(self, other):
    # Compares as a container (e.g. two equal trees of dtypes).
    return (
      isinstance(other, Packed)
      and self.layout == other.layout
      and self.treedef == other.treedef
      and self.stacks + self.rest == other.stacks + other.rest
    )

  def __hash__(self):
    return hash((self.layout, self.treedef, self.stacks + self.rest))

  def __repr__(self):
    stacks = ', '.join(
      f'{_group_name(*g)}: {getattr(x, "shape", "?")}'
      for g, x in zip(self.layout.groups, self.stacks)
    )
    return (
      f'Packed({len(self.layout.slots)} leaves; stacks {{{stacks}}}; '
      f'{len(self.rest)} leaves kept)'
    )


def _group_name(dtype: str, shape: tuple[int, ...]) -> str:
  return f'{dtype}_{"x".join(map(str, shape)) or "scalar"}'


def layout_of(
  tree: Any, max_size: int = PACK_MAX_SIZE, max_rows: int = PACK_MAX_ROWS
) -> Layout:
  """The packing of ``tree``: leaves of at most ``max_size`` elements that
  share their dtype and shape with at least one other leaf are stacked, at
  most ``max_rows`` to a stack."""
  leaves = jax.tree.leaves(tree)
  keys = [(jnp.result_type(x).name, tuple(np.shape(x))) for x in leaves]
  members: dict[tuple, list[int]] = {}
  for i, key in enumerate(keys):
    if math.prod(key[1]) <= max_size:
      members.setdefault(key, []).append(i)
  groups, rows = [], []
  for key, idx in members.items():
    for start in range(0, len(idx), max_rows):
      if len(idx[start : start + max_rows]) > 1:
        groups.append(key)
        rows.append(idx[start : start + max_rows])
  slots: list[_Slot | None] = [None] * len(leaves)
  for g, members_g in enumerate(rows):
    for row, i in enumerate(members_g):
      slots[i] = _Slot(g, row)
  rest = iter(range(len(leaves)))  # The leaves kept as they are, in order.
  placed = tuple(_Slot(-1, next(rest)) if s is None else s for s in slots)
  return Layout(placed, tuple(groups), tuple(k[1] for k in keys))


def pack(tree: Any, layout: Layout, treedef: Any = None) -> Any:
  """Packs ``tree`` (a tree like the one ``layout`` was made from; its
  structure is recorded unless ``treedef`` is given); a tree with nothing to
  stack is returned as it is. Raises ``ValueError`` if the leaves of one
  stack do not share a dtype (stacking would promote them)."""
  if not layout.groups:
    return tree
  leaves = jax.tree.leaves(tree)
  rows: list[list[jax.Array]] = [[] for _ in layout.groups]
  rest = []
  for x, slot in zip(leaves, layout.slots):
    if slot.group < 0:
      rest.append(x)
    else:
      rows[slot.group].append(x)
  for group, row in zip(layout.groups, rows):
    dtypes = sorted({jnp.result_type(x).name for x in row})
    if len(dtypes) > 1:
      raise ValueError(
        f'packing: the leaves stacked as {_group_name(*group)} come in '
        f'several dtypes ({", ".join(dtypes)}); stacking would change '
        'their arithmetic. Give them one dtype, or build the optimizer '
        'with packing=False.'
      )
  return Packed(
    [jnp.stack(r) for r in rows],
    rest,
    layout,
    jax.tree.structure(tree) if treedef is None else treedef,
  )


def unpack(packed: Any, treedef: Any = None) -> Any:
  """The tree that a :class:`Packed` tree stands for, with the structure it
  recorded or ``treedef`` (anything else is returned as it is)."""
  if not isinstance(packed, Packed):
    return packed
  layout = packed.layout
  treedef = packed.treedef if treedef is None else treedef
  assert treedef.num_leaves == len(layout.slots), (treedef, layout)
  leaves = []
  for slot in layout.slots:
    if slot.group < 0:
      leaves.append(packed.rest[slot.row])
    else:
      stack = packed.stacks[slot.group]
      # The row axis precedes the leaf's own axes (and follows any axes
      # that vmap added in front).
      axis = stack.ndim - len(layout.groups[slot.group][1]) - 1
      leaves.append(jax.lax.index_in_dim(stack, slot.row, axis, keepdims=False))
  return treedef.unflatten(leaves)


def is_packed(state: Any) -> bool:
  """Whether ``state`` holds a packed part (:class:`PackedState`)."""
  return any(
    isinstance(x, PackedState)
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, PackedState)
    )
  )


def unpack_state(state: Any, params: Any = None) -> Any:
  """``state`` in ``optax.rmsprop``'s layout: every :class:`PackedState`
  replaced by the state it wraps, with its small leaves unstacked, and every
  8-bit moment (:class:`rmsprop_jax.quantization.Blockwise8bit`) as a
  float32 array. ``optax.tree.get(unpack_state(state), 'nu')`` is the second
  moment as a tree like the parameters, and a state from
  ``rmsprop(..., packing=True)`` with optax's arguments becomes exactly the
  state ``optax.rmsprop`` would hold (to save as a checkpoint any optax user
  can restore). Works under ``jit`` and on ``vmap``-ed states; a state with
  nothing packed is returned as it is. :func:`pack_state` is the inverse.

  ``params`` (the parameters, or a tree of their shapes) is needed only
  for an 8-bit state that its container wrote back as plain mappings
  (``flax.nnx.Optimizer`` rebuilds each coded moment as an ``nnx.State``
  of ``codes`` and ``scale``, which does not record the shape); without
  it such a state raises ``ValueError``. Flax NNX variables (the
  ``OptVariable`` wrappers of an ``nnx.Optimizer``'s ``opt_state``, the
  ``Param`` of its parameters) are read as their values.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
    >>> params = {'a': jnp.zeros(3), 'b': jnp.ones(3)}
    >>> tx = rmsprop_jax.rmsprop(0.1, packing=True)
    >>> state = tx.init(params)
    >>> plain = rmsprop_jax.unpack_state(state)
    >>> jax.tree.structure(plain) == jax.tree.structure(
    ...     optax.rmsprop(0.1).init(params))
    True
  """
  state = _validation.nnx_values(state)
  if params is not None:
    state = quantization._rebuild_tree(state, _validation.nnx_values(params))
  quantization._check_not_rebuilt(state, 'unpack_state')
  state = quantization.dequantize_tree(state)

  def visit(x):
    if isinstance(x, PackedState):
      return unpack_state(x.inner)
    return unpack(x)

  return jax.tree.map(
    visit, state, is_leaf=lambda x: isinstance(x, (PackedState, Packed))
  )


def pack_state(
  state: Any, tx: optax.GradientTransformation, params: Any
) -> Any:
  """``state``, a state in ``optax.rmsprop``'s layout, laid out as
  ``tx.init(params)`` lays out its own: the inverse of :func:`unpack_state`.

  Use it to continue from an optax (or unpacked) checkpoint with an
  optimizer built with ``packing=True`` or a narrow ``nu_dtype``: restore
  the checkpoint as the plain state it is, then convert. Small leaves are
  stacked where ``tx`` stacks them, each array is cast to the dtype of
  ``tx``'s own state (``nu_dtype``), coded where ``tx`` keeps an 8-bit
  ``nu`` (a lossy step, rounded stochastically), and a step ``count`` that
  ``tx`` keeps (stochastic rounding, the 8-bit code) but ``state`` lacks
  starts at zero. A state already in ``tx``'s layout is unpacked and laid
  out again, so it comes back as it was.

  Args:
    state: the optimizer state to convert (arrays, or anything
      ``jax.numpy`` accepts).
    tx: the optimizer that will continue from it.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct`` values), as
      passed to ``tx.init``.

  Returns:
    A state with the structure, shapes and dtypes of ``tx.init(params)``.

  Raises:
    ValueError: if ``state`` does not fit ``tx``'s state (another variant,
      e.g. centered against not, or other parameter shapes), naming the
      first place where they differ.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
    >>> params = {'a': jnp.zeros(3), 'b': jnp.ones(3)}
    >>> plain = optax.rmsprop(0.1).init(params)  # e.g. from a checkpoint
    >>> tx = rmsprop_jax.rmsprop(0.1, packing=True)
    >>> state = rmsprop_jax.pack_state(plain, tx, params)
    >>> jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    True
  """
  # Flax NNX variables (an nnx.State of Params) are read as their values:
  # the result holds arrays, as unpack_state's does.
  target = jax.eval_shape(tx.init, _validation.nnx_values(params))
  return _convert(unpack_state(state, params), target, '')


def _convert(src: Any, tgt: Any, path: str) -> Any:
  """``src`` (an unpacked state) in the layout of the abstract state ``tgt``."""
  where = path or '(the root)'
  if isinstance(tgt, PackedState):
    return PackedState(_convert(src, tgt.inner, path + '.inner'))
  if isinstance(tgt, Packed):
    leaves = jax.tree.leaves(src)
    if len(leaves) != len(tgt.layout.slots) or any(
      np.shape(x) != s for x, s in zip(leaves, tgt.layout.shapes)
    ):
      raise ValueError(
        f'pack_state: the state at {where} does not hold a tree like the '
        'parameters (its leaves or their shapes differ).'
      )
    packed = pack(
      jax.tree.unflatten(tgt.treedef, leaves), tgt.layout, tgt.treedef
    )
    return jax.tree.map(lambda x, t: _convert(x, t, path), packed, tgt)
  if isinstance(tgt, quantization.Blockwise8bit):
    if isinstance(src, (tuple, list, dict)) or np.shape(src) != tgt.shape:
      raise ValueError(
        f'pack_state: the state at {where} should be an array of shape '
        f'{tgt.shape}, not {_describe(src)}.'
      )
    return quantization.quantize(jnp.asarray(src, jnp.float32), 0, 0)
  if isinstance(tgt, jax.ShapeDtypeStruct):
    if isinstance(src, (tuple, list, dict)) or np.shape(src) != tgt.shape:
      raise ValueError(
        f'pack_state: the state at {where} should be an array of shape '
        f'{tgt.shape}, not {_describe(src)}.'
      )
    return jnp.asarray(src).astype(tgt.dtype)
  # skip_nonfinite wraps the state in optax's ApplyIfFiniteState: a plain
  # state is wrapped (no step skipped yet), a wrapped one unwrapped.
  if isinstance(tgt, optax.ApplyIfFiniteState) and not isinstance(
    src, optax.ApplyIfFiniteState
  ):
    return optax.ApplyIfFiniteState(
      notfinite_count=jnp.zeros(tgt.notfinite_count.shape, jnp.int32),
      last_finite=jnp.ones(tgt.last_finite.shape, jnp.bool_),
      total_notfinite=jnp.zeros(tgt.total_notfinite.shape, jnp.int32),
      inner_state=_convert(src, tgt.inner_state, path + '.inner_state'),
    )
  if isinstance(src, optax.ApplyIfFiniteState) and not isinstance(
    tgt, optax.ApplyIfFiniteState
  ):
    return _convert(src.inner_state, tgt, path)
  if hasattr(tgt, '_fields'):  # A NamedTuple state; match fields by name.
    fields = getattr(src, '_fields', ())
    missing = [f for f in tgt._fields if f not in fields and f != 'count']
    if missing or not isinstance(src, tuple):
      raise ValueError(
        f'pack_state: the state at {where} should be a '
        f'{type(tgt).__name__} with fields {tgt._fields}, not '
        f'{_describe(src)}: it comes from another optimizer or variant.'
      )
    return type(tgt)(
      **{
        f: (
          _convert(getattr(src, f), getattr(tgt, f), f'{path}.{f}')
          if f in fields
          else jnp.zeros(tgt.count.shape, tgt.count.dtype)
        )
        for f in tgt._fields
      }
    )
  if isinstance(tgt, (tuple, list)):
    if not isinstance(src, (tuple, list)) or len(src) != len(tgt):
      raise ValueError(
        f'pack_state: the state at {where} should be a sequence of '
        f'{len(tgt)}, not {_describe(src)}.'
      )
    return type(tgt)(
      _convert(x, t, f'{path}[{i}]') for i, (x, t) in enumerate(zip(src, tgt))
    )
  if isinstance(tgt, Mapping) and (
    isinstance(tgt, dict) or type(src) is not type(tgt)
  ):
    # A dict, or another kind of mapping than the source's (a state built
    # from dict parameters, converted for FrozenDict ones): key by key.
    if not isinstance(src, Mapping) or set(src) != set(tgt):
      raise ValueError(
        f'pack_state: the state at {where} should be a mapping with keys '
        f'{sorted(tgt)[:6]}, not {_describe(src)}.'
      )
    converted = {k: _convert(src[k], tgt[k], f'{path}[{k!r}]') for k in tgt}
    rebuild: Any = type(tgt)
    return converted if isinstance(tgt, dict) else rebuild(converted)
  if tgt is None or not jax.tree.leaves(tgt):
    return tgt  # EmptyState, MaskedNode, None and the like: nothing to move.
  # Any other node (a FrozenDict, an nnx.State, a Flax variable): the same
  # nodes down to tgt's arrays and our own layout nodes (an 8-bit moment
  # stands where the source has an array), converted one by one.
  ours = lambda x: isinstance(
    x, (PackedState, Packed, quantization.Blockwise8bit)
  )
  parts = jax.tree_util.tree_flatten_with_path(tgt, is_leaf=ours)[0]
  structure: Any = jax.tree.structure(tgt, is_leaf=ours)
  try:
    src_parts = structure.flatten_up_to(src)
  except (ValueError, TypeError):
    raise ValueError(
      f'pack_state: the state at {where} is not laid out like the '
      'parameters, '
      + _validation.first_difference(src, _tree_of_arrays(tgt, ours))
      + ': it comes from another optimizer, variant or model.'
    ) from None
  return structure.unflatten(
    [
      _convert(x, t, path + jax.tree_util.keystr(p))
      for x, (p, t) in zip(src_parts, parts)
    ]
  )


def _tree_of_arrays(tree: Any, is_node: Any) -> Any:
  """``tree`` with each node that ``is_node`` selects (an 8-bit moment, a
  stack) shown as the one array it stands for (for error messages)."""
  return jax.tree.map(
    lambda x: (
      jax.ShapeDtypeStruct(getattr(x, 'shape', ()), jnp.float32)
      if is_node(x)
      else x
    ),
    tree,
    is_leaf=is_node,
  )


def _describe(x: Any) -> str:
  if hasattr(x, '_fields'):
    return f'a {type(x).__name__} with fields {x._fields}'
  if hasattr(x, 'shape'):
    return f'an array of shape {tuple(x.shape)}'
  if isinstance(x, (tuple, list)):
    return f'a {type(x).__name__} of {len(x)}'
  if isinstance(x, Mapping):
    return f'a {type(x).__name__} with keys {sorted(map(str, x))[:6]}'
  return f'a {type(x).__name__}'


@jax.tree_util.register_pytree_with_keys_class
class PackedState:
  """State of :func:`pack_small_leaves`: the inner state, built from the
  packed parameters (its parameter-shaped parts are :class:`Packed` trees).

  It has no static data of its own, so ``optax.tree_map_params`` (which
  calls ``init`` on a placeholder with no leaves) sees the same structure,
  and maps its function over each stack.
  """

  def __init__(self, inner: optax.OptState):
    self.inner = inner

  def tree_flatten_with_keys(self):
    return [(jax.tree_util.GetAttrKey('inner'), self.inner)], None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(children[0])

  def __eq__(self, other):
    # Compares as a container, so that two equal trees of dtypes (or
    # shapes) of states compare equal.
    return isinstance(other, PackedState) and self.inner == other.inner

  def __hash__(self):
    return hash(('PackedState', self.inner))

  def __repr__(self):
    return f'PackedState(inner={self.inner!r})'


def pack_small_leaves(
  inner: optax.GradientTransformation,
  max_size: int = PACK_MAX_SIZE,
  max_rows: int = PACK_MAX_ROWS,
  *,
  name: str = 'pack_small_leaves',
) -> optax.GradientTransformationExtraArgs:
  """Runs the elementwise ``inner`` on packed small leaves.

  Leaves of at most ``max_size`` elements are stacked, one stack per dtype
  and shape shared by at least two of them, before ``inner`` sees them, and
  the updates are sliced back out; ``inner``'s state is created from the
  packed parameters and so stays packed between steps. ``inner`` must treat
  every element alike (as RMSprop, momentum, learning rates and unmasked
  weight decay do): then the updates are bit-for-bit those of ``inner``
  alone. Per-leaf operations (masks, per-leaf norms) would see stacks
  instead of leaves.

  Args:
    inner: the transformation to run on the packed tree.
    max_size: the largest leaf, in elements, to pack.
    max_rows: the most leaves in one stack.
    name: the name its error messages start with.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`PackedState`; :func:`unpack_state` gives ``inner``'s state in the
    parameters' layout.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _validation.check_float_leaves(name, 'parameter', params)
    # (``optax.tree_map_params`` passes a placeholder with no leaves: nothing
    # is stacked, and the placeholder stands where the Packed trees are.)
    _serialization.register_with_flax()
    return PackedState(
      inner.init(pack(params, layout_of(params, max_size, max_rows)))
    )

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, PackedState):
      raise ValueError(
        f'{name}: this optimizer packs small leaves (packing=True), but the '
        f'state is a {type(state).__name__}, not a PackedState: it has '
        "the plain layout of optax.rmsprop's state (e.g. restored from an "
        'optax checkpoint). Convert it once with '
        '`state = rmsprop_jax.pack_state(state, tx, params)`.'
      )
    _validation.check_float_leaves(name, 'gradient', updates)
    ref = next(
      (
        x
        for x in jax.tree.leaves(
          state.inner, is_leaf=lambda x: isinstance(x, Packed)
        )
        if isinstance(x, Packed)
      ),
      None,
    )
    if ref is not None:
      leaves = jax.tree.leaves(updates)
      if len(leaves) != len(ref.layout.slots) or any(
        np.shape(x) != s for x, s in zip(leaves, ref.layout.shapes)
      ):
        # Name the leaf where the structures or shapes differ.
        _validation.check_same_tree(
          name,
          'gradient',
          updates,
          'optimizer state',
          ref.treedef.unflatten(
            [jax.ShapeDtypeStruct(s, jnp.float32) for s in ref.layout.shapes]
          ),
        )
        raise ValueError(
          f'{name}: the gradients do not match the '
          'parameters the state was created from.'
        )
      updates_in = pack(updates, ref.layout, ref.treedef)
      params = None if params is None else pack(params, ref.layout, ref.treedef)
    else:
      updates_in = updates
    new, inner_state = inner.update(
      jax.lax.optimization_barrier(updates_in),
      state.inner,
      params,
      **extra_args,
    )
    return unpack(new, jax.tree.structure(updates)), PackedState(inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
