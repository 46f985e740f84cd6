"""Low-memory moment state: bfloat16 with stochastic rounding, 8-bit ``nu``.

The rounding and the code are checked against NumPy transcriptions of their
definitions (the hash, the bit tricks), bit for bit, and against what they
mean (the bfloat16 or code-book neighbours); the
optimizer against its own float32-state run and the properties the storage
must keep (never a positive value stored as zero, unbiased on average).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import quantization

from helpers import normal_tree

M32 = 0xFFFFFFFF


# --- NumPy references -----------------------------------------------------------


def np_lowbias32(h):
  h ^= h >> 16
  h = (h * 0x7FEB352D) & M32
  h ^= h >> 15
  h = (h * 0x846CA68B) & M32
  return h ^ (h >> 16)


def np_hash(size, step, salt):
  """The seed lowbias32(step * c2 + salt * c3), then per element
  h = (index ^ seed) * golden, h ^ (h >> 16): in Python ints."""
  seed = np_lowbias32((step * 0x85EBCA77 + salt * 0xC2B2AE3D) & M32)
  out = np.empty(size, np.uint64)
  for i in range(size):
    h = ((i ^ seed) * 0x9E3779B1) & M32
    out[i] = h ^ (h >> 16)
  return out


def np_stochastic_bf16(x, step, salt):
  """Add 16 random bits below bfloat16's last mantissa bit, truncate."""
  bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
  noise = np_hash(x.size, step, salt) & 0xFFFF
  rounded = ((bits + noise) & 0xFFFF0000).astype(np.uint32)
  # A finite value never rounds up to inf: it stays at the largest bfloat16.
  overflow = np.isfinite(x) & np.isinf(rounded.view(np.float32))
  rounded = np.where(overflow, rounded - 0x10000, rounded).astype(np.uint32)
  return rounded.view(np.float32)


def np_quantize(x, step, salt, block=256, scale=None):
  """Blocks of up to 256 consecutive elements along the trailing axes that
  first hold 256 or more (all of them for a smaller array), the last block
  of each slab shorter; the float32 ratio to the block max, 20 random bits
  added below its top 3 mantissa bits, then the code 8 * (exponent + 31) +
  mantissa (0 below 2**-31). Returns codes of x's shape and the block
  maxima, one row of them per slab. With ``scale`` (that shape), the
  blocks are coded against it instead of their maxima, ratios capped at 1."""
  shape = x.shape
  k = len(shape)
  while k > 0 and int(np.prod(shape[k:])) < block:
    k -= 1
  slab = int(np.prod(shape[k:]))
  block = max(1, min(block, slab))
  n_blocks = -(-slab // block)
  x = np.maximum(x.astype(np.float32).reshape(-1, slab), 0)
  x = np.minimum(x, np.float32(2.0**125))  # +inf saturates; NaN stays.
  x = np.pad(x, ((0, 0), (0, n_blocks * block - slab)))
  x = x.reshape(-1, n_blocks, block)
  if scale is None:
    scale = x.max(axis=2)
    ratio = (x / np.where(scale > 0, scale, 1)[:, :, None]).astype(np.float32)
  else:
    scale = np.minimum(np.asarray(scale, np.float32), np.float32(2.0**125))
    scale = scale.reshape(-1, n_blocks)
    ratio = (x / np.where(scale > 0, scale, 1)[:, :, None]).astype(np.float32)
    ratio = np.minimum(ratio, np.float32(1))
  noise = (np_hash(x.size, step, salt) & 0xFFFFF).reshape(x.shape)
  bits = ratio.view(np.uint32).astype(np.int64) + noise.astype(np.int64)
  exponent = (bits >> 23) - 96
  codes = np.where(exponent < 0, 0, exponent * 8 + ((bits >> 20) & 7))
  codes = codes.reshape(-1, n_blocks * block)[:, :slab].reshape(shape)
  return codes.astype(np.uint8), scale.reshape(shape[:k] + (n_blocks,))


def code_value(code):
  """The code book: 2**(e - 31) * (1 + m / 8) for code 8 e + m."""
  code = np.asarray(code, np.int64)
  return 2.0 ** ((code >> 3) - 31) * (1 + (code & 7) / 8)


# --- The storage itself ---------------------------------------------------------


def test_hash_matches_numpy():
  for step, salt in [(0, 0), (1, 0), (7, 3), (2**31 - 1, 1 << 20)]:
    np.testing.assert_array_equal(
      np.asarray(quantization.hash_bits((257,), step, salt)),
      np_hash(257, step, salt).astype(np.uint32),
    )


def test_stochastic_bf16_matches_numpy_and_neighbours():
  x = (
    np.asarray(jax.random.normal(jax.random.PRNGKey(0), (300,)))
    * 10.0 ** (np.arange(300) % 7 - 3)
  ).astype(np.float32)
  got = np.asarray(
    quantization.stochastic_round_bf16(jnp.asarray(x), 5, 2).astype(jnp.float32)
  )
  np.testing.assert_array_equal(got, np_stochastic_bf16(x, 5, 2))
  # Always one of the two bfloat16 neighbours (toward zero, away from it).
  down = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)
  up = ((x.view(np.uint32) & 0xFFFF0000) + 0x10000).view(np.float32)
  assert np.all((got == down) | (got == up))


