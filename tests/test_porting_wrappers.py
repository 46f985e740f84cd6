"""What frameworks do around their RMSprop step, ported exactly or refused.

Keras' ``clipnorm`` (each variable on its own), ``global_clipnorm``,
``clipvalue``, ``exclude_from_weight_decay`` and ``use_ema``; a learning rate
set from outside (Keras' ``optimizer.learning_rate = ...``, timm's
``group['lr'] = ...``, optax's ``inject_hyperparams`` + ``tree_set``); a
PyTorch scheduler carried across a port; and the checks of
``import_keras_state``, which must accept the exact port and refuse the
others. float64 against the real frameworks, over several steps with a
changing learning rate; agreement is float64 round-off (``rtol=1e-12``).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import porting, presets

from conftest import require, timm_rmsprop_tf
from helpers import assert_trajectories_close, bowl_grads, bowl_problem

STEPS = 8
SHAPES = [(4, 3), (6,), ()]
NAMES = ['dense_kernel', 'dense_bias', 'gain']  # Keras variable paths.
LRS = np.random.default_rng(7).uniform(0.005, 0.05, 2 * STEPS)


def keras_setup(keras, kwargs, steps, exclude=None, assign_lr=False):
  """A real Keras RMSprop on the bowl of ``steps`` steps, its learning rate
  LRS[t] at step t: from a schedule, or assigned from outside before each
  step. Returns (optimizer, variables, run(steps) -> parameters after each
  step, (targets, noise))."""
  params, targets, noise = bowl_problem(SHAPES, steps)
  variables = [
    keras.Variable(p, dtype='float64', name=n) for p, n in zip(params, NAMES)
  ]
  table = np.asarray(LRS)

  class Table(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
      return keras.ops.take(keras.ops.convert_to_tensor(table), step)

  opt = keras.optimizers.RMSprop(
    learning_rate=float(LRS[0]) if assign_lr else Table(), **kwargs
  )
  if exclude:
    opt.exclude_from_weight_decay(var_names=exclude)
  opt.build(variables)

  def run(steps):
    out = []
    for t in steps:
      if assign_lr:
        opt.learning_rate = float(LRS[t])
      grads = bowl_grads([v.value for v in variables], targets, noise[t])
      opt.apply_gradients(zip(grads, variables))
      out.append([np.asarray(v.value) for v in variables])
    return out

  return opt, variables, run, (targets, noise)


def keras_run(keras, kwargs, exclude=None, assign_lr=False):
  """Parameters after each of STEPS steps of Keras, and the optimizer."""
  opt, _, run, _ = keras_setup(keras, kwargs, STEPS, exclude, assign_lr)
  return run(range(STEPS)), opt


def ours_run(tx, steps=STEPS, set_lr=None):
  """The same bowl with ``tx``; ``set_lr(state, lr)`` sets the rate from
  outside before each step (else ``tx`` holds it)."""
  params, targets, noise = bowl_problem(SHAPES, steps)
  params = [jnp.asarray(p) for p in params]
  state = tx.init(params)
  out = []
  for t in range(steps):
    if set_lr is not None:
      state = set_lr(state, float(LRS[t]))
    grads = bowl_grads(params, targets, noise[t])
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append([np.asarray(p) for p in params])
  return out


SCHEDULE = lambda count: jnp.asarray(LRS)[count]

# Keras' arguments -> the documented port of the same run.
CLIPS = {
  'clipnorm': (
    dict(clipnorm=1.0, momentum=0.5),
    lambda: optax.chain(
      rmsprop_jax.clip_by_norm(1.0), presets.keras(SCHEDULE, momentum=0.5)
    ),
  ),
  'global_clipnorm': (
    dict(global_clipnorm=1.0, momentum=0.5),
    lambda: optax.chain(
      optax.clip_by_global_norm(1.0), presets.keras(SCHEDULE, momentum=0.5)
    ),
  ),
  'clipvalue': (
    dict(clipvalue=0.5, centered=True),
    lambda: optax.chain(
      optax.clip(0.5), presets.keras(SCHEDULE, centered=True)
    ),
  ),
}


@pytest.mark.parametrize('name', CLIPS)
def test_keras_clipping_ports_exactly(keras64, name):
  kwargs, port = CLIPS[name]
  theirs = keras_run(keras64, kwargs)[0]
  assert_trajectories_close(ours_run(port()), theirs)
  # The clip acts on this run: without it the run is elsewhere.
  bare = {k: v for k, v in kwargs.items() if 'clip' not in k}
  unclipped = ours_run(presets.keras(SCHEDULE, **bare))
  assert np.max(np.abs(unclipped[-1][0] - theirs[-1][0])) > 1e-3


def test_keras_clipnorm_is_per_variable_not_global(keras64):
  """Two variables whose gradients start at norms 13 and 0.5 (a bowl, so
  they change with the parameters), clipnorm 1, momentum 0.5, 5 steps: Keras
  clips each on its own; the global-norm clip once documented for it ends
  elsewhere (and is Keras' global_clipnorm)."""
  keras = keras64
  targets = [np.array([-2.5, -6.0]), np.array([-0.15, -0.2])]
  grad = lambda params: [2.0 * (p - t) for p, t in zip(params, targets)]

  def keras_end(**clip):
    variables = [keras.Variable(np.zeros(2), dtype='float64') for _ in targets]
    opt = keras.optimizers.RMSprop(0.1, momentum=0.5, **clip)
    for _ in range(5):
      grads = grad([v.value for v in variables])
      opt.apply_gradients(zip(grads, variables))
    return np.concatenate([np.asarray(v.value) for v in variables])

  def ours_end(clip):
    tx = optax.chain(clip, presets.keras(0.1, momentum=0.5))
    params = [jnp.zeros(2, jnp.float64) for _ in targets]
    state = tx.init(params)
    for _ in range(5):
      updates, state = tx.update(grad(params), state)
      params = optax.apply_updates(params, updates)
    return np.concatenate([np.asarray(p) for p in params])

  per_variable = keras_end(clipnorm=1.0)
  np.testing.assert_allclose(
    ours_end(rmsprop_jax.clip_by_norm(1.0)), per_variable, rtol=1e-12
  )
  global_clip = ours_end(optax.clip_by_global_norm(1.0))
  np.testing.assert_allclose(
    global_clip, keras_end(global_clipnorm=1.0), rtol=1e-12
  )
  assert np.max(np.abs(global_clip - per_variable)) > 0.01


@pytest.mark.parametrize('assign_lr', [False, True], ids=['schedule', 'set'])
def test_keras_weight_decay_exclusion_and_an_lr_set_from_outside(
  keras64, assign_lr
):
  """exclude_from_weight_decay is weight_decay_mask; the decoupled decay
  follows a learning rate set from outside (Keras assigns it, optax injects
  it) as it follows a schedule."""
  kwargs = dict(weight_decay=0.1, momentum=0.9)
  theirs = keras_run(keras64, kwargs, exclude=['bias'], assign_lr=assign_lr)[0]
  mask = [True, False, True]
  if assign_lr:
    tx = optax.inject_hyperparams(presets.keras)(
      learning_rate=float(LRS[0]), weight_decay_mask=mask, **kwargs
    )
    set_lr = lambda state, lr: optax.tree.set(state, learning_rate=lr)
  else:
    tx, set_lr = presets.keras(SCHEDULE, weight_decay_mask=mask, **kwargs), None
  assert_trajectories_close(ours_run(tx, set_lr=set_lr), theirs)
  unmasked = ours_run(presets.keras(SCHEDULE, **kwargs))
  assert np.max(np.abs(unmasked[-1][1] - theirs[-1][1])) > 1e-4


def test_keras_use_ema_recipe(keras64):
  """use_ema is refused by presets.keras with a recipe; the recipe keeps
  Keras' average (and its overwrite) exactly."""
  keras = keras64
  every = 3
  kwargs = dict(
    use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=every, momentum=0.5
  )
  theirs, opt = keras_run(keras, kwargs)
  average = [np.asarray(v.value) for v in opt._model_variables_moving_average]
  with pytest.raises(ValueError, match=r'optax\.incremental_update'):
    presets.keras(use_ema=True)
  tx = presets.keras(SCHEDULE, momentum=0.5)
  params, targets, noise = bowl_problem(SHAPES, STEPS)
  params = [jnp.asarray(p) for p in params]
  state, ema, ours = tx.init(params), None, []
  for t in range(STEPS):
    grads = bowl_grads(params, targets, noise[t])
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ema = (
      params if ema is None else optax.incremental_update(params, ema, 1 - 0.9)
    )
    if (t + 1) % every == 0:
      params = ema
    ours.append([np.asarray(p) for p in params])
  assert_trajectories_close(ours, theirs)
  assert_trajectories_close([ema], [average])


def test_presets_keras_takes_every_argument_of_keras(keras64):
  keras = keras64
  theirs = inspect.signature(keras.optimizers.RMSprop).parameters
  ours = inspect.signature(presets.keras).parameters
  positional = [n for n, p in ours.items() if p.kind != p.KEYWORD_ONLY]
  assert positional == [n for n in theirs if n != 'kwargs']
  for name in positional:
    default = theirs[name].default
    if name != 'name':
      assert ours[name].default == default, name
      assert type(ours[name].default) is type(default), name
  # Accepted and ignored: the names, the EMA settings without use_ema and
  # the loss's scale.
  tx = presets.keras(
    name='rms',
    ema_momentum=0.5,
    ema_overwrite_frequency=2,
    loss_scale_factor=4.0,
  )
  assert type(tx.init(jnp.zeros(2))) is type(presets.keras().init(jnp.zeros(2)))
  replacements = {
    'clipnorm': r'rmsprop_jax\.clip_by_norm\(1\.0\)',
    'global_clipnorm': r'optax\.clip_by_global_norm\(1\.0\)',
    'clipvalue': r'optax\.clip\(1\.0\)',
    'gradient_accumulation_steps': r'optax\.MultiSteps',
  }
  for name, pattern in replacements.items():
    value = 2 if name == 'gradient_accumulation_steps' else 1.0
    pattern = pattern.replace('1\\.0', str(value).replace('.', '\\.'))
    with pytest.raises(ValueError, match=f'{name}=.*{pattern}'):
      presets.keras(**{name: value})


def test_presets_tf1_takes_tensorflows_arguments():
  # RMSPropOptimizer(learning_rate, decay, momentum, epsilon, use_locking,
  # centered, name): TensorFlow is not installed here to read it from.
  names = list(inspect.signature(presets.tf1).parameters)
  assert names == [
    'learning_rate',
    'decay',
    'momentum',
    'epsilon',
    'use_locking',
    'centered',
    'name',
  ]
  presets.tf1(0.01, use_locking=True, name='rms')


# -- import_keras_state's check ----------------------------------------------


def keras_halfway(keras, kwargs, exclude=None):
  """A Keras run stopped after STEPS of 2 * STEPS steps."""
  opt, variables, run, problem = keras_setup(keras, kwargs, 2 * STEPS, exclude)
  run(range(STEPS))
  return opt, variables, run, problem


def continue_ours(tx, state, params, targets, noise):
  out = []
  for t in range(STEPS, 2 * STEPS):
    grads = bowl_grads(params, targets, noise[t])
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append([np.asarray(p) for p in params])
  return out


PARAM_MAP = {n: ((i,), None) for i, n in enumerate(NAMES)}
MASK = [True, False, True]

# Keras' arguments, the exact port, and a port its check must refuse (with
# the words its message must give).
IMPORTS = {
  'global_clipnorm': (
    dict(global_clipnorm=1.0, momentum=0.5),
    None,
    lambda: optax.chain(
      optax.clip_by_global_norm(1.0), presets.keras(SCHEDULE, momentum=0.5)
    ),
    lambda: presets.keras(SCHEDULE, momentum=0.5),
    r'optax\.chain\(optax\.clip_by_global_norm\(1\.0\), presets\.keras\(',
  ),
  'clipnorm': (
    dict(clipnorm=1.0, momentum=0.5),
    None,
    lambda: optax.chain(
      rmsprop_jax.clip_by_norm(1.0), presets.keras(SCHEDULE, momentum=0.5)
    ),
    lambda: optax.chain(
      optax.clip_by_global_norm(1.0), presets.keras(SCHEDULE, momentum=0.5)
    ),
    r'rmsprop_jax\.clip_by_norm\(1\.0\)',
  ),
  'clipvalue': (
    dict(clipvalue=0.5),
    None,
    lambda: optax.chain(optax.clip(0.5), presets.keras(SCHEDULE)),
    lambda: presets.keras(SCHEDULE),
    r'optax\.clip\(0\.5\)',
  ),
  'excluded_decay': (
    dict(weight_decay=0.1, momentum=0.9),
    ['bias'],
    lambda: presets.keras(
      SCHEDULE, momentum=0.9, weight_decay=0.1, weight_decay_mask=MASK
    ),
    lambda: presets.keras(SCHEDULE, momentum=0.9, weight_decay=0.1),
    r'weight_decay_mask=<a tree like params, False at dense_bias>',
  ),
}


@pytest.mark.parametrize('name', IMPORTS)
def test_import_keras_state_accepts_the_exact_port_only(keras64, name):
  kwargs, exclude, exact, inexact, message = IMPORTS[name]
  opt, variables, run, (targets, noise) = keras_halfway(
    keras64, kwargs, exclude
  )
  params = [jnp.asarray(v.value) for v in variables]
  tx = exact()
  state = porting.import_keras_state(opt, PARAM_MAP, tx, params)
  with pytest.raises(ValueError, match=message):
    porting.import_keras_state(opt, PARAM_MAP, inexact(), params)
  # The refused port is really another run (with check=False it imports).
  wrong = inexact()
  wrong_state = porting.import_keras_state(
    opt, PARAM_MAP, wrong, params, check=False
  )
  ours = continue_ours(tx, state, params, targets, noise)
  drifted = continue_ours(wrong, wrong_state, params, targets, noise)
  theirs = run(range(STEPS, 2 * STEPS))
  assert_trajectories_close(ours, theirs)
  gap = max(np.max(np.abs(a - b)) for a, b in zip(drifted[-1], theirs[-1]))
  assert gap > 1e-6


def test_import_keras_state_refuses_what_tx_cannot_hold(keras64):
  opt, variables, _, _ = keras_halfway(
    keras64, dict(use_ema=True, ema_momentum=0.9)
  )
  params = [jnp.asarray(v.value) for v in variables]
  with pytest.raises(ValueError, match=r'use_ema=True.*check=False'):
    porting.import_keras_state(opt, PARAM_MAP, presets.keras(SCHEDULE), params)
  state = porting.import_keras_state(
    opt, PARAM_MAP, presets.keras(SCHEDULE), params, check=False
  )
  assert int(optax.tree.get(state, 'count')) == STEPS


# -- timm: corrected weight decay with the rate set from outside -------------


def torch_setup(make_opt, steps, set_lr=False):
  """A PyTorch (or timm) optimizer ``make_opt(tensors)`` on the bowl of
  ``steps`` steps. Returns (optimizer, run(steps) -> parameters after each
  step, its start, (targets, noise)); with ``set_lr``, run sets
  ``group['lr'] = LRS[t]`` before step t (as a plateau controller or a
  hand-written loop does)."""
  torch = require('torch')
  params, targets, noise = bowl_problem(SHAPES, steps)
  tensors = [torch.tensor(p, requires_grad=True) for p in params]
  opt = make_opt(tensors)

  def run(steps):
    out = []
    for t in steps:
      if set_lr:
        for group in opt.param_groups:
          group['lr'] = float(LRS[t])
      grads = bowl_grads(
        [p.detach().numpy() for p in tensors], targets, noise[t], np.asarray
      )
      for p, g in zip(tensors, grads):
        p.grad = torch.from_numpy(np.asarray(g))
      opt.step()
      out.append([p.detach().numpy().copy() for p in tensors])
    return out

  return opt, run, tensors, (targets, noise)


def timm_run(kwargs, steps=STEPS):
  """timm's RMSpropTF on the bowl, ``group['lr']`` set before each step."""
  make = lambda tensors: timm_rmsprop_tf()(tensors, lr=float(LRS[0]), **kwargs)
  return torch_setup(make, steps, set_lr=True)[1](range(steps))


TIMM = dict(
  weight_decay=0.1,
  momentum=0.9,
  decoupled_decay=True,
  corrected_weight_decay=True,
)


def test_timm_corrected_weight_decay_with_an_injected_lr(x64):
  theirs = timm_run(TIMM)
  set_lr = lambda state, lr: optax.tree.set(state, lr=lr)
  tx = optax.inject_hyperparams(presets.timm)(
    lr=float(LRS[0]), max_lr=float(LRS[0]), **TIMM
  )
  assert_trajectories_close(ours_run(tx, set_lr=set_lr), theirs)
  # The correction matters on this run, so a silent no-op would fail above.
  plain = timm_run(dict(TIMM, corrected_weight_decay=False))
  assert np.max(np.abs(plain[-1][0] - theirs[-1][0])) > 1e-4
  # Without the rate timm was built with, the injected use is refused.
  with pytest.raises(ValueError, match='max_lr'):
    optax.inject_hyperparams(presets.timm)(lr=float(LRS[0]), **TIMM).init(
      [jnp.zeros(s) for s in SHAPES]
    )


# -- PyTorch: a scheduler carried across a port -------------------------------

TORCH_NAMES = [str(i) for i in range(len(SHAPES))]
TORCH_MAP = {n: ((i,), None) for i, n in enumerate(TORCH_NAMES)}


def test_a_torch_scheduler_continues_as_an_optax_schedule(x64):
  """A PyTorch scheduler stepped once per optimizer step is an optax
  schedule of the step count; the imported count continues it."""
  torch = require('torch')
  scheduler = []

  def make(tensors):
    opt = torch.optim.RMSprop(tensors, lr=0.02, momentum=0.9, centered=True)
    scheduler.append(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8))
    return opt

  opt, run, tensors, (targets, noise) = torch_setup(make, 2 * STEPS)
  sched = scheduler[0]

  def torch_steps(steps):
    out = []
    for t in steps:
      out += run([t])
      sched.step()
    return out

  torch_steps(range(STEPS))
  start = [jnp.asarray(p.detach().numpy().copy()) for p in tensors]
  # optax.exponential_decay computes in float32 (1e-8 from PyTorch's float64).
  schedule = lambda count: 0.02 * 0.8 ** jnp.asarray(count, jnp.float64)
  tx = presets.pytorch(schedule, momentum=0.9, centered=True)
  state = porting.import_torch_state(
    opt.state_dict(), TORCH_NAMES, TORCH_MAP, tx, start
  )
  assert sched.state_dict()['last_epoch'] == int(optax.tree.get(state, 'count'))
  theirs = torch_steps(range(STEPS, 2 * STEPS))
  ours = continue_ours(tx, state, start, targets, noise)
  assert_trajectories_close(ours, theirs)


