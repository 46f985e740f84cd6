"""Several JAX processes on one machine: 8 CPU devices in all, in 2 or 4
processes (or 1), on a ``data x model`` mesh that spans them.

Each test launches N fresh interpreters running ``_multiprocess_worker.py``
(JAX's multi-controller runtime: ``jax.distributed.initialize`` on
localhost); this process never touches their JAX state. Every worker runs
the optimizer on the mesh, gathers the results and compares them with
runs on one local device (the first phase runs them and writes them for
the later ones: the same program from the same values), for the default,
centered with momentum, bfloat16 with stochastic rounding and the 8-bit
state, with the state sharded like the parameters and with ZeRO-1, and
for ``optax.rmsprop``. Orbax checkpoints saved by 2 processes on a 4 x 2 mesh
are restored by 4 on a 2 x 4 mesh (optax's state into ours and back
included), continued and saved again; those are restored by 1 process on an
8 x 1 mesh and continued. Each launch is bounded in time; on a failure or a
timeout every worker is stopped, and the failure shows every worker's log.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from conftest import require

pytestmark = pytest.mark.multiprocess

WORKER = pathlib.Path(__file__).resolve().parent / '_multiprocess_worker.py'
ROOT = WORKER.parent.parent
TIMEOUT_S = 240  # Per launch; a launch takes 10-40 s on 2 quiet cores.
K = 3  # Steps per phase.
# Each phase: processes, mesh (data x model), and what it does. The first
# (``refs``) runs the one-device references up to the last phase's last
# step and writes them for the others.
PHASES = {
  'two': dict(processes=2, mesh='4x2', fresh=True, save=True, refs=True),
  'four': dict(
    processes=4, mesh='2x4', fresh=True, restore='two', start=K, save=True
  ),
  'one': dict(processes=1, mesh='8x1', restore='four', start=2 * K),
}
LAST_STEP = max(spec.get('start', 0) + K for spec in PHASES.values())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _worker_env() -> dict:
  """This environment without a simulated device count (each worker sets
  its own), on the CPU, with this checkout importable."""
  env = dict(os.environ)
  flags = [
    f
    for f in env.get('XLA_FLAGS', '').split()
    if not f.startswith('--xla_force_host_platform_device_count')
  ]
  env['XLA_FLAGS'] = ' '.join(flags)
  if not flags:
    del env['XLA_FLAGS']
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
    [str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p]
  )
  return env


def _stop(procs):
  """Terminate, wait, kill: the logs survive, nothing is left running."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + 5
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _logs(logs) -> str:
  return '\n'.join(
    f'----- worker {i} log ({log}), last 4000 characters -----\n'
    + log.read_text(errors='replace')[-4000:]
    for i, log in enumerate(logs)
  )


def launch(folder: pathlib.Path, processes: int, args: list[str]):
  """Runs N workers; returns their reports (one dict per process), or
  fails with every worker's log if one fails or the launch times out."""
  folder.mkdir(parents=True, exist_ok=True)
  port = _free_port()
  env = _worker_env()
  procs, logs, outs = [], [], []
  try:
    for i in range(processes):
      logs.append(folder / f'worker{i}.log')
      outs.append(folder / f'worker{i}.json')
      with open(logs[-1], 'w') as log:
        procs.append(
          subprocess.Popen(
            [sys.executable, str(WORKER)]
            + ['--processes', str(processes), '--process-id', str(i)]
            + ['--port', str(port), '--out', str(outs[-1])]
            + args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
          )
        )
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if failed:
        _stop(procs)
        pytest.fail(
          f'worker(s) {failed} exited with '
          f'{[procs[i].returncode for i in failed]}; the others were '
          f'stopped.\n{_logs(logs)}'
        )
      if time.monotonic() > deadline:
        _stop(procs)
        pytest.fail(f'timed out after {TIMEOUT_S} s.\n{_logs(logs)}')
      time.sleep(0.2)
    codes = [p.returncode for p in procs]
    assert codes == [0] * processes, f'exit codes {codes}\n{_logs(logs)}'
  finally:
    _stop(procs)
  reports = [json.loads(out.read_text()) for out in outs]
  return reports, _logs(logs)


