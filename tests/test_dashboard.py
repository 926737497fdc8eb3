"""The dashboard's server (token, read-only, headers), the run view it serves, status.json and report.html of a
real tiny run."""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from rich.console import Console

from _models import DIGITS_CNN
from _runs import CLIENTS, FakeRun
from fedtune.config.load import parse_config
from fedtune.dashboard.server import Dashboard
from fedtune.run.board import STATUS, ClientBoard, StatusSink, failure_state
from fedtune.run.report import REPORT
from fedtune.run.rundir import METRICS
from fedtune.run.runview import RunView
from fedtune.run.session import simulate


def get(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def served(tmp_path):
    run = FakeRun(tmp_path / "run")
    run.add_round()
    dash = Dashboard(run.dir, port=0)
    dash.start()
    yield run, dash
    dash.stop()


def test_nothing_of_the_run_without_the_token(served) -> None:
    _, dash = served
    base = f"http://127.0.0.1:{dash.port}"
    assert dash.host == "127.0.0.1" and dash.token and len(dash.token) >= 32
    for path in ("/", "/api/run"):
        assert get(base + path)[0] == 401
        assert get(base + path, {"Authorization": "Bearer " + dash.token[:-1] + "x"})[0] == 401
        assert get(base + path + "?token=wrong")[0] == 401
    status, headers, body = get(base + "/api/run", {"Authorization": "Bearer " + dash.token})
    assert status == 200 and json.loads(body)["rounds"][0]["round"] == 1
    assert "default-src 'none'" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"
    status, _, page = get(dash.url)  # the printed URL: token as a query parameter
    assert status == 200 and b'<script src="app.js">' in page
    assert get(base + "/app.js")[0] == 200 and get(base + "/style.css")[0] == 200  # nothing of the run in them


def test_read_only(served) -> None:
    _, dash = served
    for method in ("POST", "PUT", "DELETE"):
        assert get(dash.url, method=method)[0] == 405
    assert get(f"http://127.0.0.1:{dash.port}/../config.yaml?token={dash.token}")[0] == 404


def test_run_view_reads_appended_rounds_and_a_truncated_log_again(tmp_path) -> None:
    run = FakeRun(tmp_path / "run")
    view = RunView(run.dir)
    assert view.snapshot()["rounds"] == []
    run.add_round()
    run.add_round()
    snap = view.snapshot()
    assert [r["round"] for r in snap["rounds"]] == [1, 2]
    rows = {c["client_id"]: c for c in snap["clients"]}
    assert set(rows) == set(CLIENTS)
    assert rows["alice"]["rounds"] == 2 and rows["alice"]["bytes_up"] == 1000 and rows["alice"]["eval_accuracy"] == 0.4
    assert rows["bob"]["fit_seconds"] == 1.5 and rows["bob"]["num_examples"] == 20
    assert rows["carol"]["state"] == "offline"  # straggled, then not connected (only alice and bob are)
    assert snap["failures"][-1]["client_id"] == "carol" and snap["status"]["refused"][0]["who"] == "mallory"
    with open(run.dir / METRICS, "a") as fh:  # a line being written: not read until it is complete
        fh.write('{"kind": "round", "round": 3')
    assert [r["round"] for r in view.snapshot()["rounds"]] == [1, 2]
    lines = (run.dir / METRICS).read_text().splitlines()[:5]  # resume truncated the log to round 1
    (run.dir / METRICS).write_text("\n".join(lines) + "\n")
    assert [r["round"] for r in view.snapshot()["rounds"]] == [1]


def test_failure_reasons_map_to_states() -> None:
    assert failure_state("straggler: no training reply within 5s; dropped from round 2") == "straggling"
    assert failure_state("no heartbeat for 31.0s (presumed dead)") == "dead"
    assert failure_state("rejected: spec digest 1 does not match the server's 2") == "refused"
    assert failure_state("RuntimeError: out of memory") == "failed"


def test_the_status_sink_marks_clients_as_the_loop_instructs_them_and_they_reply() -> None:
    from fedtune.core.events import observed
    from fedtune.core.messages import ClientEval, ClientFailure
    from fedtune.tasks.base import EvalSums

    board = ClientBoard()
    sink = StatusSink(board)
    seen = []

    def fit():
        seen.append(board.snapshot())  # while the clients train
        yield ClientFailure("b", 1, "no heartbeat for 9s (presumed dead)")

    list(observed(sink.on_event, "train", 1, ["a", "b"], fit()))
    assert {c: s["state"] for c, s in seen[0].items()} == {"a": "training", "b": "training"}
    after = board.snapshot()
    assert after["a"]["state"] == "training" and after["b"]["state"] == "dead"
    assert after["b"]["reason"] == "no heartbeat for 9s (presumed dead)"
    list(observed(sink.on_event, "eval", 1, ["a"], iter([ClientEval("a", 1, EvalSums())])))
    assert board.snapshot()["a"]["state"] == "idle" and board.snapshot()["a"]["round"] == 1


def digits_run(tmp_path: Path, name: str, *, clients: int, rounds: int):
    """A real tiny simulation (digits CNN, 2 clients a round, 2 local steps each) in ``tmp_path/runs/name``."""
    cfg = {
        "seed": 5,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": clients}},
        "federation": {"rounds": rounds, "clients_per_round": 2},
        "client": {"local_steps": 2, "batch_size": 16, "lr": 0.1, "optimizer": "sgd"},
        "run": {"out_dir": str(tmp_path / "runs"), "name": name, "plot": False},
    }
    return simulate(parse_config(cfg), console=Console(file=io.StringIO()), show_progress=False)


def test_a_run_writes_status_json_and_a_self_contained_report(tmp_path) -> None:
    result = digits_run(tmp_path, "reported", clients=3, rounds=2)
    status = json.loads((result.run_dir / STATUS).read_text())
    assert status["state"] == "finished" and status["round"] == 2 and status["total_rounds"] == 2
    assert sorted(status["connected"]) == sorted(status["enrolled"]) == ["client_000", "client_001", "client_002"]
    trained = {r["client_id"] for r in json_lines(result.run_dir) if r["kind"] == "client"}
    assert all(status["clients"][c]["state"] == "idle" for c in trained)
    html = (result.run_dir / REPORT).read_text()
    assert "<svg" in html and "<script" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//|url\((?!#)""", html)  # nothing fetched from anywhere
    final = result.rounds[-1]
    assert f"{final['eval_accuracy']:.4g}" in html  # the round table
    for cid in trained:
        assert f"<td>{cid}</td>" in html  # the client table
    assert "federation:" in html and "rounds: 2" in html  # the config
    assert "No differential privacy" in html


def json_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def test_a_deployment_status_shows_connected_enrolled_and_refused_clients(tmp_path) -> None:
    """The gRPC server's registry feeds status.json: who joined, who is enrolled, who was refused and why."""
    import grpc

    from _grpc_support import RawClient, make_pki
    from fedtune.config.deployment import DeploymentConfig
    from fedtune.deploy.serve import GrpcDirectory
    from fedtune.run.board import StatusSink
    from fedtune.run.sinks import RunEnd, RunInfo
    from fedtune.transport.grpc.server import GrpcServerTransport, ServerTLS

    pki = make_pki(tmp_path)
    allowed = ["client_000", "client_001", "revoked"]
    dep = DeploymentConfig(
        port=0,
        tls_ca=str(pki / "ca.pem"),
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        revocation_list=str(pki / "revoked.txt"),
        allowed_clients=allowed,
        min_clients=1,
    )
    transport = GrpcServerTransport(dep, tls=ServerTLS.from_config(dep), config_yaml="seed: 0\n")
    port = transport.start()
    clients = []
    try:
        good = RawClient(port, pki, "client_000")
        clients.append(good)
        good.join()
        for name in ("revoked", "client_002"):
            bad = RawClient(port, pki, name)
            clients.append(bad)
            with pytest.raises(grpc.RpcError):
                bad.join()
        sink = StatusSink(ClientBoard(), GrpcDirectory(transport, allowed))
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        sink.on_start(RunInfo(run_dir, parse_config({}), True, 0))
        sink.close(RunEnd("interrupted", None, "test"))
        rows = {c["client_id"]: c for c in RunView(run_dir).snapshot()["clients"]}
    finally:
        for client in clients:
            client.close()
        transport.stop()
    assert sorted(rows) == allowed  # the enrolled clients (client_002 is not enrolled: only in the refusals)
    assert rows["client_000"]["state"] == "idle" and rows["client_000"]["connected"] is True
    assert rows["client_001"]["state"] == "offline" and rows["client_001"]["connected"] is False
    assert rows["revoked"]["state"] == "refused" and "has been revoked" in rows["revoked"]["reason"]
    status = json.loads((run_dir / STATUS).read_text())
    refused = {r["who"]: r["reason"] for r in status["refused"]}
    assert "not in this federation" in refused["client_002"]


def test_a_dp_run_stopped_by_its_budget_reports_epsilon_spent(tmp_path) -> None:
    """status.json, the run view and report.html carry the privacy figures and the budget stop."""
    from fedtune.privacy import accountant

    two = accountant.epsilon([accountant.poisson_entry(0.4, 1.0, 2)], 1e-5)
    three = accountant.epsilon([accountant.poisson_entry(0.4, 1.0, 3)], 1e-5)
    budget = (two + three) / 2  # two rounds fit, a third would overspend
    cfg = {
        "seed": 2,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 10}},
        "federation": {"rounds": 6, "fraction": 0.4},
        "client": {"local_steps": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.1},
        "server": {"weighting": "uniform"},
        "eval": {"baseline": False, "max_clients": 2, "max_examples_per_client": 8},
        "run": {"out_dir": str(tmp_path), "plot": False},
        "privacy": {"dp": {"clip": 0.5, "noise_multiplier": 1.0, "epsilon_budget": budget}},
    }
    result = simulate(parse_config(cfg), console=Console(file=io.StringIO()), show_progress=False)
    assert result.state.round == 2  # the budget stopped it
    last_eps = result.rounds[-1]["agg_epsilon"]
    snap = RunView(result.run_dir).snapshot()
    assert snap["privacy"] == {
        "dp": True,
        "epsilon": last_eps,
        "delta": 1e-5,
        "epsilon_budget": budget,
        "client_epsilon_max": None,
    }
    assert snap["status"]["state"] == "stopped" and "budget" in snap["status"]["reason"]
    html = (result.run_dir / REPORT).read_text()
    assert f"<td>{last_eps:.4g}</td>" in html and "stopped:" in html


