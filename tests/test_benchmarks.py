"""The benchmark harness runs end to end in quick mode and reports truly.

No timing is asserted: only that the harness runs, writes its files, and
that what it derives (bytes, state sizes, training curves) agrees with
independent computations.
"""

import json
import pathlib

import jax
import numpy as np
import optax
import pytest

from conftest import require

SUITES = ('step', 'compile', 'convergence', 'low_memory')


@pytest.fixture(scope='module')
def quick_results(tmp_path_factory):
  """``python -m benchmarks --quick``, one suite at a time and only when a
  test first needs it, so that pytest shows progress between suites."""
  for module in ('flax', 'sklearn', 'matplotlib'):
    require(module)
  from benchmarks.__main__ import main

  out = tmp_path_factory.mktemp('bench')
  results = {}

  def get(suite):
    if suite not in results:
      # The step suite on the tree that packing stacks, the convergence
      # and low-memory suites on one problem each: every variant, method
      # and state, every output. test_every_convergence_problem_trains and
      # test_every_low_memory_problem_trains cover the other problems.
      extra = {
        'step': ['--trees', '16 x 4K'],
        'convergence': ['--problems', 'quadratic'],
        'low_memory': ['--low-memory-problems', 'digits_mlp'],
      }.get(suite, [])
      results[suite] = main(
        ['--quick', '--suites', suite, '--out', str(out)] + extra
      )[suite]
    return results[suite]

  return out, get


@pytest.mark.parametrize('suite', SUITES)
def test_writes_json_markdown_and_plots(quick_results, suite):
  out, get = quick_results
  get(suite)
  payload = json.loads((out / f'{suite}.json').read_text())
  env = payload['environment']
  assert env['backend'] == jax.default_backend()
  assert env['jax'] == jax.__version__ and env['date']
  assert (out / f'{suite}.md').read_text().count('\n|') > 4
  if suite != 'compile':
    assert (out / f'{suite}.png').stat().st_size > 10_000


def test_step_bytes_follow_the_performance_notes(quick_results):
  _, get = quick_results
  rows = get('step')['rows']
  assert {r['variant'] for r in rows} == {
    'plain',
    'centered+momentum',
    '8-bit nu',
  }
  # Bytes per float32 parameter from the notes' table: 20 and 36; state
  # holds nu (and mu and the momentum buffer) in the parameters' dtype.
  # The 8-bit nu: 12 B for params and grads, 2 B for nu (r/w); its state
  # is one byte per parameter plus a float32 scale per block of up to 256.
  per_param = {
    ('float32', 'plain'): (20, 4, 4),
    ('float32', 'centered+momentum'): (36, 12, 12),
    ('float32', '8-bit nu'): (14, (1, 1.1), 4),
    ('bfloat16', 'plain'): (10, 2, 2),
    ('bfloat16', 'centered+momentum'): (18, 6, 6),
  }
  for r in rows:
    moved, ours, optax_state = per_param[r['dtype'], r['variant']]
    assert r['moved_bytes'] == moved * r['params']
    assert r['state_bytes_per_param']['optax'] == optax_state
    if isinstance(ours, tuple):
      assert ours[0] < r['state_bytes_per_param']['ours'] <= ours[1]
    else:
      assert r['state_bytes_per_param']['ours'] == ours
    assert all(t > 0 for t in r['step_s'].values())
    if r['speedup_vs_torch'] is None:  # Only when PyTorch is missing.
      require('torch')


def test_convergence_covers_every_method(quick_results):
  from benchmarks import convergence

  _, get = quick_results
  problems = get('convergence')['problems']
  assert set(problems) == {'quadratic'}
  for r in problems.values():
    assert set(r['methods']) == set(convergence.METHODS)
    for m in r['methods'].values():  # The tuned lr is the grid's best.
      assert m['final_median'] == pytest.approx(min(m['final_by_lr']))
    # Low-memory ratios: at float32 RMSprop's tuned lr, from the grid.
    ref = r['methods']['RMSprop']
    i = ref['final_by_lr'].index(ref['final_median'])
    for name, ratio in r['low_memory'].items():
      assert ratio == pytest.approx(
        r['methods'][name]['final_by_lr'][i] / ref['final_by_lr'][i]
      )


