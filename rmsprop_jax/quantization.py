"""Low-memory storage for the moment state: bfloat16 with stochastic rounding,
and an 8-bit blockwise code for the second moment.

The moments are always updated and used in float32; only their storage is
narrow. Rounding to nearest loses every change smaller than half a step of
the storage format: with ``decay=0.999`` the EMA moves by 0.1 % a step, below
bfloat16's resolution (0.4 %), and it stops following the gradients.
Stochastic rounding (round up with probability equal to the distance to the
lower neighbour) is unbiased, so the EMA follows them on average. Its random
bits are a cheap integer hash of the element's position, the step and the
leaf, not ``jax.random``: no key to carry, and nearly free (and the same for
every member of a ``vmap``).

The 8-bit code (:class:`Blockwise8bit`) stores, per block of
:data:`BLOCK_SIZE` elements, a scale in float32 and, per element, a tiny
unsigned float relative to it: 5 exponent bits ``e`` and 3 mantissa bits
``m`` (code ``8 * e + m``) standing for ``scale * 2**(e - 31) * (1 + m/8)``.
The scale bounds the block's values from above: :func:`quantize` takes the
block's maximum; the optimizer's update takes ``decay * old scale + (1 -
decay) * the block's largest g**2`` (computed with exact products, see
:func:`next_scale`), which bounds the new moment (the old one is at most
the old scale) and is reduced over the gradient alone, so
that no pass has to decode the state and write the new moment out before
it is coded. Since the code is a float relative to the scale, a scale
above the block's maximum costs no precision, only octaves at the bottom
of the range: it stays within ``1 / (1 - decay)`` of the maximum unless
elements take turns at the top (a factor of 10 at ``decay=0.9``, 1000 at
0.999: 3 and 10 of the 32 octaves).
The codes have the parameter's own shape, and the blocks run along its
trailing axes (see :func:`block_layout`), so that a block lies within one
shard wherever the parameter is sharded on its leading axes, or on its last
axis in whole blocks: the codes then take the parameter's sharding and the
update needs no communication (:func:`rmsprop_jax.sharding.state_shardings`).
The code book spans 32 octaves below the scale, 6.7 to 12.5 % apart,
and has no zero, so a positive second moment is never rounded to zero (which
would blow up ``1 / sqrt(nu)``); values below the smallest code round up to
it, and only a block that is entirely zero stores zero. Coding is integer
bit arithmetic on the float32 ratio to the scale (no logarithm, no
table), and rounds stochastically, without bias, like the bfloat16 state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from rmsprop_jax import _validation

BLOCK_SIZE = 256
"""Elements per block of the 8-bit code, each block with its own float32
maximum (256: 1/64 byte of scale per element)."""
CEILING = 2.0**125
"""The 8-bit code's largest stored value, 2**125, about 4.3e37. Larger
values, +inf included, are stored as it. It lies below float32's largest
value so that the block's scale has a normal float32 reciprocal: XLA:CPU
divides by multiplying with it, and flushes a subnormal one to zero."""
_MANTISSA_BITS = 3
_OCTAVES = 32
# The float32 exponent of the smallest code: 2**-31 is exponent 127 - 31.
_LOWEST_EXPONENT = 127 - (_OCTAVES - 1)
_DROPPED_BITS = 23 - _MANTISSA_BITS  # float32 mantissa bits below the code's.


def _lowbias32(h: jax.Array) -> jax.Array:
  """C. Wellons' ``lowbias32`` integer hash (uint32 in, uint32 out)."""
  u32 = lambda v: jnp.asarray(v, jnp.uint32)
  h = h ^ (h >> 16)
  h = h * u32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * u32(0x846CA68B)
  return h ^ (h >> 16)


def _salt_bits(salt) -> jax.Array:
  """``salt * 0xC2B2AE3D`` modulo 2**32, as uint32: from a Python int, or
  from a uint32 scalar (what the compiled :func:`quantize` takes, so that
  the leaves of a tree share one program)."""
  if isinstance(salt, (int, np.integer)):
    return jnp.asarray((int(salt) * 0xC2B2AE3D) & 0xFFFFFFFF, jnp.uint32)
  return jnp.asarray(salt, jnp.uint32) * jnp.uint32(0xC2B2AE3D)


