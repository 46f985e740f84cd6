"""Compatibility matrix: every state option x every place users hold the
optimizer state.

Each cell (``test_cell[option-place]``) trains a few steps on a small
parameter tree through one "place" (Flax NNX's ``Optimizer``, a Linen
``TrainState`` checkpoint, Orbax, pickle, ``flax.serialization``, donated
buffers, ``lax.scan``, ``vmap``, ``optax.MultiSteps``,
``optax.tree_map_params``) and must equal, bit for bit, the plain functional
loop with the same transformation::

  state = tx.init(params)
  for g in grads:
    params, state = jax.jit(step)(params, state, g)

(eager places against the same loop run eagerly). The final parameters are
compared, and the final states after ``rmsprop_jax.unpack_state`` (optax's
layout) where the place gives a state back. Gradients are fixed inputs,
made before the loop and passed into every jitted step as arguments.

A cell that cannot work by design asserts its ``ValueError`` instead (see
``EXPECTED_ERRORS``); nothing here is skipped or compared with a tolerance.

Three places compile the step into another XLA program than the plain
loop's, and there XLA:CPU may round the last bit of some entries
differently for optax's own optimizer too (it contracts ``a * b + c`` into
a fused multiply-add in some fusions and not in others). Those cells
compare with the reference that compiles the same way, and, where optax
has the option, with optax in the same place, bit for bit:

* ``optax.MultiSteps`` computes the gradients' mean and the update in one
  ``lax.cond`` branch: the reference is ``MultiSteps(tx, every_k=1)`` fed
  each gradient once (``optax.rmsprop`` differs from its plain loop in the
  same entries);
* ``vmap`` of a step count (``bias_correction``) or of a skipped step
  (``skip_nonfinite``: the ``cond`` becomes a ``select``): compared with
  optax's own ``rmsprop(bias_correction=True)`` and ``apply_if_finite``
  under the same ``vmap``;
* ``nnx.Optimizer`` returns its updates: they are compared with the plain
  loop's ``tx.update`` (jitted alone), and its parameters with those
  updates applied (one more jitted ``apply_updates``); ``caution``'s
  rescaled step and ``apply_updates`` compiled as one program round one
  entry differently.

After the matrix, the known bugs of the issue (cases 1 to 5), each written
as the behaviour it should have.
"""

import functools
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import presets

from conftest import require
from helpers import assert_trees_equal, normal_tree

nnx = require('flax.nnx')
ocp = require('orbax.checkpoint')
flax_core = require('flax.core')
serialization = require('flax.serialization')
checkpoints = require('flax.training.checkpoints')
train_state = require('flax.training.train_state')

# (option, place) -> a substring of the ValueError the cell must raise,
# for combinations that cannot work by design. None today: every cell must
# train (a cell that fails is a bug to report, not an entry here).
EXPECTED_ERRORS: dict[tuple[str, str], str] = {}

# How each option is injected in the ``donate_inject`` column:
# ``optax.inject_hyperparams(constructor)(**kwargs)``, with the option's own
# constructor (``rmsprop_jax.rmsprop`` or ``rmsprop_jax.presets.X``) and
# keyword arguments. Every row can be injected today, so no row is marked:
#
#   rows                     injected as               note
#   ------------------------ ------------------------- -----------------------
#   rmsprop options          inject(rmsprop)(...)      nu_dtype and
#                                                      accumulator_dtype are
#                                                      callables, so optax
#                                                      takes them for
#                                                      schedules: the state's
#                                                      hyperparams hold a 0-d
#                                                      array of that dtype,
#                                                      whose dtype rmsprop uses
#   presets                  inject(presets.X)(...)    (none)
#
# A row that could not be injected would get an EXPECTED_ERRORS entry for
# its (option, 'donate_inject') cell, with the ValueError's words.

R = rmsprop_jax.rmsprop

# Option name -> (constructor, keyword arguments); ``BUILDERS[name]()`` is
# the transformation.
OPTIONS = {
  'default': (R, dict(learning_rate=1e-2)),
  'nu_bf16': (R, dict(learning_rate=1e-2, nu_dtype=jnp.bfloat16)),
  'bf16_sr': (
    R,
    dict(learning_rate=1e-2, nu_dtype=jnp.bfloat16, stochastic_rounding=True),
  ),
  'uint8': (R, dict(learning_rate=1e-2, nu_dtype=jnp.uint8)),
  'packing': (R, dict(learning_rate=1e-2, packing=True)),
  'skip_nonfinite': (R, dict(learning_rate=1e-2, skip_nonfinite=True)),
  'caution': (R, dict(learning_rate=1e-2, momentum=0.9, caution=True)),
  'bias_correction': (R, dict(learning_rate=1e-2, bias_correction=True)),
  'accumulator_dtype': (
    R,
    dict(learning_rate=1e-2, momentum=0.9, accumulator_dtype=jnp.float32),
  ),
  'centered_nesterov': (
    R,
    dict(learning_rate=1e-2, centered=True, momentum=0.9, nesterov=True),
  ),
  'uint8_centered_momentum': (
    R,
    dict(learning_rate=1e-2, nu_dtype=jnp.uint8, centered=True, momentum=0.9),
  ),
  'packing_uint8': (
    R,
    dict(learning_rate=1e-2, packing=True, nu_dtype=jnp.uint8),
  ),
  'uint8_skip_nonfinite': (
    R,
    dict(learning_rate=1e-2, nu_dtype=jnp.uint8, skip_nonfinite=True),
  ),
  'pytorch': (
    presets.pytorch,
    dict(lr=1e-2, momentum=0.9, weight_decay=1e-4, centered=True),
  ),
  'keras': (
    presets.keras,
    dict(learning_rate=1e-2, momentum=0.9, weight_decay=1e-3),
  ),
  'tf1': (presets.tf1, dict(learning_rate=1e-2, momentum=0.9)),
  'timm': (presets.timm, dict(lr=1e-2, momentum=0.9, weight_decay=1e-4)),
  'hinton2012': (presets.hinton2012, {}),
  'graves2013': (presets.graves2013, {}),
  'dqn2015': (presets.dqn2015, {}),
}
BUILDERS = {
  name: functools.partial(fn, **kwargs)
  for name, (fn, kwargs) in OPTIONS.items()
}


