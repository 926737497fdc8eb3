"""report.html: one self-contained page written at the end of every run (finished, stopped, failed or
interrupted): the per-round plots as inline SVG, the round table, the per-client table, privacy figures,
failures and the resolved config. No scripts and nothing fetched: it opens anywhere, offline, and can be
mailed or archived as one file.
"""

from __future__ import annotations

import datetime
import html
import os
from collections.abc import Callable
from pathlib import Path

from fedtune.config.load import dump_config
from fedtune.config.schema import Config
from fedtune.run import rundir
from fedtune.run.runview import RunView
from fedtune.run.sinks import BaseSink, RunEnd, RunInfo
from fedtune.run.svgchart import rounds_svg

REPORT = "report.html"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}td,th{padding:2px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#fafafa}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}.bad{color:#b00}.muted{color:#777}
svg{max-width:100%;height:auto}
"""


def _fmt(value: object, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


Column = tuple[str, Callable[[dict], object]]  # a header and how to read its cell from a record


def _get(key: str, default: object = None) -> Callable[[dict], object]:
    return lambda record: record.get(key, default)


def _mb(key: str) -> Callable[[dict], object]:
    return lambda record: record.get(key, 0) / 1e6


def _column_table(columns: list[Column], records: list[dict]) -> str:
    return _table([h for h, _ in columns], [[cell(r) for _, cell in columns] for r in records])


def render_report(run_dir: Path, config: Config | None = None) -> str:
    snap = RunView(run_dir).snapshot()
    status, rounds, clients = snap["status"], snap["rounds"], snap["clients"]
    accuracy = bool(status.get("accuracy"))
    quality = "eval_accuracy" if accuracy else "eval_perplexity"
    title = html.escape(snap["name"])
    parts = [f"<h1>fedtune run {title}</h1>"]
    state = status.get("state", "unknown")
    total = status.get("total_rounds")
    parts.append(
        f"<p>{html.escape(str(run_dir))}<br>{status.get('round', 0)} of {total if total else '?'} rounds; "
        f"<b class='{'' if state in ('finished', 'stopped') else 'bad'}'>{html.escape(state)}</b>"
        + (f": {html.escape(status['reason'])}" if status.get("reason") else "")
        + f"<br><span class='muted'>written {datetime.datetime.now().isoformat(timespec='seconds')}</span></p>"
    )
    if rounds:
        parts += ["<h2>Rounds</h2>", rounds_svg(rounds, title=snap["name"])]
        columns = [
            ("round", _get("round")), ("clients ok", _get("clients_ok")), ("sampled", _get("clients_sampled")),
            ("train loss", _get("train_loss")), ("held-out loss", _get("eval_loss")),
            (quality.removeprefix("eval_"), _get(quality)), ("MB down", _mb("bytes_down")),
            ("MB up", _mb("bytes_up")), ("seconds", _get("seconds")),
        ] + ([("epsilon", _get("agg_epsilon"))] if snap["privacy"]["dp"] else [])  # fmt: skip
        parts.append(_column_table(columns, rounds))
    if clients:
        parts.append("<h2>Clients</h2>")
        q = "eval_accuracy" if accuracy else "eval_perplexity"
        columns = [
            ("client", _get("client_id")),
            ("state", lambda c: c["state"] + (f" ({c['reason']})" if c.get("reason") else "")),
            ("rounds", _get("rounds")), ("examples", _get("num_examples")), ("train loss", _get("train_loss")),
            ("held-out loss", _get("eval_loss")), (q.removeprefix("eval_"), _get(q)), ("MB down", _mb("bytes_down")),
            ("MB up", _mb("bytes_up")), ("fit seconds", _get("fit_seconds")),
            ("examples/s", _get("examples_per_s")), ("failures", _get("failures", 0)),
        ]  # fmt: skip
        parts.append(_column_table(columns, clients))
    priv = snap["privacy"]
    parts.append("<h2>Privacy</h2>")
    if priv["dp"] or priv["client_epsilon_max"] is not None:
        parts.append(
            _table(
                ["figure", "value"],
                [
                    ["epsilon spent (server DP)", priv["epsilon"]],
                    ["delta", priv["delta"]],
                    ["epsilon budget", priv["epsilon_budget"]],
                    ["largest client epsilon (local DP-SGD)", priv["client_epsilon_max"]],
                ],
            )
        )
    else:
        parts.append("<p>No differential privacy in this run (privacy.dp is not set).</p>")
    if snap["failures"] or snap["stops"]:
        parts.append("<h2>Failures and stops</h2>")
        rows = [[f["round"], f["client_id"], f["reason"]] for f in snap["failures"]]
        rows += [[s["round"], "(run)", f"stopped: {s['reason']}"] for s in snap["stops"]]
        parts.append(_table(["round", "client", "reason"], rows))
    config_text = dump_config(config) if config is not None else _read(Path(run_dir) / rundir.CONFIG)
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>fedtune {title}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return "(no config.yaml)"


def write_report(run_dir: Path, config: Config | None = None) -> Path:
    out = Path(run_dir) / REPORT
    tmp = out.with_name(f".{REPORT}.{os.getpid()}.tmp")
    tmp.write_text(render_report(run_dir, config))
    os.replace(tmp, out)
    return out


class ReportSink(BaseSink):
    """Writes report.html when the run ends, however it ends (status.json is final by then)."""

    def __init__(self, metrics: rundir.MetricsLog) -> None:
        self.run_dir = metrics.path.parent
        self.config: Config | None = None

    def on_start(self, run: RunInfo) -> None:
        self.config = run.config

    def close(self, end: RunEnd) -> None:
        write_report(self.run_dir, self.config)
