"""Checkpoints move between device counts: 1 -> 8 -> 1 (simulated CPUs).

The suite runs on one device. This test writes checkpoints there, then runs
this file as a script in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which restores them
onto a mesh of 8 devices, continues, and writes its own; the test restores
those on one device and continues again. At every stage the reference is
real ``optax.rmsprop`` continuing from the same state on the same devices:
bit for bit.
"""

import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax

import rmsprop_jax

from helpers import normal_tree

N_DEVICES = 8
SCHEDULE = optax.cosine_decay_schedule(0.05, 20)
ARGS = {
  'centered+momentum': dict(learning_rate=0.05, centered=True, momentum=0.9),
  'nesterov, bias correction': dict(
    learning_rate=0.05, momentum=0.9, nesterov=True, bias_correction=True
  ),
  'schedule': dict(learning_rate=SCHEDULE, initial_scale=1.0),
  'inject_hyperparams': dict(learning_rate=0.05, momentum=0.9),
}


def make(lib, name, **extra):
  if name == 'inject_hyperparams':
    return optax.inject_hyperparams(lib.rmsprop)(**ARGS[name], **extra)
  return lib.rmsprop(**ARGS[name], **extra)


def params_on(mesh=None):
  """Parameters, split over the mesh's one axis where a mesh is given."""
  shapes = {'w': (16, 8), 'b': (8,), 'layers': [(8,)] * 4, 'scale': ()}
  params = normal_tree(shapes, 0)
  if mesh is None:
    return params
  spec = lambda x: jax.sharding.PartitionSpec(*(('x',) if x.ndim else ()))
  return jax.tree.map(
    lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x))),
    params,
  )


def grads_for(params, step):
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + step), params)


def steps(tx, state, params, first, n):
  update = jax.jit(tx.update)
  out = []
  for i in range(first, first + n):
    u, state = update(grads_for(params, i), state, params)
    out.append(u)
  return out, state


def assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    assert (jax.device_get(x) == jax.device_get(y)).all(), (x, y)


def save(state, path):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
    ckpt.wait_until_finished()


def restore(path, target, shardings=None):
  """Restores into ``target``'s structure, placed by ``shardings``."""
  import orbax.checkpoint as ocp

  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  if shardings is not None:
    abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      shardings,
    )
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path, abstract)


def continue_both(name, state, params, first):
  """Continues ``state`` with ours and with optax: both must agree."""
  ours_u, ours = steps(make(rmsprop_jax, name), state, params, first, 3)
  ref_u, ref = steps(make(optax, name), state, params, first, 3)
  assert_equal(ours_u, ref_u)
  assert_equal(ours, ref)
  return ours


def on_eight_devices(directory: pathlib.Path):
  """The subprocess: restore the 1-device checkpoints on 8 devices."""
  assert jax.device_count() == N_DEVICES
  mesh = jax.make_mesh((N_DEVICES,), ('x',))
  params = params_on(mesh)
  for i, name in enumerate(ARGS):
    ours_init = make(rmsprop_jax, name).init(params)
    assert jax.tree.structure(ours_init) == jax.tree.structure(
      make(optax, name).init(params)
    )
    # Written by optax on one device, restored into ours on eight, sharded
    # like the parameters (counts and hyperparameters replicated).
    state = restore(
      directory / f'one_{i}',
      ours_init,
      rmsprop_jax.state_shardings(make(rmsprop_jax, name), params),
    )
    w = jax.tree.leaves(
      state[0] if name != 'inject_hyperparams' else state.inner_state[0]
    )[-1]
    assert len(w.sharding.device_set) == N_DEVICES
    ours = continue_both(name, state, params, 3)
    save(ours, directory / f'eight_{i}')
  # The packed layout is the same on eight devices as on one, and a packed
  # pickle from one device continues here as the unpacked state does.
  tx = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.9, packing=True)
  assert (
    str(jax.tree.structure(tx.init(params)))
    == (directory / 'packed_treedef.txt').read_text()
  )
  packed = pickle.loads((directory / 'packed.pkl').read_bytes())
  packed_u, _ = steps(tx, packed, params, 3, 3)
  ref_u, _ = steps(
    optax.rmsprop(0.05, centered=True, momentum=0.9),
    rmsprop_jax.unpack_state(packed),
    params,
    3,
    3,
  )
  for a, b in zip(packed_u, ref_u):
    assert_equal(a, b)
  (directory / 'eight_done').write_text('ok')


def test_checkpoints_move_between_one_and_eight_devices(tmp_path):
  assert jax.device_count() == 1
  params = params_on()
  for i, name in enumerate(ARGS):
    _, state = steps(
      make(optax, name), make(optax, name).init(params), params, 0, 3
    )
    save(state, tmp_path / f'one_{i}')
  tx = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.9, packing=True)
  _, packed = steps(tx, tx.init(params), params, 0, 3)
  (tmp_path / 'packed.pkl').write_bytes(pickle.dumps(jax.device_get(packed)))
  (tmp_path / 'packed_treedef.txt').write_text(str(jax.tree.structure(packed)))

  env = dict(
    os.environ,
    XLA_FLAGS=(
      os.environ.get('XLA_FLAGS', '')
      + f' --xla_force_host_platform_device_count={N_DEVICES}'
    ).strip(),
  )
  result = subprocess.run(
    [sys.executable, __file__, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  assert (tmp_path / 'eight_done').read_text() == 'ok'

  # Written by ours on eight devices, restored into optax on one.
  for i, name in enumerate(ARGS):
    target = make(optax, name).init(params)
    state = restore(tmp_path / f'eight_{i}', target)
    assert jax.tree.structure(state) == jax.tree.structure(target)
    continue_both(name, state, params, 6)


if __name__ == '__main__':
  on_eight_devices(pathlib.Path(sys.argv[1]))
