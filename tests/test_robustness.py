"""Robustness: properties over random inputs, non-finite values, low
precision, clear errors, long runs and determinism.

Property tests use Hypothesis; the references are optax itself, the same
computation in a wider dtype, or exact identities of the update rule.
"""

import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rmsprop_jax

from helpers import assert_trees_equal

# Hypothesis' profile (fresh examples every run, the seed printed, no
# example database) is set in conftest.py.

DTYPES = {
  'float32': jnp.float32,
  'bfloat16': jnp.bfloat16,
  'float16': jnp.float16,
}


# --- Strategies ---------------------------------------------------------------

shapes = st.lists(
  st.lists(st.integers(1, 4), max_size=2).map(tuple), min_size=1, max_size=3
)
configs = st.fixed_dictionaries(
  {
    'decay': st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999]),
    'eps': st.sampled_from([1e-12, 1e-8, 1e-4]),
    'eps_in_sqrt': st.booleans(),
    'centered': st.booleans(),
    'momentum': st.sampled_from([None, 0.9]),
    'bias_correction': st.booleans(),
    'initial_scale': st.sampled_from([0.0, 1.0]),
  }
)


def _tree(shape_list, seed, dtype, scale=1.0, nonzero=False):
  rng = np.random.default_rng(seed)
  leaves = []
  for s in shape_list:
    x = rng.normal(size=s)
    if nonzero:  # |x| in [0.5, 2): no zero, no near-zero.
      x = np.sign(x + 1e-300) * rng.uniform(0.5, 2.0, size=s)
    leaves.append(jnp.asarray(scale * x, dtype))
  return {f'leaf{i}': leaf for i, leaf in enumerate(leaves)}


def _steps(tx, params, grads_list, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  updates = []
  for g in grads_list:
    u, state = update(g, state, params)
    updates.append(u)
  return updates, state


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --- Properties ---------------------------------------------------------------


@given(
  shapes,
  st.integers(0, 2**31),
  configs,
  st.sampled_from(list(DTYPES)),
  st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
)
def test_moments_stay_non_negative_and_finite_gradients_give_finite_updates(
  shape_list, seed, config, dtype, scale
):
  if dtype == 'float16' and config['centered']:
    # A centered step can be as large as |g| / sqrt(eps) (the variance of
    # a steady gradient is 0): 1e3 / 1e-6 does not fit float16 (max 65504).
    config = {**config, 'eps': 1e-4}
    scale = min(scale, 1.0)
  tx = rmsprop_jax.rmsprop(1e-3, **config)
  params = _tree(shape_list, seed, DTYPES[dtype])
  grads = [
    _tree(shape_list, seed + 1 + i, DTYPES[dtype], scale) for i in range(4)
  ]
  updates, state = _steps(tx, params, grads, jit=False)
  assert _all_finite(updates)
  for nu in jax.tree.leaves(optax.tree.get(state, 'nu')):
    assert bool(jnp.all(nu >= 0))


@given(
  shapes,
  st.integers(0, 2**31),
  st.integers(-20, 20),
  st.sampled_from([0.5, 0.9, 0.99]),
  st.booleans(),
  st.booleans(),
  st.sampled_from(['float32', 'bfloat16']),
)
def test_update_is_invariant_to_rescaling_the_gradient(
  shape_list, seed, power, decay, centered, eps_in_sqrt, dtype
):
  # With eps = 0 every operation commutes with a power-of-two scale, so the
  # invariance is exact: bit for bit.
  tx = rmsprop_jax.rmsprop(
    0.1,
    decay=decay,
    eps=0.0,
    centered=centered,
    eps_in_sqrt=eps_in_sqrt,
    momentum=0.9,
  )
  params = _tree(shape_list, seed, DTYPES[dtype])
  grads = [
    _tree(shape_list, seed + i, DTYPES[dtype], nonzero=True) for i in range(3)
  ]
  scaled = [jax.tree.map(lambda g: g * 2.0**power, t) for t in grads]
  assert_trees_equal(
    _steps(tx, params, grads)[0], _steps(tx, params, scaled)[0]
  )


@given(shapes, st.integers(0, 2**31), st.booleans())
def test_decay_zero_gives_a_sign_step(shape_list, seed, eps_in_sqrt):
  tx = rmsprop_jax.scale_by_rms(decay=0.0, eps=1e-12, eps_in_sqrt=eps_in_sqrt)
  grads = _tree(shape_list, seed, jnp.float32, scale=1e-3)
  grads['zero'] = jnp.zeros(3)
  u, _ = tx.update(grads, tx.init(grads))
  for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(u)):
    # |u| = |g| / sqrt(g² + eps) = 1 - O(eps / g²), or |g| / (|g| + eps) =
    # 1 - O(eps / |g|); exactly 0 for g = 0.
    g = np.asarray(g, np.float64)
    with np.errstate(divide='ignore'):
      bound = 1e-12 / (2 * g**2) if eps_in_sqrt else 1e-12 / np.abs(g)
    assert np.all(np.abs(np.asarray(x) - np.sign(g)) <= bound + 1e-6)


