"""Step speed and memory: rmsprop_jax against optax.rmsprop and PyTorch.

For every parameter tree, variant and dtype it measures, in one process and
taking turns:

- the step as a user calls it: one jitted, donated ``update`` +
  ``optax.apply_updates`` call (dispatch included), fed its own outputs;
- the device time per step inside a ``lax.fori_loop`` of several steps;
- ``torch.optim.RMSprop(foreach=True).step()`` on tensors of the same shapes
  (PyTorch's own conventions; same work per element);
- the machine's ceiling: a donated, jitted elementwise kernel on flat buffers
  that reads and writes exactly the bytes the variant must move.

and, from the compiled programs, compile time, temporary memory and bytes
accessed; from the state itself, optimizer-state bytes per parameter.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks import common

LR = 1e-3
VARIANTS = {
  'plain': {},
  'centered': {'centered': True},
  'momentum': {'momentum': 0.9},
  'centered+momentum': {'centered': True, 'momentum': 0.9},
  # Low-memory second moment (float32 parameters only); optax's side is
  # plain optax.rmsprop, with its float32 state.
  'bf16 nu': {'nu_dtype': jnp.bfloat16},
  'bf16 nu (SR)': {'nu_dtype': jnp.bfloat16, 'stochastic_rounding': True},
  '8-bit nu': {'nu_dtype': jnp.uint8},
}
LOW_MEMORY = ('nu_dtype', 'stochastic_rounding')


def is_low_memory(variant: str) -> bool:
  """Whether ``variant`` narrows the second moment (for float32 parameters
  only; older results may name variants no longer run: not narrow)."""
  return any(k in LOW_MEMORY for k in VARIANTS.get(variant, {}))


TORCH_STALLED = 50  # Times the same-bytes ceiling: PyTorch was not running.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def transformer_shapes(scale: int = 1) -> list[tuple[int, ...]]:
  """Leaf shapes of a small Flax Linen decoder (4 blocks, width 256/scale).

  Built with ``jax.eval_shape``: nothing is initialised or trained.
  """
  import flax.linen as nn

  width, vocab = 256 // scale, 8192 // scale

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x + nn.MultiHeadDotProductAttention(4)(nn.LayerNorm()(x))
      h = nn.Dense(4 * width)(nn.LayerNorm()(x))
      return x + nn.Dense(width)(nn.gelu(h))

  class Decoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(vocab, width)(tokens)
      for _ in range(4):
        x = Block()(x)
      return nn.Dense(vocab)(nn.LayerNorm()(x))

  shapes = jax.eval_shape(
    Decoder().init, jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)
  )
  return [leaf.shape for leaf in jax.tree.leaves(shapes)]


def trees(quick: bool) -> dict[str, list[tuple[int, ...]]]:
  """The grid of parameter trees, as lists of leaf shapes."""
  if quick:
    # One large leaf, and several smaller ones (packing stacks them).
    return {'1 x 64K': [(1 << 16,)], '16 x 4K': [(4096,)] * 16}
  return {
    '1 x 16M': [(1 << 24,)],
    '256 x 64K': [(1 << 16,)] * 256,
    '1000 x 4K': [(4096,)] * 1000,
    '1000 x 1K': [(1024,)] * 1000,
    '2000 x 64': [(64,)] * 2000,
    'transformer': transformer_shapes(),
  }


def state_dtypes(dtype, kwargs: dict) -> list:
  """The dtype of each parameter-sized array in the variant's state (the
  8-bit nu counts as uint8; its block scales add 1.6 %)."""
  return [kwargs.get('nu_dtype', dtype)] + [dtype] * (
    bool(kwargs.get('centered')) + bool(kwargs.get('momentum'))
  )


def moved_bytes(n_params: int, dtype, kwargs: dict) -> int:
  """Bytes one step must read and write: params r/w, grads r, state r/w."""
  per_param = 3 * jnp.dtype(dtype).itemsize + 2 * sum(
    jnp.dtype(d).itemsize for d in state_dtypes(dtype, kwargs)
  )
  return n_params * per_param


def _random_tree(shapes, dtype, key):
  keys = jax.random.split(key, len(shapes))
  return [
    jax.random.normal(k, s, jnp.float32).astype(dtype)
    for k, s in zip(keys, shapes)
  ]


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class JaxSide:
  """A jitted, donated train-style step of one optax transformation."""

  def __init__(self, tx, params, grads, scan_steps):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    def many(params, state, grads):
      return jax.lax.fori_loop(
        0, scan_steps, lambda _, c: step(*c, grads), (params, state)
      )

    self.grads = grads
    self.scan_steps = scan_steps
    self.carry = (jax.tree.map(jnp.copy, params), tx.init(params))
    self.state_bytes = _nbytes(self.carry[1])
    self.many = jax.jit(many, donate_argnums=(0, 1))
    start = time.perf_counter()
    # One compile, by XLA even where a persistent compilation cache is set;
    # the steps run this executable.
    compiled = common.compile_uncached(
      jax.jit(step, donate_argnums=(0, 1)).lower(*self.carry, grads)
    )
    self.compile_s = time.perf_counter() - start
    self.step = compiled
    memory = compiled.memory_analysis()
    self.temp_bytes = getattr(memory, 'temp_size_in_bytes', None)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.xla_bytes = (cost or {}).get('bytes accessed')

  def time_step(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.carry = self.step(*self.carry, self.grads)
    jax.block_until_ready(self.carry)
    return time.perf_counter() - start

  def time_scan(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.carry = self.many(*self.carry, self.grads)
    jax.block_until_ready(self.carry)
    return (time.perf_counter() - start) / self.scan_steps


class Ceiling:
  """A donated elementwise kernel moving the variant's bytes on flat buffers."""

  def __init__(self, n, dtype, state_dtypes, scan_steps):
    def kernel(p, state, g):
      return p + g, tuple(s + g.astype(s.dtype) for s in state)

    def many(p, state, g):
      return jax.lax.fori_loop(
        0, scan_steps, lambda _, c: kernel(*c, g), (p, state)
      )

    self.scan_steps = scan_steps
    self.grads = jnp.ones(n, dtype)
    self.carry = (
      jnp.zeros(n, dtype),
      tuple(jnp.zeros(n, d) for d in state_dtypes),
    )
    self.step = jax.jit(kernel, donate_argnums=(0, 1))
    self.many = jax.jit(many, donate_argnums=(0, 1))

  time_step = JaxSide.time_step
  time_scan = JaxSide.time_scan