def build(option):
  return BUILDERS[option]()


# The options that optax itself has, as optax builds them.
OPTAX_EQUIVALENT = {
  'default': lambda: optax.rmsprop(1e-2),
  'bias_correction': lambda: optax.rmsprop(1e-2, bias_correction=True),
  'skip_nonfinite': lambda: optax.apply_if_finite(
    optax.rmsprop(1e-2), max_consecutive_errors=2**30
  ),
  # (optax's wrapper around our 8-bit optimizer: what skip_nonfinite is.)
  'uint8_skip_nonfinite': lambda: optax.apply_if_finite(
    R(1e-2, nu_dtype=jnp.uint8), max_consecutive_errors=2**30
  ),
}


def build_injected(option):
  fn, kwargs = OPTIONS[option]
  return optax.inject_hyperparams(fn)(**kwargs)


STEPS = 4  # Training steps per cell; checkpoints are taken after SPLIT.
SPLIT = 2
NAN_STEP = 1  # skip_nonfinite: this step's gradient holds a NaN.


# -- Trees and gradients -------------------------------------------------------


def make_params(seed=0, extra=False):
  """A small tree: a leaf of 320 elements (two blocks of the 8-bit code),
  two (3, 4) leaves (stacked by packing) and a scalar (one block, not
  stacked); with ``extra``, also a zero-size leaf and a ``None``. Four
  leaves: each leaf adds its own kernels to every program a cell compiles
  (most of the matrix's time). A small vector would take no path that these
  do not: packing leaves it unstacked, like the scalar, and the 8-bit code
  cuts a leaf this small into blocks of its flattened values, one block
  like the (3, 4) leaves (larger leaves are cut along trailing axes)."""
  shapes = {'big': (20, 16), 'scalar': (), 'w1': (3, 4), 'w2': (3, 4)}
  params = normal_tree(shapes, seed)
  if extra:
    params['empty'] = jnp.zeros((0, 3))
    params['none'] = None
  return params


