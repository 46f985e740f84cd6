"""Moving a running training between frameworks (``rmsprop_jax.porting``).

Each test trains in one framework, moves the weights and the optimizer state
into the other, and continues in both: the trajectories agree to float64
round-off. Resetting the state instead gives a measurably different run, so
an import that silently reset would fail. A small CNN (``Conv2d`` + ``Linear``
against Flax's ``Conv`` + ``Dense``) exercises the layout changes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import porting

from conftest import require, timm_rmsprop_tf

N, M = 8, 8  # Steps before and after the move.
LRS = np.random.default_rng(3).uniform(0.002, 0.02, N + M)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N + M, 4, 1, 6, 6))  # NCHW batches.
  y = rng.normal(size=(N + M, 4, 2))
  return x, y


def _torch_net():
  torch = require('torch')
  torch.manual_seed(0)

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(1, 3, 3)
      self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
      return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))

  return Net().double()


def _flax_net():
  import flax.linen as nn

  class Net(nn.Module):
    def setup(self):
      self.conv = nn.Conv(
        3, (3, 3), padding='VALID', dtype=jnp.float64, param_dtype=jnp.float64
      )
      self.fc = nn.Dense(2, dtype=jnp.float64, param_dtype=jnp.float64)

    def __call__(self, x):  # NHWC
      return self.fc(jnp.tanh(self.conv(x)).mean((1, 2)))

  net = Net()
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 1)))['params']
  return net, params


def _torch_steps(model, opt, x, y, steps):
  torch = require('torch')
  out = []
  for t in steps:
    for group in opt.param_groups:
      group['lr'] = float(LRS[t])
    opt.zero_grad()
    loss = (
      (model(torch.from_numpy(x[t])) - torch.from_numpy(y[t])) ** 2
    ).mean()
    loss.backward()
    opt.step()
    out.append(
      {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    )
  return out


def _jax_steps(net, tx, params, state, x, y, steps):
  def loss_fn(p, xb, yb):
    return jnp.mean((net.apply({'params': p}, xb) - yb) ** 2)

  @jax.jit
  def step(params, state, xb, yb):
    grads = jax.grad(loss_fn)(params, xb, yb)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  out = []
  for t in steps:
    params, state = step(
      params, state, jnp.asarray(x[t].transpose(0, 2, 3, 1)), jnp.asarray(y[t])
    )
    out.append(params)
  return out, state


def _gap(torch_run, jax_run, param_map):
  """Largest relative difference over the steps and parameters."""
  worst = 0.0
  for theirs, ours in zip(torch_run, jax_run):
    mapped = porting.export_params(ours, param_map)
    for name, value in theirs.items():
      worst = max(
        worst,
        float(np.max(np.abs(mapped[name] - value)) / np.max(np.abs(value))),
      )
  return worst


# The two frameworks compute the same convolution and mean in different
# orders, so each step's gradient differs in the last bits: measured, the
# largest relative difference after 8 continued steps is below 7e-16. A reset
# state is off by more than 0.5.
ROUND_OFF = 1e-13


def _torch_optimizer(kind, params):
  torch = require('torch')
  if kind == 'timm':
    return timm_rmsprop_tf()(params, lr=LRS[0], momentum=0.9, weight_decay=1e-3)
  options = {
    'pytorch': {},
    'pytorch centered momentum wd': dict(
      centered=True, momentum=0.9, weight_decay=1e-2
    ),
  }[kind]
  return torch.optim.RMSprop(params, lr=LRS[0], **options)


def _preset(kind):
  lr = lambda count: jnp.asarray(LRS)[count]
  if kind == 'timm':
    return rmsprop_jax.presets.timm(lr, momentum=0.9, weight_decay=1e-3)
  options = {
    'pytorch': {},
    'pytorch centered momentum wd': dict(
      centered=True, momentum=0.9, weight_decay=1e-2
    ),
  }[kind]
  return rmsprop_jax.presets.pytorch(lr, **options)


KINDS = ['pytorch', 'pytorch centered momentum wd', 'timm']


@pytest.mark.parametrize('kind', KINDS)
def test_torch_to_jax_continues_the_run(kind, x64):
  x, y = _data()
  model = _torch_net()
  opt = _torch_optimizer(kind, model.parameters())
  _torch_steps(model, opt, x, y, range(N))
  net, params = _flax_net()
  names = [n for n, _ in model.named_parameters()]
  param_map = porting.torch_to_flax_map(model.named_parameters(), params)
  assert param_map['conv.weight'] == (('conv', 'kernel'), (2, 3, 1, 0))
  assert param_map['fc.weight'] == (('fc', 'kernel'), (1, 0))
  params = porting.port_params(model.state_dict(), param_map, params)
  tx = _preset(kind)
  state = porting.import_torch_state(
    opt.state_dict(), names, param_map, tx, params
  )
  assert int(optax.tree.get(state, 'count')) == N  # The schedule continues.
  # PyTorch goes on first: the imported arrays must not share its memory.
  theirs = _torch_steps(model, opt, x, y, range(N, N + M))
  ours, _ = _jax_steps(net, tx, params, state, x, y, range(N, N + M))
  reset, _ = _jax_steps(net, tx, params, tx.init(params), x, y, range(N, N + M))
  assert _gap(theirs, ours, param_map) < ROUND_OFF
  assert _gap(theirs, reset, param_map) > 1e-3


@pytest.mark.parametrize('kind', KINDS)
def test_jax_to_torch_continues_the_run(kind, x64):
  torch = require('torch')
  x, y = _data(1)
  model = _torch_net()
  names = [n for n, _ in model.named_parameters()]
  net, params = _flax_net()
  param_map = porting.torch_to_flax_map(model.named_parameters(), params)
  params = porting.port_params(model.state_dict(), param_map, params)
  tx = _preset(kind)
  run, state = _jax_steps(net, tx, params, tx.init(params), x, y, range(N))
  params = run[-1]
  model.load_state_dict(
    {
      k: torch.from_numpy(np.array(v))
      for k, v in porting.export_params(params, param_map).items()
    }
  )
  opt = _torch_optimizer(kind, model.parameters())
  opt.load_state_dict(
    porting.export_torch_state(state, opt.state_dict(), names, param_map)
  )
  theirs = _torch_steps(model, opt, x, y, range(N, N + M))
  ours, _ = _jax_steps(net, tx, params, state, x, y, range(N, N + M))
  assert _gap(theirs, ours, param_map) < ROUND_OFF
  # A fresh PyTorch optimizer from the same weights goes elsewhere.
  model.load_state_dict(
    {
      k: torch.from_numpy(np.array(v))
      for k, v in porting.export_params(params, param_map).items()
    }
  )
  reset = _torch_steps(
    model, _torch_optimizer(kind, model.parameters()), x, y, range(N, N + M)
  )
  assert _gap(reset, ours, param_map) > 1e-3


def test_state_round_trips_exactly(x64):
  model = _torch_net()
  opt = _torch_optimizer('pytorch centered momentum wd', model.parameters())
  x, y = _data()
  _torch_steps(model, opt, x, y, range(3))
  names = [n for n, _ in model.named_parameters()]
  _, params = _flax_net()
  param_map = porting.torch_to_flax_map(model.named_parameters(), params)
  tx = _preset('pytorch centered momentum wd')
  state = porting.import_torch_state(
    opt.state_dict(), names, param_map, tx, params
  )
  back = porting.export_torch_state(state, opt.state_dict(), names, param_map)
  for i, entry in opt.state_dict()['state'].items():
    for key, value in entry.items():
      np.testing.assert_array_equal(
        back['state'][i][key].numpy(), value.numpy()
      )


def _torch_state(kind='pytorch centered momentum wd', steps=2):
  model = _torch_net()
  opt = _torch_optimizer(kind, model.parameters())
  x, y = _data()
  _torch_steps(model, opt, x, y, range(steps))
  _, params = _flax_net()
  param_map = porting.torch_to_flax_map(model.named_parameters(), params)
  return model, opt, params, param_map


@pytest.mark.parametrize(
  'change, message',
  [
    ('plain preset', 'centered mean'),
    ('no momentum', 'momentum buffer'),
    ('adam state', 'not RMSprop state'),
    ('missing parameter', 'not in param_map'),
    ('wrong shape', 'shape'),
    ('no state yet', 'no optimizer state'),
  ],
)
def test_clear_errors(change, message, x64):
  torch = require('torch')
  model, opt, params, param_map = _torch_state()
  names = [n for n, _ in model.named_parameters()]
  tx = _preset('pytorch centered momentum wd')
  state_dict = opt.state_dict()
  if change == 'plain preset':
    tx = rmsprop_jax.presets.pytorch(0.01, momentum=0.9, weight_decay=1e-2)
  elif change == 'no momentum':
    tx = rmsprop_jax.presets.pytorch(0.01, centered=True)
  elif change == 'adam state':
    adam = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 1, 6, 6, dtype=torch.float64)).sum().backward()
    adam.step()
    state_dict = adam.state_dict()
  elif change == 'missing parameter':
    param_map = {k: v for k, v in param_map.items() if k != 'fc.bias'}
  elif change == 'wrong shape':
    param_map = dict(param_map, **{'fc.weight': (('fc', 'kernel'), None)})
  elif change == 'no state yet':
    state_dict = _torch_optimizer('pytorch', model.parameters()).state_dict()
    tx = _preset('pytorch')
  with pytest.raises(ValueError, match=message):
    porting.import_torch_state(state_dict, names, param_map, tx, params)


def test_torch_to_flax_map_names_what_does_not_fit(x64):
  _, params = _flax_net()
  with pytest.raises(ValueError, match="'head.weight'"):
    porting.torch_to_flax_map([('head.weight', (2, 3))], params)
  with pytest.raises(ValueError, match='shape'):
    porting.torch_to_flax_map([('fc.weight', (3, 3))], params)
  renamed = porting.torch_to_flax_map(
    [('classifier.weight', (2, 3))], params, rename={'classifier': 'fc'}
  )
  assert renamed == {'classifier.weight': (('fc', 'kernel'), (1, 0))}


def test_keras_to_jax_and_back(keras64):
  """Keras 3 (JAX backend), centered with momentum and a per-step lr: N
  steps in Keras, import, M more in both; then export into Keras again."""
  keras = keras64
  rng = np.random.default_rng(5)
  shapes = {'dense/kernel': (3, 4), 'dense/bias': (4,)}
  start = {k: rng.normal(size=s) for k, s in shapes.items()}
  targets = {k: rng.normal(size=s) for k, s in shapes.items()}
  noise = [
    {k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(N + M)
  ]
  grad = lambda p, t: {k: 2 * (p[k] - targets[k]) + noise[t][k] for k in p}
  variables = {
    k: keras.Variable(v, name=k.replace('/', '_')) for k, v in start.items()
  }
  table = LRS

  class Table(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
      return keras.ops.take(keras.ops.convert_to_tensor(table), step)

  opt = keras.optimizers.RMSprop(Table(), momentum=0.9, centered=True)
  opt.build(list(variables.values()))

  def keras_steps(steps):
    out = []
    for t in steps:
      g = grad({k: np.asarray(v.value) for k, v in variables.items()}, t)
      opt.apply_gradients([(g[k], variables[k]) for k in variables])
      out.append({k: np.asarray(v.value) for k, v in variables.items()})
    return out

  keras_steps(range(N))
  param_map = {
    v.path: (tuple(k.split('/')), None) for k, v in variables.items()
  }
  params = {
    'dense': {
      'kernel': jnp.asarray(variables['dense/kernel'].value),
      'bias': jnp.asarray(variables['dense/bias'].value),
    }
  }
  tx = rmsprop_jax.presets.keras(
    lambda c: jnp.asarray(table)[c], momentum=0.9, centered=True
  )
  state = porting.import_keras_state(opt, param_map, tx, params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  ours, p, s = [], params, state
  for t in range(N, N + M):
    g = grad({f'dense/{k}': np.asarray(v) for k, v in p['dense'].items()}, t)
    p, s = step(
      p, s, {'dense': {k.split('/')[1]: jnp.asarray(v) for k, v in g.items()}}
    )
    ours.append(p)
  saved = {k: np.asarray(v.value) for k, v in variables.items()}
  theirs = keras_steps(range(N, N + M))
  for a, b in zip(ours, theirs):
    for k in b:
      np.testing.assert_allclose(
        np.asarray(a['dense'][k.split('/')[1]]), b[k], rtol=1e-12, atol=1e-13
      )
  # Back: Keras continues from our state as from its own.
  for k, v in variables.items():
    v.assign(saved[k])
  porting.export_keras_state(state, opt, param_map)
  again = keras_steps(range(N, N + M))
  for a, b in zip(again, theirs):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-13)


def test_tf1_slots_round_trip_and_continue(x64):
  """TF1 slots (rms, momentum, mg) into presets.tf1 and back: exporting
  after N steps and importing gives the same continuation as never
  stopping."""
  tx = rmsprop_jax.presets.tf1(0.01, momentum=0.9, centered=True)
  rng = np.random.default_rng(7)
  params = {'w': jnp.asarray(rng.normal(size=(3, 2)))}
  grads = [{'w': jnp.asarray(rng.normal(size=(3, 2)))} for _ in range(N + M)]
  state = tx.init(params)
  p = params
  for g in grads[:N]:
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  param_map = {'dense/kernel': (('w',), (1, 0))}  # TF (2, 3) -> (3, 2)
  slots = porting.export_tf1_slots(state, param_map)
  assert slots['dense/kernel']['rms'].shape == (2, 3)
  restored = porting.import_tf1_slots(slots, N, param_map, tx, p)
  jax.tree.map(np.testing.assert_array_equal, restored, state)


@pytest.mark.parametrize('k', [1, 6])
def test_tf1_slots_continue_tensorflows_own_run(k, x64):
  """TF1 slot values after k steps (from the NumPy transcription of
  TensorFlow's kernels, itself checked against them), imported into
  presets.tf1: the remaining steps match TensorFlow's recorded parameters."""
  from test_references import TF_CASES, _tf_case_args, tf1_kernels_numpy

  for case in TF_CASES:
    var, grads, lrs, rho, momentum, epsilon, centered = _tf_case_args(case)
    slots = {}
    params = tf1_kernels_numpy(
      var, grads[:k], lrs[:k], rho, momentum, epsilon, centered, slots
    )[-1]
    tx = rmsprop_jax.presets.tf1(
      lambda c, lrs=lrs: jnp.asarray(lrs)[c],
      decay=rho,
      momentum=momentum,
      epsilon=epsilon,
      centered=centered,
    )
    param_map = {'var': (('v',), None)}
    state = porting.import_tf1_slots(
      {'var': slots}, k, param_map, tx, {'v': jnp.asarray(params)}
    )
    p, out = {'v': jnp.asarray(params)}, []
    for g in grads[k:]:
      updates, state = tx.update({'v': jnp.asarray(g)}, state, p)
      p = optax.apply_updates(p, updates)
      out.append(np.asarray(p['v']))
    np.testing.assert_allclose(
      out, case['params_after_each_step'][k:], rtol=1e-12, atol=1e-14
    )
    if momentum:  # A reset momentum slot ends elsewhere.
      reset = porting.import_tf1_slots(
        {'var': dict(slots, momentum=np.zeros_like(var))},
        k,
        param_map,
        tx,
        {'v': jnp.asarray(params)},
      )
      u, _ = tx.update(
        {'v': jnp.asarray(grads[k])}, reset, {'v': jnp.asarray(params)}
      )
      assert not np.allclose(
        np.asarray(params) + np.asarray(u['v']),
        case['params_after_each_step'][k],
        rtol=1e-6,
      )


def test_keras_errors_name_the_variant_and_the_variable(keras64):
  keras = keras64
  v = keras.Variable(np.ones((2, 3)), name='dense_kernel')
  opt = keras.optimizers.RMSprop(0.01, momentum=0.9)
  opt.build([v])
  params = {'dense': {'kernel': jnp.ones((2, 3))}}
  param_map = {v.path: (('dense', 'kernel'), None)}
  with pytest.raises(ValueError, match='momentum buffer'):
    porting.import_keras_state(
      opt, param_map, rmsprop_jax.presets.keras(), params
    )
  with pytest.raises(ValueError, match="'other/kernel'"):
    porting.import_keras_state(
      opt,
      {'other/kernel': (('dense', 'kernel'), None)},
      rmsprop_jax.presets.keras(momentum=0.9),
      params,
    )
  with pytest.raises(ValueError, match='shape'):
    porting.import_keras_state(
      opt,
      {v.path: (('dense', 'kernel'), (1, 0))},
      rmsprop_jax.presets.keras(momentum=0.9),
      params,
    )


@pytest.mark.parametrize(
  'source, target',
  [
    ('pytorch momentum', 'timm momentum'),  # Another momentum placement.
    ('timm', 'timm lr outside'),
    ('timm', 'pytorch momentum'),
    ('pytorch momentum', 'pytorch momentum alpha 0.9'),
    ('pytorch momentum', 'pytorch momentum wd'),
  ],
)
def test_a_preset_that_would_not_continue_the_run_is_refused(
  source, target, x64
):
  """The state fits (same buffers), but tx's rule is not the source's."""
  torch = require('torch')
  model = _torch_net()
  if source == 'timm':
    opt = timm_rmsprop_tf()(model.parameters(), lr=0.01, momentum=0.9)
  else:
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)
  x, y = _data()
  _torch_steps(model, opt, x, y, range(2))
  _, params = _flax_net()
  param_map = porting.torch_to_flax_map(model.named_parameters(), params)
  names = porting.torch_param_names(opt, model)
  presets = rmsprop_jax.presets
  tx = {
    'timm momentum': presets.timm(0.01, momentum=0.9),
    'timm lr outside': presets.timm(0.01, momentum=0.9, lr_in_momentum=False),
    'pytorch momentum': presets.pytorch(0.01, momentum=0.9),
    'pytorch momentum alpha 0.9': presets.pytorch(
      0.01, alpha=0.9, momentum=0.9
    ),
    'pytorch momentum wd': presets.pytorch(
      0.01, momentum=0.9, weight_decay=0.1
    ),
  }[target]
  with pytest.raises(ValueError, match='does not continue this run'):
    porting.import_torch_state(opt.state_dict(), names, param_map, tx, params)
  # check=False takes it as asked.
  porting.import_torch_state(
    opt.state_dict(), names, param_map, tx, params, check=False
  )
  # Another learning rate (a schedule's own values) is not another rule.
  right = (
    presets.timm(0.5, momentum=0.9)
    if source == 'timm'
    else presets.pytorch(0.5, momentum=0.9)
  )
  porting.import_torch_state(opt.state_dict(), names, param_map, right, params)