def test_stochastic_bf16_is_unbiased_and_nearest_is_not():
  x = jnp.full((4096,), 1.0 + 2.0**-10)  # A quarter of a bf16 step above 1.
  mean = np.mean(
    [
      np.asarray(
        quantization.stochastic_round_bf16(x, s, 0).astype(jnp.float32)
      )
      for s in range(8)
    ]
  )
  assert mean == pytest.approx(1.0 + 2.0**-10, rel=2e-5)
  assert float(x.astype(jnp.bfloat16)[0]) == 1.0  # Nearest loses it all.
  # Non-finite values are kept.
  special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0])
  out = quantization.stochastic_round_bf16(special, 1, 0)
  np.testing.assert_array_equal(
    np.asarray(out.astype(jnp.float32)), [np.inf, -np.inf, np.nan, 0.0]
  )


@pytest.mark.parametrize(
  'shape, scale_shape',
  [
    ((3, 200), (3,)),  # 600 elements: blocks over rows, the last short.
    ((2, 3, 300), (2, 3, 2)),  # Two blocks per row of 300.
    ((4, 512), (4, 2)),
    ((64, 8), (2,)),  # Rows of 8: a block is 32 of them.
    ((5,), (1,)),
    ((), (1,)),
  ],
)
def test_8bit_codes_match_numpy(shape, scale_shape):
  size = int(np.prod(shape))
  rng = np.random.default_rng(1)  # (jax.random compiles a program per shape.)
  x = np.abs(rng.standard_normal(size)) ** 3 * 10.0 ** (np.arange(size) % 9 - 4)
  x = jnp.asarray(x.astype(np.float32).reshape(shape))
  q = quantization.quantize(x, 9, 4)
  codes, scale = np_quantize(np.asarray(x), 9, 4)
  assert q.codes.shape == shape and q.codes.dtype == jnp.uint8
  assert q.scale.shape == scale_shape == quantization.scale_shape(shape)
  np.testing.assert_array_equal(np.asarray(q.scale), scale)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  # What the codes mean: each value is one of the two code-book neighbours
  # of x (or the smallest code, below it), and dequantize reads them back.
  k = len(scale_shape) - 1
  slab = int(np.prod(shape[k:]))
  per_element = np.repeat(scale.reshape(-1, scale.shape[-1]), 256, axis=1)
  per_element = per_element[:, :slab].reshape(shape)
  book = code_value(np.arange(249))
  ratio = np.asarray(x, np.float64) / per_element
  low = book[np.clip(np.searchsorted(book, ratio, side='right') - 1, 0, 248)]
  high = book[np.clip(np.searchsorted(book, ratio, side='left'), 0, 248)]
  got = code_value(np.asarray(q.codes))
  assert np.all((got == low) | (got == high) | (got == book[0]))
  np.testing.assert_allclose(
    np.asarray(quantization.dequantize(q)), got * per_element, rtol=1e-6
  )


def test_8bit_never_stores_a_positive_value_as_zero():
  x = jnp.array([1.0, 1e-12, 1e-30, 1e-45, 0.0] + [0.5] * 20)
  back = quantization.dequantize(quantization.quantize(x, 1, 0))
  assert np.all(np.asarray(back[:4]) > 0)
  # Below 32 octaves under the block max values round up, never to zero.
  assert float(back[2]) == 2.0**-31
  # A block of zeros stays zero; so do (as the moment cannot be negative)
  # negative inputs.
  zeros = quantization.quantize(jnp.zeros(10), 3, 0)
  np.testing.assert_array_equal(np.asarray(quantization.dequantize(zeros)), 0)
  # Where scale * code underflows (1e-36 * 2**-31.9), the value stays
  # positive: the smallest normal float32.
  tiny = quantization.dequantize(
    quantization.quantize(jnp.array([1e-36, 0.0]), 0, 0)
  )
  np.testing.assert_array_equal(
    np.asarray(tiny), np.float32([1e-36, np.finfo(np.float32).tiny])
  )


