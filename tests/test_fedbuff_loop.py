"""The asynchronous FedBuff loop: the simulated clock's rules, a fast deterministic 1,000-client run, exact resume
(in-flight versions and the clock are state), the config rules, and end to end through fedtune.simulate and the CLI.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import fedtune
from _models import DIGITS_CNN
from fedtune.cli import app
from fedtune.config.asynchronous import ClientSpeedConfig
from fedtune.config.schema import Config
from fedtune.core.messages import ClientFailure, ClientUpdate, FitInstruction
from fedtune.core.rng import derive_rng
from fedtune.core.state import ServerState, load_state, save_state
from fedtune.run import rundir
from fedtune.server.async_loop import VERSION_PREFIX, build_clock, build_fedbuff, run_async
from fedtune.server.clock import Schedule, client_speeds
from fedtune.transport.inprocess import InProcessTransport
from test_fedbuff_math import _oracle_epsilon
from test_strategies_support import ArrayTask, classification_records, make_config, make_worker, seeded

DIM = 16


class TargetClients:
    """A transport of N synthetic clients: client c's local training moves x a fixed share towards its own target
    (so the result depends on the model version each client trained on). Fast enough for 1,000 clients."""

    def __init__(self, n: int) -> None:
        self.ids = [f"c{i:04d}" for i in range(n)]
        rng = derive_rng(0, "targets")
        self.targets = {cid: rng.normal(1.0, 1.0, DIM).astype(np.float32) for cid in self.ids}
        self.sizes = {cid: 1 + i % 7 for i, cid in enumerate(self.ids)}
        self.fitted: list[FitInstruction] = []

    def client_ids(self) -> list[str]:
        return list(self.ids)

    def fit(self, instructions: Sequence[FitInstruction]):
        for instr in instructions:
            self.fitted.append(instr)
            delta = (0.5 * (self.targets[instr.client_id] - instr.params)).astype(np.float32)
            yield ClientUpdate(instr.client_id, instr.round, self.sizes[instr.client_id], delta, instr.spec_digest)

    def evaluate(self, instructions):
        return iter(())

    def close(self) -> None:
        pass


def _spec():
    from fedtune.client.weights import TrainableView

    return TrainableView(torch.nn.Linear(DIM - 1, 1)).spec  # DIM values


def async_config(**over) -> Config:
    base = {
        "seed": 11,
        "server": {"mode": "async", "optimizer": "adam", "lr": 0.05, "fedbuff": {"concurrency": 50, "buffer_size": 10}},
        "simulation": {"client_speed": {"sigma": 0.5, "slow_fraction": 0.1, "slow_factor": 10, "jitter_sigma": 0.2}},
        "federation": {"rounds": 60},
        "client": {"local_steps": 5},
        "eval": {"every": 1000, "baseline": False},
    }
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Config.model_validate(base)


def run_targets(config: Config, n: int = 1000, state: ServerState | None = None, on_round=None):
    transport = TargetClients(n)
    server = build_fedbuff(config)
    state = state or server.init_state(np.zeros(DIM, np.float32), _spec())
    reports = []

    def record(new, report):
        reports.append(report)
        if on_round is not None:
            on_round(new, report)

    return run_async(config, server, transport, state, on_round=record), reports, transport


def test_client_speeds_have_the_configured_slow_tail_and_depend_on_the_seed():
    population = [f"c{i}" for i in range(1000)]
    cfg = ClientSpeedConfig(sigma=0.3, slow_fraction=0.1, slow_factor=10.0)
    speeds = client_speeds(cfg, population, seed=1)
    values = np.array(list(speeds.values()))
    assert (values > 4.0).sum() == 100  # exp(0.3 * 4.5) < 4: only the slow tail is this slow
    assert np.median(np.log(values[values < 4.0])) == pytest.approx(0.0, abs=0.05)
    assert speeds == client_speeds(cfg, population, seed=1) != client_speeds(cfg, population, seed=2)


def test_clock_keeps_m_in_flight_and_delivers_arrivals_in_finish_order():
    config = async_config(server={"fedbuff": {"concurrency": 20, "buffer_size": 5}})
    population = [f"c{i}" for i in range(60)]
    clock = build_clock(config, population)
    sched, last = Schedule(), 0.0
    for version in range(40):
        buffer, dropped, sched = clock.next_buffer(sched, version=version, slots=20, size=5, max_staleness=None)
        assert not dropped and len(buffer) == 5 and len({f.client_id for f in buffer}) == 5
        finishes = [f.finish for f in buffer]
        assert finishes == sorted(finishes) and finishes[0] >= last and sched.clock == finishes[-1]
        last = finishes[-1]
        in_flight = [f.client_id for f in sched.in_flight]
        assert len(in_flight) == 19 and len(set(in_flight)) == 19  # the last arrival's slot is refilled next step
        assert not set(in_flight) & {f.client_id for f in buffer}
        assert all(f.finish >= sched.clock for f in sched.in_flight)
        assert all(f.version <= version for f in sched.in_flight)
    # each arrival took exactly its simulated duration
    f = buffer[0]
    assert f.finish - f.start == pytest.approx(clock.duration(f.client_id, f.dispatch), rel=1e-12)


def test_a_thousand_clients_run_fast_and_the_same_seed_is_bit_identical():
    config = async_config()
    a, reports, transport = run_targets(config)
    b, _, _ = run_targets(config)
    np.testing.assert_array_equal(a.params, b.params)
    assert a.extra == b.extra and set(a.arrays) == set(b.arrays)
    c, _, _ = run_targets(async_config(seed=12))
    assert not np.array_equal(a.params, c.params)
    # it is asynchronous: stale updates were folded, older versions were kept for in-flight clients
    staleness = [cl["staleness"] for r in reports for cl in r.clients]
    assert max(staleness) > 0 and any(r.aggregate["versions_kept"] > 0 for r in reports)
    assert reports[-1].aggregate["dispatches"] == len(transport.fitted) + 49  # 49 still in flight
    # every client trained on the vector of the version it was dispatched with: one dispatch, one stream
    assert len({i.round for i in transport.fitted}) == len(transport.fitted)
    # and the model learnt: closer to the clients' mean target than the start
    mean_target = np.mean(list(transport.targets.values()), axis=0)
    assert np.linalg.norm(a.params - mean_target) < 0.5 * np.linalg.norm(mean_target)


class Crash(Exception):
    pass


def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    config = async_config(federation={"rounds": 25})
    full, _, _ = run_targets(config, n=200)
    path = tmp_path / "checkpoint.safetensors"

    def crash_at_ten(state, report):
        save_state(state, path, config_digest="t")
        if state.round == 10:
            raise Crash

    with pytest.raises(Crash):
        run_targets(config, n=200, on_round=crash_at_ten)
    restored = load_state(path, config_digest="t")
    assert restored.round == 10 and any(k.startswith(VERSION_PREFIX) for k in restored.arrays)
    resumed, _, _ = run_targets(config, n=200, state=restored)
    np.testing.assert_array_equal(resumed.params, full.params)
    assert resumed.extra == full.extra and set(resumed.arrays) == set(full.arrays)
    for key, value in full.arrays.items():
        np.testing.assert_array_equal(resumed.arrays[key], value, err_msg=key)


def test_max_staleness_drops_stale_arrivals_untrained():
    config = async_config(server={"fedbuff": {"concurrency": 50, "buffer_size": 5, "max_staleness": 1}})
    _, reports, transport = run_targets(config, n=300)
    dropped = [f for r in reports for f in r.failures if f.reason.startswith("dropped: staleness")]
    assert dropped and all(isinstance(f, ClientFailure) for f in dropped)
    assert all(cl["staleness"] <= 1 for r in reports for cl in r.clients)
    assert not {f.round for f in dropped} & {i.round for i in transport.fitted}  # never trained


def test_real_worker_resume_with_fedprox_and_stragglers(tmp_path):
    """The in-process worker: stale clients train on old vectors, with per-dispatch random streams."""
    config = make_config(
        server={"mode": "async", "proximal_mu": 0.1, "fedbuff": {"concurrency": 5, "buffer_size": 2}},
        client={"local_steps": 3, "straggler_fraction": 0.3},
        simulation={"client_speed": {"slow_fraction": 0.2}},
        federation={"rounds": 6},
        eval={"every": 3},
    )
    records = classification_records(7)

    def run(state=None, on_round=None):
        worker = make_worker(ArrayTask(seeded(lambda: torch.nn.Linear(6, 3))), records)
        server = build_fedbuff(config)
        state = state or server.init_state(worker.current_params(), worker.view.spec)
        out = []
        final = run_async(
            config,
            server,
            InProcessTransport(worker),
            state,
            on_round=lambda s, r: (out.append(r), on_round and on_round(s, r)),
        )
        return final, out

    full, reports = run()
    assert reports[2].eval_pooled is not None and reports[2].eval_pooled.count > 0
    path = tmp_path / "c.safetensors"

    def crash(state, report):
        save_state(state, path, config_digest="t")
        if state.round == 3:
            raise Crash

    with pytest.raises(Crash):
        run(on_round=crash)
    resumed, _ = run(state=load_state(path, config_digest="t"))
    np.testing.assert_array_equal(resumed.params, full.params)
    assert resumed.extra == full.extra


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"server": {"mode": "async", "scaffold": True}, "client": {"optimizer": "sgd"}}, "server.scaffold"),
        ({"server": {"mode": "async"}, "privacy": {"secure_aggregation": True}}, "privacy.secure_aggregation"),
        ({"server": {"mode": "async"}, "client": {"local_epochs": 1}}, "client.local_epochs"),
        ({"server": {"mode": "async"}, "personalization": {"finetune_steps": 2}}, "personalization: "),
        ({"server": {"fedbuff": {"buffer_size": 2}}}, "server.fedbuff only applies"),
        ({"simulation": {"client_speed": {"sigma": 1.0}}}, "simulation.client_speed only applies"),
        ({"server": {"mode": "async", "fedbuff": {"buffer_size": 9, "concurrency": 3}}}, "exceeds concurrency"),
        ({"server": {"mode": "async", "fedbuff": {"bufer_size": 2}}}, "bufer_size"),
        (
            {
                "server": {"mode": "async", "weighting": "uniform"},
                "privacy": {"dp": {"noise_multiplier": 1.0, "sampling": "poisson"}},
            },
            "no amplification",
        ),
        (
            {"server": {"mode": "async", "weighting": "uniform"}, "privacy": {"dp": {"target_epsilon": 3.0}}},
            "privacy.dp.target_epsilon",
        ),
        (
            {
                "server": {"mode": "async", "weighting": "uniform", "update_norm_bound": "adaptive"},
                "privacy": {"dp": {"noise_multiplier": 1.0}},
            },
            "un-noised updates",
        ),
    ],
)
def test_async_config_rules_name_the_key(over, message):
    raw = {"client": {"local_steps": 2}, **over}
    if "client" in over:
        raw["client"] = {**over["client"]}
    with pytest.raises(ValueError, match=message):
        Config.model_validate(raw)


def test_sync_configs_keep_their_digest():
    # server.mode/fedbuff were added with FedBuff: a sync run's digest (resume check) must not change
    digest = rundir.config_digest(Config())
    assert digest == rundir.config_digest(Config.model_validate({"server": {"mode": "sync"}}))
    assert digest != rundir.config_digest(Config.model_validate({"server": {"mode": "async"}}))


def _digits_config(tmp_path: Path, rounds: int) -> dict:
    return {
        "seed": 5,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 6}},
        "federation": {"rounds": rounds},
        "client": {"local_steps": 2, "batch_size": 16, "lr": 0.1, "optimizer": "sgd"},
        "server": {"mode": "async", "fedbuff": {"concurrency": 4, "buffer_size": 2}},
        "simulation": {"client_speed": {"slow_fraction": 0.2}},
        "eval": {"every": 2, "max_clients": 2},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }


def test_cli_and_python_api_run_async_and_resume_exactly(tmp_path):
    path = tmp_path / "async.yaml"
    path.write_text(yaml.safe_dump(_digits_config(tmp_path / "cli", 4)))
    checked = CliRunner().invoke(app, ["validate", str(path)])
    assert checked.exit_code == 0 and "4 buffered steps (async: 4 clients training at once" in checked.output
    result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "cli" / "runs").iterdir()
    full = load_state(run_dir / rundir.CHECKPOINT)
    steps = [r for r in rundir.MetricsLog(run_dir).rounds() if r["round"] > 0]
    assert [r["agg_sim_time"] for r in steps] == sorted(r["agg_sim_time"] for r in steps)
    assert Counter(r["clients_ok"] for r in steps) == {2: 4}

    part = fedtune.simulate(_digits_config(tmp_path / "b", 2), quiet=True)
    resumed = fedtune.simulate(_digits_config(tmp_path / "b", 4), resume=part.run_dir, quiet=True)
    assert resumed.state.round == 4 and np.array_equal(resumed.state.params, full.params)
    assert [r["agg_sim_time"] for r in resumed.metrics if r["round"] > 0] == [r["agg_sim_time"] for r in steps]


def test_dp_run_end_to_end_reports_the_unamplified_epsilon(tmp_path):
    raw = _digits_config(tmp_path, 3)
    raw["server"] = {**raw["server"], "weighting": "uniform"}
    raw["privacy"] = {"dp": {"clip": 0.5, "noise_multiplier": 4.0, "delta": 1e-5}}
    result = fedtune.simulate(raw, quiet=True)
    eps = [r["agg_epsilon"] for r in result.metrics if r["round"] > 0]
    assert eps == pytest.approx([_oracle_epsilon(4.0, t, 1e-5) for t in (1, 2, 3)], rel=1e-9)
    steps = [r for r in result.metrics if r["round"] > 0]
    assert all(r["agg_dp_noise_std"] == 2.0 and r["agg_aggregated"] == 2 for r in steps)  # z C; K arrivals


class ReversedReplies(TargetClients):
    """Answers each buffer's instructions last first (a network where later arrivals overtake)."""

    def fit(self, instructions):
        return reversed(list(super().fit(instructions)))