def make_grads(option, params, seed=0, nan=True):
  """``STEPS`` fixed gradient trees like ``params`` (``None`` where it has
  ``None``); for ``skip_nonfinite`` (and ``nan``), step ``NAN_STEP`` holds
  a NaN so that a step is skipped."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(1000 + seed)
  grads = []
  for t in range(STEPS):
    g = [rng.standard_normal(jnp.shape(x), np.float32) for x in leaves]
    if nan and 'skip_nonfinite' in option and t == NAN_STEP:
      i = next(i for i, x in enumerate(g) if x.size > 1)
      g[i].reshape(-1)[0] = np.nan
    g = [jnp.asarray(x, jnp.result_type(y)) for x, y in zip(g, leaves)]
    grads.append(jax.tree.unflatten(treedef, g))
  return grads


def stack(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# -- The plain functional loop (the reference) ---------------------------------


def train_step(tx):
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  return step


def plain_loop(tx, params, grads, jit=True, state=None, step=None):
  """The parameters after each step, and the final state (``step``: the
  step to run, if not ``tx``'s compiled afresh)."""
  state = tx.init(params) if state is None else state
  if step is None:
    step = jax.jit(train_step(tx)) if jit else train_step(tx)
  trajectory = []
  for g in grads:
    params, state = step(params, state, g)
    trajectory.append(params)
  return trajectory, state


@functools.cache
def jitted_step(option):
  """The plain loop's jitted step for ``option``, one per option: the
  places that run this program (the reference, the resumed runs, the
  members of the vmap) share its compilation, as a training script would."""
  return jax.jit(train_step(build(option)))


# ``optax.apply_updates`` compiled alone (nnx.Optimizer's reference).
apply_updates = jax.jit(optax.apply_updates)


@functools.cache
def reference(option, seed=0, nan=True, jit=True):
  params = make_params(seed)
  return plain_loop(
    build(option),
    params,
    make_grads(option, params, seed, nan),
    jit,
    step=jitted_step(option) if jit else None,
  )


# -- Comparisons ---------------------------------------------------------------


def _unwrap(tree):
  """Flax variables replaced by their values."""
  return jax.tree.map(
    lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def _key(k):
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat(tree):
  """(path, leaf) pairs, the path in plain strings, so that trees held in
  other containers (FrozenDict, nnx.State, Flax variables) compare with
  the plain ones."""
  tree = _unwrap(tree)
  return [
    (tuple(_key(k) for k in path), x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def assert_same_leaves(got, want, what):
  """Same paths, dtypes and bits (NaN equals NaN)."""
  got, want = flat(got), flat(want)
  assert [p for p, _ in got] == [p for p, _ in want], what
  for (path, x), (_, y) in zip(got, want):
    where = f'{what}: differs at leaf {"/".join(path)}'
    assert jnp.result_type(x) == jnp.result_type(y), where
    np.testing.assert_array_equal(
      np.asarray(x).astype(np.complex128),
      np.asarray(y).astype(np.complex128),
      err_msg=where,
    )


def assert_same_state(got, want, strict=True, params=None):
  """The two states in optax's layout, equal leaf by leaf (and, if
  ``strict``, with the same tree structure and classes). ``params`` is
  what ``unpack_state`` needs for a state ``nnx.Optimizer`` wrote back."""
  got = _unwrap(rmsprop_jax.unpack_state(_unwrap(got), params))
  want = rmsprop_jax.unpack_state(want)
  if strict:
    assert jax.tree.structure(got) == jax.tree.structure(want)
  assert_same_leaves(got, want, 'state')


def assert_same_run(option, params, state, seed=0, nan=True, jit=True):
  """``params`` and ``state`` (None if the place gives none back) equal
  the plain loop's after ``STEPS`` steps."""
  trajectory, ref_state = reference(option, seed, nan, jit)
  assert_same_leaves(params, trajectory[-1], 'params')
  if state is not None:
    assert_same_state(state, ref_state)


# -- The places ----------------------------------------------------------------


class Net(nnx.Module):
  """Two linear layers (the second has no bias, and its kernel, 8 x 40,
  spans two blocks of the 8-bit code) around a BatchNorm (its scale and
  bias, with the first bias, are three (8,) Params that packing stacks;
  its statistics are BatchStat variables that ``wrt=nnx.Param`` leaves
  out)."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.l2 = nnx.Linear(8, 40, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.bn(self.l1(x)))


def _nnx_loss(model):
  return jnp.mean(model(jnp.ones((2, 4))) ** 2)


def nnx_setup(option, tx):
  model = Net(nnx.Rngs(0))
  pure_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = make_grads(option, pure_params)
  # Gradients as nnx.grad gives them (an nnx.State of Params), from the
  # fixed pure trees.
  treedef = jax.tree.structure(
    nnx.grad(_nnx_loss, argnums=nnx.DiffState(0, nnx.Param))(model)
  )
  states = [jax.tree.unflatten(treedef, jax.tree.leaves(g)) for g in grads]
  for g, s in zip(grads, states):
    assert_trees_equal(nnx.to_pure_dict(s), g)
  batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return model, optimizer, pure_params, grads, states, batch_stats


def check_nnx(option, jit):
  """Step by step from the model's own parameters: ``opt.update`` returns
  the plain loop's updates and keeps its state, bit for bit; the new
  parameters are those updates applied, as XLA compiles ``apply_updates``
  alone or fused into the step (see the module's docstring)."""
  model, optimizer, pure_params, grads, states, batch_stats = nnx_setup(
    option, build(option)
  )
  tx = build(option)
  if jit:
    update = nnx.jit(lambda model, opt, grads: opt.update(model, grads))
  else:
    update = lambda model, opt, grads: opt.update(model, grads)
  jitted = jax.jit if jit else (lambda f: f)
  ref_update = jitted(tx.update)
  apply_alone = apply_updates if jit else optax.apply_updates
  fused = jitted(train_step(tx))
  ref_state = tx.init(pure_params)
  for t, (g, g_state) in enumerate(zip(grads, states)):
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want, next_state = ref_update(g, ref_state, before)
    assert_same_leaves(update(model, optimizer, g_state), want, f'step {t}')
    after = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    alone = flat(apply_alone(before, want))
    if not all(np.array_equal(x, y) for (_, x), (_, y) in zip(after, alone)):
      together = flat(fused(before, ref_state, g)[0])
      for (path, x), (_, y), (_, z) in zip(after, alone, together):
        assert np.array_equal(x, y) or np.array_equal(x, z), (
          f'params of step {t} differ at {"/".join(path)}'
        )
    ref_state = next_state
  # The optimizer left what is not a Param alone.
  assert_trees_equal(
    nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), batch_stats
  )
  # (Flax variables unwrapped: the numbers.)
  assert_same_state(
    _unwrap(optimizer.opt_state),
    ref_state,
    strict=False,
    params=_unwrap(nnx.state(model, nnx.Param)),
  )
  # The documented call on the optimizer's own state gives the same.
  assert_same_state(
    rmsprop_jax.unpack_state(optimizer.opt_state, nnx.state(model, nnx.Param)),
    ref_state,
    strict=False,
  )


def place_nnx_eager(option, tmp_path):
  check_nnx(option, jit=False)


def place_nnx_jit(option, tmp_path):
  check_nnx(option, jit=True)


def place_linen_checkpoint(option, tmp_path):
  tx = build(option)
  params = make_params()
  grads = [flax_core.freeze(g) for g in make_grads(option, params)]
  create = lambda: train_state.TrainState.create(
    apply_fn=None, params=flax_core.freeze(make_params()), tx=tx
  )
  state = create()
  assert isinstance(state.params, flax_core.FrozenDict)
  # One compiled program before and after the restore (see _first_steps:
  # restore_checkpoint, like Orbax, returns committed arrays).
  step = (
    jax.jit(lambda s, g: s.apply_gradients(grads=g))
    .lower(state, grads[0])
    .compile()
  )
  for g in grads[:SPLIT]:
    state = step(state, g)
  checkpoints.save_checkpoint(tmp_path / 'linen', state, step=SPLIT)
  restored = checkpoints.restore_checkpoint(tmp_path / 'linen', create())
  assert int(restored.step) == SPLIT
  assert_same_leaves(restored.params, state.params, 'restored params')
  assert_same_leaves(restored.opt_state, state.opt_state, 'restored state')
  for g in grads[SPLIT:]:
    restored = step(restored, g)
  assert_same_run(option, restored.params, None)
  # (FrozenDicts where the plain loop's state has dicts.)
  assert_same_state(restored.opt_state, reference(option)[1], strict=False)


@functools.cache
def _first_steps(option):
  """The transformation, its compiled step, the gradients, and the
  parameters and state after the first ``SPLIT`` steps (computed once per
  option: the places that resume from them never donate them).

  The step is the plain loop's program, compiled ahead of time so that the
  restored state continues in the very program that ran before the save.
  Orbax returns arrays committed to their device, for which ``jax.jit``
  would lower the same program again with sharding annotations and compile
  it a second time (the same code); pickle and ``flax.serialization`` give
  uncommitted arrays and NumPy arrays, which the same program takes."""
  tx = build(option)
  params = make_params()
  grads = make_grads(option, params)
  state = tx.init(params)
  step = jitted_step(option).lower(params, state, grads[0]).compile()
  for g in grads[:SPLIT]:
    params, state = step(params, state, g)
  return tx, step, grads, params, state


def _resume(option, tmp_path, save_and_restore):
  """Two jitted steps, a save and restore of (params, state), two more."""
  tx, step, grads, params, state = _first_steps(option)
  target = (make_params(), tx.init(make_params()))
  restored = save_and_restore((params, state), target, tmp_path)
  assert jax.tree.structure(restored) == jax.tree.structure(target)
  assert_trees_equal(restored, (params, state))
  params, state = restored
  for g in grads[SPLIT:]:
    params, state = step(params, state, g)
  assert_same_run(option, params, state)


def _orbax(tree, target, tmp_path):
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'orbax', {'params': tree[0], 'opt_state': tree[1]})
    ckpt.wait_until_finished()
    abstract = jax.eval_shape(
      lambda: {'params': target[0], 'opt_state': target[1]}
    )
    out = ckpt.restore(tmp_path / 'orbax', abstract)
  return out['params'], out['opt_state']


def _pickle(tree, target, tmp_path):
  del target, tmp_path
  return pickle.loads(pickle.dumps(tree))


def _flax_serialization(tree, target, tmp_path):
  del tmp_path
  return serialization.from_bytes(target, serialization.to_bytes(tree))


def place_orbax(option, tmp_path):
  _resume(option, tmp_path, _orbax)


def place_pickle(option, tmp_path):
  _resume(option, tmp_path, _pickle)


def place_flax_serialization(option, tmp_path):
  _resume(option, tmp_path, _flax_serialization)


def check_donate(option, make_tx):
  """The jitted step with (params, state) donated, from the fresh state,
  on a tree with a scalar, a zero-size leaf and a None, against the same
  loop without donation."""
  params = make_params(extra=True)
  grads = make_grads(option, params)
  trajectory, ref_state = plain_loop(make_tx(), copy(params), grads)
  tx = make_tx()
  step = jax.jit(train_step(tx), donate_argnums=(0, 1))
  params = copy(params)
  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  assert_trees_equal(params, trajectory[-1])
  assert_same_state(state, ref_state)


def place_donate(option, tmp_path):
  check_donate(option, lambda: build(option))


def place_donate_inject(option, tmp_path):
  check_donate(option, lambda: build_injected(option))


def _scan_or_loop(option, loop):
  tx = build(option)
  params = make_params()
  xs = stack(make_grads(option, params))
  step = train_step(tx)

  @jax.jit
  def run(params, state, xs):
    if loop == 'scan':
      return jax.lax.scan(
        lambda carry, g: (step(*carry, g), None), (params, state), xs
      )[0]
    return jax.lax.fori_loop(
      0,
      STEPS,
      lambda i, carry: step(*carry, jax.tree.map(lambda x: x[i], xs)),
      (params, state),
    )

  params, state = run(params, tx.init(params), xs)
  assert_same_run(option, params, state)


def place_scan(option, tmp_path):
  _scan_or_loop(option, 'scan')


def place_fori_loop(option, tmp_path):
  _scan_or_loop(option, 'fori_loop')


def place_vmap(option, tmp_path):
  """Three seeds in one vmap (only the first one's gradients hold the
  NaN of skip_nonfinite, so members skip different steps)."""
  tx = build(option)
  seeds = (0, 1, 2)
  params = stack([make_params(s) for s in seeds])
  grads = [
    stack(gs)
    for gs in zip(
      *(make_grads(option, make_params(s), s, s == 0) for s in seeds)
    )
  ]
  start = params
  state = jax.jit(jax.vmap(tx.init))(params)
  step = jax.jit(jax.vmap(train_step(tx)))
  for g in grads:
    params, state = step(params, state, g)
  if option in ('bias_correction', 'skip_nonfinite', 'uint8_skip_nonfinite'):
    # Compiled otherwise under vmap (see the module's docstring): optax's
    # own program in the same vmap gives the same bits.
    optax_tx = OPTAX_EQUIVALENT[option]()
    want, want_state = start, jax.vmap(optax_tx.init)(start)
    optax_step = jax.jit(jax.vmap(train_step(optax_tx)))
    for g in grads:
      want, want_state = optax_step(want, want_state, g)
    assert_same_leaves(params, want, 'params')
    assert_same_state(state, want_state)
    return
  for i, s in enumerate(seeds):
    member = jax.tree.map(lambda x, i=i: x[i], (params, state))
    assert_same_run(option, *member, seed=s, nan=s == 0)


def place_multisteps(option, tmp_path):
  """Each gradient twice in a row: the accumulated mean is that gradient,
  so every second mini-step is one step of ``MultiSteps(tx, every_k=1)``
  fed each gradient once (see the module's docstring for why not the plain
  loop), and of optax's own optimizer in the same wrapper."""
  params = make_params()
  grads = make_grads(option, params)
  once = optax.MultiSteps(build(option), every_k_schedule=1)
  trajectory, ref_state = plain_loop(once, params, grads)
  tx = optax.MultiSteps(build(option), every_k_schedule=2)
  step = jax.jit(train_step(tx))
  state = tx.init(params)
  for t, g in enumerate(grads):
    for _ in range(2):
      params, state = step(params, state, g)
    assert_same_leaves(params, trajectory[t], f'params after step {t}')
  assert_same_state(state.inner_opt_state, ref_state.inner_opt_state)
  if option in OPTAX_EQUIVALENT:
    theirs = optax.MultiSteps(OPTAX_EQUIVALENT[option](), every_k_schedule=2)
    want, _ = plain_loop(
      theirs, make_params(), [g for g in grads for _ in 'ab']
    )
    assert_same_leaves(params, want[-1], 'params against optax')


MOMENT_FIELDS = ('nu', 'mu', 'trace')


def place_tree_map_params(option, tmp_path):
  tx, step, grads, params, state = _first_steps(option)
  # Zeroing: exactly the parameter-shaped parts (the moments and the
  # momentum buffer, stacked or not) change, and they become zeros.
  zeroed = optax.tree_map_params(tx, jnp.zeros_like, state)
  assert jax.tree.structure(zeroed) == jax.tree.structure(state)
  changed = []
  for (path, old), (_, new) in zip(flat(state), flat(zeroed)):
    if not set(path) & set(MOMENT_FIELDS):
      assert_same_leaves(new, old, f'non-parameter leaf {"/".join(path)}')
    elif not np.array_equal(np.asarray(old), np.asarray(new)):
      changed.append(path)
  assert changed, 'tree_map_params changed no parameter-shaped leaf'
  for path, x in flat(rmsprop_jax.unpack_state(zeroed)):
    if set(path) & set(MOMENT_FIELDS):
      assert not np.any(np.asarray(x)), f'not zeroed: {"/".join(path)}'
  # The identity: the same structure, and training continues bit for bit.
  same = optax.tree_map_params(tx, lambda x: x, state)
  assert jax.tree.structure(same) == jax.tree.structure(state)
  state = same
  for g in grads[SPLIT:]:
    params, state = step(params, state, g)
  assert_same_run(option, params, state)


PLACES = {
  'nnx_eager': place_nnx_eager,
  'nnx_jit': place_nnx_jit,
  'linen_checkpoint': place_linen_checkpoint,
  'orbax': place_orbax,
  'pickle': place_pickle,
  'flax_serialization': place_flax_serialization,
  'donate': place_donate,
  'donate_inject': place_donate_inject,
  'scan': place_scan,
  'fori_loop': place_fori_loop,
  'vmap': place_vmap,
  'multisteps': place_multisteps,
  'tree_map_params': place_tree_map_params,
}


@pytest.mark.parametrize(
  ('option', 'place'), [(o, p) for o in OPTIONS for p in PLACES]
)
def test_cell(option, place, tmp_path):
  message = EXPECTED_ERRORS.get((option, place))
  if message is None:
    PLACES[place](option, tmp_path)
  else:
    with pytest.raises(ValueError, match=re.escape(message)):
      PLACES[place](option, tmp_path)


@pytest.mark.parametrize('option', list(OPTIONS))
def test_matrix_exercises_the_option(option):
  """The tree and gradients really exercise each option: something is
  stacked, the 8-bit code has several blocks, a step is skipped."""
  params = make_params()
  state = build(option).init(params)
  _, final = reference(option)
  kwargs = OPTIONS[option][1]
  leaves = jax.tree.leaves(
    state, is_leaf=lambda x: isinstance(x, rmsprop_jax.packing.Packed)
  )
  if kwargs.get('packing'):
    packed = [x for x in leaves if isinstance(x, rmsprop_jax.packing.Packed)]
    assert packed and all(p.layout.groups for p in packed)
  if kwargs.get('nu_dtype') is jnp.uint8:
    codes = [
      x
      for x in jax.tree.leaves(
        state,
        is_leaf=lambda x: isinstance(x, rmsprop_jax.quantization.Blockwise8bit),
      )
      if isinstance(x, rmsprop_jax.quantization.Blockwise8bit)
    ]
    assert codes and max(np.size(c.scale) for c in codes) > 1
  if kwargs.get('skip_nonfinite'):
    assert int(optax.tree.get(final, 'total_notfinite')) == 1
  for x in jax.tree.leaves(rmsprop_jax.unpack_state(final)):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      assert np.all(np.isfinite(np.asarray(x, np.float32)))


# -- Known bugs (the cases), written as the right behaviour ------------


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'nnx_jit'])
def test_case1_nnx_optimizer_with_8bit_state(jit):
  """The second ``update`` of an ``nnx.Optimizer`` with an 8-bit ``nu``
  works (it raised 'has a float nu'), and equals the plain loop."""
  tx = lambda: R(1e-3, nu_dtype=jnp.uint8)
  model, optimizer, pure_params, grads, states, _ = nnx_setup('case1', tx())
  update = lambda model, opt, grads: opt.update(model, grads)
  if jit:
    update = nnx.jit(update)
  for g in states:
    update(model, optimizer, g)
  trajectory, ref_state = plain_loop(tx(), pure_params, grads, jit=jit)
  assert_same_leaves(
    nnx.to_pure_dict(nnx.state(model, nnx.Param)), trajectory[-1], 'params'
  )
  assert_same_state(
    _unwrap(optimizer.opt_state),
    ref_state,
    strict=False,
    params=_unwrap(nnx.state(model, nnx.Param)),
  )
  # The diagnostics read the optimizer's own state, with or without the
  # parameters.
  eff = lambda state, **kw: rmsprop_jax.effective_learning_rate(
    state, 1e-3, eps=1e-8, eps_in_sqrt=True, bias_correction=False, **kw
  )
  for kwargs in ({}, {'params': nnx.state(model, nnx.Param)}):
    assert_same_leaves(
      eff(optimizer.opt_state, **kwargs),
      eff(ref_state),
      'effective learning rate',
    )


def test_8bit_moment_rebuilt_as_a_mapping():
  """A container that rebuilds an 8-bit moment as a plain mapping of its
  two arrays (a Flax state dict, or NNX before the code replaced the
  variable): ``update`` takes it (the shape comes from the gradients),
  ``unpack_state`` and the diagnostics need the parameters and say so."""
  tx = R(1e-2, nu_dtype=jnp.uint8)
  params = make_params()
  grads = make_grads('uint8', params)
  trajectory, ref_state = plain_loop(tx, params, grads[:SPLIT])
  mapped = ref_state[0]._replace(
    nu=jax.tree.map(
      lambda q: {'codes': q.codes, 'scale': q.scale},
      ref_state[0].nu,
      is_leaf=lambda x: isinstance(x, rmsprop_jax.quantization.Blockwise8bit),
    )
  )
  state = (mapped, *ref_state[1:])
  want = plain_loop(tx, trajectory[-1], grads[SPLIT:], state=ref_state)
  got = plain_loop(tx, trajectory[-1], grads[SPLIT:], state=state)
  assert_same_leaves(got[0][-1], want[0][-1], 'params')
  assert_same_state(rmsprop_jax.unpack_state(state, params), ref_state)
  with pytest.raises(ValueError, match='pass the parameters'):
    rmsprop_jax.unpack_state(state)
  with pytest.raises(ValueError, match='pass the parameters'):
    rmsprop_jax.effective_learning_rate(
      state, 1e-2, eps=1e-8, eps_in_sqrt=True, bias_correction=False
    )


def test_case2_donating_a_fresh_injected_state():
  """A fresh ``inject_hyperparams`` state can be donated (it held one
  buffer twice: 'Attempt to donate the same buffer twice')."""
  tx = optax.inject_hyperparams(R)(learning_rate=1e-2)
  params = {'w': jnp.ones(3), 'temp': jnp.array(1.0)}
  step = jax.jit(train_step(tx), donate_argnums=(1,))
  state = tx.init(params)
  g = {'w': jnp.full(3, 0.5), 'temp': jnp.array(2.0)}
  trajectory, ref_state = plain_loop(tx, params, [g, g])
  for _ in range(2):
    params, state = step(params, state, g)
  assert_trees_equal(params, trajectory[-1])
  assert_trees_equal(state, ref_state)


@pytest.mark.parametrize('injected', [False, True], ids=['plain', 'inject'])
@pytest.mark.parametrize('option', list(OPTIONS))
def test_case2_fresh_state_holds_no_buffer_twice(option, injected):
  tx = build_injected(option) if injected else build(option)
  for params in (
    make_params(extra=True),
    {'w': jnp.ones(3), 'temp': jnp.array(1.0)},
  ):
    seen = {}
    for path, x in flat(tx.init(params)):
      if np.size(x) == 0:
        continue
      pointer = x.unsafe_buffer_pointer()
      assert pointer not in seen, (
        f'{"/".join(path)} and {"/".join(seen[pointer])} share a buffer'
      )
      seen[pointer] = path


CASE3_TX = {
  'uint8': dict(nu_dtype=jnp.uint8),
  'uint8_centered': dict(nu_dtype=jnp.uint8, centered=True),
  'packing': dict(packing=True),
}


def _case3_problem():
  params = {
    'a': jnp.linspace(-1.0, 1.0, 300).reshape(20, 15),
    'b': jnp.arange(12.0).reshape(3, 4) / 7,
    'c': jnp.ones((3, 4)),
  }
  grads = [
    jax.tree.map(lambda p, i=i: jnp.cos(p * (i + 1)), params) for i in range(5)
  ]
  return params, grads


@pytest.mark.parametrize('name', list(CASE3_TX))
def test_case3_pack_state_with_frozendict_params(name):
  """``pack_state`` takes FrozenDict parameters (Linen's) as it takes
  dicts: the state has ``tx.init(params)``'s structure, and training on
  from it equals the same conversion of dict parameters."""
  params, grads = _case3_problem()
  centered = CASE3_TX[name].get('centered', False)
  ref_tx = optax.rmsprop(1e-3, centered=centered)
  tx = R(1e-3, **CASE3_TX[name])
  frozen = flax_core.freeze(params)
  frozen_grads = [flax_core.freeze(g) for g in grads]
  # The optax state a Linen run holds (FrozenDicts inside), and a dict run's.
  from_frozen = rmsprop_jax.pack_state(
    plain_loop(ref_tx, frozen, frozen_grads[:2])[1], tx, frozen
  )
  from_dict = rmsprop_jax.pack_state(
    plain_loop(ref_tx, params, grads[:2])[1], tx, params
  )
  assert jax.tree.structure(from_frozen) == jax.tree.structure(tx.init(frozen))
  ours = plain_loop(tx, frozen, frozen_grads[2:], state=from_frozen)
  want = plain_loop(tx, params, grads[2:], state=from_dict)
  assert_same_leaves(ours[0][-1], want[0][-1], 'params')
  assert_same_state(ours[1], want[1], strict=False)


@pytest.mark.parametrize('name', list(CASE3_TX))
def test_case3_pack_state_mismatch_message_is_short(name):
  """A genuinely mismatched state (another parameter shape) is refused
  with a short message that names the path."""
  params, _ = _case3_problem()
  frozen = flax_core.freeze(params)
  other = dict(params, b=jnp.ones((3, 5)))
  centered = CASE3_TX[name].get('centered', False)
  wrong = optax.rmsprop(1e-3, centered=centered).init(flax_core.freeze(other))
  tx = R(1e-3, **CASE3_TX[name])
  with pytest.raises(ValueError) as info:
    rmsprop_jax.pack_state(wrong, tx, frozen)
  message = str(info.value)
  assert len(message) < 400, (len(message), message)
  # The path into the state: [0].nu..., or .inner[0].nu... when packed.
  assert re.search(r'\[0\]\.(nu|mu)', message), message


CASE4_TARGETS = {
  'packing': dict(packing=True),
  'uint8': dict(nu_dtype=jnp.uint8),
}


def _case4_checkpoint(tmp_path):
  params = flax_core.freeze(make_params())
  state = train_state.TrainState.create(
    apply_fn=None, params=params, tx=optax.rmsprop(1e-2)
  )
  for g in make_grads('default', make_params())[:2]:
    state = state.apply_gradients(grads=flax_core.freeze(g))
  return state


# What each restore path says: Flax's Orbax-backed restore_checkpoint fills
# what the checkpoint lacks from the target, so the library must catch it
# and name the conversion; Orbax with a target and Flax's from_bytes refuse
# the mismatch themselves (Orbax: "Structure mismatch"; from_bytes for the
# 8-bit state: its namedtuple fields, 'count'), which is not silent.
CASE4_MESSAGES = {
  ('packing', 'flax_checkpoints'): 'pack_state',
  ('uint8', 'flax_checkpoints'): 'pack_state',
  ('packing', 'from_bytes'): 'pack_state',
  ('uint8', 'from_bytes'): 'do not match',
  ('packing', 'orbax'): 'not found',
  ('uint8', 'orbax'): 'not found',
}


@pytest.mark.parametrize('how', ['flax_checkpoints', 'orbax', 'from_bytes'])
@pytest.mark.parametrize('target', list(CASE4_TARGETS))
def test_case4_optax_checkpoint_into_other_layout_raises(target, how, tmp_path):
  """An optax checkpoint restored into the state of ``packing=True`` or an
  8-bit ``nu`` raises a ValueError (through Flax's ``restore_checkpoint``
  it returned the target's fresh state, silently; now it names
  ``pack_state``)."""
  saved = _case4_checkpoint(tmp_path)
  fresh = train_state.TrainState.create(
    apply_fn=None,
    params=flax_core.freeze(make_params()),
    tx=R(1e-2, **CASE4_TARGETS[target]),
  )
  with pytest.raises(ValueError, match=CASE4_MESSAGES[target, how]):
    if how == 'flax_checkpoints':
      checkpoints.save_checkpoint(tmp_path / 'ckpt', saved, step=2)
      checkpoints.restore_checkpoint(tmp_path / 'ckpt', fresh)
    elif how == 'orbax':
      with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / 'orbax', saved)
        ckpt.wait_until_finished()
        ckpt.restore(tmp_path / 'orbax', jax.eval_shape(lambda: fresh))
    else:
      serialization.from_bytes(fresh, serialization.to_bytes(saved))