class TorchSide:
  """``torch.optim.RMSprop(foreach=True)`` on tensors of the same values."""

  def __init__(self, params, grads, kwargs):
    import torch

    self.torch = torch
    self.device = (
      'cuda'
      if (jax.default_backend() == 'gpu' and torch.cuda.is_available())
      else 'cpu'
    )
    to_torch = lambda x: torch.from_numpy(np.array(x.astype(jnp.float32))).to(
      device=self.device, dtype=getattr(torch, str(x.dtype))
    )
    self.params = [to_torch(p) for p in params]
    for p, g in zip(self.params, grads):
      p.grad = to_torch(g)
    self.opt = torch.optim.RMSprop(
      self.params,
      lr=LR,
      alpha=0.9,
      eps=1e-8,
      foreach=True,
      centered=bool(kwargs.get('centered')),
      momentum=kwargs.get('momentum', 0.0),
    )

  def time_step(self, n: int) -> float:
    sync = (
      self.torch.cuda.synchronize if self.device == 'cuda' else lambda: None
    )
    start = time.perf_counter()
    for _ in range(n):
      self.opt.step()
    sync()
    return time.perf_counter() - start


TWIN = 'second copy of '


def _merge_twins(times: dict, combine=None) -> dict:
  """Each side built twice timed as one: the geometric mean of its two
  copies' times (or ``combine`` of them)."""
  combine = combine or (lambda a, b: float(np.sqrt(a * b)))
  out = {k: v for k, v in times.items() if not k.startswith(TWIN)}
  for k, v in times.items():
    if k.startswith(TWIN):
      out[k[len(TWIN) :]] = combine(out[k[len(TWIN) :]], v)
  return out


