"""docs/PYTHON_API.md's examples run as written: every ```python block, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "PYTHON_API.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_doc_has_examples() -> None:
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 5 and all("fedtune" in b or "Net" in b or "config" in b for b in blocks)


@pytest.mark.timeout(300)
def test_python_api_doc_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write runs/ into the working directory
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(DOC.read_text())):
        try:
            exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"{DOC.name} python block {i + 1} failed: {err!r}\n{block}") from err
    assert (tmp_path / "runs").is_dir()
