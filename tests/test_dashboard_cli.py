"""The dashboard from the command line: ``fedtune run --dashboard`` and ``fedtune dashboard RUN_DIR``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from _models import DIGITS_CNN
from _process import interruptible
from _runs import FakeRun
from fedtune.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_run_with_dashboard_prints_its_url_and_writes_the_report(tmp_path) -> None:
    cfg = {
        "seed": 5,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 3}},
        "federation": {"rounds": 1, "clients_per_round": 2},
        "client": {"local_steps": 1, "batch_size": 16},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(path), "--quiet", "--dashboard", "0"])
    assert result.exit_code == 0, result.output
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/\?token=[\w-]{32}", result.output), result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "report.html").is_file()


def test_dashboard_command_serves_a_run_dir_until_interrupted(tmp_path) -> None:
    run = FakeRun(tmp_path / "run")
    run.add_round()
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", "dashboard", str(run.dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "COLUMNS": "300"},
        preexec_fn=interruptible,  # Ctrl-C reaches it even when pytest runs in the background
    )
    seen, match = [], None
    try:
        for line in proc.stdout:  # blocks until the URL is printed (warnings may come first), or the process ends
            seen.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=([\w-]+)", line)
            if match:
                break
        assert match, "".join(seen)
        req = urllib.request.Request(match[1] + "api/run", headers={"Authorization": f"Bearer {match[2]}"})
        with urllib.request.urlopen(req, timeout=30) as reply:
            assert json.loads(reply.read())["rounds"][0]["round"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, "".join(seen) + proc.stdout.read()


def test_dashboard_command_refuses_a_folder_that_is_not_a_run(tmp_path) -> None:
    result = CliRunner().invoke(app, ["dashboard", str(tmp_path)])
    assert result.exit_code == 2 and "not a fedtune run directory" in " ".join(result.output.split())


@pytest.mark.parametrize("command", ["run", "server"])
@pytest.mark.parametrize(
    ("args", "port"),
    [
        ([], None),  # no dashboard
        (["--dashboard"], 8765),  # the default port, option last
        (["--dashboard", "--quiet"], 8765),  # followed by another option
        (["--dashboard", "8800"], 8800),
        (["--dashboard=0"], 0),
        (["--dashboard-port", "9100"], 9100),  # the older spelling alone
        (["--dashboard", "--dashboard-port", "0"], 0),  # the older call: both
    ],
)
def test_dashboard_port_is_optional(tmp_path, monkeypatch, command, args, port) -> None:
    from fedtune.dashboard import server as dashboard_server
    from fedtune.deploy import serve
    from fedtune.errors import FedtuneError
    from fedtune.run import session

    seen: list = []

    class Recorder:
        def __init__(self, console, *, host: str, port: int) -> None:
            seen.append(port)

    def stop(*a, **kw):
        raise FedtuneError("stopped by the test")

    monkeypatch.setattr(dashboard_server, "DashboardSink", Recorder)
    monkeypatch.setattr(session, "simulate", stop)
    monkeypatch.setattr(serve, "run_server", stop)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"federation": {"rounds": 1}}))
    for argv in ([command, str(path), *args], [command, *args, str(path)]):  # CONFIG after or before the option
        seen.clear()
        result = CliRunner().invoke(app, argv)
        assert "stopped by the test" in result.output, result.output
        assert seen == ([] if port is None else [port]), argv
