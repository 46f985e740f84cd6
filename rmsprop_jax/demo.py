"""The three classic RMSprop demos and one on conventions, with figures.

1. RMSprop minimising ``x**2 + y**2`` from (10, 10).
2. RMSprop against SGD on the ill-conditioned ``100 x**2 + y**2``.
3. RMSprop against AdaGrad over a long run, with both effective learning
   rates.
4. One set of hyperparameters under the PyTorch, Keras, TF1 and optax
   conventions (:mod:`rmsprop_jax.presets`) on the ravine of demo 2.

``python -m rmsprop_jax demo [--out DIR]`` prints each demo's table, a
one-line conclusion per demo computed from the runs, and writes four PNG
figures to ``DIR``.
"""

from __future__ import annotations

import pathlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import diagnostics, presets
from rmsprop_jax.alias import rmsprop


class Run(NamedTuple):
  params: np.ndarray  # (steps + 1, dim): the start, then after each step.
  loss: np.ndarray  # (steps + 1,)
  extra: np.ndarray  # (steps,): a per-step diagnostic (or zeros).


def run(
  tx: optax.GradientTransformation,
  loss_fn: Callable,
  x0,
  steps: int,
  diagnostic: Callable | None = None,
) -> Run:
  """Runs ``steps`` full-gradient steps of ``tx`` in one jitted ``lax.scan``.

  ``diagnostic(state)`` is evaluated on the state *before* each update, as
  the classic Demo 3 does for the effective learning rate.
  """
  x0 = jnp.asarray(x0, jnp.float32)

  @jax.jit
  def go(x0):
    def step(carry, _):
      x, state = carry
      extra = diagnostic(state) if diagnostic else jnp.zeros(())
      updates, state = tx.update(jax.grad(loss_fn)(x), state, x)
      x = optax.apply_updates(x, updates)
      return (x, state), (x, extra)

    _, (xs, extras) = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
    xs = jnp.concatenate([x0[None], xs])
    return xs, jax.vmap(loss_fn)(xs), extras

  xs, losses, extras = go(x0)
  return Run(np.asarray(xs), np.asarray(losses), np.asarray(extras))


def _first_steps(r: Run, steps: int) -> Run:
  """The first ``steps`` steps of a longer run."""
  return Run(r.params[: steps + 1], r.loss[: steps + 1], r.extra[:steps])


def bowl(x):
  return x[0] ** 2 + x[1] ** 2


def ravine(x):
  return 100 * x[0] ** 2 + x[1] ** 2


def parabola(x):
  return x[0] ** 2


ROW_NOTE = (
  "(Each row: the values after that iteration's update, iterations "
  'counted from 0, as the classic demos print them.)'
)


def _rule(width=60):
  print('=' * width)


def demo1() -> Run:
  _rule()
  print('RMSprop Optimizer Demo')
  _rule()
  print('Minimizing f(x, y) = x² + y²\n')
  r = run(
    presets.hinton2012(learning_rate=0.1, decay=0.9), bowl, [10.0, 10.0], 50
  )
  print(ROW_NOTE)
  print(f'{"Iteration":<12} {"x":<12} {"y":<12} {"f(x,y)":<12}')
  print('-' * 60)
  for i in range(0, 50, 10):
    x, y = r.params[i + 1]
    print(f'{i:<12} {x:<12.6f} {y:<12.6f} {r.loss[i + 1]:<12.6f}')
  x, y = r.params[-1]
  print(f'\nFinal: x = {x:.8f}, y = {y:.8f}')
  # Steps of the normalised update are about lr, whatever the gradient's size.
  steps = np.abs(np.diff(r.params[:, 0]))
  settled = steps[10:]  # Once v has filled up from 0.
  grad = 2 * np.abs(r.params[:, 0])  # df/dx
  print(
    f'Conclusion: f fell from {r.loss[0]:.0f} to {r.loss[-1]:.4g} in 50 '
    f'steps. The first steps are larger while v fills up from 0 (the '
    f'first moves x by {steps[0]:.3f} = lr / sqrt(1 - decay)); from '
    f'step 10 on each moves x by {settled.min():.3f} to '
    f'{settled.max():.3f}, about lr = 0.1, while the gradient falls from '
    f'{grad[10]:.3g} to {grad[-1]:.3g}: RMSprop sets the step size by '
    "lr, not by the gradient's size.\n"
  )
  return r


