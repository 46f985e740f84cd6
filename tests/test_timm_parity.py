"""``presets.timm`` against the real ``timm.optim.RMSpropTF``, in float64.

timm is installed with ``pip install --no-deps timm`` and its optimizer file
loaded without timm's package ``__init__`` (see ``conftest``). Gradients
depend on each side's own parameters, so any difference in the update rule
compounds over the steps.
"""

import numpy as np
import pytest

import rmsprop_jax

from conftest import timm_rmsprop_tf
from helpers import (
  assert_trajectories_close,
  bowl_problem,
  bowl_trajectory,
  learning_rates,
)
from test_torch_parity import SHAPES, STEPS, torch_trajectory


def timm_trajectory(kwargs, lrs, seed=0):
  return torch_trajectory(kwargs, lrs, seed, optimizer=timm_rmsprop_tf())


CASES = {
  'plain': dict(),
  'centered': dict(centered=True),
  'momentum': dict(momentum=0.9),
  'momentum, lr outside': dict(momentum=0.9, lr_in_momentum=False),
  'coupled weight decay': dict(weight_decay=0.1),
  'decoupled weight decay': dict(weight_decay=0.1, decoupled_decay=True),
  'corrected weight decay': dict(
    weight_decay=0.3, decoupled_decay=True, corrected_weight_decay=True
  ),
  'alpha, eps': dict(alpha=0.95, eps=1e-3),
  'caution': dict(momentum=0.9, caution=True),
  'caution, lr outside': dict(
    momentum=0.8, caution=True, lr_in_momentum=False, weight_decay=0.05
  ),
  'everything': dict(
    centered=True,
    momentum=0.9,
    weight_decay=0.01,
    decoupled_decay=True,
    alpha=0.95,
    eps=1e-6,
    foreach=True,
  ),
  'centered, momentum outside, coupled': dict(
    centered=True,
    momentum=0.5,
    lr_in_momentum=False,
    weight_decay=0.05,
    foreach=False,
  ),
}


@pytest.mark.parametrize('name', CASES)
@pytest.mark.parametrize(
  'lr_changes', [False, True], ids=['constant_lr', 'lr_every_step']
)
def test_preset_matches_timm(name, lr_changes, x64):
  kwargs = CASES[name]
  lrs, lr = learning_rates(STEPS, lr_changes)
  ref = timm_trajectory(kwargs, lrs)
  extra = (
    {'max_lr': float(lrs[0])}
    if lr_changes and kwargs.get('corrected_weight_decay')
    else {}
  )
  ours = bowl_trajectory(
    rmsprop_jax.presets.timm(lr=lr, **kwargs, **extra),
    bowl_problem(SHAPES, STEPS),
  )
  assert_trajectories_close(ours, ref)


def test_the_comparison_tells_the_options_apart(x64):
  """Each option changes timm's trajectory: the test above would notice a
  preset that ignored it."""
  lrs, lr = learning_rates(STEPS, True)
  base = dict(momentum=0.9, weight_decay=0.3, decoupled_decay=True)
  ref = timm_trajectory(base, lrs)
  for change in (
    dict(lr_in_momentum=False),
    dict(decoupled_decay=False),
    dict(caution=True),
    dict(corrected_weight_decay=True),
  ):
    other = timm_trajectory({**base, **change}, lrs)
    assert max(np.max(np.abs(a - b)) for a, b in zip(other[-1], ref[-1])) > 1e-6


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(caution=True), 'caution=True has no effect without momentum'),
    (
      dict(corrected_weight_decay=True, weight_decay=0.1),
      'without decoupled_decay=True',
    ),
    (
      dict(
        lr=lambda t: 0.1,
        weight_decay=0.1,
        decoupled_decay=True,
        corrected_weight_decay=True,
      ),
      'needs max_lr',
    ),
    (dict(max_lr=0.1), 'max_lr is only read'),
    (dict(alpha=1.0), 'presets.timm'),
    (dict(lr='0.01'), 'presets.timm: `lr`'),
    (dict(momentum=None), 'presets.timm: `momentum`'),
    (dict(foreach='yes'), 'foreach'),
  ],
)
def test_refuses_what_timm_would_not_do(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    rmsprop_jax.presets.timm(**kwargs)