def test_8bit_error_is_within_one_code_and_unbiased():
  x = jnp.abs(jax.random.normal(jax.random.PRNGKey(2), (2048,))) + 0.01
  samples = np.stack(
    [
      np.asarray(quantization.dequantize(quantization.quantize(x, s, 0)))
      for s in range(64)
    ]
  )
  rel = samples / np.asarray(x) - 1
  assert np.abs(rel).max() <= 1 / 8 + 1e-6  # One code: at most 12.5 %.
  # Unbiased: the mean over steps converges to x (64 draws: ~1 % noise).
  assert np.abs(np.median(rel.mean(axis=0))) < 2e-3


def test_slow_average_keeps_moving_only_with_stochastic_rounding():
  """decay=0.999: the EMA moves 0.1 % a step, under half a bfloat16 step.

  The gradient drops from 1 to 0.5; in exact arithmetic nu goes from 1
  toward 0.25 (0.865 after 200 steps). Round-to-nearest bfloat16 never
  moves; stochastic rounding follows.
  """
  exact = 0.999**200 * 1 + (1 - 0.999**200) * 0.25
  finals = {}
  for sr in (False, True):
    tx = rmsprop_jax.scale_by_rms(
      decay=0.999,
      initial_scale=1.0,
      nu_dtype=jnp.bfloat16,
      stochastic_rounding=sr,
    )
    params = jnp.zeros(1024)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(200):
      _, state = update(jnp.full(1024, 0.5), state)
    finals[sr] = np.asarray(optax.tree.get(state, 'nu').astype(jnp.float32))
  assert np.all(finals[False] == 1.0)
  assert finals[True].mean() == pytest.approx(exact, rel=2e-3)


# --- In the optimizer -----------------------------------------------------------


def model_tree(seed):
  """Two kernels and their biases."""
  kernels = normal_tree({'w1': (64, 300), 'w2': (300, 10)}, seed, scale=0.1)
  return {**kernels, 'b': [jnp.zeros(300), jnp.zeros(10)]}


def _steps(tx, steps=20):
  params = model_tree(0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    g = jax.tree.map(lambda p, k=i: p * 0.5 + 0.01 * (k + 1), params)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.mark.parametrize(
  'kwargs, max_bytes',
  [
    (dict(nu_dtype=jnp.bfloat16), 2.0),
    (dict(nu_dtype=jnp.bfloat16, stochastic_rounding=True), 2.0),
    (dict(nu_dtype=jnp.uint8), 1.1),
  ],
)
@pytest.mark.parametrize('packing', [False, True])
def test_state_bytes_and_closeness_to_float32(kwargs, max_bytes, packing):
  ref_params, _ = _steps(rmsprop_jax.rmsprop(1e-3, packing=packing))
  params, state = _steps(rmsprop_jax.rmsprop(1e-3, packing=packing, **kwargs))
  nu = optax.tree.get(state, 'nu')
  n = sum(x.size for x in jax.tree.leaves(ref_params))
  assert sum(x.nbytes for x in jax.tree.leaves(nu)) / n <= max_bytes
  # Each step is at most a few per cent off (sqrt of a 12.5 % code step).
  for p, r in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(p, r, rtol=0.05, atol=1e-3)
  # The readable state is float32 and shaped like the parameters.
  readable = optax.tree.get(rmsprop_jax.unpack_state(state), 'nu')
  assert jax.tree.structure(readable) == jax.tree.structure(ref_params)
  for x, p in zip(jax.tree.leaves(readable), jax.tree.leaves(ref_params)):
    assert x.shape == p.shape


def test_8bit_centered_momentum_vmap_and_effective_lr():
  tx = rmsprop_jax.rmsprop(
    1e-2, nu_dtype=jnp.uint8, centered=True, momentum=0.9
  )
  batch = jax.tree.map(
    lambda *x: jnp.asarray(np.stack(x)), *map(model_tree, range(3))
  )
  state = jax.vmap(tx.init)(batch)
  _, state = jax.jit(jax.vmap(tx.update))(batch, state, batch)
  mu = optax.tree.get(rmsprop_jax.unpack_state(state), 'mu')
  assert mu['w1'].dtype == jnp.float32 and mu['w1'].shape == (3, 64, 300)
  _, single = _steps(rmsprop_jax.rmsprop(1e-2, nu_dtype=jnp.uint8), steps=2)
  with pytest.raises(ValueError, match='bias_correction'):
    rmsprop_jax.effective_learning_rate(
      single, 1e-2, eps=1e-8, eps_in_sqrt=True
    )
  eff = rmsprop_jax.effective_learning_rate(
    single, 1e-2, eps=1e-8, eps_in_sqrt=True, bias_correction=False
  )
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(eff))