def test_parameter_groups_and_multi_transform_both_ways(x64):
  """Two groups (no weight decay on biases), in the optimizer's own order,
  into optax.multi_transform of two presets, and back."""
  torch = require('torch')
  model = _torch_net()
  biases = [p for n, p in model.named_parameters() if n.endswith('bias')]
  weights = [p for n, p in model.named_parameters() if n.endswith('weight')]
  opt = torch.optim.RMSprop(
    [{'params': biases}, {'params': weights, 'weight_decay': 0.1}],
    lr=0.01,
    momentum=0.9,
  )
  x, y = _data()
  _torch_steps(model, opt, x, y, range(3))
  names = porting.torch_param_names(opt, model)
  assert names == ['conv.bias', 'fc.bias', 'conv.weight', 'fc.weight']
  _, params = _flax_net()
  param_map = porting.torch_to_flax_map(model.named_parameters(), params)
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: 'bias' if path[-1].key == 'bias' else 'weight', params
  )
  tx = optax.multi_transform(
    {
      'bias': rmsprop_jax.presets.pytorch(0.01, momentum=0.9),
      'weight': rmsprop_jax.presets.pytorch(
        0.01, momentum=0.9, weight_decay=0.1
      ),
    },
    labels,
  )
  state = porting.import_torch_state(
    opt.state_dict(), names, param_map, tx, params
  )
  back = porting.export_torch_state(
    state, opt.state_dict(), names, param_map, step=3
  )
  for i, entry in opt.state_dict()['state'].items():
    for key in ('square_avg', 'momentum_buffer'):
      np.testing.assert_array_equal(
        back['state'][i][key].numpy(), entry[key].numpy()
      )
  # Both groups with one weight decay: the weights' group is refused.
  wrong = rmsprop_jax.presets.pytorch(0.01, momentum=0.9)
  with pytest.raises(ValueError, match='does not continue this run'):
    porting.import_torch_state(
      opt.state_dict(), names, param_map, wrong, params
    )


