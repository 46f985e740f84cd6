"""``rmsprop_jax`` against optax itself: a drop-in replacement, bit for bit."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

from helpers import (
  assert_trees_equal,
  gradient_sequence,
  lowered_graph,
  random_tree,
  run,
)

STEPS = 12


def _configs():
  """Every combination of optax.rmsprop's structural arguments."""
  momenta = [(None, False), (0.0, False), (0.9, False), (0.9, True)]
  for centered, (
    momentum,
    nesterov,
  ), bias_correction, eps_in_sqrt, initial_scale in itertools.product(
    [False, True], momenta, [False, True], [True, False], [0.0, 1.0]
  ):
    yield dict(
      centered=centered,
      momentum=momentum,
      nesterov=nesterov,
      bias_correction=bias_correction,
      eps_in_sqrt=eps_in_sqrt,
      initial_scale=initial_scale,
    )


CONFIGS = list(_configs())
LEARNING_RATES = {
  'constant': 0.05,
  'schedule': optax.linear_schedule(0.1, 0.01, STEPS),
}


def _exact_kwargs(config):
  # Centered with bias correction and a zero start has a variance that is
  # exactly 0 at step 1 (round-off only); optax takes the square root of
  # that round-off, negative or not. Compare with optax's unclamped
  # expression; test_clamp_* below covers the default clamp.
  if config['centered']:
    return dict(clamp_variance=False)
  return {}


# The schedule enters the chain at one place, the learning-rate scaling
# before the momentum buffer: it runs with every combination of the
# arguments around that place (centered, momentum and Nesterov, bias
# correction, which counts steps too), with eps_in_sqrt and initial_scale
# taking their four pairs in turn; the constant rate runs with every
# combination.
_AROUND = ('centered', 'momentum', 'nesterov', 'bias_correction')
_GROUPS = list(dict.fromkeys(tuple(c[k] for k in _AROUND) for c in CONFIGS))
SCHEDULE_CONFIGS = [
  [c for c in CONFIGS if tuple(c[k] for k in _AROUND) == group][i % 4]
  for i, group in enumerate(_GROUPS)
]


# Every configuration, learning rate and dtype lowers to optax's own
# computation (cheap: nothing compiles or runs); a cover of them is also
# compiled and run against optax, bit for bit, below, and for 12 cases
# test_default_compiles_optax_own_program compiles both and compares the
# programs instruction for instruction.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': None}


@pytest.mark.parametrize('config', CONFIGS, ids=str)
@pytest.mark.parametrize('lr', list(LEARNING_RATES))
@pytest.mark.parametrize('dtype', list(DTYPES))
def test_rmsprop_lowers_to_optax_own_computation(dtype, lr, config, request):
  """``rmsprop_jax.rmsprop`` with optax's arguments is optax.rmsprop: the
  same operations on the same values (:func:`helpers.lowered_graph`), and
  the same initial state."""
  if dtype == 'float64':
    request.getfixturevalue('x64')
  params = random_tree(1, DTYPES[dtype] or jnp.float64)
  lr = LEARNING_RATES[lr]
  ours = rmsprop_jax.rmsprop(
    lr, decay=0.85, eps=1e-6, **config, **_exact_kwargs(config)
  )
  ref = optax.rmsprop(lr, decay=0.85, eps=1e-6, **config)
  state, ref_state = ours.init(params), ref.init(params)
  assert_trees_equal(jax.tree.leaves(state), jax.tree.leaves(ref_state))
  assert lowered_graph(ours.update, params, state, params) == lowered_graph(
    ref.update, params, ref_state, params
  )
  # The state after a step has the types it started with, so the same
  # computation runs at every step.
  after = jax.eval_shape(ours.update, params, state, params)[1]
  assert jax.tree.structure(after) == jax.tree.structure(state)
  assert [jax.typeof(x) for x in jax.tree.leaves(after)] == [
    jax.typeof(x) for x in jax.tree.leaves(state)
  ]