def measure(
  tree_name,
  shapes,
  dtype_name,
  variant,
  *,
  repeats,
  target_s,
  scan_steps,
  use_torch,
) -> dict:
  dtype = DTYPES[dtype_name]
  kwargs = VARIANTS[variant]
  params = _random_tree(shapes, dtype, jax.random.PRNGKey(0))
  grads = _random_tree(shapes, dtype, jax.random.PRNGKey(1))
  n = sum(int(np.prod(s)) for s in shapes)
  itemsize = jnp.dtype(dtype).itemsize
  make_optax = lambda: JaxSide(
    optax.rmsprop(
      LR, **{k: v for k, v in kwargs.items() if k not in LOW_MEMORY}
    ),
    params,
    grads,
    scan_steps,
  )
  make_ours = lambda: JaxSide(
    rmsprop_jax.rmsprop(LR, **kwargs), params, grads, scan_steps
  )
  # Of two identical steps built one after the other, the first built
  # tends to time faster (by about 10 % on 1000 x 1K; the cause is not
  # buffer placement). So optax's side and ours are each built twice, in
  # the order optax, ours, ..., ours, optax, and each is timed as the
  # geometric mean of its two copies: the edge of building first cancels.
  sides = {
    'optax': make_optax(),
    'ours': make_ours(),
    # The opt-in layout: small leaves stacked (not optax's state).
    'packed': JaxSide(
      rmsprop_jax.rmsprop(LR, packing=True, **kwargs), params, grads, scan_steps
    ),
    'ceiling': Ceiling(n, dtype, state_dtypes(dtype, kwargs), scan_steps),
  }
  sides[TWIN + 'ours'] = make_ours()
  sides[TWIN + 'optax'] = make_optax()
  step_timers: dict[str, Callable[[int], float]] = {
    name: side.time_step for name, side in sides.items()
  }
  if use_torch:
    step_timers['torch'] = TorchSide(params, grads, kwargs).time_step
  counts = {
    name: common.calibrate(lambda t=t: t(1), target_s)
    for name, t in step_timers.items()
  }
  spreads: dict[str, float] = {}
  step = _merge_twins(common.alternate(step_timers, counts, repeats, spreads))
  spreads = _merge_twins(spreads, max)
  scan_timers = {name: side.time_scan for name, side in sides.items()}
  scan_counts = {
    name: common.calibrate(lambda t=t: t(1), target_s)
    for name, t in scan_timers.items()
  }
  scan = _merge_twins(common.alternate(scan_timers, scan_counts, repeats))

  moved = moved_bytes(n, dtype, kwargs)
  ours, ref = sides['ours'], sides['optax']
  return {
    'tree': tree_name,
    'leaves': len(shapes),
    'params': n,
    'dtype': dtype_name,
    'variant': variant,
    'step_s': step,
    'scan_step_s': scan,
    'speedup_vs_optax': step['optax'] / step['ours'],
    'scan_speedup_vs_optax': scan['optax'] / scan['ours'],
    'packed_speedup_vs_optax': step['optax'] / step['packed'],
    'packed_scan_speedup_vs_optax': scan['optax'] / scan['packed'],
    'speedup_vs_torch': (step['torch'] / step['ours']) if use_torch else None,
    # Sides whose repeats spread more than common.UNSTABLE_SPREAD: their
    # ratios are marked, not trusted.
    # A PyTorch step 50x slower than moving its bytes is its threads
    # fighting XLA's (or another process) for the cores, however steady.
    'unstable': sorted(
      {k for k, v in spreads.items() if v > common.UNSTABLE_SPREAD}
      | (
        {'torch'}
        if use_torch and step['torch'] > TORCH_STALLED * step['ceiling']
        else set()
      )
    ),
    'moved_bytes': moved,
    'ours_gb_s': moved / step['ours'] / 1e9,
    'ceiling_gb_s': moved / step['ceiling'] / 1e9,
    'fraction_of_ceiling': step['ceiling'] / step['ours'],
    'scan_fraction_of_ceiling': scan['ceiling'] / scan['ours'],
    'compile_s': {
      'ours': ours.compile_s,
      'optax': ref.compile_s,
      'packed': sides['packed'].compile_s,
    },
    'temp_bytes': {
      'ours': ours.temp_bytes,
      'optax': ref.temp_bytes,
      'packed': sides['packed'].temp_bytes,
    },
    'xla_bytes_accessed': {'ours': ours.xla_bytes, 'optax': ref.xla_bytes},
    'params_bytes': n * itemsize,
    'state_bytes_per_param': {
      'ours': ours.state_bytes / n,
      'optax': ref.state_bytes / n,
    },
  }


