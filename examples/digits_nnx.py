"""Flax NNX MLP on scikit-learn's handwritten digits, with rmsprop_jax.

Compares ``rmsprop_jax.rmsprop`` with ``optax.rmsprop`` (the same numbers:
the curves coincide) and ``optax.adam``. The data (1,797 8x8 images) ship
inside scikit-learn; nothing is downloaded.

    python examples/digits_nnx.py [--quick] [--out DIR]
"""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import rmsprop_jax

from _common import StepBar, parse_args, pyplot, save_figure


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def load(seed):
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def train(tx, data, epochs, batch, seed, bar):
  x_tr, x_te, y_tr, y_te = data
  model = MLP(nnx.Rngs(seed))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @nnx.jit
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss

  @nnx.jit
  def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)

  rng = np.random.default_rng(seed)
  history = []
  for _ in range(epochs):
    order = rng.permutation(len(x_tr))
    losses = []
    for i in np.array_split(order, len(order) // batch):
      losses.append(float(step(model, opt, x_tr[i], y_tr[i])))
      bar.update()
    history.append(np.mean(losses))
  return (
    np.asarray(history),
    float(accuracy(model, x_tr, y_tr)),
    float(accuracy(model, x_te, y_te)),
  )


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 7 s')
  epochs = 3 if args.quick else 60
  data = load(args.seed)
  optimizers = {
    'rmsprop_jax.rmsprop(1e-3)': rmsprop_jax.rmsprop(1e-3),
    'optax.rmsprop(1e-3)': optax.rmsprop(1e-3),
    'optax.adam(1e-3)': optax.adam(1e-3),
  }
  results = {}
  steps = epochs * (len(data[0]) // 32)
  with StepBar(len(optimizers) * steps, f'{len(optimizers)} optimizers') as bar:
    for name, tx in optimizers.items():
      results[name] = train(tx, data, epochs, 32, args.seed, bar)

  print(
    f'\nDigits MLP, {epochs} epochs, batch 32 '
    f'({len(data[0])} train / {len(data[1])} test images)'
  )
  print(
    f'{"optimizer":<28} {"final loss":>10} {"train acc":>10} {"test acc":>10}'
  )
  for name, (hist, tr, te) in results.items():
    print(f'{name:<28} {hist[-1]:>10.4f} {tr:>10.3f} {te:>10.3f}')
  same = np.array_equal(
    results['rmsprop_jax.rmsprop(1e-3)'][0], results['optax.rmsprop(1e-3)'][0]
  )
  print(f'rmsprop_jax and optax.rmsprop losses identical: {same}')

  plt = pyplot()
  from matplotlib.ticker import MaxNLocator

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (name, (hist, _, te)), style in zip(results.items(), ['o-', 'x--', 's-']):
    ax.semilogy(
      np.arange(1, epochs + 1),
      hist,
      style,
      ms=4,
      label=f'{name} (test acc {te:.3f})',
    )
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Whole epochs.
  ax.set(
    xlabel='epoch',
    ylabel='training loss (log scale)',
    title='MLP on scikit-learn digits (Flax NNX)',
  )
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  save_figure(fig, args.out / 'digits_nnx.png')
  return results


if __name__ == '__main__':
  main()
