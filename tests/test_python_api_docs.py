"""docs/PYTHON_API.md's examples run as written: every ```python block, in order, in one namespace.

Blocks that load a Hugging Face model (``load_causal_lm``) are self-contained and run in the slow suite;
the rest run by default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "PYTHON_API.md"
HEAVY = "load_causal_lm"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def _run(blocks: list[str], where: Path) -> None:
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        try:
            exec(compile(block, DOC.name, "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"a {DOC.name} python block failed: {err!r}\n{block}") from err
    assert (where / "runs").is_dir()


def test_the_doc_has_examples() -> None:
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 7 and sum(HEAVY in b for b in blocks) == 2


def test_python_api_doc_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write runs/ into the working directory
    _run([b for b in python_blocks(DOC.read_text()) if HEAVY not in b], tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_python_api_doc_hugging_face_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for block in python_blocks(DOC.read_text()):
        if HEAVY in block:
            _run([block], tmp_path)
