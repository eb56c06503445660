"""mkdocs hooks: the package layout for the API reference, and a nav that covers every page under docs/.

The repository keeps the Triton kernels in ``kernels/`` and installs them as ``mamba_state.kernels``; mkdocstrings
reads sources statically, so :func:`on_config` assembles ``build/docs_src/mamba_state`` with ``kernels/`` inside
it, as the wheel lays it out (a copy: nothing is imported or executed).

Pages that other work adds (``howto-generation.md``, ``tracing.md``) go into their section when they exist; any
other page that the nav in mkdocs.yml does not list is appended under "More". With ``omitted_files: warn`` and
``strict: true`` a page could otherwise break the docs build just by existing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

# page -> (section title in mkdocs.yml, nav title)
OPTIONAL_PAGES = {
    "howto-generation.md": ("How-tos", "Generate and stream tokens"),
    "tracing.md": ("How-tos", "Trace and visualise states"),
}


@event_priority(100)  # before mkdocstrings reads its `paths`, which must exist by then
def on_config(config: Any) -> Any:
    root = Path(config["config_file_path"]).resolve().parent
    dest = root / "build" / "docs_src" / "mamba_state"
    shutil.rmtree(dest, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "mamba_state", dest, ignore=skip)
    shutil.copytree(root / "kernels", dest / "kernels", ignore=skip)
    return config


def _listed(nav: Any) -> set[str]:
    """Every page path named anywhere in a nav structure."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values())) if nav else set()
    if isinstance(nav, list):
        return set().union(*(_listed(v) for v in nav)) if nav else set()
    return set()


def _section(nav: list, title: str) -> list:
    for entry in nav:
        if isinstance(entry, dict) and title in entry and isinstance(entry[title], list):
            return entry[title]
    section: list = []
    nav.append({title: section})
    return section


def on_files(files: Any, config: Any) -> Any:
    nav = config["nav"]
    listed = _listed(nav)
    pages = sorted(f.src_uri for f in files.documentation_pages())
    for page in pages:
        if page in listed:
            continue
        title, name = OPTIONAL_PAGES.get(page, ("More", page.rsplit("/", 1)[-1].removesuffix(".md")))
        _section(nav, title).append({name: page})
    return files
