"""Checkpoint and resume with Orbax: the resumed run is bit-identical.

Trains a logistic-regression classifier on scikit-learn's digits with
``presets.pytorch`` (centered, momentum, weight decay, a cosine schedule),
saves parameters and optimizer state half-way with Orbax, restores them into
a fresh process-like start, and continues. The resumed parameters equal those
of an uninterrupted run bit for bit.

    python examples/checkpoint_resume.py [--quick] [--out DIR]
"""

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits

import rmsprop_jax

from _common import StepBar, parse_args, pyplot, save_figure


def setup(steps):
  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jnp.asarray(y)
  params = {'w': jnp.zeros((64, 10)), 'b': jnp.zeros(10)}
  tx = rmsprop_jax.presets.pytorch(
    lr=optax.cosine_decay_schedule(0.01, steps),
    alpha=0.9,
    momentum=0.9,
    centered=True,
    weight_decay=1e-4,
  )

  def loss_fn(p):
    logits = x @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return params, tx, step


def train(params, state, step, n, bar):
  losses = []
  for _ in range(n):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    bar.update()
  return params, state, losses


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 4 s', seed=False)
  steps = 40 if args.quick else 400
  half = steps // 2
  params0, tx, step = setup(steps)

  # Uninterrupted.
  bar = StepBar(2 * steps, 'uninterrupted, then saved and resumed')
  full_params, _, full_losses = train(
    params0, tx.init(params0), step, steps, bar
  )

  # Interrupted: save half-way, restore into fresh arrays, continue.
  params, state, first = train(params0, tx.init(params0), step, half, bar)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'checkpoint'
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path, {'params': params, 'opt_state': state})
      ckpt.wait_until_finished()
      # The target tree tells Orbax the structure, shapes and dtypes.
      target = jax.eval_shape(
        lambda: {'params': params0, 'opt_state': tx.init(params0)}
      )
      restored = ckpt.restore(path, target)
  params, state, second = train(
    restored['params'], restored['opt_state'], step, steps - half, bar
  )
  resumed_losses = first + second
  bar.close()

  identical = all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(params))
  )
  print(
    f'\n{steps} steps, checkpoint after {half}: final loss '
    f'{full_losses[-1]:.6f} (uninterrupted), {resumed_losses[-1]:.6f} '
    f'(resumed)'
  )
  print(
    f'resumed parameters bit-identical to the uninterrupted run: {identical}'
  )

  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.semilogy(full_losses, lw=3, alpha=0.5, label='uninterrupted')
  ax.semilogy(resumed_losses, 'k--', lw=1, label='saved and resumed')
  ax.axvline(half, color='grey', ls=':', label='checkpoint')
  ax.set(
    xlabel='step',
    ylabel='training loss (log scale)',
    title='Orbax checkpoint of rmsprop_jax state: the resumed run '
    + ('coincides' if identical else 'differs'),
  )
  ax.legend()
  save_figure(fig, args.out / 'checkpoint_resume.png')
  return identical, full_params, params


if __name__ == '__main__':
  main()