def test_lowered_graph_tells_optimizers_apart():
  """The comparison above can fail: another eps, optax's centered
  variance against the default clamp, another dtype, or another
  operation inside a called function, is another computation; the order
  of the operations is not."""
  params = random_tree(1)
  graph = lambda tx, p=params: lowered_graph(tx.update, p, tx.init(p), p)
  optax_centered = graph(optax.rmsprop(0.1, centered=True))
  assert graph(rmsprop_jax.rmsprop(0.1, eps=1e-7)) != graph(optax.rmsprop(0.1))
  assert graph(rmsprop_jax.rmsprop(0.1, centered=True)) != optax_centered
  assert (
    graph(rmsprop_jax.rmsprop(0.1, centered=True, clamp_variance=False))
    == optax_centered
  )
  half = random_tree(1, jnp.bfloat16)
  assert graph(optax.rmsprop(0.1), half) != graph(optax.rmsprop(0.1))

  def one_order(g, state, params=None):
    return jax.tree.map(lambda x: 2 * x, g), jax.tree.map(jnp.sqrt, g)

  def other_order(g, state, params=None):
    roots = jax.tree.map(jnp.sqrt, g)
    return jax.tree.map(lambda x: 2 * x, g), roots

  assert lowered_graph(one_order, params, None) == lowered_graph(
    other_order, params, None
  )
  # Inside a call (a jitted function called by another) as outside.
  x = params['dense']['w']
  assert lowered_graph(lambda x: jax.jit(jnp.sin)(x) + 1, x) != (
    lowered_graph(lambda x: jax.jit(jnp.cos)(x) + 1, x)
  )


def _pairwise_cover(configs):
  """Configurations of ``configs`` (greedily, in their order) that hold
  every pair of values that any two arguments take together in it."""

  def pairs(c):
    return set(itertools.combinations(sorted(c.items(), key=str), 2))

  missing = set().union(*map(pairs, configs))
  cover = []
  while missing:
    best = max(configs, key=lambda c: len(pairs(c) & missing))
    cover.append(best)
    missing -= pairs(best)
  return cover


# Run against optax, compiled: a pairwise cover of the configurations (9 of
# 64) in each dtype, and with the schedule each combination of the
# arguments around it (SCHEDULE_CONFIGS).
RUN_CONFIGS = _pairwise_cover(CONFIGS)


def test_run_configs_hold_every_pair_of_argument_values():
  for cover, grid in (
    (RUN_CONFIGS, CONFIGS),
    (BLOCK_RUN_ARGS, BLOCK_ARGS),
  ):
    for a, b in itertools.combinations(grid[0], 2):
      assert {(c[a], c[b]) for c in cover} == {(c[a], c[b]) for c in grid}, (
        a,
        b,
      )
    assert len(cover) < len(grid) / 4
  # The schedule runs with every combination of the arguments around it.
  assert len({tuple(c[k] for k in _AROUND) for c in SCHEDULE_CONFIGS}) == 16


@pytest.mark.parametrize(
  ('lr', 'config'),
  [('constant', c) for c in RUN_CONFIGS]
  + [('schedule', c) for c in SCHEDULE_CONFIGS],
  ids=lambda x: x if isinstance(x, str) else str(x),
)
def test_rmsprop_matches_optax_float32(config, lr):
  params = random_tree(1)
  grads = gradient_sequence(STEPS, scale=2.0, shift=0.3)
  lr = LEARNING_RATES[lr]
  ours, our_state = run(
    rmsprop_jax.rmsprop(
      lr, decay=0.85, eps=1e-6, **config, **_exact_kwargs(config)
    ),
    params,
    grads,
  )
  ref, ref_state = run(
    optax.rmsprop(lr, decay=0.85, eps=1e-6, **config), params, grads
  )
  assert_trees_equal(ours, ref)
  # The state holds the same numbers in the same places.
  assert_trees_equal(jax.tree.leaves(our_state), jax.tree.leaves(ref_state))


@pytest.mark.parametrize('config', CONFIGS[::3], ids=str)
def test_rmsprop_matches_optax_eagerly(config):
  params = random_tree(2)
  grads = gradient_sequence(5, seed=3)
  ours, _ = run(
    rmsprop_jax.rmsprop(0.01, **config, **_exact_kwargs(config)),
    params,
    grads,
    jit=False,
  )
  ref, _ = run(optax.rmsprop(0.01, **config), params, grads, jit=False)
  # Op by op, the same operations in the same order: the same bits.
  assert_trees_equal(ours, ref)


@pytest.mark.parametrize('config', RUN_CONFIGS, ids=str)
def test_rmsprop_matches_optax_float64(config, x64):
  params = random_tree(4, jnp.float64)
  grads = gradient_sequence(STEPS, jnp.float64, seed=5)
  ours, _ = run(
    rmsprop_jax.rmsprop(0.02, decay=0.95, **config, **_exact_kwargs(config)),
    params,
    grads,
  )
  ref, _ = run(optax.rmsprop(0.02, decay=0.95, **config), params, grads)
  assert_trees_equal(ours, ref)
  assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(ours))