# -- NNX ------------------------------------------------------------------------


def test_port_params_and_export_params_take_an_nnx_state():
  torch = require('torch')
  from flax import nnx

  torch.manual_seed(0)
  torch_model = torch.nn.Sequential(
    torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
  )
  model = nnx.Sequential(
    nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    jax.nn.tanh,
    nnx.Linear(4, 2, rngs=nnx.Rngs(1)),
  )
  state = nnx.state(model, nnx.Param)
  rename = {'0': 'layers.0', '2': 'layers.2'}
  param_map = porting.torch_to_flax_map(
    torch_model.named_parameters(), state, rename
  )
  before = np.asarray(state['layers'][0]['bias'][...]).copy()
  ported = porting.port_params(torch_model.state_dict(), param_map, state)
  assert isinstance(ported, nnx.State)
  # The given state is not changed.
  np.testing.assert_array_equal(state['layers'][0]['bias'][...], before)
  nnx.update(model, ported)
  x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(model(jnp.asarray(x))),
    torch_model(torch.from_numpy(x)).detach().numpy(),
    rtol=1e-5,
    atol=1e-6,
  )
  back = porting.export_params(nnx.state(model, nnx.Param), param_map)
  for name, value in torch_model.state_dict().items():
    np.testing.assert_array_equal(back[name], value.numpy())


