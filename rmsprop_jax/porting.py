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

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import packing as packing_lib

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

# The parameter map: source name -> (JAX path, axis permutation or None).
ParamMap = Mapping[str, tuple[tuple, Sequence[int] | None]]

# The optax state fields a port fills: the per-parameter moments, and counts.
_MOMENTS = ('nu', 'mu', 'trace')
# The optax classes that hold them (ScaleByRms..., ScaleByRStdDev...,
# TraceState); Adam's mu and nu, say, are not RMSprop's.
_RMSPROP_STATES = ('ScaleByRms', 'ScaleByRStdDev', 'TraceState')


def torch_to_flax_map(
  names_and_shapes: Iterable[tuple[str, Any]],
  params: Any,
  rename: Mapping[str, str] | None = None,
) -> dict:
  """The parameter map from PyTorch ``named_parameters()`` to a Flax tree.

  Each PyTorch name ``a.b.weight`` becomes the JAX path ``('a', 'b', leaf)``
  (a module name listed in ``rename`` is replaced first; a component made
  of digits is looked up as that string, then as an integer, as Flax NNX
  keys list items). ``weight`` becomes ``kernel`` where the Flax module has
  one (transposed: ``(out, in)`` to ``(in, out)`` for ``Linear``, ``OIHW``
  to ``HWIO`` for ``Conv2d``, ``OIW`` to ``WIO`` and ``OIDHW`` to ``DHWIO``),
  else ``scale`` (normalisation layers) or ``embedding`` (``Embedding``),
  unchanged. ``bias`` stays ``bias``.

  Args:
    names_and_shapes: ``(name, tensor)`` or ``(name, shape)`` pairs, e.g.
      ``model.named_parameters()``.
    params: the Flax parameter tree (arrays or ``jax.ShapeDtypeStruct``), as
      nested dicts or Flax ``nnx.State``.
    rename: PyTorch module names to Flax module names, e.g.
      ``{'features.0': 'conv1'}`` (applied to the longest matching prefix).

  Returns:
    A dict: PyTorch name -> (JAX path, permutation or ``None``).

  Raises:
    ValueError: naming the parameter, where no Flax leaf fits its name and
      shape.

  The map cannot see a change of flattening order. PyTorch's
  ``torch.flatten`` of an ``(N, C, H, W)`` feature map orders a following
  ``Linear``'s inputs channel first, Flax's reshape of ``(N, H, W, C)``
  channel last: where ``H * W > 1``, that layer's weight needs its input
  axis reordered by hand, or the model must flatten a 1 x 1 map, as
  ``examples/port_from_pytorch.py`` does. Compare the two models' outputs
  on one batch after porting.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from rmsprop_jax import porting
    >>> params = {'fc': {'kernel': jnp.zeros((2, 3)), 'bias': jnp.zeros(3)}}
    >>> # As from torch.nn.Linear(2, 3).named_parameters(), with shapes:
    >>> param_map = porting.torch_to_flax_map(
    ...     [('fc.weight', (3, 2)), ('fc.bias', (3,))], params)
    >>> param_map
    {'fc.weight': (('fc', 'kernel'), (1, 0)), 'fc.bias': (('fc', 'bias'), None)}
    >>> weights = {'fc.weight': np.arange(6.0).reshape(3, 2),
    ...            'fc.bias': np.ones(3)}
    >>> porting.port_params(weights, param_map, params)['fc']['kernel']
    Array([[0., 2., 4.],
           [1., 3., 5.]], dtype=float32)
  """
  rename = dict(rename or {})
  out = {}
  for name, value in names_and_shapes:
    shape = tuple(getattr(value, 'shape', value))
    module, _, leaf = name.rpartition('.')
    for prefix in sorted(rename, key=len, reverse=True):
      if module == prefix or module.startswith(prefix + '.'):
        module = rename[prefix] + module[len(prefix) :]
        break
    node, path = params, []
    for part in module.split('.') if module else []:
      node, key = _child(node, part, name)
      path.append(key)
    if leaf == 'weight':
      candidates = (
        ('kernel', _torch_kernel_perm(len(shape))),
        ('scale', None),
        ('embedding', None),
        ('weight', None),
      )
      found = [c for c in candidates if _has(node, c[0])]
      if not found:
        raise ValueError(
          f'torch_to_flax_map: {name!r}: the Flax module at '
          f'{tuple(path)} has no kernel, scale or embedding.'
        )
      jax_leaf, perm = found[0]
    else:
      jax_leaf, perm = leaf, None
    target, key = _child(node, jax_leaf, name)
    expected = tuple(
      np.empty(shape, np.bool_).transpose(perm).shape if perm else shape
    )
    if tuple(np.shape(target)) != expected:
      raise ValueError(
        f'torch_to_flax_map: {name!r} has shape {shape}, laid out '
        f'{expected}, but the Flax leaf {tuple(path + [key])} has shape '
        f'{tuple(np.shape(target))}.'
      )
    out[name] = (tuple(path + [key]), perm)
  return out