@given(
  shapes,
  st.integers(0, 2**31),
  st.sampled_from([0.9, 0.99, 0.999]),
  st.sampled_from([1e-8, 1e-3]),
)
def test_bias_corrected_eps_outside_is_adam_with_b1_zero(
  shape_list, seed, decay, eps
):
  ours = rmsprop_jax.rmsprop(
    1e-2, decay=decay, eps=eps, eps_in_sqrt=False, bias_correction=True
  )
  adam = optax.adam(1e-2, b1=0.0, b2=decay, eps=eps)
  params = _tree(shape_list, seed, jnp.float32)
  grads = [_tree(shape_list, seed + i, jnp.float32) for i in range(5)]
  for a, b in zip(
    _steps(ours, params, grads)[0], _steps(adam, params, grads)[0]
  ):
    # Adam divides by the denominator; RMSprop (ours and optax's) multiplies
    # by its reciprocal: at most 2 ulp apart.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=2.5e-7, atol=0)


@given(shapes, st.integers(0, 2**31), configs, st.booleans())
def test_saved_and_restored_state_continues_bit_identically(
  shape_list, seed, config, skip_nonfinite
):
  tx = rmsprop_jax.rmsprop(
    optax.linear_schedule(1e-2, 1e-3, 10),
    **config,
    skip_nonfinite=skip_nonfinite,
  )
  update = jax.jit(tx.update)
  params = _tree(shape_list, seed, jnp.float32)
  grads = [_tree(shape_list, seed + i, jnp.float32) for i in range(6)]
  state = tx.init(params)
  for g in grads[:3]:
    _, state = update(g, state, params)
  saved = pickle.dumps(jax.device_get(state))
  uninterrupted = []
  for g in grads[3:]:
    u, state = update(g, state, params)
    uninterrupted.append(u)
  restored = jax.tree.map(jnp.asarray, pickle.loads(saved))
  resumed = []
  for g in grads[3:]:
    u, restored = update(g, restored, params)
    resumed.append(u)
  assert_trees_equal(uninterrupted, resumed)
  assert_trees_equal(state, restored)


# --- Non-finite gradients -----------------------------------------------------


def _bad(tree, value):
  leaves, treedef = jax.tree.flatten(tree)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(value)
  return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize('bad_value', [np.nan, np.inf, -np.inf])
def test_skip_nonfinite_leaves_the_whole_state_untouched_and_counts(bad_value):
  kwargs = dict(
    centered=True, momentum=0.9, bias_correction=True, weight_decay=1e-2
  )
  params = _tree([(3,), (2, 2)], 0, jnp.float32)
  good = [_tree([(3,), (2, 2)], i, jnp.float32) for i in range(1, 4)]
  tx = rmsprop_jax.rmsprop(1e-2, **kwargs, skip_nonfinite=True)
  update = jax.jit(tx.update)
  state = tx.init(params)
  u, state = update(good[0], state, params)
  before = state
  for _ in range(2):
    u, state = update(_bad(good[1], bad_value), state, params)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
  assert_trees_equal(state.inner_state, before.inner_state)
  assert int(optax.tree.get(state, 'total_notfinite')) == 2
  # The run then goes on exactly as if the bad steps never happened.
  for g in good[1:]:
    u, state = update(g, state, params)
  reference, _ = _steps(rmsprop_jax.rmsprop(1e-2, **kwargs), params, good)
  assert_trees_equal(u, reference[-1])