def test_compile_suite_covers_its_trees(quick_results):
  from benchmarks import compile_time

  _, get = quick_results
  rows = get('compile')['rows']
  trees = compile_time.trees(quick=True)
  assert {(r['tree'], r['variant']) for r in rows} == {
    (t, v) for t in trees for v in compile_time.VARIANTS
  }
  for r in rows:
    assert r['leaves'] == len(trees[r['tree']])
    assert r['speedup_vs_optax'] == pytest.approx(
      r['compile_s']['optax'] / r['compile_s']['ours']
    )
    assert all(t > 0 for t in r['compile_s'].values())


@pytest.mark.parametrize(
  'name', ['rosenbrock', 'logistic', 'digits_mlp', 'adding_gru']
)
def test_every_convergence_problem_trains(name):
  """The problems the quick run above leaves out, each with RMSprop at a
  learning rate of the grid: finite losses that fall."""
  import rmsprop_jax
  from benchmarks import convergence

  problem = convergence.PROBLEMS[name]()
  losses = convergence.train_grid(
    problem, rmsprop_jax.rmsprop, [1e-3], [0], problem.quick_steps
  )
  assert losses.shape == (1, 1, problem.quick_steps // problem.record_every)
  assert np.isfinite(losses).all() and losses[0, 0, -1] < losses[0, 0, 0]


@pytest.mark.parametrize('name', ['adding_gru', 'char_transformer'])
def test_every_low_memory_problem_trains(name):
  """The low-memory study's problems the quick run leaves out, with the
  8-bit state (the one whose code differs most from float32's) for two
  evaluations' worth of steps: finite held-out metrics."""
  import jax.numpy as jnp

  from benchmarks import low_memory

  problem = low_memory.PROBLEMS[name]()
  metrics = low_memory.train(
    problem,
    {'nu_dtype': jnp.uint8},
    [problem.lrs[0]],
    np.arange(1),
    2 * low_memory.RECORDS,
  )
  assert metrics and all(
    v.shape == (1, 1) and np.isfinite(v).all() for v in metrics.values()
  )


def test_convergence_grid_cell_equals_a_plain_optax_run():
  from benchmarks import convergence

  problem = convergence.PROBLEMS['logistic']()
  losses = convergence.train_grid(problem, optax.adam, [1e-3, 1e-2], [0, 1], 20)
  # Seed 1, lr 1e-2, by hand: the same keys, one step at a time, the
  # whole-dataset loss recorded every 10 steps.
  assert problem.record_every == 10 and losses.shape == (2, 2, 2)
  tx = optax.adam(1e-2)
  init_key, data_key = jax.random.split(jax.random.PRNGKey(1))
  params = problem.init(init_key)
  state = tx.init(params)
  expected = []
  for i, key in enumerate(jax.random.split(data_key, 20)):
    grads = jax.grad(problem.loss)(params, key)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if i % 10 == 9:
      expected.append(problem.evaluate(params))
  # float32 rounding only: the grid passes lr as a float32 array.
  np.testing.assert_allclose(losses[1, 1], expected, rtol=1e-5)


@pytest.mark.parametrize(
  'args, message',
  [
    (['--suites', 'steps'], "--suites: unknown 'steps'"),
    (['--quick', '--trees', '2000 x 64'], "--trees: unknown '2000 x 64'"),
    (['--variants', 'plain,nesterov'], "--variants: unknown 'nesterov'"),
    (['--dtypes', 'float16'], "--dtypes: unknown 'float16'"),
    (['--problems', 'mnist'], "--problems: unknown 'mnist'"),
    (
      ['--low-memory-problems', 'mnist'],
      "--low-memory-problems: unknown 'mnist'",
    ),
    (['--out', 'FILE'], 'exists and is not a folder'),
    (['--suites', ''], '--suites is empty'),
    (['--trees', ','], '--trees is empty'),
    (['--out', ''], 'is empty'),
  ],
)
def test_command_line_refuses_bad_input_before_any_work(
  tmp_path, capsys, args, message
):
  """One line on stderr, exit status 2, nothing run or printed first."""
  from benchmarks.__main__ import main

  afile = tmp_path / 'results.json'
  afile.write_text('')
  with pytest.raises(SystemExit) as exit_info:
    main([str(afile) if a == 'FILE' else a for a in args])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], lines