# -- What a first review found -------------------------------------------------


def _import_and_continue(opt, run, tensors, problem, tx, refused=None):
  """Imports ``opt``'s state (after STEPS steps) into ``tx`` and continues
  both STEPS more steps; ``refused``: (another tx, message) the check must
  refuse."""
  start = [jnp.asarray(p.detach().numpy().copy()) for p in tensors]
  if refused is not None:
    wrong, message = refused
    with pytest.raises(ValueError, match=message):
      porting.import_torch_state(
        opt.state_dict(), TORCH_NAMES, TORCH_MAP, wrong, start
      )
  state = porting.import_torch_state(
    opt.state_dict(), TORCH_NAMES, TORCH_MAP, tx, start
  )
  theirs = run(range(STEPS, 2 * STEPS))
  assert_trajectories_close(continue_ours(tx, state, start, *problem), theirs)


def test_torch_inject_hyperparams_with_momentum_zero(x64):
  """Injected, PyTorch's default momentum 0 is an array and keeps a buffer:
  refused, naming static_args, which ports it."""
  torch = require('torch')
  setup = torch_setup(lambda ps: torch.optim.RMSprop(ps, lr=0.01), 2 * STEPS)
  setup[1](range(STEPS))
  _import_and_continue(
    *setup,
    optax.inject_hyperparams(presets.pytorch, static_args=('momentum',))(
      lr=0.01
    ),
    refused=(
      optax.inject_hyperparams(presets.pytorch)(lr=0.01),
      r"static_args=\('momentum',\)",
    ),
  )