def hash_bits(shape, step, salt: int) -> jax.Array:
  """32 pseudo-random bits per element: a hash of (position, step, salt).

  ``shape`` is the output's; ``step`` (an int32 scalar, traced or not) is
  the optimizer's step count and ``salt`` (a Python int, or a uint32
  scalar) tells leaves and moments apart, so that every element, step and
  leaf gets its own bits.
  The bits do not depend on the values or on any seed: the members of a
  ``vmap`` (an ensemble, or seeds trained side by side) round with the same
  bits, each still without bias. Returns a uint32 array of ``shape``.

  The step and the salt are mixed once, on the scalar, by ``lowbias32``
  (C. Wellons' integer hash) into a seed ``s``; each element's flat index
  ``i`` then costs one multiply and one xor-shift: ``h = (i ^ s) *
  0x9E3779B1``, ``h ^ (h >> 16)``. The bits only drive rounding (never
  anything a user reads as random numbers), and this is the cheapest hash
  whose low bits are still evenly spread: a full hash per element made the
  low-memory step compute-bound on a CPU.
  """
  return _hash(shape, step, _salt_bits(salt))


def _hash(shape, step, salt_bits: jax.Array) -> jax.Array:
  """:func:`hash_bits` with the salt already mixed (:func:`_salt_bits`)."""
  u32 = lambda v: jnp.asarray(v, jnp.uint32)
  seed = _lowbias32(
    jnp.asarray(step).astype(jnp.uint32) * u32(0x85EBCA77) + salt_bits
  )
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  h = (index ^ seed) * u32(0x9E3779B1)
  return h ^ (h >> 16)


def stochastic_round_bf16(x: jax.Array, step, salt: int) -> jax.Array:
  """float32 -> bfloat16, rounding up with probability equal to the distance
  to the lower neighbour (in magnitude). Infinities stay infinite, NaN
  stays NaN, and a finite value never becomes infinite (past the largest
  finite bfloat16 it saturates there). ``step`` and ``salt`` seed the random bits, as in
  :func:`hash_bits`; the result has ``x``'s shape, in bfloat16.

  Integer work only: 16 random bits are added below bfloat16's last
  mantissa bit and the top half of the float32 is kept (a carry moves the
  value up to the next bfloat16).

  Examples:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import quantization
    >>> x = jnp.full(4096, 1 + 2.0**-9)  # a quarter of the way up
    >>> r = quantization.stochastic_round_bf16(x, 0, 0)
    >>> sorted(set(r.tolist()))  # the two bfloat16 neighbours of 1 + 2**-9
    [1.0, 1.0078125]
    >>> bool(abs(r.astype(jnp.float32).mean() - x.mean()) < 1e-4)  # unbiased
    True
  """
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = hash_bits(x.shape, step, salt) & jnp.uint32(0xFFFF)
  top = (bits + noise) >> 16
  # A NaN whose payload lies in the dropped bits would truncate to an
  # infinity: keep it a (quiet) NaN. A finite value that a carry would take
  # past the largest finite bfloat16 saturates there (top - 1), as
  # :func:`saturating_cast` does: a finite moment is never stored as inf.
  finite = (bits & jnp.uint32(0x7F800000)) != jnp.uint32(0x7F800000)
  overflow = finite & ((top & jnp.uint32(0x7FFF)) == jnp.uint32(0x7F80))
  top = jnp.where(overflow, top - jnp.uint32(1), top)
  top = jnp.where(jnp.isnan(x), jnp.uint32(0x7FC0), top)
  return jax.lax.bitcast_convert_type(top.astype(jnp.uint16), jnp.bfloat16)


def _narrower(stored_dtype, compute_dtype) -> bool:
  """Whether a real float computed in ``compute_dtype`` is stored in a
  float of smaller range (a float16 ``nu`` computed in float32)."""
  return bool(
    jnp.issubdtype(stored_dtype, jnp.floating)
    and jnp.issubdtype(compute_dtype, jnp.floating)
    and jnp.finfo(stored_dtype).max < jnp.finfo(compute_dtype).max
  )


def saturating_cast(x: jax.Array, dtype) -> jax.Array:
  """``x.astype(dtype)``, except that a finite value beyond ``dtype``'s
  range is stored as ``dtype``'s largest finite value of the same sign,
  not as an infinity. Infinities and NaN are kept as they are.

  This is how every moment and momentum buffer is stored in a narrower
  float than it is computed in (a float16 ``nu`` computed in float32): an
  infinite ``nu`` would turn ``decay * nu`` into NaN at ``decay=0`` and
  stop that entry for good, where the maths has a finite answer. Casts
  to a dtype at least as wide, and non-float casts, are plain ``astype``
  (the same program as optax's).

  Examples:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import quantization
    >>> x = jnp.array([300.0**2, -1e9, jnp.inf])
    >>> quantization.saturating_cast(x, jnp.float16).tolist()
    [65504.0, -65504.0, inf]
  """
  x = jnp.asarray(x)
  dtype = jnp.dtype(dtype)
  if not _narrower(dtype, x.dtype):
    return x.astype(dtype)
  big = jnp.asarray(jnp.finfo(dtype).max, x.dtype)
  return jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x).astype(dtype)