def port_params(
  source: Mapping[str, Any], param_map: ParamMap, params: Any
) -> Any:
  """``params`` with every leaf in ``param_map`` taken from ``source``
  (a name -> array mapping, e.g. a PyTorch ``state_dict()`` of a model),
  laid out by the map and cast to the leaf's dtype.

  Raises:
    ValueError: for a name missing from ``source``, a leaf the map does not
      cover, or a shape that does not fit.
  """
  values = {}
  for name, (path, perm) in param_map.items():
    if name not in source:
      raise ValueError(f'port_params: {name!r} is not in the source.')
    values[tuple(path)] = (_to_numpy(source[name]), perm, name)
  return _fill_tree(params, values, 'port_params')


def export_params(params: Any, param_map: ParamMap) -> dict:
  """The inverse of :func:`port_params`: ``{source name: NumPy array}`` in
  the source's layout (for PyTorch: ``model.load_state_dict({k:
  torch.from_numpy(v) for k, v in ...})``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import porting
    >>> params = {'fc': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)}}
    >>> param_map = {'fc.weight': (('fc', 'kernel'), (1, 0)),
    ...              'fc.bias': (('fc', 'bias'), None)}
    >>> porting.export_params(params, param_map)['fc.weight'].shape
    (3, 2)
  """
  return {
    name: _from_jax(_get(params, path), perm)
    for name, (path, perm) in param_map.items()
  }


