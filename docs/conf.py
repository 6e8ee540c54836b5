"""Sphinx configuration of djasync's documentation (MyST Markdown, the furo theme).

Build it with ``make docs`` (warnings are errors). autodoc imports djasync, so Django is set up
first with the small settings module next to this file: no database is needed to build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import django

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS)]
os.environ["DJANGO_SETTINGS_MODULE"] = "django_settings"
django.setup()

import djasync  # noqa: E402

project = "djasync"
author = "djasync contributors"
copyright = "djasync contributors"
release = djasync.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx_click",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
# "#transactions"-style links inside a page, and "page.md#section" across pages.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {
    "members": True,
    # Django adds these to every model; they are Django's to document.
    "exclude-members": ", ".join(
        ["DoesNotExist", "MultipleObjectsReturned", "NotUpdated", "do_not_call_in_templates"]
    ),
}
# The build needs no network (no intersphinx): types that autodoc names but these pages do not
# document (builtins, Django's, psycopg's, typing aliases) are not links.
nitpick_ignore_regex = [
    (r"py:.*", r"(django|psycopg|click|collections\.abc|typing)\..*"),
    (r"py:.*", r"djasync\.attempts\.Finished"),
    (r"py:.*", r"(Function|Any|QuerySet|Job|Group|_T|datetime\..*)"),
]

html_theme = "furo"
html_title = f"djasync {release}"
html_static_path: list[str] = []
