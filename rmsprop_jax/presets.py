"""Each framework's and paper's RMSprop, with that framework's own signature.

Ported code changes only its import::

    torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, momentum=0.9)
    rmsprop_jax.presets.pytorch(lr=1e-3, alpha=0.9, momentum=0.9)

Every preset returns :func:`rmsprop_jax.rmsprop` with the arguments that
reproduce the framework's arithmetic exactly (validated in the tests against
the real ``torch.optim.RMSprop``, the real ``keras.optimizers.RMSprop`` and
TensorFlow's own ``ApplyRMSProp`` kernels). Every learning rate may be a
float, a JAX scalar or an optax schedule (step count -> value); the
framework's "current learning rate" at step ``t`` (0-based) is
``schedule(t)``.

How the frameworks differ:

=================  ========  =======  =======  ========  =============  ==========
preset             decay     eps      eps in   nu_0      lr vs          weight
                                      sqrt?              momentum       decay
=================  ========  =======  =======  ========  =============  ==========
``pytorch``        0.99      1e-8     no       0         outside        coupled
``keras``          0.9       1e-7     yes      0         inside         decoupled
``tf1``            0.9       1e-10    yes      **1**     inside         none
``timm``           0.9       1e-10    yes      **1**     inside         coupled
                                                         (or outside)   (or decoupled)
``hinton2012``     0.9       1e-8     no       0         no momentum    none
``graves2013``     0.95      1e-4     yes      0         inside (0.9)   none
``dqn2015``        0.95      0.01     yes      0         no momentum    none
=================  ========  =======  =======  ========  =============  ==========

``graves2013`` and ``dqn2015`` are centered.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from rmsprop_jax import _validation
from rmsprop_jax.alias import rmsprop

__all__ = [
  'pytorch',
  'keras',
  'tf1',
  'timm',
  'hinton2012',
  'graves2013',
  'dqn2015',
]


def _check(
  owner,
  lr_name,
  lr,
  decay_name,
  decay,
  eps_name,
  eps,
  momentum=0.0,
  weight_decay=None,
  decay_optional=True,
  **flags,
):
  """Validates types and ranges with the framework's own argument names;
  ``flags`` must each be True or False. ``weight_decay`` may be None only
  where ``decay_optional`` (Keras' default; PyTorch's and timm's is 0)."""
  _validation.check_bool(owner, **flags)
  _validation.check_type(owner, lr_name, lr, schedule=True)
  _validation.check_type(owner, decay_name, decay)
  _validation.check_type(owner, eps_name, eps)
  _validation.check_type(owner, 'momentum', momentum)
  _validation.check_type(
    owner, 'weight_decay', weight_decay, schedule=True, optional=decay_optional
  )
  _validation.check_non_negative(owner, lr_name, lr)
  _validation.check_decay(owner, decay_name, decay)
  _validation.check_non_negative(owner, eps_name, eps)
  _validation.check_decay(owner, 'momentum', momentum)
  _validation.check_non_negative(owner, 'weight_decay', weight_decay)


def _momentum_or_none(momentum):
  """No buffer for a plain-number zero momentum, as PyTorch, Keras and TF1."""
  return None if _validation.is_python_zero(momentum) else momentum


def pytorch(
  lr: optax.ScalarOrSchedule = 0.01,
  alpha: jax.typing.ArrayLike = 0.99,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  momentum: jax.typing.ArrayLike = 0.0,
  centered: bool = False,
  capturable: bool = False,
  foreach: bool | None = None,
  maximize: bool = False,
  differentiable: bool = False,
  fused: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""``torch.optim.RMSprop``.

  .. math::

    g &\leftarrow -g \ (\text{maximize}); \quad g \leftarrow g + \lambda\theta;
    \quad v \leftarrow \alpha v + (1-\alpha) g^2

    \bar g &\leftarrow \alpha \bar g + (1-\alpha) g \ (\text{centered});
    \quad d = \sqrt{v - \bar g^2} + \epsilon \ \text{or}\ \sqrt{v} + \epsilon

    b &\leftarrow \gamma b + g/d; \quad \theta \leftarrow \theta - \eta_t b
    \quad (\text{or } \theta \leftarrow \theta - \eta_t g/d
    \text{ without momentum})

  :math:`\epsilon` is outside the square root, :math:`v_0 = 0`, the learning
  rate multiplies the momentum buffer (so a changing ``lr`` rescales past
  steps, unlike TF and optax), weight decay is coupled L2 (added to the
  gradient after the ``maximize`` flip). The centered variance is clamped at
  zero, where PyTorch returns NaN. A non-zero ``weight_decay`` needs
  ``params`` in ``update``. Complex parameters differ: PyTorch normalises
  real and imaginary parts separately, this uses :math:`|g|^2`.

  The arguments are ``torch.optim.RMSprop``'s, in its order and with its
  defaults (the numeric ones as floats, so that
  ``optax.inject_hyperparams`` injects float32 values); ``lr`` may also be
  an optax schedule. ``capturable``, ``foreach``, ``differentiable`` and
  ``fused`` choose PyTorch's kernels and autograd behaviour, which have no
  meaning here: they are accepted and ignored. Under
  ``optax.inject_hyperparams`` the learning rate's key is ``lr`` (not
  optax's ``learning_rate``).

  Raises:
    TypeError, ValueError: as :func:`rmsprop_jax.rmsprop`, naming the
      argument as this preset does (e.g. a negative or infinite learning
      rate, a decay outside [0, 1)).

  Examples:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import presets
    >>> tx = presets.pytorch(lr=0.01, alpha=0.99)
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.array([0.5, -4.0])}, state, params)
    >>> u['w']  # -lr * g / (sqrt(0.01 g^2) + eps): about -lr / 0.1 * sign(g)
    Array([-0.09999998,  0.09999999], dtype=float32)
  """
  _check(
    'presets.pytorch',
    'lr',
    lr,
    'alpha',
    alpha,
    'eps',
    eps,
    momentum,
    weight_decay,
    decay_optional=False,
    centered=centered,
    maximize=maximize,
  )
  del capturable, foreach, differentiable, fused  # PyTorch's kernels only.
  momentum = _momentum_or_none(momentum)
  return rmsprop(
    lr,
    decay=alpha,
    eps=eps,
    eps_in_sqrt=False,
    centered=centered,
    momentum=momentum,
    lr_in_momentum=momentum is None,
    weight_decay=weight_decay,
    maximize=maximize,
  )


def keras(
  learning_rate: optax.ScalarOrSchedule = 0.001,
  rho: jax.typing.ArrayLike = 0.9,
  momentum: jax.typing.ArrayLike = 0.0,
  epsilon: jax.typing.ArrayLike = 1e-7,
  centered: bool = False,
  weight_decay: jax.typing.ArrayLike | None = None,
  clipnorm: float | None = None,
  clipvalue: float | None = None,
  global_clipnorm: float | None = None,
  use_ema: bool = False,
  ema_momentum: float = 0.99,
  ema_overwrite_frequency: int | None = None,
  loss_scale_factor: float | None = None,
  gradient_accumulation_steps: int | None = None,
  name: str | None = None,
  *,
  weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Keras 3 ``keras.optimizers.RMSprop`` (also tf_keras' new optimizer).

  .. math::

    \theta &\leftarrow \theta - \eta_t \lambda \theta
    \quad (\text{decoupled weight decay, before the step})

    v &\leftarrow \rho v + (1-\rho) g^2; \quad
    \bar g \leftarrow \rho \bar g + (1-\rho) g \ (\text{centered})

    i &= \eta_t g / \sqrt{v - \bar g^2 + \epsilon}
    \ \text{or}\ \eta_t g / \sqrt{v + \epsilon}

    b &\leftarrow \gamma b + i;\quad \theta \leftarrow \theta - b
    \quad (\text{or } \theta \leftarrow \theta - i \text{ without momentum})

  :math:`\epsilon` inside the square root (the Keras docstring's "epsilon
  hat" notwithstanding), :math:`v_0 = 0`, the learning rate inside the
  momentum buffer. Weight decay uses the current learning rate and the
  parameters before the step, and is neither normalised nor accumulated in
  the buffer; it needs ``params`` in ``update``. With the learning rate set
  from outside (``optax.inject_hyperparams`` and ``optax.tree.set``, as
  Keras' ``optimizer.learning_rate.assign``) the decay follows it, as in
  Keras.

  The arguments are ``keras.optimizers.RMSprop``'s, in its order and with
  its defaults; ``learning_rate`` may also be an optax schedule. What Keras'
  base optimizer does around the RMSprop step is not part of this
  transformation's state, so those arguments are refused (``ValueError``)
  with the exact replacement, tested against Keras:

  * ``clipnorm=c`` (each variable's gradient to norm ``c`` on its own):
    ``optax.chain(rmsprop_jax.clip_by_norm(c), presets.keras(...))``;
  * ``global_clipnorm=c``: ``optax.chain(optax.clip_by_global_norm(c),
    presets.keras(...))``;
  * ``clipvalue=c``: ``optax.chain(optax.clip(c), presets.keras(...))``;
  * ``use_ema=True`` (an average of the parameters beside them): keep it in
    the training loop, ``ema = params`` after the first step, then ``ema =
    optax.incremental_update(params, ema, 1 - ema_momentum)`` after each
    (and ``params = ema`` every ``ema_overwrite_frequency`` steps);
  * ``gradient_accumulation_steps=n``: ``optax.MultiSteps(presets.keras(
    ...), every_k_schedule=n)`` is optax's accumulation (not compared with
    Keras' here: its step counting differs).

  ``ema_momentum`` and ``ema_overwrite_frequency`` are read only with
  ``use_ema``, ``name`` names Keras' variables, and ``loss_scale_factor``
  multiplies Keras' loss and divides its gradients (which guards float16
  gradients and changes no other number; JAX code differentiates the
  unscaled loss): they are accepted and ignored. Keras' ``optimizer.exclude_from_weight_decay(var_list,
  var_names)`` is ``weight_decay_mask`` (keyword only): a tree of booleans
  like the parameters (or a function of them giving one), ``False`` where
  Keras excludes the variable; ``optax.masked`` would mask the whole step,
  not just the decay.

  Raises:
    TypeError, ValueError: as :func:`rmsprop_jax.rmsprop`, naming the
      argument as this preset does (e.g. a negative or infinite learning
      rate, a decay outside [0, 1)); ``ValueError`` for the arguments
      above that belong elsewhere, naming their replacement.

  Examples:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import presets
    >>> tx = presets.keras(learning_rate=0.001, rho=0.9)
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.array([0.5, -4.0])}, state, params)
    >>> u['w']  # -lr * g / (sqrt(0.1 g^2) + epsilon)
    Array([-0.00316227,  0.00316228], dtype=float32)
  """
  _check(
    'presets.keras',
    'learning_rate',
    learning_rate,
    'rho',
    rho,
    'epsilon',
    epsilon,
    momentum,
    weight_decay,
    centered=centered,
    use_ema=use_ema,
  )
  # Read only with use_ema; Keras' variable names; the loss's scale.
  del ema_momentum, ema_overwrite_frequency, name, loss_scale_factor
  if weight_decay_mask is not None and weight_decay is None:
    raise ValueError(
      'presets.keras: weight_decay_mask has no effect without a weight_decay.'
    )
  _refuse_keras_wrappers(
    clipnorm=clipnorm,
    clipvalue=clipvalue,
    global_clipnorm=global_clipnorm,
    use_ema=use_ema,
    gradient_accumulation_steps=gradient_accumulation_steps,
  )
  return rmsprop(
    learning_rate,
    decay=rho,
    eps=epsilon,
    eps_in_sqrt=True,
    centered=centered,
    momentum=_momentum_or_none(momentum),
    weight_decay=weight_decay,
    decoupled_weight_decay=weight_decay is not None,
    weight_decay_mask=weight_decay_mask,
  )


