"""Online learning on a drifting target: RMSprop against AdaGrad.

A linear regression seen one noisy sample per step, whose true weights jump
to new values every 1,000 steps. In the second scenario the inputs' scale
also changes at every jump (log-uniform over a factor of 100), as when a
sensor or a feature's units change. AdaGrad divides by the sum of all past
squared gradients, so its effective learning rate only falls (like
1/sqrt(t)) and, after a stretch of large gradients, stays too small for the
small ones that follow; RMSprop's moving average forgets within about
1/(1 - decay) steps and rescales itself both ways.

Each optimizer's learning rate is the best of a grid on the first tenth of
the stream (all grid points run at once under ``jax.vmap``); the table also
shows the best error any grid point reached on the rest of the stream, so
no choice of learning rate is hidden. The comparison is computed, not
assumed.

    python examples/online_drift.py [--quick] [--out DIR]
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax

from _common import StepBar, parse_args, pyplot, save_figure

DIM = 10
REGIME = 1000
GRID = jnp.array(
  [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
)


def stream(steps, seed, scale_changes):
  """Inputs, targets and true weights; both jump every REGIME steps."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  regimes = -(-steps // REGIME)
  weights = 2.0 * jax.random.normal(k1, (regimes, DIM))
  scales = jnp.where(
    scale_changes,
    10.0 ** jax.random.uniform(k4, (regimes,), minval=-1.5, maxval=0.5),
    1.0,
  )
  w_true = jnp.repeat(weights, REGIME, axis=0)[:steps]
  scale = jnp.repeat(scales, REGIME)[:steps]
  x = jax.random.normal(k2, (steps, DIM)) * scale[:, None]
  y = jnp.sum(x * w_true, 1) + 0.1 * scale * jax.random.normal(k3, (steps,))
  return x, y, w_true


def make_run(make_tx, eff_lr, bar=None):
  def run(lr, x, y, w_true):
    tx = make_tx(lr)
    w0 = jnp.zeros(DIM)

    def step(carry, inputs):
      w, state = carry
      i, xi, yi, wi = inputs
      if bar is not None:
        bar.tick(i)
      g = jax.grad(lambda w: 0.5 * (xi @ w - yi) ** 2)(w)
      u, state = tx.update(g, state, w)
      w = optax.apply_updates(w, u)
      return (w, state), (
        jnp.linalg.norm(w - wi),
        jnp.median(eff_lr(state, lr)),
      )

    _, (err, eff) = jax.lax.scan(
      step, (w0, tx.init(w0)), (jnp.arange(y.size), x, y, w_true)
    )
    return err, eff

  return jax.jit(jax.vmap(run, in_axes=(0, None, None, None)))


OPTIMIZERS = {
  'RMSprop (decay 0.99)': (
    lambda lr: rmsprop_jax.rmsprop(lr, decay=0.99, eps=1e-8),
    lambda s, lr: rmsprop_jax.effective_learning_rate(
      s, lr, eps=1e-8, eps_in_sqrt=True
    ),
  ),
  'AdaGrad': (
    lambda lr: optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-8),
    lambda s, lr: lr * jax.lax.rsqrt(s[0].sum_of_squares + 1e-8),
  ),
}
SCENARIOS = {'weights jump': False, 'weights and input scale jump': True}


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 4 s')
  steps = 5000 if args.quick else 100000
  tune = steps // 10
  bar = StepBar(
    len(SCENARIOS) * len(OPTIMIZERS) * steps,
    f'{len(SCENARIOS) * len(OPTIMIZERS)} streams x {GRID.size} learning rates',
  )
  runners = {name: make_run(*fns, bar) for name, fns in OPTIMIZERS.items()}
  results = {}
  for scenario, scale_changes in SCENARIOS.items():
    x, y, w_true = stream(steps, args.seed, scale_changes)
    for name, run in runners.items():
      errs, effs = run(GRID, x, y, w_true)
      errs.block_until_ready()
      bar.end_run(steps)
      best = int(jnp.argmin(errs[:, :tune].mean(1)))
      hindsight = float(errs[:, tune:].mean(1).min())
      results[scenario, name] = (
        float(GRID[best]),
        np.asarray(errs[best]),
        np.asarray(effs[best]),
        hindsight,
      )
  bar.close()

  print(
    f'\n{steps} online steps; the true weights jump every {REGIME} steps;'
    f' lr tuned on the first {tune}'
  )
  print(
    'mean distance to the true weights after the tuning stretch, at the '
    'tuned lr and at the best lr of the grid in hindsight:'
  )
  print(
    f'{"scenario":<30} {"optimizer":<22} {"tuned lr":>9} '
    f'{"tuned":>12} {"hindsight":>21}'
  )
  for (scenario, name), (lr, err, _, hindsight) in results.items():
    print(
      f'{scenario:<30} {name:<22} {lr:>9.3g} {err[tune:].mean():>12.3f} '
      f'{hindsight:>21.3f}'
    )
  for scenario in SCENARIOS:
    rms = results[scenario, 'RMSprop (decay 0.99)']
    ada = results[scenario, 'AdaGrad']
    ratio = ada[1][tune:].mean() / rms[1][tune:].mean()
    hindsight = ada[3] / rms[3]
    # A mean over the whole stream can hide who is closer when: count the
    # regimes (stretches between jumps) each one tracks better.
    regimes = lambda err: (
      err[: steps // REGIME * REGIME].reshape(-1, REGIME).mean(1)
    )
    wins = int(np.sum(regimes(rms[1]) < regimes(ada[1])))
    print(
      f"{scenario}: after tuning, AdaGrad's mean distance to the true "
      f"weights is {ratio:.2g}x RMSprop's; RMSprop is closer in {wins} of "
      f'{steps // REGIME} stretches between jumps, AdaGrad in the other '
      f"{steps // REGIME - wins}. With each one's best learning rate in "
      f"hindsight, AdaGrad's mean is {hindsight:.2g}x RMSprop's. "
      f"AdaGrad's effective lr fell {ada[2][tune] / ada[2][-1]:.2g}-fold "
      'after tuning.'
    )

  plt = pyplot()
  scenario = 'weights and input scale jump'
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
  window = max(steps // 200, 1)
  smooth = lambda v: np.convolve(v, np.ones(window) / window, mode='valid')
  for name in OPTIMIZERS:
    lr, err, eff, _ = results[scenario, name]
    axes[0].semilogy(smooth(err), label=f'{name}, lr {lr:g}')
    axes[1].semilogy(eff, label=name)
  axes[0].axvspan(0, tune, color='grey', alpha=0.15, label='lr tuned here')
  axes[0].set(
    xlabel='step',
    ylabel='|w - w_true| (moving average, log)',
    title=f'Distance to the true weights ({scenario}\nevery {REGIME:,} steps)',
  )
  axes[1].set(
    xlabel='step',
    ylabel='median effective learning rate (log)',
    title='Effective learning rate lr / sqrt(v): v the moving '
    'average\n(RMSprop) or the sum (AdaGrad) of g². RMSprop '
    'follows\nthe input scale, AdaGrad only falls',
  )
  for ax in axes:
    ax.grid(True, which='both', alpha=0.3)
    # The curves fill the panels: the keys go below them.
    handles = ax.get_legend_handles_labels()[0]
    ax.legend(
      loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=len(handles)
    )
  save_figure(fig, args.out / 'online_drift.png')
  return results


if __name__ == '__main__':
  main()
