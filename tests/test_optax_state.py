"""The state is optax's: checkpoints, wrappers and lookups work unchanged.

Every reference here is real ``optax.rmsprop``: a state it wrote (saved with
pickle, Orbax, or a Flax target restore) continues in ``rmsprop_jax.rmsprop``
bit for bit as in optax, and the reverse; optax's own wrappers and tree
utilities see the same state. Moving checkpoints between device counts runs
in ``test_state_on_eight_devices.py`` (a subprocess with 8 devices).
"""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

from helpers import assert_trees_equal, gradient_sequence, random_tree

# optax.rmsprop's own arguments; each must give optax's state exactly.
SCHEDULE = optax.cosine_decay_schedule(0.05, 20)
ARGS = {
  'plain': dict(learning_rate=0.05),
  'centered': dict(learning_rate=0.05, centered=True),
  'momentum': dict(learning_rate=0.05, momentum=0.9),
  'nesterov': dict(learning_rate=0.05, momentum=0.9, nesterov=True),
  'bias correction': dict(
    learning_rate=0.05, bias_correction=True, eps_in_sqrt=False
  ),
  'centered, bias correction, momentum': dict(
    learning_rate=0.05, centered=True, bias_correction=True, momentum=0.5
  ),
  'schedule': dict(learning_rate=SCHEDULE, momentum=0.9, initial_scale=1.0),
  'inject_hyperparams': dict(learning_rate=0.05, momentum=0.9, centered=True),
}


def make(lib, name):
  """``lib.rmsprop`` (optax's or ours) with the arguments ``name``."""
  if name == 'inject_hyperparams':
    return optax.inject_hyperparams(lib.rmsprop)(**ARGS[name])
  return lib.rmsprop(**ARGS[name])


PARAMS = random_tree(0)
GRADS = gradient_sequence(6, seed=3, scale=2.0)


def steps(tx, state, grads):
  """Feeds ``grads`` through ``tx`` from ``state``: (updates, state)."""
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, PARAMS)
    out.append(u)
  return out, state


# Three ways users save and restore a state.
def via_pickle(state, target, tmp_path):
  del target
  path = tmp_path / 'state.pkl'
  path.write_bytes(pickle.dumps(jax.device_get(state)))
  return pickle.loads(path.read_bytes())


def via_orbax(state, target, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'orbax', state)
    ckpt.wait_until_finished()
    return ckpt.restore(tmp_path / 'orbax', target)


def via_flax_target(state, target, tmp_path):
  serialization = pytest.importorskip('flax.serialization')
  path = tmp_path / 'state.msgpack'
  path.write_bytes(serialization.to_bytes(state))
  return serialization.from_bytes(target, path.read_bytes())


RESTORES = {
  'pickle': via_pickle,
  'orbax': via_orbax,
  'flax target': via_flax_target,
}


@pytest.mark.parametrize('name', list(ARGS))
def test_same_classes_structure_and_dtypes(name):
  ours, ref = (
    make(rmsprop_jax, name).init(PARAMS),
    make(optax, name).init(PARAMS),
  )
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  assert jax.tree.map(lambda x: x.dtype, ours) == jax.tree.map(
    lambda x: x.dtype, ref
  )
  assert_trees_equal(ours, ref)
  _, ours = steps(make(rmsprop_jax, name), ours, GRADS[:2])
  _, ref = steps(make(optax, name), ref, GRADS[:2])
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  assert_trees_equal(ours, ref)


@pytest.mark.parametrize('restore', list(RESTORES))
@pytest.mark.parametrize('name', list(ARGS))
@pytest.mark.parametrize('direction', ['optax to ours', 'ours to optax'])
def test_checkpoint_continues_bit_for_bit(direction, name, restore, tmp_path):
  writer, reader = (
    (optax, rmsprop_jax)
    if direction == 'optax to ours'
    else (rmsprop_jax, optax)
  )
  _, saved = steps(
    make(writer, name), make(writer, name).init(PARAMS), GRADS[:3]
  )
  target = make(reader, name).init(PARAMS)
  restored = RESTORES[restore](saved, target, tmp_path)
  assert jax.tree.structure(restored) == jax.tree.structure(target)
  # Restored, not left at the target's fresh values.
  assert_trees_equal(restored, saved)
  continued, state = steps(make(reader, name), restored, GRADS[3:])
  ref, ref_state = steps(make(writer, name), saved, GRADS[3:])
  assert_trees_equal(continued, ref)
  assert_trees_equal(state, ref_state)


