"""Move a running PyTorch training into Flax NNX, optimizer state included.

A small CNN trains on scikit-learn's handwritten digits in PyTorch with
``torch.optim.RMSprop`` (alpha 0.99, a cosine learning-rate schedule). Half
way, its weights and its optimizer state (the second moment and the step
count; the tests move momentum buffers too) move into an equal Flax NNX
network trained with
``rmsprop_jax.presets.pytorch``, through ``rmsprop_jax.porting``, and
training continues in JAX. Three continuations are drawn: PyTorch
uninterrupted, JAX with the imported state (the curves overlap), and JAX
with the optimizer state reset to zero but the schedule kept: the first
steps after a reset are larger (up to ``1/sqrt(1 - alpha)`` = 10 times
per entry; about 7 times in norm on the first step here), so the losses
right after the move rise above PyTorch's; what follows is
another run, which may end higher or lower than PyTorch's, not a
continuation of it. Needs PyTorch (``pip install torch``).

    python examples/port_from_pytorch.py [--quick] [--out DIR] [--seed N]
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import rmsprop_jax
from rmsprop_jax import porting

from _common import StepBar, parse_args, pyplot, save_figure

BATCH = 32
LR, ALPHA = 1e-3, 0.99


class TorchCNN(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)  # 8x8
    self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)  # 4x4
    self.conv3 = torch.nn.Conv2d(32, 64, 4)  # 1x1
    self.fc = torch.nn.Linear(64, 10)

  def forward(self, x):  # x: (batch, 1, 8, 8), NCHW
    h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
    return self.fc(torch.relu(self.conv3(h)).flatten(1))


class FlaxCNN(nnx.Module):
  """The same network, with the same attribute names (NHWC inputs)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), padding=1, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, padding=1, rngs=rngs)
    self.conv3 = nnx.Conv(32, 64, (4, 4), padding='VALID', rngs=rngs)
    self.fc = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):  # x: (batch, 8, 8, 1)
    h = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    # 1x1 after conv3, so flattening needs no reordering between layouts.
    return self.fc(nnx.relu(self.conv3(h)).reshape(x.shape[0], -1))


