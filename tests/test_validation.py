"""Bad hyperparameters raise at construction, naming the argument and range."""

import jax
import jax.numpy as jnp
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import presets

BAD = [
  # (constructor, kwargs, name in the message, range in the message)
  (rmsprop_jax.rmsprop, dict(learning_rate=-0.1), 'learning_rate', '>= 0'),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, decay=1.0), 'decay', '[0, 1)'),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, decay=-0.1), 'decay', '[0, 1)'),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, eps=-1e-8), 'eps', '>= 0'),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, momentum=-0.9),
    'momentum',
    '[0, 1)',
  ),
  # Momentum 1 or more never forgets: the buffer grows without bound.
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, momentum=1.0),
    'momentum',
    '[0, 1)',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, initial_scale=-1.0),
    'initial_scale',
    '>= 0',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, weight_decay=-0.1),
    'weight_decay',
    '>= 0',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=float('nan')),
    'learning_rate',
    '>= 0',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=jnp.array(-1.0)),
    'learning_rate',
    '>= 0',
  ),
  (rmsprop_jax.scale_by_rms, dict(decay=1.5), 'decay', '[0, 1)'),
  (rmsprop_jax.scale_by_stddev, dict(eps=-1.0), 'eps', '>= 0'),
  (presets.pytorch, dict(lr=-1.0), 'lr', '>= 0'),
  (presets.pytorch, dict(alpha=1.0), 'alpha', '[0, 1)'),
  (presets.pytorch, dict(eps=-1.0), 'eps', '>= 0'),
  (presets.pytorch, dict(momentum=-0.5), 'momentum', '[0, 1)'),
  (presets.pytorch, dict(momentum=1.5), 'momentum', '[0, 1)'),
  (presets.pytorch, dict(weight_decay=-0.5), 'weight_decay', '>= 0'),
  (presets.keras, dict(learning_rate=-1.0), 'learning_rate', '>= 0'),
  (presets.keras, dict(rho=1.1), 'rho', '[0, 1)'),
  (presets.keras, dict(epsilon=-1.0), 'epsilon', '>= 0'),
  (presets.keras, dict(momentum=-0.1), 'momentum', '[0, 1)'),
  (presets.tf1, dict(learning_rate=-0.01), 'learning_rate', '>= 0'),
  (presets.tf1, dict(learning_rate=0.01, decay=1.0), 'decay', '[0, 1)'),
  (presets.tf1, dict(learning_rate=0.01, epsilon=-1.0), 'epsilon', '>= 0'),
  (presets.hinton2012, dict(decay=2.0), 'decay', '[0, 1)'),
  (presets.graves2013, dict(momentum=-0.9), 'momentum', '[0, 1)'),
  (presets.dqn2015, dict(eps=-0.01), 'eps', '>= 0'),
  # Infinity is outside [0, inf) too.
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=float('inf')),
    'learning_rate',
    'finite',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, eps=float('inf')),
    'eps',
    'finite',
  ),
  (presets.timm, dict(weight_decay=float('inf')), 'weight_decay', 'finite'),
  # Dtypes: named, in rmsprop's terms (not its building block's).
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, nu_dtype='foo'),
    'nu_dtype',
    'dtype',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, momentum=0.9, accumulator_dtype='foo'),
    'accumulator_dtype',
    'dtype',
  ),
]


@pytest.mark.parametrize(
  'factory, kwargs, name, valid',
  BAD,
  ids=lambda x: getattr(x, '__name__', str(x)),
)
def test_bad_values_raise(factory, kwargs, name, valid):
  with pytest.raises(ValueError) as info:
    factory(**kwargs)
  message = str(info.value)
  assert f'`{name}`' in message and valid in message, message


@pytest.mark.parametrize(
  'factory, kwargs',
  [
    (
      rmsprop_jax.rmsprop,
      dict(
        learning_rate=0.0, decay=0.0, eps=0.0, momentum=0.0, weight_decay=0.0
      ),
    ),
    (presets.pytorch, dict(lr=0.0, alpha=0.0, eps=0.0)),
    (presets.keras, dict(rho=0.999999)),
  ],
)
def test_boundary_values_are_accepted(factory, kwargs):
  factory(**kwargs)


def test_schedules_and_traced_values_are_not_checked():
  # A schedule may go anywhere; it is the user's to define.
  rmsprop_jax.rmsprop(lambda count: -1.0)
  # Traced hyperparameters keep working (inject_hyperparams, vmap).
  params = {'w': jnp.ones(3)}
  tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1)
  tx.update(params, jax.jit(tx.init)(params), params)

  def step(lr, decay):
    tx = rmsprop_jax.rmsprop(lr, decay=decay)
    return tx.update(params, tx.init(params))[0]

  jax.vmap(step)(jnp.array([0.1, 0.2]), jnp.array([0.9, 0.99]))