# Demo 2's rates: RMSprop's and the classic demo's SGD, and SGD's just under
# and just over its stability bound 2 / 200 (the steep x's curvature is 200).
DEMO2_LR_RMSPROP, DEMO2_LR_SGD = 0.1, 0.001
DEMO2_LR_SGD_TUNED, DEMO2_LR_SGD_UNSTABLE = 0.009, 0.0101


def demo2() -> tuple[Run, Run, Run]:
  """RMSprop against SGD on the ravine: (RMSprop, SGD at the classic demo's
  rate, SGD just under its stability bound), their first 100 steps."""
  _rule()
  print('RMSprop vs SGD on Ill-Conditioned Problem')
  _rule()
  print('Minimizing f(x, y) = 100x² + y²\n')
  # One long run each: the classic table shows its first 100 steps, and the
  # rest tells how long each optimizer needs to get below f = 1.
  x0, steps, horizon = [10.0, 10.0], 100, 5000
  longs = {
    'RMSprop': run(
      presets.hinton2012(learning_rate=DEMO2_LR_RMSPROP), ravine, x0, horizon
    ),
    'SGD': run(optax.sgd(DEMO2_LR_SGD), ravine, x0, horizon),
    'tuned SGD': run(optax.sgd(DEMO2_LR_SGD_TUNED), ravine, x0, horizon),
  }
  unstable = run(optax.sgd(DEMO2_LR_SGD_UNSTABLE), ravine, x0, steps)
  rms, sgd, tuned = (_first_steps(r, steps) for r in longs.values())
  print(ROW_NOTE)
  columns = (
    f'RMSprop (lr {DEMO2_LR_RMSPROP:g}) f(x,y)',
    f'SGD (lr {DEMO2_LR_SGD:g}) f(x,y)',
  )
  print(f'{"Iteration":<12} {columns[0]:<26} {columns[1]:<26}')
  print('-' * 64)
  for i in range(0, steps, 20):
    print(f'{i:<12} {rms.loss[i + 1]:<26.6f} {sgd.loss[i + 1]:<26.6f}')
  print()
  when = {
    name: (
      f'{int(np.argmax(r.loss < 1.0))} steps'
      if (r.loss < 1.0).any()
      else f'more than {horizon} steps'
    )
    for name, r in longs.items()
  }
  first = int(np.argmax(longs['RMSprop'].loss < 1.0))
  after = longs['RMSprop'].loss[first:]
  bounce, bounce_step = float(after.max()), first + int(after.argmax())
  final = float(longs['RMSprop'].loss[-1])
  print(
    f'Conclusion: reaching f < 1 takes RMSprop (lr {DEMO2_LR_RMSPROP}) '
    f"{when['RMSprop']} and SGD at the classic demo's lr {DEMO2_LR_SGD} "
    f"{when['SGD']}. That SGD rate is ten times under SGD's limit: the "
    'steep x (curvature 200) makes any lr above 2/200 = 0.01 diverge (at '
    f'lr {DEMO2_LR_SGD_UNSTABLE}, f grows from {unstable.loss[0]:.0f} to '
    f'{unstable.loss[-1]:.4g} in {steps} steps), and at 0.001 the shallow y '
    f'crawls ({x0[1]:.0f} -> {sgd.params[-1, 1]:.3g} in {steps} steps). '
    f'Just under the limit, at lr {DEMO2_LR_SGD_TUNED}, SGD takes '
    f'{when["tuned SGD"]}, about as many as RMSprop: on this ravine, '
    'gradient descent with its rate tuned to the steepest direction is as '
    'fast, and it keeps converging (f = '
    f'{longs["tuned SGD"].loss[-1]:.2g} after {horizon} steps). RMSprop '
    "divides each coordinate's step by that coordinate's own gradient "
    'scale, so its lr is a step size whatever the curvature: one rate '
    'suits both coordinates, but the steps stay about lr long, and at lr '
    f'{DEMO2_LR_RMSPROP} it goes on bouncing around the minimum (f back up '
    f'to {bounce:.2g} at step {bounce_step}, {final:.2g} after {horizon} '
    'steps).\n'
  )
  return rms, sgd, tuned