def import_torch_state(
  state_dict: Mapping[str, Any],
  names: Sequence[str],
  param_map: ParamMap,
  tx: optax.GradientTransformation,
  params: Any,
  check: bool = True,
) -> Any:
  """The state of ``tx`` from a ``torch.optim.RMSprop`` or timm
  ``RMSpropTF`` ``state_dict()``.

  Args:
    state_dict: ``optimizer.state_dict()`` of the PyTorch optimizer.
    names: the PyTorch parameter names in the optimizer's order:
      :func:`torch_param_names` ``(optimizer, model)``. (For one group built
      on ``model.parameters()`` that is ``[n for n, _ in
      model.named_parameters()]``; with several groups it is not.)
    param_map: PyTorch name -> (JAX path, layout), as for the weights.
    tx: the matching preset (``presets.pytorch`` or ``presets.timm`` with
      the optimizer's hyperparameters; the learning rate may be a schedule,
      which continues from the imported step count).
    params: the JAX parameters, as given to ``tx.init``.
    check: verify that ``tx``'s next step from the imported state is the
      source optimizer's: each parameter group's hyperparameters (read from
      ``state_dict``: PyTorch's or timm's, told apart by timm's
      ``lr_in_momentum`` key) build the reference preset with the group's
      current learning rate, and both take one step on a probe gradient.
      Pass ``False`` to continue with other hyperparameters on purpose.

  Returns:
    A state with the structure, shapes and dtypes of ``tx.init(params)``.

  Raises:
    ValueError: with ``check``, if ``tx``'s next step differs from the
      source's (another preset, another ``alpha``, weight decay, momentum
      placement, or a schedule whose value at the imported step is not the
      group's ``lr``); for a state of another optimizer (no ``square_avg``),
      another variant (a momentum buffer or centered mean present in one and
      not the other), a parameter without state or missing from the map,
      or a shape that does not fit, naming the parameter.
  """
  owner = 'import_torch_state'
  groups = state_dict['param_groups']
  lr_inside = _torch_lr_inside(groups)
  by_index = {i: name for i, name in enumerate(names)}
  indices = [i for group in groups for i in group['params']]
  if len(indices) != len(names):
    raise ValueError(
      f'import_torch_state: the optimizer has {len(indices)} parameters, '
      f'names lists {len(names)}.'
    )
  values, steps = {}, set()
  for i in indices:
    name = by_index[i]
    entry = state_dict['state'].get(i, state_dict['state'].get(str(i)))
    if not entry:
      raise ValueError(
        f'import_torch_state: {name!r} has no optimizer state (it never '
        'had a gradient); take one step in PyTorch first, or leave it out.'
      )
    if 'square_avg' not in entry:
      raise ValueError(
        f'import_torch_state: {name!r}: this is not RMSprop state (keys '
        f'{sorted(entry)}).'
      )
    if name not in param_map:
      raise ValueError(f'import_torch_state: {name!r} is not in param_map.')
    path, perm = param_map[name]
    for field, key in (
      ('nu', 'square_avg'),
      ('mu', 'grad_avg'),
      ('trace', 'momentum_buffer'),
    ):
      if key in entry:
        value = _to_numpy(entry[key])
        if field == 'trace' and lr_inside:  # optax's trace: the negative.
          value = -value
        values[field, tuple(path)] = (value, perm, name)
    steps.add(int(float(entry['step'])))
  if len(steps) > 1:
    raise ValueError(
      f'import_torch_state: the parameters were stepped '
      f'different numbers of times ({sorted(steps)}).'
    )
  count = steps.pop() if steps else 0
  state = _build_state(owner, tx, params, values, count)
  if check:
    from rmsprop_jax import presets

    # Each group's reference holds that group's rule for every parameter;
    # only the group's own parameters are compared, so the others' state
    # may not fit it (another group without momentum, say).
    build = lambda ref: _build_state(
      owner, ref, params, values, count, lenient=True
    )
    for group in groups:
      kind, hyper = _torch_hyperparameters(group)
      make_ref = lambda lr, kind=kind, hyper=hyper: getattr(presets, kind)(
        **dict(hyper, lr=lr)
      )
      members = {tuple(param_map[by_index[i]][0]) for i in group['params']}
      _check_next_step(
        owner,
        tx,
        state,
        make_ref,
        build,
        params,
        f'presets.{kind}',
        hyper,
        count,
        members,
      )
  return state


