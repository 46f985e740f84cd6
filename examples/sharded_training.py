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
On several hosts, call ``jax.distributed.initialize()`` first and build the
mesh from ``jax.devices()``; the rest is unchanged (see docs/guides/sharding.md).

    python examples/sharded_training.py [--quick] [--out DIR]
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P
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

  def run(params, state, steps, bar, first_step=0):
    losses = []
    for i in range(first_step, first_step + steps):
      idx = np.random.default_rng(i).integers(0, len(x), batch)
      xb = jax.device_put(x[idx], data_sh)
      yb = jax.device_put(y[idx], data_sh)
      with jax.set_mesh(mesh):
        params, state, loss = jstep(params, state, xb, yb)
      losses.append(float(loss))
      bar.update()
    return params, state, np.array(losses)

  return jstep, run


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 7 s')
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
  print(
    f'mesh {dict(mesh.shape)}; {sum(p.size for p in jax.tree.leaves(params0)):,}'
    ' parameters'
  )

  results = {}
  more = max(steps // 3, 5)  # Steps after the checkpoint, on each mesh.
  bar = StepBar(
    2 * steps + 2 * more, 'co-sharded, ZeRO-1, then resumed on two meshes'
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
          jax.device_put(x[:batch], data_sh),
          jax.device_put(y[:batch], data_sh),
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
    print(
      f'{mode:>22}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; per '
      f'device: params {results[mode]["params_bytes"] / 1e3:.0f} kB, '
      f'optimizer state {state_bytes / 1e3:.0f} kB; collectives in the '
      f'step: {", ".join(collectives)}'
    )
  same = np.array_equal(
    results['ZeRO-1']['losses'], results['state follows params']['losses']
  )
  print(f'ZeRO-1 and co-sharded state give the same losses: {same}')

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
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'ckpt'
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path, {'params': z['params'], 'opt_state': z['state']})
      ckpt.wait_until_finished()
      restored = ckpt.restore(
        path, {'params': abstract_params, 'opt_state': abstract_state}
      )
  exact = all(
    np.array_equal(np.asarray(a), np.asarray(b))
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
  print(
    f'restored onto mesh {dict(new_mesh.shape)}: values exact {exact}, '
    f'placed on the new mesh {placed}; {more} more steps reach loss '
    f'{resumed[-1]:.4f} (on the old mesh {continued[-1]:.4f}; largest '
    f'difference {gap:.1e}, from the order of the gradient sums)'
  )

  plt = pyplot()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
  for mode, r in results.items():
    ax.plot(r['losses'], label=mode, ls='-' if mode == 'ZeRO-1' else ':')
  ax.plot(
    np.arange(steps, steps + more), resumed, label='ZeRO-1 restored on 2 x 4'
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
  return {
    'results': results,
    'same_losses': same,
    'restored_exact': exact,
    'restored_placed': placed,
    'resumed': resumed,
    'continued': continued,
  }


if __name__ == '__main__':
  main()
