"""Presets against TensorFlow's own kernels and NumPy transcriptions.

* ``data/tf1_rmsprop_kernels.json``: parameters after each step of
  TensorFlow's real ``ApplyRMSProp`` / ``ApplyCenteredRMSProp`` kernels
  (TensorFlow 2.21.0, float64), copied from the project's shared test data.
* NumPy transcriptions, line by line, of those kernels
  (``tensorflow/core/kernels/training_ops.cc``), of the classic demos'
  NumPy ``RMSprop`` class, of Graves (2013) eqs. (38)-(41) and of DeepMind's
  DQN Lua code (``NeuralQLearner.lua``).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmsprop_jax import presets

DATA = pathlib.Path(__file__).parent / 'data' / 'tf1_rmsprop_kernels.json'
TF_CASES = json.loads(DATA.read_text())['cases']


def run_ours(tx, params, grads):
  """Applies precomputed gradients; returns the parameters after each step."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(np.asarray(params))
  return np.stack(out)


# --- TensorFlow 1 -----------------------------------------------------------


def tf1_kernels_numpy(
  var, grads, lrs, rho, momentum, epsilon, centered, slots=None
):
  """ApplyRMSProp / ApplyCenteredRMSProp, as training_ops.cc computes them.
  ``slots``, a dict, receives the final ``rms``, ``mg`` and ``momentum``
  slot values."""
  ms = np.ones_like(var)  # RMSPropOptimizer's "rms" slot starts at ones.
  mg = np.zeros_like(var)
  mom = np.zeros_like(var)
  var = var.copy()
  out = []
  for g, lr in zip(grads, lrs):
    ms += (g * g - ms) * (1 - rho)
    if centered:
      mg += (g - mg) * (1 - rho)
      denom = (ms - mg * mg) + epsilon
      mom = mom * momentum + (g * lr) / np.sqrt(denom)
    else:
      mom = mom * momentum + (g * lr) / np.sqrt(ms + epsilon)
    var -= mom
    out.append(var.copy())
  if slots is not None:
    slots.update(rms=ms, momentum=mom, **({'mg': mg} if centered else {}))
  return np.stack(out)


def _tf_case_args(case):
  c = case['config']
  return (
    np.asarray(case['initial_params']),
    np.asarray(case['gradients']),
    np.asarray(case['learning_rates']),
    c['decay'],
    c['momentum'],
    c['epsilon'],
    c['centered'],
  )


@pytest.mark.parametrize('case', TF_CASES, ids=lambda c: str(c['config']))
def test_transcription_reproduces_tensorflow(case):
  # Validates the NumPy transcription used below against the real kernels.
  np.testing.assert_allclose(
    tf1_kernels_numpy(*_tf_case_args(case)),
    case['params_after_each_step'],
    rtol=1e-12,
    atol=1e-14,
  )


@pytest.mark.parametrize('case', TF_CASES, ids=lambda c: str(c['config']))
def test_tf1_preset_matches_tensorflow_kernels(case, x64):
  var, grads, lrs, rho, momentum, epsilon, centered = _tf_case_args(case)
  lr_table = jnp.asarray(lrs)
  tx = presets.tf1(
    lambda count: lr_table[count],
    decay=rho,
    momentum=momentum,
    epsilon=epsilon,
    centered=centered,
  )
  ours = run_ours(tx, jnp.asarray(var), [jnp.asarray(g) for g in grads])
  np.testing.assert_allclose(
    ours, case['params_after_each_step'], rtol=1e-12, atol=1e-14
  )


@pytest.mark.parametrize('centered', [False, True])
@pytest.mark.parametrize('momentum', [0.0, 0.7])
def test_tf1_preset_matches_kernel_transcription(centered, momentum, x64):
  rng = np.random.default_rng(3)
  var = rng.normal(size=20)
  grads = rng.normal(size=(40, 20)) * rng.uniform(0.01, 10, size=(40, 1))
  lrs = np.linspace(0.05, 0.005, 40)
  ref = tf1_kernels_numpy(var, grads, lrs, 0.8, momentum, 1e-6, centered)
  tx = presets.tf1(
    lambda c: jnp.asarray(lrs)[c],
    decay=0.8,
    momentum=momentum,
    epsilon=1e-6,
    centered=centered,
  )
  ours = run_ours(tx, jnp.asarray(var), [jnp.asarray(g) for g in grads])
  np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)


