"""The code on the documentation pages runs, so the pages never drift from the library.

Every fenced block opened with exactly ```` ```python ```` on the pages listed below is executed, in page order, in
one namespace per page, with the working directory in ``tmp_path`` (files the snippets write land there). Blocks
fenced as ```` ```py ```` are shown but not executed (GPU-only code, several processes, upstream-only calls).
Snippets assert their own results.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pages whose ```python blocks run on a CPU machine without a GPU or a network
EXECUTED_PAGES = [
    "README.md",
    "docs/guide.md",
    "docs/howto-notebook.md",
    "docs/howto-streaming.md",
    "docs/howto-branching.md",
    "docs/howto-resets.md",
    "docs/howto-devices.md",
    "docs/persistence.md",
    "docs/tracing.md",
    "docs/howto-serving.md",
    "docs/varlen.md",
]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


def test_fence_parser():
    text = "a\n```python\nx = 1\n```\n```py\nnot run\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x + 1\n"]


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_snippets_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = ROOT / page
    if not path.exists():
        pytest.fail(f"{page}: expected the page to exist, found none")
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    assert blocks, f"{page}: expected at least one ```python block, found none"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_snippet_{path.stem}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as exc:  # name the page and block; the traceback points into the snippet
            raise AssertionError(f"{page}, python block {i} failed: {type(exc).__name__}: {exc}\n{block}") from exc
