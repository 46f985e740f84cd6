"""JAX transformations, optax machinery, pytrees and dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

from helpers import assert_trees_equal, gradient_sequence, random_tree, run

ALL_FEATURES = dict(
  centered=True,
  momentum=0.9,
  bias_correction=True,
  eps_in_sqrt=False,
  weight_decay=0.01,
  decoupled_weight_decay=True,
  maximize=True,
)


def _assert_close_to_rounding(actual, desired):
  """float32 round-off, measured against each leaf's largest entry.

  A hyperparameter given as a Python float is folded into the program in
  double precision (``1 - 0.8`` is then rounded once), while a float32 array
  (``inject_hyperparams``, a schedule's value) is rounded first and
  subtracted in float32: the two differ in the last bit. Momentum sums
  terms of opposite sign, so one bit of a term's size can be a large
  fraction of a small result; the tolerance is therefore absolute, relative
  to the leaf's largest entry. Its size: float32(0.99) is off by 6e-9, which
  is 6e-7 of 1 - 0.99, so the first steps of alpha=0.99 differ by ~3e-7.
  """
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
    scale = float(jnp.max(jnp.abs(d)))
    np.testing.assert_allclose(a, d, rtol=0, atol=2e-6 * scale)


def test_jit_does_not_recompile():
  params = random_tree(0)
  tx = rmsprop_jax.rmsprop(
    optax.cosine_decay_schedule(0.1, 100), **ALL_FEATURES
  )

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for grads in gradient_sequence(4):
    params, state = step(params, state, grads)
  chex.assert_tree_all_finite(params)


def test_vmap_over_a_batch_of_parameter_trees_equals_a_loop():
  tx = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.5)
  batch = 3
  params = [random_tree(i) for i in range(batch)]
  grads = [gradient_sequence(5, seed=10 + i) for i in range(batch)]
  loop = [run(tx, p, g)[0][-1] for p, g in zip(params, grads)]

  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  b_params = stack(params)
  b_grads = [stack([g[t] for g in grads]) for t in range(5)]
  state = jax.vmap(tx.init)(b_params)
  update = jax.jit(jax.vmap(tx.update))
  for g in b_grads:
    updates, state = update(g, state, b_params)
  for i in range(batch):
    assert_trees_equal(jax.tree.map(lambda x, i=i: x[i], updates), loop[i])


def test_vmap_over_hyperparameters_equals_a_loop():
  params = random_tree(0)
  grads = gradient_sequence(6)
  lrs = jnp.array([0.1, 0.01, 0.001])
  decays = jnp.array([0.5, 0.9, 0.99])

  def final_params(lr, decay):
    tx = rmsprop_jax.rmsprop(lr, decay=decay, momentum=0.9)
    p, state = params, tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, p)
      p = optax.apply_updates(p, u)
    return p

  batched = jax.jit(jax.vmap(final_params))(lrs, decays)
  for i in range(3):
    member = jax.tree.map(lambda x, i=i: x[i], batched)
    alone = final_params(float(lrs[i]), float(decays[i]))  # Eagerly.
    assert jax.tree.structure(member) == jax.tree.structure(alone)
    # Compiled, XLA:CPU contracts some multiply-adds into FMAs that the
    # eager loop rounds twice: an ulp or two of the terms (the start and
    # each step), which is a large part of an entry that the steps bring
    # near zero. Hence a tolerance relative to each entry or to the leaf's
    # largest magnitude, at the start or the end (measured over 60 draws of
    # the data: 0.17 of it at most; swapped or 1e-5-off hyperparameters
    # exceed it many times).
    for x, y, start in zip(
      jax.tree.leaves(member), jax.tree.leaves(alone), jax.tree.leaves(params)
    ):
      scale = max(float(np.max(np.abs(y))), float(np.max(np.abs(start))))
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6 * scale)


def test_inject_hyperparams_matches_fixed_hyperparameters():
  params = random_tree(0)
  grads = gradient_sequence(5)
  kwargs = dict(decay=0.8, eps=1e-6, momentum=0.9, weight_decay=0.01)
  injected = optax.inject_hyperparams(rmsprop_jax.rmsprop)(
    learning_rate=0.02, **kwargs
  )
  ours, state = run(injected, params, grads)
  ref, _ = run(rmsprop_jax.rmsprop(0.02, **kwargs), params, grads)
  _assert_close_to_rounding(ours, ref)
  # The injected value is the one used: with the learning rate set to 0 in
  # the state, only the decayed momentum buffer moves the parameters.
  state.hyperparams['learning_rate'] = jnp.asarray(0.0)
  coasting, _ = injected.update(grads[0], state, params)
  chex.assert_trees_all_close(
    coasting,
    jax.tree.map(lambda b: 0.9 * b, optax.tree.get(state, 'trace')),
    rtol=1e-6,
  )


@pytest.mark.parametrize(
  'preset, kwargs',
  [
    (rmsprop_jax.presets.pytorch, dict(lr=0.01)),
    (rmsprop_jax.presets.keras, dict(learning_rate=0.01)),
    (rmsprop_jax.presets.tf1, dict(learning_rate=0.01, momentum=0.5)),
    (rmsprop_jax.presets.graves2013, dict()),
    (rmsprop_jax.presets.dqn2015, dict()),
  ],
)
def test_presets_work_inside_inject_hyperparams(preset, kwargs):
  params = random_tree(0)
  grads = gradient_sequence(3)
  ours, _ = run(optax.inject_hyperparams(preset)(**kwargs), params, grads)
  ref, _ = run(preset(**kwargs), params, grads)
  _assert_close_to_rounding(ours, ref)


def test_schedule_equals_stepwise_constants():
  params = random_tree(0)
  grads = gradient_sequence(6)
  schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.7)
  ours, _ = run(
    rmsprop_jax.rmsprop(schedule, momentum=0.9, lr_in_momentum=False),
    params,
    grads,
  )
  # Independent: PyTorch-style placement by hand, lr = schedule(t) at step t.
  tx = rmsprop_jax.rmsprop(1.0, momentum=0.9, lr_in_momentum=False)
  state = tx.init(params)
  for t, g in enumerate(grads):
    u, state = tx.update(g, state, params)
    _assert_close_to_rounding(
      ours[t], jax.tree.map(lambda x, t=t: schedule(t) * x, u)
    )


def test_unknown_extra_arguments_are_accepted():
  params = random_tree(0)
  tx = rmsprop_jax.rmsprop(0.1, **ALL_FEATURES)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  state = tx.init(params)
  updates, _ = tx.update(
    params, state, params, value=jnp.ones(()), some_unknown_argument='ignored'
  )
  chex.assert_trees_all_equal_structs(updates, params)


def test_nested_pytrees_with_scalars_and_empty_subtrees():
  params = {
    'dict': {'a': jnp.ones((2, 3)), 'empty': {}},
    'list': [jnp.arange(3.0), (jnp.array(2.0), ())],
    'tuple': (jnp.zeros((1,)),),
    'scalar': jnp.array(-1.5),
    'none': None,
  }
  grads = jax.tree.map(lambda p: 0.5 * p + 0.1, params)
  for kwargs in [dict(), ALL_FEATURES]:
    tx = rmsprop_jax.rmsprop(0.1, **kwargs)
    ref = optax.rmsprop(0.1) if not kwargs else None
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_equal_structs(updates, params)
    if ref is not None:
      ref_updates, _ = ref.update(grads, ref.init(params), params)
      assert_trees_equal(updates, ref_updates)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_are_preserved(dtype):
  params = random_tree(0, dtype)
  grads = gradient_sequence(3, dtype)
  tx = rmsprop_jax.rmsprop(0.01, **ALL_FEATURES)
  updates, state = run(tx, params, grads)
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}
  # Every state array keeps the parameters' dtype, as optax's (float16
  # moments are computed in float32 but stored in float16).
  for name, want in [('nu', dtype), ('mu', dtype), ('trace', dtype)]:
    assert {x.dtype for x in jax.tree.leaves(optax.tree.get(state, name))} == {
      jnp.dtype(want)
    }, name


def test_dtypes_are_preserved_in_float64(x64):
  test_dtypes_are_preserved(jnp.float64)


@pytest.mark.parametrize('centered', [False, True])
def test_nu_dtype_is_honoured(centered):
  params = random_tree(0, jnp.bfloat16)
  grads = gradient_sequence(8, jnp.bfloat16, seed=1)
  names = ['nu', 'mu'] if centered else ['nu']
  block = rmsprop_jax.scale_by_stddev if centered else rmsprop_jax.scale_by_rms
  ref_block = optax.scale_by_stddev if centered else optax.scale_by_rms
  updates, state = run(block(nu_dtype=jnp.float32), params, grads)
  for name in names:
    assert {x.dtype for x in jax.tree.leaves(getattr(state, name))} == {
      jnp.dtype(jnp.float32)
    }
  # Independent reference: optax run entirely in float32 on the same
  # (bfloat16-valued) gradients, its output rounded to bfloat16. The same
  # float32 formula, but our program starts with a bfloat16 -> float32
  # convert, and XLA:CPU then contracts the EMA into an FMA differently:
  # float32 round-off in the state, at most one bfloat16 ulp in the output.
  up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  ref, ref_state = run(ref_block(), up(params), [up(g) for g in grads])
  chex.assert_trees_all_close(
    updates,
    jax.tree.map(lambda x: x.astype(jnp.bfloat16), ref),
    rtol=2**-7,
    atol=0,
  )
  for name in names:  # mu sums signed terms: ulps of the largest entry.
    _assert_close_to_rounding(getattr(state, name), getattr(ref_state, name))
  # Fed float32 gradients, there is no convert, and no difference at all.
  exact, exact_state = run(
    block(nu_dtype=jnp.float32), up(params), [up(g) for g in grads]
  )
  assert_trees_equal(exact, ref)
  assert_trees_equal(tuple(exact_state), tuple(ref_state))
  # Through the full optimizer, the updates keep the gradients' dtype.
  tx = rmsprop_jax.rmsprop(
    0.01, centered=centered, momentum=0.9, nu_dtype=jnp.float32
  )
  updates, state = run(tx, params, grads)
  assert {x.dtype for x in jax.tree.leaves(updates)} == {
    jnp.dtype(jnp.bfloat16)
  }
  assert {x.dtype for x in jax.tree.leaves(optax.tree.get(state, 'nu'))} == {
    jnp.dtype(jnp.float32)
  }


def test_nu_dtype_bfloat16_state_for_float32_params():
  params = random_tree(0)
  tx = rmsprop_jax.scale_by_rms(nu_dtype='bfloat16')
  updates, state = run(tx, params, gradient_sequence(3))
  assert {x.dtype for x in jax.tree.leaves(state.nu)} == {
    jnp.dtype(jnp.bfloat16)
  }
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_complex_parameters_match_optax():
  params = {'z': jnp.array([1 + 2j, -0.5j, 3.0], jnp.complex64)}
  grads = [
    jax.tree.map(lambda z, t=t: z * (0.3 + 0.1j * t) + 0.2, params)
    for t in range(4)
  ]
  ours, _ = run(
    rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9, clamp_variance=False),
    params,
    grads,
  )
  ref, _ = run(optax.rmsprop(0.1, centered=True, momentum=0.9), params, grads)
  assert_trees_equal(ours, ref)


def test_weight_decay_mask():
  params = {'w': jnp.ones(3), 'b': jnp.ones(3)}
  grads = jax.tree.map(jnp.zeros_like, params)
  mask = {'w': True, 'b': False}
  for decoupled in [False, True]:
    tx = rmsprop_jax.rmsprop(
      0.1,
      weight_decay=0.5,
      weight_decay_mask=mask,
      decoupled_weight_decay=decoupled,
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.asarray(updates['w']) < 0)
    np.testing.assert_array_equal(updates['b'], 0.0)


def test_weight_decay_needs_params():
  tx = rmsprop_jax.rmsprop(0.1, weight_decay=0.1)
  params = {'w': jnp.ones(2)}
  with pytest.raises(ValueError, match='params'):
    tx.update(params, tx.init(params))
  # Zero weight decay keeps no transformation and needs no params.
  tx = rmsprop_jax.presets.pytorch()
  tx.update(params, tx.init(params))
