"""The dtype policy of ``rmsprop`` (its docstring, and the table in docs/guides/dtypes.md).

The four numbered cases come from public bug reports against optax and
PyTorch; each is checked with its right value (closed forms, NumPy
transcriptions, real optax where optax is self-consistent). The property
test runs every kind of them over random combinations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rmsprop_jax

from helpers import assert_trees_equal

DTYPES = {
  'float32': jnp.float32,
  'bfloat16': jnp.bfloat16,
  'float16': jnp.float16,
  'complex64': jnp.complex64,
}


def dtypes_of(tree):
  return jax.tree.map(lambda x: jnp.result_type(x), tree)


def numpy_rmsprop(grads, lr, decay, eps, centered, momentum=None):
  """Updates of optax-convention RMSprop (eps inside the root, lr inside the
  momentum buffer), in complex128 NumPy: |g|^2 in nu, g in mu."""
  nu = mu = buf = 0.0
  out = []
  for g in grads:
    g = np.asarray(g, np.complex128)
    nu = decay * nu + (1 - decay) * np.abs(g) ** 2
    mu = decay * mu + (1 - decay) * g
    s = nu - np.abs(mu) ** 2 if centered else nu
    u = lr * g / np.sqrt(np.maximum(s.real, 0) + eps)
    buf = u if momentum is None else momentum * buf + u
    out.append(-buf)
  return out


# 1. Complex parameters with a real nu_dtype keep a complex mean.

COMPLEX_VARIANTS = {
  'centered': dict(decay=0.9, centered=True),
  'graves2013': dict(decay=0.95, eps=1e-4, centered=True, momentum=0.9),
  'dqn2015': dict(decay=0.95, eps=0.01, centered=True),
  'stochastic rounding': dict(
    decay=0.9, centered=True, nu_dtype=jnp.bfloat16, stochastic_rounding=True
  ),
  'packed': dict(decay=0.9, centered=True, packing=True),
}


@pytest.mark.parametrize('name', list(COMPLEX_VARIANTS))
def test_complex_centered_with_real_nu_dtype(name):
  kwargs = dict(nu_dtype=jnp.float32) | COMPLEX_VARIANTS[name]
  params = {'z': jnp.zeros(1, jnp.complex64), 'y': jnp.zeros(1, jnp.complex64)}
  grads = {
    'z': jnp.array([1j], jnp.complex64),
    'y': jnp.array([1j], jnp.complex64),
  }
  tx = rmsprop_jax.rmsprop(0.1, **kwargs)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(10):
    u, state = update(grads, state, params)
  mu = optax.tree.get(rmsprop_jax.unpack_state(state), 'mu')
  assert mu['z'].dtype == jnp.complex64
  assert (
    jnp.result_type(optax.tree.get(rmsprop_jax.unpack_state(state), 'nu')['z'])
    == kwargs['nu_dtype']
  )
  decay = kwargs['decay']
  np.testing.assert_allclose(mu['z'], (1 - decay**10) * 1j, rtol=1e-6)
  ref = numpy_rmsprop(
    [1j] * 10, 0.1, decay, kwargs.get('eps', 1e-8), True, kwargs.get('momentum')
  )[-1]
  # bfloat16 nu: one stochastic rounding step (2**-8) of the variance.
  rtol = 1e-2 if name == 'stochastic rounding' else 1e-6
  np.testing.assert_allclose(u['z'], ref, rtol=rtol)
  if name == 'centered':  # The closed form.
    np.testing.assert_allclose(u['z'], [-0.20984j], atol=1e-5)


# 2. State dtypes never change during update, however a hyperparameter is
#    passed.


def _bf16_params():
  return {'w': jnp.ones((4, 3), jnp.bfloat16), 'b': jnp.ones(3, jnp.bfloat16)}


HYPERPARAM_WAYS = {
  'float32 array': lambda: rmsprop_jax.rmsprop(
    jnp.asarray(1e-3, jnp.float32), momentum=0.9
  ),
  'inject_hyperparams float32': lambda: optax.inject_hyperparams(
    rmsprop_jax.rmsprop, hyperparam_dtype=jnp.float32
  )(1e-3, momentum=0.9),
  'keras preset': lambda: rmsprop_jax.presets.keras(
    jnp.asarray(1e-3, jnp.float32), momentum=0.9
  ),
  'float32 momentum and eps': lambda: rmsprop_jax.rmsprop(
    1e-3,
    momentum=jnp.asarray(0.9, jnp.float32),
    eps=np.float32(1e-8),
    decay=np.float64(0.9),
  ),
}


@pytest.mark.parametrize('way', list(HYPERPARAM_WAYS))
def test_state_dtypes_are_stable_and_scan_runs(way):
  tx = HYPERPARAM_WAYS[way]()
  params = _bf16_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
  state = tx.init(params)
  updates, new_state = tx.update(grads, state, params)
  assert dtypes_of(new_state) == dtypes_of(state)
  assert optax.tree.get(new_state, 'trace')['w'].dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(updates)} == {
    jnp.dtype(jnp.bfloat16)
  }

  def step(carry, _):
    p, s = carry
    u, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, state), _ = jax.lax.scan(step, (params, state), length=20)
  assert dtypes_of(state) == dtypes_of(tx.init(params))


def test_accumulator_dtype_keeps_momentum_steps_full_length():
  """With momentum 0.99 and a constant step of 1, the buffer tends to
  1 / (1 - 0.99) = 100; in bfloat16, 0.99 * b rounds away the step's
  contribution long before."""
  steps = 600
  expected = (1 - 0.99 ** np.arange(1, steps + 1)) / (1 - 0.99)
  results = {}
  for acc in (None, jnp.float32):
    tx = rmsprop_jax.rmsprop(
      1.0, decay=0.0, eps=0.0, momentum=0.99, accumulator_dtype=acc
    )
    params = {'w': jnp.zeros(4, jnp.bfloat16)}
    grads = {'w': jnp.ones(4, jnp.bfloat16)}  # decay 0: normalised to 1.

    def step(state, _, tx=tx, grads=grads, params=params):
      u, state = tx.update(grads, state, params)
      return state, u['w'][0]

    state, us = jax.lax.scan(step, tx.init(params), length=steps)
    assert optax.tree.get(state, 'trace')['w'].dtype == (acc or jnp.bfloat16)
    results[acc] = -np.asarray(us, np.float64)
  # float32 buffer: the NumPy values, to the bfloat16 rounding of the output.
  np.testing.assert_allclose(results[jnp.float32], expected, rtol=2**-8)
  # bfloat16 buffer: stuck at 64 (0.99 * 64 + 1 rounds back to 64), about
  # a third too short.
  assert results[None][-1] == 64


# 3. Gradients in another dtype than the parameters: the same everywhere,
#    with optax's dtypes.


@pytest.mark.parametrize('packing', [False, True])
def test_float32_gradients_for_bfloat16_parameters(packing):
  params = {
    'a': jnp.ones(3, jnp.bfloat16),
    'b': jnp.ones(3, jnp.bfloat16),
    'c': jnp.ones((40, 40), jnp.bfloat16),
  }
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, jnp.float32), params)
  tx = rmsprop_jax.rmsprop(1e-3, packing=packing)
  ref = optax.rmsprop(1e-3)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  ref_u, ref_state = ref.update(grads, ref.init(params), params)
  # optax's first step and update dtypes (float32); its state turns float32
  # after one step, ours stays bfloat16 (optax's own init dtype).
  assert_trees_equal(u, ref_u)
  assert dtypes_of(rmsprop_jax.unpack_state(state)) == dtypes_of(
    ref.init(params)
  )
  ref_state_dtypes = dtypes_of(ref_state)
  assert ref_state_dtypes != dtypes_of(ref.init(params))  # optax's fault


@pytest.mark.parametrize('grad_dtype', [jnp.bfloat16, jnp.float16])
def test_narrow_gradients_for_float32_parameters(grad_dtype):
  params = {'a': jnp.ones(3), 'c': jnp.ones((4, 4))}
  grads = [
    jax.tree.map(
      lambda p, i=i: (jnp.sin(p * (i + 2)) * 3).astype(grad_dtype), params
    )
    for i in range(3)
  ]
  tx, ref = (
    rmsprop_jax.rmsprop(1e-3, momentum=0.9),
    optax.rmsprop(1e-3, momentum=0.9),
  )
  # optax is self-consistent with bfloat16 gradients: its bits. float16
  # gradients are squared in float32 here (optax squares them in float16,
  # which cannot hold squares beyond 65504): optax fed the same gradients
  # in float32.
  widen = (
    (lambda g: g)
    if grad_dtype == jnp.bfloat16
    else (lambda g: jax.tree.map(lambda x: x.astype(jnp.float32), g))
  )
  s, rs = tx.init(params), ref.init(params)
  for g in grads:
    u, s = tx.update(g, s, params)
    ru, rs = ref.update(widen(g), rs, params)
    assert dtypes_of(u) == dtypes_of(params)
    assert_trees_equal(u, ru)
    assert_trees_equal(s, rs)
  assert dtypes_of(s) == dtypes_of(tx.init(params))


# 4. Options that cannot take effect say so, or work.


def test_weight_decay_mask_without_weight_decay_is_refused():
  with pytest.raises(ValueError, match='weight_decay_mask'):
    rmsprop_jax.rmsprop(1e-3, weight_decay_mask={'w': True})


def test_stochastic_rounding_works_for_bfloat16_parameters():
  """A slow average (decay 0.999) of a constant g**2 = 1 from nu = 0.5:
  stored in bfloat16 with rounding to nearest it never moves (each step
  changes it by 0.05 %, below bfloat16's 0.4 % resolution); stochastic
  rounding makes it follow the float64 value on average."""
  params = {'w': jnp.zeros(4096, jnp.bfloat16)}
  grads = {'w': jnp.ones(4096, jnp.bfloat16)}
  out = {}
  for sr in (False, True):
    tx = rmsprop_jax.rmsprop(
      1e-3,
      decay=0.999,
      initial_scale=0.5,
      nu_dtype=jnp.bfloat16,
      stochastic_rounding=sr,
    )

    def step(state, _, tx=tx):
      return tx.update(grads, state, params)[1], None

    state, _ = jax.lax.scan(step, tx.init(params), length=200)
    out[sr] = np.asarray(optax.tree.get(state, 'nu')['w'], np.float64)
  exact = 1 - 0.5 * 0.999**200
  assert np.all(out[False] == 0.5)
  np.testing.assert_allclose(out[True].mean(), exact, rtol=2e-3)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(decoupled_weight_decay=True), 'decoupled_weight_decay'),
    (dict(accumulator_dtype=jnp.float32), 'accumulator_dtype'),
    (dict(lr_in_momentum=False), 'lr_in_momentum'),
    (dict(clamp_variance=False), 'clamp_variance'),
    (dict(caution=True), 'caution'),
    (dict(momentum=0.9, caution=True, packing=True), 'caution'),
    (dict(momentum=0.9, accumulator_dtype=jnp.int32), 'accumulator_dtype'),
    (dict(decay=optax.constant_schedule(0.9)), 'decay'),
    (dict(eps=lambda count: 1e-8), 'eps'),
    (dict(momentum=optax.constant_schedule(0.9)), 'momentum'),
  ],
)
def test_options_without_effect_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rmsprop_jax.rmsprop(1e-3, **kwargs)


def test_presets_pass_only_options_that_act():
  # PyTorch without momentum, Keras without weight decay: no refusal.
  for tx in (
    rmsprop_jax.presets.pytorch(0.01),
    rmsprop_jax.presets.keras(1e-3),
    rmsprop_jax.presets.timm(),
  ):
    tx.init({'w': jnp.zeros(2)})


def test_real_accumulator_dtype_keeps_complex_momentum():
  params = {'z': jnp.ones(1, jnp.complex64)}
  grads = {'z': jnp.array([1j], jnp.complex64)}
  tx = rmsprop_jax.rmsprop(0.1, momentum=0.9, accumulator_dtype=jnp.float32)
  state = tx.init(params)
  for _ in range(3):
    u, state = tx.update(grads, state, params)
  assert optax.tree.get(state, 'trace')['z'].dtype == jnp.complex64
  ref = numpy_rmsprop([1j] * 3, 0.1, 0.9, 1e-8, False, 0.9)[-1]
  np.testing.assert_allclose(u['z'], ref, rtol=1e-6)


@pytest.mark.parametrize('grad_dtype', [jnp.bfloat16, jnp.float16])
def test_skip_nonfinite_with_narrow_gradients(grad_dtype):
  """optax.apply_if_finite's skipped step returns zeros in the gradients'
  dtype, which does not match the applied step's (float32): ours does."""
  params = {'w': jnp.ones(3)}
  tx = rmsprop_jax.rmsprop(0.1, skip_nonfinite=True)
  plain = rmsprop_jax.rmsprop(0.1)
  g = {'w': jnp.full(3, 0.5, grad_dtype)}
  u, state = jax.jit(tx.update)(g, tx.init(params), params)
  assert_trees_equal(u, plain.update(g, plain.init(params), params)[0])
  bad = {'w': jnp.array([1, np.nan, 1], grad_dtype)}
  u2, state2 = jax.jit(tx.update)(bad, state, params)
  assert u2['w'].dtype == jnp.float32 and not np.any(np.asarray(u2['w']))
  assert_trees_equal(state2.inner_state, state.inner_state)
  assert int(state2.total_notfinite) == 1
  assert isinstance(state2, optax.ApplyIfFiniteState)


def test_coupled_weight_decay_on_narrow_gradients_is_optax_chain():
  params = {'w': jnp.linspace(-1, 1, 8)}
  grads = {'w': jnp.linspace(-2, 1, 8).astype(jnp.bfloat16)}
  tx = rmsprop_jax.rmsprop(0.01, weight_decay=0.1)
  ref = optax.chain(optax.add_decayed_weights(0.1), optax.rmsprop(0.01))
  assert_trees_equal(
    tx.update(grads, tx.init(params), params)[0],
    ref.update(grads, ref.init(params), params)[0],
  )


# The property: over parameter dtype x gradient dtype x variant x way of
# passing the hyperparameters.

VARIANTS = {
  'plain': {},
  'centered': dict(centered=True),
  'momentum': dict(momentum=0.9),
  'nesterov': dict(momentum=0.9, nesterov=True),
  'bias correction': dict(bias_correction=True),
  'coupled weight decay': dict(weight_decay=0.01),
  'decoupled weight decay': dict(
    weight_decay=0.01, decoupled_weight_decay=True
  ),
  'maximize': dict(maximize=True),
  'bf16 nu': dict(nu_dtype=jnp.bfloat16),
  'float32 nu': dict(nu_dtype=jnp.float32),
  '8-bit nu': dict(nu_dtype=jnp.uint8),
  'stochastic rounding': dict(
    nu_dtype=jnp.bfloat16, stochastic_rounding=True, centered=True
  ),
  'packed': dict(packing=True, momentum=0.9, centered=True),
  'skip nonfinite': dict(skip_nonfinite=True, momentum=0.9),
  'float32 momentum buffer': dict(momentum=0.9, accumulator_dtype=jnp.float32),
}
WAYS = [
  'python',
  'numpy float32',
  'numpy float64',
  'jax float32',
  'jax bfloat16',
  'schedule',
  'inject float32',
  'inject bfloat16',
]


def build(way, kwargs):
  lr, momentum = 0.01, kwargs.get('momentum')
  kwargs = dict(kwargs)
  if way.startswith('inject'):
    dtype = jnp.float32 if way.endswith('float32') else jnp.bfloat16
    return optax.inject_hyperparams(
      rmsprop_jax.rmsprop, hyperparam_dtype=dtype
    )(lr, **kwargs)
  convert = {
    'python': float,
    'numpy float32': np.float32,
    'numpy float64': np.float64,
    'jax float32': lambda v: jnp.asarray(v, jnp.float32),
    'jax bfloat16': lambda v: jnp.asarray(v, jnp.bfloat16),
    'schedule': lambda v: optax.constant_schedule(v),
  }[way]
  if momentum is not None:
    kwargs['momentum'] = convert(momentum) if way != 'schedule' else momentum
  for name in ('weight_decay',):
    if name in kwargs:
      kwargs[name] = convert(kwargs[name])
  return rmsprop_jax.rmsprop(
    convert(lr), decay=(0.9 if way == 'schedule' else convert(0.9)), **kwargs
  )


@settings(max_examples=60, deadline=None)
@given(
  param_dtype=st.sampled_from(list(DTYPES)),
  grad_dtype=st.sampled_from(['float32', 'bfloat16', 'float16']),
  variant=st.sampled_from(list(VARIANTS)),
  way=st.sampled_from(WAYS),
  seed=st.integers(0, 2**16),
)
def test_dtype_policy_property(param_dtype, grad_dtype, variant, way, seed):
  kwargs = VARIANTS[variant]
  complex_params = param_dtype == 'complex64'
  p_dtype = DTYPES[param_dtype]
  g_dtype = jnp.complex64 if complex_params else DTYPES[grad_dtype]
  rng = np.random.default_rng(seed)
  shapes = {'a': (3,), 'b': (3,), 'c': (2, 4)}

  def sample(dtype):
    x = {k: rng.normal(size=s) for k, s in shapes.items()}
    if jnp.issubdtype(dtype, jnp.complexfloating):
      x = {k: v + 1j * rng.normal(size=v.shape) for k, v in x.items()}
    return {k: jnp.asarray(v, dtype) for k, v in x.items()}

  params = sample(p_dtype)
  grads = [sample(g_dtype) for _ in range(3)]
  tx = build(way, kwargs)
  state = tx.init(params)

  # The training step compiles and runs, and gives back a state and
  # parameters of the dtypes it took: the next step is the same program,
  # so are all later ones (what lax.scan, which refuses a carry whose
  # dtypes change, needs).
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  p_end, s_end, updates = step(params, state, grads[0])
  assert jax.tree.structure(s_end) == jax.tree.structure(state)
  assert dtypes_of(s_end) == dtypes_of(state)
  assert dtypes_of(p_end) == dtypes_of(params)
  shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]
  assert shapes(s_end) == shapes(state)
  assert jax.tree.structure(p_end) == jax.tree.structure(params)
  assert shapes(p_end) == shapes(updates) == shapes(params)
  # The updates' dtype follows the policy: never a hyperparameter's.
  want = (
    g_dtype if 'nu_dtype' in kwargs else jnp.promote_types(g_dtype, p_dtype)
  )
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(want)}

  # Complex results equal the NumPy reference (complex64 arithmetic).
  if (
    complex_params
    and variant in ('plain', 'centered', 'momentum')
    and (not way.startswith('inject bfloat16') and way != 'jax bfloat16')
  ):
    s = tx.init(params)
    for t, g in enumerate(grads):
      u, s = tx.update(g, s, params)
      ref = numpy_rmsprop(
        [x['c'] for x in grads[: t + 1]],
        0.01,
        0.9,
        1e-8,
        kwargs.get('centered', False),
        kwargs.get('momentum'),
      )[-1]
      np.testing.assert_allclose(u['c'], ref, rtol=2e-5, atol=1e-7)