def run(
  out,
  *,
  quick,
  tree_names=None,
  variants=None,
  dtypes=None,
  use_torch=True,
  log=print,
) -> dict:
  grid = trees(quick)
  tree_names = tree_names or list(grid)
  variants = variants or (
    ['plain', 'centered+momentum', '8-bit nu'] if quick else list(VARIANTS)
  )
  dtypes = dtypes or list(DTYPES)
  if use_torch:
    try:
      import torch
    except ImportError:
      log('PyTorch is not installed: its column is left out.')
      use_torch = False
    else:
      backend = jax.default_backend()
      if not (
        backend == 'cpu' or (backend == 'gpu' and torch.cuda.is_available())
      ):
        log(f'PyTorch cannot run on this {backend}: its column is left out.')
        use_torch = False
  settings = dict(
    quick=quick,
    repeats=3 if quick else 5,
    target_s=0.01 if quick else 0.1,
    scan_steps=3 if quick else 10,
    use_torch=use_torch,
  )
  rows = []
  for tree_name in tree_names:
    for dtype_name in dtypes:
      for variant in variants:
        if dtype_name != 'float32' and is_low_memory(variant):
          continue  # A narrower nu is for float32 parameters.
        row = measure(
          tree_name,
          grid[tree_name],
          dtype_name,
          variant,
          **{k: v for k, v in settings.items() if k != 'quick'},
        )
        rows.append(row)
        log(
          f'{tree_name:>12} {dtype_name:>8} {variant:>17}: '
          f'{row["speedup_vs_optax"]:.2f}x optax '
          f'(packed {row["packed_speedup_vs_optax"]:.2f}x), '
          f'{100 * row["fraction_of_ceiling"]:.2g}% of ceiling'
          + (
            f'; UNSTABLE timings ({", ".join(row["unstable"])}: repeats '
            f'spread more than {common.UNSTABLE_SPREAD:g}x; is another '
            'process using the CPU?)'
            if row['unstable']
            else ''
          )
        )
  payload = {
    'environment': common.environment(),
    'settings': settings,
    'rows': rows,
  }
  common.write_json(out / 'step.json', payload)
  (out / 'step.md').write_text(markdown(payload))
  plot(rows, out / 'step.png')
  return payload


def markdown(payload) -> str:
  header = [
    'tree',
    'dtype',
    'variant',
    'ours ms',
    'vs optax',
    'vs optax (scan)',
    'packed vs optax',
    'packed (scan)',
    'vs torch',
    'ours GB/s',
    'of ceiling',
    'compile s ours / packed / optax',
    'temp mem / params (packed)',
    'state B/param',
  ]
  rows = []
  for r in payload['rows']:
    mark = lambda *sides, r=r: (
      ' †' if set(sides) & set(r.get('unstable', ())) else ''
    )
    torch = (
      f'{r["speedup_vs_torch"]:.2f}x{mark("ours", "torch")}'
      if r['speedup_vs_torch']
      else 'n/a'
    )
    temp = lambda side, r=r: (
      'n/a'
      if r['temp_bytes'][side] is None
      else f'{r["temp_bytes"][side] / r["params_bytes"]:.1%}'
    )
    compile_s = r['compile_s']
    rows.append(
      [
        r['tree'],
        r['dtype'],
        r['variant'],
        f'{r["step_s"]["ours"] * 1e3:.3g}',
        f'{r["speedup_vs_optax"]:.2f}x{mark("ours", "optax")}',
        f'{r["scan_speedup_vs_optax"]:.2f}x',
        f'{r["packed_speedup_vs_optax"]:.2f}x{mark("packed", "optax")}',
        f'{r["packed_scan_speedup_vs_optax"]:.2f}x',
        torch,
        f'{r["ours_gb_s"]:.3g}',
        _percent(r['fraction_of_ceiling']) + mark('ours', 'ceiling'),
        f'{compile_s["ours"]:.2g} / {compile_s["packed"]:.2g} / '
        f'{compile_s["optax"]:.2g}',
        f'{temp("ours")} ({temp("packed")})',
        f'{r["state_bytes_per_param"]["ours"]:.2f}',
      ]
    )
  return (
    '# Step speed and memory\n\n'
    + common.environment_markdown(payload['environment'])
    + "\nSpeed-ups are optax's (or PyTorch's) median time per step "
    'divided by ours, measured alternately in one process; above 1x '
    'means we are faster. "ours" is the default (optax\'s state '
    'layout); "packed" is `packing=True` (small leaves stacked). "of '
    'ceiling": a donated elementwise kernel moving the same bytes on '
    'flat buffers, divided by our step time.\n\n' + NOISE + ' A † marks '
    "a ratio one of whose sides' repeats spread more than "
    f'{common.UNSTABLE_SPREAD:g}x, or whose PyTorch step took more than '
    f"{TORCH_STALLED}x the ceiling (another process, or PyTorch's "
    "threads against XLA's, took the CPU): do not trust it; rerun on "
    'a quiet machine.\n\n' + common.markdown_table(header, rows)
  )


