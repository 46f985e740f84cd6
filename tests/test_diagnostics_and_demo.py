"""``effective_learning_rate`` against hand computations; the demo command."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import diagnostics


def _after(tx, grads, params):
  state = tx.init(params)
  for g in grads:
    _, state = tx.update(g, state, params)
  return state


G = [np.array([3.0, -0.5, 0.0]), np.array([1.0, 2.0, 0.0])]


def test_effective_learning_rate_plain_by_hand():
  params = jnp.zeros(3)
  state = _after(
    rmsprop_jax.rmsprop(0.1, decay=0.9, eps=1e-3, eps_in_sqrt=False), G, params
  )
  v = 0.9 * (0.1 * G[0] ** 2) + 0.1 * G[1] ** 2  # By hand, v_0 = 0.
  expected = 0.1 / (np.sqrt(v) + 1e-3)
  np.testing.assert_allclose(
    diagnostics.effective_learning_rate(
      state, 0.1, eps=1e-3, eps_in_sqrt=False
    ),
    expected,
    rtol=1e-6,
  )
  assert expected[2] == pytest.approx(0.1 / 1e-3)  # Zero gradient: lr / eps.


def test_effective_learning_rate_centered_bias_corrected_by_hand():
  params = jnp.zeros(3)
  tx = rmsprop_jax.rmsprop(
    0.2, decay=0.5, eps=1e-2, centered=True, bias_correction=True, momentum=0.9
  )
  state = _after(tx, G, params)
  mu = 0.5 * (0.5 * G[0]) + 0.5 * G[1]
  nu = 0.5 * (0.5 * G[0] ** 2) + 0.5 * G[1] ** 2
  c = 1 - 0.5**2
  expected = 0.2 / np.sqrt(np.maximum(nu / c - (mu / c) ** 2, 0) + 1e-2)
  got = jax.jit(
    lambda s: diagnostics.effective_learning_rate(
      s, 0.2, eps=1e-2, eps_in_sqrt=True, bias_correction=True, decay=0.5
    )
  )(state)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  with pytest.raises(ValueError, match='decay'):
    diagnostics.effective_learning_rate(
      state, 0.2, eps=1e-2, eps_in_sqrt=True, bias_correction=True
    )


@pytest.mark.parametrize('nu_dtype', [jnp.bfloat16, jnp.uint8])
def test_effective_learning_rate_of_a_narrow_centered_state(nu_dtype):
  """Centered, where the mean dominates the spread (gradients 5 +- 0.05):
  the stored moments' variance, computed in float64 by hand, not in the
  storage dtype (in bfloat16, nu - mu**2 cancels to 0 and the rate read
  lr / sqrt(eps), 2000 times too large)."""
  params = jnp.zeros(512)
  noise = np.random.default_rng(0).normal(size=(30, 512))
  grads = [jnp.asarray(5 + 0.05 * n, jnp.float32) for n in noise]
  tx = rmsprop_jax.rmsprop(
    0.01,
    decay=0.9,
    eps=1e-8,
    centered=True,
    nu_dtype=nu_dtype,
    stochastic_rounding=nu_dtype == jnp.bfloat16,
  )
  state = _after(tx, grads, params)
  got = diagnostics.effective_learning_rate(
    state, 0.01, eps=1e-8, eps_in_sqrt=True, bias_correction=False
  )
  stored = rmsprop_jax.unpack_state(state)
  nu = np.asarray(optax.tree.get(stored, 'nu'), np.float64)
  mu = np.asarray(optax.tree.get(stored, 'mu'), np.float64)
  expected = 0.01 / np.sqrt(np.maximum(nu - mu**2, 0) + 1e-8)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-3)
  assert np.median(got) < 0.1 * 0.01 / np.sqrt(1e-8)


def test_effective_learning_rate_is_the_step_per_unit_gradient():
  # Without momentum, update = -eff_lr * g for the state *after* the update.
  params = {'a': jnp.ones(4), 'b': [jnp.ones((2, 2))]}
  g = jax.tree.map(lambda p: p * jnp.arange(p.size).reshape(p.shape), params)
  tx = rmsprop_jax.presets.pytorch(lr=0.05, alpha=0.9)
  updates, state = tx.update(g, tx.init(params), params)
  eff = diagnostics.effective_learning_rate(
    state, 0.05, eps=1e-8, eps_in_sqrt=False
  )
  chex = pytest.importorskip('chex')
  chex.assert_trees_all_close(
    updates, jax.tree.map(lambda e, x: -e * x, eff, g), rtol=1e-6
  )


def test_summarize():
  summary = diagnostics.summarize(
    {'w': jnp.array([3.0, 1.0, 2.0]), 'l': [jnp.array([[5.0]])]}
  )
  assert set(summary) == {'w', 'l/0'}
  assert [float(summary['w'][k]) for k in ('min', 'median', 'max')] == [
    1.0,
    2.0,
    3.0,
  ]


@pytest.mark.parametrize('shape', [(300,), (4096, 16)])
def test_summarize_reports_a_nan_leaf_as_nan_at_any_size(shape):
  """A leaf gone NaN logs as NaN, not as the range of its other entries
  (XLA:CPU's large jnp.min and jnp.max skip NaN: (4096, 16) did)."""
  x = np.ones(shape, np.float32)
  x.reshape(-1)[77] = np.nan
  for summary in (
    diagnostics.summarize({'w': jnp.asarray(x)}),
    jax.jit(diagnostics.summarize)({'w': jnp.asarray(x)}),
  ):
    assert all(np.isnan(float(v)) for v in summary['w'].values()), summary


def test_summarize_takes_integer_leaves():
  """A whole optimizer state: its step count and 8-bit codes are integers."""
  state = rmsprop_jax.rmsprop(1e-2, nu_dtype=jnp.uint8).init({'w': jnp.ones(3)})
  summary = diagnostics.summarize({'n': jnp.arange(5), 'state': state})
  assert [int(summary['n'][k]) for k in ('min', 'median', 'max')] == [0, 2, 4]
  assert summary['n']['max'].dtype == jnp.arange(5).dtype
  codes = [v for k, v in summary.items() if k.endswith('codes')]
  assert len(codes) == 1 and codes[0]['max'].dtype == jnp.uint8


def test_demo_runs_and_writes_four_figures(tmp_path, capsys):
  pytest.importorskip('matplotlib')
  from rmsprop_jax.__main__ import main

  assert main(['demo', '--out', str(tmp_path / 'figs')]) == 0
  out = capsys.readouterr().out
  assert out.count('Conclusion:') == 4
  pngs = sorted(p.name for p in (tmp_path / 'figs').glob('*.png'))
  assert pngs == [
    '1_trajectories.png',
    '2_loss_curves.png',
    '3_effective_learning_rates.png',
    '4_conventions.png',
  ]
  for p in (tmp_path / 'figs').glob('*.png'):
    assert p.read_bytes()[:4] == b'\x89PNG'


def test_demo1_table_matches_the_reference_numpy_class(capsys):
  # The printed final point is the classic demos' NumPy class's (float32 here).
  from rmsprop_jax import demo

  from test_references import classic_demo1_trajectory

  r = demo.demo1()
  np.testing.assert_allclose(
    r.params[1:], classic_demo1_trajectory(), rtol=2e-5
  )


@pytest.mark.parametrize('kind', ['cannot be created', 'is a file', 'empty'])
def test_demo_refuses_a_bad_out_before_any_work(
  tmp_path, kind, capsys, monkeypatch
):
  """One line on stderr, exit status 2, nothing printed or run first: the
  first kind through ``python -m rmsprop_jax`` in a fresh interpreter
  (the entry point, and nothing printed at import), the others through the
  same ``main`` in this process, where the demo itself must not start."""
  import subprocess
  import sys

  from rmsprop_jax import demo
  from rmsprop_jax.__main__ import main

  def started(**kwargs):
    raise AssertionError('the demo started before --out was checked')

  monkeypatch.setattr(demo, 'main', started)
  monkeypatch.chdir(tmp_path)  # Where an empty --out would write.

  if kind == 'empty':
    out = ''  # Would write into the current folder.
  elif kind == 'is a file':
    out = tmp_path / 'figures.png'
    out.write_text('not a folder')
  else:
    blocker = tmp_path / 'blocker'
    blocker.write_text('')
    out = blocker / 'sub'  # A folder inside a file cannot be created.
  argv = ['demo', '--out', str(out)]
  if kind == 'cannot be created':
    result = subprocess.run(
      [sys.executable, '-m', 'rmsprop_jax', *argv],
      capture_output=True,
      text=True,
      timeout=120,
    )
    code, stdout, stderr = result.returncode, result.stdout, result.stderr
  else:
    with pytest.raises(SystemExit) as exit_info:
      main(argv)
    code = exit_info.value.code
    stdout, stderr = capsys.readouterr()
  assert code == 2
  assert stdout == ''
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and str(out) in lines[0] and 'error' in lines[0]


def test_demo4_runs_each_framework_and_says_how_far_apart(capsys):
  """Keras' rule is optax's (eps inside, v from 0, lr inside the buffer):
  the same points; TF1 (v from 1) and PyTorch (eps outside, lr after the
  buffer) end elsewhere, and the conclusion prints the distances."""
  from rmsprop_jax import demo

  runs = demo.demo4()
  out = capsys.readouterr().out
  np.testing.assert_allclose(
    runs['Keras'].params, runs['optax'].params, rtol=1e-6, atol=1e-9
  )
  ref = runs['optax'].params[-1]
  for name in ('TF1', 'PyTorch'):
    gap = np.linalg.norm(runs[name].params[-1] - ref)
    assert gap > 1e-4
    assert f'{gap:.2g}' in out
  # Each run is its preset's: PyTorch's from optax's rmsprop spelled out.
  by_hand = demo.run(
    rmsprop_jax.rmsprop(
      demo.CONVENTIONS_LR,
      decay=0.9,
      eps=1e-8,
      eps_in_sqrt=False,
      momentum=0.9,
      lr_in_momentum=False,
    ),
    demo.ravine,
    [10.0, 10.0],
    demo.CONVENTIONS_STEPS,
  )
  np.testing.assert_array_equal(runs['PyTorch'].params, by_hand.params)
  # The conclusion's extra run (optax's rule, the learning rate after the
  # buffer) is named as one that the table and figure do not show, with
  # its distance from optax's final point.
  lr_after = demo.run(
    rmsprop_jax.rmsprop(
      demo.CONVENTIONS_LR,
      decay=0.9,
      eps=1e-8,
      momentum=0.9,
      lr_in_momentum=False,
    ),
    demo.ravine,
    [10.0, 10.0],
    demo.CONVENTIONS_STEPS,
  ).params[-1]
  assert set(runs) == {'PyTorch', 'Keras', 'TF1', 'optax'}
  conclusion = out[out.index('Conclusion:') :]
  assert 'in neither the table nor the figure' in conclusion
  assert f'{np.linalg.norm(lr_after - ref):.2g} from optax' in conclusion


def _gd_steps_to_below_one(lr, x0=10.0, y0=10.0, limit=5000):
  """Plain gradient descent on 100 x**2 + y**2 in closed form: x and y
  shrink by (1 - 200 lr) and (1 - 2 lr) a step."""
  t = np.arange(limit + 1)
  f = 100 * (x0 * (1 - 200 * lr) ** t) ** 2 + (y0 * (1 - 2 * lr) ** t) ** 2
  return int(np.argmax(f < 1.0)) if (f < 1.0).any() else None


def test_demo2_conclusion_compares_what_it_says(capsys):
  """Demo 2 states SGD's rates and step counts, and its reason holds: the
  classic rate is ten times under the stability bound 2/200, a rate just
  over it diverges, and one just under it is about as fast as RMSprop."""
  from rmsprop_jax import demo

  demo.demo2()
  out = capsys.readouterr().out
  conclusion = out[out.index('Conclusion:') :]
  for lr in (demo.DEMO2_LR_SGD, demo.DEMO2_LR_SGD_TUNED):
    steps = _gd_steps_to_below_one(lr)
    assert f'lr {lr}' in conclusion and f'{steps} steps' in conclusion
  assert demo.DEMO2_LR_SGD * 10 == pytest.approx(2 / 200)
  assert abs(1 - 200 * demo.DEMO2_LR_SGD_UNSTABLE) > 1  # Diverges.
  assert abs(1 - 200 * demo.DEMO2_LR_SGD_TUNED) < 1  # Converges.
  rms = demo.run(
    rmsprop_jax.presets.hinton2012(learning_rate=demo.DEMO2_LR_RMSPROP),
    demo.ravine,
    [10.0, 10.0],
    1000,
  )
  rms_steps = int(np.argmax(rms.loss < 1.0))
  assert rms.loss[rms_steps] < 1.0 and f'{rms_steps} steps' in conclusion
  assert abs(_gd_steps_to_below_one(demo.DEMO2_LR_SGD_TUNED) - rms_steps) < 20
  # And what follows: RMSprop's steps stay about lr long, so it bounces back
  # above f = 1 and stays away from the minimum, where the tuned gradient
  # descent keeps converging (closed form: |1 - 200 lr| < 1, |1 - 2 lr| < 1).
  after = rms.loss[rms_steps:]
  assert after.max() > 1 and f'{after.max():.2g} at step' in conclusion
  assert rms.loss[-1] > 0.1
  lr = demo.DEMO2_LR_SGD_TUNED
  gd = (
    100 * (10 * (1 - 200 * lr) ** 1000) ** 2 + (10 * (1 - 2 * lr) ** 1000) ** 2
  )
  assert gd < 1e-6 and 'keeps converging' in conclusion


def test_effective_learning_rate_requires_what_the_state_does_not_hold():
  """The state does not record eps, its placement or bias correction; a
  guess gave other numbers silently (0.0316 for 0.0224), so they are
  required, and the answer is each transformation's step per unit
  gradient."""
  params = {'w': jnp.zeros(3)}
  g = {'w': jnp.array([0.5, -4.0, 1e-3])}
  cases = [
    (rmsprop_jax.presets.keras(1e-2, epsilon=1e-3), 1e-3, True, None),
    (rmsprop_jax.presets.pytorch(1e-2, eps=1e-3), 1e-3, False, None),
    (
      rmsprop_jax.rmsprop(
        1e-2, eps=1e-3, nu_dtype=jnp.bfloat16, stochastic_rounding=True
      ),
      1e-3,
      True,
      False,
    ),
  ]
  for tx, eps, inside, bias_correction in cases:
    updates, state = tx.update(g, tx.init(params), params)
    with pytest.raises(TypeError, match='eps'):
      diagnostics.effective_learning_rate(state, 1e-2)
    if bias_correction is not None:
      with pytest.raises(ValueError, match='bias_correction'):
        diagnostics.effective_learning_rate(
          state, 1e-2, eps=eps, eps_in_sqrt=inside
        )
    eff = diagnostics.effective_learning_rate(
      state, 1e-2, eps=eps, eps_in_sqrt=inside, bias_correction=bias_correction
    )
    np.testing.assert_allclose(
      eff['w'],
      -updates['w'] / g['w'],
      rtol=1e-2 if bias_correction is False else 1e-6,
    )


@pytest.mark.parametrize('centered', [False, True])
def test_bias_correction_false_on_a_bias_corrected_state_is_refused(centered):
  """A float32 state's step count comes only from bias_correction=True:
  False there would leave nu (and mu) uncorrected, a wrong number (here
  the true rate, optax's adam-like step per unit gradient, is asked for
  under jit too). A bfloat16 or 8-bit state's count may come from its
  rounding, so False stays allowed there."""
  params = {'w': jnp.zeros(3)}
  g = {'w': jnp.array([0.5, -4.0, 1e-3])}
  tx = rmsprop_jax.rmsprop(
    1e-2, eps=1e-3, bias_correction=True, centered=centered
  )
  updates, state = tx.update(g, tx.init(params), params)
  eff = functools.partial(
    diagnostics.effective_learning_rate, eps=1e-3, eps_in_sqrt=True
  )
  for call in (eff, jax.jit(eff, static_argnames='bias_correction')):
    with pytest.raises(ValueError, match='only bias_correction=True adds'):
      call(state, 1e-2, bias_correction=False)
  right = eff(state, 1e-2, bias_correction=True, decay=0.9)
  np.testing.assert_allclose(right['w'], -updates['w'] / g['w'], rtol=1e-6)
  for kwargs in (
    dict(nu_dtype=jnp.bfloat16, stochastic_rounding=True),
    dict(nu_dtype=jnp.uint8),
  ):
    tx = rmsprop_jax.rmsprop(1e-2, eps=1e-3, centered=centered, **kwargs)
    _, state = tx.update(g, tx.init(params), params)
    eff(state, 1e-2, bias_correction=False)  # No error.


def test_effective_learning_rate_refuses_what_would_be_a_wrong_number():
  params = {'w': jnp.zeros(2)}
  g = {'w': jnp.array([0.5, -4.0])}
  tx = rmsprop_jax.rmsprop(1e-2, eps=0.1)
  _, state = tx.update(g, tx.init(params), params)
  eff = functools.partial(diagnostics.effective_learning_rate, state, 1e-2)
  with pytest.raises(TypeError, match='eps_in_sqrt'):
    eff(eps=0.1, eps_in_sqrt=None)
  with pytest.raises(ValueError, match='eps'):
    eff(eps=-0.1, eps_in_sqrt=True)
  with pytest.raises(ValueError, match='decay is read only'):
    eff(eps=0.1, eps_in_sqrt=True, decay=0.9)
  with pytest.raises(ValueError, match='learning_rate'):
    diagnostics.effective_learning_rate(
      state, lambda count: 1e-2, eps=0.1, eps_in_sqrt=True
    )
  chained = optax.chain(tx, rmsprop_jax.rmsprop(1.0))
  _, two = chained.update(g, chained.init(params), params)
  with pytest.raises(ValueError, match='2 RMSprop moment states'):
    diagnostics.effective_learning_rate(two, 1e-2, eps=0.1, eps_in_sqrt=True)
  np.testing.assert_allclose(
    diagnostics.effective_learning_rate(
      two[0], 1e-2, eps=0.1, eps_in_sqrt=True
    )['w'],
    eff(eps=0.1, eps_in_sqrt=True)['w'],
  )
