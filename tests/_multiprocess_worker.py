"""One of N JAX processes on this machine, for tests/test_multiprocess.py.

Not a test module (pytest collects ``test_*.py`` only): the test launches N
fresh interpreters running this file, each with ``8 // N`` CPU devices,
joined by ``jax.distributed.initialize`` into one runtime of 8 devices.
Every process runs the same program on a ``data x model`` mesh spanning the
processes and gathers the results (``process_allgather``); process 0 also
runs the same steps on one local device, without shardings, from the same
host values, and compares. Process 0 writes what it checked to ``--out`` as
JSON, ``{check: 'ok' | 'ok, not bit for bit: ...' |
'failed: <traceback>'}``; the others write which checks they took part in.

A phase does some of:

- ``--fresh``: for every optimizer, K steps from the initial parameters
  with the state sharded like the parameters and with ZeRO-1, against one
  device (and ours against optax's own rmsprop on the mesh, bit for bit);
- ``--restore DIR``: restores the checkpoints that another process count
  saved on another mesh (the state saved sharded like the parameters with
  ZeRO-1's shardings and the other way round; optax's state into
  ``rmsprop_jax.rmsprop``'s and back), continues K steps, against one
  device;
- ``--save DIR``: saves the states it ended with, one Orbax checkpoint per
  optimizer, written by every process.

The one-device runs are the same in every phase (the same program from the
same values, step after step): the first phase runs them on for every step
a later phase compares at and writes them to ``--write-refs FILE``, which
the later phases read (``--refs FILE``) instead of running them again.

    python tests/_multiprocess_worker.py --processes N --process-id I
        --port P --mesh 4x2 --out report.json [--fresh] [--restore DIR
        --start S] [--save DIR] [--write-refs FILE --ref-steps N | --refs
        FILE] [--perturb]
"""

import argparse
import json
import pickle
import sys
import time
import traceback
from functools import partial


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--processes', type=int, required=True)
  parser.add_argument('--process-id', type=int, required=True)
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--mesh', required=True, help='data x model, e.g. 4x2')
  parser.add_argument('--out', required=True, help='the JSON report')
  parser.add_argument('--steps', type=int, default=3, help='K')
  parser.add_argument('--fresh', action='store_true')
  parser.add_argument('--restore', help='checkpoint folder to restore from')
  parser.add_argument('--start', type=int, default=0, help='its step')
  parser.add_argument('--save', help='checkpoint folder to save into')
  parser.add_argument(
    '--write-refs', help='where to write the one-device runs (process 0)'
  )
  parser.add_argument(
    '--ref-steps',
    type=int,
    default=0,
    help='with --write-refs: also keep every K-th step up to this one',
  )
  parser.add_argument(
    '--refs', help='the one-device runs an earlier phase wrote'
  )
  parser.add_argument(
    '--perturb',
    action='store_true',
    help='perturb the one-device reference (every check must fail)',
  )
  return parser.parse_args(argv)


ARGS = _parse(sys.argv[1:])

# Before anything else in JAX: this process's devices, then the runtime.
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8 // ARGS.processes)
if ARGS.processes > 1:
  jax.distributed.initialize(
    f'localhost:{ARGS.port}',
    ARGS.processes,
    ARGS.process_id,
    initialization_timeout=60,
  )

import pathlib  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rmsprop_jax  # noqa: E402

