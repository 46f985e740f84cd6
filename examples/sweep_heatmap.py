"""A hyperparameter sweep as one jitted call: vmap over learning rate and decay.

Trains a softmax regression on scikit-learn's digits (full batch) with
``rmsprop_jax.rmsprop`` for every (learning rate, decay) pair of a grid at
once: the optimizer is built inside the vmapped function, so its
hyperparameters are traced values. Plots a heatmap of each run's mean
training loss over its last tenth of steps (a single final value is noisy
where the steps bounce), and marks the lowest.

    python examples/sweep_heatmap.py [--quick] [--out DIR]
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import rmsprop_jax

from _common import StepBar, parse_args, pyplot, save_figure


def sweep(lrs, decays, steps, x, y, bar=None):
  """(final loss, mean loss over the last tenth of the steps) per pair."""

  def loss_fn(p):
    logits = x @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train(lr, decay):
    tx = rmsprop_jax.rmsprop(lr, decay=decay)
    params = {'w': jnp.zeros((x.shape[1], 10)), 'b': jnp.zeros(10)}

    def step(carry, i):
      if bar is not None:
        bar.tick(i)
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(
      step, (params, tx.init(params)), jnp.arange(steps)
    )
    return loss_fn(params), losses[-max(1, steps // 10) :].mean()

  grid = jax.vmap(jax.vmap(train, in_axes=(None, 0)), in_axes=(0, None))
  return jax.jit(grid)(lrs, decays)


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 3 s', seed=False)
  steps = 20 if args.quick else 300
  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
  lrs = jnp.geomspace(1e-4, 1.0, 9)
  decays = jnp.array([0.0, 0.5, 0.9, 0.95, 0.99, 0.999])
  tail = max(1, steps // 10)
  with StepBar(steps, f'{lrs.size * decays.size} runs in one call') as bar:
    losses, tail_means = (
      np.asarray(a) for a in sweep(lrs, decays, steps, x, y, bar)
    )
    bar.end_run(steps)
  i, j = np.unravel_index(np.nanargmin(tail_means), tail_means.shape)
  print(f'\n{lrs.size} x {decays.size} grid, {steps} full-batch steps each')
  print(
    f'lowest mean loss over the last {tail} steps: learning rate '
    f'{float(lrs[i]):.3g}, decay {float(decays[j]):g}: '
    f'{tail_means[i, j]:.4f} (final {losses[i, j]:.4f})'
  )
  finite = tail_means[np.isfinite(tail_means)]
  print(
    f'worst finite: {finite.max():.4f}; '
    f'{np.size(tail_means) - finite.size} runs diverged'
  )

  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 5.5))
  im = ax.imshow(
    np.log10(tail_means), origin='lower', aspect='auto', cmap='viridis'
  )
  ax.set_xticks(range(decays.size), [f'{d:g}' for d in decays])
  ax.set_yticks(range(lrs.size), [f'{lr:.0e}' for lr in lrs])
  middle = np.nanmean(np.log10(tail_means))
  for (a, b), v in np.ndenumerate(tail_means):
    ax.text(
      b,
      a,
      f'{v:.2f}',
      ha='center',
      va='center',
      fontsize=7,
      color='white' if np.log10(v) < middle else 'k',
    )
  ax.plot(
    j,
    i,
    's',
    mfc='none',
    mec='red',
    ms=22,
    mew=2,
    ls='none',
    label=f'lowest (lr {float(lrs[i]):.0e}, decay {float(decays[j]):g})',
  )
  ax.legend(
    loc='upper center', bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False
  )
  ax.set(
    xlabel='decay (rho)',
    ylabel='learning rate',
    title=f'Mean training loss over steps {steps - tail + 1}-{steps} '
    f'of {steps}\n(softmax regression on the digits, full batch)',
  )
  fig.colorbar(im, label='log10 mean loss')
  save_figure(fig, args.out / 'sweep_heatmap.png')
  return lrs, decays, losses, tail_means


if __name__ == '__main__':
  main()