@pytest.mark.parametrize('config', RUN_CONFIGS, ids=str)
def test_rmsprop_matches_optax_bfloat16(config):
  params = random_tree(6, jnp.bfloat16)
  grads = gradient_sequence(STEPS, jnp.bfloat16, seed=7)
  ours, state = run(
    rmsprop_jax.rmsprop(0.02, **config, **_exact_kwargs(config)), params, grads
  )
  ref, _ = run(optax.rmsprop(0.02, **config), params, grads)
  assert_trees_equal(ours, ref)
  assert {x.dtype for x in jax.tree.leaves(ours)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(optax.tree.get(state, 'nu'))} == {
    jnp.dtype(jnp.bfloat16)
  }


BLOCK_ARGS = [
  dict(decay=d, eps=e, initial_scale=s, eps_in_sqrt=i, bias_correction=b)
  for d, e, s, i, b in itertools.product(
    [0.9, 0.5], [1e-8, 0.1], [0.0, 2.0], [True, False], [False, True]
  )
]
BLOCKS = ['scale_by_rms', 'scale_by_stddev']
BLOCK_RUN_ARGS = _pairwise_cover(BLOCK_ARGS)


def _blocks(name, kwargs):
  extra = dict(clamp_variance=False) if name == 'scale_by_stddev' else {}
  return (
    getattr(rmsprop_jax, name)(**kwargs, **extra),
    getattr(optax, name)(**kwargs),
  )


@pytest.mark.parametrize('kwargs', BLOCK_ARGS, ids=str)
@pytest.mark.parametrize('name', BLOCKS)
def test_building_blocks_lower_to_optax_own_computation(name, kwargs):
  params = random_tree(8)
  ours, ref = _blocks(name, kwargs)
  state, ref_state = ours.init(params), ref.init(params)
  assert state._fields == ref_state._fields
  assert_trees_equal(tuple(state), tuple(ref_state))
  assert lowered_graph(ours.update, params, state) == lowered_graph(
    ref.update, params, ref_state
  )


# Run against optax, compiled: a pairwise cover of the grid above.
@pytest.mark.parametrize('kwargs', BLOCK_RUN_ARGS, ids=str)
@pytest.mark.parametrize('name', BLOCKS)
def test_building_blocks_match_optax(name, kwargs):
  params = random_tree(8)
  grads = gradient_sequence(STEPS, seed=9, shift=-0.5)
  ours, ref = _blocks(name, kwargs)
  ours, our_state = run(ours, params, grads)
  ref, ref_state = run(ref, params, grads)
  assert_trees_equal(ours, ref)
  assert our_state._fields == ref_state._fields
  assert_trees_equal(tuple(our_state), tuple(ref_state))


def _optax_variance(state):
  """The centered variance optax used, read back from optax's own state."""
  return jax.tree.map(lambda m, n: n - m * m, state.mu, state.nu)


def _cancelling(seed):
  """Parameters (500 zeros) and 600 gradients ``1e3 + 1e-3 * noise``:
  catastrophic cancellation, once the zero start has decayed away, |mean|
  >> std makes nu - mu**2 round below zero in many entries."""
  noise = np.random.default_rng(seed).standard_normal((600, 500), 'f4')
  return {'w': jnp.zeros(500)}, {'w': 1e3 + 1e-3 * noise}


@pytest.mark.parametrize('eps_in_sqrt', [True, False])
def test_clamp_changes_only_negative_variances(eps_in_sqrt):
  eps = 1e-8
  params, grads = _cancelling(0)
  ours = rmsprop_jax.scale_by_stddev(
    decay=0.95, eps=eps, eps_in_sqrt=eps_in_sqrt
  )
  ref = optax.scale_by_stddev(decay=0.95, eps=eps, eps_in_sqrt=eps_in_sqrt)

  @jax.jit
  def both(grads):
    def step(states, g):
      u_ours, s_ours = ours.update(g, states[0])
      u_ref, s_ref = ref.update(g, states[1])
      var = _optax_variance(s_ref)  # What optax took the root of.
      return (s_ours, s_ref), (u_ours, u_ref, var)

    return jax.lax.scan(step, (ours.init(params), ref.init(params)), grads)

  (s_ours, s_ref), (u_ours, u_ref, var) = both(grads)
  u_ours, u_ref = np.asarray(u_ours['w']), np.asarray(u_ref['w'])
  g, neg = np.asarray(grads['w']), np.asarray(var['w'] < 0)
  assert neg.sum() > 100  # The test really exercises the clamp.
  # Identical wherever optax's variance is not negative ...
  np.testing.assert_array_equal(u_ours[~neg], u_ref[~neg])
  # ... and where it is, the variance counts as zero, and the step is finite.
  denom = np.sqrt(eps) if eps_in_sqrt else eps
  np.testing.assert_allclose(u_ours[neg], g[neg] / denom, rtol=1e-6)
  if not eps_in_sqrt:
    assert np.isnan(u_ref[neg]).all()  # optax: sqrt of a negative number.
  chex.assert_trees_all_equal(s_ours.nu, s_ref.nu)  # The state is untouched.


