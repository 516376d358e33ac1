"""Sphinx configuration of the kltune documentation.

Build (the same commands as ``nox -s docs``; warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest

Math is rendered by MathJax, loaded from its CDN by the reader's browser. To
preview the pages offline, point ``KLTUNE_DOCS_MATHJAX`` at a local copy of
MathJax 3 (e.g. ``npm pack mathjax@3`` unpacked somewhere) before building::

    KLTUNE_DOCS_MATHJAX=file:///tmp/mathjax/package/es5/tex-chtml.js sphinx-build ...
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))
# The docs document the installed package, but also build from a plain checkout.
sys.path.insert(0, str(HERE.parent / "src"))

import kltune  # noqa: E402

project = "kltune"
author = "the kltune authors"
copyright = "2026, the kltune authors"
version = release = kltune.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "kltune_api",  # docs/_ext/kltune_api.py: API completeness check, kltune.X links
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
# Straight quotes everywhere: a docstring's 'B T' shape string must read as typed.
smartquotes = False

# ── autodoc and napoleon ────────────────────────────────────────────────────
# Type hints go into the parameter descriptions, where jaxtyping annotations
# such as Float[Tensor, 'B T'] read as they are written in the source.
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True  # train(sampling=Sampling()), not its long repr
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = True
napoleon_attr_annotations = True
# Not nitpicky: jaxtyping's Float[Tensor, "B T"] and third-party types
# (torch, transformers) have no target here, and no inventory is fetched.
nitpicky = False

# ── intersphinx: no network on the build machines, so no remote inventory ──
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
intersphinx_disabled_reftypes = ["*"]

# ── doctest ─────────────────────────────────────────────────────────────────
# The pages' own examples run here; docstring examples are run by pytest
# (--doctest-modules), so plain >>> blocks pulled in by autodoc are not re-run.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import torch
torch.set_num_threads(1)
"""
import doctest as _doctest  # noqa: E402

doctest_default_flags = (
    _doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE | _doctest.DONT_ACCEPT_TRUE_FOR_1
)

# ── math ────────────────────────────────────────────────────────────────────
if os.environ.get("KLTUNE_DOCS_MATHJAX"):
    mathjax_path = os.environ["KLTUNE_DOCS_MATHJAX"]

# ── HTML ────────────────────────────────────────────────────────────────────
html_theme = "furo"
html_title = f"kltune {release}"
html_static_path = ["_static"]
html_css_files = ["kltune.css"]
html_theme_options = {"navigation_with_keys": True}
html_show_sourcelink = False
pygments_style = "friendly"
pygments_dark_style = "monokai"
