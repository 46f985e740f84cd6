"""Composition with optax's wrappers and with Flax's ``nnx.Optimizer``.

Each check runs the same pipeline twice, once around ``optax.rmsprop`` and
once around ``rmsprop_jax.rmsprop``; optax is the reference.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax

from conftest import require
from helpers import assert_trees_equal, gradient_sequence, random_tree, run

KWARGS = dict(decay=0.9, momentum=0.9, centered=True)


def _both(wrap, steps=6, grads=None):
  params = random_tree(0)
  grads = grads or gradient_sequence(steps, scale=3.0)
  ours, our_state = run(
    wrap(rmsprop_jax.rmsprop(0.01, **KWARGS, clamp_variance=False)),
    params,
    grads,
  )
  ref, ref_state = run(wrap(optax.rmsprop(0.01, **KWARGS)), params, grads)
  return ours, ref, our_state, ref_state


def test_chain_with_clip_by_global_norm():
  ours, ref, _, _ = _both(
    lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx)
  )
  assert_trees_equal(ours, ref)


def test_masked():
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  ours, ref, _, _ = _both(lambda tx: optax.masked(tx, mask))
  assert_trees_equal(ours, ref)
  # Masked-out leaves pass through untouched.
  np.testing.assert_array_equal(
    ours[0]['dense']['b'], gradient_sequence(1, scale=3.0)[0]['dense']['b']
  )


def test_multi_steps():
  ours, ref, our_state, ref_state = _both(
    lambda tx: optax.MultiSteps(tx, every_k_schedule=3), steps=9
  )
  assert_trees_equal(ours, ref)
  assert int(our_state.gradient_step) == int(ref_state.gradient_step) == 3


def test_apply_if_finite_skips_bad_steps():
  grads = gradient_sequence(6)
  grads[2] = jax.tree.map(
    lambda g: g.at[..., 0].set(jnp.nan) if g.ndim else jnp.nan, grads[2]
  )
  ours, ref, our_state, ref_state = _both(
    lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3), grads=grads
  )
  assert_trees_equal(ours, ref)
  chex.assert_trees_all_equal(ours[2], jax.tree.map(jnp.zeros_like, ours[2]))
  assert int(our_state.total_notfinite) == 1
  chex.assert_tree_all_finite(optax.tree.get(our_state, 'nu'))


def test_flax_nnx_optimizer_drives_it():
  nnx = require('flax.nnx')

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.tanh(self.l1(x)))

  x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
  y = jnp.sin(x.sum(axis=1, keepdims=True))

  def train(tx):
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(
        model
      )
      opt.update(model, grads)
      return loss

    losses = [float(step(model, opt)) for _ in range(20)]
    return losses, nnx.state(model, nnx.Param)

  ours, our_params = train(rmsprop_jax.rmsprop(0.01, momentum=0.9))
  ref, ref_params = train(optax.rmsprop(0.01, momentum=0.9))
  assert ours == ref
  chex.assert_trees_all_equal(
    jax.tree.leaves(our_params), jax.tree.leaves(ref_params)
  )
  assert ours[-1] < ours[0]
