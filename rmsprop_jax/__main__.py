"""Command line: ``python -m rmsprop_jax demo [--out DIR]``."""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m rmsprop_jax',
      description='rmsprop_jax: RMSprop for JAX and optax.')
  commands = parser.add_subparsers(dest='command', required=True)
  demo = commands.add_parser(
      'demo',
      help="run the three classic RMSprop demos and plot them",
      description=(
          "Runs three demos with rmsprop_jax and prints their tables: "
          "(1) RMSprop minimising x² + y² from (10, 10); "
          "(2) RMSprop against SGD on the ill-conditioned 100x² + y²; "
          "(3) RMSprop against AdaGrad over 200 steps, with both effective "
          "learning rates. Each ends with a conclusion computed from the "
          "run. Then writes three PNG figures: the paths over the loss "
          "contours, the loss curves on a log scale, and the effective "
          "learning rates over time."))
  demo.add_argument(
      '--out', default='rmsprop_demo', metavar='DIR',
      help='folder for the PNG figures, created if missing '
           '(default: ./rmsprop_demo/)')
  demo.add_argument(
      '--no-plots', action='store_true',
      help='print the tables and conclusions only; write no figures '
           '(and need no matplotlib)')
  args = parser.parse_args(argv)
  if args.command == 'demo':
    from rmsprop_jax import demo as demo_module
    return demo_module.main(out=args.out, plots=not args.no_plots)
  return 2


if __name__ == '__main__':
  sys.exit(main())