def test_bad_storage_arguments_are_refused():
  with pytest.raises(ValueError, match='stochastic_rounding applies'):
    rmsprop_jax.rmsprop(0.1, stochastic_rounding=True)
  with pytest.raises(ValueError, match='nu_dtype must be'):
    rmsprop_jax.rmsprop(0.1, nu_dtype=jnp.int32)
  # An 8-bit float would fail later, in the update, with JAX's promotion
  # error: refused at once, pointing at the 8-bit code.
  for narrow in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    with pytest.raises(ValueError, match='fewer than 16 bits.*jnp.uint8'):
      rmsprop_jax.scale_by_stddev(nu_dtype=narrow)


@pytest.mark.skipif(jax.config.jax_enable_x64, reason='float64 is available')
def test_float64_state_without_x64_is_float32_with_a_warning():
  """JAX makes a float64 request float32 without x64, and says so when the
  state is made: the optimizer's own state then passes its layout check
  (it was refused as 'made by another variant')."""
  tx = rmsprop_jax.rmsprop(0.1, nu_dtype=jnp.float64)
  params = {'w': jnp.ones(3)}
  with pytest.warns(UserWarning, match='float64'):
    state = tx.init(params)
  _, state = tx.update(params, state, params)
  assert optax.tree.get(state, 'nu')['w'].dtype == jnp.float32


def test_stochastic_bf16_keeps_infinities_and_nans():
  """Adding noise below bfloat16's last bit must not turn an infinity or a
  NaN into something else, whatever the random bits: not even a NaN whose
  payload lies only in the dropped bits (it would truncate to an infinity)."""
  low_payload_nan = np.array([0x7F800001, 0xFF800001], np.uint32)
  x = np.concatenate(
    [
      np.array([np.inf, -np.inf, np.nan], np.float32),
      low_payload_nan.view(np.float32),
    ]
  )
  x = np.tile(x, 64)
  for step in range(4):
    r = np.asarray(
      quantization.stochastic_round_bf16(jnp.asarray(x), step, 7)
    ).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(r), np.isnan(x))
    finite_or_inf = ~np.isnan(x)
    np.testing.assert_array_equal(r[finite_or_inf], x[finite_or_inf])


@pytest.mark.parametrize('centered', [False, True])
def test_a_state_of_another_float_dtype_is_refused_not_run_on(centered):
  """A float32 checkpoint restored into an optimizer that keeps its moments
  in bfloat16 (or the reverse) would otherwise run on in the old dtype, and
  the memory saving would silently never happen."""
  params = {'w': jnp.ones(8), 'b': jnp.zeros(3)}
  grads = jax.tree.map(jnp.ones_like, params)
  narrow = rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.bfloat16, centered=centered)
  wide = rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.float32, centered=centered)
  plain = optax.rmsprop(1e-3, centered=centered).init(params)
  with pytest.raises(ValueError, match='keeps (nu|mu) in float32.*bfloat16'):
    narrow.update(grads, plain, params)
  with pytest.raises(ValueError, match='keeps (nu|mu) in bfloat16.*float32'):
    wide.update(grads, narrow.init(params), params)
  # Converted once, it runs, and stays in bfloat16.
  state = rmsprop_jax.pack_state(plain, narrow, params)
  _, state = narrow.update(grads, state, params)
  assert {x.dtype for x in jax.tree.leaves(optax.tree.get(state, 'nu'))} == {
    jnp.dtype(jnp.bfloat16)
  }