def test_an_interrupted_run_still_leaves_its_status_and_report(tmp_path) -> None:
    from fedtune.run.sinks import BaseSink

    class CtrlC(BaseSink):
        def on_round(self, state, records) -> None:
            if state.round == 1:
                raise KeyboardInterrupt

    cfg = {
        "seed": 5,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 3}},
        "federation": {"rounds": 3, "clients_per_round": 2},
        "client": {"local_steps": 1, "batch_size": 16},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }
    with pytest.raises(KeyboardInterrupt):
        simulate(parse_config(cfg), console=Console(file=io.StringIO()), show_progress=False, sinks=[CtrlC()])
    (run_dir,) = (tmp_path / "runs").iterdir()
    status = json.loads((run_dir / STATUS).read_text())
    assert status["state"] == "interrupted" and status["round"] == 1
    assert "interrupted" in (run_dir / REPORT).read_text()
    assert (run_dir / "checkpoint.safetensors").is_file() and not (run_dir / "summary.json").exists()


def test_a_busy_dashboard_port_is_a_clear_error_before_round_one(tmp_path) -> None:
    import socket

    from fedtune.dashboard.server import DashboardSink
    from fedtune.errors import FedtuneError

    cfg = {
        "seed": 5,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 3}},
        "federation": {"rounds": 1, "clients_per_round": 2},
        "eval": {"baseline": False},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        sink = DashboardSink(Console(file=io.StringIO()), port=busy.getsockname()[1])
        with pytest.raises(FedtuneError, match=r"the dashboard cannot listen on 127\.0\.0\.1"):
            simulate(parse_config(cfg), console=Console(file=io.StringIO()), show_progress=False, sinks=[sink])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / STATUS).read_text())["state"] == "failed"
    assert not (run_dir / "checkpoint.safetensors").exists()  # no round ran


