"""Sphinx configuration: the rmsprop_jax documentation site.

Build with ``sphinx-build -W -b html docs docs/_build/html`` after
``pip install -e ".[docs]"``; warnings are errors.
"""

import rmsprop_jax

project = 'rmsprop_jax'
author = 'The rmsprop_jax authors'
copyright = '2026, the rmsprop_jax authors'
release = rmsprop_jax.__version__
version = release

extensions = [
  'myst_parser',  # Markdown guides, as optax and Flax write theirs.
  'sphinx.ext.autodoc',  # The API reference, from the docstrings.
  'sphinx.ext.napoleon',  # Google-style Args:/Returns:/Raises:/Examples:.
  'sphinx.ext.mathjax',
  'sphinx-mathjax-offline',  # MathJax served with the pages, no CDN.
  'sphinx.ext.viewcode',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
exclude_patterns = ['_build']
# The pages are also read as plain Markdown (on GitHub): links, not roles,
# and HTML images.
myst_enable_extensions = ['dollarmath', 'amsmath', 'html_image']
myst_heading_anchors = 3

# The API reference: signatures as written, one page per module.
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
autodoc_default_options = {'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Every cross-reference must resolve (-n with -W): a misspelt :func: fails
# the build. Names from other libraries (jax, numpy, optax) are not in this
# site's index, and the tree aliases are documented in prose.
nitpicky = True
nitpick_ignore_regex = [
  ('py:class', r'(jax|jaxlib|numpy|optax|flax)\..*'),
  # MaskOrFn is weight_decay_mask's type, described there; _Slot is private.
  ('py:class', r'(ArrayTree|MaskOrFn|_Slot|ParamMap)'),
]
# Signatures show the annotations as written, not their expansions
# (jax.typing.ArrayLike is a union of eight types).
autodoc_type_aliases = {
  name: name
  for name in (
    'jax.typing.ArrayLike',
    'optax.ScalarOrSchedule',
    'optax.Schedule',
    'optax.Updates',
    'optax.Params',
    'optax.GradientTransformation',
    'optax.GradientTransformationExtraArgs',
    'ParamMap',
    'MaskOrFn',
  )
}

html_theme = 'sphinx_book_theme'
html_title = f'rmsprop_jax {release}'
html_theme_options = {
  'show_toc_level': 2,
  'navigation_with_keys': False,
  'use_download_button': False,
}
html_static_path = ['_static']
html_css_files = ['custom.css']

# Long signatures (rmsprop has 22 arguments) one argument per line.
maximum_signature_line_length = 80


def _plain_aliases(app, what, name, obj, options, signature, annotation):
  """Sphinx writes ``X | None`` of an alias above as
  ``TypeAliasForwardRef('X') | None``; show it as written."""
  import re

  plain = lambda s: s and re.sub(r"TypeAliasForwardRef\('([^']*)'\)", r'\1', s)
  return plain(signature), plain(annotation)


def setup(app):
  app.connect('autodoc-process-signature', _plain_aliases)
