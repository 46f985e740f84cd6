"""Building blocks: the RMS and centered (standard-deviation) normalisations.

``scale_by_rms`` and ``scale_by_stddev`` take ``optax.scale_by_rms`` and
``optax.scale_by_stddev``'s arguments, in the same order, and compute the same
numbers in the same order of operations, so for those arguments they are
drop-in replacements. They add keyword-only options that optax lacks:

* ``nu_dtype``: the dtype of the moment state (optax keeps it in the
  parameters' dtype), down to an 8-bit blockwise code, and
  ``stochastic_rounding`` for a bfloat16 state.
* ``clamp_variance`` (``scale_by_stddev`` only): clamp the centered variance
  ``nu - mu**2`` at zero before the square root.

``clip_by_norm`` clips each leaf's gradient by its own norm (Keras'
``clipnorm``), which optax does not provide.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu
from optax._src import transform as optax_transform

from rmsprop_jax import _serialization, _validation, quantization

# The states are optax's own classes (not look-alikes), so that a state is
# interchangeable with ``optax.rmsprop``'s: checkpoints, ``isinstance`` checks,
# ``optax.tree.get`` and target-structure restores see no difference. The
# ``WithCount`` variants are not exported at optax's top level; they are the
# classes ``optax.scale_by_rms(bias_correction=True)`` returns.
ScaleByRmsState = optax.ScaleByRmsState
ScaleByRStdDevState = optax.ScaleByRStdDevState
ScaleByRmsWithCountState = optax_transform.ScaleByRmsWithCountState
ScaleByRStdDevWithCountState = optax_transform.ScaleByRStdDevWithCountState


def _abs_sq(x: jax.Array) -> jax.Array:
  """``|x|**2``: ``x**2`` for real ``x`` (the same HLO optax emits)."""
  return x**2 if jnp.isrealobj(x) else (x.conj() * x).real


def _ema(x: jax.Array, ema: jax.Array, decay: Any) -> jax.Array:
  """``(1 - decay) * x + decay * ema``, optax's order of operations."""
  return (1 - decay) * x + decay * ema


def _variance(mu: jax.Array, nu: jax.Array, clamp: bool) -> jax.Array:
  """``nu - |mu|**2``, optax's expression, clamped at zero if ``clamp``."""
  var = nu - _abs_sq(mu)
  if clamp:
    var = jnp.where(jnp.real(var) < 0, jnp.zeros_like(var), var)
  return var


def _fit_to_storage(nu: jax.Array, stored: Any, centered: bool):
  """``nu`` (non-negative) made to fit a narrower storage dtype: a finite
  ``nu`` past the dtype's largest value is brought down to it (by a
  factor ``c``, 1 elsewhere), and a positive ``nu`` that would round to 0
  is raised to the smallest positive value the arithmetic reads back as
  normal (float16's smallest subnormal). Returns (the fitted ``nu``,
  ``c``), with ``c`` only where ``centered`` needs it to scale ``mu``
  alike (None otherwise: no division on the hot path), or (``nu``, None)
  where the storage is as wide as the arithmetic."""
  if isinstance(
    stored, quantization.Blockwise8bit
  ) or not quantization._narrower(stored.dtype, nu.dtype):
    return nu, None
  top = jnp.asarray(jnp.finfo(stored.dtype).max, nu.dtype)
  floor = jnp.asarray(
    max(
      float(jnp.finfo(stored.dtype).smallest_subnormal),
      float(jnp.finfo(nu.dtype).tiny),
    ),
    nu.dtype,
  )
  if centered:
    c = jnp.where(jnp.isfinite(nu) & (nu > top), top / nu, 1)
    return jnp.where((nu > 0) & (nu < floor), floor, nu * c), c
  # Not centered, the store saturates nu itself (saturating_cast, or the
  # stochastic rounding's own): only the floor is left to do here.
  return jnp.where((nu > 0) & (nu < floor), floor, nu), None


