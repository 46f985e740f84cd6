"""Command line: ``python -m rmsprop_jax demo [--out DIR]``."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m rmsprop_jax',
    description='rmsprop_jax: RMSprop for JAX and optax.',
  )
  commands = parser.add_subparsers(dest='command', required=True)
  demo = commands.add_parser(
    'demo',
    help="run the three classic RMSprop demos and one on the frameworks' "
    'conventions, and plot them',
    description=(
      'Runs four demos with rmsprop_jax and prints their tables: '
      '(1) RMSprop minimising x² + y² from (10, 10); '
      '(2) RMSprop against SGD on the ill-conditioned 100x² + y²; '
      '(3) RMSprop against AdaGrad over 200 steps, with both effective '
      'learning rates; (4) one set of hyperparameters (decay, momentum, '
      'eps, a cosine learning rate) under the PyTorch, Keras, TF1 and '
      'optax conventions on 100x² + y². Each ends with a conclusion '
      'computed from the run. Then writes four PNG figures: the paths '
      'over the loss contours, the loss curves on a log scale, the '
      "effective learning rates over time, and the four conventions' "
      'losses and distances. About 4 s on 2 CPU cores (measured).'
    ),
  )
  demo.add_argument(
    '--out',
    default='rmsprop_demo',
    metavar='DIR',
    help='folder for the PNG figures, created if missing '
    '(default: ./rmsprop_demo/)',
  )
  demo.add_argument(
    '--no-plots',
    action='store_true',
    help='print the tables and conclusions only; write no figures '
    '(and need no matplotlib)',
  )
  args = parser.parse_args(argv)
  if args.command == 'demo':
    if not args.no_plots:
      _check_out(demo, args.out)
    from rmsprop_jax import demo as demo_module

    return demo_module.main(out=args.out, plots=not args.no_plots)
  return 2


def _refuse(parser: argparse.ArgumentParser, message: str) -> None:
  """Exits with status 2 after one line on stderr, ``prog: error: message``
  (argparse's own ``error`` prints the usage first). Shared by the demo,
  the examples and the benchmarks' command lines."""
  parser.exit(2, f'{parser.prog}: error: {message}\n')


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
  """Refuses, before any work, an ``--out`` folder that cannot hold the
  figures."""
  problem = _unwritable(out)
  if problem:
    _refuse(parser, f'--out {out!r}: {problem}')


def _unwritable(out: str) -> str | None:
  """Why figures cannot be written to the folder ``out`` (created if
  missing), or None: checked before any work is done."""
  if not str(out).strip():
    return 'is empty (give a folder, or leave the option out)'
  path = pathlib.Path(out)
  try:
    if path.exists() and not path.is_dir():
      return 'exists and is not a folder'
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:  # Also a name too long to look up.
    return f'cannot create the folder ({error.strerror or error})'
  if not os.access(path, os.W_OK | os.X_OK):
    return 'the folder is not writable'
  return None


if __name__ == '__main__':
  sys.exit(main())
