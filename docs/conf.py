"""Sphinx configuration of the nemo_xtoken documentation (MyST Markdown pages + API reference).

Build: ``make docs`` (HTML in ``docs/_build/html``); ``make test`` builds it with warnings as
errors (``tests/test_docs.py``).  Every ``docs/*.md`` page is picked up by the glob toctree of
``index.md``; sub-folders of ``docs/`` hold a page's assets (figures, generated tables, linked
from the page, not in the table of contents), except ``api/`` (written by autosummary at build
time, not committed).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # document the checkout, not whatever else is installed

import nemo_xtoken  # noqa: E402
from nemo_xtoken.cpu import bridge_te_shim  # noqa: E402

# nemo_xtoken.integration.phi3_bridge imports Megatron-Bridge at module level, and ``import
# megatron.bridge`` fails without transformer_engine at one unguarded line (HOST_NOTES, "CPU").  The
# same scoped import hook the test-suite and `xtoken check-model` use replaces that one line while the
# docs are built (no fake transformer_engine package; a no-op where transformer_engine is installed).
bridge_te_shim.install()

project = "nemo_xtoken"
author = "nemo_xtoken contributors"
copyright = "2026, nemo_xtoken contributors"
release = version = nemo_xtoken.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
templates_path = ["_templates"]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# Sub-folders hold a page's assets (e.g. docs/demo/: the demo's plot and its generated results.md).
# Markdown files there are built, so that a page can link them, but they are not in the table of
# contents (which globs the top-level pages only): that one warning is silenced, nothing else.
suppress_warnings = ["toc.not_included"]

# MyST: ``$…$`` maths, ``:::`` fences, definition lists; heading anchors so that
# ``[text](page.md#a-heading)`` links resolve.
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "attrs_inline"]
myst_heading_anchors = 3

# API reference: autosummary writes one page per module into docs/api/ at build time.
autosummary_generate = True
autosummary_ignore_module_all = True  # list every submodule of a package (their __all__ names re-exports only)
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Megatron-Bridge, NeMo-Run and Megatron-core are imported lazily (inside functions), so every
# module imports without them; ModelOpt is imported at import time by integration.distill (a base
# class).  Mock only what is not installed (an environment with just the ``docs`` extra).  Never
# transformer_engine: a fake one fools the guarded ``try: import transformer_engine`` of
# Megatron-core and ModelOpt into loading their TE plugins.
autodoc_mock_imports = [m for m in ("modelopt", "nemo_run", "megatron") if importlib.util.find_spec(m) is None]

html_theme = "alabaster"
html_title = "nemo_xtoken"
html_theme_options = {"description": "Cross-tokenizer knowledge distillation (X-Token) for Megatron", "fixed_sidebar": True}
html_static_path: list[str] = []
