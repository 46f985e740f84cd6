"""Flax Linen CNN on scikit-learn's digits, trained through ``TrainState``.

``flax.training.train_state.TrainState`` takes any optax transformation, so
an ``rmsprop_jax`` optimizer drops in as ``tx``; here centered RMSprop with
momentum, a warm-up cosine schedule and gradient clipping, all chained with
optax's own pieces. The same chain with ``optax.rmsprop`` gives bit-identical
losses (checked and printed). Each epoch logs a compact summary of the
effective learning rates (``rmsprop_jax.diagnostics.summarize``).

    python examples/digits_linen.py [--quick] [--out DIR]
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import rmsprop_jax

from _common import StepBar, parse_args, pyplot, save_figure

BATCH = 32
EPS = 1e-8


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):  # x: (batch, 8, 8, 1)
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def load(seed):
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def make_tx(rmsprop, schedule):
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    rmsprop(schedule, decay=0.9, eps=EPS, centered=True, momentum=0.9),
  )


def create_state(rmsprop, schedule, x, seed):
  """A fresh TrainState: the CNN initialised on ``x[:1]`` from ``seed``."""
  model = CNN()
  # Jitted: one program (eagerly, each layer's initializer compiles apart).
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), x[:1])['params']
  return train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=make_tx(rmsprop, schedule)
  )


@jax.jit
def train_step(state, x, y):
  def loss_fn(params):
    logits = state.apply_fn({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


@jax.jit
def accuracy(state, x, y):
  return jnp.mean(
    jnp.argmax(state.apply_fn({'params': state.params}, x), -1) == y
  )


@jax.jit
def lr_summary(opt_state, learning_rate):
  """Min, median and max effective learning rate of each leaf, as one
  compiled program (eagerly, each leaf's operations would compile apart)."""
  eff = rmsprop_jax.effective_learning_rate(
    opt_state, learning_rate, eps=EPS, eps_in_sqrt=True
  )
  return rmsprop_jax.diagnostics.summarize(eff)


def train(rmsprop, data, epochs, seed, bar, log=None):
  x_tr, x_te, y_tr, y_te = data
  steps_per_epoch = len(x_tr) // BATCH
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, 1e-3, steps_per_epoch, epochs * steps_per_epoch, end_value=1e-5
  )
  state = create_state(rmsprop, schedule, x_tr, seed)
  rng = np.random.default_rng(seed)
  history, eff_median = [], []
  for epoch in range(epochs):
    order = rng.permutation(len(x_tr))
    losses = []
    for idx in np.array_split(order, steps_per_epoch):
      state, loss = train_step(state, x_tr[idx], y_tr[idx])
      losses.append(float(loss))
      bar.update()
    history.append(np.mean(losses))
    if log is not None:
      summary = lr_summary(state.opt_state, schedule(state.step))
      eff_median.append({k: float(v['median']) for k, v in summary.items()})
      log(
        f'epoch {epoch + 1}: loss {history[-1]:.3g}; effective lr '
        f'median per layer: '
        + ', '.join(
          f'{k} {v:.3g}'
          for k, v in eff_median[-1].items()
          if k.endswith('kernel')
        )
      )
  return (
    np.asarray(history),
    float(accuracy(state, x_tr, y_tr)),
    float(accuracy(state, x_te, y_te)),
    eff_median,
  )


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 13 s')
  epochs = 2 if args.quick else 40
  data = load(args.seed)
  results = {}
  runs = [
    ('rmsprop_jax.rmsprop', rmsprop_jax.rmsprop),
    ('optax.rmsprop', optax.rmsprop),
  ]
  steps = epochs * (len(data[0]) // BATCH)
  with StepBar(len(runs) * steps, f'{len(runs)} optimizers') as bar:
    for name, rmsprop in runs:
      log = bar.write if name.startswith('rmsprop_jax') else None
      results[name] = train(rmsprop, data, epochs, args.seed, bar, log)

  ours, ref = results['rmsprop_jax.rmsprop'], results['optax.rmsprop']
  print(
    f'\nDigits CNN (Flax Linen, TrainState), {epochs} epochs; centered '
    'RMSprop, momentum 0.9, warm-up cosine lr, clipping at norm 1'
  )
  print(
    f'{"optimizer":<22} {"final loss":>10} {"train acc":>10} {"test acc":>10}'
  )
  for name, (hist, tr, te, _) in results.items():
    print(f'{name:<22} {hist[-1]:>10.3g} {tr:>10.3f} {te:>10.3f}')
  same = np.array_equal(ours[0], ref[0])
  print(f'rmsprop_jax and optax.rmsprop losses identical: {same}')

  plt = pyplot()
  from matplotlib.ticker import MaxNLocator

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  epochs_axis = np.arange(1, epochs + 1)
  for (name, (hist, _, te, _)), style in zip(results.items(), ['o-', 'x--']):
    axes[0].semilogy(
      epochs_axis, hist, style, ms=4, label=f'{name} (test acc {te:.3f})'
    )
  axes[0].set(
    xlabel='epoch',
    ylabel='training loss (log scale)',
    title='CNN on scikit-learn digits (Flax Linen TrainState)',
  )
  for layer in ours[3][0]:
    axes[1].semilogy(
      epochs_axis, [e[layer] for e in ours[3]], 'o-', ms=4, label=layer
    )
  axes[1].set(
    xlabel='epoch',
    ylabel='median effective learning rate (log)',
    title='Effective learning rate lr(t) / sqrt(variance + eps):\n'
    'median over each layer, at the end of each epoch',
  )
  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Whole epochs.
    ax.grid(True, which='both', alpha=0.3)
  axes[0].legend(fontsize=8)  # Above the curves' flat end.
  # Eight layers' lines fill the panel: their key goes beside it.
  axes[1].legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1))
  save_figure(fig, args.out / 'digits_linen.png')
  return results


if __name__ == '__main__':
  main()