def test_each_leaf_and_moment_rounds_with_its_own_bits():
  """The stored moments of an optimizer run are the NumPy rounding of the
  unrounded float32 moments, with the step count and a salt per leaf (0, 1,
  ...) and per moment (``nu`` from 0, ``mu`` from 2**20): two leaves with
  the same gradients are rounded with different bits."""
  g = jnp.asarray(np.random.default_rng(3).normal(0, 1e-2, (2, 500)), 'f4')
  grads = {'a': g[0], 'b': g[0], 'c': g[1]}
  params = jax.tree.map(jnp.zeros_like, grads)
  wide = rmsprop_jax.scale_by_stddev(decay=0.9, bias_correction=True)
  narrow = rmsprop_jax.scale_by_stddev(
    decay=0.9,
    bias_correction=True,
    nu_dtype=jnp.bfloat16,
    stochastic_rounding=True,
  )
  narrow_state = narrow.init(params)
  for step in (1, 2):
    # The float32 transformation from the narrow state, widened: its moments
    # are the narrow step's before rounding.
    wide_state = jax.tree.map(
      lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x,
      narrow_state,
    )
    _, wide_state = wide.update(grads, wide_state)
    _, narrow_state = narrow.update(grads, narrow_state)
    assert int(narrow_state.count) == step
    for salt0, moment in ((0, 'nu'), (1 << 20, 'mu')):
      got = getattr(narrow_state, moment)
      unrounded = getattr(wide_state, moment)
      for i, leaf in enumerate(('a', 'b', 'c')):
        np.testing.assert_array_equal(
          np.asarray(got[leaf].astype(jnp.float32)),
          np_stochastic_bf16(np.asarray(unrounded[leaf]), step, salt0 + i),
          err_msg=f'{moment}[{leaf!r}] at step {step}',
        )
  # Equal inputs, other bits: 'a' and 'b' round differently somewhere.
  assert not np.array_equal(
    np.asarray(narrow_state.nu['a']), np.asarray(narrow_state.nu['b'])
  )


def np_round(x, bits, up):
  """x rounded up (or down) to ``bits`` significant bits, in float64."""
  mantissa, exponent = np.frexp(np.asarray(x, np.float64))  # In [0.5, 1).
  step = np.ceil if up else np.floor
  return np.ldexp(step(mantissa * 2.0**bits) / 2.0**bits, exponent)


def np_block_bound(g, old_scale, decay):
  """The update's new block scales: decay * old scale + (1 - decay) * the
  block's largest g**2 (blocks as np_quantize cuts them), with 1 - decay
  rounded to 12 significant bits (down on the scale, up on g**2) and the
  largest g**2 rounded up to 12 bits, so that every product is exact."""
  f32 = np.float32
  sq = np.square(np.asarray(g, f32))
  big = f32(np_round(np_quantize(sq, 0, 0)[1], 12, up=True))  # Block maxima.
  s = np.asarray(old_scale, f32)
  one_minus = f32(1) - f32(decay)
  e = f32(np_round(one_minus, 12, up=False))
  f = f32(np_round(one_minus, 12, up=True))
  # decay * s as s - e * s, with s in two halves of 12 bits: the products
  # are exact in float32, and the sums round as float32's, in this order.
  s_hi = f32(np_round(s, 12, up=False))
  s_lo = s - s_hi
  bound = ((s - e * s_hi) - e * s_lo) + f * big
  return np.minimum(bound, f32(2.0**125)).astype(f32)


def test_each_8bit_leaf_codes_with_its_own_bits():
  """As above for the 8-bit ``nu``: each leaf's codes are the NumPy coding
  of its unrounded float32 moment, with the step count and salt ``i``,
  against the block scales decay * old scale + (1 - decay) * the block's
  largest g**2 (which bound the new moment from above)."""
  g = jnp.asarray(np.random.default_rng(4).normal(0, 1e-2, (2, 700)), 'f4')
  grads = {'a': g[0], 'b': g[0], 'c': g[1]}
  params = jax.tree.map(jnp.zeros_like, grads)
  wide = rmsprop_jax.scale_by_rms(decay=0.9, bias_correction=True)
  narrow = rmsprop_jax.scale_by_rms(
    decay=0.9, bias_correction=True, nu_dtype=jnp.uint8
  )
  state = narrow.init(params)
  for step in (1, 2):
    _, wide_state = wide.update(
      grads,
      wide.init(params)._replace(
        count=state.count, nu=quantization.dequantize_tree(state.nu)
      ),
    )
    old_scales = {k: np.asarray(q.scale) for k, q in state.nu.items()}
    _, state = narrow.update(grads, state)
    for i, leaf in enumerate(('a', 'b', 'c')):
      bound = np_block_bound(grads[leaf], old_scales[leaf], 0.9)
      new_nu = np.asarray(wide_state.nu[leaf])
      assert np.all(new_nu.reshape(-1) <= np.repeat(bound, 256)[:700])
      codes, scale = np_quantize(new_nu, step, i, scale=bound)
      np.testing.assert_array_equal(np.asarray(state.nu[leaf].scale), scale)
      np.testing.assert_array_equal(
        np.asarray(state.nu[leaf].codes), codes, err_msg=f'{leaf} {step}'
      )
  assert not np.array_equal(state.nu['a'].codes, state.nu['b'].codes)