def test_skip_nonfinite_eagerly_runs_one_branch_and_compiles_once():
  """Outside ``jit`` (an eager ``nnx.Optimizer``) the skip is decided on the
  concrete value: the updates are the plain optimizer's eager ones, a bad
  step is skipped, and later steps compile nothing (``lax.cond`` compiled
  both branches again at every call)."""
  kwargs = dict(centered=True, momentum=0.9, nu_dtype=jnp.uint8)
  params = _tree([(3,), (2, 300)], 0, jnp.float32)
  good = [_tree([(3,), (2, 300)], i, jnp.float32) for i in range(1, 7)]
  tx = rmsprop_jax.rmsprop(1e-2, **kwargs, skip_nonfinite=True)
  plain = rmsprop_jax.rmsprop(1e-2, **kwargs)
  state, plain_state = tx.init(params), plain.init(params)
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for t, g in enumerate(good):
      if t == 2:
        compiles.clear()  # What the first steps compiled is cached.
      u, state = tx.update(g, state, params)
      want, plain_state = plain.update(g, plain_state, params)
      assert_trees_equal(u, want)
      bad_u, state = tx.update(_bad(g, np.nan), state, params)
      assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(bad_u))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert '/jax/core/compile/backend_compile_duration' not in compiles
  assert int(optax.tree.get(state, 'total_notfinite')) == len(good)


def test_apply_if_finite_recipe_and_its_limit():
  # The recipe for any preset: optax.apply_if_finite. It gives up after
  # max_consecutive_errors bad steps in a row and applies the next one; that
  # is why skip_nonfinite uses no limit.
  params = _tree([(3,)], 0, jnp.float32)
  tx = optax.apply_if_finite(
    rmsprop_jax.presets.pytorch(1e-2, momentum=0.9), max_consecutive_errors=2
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(_tree([(3,)], 1, jnp.float32), state, params)
  clean = state.inner_state
  bad = _bad(_tree([(3,)], 2, jnp.float32), np.nan)
  for _ in range(2):
    _, state = update(bad, state, params)
    assert_trees_equal(state.inner_state, clean)
  _, state = update(bad, state, params)  # The third in a row goes through.
  assert not _all_finite(state.inner_state)


def test_nu_dtype_float64_holds_squares_beyond_float32():
  # float32 g = 1e20 is finite, but g² overflows float32: nu becomes inf and
  # that entry's updates 0 from then on (optax alike). A wider state keeps
  # the exact answer, sign(g) / sqrt(1 - decay) at the first step.
  tx = rmsprop_jax.rmsprop(1e-2, nu_dtype=jnp.float64)
  with jax.enable_x64(True):
    params = {'w': jnp.zeros(2, jnp.float32)}
    u, state = tx.update(
      {'w': jnp.array([1e20, 1.0], jnp.float32)}, tx.init(params), params
    )
    assert _all_finite(u) and _all_finite(state)
    np.testing.assert_allclose(u['w'], -1e-2 / np.sqrt(0.1), rtol=1e-6)


# --- Low precision ------------------------------------------------------------


def test_float16_moments_are_stored_as_optax_and_computed_in_float32():
  params = _tree([(5,), (2, 3)], 0, jnp.float16)
  # Gradients across float16's range, including zero and values whose
  # square under- or overflows float16.
  grads = [
    jax.tree.map(
      lambda x, s=s: x * jnp.float16(s), _tree([(5,), (2, 3)], i, jnp.float16)
    )
    for i, s in enumerate([1e-4, 300.0, 0.0, 1.0])
  ]
  for centered in (False, True):
    for eps_in_sqrt in (False, True):
      tx = rmsprop_jax.scale_by_stddev if centered else rmsprop_jax.scale_by_rms
      tx = tx(eps=1e-8, eps_in_sqrt=eps_in_sqrt, bias_correction=True)
      updates, state = _steps(tx, params, grads)
      # The state has optax's dtypes (float16), so checkpoints interchange.
      for nu in jax.tree.leaves(optax.tree.get(state, 'nu')):
        assert nu.dtype == jnp.float16
      # The reference: the same transformation on float32 gradients and a
      # float32 state that is rounded to float16 after every step (what
      # storing it in float16 does), its updates rounded to float16.
      f32 = lambda t: jax.tree.map(
        lambda leaf: (
          leaf.astype(jnp.float32) if leaf.dtype == jnp.float16 else leaf
        ),
        t,
      )
      ref_state = tx.init(f32(params))
      update = jax.jit(tx.update)
      for g, u in zip(grads, updates):
        ref_u, ref_state = update(f32(g), ref_state)
        ref_state = f32(
          jax.tree.map(
            lambda x: x.astype(jnp.float16) if x.dtype == jnp.float32 else x,
            ref_state,
          )
        )
        for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u)):
          assert x.dtype == jnp.float16
          # Within 1 float16 ulp: the float16-to-float32 convert inside the
          # program changes which multiply-adds XLA:CPU fuses into FMAs, by
          # 1 float32 ulp (measured), before the rounding to float16.
          np.testing.assert_allclose(np.float32(x), y, rtol=2**-10, atol=0)
      for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.float32(x), y, rtol=2**-10)
      assert _all_finite(updates)