# --- The classic demos' NumPy RMSprop class and Demo 1 ----------------------------


class ClassicRMSprop:
  """The classic demos' NumPy ``RMSprop`` class, verbatim in
  substance."""

  def __init__(self, learning_rate=0.001, rho=0.9, epsilon=1e-8):
    self.learning_rate = learning_rate
    self.rho = rho
    self.epsilon = epsilon
    self.cache = {}

  def update(self, params, grads):
    updated_params = {}
    for key in params.keys():
      if key not in self.cache:
        self.cache[key] = np.zeros_like(params[key])
      self.cache[key] = self.rho * self.cache[key] + (1 - self.rho) * (
        grads[key] ** 2
      )
      updated_params[key] = params[key] - self.learning_rate * grads[key] / (
        np.sqrt(self.cache[key]) + self.epsilon
      )
    return updated_params


def classic_demo1_trajectory():
  """Demo 1: minimise x**2 + y**2 from (10, 10), lr 0.1, rho 0.9, 50 steps."""
  params = {'x': np.array([10.0]), 'y': np.array([10.0])}
  opt = ClassicRMSprop(learning_rate=0.1, rho=0.9)
  out = []
  for _ in range(50):
    grads = {'x': 2 * params['x'], 'y': 2 * params['y']}
    params = opt.update(params, grads)
    out.append([params['x'][0], params['y'][0]])
  return np.asarray(out)


def test_hinton2012_reproduces_classic_demo1(x64):
  ref = classic_demo1_trajectory()
  tx = presets.hinton2012(learning_rate=0.1, decay=0.9)
  params = {'x': jnp.array([10.0]), 'y': jnp.array([10.0])}
  state = tx.init(params)
  ours = []
  for _ in range(50):
    grads = jax.tree.map(lambda p: 2 * p, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ours.append([float(params['x'][0]), float(params['y'][0])])
  np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)


# --- Graves (2013) and DQN (2015) -------------------------------------------


def graves_numpy(w, grads, lr=1e-4, aleph=0.95, beth=0.9, daleth=1e-4):
  """Graves (2013) eqs. (38)-(41), zero-initialised."""
  n, g, delta, w = (
    np.zeros_like(w),
    np.zeros_like(w),
    np.zeros_like(w),
    w.copy(),
  )
  out = []
  for eps_i in grads:
    n = aleph * n + (1 - aleph) * eps_i**2  # (38)
    g = aleph * g + (1 - aleph) * eps_i  # (39)
    delta = beth * delta - lr * eps_i / np.sqrt(n - g**2 + daleth)  # (40)
    w = w + delta  # (41)
    out.append(w.copy())
  return np.stack(out)


def dqn_lua_numpy(w, grads, lr=2.5e-4, wc=0.0):
  """NeuralQLearner.lua's update; ``dw`` is the ascent direction there."""
  g, g2, deltas, w = (
    np.zeros_like(w),
    np.zeros_like(w),
    np.zeros_like(w),
    w.copy(),
  )
  out = []
  for grad in grads:
    dw = -grad  # The Lua code back-propagates the TD target.
    dw = dw + -wc * w
    g = g * 0.95 + 0.05 * dw
    g2 = g2 * 0.95 + 0.05 * dw * dw
    tmp = np.sqrt(g2 - g * g + 0.01)
    deltas = deltas * 0 + lr * dw / tmp
    w = w + deltas
    out.append(w.copy())
  return np.stack(out)


@pytest.mark.parametrize(
  'preset, reference',
  [
    (presets.graves2013, graves_numpy),
    (presets.dqn2015, dqn_lua_numpy),
  ],
)
def test_paper_presets_match_transcriptions(preset, reference, x64):
  rng = np.random.default_rng(5)
  w = rng.normal(size=30)
  grads = rng.normal(size=(60, 30)) * 0.1 + 0.05
  ours = run_ours(preset(), jnp.asarray(w), [jnp.asarray(g) for g in grads])
  np.testing.assert_allclose(ours, reference(w, grads), rtol=1e-12, atol=1e-15)


def test_dqn_has_no_heavy_ball_momentum():
  state = presets.dqn2015().init({'w': jnp.zeros(3)})
  assert optax.tree.get(state, 'trace', None) is None
