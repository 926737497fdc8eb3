"""Progress while a run goes (local steps, round x/N, ETA), drawn by a sink from the loop's events, and Ctrl-C
during `fedtune run`."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from fedtune.client.train import LocalRun, local_train
from fedtune.config import parse_config
from fedtune.config.schema import ClientConfig
from fedtune.core.events import Answered, Collected, Dispatched, EventRelay, StepProgress, observed
from fedtune.core.messages import ClientFailure, ClientUpdate, FitInstruction
from fedtune.run.progress import ProgressSink, RoundClock
from fedtune.run.sinks import RunEnd, RunInfo
from fedtune.tasks.module import ModuleTask


def test_local_train_reports_every_step() -> None:
    from fedtune.models.cnn import digits_cnn

    task = ModuleTask(digits_cnn(channels=2, hidden=8))
    examples = task.encode(_records(10), train=True)
    seen: list[StepProgress] = []
    result = local_train(
        task,
        examples,
        ClientConfig(local_epochs=2, batch_size=4),
        LocalRun(0, 3, "c7"),
        on_step=seen.append,
    )
    assert result.steps == 6  # 2 epochs of ceil(10 / 4) batches
    assert [r.step for r in seen] == [1, 2, 3, 4, 5, 6]
    assert all(r.total_steps == 6 and r.client_id == "c7" and r.round == 3 for r in seen)
    assert [r.examples for r in seen] == [4, 8, 10, 14, 18, 20]  # the last batch of an epoch is partial
    assert all(b.seconds >= a.seconds for a, b in itertools.pairwise(seen))


def _records(n: int) -> list:
    from fedtune.data.digits import load_digits_records

    return load_digits_records()[:n]


def test_round_clock_eta() -> None:
    now = [0.0]
    clock = RoundClock(total_rounds=5, clock=lambda: now[0])
    assert clock.eta() is None  # nothing to go on
    clock.start(1)
    now[0] = 10.0
    assert clock.eta(done_share=0.5) == pytest.approx(5 * 20.0 - 10.0)  # half of round 1 took 10 s
    now[0] = 30.0
    clock.start(2)  # round 1 took 30 s
    assert clock.eta() == pytest.approx(4 * 30.0)
    now[0] = 40.0
    assert clock.eta() == pytest.approx(4 * 30.0 - 10.0)
    now[0] = 50.0
    clock.start(3)  # round 2 took 20 s: mean 25 s
    assert clock.eta() == pytest.approx(3 * 25.0)
    assert clock.label(3) == "round 3/5"


class _NetworkLike:
    """A transport that reports nothing but finished clients (like Ray or gRPC)."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)

    def client_ids(self) -> list[str]:
        return self.ids

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate]:
        import numpy as np

        for instr in instructions:
            metrics = {"steps": 40.0, "examples_per_s": 12.5} if instr.client_id == "c" else {}
            yield ClientUpdate(instr.client_id, instr.round, 1, np.zeros(1, np.float32), "d", metrics=metrics)

    def evaluate(self, instructions):  # pragma: no cover - not used here
        return iter(())

    def close(self) -> None:
        pass


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=150), buf


def _progress(console: Console, rounds: int) -> ProgressSink:
    sink = ProgressSink(console)
    config = parse_config({"federation": {"rounds": rounds, "clients_per_round": 2}})
    sink.on_start(RunInfo(Path("unused"), config, accuracy=True, start_round=0))
    return sink


def test_per_client_progress_without_step_reports() -> None:
    import numpy as np

    console, buf = _terminal()
    sink = _progress(console, rounds=4)
    instr = [FitInstruction(c, 2, np.zeros(1, np.float32), "d", 0, ClientConfig()) for c in "abc"]
    replies = observed(sink.on_event, "train", 2, "abc", _NetworkLike(["a", "b", "c"]).fit(instr))
    assert [u.client_id for u in replies] == ["a", "b", "c"]
    assert sink.phase is None  # collected: the bar is gone
    out = buf.getvalue()
    assert "round 2/4 train" in out and "3/3" in out and "ETA" in out
    assert "last c: 40 steps, 12.5 examples/s" in out  # the summary a networked reply carries


