"""A GRU on the adding problem: Graves (2013) RMSprop against plain RMSprop.

The adding problem (Hochreiter & Schmidhuber, 1997): a sequence of random
values in [0, 1], two of them marked (one in each half); the network must
output the sum of the two marked values, remembering the first across the
whole sequence. Predicting the mean, 1, scores a mean squared error of 1/6.

Recurrent networks are where RMSprop was first made to work: Graves (2013)
trained his LSTMs with centered RMSprop and momentum
(``rmsprop_jax.presets.graves2013``). Here it races plain RMSprop
(``rmsprop_jax.rmsprop``: decay 0.9, eps 1e-8) on a Flax Linen GRU. Each
optimizer gets the same learning-rate grid, the same initial parameters and
the same batches (fresh ones every step); every (learning rate, seed) pair
trains at once, as one ``jax.vmap`` of a ``lax.scan`` over the training
steps. The best learning rate of each is the one with the lowest median
loss over the last tenth of the steps.

    python examples/adding_gru.py [--quick] [--out DIR] [--seed N]
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax

from _common import StepBar, parse_args, pyplot, save_figure

BASELINE = 1 / 6  # MSE of always answering 1.
SOLVED = 0.01


class GRURegressor(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):  # x: (batch, time, 2)
    h = nn.RNN(nn.GRUCell(self.hidden))(x)
    return nn.Dense(1)(h[:, -1])[:, 0]


def adding_batch(key, batch, length):
  """Inputs (batch, length, 2): a value and a marker; targets (batch,)."""
  k1, k2, k3 = jax.random.split(key, 3)
  # Drawn flat and reshaped: the same numbers as a (batch, length) draw,
  # and XLA:CPU compiles the random bits of a flat array several times
  # faster once vmap adds the seed and step axes.
  values = jax.random.uniform(k1, (batch * length,)).reshape(batch, length)
  first = jax.random.randint(k2, (batch,), 0, length // 2)
  second = jax.random.randint(k3, (batch,), length // 2, length)
  marks = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
  return jnp.stack([values, marks], -1), jnp.sum(values * marks, 1)


@functools.cache
def make_runs(length, hidden, batch, steps):
  """``runs(seeds)``: each seed's initial GRU parameters and its ``steps``
  batches (inputs ``(seeds, steps, batch, length, 2)``, targets ``(seeds,
  steps, batch)``), made by one jitted program that every optimizer's
  trainer shares (the random draws and the initializers are the slowest
  part to compile)."""
  model = GRURegressor(hidden)

  def one(seed):
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_key, jnp.zeros((1, length, 2)))
    keys = jax.random.split(data_key, steps)
    return params, jax.vmap(lambda k: adding_batch(k, batch, length))(keys)

  return jax.jit(jax.vmap(one))


def make_trainer(make_tx, length, hidden, batch, steps, bar=None):
  """``train(lrs, seeds) -> losses[lr, seed, step]``: every (learning
  rate, seed) pair from the seed's parameters and batches
  (:func:`make_runs`), the optimizer ``make_tx(lr)``."""
  model = GRURegressor(hidden)

  def loss_fn(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)

  def train(lr, params, data):
    tx = make_tx(lr)

    def step(carry, inputs):
      i, (x, y) = inputs
      if bar is not None:
        bar.tick(i)
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    _, losses = jax.lax.scan(
      step, (params, tx.init(params)), (jnp.arange(steps), data)
    )
    return losses

  # All (learning rate, seed) pairs at once.
  run = jax.jit(jax.vmap(jax.vmap(train, (None, 0, 0)), (0, None, None)))
  runs = make_runs(length, hidden, batch, steps)
  return lambda lrs, seeds: run(lrs, *runs(seeds))


OPTIMIZERS = {
  'Graves 2013 (centered, momentum 0.9)': rmsprop_jax.presets.graves2013,
  'plain RMSprop (decay 0.9)': rmsprop_jax.rmsprop,
}


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 10 s')
  if args.quick:
    length, hidden, steps, grid, n_seeds = 10, 16, 200, [1e-3, 1e-2], 2
  else:
    length, hidden, steps, n_seeds = 30, 32, 3000, 3
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
  lrs = jnp.array(grid)
  seeds = args.seed + jnp.arange(n_seeds)
  tail = steps // 10
  results = {}
  bar = StepBar(
    len(OPTIMIZERS) * steps,
    f'{len(OPTIMIZERS)} optimizers x {lrs.size * n_seeds} runs',
  )
  for name, make_tx in OPTIMIZERS.items():
    losses = np.asarray(
      make_trainer(make_tx, length, hidden, 32, steps, bar)(lrs, seeds)
    )
    bar.end_run(steps)
    final = np.median(losses[:, :, -tail:].mean(-1), axis=1)
    best = int(np.nanargmin(np.where(np.isfinite(final), final, np.inf)))
    results[name] = dict(
      lrs=np.asarray(grid),
      losses=losses,
      best=best,
      final=losses[:, :, -tail:].mean(-1),
    )
  bar.close()

  print(
    f'\nAdding problem, length {length}, GRU {hidden}, batch 32, {steps} '
    f'steps, {n_seeds} seeds (baseline MSE {BASELINE:.3f})'
  )
  print(
    f'{"optimizer":<38} {"best lr":>8} {"final MSE (median)":>19} '
    f'{"first step with MSE<" + str(SOLVED):>25}'
  )
  summary = {}
  for name, r in results.items():
    curves = r['losses'][r['best']]
    window = max(steps // 100, 1)
    below = np.nonzero(_smooth(np.median(curves, 0), window) < SOLVED)[0]
    solved = int(below[0]) + window if below.size else None  # Window's end.
    summary[name] = (float(np.median(r['final'][r['best']])), solved)
    print(
      f'{name:<38} {r["lrs"][r["best"]]:>8.0e} {summary[name][0]:>19.4f} '
      f'{solved if solved is not None else "never":>25}'
    )
  (a, sa), (b, sb) = summary.values()
  names = list(summary)
  winner = names[0] if a < b else names[1]
  print(
    f'{winner} ends {max(a, b) / min(a, b):.2g}x lower at its best '
    'learning rate.'
  )

  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
  for name, r in results.items():
    curves = r['losses'][r['best']]
    window = max(steps // 100, 1)
    lo, mid, hi = (
      _smooth(np.quantile(curves, q, 0), window) for q in (0.0, 0.5, 1.0)
    )
    (line,) = axes[0].semilogy(mid, label=f'{name}, lr {r["lrs"][r["best"]]:g}')
    axes[0].fill_between(
      np.arange(mid.size), lo, hi, alpha=0.2, color=line.get_color()
    )
    axes[1].errorbar(
      r['lrs'],
      np.median(r['final'], 1),
      yerr=[
        np.median(r['final'], 1) - r['final'].min(1),
        r['final'].max(1) - np.median(r['final'], 1),
      ],
      marker='o',
      capsize=3,
      label=name,
      color=line.get_color(),
    )
  for ax in axes:
    ax.axhline(BASELINE, color='grey', ls=':', label='always answer 1')
    ax.grid(True, which='both', alpha=0.3)
    # Below the axes: inside, it covered the baseline.
    ax.legend(fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.16))
  axes[0].set(
    xlabel='training step',
    ylabel='MSE (moving average, log)',
    title=f'Adding problem, length {length}: best learning rate '
    f'of each\n(median of {n_seeds} seeds, band: min to max)',
  )
  axes[1].set(
    xscale='log',
    yscale='log',
    xlabel='learning rate',
    ylabel=f'MSE over the last {tail} steps',
    title='Sensitivity to the learning rate\n(median, min to max over seeds)',
  )
  save_figure(fig, args.out / 'adding_gru.png')
  return results


def _smooth(v, window):
  return np.convolve(v, np.ones(window) / window, mode='valid')


if __name__ == '__main__':
  main()