# What Keras' base optimizer does around the step, and where it goes here.
_KERAS_WRAPPERS = {
  'clipnorm': 'optax.chain(rmsprop_jax.clip_by_norm({v}), presets.keras(...))'
  ' (Keras clips each variable on its own)',
  'global_clipnorm': 'optax.chain(optax.clip_by_global_norm({v}), '
  'presets.keras(...))',
  'clipvalue': 'optax.chain(optax.clip({v}), presets.keras(...))',
  'use_ema': 'an average of the parameters kept in the training loop: '
  'ema = params after the first step, then ema = '
  'optax.incremental_update(params, ema, 1 - ema_momentum) after each',
  'gradient_accumulation_steps': 'optax.MultiSteps(presets.keras(...), '
  "every_k_schedule={v}), optax's gradient accumulation",
}


def _refuse_keras_wrappers(**values):
  """Raises for a Keras argument that belongs outside the RMSprop step (set
  as Keras reads it: a true value; ``clipnorm=0`` is off there too)."""
  for name, value in values.items():
    if value:
      raise ValueError(
        f'presets.keras: {name}={value!r} is not part of the RMSprop step '
        f'here; the exact replacement is '
        f'{_KERAS_WRAPPERS[name].format(v=value)}.'
      )


def tf1(
  learning_rate: optax.ScalarOrSchedule,
  decay: jax.typing.ArrayLike = 0.9,
  momentum: jax.typing.ArrayLike = 0.0,
  epsilon: jax.typing.ArrayLike = 1e-10,
  use_locking: bool = False,
  centered: bool = False,
  name: str = 'RMSProp',
) -> optax.GradientTransformationExtraArgs:
  r"""``tf.compat.v1.train.RMSPropOptimizer`` (the ``ApplyRMSProp`` kernels).

  .. math::

    ms &\leftarrow ms + (g^2 - ms)(1-\rho); \quad
    mg \leftarrow mg + (g - mg)(1-\rho) \ (\text{centered})

    mom &\leftarrow \gamma\, mom + \eta_t g / \sqrt{ms - mg^2 + \epsilon}
    \ \text{or}\ \eta_t g / \sqrt{ms + \epsilon}; \quad \theta \leftarrow
    \theta - mom

  The accumulator ``ms`` starts at **ones** (so early steps are SGD-like),
  :math:`\epsilon` is inside the square root, the learning rate inside the
  momentum buffer. TF1 keeps a momentum slot even for ``momentum=0``; that
  changes no number, so none is kept here. Dopamine's "Nature DQN" config is
  ``tf1(2.5e-4, decay=0.95, epsilon=1e-5, centered=True)``.

  The arguments are ``RMSPropOptimizer``'s, in its order and with its
  defaults; ``learning_rate`` may also be an optax schedule.
  ``use_locking`` (TF's variable locks) and ``name`` (its slots' names) have
  no meaning here: they are accepted and ignored.

  Raises:
    TypeError, ValueError: as :func:`rmsprop_jax.rmsprop`, naming the
      argument as this preset does (e.g. a negative or infinite learning
      rate, a decay outside [0, 1)).

  Examples:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import presets
    >>> tx = presets.tf1(learning_rate=0.001, decay=0.9)
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.array([0.5, -4.0])}, state, params)
    >>> u['w']  # the accumulator starts at 1: -lr * g / sqrt(0.9 + 0.1 g^2)
    Array([-0.00051988,  0.00252982], dtype=float32)
  """
  _check(
    'presets.tf1',
    'learning_rate',
    learning_rate,
    'decay',
    decay,
    'epsilon',
    epsilon,
    momentum,
    centered=centered,
    use_locking=use_locking,
  )
  del name  # TF's slot names.
  return rmsprop(
    learning_rate,
    decay=decay,
    eps=epsilon,
    initial_scale=1.0,
    eps_in_sqrt=True,
    centered=centered,
    momentum=_momentum_or_none(momentum),
  )


