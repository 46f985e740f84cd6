"""``presets.keras`` against the real ``keras.optimizers.RMSprop`` (JAX backend).

float64 throughout, gradients computed from each side's own parameters.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

from helpers import (
  assert_trajectories_close,
  bowl_grads,
  bowl_problem,
  bowl_trajectory,
  learning_rates,
)

STEPS = 25
SHAPES = [(4, 3), (6,), ()]


def keras_trajectory(keras, kwargs, lrs, seed=0):
  params, targets, noise = bowl_problem(SHAPES, STEPS, seed)
  variables = [keras.Variable(p, dtype='float64') for p in params]
  table = np.asarray(lrs)

  class Table(keras.optimizers.schedules.LearningRateSchedule):
    # Keras evaluates the schedule at its 0-based iteration count.
    def __call__(self, step):
      return keras.ops.take(keras.ops.convert_to_tensor(table), step)

  opt = keras.optimizers.RMSprop(learning_rate=Table(), **kwargs)
  opt.build(variables)
  out = []
  for t in range(STEPS):
    grads = bowl_grads([v.value for v in variables], targets, noise[t])
    opt.apply_gradients(zip(grads, variables))
    out.append([np.asarray(v.value) for v in variables])
  return out


def ours_trajectory(tx, seed=0):
  return bowl_trajectory(tx, bowl_problem(SHAPES, STEPS, seed))


CASES = {
  'plain': dict(),
  'momentum': dict(momentum=0.9),
  'centered': dict(centered=True),
  'weight_decay': dict(weight_decay=0.1),
  'rho_epsilon': dict(rho=0.7, epsilon=1e-3),
  'centered_momentum_wd': dict(centered=True, momentum=0.8, weight_decay=0.05),
}


@pytest.mark.parametrize('name', CASES)
@pytest.mark.parametrize(
  'lr_changes', [False, True], ids=['constant_lr', 'lr_every_step']
)
def test_preset_matches_keras(keras64, name, lr_changes):
  lrs, lr = learning_rates(STEPS, lr_changes)
  ref = keras_trajectory(keras64, CASES[name], lrs)
  ours = ours_trajectory(
    rmsprop_jax.presets.keras(learning_rate=lr, **CASES[name])
  )
  assert_trajectories_close(ours, ref)


def test_keras_golden_value():
  # From Keras' own rmsprop_test.py: RMSprop(learning_rate=0.5), one step.
  tx = rmsprop_jax.presets.keras(learning_rate=0.5)
  params = jnp.array([1.0, 2.0, 3.0, 4.0])
  updates, _ = tx.update(jnp.array([1.0, 6.0, 7.0, 2.0]), tx.init(params))
  np.testing.assert_allclose(
    optax.apply_updates(params, updates),
    [-0.5811, 0.4189, 1.4189, 2.4189],
    atol=1e-4,
  )