@pytest.mark.parametrize('bias_correction', [False, True])
@pytest.mark.parametrize('eps_in_sqrt', [True, False])
def test_unclamped_variance_is_optax_own_where_it_is_negative(
  eps_in_sqrt, bias_correction
):
  """``clamp_variance=False`` is optax's expression where ``nu - mu**2``
  rounds below zero too: NaN where optax takes the root of a negative
  number, the same bits elsewhere, with eps inside or outside the root
  (PyTorch's centered RMSprop), with or without bias correction. The
  random trees of the parity grid make a variance negative only by chance;
  these gradients (:func:`_cancelling`) make it certain."""
  params, grads = _cancelling(1)
  kwargs = dict(
    decay=0.95,
    eps=1e-8,
    centered=True,
    eps_in_sqrt=eps_in_sqrt,
    bias_correction=bias_correction,
  )
  ours = rmsprop_jax.rmsprop(0.01, clamp_variance=False, **kwargs)
  ref = optax.rmsprop(0.01, **kwargs)

  def scan(tx):
    """The updates and the variance ``nu - mu**2`` (not bias-corrected:
    0.95**t is below float32's resolution of 1 long before it cancels) of
    each step, and the last state: one program per optimizer, so that
    XLA cannot share our expressions with optax's."""

    def step(state, g):
      u, state = tx.update(g, state)
      return state, (u, _optax_variance(state[0]))

    return jax.jit(lambda g: jax.lax.scan(step, tx.init(params), g))(grads)

  s_ours, (u_ours, _) = scan(ours)
  s_ref, (u_ref, var) = scan(ref)
  assert int(np.sum(np.asarray(var['w']) < 0)) > 100
  # |nu - mu**2| is far above eps there: optax's root is NaN either way.
  assert np.isnan(np.asarray(u_ref['w'])).any()
  assert_trees_equal(u_ours, u_ref)
  assert_trees_equal(s_ours, s_ref)


def test_clamp_makes_centered_bias_corrected_first_step_finite():
  params = random_tree(0)
  grads = gradient_sequence(1, scale=3.0, seed=11)
  ours, _ = run(
    rmsprop_jax.rmsprop(
      1.0, centered=True, bias_correction=True, eps_in_sqrt=False
    ),
    params,
    grads,
  )
  chex.assert_tree_all_finite(ours)


def test_state_fields_are_found_by_name():
  params = random_tree(0)
  tx = rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9)
  state = tx.init(params)
  chex.assert_trees_all_equal_structs(optax.tree.get(state, 'nu'), params)
  chex.assert_trees_all_equal_structs(optax.tree.get(state, 'mu'), params)
  chex.assert_trees_all_equal_structs(optax.tree.get(state, 'trace'), params)


def _compiled_step(tx, params):
  """The optimized HLO of a jitted, donated update + apply_updates, without
  the source locations and instruction names that name our code."""
  import re

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  text = (
    jax.jit(step, donate_argnums=(0, 1))
    .lower(params, tx.init(params), params)
    .compile()
    .as_text()
  )
  text = '\n\n'.join(
    part
    for part in text.split('\n\n')
    if not part.startswith(
      ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')
    )
  )
  text = re.sub(r', metadata=\{[^}]*\}|,? ?stack_frame_id=\d+', '', text)
  names = {}  # Instruction names come from source ops: number them instead.
  return re.sub(
    r'%[\w.-]+', lambda m: names.setdefault(m.group(), f'%v{len(names)}'), text
  )


@pytest.mark.parametrize('config', CONFIGS[::11], ids=str)
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_default_compiles_optax_own_program(config, dtype):
  """The benchmarks' premise: with optax's arguments the step XLA runs is
  optax's, instruction for instruction (timing differences are noise).
  Centered RMSprop's default clamp adds one select to the fused kernel."""
  params = {'a': jnp.ones((300,), dtype), 'b': jnp.ones((3, 8), dtype)}
  ref = _compiled_step(optax.rmsprop(0.1, **config), params)
  ours = _compiled_step(
    rmsprop_jax.rmsprop(0.1, **config, **_exact_kwargs(config)), params
  )
  assert ours == ref
  if config['centered']:
    clamped = _compiled_step(rmsprop_jax.rmsprop(0.1, **config), params)
    assert clamped != ref and clamped.count(' select(') > ref.count(' select(')