def test_stochastic_bf16_never_rounds_a_finite_value_to_inf():
  """Just below float32's largest value a carry would pass the largest
  bfloat16: the value stays there (the NumPy transcription says so)."""
  top = np.finfo(np.float32).max
  x = np.float32(top) * np.float32(1 - 2.0**-20) ** np.arange(
    64, dtype=np.float32
  )
  got = np.asarray(
    quantization.stochastic_round_bf16(jnp.asarray(x), 3, 1).astype(jnp.float32)
  )
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got, np_stochastic_bf16(x, 3, 1))


def test_8bit_block_survives_a_finite_gradient_whose_square_overflows():
  """A finite gradient of 3e19 (its square overflows float32): the block's
  scale saturates instead of becoming inf, every parameter of the block
  keeps moving (no update of exactly 0, none inf), and once the moment has
  decayed the steps are the undisturbed run's again, within the code's
  rounding."""
  tx = rmsprop_jax.rmsprop(1e-2, decay=0.5, nu_dtype=jnp.uint8)
  params = jnp.zeros(256)
  g = jnp.linspace(0.5, 1.5, 256)
  spike = g.at[7].set(3e19)
  state, calm_state = tx.init(params), tx.init(params)
  update = jax.jit(tx.update)
  u, state = update(spike, state, params)
  assert np.all(np.isfinite(np.asarray(u)))
  nu = np.asarray(rmsprop_jax.unpack_state(state)[0].nu)
  assert np.all(np.isfinite(nu)) and nu[7] == np.float32(2.0**125)
  for step in range(200):
    u, state = update(g, state, params)
    v, calm_state = update(g, calm_state, params)
    assert np.all(np.isfinite(np.asarray(u)))
    assert np.all(np.asarray(u) != 0), step
  np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0.15)


def _block_of(shape, index):
  """The entries of an array of ``shape`` in the 8-bit block of ``index``,
  from ``block_layout``'s description: the same leading indices, and the
  same run of ``b`` entries of the trailing axes in row-major order."""
  k, m, b = quantization.block_layout(shape)
  run = np.arange(m).reshape(shape[k:]) // b
  mask = np.broadcast_to(run == run[index[k:]], shape).copy()
  for axis, i in enumerate(index[:k]):
    other = [slice(None)] * len(shape)
    other[axis] = np.arange(shape[axis]) != i
    mask[tuple(other)] = False
  return mask


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape', [(4096, 16), (64, 512), (3, 300)])
def test_a_nan_gradient_makes_its_block_nan_on_every_shape(shape, dtype):
  """docs/guides/failure_modes.md: with the 8-bit nu a NaN gradient makes
  its whole block NaN, and no other. On every shape: XLA:CPU ran a large
  ``jnp.max`` or ``jnp.min`` as a library kernel that skips NaN, so on
  (4096, 16) the block's scale stayed finite, and only there."""
  rng = np.random.default_rng(0)
  tx = rmsprop_jax.rmsprop(1e-2, nu_dtype=jnp.uint8)
  update = jax.jit(tx.update)
  params = jnp.zeros(shape, dtype)
  g = rng.standard_normal(shape).astype(np.float32)
  index = tuple(int(rng.integers(n)) for n in shape)
  g[index] = np.nan
  _, state = update(jnp.asarray(g, dtype), tx.init(params), params)
  scale = np.asarray(optax.tree.get(state, 'nu').scale)
  assert np.isnan(scale).sum() == 1, scale
  u, _ = update(jnp.asarray(rng.standard_normal(shape), dtype), state, params)
  np.testing.assert_array_equal(
    np.isnan(np.asarray(u)), _block_of(shape, index)
  )


