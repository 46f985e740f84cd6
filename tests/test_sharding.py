"""The optimizer on a mesh of 8 (simulated CPU) devices.

The suite runs on one device (the layout users start from); this module
re-runs itself in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The reference for
every sharded result is the same computation on one device; communication is
read from the compiled program.
"""

import contextlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax

from helpers import assert_trees_equal

N_DEVICES = 8
COLLECTIVES = (
  'all-reduce',
  'all-gather',
  'reduce-scatter',
  'collective-permute',
  'all-to-all',
)

if jax.device_count() < N_DEVICES:

  def test_on_eight_devices():
    env = dict(
      os.environ,
      XLA_FLAGS=(
        os.environ.get('XLA_FLAGS', '')
        + f' --xla_force_host_platform_device_count={N_DEVICES}'
      ).strip(),
    )
    result = subprocess.run(
      [
        sys.executable,
        '-m',
        'pytest',
        '-q',
        '-p',
        'no:cacheprovider',
        # One process: this test already holds one of the suite's workers.
        '-n',
        '0',
        __file__,
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
    )
    print(result.stdout[-5000:], result.stderr[-3000:])
    assert result.returncode == 0, result.stdout[-5000:]
    assert re.search(r'\b\d+ passed', result.stdout)
    assert 'skipped' not in result.stdout

else:
  VARIANTS = {
    'plain': {},
    'centered+momentum': dict(centered=True, momentum=0.9),
    'weight decay, nesterov': dict(
      momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    'bf16 nu (SR)': dict(nu_dtype=jnp.bfloat16, stochastic_rounding=True),
    'bf16 nu': dict(nu_dtype=jnp.bfloat16),
    'fp16 nu': dict(nu_dtype=jnp.float16),
    '8-bit nu': dict(nu_dtype=jnp.uint8),
    '8-bit nu, centered+momentum': dict(
      nu_dtype=jnp.uint8, centered=True, momentum=0.9
    ),
  }

  # The variants optax has, as optax builds them.
  OPTAX_EQUIVALENT = {
    'plain': lambda: optax.rmsprop(1e-2),
    'centered+momentum': lambda: optax.rmsprop(
      1e-2, centered=True, momentum=0.9
    ),
    'weight decay, nesterov': lambda: optax.chain(
      optax.add_decayed_weights(1e-2),
      optax.rmsprop(1e-2, momentum=0.9, nesterov=True),
    ),
  }

  def optax_step(tx):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  def _mesh(kind='auto', shape=(4, 2)):
    types = (AxisType.Auto if kind == 'auto' else AxisType.Explicit,) * 2
    return jax.make_mesh(shape, ('data', 'model'), axis_types=types)

  def _specs():
    # Model-parallel kernels and biases, replicated norms and embeddings.
    return {
      'w1': P(None, 'model'),
      'b1': P('model'),
      'w2': P('model', None),
      'b2': P(),
      'scale': P(),
      'emb': P(None, None),
    }

  def _params(mesh, seed=0):
    # w1, b1 and w2 are split over 'model' in whole blocks of the 8-bit
    # code (512 of w1's rows of 1024, b1's 1024, 512 of w2's rows of 12).
    shapes = {
      'w1': (16, 1024),
      'b1': (1024,),
      'w2': (1024, 12),
      'b2': (12,),
      'scale': (12,),
      'emb': (32, 12),
    }
    # NumPy draws the values (jax.random would compile a program per shape).
    rng = np.random.default_rng(seed)
    return {
      name: jax.device_put(
        rng.standard_normal(shape, np.float32),
        NamedSharding(mesh, _specs()[name]),
      )
      for name, shape in shapes.items()
    }

  def _collectives(compiled) -> set[str]:
    text = compiled.as_text()
    return {c for c in COLLECTIVES if re.search(rf'\b{c}(-start)?\(', text)}

  def _assert_same_places(tree, ref):
    """Each leaf of ``tree`` sharded as the matching leaf of ``ref``."""
    assert jax.tree.structure(tree) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
      b = getattr(b, 'sharding', b)
      assert a.sharding.is_equivalent_to(b, a.ndim), (a.sharding, b)

  def _is_code(x):
    return isinstance(x, rmsprop_jax.quantization.Blockwise8bit)

  def test_default_does_not_pack_on_several_devices():
    state = rmsprop_jax.rmsprop(0.1).init([jnp.zeros(3)] * 4)
    assert not isinstance(state, rmsprop_jax.packing.PackedState)

  @pytest.mark.parametrize('variant', list(VARIANTS))
  @pytest.mark.parametrize('kind', ['auto', 'explicit'])
  def test_state_follows_params_and_update_needs_no_communication(
    variant, kind
  ):
    mesh = _mesh(kind)
    params = _params(mesh)
    tx = rmsprop_jax.rmsprop(1e-2, **VARIANTS[variant])
    shardings = rmsprop_jax.state_shardings(tx, params)
    with jax.set_mesh(mesh):
      eager = tx.init(params)
      jitted = jax.jit(tx.init, out_shardings=shardings)(params)
      abstract = jax.eval_shape(tx.init, params)
      for state in (eager, jitted):
        for s, expect in zip(
          jax.tree.leaves(state), jax.tree.leaves(shardings)
        ):
          assert s.sharding.is_equivalent_to(expect, s.ndim)
      # Every state leaf shaped like a parameter sits where it does (an
      # 8-bit nu's codes; its block scales split along with them).
      nu = optax.tree.get(eager, 'nu')
      coded = isinstance(nu['w1'], rmsprop_jax.quantization.Blockwise8bit)
      if coded:
        _assert_same_places(
          jax.tree.map(lambda q: q.codes, nu, is_leaf=_is_code), params
        )
        assert nu['w1'].scale.shape == (16, 4)
        assert nu['w1'].scale.sharding.spec == P(None, 'model')
        assert nu['w2'].scale.sharding.spec == P('model')
      else:
        _assert_same_places(nu, params)
      assert jax.tree.structure(abstract) == jax.tree.structure(eager)

      def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      grads = _params(mesh, seed=1)
      jstep = jax.jit(step, donate_argnums=(0, 1))
      compiled = jstep.lower(params, eager, grads).compile()
      assert _collectives(compiled) == set()
      new_params, new_state = compiled(params, eager, grads)
      # Shardings and dtypes are the same after the update as before.
      _assert_same_places(new_params, grads)
      for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(jitted)):
        assert a.dtype == b.dtype
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)

    # The sharded result is optax's sharded one, bit for bit. (Sharded and
    # single-device programs may round an entry differently, optax's too:
    # one entry of centered + momentum on an AVX-512 CPU.) Stochastic
    # rounding, which optax lacks, is compared with its single-device run.
    theirs = OPTAX_EQUIVALENT.get(variant)
    if theirs is None:
      local = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x)),
        (_params(mesh), _params(mesh, seed=1)),
      )
      ref = jax.jit(step)(local[0], tx.init(local[0]), local[1])
    else:
      with jax.set_mesh(mesh):
        ref_params = _params(mesh)
        ref = jax.jit(optax_step(theirs()))(
          ref_params, theirs().init(ref_params), _params(mesh, seed=1)
        )
    ours = (new_params, new_state)
    if jax.tree.structure(ours) != jax.tree.structure(ref):
      ours, ref = ours[0], ref[0]  # A chain of optax's nests otherwise.
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  SKIP_OPTIONS = {
    'f32': {},
    'u8': dict(nu_dtype=jnp.uint8),
    'bf16_buffer': dict(momentum=0.9, accumulator_dtype=jnp.bfloat16),
  }

  @pytest.mark.parametrize(
    ('kind', 'option'),
    [(k, 'f32') for k in ('auto', 'explicit', 'mixed')]
    + [
      ('explicit', 'u8'),
      ('explicit', 'bf16_buffer'),
      ('mixed', 'bf16_buffer'),
    ],
  )
  def test_skip_nonfinite_on_a_mesh(kind, option):
    """``skip_nonfinite`` on a mesh of Auto, Explicit or mixed axes ('data'
    Auto, 'model' Explicit), jitted and eagerly (outside ``jax.set_mesh``
    where arrays carry Explicit axes; the 8-bit state, slow to run eagerly
    on 8 devices, jitted only): the step with a NaN is skipped (zero
    updates placed as the gradients are on Explicit axes; the state kept),
    and the jitted steps equal optax's own ``apply_if_finite`` around the
    same optimizer, bit for bit and placed alike. (The skipped branch's
    zeros, and the eager init's bfloat16 momentum buffer, had no sharding:
    'cond branches must have equal output types' on Explicit axes, and an
    error in the eager step outside ``set_mesh``.)"""
    types = {
      'auto': (AxisType.Auto,) * 2,
      'explicit': (AxisType.Explicit,) * 2,
      'mixed': (AxisType.Auto, AxisType.Explicit),
    }[kind]
    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=types)
    kwargs = SKIP_OPTIONS[option]
    tx = rmsprop_jax.rmsprop(1e-2, skip_nonfinite=True, **kwargs)
    theirs = optax.apply_if_finite(
      rmsprop_jax.rmsprop(1e-2, **kwargs), max_consecutive_errors=2**30
    )
    params = _params(mesh)
    finite = _params(mesh, seed=1)
    with_nan = np.asarray(finite['w1']).copy()
    with_nan[3, 700] = np.nan
    nan = dict(finite, w1=jax.device_put(with_nan, finite['w1'].sharding))
    runs = [(jax.jit(tx.update), True)]
    if option != 'u8':  # Eagerly; Explicitly typed arrays outside set_mesh.
      runs.append((tx.update, kind == 'auto'))
    for update, in_mesh in runs:
      with jax.set_mesh(mesh) if in_mesh else contextlib.nullcontext():
        state = tx.init(params)
        ref_state = theirs.init(params)
        for t, grads in enumerate((finite, nan, finite)):
          before = state
          updates, state = update(grads, state, params)
          if kind != 'auto':  # (On Auto axes XLA places them.)
            _assert_same_places(updates, params)
          if t == 1:
            assert not np.any(
              [np.any(np.asarray(u)) for u in jax.tree.leaves(updates)]
            )
            assert_trees_equal(state.inner_state, before.inner_state)
          if update is not tx.update:  # optax's wrapper fails eagerly here.
            want, ref_state = jax.jit(theirs.update)(grads, ref_state, params)
            for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
              np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
              assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        assert int(state.total_notfinite) == 1

  def _bytes_per_device(tree, mesh):
    return max(
      sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == d
      )
      for d in mesh.devices.flat
    )

  def _zero1_step(tx, mesh, params, zero1):
    """One donated step from the ZeRO-1 state: (the collectives in its
    program, the new parameters, the new state)."""
    with jax.set_mesh(mesh):
      state = jax.jit(tx.init, out_shardings=zero1)(params)
      grads = _params(mesh, seed=1)
      param_shardings = jax.tree.map(lambda x: x.sharding, params)
      jstep = jax.jit(
        optax_step(tx),
        donate_argnums=(0, 1),
        out_shardings=(param_shardings, zero1),
      )
      compiled = jstep.lower(params, state, grads).compile()
      return (_collectives(compiled), *compiled(params, state, grads))

  def test_zero1_shards_state_over_data_with_one_all_gather():
    mesh = _mesh('auto')
    params = _params(mesh)
    tx = rmsprop_jax.rmsprop(1e-2, centered=True, momentum=0.9)
    plain = rmsprop_jax.state_shardings(tx, params)
    zero1 = rmsprop_jax.state_shardings(tx, params, zero1_axis='data')
    nu = optax.tree.get(zero1, 'nu')
    # Split over 'data' on the first dimension that divides evenly, on top
    # of the parameter's own split.
    assert {k: v.spec for k, v in nu.items()} == {
      'w1': P('data', 'model'),
      'b1': P(('model', 'data')),
      'w2': P(('model', 'data'), None),
      'b2': P('data'),
      'scale': P('data'),
      'emb': P('data', None),
    }

    collectives, new_params, new_state = _zero1_step(tx, mesh, params, zero1)
    # Each device updates its slice; the slices of the update are then
    # gathered for the replicated parameters. Nothing else moves.
    assert collectives == {'all-gather'}
    full = jax.jit(tx.init, out_shardings=plain)(_params(mesh))
    # 4 data-parallel replicas: a quarter of the state per device.
    assert _bytes_per_device(new_state, mesh) * 4 == pytest.approx(
      _bytes_per_device(full, mesh), rel=0.01
    )
    # And the same numbers as without ZeRO-1.
    with jax.set_mesh(mesh):
      ref, _ = jax.jit(optax_step(tx))(
        _params(mesh), full, _params(mesh, seed=1)
      )
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_zero1_splits_an_8bit_state_in_whole_blocks():
    mesh = _mesh('auto')
    params = _params(mesh)
    tx = rmsprop_jax.rmsprop(
      1e-2, nu_dtype=jnp.uint8, centered=True, momentum=0.9
    )
    plain = rmsprop_jax.state_shardings(tx, params)
    zero1 = rmsprop_jax.state_shardings(tx, params, zero1_axis='data')
    nu = optax.tree.get(zero1, 'nu')
    # Over 'data' where each device keeps whole blocks of 256: b1's 1024
    # over 8 devices would cut them, and b2, scale and emb are one block
    # or a block and a part. mu and the momentum buffer split alike.
    expect = {
      'w1': (P('data', 'model'), P('data', 'model')),
      'b1': (P('model'), P('model')),
      'w2': (P(('model', 'data'), None), P(('model', 'data'))),
      'b2': (P(None), P(None)),
      'scale': (P(None), P(None)),
      'emb': (P(None, None), P(None)),
    }
    assert {k: (q.codes.spec, q.scale.spec) for k, q in nu.items()} == expect
    mu = optax.tree.get(zero1, 'mu')
    for k, s in mu.items():
      assert s.is_equivalent_to(
        NamedSharding(mesh, expect[k][0]), len(expect[k][0])
      ), k

    collectives, new_params, new_state = _zero1_step(tx, mesh, params, zero1)
    assert collectives == {'all-gather'}
    full = jax.jit(tx.init, out_shardings=plain)(_params(mesh))
    assert _bytes_per_device(new_state, mesh) < 0.35 * _bytes_per_device(
      full, mesh
    )
    with jax.set_mesh(mesh):
      ref = jax.jit(optax_step(tx))(_params(mesh), full, _params(mesh, seed=1))
    for a, b in zip(
      jax.tree.leaves((new_params, new_state)), jax.tree.leaves(ref)
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  @pytest.mark.parametrize('nu_dtype', [None, jnp.uint8])
  def test_state_shardings_through_masked_and_multi_transform(nu_dtype):
    """optax.masked (and so multi_transform) holds MaskedNode leaves where
    a parameter is masked out: they stay as they are."""
    mesh = _mesh('auto')
    params = _params(mesh)
    mask = {k: k.startswith('w') for k in params}
    labels = {k: 'rms' if v else 'sgd' for k, v in mask.items()}
    ours = lambda: rmsprop_jax.rmsprop(1e-2, nu_dtype=nu_dtype)
    for tx in (
      optax.masked(ours(), mask),
      optax.multi_transform({'rms': ours(), 'sgd': optax.sgd(1e-2)}, labels),
    ):
      for zero1 in (None, 'data'):
        shardings = rmsprop_jax.state_shardings(tx, params, zero1_axis=zero1)
        state = jax.jit(tx.init, out_shardings=shardings)(params)
        assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
        for s, expect in zip(
          jax.tree.leaves(state), jax.tree.leaves(shardings)
        ):
          assert s.sharding.is_equivalent_to(expect, s.ndim)

  def test_state_shardings_from_abstract_params():
    """Initialising without materialising: ShapeDtypeStructs in."""
    mesh = _mesh('auto')
    abstract = {
      name: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, _specs()[name])
      )
      for name, x in _params(mesh).items()
    }
    tx = rmsprop_jax.rmsprop(1e-2, momentum=0.9)
    shardings = rmsprop_jax.state_shardings(tx, abstract)
    state = jax.jit(
      lambda: tx.init(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
      ),
      out_shardings=shardings,
    )()
    _assert_same_places(optax.tree.get(state, 'trace'), abstract)

  def test_state_shardings_refuses_what_it_cannot_place():
    mesh = _mesh('auto')
    params = _params(mesh)
    with pytest.raises(ValueError, match='no axis'):
      rmsprop_jax.state_shardings(
        rmsprop_jax.rmsprop(0.1), params, zero1_axis='batch'
      )
    with pytest.raises(ValueError, match='packing=False'):
      rmsprop_jax.state_shardings(
        rmsprop_jax.rmsprop(0.1, packing=True), params
      )

  # Leaves split inside their 8-bit blocks: a row of 384 in two, a conv
  # kernel on its output channels (blocks of two rows of 128), rows of 16
  # (blocks of 16 rows) on their last axis, a bias of 384 (its blocks of 256
  # and 128) in two.
  SPLIT_INSIDE = {
    'row': ((8, 384), P(None, 'model')),
    'conv': ((3, 3, 16, 128), P(None, None, None, 'model')),
    'tall': ((64, 16), P(None, 'model')),
    'bias': ((384,), P('model')),
  }

  @pytest.mark.parametrize(
    'kind, zero1', [('auto', None), ('auto', 'data'), ('explicit', None)]
  )
  def test_8bit_code_split_inside_its_blocks_still_computes_the_same(
    kind, zero1
  ):
    """The scales stay whole along the split axes (XLA gathers them; on
    Explicit axes the code does), the codes follow the parameter, and the
    numbers are one device's, eagerly and under jit."""
    mesh = _mesh(kind)
    params, grads = (
      {
        name: jax.device_put(
          np.random.default_rng([s, i]).standard_normal(shape, np.float32),
          NamedSharding(mesh, spec),
        )
        for i, (name, (shape, spec)) in enumerate(SPLIT_INSIDE.items())
      }
      for s in (3, 4)
    )
    tx = rmsprop_jax.rmsprop(1e-2, nu_dtype=jnp.uint8, momentum=0.9)
    shardings = rmsprop_jax.state_shardings(tx, params, zero1_axis=zero1)
    code = optax.tree.get(shardings, 'nu')['row']
    assert code.codes.spec == (
      P('data', 'model') if zero1 else P(None, 'model')
    )
    assert code.scale.spec == (P('data', None) if zero1 else P(None, None))

    step = optax_step(tx)
    with jax.set_mesh(mesh):
      # Eagerly the state follows the parameters (ZeRO-1 is jit's).
      eager = tx.init(params)
      state = jax.jit(tx.init, out_shardings=shardings)(params)
      plain = rmsprop_jax.state_shardings(tx, params)
      for s, where in ((eager, plain), (state, shardings)):
        for x, expect in zip(jax.tree.leaves(s), jax.tree.leaves(where)):
          assert x.sharding.is_equivalent_to(expect, x.ndim)
      param_shardings = jax.tree.map(lambda x: x.sharding, params)
      out = jax.jit(step, out_shardings=(param_shardings, shardings))(
        params, state, grads
      )
    local = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), (params, grads))
    ref = jax.jit(step)(local[0], tx.init(local[0]), local[1])
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