def test_flax_train_state_checkpoint(tmp_path):
  """``flax.training.checkpoints`` with a ``TrainState`` target, as training
  code that swaps ``optax.rmsprop`` for ours restores it."""
  checkpoints = pytest.importorskip('flax.training.checkpoints')
  from flax.training import train_state

  apply_fn = lambda p, x: x
  for writer, reader in ((optax, rmsprop_jax), (rmsprop_jax, optax)):
    tx_w = writer.rmsprop(0.05, initial_scale=1.0, momentum=0.9)
    state = train_state.TrainState.create(
      apply_fn=apply_fn, params=PARAMS, tx=tx_w
    )
    for g in GRADS[:3]:
      state = state.apply_gradients(grads=g)
    directory = tmp_path / writer.__name__
    checkpoints.save_checkpoint(directory, state, step=3)
    target = train_state.TrainState.create(
      apply_fn=apply_fn,
      params=PARAMS,
      tx=reader.rmsprop(0.05, initial_scale=1.0, momentum=0.9),
    )
    restored = checkpoints.restore_checkpoint(directory, target)
    assert restored.step == 3
    assert_trees_equal(restored.opt_state, state.opt_state)
    for g in GRADS[3:]:
      state = state.apply_gradients(grads=g)
      restored = restored.apply_gradients(grads=g)
    assert_trees_equal(restored.params, state.params)


def test_lookups_and_isinstance():
  tx = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.9)
  state = tx.init(PARAMS)
  assert isinstance(state[0], optax.ScaleByRStdDevState)
  assert isinstance(state[1], optax.ScaleByScheduleState) or isinstance(
    state[1], optax.EmptyState
  )
  assert isinstance(state[2], optax.TraceState)
  assert rmsprop_jax.ScaleByRStdDevState is optax.ScaleByRStdDevState
  shapes = jax.tree.map(jnp.shape, PARAMS)
  assert jax.tree.map(jnp.shape, state[0].nu) == shapes
  assert jax.tree.map(jnp.shape, optax.tree.get(state, 'nu')) == shapes
  assert jax.tree.map(jnp.shape, optax.tree.get(state, 'trace')) == shapes
  # Two equal trees of dtypes compare equal, here and when packed.
  for packing in (False, True):
    tx = rmsprop_jax.rmsprop(0.05, momentum=0.9, packing=packing)
    a = jax.tree.map(lambda x: x.dtype, tx.init(PARAMS))
    b = jax.tree.map(lambda x: x.dtype, tx.init(PARAMS))
    assert a == b
    assert not a != b


def test_optax_tree_map_params_matches_optax():
  params = jax.tree.map(lambda x: x + 1.0, PARAMS)
  specs = jax.tree.map(lambda x: ('spec', x.shape), params)
  for name in ARGS:
    ours_tx, ref_tx = make(rmsprop_jax, name), make(optax, name)
    ours, ref = ours_tx.init(params), ref_tx.init(params)
    f = lambda x: x * 2 + 1
    assert_trees_equal(
      optax.tree_map_params(ours_tx, f, ours),
      optax.tree_map_params(ref_tx, f, ref),
    )
    spec = lambda _, s: s
    assert optax.tree_map_params(
      ours_tx, spec, ours, specs, transform_non_params=lambda _: None
    ) == optax.tree_map_params(
      ref_tx, spec, ref, specs, transform_non_params=lambda _: None
    )


