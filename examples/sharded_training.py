"""Data- and model-parallel training on a mesh of 8 devices, with ZeRO-1 and
an Orbax checkpoint restored onto a different mesh.

A Flax Linen MLP learns scikit-learn's digits on a 4 x 2 mesh ('data' x
'model'): the batch is split over 'data', the hidden layer over 'model'.
The optimizer state either follows the parameters (each device keeps the
state of the parameters it holds) or, with ZeRO-1, is also split over 'data'
(a quarter of it per device here). Both give the same losses. The ZeRO-1
state is then saved with Orbax and restored onto a 2 x 4 mesh, where
training continues.

On a machine without 8 devices this simulates them on the CPU (it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts).
With ``--processes N`` (2, 4 or 8) the 8 devices belong to N JAX processes,
as on N hosts: the script starts N copies of itself as fresh interpreters
on this machine, each with ``8 // N`` CPU devices and joined by
``jax.distributed.initialize``; each process loads only its rows of every
batch, all of them write the checkpoint, and process 0 prints and draws.
The rest is the same code (see docs/guides/sharding.md for a cluster).

    python examples/sharded_training.py [--quick] [--out DIR] [--processes N]
"""

import os

# Set by the launcher (``--processes N``) in each process it starts: JSON
# with the process's index, the coordinator's port and a shared folder.
WORKER = 'SHARDED_TRAINING_PROCESS'
if WORKER not in os.environ:
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import contextlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import rmsprop_jax  # noqa: E402

from _common import StepBar, parse_args, pyplot, save_figure  # noqa: E402

HIDDEN = 512
# Megatron-style: the first kernel split by columns, the second by rows.
SPECS = {
  'hidden': {'kernel': P(None, 'model'), 'bias': P('model')},
  'out': {'kernel': P('model', None), 'bias': P()},
}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    hidden = nn.relu(nn.Dense(HIDDEN, name='hidden')(x))
    return nn.Dense(10, name='out')(hidden)


def make_mesh(shape):
  return jax.make_mesh(
    shape, ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )


def param_shardings(mesh):
  return {'params': jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)}


def bytes_per_device(tree, mesh) -> int:
  """The most bytes of ``tree`` any one device holds."""
  return max(
    sum(
      s.data.nbytes
      for x in jax.tree.leaves(tree)
      for s in x.addressable_shards
      if s.device == d
    )
    for d in mesh.devices.flat
  )


