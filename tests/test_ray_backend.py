"""The Ray backend against its oracle, the in-process backend: the same seed gives the same run, bit for bit.

Ray starts once for the module (a local instance with 2 CPUs and no dashboard, under /tmp); start-up and actor
construction dominate the time, so the checks share as few actor pools as possible.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import re

import numpy as np
import pytest
from rich.console import Console

ray = pytest.importorskip("ray")

from _models import DIGITS_CNN  # noqa: E402
from fedtune.config.load import parse_config  # noqa: E402
from fedtune.config.simulation import SimulationConfig  # noqa: E402
from fedtune.core.messages import ClientFailure, ClientUpdate, EvalInstruction, FitInstruction  # noqa: E402
from fedtune.errors import FedtuneError  # noqa: E402
from fedtune.run.session import initial_params, prepare, simulate, worker_from_config  # noqa: E402
from fedtune.transport.inprocess import InProcessTransport  # noqa: E402
from fedtune.transport.ray_backend import RayTransport, start_ray  # noqa: E402

# a hang guard, not a margin: the LoRA residual test took over 180 s with both cores kept busy
pytestmark = pytest.mark.timeout(600)


def tiny_config(tmp_path, **simulation):
    return parse_config(
        {
            "seed": 3,
            "model": DIGITS_CNN,
            "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 8}},
            "federation": {"rounds": 2, "clients_per_round": 6},
            "client": {"local_steps": 2, "batch_size": 16, "lr": 0.1, "optimizer": "sgd"},
            "eval": {"max_clients": 4},
            # one torch thread everywhere: Ray pins each actor to cpus_per_worker=1 thread, and a reduction
            # split over 2 threads may round differently in the last bit
            "run": {"out_dir": str(tmp_path / "runs"), "plot": False, "threads": 1},
            "simulation": simulation,
        }
    )


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    # the backend's own local start: no dashboard, actors' output not echoed, a temp dir under /tmp. 4 logical
    # CPUs (Ray's CPUs are a count, not cores): the module's `pool` keeps one actor for all its tests, and a
    # test that asks for 2 more must still fit, or Ray waits for them forever
    assert start_ray(SimulationConfig(backend="ray", num_cpus=4, temp_dir="/tmp/fedtune-ray-tests"))
    yield
    ray.shutdown()


def comparable(rounds: list[dict]) -> list[dict]:
    """Round records without wall-clock fields."""
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rounds]


def test_simulate_on_ray_equals_in_process(ray_session, tmp_path) -> None:
    local = simulate(tiny_config(tmp_path), show_progress=False)
    terminal = io.StringIO()
    on_ray = simulate(
        tiny_config(tmp_path, backend="ray", num_workers=2),
        console=Console(file=terminal, force_terminal=True, width=150),
        show_progress=True,  # the actors' local steps reach the driver's bar
    )
    assert np.array_equal(on_ray.state.params, local.state.params)
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", terminal.getvalue())
    assert re.search(r"client client_00\d .* 2/2 .* [0-9.]+ examples/s", shown), shown[-2000:]
    assert not np.array_equal(local.state.params, initial_params(local.run_dir)), "the run must train"
    assert comparable(on_ray.rounds) == comparable(local.rounds)
    assert [r["clients_ok"] for r in on_ray.rounds[1:]] == [6, 6]


@pytest.fixture(scope="module")
def pool(ray_session, tmp_path_factory):
    """One actor pool (1 worker, replies as completed) and the prepared in-process oracle."""
    config = tiny_config(tmp_path_factory.mktemp("pool"), backend="ray", num_workers=1, ordered=False)
    prepared = prepare(config)
    transport = RayTransport(
        functools.partial(worker_from_config, config), list(prepared.worker.records), config.simulation
    )
    yield config, prepared, transport
    transport.close()


def fit_instructions(config, prepared, ids, round_idx=1):
    params = prepared.worker.current_params()
    return [
        FitInstruction(
            cid, round_idx, params, prepared.worker.view.spec.digest, config.seed, config.client
        )
        for cid in ids
    ]


@pytest.mark.slow  # a second actor pool costs ~15 s; the default suite keeps only the end-to-end check
def test_pool_replies_equal_in_process_replies_and_report_failures(pool) -> None:
    config, prepared, transport = pool
    ids = transport.client_ids()
    assert ids == list(prepared.worker.records)
    instructions = fit_instructions(config, prepared, ids)
    bad = dataclasses.replace(instructions[0], client_id=ids[1], spec_digest="0" * 16)
    expected = {u.client_id: u for u in InProcessTransport(prepared.worker).fit(instructions)}
    replies = list(transport.fit([*instructions, bad]))
    updates = [r for r in replies if isinstance(r, ClientUpdate)]
    failures = [r for r in replies if isinstance(r, ClientFailure)]
    assert sorted(u.client_id for u in updates) == sorted(ids)
    assert [f.client_id for f in failures] == [ids[1]] and "spec" in failures[0].reason
    for u in updates:
        assert np.array_equal(u.delta, expected[u.client_id].delta)
        assert u.delta.flags.writeable
        assert (u.bytes_down, u.bytes_up) == (expected[u.client_id].bytes_down, expected[u.client_id].bytes_up)
        assert u.metrics["train_loss"] == expected[u.client_id].metrics["train_loss"]


@pytest.mark.slow
def test_pool_evaluates_like_in_process(pool) -> None:
    _, prepared, transport = pool
    params = prepared.worker.current_params()
    instructions = [
        EvalInstruction(cid, 0, params, prepared.worker.view.spec.digest, 16, None) for cid in transport.client_ids()
    ]
    expected = [e.sums for e in InProcessTransport(prepared.worker).evaluate(instructions)]
    got = {e.client_id: e.sums for e in transport.evaluate(instructions)}
    assert [got[i.client_id] for i in instructions] == expected


def test_lora_residual_run_on_ray_equals_in_process(ray_session, tmp_path) -> None:
    """FedEx-LoRA on tiny-llama: the residual travels with fits and evaluations through the actors, so the
    Ray run's evaluation equals the in-process one (itself tested against the oracle in test_strategies_e2e)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for c in range(3):
        (corpus / f"speaker_{c}.txt").write_text(
            "\n\n".join(f"Line {i} of speaker {c}, to be or not." * 3 for i in range(8))
        )
    raw = {
        "seed": 2,
        "model": {"name": "tiny-llama", "max_length": 32, "lora": {"r": 4, "alpha": 8}},
        "data": {"source": "text", "path": str(corpus)},
        "federation": {"rounds": 2, "clients_per_round": 3},
        "client": {"local_steps": 2, "batch_size": 4, "lr": 0.3},
        "server": {"lora_aggregation": "fedex"},
        "eval": {"batch_size": 8},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False, "threads": 1},
    }
    local = simulate(parse_config(raw), show_progress=False)
    on_ray = simulate(parse_config({**raw, "simulation": {"backend": "ray", "num_workers": 2}}), show_progress=False)
    assert any(np.abs(v).max() > 0 for k, v in local.state.arrays.items() if k.startswith("lora/residual/"))
    assert np.array_equal(on_ray.state.params, local.state.params)
    assert comparable(on_ray.rounds) == comparable(local.rounds)
    # round 2 sent the residual's increment in factored form (the clients held round 1's copy in the store)
    sent = [r["bytes_down"] for r in on_ray.rounds if r["round"] > 0]
    assert sent == [r["bytes_down"] for r in local.rounds if r["round"] > 0]
    assert sent[1] < 0.7 * sent[0]  # 0.6: factors of rank 2 r of 32 x 32 instead of the dense matrices
    evals = [r["eval_bytes_down"] for r in on_ray.rounds]  # evaluations carry the residual too, counted apart
    assert evals == [r["eval_bytes_down"] for r in local.rounds] and evals[-1] < 0.7 * evals[0]  # round 0: dense


