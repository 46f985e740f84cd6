"""The documentation site builds, warning-free, and documents every public
name; its pages hold what a reader needs (maths, figures, tables)."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from conftest import require

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Every public module and what it must document (its __all__, or the
# functions and classes defined in it that do not start with '_').
MODULES = [
  'rmsprop_jax',
  'rmsprop_jax.presets',
  'rmsprop_jax.diagnostics',
  'rmsprop_jax.sharding',
  'rmsprop_jax.packing',
  'rmsprop_jax.quantization',
  'rmsprop_jax.porting',
]


def _public_names(module_name):
  import inspect

  module = importlib.import_module(module_name)
  names = getattr(module, '__all__', None)
  if names is None:
    names = [
      n
      for n, o in vars(module).items()
      if not n.startswith('_')
      and (inspect.isfunction(o) or inspect.isclass(o))
      and o.__module__ == module_name
    ]
  return [
    f'{module_name}.{n}'
    for n in names
    if not inspect.ismodule(getattr(module, n))
  ]


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  """The site, built as the README says: sphinx-build -W (warnings are
  errors) over docs/."""
  require('sphinx')
  require('myst_parser')
  require('sphinx_book_theme')
  require('sphinx-mathjax-offline')  # (its import name has hyphens)
  out = tmp_path_factory.mktemp('site')
  result = subprocess.run(
    [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
     'html', str(ROOT / 'docs'), str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  return out


def test_every_public_name_has_an_api_entry(site):
  from sphinx.util.inventory import InventoryFile

  with open(site / 'objects.inv', 'rb') as f:
    inventory = InventoryFile.load(f, '', lambda *parts: '/'.join(parts))
  documented = {
    name
    for kind, entries in inventory.items()
    if kind.startswith('py:')
    for name in entries
  }

  def where_defined(name):
    module, _, attr = name.rpartition('.')
    obj = getattr(importlib.import_module(module), attr)
    return f'{obj.__module__}.{obj.__qualname__}'

  # A name re-exported at the top level (rmsprop_jax.pack_state) is
  # documented once, where it is defined (rmsprop_jax.packing.pack_state).
  missing = [
    name
    for module in MODULES
    for name in _public_names(module)
    if name not in documented and where_defined(name) not in documented
  ]
  assert not missing, f'not in the API reference: {missing}'


def test_pages_render_maths_figures_and_tables(site):
  api = (site / 'api' / 'rmsprop_jax.html').read_text()
  # Maths is served with the pages, so it renders without network.
  assert 'class="math' in api and '_static/mathjax/tex-chtml.js' in api
  assert (site / '_static' / 'mathjax' / 'tex-chtml.js').exists()
  import re

  text = lambda page: re.sub(r'<[^>]+>', '', (site / page).read_text())
  gallery = text('examples.html')
  figures = sorted(p.name for p in (ROOT / 'examples' / 'figures').iterdir())
  shown = {p.name for p in (site / '_images').iterdir()}
  for name in figures:
    assert name in shown, f'{name} is not on any page'
  examples = sorted(
    p.name
    for p in (ROOT / 'examples').glob('*.py')
    if not p.name.startswith('_')
  )
  for name in examples:
    assert f'python examples/{name}' in gallery, f'{name} not in the gallery'
  assert '<table' in (site / 'guides' / 'conventions.html').read_text()
  assert 'step.png' in (site / 'benchmarks.html').read_text()


def test_every_example_has_its_figure_committed():
  figures = {p.stem for p in (ROOT / 'examples' / 'figures').glob('*.png')}
  for script in (ROOT / 'examples').glob('*.py'):
    if not script.name.startswith('_'):
      assert script.stem in figures, f'{script.name}: no committed figure'


def test_the_readme_gives_the_docs_build_command():
  readme = (ROOT / 'README.md').read_text()
  assert 'pip install -e ".[docs]"' in readme
  assert 'sphinx-build -W' in readme


# Pages whose Python blocks are whole programs (the others show pieces of a
# training script, with the user's model and optimizer in them).
RUNNABLE = [
  'README.md',
  'docs/getting_started.md',
  'docs/guides/dtypes.md',
  'docs/guides/low_memory.md',
]


@pytest.mark.parametrize('page', RUNNABLE)
def test_the_code_on_the_page_runs(page):
  import re

  blocks = re.findall(
    r'```python\n(.*?)```', (ROOT / page).read_text(), flags=re.S
  )
  assert blocks
  for block in blocks:
    exec(compile(block, page, 'exec'), {})


def test_every_relative_link_and_image_resolves():
  """The README is not part of the Sphinx build, and GitHub shows the
  Markdown sources as they are: every relative link and image in them must
  point at a file that exists."""
  import re

  pages = [ROOT / 'README.md', ROOT / 'CHANGELOG.md']
  pages += [p for p in (ROOT / 'docs').rglob('*.md') if '_build' not in p.parts]
  targets = re.compile(r'\]\(([^)\s]+)\)|<img src="([^"]+)"')
  broken = []
  for page in pages:
    for match in targets.finditer(page.read_text()):
      target = (match.group(1) or match.group(2)).split('#')[0]
      if not target or re.match(r'[a-z]+:', target):
        continue  # An anchor on the same page, or a URL.
      if not (page.parent / target).exists():
        broken.append(f'{page.relative_to(ROOT)}: {target}')
  assert not broken, broken
