"""The parameter map and the tree code every framework's port shares:
reading source arrays, laying them out, and filling a JAX tree with them."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The parameter map: source name -> (JAX path, axis permutation or None).
ParamMap = Mapping[str, tuple[tuple, Sequence[int] | None]]


def port_params(
  source: Mapping[str, Any], param_map: ParamMap, params: Any
) -> Any:
  """``params`` with every leaf in ``param_map`` taken from ``source``
  (a name -> array mapping, e.g. a PyTorch ``state_dict()`` of a model),
  laid out by the map and cast to the leaf's dtype.

  ``params`` is what :func:`torch_to_flax_map` takes: nested dicts (or
  lists) of arrays, or a Flax ``nnx.State`` (e.g. ``nnx.state(model,
  nnx.Param)``), which comes back as a new ``nnx.State`` of the same
  variables for ``nnx.update(model, ...)``; ``params`` is not changed.

  Raises:
    ValueError: for a name missing from ``source``, a leaf the map does not
      cover, or a shape that does not fit.
  """
  values = {}
  for name, (path, perm) in param_map.items():
    if name not in source:
      raise ValueError(f'port_params: {name!r} is not in the source.')
    values[tuple(path)] = (to_numpy(source[name]), perm, name)
  if not _is_nnx_state(params):
    return fill_tree(params, values, 'port_params')
  from flax import nnx

  filled = fill_tree(plain(params), values, 'port_params')
  out = jax.tree.map(lambda x: x, params)  # New variables, same kinds.
  nnx.replace_by_pure_dict(out, filled)
  return out


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

  ``params`` may be a Flax ``nnx.State``, as for :func:`port_params`.
  """
  params = plain(params)
  return {
    name: from_jax(get(params, path), perm)
    for name, (path, perm) in param_map.items()
  }


def plain(params):
  """``params`` as nested dicts of arrays where it is a Flax ``nnx.State``
  (``nnx.to_pure_dict``), else as it is."""
  if not _is_nnx_state(params):
    return params
  from flax import nnx

  return nnx.to_pure_dict(params)


def _is_nnx_state(tree) -> bool:
  """A Flax NNX ``State`` (without importing Flax where it is not used)."""
  return type(tree).__module__.startswith('flax.nnx') and hasattr(
    tree, 'to_pure_dict'
  )


def child(node, part, name):
  for key in (part, int(part)) if str(part).isdigit() else (part,):
    try:
      return node[key], key
    except (KeyError, IndexError, TypeError):
      continue
  raise ValueError(f'{name!r}: no {part!r} in the JAX tree.')


def has(node, key) -> bool:
  try:
    node[key]
  except (KeyError, IndexError, TypeError):
    return False
  return True


def to_numpy(value) -> np.ndarray:
  """A copy: a torch tensor's ``numpy()`` shares its memory, and a later
  PyTorch step would change the JAX arrays made from it."""
  if hasattr(value, 'detach'):  # A torch tensor.
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      import ml_dtypes

      return value.float().numpy().astype(ml_dtypes.bfloat16)
    value = value.numpy()
  return np.array(value, copy=True)


def from_jax(value, perm) -> np.ndarray:
  value = np.asarray(value)
  return np.array(
    value.transpose(np.argsort(perm)) if perm else value, copy=True
  )


def get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def path_keys(path) -> tuple:
  return tuple(
    getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))) for k in path
  )


def laid_out(owner, source, leaf, key):
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


def fill_tree(tree, values, owner):
  """``tree`` with the leaf at each path of ``values`` replaced by its
  (array, layout, name): laid out, shape-checked, cast to the leaf's dtype."""
  seen = set()

  def fill(path, leaf):
    key = path_keys(path)
    if key not in values:
      raise ValueError(f'{owner}: the JAX leaf {key} is not in param_map.')
    seen.add(key)
    return laid_out(owner, values[key], leaf, key)

  out = jax.tree_util.tree_map_with_path(fill, tree)
  missing = set(values) - seen
  if missing:
    raise ValueError(f'{owner}: {sorted(missing)[0]} is not in the parameters.')
  return out