def test_timm_caution_without_momentum_is_timms_plain_step(x64):
  setup = torch_setup(
    lambda ps: timm_rmsprop_tf()(ps, lr=0.01, caution=True), 2 * STEPS
  )
  setup[1](range(STEPS))
  _import_and_continue(
    *setup,
    presets.timm(lr=0.01),
    refused=(presets.timm(lr=0.01, eps=1e-3), r'presets\.timm\(lr=0\.01'),
  )


def test_timm_groups_that_place_the_lr_differently(x64):
  def make(ps):
    return timm_rmsprop_tf()(
      [
        {'params': ps[:1]},
        {'params': ps[1:], 'lr_in_momentum': False},
      ],
      lr=0.01,
      momentum=0.9,
    )

  setup = torch_setup(make, 2 * STEPS)
  setup[1](range(STEPS))
  labels = ['inside', 'after', 'after']
  tx = optax.multi_transform(
    {
      'inside': presets.timm(lr=0.01, momentum=0.9),
      'after': presets.timm(lr=0.01, momentum=0.9, lr_in_momentum=False),
    },
    labels,
  )
  _import_and_continue(
    *setup,
    tx,
    refused=(
      presets.timm(lr=0.01, momentum=0.9),
      r'lr_in_momentum=False, caution=False\) for group 1',
    ),
  )