LEARNING_RATE = 1e-2
# Small MLP-like parameters. w1's last axis is split over 'model' (2 or 4
# ways on these meshes): 512 or 256 per shard, whole blocks of the 8-bit
# state (256 along the last axis). b2 is small and replicated.
SHAPES = {'w1': (16, 1024), 'b1': (1024,), 'w2': (1024, 8), 'b2': (8,)}
SPECS = {
  'w1': P(None, 'model'),
  'b1': P('model'),
  'w2': P('model', None),
  'b2': P(),
}
OPTIONS = {
  'default': {},
  'centered_momentum': dict(centered=True, momentum=0.9),
  'bf16_sr': dict(nu_dtype=jnp.bfloat16, stochastic_rounding=True),
  'uint8': dict(nu_dtype=jnp.uint8),
}
# optax's own rmsprop with the options it has, as the same programs' check.
OPTAX = {
  'optax': {},
  'optax_centered_momentum': dict(centered=True, momentum=0.9),
}
PARITY = {'default': 'optax', 'centered_momentum': 'optax_centered_momentum'}
MAKERS = {
  **{
    name: (lambda kw=kw: rmsprop_jax.rmsprop(LEARNING_RATE, **kw))
    for name, kw in OPTIONS.items()
  },
  **{
    name: (lambda kw=kw: optax.rmsprop(LEARNING_RATE, **kw))
    for name, kw in OPTAX.items()
  },
}
SAVED = [*OPTIONS, 'optax']  # What is checkpointed and restored.
# Checkpoints of one optimizer restored into another: optax <-> ours.
CROSS = (('optax', 'default'), ('default', 'optax'))
MODES = {'sharded': None, 'zero1': 'data'}
# The runs with the state sharded like the parameters match one device bit
# for bit. Those with ZeRO-1 anywhere in their history (every run after a
# restore here: the state saved sharded is restored with ZeRO-1 and the
# other way round) need not: XLA:CPU contracts a multiply and an add into an
# FMA per program, not always the same one. From the second step on, the
# ZeRO-1 programs here compute nu's update decay * nu + (1 - decay) * g**2
# as fma(decay, nu, rounded((1 - decay) * g**2)) where one device (and the
# co-sharded state) computes fma(1 - decay, g**2, rounded(decay * nu))
# (checked against numpy on these values): 1-ulp differences, which the
# later steps carry on. optax's rmsprop does the same (the parity checks:
# ours and optax's agree bit for bit on the mesh and on one device). So
# these are compared within RTOL of each entry or of the leaf's largest.
RTOL = 1e-6


def host_params():
  rng = np.random.RandomState(0)
  return {
    k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
  }


def host_noise(step):
  """The gradient is params + noise(step), the gradient of
  0.5 |params|^2 + noise . params; the same on every process."""
  rng = np.random.RandomState(1000 + step)
  scale = np.float32(2.0 ** (step % 3 - 1))
  return {
    k: scale * rng.standard_normal(s).astype(np.float32)
    for k, s in SHAPES.items()
  }


def train_step(tx):
  def step(params, state, noise):
    grads = jax.tree.map(jnp.add, params, noise)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


@jax.jit
def _unpack(params, state):
  return rmsprop_jax.unpack_state(state, params)


def to_host(params, state):
  """(params, state) as numpy on every process, the state unpacked (an
  8-bit moment as float32). Every process must call it (a collective)."""
  params, state = jax.tree.map(
    lambda x: (
      np.asarray(x)
      if x.is_fully_addressable
      else multihost_utils.process_allgather(x, tiled=True)
    ),
    (params, state),
  )
  coded = any(
    isinstance(x, rmsprop_jax.quantization.Blockwise8bit)
    for x in jax.tree.leaves(
      state,
      is_leaf=lambda x: isinstance(x, rmsprop_jax.quantization.Blockwise8bit),
    )
  )
  if coded:  # (unpack_state returns any other state as it is.)
    state = _unpack(params, state)
  return jax.tree.map(np.array, (params, state))


class Checks:
  """Comparisons that never raise midway: every process must make the same
  collective calls whatever process 0 finds, so the differences are
  gathered and raised at the end of a check."""

  def __init__(self, refs):
    self.refs = refs  # None on the processes other than 0.
    self.errors, self.notes = [], []

  def same(self, got, name, step, what, exact=False):
    """``got`` (from to_host) against ``name``'s one-device run at
    ``step``: bit for bit if ``exact``, else within RTOL (and noted)."""
    if self.refs is None:
      return
    want = self.refs[name][step]
    if not self._same_structure(got, want, what):
      return
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
    ):
      where = f'{what} against {name} at step {step}: '
      where += jax.tree_util.keystr(path)
      if a.dtype != b.dtype or a.shape != b.shape:
        self.errors.append(f'{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}')
      elif exact and not np.array_equal(a, b):
        differ = int(np.sum(a != b))
        self.errors.append(f'{where}: {differ} of {a.size} entries differ')
      elif not np.array_equal(a, b):
        # Within RTOL of each entry or of the leaf's largest (an entry near
        # zero is the difference of two larger numbers, each rounded).
        scale = float(np.max(np.abs(b.astype(np.float32))))
        try:
          np.testing.assert_allclose(
            a.astype(np.float32),
            b.astype(np.float32),
            rtol=RTOL,
            atol=RTOL * scale,
          )
          diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
          self.notes.append(
            f'{where}: {int(np.sum(a != b))} of {a.size} differ, by at most '
            f'{np.max(diff) / scale:.1e} of the largest'
          )
        except AssertionError as e:
          self.errors.append(f'{where}:{e}')

  def _same_structure(self, got, want, what):
    if jax.tree.structure(got) == jax.tree.structure(want):
      return True
    self.errors.append(
      f'{what}: {jax.tree.structure(got)} != {jax.tree.structure(want)}'
    )
    return False

  def bitwise(self, got, want, what):
    """``got`` and ``want`` (numpy trees) the same, bit for bit."""
    if self.refs is None or not self._same_structure(got, want, what):
      return
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
    ):
      if not np.array_equal(a, b):
        self.errors.append(f'{what}: {jax.tree_util.keystr(path)} differs')

  def finish(self):
    if self.errors:
      raise AssertionError('\n'.join(self.errors))
    if self.notes:
      return 'ok, not bit for bit: ' + '; '.join(self.notes)
    return 'ok'


