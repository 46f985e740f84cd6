"""The named optimizer: :func:`rmsprop`, a chain of building blocks."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _validation, quantization, transform
from rmsprop_jax import packing as packing_lib

MaskOrFn = Any | Callable[[optax.Params], Any] | None


def rmsprop(
  learning_rate: optax.ScalarOrSchedule,
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  eps_in_sqrt: bool = True,
  centered: bool = False,
  momentum: jax.typing.ArrayLike | None = None,
  nesterov: bool = False,
  bias_correction: bool = False,
  *,
  lr_in_momentum: bool = True,
  accumulator_dtype: Any | None = None,
  weight_decay: optax.ScalarOrSchedule | None = None,
  decoupled_weight_decay: bool = False,
  weight_decay_mask: MaskOrFn = None,
  maximize: bool = False,
  clamp_variance: bool = True,
  caution: bool = False,
  nu_dtype: Any | None = None,
  stochastic_rounding: bool = False,
  skip_nonfinite: bool = False,
  packing: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSprop (Tieleman & Hinton 2012) and every framework's variant of it.

  With optax's arguments alone this is ``optax.rmsprop``: the same updates
  (bit for bit on the same backend), dtypes and state (optax's classes and
  tree structure), so optax checkpoints, wrappers and state lookups keep
  working, on every backend and device count. The
  keyword-only arguments add what optax cannot express, so that PyTorch's,
  Keras' and TF1's RMSprop are each one call (see :mod:`rmsprop_jax.presets`).

  The update, per parameter :math:`\theta` with gradient :math:`g_t`:

  .. math::

    g_t &\leftarrow -g_t \ \text{if maximize}; \qquad
    g_t \leftarrow g_t + \lambda\,\theta_{t-1}
    \ \text{(coupled weight decay)}

    \nu_t &= \rho\,\nu_{t-1} + (1-\rho)\,g_t^2, \qquad
    \mu_t = \rho\,\mu_{t-1} + (1-\rho)\,g_t \ \text{(centered)}

    s_t &= \nu_t \ \text{or}\ \max(\nu_t - \mu_t^2, 0) \ \text{(centered)},
    \qquad \hat g_t = g_t / \sqrt{s_t + \epsilon}
    \ \text{or}\ g_t / (\sqrt{s_t} + \epsilon)

    b_t &= \gamma\,b_{t-1} + \eta_t\,\hat g_t, \quad
    \theta_t = \theta_{t-1} - b_t
    \quad \text{(lr_in_momentum: optax, TF1, Keras)}

    b_t &= \gamma\,b_{t-1} + \hat g_t, \quad
    \theta_t = \theta_{t-1} - \eta_t\,b_t
    \quad \text{(not lr_in_momentum: PyTorch)}

    \theta_t &\leftarrow \theta_t - \eta_t\,\lambda\,\theta_{t-1}
    \ \text{(decoupled weight decay, Keras)}

  with :math:`\nu_0` = ``initial_scale``, :math:`\mu_0 = b_0 = 0`, and
  :math:`\nu, \mu` divided by :math:`1-\rho^t` if ``bias_correction``. With
  ``nesterov`` the step is :math:`\eta_t \hat g_t + \gamma b_t` (optax's
  ``trace``). Without momentum (``None``) no buffer is kept.

  Dtypes (the same on every backend, device count and layout):

  * State: every array keeps the parameters' dtype, as optax's (``nu_dtype``
    and ``accumulator_dtype`` change the moments' and the momentum buffer's),
    and keeps it through every ``update``: a ``lax.scan`` over training
    steps never sees it change. (optax's chain widens a bfloat16 state when
    a hyperparameter is a float32 array or is injected as one.)
  * Arithmetic: optax's, in optax's order (JAX's promotion of the gradient's
    and the state's dtypes), except that float16 gradients are computed in
    float32 (optax returns NaN for a float16 zero gradient), and that a
    state of another dtype than optax's (``nu_dtype``, stochastic rounding)
    is read into, or widens, the gradient.
  * Updates: the promotion of the gradients' and the parameters' dtypes
    (optax's: float32 updates for float32 parameters with bfloat16
    gradients), or the gradients' own with ``nu_dtype``; never a
    hyperparameter's dtype, however it is passed (float, NumPy or JAX
    scalar, schedule, ``optax.inject_hyperparams`` with any
    ``hyperparam_dtype``).
  * Complex parameters: ``|g|**2`` in ``nu`` (real values; complex dtype
    unless ``nu_dtype`` is real), ``mu`` complex.

  Where optax's own dtypes change during training (bfloat16 parameters with
  float32 gradients, or float32 array hyperparameters with bfloat16
  parameters), ours stay put, so the bits differ from optax's from the
  second step on; everywhere else they are optax's bits.

  .. warning::
    Frameworks disagree on four points, and each changes results:
    :math:`\epsilon` inside the square root (optax, Keras, TF1) or outside
    (PyTorch); :math:`\nu_0` = 0 (most) or 1 (TF1); the learning rate inside
    the momentum buffer (optax, Keras, TF1; differs from PyTorch only when
    :math:`\eta` changes over time); weight decay coupled into the gradient
    (PyTorch) or decoupled (Keras). See the porting table (README, and the
    documentation's conventions guide).

  Args:
    learning_rate: :math:`\eta` >= 0, a scalar or an optax schedule
      (step count -> value).
    decay: :math:`\rho` in [0, 1) (PyTorch's ``alpha``, Keras' ``rho``).
    eps: :math:`\epsilon` >= 0.
    initial_scale: :math:`\nu_0` >= 0; 0 in PyTorch and Keras, 1 in TF1.
    eps_in_sqrt: :math:`\epsilon` inside the square root (optax, Keras,
      TF1) or outside (PyTorch, ``False``).
    centered: normalise by the variance instead of the second moment.
    momentum: heavy-ball coefficient :math:`\gamma` in [0, 1), or ``None``
      for no momentum buffer.
    nesterov: Nesterov momentum, as optax's ``trace(nesterov=True)``.
    bias_correction: divide the moments by :math:`1-\rho^t`; with
      ``eps_in_sqrt=False`` this is Adam with ``b1=0``.
    lr_in_momentum: apply the learning rate before the momentum buffer
      (default; optax, TF1, Keras) or after it (``False``: PyTorch).
    accumulator_dtype: dtype of the momentum buffer (optax's name, as in
      ``optax.trace``); ``None`` keeps the parameters'. ``jnp.float32``
      for bfloat16 parameters: a bfloat16 buffer with ``momentum=0.99``
      rounds away most of each step's contribution (steps come out about a
      third too short).
    weight_decay: :math:`\lambda` >= 0 (a scalar or a schedule), or ``None``
      for none. Needs ``params`` in ``update``.
    decoupled_weight_decay: ``False`` (default): coupled L2, added to the
      gradient before the moments (PyTorch). ``True``: decoupled,
      :math:`\theta \leftarrow \theta - \eta_t \lambda \theta` next to the update,
      not normalised and outside the momentum buffer (Keras 3).
    weight_decay_mask: a tree of booleans (or a function of the params that
      returns one) selecting the leaves that decay, as optax's ``mask``.
    maximize: ascend instead of descend (PyTorch's ``maximize``); the
      gradient is negated before weight decay, as in PyTorch.
    clamp_variance: with ``centered``, clamp the variance at zero before the
      square root (default). It changes a result only where round-off made
      the variance negative, where optax, PyTorch and Keras give NaN (or a
      step past the :math:`1/\sqrt\epsilon` bound).
    caution: the cautious update of Liang et al. (2024), as timm's
      ``RMSpropTF(caution=True)``: each step keeps only the entries where it
      points against the gradient (where the momentum buffer and the
      gradient agree in sign), scaled by ``1 / max(fraction kept, 1e-3)``
      per leaf. The momentum buffer itself is kept whole; weight decay,
      coupled (inside the gradient) or decoupled (next to the step), is not
      masked. Needs ``momentum``.
    nu_dtype: dtype of the second-moment state (and of the centered mean;
      complex for complex parameters); ``None`` keeps the parameters' dtype,
      as optax (see the dtype policy above). ``jnp.float32`` keeps float16
      or bfloat16 parameters' moments wider (recommended for float16, where
      ``g**2`` above 65504, i.e. ``|g| > 256``, is stored as inf and stops
      that entry, in optax too); ``jnp.bfloat16`` halves the state of
      float32 parameters;
      ``jnp.uint8`` stores ``nu`` in an 8-bit blockwise code (about 1.02
      bytes per parameter; see :mod:`rmsprop_jax.quantization`).
    stochastic_rounding: with ``nu_dtype=jnp.bfloat16``, compute the
      moments in float32 (also for bfloat16 parameters) and round them into
      the bfloat16 state stochastically (unbiased; see
      :func:`rmsprop_jax.scale_by_rms`), so that slow averages (``decay``
      near 1) keep moving. (A complex ``mu`` is stored as is.)
    skip_nonfinite: skip every step whose gradients hold a NaN or an inf:
      the update is zero and the whole state (moments, momentum, counts) is
      left as it was. The skips are counted in the state
      (``optax.tree.get(state, 'total_notfinite')``). This is
      ``optax.apply_if_finite`` around the chain, with no limit on
      consecutive skips.
    packing: opt-in (default ``False``). ``True`` runs the update on the
      small leaves (at most :data:`rmsprop_jax.packing.PACK_MAX_SIZE`
      elements) stacked, one stack per shape and dtype that several share,
      with the state kept stacked between steps: faster steps on trees of
      many small leaves on a CPU (see the benchmarks in the documentation). The updates
      are the same bits when the gradients enter the jitted step as
      arguments (computed in the same ``jit``, XLA:CPU may round the last
      bit of some entries differently). The state is then not
      ``optax.rmsprop``'s: its
      parameter-shaped parts are :class:`rmsprop_jax.packing.Packed` stacks
      inside a :class:`rmsprop_jax.packing.PackedState`.
      :func:`rmsprop_jax.unpack_state <rmsprop_jax.packing.unpack_state>` gives optax's layout back (to save a
      checkpoint any optax user can restore) and
      :func:`rmsprop_jax.pack_state <rmsprop_jax.packing.pack_state>` the packed layout from optax's (to
      continue from an optax checkpoint). ``optax.tree_map_params`` maps
      over the stacks; with extra parameter-shaped trees (shardings), unpack
      first. The packing depends only on the parameters' shapes and dtypes.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its state is
    ``optax.rmsprop``'s for the same arguments: the same classes
    (``optax.ScaleByRmsState`` or ``optax.ScaleByRStdDevState``, their
    ``WithCount`` variants with ``bias_correction``,
    ``optax.ScaleByScheduleState`` or ``optax.EmptyState``,
    ``optax.TraceState`` or ``optax.EmptyState``), the same tree structure
    and the same dtypes. The options optax
    lacks add state only when used: ``maximize`` and coupled weight decay
    add ``optax.EmptyState`` entries to the chain in front, decoupled weight
    decay one after it; stochastic rounding and the 8-bit ``nu`` a step
    ``count`` (the ``WithCount`` class), ``nu_dtype`` a narrower (or coded)
    ``nu``; ``skip_nonfinite`` wraps the whole state in
    ``optax.ApplyIfFiniteState``; ``packing=True`` packs it (see above);
    ``caution`` nests the moment, learning-rate and momentum states in one
    tuple of the chain.

  Raises:
    TypeError: if a hyperparameter is not a real number, a scalar array or
      (``learning_rate``, ``weight_decay``) a schedule: a string, ``None``
      where a number is needed, a boolean or a complex number; if an option
      flag is not ``True`` or ``False`` (a string such as ``'False'`` would
      turn it on); if ``weight_decay_mask`` is not a tree of booleans or a
      function returning one.
    ValueError: if a concrete ``learning_rate``, ``eps``,
      ``initial_scale`` or ``weight_decay`` is negative or not finite,
      ``decay`` is not in [0, 1), or ``momentum`` is not in [0, 1) (heavy-ball
      momentum of 1 or more never forgets, and diverges under a constant
      gradient); if a hyperparameter is an array of another shape than
      ``()``; if ``decay``, ``eps``, ``initial_scale`` or ``momentum`` is a
      schedule; if ``nu_dtype`` or ``accumulator_dtype`` is not a dtype, or
      not a float dtype (or uint8 for ``nu_dtype``), or a float of fewer
      than 16 bits for ``nu_dtype``; if one of our options
      could not change a number (``weight_decay_mask`` or
      ``decoupled_weight_decay=True`` without a ``weight_decay``,
      ``accumulator_dtype``, ``lr_in_momentum=False`` or ``caution`` without
      momentum, ``clamp_variance=False`` without ``centered``). Schedules
      and traced values are not range-checked. When traced, ``update``
      raises ``ValueError`` for gradient, state or parameter trees that do
      not match (naming the leaf) and when weight decay has no ``params``,
      and ``TypeError`` for integer or non-array leaves.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
    >>> tx = rmsprop_jax.rmsprop(0.1)
    >>> params = {'x': jnp.array(10.0)}
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: p['x'] ** 2)(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)['x']
    Array(9.683772, dtype=float32)

  References:
    Tieleman & Hinton, Lecture 6.5 - rmsprop, COURSERA: Neural Networks for
    Machine Learning, 2012. Graves, Generating Sequences With Recurrent
    Neural Networks, arXiv:1308.0850, 2013 (centered, momentum).
  """
  owner = 'rmsprop'
  _validation.check_bool(
    owner,
    eps_in_sqrt=eps_in_sqrt,
    centered=centered,
    nesterov=nesterov,
    bias_correction=bias_correction,
    lr_in_momentum=lr_in_momentum,
    decoupled_weight_decay=decoupled_weight_decay,
    maximize=maximize,
    clamp_variance=clamp_variance,
    caution=caution,
    stochastic_rounding=stochastic_rounding,
    skip_nonfinite=skip_nonfinite,
    packing=packing,
  )
  _validation.check_mask(owner, 'weight_decay_mask', weight_decay_mask)
  nu_dtype = transform._check_nu_options(owner, nu_dtype, stochastic_rounding)
  # Our own options that could not change a number are refused, not ignored.
  # (optax's own arguments are accepted as optax accepts them: nesterov
  # without momentum is a no-op there too.)
  useless = [
    (
      weight_decay_mask is not None and weight_decay is None,
      'weight_decay_mask has no effect without a weight_decay',
    ),
    (
      decoupled_weight_decay and weight_decay is None,
      'decoupled_weight_decay=True has no effect without a weight_decay',
    ),
    (
      accumulator_dtype is not None and momentum is None,
      'accumulator_dtype has no effect without momentum',
    ),
    (
      not lr_in_momentum and momentum is None,
      'lr_in_momentum=False has no effect without momentum',
    ),
    (
      not clamp_variance and not centered,
      'clamp_variance=False has no effect without centered=True',
    ),
    (
      caution and momentum is None,
      'caution=True has no effect without momentum',
    ),
  ]
  for condition, message in useless:
    if condition:
      raise ValueError(f'rmsprop: {message}; pass it, or drop the option.')
  accumulator_dtype = _validation.as_dtype(
    accumulator_dtype, owner, 'accumulator_dtype'
  )
  _validation.check_float_dtype(owner, 'accumulator_dtype', accumulator_dtype)
  _validation.check_type(owner, 'learning_rate', learning_rate, schedule=True)
  _validation.check_type(owner, 'momentum', momentum, optional=True)
  _validation.check_type(
    owner, 'weight_decay', weight_decay, schedule=True, optional=True
  )
  transform._validate(owner, decay, eps, initial_scale)
  _validation.check_non_negative(owner, 'learning_rate', learning_rate)
  # Heavy-ball momentum of 1 or more never forgets: the buffer grows without
  # bound under a constant gradient. No framework's recipe uses it.
  _validation.check_decay(owner, 'momentum', momentum)
  _validation.check_non_negative(owner, 'weight_decay', weight_decay)
  kwargs = dict(
    decay=decay,
    eps=eps,
    initial_scale=initial_scale,
    eps_in_sqrt=eps_in_sqrt,
    bias_correction=bias_correction,
    nu_dtype=nu_dtype,
    stochastic_rounding=stochastic_rounding,
  )
  if centered:
    normalise = transform.scale_by_stddev(
      **kwargs, clamp_variance=clamp_variance
    )
  else:
    normalise = transform.scale_by_rms(**kwargs)

  # Leave out what cannot change a number (PyTorch and Keras keep no buffer
  # for these either); traced and array values always keep their transform.
  if _validation.is_python_zero(weight_decay):
    weight_decay = None
  coupled = weight_decay is not None and not decoupled_weight_decay
  decoupled = weight_decay is not None and decoupled_weight_decay

  # Every step after the first keeps the dtypes it is given (and its state's
  # own): a hyperparameter passed as a float32 array (or injected with
  # ``optax.inject_hyperparams(..., hyperparam_dtype=...)``) must not widen
  # bfloat16 updates or a bfloat16 momentum buffer mid-training (optax's
  # own chain does). No-ops for weakly typed (Python) hyperparameters.
  # Coupled weight decay gives the gradient the dtype ``g + wd * theta`` has
  # with a Python ``wd``: the promotion of the gradient's and the
  # parameters' (as optax's add_decayed_weights), never the decay's.
  scale_by_lr = _keep_dtypes(optax.scale_by_learning_rate(learning_rate))
  accumulate = (
    _keep_dtypes(_trace(momentum, nesterov, accumulator_dtype))
    if momentum is not None
    else optax.identity()
  )
  step = [
    normalise,
    *(
      (scale_by_lr, accumulate) if lr_in_momentum else (accumulate, scale_by_lr)
    ),
  ]
  if caution:
    step = [_cautious(optax.chain(*step))]
  steps = [
    optax.scale(-1.0) if maximize else None,
    _keep_dtypes(
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      with_params=True,
    )
    if coupled
    else None,
    *step,
    _keep_dtypes(
      _add_decoupled_weight_decay(
        learning_rate, weight_decay, weight_decay_mask
      )
    )
    if decoupled
    else None,
  ]
  tx = optax.chain(*(s for s in steps if s is not None))
  if packing and weight_decay_mask is not None:
    raise ValueError(
      'rmsprop: packing=True cannot be combined with a '
      'weight_decay_mask (the mask selects whole leaves).'
    )
  if packing and caution:
    raise ValueError(
      'rmsprop: packing=True cannot be combined with '
      'caution=True (its rescaling is per leaf).'
    )
  if packing:
    tx = packing_lib.pack_small_leaves(tx, name=owner)
  if skip_nonfinite:
    tx = _skip_nonfinite(tx)
  return _with_input_checks(
    tx, needs_params=weight_decay is not None, packed=bool(packing)
  )