def test_the_sink_draws_a_bar_per_phase_with_a_row_per_client_in_training() -> None:
    console, _ = _terminal()
    sink = _progress(console, rounds=3)
    sink.on_event(StepProgress("a", 1, 1, 2, 4, 0.5))  # outside a phase: nothing to draw on
    assert sink.phase is None
    sink.on_event(Dispatched("train", 1, ("a", "b")))
    phase = sink.phase
    assert phase is not None and [t.description for t in phase.bar.tasks] == ["round 1/3 train"]
    sink.on_event(StepProgress("a", 1, 1, 2, 4, 0.5))
    sink.on_event(StepProgress("b", 1, 1, 2, 4, 0.25))  # Ray: two clients in training at once
    assert [(t.description, t.completed, t.fields["info"]) for t in phase.bar.tasks[1:]] == [
        ("  client a", 1, "8.0 examples/s"),
        ("  client b", 1, "16.0 examples/s"),
    ]
    sink.on_event(StepProgress("a", 1, 2, 2, 8, 1.0))
    sink.on_event(Answered("train", 1, "a"))
    sink.on_event(StepProgress("c", 1, 1, 2, 4, 0.5))  # the next client: a's finished row goes
    assert [t.description for t in phase.bar.tasks] == ["round 1/3 train", "  client b", "  client c"]
    assert phase.bar.tasks[0].completed == 1
    sink.on_event(Answered("train", 1, "b", failure="connection lost"))  # a failure is answered too
    assert phase.bar.tasks[0].completed == 2
    sink.on_event(Collected("train", 1))
    assert sink.phase is None and not phase.bar.live.is_started
    sink.on_event(Dispatched("eval", 0, ("a",)))
    assert sink.phase is not None and sink.phase.bar.tasks[0].description == "baseline eval"
    sink.on_event(Dispatched("eval", 1, ("a",)))  # a new phase ends the one before, collected or not
    assert sink.phase.bar.tasks[0].description == "round 1/3 eval"
    sink.on_event(Dispatched("eval", 2, ()))  # nobody to ask: no bar
    assert sink.phase is None
    sink.on_event(Dispatched("train", 3, ("a",)))
    sink.close(RunEnd("failed", None))  # a run that fails mid-phase leaves no live bar
    assert sink.phase is None


def _tiny_text_config(tmp_path: Path, rounds: int, **client: object) -> dict:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for c in range(2):
        paras = [
            f"Client {c} paragraph {i}: all the world's a stage, and all the men merely players." for i in range(8)
        ]
        (corpus / f"c{c}.txt").write_text("\n\n".join(paras))
    return {
        "model": {"name": "tiny-llama", "max_length": 16, "lora": {"r": 2, "target_modules": ["q_proj"]}},
        "data": {"source": "text", "path": str(corpus)},
        "federation": {"rounds": rounds, "clients_per_round": 2},
        "client": {"local_steps": 3, "batch_size": 2, "lr": 0.01, **client},
        "eval": {"baseline": False},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }


def test_the_simulation_shows_local_steps_round_of_n_and_eta(tmp_path: Path) -> None:
    from fedtune.run.session import simulate

    console, buf = _terminal()
    simulate(parse_config(_tiny_text_config(tmp_path, rounds=2)), console=console, show_progress=True)
    out = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    assert "round 1/2 train" in out and "round 2/2 train" in out
    assert re.search(r"client c[01] .* 3/3 .* [0-9.]+ examples/s", out)  # the step bar of a client, with its rate
    assert re.search(r"ETA \d+", out)


def test_the_event_relay_forwards_only_while_a_listener_is_attached() -> None:
    relay, heard = EventRelay(), []
    report = StepProgress("c", 1, 1, 2, 4, 0.5)
    relay(report)  # nobody listening: dropped
    relay.listener = heard.append
    relay(report)
    assert heard == [report]


