"""Moving a running training between frameworks: weights and RMSprop state.

A checkpoint half-way through a PyTorch, timm, Keras or TF1 run holds the
optimizer's statistics (the second moment, the centered mean, the momentum
buffer, the step count). Resetting them changes the run: an accumulator reset
to zero makes the next steps about ``1/sqrt(1 - decay)`` times too large.
These functions carry them over, exactly, into the matching preset's state
(:func:`rmsprop_jax.presets.pytorch`, :func:`~rmsprop_jax.presets.timm`,
:func:`~rmsprop_jax.presets.keras`, :func:`~rmsprop_jax.presets.tf1`), and
back.

Parameters are matched as porting tools match weights: a **parameter map**
gives, for each source name, where the parameter goes in the JAX tree and how
its axes are laid out there::

    {'conv1.weight': (('conv1', 'kernel'), (2, 3, 1, 0)),  # OIHW -> HWIO
     'fc.weight': (('fc', 'kernel'), (1, 0)),              # (out, in) -> (in, out)
     'fc.bias': (('fc', 'bias'), None)}

A JAX path is a tuple of dict keys (or sequence indices); the layout is the
permutation ``jnp.transpose`` takes to turn the source array into the JAX
one, or ``None``. The same map ports the weights (:func:`port_params`) and
each state tensor; :func:`torch_to_flax_map` writes it for the common case
of PyTorch ``named_parameters()`` into a Flax tree with the same module
names.

How each framework's state maps onto the presets' (optax's classes):

=========  ===============  ===========================  ===================  =============
framework  second moment    centered mean                momentum buffer      count
=========  ===============  ===========================  ===================  =============
PyTorch    ``square_avg``   ``grad_avg``                 ``momentum_buffer``  ``step``
timm       ``square_avg``   ``grad_avg``                 ``momentum_buffer``  ``step``
Keras 3    ``*_velocity``   ``*_average_gradient``       ``*_momentum``       ``iteration``
TF1        ``rms``          ``mg``                       ``momentum``         (given)
=========  ===============  ===========================  ===================  =============

The momentum buffer holds ``sum(m^k * g/d)`` where the learning rate is
applied after it (PyTorch, timm with ``lr_in_momentum=False``): optax's
``TraceState`` holds the same. Where the learning rate is inside the buffer
(TF1, Keras, timm's default) the framework's buffer is the step subtracted
from the parameters, and optax's ``trace`` holds its negative.
"""

from rmsprop_jax.porting._tree import ParamMap as ParamMap
from rmsprop_jax.porting._tree import export_params, port_params
from rmsprop_jax.porting.keras import export_keras_state, import_keras_state
from rmsprop_jax.porting.pytorch import (
  export_torch_state,
  import_torch_state,
  torch_param_names,
  torch_to_flax_map,
)
from rmsprop_jax.porting.tf1 import export_tf1_slots, import_tf1_slots

__all__ = [
  'torch_to_flax_map',
  'torch_param_names',
  'port_params',
  'export_params',
  'import_torch_state',
  'export_torch_state',
  'import_keras_state',
  'export_keras_state',
  'import_tf1_slots',
  'export_tf1_slots',
]