def test_float16_zero_gradient_is_a_zero_step():
  # optax computes in float16, where eps = 1e-8 rounds to 0: 0 / 0 = NaN.
  params = {'w': jnp.ones(3, jnp.float16)}
  tx = rmsprop_jax.rmsprop(1e-3)
  u, _ = tx.update({'w': jnp.zeros(3, jnp.float16)}, tx.init(params), params)
  assert u['w'].dtype == jnp.float16
  np.testing.assert_array_equal(u['w'], 0)


@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('eps_in_sqrt', [True, False])
def test_centered_bias_corrected_first_step_is_finite(dtype, eps_in_sqrt):
  # At step 1 the bias-corrected variance is g² - g² = 0 up to round-off;
  # optax's can come out negative, and sqrt gives NaN.
  params = _tree([(64,)], 0, DTYPES[dtype])
  grads = _tree([(64,)], 1, DTYPES[dtype])
  tx = rmsprop_jax.rmsprop(
    1e-4,
    decay=0.9,
    eps=1e-2,
    centered=True,
    bias_correction=True,
    eps_in_sqrt=eps_in_sqrt,
  )
  u, state = tx.update(grads, tx.init(params), params)
  assert _all_finite(u)
  eff = rmsprop_jax.effective_learning_rate(
    state,
    1e-4,
    eps=1e-2,
    eps_in_sqrt=eps_in_sqrt,
    bias_correction=True,
    decay=0.9,
  )
  assert _all_finite(eff)


@pytest.mark.parametrize('eps_in_sqrt', [True, False])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_centered_variance_survives_catastrophic_cancellation(
  eps_in_sqrt, dtype
):
  # Gradients 1e3 + 1e-3 * noise: nu ~ 1e6 and mu² ~ 1e6 agree to ~1e-12
  # relative, far below float32's 6e-8; nu - mu² is round-off of either sign.
  rng = np.random.default_rng(0)
  params = {'w': jnp.zeros(256, DTYPES[dtype])}
  tx = rmsprop_jax.rmsprop(
    1e-6, decay=0.9, eps=1e-8, centered=True, eps_in_sqrt=eps_in_sqrt
  )

  def step(state, noise):
    g = {'w': (1e3 + 1e-3 * noise).astype(DTYPES[dtype])}
    u, state = tx.update(g, state, params)
    return state, u['w']

  noise = jnp.asarray(rng.normal(size=(300, 256)), jnp.float32)
  state, updates = jax.lax.scan(step, tx.init(params), noise)
  assert _all_finite(updates) and _all_finite(state)
  # The step is bounded by |g| / sqrt(eps) (inside) or |g| / eps (outside).
  bound = 1e-6 * 1.01e3 / (np.sqrt(1e-8) if eps_in_sqrt else 1e-8)
  assert float(jnp.max(jnp.abs(updates.astype(jnp.float32)))) <= bound * 1.01


# --- Clear errors -------------------------------------------------------------


def test_mismatched_gradient_tree_names_the_leaf():
  tx = rmsprop_jax.rmsprop(1e-3)
  params = {'a': jnp.zeros(2), 'b': jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"gradient tree does not match.*'b'"):
    tx.update({'a': jnp.zeros(2)}, state)
  with pytest.raises(ValueError, match=r"\['b'\] has shape \(4,\)"):
    tx.update({'a': jnp.zeros(2), 'b': jnp.zeros(4)}, state)
  with pytest.raises(ValueError, match=r'parameter tree does not match'):
    tx.update(params, state, {'a': jnp.zeros(2)})


def test_state_from_other_params_is_named():
  tx = rmsprop_jax.rmsprop(1e-3, centered=True)
  state = tx.init({'a': jnp.zeros(2)})
  with pytest.raises(ValueError, match='optimizer state'):
    jax.jit(tx.update)({'a': jnp.zeros(2), 'c': jnp.zeros(1)}, state)


@pytest.mark.parametrize(
  'leaf, message',
  [
    (jnp.zeros(2, jnp.int32), 'dtype int32'),
    (np.arange(3), 'dtype int64|dtype int32'),
    ('weights', 'is a str, not an array'),
    (True, 'dtype bool'),
  ],
)
def test_integer_and_non_array_leaves_are_refused(leaf, message):
  tx = rmsprop_jax.rmsprop(1e-3)
  with pytest.raises(TypeError, match=rf"\['bad'\] (has )?({message})"):
    tx.init({'ok': jnp.zeros(2), 'bad': leaf})
  state = tx.init({'ok': jnp.zeros(2), 'bad': jnp.zeros(np.shape(leaf))})
  if not isinstance(leaf, str):
    with pytest.raises(TypeError, match='gradient leaf'):
      tx.update({'ok': jnp.zeros(2), 'bad': leaf}, state)