def test_arrival_order_not_reply_order_decides_the_fold():
    config = async_config(federation={"rounds": 15}, server={"optimizer": "sgd", "lr": 1.0})
    in_order, _, _ = run_targets(config, n=100)
    transport = ReversedReplies(100)
    server = build_fedbuff(config)
    state = server.init_state(np.zeros(DIM, np.float32), _spec())
    reports = []
    overtaken = run_async(config, server, transport, state, on_round=lambda s, r: reports.append(r))
    np.testing.assert_array_equal(overtaken.params, in_order.params)
    # folded (and reported) in arrival order, not in the order the replies came
    assert all([c["client_id"] for c in r.clients] == r.sampled for r in reports)


@pytest.mark.slow  # the Shakespeare plays and a LoRA language model (~1 minute on a loaded machine)
def test_the_async_demo_config_runs_on_a_lora_language_model(tmp_path):
    """examples/shakespeare_smollm2_fedbuff.yaml on tiny-llama: peft LoRA adapters trained asynchronously."""
    from fedtune.config.load import load_config
    from fedtune.run.session import simulate

    example = Path(__file__).parent.parent / "examples" / "shakespeare_smollm2_fedbuff.yaml"
    overrides = [
        "model.name=tiny-llama",
        "model.compute_dtype=float32",
        "model.lora.top_layers=null",
        "federation.rounds=3",
        "client.local_steps=2",
        "eval.max_clients=2",
        f"run.out_dir={tmp_path}",
        "run.plot=false",
    ]
    result = simulate(load_config(example, overrides), show_progress=False)
    steps = [r for r in result.rounds if r["round"] > 0]
    assert [r["clients_ok"] for r in steps] == [4, 4, 4]
    assert all(np.isfinite(r["eval_perplexity"]) for r in steps if "eval_perplexity" in r)
    assert steps[-1]["agg_sim_time"] > steps[0]["agg_sim_time"] > 0


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 12),  # K
    st.integers(0, 20),  # M - K
    st.integers(0, 30),  # population - (M + K), may be smaller than M + K below
    st.integers(0, 3),  # max_staleness, or None as 3
    st.integers(0, 2**31),
)
def test_clock_invariants_hold_for_any_sizes(k, extra_m, extra_n, max_stale, seed):
    m = k + extra_m
    population = [f"c{i}" for i in range(k + extra_n)]  # at least K clients, maybe fewer than M
    config = async_config(seed=seed, server={"fedbuff": {"concurrency": m, "buffer_size": k}})
    clock = build_clock(config, population)
    sched, limit = Schedule(), None if max_stale == 3 else max_stale
    for version in range(8):
        buffer, dropped, sched = clock.next_buffer(sched, version=version, slots=m, size=k, max_staleness=limit)
        ids = [f.client_id for f in buffer]
        assert len(ids) == k and len(set(ids)) == k  # K distinct clients: at most one contribution each
        assert len(sched.in_flight) <= m and not set(ids) & {f.client_id for f in sched.in_flight}
        assert all(limit is None or version - f.version <= limit for f in buffer)
        assert all(limit is not None and version - f.version > limit for f in dropped)
        arrivals = sorted(buffer + dropped, key=lambda f: (f.finish, f.dispatch))
        assert arrivals[-1] == buffer[-1] and sched.clock == buffer[-1].finish


def test_the_grpc_server_refuses_async_dp_with_the_reason(tmp_path):
    from fedtune.deploy.serve import run_server
    from fedtune.errors import ConfigError

    raw = {**_digits_config(tmp_path, 2), "run": {"out_dir": str(tmp_path)}}
    raw["server"] = {**raw["server"], "weighting": "uniform"}
    config = Config.model_validate({**raw, "privacy": {"dp": {"clip": 0.5, "noise_multiplier": 1.0}}})
    with pytest.raises(ConfigError, match=r"privacy\.dp with server\.mode 'async' runs in simulation only"):
        run_server(config)
    assert not any(tmp_path.iterdir())  # refused before anything was built or written


def test_a_transport_that_cannot_dispatch_asynchronously_is_refused_by_name(tmp_path):
    from fedtune.errors import ConfigError
    from fedtune.run.session import async_dispatch
    from fedtune.transport.base import Capabilities

    class RoundsOnly(TargetClients):
        capabilities = Capabilities()

    config = async_config()
    with pytest.raises(ConfigError, match=r"RoundsOnly\): it does not dispatch"):
        async_dispatch(config, RoundsOnly(3))
    assert async_dispatch(config, InProcessTransport.__new__(InProcessTransport)) is None  # simulated: the clock