@pytest.mark.parametrize('shape', [(4096, 16), (64, 512), (3, 300)])
def test_nan_stays_nan_in_the_8bit_code_and_complex_scale_on_every_shape(
  shape,
):
  """``quantize``'s docstring: NaN stays NaN (it decodes as NaN, with the
  rest of its block); and a complex gradient's NaN makes its block's
  ``next_scale`` NaN. On (4096, 16) XLA:CPU's ``jnp.max`` skipped it."""
  rng = np.random.default_rng(1)
  index = tuple(int(rng.integers(n)) for n in shape)
  x = np.abs(rng.standard_normal(shape)).astype(np.float32)
  x[index] = np.nan
  decoded = np.asarray(quantization.dequantize(quantization.quantize(x, 0, 0)))
  np.testing.assert_array_equal(np.isnan(decoded), _block_of(shape, index))
  g = (rng.standard_normal(shape) + 1j).astype(np.complex64)
  g[index] = np.nan
  scale = quantization.next_scale(
    jnp.ones(quantization.scale_shape(shape)), jnp.asarray(g), 0.9
  )
  k, m, b = quantization.block_layout(shape)
  want = np.zeros(quantization.scale_shape(shape), bool)
  flat = np.ravel_multi_index(index[k:], shape[k:])
  want[index[:k] + (flat // b,)] = True
  np.testing.assert_array_equal(np.isnan(np.asarray(scale)), want)


@pytest.mark.parametrize('packing', [False, True])
def test_8bit_state_of_zero_size_leaves_with_long_trailing_axes(packing):
  """A (0, 300) leaf is cut into blocks along its last axis (300 entries a
  row, none of them there): init, update and unpack work, eagerly and
  jitted, and the other leaves train as without it (the blocks' length
  was inferred as -1, a division by zero)."""
  tx = rmsprop_jax.rmsprop(1e-2, nu_dtype=jnp.uint8, packing=packing)
  empty = {'e': jnp.zeros((0, 300)), 'f': jnp.zeros((2, 0, 300))}
  params = {'w': jnp.linspace(-1.0, 1.0, 300), **empty}
  alone = {'w': params['w']}
  for update in (tx.update, jax.jit(tx.update)):
    u, state = update(params, tx.init(params), params)
    want, _ = update(alone, tx.init(alone), alone)
    assert {k: v.shape for k, v in u.items()} == {
      k: v.shape for k, v in params.items()
    }
    np.testing.assert_array_equal(u['w'], want['w'])
    nu = rmsprop_jax.unpack_state(state, params)[0].nu
    assert nu['e'].shape == (0, 300) and nu['f'].shape == (2, 0, 300)


# --- 0.1.0's 8-bit layout -----------------------------------------------------


def np_quantize_0_1_0(x, step, salt):
  """rmsprop_jax 0.1.0's code: blocks of 256 over the flattened array (the
  last padded), codes (n_blocks, 256) and scales (n_blocks,)."""
  x = np.maximum(x.astype(np.float32).ravel(), 0)
  block = min(256, x.size)
  n_blocks = -(-x.size // block)
  x = np.pad(x, (0, n_blocks * block - x.size)).reshape(n_blocks, block)
  scale = x.max(axis=1)
  ratio = (x / np.where(scale > 0, scale, 1)[:, None]).astype(np.float32)
  noise = (np_hash(x.size, step, salt) & 0xFFFFF).reshape(x.shape)
  bits = ratio.view(np.uint32).astype(np.int64) + noise.astype(np.int64)
  exponent = (bits >> 23) - 96
  codes = np.where(exponent < 0, 0, exponent * 8 + ((bits >> 20) & 7))
  return codes.astype(np.uint8), scale


def _checkpoint_0_1_0(tx, params, grads):
  """A state as 0.1.0 saved it after one step: the float run's moment in
  0.1.0's code (what a Flax or pickle restore hands back), and the values
  that code stands for."""
  wide = rmsprop_jax.rmsprop(1e-2, momentum=0.9)
  _, ref = wide.update(grads, wide.init(params), params)
  nu = ref[0].nu
  state = tx.init(params)
  old, values = {}, {}
  for i, (name, p) in enumerate(params.items()):
    codes, scale = np_quantize_0_1_0(np.asarray(nu[name]), 1, i)
    old[name] = quantization.Blockwise8bit(codes, scale, p.shape)
    flat = (code_value(codes) * scale[:, None]).ravel()[: p.size]
    values[name] = flat.reshape(p.shape).astype(np.float32)
  first = state[0]._replace(nu=old, count=jnp.ones([], jnp.int32))
  return (first, *state[1:]), values


def test_0_1_0_8bit_checkpoint_is_refused_by_name_then_upgraded():
  tx = rmsprop_jax.rmsprop(1e-2, momentum=0.9, nu_dtype=jnp.uint8)
  rng = np.random.default_rng(0)
  params = {
    # Same blocks in both layouts.
    'kernel': jnp.asarray(rng.standard_normal((8, 512), 'f4')),
    # Blocks of 256 over rows.
    'odd': jnp.asarray(rng.standard_normal((3, 300), 'f4')),
    'bias': jnp.zeros(5),
    'scalar': jnp.zeros(()),
  }
  grads = jax.tree.map(lambda p: p + 1, params)
  old, values = _checkpoint_0_1_0(tx, params, grads)
  with pytest.raises(ValueError, match=r'0\.1\.0.*upgrade_state'):
    tx.update(grads, old, params)
  new = quantization.upgrade_state(old, params)
  nu = new[0].nu
  for name, p in params.items():
    assert nu[name].codes.shape == p.shape
    assert nu[name].scale.shape == quantization.scale_shape(p.shape)
  # Where the blocks are the same, so are the codes, bit for bit.
  np.testing.assert_array_equal(
    np.asarray(nu['kernel'].codes),
    np_quantize_0_1_0(values['kernel'], 1, 0)[0].reshape(8, 512),
  )
  # Everywhere the moment is what 0.1.0 stored, to within one code.
  for name in params:
    got = np.asarray(quantization.dequantize(nu[name]))
    np.testing.assert_allclose(got, values[name], rtol=1 / 8)
  np.testing.assert_array_equal(
    np.asarray(quantization.dequantize(nu['kernel'])), values['kernel']
  )
  # The upgraded state trains on, and a second upgrade changes nothing.
  tx.update(grads, new, params)
  again = quantization.upgrade_state(new, params)
  assert all(
    a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(new))
  )


def test_0_1_0_8bit_state_dict_is_upgraded_from_plain_mappings():
  """A state dict (Flax's, NNX's pure dict) holds each code as a mapping
  of its two arrays: upgrade_state takes it with the parameters' shapes."""
  tx = rmsprop_jax.rmsprop(1e-2, momentum=0.9, nu_dtype=jnp.uint8)
  params = {'w': jnp.ones((4, 100)), 'b': jnp.ones(3)}
  old, values = _checkpoint_0_1_0(tx, params, params)
  as_dicts = jax.tree.map(
    lambda q: (
      {'codes': q.codes, 'scale': q.scale}
      if isinstance(q, quantization.Blockwise8bit)
      else q
    ),
    old,
    is_leaf=lambda x: isinstance(x, quantization.Blockwise8bit),
  )
  new = quantization.upgrade_state(as_dicts, params)
  for name in params:
    q = new[0].nu[name]
    assert isinstance(q, quantization.Blockwise8bit)
    assert q.codes.shape == params[name].shape
    np.testing.assert_array_equal(
      np.asarray(quantization.dequantize(q)), values[name]
    )


@pytest.mark.parametrize('decay', [0.99, 0.995, 0.999, 0.9999])
def test_8bit_scale_follows_a_slow_decay(decay):
  """Large gradients, then small ones: each block's scale (an upper bound
  of its nu) comes down with the moment, as float32's nu does, at any
  decay up to 0.9999; a bound that could not shrink kept the steps 70
  times too short for good."""
  tx = rmsprop_jax.scale_by_rms(decay=decay, nu_dtype=jnp.uint8)
  wide = rmsprop_jax.scale_by_rms(decay=decay)
  g = jnp.asarray(np.random.default_rng(0).standard_normal((4, 256), 'f4'))
  run = jax.jit(
    lambda tx, scale, n: jax.lax.scan(
      lambda s, i: (tx.update(g * jnp.where(i < 20, scale, 1e-3), s)[1], None),
      tx.init(g),
      jnp.arange(n),
    )[0],
    static_argnums=(0, 2),
  )
  steps = 3000
  state, ref = run(tx, 1e3, steps), run(wide, 1e3, steps)
  nu = np.asarray(ref.nu, np.float64)
  scale = np.asarray(state.nu.scale)[:, 0]
  # The scale bounds nu and is at most 1 % above the bound in exact
  # arithmetic: decay**t * (the spike's nu) + the small gradients' part.
  exact = decay ** (steps - 20) * np.max(
    (1 - decay**20) * np.asarray(g, np.float64) ** 2 * 1e6, axis=1
  ) + np.max(np.asarray(g, np.float64) ** 2 * 1e-6, axis=1)
  assert np.all(scale >= nu.max(axis=1))
  assert np.all(scale <= exact * 1.01), scale / exact


def test_0_1_0_8bit_state_of_a_vmap_is_upgraded_member_by_member():
  """An ensemble's state (vmap over seeds) has leading axes on codes and
  scale: each member is upgraded, as jax.vmap(upgrade_state) would."""
  tx = rmsprop_jax.rmsprop(1e-2, momentum=0.9, nu_dtype=jnp.uint8)
  params = {'w': jnp.ones((3, 100)), 'b': jnp.ones(3)}
  members = [
    _checkpoint_0_1_0(
      tx, params, jax.tree.map(lambda p, k=i + 1: p * k, params)
    )
    for i in range(2)
  ]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[m[0] for m in members])
  new = quantization.upgrade_state(stacked, params)
  for name in params:
    q = new[0].nu[name]
    assert q.codes.shape == (2,) + params[name].shape
    for i, (_, values) in enumerate(members):
      np.testing.assert_array_equal(
        np.asarray(quantization.dequantize(q)[i]), values[name]
      )
  jax.vmap(tx.update, in_axes=(None, 0, None))(params, new, params)
