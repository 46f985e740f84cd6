"""Online learning on a target that jumps: RMSprop against AdaGrad.

A linear regression whose true weights jump to new values every 1,000
steps, seen one noisy sample per step. AdaGrad divides by the sum of all past
squared gradients, so its effective learning rate decays like 1/sqrt(t);
RMSprop's moving average forgets, and keeps its step size. Whether that
decay hurts depends on how long the stream runs past the point where the
learning rate was chosen: the printed comparison is computed, not assumed. Each optimizer's
learning rate is the best of a small grid on the first tenth of the stream
(all grid points run at once under ``jax.vmap``).

    python examples/online_drift.py [--quick] [--out DIR]
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import rmsprop_jax
from _common import parse_args, pyplot

DIM = 10
GRID = jnp.array([0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0])


def stream(steps, seed, regimes):
  """Inputs, targets and the true weights, which jump every steps/regimes."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  weights = 2.0 * jax.random.normal(k1, (regimes, DIM))
  w_true = jnp.repeat(weights, -(-steps // regimes), axis=0)[:steps]
  x = jax.random.normal(k2, (steps, DIM))
  y = jnp.sum(x * w_true, 1) + 0.1 * jax.random.normal(k3, (steps,))
  return x, y, w_true


def make_run(make_tx, eff_lr):
  def run(lr, x, y, w_true):
    tx = make_tx(lr)
    w0 = jnp.zeros(DIM)

    def step(carry, inputs):
      w, state = carry
      xi, yi, wi = inputs
      g = jax.grad(lambda w: 0.5 * (xi @ w - yi) ** 2)(w)
      u, state = tx.update(g, state, w)
      w = optax.apply_updates(w, u)
      return (w, state), (jnp.linalg.norm(w - wi), jnp.median(eff_lr(state, lr)))

    _, (err, eff) = jax.lax.scan(step, (w0, tx.init(w0)), (x, y, w_true))
    return err, eff
  return jax.jit(jax.vmap(run, in_axes=(0, None, None, None)))


OPTIMIZERS = {
    'RMSprop (decay 0.99)': (
        lambda lr: rmsprop_jax.rmsprop(lr, decay=0.99, eps=1e-8),
        lambda s, lr: rmsprop_jax.effective_learning_rate(s, lr, eps=1e-8)),
    'AdaGrad': (
        lambda lr: optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-8),
        lambda s, lr: lr * jax.lax.rsqrt(s[0].sum_of_squares + 1e-8)),
}


def main(argv=None):
  args = parse_args(__doc__.splitlines()[0], argv)
  steps = 5000 if args.quick else 100000
  regime = 1000
  x, y, w_true = stream(steps, args.seed, steps // regime)
  tune = steps // 10
  results = {}
  for name, (make_tx, eff) in tqdm(OPTIMIZERS.items(), desc='optimizers'):
    errs, effs = make_run(make_tx, eff)(GRID, x, y, w_true)
    best = int(jnp.argmin(errs[:, :tune].mean(1)))
    results[name] = (float(GRID[best]), np.asarray(errs[best]),
                     np.asarray(effs[best]))

  after = slice(tune, None)
  print(f'\nTracking weights that jump every {regime} steps, {steps} online steps')
  print(f"{'optimizer':<22} {'tuned lr':>9} {'error, first 10%':>17} "
        f"{'error, after':>13} {'eff. lr at end':>15}")
  for name, (lr, err, eff) in results.items():
    print(f'{name:<22} {lr:>9.3g} {err[:tune].mean():>17.3f} '
          f'{err[after].mean():>13.3f} {eff[-1]:>15.3g}')
  rms, ada = results['RMSprop (decay 0.99)'], results['AdaGrad']
  ratio = ada[1][after].mean() / rms[1][after].mean()
  print(f"After the tuning period AdaGrad's mean error is {ratio:.2g}x "
        f"RMSprop's; AdaGrad's effective learning rate fell "
        f'{ada[2][tune] / ada[2][-1]:.2g}-fold over that period, '
        f"RMSprop's changed {rms[2][-1] / rms[2][tune]:.2g}-fold.")

  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  window = max(steps // 200, 1)
  smooth = lambda v: np.convolve(v, np.ones(window) / window, mode='valid')
  for name, (lr, err, eff) in results.items():
    axes[0].plot(smooth(err), label=f'{name}, lr {lr:g}')
    axes[1].semilogy(eff, label=name)
  axes[0].axvspan(0, tune, color='grey', alpha=0.15, label='lr tuned here')
  axes[0].set(xlabel='step', ylabel='|w - w_true| (moving average)',
              title='Distance to the true weights (they jump every 1,000 steps)')
  axes[1].set(xlabel='step', ylabel='median effective learning rate (log)',
              title='Effective learning rate: lr / sqrt(accumulated g²)')
  for ax in axes:
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = args.out / 'online_drift.png'
  fig.savefig(path, dpi=110)
  print(f'wrote {path}')
  return results


if __name__ == '__main__':
  main()
