"""rmsprop_jax: RMSprop and its family as optax gradient transformations.

``rmsprop`` is a drop-in replacement for ``optax.rmsprop`` that also covers
PyTorch's, Keras' and TF1's variants; ``presets`` mirrors each framework's
own constructor; ``scale_by_rms`` and ``scale_by_stddev`` are the building
blocks; ``effective_learning_rate`` reads the per-parameter step size out
of an optimizer state; ``porting`` moves a running training's weights and
optimizer state from PyTorch, timm, Keras or TF1 and back. With optax's
arguments, ``rmsprop``'s state is
``optax.rmsprop``'s own (the state classes exported here are optax's).
"""

from rmsprop_jax import (
  diagnostics,
  packing,
  porting,
  presets,
  quantization,
  sharding,
)
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.diagnostics import effective_learning_rate
from rmsprop_jax.packing import pack_state, unpack_state
from rmsprop_jax.sharding import state_shardings
from rmsprop_jax.transform import (
  ScaleByRmsState,
  ScaleByRmsWithCountState,
  ScaleByRStdDevState,
  ScaleByRStdDevWithCountState,
  clip_by_norm,
  scale_by_rms,
  scale_by_stddev,
)

__version__ = '0.2.0.dev0'

__all__ = [
  'ScaleByRStdDevState',
  'ScaleByRStdDevWithCountState',
  'ScaleByRmsState',
  'ScaleByRmsWithCountState',
  'clip_by_norm',
  'diagnostics',
  'effective_learning_rate',
  'pack_state',
  'packing',
  'porting',
  'presets',
  'quantization',
  'rmsprop',
  'scale_by_rms',
  'scale_by_stddev',
  'sharding',
  'state_shardings',
  'unpack_state',
]