WRONG_TYPES = [
  # (constructor, kwargs, the argument the message must name)
  (rmsprop_jax.rmsprop, dict(learning_rate='0.001'), 'learning_rate'),
  (rmsprop_jax.rmsprop, dict(learning_rate=None), 'learning_rate'),
  (rmsprop_jax.rmsprop, dict(learning_rate=True), 'learning_rate'),
  (rmsprop_jax.rmsprop, dict(learning_rate=1e-3, decay='0.9'), 'decay'),
  (rmsprop_jax.rmsprop, dict(learning_rate=1e-3, eps=None), 'eps'),
  (rmsprop_jax.rmsprop, dict(learning_rate=1e-3, momentum='0.9'), 'momentum'),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=1e-3, weight_decay=False),
    'weight_decay',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=1e-3, initial_scale=1j),
    'initial_scale',
  ),
  (rmsprop_jax.scale_by_rms, dict(decay=None), 'decay'),
  (rmsprop_jax.scale_by_stddev, dict(eps='1e-8'), 'eps'),
  (presets.pytorch, dict(lr='0.01'), 'lr'),
  (presets.keras, dict(rho=None), 'rho'),
  (presets.tf1, dict(learning_rate=None), 'learning_rate'),
  (presets.hinton2012, dict(eps=True), 'eps'),
  (presets.graves2013, dict(momentum=None), 'momentum'),
  (presets.dqn2015, dict(learning_rate='2.5e-4'), 'learning_rate'),
  # A string is truthy: 'False' would silently turn an option on.
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, maximize='False'), 'maximize'),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, centered='False'), 'centered'),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, packing='no'), 'packing'),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, skip_nonfinite=0.5),
    'skip_nonfinite',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, bias_correction='yes'),
    'bias_correction',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, eps_in_sqrt='no'),
    'eps_in_sqrt',
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, weight_decay=0.1, weight_decay_mask='x'),
    'weight_decay_mask',
  ),
  (rmsprop_jax.scale_by_stddev, dict(clamp_variance='no'), 'clamp_variance'),
  (rmsprop_jax.scale_by_rms, dict(bias_correction=1), 'bias_correction'),
  (presets.pytorch, dict(centered='False'), 'centered'),
  (presets.pytorch, dict(maximize=1), 'maximize'),
  (presets.keras, dict(centered='yes'), 'centered'),
  (presets.tf1, dict(learning_rate=0.1, centered=None), 'centered'),
  (presets.timm, dict(lr_in_momentum='False'), 'lr_in_momentum'),
  (presets.timm, dict(decoupled_decay=0), 'decoupled_decay'),
]


@pytest.mark.parametrize(
  'factory, kwargs, name',
  WRONG_TYPES,
  ids=lambda x: getattr(x, '__name__', str(x)),
)
def test_wrong_types_raise_naming_the_function_and_argument(
  factory, kwargs, name
):
  with pytest.raises(TypeError) as info:
    factory(**kwargs)
  message = str(info.value)
  owner = (
    factory.__name__
    if factory.__module__ != presets.__name__
    else (f'presets.{factory.__name__}')
  )
  assert message.startswith(f'{owner}: `{name}`'), message


def test_messages_name_the_function_the_user_called():
  # rmsprop's own name, not its building block's.
  with pytest.raises(ValueError, match=r'^rmsprop: `decay`'):
    rmsprop_jax.rmsprop(1e-3, decay=1.0)
  with pytest.raises(ValueError, match=r'^rmsprop: nu_dtype'):
    rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.int8)
  with pytest.raises(ValueError, match=r'^rmsprop: stochastic_rounding'):
    rmsprop_jax.rmsprop(1e-3, stochastic_rounding=True)


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(learning_rate=jnp.ones(3)),
    dict(learning_rate=1e-3, decay=jnp.full(2, 0.9)),
  ],
)
def test_wrong_shaped_arrays_raise(kwargs):
  with pytest.raises(ValueError, match='scalar'):
    rmsprop_jax.rmsprop(**kwargs)


def test_numbers_of_every_kind_are_accepted():
  for lr in (
    1e-3,
    1,
    jnp.float32(1e-3),
    jnp.asarray(1e-3, jnp.bfloat16),
    __import__('numpy').float64(1e-3),
    optax.constant_schedule(1e-3),
  ):
    rmsprop_jax.rmsprop(lr, momentum=jnp.asarray(0.9), eps=1e-8)