def _placed_like(q, p):
  """An 8-bit code made eagerly for a parameter ``p`` on a mesh, put where
  ``state_shardings`` puts it (eager operations on a leaf split inside its
  blocks may leave the code elsewhere); as it is under ``jit`` or off a
  mesh."""
  sharding = getattr(p, 'sharding', None) if isinstance(p, jax.Array) else None
  if isinstance(p, jax.core.Tracer) or not isinstance(
    sharding, jax.sharding.NamedSharding
  ):
    return q
  from rmsprop_jax import sharding as sharding_module  # pylint: disable=g-import-not-at-top

  return jax.device_put(
    q, sharding_module._code_shardings(q, sharding.spec, sharding.mesh)
  )


def _inverse_rms(ms: jax.Array, eps: Any, eps_in_sqrt: bool) -> jax.Array:
  """``1 / sqrt(ms + eps)`` or ``1 / (sqrt(ms) + eps)``, as optax computes it."""
  if eps_in_sqrt:
    return jax.lax.rsqrt(ms + eps)
  return 1 / (jnp.sqrt(ms) + eps)


def _fresh_full(like, fill_value: Any, dtype) -> jax.Array:
  """``jnp.full_like(like, fill_value, dtype)`` (with ``like``'s sharding)
  in a buffer of its own.

  ``full_like`` hands back ``fill_value`` itself when it is already an
  array of that shape and dtype (an ``initial_scale`` injected by
  ``optax.inject_hyperparams``, for a scalar parameter): the state would
  then hold one buffer twice, and donating it to ``jit`` fails ("Attempt
  to donate the same buffer twice").
  """
  x = jnp.full_like(like, fill_value, dtype=dtype)
  return jnp.array(x, copy=True) if x is fill_value else x


def _validate(owner, decay, eps, initial_scale, **flags):
  """Type and range checks, named after the function the user called;
  ``flags`` must each be True or False."""
  for name, value in (
    ('decay', decay),
    ('eps', eps),
    ('initial_scale', initial_scale),
  ):
    _validation.check_type(owner, name, value)
  _validation.check_decay(owner, 'decay', decay)
  _validation.check_non_negative(owner, 'eps', eps)
  _validation.check_non_negative(owner, 'initial_scale', initial_scale)
  _validation.check_bool(owner, **flags)


def _check_nu_options(owner, nu_dtype, stochastic_rounding):
  """``nu_dtype`` as a dtype, checked with ``stochastic_rounding``."""
  nu_dtype = _validation.as_dtype(nu_dtype, owner, 'nu_dtype')
  if (
    nu_dtype is not None
    and nu_dtype != jnp.uint8
    and not jnp.issubdtype(nu_dtype, jnp.floating)
  ):
    raise ValueError(
      f'{owner}: nu_dtype must be a floating-point dtype or '
      f'jnp.uint8 (8-bit blockwise), not {nu_dtype}.'
    )
  if nu_dtype is not None and nu_dtype != jnp.uint8:
    if jnp.finfo(nu_dtype).bits < 16:
      raise ValueError(
        f'{owner}: nu_dtype {nu_dtype} has fewer than 16 bits; for an '
        '8-bit state use nu_dtype=jnp.uint8 (the blockwise code).'
      )
  if stochastic_rounding and nu_dtype != jnp.bfloat16:
    raise ValueError(
      f'{owner}: stochastic_rounding applies to nu_dtype=jnp.bfloat16 '
      '(the 8-bit code always rounds stochastically).'
    )
  return nu_dtype