def test_export_refuses_another_variant_and_unknown_names(x64):
  model, opt, params, param_map = _torch_state('pytorch')  # No momentum.
  names = porting.torch_param_names(opt, model)
  tx = rmsprop_jax.presets.pytorch(0.01, momentum=0.9)
  state = tx.init(params)
  with pytest.raises(ValueError, match='momentum buffer'):
    porting.export_torch_state(
      state, opt.state_dict(), names, param_map, step=2
    )
  with pytest.raises(ValueError, match="'conv.bias'"):
    porting.export_torch_state(
      rmsprop_jax.presets.pytorch(0.01).init(params),
      opt.state_dict(),
      names,
      {k: v for k, v in param_map.items() if k != 'conv.bias'},
      step=2,
    )


def test_keras_adam_is_not_rmsprop(keras64):
  keras = keras64
  v = keras.Variable(np.ones((2, 3)), name='dense_kernel')
  adam = keras.optimizers.Adam(0.01)
  adam.build([v])
  with pytest.raises(TypeError, match='Adam'):
    porting.import_keras_state(
      adam,
      {v.path: (('w',), None)},
      rmsprop_jax.presets.keras(),
      {'w': jnp.ones((2, 3))},
    )
  rms = keras.optimizers.RMSprop(0.01, momentum=0.9)
  rms.build([v])
  with pytest.raises(ValueError, match='does not continue this run'):
    porting.import_keras_state(
      rms,
      {v.path: (('w',), None)},
      rmsprop_jax.presets.pytorch(0.01, momentum=0.9),
      {'w': jnp.ones((2, 3))},
    )


