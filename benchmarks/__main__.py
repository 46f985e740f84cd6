"""``python -m benchmarks [--quick] [--suites step,compile,convergence,low_memory] [--out DIR]``.

Runs the step-speed-and-memory suite, the compile-time suite, the
convergence suite and the low-memory state's paired convergence study, and
writes JSON, a Markdown table (and PNG plots for step, convergence and
low_memory) for each to ``--out``
(``benchmarks/results/``; ``benchmarks/results/quick/`` with ``--quick``).
Runs unchanged on CPU, GPU and TPU: it measures whatever ``jax`` runs on.
"""

import argparse
import pathlib

from benchmarks import common, compile_time, convergence, low_memory, step
from rmsprop_jax.__main__ import _check_out, _refuse

SUITES = ('step', 'compile', 'convergence', 'low_memory')


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog='python -m benchmarks',
    description='Runs the step-speed-and-memory, compile-time and '
    'convergence suites side by side with optax (and PyTorch), and the '
    "low-memory state's paired convergence study, and writes JSON, a "
    'Markdown table and (step, convergence, low_memory) a PNG figure for '
    'each to --out. Runs unchanged on CPU, GPU and TPU.',
  )
  parser.add_argument(
    '--quick',
    action='store_true',
    help='small trees and problems, few repetitions: a '
    'smoke run of about 5.5 minutes on a 2-core machine '
    '(measured)',
  )
  parser.add_argument(
    '--suites',
    default=','.join(SUITES),
    help=f'comma-separated, from {", ".join(SUITES)} (default: all)',
  )
  parser.add_argument(
    '--out',
    default=None,
    metavar='DIR',
    help='output folder (default: benchmarks/results, the committed '
    'results, which a partial run overwrites; benchmarks/results/quick '
    'with --quick)',
  )
  parser.add_argument(
    '--trees',
    default=None,
    help='step suite: comma-separated tree names to run (default: all)',
  )
  parser.add_argument(
    '--variants',
    default=None,
    help=f'step suite: from {", ".join(step.VARIANTS)}',
  )
  parser.add_argument(
    '--dtypes', default=None, help=f'step suite: from {", ".join(step.DTYPES)}'
  )
  parser.add_argument(
    '--no-torch', action='store_true', help='step suite: leave PyTorch out'
  )
  parser.add_argument(
    '--problems',
    default=None,
    help='convergence suite: comma-separated, from '
    f'{", ".join(convergence.PROBLEMS)}',
  )
  parser.add_argument(
    '--low-memory-problems',
    default=None,
    help='low_memory suite: comma-separated, from '
    f'{", ".join(low_memory.PROBLEMS)}',
  )
  args = parser.parse_args(argv)
  split = lambda s: s.split(',') if s else None
  suites = split(args.suites)
  # Every name is checked before any work: one line, exit status 2.
  fail = lambda message: _refuse(parser, message)
  for option, value in (
    ('--suites', args.suites),
    ('--trees', args.trees),
    ('--variants', args.variants),
    ('--dtypes', args.dtypes),
    ('--problems', args.problems),
    ('--low-memory-problems', args.low_memory_problems),
  ):
    if value is not None and not value.strip(' ,'):
      fail(f'{option} is empty: name at least one, or leave the option out')
  for option, names, known in (
    ('--suites', suites, SUITES),
    (
      '--trees',
      split(args.trees),
      step.trees(args.quick) if args.trees else (),
    ),
    ('--variants', split(args.variants), step.VARIANTS),
    ('--dtypes', split(args.dtypes), step.DTYPES),
    ('--problems', split(args.problems), convergence.PROBLEMS),
    (
      '--low-memory-problems',
      split(args.low_memory_problems),
      low_memory.PROBLEMS,
    ),
  ):
    unknown = [n for n in names or () if n not in known]
    if unknown:
      fail(
        f'{option}: unknown {", ".join(map(repr, unknown))}; choose from '
        f'{", ".join(known)}'
        + (' (with --quick)' if option == '--trees' and args.quick else '')
      )
  out = (
    pathlib.Path(__file__).parent / 'results' / ('quick' if args.quick else '')
    if args.out is None
    else args.out
  )
  _check_out(parser, str(out))
  out = pathlib.Path(out)
  print(common.environment_markdown(common.environment()))
  results = {}
  if 'step' in suites:
    results['step'] = step.run(
      out,
      quick=args.quick,
      tree_names=split(args.trees),
      variants=split(args.variants),
      dtypes=split(args.dtypes),
      use_torch=not args.no_torch,
    )
  if 'compile' in suites:
    results['compile'] = compile_time.run(out, quick=args.quick)
  if 'convergence' in suites:
    results['convergence'] = convergence.run(
      out, quick=args.quick, problems=split(args.problems)
    )
  if 'low_memory' in suites:
    results['low_memory'] = low_memory.run(
      out, quick=args.quick, problems=split(args.low_memory_problems)
    )
  print(f'wrote results to {out}/')
  return results


if __name__ == '__main__':
  main()
