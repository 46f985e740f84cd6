"""Packing small leaves (``rmsprop(packing=...)``): no number changes.

The reference for every check is the same optimizer without packing, and
``optax.rmsprop`` where optax has the arguments; packing must give the same
bits, and ``unpack_state`` the same state.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import packing

from helpers import assert_trees_equal, normal_tree, run


def layered_tree(seed, dtype=jnp.float32, scale=1.0):
  """Three identical 'layers' (groups to stack, including a (4, 3) leaf and
  scalars), a large leaf, a lone small leaf and a bfloat16 pair."""
  shapes = {
    'layers': [
      {'w': (4, 3), 'b': (3,), 'ln': (8,), 'gain': ()} for _ in range(3)
    ],
    'head': (8, 600),  # 4,800 elements: above PACK_MAX_SIZE.
    'lone': (7,),
  }
  tree = normal_tree(shapes, (seed, 0), dtype, scale)
  tree['half'] = normal_tree([(5,), (5,)], (seed, 1), jnp.bfloat16, scale)
  return tree


def grad_seq(steps, **kwargs):
  return [layered_tree(100 + i, scale=3.0, **kwargs) for i in range(steps)]


VARIANTS = {
  'plain': {},
  'centered': dict(centered=True, clamp_variance=False),
  'centered clamped': dict(centered=True),
  'momentum': dict(momentum=0.9),
  'nesterov': dict(momentum=0.9, nesterov=True),
  'centered+momentum': dict(centered=True, momentum=0.9),
  'bias corrected': dict(bias_correction=True, eps_in_sqrt=False),
  'pytorch-style': dict(
    eps_in_sqrt=False,
    momentum=0.5,
    lr_in_momentum=False,
    weight_decay=0.01,
    maximize=True,
  ),
  'keras-style': dict(weight_decay=0.01, decoupled_weight_decay=True),
  'tf1-style': dict(initial_scale=1.0, momentum=0.9),
  'schedule': dict(momentum=0.9),
  'float32 state': dict(nu_dtype=jnp.float32),
  'skip nonfinite': dict(skip_nonfinite=True, centered=True),
}


def _lr(name):
  return optax.cosine_decay_schedule(0.05, 10) if name == 'schedule' else 0.05


@pytest.mark.parametrize('name', list(VARIANTS))
def test_packing_changes_no_bit(name):
  params = layered_tree(0)
  grads = grad_seq(4)
  packed_tx = rmsprop_jax.rmsprop(_lr(name), **VARIANTS[name], packing=True)
  plain_tx = rmsprop_jax.rmsprop(_lr(name), **VARIANTS[name], packing=False)
  ours, state = run(packed_tx, params, grads, apply=True)
  ref, ref_state = run(plain_tx, params, grads, apply=True)
  assert_trees_equal(ours, ref)
  assert_trees_equal(rmsprop_jax.unpack_state(state), ref_state)
  # The state really is packed: three stacks of three float32 layers' leaves
  # and one bfloat16 pair.
  nu = optax.tree.get(state, 'nu')
  assert isinstance(nu, packing.Packed)
  assert sorted(x.shape for x in nu.stacks) == [
    (2, 5),
    (3,),
    (3, 3),
    (3, 4, 3),
    (3, 8),
  ]


OPTAX_ARGS = {
  'plain': {},
  'centered': dict(centered=True),
  'centered+momentum': dict(centered=True, momentum=0.9, nesterov=True),
  'bias corrected': dict(bias_correction=True, eps_in_sqrt=False),
}


@pytest.mark.parametrize('name', list(OPTAX_ARGS))
def test_packed_equals_optax(name):
  params = layered_tree(0)
  grads = grad_seq(4)
  clamp = {'clamp_variance': False} if 'centered' in name else {}
  ours, state = run(
    rmsprop_jax.rmsprop(0.05, **OPTAX_ARGS[name], **clamp, packing=True),
    params,
    grads,
  )
  ref, ref_state = run(optax.rmsprop(0.05, **OPTAX_ARGS[name]), params, grads)
  assert_trees_equal(ours, ref)
  # The same state leaves (our NamedTuple classes are rmsprop_jax's own).
  assert_trees_equal(
    jax.tree.leaves(rmsprop_jax.unpack_state(state)), jax.tree.leaves(ref_state)
  )


def test_layout_stacks_only_repeated_small_leaves():
  tree = {
    'a': jnp.zeros((2, 3)),
    'b': jnp.zeros((2, 3)),
    'c': jnp.zeros((3, 2)),  # Alone in its shape.
    'd': jnp.zeros(packing.PACK_MAX_SIZE),
    'e': jnp.zeros(packing.PACK_MAX_SIZE),
    'f': jnp.zeros(packing.PACK_MAX_SIZE + 1),  # Too large to pack.
    'g': jnp.zeros(packing.PACK_MAX_SIZE + 1),
    'h': jnp.zeros((2, 3), jnp.bfloat16),
  }  # Other dtype, alone.
  layout = packing.layout_of(tree)
  assert set(layout.groups) == {
    ('float32', (2, 3)),
    ('float32', (packing.PACK_MAX_SIZE,)),
  }
  packed = packing.pack(tree, layout)
  assert len(packed.rest) == 4
  chex.assert_trees_all_equal(
    packing.unpack(packed, jax.tree.structure(tree)), tree
  )
  # Stacks hold at most max_rows leaves; a leaf left over stays alone.
  five = [jnp.full(3, i, jnp.float32) for i in range(5)]
  layout = packing.layout_of(five, max_rows=2)
  assert layout.groups == (('float32', (3,)),) * 2
  packed = packing.pack(five, layout)
  assert [x.shape for x in packed.stacks] == [(2, 3), (2, 3)]
  assert len(packed.rest) == 1 and float(packed.rest[0][0]) == 4
  chex.assert_trees_all_equal(
    packing.unpack(packed, jax.tree.structure(five)), five
  )
  # Below two leaves of a kind there is nothing to stack: no wrapper at all.
  single = {'a': jnp.zeros(3), 'b': jnp.zeros(4)}
  assert packing.pack(single, packing.layout_of(single)) is single


def test_packing_is_opt_in():
  params = layered_tree(0)
  state = rmsprop_jax.rmsprop(0.1).init(params)
  assert not rmsprop_jax.packing.is_packed(state)
  assert jax.tree.structure(state) == jax.tree.structure(
    optax.rmsprop(0.1).init(params)
  )
  assert isinstance(
    rmsprop_jax.rmsprop(0.1, packing=True).init(params), packing.PackedState
  )
  # A weight-decay mask selects whole leaves: an error if asked for.
  with pytest.raises(ValueError, match='weight_decay_mask'):
    rmsprop_jax.rmsprop(
      0.1, weight_decay=0.1, weight_decay_mask={'w': True}, packing=True
    )


def test_vmap_over_packed_state():
  """A batch of optimizers (e.g. a seed sweep): vmapped init and update."""
  batch = jax.tree.map(
    lambda *x: jnp.stack(x),
    *[layered_tree(i) for i in range(3)],
  )
  grads = jax.tree.map(lambda *x: jnp.stack(x), *grad_seq(3))
  results = {}
  for packed in (True, False):
    tx = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.9, packing=packed)
    state = jax.vmap(tx.init)(batch)
    updates, state = jax.jit(jax.vmap(tx.update))(grads, state, batch)
    results[packed] = updates, rmsprop_jax.unpack_state(state)
  assert_trees_equal(results[True][0], results[False][0])
  assert_trees_equal(results[True][1], results[False][1])


def test_inject_hyperparams_and_eval_shape():
  params = layered_tree(0)
  grads = grad_seq(3)
  injected = {
    packed: optax.inject_hyperparams(rmsprop_jax.rmsprop)(
      learning_rate=0.05, momentum=0.9, packing=packed
    )
    for packed in (True, False)
  }
  ours, state = run(injected[True], params, grads)
  ref, _ = run(injected[False], params, grads)
  assert_trees_equal(ours, ref)
  injected = injected[True]
  # Abstract initialisation gives the concrete state's structure and shapes.
  abstract = jax.eval_shape(injected.init, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, injected.init(params))
  assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_effective_learning_rate_reads_packed_state():
  params = layered_tree(0)
  out = {}
  for packed in (True, False):
    _, state = run(
      rmsprop_jax.rmsprop(0.05, centered=True, packing=packed),
      params,
      grad_seq(2),
    )
    out[packed] = rmsprop_jax.effective_learning_rate(
      state, 0.05, eps=1e-8, eps_in_sqrt=True
    )
  assert_trees_equal(out[True], out[False])


def test_mismatched_gradients_are_named():
  tx = rmsprop_jax.rmsprop(0.05, packing=True)
  params = layered_tree(0)
  state = tx.init(params)
  grads = grad_seq(1)[0]
  wrong_shape = dict(grads, lone=jnp.zeros(6))
  with pytest.raises(ValueError, match=r"\['lone'\] has shape \(6,\)"):
    tx.update(wrong_shape, state)
  missing = {k: v for k, v in grads.items() if k != 'lone'}
  with pytest.raises(
    ValueError, match=r"missing from the gradient: \['lone'\]"
  ):
    tx.update(missing, state)
  # Gradients in another dtype than the parameters run as without packing
  # (optax accepts them), as long as the leaves of one stack share a dtype.
  other_dtype = dict(grads, half=[x.astype(jnp.float32) for x in grads['half']])
  assert_trees_equal(
    tx.update(other_dtype, state)[0],
    rmsprop_jax.rmsprop(0.05).update(
      other_dtype, rmsprop_jax.rmsprop(0.05).init(params)
    )[0],
  )
  mixed = dict(
    grads, half=[grads['half'][0].astype(jnp.float32), grads['half'][1]]
  )
  with pytest.raises(ValueError, match='several dtypes'):
    tx.update(mixed, state)
  with pytest.raises(TypeError, match=r"\['lone'\] has dtype int32"):
    tx.update(dict(grads, lone=jnp.zeros(7, jnp.int32)), state)


def test_flax_nnx_optimizer_with_repeated_layers():
  nnx = pytest.importorskip('flax.nnx')

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
      for layer in self.layers:
        x = jnp.tanh(layer(x))
      return x

  x = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
  losses = {}
  for packed in (True, False):
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(
      model,
      rmsprop_jax.rmsprop(0.01, momentum=0.9, packing=packed),
      wrt=nnx.Param,
    )

    @nnx.jit
    def step(model, opt):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
      opt.update(model, grads)
      return loss

    losses[packed] = np.array([step(model, opt) for _ in range(5)])
  np.testing.assert_array_equal(losses[True], losses[False])
  assert losses[True][-1] < losses[True][0]


def test_orbax_round_trip_of_packed_state(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  params = layered_tree(0)
  tx = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.9, packing=True)
  _, state = run(tx, params, grad_seq(2))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'state', state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / 'state', jax.eval_shape(tx.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert_trees_equal(restored, state)