CASE5_TX = {
  'rmsprop': (
    lambda: R(1e-3, decay=0.0),
    lambda g: g / np.sqrt(g * g + np.float32(1e-8)),
  ),
  'pytorch': (
    lambda: presets.pytorch(lr=1e-3, alpha=0.0),
    lambda g: g / (np.sqrt(g * g) + np.float32(1e-8)),
  ),
}


@pytest.mark.parametrize('name', list(CASE5_TX))
def test_case5_float16_decay_zero_forgets_an_overflow(name):
  """With decay 0 the history does not matter: after a gradient whose
  square overflows float16, the next steps are a fresh optimizer's (no
  NaN from 0 * inf)."""
  make_tx, normalised = CASE5_TX[name]
  tx = make_tx()
  params = {'w': jnp.ones(3, jnp.float16)}
  grads = [
    {'w': jnp.array(g, jnp.float16)}
    for g in ([1, 300, 1], [1, 1, 1], [1, 1, 1])
  ]
  update = jax.jit(tx.update)
  state = tx.init(params)
  updates = []
  for g in grads:
    u, state = update(g, state, params)
    updates.append(u)
    for x in jax.tree.leaves((u, state)):
      if jnp.issubdtype(x.dtype, jnp.floating):
        assert not np.any(np.isnan(np.asarray(x, np.float32)))
  g = np.ones(3, np.float32)
  want = (-np.float32(1e-3) * normalised(g)).astype(np.float16)
  for u in updates[1:]:
    assert u['w'].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(u['w']), want)


