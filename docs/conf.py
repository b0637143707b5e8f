"""Sphinx configuration of the inflate documentation.

Build (warnings are errors, as in tests/test_docs.py)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -W -b doctest docs docs/_build/doctest

The build works offline. Links to the Python, PyTorch and Hypothesis docs
(intersphinx) need their ``objects.inv`` inventories: a file
``docs/_inventories/<name>.inv`` is used when present, and
``INFLATE_DOCS_INTERSPHINX=online`` downloads them instead. Without either, those
names are shown as plain text; nothing fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import inflate
except ImportError:  # building from a clone without installing the package
    sys.path.insert(0, str(HERE.parent / "src"))
    import inflate

project = "inflate"
author = "the inflate developers"
copyright = "the inflate developers"  # noqa: A001 - Sphinx's name for it
release = version = inflate.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "_inventories", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# -- autodoc + napoleon (Google-style docstrings) --------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_type_aliases = {"Init": "inflate.rules.Init"}
autodoc_inherit_docstrings = False  # nn.Module's own docstrings are not ours to render
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False

# -- intersphinx: local inventories only, unless asked to go online --------------
intersphinx_timeout = 10
_INVENTORIES = {
    "python": "https://docs.python.org/3",
    "torch": "https://docs.pytorch.org/docs/stable",
    "hypothesis": "https://hypothesis.readthedocs.io/en/latest",
}
_ONLINE = os.environ.get("INFLATE_DOCS_INTERSPHINX", "").lower() == "online"


def _mapping() -> dict[str, tuple[str, str | None]]:
    mapping: dict[str, tuple[str, str | None]] = {}
    for name, url in _INVENTORIES.items():
        local = HERE / "_inventories" / f"{name}.inv"
        if local.is_file():
            mapping[name] = (url, str(local))
        elif _ONLINE:
            mapping[name] = (url, None)
    return mapping


intersphinx_mapping = _mapping()

# -- doctest ---------------------------------------------------------------------
# The builder runs the ``.. doctest::`` blocks of these pages. The ``>>>`` examples in
# docstrings (rendered on the API page) run under ``pytest --doctest-modules`` with
# their module's namespace, so they are not run a second time here.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
"""

# -- HTML ------------------------------------------------------------------------
html_theme = "furo"
html_title = f"inflate {release}"
html_theme_options = {"navigation_with_keys": True}