@pytest.mark.parametrize('decoupled', [False, True])
def test_weight_decay_without_params_says_so(decoupled):
  tx = rmsprop_jax.rmsprop(
    1e-3, weight_decay=1e-2, decoupled_weight_decay=decoupled
  )
  params = {'w': jnp.zeros(2)}
  with pytest.raises(ValueError, match='weight_decay needs the parameters'):
    tx.update(params, tx.init(params))


# --- Long runs ----------------------------------------------------------------


def _set_counts(state, value):
  return jax.tree.map(
    lambda x: jnp.full_like(x, value) if x.dtype == jnp.int32 else x, state
  )


def test_step_counts_saturate_instead_of_wrapping():
  top = 2**31 - 1
  params = {'w': jnp.ones(3)}
  g = {'w': jnp.array([1.0, -2.0, 3.0])}
  # The bias-correction count and the schedule's count.
  tx = rmsprop_jax.rmsprop(
    optax.exponential_decay(1e-2, 100, 0.5),
    bias_correction=True,
    centered=True,
    momentum=0.9,
  )
  state = _set_counts(tx.init(params), top - 2)
  update = jax.jit(tx.update)
  for _ in range(4):
    u, state = update(g, state, params)
    assert _all_finite(u)
  counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]
  assert len(counts) == 2 and all(int(c) == top for c in counts)
  # The skip counters.
  tx = rmsprop_jax.rmsprop(1e-2, skip_nonfinite=True)
  state = _set_counts(tx.init(params), top - 2)
  for _ in range(4):
    u, state = jax.jit(tx.update)({'w': jnp.full(3, jnp.nan)}, state, params)
    assert _all_finite(u)
  assert int(optax.tree.get(state, 'total_notfinite')) == top
  assert int(optax.tree.get(state, 'notfinite_count')) == top


@pytest.mark.parametrize('kwargs', [{}, {'centered': True, 'momentum': 0.9}])
def test_a_million_steps_stay_finite_and_stable(kwargs):
  # A noisy quadratic bowl: after 10⁶ steps the iterate still sits at the
  # noise floor of the first 10⁴, with finite state.
  tx = rmsprop_jax.rmsprop(1e-3, decay=0.99, **kwargs)
  curvature = jnp.array([100.0, 1.0, 0.01])

  def step(carry, key):
    x, state = carry
    g = curvature * x + 0.1 * jax.random.normal(key, (3,))
    u, state = tx.update(g, state, x)
    return (x + u, state), jnp.sum(curvature * x**2)

  x0 = jnp.ones(3)

  @jax.jit
  def run(key):
    return jax.lax.scan(step, (x0, tx.init(x0)), jax.random.split(key, 10**6))

  (x, state), losses = run(jax.random.PRNGKey(0))
  losses = np.asarray(losses)
  assert np.isfinite(losses).all() and _all_finite(state)
  early, late = np.median(losses[9000:10000]), np.median(losses[-1000:])
  assert late < 2 * early + 1e-3


# --- Determinism --------------------------------------------------------------

_SCRIPT = """
import hashlib, jax, jax.numpy as jnp, numpy as np, optax, rmsprop_jax
tx = rmsprop_jax.rmsprop(1e-2, centered=True, momentum=0.9)
x = {'a': jnp.linspace(-1, 1, 1000), 'b': jnp.ones((7, 3))}
f = lambda p: sum(jnp.sum(jnp.sin(3 * v) * v**2) for v in jax.tree.leaves(p))
@jax.jit
def step(x, s):
  u, s = tx.update(jax.grad(f)(x), s, x)
  return optax.apply_updates(x, u), s
s = tx.init(x)
for _ in range(50):
  x, s = step(x, s)
h = hashlib.sha256()
for leaf in jax.tree.leaves((x, s)):
  h.update(np.asarray(leaf).tobytes())
print(h.hexdigest())
"""


def test_bit_identical_from_run_to_run():
  """Two fresh interpreters, each compiling the step itself: without the
  test run's compilation cache (see conftest.py), which would hand the
  second the first one's program."""
  env = {
    k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'
  }
  runs = [
    subprocess.run(
      [sys.executable, '-c', _SCRIPT],
      capture_output=True,
      text=True,
      check=True,
      env=env,
    ).stdout.strip()
    for _ in range(2)
  ]
  assert len(runs[0]) == 64 and runs[0] == runs[1]