# -- From the fresh review: where NNX, Flax and optax wrappers hold the
# state ------------------------------------------------------------------


def _linear_loss(model):
  return jnp.mean(model(jnp.linspace(-1.0, 1.0, 4 * 300).reshape(4, 300)) ** 2)


WRAPPED_8BIT = {
  'skip_nonfinite': lambda: R(1e-3, nu_dtype=jnp.uint8, skip_nonfinite=True),
  'skip_packing': lambda: R(
    1e-3, nu_dtype=jnp.uint8, skip_nonfinite=True, packing=True
  ),
  'apply_if_finite': lambda: optax.apply_if_finite(
    R(1e-3, nu_dtype=jnp.uint8), 3
  ),
  'multisteps': lambda: optax.MultiSteps(R(1e-3, nu_dtype=jnp.uint8), 2),
}


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'nnx_jit'])
@pytest.mark.parametrize('name', list(WRAPPED_8BIT))
def test_8bit_state_in_nnx_under_optax_wrappers(name, jit):
  """The 8-bit state keeps its form through NNX's write-back, so optax's
  conditional wrappers (whose two branches must agree) run in
  ``nnx.Optimizer``; the result is the plain loop's."""
  model = nnx.Linear(300, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, WRAPPED_8BIT[name](), wrt=nnx.Param)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = WRAPPED_8BIT[name]()
  state = tx.init(pure)
  grad = jax.jit(jax.grad(lambda p: _linear_loss(nnx.merge(graphdef, p))))
  graphdef = nnx.graphdef(model)
  update = lambda model, opt, grads: opt.update(model, grads)
  if jit:
    update = nnx.jit(update)
  ref_update = jax.jit(tx.update) if jit else tx.update
  for _ in range(4):
    g = grad(nnx.state(model, nnx.Param))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want, state = ref_update(nnx.to_pure_dict(g), state, before)
    assert_same_leaves(update(model, optimizer, g), want, 'updates')
  assert_same_state(
    optimizer.opt_state, state, strict=False, params=nnx.state(model)
  )