def demo3() -> tuple[Run, Run]:
  _rule(70)
  print('RMSprop vs AdaGrad: Long Training Comparison')
  _rule(70)
  steps, lr_rms, lr_ada, eps = 200, 0.5, 1.0, 1e-8
  rms = run(
    presets.hinton2012(learning_rate=lr_rms, decay=0.9, eps=eps),
    parabola,
    [10.0],
    steps,
    diagnostic=lambda s: diagnostics.effective_learning_rate(
      s, lr_rms, eps=eps, eps_in_sqrt=False
    )[0],
  )
  ada_eps = 1e-7  # optax.adagrad's default, inside the square root.
  ada = run(
    optax.adagrad(lr_ada, initial_accumulator_value=0.0, eps=ada_eps),
    parabola,
    [10.0],
    steps,
    diagnostic=lambda s: (
      lr_ada
      * jnp.where(
        s[0].sum_of_squares[0] > 0,
        jax.lax.rsqrt(s[0].sum_of_squares[0] + ada_eps),
        1.0,
      )
    ),
  )
  # Row i shows x after step i + 1 and the effective rates that step's
  # gradient left behind (before any gradient, RMSprop's v is 0 and its
  # "effective rate" lr / eps means nothing, so it is never shown).
  print(ROW_NOTE)
  print(
    f'{"Iter":<8} {"RMSprop x":<15} {"AdaGrad x":<15} {"RMS eff_lr":<15} '
    f'{"Ada eff_lr":<15}'
  )
  print('-' * 70)
  for i in range(0, steps, 40):
    print(
      f'{i:<8} {rms.params[i + 1, 0]:<15.8f} {ada.params[i + 1, 0]:<15.8f} '
      f'{rms.extra[i + 1]:<15.10f} {ada.extra[i + 1]:<15.10f}'
    )
  print()
  first, last = 1, steps - 1  # Effective rates once a gradient was seen.
  closer = (
    'AdaGrad'
    if abs(ada.params[-1, 0]) < abs(rms.params[-1, 0])
    else ('RMSprop')
  )
  print(
    f"Conclusion: AdaGrad's effective learning rate went from "
    f'{ada.extra[first]:.3g} to {ada.extra[last]:.3g} and can only fall '
    f"(it divides by the sum of all past g²); RMSprop's went from "
    f'{rms.extra[first]:.3g} to {rms.extra[last]:.3g}, set by the last ~10 '
    f'gradients, so it can still take large steps. At step {steps} '
    f'|x| = {abs(rms.params[-1, 0]):.3g} (RMSprop) and '
    f'{abs(ada.params[-1, 0]):.3g} (AdaGrad): {closer} is closer on this '
    f'fixed parabola{", where RMSprop keeps bouncing around the minimum" if closer == "AdaGrad" else ""}.\n'
  )
  return rms, ada


# Demo 4: the same numbers, four frameworks' arithmetic.
CONVENTIONS_STEPS = 200
CONVENTIONS_LR = optax.cosine_decay_schedule(0.05, CONVENTIONS_STEPS, alpha=0.1)


def conventions() -> dict[str, optax.GradientTransformation]:
  """Decay 0.9, momentum 0.9, eps 1e-8, a cosine learning rate from 0.05 to
  0.005: each framework's RMSprop with these numbers."""
  lr = CONVENTIONS_LR
  return {
    'PyTorch': presets.pytorch(lr, alpha=0.9, eps=1e-8, momentum=0.9),
    'Keras': presets.keras(lr, rho=0.9, momentum=0.9, epsilon=1e-8),
    'TF1': presets.tf1(lr, decay=0.9, momentum=0.9, epsilon=1e-8),
    'optax': optax.rmsprop(lr, decay=0.9, eps=1e-8, momentum=0.9),
  }


