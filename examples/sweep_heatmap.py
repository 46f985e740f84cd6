"""A hyperparameter sweep as one jitted call: vmap over learning rate and decay.

Trains a softmax regression on scikit-learn's digits (full batch) with
``rmsprop_jax.rmsprop`` for every (learning rate, decay) pair of a grid at
once: the optimizer is built inside the vmapped function, so its
hyperparameters are traced values. Plots a heatmap of the final losses.

    python examples/sweep_heatmap.py [--quick] [--out DIR]
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import rmsprop_jax
from _common import parse_args, pyplot, save_figure


def final_losses(lrs, decays, steps, x, y):
  def loss_fn(p):
    logits = x @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train(lr, decay):
    tx = rmsprop_jax.rmsprop(lr, decay=decay)
    params = {'w': jnp.zeros((x.shape[1], 10)), 'b': jnp.zeros(10)}

    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)),
                                  length=steps)
    return loss_fn(params)

  grid = jax.vmap(jax.vmap(train, in_axes=(None, 0)), in_axes=(0, None))
  return jax.jit(grid)(lrs, decays)


def main(argv=None):
  args = parse_args(__doc__.splitlines()[0], argv)
  steps = 20 if args.quick else 300
  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
  lrs = jnp.geomspace(1e-4, 1.0, 9)
  decays = jnp.array([0.0, 0.5, 0.9, 0.95, 0.99, 0.999])
  with tqdm(total=1, desc=f'{lrs.size * decays.size} runs in one call') as bar:
    losses = np.asarray(final_losses(lrs, decays, steps, x, y))
    bar.update()
  i, j = np.unravel_index(np.nanargmin(losses), losses.shape)
  print(f'\n{lrs.size} x {decays.size} grid, {steps} full-batch steps each')
  print(f'best: learning rate {float(lrs[i]):.3g}, decay '
        f'{float(decays[j]):g}, final loss {losses[i, j]:.4f}')
  print(f'worst finite: {np.nanmax(np.where(np.isfinite(losses), losses, np.nan)):.4f}')

  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 5.5))
  im = ax.imshow(np.log10(losses), origin='lower', aspect='auto',
                 cmap='viridis')
  ax.set_xticks(range(decays.size), [f'{d:g}' for d in decays])
  ax.set_yticks(range(lrs.size), [f'{l:.0e}' for l in lrs])
  for (a, b), v in np.ndenumerate(losses):
    ax.text(b, a, f'{v:.2f}', ha='center', va='center', fontsize=7,
            color='white' if np.log10(v) < np.log10(losses).mean() else 'k')
  ax.plot(j, i, 's', mfc='none', mec='red', ms=22, mew=2)
  ax.set(xlabel='decay (rho)', ylabel='learning rate',
         title=f'Final training loss after {steps} steps (digits softmax '
               f'regression)')
  fig.colorbar(im, label='log10 final loss')
  save_figure(fig, args.out / 'sweep_heatmap.png')
  return lrs, decays, losses


if __name__ == '__main__':
  main()