def test_8bit_nnx_optimizer_in_fori_loop_from_fresh():
  """A fresh 8-bit ``nnx.Optimizer`` as an ``nnx.fori_loop`` carry: the
  state has the same form before and after an update."""
  model = nnx.Linear(300, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, R(1e-3, nu_dtype=jnp.uint8), wrt=nnx.Param)
  fresh = jax.tree.structure(nnx.as_pure(nnx.state(optimizer)))

  @nnx.jit
  def run(model, optimizer):
    def body(i, carry):
      model, optimizer = carry
      optimizer.update(model, nnx.grad(_linear_loss)(model))
      return model, optimizer

    return nnx.fori_loop(0, 3, body, (model, optimizer))

  run(model, optimizer)
  assert int(optimizer.step[...]) == 3
  assert jax.tree.structure(nnx.as_pure(nnx.state(optimizer))) == fresh


def test_8bit_nnx_pure_dict_checkpoint():
  """Flax NNX's pure-dict checkpoint idiom (``to_pure_dict`` /
  ``replace_by_pure_dict``) restores an 8-bit optimizer, which continues
  as the one saved."""
  make = lambda seed: nnx.Linear(300, 2, rngs=nnx.Rngs(seed))
  tx = lambda: R(1e-3, nu_dtype=jnp.uint8)
  model = make(0)
  optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)
  for _ in range(2):
    optimizer.update(model, nnx.grad(_linear_loss)(model))
  saved = nnx.to_pure_dict(nnx.state((model, optimizer)))
  other = make(1)
  restored = nnx.Optimizer(other, tx(), wrt=nnx.Param)
  state = nnx.state((other, restored))
  nnx.replace_by_pure_dict(state, saved)
  nnx.update((other, restored), state)
  for m, o in ((model, optimizer), (other, restored)):
    o.update(m, nnx.grad(_linear_loss)(m))
  assert_same_leaves(nnx.state(other), nnx.state(model), 'model')
  assert_same_state(
    restored.opt_state, optimizer.opt_state, strict=False, params=None
  )