def block_layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
  """Where the 8-bit code's blocks lie in an array of ``shape``.

  The blocks run along the trailing axes ``shape[k:]``, with ``k`` the
  largest index for which those axes hold at least :data:`BLOCK_SIZE`
  elements (``k = 0`` for a smaller array): each of the ``shape[:k]``
  slabs of ``m = prod(shape[k:])`` elements is cut, in row-major order,
  into ``ceil(m / b)`` blocks of ``b = min(BLOCK_SIZE, m)`` elements (its
  last block shorter where ``b`` does not divide ``m``). The block scales
  then have shape ``shape[:k] + (ceil(m / b),)``.

  A (1024, 4096) kernel has 16 blocks per row, (4096, 16) 256 blocks of
  16 rows each, (300,) two blocks (256 and 44 elements), a scalar one.

  Returns:
    ``(k, m, b)``.

  Examples:
    >>> from rmsprop_jax import quantization
    >>> quantization.block_layout((1024, 4096)), quantization.block_layout((4096, 16))
    ((1, 4096, 256), (0, 65536, 256))
  """
  shape = tuple(shape)
  k = len(shape)
  while k > 0 and math.prod(shape[k:]) < BLOCK_SIZE:
    k -= 1
  m = math.prod(shape[k:])
  return k, m, max(1, min(BLOCK_SIZE, m))


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of the block scales of an 8-bit code of an array of
  ``shape`` (see :func:`block_layout`)."""
  k, m, b = block_layout(shape)
  return tuple(shape[:k]) + (-(-m // b),)


@jax.tree_util.register_pytree_with_keys_class
class Blockwise8bit:
  """A non-negative float32 array in 8 bits per element plus one float32 per
  block: ``codes`` (uint8, the array's own ``shape``) and ``scale``
  (float32 upper bounds of the blocks' values, :func:`scale_shape` of
  it), each with any leading
  ``vmap`` axes; ``shape`` is the array's own (static).
  :func:`dequantize` gives the float32 array back."""

  def __init__(self, codes, scale, shape: tuple[int, ...]):
    self.codes = codes
    self.scale = scale
    self.shape = shape

  def tree_flatten_with_keys(self):
    return (
      [
        (jax.tree_util.GetAttrKey('codes'), self.codes),
        (jax.tree_util.GetAttrKey('scale'), self.scale),
      ],
      self.shape,
    )

  @classmethod
  def tree_unflatten(cls, shape, children):
    return cls(children[0], children[1], shape)

  def __eq__(self, other):
    # Compares as a container (e.g. two equal trees of dtypes).
    return (
      isinstance(other, Blockwise8bit)
      and self.shape == other.shape
      and (self.codes, self.scale) == (other.codes, other.scale)
    )

  def __hash__(self):
    return hash((self.shape, self.codes, self.scale))

  def __repr__(self):
    return f'Blockwise8bit(shape={self.shape})'


def _explicit_entries(x) -> list | None:
  """``x``'s ``PartitionSpec`` entries (one per axis) where it lies on a
  mesh with ``Explicit`` axes (whose shardings are part of its type), else
  None."""
  try:
    sharding = getattr(jax.typeof(x), 'sharding', None)
  except TypeError:  # Not a JAX type (a NumPy array): no mesh.
    return None
  mesh = getattr(sharding, 'mesh', None)
  spec = getattr(sharding, 'spec', None)
  if spec is None or not any(
    t == jax.sharding.AxisType.Explicit for t in getattr(mesh, 'axis_types', ())
  ):
    return None
  return list(spec) + [None] * (x.ndim - len(spec))


def _axes(entry) -> tuple[str, ...]:
  """The mesh axes of one ``PartitionSpec`` entry."""
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def _blocks_fit(shape: tuple[int, ...], dim: int, ways: int) -> bool:
  """Whether splitting ``shape``'s axis ``dim`` ``ways`` ways keeps every
  block (:func:`block_layout`) within one shard: an axis before the
  blocks' axes, or their first axis cut in whole blocks."""
  k, m, b = block_layout(shape)
  if ways == 1 or dim < k:
    return True
  return dim == k and m % ways == 0 and (m // ways) % b == 0


def _split_in_whole_blocks(entries, mesh, shape, batch: int = 0) -> bool:
  """Whether the spec ``entries`` (one per axis of an array ``batch +
  shape``) on ``mesh`` splits no block: nothing after the blocks' first
  axis is split, and that axis only in whole blocks."""
  k, _, _ = block_layout(shape)
  if any(e is not None for e in entries[batch + k + 1 :]):
    return False
  if k == len(shape):
    return True
  ways = math.prod(mesh.shape[a] for a in _axes(entries[batch + k]))
  return _blocks_fit(shape, k, ways)


def _to_blocks(x: jax.Array, shape: tuple[int, ...], fill) -> jax.Array:
  """``x`` (``batch + shape``) as ``batch + shape[:k] + (n_blocks, b)``,
  a short last block filled with ``fill``. On a mesh with ``Explicit``
  axes an ``x`` split inside its blocks is first gathered along the
  blocks' axes (with ``Auto`` axes XLA does that itself)."""
  k, m, b = block_layout(shape)
  n_blocks = -(-m // b)
  batch = x.shape[: x.ndim - len(shape)]
  entries = _explicit_entries(x)
  if entries is not None and not _split_in_whole_blocks(
    entries, jax.typeof(x).sharding.mesh, shape, len(batch)
  ):
    x = jax.sharding.reshard(
      x,
      jax.typeof(x).sharding.update(
        spec=PartitionSpec(
          *entries[: len(batch) + k], *[None] * (len(shape) - k)
        )
      ),
    )
  x = x.reshape(batch + tuple(shape[:k]) + (m,))
  if n_blocks * b != m:
    pad = [(0, 0)] * (x.ndim - 1) + [(0, n_blocks * b - m)]
    x = jnp.pad(x, pad, constant_values=fill)
  return x.reshape(batch + tuple(shape[:k]) + (n_blocks, b))


def _from_blocks(x: jax.Array, shape: tuple[int, ...], like=None) -> jax.Array:
  """The inverse of :func:`_to_blocks`; on a mesh with ``Explicit`` axes,
  laid out as ``like`` (the array that was cut into blocks)."""
  k, m, b = block_layout(shape)
  batch = x.shape[: x.ndim - k - 2]
  # The blocks' length written out: -1 is undefined for a zero-size slab.
  x = x.reshape(batch + tuple(shape[:k]) + (x.shape[-2] * x.shape[-1],))
  if x.shape[-1] != m:
    x = x[..., :m]
  x = x.reshape(batch + tuple(shape))
  entries = None if like is None else _explicit_entries(like)
  if entries is not None and entries != _explicit_entries(x):
    x = jax.sharding.reshard(
      x, jax.typeof(x).sharding.update(spec=PartitionSpec(*entries))
    )
  return x


def _block_abs_max_sq(g: jax.Array) -> jax.Array:
  """The largest ``|g|**2`` of each block of ``g`` (:func:`block_layout`'s
  blocks), float32 of shape :func:`scale_shape`.

  For real ``g`` it is the square of the larger of the block's maximum and
  minus its minimum, both from one reduction over ``g`` itself (a variadic
  ``lax.reduce``), which XLA reads in place and once: reducing ``g**2`` (or
  ``|g|``) would first write that array out, and a ``max`` and a ``min``
  apart compiled two kernels on small trees.

  A NaN in a block makes its result NaN, on every shape. (A
  ``jnp.max`` and a ``jnp.min`` did so only on some: XLA:CPU ran large
  ones as a library kernel that skips NaN, so the rest of the block's
  moment stayed finite there and became NaN elsewhere.) Without NaN the
  result is the same as theirs, bit for bit: maxima and minima are exact.
  """
  shape = tuple(g.shape)
  if jnp.iscomplexobj(g):
    sq = (g.conj() * g).real
    return _block_max(_to_blocks(sq, shape, 0)).astype(jnp.float32)
  # A short last block is filled with zeros, which leave max |g| as it is.
  blocks = _to_blocks(g, shape, 0)
  # The reduction starts from the dtype's finite extremes, not from -inf
  # and inf, which some float8 types lack. Every block holds at least one
  # value, so the result is the same: the start only ever wins where a
  # block's values all lie beyond it (all -inf, or all inf), and there
  # the other side is infinite.
  info = jnp.finfo(blocks.dtype)
  top, bottom = jax.lax.reduce(
    (blocks, blocks),
    (jnp.array(info.min, blocks.dtype), jnp.array(info.max, blocks.dtype)),
    _max_and_min,
    (blocks.ndim - 1,),
  )
  return jnp.square(jnp.maximum(top, -bottom)).astype(jnp.float32)


def _max_and_min(a, b):
  """:func:`_block_abs_max_sq`'s reduction: (max, min) pairs. One function
  for every call: ``lax.reduce`` caches its traced computation by this
  function, so an eager update compiles the reduction once per shape and
  dtype (a new ``lambda`` at each call compiled it at every call)."""
  return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])


def _block_max(blocks: jax.Array) -> jax.Array:
  """The maximum over the last axis of real ``blocks``, NaN where that
  axis holds a NaN, on every shape.

  XLA:CPU runs a large ``jnp.max`` as a library kernel that skips NaN (a
  (4096, 16) array cut into rows of 256 gave the largest number of a row
  holding a NaN), so the NaN is tracked apart, in the same single
  reduction: ``(max, any NaN)`` pairs."""
  lowest = jnp.array(jnp.finfo(blocks.dtype).min, blocks.dtype)
  top, nan = jax.lax.reduce(
    (blocks, jnp.isnan(blocks)),
    (lowest, jnp.array(False)),
    _max_and_any,
    (blocks.ndim - 1,),
  )
  return jnp.where(nan, jnp.array(jnp.nan, blocks.dtype), top)


def _max_and_any(a, b):
  """:func:`_block_max`'s reduction: (max, or) pairs (one function for
  every call, as :func:`_max_and_min`)."""
  return jnp.maximum(a[0], b[0]), a[1] | b[1]


def _round_bits(x: jax.Array, bits: int, up: bool) -> jax.Array:
  """Non-negative float32 ``x`` rounded up (or down) to ``bits``
  significant bits; NaN and inf stay as they are."""
  x = jnp.asarray(x, jnp.float32)
  raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
  low = jnp.uint32((1 << (24 - bits)) - 1)
  if up:
    raw = jnp.where((raw & low) != 0, (raw | low) + jnp.uint32(1), raw)
  else:
    raw = raw & ~low
  return jnp.where(
    jnp.isfinite(x), jax.lax.bitcast_convert_type(raw, jnp.float32), x
  )


def next_scale(scale: jax.Array, g: jax.Array, decay) -> jax.Array:
  """The 8-bit moment's new block scales in the optimizer's update: an
  upper bound of ``decay * nu + (1 - decay) * |g|**2`` over each block,
  given that ``nu`` is at most ``scale`` there.

  The bound is ``decay * scale + (1 - decay) * G``, ``G`` the block's
  largest ``|g|**2``, computed so that every product is exact: ``1 -
  decay`` rounded to 12 significant bits (down where it multiplies the
  scale, up where it multiplies ``G``), the scale split into two halves of
  12 bits, ``G`` rounded up to 12 bits, then ``((s - e * s_hi) - e * s_lo)
  + f * G``, at most :data:`CEILING`. Two XLA programs that fuse a
  multiply and an add into one instruction or not (``lax.scan`` against a
  plain loop, a sharded program against one device's) then store the same
  bits. The scale decays at ``1 - e``, within 2**-11 of the moment's own
  rate, at any ``decay`` below 1.

  Args:
    scale: float32, :func:`scale_shape`; the old scales.
    g: the gradient (float32 or complex64), the parameter's shape.
    decay: the moment's decay, a float or a traced scalar in [0, 1).

  Returns:
    float32 scales of ``scale``'s shape.
  """
  one_minus = 1 - jnp.asarray(decay, jnp.float32)
  e = _round_bits(one_minus, 12, up=False)
  f = _round_bits(one_minus, 12, up=True)
  s_hi = _round_bits(scale, 12, up=False)
  s_lo = scale - s_hi  # Exact: the scale's low 12 bits.
  big = _round_bits(_block_abs_max_sq(g), 12, up=True)
  bound = ((scale - e * s_hi) - e * s_lo) + f * big
  return jnp.minimum(bound, jnp.float32(CEILING))


def quantize(
  x: jax.Array, step, salt: int, scale: jax.Array | None = None
) -> Blockwise8bit:
  """Stores non-negative ``x`` (negative values count as zero, values
  above :data:`CEILING` and +inf as it, NaN as NaN, with its whole block)
  in 8 bits, rounding stochastically without bias; ``step`` and ``salt``
  seed the random bits, as in :func:`hash_bits`. The blocks that share a
  scale are :func:`block_layout`'s.

  ``scale`` (float32, :func:`scale_shape`), if given, is used as the
  blocks' scales instead of their maxima: an upper bound of each block's
  values, which the optimizer's update computes without reading the new
  moments first (see :func:`rmsprop_jax.scale_by_rms`). A value above it
  is stored as it. Without it, each block's scale is its maximum. A NaN
  is kept only through the scale: a given ``scale`` must be NaN where its
  block holds a NaN, as :func:`next_scale`'s is (a NaN under a finite
  scale is stored as 1.5 times it).

  Examples:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import quantization
    >>> q = quantization.quantize(jnp.array([1e-6, 0.5, 2.0]), 0, 0)
    >>> q.codes.dtype, q.codes.shape, q.scale  # one block, its maximum
    (dtype('uint8'), (3,), Array([2.], dtype=float32))
    >>> quantization.dequantize(q)
    Array([9.536743e-07, 5.000000e-01, 2.000000e+00], dtype=float32)
  """
  # One compiled program per shape (and dtype), for every leaf and salt:
  # called eagerly (``tx.init`` outside ``jit``, an eager update, the
  # conversions) it is one dispatch, not one per operation; under a trace
  # it is inlined.
  return _quantize(x, step, _salt_bits(salt), scale)


@jax.jit
def _quantize(x, step, salt_bits, scale):
  """:func:`quantize`, the salt mixed by :func:`_salt_bits`."""
  shape = tuple(x.shape)
  # An infinite value (a finite gradient whose square overflows float32)
  # saturates at CEILING: an infinite block maximum would decode every
  # element of the block as inf and stop all of them for good.
  blocks = _to_blocks(
    jnp.minimum(jnp.maximum(x.astype(jnp.float32), 0), jnp.float32(CEILING)),
    shape,
    0,
  )
  if scale is None:
    scale = _block_max(blocks)
    ratio = blocks / jnp.where(scale > 0, scale, 1)[..., None]  # In [0, 1].
  else:
    scale = jnp.minimum(scale, jnp.float32(CEILING))
    ratio = jnp.minimum(blocks / jnp.where(scale > 0, scale, 1)[..., None], 1)
  # Stochastic rounding to 3 mantissa bits: add random bits below them and
  # truncate (a carry moves up to the next octave, as it should).
  bits = jax.lax.bitcast_convert_type(ratio, jnp.uint32)
  noise = _hash(blocks.shape, step, salt_bits) & jnp.uint32(
    (1 << _DROPPED_BITS) - 1
  )
  bits = bits + noise
  exponent = (bits >> 23).astype(jnp.int32) - _LOWEST_EXPONENT
  mantissa = ((bits >> _DROPPED_BITS) & jnp.uint32(7)).astype(jnp.int32)
  codes = jnp.where(exponent < 0, 0, (exponent << _MANTISSA_BITS) | mantissa)
  return Blockwise8bit(
    _from_blocks(codes.astype(jnp.uint8), shape, like=x), scale, shape
  )


def _decode(codes: jax.Array, scale: jax.Array) -> jax.Array:
  """float32 values of ``codes`` (``(..., n_blocks, b)``) in blocks of
  ``scale`` (``(..., n_blocks)``)."""
  codes = codes.astype(jnp.uint32)
  bits = (((codes >> _MANTISSA_BITS) + jnp.uint32(_LOWEST_EXPONENT)) << 23) | (
    (codes & jnp.uint32(7)) << _DROPPED_BITS
  )
  scale = scale[..., None]
  values = scale * jax.lax.bitcast_convert_type(bits, jnp.float32)
  return jnp.where(
    scale > 0,
    jnp.maximum(values, jnp.float32(np.finfo(np.float32).tiny)),
    values,
  )


def dequantize(q: Blockwise8bit) -> jax.Array:
  """The float32 array that ``q`` stores (with any leading ``vmap`` axes).

  A positive stored value is at least the smallest normal float32 (XLA:CPU
  flushes subnormals to zero): it is never zero, even where
  ``scale * code`` would underflow.
  """
  return _dequantize(q)


@jax.jit
def _dequantize(q: Blockwise8bit) -> jax.Array:
  # Compiled as one program per shape (see quantize).
  return _from_blocks(
    _decode(_to_blocks(q.codes, q.shape, 0), q.scale), q.shape, like=q.codes
  )


def _is_rebuilt(x) -> bool:
  """Whether ``x`` is a :class:`Blockwise8bit` that a container rebuilt as
  a plain mapping of its two arrays (``flax.nnx`` writes an optimizer state
  back as ``nnx.State`` mappings; Flax state dicts and ``FrozenDict`` do
  the same). The mapping has lost the static ``shape``."""
  return (
    isinstance(x, Mapping)
    and set(x.keys()) == {'codes', 'scale'}
    and getattr(x['codes'], 'dtype', None) == jnp.uint8
  )


def _rebuild(tree, like):
  """``tree`` (an 8-bit moment: a tree like ``like``, the gradients or the
  parameters, whose leaves are :class:`Blockwise8bit`) with every leaf that
  a container rebuilt as a ``{'codes', 'scale'}`` mapping made a
  :class:`Blockwise8bit` again, its shape taken from ``like``'s leaf there.
  A tree that does not match ``like``'s structure is returned as it is
  (the caller's structure check names the difference)."""
  refs = jax.tree.leaves(like)
  # Typed Any: jaxlib's stub for PyTreeDef declares none of its methods.
  treedef: Any = jax.tree.structure(like)
  try:
    parts = treedef.flatten_up_to(tree)
  except (ValueError, TypeError):
    return tree
  if not any(_is_rebuilt(x) for x in parts):
    return tree
  return treedef.unflatten(
    [
      Blockwise8bit(x['codes'], x['scale'], tuple(np.shape(ref)))
      if _is_rebuilt(x)
      else x
      for x, ref in zip(parts, refs)
    ]
  )


def _rebuild_tree(state, params):
  """``state`` with every parameter-shaped part in it passed through
  ``_rebuild`` with ``params``' shapes."""
  treedef: Any = jax.tree.structure(params)

  def like_params(x) -> bool:
    try:
      treedef.flatten_up_to(x)
    except (ValueError, TypeError):
      return False
    return True

  if treedef.num_leaves == 1 and treedef.num_nodes == 1:
    like_params = _is_rebuilt  # A single array: only its own mapping.
  return jax.tree.map(
    lambda x: _rebuild(x, params) if like_params(x) else x,
    state,
    is_leaf=like_params,
  )


def _legacy_blocks(shape: tuple[int, ...]) -> tuple[int, int]:
  """The (n_blocks, block) of rmsprop_jax 0.1.0's 8-bit code of an array of
  ``shape``: blocks of 256 over the flattened array, the last one padded."""
  size = math.prod(shape)
  block = max(1, min(BLOCK_SIZE, size))
  return -(-size // block), block


def _legacy_batch(q: Blockwise8bit) -> tuple[int, ...] | None:
  """The leading ``vmap`` axes of ``q`` if it holds 0.1.0's layout (``()``
  for a single model), else None. No shape of this version's layout has
  0.1.0's shapes with another meaning: where both codes and scale shapes
  coincide (a single row of up to 256 elements), so do the blocks."""
  n_blocks, block = _legacy_blocks(q.shape)
  codes, scale = tuple(np.shape(q.codes)), tuple(np.shape(q.scale))
  batch = codes[:-2]
  if codes[-2:] != (n_blocks, block) or scale != batch + (n_blocks,):
    return None
  if codes == batch + tuple(q.shape) and scale == batch + scale_shape(q.shape):
    return None
  return batch


def _check_codes(tree, like, owner: str) -> None:
  """Raises ``ValueError`` where an 8-bit moment in ``tree`` (a tree like
  ``like``, the gradients) does not hold the code of its own leaf in this
  version's layout: 0.1.0's layout (restored from its checkpoint; the
  message names :func:`upgrade_state`), codes and scales of another shape
  (a checkpoint of another model restored into it), or another shape than
  the gradient's. Runs in Python while tracing."""
  treedef: Any = jax.tree.structure(like)
  try:
    parts = treedef.flatten_up_to(tree)
  except (ValueError, TypeError):
    return  # The structure check that follows names the difference.
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  for path, q, g in zip(paths, parts, jax.tree.leaves(like)):
    if not isinstance(q, Blockwise8bit):
      continue
    where = jax.tree_util.keystr(path)
    if _legacy_batch(q) == ():
      raise ValueError(
        f'{owner}: the 8-bit nu at {where} is in the layout of '
        'rmsprop_jax 0.1.0 (blocks over the flattened array), which this '
        'version replaced by blocks along the trailing axes (they follow '
        "the parameter's sharding). Convert the restored state once: "
        '`state = rmsprop_jax.quantization.upgrade_state(state, params)`.'
      )
    want = (tuple(q.shape), scale_shape(q.shape))
    got = (tuple(np.shape(q.codes)), tuple(np.shape(q.scale)))
    if got != want or tuple(np.shape(g)) != tuple(q.shape):
      raise ValueError(
        f'{owner}: the 8-bit nu at {where} holds codes of shape {got[0]} '
        f'and scales of shape {got[1]}, where a leaf of shape '
        f'{tuple(np.shape(g))} needs {tuple(np.shape(g))} and '
        f'{scale_shape(tuple(np.shape(g)))}: it was restored from the '
        'optimizer state of another model. Restore the state saved with '
        'these parameters, or start this leaf afresh with tx.init.'
      )


def upgrade_state(state, params):
  """``state`` with every 8-bit moment saved by rmsprop_jax 0.1.0 converted
  to this version's layout; everything else is returned as it is.

  0.1.0 cut the flattened array into blocks of 256 and stored ``codes`` as
  ``(n_blocks, 256)`` and ``scale`` as ``(n_blocks,)``; this version keeps
  the codes in the parameter's shape, with blocks along its trailing axes
  (:func:`block_layout`), so that they follow its sharding. Each moment is
  decoded and coded again: where the blocks are the same (a leaf whose
  trailing axes hold a multiple of 256 elements) the codes are the same,
  bit for bit; elsewhere the values are coded afresh in the new blocks
  (each of them rounded without bias). ``update`` refuses the old layout
  with a message naming this function.

  Args:
    state: an optimizer state as restored (with :class:`Blockwise8bit`
      moments, or with the ``{'codes', 'scale'}`` mappings a container such
      as ``flax.nnx.Optimizer`` or a state dict rebuilds them as).
    params: the parameters (arrays, or anything with their shapes), whose
      shapes the moments take.

  Returns:
    The state, with the same structure, in this version's layout.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from rmsprop_jax import quantization
    >>> params = {'w': jnp.ones((3, 100))}  # 300 elements: 2 blocks in 0.1.0
    >>> old = {'w': quantization.Blockwise8bit(
    ...   np.full((2, 256), 248, np.uint8), np.ones(2, np.float32), (3, 100))}
    >>> new = quantization.upgrade_state(old, params)
    >>> new['w'].codes.shape, new['w'].scale.shape
    ((3, 100), (2,))
    >>> bool((quantization.dequantize(new['w']) == 1).all())
    True
  """
  state = _rebuild_tree(state, _validation.nnx_values(params))

  def upgrade(x):
    batch = _legacy_batch(x) if isinstance(x, Blockwise8bit) else None
    if batch is None:
      return x
    return _upgrade_leaf(
      jnp.asarray(x.codes),
      jnp.asarray(x.scale, jnp.float32),
      tuple(x.shape),
      len(batch),
    )

  return jax.tree.map(
    upgrade, state, is_leaf=lambda x: isinstance(x, Blockwise8bit)
  )


@functools.partial(jax.jit, static_argnums=(2, 3))
def _upgrade_leaf(codes, scale, shape: tuple[int, ...], depth: int):
  """One 0.1.0 code (``codes`` and float32 ``scale`` of an array of
  ``shape``, with ``depth`` leading ``vmap`` axes) in this version's
  layout, each member upgraded apart: one compiled program per shape
  (eagerly, each operation would compile apart)."""
  one = lambda c, s: quantize(_legacy_decode(Blockwise8bit(c, s, shape)), 0, 0)
  for _ in range(depth):
    one = jax.vmap(one)
  return one(codes, scale)


def _legacy_decode(q: Blockwise8bit) -> jax.Array:
  """The float32 array a 0.1.0 code ``q`` stores."""
  values = _decode(jnp.asarray(q.codes), jnp.asarray(q.scale, jnp.float32))
  return jnp.ravel(values)[: math.prod(q.shape)].reshape(q.shape)


def _check_not_rebuilt(tree, owner: str) -> None:
  """Raises ``ValueError`` if ``tree`` holds an 8-bit moment rebuilt as a
  plain ``{'codes', 'scale'}`` mapping (see ``_rebuild``): its shape
  cannot be known without the parameters."""
  for path, x in jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=_is_rebuilt
  )[0]:
    if _is_rebuilt(x):
      raise ValueError(
        f'{owner}: the 8-bit moment at {jax.tree_util.keystr(path)} is a '
        'plain mapping of codes and scale (its container, e.g. '
        'flax.nnx.Optimizer, rebuilt it), which does not record the '
        "parameter's shape: pass the parameters too, "
        f'`{owner}(state, params)` (or `params=` where it is a keyword).'
      )


def dequantize_tree(tree):
  """``tree`` with every :class:`Blockwise8bit` in it dequantized."""
  return jax.tree.map(
    lambda x: dequantize(x) if isinstance(x, Blockwise8bit) else x,
    tree,
    is_leaf=lambda x: isinstance(x, Blockwise8bit),
  )