def demo4() -> dict[str, Run]:
  _rule(70)
  print("One Set of Hyperparameters, Four Frameworks' RMSprop")
  _rule(70)
  print(
    'Minimizing f(x, y) = 100x² + y² from (10, 10): decay 0.9, momentum '
    '0.9, eps 1e-8,\nlearning rate cosine from 0.05 to 0.005 over '
    f'{CONVENTIONS_STEPS} steps\n'
  )
  runs = {
    name: run(tx, ravine, [10.0, 10.0], CONVENTIONS_STEPS)
    for name, tx in conventions().items()
  }
  print(ROW_NOTE)
  print(
    f'{"Iteration":<12}' + ''.join(f'{name + " f(x,y)":<16}' for name in runs)
  )
  print('-' * 76)
  for i in range(0, CONVENTIONS_STEPS, 40):
    print(
      f'{i:<12}' + ''.join(f'{r.loss[i + 1]:<16.6g}' for r in runs.values())
    )
  print()
  ref = runs['optax'].params[-1]
  apart = {
    name: float(np.linalg.norm(r.params[-1] - ref)) for name, r in runs.items()
  }
  # optax's rule with only the learning rate moved after the momentum
  # buffer, as PyTorch places it: how much of PyTorch's gap that is.
  lr_after = run(
    rmsprop(
      CONVENTIONS_LR, decay=0.9, eps=1e-8, momentum=0.9, lr_in_momentum=False
    ),
    ravine,
    [10.0, 10.0],
    CONVENTIONS_STEPS,
  ).params[-1]
  losses = {name: r.loss[-1] for name, r in runs.items()}
  print(
    f'Conclusion: after {CONVENTIONS_STEPS} steps (the losses still '
    f'oscillate) they span {min(losses.values()):.2g} to '
    f'{max(losses.values()):.2g}. Keras '
    f'and optax are one rule (eps inside the square root, v from 0, the '
    f'learning rate inside the momentum buffer) and end '
    f'{apart["Keras"]:.2g} apart; TF1 starts v at 1 and its final '
    f"point lies {apart['TF1']:.2g} from optax's; PyTorch puts eps "
    'outside and the learning rate after the buffer, and its final point '
    f"lies {apart['PyTorch']:.2g} from optax's (distances between final "
    '(x, y) points). A fifth run, in neither the table nor the figure: '
    "optax's rule with only the learning rate moved after the buffer "
    '(lr_in_momentum=False) ends '
    f"{np.linalg.norm(lr_after - ref):.2g} from optax's final point: with "
    'a schedule, where the learning rate sits changes the run.\n'
  )
  return runs


