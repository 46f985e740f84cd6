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
    (rmsprop_jax.rmsprop, dict(learning_rate=0.1, decay=1.0), 'decay',
     '[0, 1)'),
    (rmsprop_jax.rmsprop, dict(learning_rate=0.1, decay=-0.1), 'decay',
     '[0, 1)'),
    (rmsprop_jax.rmsprop, dict(learning_rate=0.1, eps=-1e-8), 'eps', '>= 0'),
    (rmsprop_jax.rmsprop, dict(learning_rate=0.1, momentum=-0.9), 'momentum',
     '>= 0'),
    (rmsprop_jax.rmsprop, dict(learning_rate=0.1, initial_scale=-1.0),
     'initial_scale', '>= 0'),
    (rmsprop_jax.rmsprop, dict(learning_rate=0.1, weight_decay=-0.1),
     'weight_decay', '>= 0'),
    (rmsprop_jax.rmsprop, dict(learning_rate=float('nan')), 'learning_rate',
     '>= 0'),
    (rmsprop_jax.rmsprop, dict(learning_rate=jnp.array(-1.0)),
     'learning_rate', '>= 0'),
    (rmsprop_jax.scale_by_rms, dict(decay=1.5), 'decay', '[0, 1)'),
    (rmsprop_jax.scale_by_stddev, dict(eps=-1.0), 'eps', '>= 0'),
    (presets.pytorch, dict(lr=-1.0), 'lr', '>= 0'),
    (presets.pytorch, dict(alpha=1.0), 'alpha', '[0, 1)'),
    (presets.pytorch, dict(eps=-1.0), 'eps', '>= 0'),
    (presets.pytorch, dict(momentum=-0.5), 'momentum', '>= 0'),
    (presets.pytorch, dict(weight_decay=-0.5), 'weight_decay', '>= 0'),
    (presets.keras, dict(learning_rate=-1.0), 'learning_rate', '>= 0'),
    (presets.keras, dict(rho=1.1), 'rho', '[0, 1)'),
    (presets.keras, dict(epsilon=-1.0), 'epsilon', '>= 0'),
    (presets.keras, dict(momentum=-0.1), 'momentum', '>= 0'),
    (presets.tf1, dict(learning_rate=-0.01), 'learning_rate', '>= 0'),
    (presets.tf1, dict(learning_rate=0.01, decay=1.0), 'decay', '[0, 1)'),
    (presets.tf1, dict(learning_rate=0.01, epsilon=-1.0), 'epsilon', '>= 0'),
    (presets.hinton2012, dict(decay=2.0), 'decay', '[0, 1)'),
    (presets.graves2013, dict(momentum=-0.9), 'momentum', '>= 0'),
    (presets.dqn2015, dict(eps=-0.01), 'eps', '>= 0'),
]


@pytest.mark.parametrize('factory, kwargs, name, valid', BAD,
                         ids=lambda x: getattr(x, '__name__', str(x)))
def test_bad_values_raise(factory, kwargs, name, valid):
  with pytest.raises(ValueError) as info:
    factory(**kwargs)
  message = str(info.value)
  assert f'`{name}`' in message and valid in message, message


@pytest.mark.parametrize('factory, kwargs', [
    (rmsprop_jax.rmsprop, dict(learning_rate=0.0, decay=0.0, eps=0.0,
                               momentum=0.0, weight_decay=0.0)),
    (presets.pytorch, dict(lr=0.0, alpha=0.0, eps=0.0)),
    (presets.keras, dict(rho=0.999999)),
])
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