@pytest.mark.parametrize('name', ['uint8', 'bf16_sr', 'packing'])
def test_pack_state_with_nnx_state_params(name):
  """``pack_state`` takes an ``nnx.State`` of Params, with an optax state
  built from it or from its pure dict, and converts as for the pure dict."""
  kwargs = {k: v for k, v in OPTIONS[name][1].items() if k != 'learning_rate'}
  model = nnx.Linear(300, 2, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  grads = [jax.tree.map(lambda p, i=i: jnp.cos(p * i), pure) for i in (1, 2)]
  plain = plain_loop(optax.rmsprop(1e-2), pure, grads)[1]
  tx = R(1e-2, **kwargs)
  leaves = lambda tree: jax.tree.leaves(_unwrap(tree))
  for source, pure_source in (
    (plain, plain),
    (optax.rmsprop(1e-2).init(params), optax.rmsprop(1e-2).init(pure)),
  ):
    got = leaves(rmsprop_jax.pack_state(source, tx, params))
    want = leaves(rmsprop_jax.pack_state(pure_source, tx, pure))
    assert len(got) == len(want) == len(leaves(tx.init(pure)))
    for x, y in zip(got, want):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('name', ['skip_nonfinite', 'uint8_skip_nonfinite'])
def test_pack_state_wraps_and_unwraps_skip_nonfinite(name):
  """An optax checkpoint converts into ``skip_nonfinite``'s state (no step
  skipped yet) and back into optax's, and trains on as the unconverted
  optimizer would."""
  tx = build(name)
  params = make_params()
  grads = make_grads(name, params, nan=False)
  plain_tx = optax.rmsprop(1e-2)
  plain = plain_loop(plain_tx, params, grads[:2])[1]
  state = rmsprop_jax.pack_state(plain, tx, params)
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
  assert int(optax.tree.get(state, 'total_notfinite')) == 0
  back = rmsprop_jax.pack_state(state, plain_tx, params)
  assert jax.tree.structure(back) == jax.tree.structure(plain)
  if name == 'skip_nonfinite':
    # Lossless, and the converted state is optax.apply_if_finite's: optax
    # continues from it as we do (its step runs in the same lax.cond).
    assert_trees_equal(back, plain)
    theirs = OPTAX_EQUIVALENT[name]()
    assert_same_leaves(
      plain_loop(tx, params, grads[2:], state=state)[0][-1],
      plain_loop(theirs, params, grads[2:], state=state)[0][-1],
      'params',
    )


NARROW_NU = {
  'float16 params': (jnp.float16, {}),
  'nu_dtype=float16': (jnp.float32, dict(nu_dtype=jnp.float16)),
  'bfloat16 params, nu_dtype=float16': (
    jnp.bfloat16,
    dict(nu_dtype=jnp.float16),
  ),
}


@pytest.mark.parametrize('name', list(NARROW_NU))
def test_centered_float16_nu_that_saturates_stays_close(name):
  """Centered RMSprop whose float16 ``nu`` saturates (a steady gradient of
  250, a spike of 400): ``mu`` is scaled with ``nu``, so the variance keeps
  its sign and the run stays within a few percent of the same run with a
  float32 ``nu`` (it went to -inf, or stepped 1000 times too far)."""
  dtype, kwargs = NARROW_NU[name]
  runs = []
  for tx in (
    R(1e-3, centered=True, **kwargs),
    R(1e-3, centered=True, nu_dtype=jnp.float32),
  ):
    params, state = jnp.zeros(1, dtype), tx.init(jnp.zeros(1, dtype))
    update = jax.jit(tx.update)
    for g in [250.0] * 50 + [400.0] + [250.0] * 2:
      u, state = update(jnp.array([g], dtype), state, params)
      assert np.all(np.isfinite(np.asarray(u, np.float32)))
      params = optax.apply_updates(params, u)
    runs.append(float(params[0]))
  ours, wide = runs
  assert wide < -0.2
  assert abs(ours - wide) < 0.02 * abs(wide), (ours, wide)


@pytest.mark.parametrize('decay', [0.9, 0.0])
def test_float16_overflow_saturates_and_the_entry_moves_on(decay):
  """Plain RMSprop on float16 parameters with a square past 65504: ``nu``
  saturates, every step stays finite, and with ``decay=0`` the next steps
  are a fresh optimizer's."""
  tx = R(1e-3, decay=decay)
  params = jnp.zeros(2, jnp.float16)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(20):
    u, state = update(jnp.array([300.0, 0.5], jnp.float16), state, params)
    params = optax.apply_updates(params, u)
    for x in jax.tree.leaves((u, state, params)):
      assert np.all(np.isfinite(np.asarray(x, np.float32))), x
  assert float(optax.tree.get(state, 'nu')[0]) == 65504
  assert float(params[0]) < 0 and float(params[1]) < 0  # Both moved.


@pytest.mark.parametrize('eps_in_sqrt', [False, True])
def test_float16_nu_never_rounds_a_positive_moment_to_zero(eps_in_sqrt):
  """A positive ``nu`` below float16's smallest subnormal is stored as it
  (6e-8), not as 0: eps outside the root then divides by 2.4e-4, not by
  1e-8 (a step 1000 times too long)."""
  tx = R(1e-2, decay=0.99, eps_in_sqrt=eps_in_sqrt, nu_dtype=jnp.float16)
  params = jnp.zeros(3)
  g = jnp.array([1e-3, 3e-3, 0.1])
  u, state = tx.update(g, tx.init(params), params)
  nu = np.asarray(optax.tree.get(state, 'nu'), np.float32)
  assert np.all(nu > 0)
  # The exact first step is -lr * sign(g) / sqrt(1 - decay) = -0.1 (eps
  # aside); the stored floor can only shorten it.
  assert np.all(np.asarray(u) < 0) and np.all(np.asarray(u) >= -0.1001)
  u2, _ = tx.update(g, state, params)
  assert np.all(np.isfinite(np.asarray(u2))) and np.all(np.asarray(u2) >= -1.0)


@pytest.mark.parametrize('n', [200, 100, 400])
def test_8bit_state_of_another_model_is_refused(n):
  """An 8-bit state restored into a model whose leaf needs another number
  of blocks (NNX's pure-dict idiom: 300 x 2 saved) raises, naming the
  leaf, at the first update; it trained on silently (fewer blocks) or
  failed in a reshape (more)."""
  loss = lambda m: jnp.mean(m(jnp.ones((4, m.in_features))) ** 2)
  model = nnx.Linear(300, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, R(1e-3, nu_dtype=jnp.uint8), wrt=nnx.Param)
  optimizer.update(model, nnx.grad(loss)(model))
  saved = nnx.to_pure_dict(nnx.state(optimizer))
  other = nnx.Linear(n, 2, rngs=nnx.Rngs(1))
  restored = nnx.Optimizer(other, R(1e-3, nu_dtype=jnp.uint8), wrt=nnx.Param)
  state = nnx.state(restored)
  nnx.replace_by_pure_dict(state, saved)
  nnx.update(restored, state)
  with pytest.raises(ValueError, match=r"8-bit nu at \['kernel'\]"):
    restored.update(other, nnx.grad(loss)(other))