def scale_by_rms(
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  eps_in_sqrt: bool = True,
  bias_correction: bool = False,
  *,
  nu_dtype: Any | None = None,
  stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
  r"""Rescale updates by the root of the EMA of their squares.

  .. math::

    \nu_t = \rho\,\nu_{t-1} + (1-\rho)\,g_t^2, \qquad
    \hat\nu_t = \nu_t / (1-\rho^t) \text{ if bias_correction else } \nu_t,

    u_t = g_t / \sqrt{\hat\nu_t + \epsilon} \quad (\texttt{eps_in_sqrt})
    \qquad\text{or}\qquad u_t = g_t / (\sqrt{\hat\nu_t} + \epsilon),

  with :math:`\nu_0` = ``initial_scale``. For complex gradients
  :math:`g^2` is :math:`|g|^2`, as in optax.

  Frameworks differ in :math:`\epsilon` placement (inside: optax, Keras, TF1;
  outside: PyTorch) and in :math:`\nu_0` (1 in TF1, 0 elsewhere).

  Args:
    decay: :math:`\rho`, in [0, 1).
    eps: :math:`\epsilon` >= 0, added inside or outside the square root.
    initial_scale: :math:`\nu_0` >= 0 (0 in PyTorch and Keras, 1 in TF1).
    eps_in_sqrt: whether :math:`\epsilon` goes inside the square root.
    bias_correction: divide :math:`\nu_t` by :math:`1-\rho^t` (Adam-style).
      Adds an int32 step ``count`` to the state (as do stochastic rounding
      and the 8-bit ``nu``).
    nu_dtype: dtype of the ``nu`` state; ``None`` keeps the parameters'
      dtype (optax's). Arithmetic follows optax's (JAX's promotion of the
      gradient's and the stored moment's dtypes), except that float16
      gradients are widened to float32 first (float16 cannot hold ``g**2``
      outside 2.4e-4..256, nor ``eps = 1e-8``: optax returns NaN for a
      float16 zero gradient; the state is still stored in float16, as
      optax's), a narrower state is read into the gradient's dtype, and a
      wider one widens the gradient. Updates: the promotion of the
      gradient's and the state's dtypes without ``nu_dtype`` (optax's), the
      gradient's own with it. ``jnp.uint8``: an 8-bit blockwise code, about
      1.02 bytes per parameter, computed in float32 (see
      :mod:`rmsprop_jax.quantization`; it never stores a positive value as
      zero, and rounds stochastically). For complex parameters a real
      ``nu_dtype`` gives a real ``nu`` (``|g|**2`` is real) and a complex
      ``mu`` of at least complex64. A float of fewer than 16 bits raises
      ``ValueError``; float64 without ``jax_enable_x64`` is float32, as JAX
      makes it (``init`` warns).
    stochastic_rounding: with ``nu_dtype=jnp.bfloat16``, compute the
      moment in (at least) float32 and round it to bfloat16 up or down at
      random, in proportion to its distance to each neighbour, instead of
      to nearest;
      the noise is a hash of the position and step. Adds a step ``count``
      to the state.

  Returns:
    An ``optax.GradientTransformation``; its state is
    :class:`ScaleByRmsState` or :class:`ScaleByRmsWithCountState`.

  Examples:
    >>> import jax.numpy as jnp, rmsprop_jax
    >>> tx = rmsprop_jax.scale_by_rms(decay=0.75)
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> u, state = tx.update({'w': jnp.array([1.0, -2.0])}, state)
    >>> u['w']  # sign(g) / sqrt(1 - 0.75), to float32's precision
    Array([ 2., -2.], dtype=float32)
  """
  _validate(
    'scale_by_rms',
    decay,
    eps,
    initial_scale,
    eps_in_sqrt=eps_in_sqrt,
    bias_correction=bias_correction,
    stochastic_rounding=stochastic_rounding,
  )
  return _scale_by_moments(
    decay,
    eps,
    initial_scale,
    eps_in_sqrt,
    bias_correction,
    nu_dtype,
    centered=False,
    clamp_variance=False,
    stochastic_rounding=stochastic_rounding,
  )


def scale_by_stddev(
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  eps_in_sqrt: bool = True,
  bias_correction: bool = False,
  *,
  clamp_variance: bool = True,
  nu_dtype: Any | None = None,
  stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
  r"""Rescale updates by the root of the centered EMA of their squares.

  Centered RMSprop (Graves 2013, eqs. 38-40):

  .. math::

    \mu_t = \rho\,\mu_{t-1} + (1-\rho)\,g_t, \qquad
    \nu_t = \rho\,\nu_{t-1} + (1-\rho)\,g_t^2,

    \sigma^2_t = \hat\nu_t - \hat\mu_t^2
    \quad(\text{clamped at 0 if clamp_variance}),

    u_t = g_t / \sqrt{\sigma^2_t + \epsilon} \quad (\texttt{eps_in_sqrt})
    \qquad\text{or}\qquad u_t = g_t / (\sqrt{\sigma^2_t} + \epsilon),

  with :math:`\mu_0 = 0`, :math:`\nu_0` = ``initial_scale`` and hats meaning
  division by :math:`1-\rho^t` when ``bias_correction``.

  .. warning::
    In exact arithmetic :math:`\sigma^2 \ge 0`, but round-off makes it
    negative when :math:`|E[g]| \gg \mathrm{std}(g)`. optax, PyTorch, Keras and
    TF do not guard this, and return NaN (or a step larger than
    :math:`1/\sqrt{\epsilon}` allows). ``clamp_variance=True`` (the default)
    takes :math:`\max(\sigma^2, 0)`, which changes a result only where
    :math:`\sigma^2 < 0`; pass ``clamp_variance=False`` for optax's exact
    expression.

  Args:
    decay: :math:`\rho`, in [0, 1), shared by both moving averages.
    eps: :math:`\epsilon` >= 0.
    initial_scale: :math:`\nu_0` >= 0 (:math:`\mu_0` is always 0).
    eps_in_sqrt: whether :math:`\epsilon` goes inside the square root.
    bias_correction: divide both moments by :math:`1-\rho^t`. At step 1 this
      makes :math:`\sigma^2` exactly zero in exact arithmetic (round-off
      only), as in optax.
    clamp_variance: clamp :math:`\sigma^2` at zero (default ``True``).
    nu_dtype: dtype of the ``mu`` and ``nu`` state; see :func:`scale_by_rms`.
      With ``jnp.uint8`` only ``nu`` is 8-bit (``mu`` is signed; it keeps
      the parameters' dtype).
    stochastic_rounding: see :func:`scale_by_rms` (for ``mu`` and ``nu``).

  Returns:
    An ``optax.GradientTransformation``; its state is
    :class:`ScaleByRStdDevState` or :class:`ScaleByRStdDevWithCountState`.

  Examples:
    >>> import jax.numpy as jnp, rmsprop_jax
    >>> tx = rmsprop_jax.scale_by_stddev(decay=0.9)
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> u, state = tx.update({'w': jnp.array([0.5, -4.0])}, state)
    >>> u['w']  # g / sqrt(0.1 g^2 - (0.1 g)^2) = sign(g) / sqrt(0.09)
    Array([ 3.3333325, -3.3333333], dtype=float32)
  """
  _validate(
    'scale_by_stddev',
    decay,
    eps,
    initial_scale,
    eps_in_sqrt=eps_in_sqrt,
    bias_correction=bias_correction,
    stochastic_rounding=stochastic_rounding,
    clamp_variance=clamp_variance,
  )
  return _scale_by_moments(
    decay,
    eps,
    initial_scale,
    eps_in_sqrt,
    bias_correction,
    nu_dtype,
    centered=True,
    clamp_variance=clamp_variance,
    stochastic_rounding=stochastic_rounding,
  )


def _scale_by_moments(
  decay,
  eps,
  initial_scale,
  eps_in_sqrt,
  bias_correction,
  nu_dtype,
  *,
  centered: bool,
  clamp_variance: bool,
  stochastic_rounding: bool,
) -> optax.GradientTransformation:
  """Shared implementation of :func:`scale_by_rms` and :func:`scale_by_stddev`."""
  owner = 'scale_by_stddev' if centered else 'scale_by_rms'
  nu_dtype = _check_nu_options(owner, nu_dtype, stochastic_rounding)
  eight_bit = nu_dtype == jnp.uint8
  # The step count seeds the rounding noise, when there is any.
  with_count = bias_correction or stochastic_rounding or eight_bit

  def state_dtype(p, moment):
    """The stored dtype of ``nu`` or ``mu``: the parameters' (optax's), or
    ``nu_dtype``; a complex parameter's ``mu`` is complex (the counterpart
    of a real ``nu_dtype``), and an 8-bit ``nu`` leaves ``mu`` alone."""
    dtype = jnp.result_type(p)
    if nu_dtype is not None and not (eight_bit and moment == 'mu'):
      dtype = jnp.dtype(jnp.float32) if eight_bit else nu_dtype
      if moment == 'mu' and jnp.iscomplexobj(p):
        dtype = jnp.promote_types(dtype, jnp.complex64)
    return dtype

  def _updates_dtype(g_dtype, n_dtype):
    return (
      g_dtype if nu_dtype is not None else jnp.promote_types(g_dtype, n_dtype)
    )

  def _compute_input(g, n):
    """The gradient as the moments take it: as given (optax), but widened
    to float32 if float16 or rounding stochastically, and to the stored
    moment's dtype where ``nu_dtype`` asks for a wider one."""
    g = jnp.asarray(g)
    if g.dtype == jnp.float16 or (
      stochastic_rounding and jnp.finfo(g.dtype).bits < 32
    ):
      g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    if nu_dtype is not None:
      g = g.astype(jnp.promote_types(g.dtype, n.dtype))
    return g

  def init_fn(params):
    _validation.check_float_leaves(owner, 'parameter', params)
    if eight_bit:
      _serialization.register_with_flax()
      # Each code replaces its parameter's variable too (a Flax NNX Param),
      # not just the array inside it: NNX updates nodes outside variables
      # in place, but rebuilds a variable's value as an nnx.State, and the
      # state would then change form after the first update.
      leaves, treedef = jax.tree.flatten(
        params, is_leaf=_validation.is_nnx_variable
      )
      values = _validation.nnx_values(leaves)
      nu = jax.tree.unflatten(
        treedef,
        [
          _placed_like(
            # full_like: the code follows the parameter's sharding.
            quantization.quantize(
              jnp.full_like(p, initial_scale, jnp.float32), 0, i
            ),
            p,
          )
          for i, p in enumerate(values)
        ],
      )
    else:
      nu = jax.tree.map(
        lambda p: _fresh_full(p, initial_scale, state_dtype(p, 'nu')),
        params,
      )
    count = jnp.zeros([], jnp.int32)
    if not centered:
      if with_count:
        return ScaleByRmsWithCountState(count=count, nu=nu)
      return ScaleByRmsState(nu=nu)
    mu = jax.tree.map(
      lambda p: jnp.zeros_like(p, dtype=state_dtype(p, 'mu')), params
    )
    if with_count:
      return ScaleByRStdDevWithCountState(count=count, mu=mu, nu=nu)
    return ScaleByRStdDevState(mu=mu, nu=nu)

  def _check_layout(state):
    """A state from another variant (a step count, an 8-bit nu, or not)
    must be converted, not silently run or reshaped."""
    coded = [
      isinstance(x, quantization.Blockwise8bit)
      for x in jax.tree.leaves(
        state.nu, is_leaf=lambda x: isinstance(x, quantization.Blockwise8bit)
      )
    ]
    problem = None
    has_count = 'count' in getattr(state, '_fields', ())
    if has_count != with_count:
      problem = 'has a step count' if has_count else 'has no step count'
    elif eight_bit and not all(coded):
      problem = 'has a float nu, where this optimizer keeps an 8-bit one'
    elif not eight_bit and any(coded):
      problem = 'has an 8-bit nu, where this optimizer keeps a float one'
    elif nu_dtype is not None and not eight_bit:
      # A restored state of another float dtype would run on in it, and the
      # memory saving (or the wider moments) would silently never happen.
      moments = [('nu', x) for x in jax.tree.leaves(state.nu)]
      if centered:
        moments += [('mu', x) for x in jax.tree.leaves(state.mu)]
      # nu is real; a complex parameter's mu is complex, the promotion of
      # nu_dtype and complex64 (state_dtype above).
      # Without x64, JAX makes a float64 state float32 (init warns): the
      # dtype expected is the one JAX gives now, where the update is traced.
      expect = lambda name, x: jax.dtypes.canonicalize_dtype(
        jnp.promote_types(nu_dtype, jnp.complex64)
        if name == 'mu' and jnp.iscomplexobj(x)
        else nu_dtype
      )
      wrong = [
        (name, x.dtype)
        for name, x in moments
        if jnp.dtype(x.dtype) != jnp.dtype(expect(name, x))
      ]
      if wrong:
        problem = (
          f'keeps {wrong[0][0]} in {jnp.dtype(wrong[0][1]).name}, where this '
          f'optimizer keeps it in {jnp.dtype(nu_dtype).name} (nu_dtype)'
        )
    if problem:
      raise ValueError(
        f'{owner}: the state ({type(state).__name__}) {problem}: it was made '
        'by another variant (bias_correction, stochastic_rounding or '
        'nu_dtype differ). Convert it once: '
        '`rmsprop_jax.unpack_state(state)` gives the plain float layout, '
        'and `rmsprop_jax.pack_state(state, tx, params)` the layout of '
        '`tx`.'
      )

  def store(new_tree, old_tree, count, salt0, bounds=None):
    """Each new moment in its state's storage: a plain cast, a stochastic
    rounding to bfloat16 or the 8-bit code (the salt tells leaves apart)."""
    old_leaves = jax.tree.leaves(
      old_tree, is_leaf=lambda x: isinstance(x, quantization.Blockwise8bit)
    )
    new_leaves, treedef = jax.tree.flatten(new_tree)
    out: list[Any] = []
    for i, (new, old) in enumerate(zip(new_leaves, old_leaves)):
      if isinstance(old, quantization.Blockwise8bit):
        out.append(
          quantization.quantize(
            new, count, salt0 + i, bounds[i] if bounds else None
          )
        )
      elif (
        stochastic_rounding
        and old.dtype == jnp.bfloat16
        and new.dtype != jnp.bfloat16
        and not jnp.iscomplexobj(new)
      ):
        out.append(quantization.stochastic_round_bf16(new, count, salt0 + i))
      else:
        # A finite moment beyond a narrower storage dtype's range (a float16
        # nu computed in float32) saturates instead of becoming inf.
        out.append(quantization.saturating_cast(new, old.dtype))
    return jax.tree.unflatten(treedef, out)

  def update_fn(updates, state, params=None):
    del params
    if eight_bit:
      # A container that writes the state back (flax.nnx.Optimizer) may
      # have rebuilt each 8-bit moment as a plain {codes, scale} mapping.
      state = state._replace(nu=quantization._rebuild(state.nu, updates))
      quantization._check_codes(state.nu, updates, owner)
    _check_layout(state)
    old_nu = quantization.dequantize_tree(state.nu)
    _validation.check_same_tree(
      owner, 'gradient', updates, 'optimizer state', old_nu
    )
    _validation.check_float_leaves(owner, 'gradient', updates)
    # optax's arithmetic, in optax's order of operations and with JAX's
    # promotion of the gradient's and the stored moment's dtypes (so
    # ``|g|**2`` of a bfloat16 gradient is taken in bfloat16, as optax does),
    # except that a float16 gradient, and any gradient when rounding
    # stochastically, is first widened to float32 (float16 cannot hold
    # ``g**2`` outside 2.4e-4..256 nor ``eps = 1e-8``; stochastic rounding
    # needs a float32 moment to round), and to a wider ``nu_dtype``. A
    # narrower stored moment is read into the gradient's dtype (a bfloat16
    # state must not round ``decay * nu`` to bfloat16 before the sum).
    grads = jax.tree.map(_compute_input, updates, old_nu)
    # (|g|**2 is real: a real nu is read into the gradient's real dtype.)
    new_nu = jax.tree.map(
      lambda g, n: _ema(
        _abs_sq(g),
        n.astype(
          jnp.promote_types(
            jnp.finfo(g.dtype).dtype if jnp.isrealobj(n) else g.dtype, n.dtype
          )
        ),
        decay,
      ),
      grads,
      old_nu,
    )
    new_mu = (
      jax.tree.map(
        lambda g, m: _ema(
          g, m.astype(jnp.promote_types(g.dtype, m.dtype)), decay
        ),
        grads,
        state.mu,
      )
      if centered
      else None
    )
    count = optax.safe_increment(state.count) if with_count else None
    # A moment stored in a narrower float than it is computed in (a float16
    # nu) saturates at the dtype's largest value, and a positive nu never
    # rounds to 0; centered, mu is scaled with nu (by sqrt(c)), so that the
    # stored variance nu - mu**2 keeps its sign and its ratio to nu (a
    # saturated nu alone would make it negative, clamped to 0: a step of
    # g / sqrt(eps)). Nothing changes where the storage is as wide.
    stored_leaves = jax.tree.leaves(
      state.nu, is_leaf=lambda x: isinstance(x, quantization.Blockwise8bit)
    )
    fitted = [
      _fit_to_storage(n, o, centered)
      for n, o in zip(jax.tree.leaves(new_nu), stored_leaves)
    ]
    to_store_nu = jax.tree.unflatten(
      jax.tree.structure(new_nu), [f for f, _ in fitted]
    )
    # The 8-bit code's new block scales: an upper bound of each block's
    # new nu, decay * (old scale, which bounds the old nu) + (1 - decay) *
    # (the block's largest |g|**2), reduced over the gradient alone (a
    # reduction over the new nu would need it decoded and written out
    # first, a pass of its own), with exact products, so that XLA fusing a
    # multiply-add or not leaves the state the same (next_scale).
    bounds = (
      [
        quantization.next_scale(q.scale, g, decay)
        for g, q in zip(jax.tree.leaves(grads), stored_leaves)
      ]
      if eight_bit
      else None
    )
    stored_nu = store(to_store_nu, state.nu, count, 0, bounds)
    if centered:
      to_store_mu = jax.tree.unflatten(
        jax.tree.structure(new_mu),
        [
          m if c is None else m * jnp.sqrt(c).astype(m.dtype)
          for m, (_, c) in zip(jax.tree.leaves(new_mu), fitted)
        ],
      )
    # Other salts than nu's: the two moments get independent noise.
    stored_mu = (
      store(to_store_mu, state.mu, count, 1 << 20) if centered else None
    )
    if nu_dtype is not None and not (stochastic_rounding or eight_bit):
      # With a storage dtype of its own rounded to nearest (bfloat16, or a
      # wider float), the step divides by the moments as stored, the values
      # the next step reads: one pass writes them and the parameter update
      # reads them back, as optax's float32 state does. Recomputing them in
      # both passes from the old state made XLA:CPU copy that state first,
      # and ran at half optax's speed. (With stochastic rounding or the
      # 8-bit code XLA recomputes the rounding in both passes instead, which
      # is slower still, so those divide by the unrounded float32 moments.)
      read = lambda stored, new: stored.astype(new.dtype)
      new_nu = jax.tree.map(read, stored_nu, new_nu)
      if centered:
        new_mu = jax.tree.map(read, stored_mu, new_mu)
    if bias_correction:
      # optax's helper: the power is taken before the cast to the moment's
      # dtype, and the same XLA ops give the same bits as optax.
      nu_hat = otu.tree_bias_correction(new_nu, decay, count)
      mu_hat = (
        otu.tree_bias_correction(new_mu, decay, count) if centered else None
      )
    else:
      nu_hat, mu_hat = new_nu, new_mu

    if centered:
      ms = jax.tree.map(
        lambda m, n: _variance(m, n, clamp_variance), mu_hat, nu_hat
      )
    else:
      ms = nu_hat
    new_updates = jax.tree.map(
      lambda v, g: _inverse_rms(v, eps, eps_in_sqrt) * g, ms, grads
    )
    # The updates' dtype: as in optax, the promotion of the gradient's and
    # the stored moment's, and the gradient's own with a ``nu_dtype``; never
    # that of a hyperparameter (a float32 ``eps`` or ``decay`` array must
    # not widen bfloat16 updates).
    new_updates = jax.tree.map(
      lambda u, g, n: u.astype(_updates_dtype(jnp.asarray(g).dtype, n.dtype)),
      new_updates,
      updates,
      old_nu,
    )
    new_nu, new_mu = stored_nu, stored_mu

    if not centered:
      if with_count:
        return new_updates, ScaleByRmsWithCountState(count=count, nu=new_nu)
      return new_updates, ScaleByRmsState(nu=new_nu)
    if with_count:
      return new_updates, ScaleByRStdDevWithCountState(
        count=count, mu=new_mu, nu=new_nu
      )
    return new_updates, ScaleByRStdDevState(mu=new_mu, nu=new_nu)

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_norm(
  max_norm: jax.typing.ArrayLike,
) -> optax.GradientTransformation:
  r"""Clips each leaf of the gradient to L2 norm ``max_norm``, on its own.

  .. math::

    g \leftarrow \frac{g \cdot c}{\max(\lVert g \rVert_2, c)}
    \quad \text{for each leaf}

  This is Keras 3's ``clipnorm`` (``BaseOptimizer._clip_by_norm``, with its
  order of operations: the product first, then the division; a zero
  gradient stays zero) and ``tf.clip_by_norm``. It is not
  ``optax.clip_by_global_norm``, which scales every leaf by the norm of
  all of them together (Keras' ``global_clipnorm``). A Keras RMSprop with
  ``clipnorm=c`` is ``optax.chain(clip_by_norm(c), presets.keras(...))``.

  Args:
    max_norm: :math:`c`, a positive number or scalar array (in the
      gradient's units).

  Returns:
    A stateless ``optax.GradientTransformation`` (``optax.EmptyState``);
    the updates keep each floating leaf's shape and dtype. A complex leaf's
    norm is that of its moduli. A traced ``max_norm`` (under ``jit`` or
    ``optax.inject_hyperparams``) is not checked.

  Raises:
    TypeError: for a ``max_norm`` that is not a real number or array.
    ValueError: for a ``max_norm`` that is not finite and positive.
  """
  owner = 'clip_by_norm'
  _validation.check_type(owner, 'max_norm', max_norm)
  concrete = _validation.concrete(max_norm)  # None when traced.
  if concrete is not None and not np.all(
    (concrete > 0) & np.isfinite(concrete)
  ):
    raise ValueError(
      f'{owner}: `max_norm` must be finite and > 0, got {max_norm!r}.'
    )

  def clip(g):
    c = jnp.asarray(max_norm, jnp.real(g).dtype)
    l2sum = jnp.sum(_abs_sq(g), keepdims=True)
    positive = l2sum > 0
    # Keras' two-sided where: no NaN from sqrt's gradient at zero.
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, l2sum, 1)), l2sum)
    return (g * c) / jnp.maximum(norm, c)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