class Phases:
  """Runs each phase once, the first time a test needs it (a phase
  restores an earlier one's checkpoints), and remembers how it went."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.done = {}  # name -> (reports, logs), or False if it failed.

  def run(self, name):
    if name in self.done:
      if not self.done[name]:
        pytest.fail(f'phase {name!r} failed (see its test)')
      return self.done[name]
    self.done[name] = False
    spec = PHASES[name]
    args = ['--mesh', spec['mesh'], '--steps', str(K)]
    if spec.get('fresh'):
      args.append('--fresh')
    if spec.get('restore'):
      before = spec['restore']
      try:
        self.run(before)
      except (pytest.fail.Exception, pytest.skip.Exception):
        pytest.skip(f'needs the checkpoints of phase {before!r}, which failed')
      args += ['--restore', str(self.root / before / 'ckpt')]
      args += ['--start', str(spec['start'])]
    if spec.get('save'):
      args += ['--save', str(self.root / name / 'ckpt')]
    refs = self.root / 'one_device_runs.pickle'
    if spec.get('refs'):
      args += ['--write-refs', str(refs), '--ref-steps', str(LAST_STEP)]
    else:  # A later phase: the first one ran (it restores its checkpoints).
      args += ['--refs', str(refs)]
    self.done[name] = launch(self.root / name, spec['processes'], args)
    return self.done[name]


@pytest.fixture(scope='module')
def phases(tmp_path_factory):
  require('orbax.checkpoint')  # The workers' checkpoints.
  return Phases(tmp_path_factory.mktemp('multiprocess'))


OURS = ['default', 'centered_momentum', 'bf16_sr', 'uint8']
OPTAX = ['optax', 'optax_centered_momentum']
SAVED = OURS + ['optax']
MODES = ['sharded', 'zero1']
FRESH = [f'{n}/{m}' for n in OURS + OPTAX for m in MODES] + [
  f'{ours} is {theirs}/{m}'
  for ours, theirs in (
    ('default', 'optax'),
    ('centered_momentum', 'optax_centered_momentum'),
  )
  for m in MODES
]
RESTORE = [f'restore {n}' for n in SAVED] + [
  'restore optax as default',
  'restore default as optax',
]
SAVE = [f'save {n}' for n in SAVED]


def _check(phases, name, expect):
  """The phase ran exactly the checks ``expect`` lists, on every process,
  and each passed."""
  reports, logs = phases.run(name)
  assert all(r.keys() == reports[0].keys() for r in reports), logs
  assert sorted(reports[0]) == sorted(expect), logs
  failed = {
    (i, check): status
    for i, r in enumerate(reports)
    for check, status in r.items()
    if not status.startswith('ok')
  }
  assert not failed, (
    '\n'.join(f'process {i}, {c}: {s}' for (i, c), s in failed.items())
    + '\n'
    + logs
  )
  return reports[0]


def test_two_processes_match_one_device_and_save(phases):
  """2 processes of 4 devices, mesh 4 x 2 ('data' across processes)."""
  _check(phases, 'two', FRESH + SAVE)


def test_four_processes_match_one_device_and_restore_two(phases):
  """4 processes of 2 devices, mesh 2 x 4 ('model' across processes);
  restores the 2-process checkpoints, continues, saves."""
  _check(phases, 'four', FRESH + RESTORE + SAVE)


def test_one_process_restores_four(phases):
  """1 process of 8 devices, mesh 8 x 1, from the 4-process checkpoints."""
  _check(phases, 'one', RESTORE)


def test_8bit_state(phases):
  """The 8-bit state ran in every phase: sharded and ZeRO-1 with 2 and 4
  processes, saved twice, restored twice."""
  statuses = {
    f'{name}: {check}': status
    for name in PHASES
    for check, status in phases.run(name)[0][0].items()
    if 'uint8' in check
  }
  assert len(statuses) == 8, statuses
  assert all(s.startswith('ok') for s in statuses.values()), statuses