class World:
  def __init__(self, mesh_shape):
    self.mesh = Mesh(
      np.array(jax.devices()).reshape(mesh_shape), ('data', 'model')
    )
    self.param_sh = {k: NamedSharding(self.mesh, s) for k, s in SPECS.items()}
    self.abstract_params = {
      k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=self.param_sh[k])
      for k, s in SHAPES.items()
    }
    self.steps = {}

  def put(self, tree):
    """Host values (the same on every process) as global arrays."""
    return {
      k: jax.make_array_from_callback(
        x.shape, self.param_sh[k], lambda idx, x=x: x[idx]
      )
      for k, x in tree.items()
    }

  def target(self, tx, zero1_axis):
    """The state's shardings on this mesh, and its restore target."""
    shardings = rmsprop_jax.state_shardings(
      tx, self.abstract_params, zero1_axis=zero1_axis
    )
    shapes = jax.eval_shape(tx.init, self.abstract_params)
    return shardings, jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes,
      shardings,
    )

  def run(self, name, mode, params, state, shardings, first, steps):
    """``steps`` steps of ``name``'s optimizer from step ``first``; one
    program per optimizer and mode (a restore reuses the fresh run's)."""
    key = name, mode
    if key not in self.steps:
      self.steps[key] = jax.jit(
        train_step(MAKERS[name]()), out_shardings=(self.param_sh, shardings)
      )
    jstep = self.steps[key]
    for i in range(first, first + steps):
      params, state = jstep(params, state, self.put(host_noise(i)))
    for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      assert x.sharding.is_equivalent_to(sh, x.ndim), (x.sharding, sh)
    for k, x in params.items():
      assert x.sharding.is_equivalent_to(self.param_sh[k], x.ndim)
    return params, state


def one_device(name, stops):
  """The reference: ``name``'s optimizer on one local device, jitted
  without shardings, from the initial parameters; (params, state) as numpy
  after each number of steps in ``stops``."""
  tx = MAKERS[name]()
  device = jax.local_devices()[0]
  params = jax.device_put(host_params(), device)
  state = jax.jit(tx.init)(params)
  step = jax.jit(train_step(tx))
  out = {}
  for i in range(max(stops)):
    params, state = step(params, state, jax.device_put(host_noise(i), device))
    if i + 1 in stops:
      out[i + 1] = to_host(params, state)
  return out