def test_observed_tells_dispatch_each_answer_and_the_end_and_passes_replies_through() -> None:
    import numpy as np

    heard: list = []
    update = ClientUpdate("a", 1, 5, np.zeros(1, np.float32), "d", metrics={"steps": 3.0, "examples_per_s": 2.5})
    failure = ClientFailure("b", 1, "presumed dead")
    replies = observed(heard.append, "train", 1, ["a", "b"], iter([update, failure]))
    assert heard == []  # nothing until the loop asks for the first reply
    assert next(replies) is update
    assert heard == [Dispatched("train", 1, ("a", "b")), Answered("train", 1, "a", steps=3, examples_per_s=2.5)]
    assert list(replies) == [failure]
    assert heard[2:] == [Answered("train", 1, "b", failure="presumed dead"), Collected("train", 1)]
    hostile = replace(update, metrics={"steps": math.inf, "examples_per_s": math.nan})  # any JSON number
    list(observed(heard.append, "train", 1, ["a"], iter([hostile])))
    assert heard[-2] == Answered("train", 1, "a")


# ------------------------------------------------------------------------------------------------- Ctrl-C


def _poll(predicate, deadline_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"fedtune run ended early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the first round")
        time.sleep(0.2)


@pytest.mark.timeout(600)
def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_tiny_text_config(tmp_path, rounds=1000)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    runs = tmp_path / "runs"

    def first_round_done() -> bool:
        # the round is in metrics.jsonl and its checkpoint is in place (written right after, atomically)
        for run_dir in runs.glob("*"):
            metrics, checkpoint = run_dir / "metrics.jsonl", run_dir / "checkpoint.safetensors"
            if checkpoint.is_file() and metrics.is_file():
                lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                return any(r.get("kind") == "round" and r.get("round", 0) >= 1 for r in lines)
        return False

    _poll(first_round_done, 420, proc)  # generous: the machine may be loaded
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    (run_dir,) = list(runs.glob("*"))
    match = re.search(r"interrupted after round (\d+); continue with `fedtune run --resume (\S+)`", out)
    assert match, out
    from fedtune.core.state import load_state

    assert int(match.group(1)) == load_state(run_dir / "checkpoint.safetensors").round >= 1
    assert Path(match.group(2)) == run_dir


def test_local_training_measures_examples_per_second(monkeypatch) -> None:
    from fedtune.client import train
    from fedtune.models.cnn import digits_cnn

    ticks = itertools.count()
    monkeypatch.setattr(train.time, "perf_counter", lambda: float(next(ticks)))  # each reading: one second later
    task = ModuleTask(digits_cnn(channels=2, hidden=8))
    result = local_train(
        task, task.encode(_records(10), train=True), ClientConfig(local_epochs=2, batch_size=4), LocalRun(0, 1, "c")
    )
    assert result.examples_per_s == 20.0  # 20 examples (2 epochs of 10) between two readings one second apart


def test_replies_carry_steps_and_examples_per_second(tmp_path: Path) -> None:
    """What Ray actors and gRPC participants send: every client record of the run holds its steps and speed."""
    from fedtune.run.rundir import MetricsLog
    from fedtune.run.session import simulate

    result = simulate(parse_config(_tiny_text_config(tmp_path, rounds=1)), console=Console(quiet=True))
    clients = [r for r in MetricsLog(result.run_dir).read() if r["kind"] == "client"]
    assert len(clients) == 2
    assert all(c["steps"] == 3 and c["examples_per_s"] > 0 and c["fit_seconds"] > 0 for c in clients)


def test_a_participants_step_bar_and_its_line_per_round() -> None:
    import numpy as np

    from fedtune.run.progress import StepBar
    from fedtune.transport.grpc.client import _describe_fit

    console, buf = _terminal()
    bar = StepBar(console)
    bar(StepProgress("site_a", 2, 1, 3, 8, 0.5))
    assert bar.progress is not None
    (task,) = bar.progress.tasks
    assert (task.completed, task.total, task.fields["info"]) == (1, 3, "16.0 examples/s")
    bar(StepProgress("site_a", 2, 2, 3, 16, 1.0))
    assert task.completed == 2
    bar(StepProgress("site_a", 2, 3, 3, 24, 1.5))
    assert bar.progress is None  # the round's last step: the bar is gone
    assert "round 2 local steps" in re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    update = ClientUpdate("site_a", 2, 24, np.zeros(1, np.float32), "d", metrics={"steps": 3.0, "train_loss": 0.5,
                                                                                "examples_per_s": 16.0})  # fmt: skip
    assert _describe_fit(update) == "3 steps on 24 examples (16.0 examples/s), loss 0.5000"
