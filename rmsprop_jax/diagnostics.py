"""Effective learning rates: how far RMSprop lets each parameter move.

The classic definition (the one the classic demos print), for parameter :math:`i` at step :math:`t`:

.. math::

  \\eta^{\\text{eff}}_{t,i} = \\frac{\\eta}{\\sqrt{v_{t,i}} + \\epsilon}

(``eps_in_sqrt=False``), or :math:`\\eta / \\sqrt{v_{t,i} + \\epsilon}` with
the epsilon inside the square root, and with :math:`v` replaced by the
(clamped) variance :math:`\\nu - \\mu^2` for centered RMSprop: the same
denominator the transformation itself divides the gradient by.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _validation, packing, transform

_MOMENT_STATES = (
  transform.ScaleByRmsState,
  transform.ScaleByRmsWithCountState,
  transform.ScaleByRStdDevState,
  transform.ScaleByRStdDevWithCountState,
)


def _moment_state(state: Any):
  """The (first) moment state inside an optimizer state, e.g. a chain's."""
  found = []

  def visit(x):
    if isinstance(x, _MOMENT_STATES):
      found.append(x)
      return True
    return False

  jax.tree.leaves(state, is_leaf=visit)
  if not found:
    raise ValueError(
      'effective_learning_rate: no rmsprop_jax second-moment state '
      '(ScaleByRmsState or ScaleByRStdDevState, or their WithCount '
      'variants) was found in the given state.'
    )
  if len(found) > 1:
    raise ValueError(
      f'effective_learning_rate: the state holds {len(found)} RMSprop '
      'moment states (a chain of two, or optax.multi_transform with two '
      'RMSprop branches): pass the one you mean, e.g. state[1] of a chain '
      "or state.inner_states['label'] of multi_transform."
    )
  return found[0]


def _may_round(state) -> bool:
  """Whether ``state`` holds a bfloat16 or uint8 leaf (an 8-bit moment's
  codes, in its node or as a client rebuilt them): a step count there may
  come from stochastic rounding or the 8-bit code, not only from bias
  correction."""
  return any(
    jnp.result_type(x) in (jnp.bfloat16, jnp.uint8)
    for x in jax.tree.leaves(state)
  )