def export_torch_state(
  state: Any,
  template: Mapping[str, Any],
  names: Sequence[str],
  param_map: ParamMap,
  step: int | None = None,
) -> dict:
  """A ``state_dict()`` for the PyTorch (or timm) optimizer, from ``state``.

  Args:
    state: the state of the matching preset.
    template: ``optimizer.state_dict()`` of the optimizer to load it into
      (its ``param_groups``, with their hyperparameters, are kept; its
      ``state`` may be empty).
    names: the PyTorch parameter names in the optimizer's order.
    param_map: PyTorch name -> (JAX path, layout), as for the weights.
    step: the step count to record; needed only where ``state`` keeps none
      (a constant learning rate, no bias correction).

  Returns:
    A dict for ``optimizer.load_state_dict``: tensors in the state's dtypes,
    on the CPU.

  Raises:
    ValueError: where ``state`` keeps no step count and ``step`` is None.
  """
  import torch

  owner = 'export_torch_state'
  groups = template['param_groups']
  if any('alpha' not in group for group in groups):
    raise ValueError(
      f"{owner}: the template is not an RMSprop optimizer's "
      f'state_dict (its groups hold {sorted(groups[0])}).'
    )
  lr_inside = _torch_lr_inside(groups)
  moments, count = _read_state(state)
  if 'nu' not in moments:
    raise ValueError(
      f'{owner}: the state holds no RMSprop second moment '
      '(no ScaleByRms or ScaleByRStdDev state): it is not an '
      "RMSprop preset's."
    )
  count = _step(owner, count, step)
  by_index = dict(enumerate(names))
  dtype = (
    torch.float64
    if torch.get_default_dtype() == torch.float64
    else torch.float32
  )
  out = {}
  for group in groups:
    expected = (
      {'nu'}
      | ({'mu'} if group.get('centered') else set())
      | ({'trace'} if group.get('momentum', 0) > 0 else set())
    )
    for i in group['params']:
      name = by_index.get(i)
      if name is None or name not in param_map:
        raise ValueError(
          f"{owner}: the optimizer's parameter {i} "
          f'({name!r}) is not in names and param_map.'
        )
      path, perm = param_map[name]
      entry = {'step': torch.tensor(float(count), dtype=dtype)}
      for field, key in (
        ('nu', 'square_avg'),
        ('trace', 'momentum_buffer'),
        ('mu', 'grad_avg'),
      ):
        try:
          value = _moment(moments.get(field, []), path, owner, name)
        except ValueError:
          value = None
        if (value is None) == (field in expected):
          raise ValueError(_variant_message(owner, field, name))
        if value is None:
          continue
        value = _from_jax(value, perm)
        if field == 'trace' and lr_inside:
          value = -value
        old = template.get('state', {}).get(i, {}).get(key)
        if old is not None and tuple(old.shape) != value.shape:
          raise ValueError(
            f'{owner}: {name!r}: {key} would have shape {value.shape}, the '
            f"optimizer's has {tuple(old.shape)} (check its layout in "
            'param_map).'
          )
        entry[key] = _to_torch(torch, value)
      out[i] = entry
  return {'state': out, 'param_groups': groups}


def _to_torch(torch, value: np.ndarray):
  if value.dtype.name == 'bfloat16':
    return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(value)


def import_keras_state(
  optimizer: Any,
  param_map: ParamMap,
  tx: optax.GradientTransformation,
  params: Any,
  check: bool = True,
) -> Any:
  """The state of ``tx`` (``presets.keras``) from a built Keras 3
  ``keras.optimizers.RMSprop``: its ``*_velocity``, ``*_momentum`` and
  ``*_average_gradient`` variables and its ``iteration``.

  ``param_map`` is keyed by the Keras variables' paths
  (``model.trainable_variables[i].path``, e.g. ``'sequential/dense/kernel'``).
  With ``check`` (default), ``tx``'s next step from the imported state must
  be the Keras optimizer's (its ``rho``, ``momentum``, ``epsilon``,
  ``centered``, ``weight_decay`` and current learning rate), as in
  :func:`import_torch_state`. Raises ``ValueError`` as
  :func:`import_torch_state`, and ``TypeError`` for a Keras optimizer other
  than RMSprop.
  """
  owner = 'import_keras_state'
  _check_keras_rmsprop(owner, optimizer)
  found = {v.name: v for v in optimizer.variables}
  values = {}
  for name, (path, perm) in param_map.items():
    key = name.replace('/', '_')
    if f'{key}_velocity' not in found:
      raise ValueError(_keras_missing(owner, name, found))
    for field, suffix in (('nu', 'velocity'), ('mu', 'average_gradient')):
      if f'{key}_{suffix}' in found:
        values[field, tuple(path)] = (
          _to_numpy(found[f'{key}_{suffix}'].value),
          perm,
          name,
        )
    if f'{key}_momentum' in found:  # The step taken: the lr is inside.
      values['trace', tuple(path)] = (
        -_to_numpy(found[f'{key}_momentum'].value),
        perm,
        name,
      )
  count = int(np.asarray(found['iteration'].value))
  state = _build_state(owner, tx, params, values, count)
  if check:
    from rmsprop_jax import presets

    hyper = dict(
      learning_rate=float(np.asarray(optimizer.learning_rate)),
      rho=float(optimizer.rho),
      momentum=float(optimizer.momentum),
      epsilon=float(optimizer.epsilon),
      centered=bool(optimizer.centered),
      weight_decay=(
        None
        if optimizer.weight_decay is None
        else float(optimizer.weight_decay)
      ),
    )
    _check_next_step(
      owner,
      tx,
      state,
      lambda lr: presets.keras(**dict(hyper, learning_rate=lr)),
      lambda ref: _build_state(owner, ref, params, values, count),
      params,
      'presets.keras',
      hyper,
      count,
    )
  return state


