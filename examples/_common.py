"""Shared command-line handling and progress bars for the examples (not part
of the library)."""

import argparse
import pathlib

import jax
from tqdm import tqdm

from rmsprop_jax.__main__ import _check_out, _refuse


def parse_args(
  doc: str,
  argv=None,
  *,
  quick: str,
  seed: bool = True,
  processes: bool = False,
) -> argparse.Namespace:
  """Parses the examples' options; ``--help`` shows the first paragraph of
  the example's docstring ``doc`` and ``quick``, the measured time of its
  ``--quick`` run. ``seed``: whether the example has randomness for
  ``--seed`` to set. ``processes``: whether it takes ``--processes N`` (its
  8 devices in N JAX processes). Bad values (an ``--out`` that cannot hold
  the figure, a seed outside [0, 2**32), a process count that does not
  divide 8) are refused at once: one line on stderr, exit status 2, before
  any training."""
  description = ' '.join(doc.strip().split('\n\n')[0].split())
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument(
    '--quick',
    action='store_true',
    help=f'a short run for smoke tests (CI): {quick} on a '
    'quiet 2-core machine, start-up included '
    '(measured)',
  )
  parser.add_argument(
    '--out',
    default='example_figures',
    metavar='DIR',
    help='folder for the figure, created if missing '
    '(default: ./example_figures)',
  )
  if seed:
    parser.add_argument(
      '--seed',
      type=int,
      default=0,
      help='random seed of the initial weights and the '
      'data, in [0, 2**32) (default: 0)',
    )
  if processes:
    parser.add_argument(
      '--processes',
      type=int,
      default=1,
      metavar='N',
      help='run as N JAX processes on this machine, 8 // N CPU devices '
      'each, launched by this one (1, 2, 4 or 8; default: 1, one process '
      'of 8 simulated devices)',
    )
  args = parser.parse_args(argv)
  if seed and not 0 <= args.seed < 2**32:
    _refuse(parser, f'--seed {args.seed}: must be in [0, 2**32)')
  if processes and args.processes not in (1, 2, 4, 8):
    _refuse(parser, f'--processes {args.processes}: must be 1, 2, 4 or 8')
  _check_out(parser, args.out)
  args.out = pathlib.Path(args.out)
  return args


class StepBar(tqdm):
  """A tqdm bar counting training steps, also inside a jitted ``lax.scan``.

  In Python loops, call ``update()`` after each step as with any tqdm bar.
  Inside ``jax.jit``/``jax.vmap``/``lax.scan``, call ``tick(step)`` with the
  loop's step index (a traced integer, the same for every vmapped run): every
  ``every`` steps it calls back to the host (``jax.debug.callback``) and moves
  the bar to the step reached. Several runs can share one bar: call
  ``end_run(steps)`` after each, and the next run's ticks count on from there.
  """

  def __init__(self, total: int, desc: str, every: int | None = None, **kw):
    super().__init__(total=total, desc=desc, unit='step', **kw)
    self.offset = 0
    self.every = every or max(1, total // 200)

  def tick(self, step) -> None:
    def report(step):
      self.update(max(0, self.offset + int(step) + 1 - self.n))

    jax.lax.cond(
      (step + 1) % self.every == 0,
      lambda s: jax.debug.callback(report, s),
      lambda s: None,
      step,
    )

  def end_run(self, steps: int) -> None:
    """Marks a run of ``steps`` steps as done; later ticks count after it."""
    self.offset += steps
    self.update(max(0, self.offset - self.n))


def pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: pathlib.Path) -> None:
  """Lays the figure out, writes it as a PNG and says where."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'wrote {path}')