def fetch(x) -> np.ndarray:
  """The whole value of the global array ``x`` on this host, gathered from
  the other processes where it spans them."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


def process_rows(sharding, batch: int) -> slice:
  """The rows of a global batch split by ``sharding`` that this process's
  devices hold (all of them with one process): what it loads."""
  spans = {
    index[0].indices(batch)[:2]
    for index in sharding.addressable_devices_indices_map((batch,)).values()
  }
  rows = slice(min(a for a, _ in spans), max(b for _, b in spans))
  assert sum(b - a for a, b in spans) == rows.stop - rows.start, spans
  return rows


def trainer(mesh, tx, state_shardings, x, y, batch):
  model = MLP()
  p_sh = param_shardings(mesh)
  data_sh = NamedSharding(mesh, P('data'))

  def loss_fn(params, xb, yb):
    logits = model.apply(params, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def step(params, state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  jstep = jax.jit(
    step, donate_argnums=(0, 1), out_shardings=(p_sh, state_shardings, None)
  )

  rows = process_rows(data_sh, batch)

  def run(params, state, steps, bar, first_step=0):
    losses = []
    for i in range(first_step, first_step + steps):
      # The step's batch, of which this process loads its rows only.
      idx = np.random.default_rng(i).integers(0, len(x), batch)[rows]
      xb = jax.make_array_from_process_local_data(
        data_sh, x[idx], (batch, *x.shape[1:])
      )
      yb = jax.make_array_from_process_local_data(data_sh, y[idx], (batch,))
      with jax.set_mesh(mesh):
        params, state, loss = jstep(params, state, xb, yb)
      losses.append(float(loss))
      bar.update()
    return params, state, np.array(losses)

  return jstep, run


def launch(args, argv) -> dict:
  """Runs this script as ``args.processes`` JAX processes on this machine
  and returns process 0's results. Process 0 writes to this terminal, the
  others to log files, printed if one fails; if one fails or the run takes
  too long, the others are stopped."""
  with socket.socket() as s:  # A free port for the coordinator.
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = [
    f
    for f in env.pop('XLA_FLAGS', '').split()
    if not f.startswith('--xla_force_host_platform_device_count')
  ]
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  limit = 300 if args.quick else 1800  # Seconds, for the whole run.
  with tempfile.TemporaryDirectory() as tmp:
    procs, logs = [], []
    for i in range(args.processes):
      spec = dict(process_id=i, port=port, dir=tmp)
      log = None
      if i > 0:
        logs.append(pathlib.Path(tmp) / f'process{i}.log')
        log = open(logs[-1], 'w')
      procs.append(
        subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), *argv],
          env=dict(env, **{WORKER: json.dumps(spec)}),
          stdout=log,
          stderr=None if log is None else subprocess.STDOUT,
        )
      )
      if log is not None:
        log.close()
    deadline = time.monotonic() + limit
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      late = time.monotonic() > deadline
      if failed or late:
        for p in procs:  # Stop the others: terminate, wait, kill.
          if p.poll() is None:
            p.terminate()
        stop = time.monotonic() + 10
        for p in procs:
          try:
            p.wait(timeout=max(0.1, stop - time.monotonic()))
          except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        why = f'took over {limit} s' if late else f'process(es) {failed} failed'
        print(
          f'sharded_training: {why}; stopped the others (process 0 wrote '
          'above).',
          file=sys.stderr,
        )
        for i in range(1, args.processes):
          if late or i in failed:
            text = logs[i - 1].read_text(errors='replace')
            print(f'--- process {i} log ---\n{text[-5000:]}', file=sys.stderr)
        raise SystemExit(1)
      if None not in codes:
        break
      time.sleep(0.2)
    r = json.loads((pathlib.Path(tmp) / 'results.json').read_text())
  for mode in r['results'].values():
    mode['losses'] = np.array(mode['losses'])
  return dict(
    r, resumed=np.array(r['resumed']), continued=np.array(r['continued'])
  )


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 7 s', processes=True)
  worker = os.environ.get(WORKER)
  if args.processes > 1 and worker is None:
    return launch(args, sys.argv[1:] if argv is None else list(argv))
  if worker is not None:  # One of N processes: the first JAX calls.
    spec = json.loads(worker)
    jax.config.update('jax_num_cpu_devices', 8 // args.processes)
    jax.distributed.initialize(
      f'localhost:{spec["port"]}', args.processes, spec['process_id']
    )
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  steps = 30 if args.quick else 300
  batch = 256
  assert jax.device_count() >= 8, (
    'needs 8 devices: run it as a script, or set XLA_FLAGS='
    '--xla_force_host_platform_device_count=8 before JAX starts'
  )
  x, y = load_digits(return_X_y=True)
  x, y = np.float32(x / 16.0), np.int32(y)
  tx = rmsprop_jax.rmsprop(1e-3, momentum=0.9, centered=True)

  mesh = make_mesh((4, 2))
  init = jax.jit(MLP().init, out_shardings=param_shardings(mesh))
  params0 = init(jax.random.PRNGKey(args.seed), jnp.zeros((1, 64)))
  say(
    f'mesh {dict(mesh.shape)} over {jax.process_count()} process(es); '
    f'{sum(p.size for p in jax.tree.leaves(params0)):,} parameters'
  )

  results = {}
  more = max(steps // 3, 5)  # Steps after the checkpoint, on each mesh.
  bar = StepBar(
    2 * steps + 2 * more,
    'co-sharded, ZeRO-1, then resumed on two meshes',
    disable=not lead,
  )
  for mode, zero1 in (('state follows params', None), ('ZeRO-1', 'data')):
    shardings = rmsprop_jax.state_shardings(tx, params0, zero1_axis=zero1)
    state = jax.jit(tx.init, out_shardings=shardings)(params0)
    params = jax.tree.map(jnp.copy, params0)
    jstep, run = trainer(mesh, tx, shardings, x, y, batch)
    data_sh = NamedSharding(mesh, P('data'))
    with jax.set_mesh(mesh):  # The program the loop runs: batches on 'data'.
      hlo = (
        jstep.lower(
          params,
          state,
          jax.ShapeDtypeStruct((batch, 64), x.dtype, sharding=data_sh),
          jax.ShapeDtypeStruct((batch,), y.dtype, sharding=data_sh),
        )
        .compile()
        .as_text()
      )
    collectives = sorted(
      {
        c
        for c in ('all-reduce', 'all-gather', 'reduce-scatter')
        if f' {c}(' in hlo or f' {c}-start(' in hlo
      }
    )
    state_bytes = bytes_per_device(state, mesh)
    params, state, losses = run(params, state, steps, bar)
    results[mode] = dict(
      losses=losses,
      params=params,
      state=state,
      shardings=shardings,
      state_bytes=state_bytes,
      params_bytes=bytes_per_device(params, mesh),
      collectives=collectives,
    )
    say(
      f'{mode:>22}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; per '
      f'device: params {results[mode]["params_bytes"] / 1e3:.0f} kB, '
      f'optimizer state {state_bytes / 1e3:.0f} kB; collectives in the '
      f'step: {", ".join(collectives)}'
    )
  same = np.array_equal(
    results['ZeRO-1']['losses'], results['state follows params']['losses']
  )
  say(f'ZeRO-1 and co-sharded state give the same losses: {same}')

  # Checkpoint the ZeRO-1 run and restore it onto a 2 x 4 mesh.
  z = results['ZeRO-1']
  new_mesh = make_mesh((2, 4))
  new_params_sh = param_shardings(new_mesh)
  abstract_params = jax.tree.map(
    lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
    z['params'],
    new_params_sh,
  )
  new_state_sh = rmsprop_jax.state_shardings(
    tx, abstract_params, zero1_axis='data'
  )
  abstract_state = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    z['state'],
    new_state_sh,
  )
  # Every process saves (its shards) and restores, into one folder they
  # all see: the launcher's with several processes.
  with (
    contextlib.nullcontext(spec['dir'])
    if worker is not None
    else tempfile.TemporaryDirectory()
  ) as tmp:
    path = pathlib.Path(tmp) / 'ckpt'
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path, {'params': z['params'], 'opt_state': z['state']})
      ckpt.wait_until_finished()
      restored = ckpt.restore(
        path, {'params': abstract_params, 'opt_state': abstract_state}
      )
  exact = all(
    np.array_equal(fetch(a), fetch(b))
    for a, b in zip(
      jax.tree.leaves(restored),
      jax.tree.leaves({'params': z['params'], 'opt_state': z['state']}),
    )
  )
  placed = all(
    a.sharding.is_equivalent_to(s.sharding, a.ndim)
    for a, s in zip(
      jax.tree.leaves(restored),
      jax.tree.leaves({'params': abstract_params, 'opt_state': abstract_state}),
    )
  )
  _, run_new = trainer(new_mesh, tx, new_state_sh, x, y, batch)
  _, _, resumed = run_new(
    restored['params'], restored['opt_state'], more, bar, first_step=steps
  )
  # The same continuation on the original mesh, for comparison.
  _, run_old = trainer(mesh, tx, z['shardings'], x, y, batch)
  _, _, continued = run_old(
    z['params'], z['state'], more, bar, first_step=steps
  )
  bar.close()
  gap = float(np.max(np.abs(resumed - continued)))
  say(
    f'restored onto mesh {dict(new_mesh.shape)}: values exact {exact}, '
    f'placed on the new mesh {placed}; {more} more steps reach loss '
    f'{resumed[-1]:.4f} (on the old mesh {continued[-1]:.4f}; largest '
    f'difference {gap:.1e}, from the order of the gradient sums)'
  )

  summary = {
    'same_losses': bool(same),
    'restored_exact': bool(exact),
    'restored_placed': bool(placed),
    'resumed': resumed,
    'continued': continued,
  }
  if worker is not None:
    if lead:  # For the launcher: what main returns, without the arrays.
      (pathlib.Path(spec['dir']) / 'results.json').write_text(
        json.dumps(
          {
            'results': {
              mode: {
                k: v.tolist() if k == 'losses' else v
                for k, v in r.items()
                if k not in ('params', 'state', 'shardings')
              }
              for mode, r in results.items()
            },
            **summary,
            'resumed': resumed.tolist(),
            'continued': continued.tolist(),
          }
        )
      )
    else:
      return None  # Process 0 draws.
  plt = pyplot()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
  base, zero = (
    results[m]['losses'] for m in ('state follows params', 'ZeRO-1')
  )
  gap = float(np.max(np.abs(np.asarray(base) - np.asarray(zero))))
  # The two runs coincide: the first drawn wide and pale, the second thin
  # and dashed on top of it, so that both show.
  ax.plot(
    base, color='tab:blue', lw=5, alpha=0.35, label='state follows params'
  )
  ax.plot(
    zero,
    color='tab:orange',
    lw=1,
    ls='--',
    label='ZeRO-1: on top of it ('
    + ('identical losses' if gap == 0 else f'largest gap {gap:.2g}')
    + ')',
  )
  ax.plot(
    np.arange(steps, steps + more),
    resumed,
    color='tab:green',
    label='ZeRO-1 restored on 2 x 4',
  )
  ax.set(
    yscale='log',
    xlabel='step',
    ylabel='training loss (batch)',
    title=('Same losses' if same else 'Different losses')
    + ' with and without ZeRO-1',
  )
  ax.legend()
  names = list(results)
  bx.bar(
    np.arange(2) - 0.2,
    [results[m]['params_bytes'] / 1e3 for m in names],
    0.4,
    label='parameters',
  )
  bx.bar(
    np.arange(2) + 0.2,
    [results[m]['state_bytes'] / 1e3 for m in names],
    0.4,
    label='optimizer state',
  )
  bx.set_xticks(np.arange(2), names)
  bx.set(
    ylabel='kB on the fullest device',
    title=f'Memory per device, mesh {dict(mesh.shape)}',
  )
  bx.legend()
  save_figure(fig, args.out / 'sharded_training.png')
  plt.close(fig)
  return {'results': results, **summary}


if __name__ == '__main__':
  main()