def test_a_learning_rate_of_zero_is_not_taken_for_the_rule(x64):
  torch = require('torch')
  setup = torch_setup(
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9), 2 * STEPS
  )
  setup[1](range(STEPS))
  _import_and_continue(
    *setup,
    presets.pytorch(lr=0.01, momentum=0.9),
    refused=(
      presets.pytorch(lr=0.0, eps=1.0, momentum=0.9),
      'learning rate at step 8 is 0',
    ),
  )


def test_keras_paths_that_read_the_same_with_underscores(keras64):
  """seq/block/dense/kernel (a Dense inside a layer) and seq/block_dense/
  kernel (a Dense beside it) read the same with "/" as "_": each takes its
  own slots."""
  keras = keras64

  class Block(keras.layers.Layer):
    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      self.dense = keras.layers.Dense(3, name='dense')

    def build(self, shape):
      self.dense.build(shape)

    def call(self, x):
      return self.dense(x)

  model = keras.Sequential(
    [
      keras.Input((3,)),
      Block(name='block'),
      keras.layers.Dense(3, name='block_dense'),
    ],
    name='seq',
  )
  variables = model.trainable_variables
  assert variables[0].path.replace('/', '_') == variables[2].path.replace(
    '/', '_'
  )
  opt = keras.optimizers.RMSprop(0.01)
  rng = np.random.default_rng(0)
  for _ in range(3):
    opt.apply(
      [
        rng.normal(size=v.shape) * (100.0 if i >= 2 else 0.01)
        for i, v in enumerate(variables)
      ],
      variables,
    )
  params = [jnp.asarray(v.value) for v in variables]
  param_map = {v.path: ((i,), None) for i, v in enumerate(variables)}
  state = porting.import_keras_state(
    opt, param_map, presets.keras(0.01), params
  )
  nu = optax.tree.get(state, 'nu')
  for i in range(len(variables)):
    np.testing.assert_array_equal(nu[i], np.asarray(opt._velocities[i].value))


