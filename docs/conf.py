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
myst_enable_extensions = ['dollarmath', 'amsmath']
myst_heading_anchors = 3

# The API reference: signatures as written, one page per module.
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
autodoc_default_options = {'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

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