def export_keras_state(
  state: Any, optimizer: Any, param_map: ParamMap, step: int | None = None
) -> None:
  """Assigns ``state`` (of ``presets.keras``) to a built Keras 3
  ``RMSprop``'s variables, in place; the inverse of
  :func:`import_keras_state`. ``step`` (Keras' ``iteration``, which its
  learning-rate schedules read) is needed only where ``state`` keeps no step
  count."""
  owner = 'export_keras_state'
  _check_keras_rmsprop(owner, optimizer)
  found = {v.name: v for v in optimizer.variables}
  moments, count = _read_state(state)
  count = _step(owner, count, step)
  for name in param_map:
    if f'{name.replace("/", "_")}_velocity' not in found:
      raise ValueError(_keras_missing(owner, name, found))
  for name, (path, perm) in param_map.items():
    key = name.replace('/', '_')
    for field, suffix in (
      ('nu', 'velocity'),
      ('mu', 'average_gradient'),
      ('trace', 'momentum'),
    ):
      if (field in moments) != (f'{key}_{suffix}' in found):
        raise ValueError(_variant_message(owner, field, name))
      if field in moments:
        value = _from_jax(_moment(moments[field], path, owner, name), perm)
        found[f'{key}_{suffix}'].assign(-value if field == 'trace' else value)
  found['iteration'].assign(count)


def import_tf1_slots(
  slots: Mapping[str, Mapping[str, Any]],
  step: int,
  param_map: ParamMap,
  tx: optax.GradientTransformation,
  params: Any,
) -> Any:
  """The state of ``tx`` (``presets.tf1``) from TF1 ``RMSPropOptimizer``
  slot values: ``{variable name: {'rms': ..., 'momentum': ...,
  'mg': ...}}`` (``optimizer.get_slot(var, name)`` evaluated), and the
  global step the learning rate schedule continues from. TF1 keeps a
  ``momentum`` slot even for ``momentum=0``, where it holds no state: it is
  then ignored. Raises ``ValueError`` as :func:`import_torch_state`."""
  has_trace = _has_field(tx, params, 'trace')
  values = {}
  for name, (path, perm) in param_map.items():
    if name not in slots or 'rms' not in slots[name]:
      raise ValueError(f'import_tf1_slots: no rms slot for {name!r}.')
    entry = slots[name]
    values['nu', tuple(path)] = (_to_numpy(entry['rms']), perm, name)
    if 'mg' in entry:
      values['mu', tuple(path)] = (_to_numpy(entry['mg']), perm, name)
    if 'momentum' in entry and has_trace:
      values['trace', tuple(path)] = (-_to_numpy(entry['momentum']), perm, name)
  return _build_state('import_tf1_slots', tx, params, values, step)


def export_tf1_slots(state: Any, param_map: ParamMap) -> dict:
  """TF1 slot values from ``state`` (of ``presets.tf1``): the inverse of
  :func:`import_tf1_slots` (a zero ``momentum`` slot without momentum)."""
  moments, _ = _read_state(state)
  out = {}
  for name, (path, perm) in param_map.items():
    get = lambda field, path=path, name=name, perm=perm: _from_jax(
      _moment(moments[field], path, 'export_tf1_slots', name), perm
    )
    entry = {'rms': get('nu')}
    entry['momentum'] = (
      -get('trace') if 'trace' in moments else np.zeros_like(entry['rms'])
    )
    if 'mu' in moments:
      entry['mg'] = get('mu')
    out[name] = entry
  return out


def torch_param_names(optimizer: Any, model: Any) -> list[str]:
  """The names (``model.named_parameters()``) of ``optimizer``'s
  parameters, in the optimizer's order: its ``state_dict()`` numbers them
  so, group after group.

  Raises:
    ValueError: for a parameter of the optimizer that is not the model's.
  """
  by_id = {id(p): name for name, p in model.named_parameters()}
  names = []
  for g, group in enumerate(optimizer.param_groups):
    for p in group['params']:
      if id(p) not in by_id:
        raise ValueError(
          f'torch_param_names: a parameter of group {g} '
          f"(shape {tuple(p.shape)}) is not the model's."
        )
      names.append(by_id[id(p)])
  return names


