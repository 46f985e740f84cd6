"""``presets.pytorch`` and ``rmsprop`` against the real ``torch.optim.RMSprop``.

Everything runs in float64, with gradients that depend on each side's own
parameters, so any difference in the update rule compounds over the steps.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

from conftest import require
from helpers import (
  assert_trajectories_close,
  bowl_grads,
  bowl_problem,
  bowl_trajectory,
  learning_rates,
)

STEPS = 30
SHAPES = [(5, 3), (7,), ()]


def torch_trajectory(kwargs, lrs, seed=0, optimizer=None):
  """Parameters after each step of ``optimizer`` (``torch.optim.RMSprop``
  by default; timm's ``RMSpropTF`` in test_timm_parity) on the bowl, with
  the learning rate set to ``lrs[t]`` before step ``t``. Built with
  ``lrs[0]``, as a scheduler leaves it: timm's corrected weight decay
  divides by that rate."""
  torch = require('torch')
  params, targets, noise = bowl_problem(SHAPES, STEPS, seed)
  ps = [
    torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params
  ]
  opt = (optimizer or torch.optim.RMSprop)(ps, lr=float(lrs[0]), **kwargs)
  out = []
  for t in range(STEPS):
    with torch.no_grad():
      gs = bowl_grads(
        ps, targets, noise[t], lambda a: torch.tensor(a, dtype=torch.float64)
      )
    for p, g in zip(ps, gs):
      p.grad = g
    for group in opt.param_groups:
      group['lr'] = float(lrs[t])
    opt.step()
    out.append([p.detach().numpy().copy() for p in ps])
  return out


def ours_trajectory(tx, seed=0):
  return bowl_trajectory(tx, bowl_problem(SHAPES, STEPS, seed))


CASES = {
  'plain': dict(),
  'centered': dict(centered=True),
  'momentum': dict(momentum=0.9),
  'weight_decay': dict(weight_decay=0.1),
  'maximize': dict(maximize=True),
  'alpha_eps': dict(alpha=0.9, eps=1e-3),
  'centered_momentum_wd': dict(centered=True, momentum=0.5, weight_decay=0.05),
  'everything': dict(
    centered=True,
    momentum=0.9,
    weight_decay=0.01,
    maximize=True,
    alpha=0.95,
    eps=1e-6,
  ),
}


@pytest.mark.parametrize('name', CASES)
@pytest.mark.parametrize(
  'lr_changes', [False, True], ids=['constant_lr', 'lr_every_step']
)
def test_preset_matches_torch(name, lr_changes, x64):
  kwargs = CASES[name]
  lrs, lr = learning_rates(STEPS, lr_changes)
  ref = torch_trajectory(kwargs, lrs)
  ours = ours_trajectory(rmsprop_jax.presets.pytorch(lr=lr, **kwargs))
  assert_trajectories_close(ours, ref)


def test_lr_placement_matters_for_a_schedule(x64):
  # The TF/optax placement (lr inside the buffer) is *not* PyTorch's once the
  # learning rate changes: the comparison above can tell them apart.
  lrs = np.linspace(0.05, 0.001, STEPS)
  lr = lambda count: jnp.asarray(lrs)[count]
  ref = torch_trajectory(dict(momentum=0.9), lrs)
  inside = ours_trajectory(
    rmsprop_jax.rmsprop(lr, decay=0.99, eps_in_sqrt=False, momentum=0.9)
  )
  with pytest.raises(AssertionError):
    assert_trajectories_close(inside, ref)


def test_rmsprop_keywords_spell_out_the_preset(x64):
  lrs, lr = learning_rates(STEPS, changing=True)
  ref = torch_trajectory(
    dict(momentum=0.9, weight_decay=0.1, centered=True), lrs
  )
  ours = ours_trajectory(
    rmsprop_jax.rmsprop(
      lr,
      decay=0.99,
      eps=1e-8,
      eps_in_sqrt=False,
      centered=True,
      momentum=0.9,
      lr_in_momentum=False,
      weight_decay=0.1,
    )
  )
  assert_trajectories_close(ours, ref)


def test_preset_takes_every_argument_of_torchs_constructor():
  """``torch.optim.RMSprop``'s own signature, read from PyTorch: every
  argument (those for PyTorch's kernels accepted and ignored) with its
  default, in its order; numeric defaults are floats, so that
  ``optax.inject_hyperparams`` injects float32, not int32."""
  import inspect

  torch = require('torch')
  theirs = inspect.signature(torch.optim.RMSprop.__init__).parameters
  ours = inspect.signature(rmsprop_jax.presets.pytorch).parameters
  names = [n for n in theirs if n not in ('self', 'params')]
  assert [n for n in ours if n in theirs] == names
  for name in names:
    assert ours[name].default == theirs[name].default, name
    if isinstance(theirs[name].default, (int, float)) and not isinstance(
      theirs[name].default, bool
    ):
      assert isinstance(ours[name].default, float), name
  kernels = dict(capturable=True, foreach=True, differentiable=True, fused=True)
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, -4.0])}
  plain = rmsprop_jax.presets.pytorch(lr=0.1, momentum=0.9)
  with_kernels = rmsprop_jax.presets.pytorch(lr=0.1, momentum=0.9, **kernels)
  np.testing.assert_array_equal(
    plain.update(grads, plain.init(params), params)[0]['w'],
    with_kernels.update(grads, with_kernels.init(params), params)[0]['w'],
  )
  injected = optax.inject_hyperparams(rmsprop_jax.presets.pytorch)(lr=0.1)
  hyper = injected.init(params).hyperparams
  assert {k: hyper[k].dtype for k in ('weight_decay', 'momentum')} == {
    'weight_decay': jnp.float32,
    'momentum': jnp.float32,
  }