def main():
  args = ARGS
  first = jax.process_index() == 0
  world = World(tuple(int(n) for n in args.mesh.split('x')))
  k = args.steps
  print(
    f'process {jax.process_index()} of {jax.process_count()}: '
    f'{jax.local_device_count()} of {jax.device_count()} devices, mesh '
    f'{dict(world.mesh.shape)}',
    flush=True,
  )
  assert jax.process_count() == args.processes and jax.device_count() == 8
  stops = {k} if args.fresh else set()
  if args.restore:
    stops |= {args.start, args.start + k}
  refs = None
  if first and args.refs:  # Only process 0 compares: the gathered values
    # are everyone's.
    refs = pickle.loads(pathlib.Path(args.refs).read_bytes())
    assert set(refs) == set(MAKERS) and all(
      stops <= set(r) for r in refs.values()
    ), f'{args.refs} lacks runs: {sorted(MAKERS)} at {sorted(stops)} needed'
  elif first:
    start = time.perf_counter()
    stops |= set(range(k, args.ref_steps + 1, k))
    refs = {name: one_device(name, stops) for name in MAKERS}
    print(f'one-device runs: {time.perf_counter() - start:.1f} s', flush=True)
    if args.write_refs:
      pathlib.Path(args.write_refs).write_bytes(pickle.dumps(refs))
  if first and args.perturb:  # To see the checks fail: one entry moved.
    for p, _ in (x for r in refs.values() for x in r.values()):
      p['w1'][3, 5] += np.float32(1e-5)
  report = {}
  ended = {}  # name -> {mode: (params, state)}: what --save writes.
  fresh_ends = {}  # (name, mode) -> (params, state) as numpy, fresh runs.
  checkpointer = ocp.StandardCheckpointer()

  def checked(name, fn):
    """Runs one check; records 'ok...' or 'failed: <traceback>'."""
    start = time.perf_counter()
    try:
      report[name] = fn(Checks(refs))
    except Exception:
      report[name] = 'failed: ' + traceback.format_exc()
    print(
      f'[{jax.process_index()}] {name} ({time.perf_counter() - start:.1f} s)'
      f': {report[name][:300]}',
      flush=True,
    )

  def fresh(checks, name, mode):
    tx = MAKERS[name]()
    shardings, _ = world.target(tx, MODES[mode])
    params = world.put(host_params())
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    params, state = world.run(name, mode, params, state, shardings, 0, k)
    host = to_host(params, state)
    # Bit for bit where ZeRO-1 is nowhere in the run's history (RTOL).
    checks.same(host, name, k, f'{name}/{mode}', exact=mode == 'sharded')
    fresh_ends[name, mode] = host
    ended.setdefault(name, {})[mode] = (params, state)
    return checks.finish()

  def parity(checks, ours, theirs, mode):
    """Ours and optax's: the same bits on the mesh and on one device, so
    wherever the mesh's result is not one device's, optax's is not
    either, by as much."""
    checks.bitwise(fresh_ends[ours, mode], fresh_ends[theirs, mode], 'mesh')
    if refs is not None:
      checks.bitwise(refs[ours][k], refs[theirs][k], 'one device')
    return checks.finish()

  def restore(checks, saved, name):
    """``saved``'s checkpoint into ``name``'s state on this mesh: the state
    saved sharded like the parameters restored with ZeRO-1's shardings and
    the other way round; K more steps."""
    tx = MAKERS[name]()
    swap = {'sharded': 'zero1', 'zero1': 'sharded'}
    targets = {mode: world.target(tx, MODES[mode]) for mode in MODES}
    tree = checkpointer.restore(
      pathlib.Path(args.restore) / saved,
      {
        swap[mode]: {'params': world.abstract_params, 'state': target}
        for mode, (_, target) in targets.items()
      },
    )
    for mode, (shardings, target) in targets.items():
      params, state = tree[swap[mode]]['params'], tree[swap[mode]]['state']
      what = f'{saved} restored as {name}/{mode}'
      assert jax.tree.structure(state) == jax.tree.structure(target), what
      for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert x.sharding.is_equivalent_to(t.sharding, x.ndim), what
      # What was saved is the one-device run's state at that step.
      checks.same(to_host(params, state), saved, args.start, what)
      params, state = world.run(
        name, mode, params, state, shardings, args.start, k
      )
      # Continues as the saved optimizer would, and as `name` would have.
      host = to_host(params, state)
      checks.same(host, saved, args.start + k, what)
      checks.same(host, name, args.start + k, what)
      if saved == name:
        ended.setdefault(name, {})[mode] = (params, state)
    return checks.finish()

  def save(checks, name):
    tree = {
      mode: {'params': params, 'state': state}
      for mode, (params, state) in ended[name].items()
    }
    checkpointer.save(pathlib.Path(args.save) / name, tree)
    checkpointer.wait_until_finished()
    return checks.finish()

  # Each check runs at once (partial binds this iteration's names).
  for name in MAKERS:
    if args.fresh:
      for mode in MODES:
        checked(f'{name}/{mode}', partial(fresh, name=name, mode=mode))
    if args.restore and name in SAVED:
      checked(f'restore {name}', partial(restore, saved=name, name=name))
  if args.fresh:
    for ours, theirs in PARITY.items():
      for mode in MODES:
        checked(
          f'{ours} is {theirs}/{mode}',
          partial(parity, ours=ours, theirs=theirs, mode=mode),
        )
  if args.restore:
    for saved, name in CROSS:
      checked(
        f'restore {saved} as {name}', partial(restore, saved=saved, name=name)
      )
  if args.save:
    for name in SAVED:
      # Both modes ran (every process knows it; what matched, process 0).
      if set(ended.get(name, ())) == set(MODES):
        checked(f'save {name}', partial(save, name=name))
  checkpointer.close()
  pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
  print('done', flush=True)


if __name__ == '__main__':
  main()