def test_command_line_error_through_a_subprocess(tmp_path):
  import subprocess
  import sys

  result = subprocess.run(
    [sys.executable, '-m', 'benchmarks', '--suites', 'step,compiles'],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=pathlib.Path(__file__).resolve().parent.parent,
  )
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.strip() == (
    "python -m benchmarks: error: --suites: unknown 'compiles'; choose "
    'from step, compile, convergence, low_memory'
  )


def test_disturbed_timings_are_flagged(quick_results):
  """A side whose repeats spread more than 2x (another process took the
  CPU) is reported, and its ratios are marked in the table."""
  from benchmarks import common, step

  slow = iter([1.0, 5.0, 1.0])
  spreads = {}
  common.alternate(
    {'steady': lambda n: n * 1.0, 'disturbed': lambda n: n * next(slow)},
    {'steady': 1, 'disturbed': 1},
    3,
    spreads,
  )
  assert spreads == {'steady': 1.0, 'disturbed': 5.0}
  _, get = quick_results
  payload = json.loads(json.dumps(get('step'), default=float))
  row = payload['rows'][0]
  row['unstable'] = ['torch']
  line = next(
    line
    for line in step.markdown(payload).splitlines()
    if line.startswith(f'| {row["tree"]} | {row["dtype"]} | {row["variant"]} |')
  )
  cells = [c.strip() for c in line.split('|')]
  assert cells[9].endswith('†') and not cells[5].endswith('†')


def test_low_memory_study_pairs_seeds_and_its_intervals_are_right(
  quick_results,
):
  """Every narrow state is compared on the same seeds as float32 state,
  and the intervals agree with independent computations: a constant ratio
  has a zero-width bootstrap interval, and the t-interval is scipy's."""
  from scipy import stats

  from benchmarks import low_memory

  out, get = quick_results
  payload = get('low_memory')
  # A smoke run's verdicts must not pass for results.
  assert 'A smoke run' in (out / 'low_memory.md').read_text()
  assert 'A smoke run' not in low_memory.markdown({**payload, 'quick': False})
  for name, r in payload['problems'].items():
    assert set(r['runs']) == set(low_memory.STATES), name
    for state in low_memory.NARROW:
      for metric, c in r['comparisons'][state].items():
        narrow = np.asarray(r['runs'][state][metric])
        base = np.asarray(r['runs']['float32'][metric])
        assert len(narrow) == len(base) == len(r['seeds'])
        assert np.isclose(c['ratio'], narrow.mean() / base.mean())
        assert c['low'] <= c['ratio'] <= c['high']
  base = np.array([1.0, 2.0, 0.5, 4.0])
  assert low_memory.paired_interval(1.01 * base, base) == pytest.approx(
    (1.01, 1.01, 1.01)
  )
  rng = np.random.default_rng(0)
  narrow = base * np.exp(rng.normal(0.01, 0.02, 4))
  ratio, low, high = low_memory.log_t_interval(narrow, base)
  test = stats.ttest_1samp(np.log(narrow / base), 0.0)
  ci = test.confidence_interval(0.95)
  assert (low, high) == pytest.approx((np.exp(ci.low), np.exp(ci.high)))
  assert ratio == pytest.approx(np.exp(np.log(narrow / base).mean()))