def test_timm_caution_and_groups_that_differ_in_momentum(x64):
  """Caution's mask is not affine in the learning rate: the check compares
  at the source's own rate. Groups with and without momentum move both
  ways through optax.multi_transform."""
  torch = require('torch')
  model = _torch_net()
  opt = timm_rmsprop_tf()(
    model.parameters(), lr=0.01, momentum=0.9, caution=True
  )
  x, y = _data()
  _torch_steps(model, opt, x, y, range(2))
  _, params = _flax_net()
  param_map = porting.torch_to_flax_map(model.named_parameters(), params)
  names = porting.torch_param_names(opt, model)
  porting.import_torch_state(
    opt.state_dict(),
    names,
    param_map,
    rmsprop_jax.presets.timm(LRS[1], momentum=0.9, caution=True),
    params,
  )

  model = _torch_net()
  biases = [p for n, p in model.named_parameters() if n.endswith('bias')]
  weights = [p for n, p in model.named_parameters() if n.endswith('weight')]
  opt = torch.optim.RMSprop(
    [{'params': biases}, {'params': weights, 'momentum': 0.9}], lr=0.01
  )
  _torch_steps(model, opt, x, y, range(2))
  names = porting.torch_param_names(opt, model)
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: 'bias' if path[-1].key == 'bias' else 'weight', params
  )
  tx = optax.multi_transform(
    {
      'bias': rmsprop_jax.presets.pytorch(0.01),
      'weight': rmsprop_jax.presets.pytorch(0.01, momentum=0.9),
    },
    labels,
  )
  state = porting.import_torch_state(
    opt.state_dict(), names, param_map, tx, params
  )
  back = porting.export_torch_state(
    state, opt.state_dict(), names, param_map, step=2
  )
  for i, entry in opt.state_dict()['state'].items():
    assert set(back['state'][i]) == set(entry)
    for key in entry:
      np.testing.assert_array_equal(
        back['state'][i][key].numpy(), entry[key].numpy()
      )


def test_export_refuses_what_is_not_rmsprop(x64):
  torch = require('torch')
  model, opt, params, param_map = _torch_state()  # Centered, momentum, wd.
  names = porting.torch_param_names(opt, model)
  with pytest.raises(ValueError, match='no RMSprop second moment'):
    porting.export_torch_state(
      optax.adam(0.01).init(params), opt.state_dict(), names, param_map
    )
  with pytest.raises(ValueError, match='no RMSprop second moment'):
    porting.export_torch_state(
      optax.sgd(0.01, momentum=0.9).init(params),
      opt.state_dict(),
      names,
      param_map,
      step=1,
    )
  adam = torch.optim.Adam(model.parameters())
  state = _preset('pytorch centered momentum wd').init(params)
  with pytest.raises(ValueError, match='not an RMSprop optimizer'):
    porting.export_torch_state(state, adam.state_dict(), names, param_map)
  # A wrong layout against the optimizer's own state shapes.
  wrong = dict(param_map, **{'fc.weight': (('fc', 'kernel'), None)})
  with pytest.raises(ValueError, match="'fc.weight'.*shape"):
    porting.export_torch_state(state, opt.state_dict(), names, wrong)