def test_optax_tree_map_params_on_packed_state():
  """Packing is opt-in; functions of the state alone map over its stacks,
  so the result unpacks to the same as mapping over optax's state."""
  tx = rmsprop_jax.rmsprop(0.05, momentum=0.9, packing=True)
  params = {'layers': [jnp.ones(3) * i for i in range(4)], 'w': jnp.ones(2)}
  _, state = steps_on(tx, params, 2)
  _, ref = steps_on(optax.rmsprop(0.05, momentum=0.9), params, 2)
  f = lambda x: x * 3 - 1
  mapped = optax.tree_map_params(tx, f, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  assert_trees_equal(
    rmsprop_jax.unpack_state(mapped),
    optax.tree_map_params(optax.rmsprop(0.05, momentum=0.9), f, ref),
  )


def steps_on(tx, params, n):
  grads = [
    jax.tree.map(lambda p, i=i: jnp.sin(p + i), params) for i in range(n)
  ]
  state = tx.init(params)
  out = []
  for g in grads:
    u, state = jax.jit(tx.update)(g, state, params)
    out.append(u)
  return out, state


@pytest.mark.parametrize('wrapper', ['reduce_on_plateau', 'schedule_free'])
def test_optax_contrib_wrappers_match_optax(wrapper):
  contrib = pytest.importorskip('optax.contrib')

  def wrap(lib):
    base = lib.rmsprop(0.05, momentum=0.9)
    if wrapper == 'reduce_on_plateau':
      return optax.chain(
        base, contrib.reduce_on_plateau(patience=1, factor=0.5)
      )
    return contrib.schedule_free(base, learning_rate=0.05)

  results = []
  for lib in (rmsprop_jax, optax):
    tx = wrap(lib)
    params = PARAMS
    state = tx.init(params)
    state = optax.tree_map_params(tx, lambda v: v, state)  # As optax tests.

    @jax.jit
    def step(params, state, g, tx=tx):
      loss = sum(jnp.sum(x**2) for x in jax.tree.leaves(params))
      updates, state = tx.update(g, state, params, value=loss)
      return optax.apply_updates(params, updates), state

    for g in GRADS:
      params, state = step(params, state, g)
    results.append((params, state))
  assert jax.tree.structure(results[0][1]) == jax.tree.structure(results[1][1])
  assert_trees_equal(results[0][0], results[1][0])
  assert_trees_equal(results[0][1], results[1][1])


def test_flax_nnx_optimizer_state_moves_between_optax_and_ours(tmp_path):
  nnx = pytest.importorskip('flax.nnx')
  ocp = pytest.importorskip('orbax.checkpoint')
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 4))

  def build(lib):
    model = nnx.Sequential(
      nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
      nnx.relu,
      nnx.Linear(8, 1, rngs=nnx.Rngs(1)),
    )
    return model, nnx.Optimizer(
      model, lib.rmsprop(0.01, momentum=0.9, centered=True), wrt=nnx.Param
    )

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)
    return loss

  for writer, reader in ((optax, rmsprop_jax), (rmsprop_jax, optax)):
    model, opt = build(writer)
    for _ in range(3):
      step(model, opt)
    saved = {'model': nnx.state(model), 'opt': nnx.state(opt)}
    directory = tmp_path / writer.__name__
    other_model, other = build(reader)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(directory, saved)
      ckpt.wait_until_finished()
      abstract = jax.tree.map(
        ocp.utils.to_shape_dtype_struct,
        {'model': nnx.state(other_model), 'opt': nnx.state(other)},
      )
      restored = ckpt.restore(directory, abstract)
    nnx.update(other_model, restored['model'])
    nnx.update(other, restored['opt'])
    assert_trees_equal(nnx.state(other), saved['opt'])
    losses = [float(step(model, opt)) for _ in range(3)]
    assert [float(step(other_model, other)) for _ in range(3)] == losses


# Packing (opt-in): converts both ways, and never restores silently wrong.


def test_pack_state_continues_an_optax_checkpoint(tmp_path):
  params = {
    'layers': [jnp.full(3, float(i)) for i in range(4)],
    'w': jnp.ones((2, 2)),
  }
  grads = [
    jax.tree.map(lambda p, i=i: jnp.cos(p * i), params) for i in range(6)
  ]
  ref_tx = optax.rmsprop(0.05, centered=True, momentum=0.9)
  tx = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.9, packing=True)
  ref_state = ref_tx.init(params)
  for g in grads[:3]:
    _, ref_state = ref_tx.update(g, ref_state)
  plain = via_orbax(ref_state, ref_tx.init(params), tmp_path)
  state = rmsprop_jax.pack_state(plain, tx, params)
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
  assert_trees_equal(rmsprop_jax.unpack_state(state), ref_state)
  for g in grads[3:]:
    u, state = tx.update(g, state)
    ref_u, ref_state = ref_tx.update(g, ref_state)
    assert_trees_equal(u, ref_u)
  # Back to optax's layout, restorable by any optax user.
  back = via_flax_target(
    rmsprop_jax.unpack_state(state), ref_tx.init(params), tmp_path
  )
  assert_trees_equal(back, ref_state)