def plot(
  out: pathlib.Path,
  d1: Run,
  d2: tuple[Run, Run, Run],
  d3: tuple[Run, Run],
  d4: dict[str, Run] | None = None,
) -> list[pathlib.Path]:
  """Writes the figures (four with ``d4``); returns their paths."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  out.mkdir(parents=True, exist_ok=True)
  paths = []

  def save(fig, name):
    fig.tight_layout()
    paths.append(out / name)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

  colors = {'RMSprop': 'tab:blue', 'SGD': 'tab:orange', 'AdaGrad': 'tab:green'}
  tuned = f'SGD (lr {DEMO2_LR_SGD_TUNED})'
  color = lambda label: (
    'tab:red' if label == tuned else colors[label.split()[0]]
  )

  # 1. Trajectories over the loss contours.
  fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
  grid = np.linspace(-12, 12, 241)
  gx, gy = np.meshgrid(grid, grid)
  panels = [
    (
      axes[0],
      gx**2 + gy**2,
      {'RMSprop (lr 0.1)': d1},
      'Demo 1: f(x, y) = x² + y²',
    ),
    (
      axes[1],
      100 * gx**2 + gy**2,
      {  # The zigzag of the faster SGD first, the slow one over it.
        f'RMSprop (lr {DEMO2_LR_RMSPROP})': d2[0],
        f'SGD (lr {DEMO2_LR_SGD_TUNED})': d2[2],
        f'SGD (lr {DEMO2_LR_SGD})': d2[1],
      },
      'Demo 2: f(x, y) = 100x² + y² (condition number 100)',
    ),
  ]
  for ax, f, runs, title in panels:
    cs = ax.contour(
      gx,
      gy,
      f,
      levels=np.geomspace(0.5, f.max(), 16),
      cmap='viridis',
      alpha=0.7,
      linewidths=0.8,
    )
    ax.clabel(cs, cs.levels[::3], fmt='%.3g', fontsize=7)
    for label, r in runs.items():
      c = color(label)
      ax.plot(
        r.params[:, 0],
        r.params[:, 1],
        '.-',
        color=c,
        ms=3,
        lw=1,
        label=f'{label}, {len(r.loss) - 1} steps',
      )
    ax.plot(10, 10, 'k^', ms=8, label='start (10, 10)')
    ax.plot(0, 0, 'r*', ms=12, label='minimum')
    ax.set(title=title, xlabel='x', ylabel='y', aspect='equal')
    ax.legend(loc='lower left', fontsize=8)
  fig.suptitle('Optimisation paths over the loss contours')
  save(fig, '1_trajectories.png')

  # 2. Loss curves on a log scale.
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
  curves = [
    (axes[0], {'RMSprop': d1}, 'Demo 1: x² + y²', 'f(x, y)'),
    (
      axes[1],
      {
        f'RMSprop (lr {DEMO2_LR_RMSPROP})': d2[0],
        f'SGD (lr {DEMO2_LR_SGD})': d2[1],
        f'SGD (lr {DEMO2_LR_SGD_TUNED})': d2[2],
      },
      'Demo 2: 100x² + y²',
      'f(x, y)',
    ),
    (axes[2], {'RMSprop': d3[0], 'AdaGrad': d3[1]}, 'Demo 3: x²', 'f(x)'),
  ]
  for ax, runs, title, ylabel in curves:
    for label, r in runs.items():
      # No floor: every value is drawn as it is (a zero would leave a gap).
      ax.semilogy(
        np.where(r.loss > 0, r.loss, np.nan), color=color(label), label=label
      )
    ax.set(title=title, xlabel='step', ylabel=f'{ylabel} (log scale)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
  # Demo 3: RMSprop's dive to float32's smallest numbers and the jump back.
  loss = d3[0].loss
  low = int(np.nanargmin(np.where(loss > 0, loss, np.nan)))
  jump = low + int(np.argmax(loss[low:] > 1e-2))
  axes[2].annotate(
    f"f reaches {loss[low]:.0e}, near float32's\nsmallest numbers",
    xy=(low, loss[low]),
    xytext=(low + 30, loss[low] * 1e4),
    fontsize=8,
    arrowprops=dict(arrowstyle='->', lw=0.8),
  )
  axes[2].annotate(
    'the instability: with g near 0, v decays,\nthe effective learning '
    'rate grows,\nx is thrown back out',
    xy=(jump, loss[jump]),
    xytext=(jump - 25, loss[low] * 1e17),
    fontsize=8,
    ha='left',
    arrowprops=dict(arrowstyle='->', lw=0.8),
  )
  fig.suptitle('Loss against steps')
  save(fig, '2_loss_curves.png')

  # 3. Effective learning rates over time (Demo 3).
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  rms, ada = d3
  # From step 1: before the first gradient there is no rate to speak of.
  steps = np.arange(1, len(rms.extra))
  axes[0].semilogy(
    steps,
    rms.extra[1:],
    color=colors['RMSprop'],
    label='RMSprop: 0.5 / (√v + ε), v = EMA of g², ρ = 0.9',
  )
  axes[0].semilogy(
    steps,
    ada.extra[1:],
    color=colors['AdaGrad'],
    label='AdaGrad: 1.0 / √(Σ g² + ε)',
  )
  axes[0].set(
    title='Effective learning rate after each step',
    xlabel='step',
    ylabel='effective learning rate (log scale)',
  )
  # Labelled ticks down to AdaGrad's level, and its final value written out.
  ticks = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]
  axes[0].set_yticks(ticks, [f'{t:g}' for t in ticks])
  axes[0].minorticks_off()
  axes[0].set_ylim(0.01, 10)
  axes[0].annotate(
    f'AdaGrad ends at {ada.extra[-1]:.3f}',
    xy=(steps[-1], ada.extra[-1]),
    xytext=(steps[-1] * 0.55, ada.extra[-1] * 0.68),
    fontsize=8,
    color=colors['AdaGrad'],
  )
  axes[0].grid(True, which='major', alpha=0.3)
  axes[0].legend(fontsize=8)
  for label, r in [('RMSprop', rms), ('AdaGrad', ada)]:
    axes[1].plot(r.params[:, 0], color=colors[label], label=label)
  axes[1].axhline(0, color='k', lw=0.5)
  axes[1].set(title='Parameter x (minimum at 0)', xlabel='step', ylabel='x')
  axes[1].legend()
  fig.suptitle(
    "Demo 3, f(x) = x²: AdaGrad's effective rate only decays; "
    "RMSprop's follows recent gradients"
  )
  save(fig, '3_effective_learning_rates.png')

  if d4 is not None:
    _plot_conventions(plt, d4, save)
  return paths


def _plot_conventions(plt, runs: dict[str, Run], save) -> None:
  """4. The four frameworks' losses, and how far apart their points are."""
  styles = {
    'PyTorch': ('tab:red', '-', 2.5),
    'Keras': ('tab:purple', '-', 4),
    'TF1': ('tab:brown', '-', 1.5),
    'optax': ('k', '--', 1),
  }
  # (Their paths from (10, 10) are one diagonal line at any readable scale:
  # the losses and the distances between the points tell them apart.)
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  for name, r in runs.items():
    color, ls, lw = styles[name]
    axes[0].semilogy(
      np.where(r.loss > 0, r.loss, np.nan),
      label=name,
      color=color,
      ls=ls,
      lw=lw,
      alpha=0.5 if lw > 2 else 1,
    )
  ref = runs['optax'].params
  # Runs that stay within 0.05 of optax's point (but not on it) are drawn
  # under its line at this scale: say so, the right panel shows them.
  under = [
    name
    for name, r in runs.items()
    if name != 'optax'
    and 0 < np.linalg.norm(r.params - ref, axis=1).max() < 0.05
  ]
  axes[0].set(
    title='f(x, y) against steps'
    + (
      f"\n({' and '.join(under)}: under optax's line; see the right panel)"
      if under
      else ''
    ),
    xlabel='step',
    ylabel='f(x, y) (log scale)',
  )
  for name, r in runs.items():
    if name == 'optax':
      continue
    color, ls, lw = styles[name]
    gap = np.linalg.norm(r.params - ref, axis=1)
    axes[1].semilogy(
      np.where(gap > 0, gap, np.nan),
      color=color,
      label=f'{name}' + (' (0: identical to optax)' if not gap.any() else ''),
    )
  axes[1].set(
    title="Distance from optax's point at each step",
    xlabel='step',
    ylabel='|(x, y) - optax (x, y)| (log scale)',
  )
  for ax in axes:
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(
    'Demo 4: decay 0.9, momentum 0.9, eps 1e-8, cosine learning '
    "rate 0.05 to 0.005, in each framework's RMSprop"
  )
  save(fig, '4_conventions.png')


def main(out: str | pathlib.Path = 'rmsprop_demo', plots: bool = True) -> int:
  d1 = demo1()
  d2 = demo2()
  d3 = demo3()
  d4 = demo4()
  if plots:
    for path in plot(pathlib.Path(out), d1, d2, d3, d4):
      print(f'wrote {path}')
  return 0