# -- helpers -----------------------------------------------------------------


def _torch_hyperparameters(group) -> tuple[str, dict]:
  """(preset name, its arguments) reproducing a PyTorch or timm parameter
  group at its current learning rate."""
  common = dict(
    lr=float(group['lr']),
    alpha=float(group['alpha']),
    eps=float(group['eps']),
    weight_decay=float(group['weight_decay']),
    momentum=float(group['momentum']),
    centered=bool(group['centered']),
  )
  if 'lr_in_momentum' not in group:
    return 'pytorch', dict(common, maximize=bool(group.get('maximize', False)))
  hyper = dict(
    common,
    decoupled_decay=bool(group['decoupled_decay']),
    lr_in_momentum=bool(group['lr_in_momentum']),
    caution=bool(group.get('caution', False)),
  )
  if group.get('corrected_weight_decay') and hyper['decoupled_decay']:
    # timm decays by lr**2 / max_lr: at a constant lr, lr * (wd * lr/max_lr).
    hyper['weight_decay'] *= hyper['lr'] / float(group['max_lr_snapshot'])
  return 'timm', hyper


def _check_keras_rmsprop(owner, optimizer):
  name = type(optimizer).__name__
  if name != 'RMSprop' or not hasattr(optimizer, 'rho'):
    raise TypeError(
      f'{owner}: this is a Keras {name} optimizer, not '
      'RMSprop: its state is not RMSprop state.'
    )


def _keras_missing(owner, name, found) -> str:
  known = sorted(
    k[: -len('_velocity')] for k in found if k.endswith('_velocity')
  )
  return (
    f'{owner}: the Keras optimizer has no state for {name!r} (its '
    f'variables are named after the paths {known[:6]}, "/" as "_"; '
    'is the optimizer built, and is this the model it trains?).'
  )


