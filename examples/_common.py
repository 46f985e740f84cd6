"""Shared command-line handling for the examples (not part of the library)."""

import argparse
import pathlib


def parse_args(description: str, argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--quick', action='store_true',
                      help='a short run for smoke tests (CI): 3 to 15 s on a '
                           'quiet 2-core machine, start-up included '
                           '(measured)')
  parser.add_argument('--out', default='example_figures', metavar='DIR',
                      help='folder for the figure (default: ./example_figures)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  args.out = pathlib.Path(args.out)
  args.out.mkdir(parents=True, exist_ok=True)
  return args


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
