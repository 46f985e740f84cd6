"""PyTorch and timm: ``torch.optim.RMSprop`` and timm's ``RMSpropTF``
(weights by ``named_parameters()`` name, state from ``state_dict()``)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import optax

from rmsprop_jax.porting import _state, _tree
from rmsprop_jax.porting._tree import ParamMap


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
      node, key = _tree.child(node, part, name)
      path.append(key)
    if leaf == 'weight':
      candidates = (
        ('kernel', _torch_kernel_perm(len(shape))),
        ('scale', None),
        ('embedding', None),
        ('weight', None),
      )
      found = [c for c in candidates if _tree.has(node, c[0])]
      if not found:
        raise ValueError(
          f'torch_to_flax_map: {name!r}: the Flax module at '
          f'{tuple(path)} has no kernel, scale or embedding.'
        )
      jax_leaf, perm = found[0]
    else:
      jax_leaf, perm = leaf, None
    target, key = _tree.child(node, jax_leaf, name)
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
    params: the JAX parameters, as given to ``tx.init`` (or a Flax
      ``nnx.State``: the state is then built for ``nnx.to_pure_dict`` of
      it).
    check: verify that ``tx``'s next step from the imported state is the
      source optimizer's: each parameter group's hyperparameters (read from
      ``state_dict``: PyTorch's or timm's, told apart by timm's
      ``lr_in_momentum`` key) build the reference preset, and both take one
      step on probe gradients at random parameters; the updates must be the
      same rule (at any positive learning rate: a loop may set the group's
      ``lr`` before or after each step, so it is not compared, except with
      timm's caution or corrected weight decay, which are not linear in it)
      and the new moments the same. Pass ``False`` to continue with other
      hyperparameters on purpose.

  Returns:
    A state with the structure, shapes and dtypes of ``tx.init(params)``.

  Raises:
    ValueError: with ``check``, if ``tx``'s next step differs from the
      source's (another preset, another ``alpha``, ``eps``, weight decay,
      momentum placement, a learning rate of 0, or with caution or
      corrected weight decay a schedule whose value at the imported step is
      not the group's ``lr``), naming the preset to build for each group;
      for a state of another optimizer (no ``square_avg``),
      another variant (a momentum buffer or centered mean present in one and
      not the other), a parameter without state or missing from the map,
      or a shape that does not fit, naming the parameter.
  """
  owner = 'import_torch_state'
  groups = state_dict['param_groups']
  lr_inside = _lr_inside(groups)
  params = _tree.plain(params)
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
        value = _tree.to_numpy(entry[key])
        if field == 'trace' and lr_inside[i]:  # optax's: the negative.
          value = -value
        values[field, tuple(path)] = (value, perm, name)
    steps.add(int(float(entry['step'])))
  if len(steps) > 1:
    raise ValueError(
      f'import_torch_state: the parameters were stepped '
      f'different numbers of times ({sorted(steps)}).'
    )
  count = steps.pop() if steps else 0
  sources = [_torch_hyperparameters(group) for group in groups]
  described = [
    f'presets.{kind}({", ".join(f"{k}={v!r}" for k, v in hyper.items())})'
    for kind, hyper in sources
  ]
  if len(groups) > 1:
    described = [
      f'{source} for group {g} ({[by_index[i] for i in group["params"]]})'
      for g, (source, group) in enumerate(zip(described, groups))
    ]
  state = _state.build_state(
    owner,
    tx,
    params,
    values,
    count,
    source=('; '.join(described) if check else None),
  )
  if check:
    from rmsprop_jax import presets

    # Each group's reference holds that group's rule for every parameter;
    # only the group's own parameters are compared, so the others' state
    # may not fit it (another group without momentum, say).
    build = lambda ref: _state.build_state(
      owner, ref, params, values, count, lenient=True
    )
    for (kind, hyper), source, group in zip(sources, described, groups):
      make_ref = lambda lr, kind=kind, hyper=hyper: getattr(presets, kind)(
        **dict(hyper, lr=lr)
      )
      members = {tuple(param_map[by_index[i]][0]) for i in group['params']}
      _state.check_next_step(
        owner,
        tx,
        state,
        make_ref,
        build,
        params,
        source,
        hyper['lr'],
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
  lr_inside = _lr_inside(groups)
  moments, count = _state.read_state(state)
  if 'nu' not in moments:
    raise ValueError(
      f'{owner}: the state holds no RMSprop second moment '
      '(no ScaleByRms or ScaleByRStdDev state): it is not an '
      "RMSprop preset's."
    )
  count = _state.step(owner, count, step)
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
          value = _state.moment(moments.get(field, []), path, owner, name)
        except ValueError:
          value = None
        if (value is None) == (field in expected):
          raise ValueError(_state.variant_message(owner, field, name))
        if value is None:
          continue
        value = _tree.from_jax(value, perm)
        if field == 'trace' and lr_inside[i]:
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
    # timm ignores caution without momentum; presets.timm refuses it.
    caution=bool(group.get('caution', False)) and common['momentum'] > 0,
  )
  if group.get('corrected_weight_decay') and hyper['decoupled_decay']:
    # timm decays by lr**2 / max_lr, max_lr the lr it was built with.
    hyper.update(
      corrected_weight_decay=True, max_lr=float(group['max_lr_snapshot'])
    )
  return 'timm', hyper


def _lr_inside(groups) -> dict:
  """{parameter index: whether its group keeps the learning rate inside the
  momentum buffer} (timm's default; PyTorch never does)."""
  return {
    i: bool(group.get('lr_in_momentum', False))
    for group in groups
    for i in group['params']
  }


def _torch_kernel_perm(ndim: int):
  return {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}.get(
    ndim
  )
