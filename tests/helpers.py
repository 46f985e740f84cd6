"""Small utilities shared by the tests (no reference maths here)."""

import jax
import jax.numpy as jnp
import numpy as np


def normal_tree(shapes, seed, dtype=jnp.float32, scale=1.0, shift=0.0):
  """A tree like ``shapes`` (a pytree whose leaves are shape tuples) of
  ``shift + scale * N(0, 1)`` arrays of ``dtype``, drawn by NumPy from
  ``seed`` (what ``np.random.default_rng`` takes): ``jax.random`` would
  compile and run a program per leaf shape."""
  leaves, treedef = jax.tree.flatten(
    shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    treedef,
    [
      jnp.asarray((shift + scale * rng.standard_normal(s)).astype(dtype))
      for s in leaves
    ],
  )


def random_tree(seed, dtype=jnp.float32, scale=1.0, shift=0.0):
  """A nested parameter-like pytree (:func:`normal_tree`): dicts and a
  list, a leaf of each rank from 0 to 3.

  Each leaf adds its own kernels to every compiled step (XLA:CPU compiles
  about 25 to 60 ms a leaf for an RMSprop step), so the tree holds four;
  the shapes matter, not only the number of entries (XLA:CPU compiles a
  (4, 3) leaf's centered variance otherwise than that of other shapes)."""
  shapes = {
    'dense': {'w': (4, 3), 'b': (3,)},
    'list': [(1, 2, 2)],
    'scalar': (),
  }
  return normal_tree(shapes, seed, dtype, scale, shift)


def gradient_sequence(steps, dtype=jnp.float32, seed=0, **kwargs):
  """``steps`` random gradient trees (same structure as ``random_tree``),
  each from its own stream of ``seed`` (a child of it: never the stream of
  ``random_tree(seed)``, so the parameters are not the first gradient)."""
  return [
    random_tree(np.random.SeedSequence(seed, spawn_key=(i,)), dtype, **kwargs)
    for i in range(steps)
  ]


def run(tx, params, grads_seq, jit=True, apply=False):
  """Feeds ``grads_seq`` through ``tx``; returns (updates per step, state).

  With ``apply=True`` the updates are applied to ``params`` between steps and
  the parameters after each step are returned instead of the updates.
  """
  import optax

  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for g in grads_seq:
    u, state = update(g, state, params)
    if apply:
      params = optax.apply_updates(params, u)
      out.append(params)
    else:
      out.append(u)
  return out, state


def assert_trees_equal(a, b):
  """Bit-for-bit equality (NaN equals NaN), same structure and dtypes."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype, (x.dtype, y.dtype)
    np.testing.assert_array_equal(
      np.asarray(x).astype(np.complex128), np.asarray(y).astype(np.complex128)
    )


def bowl_problem(shapes, steps, seed=0):
  """Start, targets and per-step noise of a noisy quadratic bowl (NumPy)."""
  rng = np.random.default_rng(seed)
  params = [rng.normal(size=s) for s in shapes]
  targets = [rng.normal(size=s) for s in shapes]
  noise = [[rng.normal(size=s) * 0.5 for s in shapes] for _ in range(steps)]
  return params, targets, noise


def bowl_grads(params, targets, noise_t, asarray=jnp.asarray):
  """Gradient of the bowl at ``params``: depends on the parameters, so any
  difference between two optimizers compounds over the steps."""
  return [
    2.0 * (p - asarray(t)) + asarray(n)
    for p, t, n in zip(params, targets, noise_t)
  ]


def bowl_trajectory(tx, problem):
  """Parameters after each step of ``tx`` on ``problem`` (jitted)."""
  import optax

  params, targets, noise = problem
  params = [jnp.asarray(p) for p in params]
  state = tx.init(params)

  @jax.jit
  def step(params, state, noise_t):
    updates, state = tx.update(
      bowl_grads(params, targets, noise_t), state, params
    )
    return optax.apply_updates(params, updates), state

  out = []
  for noise_t in noise:
    params, state = step(params, state, noise_t)
    out.append([np.asarray(p) for p in params])
  return out


def learning_rates(steps, changing):
  """Per-step learning rates and the optax form of the same (schedule or
  constant): random in [0.001, 0.05) if ``changing``, else 0.01."""
  if changing:
    lrs = np.random.default_rng(1).uniform(0.001, 0.05, steps)
    return lrs, lambda count: jnp.asarray(lrs)[count]
  return np.full(steps, 0.01), 0.01


def assert_trajectories_close(ours, ref):
  """float64 round-off only: the frameworks order the same operations
  differently (PyTorch divides where optax multiplies by a reciprocal)."""
  for step_ours, step_ref in zip(ours, ref):
    for a, b in zip(step_ours, step_ref):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def lowered_graph(fn, *args):
  """The computation ``jax.jit(fn, keep_unused=True)(*args)`` lowers to
  (StableHLO), as a hash of its dataflow graph.

  Each value is named by the operation that makes it (its name, attributes
  and result types, the graphs of the regions it holds, such as a
  reduction's body) and by the names of its operands, in their order;
  calls are inlined. The arguments are named by position, type and
  attributes (donation, sharding), and the hash takes the outputs' names,
  in order, with their attributes (the output tree's paths). The order in
  which independent operations are written, and SSA and function names, do
  not enter; the order of an operation's operands does (``a * b`` and
  ``b * a`` differ). Equal hashes mean the same operations on the same
  values, which XLA compiles the same way (``args`` may be
  ``jax.ShapeDtypeStruct``s: nothing compiles or runs)."""
  import hashlib

  from jax._src.lib.mlir import ir

  module = jax.jit(fn, keep_unused=True).lower(*args).compiler_ir('stablehlo')
  funcs = {
    ir.StringAttr(op.attributes['sym_name']).value: op
    for op in module.body.operations
  }

  def sha(x):
    return hashlib.sha256(repr(x).encode()).hexdigest()

  def walk(block, names, inputs):
    """The names of what ``block`` returns (its last operation's
    operands), its arguments named ``inputs``; ``names`` holds the values
    of the enclosing blocks that a region may use."""
    names = dict(names)
    names.update(zip(block.arguments, inputs))
    *body, last = list(block.operations)
    for op in body:
      operands = tuple(names[v] for v in op.operands)
      if op.name == 'func.call':
        callee = ir.FlatSymbolRefAttr(op.attributes['callee']).value
        _, outputs = walk(funcs[callee].regions[0].blocks[0], {}, operands)
      else:
        regions = [
          [
            walk(
              b,
              names,
              [
                f'block argument {i}: {a.type}'
                for i, a in enumerate(b.arguments)
              ],
            )
            for b in region.blocks
          ]
          for region in op.regions
        ]
        key = sha(
          (
            op.name,
            sorted(f'{a}={op.attributes[a]}' for a in op.attributes),
            [str(r.type) for r in op.results],
            regions,
            operands,
          )
        )
        outputs = [f'{key}#{i}' for i in range(len(op.results))]
      names.update(zip(op.results, outputs))
    return (last.name, tuple(names[v] for v in last.operands))

  main = funcs['main']
  block = main.regions[0].blocks[0]
  attrs = {
    k: str(main.attributes[k])
    for k in ('arg_attrs', 'res_attrs')
    if k in main.attributes
  }
  inputs = [f'argument {i}: {a.type}' for i, a in enumerate(block.arguments)]
  return sha((walk(block, {}, inputs), attrs))