# What a reader must know before comparing bars: stated in the table's text
# and under the figure's title.
NOISE = (
  "The default compiles optax.rmsprop's own program (centered adds "
  'one select, its clamp at zero, to the same fused kernel), so its '
  "ratio to optax is not the optimizer's: it is this machine's timing "
  "noise and the harness's (two identical optax.rmsprop steps, built "
  'one after the other, time about 10 % apart on 1000 x 1K, the first '
  "built faster: so optax's side and ours are each built twice, in the "
  'order optax, ours, ours, optax, and timed as the geometric mean of '
  'the two). So is an "of ceiling" above 100 %. The bf16 and 8-bit nu '
  "rows compare our narrow state with optax's float32 one."
)


def _percent(fraction: float) -> str:
  return (
    f'{100 * fraction:.0f}%' if fraction >= 0.1 else f'{100 * fraction:.2g}%'
  )


def plot(rows, path):
  """The figure: per tree and variant, the speed-up over optax (without and
  with packing) and the fraction of the same-run bandwidth ceiling. The
  harness's account (why the default's ratio is timing noise) is in the
  results' Markdown, not the figure."""
  plt = common.pyplot()
  dtypes = sorted({r['dtype'] for r in rows}, reverse=True)
  fig, axes = plt.subplots(
    3, len(dtypes), figsize=(7 * len(dtypes), 11.5), squeeze=False
  )
  variants = list(dict.fromkeys(r['variant'] for r in rows))
  tree_names = list(dict.fromkeys(r['tree'] for r in rows))
  # One colour per variant in every figure of this suite (older results
  # may name variants that are no longer run: they come after).
  colors = dict(
    zip(
      list(dict.fromkeys([*VARIANTS, *variants])),
      plt.rcParams['axes.prop_cycle'].by_key()['color'] * 2,
    )
  )
  panels = (
    (
      'speedup_vs_optax',
      'speed-up over optax.rmsprop (x)',
      "as it comes: optax's own program, so 1\nup to timing noise",
      " (narrow nu: their cost against optax's float32 state)",
    ),
    (
      'packed_speedup_vs_optax',
      'speed-up over optax.rmsprop (x)',
      'packing=True, the speed option',
      '',
    ),
    (
      'fraction_of_ceiling',
      'fraction of the same-run ceiling',
      'as it comes, against an elementwise kernel moving the same bytes',
      '',
    ),
  )
  for col, dtype in enumerate(dtypes):
    # No bf16 or 8-bit nu for bfloat16 parameters: only present variants.
    present = [
      v
      for v in variants
      if any(r['dtype'] == dtype and r['variant'] == v for r in rows)
    ]
    width = 0.8 / len(present)
    for i, variant in enumerate(present):
      sel = {
        r['tree']: r
        for r in rows
        if r['dtype'] == dtype and r['variant'] == variant
      }
      x = np.arange(len(tree_names)) + i * width
      for row, (key, *_) in enumerate(panels):
        axes[row, col].bar(
          x,
          [sel[t][key] if t in sel else np.nan for t in tree_names],
          width,
          label=variant,
          color=colors[variant],
        )
    narrow = any(is_low_memory(v) for v in present)
    for row, (_, label, what, narrow_note) in enumerate(panels):
      ax = axes[row, col]
      if narrow:  # The note on the narrow states' bars, where there are.
        what += narrow_note
      ax.axhline(1.0, color='black', lw=0.8)
      ax.set_xticks(np.arange(len(tree_names)) + 0.4 - width / 2, tree_names)
      ax.set(ylabel=label, title=f'{dtype} parameters: {what}')
      ax.title.set_fontsize(10)
      ax.grid(True, axis='y', alpha=0.3)
  handles = [plt.Rectangle((0, 0), 1, 1, color=colors[v]) for v in variants]
  fig.legend(
    handles,
    variants,
    loc='lower center',
    ncols=len(variants),
    bbox_to_anchor=(0.5, 0.0),
    fontsize=9,
    frameon=False,
  )
  common.suptitle(
    fig,
    'One jitted, donated RMSprop step (update + apply_updates), median of '
    'times taken in turns in one process; a black line at 1: as fast',
    fontsize=11,
  )
  fig.tight_layout(rect=(0, 0.03, 1, 0.97))
  fig.savefig(path, dpi=110)
  plt.close(fig)