def _probe(params):
  """A gradient like ``params``: fixed, varied values of both signs."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  return jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(k, jnp.shape(x)).astype(jnp.result_type(x))
      for k, x in zip(keys, leaves)
    ],
  )


def _check_next_step(
  owner, tx, state, make_ref, build, params, preset, hyper, count, members=None
):
  """Raises unless ``tx``'s next step from the imported ``state`` is the
  source's rule at some learning rate (on the leaves in ``members``).

  The source's step is affine in its learning rate (``make_ref(lr)``, its
  state ``build(ref)``): measured at 0 and 1, the rate that fits ``tx``'s
  step best is solved for, and the rest must be round-off. So a schedule
  that differs from the source's own learning rates passes; another rule
  (preset, decay, eps, weight decay, momentum or its placement) does not.
  """
  grads = _probe(params)
  ours = tx.update(grads, state, params)[0]
  step_at = lambda lr: (lambda ref: ref.update(grads, build(ref), params)[0])(
    make_ref(lr)
  )
  pick = lambda tree: np.concatenate(
    [
      np.ravel(np.asarray(x, np.float64))
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
      if members is None or _path_keys(path) in members
    ]
  )
  u = pick(ours)
  scale = max(np.max(np.abs(u), initial=0.0), 1e-300)
  a = pick(step_at(0.0))
  b = pick(step_at(1.0)) - a
  rate = float(np.dot(u - a, b) / max(np.dot(b, b), 1e-300))
  worst = float(np.max(np.abs(u - a - rate * b), initial=0.0)) / scale
  dtypes = {jnp.result_type(x) for x in jax.tree.leaves(params)}
  tolerance = 1e3 * max(float(jnp.finfo(d).eps) for d in dtypes)
  lr = hyper.get('lr', hyper.get('learning_rate'))
  if worst > tolerance:
    # Caution's mask and corrected weight decay are not affine in the
    # learning rate: then the step must be the source's at its own rate.
    worst = min(
      worst, float(np.max(np.abs(u - pick(step_at(lr))), initial=0.0)) / scale
    )
  if worst > tolerance:
    args = ', '.join(f'{k}={v!r}' for k, v in hyper.items())
    raise ValueError(
      f'{owner}: tx does not continue this run: its next step from the '
      f"imported state is not the source optimizer's rule at any learning "
      f'rate (off by {worst:.2g}, relative; round-off would be below '
      f'{tolerance:.1g}). The source is {preset}({args}) at step {count}: '
      'build tx with those arguments (the learning rate may be a '
      'schedule; with caution or corrected weight decay it must give '
      f'{lr!r} at step {count}), or pass check=False to change the rule on '
      'purpose.'
    )


def _torch_lr_inside(groups) -> bool:
  """timm keeps the learning rate inside the buffer unless told otherwise;
  PyTorch never does."""
  flags = {bool(g.get('lr_in_momentum', False)) for g in groups}
  if len(flags) > 1:
    raise ValueError(
      'the parameter groups place the learning rate '
      'differently; port them one group at a time.'
    )
  return flags.pop()


def _torch_kernel_perm(ndim: int):
  return {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}.get(
    ndim
  )


def _child(node, part, name):
  for key in (part, int(part)) if str(part).isdigit() else (part,):
    try:
      return node[key], key
    except (KeyError, IndexError, TypeError):
      continue
  raise ValueError(f'{name!r}: no {part!r} in the JAX tree.')


def _has(node, key) -> bool:
  try:
    node[key]
  except (KeyError, IndexError, TypeError):
    return False
  return True


def _to_numpy(value) -> np.ndarray:
  """A copy: a torch tensor's ``numpy()`` shares its memory, and a later
  PyTorch step would change the JAX arrays made from it."""
  if hasattr(value, 'detach'):  # A torch tensor.
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      import ml_dtypes

      return value.float().numpy().astype(ml_dtypes.bfloat16)
    value = value.numpy()
  return np.array(value, copy=True)


def _from_jax(value, perm) -> np.ndarray:
  value = np.asarray(value)
  return np.array(
    value.transpose(np.argsort(perm)) if perm else value, copy=True
  )


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _path_keys(path) -> tuple:
  return tuple(
    getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))) for k in path
  )


def _laid_out(owner, source, leaf, key):
  """A source (array, layout, name) laid out for ``leaf`` at ``key``,
  shape-checked, as a copy in the leaf's dtype."""
  value, perm, name = source
  if perm:
    value = value.transpose(perm)
  if value.shape != tuple(np.shape(leaf)):
    raise ValueError(
      f'{owner}: {name!r} has shape {value.shape} after its layout, the '
      f'JAX leaf {key} {tuple(np.shape(leaf))}.'
    )
  return jnp.array(value, jnp.result_type(leaf))  # A copy.


def _fill_tree(tree, values, owner):
  """``tree`` with the leaf at each path of ``values`` replaced by its
  (array, layout, name): laid out, shape-checked, cast to the leaf's dtype."""
  seen = set()

  def fill(path, leaf):
    key = _path_keys(path)
    if key not in values:
      raise ValueError(f'{owner}: the JAX leaf {key} is not in param_map.')
    seen.add(key)
    return _laid_out(owner, values[key], leaf, key)

  out = jax.tree_util.tree_map_with_path(fill, tree)
  missing = set(values) - seen
  if missing:
    raise ValueError(f'{owner}: {sorted(missing)[0]} is not in the parameters.')
  return out


def _plain_state(tx, params):
  """``tx``'s state in optax's layout (unpacked, float moments)."""
  return packing_lib.unpack_state(tx.init(params))


def _split(path):
  """(field, parameter path) of a state leaf: ('nu', ('dense', 'kernel')),
  ('count', ()), or (None, ()) for anything else."""
  keys = _path_keys(path)
  names = [getattr(k, 'name', None) for k in path]
  for i, name in enumerate(names):
    if name in _MOMENTS:
      return name, keys[i + 1 :]
    if name == 'count':
      return 'count', ()
  return None, ()


