"""report.html's per-round chart (fedtune.run.svgchart): valid SVG without matplotlib, one line per series
with a point per finite value, bars for the bytes, and the run's name escaped."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from fedtune.run.svgchart import rounds_svg

NS = "{http://www.w3.org/2000/svg}"
ROUNDS = [
    {"round": 0, "eval_loss": 2.3, "eval_accuracy": 0.1, "bytes_down": 0, "bytes_up": 0},
    {"round": 1, "train_loss": 2.2, "eval_loss": 2.1, "eval_accuracy": 0.3, "bytes_down": 2e6, "bytes_up": 1e6},
    {"round": 2, "train_loss": math.nan, "eval_loss": 1.9, "eval_accuracy": 0.5, "bytes_down": 3e6, "bytes_up": 1e6},
]


def test_the_chart_draws_each_series_and_skips_values_that_are_not_finite() -> None:
    root = ET.fromstring(rounds_svg(ROUNDS, title="run <1> & co"))
    assert root.find(f"{NS}title").text == "run <1> & co"  # escaped in the text, read back as written
    titles = [t.text for t in root.iter(f"{NS}text")]
    assert {"loss", "held-out accuracy", "MB sent per round", "train (clients)", "held-out"} <= set(titles)
    lines = [len(p.get("points").split()) for p in root.iter(f"{NS}polyline")]
    assert lines == [1, 3, 3]  # train loss (its NaN dropped), held-out loss, accuracy
    assert len(list(root.iter(f"{NS}rect"))) == 6  # down and up bars for three rounds
    assert "3" in titles  # the bytes panel's top tick: 3 MB


def test_perplexity_when_no_accuracy_and_an_empty_history() -> None:
    rounds = [{"round": 1, "eval_loss": 3.0, "eval_perplexity": 20.0}]
    root = ET.fromstring(rounds_svg(rounds, title="lm"))
    assert "held-out perplexity" in [t.text for t in root.iter(f"{NS}text")]
    ET.fromstring(rounds_svg([], title="empty"))  # still one valid element