def test_packed_and_plain_states_never_restore_silently():
  serialization = pytest.importorskip('flax.serialization')
  params = {'layers': [jnp.ones(3) for _ in range(4)]}
  packed_tx = rmsprop_jax.rmsprop(0.05, packing=True)
  plain_tx = rmsprop_jax.rmsprop(0.05)
  packed, plain = packed_tx.init(params), optax.rmsprop(0.05).init(params)
  # A plain checkpoint into a packed target, and the reverse.
  with pytest.raises(ValueError, match='pack_state'):
    serialization.from_bytes(packed, serialization.to_bytes(plain))
  with pytest.raises(ValueError):
    serialization.from_bytes(plain, serialization.to_bytes(packed))
  # A plain state given to a packed optimizer, and the reverse.
  g = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r'rmsprop_jax\.pack_state'):
    packed_tx.update(g, plain)
  with pytest.raises(ValueError, match=r'rmsprop_jax\.unpack_state'):
    plain_tx.update(g, packed)
  # An 8-bit nu is not a float nu either way.
  eight = rmsprop_jax.rmsprop(
    0.05, nu_dtype=jnp.uint8, bias_correction=True
  ).init(params)
  counted = optax.rmsprop(0.05, bias_correction=True).init(params)
  with pytest.raises(ValueError, match='nu_dtype'):
    serialization.from_bytes(eight, serialization.to_bytes(counted))
  # The moment state of another variant (a count, an 8-bit nu, or not).
  counted_tx = rmsprop_jax.rmsprop(0.05, bias_correction=True)
  eight_tx = rmsprop_jax.rmsprop(0.05, nu_dtype=jnp.uint8, bias_correction=True)
  for tx, state in (
    (counted_tx, eight),
    (eight_tx, counted),
    (plain_tx, eight),
    (eight_tx, plain),
  ):
    with pytest.raises(ValueError, match=r'rmsprop_jax\.pack_state'):
      tx.update(g, state, params)
  # pack_state into optax's own optimizer gives optax's exact classes.
  back = rmsprop_jax.pack_state(eight, optax.rmsprop(0.05), params)
  assert jax.tree.structure(back) == jax.tree.structure(plain)
  with pytest.raises(ValueError, match='does not fit|should be'):
    rmsprop_jax.pack_state(
      plain, rmsprop_jax.rmsprop(0.05, centered=True), params
    )


def test_pack_state_into_narrow_and_8bit_state():
  params = {'layers': [jnp.ones(300) * (i + 1) for i in range(3)]}
  grads = [
    jax.tree.map(lambda p, i=i: jnp.sin(p * i), params) for i in range(4)
  ]
  ref_tx = optax.rmsprop(0.05)
  ref = ref_tx.init(params)
  for g in grads:
    _, ref = ref_tx.update(g, ref)
  # Stochastic rounding moves a value by up to one step of the storage:
  # bfloat16's 2**-7 relative, the 8-bit code's 1/8.
  for kwargs, rtol in (
    (dict(nu_dtype=jnp.bfloat16, stochastic_rounding=True), 2**-7),
    (dict(nu_dtype=jnp.uint8, packing=True), 1 / 8),
  ):
    tx = rmsprop_jax.rmsprop(0.05, **kwargs)
    state = rmsprop_jax.pack_state(ref, tx, params)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    np.testing.assert_allclose(
      np.concatenate(
        [
          np.ravel(x)
          for x in jax.tree.leaves(
            optax.tree.get(rmsprop_jax.unpack_state(state), 'nu')
          )
        ]
      ),
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref[0].nu)]),
      rtol=rtol,
    )
    tx.update(grads[0], state)  # And it runs.
