"""Every example runs end to end in its quick mode (as CI does)."""

import importlib
import pathlib
import sys

import numpy as np
import pytest

from conftest import require

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def _example(name):
  for module in ('flax', 'sklearn', 'tqdm', 'matplotlib'):
    require(module)
  sys.path.insert(0, str(EXAMPLES))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(str(EXAMPLES))


def _record_progress(monkeypatch, module):
  """Replaces the example's progress bar with one that records its count
  after every move: a list of (count, total)."""
  seen = []

  class Recorder(sys.modules['_common'].StepBar):
    def update(self, n=1):
      moved = super().update(n)
      seen.append((self.n, self.total))
      return moved

  monkeypatch.setattr(module, 'StepBar', Recorder)
  return seen


def _assert_follows_steps(seen, total_steps, runs):
  """The bar counted every training step, rising steadily: many more moves
  than the number of runs (each run moves it once at its end), so it also
  moved while a jitted loop ran."""
  counts = [n for n, _ in seen]
  assert {t for _, t in seen} == {total_steps}
  assert counts == sorted(counts) and counts[-1] == total_steps
  assert len(set(counts)) >= 10 * runs


def test_digits_nnx(tmp_path, monkeypatch):
  module = _example('digits_nnx')
  seen = _record_progress(monkeypatch, module)
  results = module.main(['--quick', '--out', str(tmp_path)])
  _assert_follows_steps(seen, 3 * 3 * (1347 // 32), runs=3)
  ours = results['rmsprop_jax.rmsprop(1e-3)']
  ref = results['optax.rmsprop(1e-3)']
  np.testing.assert_array_equal(ours[0], ref[0])  # Same losses, bit for bit.
  assert ours[2] > 0.5  # It learned (10 classes: chance is 0.1).
  assert (tmp_path / 'digits_nnx.png').exists()


def test_digits_linen_trainstate(tmp_path, monkeypatch):
  module = _example('digits_linen')
  seen = _record_progress(monkeypatch, module)
  results = module.main(['--quick', '--out', str(tmp_path)])
  _assert_follows_steps(seen, 2 * 2 * (1347 // module.BATCH), runs=2)
  ours, ref = results['rmsprop_jax.rmsprop'], results['optax.rmsprop']
  np.testing.assert_array_equal(ours[0], ref[0])  # Same losses, bit for bit.
  assert ours[2] > 0.5  # It learned (10 classes: chance is 0.1).
  assert len(ours[3]) == 2 and all(  # One finite, positive summary an epoch.
    np.isfinite(v) and v > 0 for e in ours[3] for v in e.values()
  )
  assert (tmp_path / 'digits_linen.png').exists()
  # The epoch's summary (one jitted program) is the effective learning rate
  # of the example's centered RMSprop, lr / sqrt(nu - mu**2 + eps), on the
  # state after a step: every layer, in NumPy's float64 from the stored
  # moments (the example computes in float32, hence float32's rtol).
  import jax
  import optax

  import rmsprop_jax

  x, _, y, _ = module.load(0)
  state = module.create_state(
    rmsprop_jax.rmsprop, optax.constant_schedule(1e-3), x, 0
  )
  state, _ = module.train_step(state, x[: module.BATCH], y[: module.BATCH])
  got = module.lr_summary(state.opt_state, 1e-3)
  nu, mu = (optax.tree.get(state.opt_state, k) for k in ('nu', 'mu'))
  want = {}
  for (path, n), m in zip(
    jax.tree_util.tree_flatten_with_path(nu)[0], jax.tree.leaves(mu)
  ):
    n, m = np.asarray(n, np.float64), np.asarray(m, np.float64)
    rate = 1e-3 / np.sqrt(np.maximum(n - m * m, 0) + module.EPS)
    want[jax.tree_util.keystr(path, simple=True, separator='/')] = {
      'min': rate.min(),
      'median': np.median(rate),
      'max': rate.max(),
    }
  assert list(got) == list(want) and len(got) == 8
  for layer in want:
    for stat in ('min', 'median', 'max'):
      np.testing.assert_allclose(
        got[layer][stat], want[layer][stat], rtol=1e-6, err_msg=layer
      )


def test_adding_gru(tmp_path, monkeypatch):
  module = _example('adding_gru')
  seen = _record_progress(monkeypatch, module)
  results = module.main(['--quick', '--out', str(tmp_path)])
  _assert_follows_steps(seen, 2 * 200, runs=2)
  graves = results['Graves 2013 (centered, momentum 0.9)']
  for r in results.values():
    assert r['losses'].shape == (2, 2, 200) and np.isfinite(r['losses']).all()
    assert np.median(r['final'][r['best']]) < module.BASELINE / 4  # Learned.
  # The grid's Graves runs are Graves's rule: optax.rmsprop with the same
  # hyperparameters (no negative variance arises, so the clamp is inactive).
  import jax.numpy as jnp
  import optax

  ref = module.make_trainer(
    lambda lr: optax.rmsprop(
      lr, decay=0.95, eps=1e-4, centered=True, momentum=0.9
    ),
    10,
    16,
    32,
    200,
  )(jnp.array([1e-3, 1e-2]), jnp.arange(2))
  np.testing.assert_array_equal(graves['losses'], ref)
  assert (tmp_path / 'adding_gru.png').exists()


def test_online_drift(tmp_path, monkeypatch):
  module = _example('online_drift')
  seen = _record_progress(monkeypatch, module)
  results = module.main(['--quick', '--out', str(tmp_path)])
  _assert_follows_steps(seen, 4 * 5000, runs=4)
  tune = 500
  for scenario in module.SCENARIOS:
    _, err, eff, _ = results[scenario, 'AdaGrad']
    assert np.all(np.diff(eff[1:]) <= 1e-9)  # AdaGrad's rate never rises.
    assert np.isfinite(err).all()
  # The example's point: when the gradient scale changes, even AdaGrad's best
  # learning rate in hindsight tracks worse than RMSprop's tuned one.
  scenario = 'weights and input scale jump'
  rms = results[scenario, 'RMSprop (decay 0.99)']
  assert results[scenario, 'AdaGrad'][3] > 1.5 * rms[1][tune:].mean()
  assert (tmp_path / 'online_drift.png').exists()


def test_port_from_pytorch(tmp_path, monkeypatch):
  """The continued JAX run follows PyTorch's to float32 round-off; the run
  with its optimizer state reset leaves it at once."""
  require('torch')
  module = _example('port_from_pytorch')
  seen = _record_progress(monkeypatch, module)
  r = module.main(['--quick', '--out', str(tmp_path)])
  steps = 2 * (1347 // 32)
  _assert_follows_steps(seen, steps // 2 + 3 * (steps - steps // 2), runs=1)
  assert r['gap'] < 1e-5  # Measured: 4.5e-7.
  np.testing.assert_allclose(r['imported'], r['rest'], rtol=1e-5)
  assert r['jump'] > 1.1  # Measured: 1.3 (1.9 in the full run).
  assert not np.allclose(r['reset'], r['rest'], rtol=1e-2)
  assert r['rest'][-1] < r['first'][0] / 2  # It learned.
  assert (tmp_path / 'port_from_pytorch.png').exists()


def test_checkpoint_resume_is_bit_identical(tmp_path, monkeypatch):
  require('orbax.checkpoint')
  module = _example('checkpoint_resume')
  seen = _record_progress(monkeypatch, module)
  identical, full, resumed = module.main(['--quick', '--out', str(tmp_path)])
  _assert_follows_steps(seen, 2 * 40, runs=1)
  assert identical
  for a, b in zip(*(sorted(t.items()) for t in (full, resumed))):
    np.testing.assert_array_equal(a[1], b[1])


def test_sweep_heatmap_cells_match_single_optax_runs(tmp_path, monkeypatch):
  module = _example('sweep_heatmap')
  seen = _record_progress(monkeypatch, module)
  lrs, decays, losses, tail_means = module.main(
    ['--quick', '--out', str(tmp_path)]
  )
  _assert_follows_steps(seen, 20, runs=1)
  assert losses.shape == tail_means.shape == (lrs.size, decays.size)
  assert (tmp_path / 'sweep_heatmap.png').exists()
  # One cell of the vmapped grid against a plain optax.rmsprop run.
  import jax
  import jax.numpy as jnp
  import optax
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
  i, j = 4, 2
  tx = optax.rmsprop(float(lrs[i]), decay=float(decays[j]))
  params = {'w': jnp.zeros((64, 10)), 'b': jnp.zeros(10)}
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    x @ p['w'] + p['b'], y
  ).mean()
  state = tx.init(params)
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    params = optax.apply_updates(params, updates)
  # float32 rounding only (measured: 1 ulp): the grid passes lr and decay as
  # float32 arrays, the reference as Python floats.
  np.testing.assert_allclose(losses[i, j], loss_fn(params), rtol=1e-6)


def test_sharded_training_on_eight_devices(tmp_path):
  """Runs in its own process: the example needs 8 (simulated) devices.
  Then as 2 JAX processes of 4 devices (``--processes 2``, which starts
  two more interpreters): the same losses up to the order of the sums."""
  import os
  import subprocess

  for module in ('flax', 'sklearn', 'tqdm', 'matplotlib', 'orbax.checkpoint'):
    require(module)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  blocker = tmp_path / 'blocker'  # A folder inside a file cannot be made.
  blocker.write_text('')
  script = (
    'import sys, json, numpy as np\n'
    f'sys.path.insert(0, {str(EXAMPLES)!r})\n'
    'import sharded_training as ex\n'
    'try:\n'
    f'  ex.main(["--quick", "--out", {str(blocker / "sub")!r}])\n'
    'except SystemExit as e:\n'
    '  print("BAD OUT EXIT", e.code)\n'
    'try:\n'
    '  ex.main(["--processes", "3"])\n'
    'except SystemExit as e:\n'
    '  print("BAD PROCESSES EXIT", e.code)\n'
    f'r = ex.main(["--quick", "--out", {str(tmp_path)!r}])\n'
    f'r2 = ex.main(["--quick", "--out", {str(tmp_path / "two")!r},\n'
    '               "--processes", "2"])\n'
    'res = r["results"]\n'
    'gap2 = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))\n'
    '           for a, b in [(r2["results"][m]["losses"], res[m]["losses"])\n'
    '                        for m in res] + [(r2["resumed"], r["resumed"])])\n'
    'print("RESULT", json.dumps(dict(\n'
    '    same=bool(r["same_losses"]), exact=bool(r["restored_exact"]),\n'
    '    placed=bool(r["restored_placed"]),\n'
    '    gap=float(np.max(np.abs(r["resumed"] - r["continued"]))),\n'
    '    first=float(res["ZeRO-1"]["losses"][0]),\n'
    '    last=float(res["ZeRO-1"]["losses"][-1]),\n'
    '    state={m: v["state_bytes"] for m, v in res.items()},\n'
    '    collectives={m: v["collectives"] for m, v in res.items()},\n'
    '    two=[r2["same_losses"], r2["restored_exact"],\n'
    '         r2["restored_placed"], gap2,\n'
    '         {m: v["state_bytes"] for m, v in r2["results"].items()}])))\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', script],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  # A bad --out stops it at once: exit status 2, the one-line error first.
  assert out.stdout.startswith('BAD OUT EXIT 2\n')
  assert 'error: --out ' in out.stderr.splitlines()[0]
  assert 'BAD PROCESSES EXIT 2\n' in out.stdout
  assert 'error: --processes 3' in out.stderr.splitlines()[1]
  import json

  r = json.loads(out.stdout.split('RESULT ', 1)[1].splitlines()[0])
  assert r['same'] and r['exact'] and r['placed']
  assert r['last'] < r['first'] / 5  # It learned.
  # Continuing on a 2 x 4 mesh matches continuing on the 4 x 2 one, up to
  # the order of the gradient sums.
  assert r['gap'] < 1e-5
  # ZeRO-1 over 4 data-parallel replicas: a quarter of the state a device.
  full, zero1 = r['state']['state follows params'], r['state']['ZeRO-1']
  assert zero1 * 4 == pytest.approx(full, rel=0.02)
  assert r['collectives']['ZeRO-1'] == ['all-gather', 'all-reduce']
  assert r['collectives']['state follows params'] == ['all-reduce']
  assert (tmp_path / 'sharded_training.png').exists()
  # As 2 processes: the same run, the same memory per device, and the
  # losses up to the order of the gradient sums across processes (measured:
  # 6e-8 at most, on 14 of 30 steps; 2 and 4 processes agree bit for bit).
  same, exact, placed, gap2, state = r['two']
  assert same and exact and placed
  assert gap2 < 1e-6
  assert state == r['state']
  assert (tmp_path / 'two' / 'sharded_training.png').exists()


EXAMPLE_NAMES = sorted(
  p.stem for p in EXAMPLES.glob('*.py') if not p.stem.startswith('_')
)


def test_example_refuses_a_bad_out_before_any_work(tmp_path):
  """Like the demo: one line on stderr, exit status 2, no training first."""
  import subprocess

  out = tmp_path / 'figures.png'
  out.write_text('not a folder')
  result = subprocess.run(
    [sys.executable, str(EXAMPLES / 'sweep_heatmap.py'), '--out', str(out)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and str(out) in lines[0] and 'error' in lines[0]


# sharded_training needs 8 devices from its import on: its own subprocess
# test checks its --out the same way.
@pytest.mark.parametrize(
  'example', [e for e in EXAMPLE_NAMES if e != 'sharded_training']
)
def test_every_example_checks_out_first(tmp_path, example, capsys):
  """The same check in each example (in this process: the subprocess above
  shows the command line), before any training or printing."""
  module = _example(example)
  blocker = tmp_path / 'blocker'
  blocker.write_text('')
  with pytest.raises(SystemExit) as exit_info:
    module.main(['--out', str(blocker / 'sub')])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert str(blocker / 'sub') in captured.err and 'error' in captured.err