def effective_learning_rate(
  state: Any,
  learning_rate: jax.typing.ArrayLike,
  *,
  eps: jax.typing.ArrayLike,
  eps_in_sqrt: bool,
  decay: jax.typing.ArrayLike | None = None,
  clamp_variance: bool = True,
  bias_correction: bool | None = None,
  params: Any = None,
) -> optax.Updates:
  r"""Per-parameter effective learning rate: :math:`\eta/\sqrt{s+\epsilon}`
  or :math:`\eta/(\sqrt{s}+\epsilon)`.

  :math:`s` is the second moment :math:`\nu`, or the (clamped) variance
  :math:`\nu - |\mu|^2` for centered RMSprop, bias-corrected if the
  transformation is, and the epsilon goes where ``eps_in_sqrt`` says: the
  same denominator the transformation divides the gradient by.

  Reads the second moment (and, for centered RMSprop, the mean) from
  ``state``: the state of :func:`rmsprop_jax.rmsprop`, of a preset, of the
  building blocks, or of any chain or wrapper holding one of those. The
  state does not record ``eps``, its placement or whether the moments are
  bias-corrected, and a wrong guess gives other numbers without a sign, so
  they are required: pass the ones the transformation was built with (for
  a preset, the framework's: ``presets.pytorch`` and ``hinton2012`` have
  ``eps_in_sqrt=False``, ``keras``, ``tf1`` and ``timm`` ``True``).
  Centering is read from the state.

  The value is the step per unit of gradient that the state's moments give,
  before momentum: the rate of the last update (the next update first folds
  its own gradient into the moments, as the classic demos' Demo 3 ignores).
  It is computed in float32 at least, as the update computes: a bfloat16 or
  8-bit moment is widened first. Such a moment is read as stored, after
  its rounding, which the update's own division came before: the rate can
  differ from the last update's by that rounding (up to 0.4 % in bfloat16,
  about 6 % in 8 bits), and for centered RMSprop far more where the mean
  dominates the spread (see the low-memory guide).

  Args:
    state: an optimizer state containing one of the moment states.
    learning_rate: :math:`\eta`, a scalar (for a schedule, pass its value at
      the step of interest).
    eps: the transformation's :math:`\epsilon` (keyword, required).
    eps_in_sqrt: the transformation's epsilon placement (keyword,
      required).
    decay: the transformation's decay; needed only with
      ``bias_correction=True``, to bias-correct the moments.
    clamp_variance: as the transformation's (centered only).
    bias_correction: whether the transformation bias-corrects; required
      (``True`` or ``False``) where the state has a step count, which
      ``bias_correction=True`` adds, and so do stochastic rounding and the
      8-bit ``nu``. ``None`` (the default) where it has none.
    params: the parameters; needed only for an 8-bit state that
      ``flax.nnx.Optimizer`` wrote back (see
      :func:`rmsprop_jax.unpack_state <rmsprop_jax.packing.unpack_state>`).

  Returns:
    A tree like the parameters: the effective learning rate of each entry.
    Works under ``jax.jit``.

  Raises:
    TypeError: without ``eps`` or ``eps_in_sqrt``; for an ``eps_in_sqrt``
      or ``bias_correction`` that is not a bool, or a ``learning_rate``
      that is not a real scalar.
    ValueError: if ``state`` holds no RMSprop moment state, or several (a
      chain of two: pass the one you mean); for a schedule as
      ``learning_rate`` (pass its value); for a negative ``eps``; for
      ``decay`` without ``bias_correction=True``; if it has a
      step count and ``bias_correction`` is not given, or no count and
      ``bias_correction=True``; with ``bias_correction=False`` where the
      count can only come from ``bias_correction=True`` (no moment is
      bfloat16, whose stochastic rounding adds one, or 8-bit); with
      ``bias_correction=True`` and no ``decay``.

  Examples:
    >>> import jax.numpy as jnp, rmsprop_jax
    >>> tx = rmsprop_jax.rmsprop(0.01, eps=1e-8)  # optax's eps_in_sqrt=True
    >>> params = {'w': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.array([0.5, -4.0])}, state, params)
    >>> # 0.01 / sqrt(0.1 g^2): large gradients get small steps.
    >>> eff = rmsprop_jax.effective_learning_rate(
    ...     state, 0.01, eps=1e-8, eps_in_sqrt=True)
    >>> eff['w']
    Array([0.06324553, 0.00790569], dtype=float32)
  """
  owner = 'effective_learning_rate'
  _validation.check_bool(owner, eps_in_sqrt=eps_in_sqrt)
  _validation.check_type(owner, 'learning_rate', learning_rate)
  _validation.check_type(owner, 'eps', eps)
  _validation.check_non_negative(owner, 'eps', eps)
  if bias_correction is not None:
    _validation.check_bool(owner, bias_correction=bias_correction)
  if decay is not None and not bias_correction:
    raise ValueError(
      f'{owner}: decay is read only with bias_correction=True (it '
      'bias-corrects the moments).'
    )
  moments = _moment_state(packing.unpack_state(state, params))
  # In float32 at least, as the update computes: a bfloat16 nu - mu**2
  # cancels to nothing where the mean dominates the spread.
  wide = lambda x: jnp.asarray(x, jnp.promote_types(jnp.result_type(x), 'f4'))
  nu = jax.tree.map(wide, moments.nu)
  mu = getattr(moments, 'mu', None)
  mu = None if mu is None else jax.tree.map(wide, mu)
  counted = isinstance(
    moments,
    (
      transform.ScaleByRmsWithCountState,
      transform.ScaleByRStdDevWithCountState,
    ),
  )
  if counted and bias_correction is None:
    raise ValueError(
      'effective_learning_rate: the state has a step count, which '
      'bias_correction=True adds, and so do stochastic rounding and the '
      "8-bit nu: pass the transformation's bias_correction (True, with its "
      '`decay`, or False).'
    )
  if counted and bias_correction is False and not _may_round(state):
    raise ValueError(
      'effective_learning_rate: bias_correction=False, but the state has a '
      'step count and no bfloat16 or 8-bit moment: only '
      'bias_correction=True adds a count to such a state (stochastic '
      'rounding needs a bfloat16 nu). Pass bias_correction=True with the '
      "transformation's decay."
    )
  if bias_correction and not counted:
    raise ValueError(
      'effective_learning_rate: bias_correction=True, but the state has no '
      'step count: the transformation does not bias-correct.'
    )
  if bias_correction:
    if decay is None:
      raise ValueError(
        'effective_learning_rate: bias_correction=True needs the `decay` '
        'the transformation uses.'
      )
    # As the transformation: divide by 1 - decay**count (nothing to correct
    # before the first update, when count is 0).
    count = moments.count
    factor = jnp.where(count > 0, 1 - decay**count, 1.0)
    nu = jax.tree.map(lambda n: n / factor.astype(n.dtype), nu)
    if mu is not None:
      mu = jax.tree.map(lambda m: m / factor.astype(m.dtype), mu)
  if mu is None:
    ms = nu
  else:
    ms = jax.tree.map(
      lambda m, n: transform._variance(m, n, clamp_variance), mu, nu
    )
  return jax.tree.map(
    lambda v: learning_rate * transform._inverse_rms(v, eps, eps_in_sqrt), ms
  )


def summarize(tree: Any) -> dict[str, dict[str, jax.Array]]:
  """Min, median and max of each leaf, keyed by its path: for logging.

  A leaf holding a NaN gives NaN for all three, whatever its size (XLA:CPU
  runs a large ``jnp.min`` or ``jnp.max`` as a library kernel that skips
  NaN, which would log a finite range for a leaf gone NaN).

  Examples:
    >>> import jax.numpy as jnp, rmsprop_jax
    >>> rmsprop_jax.diagnostics.summarize({'w': jnp.array([1.0, 2.0, 4.0])})
    {'w': {'min': Array(1., dtype=float32), 'median': Array(2., dtype=float32), 'max': Array(4., dtype=float32)}}
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]

  def stats(x):
    low, high = jnp.min(x), jnp.max(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):  # Not a step count or codes.
      nan = jnp.isnan(x).any()
      low, high = (
        jnp.where(nan, jnp.array(jnp.nan, x.dtype), v) for v in (low, high)
      )
    return {'min': low, 'median': jnp.median(x), 'max': high}

  return {
    jax.tree_util.keystr(path, simple=True, separator='/'): stats(x)
    for path, x in leaves
  }
