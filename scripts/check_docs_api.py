"""Check that the built API reference documents every public name.

Usage: ``python scripts/check_docs_api.py [SITE_DIR]`` after ``mkdocs build`` (SITE_DIR defaults to
``build/site``). For each public module below, every name in its ``__all__`` must have an anchor
``id="<module>.<name>"`` on its reference page (mkdocstrings writes one per documented object). Exits 1 and lists
what is missing otherwise, so a name exported without documentation fails CI.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# module -> reference page (relative to the site directory)
PAGES = {
    "mamba_state": "reference/mamba_state/index.html",
    "mamba_state.kernels": "reference/kernels/index.html",
    "mamba_state.state.distributed": "reference/distributed/index.html",
    "mamba_state.state.offload": "reference/distributed/index.html",
    "mamba_state.rl": "reference/rl/index.html",
    "mamba_state.cache": "reference/serving/index.html",
    "mamba_state.serve": "reference/serving/index.html",
    "mamba_state.kernels.selective_scan.naive": "reference/scans/index.html",
    "mamba_state.kernels.selective_scan.chunked": "reference/scans/index.html",
    "mamba_state.kernels.conv1d.naive": "reference/scans/index.html",
    "mamba_state.kernels.state_update.naive": "reference/scans/index.html",
    "mamba_state.kernels.ssd.naive": "reference/scans/index.html",
    "mamba_state.kernels.ssd.chunked": "reference/scans/index.html",
    "mamba_state.state.io": "reference/scans/index.html",
}
# plain values documented in the page text rather than as objects
EXEMPT = {"__version__"}


def missing_names(site: Path) -> list[str]:
    missing = []
    for module_name, page in PAGES.items():
        html_path = site / page
        html = html_path.read_text(encoding="utf-8") if html_path.exists() else ""
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            if name not in EXEMPT and f'id="{module_name}.{name}"' not in html:
                missing.append(f"{module_name}.{name} (expected on {page})")
    return missing


def main(argv: list[str]) -> int:
    site = Path(argv[1] if len(argv) > 1 else "build/site")
    missing = missing_names(site)
    for item in missing:
        print(f"check_docs_api: undocumented public name {item}")
    total = sum(len(getattr(importlib.import_module(m), "__all__", [])) for m in PAGES)
    print(f"check_docs_api: {total - len(missing)} of {total} public names documented")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
