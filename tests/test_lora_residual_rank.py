"""server.lora_residual_rank: the exact LoRA modes' residual increment capped at rank q, with error feedback.

The truncation against numpy's SVD (Eckart-Young); the invariant that nothing is lost (the residual plus what
is held back equals the exact residual, round after round, for fedex, svd and flora); a cap that cannot bind
equals the exact mode; every client's copy is still the server's residual; the held-back part never leaves
the server and survives a checkpoint bit for bit; a resume without the cap sends it out; config errors.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedtune.aggregation.lora import capped_increment
from fedtune.client.residual_copy import ResidualCopy
from fedtune.config import parse_config
from fedtune.core.keys import INCREMENT_PREFIX, RESIDUAL_BASE, RESIDUAL_PREFIX
from fedtune.core.state import load_state, save_state
from fedtune.errors import ConfigError
from fedtune.server.build import build_strategy
from fedtune.server.strategies import FedExLora, FedOpt, FLoRA, SvdLora
from fedtune.server.strategies.lora import FEEDBACK_PREFIX, feedback_key
from test_lora_wire import SCHEDULE, SPEC, updates

MODULES = ("l.q", "l.k")  # l.q: 24 x 24, its capped increments travel factored; l.k: 2 x 2, always dense
PLUGINS = {
    "fedex": lambda q: FedExLora(residual_rank=q),
    "svd": lambda q: SvdLora(residual_rank=q),
    "flora": lambda q: FLoRA(seed=3, residual_rank=q),
}


def start(plugin):
    strategy = FedOpt(plugins=[plugin])
    return strategy, strategy.init_state(np.random.default_rng(0).normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC)


def digest(state) -> str:
    h = hashlib.sha256(state.params.tobytes())
    for key in sorted(state.arrays):
        h.update(key.encode() + state.arrays[key].tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- the truncation


@pytest.mark.parametrize(("shape", "rank", "q"), [((30, 20), 9, 3), ((20, 30), 4, 4), ((12, 40), 12, 1)])
def test_capped_increment_is_the_best_rank_q_part(shape, rank, q):
    rng = np.random.default_rng(rank)
    target = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))
    b, a, rest = capped_increment(target, q)
    assert b.shape == (shape[0], q) and a.shape == (q, shape[1]) and b.dtype == a.dtype == np.float32
    u, s, vt = np.linalg.svd(target)  # the oracle: Eckart-Young
    best = (u[:, :q] * s[:q]) @ vt[:q]
    scale = np.abs(target).max()
    np.testing.assert_allclose(b.astype(np.float64) @ a, best, atol=1e-6 * scale)
    # the remainder is computed from the float32 factors: target = B A + rest to float64 rounding
    np.testing.assert_allclose(b.astype(np.float64) @ a + rest, target, atol=1e-12 * scale)
    np.testing.assert_allclose(np.linalg.norm(rest), np.sqrt((s[q:] ** 2).sum()), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1), rtol=1e-5)  # balanced


def test_capped_increment_of_a_low_rank_target_holds_nothing_back():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(16, 3)) @ rng.normal(size=(3, 10))
    b, a, rest = capped_increment(target, 5)  # q above the rank: the extra components are ~0
    assert a.shape == (5, 10)
    assert np.abs(rest).max() < 1e-5 * np.abs(target).max()  # only the float32 rounding of the factors
    b, a, rest = capped_increment(target, 50)  # q above min(out, in): k = 10
    assert a.shape == (10, 10) and b.shape == (16, 10)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_capped_increment_refuses_a_rank_that_is_not_a_positive_integer(bad):
    with pytest.raises(ValueError, match="positive integer"):
        capped_increment(np.ones((3, 3)), bad)


# ------------------------------------------------------------------------------------------- the strategies


@pytest.mark.parametrize("mode", list(PLUGINS))
def test_nothing_is_lost_the_residual_plus_what_is_held_back_is_the_exact_residual(mode):
    """fedex, svd and flora's adapters do not depend on R, so an exact and a capped run fed the same updates
    hold the same adapters, and sum(sent) + E = sum(exact increments) is R_capped + E = R_exact."""
    exact, state_exact = start(PLUGINS[mode](None))
    capped, state = start(PLUGINS[mode](2))
    held_back = []
    for round_idx, clients in SCHEDULE.items():
        ups = updates(state, clients.split(), seed=round_idx)
        state_exact, _ = exact.aggregate(state_exact, ups)
        state, metrics = capped.aggregate(state, ups)
        held_back.append(metrics["lora_residual_held_back"])
        np.testing.assert_array_equal(state.params, state_exact.params)
        for m in MODULES:
            r_exact = state_exact.arrays[RESIDUAL_PREFIX + m].astype(np.float64)
            together = state.arrays[RESIDUAL_PREFIX + m].astype(np.float64) + state.arrays[feedback_key(m)]
            np.testing.assert_allclose(together, r_exact, atol=2e-5 * max(1.0, np.abs(r_exact).max()), err_msg=m)
        assert not state.arrays[feedback_key("l.k")].any()  # the 2 x 2 module is cheaper dense: all of it is sent
    e = state.arrays[feedback_key("l.q")]
    assert np.abs(e).max() > 1e-3  # the cap binds here: this is a real test of the invariant
    assert all(0 < h < 1 for h in held_back)
    r = state.arrays[RESIDUAL_PREFIX + "l.q"]
    assert np.abs(r - state_exact.arrays[RESIDUAL_PREFIX + "l.q"]).max() > 1e-3  # and the run is not exact


@pytest.mark.parametrize("mode", ["fedex", "svd"])
def test_a_cap_at_the_increments_rank_is_the_exact_mode(mode):
    """3 clients of rank 2 a round (SCHEDULE has at most 3): fedex's and svd's increments have rank <= 4."""
    exact, state_exact = start(PLUGINS[mode](None))
    capped, state = start(PLUGINS[mode](4))
    for round_idx, clients in SCHEDULE.items():
        ups = updates(state, clients.split(), seed=round_idx)
        state_exact, _ = exact.aggregate(state_exact, ups)
        state, metrics = capped.aggregate(state, ups)
        assert metrics["lora_residual_held_back"] < 1e-6
        for m in MODULES:
            r_exact = state_exact.arrays[RESIDUAL_PREFIX + m]
            scale = max(1.0, np.abs(r_exact).max())  # (svd's 2 x 2 module: a tail of 0 exactly, or of 1e-16)
            np.testing.assert_allclose(state.arrays[RESIDUAL_PREFIX + m], r_exact, atol=1e-5 * scale)
            assert np.abs(state.arrays[feedback_key(m)]).max() <= 1e-6 * scale


@pytest.mark.parametrize("mode", list(PLUGINS))
def test_every_clients_copy_is_the_servers_capped_residual_and_never_sees_what_is_held_back(mode, tmp_path):
    strategy, state = start(PLUGINS[mode](2))
    copy = ResidualCopy(f"memory:capped-{mode}")
    factored = 0
    for round_idx, clients in SCHEDULE.items():
        if round_idx == 5:  # resume: E comes back from the checkpoint bit for bit
            save_state(state, tmp_path / "ckpt.safetensors", config_digest="x")
            restored = load_state(tmp_path / "ckpt.safetensors", config_digest="x")
            for m in MODULES:
                assert np.abs(state.arrays[feedback_key(m)]).max() > 0 or m == "l.k"
                np.testing.assert_array_equal(restored.arrays[feedback_key(m)], state.arrays[feedback_key(m)])
            state = restored
        for cid in clients.split():
            arrays, _ = strategy.fit_payload(state, cid)
            assert not any(k.startswith(FEEDBACK_PREFIX) for k in arrays)
            got = copy.resolve(cid, arrays, round=round_idx)
            for m in MODULES:
                np.testing.assert_array_equal(got[RESIDUAL_PREFIX + m], state.arrays[RESIDUAL_PREFIX + m])
            if RESIDUAL_BASE in arrays:
                factored += 1
                ranks = [v.shape[0] for k, v in arrays.items() if k.startswith(INCREMENT_PREFIX) and k.endswith("/A")]
                assert ranks and all(r == 2 for r in ranks)  # every increment at the cap, whatever K was
        state, _ = strategy.aggregate(state, updates(state, clients.split(), seed=round_idx))
        for cid in ("c0", "c6"):
            arrays = strategy.eval_payload(state, client_id=cid)
            assert not any(k.startswith(FEEDBACK_PREFIX) for k in arrays)
        assert not any(k.startswith(FEEDBACK_PREFIX) for k in strategy.eval_payload(state))  # export, generate
    assert factored > 10


def test_a_checkpointed_and_resumed_capped_run_equals_an_uninterrupted_one(tmp_path):
    strategy, state = start(FedExLora(residual_rank=2))
    rounds = list(SCHEDULE.items())[:8]
    uninterrupted = state
    for round_idx, clients in rounds:
        uninterrupted, _ = strategy.aggregate(uninterrupted, updates(uninterrupted, clients.split(), seed=round_idx))
    for round_idx, clients in rounds:
        if round_idx == 4:
            save_state(state, tmp_path / "ckpt.safetensors", config_digest="x")
            strategy, _ = start(FedExLora(residual_rank=2))  # a fresh strategy, as a restarted server builds
            state = load_state(tmp_path / "ckpt.safetensors", config_digest="x")
        state, _ = strategy.aggregate(state, updates(state, clients.split(), seed=round_idx))
    assert digest(state) == digest(uninterrupted)


def test_a_capped_run_resumed_without_the_cap_sends_what_was_held_back():
    capped, state = start(FedExLora(residual_rank=1))
    exact, state_exact = start(FedExLora())
    rounds = list(SCHEDULE.items())[:4]
    for round_idx, clients in rounds:
        ups = updates(state, clients.split(), seed=round_idx)
        state, _ = (capped if round_idx < 4 else exact).aggregate(state, ups)  # round 4: the cap is removed
        state_exact, _ = exact.aggregate(state_exact, ups)
    for m in MODULES:
        assert not state.arrays[feedback_key(m)].any()
        r_exact = state_exact.arrays[RESIDUAL_PREFIX + m]
        np.testing.assert_allclose(state.arrays[RESIDUAL_PREFIX + m], r_exact, atol=2e-5 * np.abs(r_exact).max())
    # ... densely that round (the factors of E are not known to clients), exact increments again afterwards
    arrays, _ = exact.fit_payload(state, "c0")
    assert RESIDUAL_PREFIX + "l.q" in arrays


def test_the_default_adds_no_state_and_no_metric():
    strategy, state = start(FedExLora())
    assert not any(k.startswith(FEEDBACK_PREFIX) for k in state.arrays)
    state, metrics = strategy.aggregate(state, updates(state, ["c0", "c1"], seed=1))
    assert not any(k.startswith(FEEDBACK_PREFIX) for k in state.arrays)
    assert "lora_residual_held_back" not in metrics


# ------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("mode", ["fedex", "svd", "flora"])
def test_the_config_reaches_the_plugin(mode):
    config = parse_config({"server": {"lora_aggregation": mode, "lora_residual_rank": 8}})
    (plugin,) = build_strategy(config).plugins
    assert plugin.residual_rank == 8


@pytest.mark.parametrize(
    ("server", "federation", "fragment"),
    [
        ({"lora_aggregation": "naive", "lora_residual_rank": 8}, {}, "'naive' has no residual"),
        ({"lora_aggregation": "ffa", "lora_residual_rank": 8}, {}, "'ffa' has no residual"),
        ({"lora_aggregation": "flexlora", "lora_residual_rank": 8}, {}, "'flexlora' has no residual"),
        ({"lora_aggregation": "fedex", "lora_residual_rank": 0}, {}, "greater than 0"),
        ({"lora_aggregation": "fedex", "lora_residual_rank": 24}, {}, "has rank at most 24"),
        ({"lora_aggregation": "flora", "lora_residual_rank": 16}, {"clients_per_round": 2}, "has rank at most 16"),
    ],
)
def test_config_errors_name_the_problem(server, federation, fragment):
    with pytest.raises(ConfigError, match="lora_residual_rank") as err:
        parse_config({"server": server, "federation": federation})
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"privacy": {"dp": {"noise_multiplier": 1.0}}, "server": {"weighting": "uniform"}}, "privacy.dp"),
        ({"privacy": {"secure_aggregation": True}}, "privacy.secure_aggregation"),
        ({"server": {"mode": "async"}}, "only 'naive' LoRA averaging"),
    ],
)
def test_the_cap_inherits_the_exact_modes_privacy_and_async_rules(extra, fragment):
    raw = {"server": {"lora_aggregation": "fedex", "lora_residual_rank": 8}}
    for section, values in extra.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match="lora_aggregation") as err:
        parse_config(raw)
    assert fragment in str(err.value)


def test_the_cap_composes_with_local_dpsgd():  # the server post-processes the privatised updates
    server = {"lora_aggregation": "fedex", "lora_residual_rank": 8}
    config = parse_config({"server": server, "privacy": {"dpsgd": True}})
    assert config.server.lora_residual_rank == 8


def test_a_plugin_refuses_a_rank_that_is_not_a_positive_integer():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            FedExLora(residual_rank=bad)


# ------------------------------------------------------------------------------------------- through the worker


def test_a_capped_run_through_the_worker_resumes_exactly(tmp_path):
    """The real worker, transport and loop (TinyLoraNet; 3 clients of rank 2 a round, cap 1): k rounds, a
    checkpoint, a fresh server and worker (the clients' copies kept in their store, as simulation.client_state
    keeps them), the rest == an uninterrupted run, bit for bit, and the cap bound (E is not zero)."""
    import torch  # (the strategy-level tests above need no torch)

    from fedtune.client.build import strategy_extensions
    from fedtune.client.worker import ClientWorker
    from fedtune.server.loop import run_rounds
    from fedtune.transport.inprocess import InProcessTransport
    from test_strategies_support import ArrayTask, TinyLoraNet, classification_records, make_config, seeded

    config = make_config(
        server={"lora_aggregation": "fedex", "lora_residual_rank": 1},
        client={},
        federation={"rounds": 4, "clients_per_round": 3},
        eval={"every": 100},
        model={"lora": {"r": 2}},
    )
    records = classification_records(5)

    def run(store: str, state=None, on_round=None):
        ext = strategy_extensions()
        worker = ClientWorker(
            ArrayTask(seeded(TinyLoraNet)),
            records,
            hook_factories=ext.hook_factories,
            update_transforms=ext.update_transforms,
            residual_state=store,
        )
        strategy = build_strategy(config, num_clients=len(records))
        state = state or strategy.init_state(worker.current_params(), worker.view.spec)
        def callback(new_state, report):
            if on_round is not None:
                on_round(new_state)

        return run_rounds(config, strategy, InProcessTransport(worker), state, on_round=callback)

    torch.manual_seed(0)
    uninterrupted = run("memory:capped-e2e-a")
    feedback = [k for k in uninterrupted.arrays if k.startswith(FEEDBACK_PREFIX)]
    assert len(feedback) == 2 and all(np.abs(uninterrupted.arrays[k]).max() > 0 for k in feedback)

    class Crash(Exception):
        pass

    def crash_after_two(state):
        save_state(state, tmp_path / "state.safetensors", config_digest="test")
        if state.round == 2:
            raise Crash

    torch.manual_seed(0)
    with pytest.raises(Crash):
        run("memory:capped-e2e-b", on_round=crash_after_two)
    restored = load_state(tmp_path / "state.safetensors", config_digest="test")
    resumed = run("memory:capped-e2e-b", state=restored)
    np.testing.assert_array_equal(resumed.params, uninterrupted.params)
    assert set(resumed.arrays) == set(uninterrupted.arrays)
    for key, value in uninterrupted.arrays.items():
        np.testing.assert_array_equal(resumed.arrays[key], value, err_msg=key)