def _skip_nonfinite(
  inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """``optax.apply_if_finite(inner, max_consecutive_errors=inf)``, with its
  state (``optax.ApplyIfFiniteState``) and counts: every step whose
  gradients hold a NaN or an inf is skipped (zero updates, state kept).
  Unlike optax's, the skipped step's zeros have the dtypes of the applied
  step's updates, so gradients narrower than the parameters work."""
  inner = optax.with_extra_args_support(inner)
  # Its init builds the state optax's wrapper builds.
  optax_wrapper = optax.apply_if_finite(inner, max_consecutive_errors=0)

  def update(updates, state, params=None, **extra_args):
    finite = jnp.all(
      jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(updates)])
    )
    apply = lambda _: inner.update(
      updates, state.inner_state, params, **extra_args
    )
    skip = lambda _: (_zeros_like_updates(apply, updates), state.inner_state)
    if isinstance(finite, jax.core.Tracer):
      new_updates, inner_state = jax.lax.cond(finite, apply, skip, None)
    else:
      # Called eagerly (outside jit, as an eager nnx.Optimizer does): the
      # one branch that runs, run as the other eager steps are. lax.cond
      # would trace and compile both branches again at every call.
      new_updates, inner_state = apply(None) if bool(finite) else skip(None)
    return new_updates, optax.ApplyIfFiniteState(
      notfinite_count=jnp.where(
        finite,
        jnp.zeros([], jnp.int32),
        optax.safe_increment(state.notfinite_count),
      ),
      last_finite=finite,
      total_notfinite=jnp.where(
        finite,
        state.total_notfinite,
        optax.safe_increment(state.total_notfinite),
      ),
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(optax_wrapper.init, update)


def _cautious(
  inner: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """``inner`` (which turns gradients into descent steps) with the cautious
  mask of Liang et al. (2024), as timm's ``_apply_caution``: per leaf,
  ``step * keep / max(mean(keep), 1e-3)`` with ``keep`` where the step and
  the gradient have opposite signs. The state is ``inner``'s, unmasked."""

  def update(grads, state, params=None):
    steps, state = inner.update(grads, state, params)

    def mask(step, g):
      keep = (jnp.real(step * jnp.conj(g)) < 0).astype(step.dtype)
      return step * (
        keep / jnp.maximum(jnp.mean(keep), 1e-3).astype(keep.dtype)
      )

    return jax.tree.map(mask, steps, grads), state

  return optax.GradientTransformation(inner.init, update)


def _keep_dtypes(
  tx: optax.GradientTransformation, with_params: bool = False
) -> optax.GradientTransformation:
  """``tx`` with its updates cast to the dtypes of the updates it is given
  (promoted with the parameters' if ``with_params``), and its state to the
  dtypes of the state it is given: dtypes never change during training (a
  ``lax.scan`` carry stays valid). Adds no state."""

  def cast(new, old):
    if old is None or not hasattr(new, 'astype'):
      return new
    # A narrower buffer (float16 momentum) saturates rather than store inf.
    return quantization.saturating_cast(new, jnp.result_type(old))

  def update(updates, state, params=None):
    new_updates, new_state = tx.update(updates, state, params)
    dtypes = jax.tree.map(jnp.result_type, updates)
    if with_params and params is not None:
      dtypes = jax.tree.map(
        jnp.promote_types, dtypes, jax.tree.map(jnp.result_type, params)
      )
    return (
      jax.tree.map(lambda u, d: u.astype(d), new_updates, dtypes),
      jax.tree.map(cast, new_state, state),
    )

  return optax.GradientTransformation(tx.init, update)


def _trace(
  momentum, nesterov: bool, accumulator_dtype
) -> optax.GradientTransformation:
  """``optax.trace``, with the buffer in ``accumulator_dtype`` (complex, of
  that precision, for complex parameters; optax would drop the imaginary
  part)."""
  tx = optax.trace(decay=momentum, nesterov=nesterov)
  if accumulator_dtype is None:
    return tx

  def buffer_dtype(p):
    if jnp.iscomplexobj(p):
      return jnp.promote_types(accumulator_dtype, jnp.complex64)
    return accumulator_dtype

  def init(params):
    return optax.TraceState(
      trace=jax.tree.map(
        # Placed as the parameter is (eagerly, and on Explicit axes).
        lambda p: jnp.zeros_like(p, dtype=buffer_dtype(p)),
        params,
      )
    )

  return optax.GradientTransformation(init, tx.update)


def _zeros_like_updates(apply, grads):
  """Zeros shaped and typed like ``apply(None)[0]`` (the applied step's
  updates, which have the gradients' tree and shapes), each made like its
  gradient leaf (``jnp.zeros_like``, as optax's ``apply_if_finite`` makes
  its own): placed as the gradients are, eagerly and on meshes with
  Explicit axes, where ``lax.cond`` needs both branches sharded alike."""
  return jax.tree.map(
    lambda s, g: jnp.zeros_like(g, dtype=s.dtype),
    jax.eval_shape(apply, None)[0],
    grads,
  )


def _with_input_checks(
  tx: optax.GradientTransformation,
  needs_params: bool,
  packed: bool,
) -> optax.GradientTransformationExtraArgs:
  """Clear errors, at trace time, for ``params`` that are missing or do not
  match the gradients, and for a packed state given to an optimizer that
  does not pack (the building blocks check gradients against state)."""
  tx = optax.with_extra_args_support(tx)

  def update(updates, state, params=None, **extra_args):
    if not packed and packing_lib.is_packed(state):
      raise ValueError(
        'rmsprop: the state is packed (made by an optimizer with '
        'packing=True), but this optimizer does not pack small leaves. '
        'Convert it once with `state = rmsprop_jax.unpack_state(state)`, '
        'or build the optimizer with packing=True.'
      )
    if params is None and needs_params:
      raise ValueError(
        'rmsprop: weight_decay needs the parameters: call '
        '`update(grads, state, params)`.'
      )
    if params is not None:
      _validation.check_same_tree(
        'rmsprop', 'parameter', params, 'gradient', updates
      )
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def _add_decoupled_weight_decay(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: optax.ScalarOrSchedule,
  mask: MaskOrFn,
) -> optax.GradientTransformation:
  """Adds ``-lr_t * wd_t * params`` to the updates (Keras' weight decay)."""
  if callable(learning_rate) or callable(weight_decay):
    lr = learning_rate if callable(learning_rate) else lambda _: learning_rate
    wd = weight_decay if callable(weight_decay) else lambda _: weight_decay
    rate = lambda count: -lr(count) * wd(count)
  else:
    rate = -learning_rate * weight_decay
  return optax.add_decayed_weights(rate, mask)