@pytest.mark.slow
def test_a_wiped_residual_copy_on_ray_is_recovered_like_in_process(ray_session, tmp_path) -> None:
    """The clients' residual copies (in a disk store the actors share) are deleted after rounds 1 and 2: on Ray
    as in process, each client whose copy is gone fails once with STATE_LOST, is asked again with the dense
    residual, and the run equals the in-process run without the wipes bit for bit."""
    from test_lora_recovery import _llama_config, _Wipe

    quiet = Console(quiet=True)
    plain = simulate(parse_config(_llama_config(tmp_path, "plain")), console=quiet, show_progress=False)
    raw = _llama_config(tmp_path, "ray")
    raw["simulation"] = {**raw["simulation"], "backend": "ray", "num_workers": 2}
    wipe = _Wipe(tmp_path / "ray" / "client_state", after={1, 2})
    on_ray = simulate(parse_config(raw), console=quiet, show_progress=False, sinks=[wipe])
    assert wipe.wiped > 0
    assert np.array_equal(on_ray.state.params, plain.state.params)
    for key in [k for k in plain.state.arrays if k.startswith("lora/residual/")]:
        assert np.array_equal(on_ray.state.arrays[key], plain.state.arrays[key]), key
    assert [r["eval_loss"] for r in on_ray.rounds] == [r["eval_loss"] for r in plain.rounds]
    records = [json.loads(line) for line in (on_ray.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "failure"]
    recovered = [r for r in records if r["kind"] == "recovered"]
    assert recovered and all(r["cause"] == "state-lost" for r in recovered)


def test_ray_state_store_round_trip(ray_session) -> None:
    from fedtune.core.state_store import ClientState, open_state_store

    store = open_state_store("ray:test")
    store.save("c0", "scaffold", ClientState({"c": np.arange(3, dtype=np.float32)}, {"steps": 2}), round=1)
    again = open_state_store("ray:test")  # the same name opens the same store (as a worker would)
    assert again.load("c0", "scaffold", round=1) is None  # nothing saved *before* round 1
    loaded = again.load("c0", "scaffold", round=2)
    assert loaded is not None and loaded.meta == {"steps": 2}
    assert np.array_equal(loaded.arrays["c"], np.arange(3, dtype=np.float32))
    store.close()


@pytest.mark.slow
def test_ray_actor_with_two_data_parallel_processes_per_client(ray_session, tmp_path) -> None:
    """simulation.client_nproc on Ray: each actor trains its clients on 2 gloo ranks; same result up to float
    rounding as one process per client (DDP averages two half-batch gradients instead of one full batch)."""
    local = simulate(tiny_config(tmp_path), show_progress=False)
    ddp = simulate(tiny_config(tmp_path, backend="ray", num_workers=1, client_nproc=2), show_progress=False)
    np.testing.assert_allclose(ddp.state.params, local.state.params, rtol=0, atol=1e-5)
    assert [r["clients_ok"] for r in ddp.rounds[1:]] == [6, 6]


def test_actor_step_reports_are_throttled_but_the_last_step_always_goes() -> None:
    from fedtune.core.events import StepProgress
    from fedtune.transport.ray_backend import StepForwarder

    class Queue:
        def __init__(self) -> None:
            self.items: list = []

        def put_nowait(self, item) -> None:
            self.items.append(item)

    queue = Queue()
    forward = StepForwarder(queue, every_s=3600.0)  # nothing is reported twice within the hour but the last step
    for step in range(1, 6):
        forward(StepProgress("c", 1, step, 5, step * 4, step * 0.1))
    assert [r.step for r in queue.items] == [1, 5]


def test_more_workers_than_the_cluster_has_cpus_is_an_error_not_a_hang(ray_session, tmp_path) -> None:
    """Ray queues an actor that can never fit and waits for it forever; the transport refuses instead."""
    needs = r"num_workers=5 x cpus_per_worker=1 needs 5 CPUs, but the Ray cluster has 4"
    with pytest.raises(FedtuneError, match=needs):
        simulate(tiny_config(tmp_path, backend="ray", num_workers=5), show_progress=False)


@pytest.mark.slow  # a second pair of runs on the shared Ray session (~30 s); the FedBuff loop is in-process tested
def test_fedbuff_async_on_ray_equals_in_process(ray_session, tmp_path) -> None:
    """server.mode async: the K arrivals of a buffered step train on Ray actors, each on its own model version."""
    asynchronous = {"mode": "async", "fedbuff": {"concurrency": 5, "buffer_size": 3}}

    def config(**simulation):
        cfg = tiny_config(tmp_path, **simulation).model_dump()
        speed = {"client_speed": {"slow_fraction": 0.25, "jitter_sigma": 0.3}}
        return parse_config(
            {
                **cfg,
                "server": {**cfg["server"], **asynchronous},
                "federation": {"rounds": 4},
                "simulation": {**cfg["simulation"], **speed},
            }
        )

    local = simulate(config(), show_progress=False)
    on_ray = simulate(config(backend="ray", num_workers=2), show_progress=False)
    assert np.array_equal(on_ray.state.params, local.state.params)
    assert on_ray.state.extra["fedbuff"] == local.state.extra["fedbuff"]
    assert comparable(on_ray.rounds) == comparable(local.rounds)
    assert max(r["agg_staleness_max"] for r in local.rounds[1:]) > 0  # stale versions were really trained on