def _has_field(tx, params, field) -> bool:
  flat, _ = jax.tree_util.tree_flatten_with_path(
    jax.eval_shape(lambda: _plain_state(tx, params))
  )
  return any(_split(path)[0] == field for path, _ in flat)


def _variant_message(owner, field, name) -> str:
  what = {
    'mu': 'a centered mean (centered=True)',
    'trace': 'a momentum buffer (momentum > 0)',
    'nu': 'a second moment',
  }[field]
  return (
    f'{owner}: {name!r}: one side has {what} and the other not: the '
    'optimizers are different variants; build the preset with the '
    "source optimizer's hyperparameters."
  )


def _build_state(owner, tx, params, values, count, lenient=False):
  """tx.init(params), its moments filled from ``values`` (keyed by (field,
  parameter path)) and every step count set to ``count``. ``lenient``
  (for a reference that only some parameters' sources fit): moments without
  a source keep their initial values, and sources without a moment are
  dropped."""
  plain = _plain_state(tx, params)
  fields = {field for field, _ in values}
  flat, treedef = jax.tree_util.tree_flatten_with_path(plain)
  present = {_split(path)[0] for path, _ in flat}
  for field in _MOMENTS:
    if not lenient and (field in fields) != (field in present):
      name = next(
        (v[2] for k, v in values.items() if k[0] == field), 'every parameter'
      )
      raise ValueError(_variant_message(owner, field, name))
  leaves, seen = [], set()
  for path, leaf in flat:
    field, param_path = _split(path)
    if field == 'count':
      leaves.append(
        jnp.asarray(min(count, np.iinfo(np.int32).max), jnp.result_type(leaf))
      )
    elif field in _MOMENTS and (field, param_path) in values:
      seen.add((field, param_path))
      leaves.append(
        _laid_out(owner, values[field, param_path], leaf, param_path)
      )
    elif field in _MOMENTS and not lenient:
      if ('nu', param_path) in values:  # The parameter has state, not this.
        raise ValueError(
          _variant_message(owner, field, values['nu', param_path][2])
        )
      raise ValueError(
        f'{owner}: no source for the JAX parameter '
        f'{param_path} (not in param_map).'
      )
    else:
      leaves.append(leaf)
  extra = set(values) - seen
  if extra and not lenient:
    field, path = sorted(extra)[0]
    if any(k[1] == path for k in seen):  # The parameter is there, not this.
      raise ValueError(_variant_message(owner, field, values[field, path][2]))
    raise ValueError(
      f'{owner}: {values[field, path][2]!r} maps to {path}, '
      'which is not in the parameters.'
    )
  return packing_lib.pack_state(jax.tree.unflatten(treedef, leaves), tx, params)


def _step(owner, count, step):
  if step is not None:
    return int(step)
  if count is None:
    raise ValueError(
      f'{owner}: this state keeps no step count (a constant '
      'learning rate): pass step=, the number of steps taken.'
    )
  return count


def _read_state(state):
  """({field: [parameter-shaped trees]}, count) of a state in any layout.
  A field may come in several trees (``optax.multi_transform`` keeps one
  state per label, each masked to its own leaves)."""
  plain = packing_lib.unpack_state(state)
  moments: dict[str, list[Any]] = {}
  counts: set[int] = set()

  def visit(node):
    if isinstance(node, tuple) and hasattr(node, '_fields'):
      kind = type(node).__name__
      for field in node._fields:
        value = getattr(node, field)
        if field in _MOMENTS and kind.startswith(_RMSPROP_STATES):
          moments.setdefault(field, []).append(value)
        elif field == 'count':
          counts.add(int(value))
        else:
          visit(value)
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, Mapping):
      for child in node.values():
        visit(child)

  visit(plain)
  return moments, max(counts) if counts else None


def _moment(trees, path, owner, name):
  """The moment of the parameter at ``path``, from whichever tree holds it
  (not masked out)."""
  for tree in trees:
    try:
      value = _get(tree, path)
    except (KeyError, IndexError, TypeError):
      continue
    if hasattr(value, 'shape'):
      return value
  raise ValueError(f'{owner}: no state for {name!r} at {tuple(path)}.')
