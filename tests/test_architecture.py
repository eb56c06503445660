"""The layering of docs/architecture.md, checked from the source: every import (module level or inside a
function) of a library module goes to its own layer or a lower one; nothing in the library imports a 0.1
compatibility path; the compatibility paths still give the modules they name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lowest first; a module belongs to the layer of the longest prefix that names it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mamba_state.errors", "mamba_state._lazy")),
    ("kernels", ("mamba_state.kernels",)),
    ("state", ("mamba_state.state",)),
    ("adapters", ("mamba_state.adapters",)),
    ("generation", ("mamba_state.generation",)),
    ("serving", ("mamba_state.cache", "mamba_state.serve")),
    ("applications", ("mamba_state.trace", "mamba_state.trace_cli", "mamba_state.viz", "mamba_state.cli",
                      "mamba_state._cli_util", "mamba_state.demo", "mamba_state.demo_cli", "mamba_state.__main__",
                      "mamba_state.rl", "mamba_state.serve.cli")),
]
# 0.1 import paths kept as thin re-exports (module -> where it lives now); the library itself never uses them
COMPAT = {
    "mamba_state.io": "mamba_state.state.io",
    "mamba_state.offload": "mamba_state.state.offload",
    "mamba_state.distributed": "mamba_state.state.distributed",
    "mamba_state.interop": "mamba_state.state.interop",
    "mamba_state.layers": "mamba_state.state.layers",
    "mamba_state._packing": "mamba_state.state.packing",
    "mamba_state.backend": "mamba_state.kernels.backend",
    "mamba_state.scan_inputs": "mamba_state.kernels.scan_inputs",
    "mamba_state.scan_positions": "mamba_state.kernels.scan_positions",
    "mamba_state.scan_states": "mamba_state.kernels.selective_scan.all_states",
    "mamba_state.fused_decode": "mamba_state.generation.fused_decode",
    "mamba_state.reference": None,  # gathers the four references from their op folders
    "mamba_state.ssd": None,  # re-exports mamba_state.kernels.ssd
}
# The one import that goes up, with its reason: the LM's generate()/stream() methods (contract names) hand over to
# the generation layer, imported inside the methods when they run.
ALLOWED_UPWARD = {("mamba_state.adapters.lm", "mamba_state.generation")}


def _allowed(module: str, target: str) -> bool:
    return any(module == a and (target == b or target.startswith(b + ".")) for a, b in ALLOWED_UPWARD)


def _layer(module: str) -> int | None:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def _sources() -> list[tuple[str, Path]]:
    out = []
    for root, package in ((REPO / "mamba_state", "mamba_state"), (REPO / "kernels", "mamba_state.kernels")):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [package, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(absolute target module, line) of every import in the file; ``from P import name`` gives ``P.name`` when
    that is a module of ours, else ``P``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if _is_module(sub) else target, node.lineno))
    return [(t, line) for t, line in found if t == "mamba_state" or t.startswith("mamba_state.")]


def _is_module(name: str) -> bool:
    return name in dict(_sources()) or name in COMPAT


def test_every_module_has_a_layer():
    unplaced = [m for m, _ in _sources() if m != "mamba_state" and m not in COMPAT and _layer(m) is None]
    assert not unplaced, f"expected every module in a layer of LAYERS, found unplaced: {unplaced}"


def test_imports_go_down_only():
    sources = _sources()
    bad = []
    for module, path in sources:
        if module == "mamba_state" or module in COMPAT:
            continue  # the package's lazy front and the compatibility paths re-export by design
        own = _layer(module)
        for target, line in _imports(module, path):
            where = f"{path.relative_to(REPO)}:{line}: {module} imports {target}"
            if target in COMPAT:
                bad.append(f"{where} (a 0.1 compatibility path; import {COMPAT[target] or 'its source'})")
                continue
            if target == "mamba_state":  # the package front: only __version__ below the applications
                continue
            theirs = _layer(target)
            assert theirs is not None, f"{where}: expected a module of a layer, found none"
            if theirs > own and not _allowed(module, target):
                bad.append(f"{where} (layer {LAYERS[own][0]} -> {LAYERS[theirs][0]}: upward)")
    assert not bad, "expected imports to go down the layers only, found:\n" + "\n".join(bad)


def test_kernels_import_nothing_of_mamba_state_but_errors():
    """The bottom layer stands alone: an op folder can be read (and vendored) with mamba_state.errors only."""
    bad = []
    for module, path in _sources():
        if not module.startswith("mamba_state.kernels"):
            continue
        for target, line in _imports(module, path):
            if not (target.startswith("mamba_state.kernels") or target == "mamba_state.errors"):
                bad.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert not bad, "expected kernels/ to import only itself and mamba_state.errors, found:\n" + "\n".join(bad)


def test_front_imports_only_version_below_applications():
    bad = []
    apps = len(LAYERS) - 1
    for module, path in _sources():
        if module == "mamba_state" or module in COMPAT or _layer(module) == apps:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                depth = module.count(".") + (1 if path.name == "__init__.py" else 0)
                front = (node.level == 0 and node.module == "mamba_state") or (node.level == depth and not node.module)
                if front and any(a.name != "__version__" for a in node.names):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name == "mamba_state" for a in node.names):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, "expected layers below the applications to take only __version__ from the package, found: " + str(bad)


@pytest.mark.parametrize("old,new", [(o, n) for o, n in COMPAT.items() if n is not None])
def test_compat_paths_give_the_moved_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_compat_aggregates_keep_their_names():
    import mamba_state.reference as ref
    import mamba_state.ssd as ssd
    from mamba_state.kernels.conv1d.naive import causal_conv1d_ref
    from mamba_state.kernels.selective_scan.chunked import selective_scan_chunked
    from mamba_state.kernels.selective_scan.naive import selective_scan_ref
    from mamba_state.kernels.ssd import ssd_scan_chunked, ssd_scan_ref
    from mamba_state.kernels.state_update.naive import selective_state_update_ref

    assert (ref.selective_scan_ref, ref.selective_scan_chunked, ref.causal_conv1d_ref,
            ref.selective_state_update_ref) == (selective_scan_ref, selective_scan_chunked, causal_conv1d_ref,
                                                selective_state_update_ref)
    assert (ssd.ssd_scan_ref, ssd.ssd_scan_chunked) == (ssd_scan_ref, ssd_scan_chunked)


def test_each_op_folder_has_its_naive_reference_and_launcher():
    for op in ("selective_scan", "state_update", "conv1d", "add_norm", "ssd"):
        folder = REPO / "kernels" / op
        assert (folder / "naive.py").is_file(), f"kernels/{op}: expected naive.py (the float64 reference)"
        assert (folder / "launcher.py").is_file() or (folder / "chunked.py").is_file(), f"kernels/{op}"


def _graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports (anywhere in the file), packages' __init__ re-exports excluded as
    targets' parents (``from .state import X`` counts as importing ``mamba_state.state``)."""
    graph: dict[str, set[str]] = {}
    for module, path in _sources():
        if module == "mamba_state" or module in COMPAT:
            continue
        graph[module] = {t for t, _ in _imports(module, path) if t != module and t != "mamba_state"}
    return graph


def test_no_import_cycles_between_modules():
    """No module reaches itself through imports (a package counts as its __init__ module)."""
    graph = _graph()
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, "expected no import cycles, found:\n" + "\n".join(sorted(set(cycles))[:20])
