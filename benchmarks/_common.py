"""Helpers shared by the benchmark scripts: timing, peak memory of a child process, writing a docs section."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"


def run_child(args: list[str]) -> dict:
    """Run ``python <args>`` in a fresh process; it prints one JSON line last. Adds its peak RSS in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all children so far; each child here is measured in-process too
    result.setdefault("peak_rss_mb", max(after, before) / 1024)
    return result


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of docs/BENCHMARKS.md, leaving other sections alone."""
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    BENCHMARKS_MD.write_text(text)


def write_bytes_section(title: str, command: str, doc: str | None, table: str, load: list[float]) -> None:
    """``write_section`` for a table of bytes: the command, the script's docstring's second paragraph (what it
    measures), the table and when it was measured (bytes do not depend on load, which is stated anyway)."""
    intro = (doc or "").split("\n\n")[1]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = (
        f"Command: `{command}`.\n\n{intro}\n\n{table}\n\n"
        f"Measured {stamp} (bytes do not depend on load; load average {min(load):.1f}-{max(load):.1f})."
    )
    write_section(title, body)