def test_inject_hyperparams_with_a_weight_decay_mask_function(x64):
  mask_fn = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  with pytest.raises(TypeError, match=r"static_args=\('weight_decay_mask',\)"):
    optax.inject_hyperparams(presets.keras)(
      weight_decay=0.1, weight_decay_mask=mask_fn
    ).init([jnp.zeros(s) for s in SHAPES])
  tx = optax.inject_hyperparams(
    presets.keras, static_args=('weight_decay_mask',)
  )(learning_rate=0.01, weight_decay=0.1, weight_decay_mask=mask_fn)
  ref = presets.keras(0.01, weight_decay=0.1, weight_decay_mask=mask_fn)
  assert_trajectories_close(ours_run(tx), ours_run(ref))
  assert (
    np.max(
      np.abs(
        ours_run(presets.keras(0.01, weight_decay=0.1))[-1][1]
        - ours_run(ref)[-1][1]
      )
    )
    > 1e-6
  )


def test_the_imports_take_an_nnx_state(x64):
  torch = require('torch')
  from flax import nnx

  torch.manual_seed(0)
  torch_model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
  opt = torch.optim.RMSprop(torch_model.parameters(), lr=0.01, momentum=0.9)
  for p in torch_model.parameters():
    p.grad = torch.randn_like(p)
  opt.step()
  model = nnx.Sequential(
    nnx.Linear(3, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  )
  param_map = porting.torch_to_flax_map(
    torch_model.named_parameters(),
    nnx.state(model, nnx.Param),
    {'0': 'layers.0'},
  )
  state = porting.port_params(
    torch_model.state_dict(), param_map, nnx.state(model, nnx.Param)
  )
  names = porting.torch_param_names(opt, torch_model)
  tx = presets.pytorch(lr=0.01, momentum=0.9)
  from_state = porting.import_torch_state(
    opt.state_dict(), names, param_map, tx, state
  )
  from_dict = porting.import_torch_state(
    opt.state_dict(), names, param_map, tx, nnx.to_pure_dict(state)
  )
  assert jax.tree.structure(from_state) == jax.tree.structure(from_dict)
  for a, b in zip(jax.tree.leaves(from_state), jax.tree.leaves(from_dict)):
    np.testing.assert_array_equal(a, b)