def page_client_table(snapshot: dict) -> list[dict[str, str]]:
    """The dashboard page's client table as drawn by its app.js (in node, on a minimal DOM), keyed by the
    page's own column headers."""
    import shutil
    import subprocess
    from html.parser import HTMLParser
    from importlib import resources

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script cannot be run")
    static = resources.files("fedtune.dashboard").joinpath("static")

    class Headers(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.table, self.in_th, self.names = None, False, []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.table = dict(attrs).get("id", self.table) if tag == "table" else self.table
            self.in_th = tag == "th" and self.table == "clients"
            if self.in_th:
                self.names.append("")

        def handle_endtag(self, tag: str) -> None:
            self.in_th = False if tag == "th" else self.in_th

        def handle_data(self, data: str) -> None:
            if self.in_th:
                self.names[-1] += data

    headers = Headers()
    headers.feed(static.joinpath("index.html").read_text())
    script = Path(__file__).with_name("_dashboard_dom.js")
    out = subprocess.run(
        [node, str(script), str(static.joinpath("app.js"))],
        input=json.dumps(snapshot), capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rows = json.loads(out.stdout)
    assert rows and all(len(row) == len(headers.names) for row in rows), (headers.names, rows)
    return [dict(zip(headers.names, row, strict=True)) for row in rows]


def test_the_client_tables_show_each_clients_training_throughput(tmp_path) -> None:
    """examples/s of local training (the clients' own figure, in their replies) reaches the dashboard's client
    table and report.html's, beside fit seconds."""
    result = digits_run(tmp_path, "throughput", clients=2, rounds=1)
    records = {r["client_id"]: r for r in json_lines(result.run_dir) if r["kind"] == "client"}
    snap = RunView(result.run_dir).snapshot()
    rows = {c["client_id"]: c for c in snap["clients"]}
    assert set(rows) == set(records) == {"client_000", "client_001"}
    for cid, rec in records.items():
        # 2 steps of 16 examples in a positive time
        assert rec["examples_per_s"] > 0 and rows[cid]["examples_per_s"] == rec["examples_per_s"]
    drawn = {row["client"]: row for row in page_client_table(snap)}
    for cid, rec in records.items():
        assert float(drawn[cid]["examples/s"]) == pytest.approx(rec["examples_per_s"], rel=1e-3)  # 4 digits shown
        assert drawn[cid]["fit s"] != "-" and drawn[cid]["examples"] == str(rec["num_examples"])
    html = (result.run_dir / REPORT).read_text()
    assert "<th>examples/s</th>" in html
    assert all(f"{rec['examples_per_s']:.4g}" in html for rec in records.values())