def batches(n_train, epochs, seed):
  """The minibatch indices of every step, fixed in advance: both frameworks
  see the same data in the same order."""
  rng = np.random.default_rng(seed)
  return [
    idx
    for _ in range(epochs)
    for idx in np.array_split(rng.permutation(n_train), n_train // BATCH)
  ]


def train_torch(model, opt, x, y, steps, schedule, bar):
  losses = []
  for t, idx in steps:
    for group in opt.param_groups:
      group['lr'] = float(schedule(t))
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(
      model(torch.from_numpy(x[idx].transpose(0, 3, 1, 2))),
      torch.from_numpy(y[idx]),
    )
    loss.backward()
    opt.step()
    losses.append(loss.item())
    bar.update()
  return losses


@nnx.jit
def nnx_step(model, opt, xb, yb):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def train_nnx(model, opt, x, y, steps, bar):
  losses = []
  for _, idx in steps:
    losses.append(float(nnx_step(model, opt, x[idx], y[idx])))
    bar.update()
  return losses


def set_optimizer_state(opt: nnx.Optimizer, state, count: int) -> None:
  """Puts an optax state (as ``tx.init`` builds it) into an
  ``nnx.Optimizer``, whose variables hold the same tree."""
  variables = jax.tree.leaves(
    opt.opt_state, is_leaf=lambda v: isinstance(v, nnx.Variable)
  )
  for variable, value in zip(variables, jax.tree.leaves(state), strict=True):
    variable.set_value(value)
  opt.step.set_value(jnp.asarray(count, opt.step.get_value().dtype))


def main(argv=None):
  args = parse_args(__doc__, argv, quick='about 16 s')
  epochs = 2 if args.quick else 12
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  x_tr, x_te, y_tr, y_te = train_test_split(
    x, y, test_size=0.25, random_state=args.seed, stratify=y
  )
  order = list(enumerate(batches(len(x_tr), epochs, args.seed)))
  half = len(order) // 2
  schedule = optax.cosine_decay_schedule(LR, len(order), alpha=0.1)
  bar = StepBar(
    half + 3 * (len(order) - half),
    'PyTorch, then PyTorch and two JAX continuations',
  )

  # PyTorch, first half.
  torch.manual_seed(args.seed)
  net = TorchCNN()
  opt = torch.optim.RMSprop(net.parameters(), lr=LR, alpha=ALPHA)
  first = train_torch(net, opt, x_tr, y_tr, order[:half], schedule, bar)

  # Move the weights and the optimizer state into Flax NNX. The network is
  # built abstractly (shapes and dtypes, no random initialisation): every
  # weight comes from PyTorch.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: FlaxCNN(nnx.Rngs(0))))
  params = nnx.to_pure_dict(abstract)
  param_map = porting.torch_to_flax_map(net.named_parameters(), params)
  names = porting.torch_param_names(opt, net)
  params = porting.port_params(net.state_dict(), param_map, params)
  tx = rmsprop_jax.presets.pytorch(schedule, alpha=ALPHA)
  state = porting.import_torch_state(
    opt.state_dict(), names, param_map, tx, params
  )
  runs = {}
  for name, start in (
    ('imported', state),
    ('reset', optax.tree.set(tx.init(params), count=jnp.asarray(half))),
  ):
    weights = nnx.clone(abstract)
    nnx.replace_by_pure_dict(weights, params)
    model = nnx.merge(graphdef, weights)
    nnx_opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    set_optimizer_state(nnx_opt, start, half)
    runs[name] = (
      train_nnx(model, nnx_opt, x_tr, y_tr, order[half:], bar),
      model,
    )

  # PyTorch, second half, uninterrupted.
  rest = train_torch(net, opt, x_tr, y_tr, order[half:], schedule, bar)
  bar.close()

  with torch.no_grad():
    torch_acc = float(
      (
        net(torch.from_numpy(x_te.transpose(0, 3, 1, 2))).argmax(1).numpy()
        == y_te
      ).mean()
    )
  accuracy = {
    name: float((np.asarray(m(x_te)).argmax(1) == y_te).mean())
    for name, (_, m) in runs.items()
  }
  imported, reset = (np.asarray(runs[k][0]) for k in ('imported', 'reset'))
  rest = np.asarray(rest)
  gap = np.max(np.abs(imported - rest) / rest)
  window = slice(0, max(5, len(rest) // 20))
  jump = reset[window].mean() / rest[window].mean()
  print(
    f'\n{epochs} epochs of {len(order) // epochs} steps; moved to JAX '
    f'after step {half}'
  )
  print(f'{"continuation":<34} {"final loss":>10} {"test acc":>9}')
  print(f'{"PyTorch, uninterrupted":<34} {rest[-1]:>10.4f} {torch_acc:>9.3f}')
  print(
    f'{"JAX, imported optimizer state":<34} {imported[-1]:>10.4f} '
    f'{accuracy["imported"]:>9.3f}'
  )
  print(
    f'{"JAX, optimizer state reset":<34} {reset[-1]:>10.4f} '
    f'{accuracy["reset"]:>9.3f}'
  )
  print(
    f'With the imported state, every JAX loss is within {gap:.1e} '
    "(relative) of PyTorch's (float32 round-off); with the state reset, "
    f'the first {window.stop} losses after the move average {jump:.2g}x '
    f"PyTorch's, and the run ends {'lower' if reset[-1] < rest[-1] else 'higher'}"
    f' ({reset[-1]:.4f} against {rest[-1]:.4f}): another run, not a '
    'continuation.'
  )

  plt = pyplot()
  fig, axes = plt.subplots(
    1, 2, figsize=(13, 5.4), gridspec_kw=dict(width_ratios=(3, 2))
  )
  steps = np.arange(len(order))
  zoom = slice(max(half - 10, 0), min(half + 40, len(order)))
  for ax, shown in zip(axes, (slice(None), zoom)):
    before = steps[:half][shown.start : shown.stop]
    ax.plot(
      before,
      np.asarray(first)[shown.start : shown.stop],
      color='grey',
      lw=1,
      label='PyTorch, before the move',
    )
    after = slice(
      max((shown.start or 0) - half, 0),
      None if shown.stop is None else shown.stop - half,
    )
    ax.plot(
      steps[half:][after],
      rest[after],
      color='C0',
      lw=3,
      alpha=0.5,
      label=f'PyTorch, uninterrupted (test acc {torch_acc:.3f})',
    )
    ax.plot(
      steps[half:][after],
      imported[after],
      'k--',
      lw=1,
      label='JAX, imported optimizer state (test acc '
      f'{accuracy["imported"]:.3f})',
    )
    ax.plot(
      steps[half:][after],
      reset[after],
      color='C3',
      lw=1,
      label=f'JAX, optimizer state reset (test acc {accuracy["reset"]:.3f})',
    )
    ax.axvline(half - 0.5, color='grey', ls=':', label='moved to JAX')
    ax.set(
      yscale='log',
      xlabel='training step',
      ylabel='minibatch cross-entropy (log)',
    )
    ax.grid(True, which='both', alpha=0.3)
  # The runs fill the panel after the move: the key goes below it.
  axes[0].legend(
    fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2
  )
  axes[0].set_title('The whole run')
  axes[1].set_title(
    f'Around the move. Reset: the first {window.stop} '
    f"losses average {jump:.2g}x PyTorch's;\nimported: "
    f"within {gap:.0e} of PyTorch's (relative)"
  )
  axes[1].title.set_fontsize(10)
  fig.suptitle(
    'A PyTorch RMSprop run continued in Flax NNX '
    f'(moved after step {half} of {len(order)})'
  )
  save_figure(fig, args.out / 'port_from_pytorch.png')
  return dict(
    first=np.asarray(first),
    rest=rest,
    imported=imported,
    reset=reset,
    half=half,
    gap=float(gap),
    jump=float(jump),
    accuracy=dict(accuracy, pytorch=torch_acc),
  )


if __name__ == '__main__':
  main()
