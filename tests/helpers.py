"""Small utilities shared by the tests (no reference maths here)."""

import jax
import jax.numpy as jnp
import numpy as np


def random_tree(key, dtype=jnp.float32, scale=1.0, shift=0.0):
  """A nested parameter-like pytree with leaves of assorted shapes."""
  shapes = {'dense': {'w': (4, 3), 'b': (3,)}, 'list': [(2,), (1, 2, 2)],
            'scalar': ()}
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  arrays = [(shift + scale * jax.random.normal(k, s)).astype(dtype)
            for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, arrays)


def gradient_sequence(steps, dtype=jnp.float32, seed=0, **kwargs):
  """``steps`` random gradient trees (same structure as ``random_tree``)."""
  key = jax.random.PRNGKey(seed)
  return [random_tree(jax.random.fold_in(key, i), dtype, **kwargs)
          for i in range(steps)]


def run(tx, params, grads_seq, jit=True, apply=False):
  """Feeds ``grads_seq`` through ``tx``; returns (updates per step, state).

  With ``apply=True`` the updates are applied to ``params`` between steps and
  the parameters after each step are returned instead of the updates.
  """
  import optax
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for g in grads_seq:
    u, state = update(g, state, params)
    if apply:
      params = optax.apply_updates(params, u)
      out.append(params)
    else:
      out.append(u)
  return out, state


def assert_trees_equal(a, b):
  """Bit-for-bit equality (NaN equals NaN), same structure and dtypes."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype, (x.dtype, y.dtype)
    np.testing.assert_array_equal(np.asarray(x).astype(np.complex128),
                                  np.asarray(y).astype(np.complex128))