def timm(
  lr: optax.ScalarOrSchedule = 1e-2,
  alpha: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-10,
  weight_decay: jax.typing.ArrayLike = 0.0,
  momentum: jax.typing.ArrayLike = 0.0,
  centered: bool = False,
  decoupled_decay: bool = False,
  corrected_weight_decay: bool = False,
  lr_in_momentum: bool = True,
  caution: bool = False,
  foreach: bool | None = None,
  *,
  max_lr: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""timm's ``RMSpropTF`` (``timm/optim/rmsprop_tf.py``, ``--opt rmsproptf``).

  The PyTorch port of TF1's RMSprop that ImageNet recipes (EfficientNet,
  MobileNet) train with:

  .. math::

    g &\leftarrow g + \lambda\theta \ \text{(coupled)}, \ \text{or}\
    \theta \leftarrow \theta(1 - \eta_t\lambda)
    \ \text{(decoupled_decay, before the step)}

    v &\leftarrow v + (g^2 - v)(1-\alpha); \quad
    \bar g \leftarrow \bar g + (g - \bar g)(1-\alpha) \ (\text{centered})

    d &= \sqrt{v - \bar g^2 + \epsilon} \ \text{(centered)}
    \ \text{or}\ \sqrt{v + \epsilon}

    b &\leftarrow \gamma b + \eta_t g/d;\ \theta \leftarrow \theta - b
    \quad (\text{lr_in_momentum})

    b &\leftarrow \gamma b + g/d;\ \theta \leftarrow \theta - \eta_t b
    \quad (\text{otherwise})

  and :math:`\theta \leftarrow \theta - \eta_t g/d` without momentum.
  :math:`v_0 = 1` (TF1's), :math:`\epsilon` inside the square root; the
  learning rate inside the momentum buffer by default (TF1's), after it with
  ``lr_in_momentum=False`` (PyTorch's); weight decay coupled L2 by default
  (PyTorch's), decoupled with ``decoupled_decay=True``. ``caution`` is
  :func:`rmsprop_jax.rmsprop`'s ``caution`` (timm ignores it without
  momentum; here that is an error).

  Arguments with no meaning in JAX, or whose meaning needs a value timm
  reads elsewhere:

  * ``foreach`` chooses timm's multi-tensor kernel; it changes no number
    and is accepted and ignored (XLA fuses the update anyway).
  * ``corrected_weight_decay=True`` (with ``decoupled_decay``) decays by
    :math:`\eta_t^2\lambda/\eta_{max}`, where timm's :math:`\eta_{max}` is
    the ``lr`` the optimizer was built with. With a Python number ``lr``
    that is ``lr`` (and the correction changes nothing while the rate stays
    constant); with a schedule, or a rate set from outside
    (``optax.inject_hyperparams``, which passes each step's rate as an
    array, like timm's ``group['lr'] = ...``), pass that value as
    ``max_lr``: without it that use is refused, as the correction would
    silently do nothing.

  The arguments are ``timm.optim.RMSpropTF``'s, with its defaults, and:

  Args:
    lr: a number, or an optax schedule (timm's "current learning rate" at
      step ``t``, 0-based, is ``lr(t)``).
    max_lr: :math:`\eta_{max}` for ``corrected_weight_decay`` (keyword
      only): needed with a schedule or an array ``lr``; a Python number
      ``lr`` is its own by default.

  Raises:
    ValueError: as :func:`rmsprop_jax.rmsprop`, in timm's argument names;
      for ``corrected_weight_decay`` without ``decoupled_decay`` or with a
      schedule or array ``lr`` and no ``max_lr``, and ``max_lr`` without
      ``corrected_weight_decay``; for ``caution=True`` without momentum.

  References:
    Wightman, PyTorch Image Models, ``timm/optim/rmsprop_tf.py`` (read at
    timm 1.0.31); Liang et al., Cautious Optimizers, arXiv:2411.16085, 2024.
  """
  owner = 'presets.timm'
  _check(
    owner,
    'lr',
    lr,
    'alpha',
    alpha,
    'eps',
    eps,
    momentum,
    weight_decay,
    decay_optional=False,
    centered=centered,
    decoupled_decay=decoupled_decay,
    corrected_weight_decay=corrected_weight_decay,
    lr_in_momentum=lr_in_momentum,
    caution=caution,
  )
  _validation.check_type(owner, 'max_lr', max_lr, optional=True)
  if foreach is not None and not isinstance(foreach, bool):
    raise TypeError(
      f'{owner}: foreach must be None, True or False, got {foreach!r}.'
    )
  momentum = _momentum_or_none(momentum)
  if caution and momentum is None:
    raise ValueError(
      f'{owner}: caution=True has no effect without '
      'momentum (timm ignores it); pass a momentum, or drop '
      'caution.'
    )
  if corrected_weight_decay and not decoupled_decay:
    raise ValueError(
      f'{owner}: corrected_weight_decay=True has no effect '
      'without decoupled_decay=True (as in timm).'
    )
  if max_lr is not None and not corrected_weight_decay:
    raise ValueError(
      f'{owner}: max_lr is only read with corrected_weight_decay=True.'
    )
  if corrected_weight_decay and max_lr is None and callable(lr):
    raise ValueError(
      f'{owner}: corrected_weight_decay=True with a schedule lr needs '
      "max_lr: the lr timm's optimizer was built with."
    )
  if (
    corrected_weight_decay
    and max_lr is None
    and not isinstance(lr, (int, float))
  ):
    # A JAX array: optax.inject_hyperparams passes the rate it is set to
    # now, which is not the rate timm's optimizer was built with.
    raise ValueError(
      f'{owner}: corrected_weight_decay=True with an lr that is not a Python '
      "number (optax.inject_hyperparams passes each step's rate as an "
      "array) needs max_lr: the lr timm's optimizer was built with, e.g. "
      'optax.inject_hyperparams(presets.timm)(lr=0.01, max_lr=0.01, ...).'
    )
  if corrected_weight_decay:
    if max_lr is None:  # A constant Python lr is the one built with.
      max_lr = lr
    _validation.check_non_negative(owner, 'max_lr', max_lr)
    concrete = _validation.concrete(max_lr)  # None when traced.
    if concrete is not None and not np.all(concrete > 0):
      raise ValueError(f'{owner}: `max_lr` must be positive, got {max_lr!r}.')
    as_schedule = lambda x: x if callable(x) else lambda _, value=x: value
    lr_t, wd_t = as_schedule(lr), as_schedule(weight_decay)
    # lr_t * (lr_t * wd_t / max_lr): decoupled decay at the current rate.
    decay_rate: optax.ScalarOrSchedule = lambda count: (
      lr_t(count) * wd_t(count) / max_lr
    )
  else:
    decay_rate = weight_decay
  return rmsprop(
    lr,
    decay=alpha,
    eps=eps,
    initial_scale=1.0,
    eps_in_sqrt=True,
    centered=centered,
    momentum=momentum,
    lr_in_momentum=lr_in_momentum or momentum is None,
    weight_decay=decay_rate,
    decoupled_weight_decay=decoupled_decay,
    caution=caution,
  )


def hinton2012(
  learning_rate: optax.ScalarOrSchedule = 0.001,
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSprop as in Hinton's lecture 6e (Tieleman & Hinton, 2012).

  .. math::

    v \leftarrow \rho v + (1-\rho) g^2; \quad
    \theta \leftarrow \theta - \eta\, g / (\sqrt{v} + \epsilon)

  The slides give ``MeanSquare = 0.9 MeanSquare + 0.1 g^2`` and divide the
  gradient by its square root; they state no epsilon, no initial value and
  no learning rate. This preset follows the NumPy ``RMSprop`` class that
  comes with the classic demos (demos 1 to 3 of ``python -m rmsprop_jax
  demo``; the class is transcribed in the project's
  ``tests/test_references.py``): :math:`v_0 = 0`, :math:`\epsilon` = 1e-8
  outside the square root, :math:`\eta` = 0.001, no momentum.

  Args:
    learning_rate: :math:`\eta`, a number or an optax schedule.
    decay: :math:`\rho`, in [0, 1).
    eps: :math:`\epsilon` >= 0, added outside the square root.

  Raises:
    TypeError, ValueError: as :func:`rmsprop_jax.rmsprop`, naming the
      argument as this preset does (e.g. a negative or infinite learning
      rate, a decay outside [0, 1)).

  References:
    Tieleman & Hinton, Lecture 6.5 - rmsprop: Divide the gradient by a
    running average of its recent magnitude, COURSERA: Neural Networks for
    Machine Learning, 2012.
  """
  _check(
    'presets.hinton2012',
    'learning_rate',
    learning_rate,
    'decay',
    decay,
    'eps',
    eps,
  )
  return rmsprop(learning_rate, decay=decay, eps=eps, eps_in_sqrt=False)


def graves2013(
  learning_rate: optax.ScalarOrSchedule = 1e-4,
  decay: jax.typing.ArrayLike = 0.95,
  momentum: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-4,
) -> optax.GradientTransformationExtraArgs:
  r"""Centered RMSprop with momentum, Graves (2013), eqs. (38)-(41).

  .. math::

    n &\leftarrow \aleph n + (1-\aleph)\epsilon_i^2; \quad
    g \leftarrow \aleph g + (1-\aleph)\epsilon_i

    \Delta &\leftarrow \beth \Delta - \gimel\, \epsilon_i / \sqrt{n - g^2 +
    \daleth}; \quad w \leftarrow w + \Delta

  in Graves' notation: :math:`\epsilon_i` is the gradient, and
  :math:`\aleph` = ``decay`` = 0.95, :math:`\beth` = ``momentum`` = 0.9,
  :math:`\gimel` = ``learning_rate`` = 1e-4, :math:`\daleth` = ``eps`` = 1e-4
  (inside the square root), all state starting at zero (as Chainer's
  ``RMSpropGraves`` and MXNet's ``rmspropalex``). The learning rate is inside
  the momentum buffer.

  Args:
    learning_rate: :math:`\gimel`, a number or an optax schedule.
    decay: :math:`\aleph`, in [0, 1).
    momentum: :math:`\beth`, in [0, 1).
    eps: :math:`\daleth` >= 0, inside the square root.

  Raises:
    TypeError, ValueError: as :func:`rmsprop_jax.rmsprop`, naming the
      argument as this preset does (e.g. a negative or infinite learning
      rate, a decay outside [0, 1)).

  References:
    Graves, Generating Sequences With Recurrent Neural Networks,
    arXiv:1308.0850, 2013, section 4.2.
  """
  _check(
    'presets.graves2013',
    'learning_rate',
    learning_rate,
    'decay',
    decay,
    'eps',
    eps,
    momentum,
  )
  return rmsprop(
    learning_rate,
    decay=decay,
    eps=eps,
    eps_in_sqrt=True,
    centered=True,
    momentum=momentum,
  )


def dqn2015(
  learning_rate: optax.ScalarOrSchedule = 2.5e-4,
  decay: jax.typing.ArrayLike = 0.95,
  eps: jax.typing.ArrayLike = 0.01,
) -> optax.GradientTransformationExtraArgs:
  r"""The DQN optimizer, Mnih et al. (2015), as in DeepMind's released code.

  .. math::

    g &\leftarrow 0.95 g + 0.05\,\nabla, \qquad
    g_2 \leftarrow 0.95 g_2 + 0.05\,\nabla^2,

    \theta &\leftarrow \theta - \eta\,\nabla / \sqrt{g_2 - g^2 + 0.01}

  Centered, :math:`\epsilon` = 0.01 inside the square root, both moving
  averages with decay 0.95, zeros initialisation and **no heavy-ball
  momentum**: the paper's "gradient momentum 0.95" is the decay of the mean
  gradient, not a momentum coefficient (a common reproduction mistake, e.g.
  ``torch.optim.RMSprop(momentum=0.95)``). Pass descent gradients (the Lua
  code feeds the ascent direction and adds the step; the result is the
  same). For Dopamine's TF1-based "Nature" config use
  ``presets.tf1(2.5e-4, decay=0.95, epsilon=1e-5, centered=True)``.

  Args:
    learning_rate: :math:`\eta`, a number or an optax schedule.
    decay: the decay of both moving averages, in [0, 1).
    eps: >= 0, inside the square root.

  Raises:
    TypeError, ValueError: as :func:`rmsprop_jax.rmsprop`, naming the
      argument as this preset does (e.g. a negative or infinite learning
      rate, a decay outside [0, 1)).

  References:
    Mnih et al., Human-level control through deep reinforcement learning,
    Nature 518, 2015 (Extended Data Table 1); DeepMind's Lua release,
    ``dqn/NeuralQLearner.lua``.
  """
  _check(
    'presets.dqn2015',
    'learning_rate',
    learning_rate,
    'decay',
    decay,
    'eps',
    eps,
  )
  return rmsprop(
    learning_rate, decay=decay, eps=eps, eps_in_sqrt=True, centered=True
  )
