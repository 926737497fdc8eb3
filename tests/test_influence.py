"""One client's influence is bounded, a bad aggregate never becomes the model, and the fold does not depend
on the order replies arrive in (issue #13, items 2, 7 and 8)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import pytest
from rich.console import Console

from fedtune.aggregation.fedavg import WeightedMean
from fedtune.config import parse_config
from fedtune.core.messages import ClientEval, ClientFailure, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState, load_state
from fedtune.errors import NoRoundCompleted
from fedtune.run import session
from fedtune.server.build import build_strategy
from fedtune.server.influence import MEDIAN_KEY, l2_norm
from fedtune.server.loop import run_round
from fedtune.tasks.base import EvalSums

NUMEL = 64
SPEC = ParamSpec(names=("w",), shapes=((NUMEL,),), dtypes=("float32",))


def _delta(i: int) -> np.ndarray:
    """Client i's honest update: magnitudes spread over many decades, so float32 sums depend on order."""
    rng = np.random.default_rng(i)
    return (rng.standard_normal(NUMEL) * 10.0 ** rng.integers(-6, 3, NUMEL)).astype(np.float32)


class Network:
    """Replies in ``order`` (a permutation of the instructions), not the sampled order; scripted attackers."""

    def __init__(self, n: int, *, order: Sequence[int] | None = None, attack: dict[str, tuple] | None = None):
        self.ids = [f"c{i}" for i in range(n)]
        self.order = order
        self.attack = attack or {}  # client id -> (delta, num_examples), or ("fail",)
        self.evaluated: list[list[str]] = []

    def client_ids(self) -> list[str]:
        return list(self.ids)

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate | ClientFailure]:
        order = self.order if self.order is not None else range(len(instructions))
        for k in order:
            instr = instructions[k]
            i = self.ids.index(instr.client_id)
            scripted = self.attack.get(instr.client_id)
            if isinstance(scripted, tuple) and isinstance(scripted[0], str):
                yield ClientFailure(instr.client_id, instr.round, "straggler: no training reply within 1s")
                continue
            delta, n = scripted if scripted is not None else (_delta(i + 10 * instr.round), 10 + i)
            yield ClientUpdate(instr.client_id, instr.round, n, delta, SPEC.digest, metrics={"train_loss": 1.0 + i})

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]:
        self.evaluated.append([instr.client_id for instr in instructions])
        for instr in reversed(instructions):  # arrival order differs from the order asked
            yield ClientEval(instr.client_id, instr.round, EvalSums(loss_sum=float(instr.params[0]) / 3, count=7))

    def close(self) -> None:
        pass


def _config(**server: object):
    return parse_config(
        {"seed": 1, "federation": {"rounds": 2, "clients_per_round": 5}, "server": {"lr": 0.7, **server}}
    )


def _state(config) -> ServerState:
    return build_strategy(config).init_state(np.linspace(-1, 1, NUMEL, dtype=np.float32), SPEC)


@pytest.mark.parametrize("server", [{}, {"optimizer": "adam", "lr": 0.01}, {"update_norm_bound": "adaptive"}])
def test_the_global_model_does_not_depend_on_arrival_order(server) -> None:
    config = _config(**server)
    strategy = build_strategy(config)
    results = set()
    for order in itertools.islice(itertools.permutations(range(5)), 0, 120, 7):
        state = _state(config)
        for _ in range(2):
            state, report = run_round(config, strategy, Network(5, order=order), state)
        results.add((state.params.tobytes(), report.train_loss, report.eval_pooled.loss_sum))
    assert len(results) == 1
    # the oracle that the test can fail: folding the same updates in another order moves the last bits
    folded = set()
    for order in itertools.permutations(range(5)):
        mean = WeightedMean(NUMEL)
        for i in order:
            mean.add(_delta(i + 10), 10.0 + i)
        folded.add(mean.result().tobytes())
    assert len(folded) > 1


def test_an_overflowing_update_is_rejected_and_the_model_kept() -> None:
    """The attack of issue #13: finite 1e30 values claiming 10^12 examples overflow a float32 sum."""
    config = _config()
    strategy, state = build_strategy(config), _state(config)
    attack = {"c2": (np.full(NUMEL, 1e30, np.float32), 10**12)}
    new, report = run_round(config, strategy, Network(5, attack=attack), state)
    assert report.rejected is not None and "not finite" in report.rejected
    assert new.round == 1 and new.params.tobytes() == state.params.tobytes()
    record = session.round_records(report, accuracy=False)[0]
    assert record["status"] == "failed" and record["reason"] == report.rejected


def test_a_finite_but_huge_aggregate_is_rejected() -> None:
    config = _config()
    strategy, state = build_strategy(config), _state(config)
    attack = {"c0": (np.full(NUMEL, 1e20, np.float32), 1)}
    new, report = run_round(config, strategy, Network(5, attack=attack), state)
    assert "max_step_ratio" in report.rejected
    assert new.params.tobytes() == state.params.tobytes()


def test_a_fixed_norm_bound_and_example_cap_bound_one_clients_pull() -> None:
    config = _config(update_norm_bound=2.0, max_examples_per_client=12)
    strategy, state = build_strategy(config), _state(config)
    attack = {"c2": (np.full(NUMEL, 1e30, np.float32), 10**12)}
    new, report = run_round(config, strategy, Network(5, attack=attack), state)
    assert report.rejected is None
    weights = [min(10 + i, 12) for i in range(5)]
    # every update is at most 2.0 long and the attacker weighs at most 12 of sum(weights): the step is bounded
    assert l2_norm(new.params, state.params) <= 0.7 * 2.0 * 1.0001
    attacker = next(c for c in report.clients if c["client_id"] == "c2")
    assert attacker["num_examples"] == 12 and attacker["examples_capped_from"] == 10**12
    assert attacker["update_clipped"] == 1 and attacker["update_norm"] > 1e30
    # oracle: the weighted mean of the clipped updates, folded in sampled order
    mean = WeightedMean(NUMEL)
    for cid, w in zip(report.sampled, [weights[int(c[1:])] for c in report.sampled], strict=True):
        i = int(cid[1:])
        d = attack[cid][0] if cid in attack else _delta(i + 10)
        norm = np.linalg.norm(d.astype(np.float64))
        if norm > 2.0:
            d = (d.astype(np.float64) * (2.0 / norm)).astype(np.float32)
        mean.add(d, float(w))
    want = state.params.astype(np.float64) + 0.7 * mean.result().astype(np.float64)
    np.testing.assert_allclose(new.params, want, rtol=1e-6, atol=1e-7)


def test_the_adaptive_bound_learns_from_the_round_before() -> None:
    config = _config(update_norm_bound="adaptive", adaptive_norm_multiple=3.0)
    strategy, state = build_strategy(config), _state(config)
    attack = {"c4": (np.full(NUMEL, 1e20, np.float32), 10)}
    # round 1: nothing to learn from yet; the huge step is rejected, and the honest median is remembered
    state1, report1 = run_round(config, strategy, Network(5, attack=attack), state)
    assert report1.rejected is not None
    honest = sorted(l2_norm(_delta(i + 10)) for i in range(4))
    assert state1.extra[MEDIAN_KEY] == pytest.approx(float(np.median([*honest, 1e20 * 8])))
    # round 2: the attacker is clipped to 3 x that median and the round goes through
    state2, report2 = run_round(config, strategy, Network(5, attack=attack), state1)
    assert report2.rejected is None
    assert next(c for c in report2.clients if c["client_id"] == "c4")["update_clipped"] == 1
    assert np.isfinite(state2.params).all()


def test_deployment_defaults_bound_the_overflow_attack_from_round_2() -> None:
    """`fedtune server`'s defaults (adaptive norm bound and example cap) against the attack of issue #13."""
    from fedtune.deploy.serve import deployment_defaults

    config = deployment_defaults(_config())
    strategy, state = build_strategy(config), _state(config)
    attack = {"c3": (np.full(NUMEL, 1e30, np.float32), 10**12)}
    state1, report1 = run_round(config, strategy, Network(5, attack=attack), state)
    assert report1.rejected is not None and state1.params.tobytes() == state.params.tobytes()
    assert state1.extra["num_examples_median"] == 12  # declared counts 10, 11, 12, 10^12, 14
    state2, report2 = run_round(config, strategy, Network(5, attack=attack), state1)
    assert report2.rejected is None
    attacker = next(c for c in report2.clients if c["client_id"] == "c3")
    assert attacker["num_examples"] == 36 and attacker["update_clipped"] == 1  # 3 x the medians
    honest = sorted(l2_norm(_delta(i + 20)) for i in (0, 1, 2, 4))
    bound = 3.0 * state1.extra["update_norm_median"]
    total = 10 + 11 + 12 + 36 + 14
    # the attacker's pull on the mean is at most its capped share of the weight times the norm bound
    assert l2_norm(state2.params, state1.params) <= 0.7 * (36 / total * bound + max(honest)) * 1.0001


def test_a_failed_client_is_not_sent_evaluation() -> None:
    config = _config()
    network = Network(5, attack={"c1": ("fail",)})
    run_round(config, build_strategy(config), network, _state(config))
    assert network.evaluated and "c1" not in network.evaluated[-1]
    assert sorted(network.evaluated[-1]) == ["c0", "c2", "c3", "c4"]


def _serve(tmp_path, network: Network, config, **kw):
    cfg = config.model_copy(update={"run": config.run.model_copy(update={"out_dir": str(tmp_path), "plot": False})})
    params = np.linspace(-1, 1, NUMEL, dtype=np.float32)
    return session.coordinate(
        cfg, network, init=(params, SPEC), accuracy=False, console=Console(quiet=True), show_progress=False, **kw
    )


def test_a_run_in_which_every_client_fails_exits_with_an_error(tmp_path) -> None:
    network = Network(5, attack={f"c{i}": ("fail",) for i in range(5)})
    with pytest.raises(NoRoundCompleted, match="none of rounds 1-2"):
        _serve(tmp_path, network, _config())
    run_dir = next(tmp_path.iterdir())
    status = json.loads((run_dir / "status.json").read_text())  # what the dashboard and report.html show
    assert status["state"] == "failed" and "none of rounds 1-2" in status["reason"]
    assert status["rounds_failed"] == [1, 2] and not (run_dir / "summary.json").exists()  # summary: finished runs
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("status") for r in rounds if r["kind"] == "round" and r["round"] > 0] == ["failed", "failed"]
    assert "no client update was accepted (5 of 5 failed)" in summary_reason(rounds)
    state = load_state(run_dir / "checkpoint.safetensors")
    assert state.params.tobytes() == np.linspace(-1, 1, NUMEL, dtype=np.float32).tobytes()


def summary_reason(records: list[dict]) -> str:
    return next(r["reason"] for r in records if r.get("status") == "failed")


def test_a_run_with_some_failed_rounds_still_succeeds(tmp_path) -> None:
    config = _config()
    attack = {"c2": (np.full(NUMEL, 1e30, np.float32), 10**12)}

    class FirstRoundOnly(Network):
        def fit(self, instructions):
            self.attack = attack if instructions[0].round == 1 else {}
            return super().fit(instructions)

    result = _serve(tmp_path, FirstRoundOnly(5), config)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["rounds_failed"] == [1]


def test_serve_counts_scaffold_clients_as_told(tmp_path, monkeypatch) -> None:
    seen = []
    real = session.build_strategy

    def spy(config, *, num_clients=None):
        seen.append(num_clients)
        return real(config, num_clients=num_clients)

    monkeypatch.setattr(session, "build_strategy", spy)
    _serve(tmp_path / "a", Network(5), _config())
    _serve(tmp_path / "b", Network(5), _config(), num_clients=None)
    assert seen == [5, None]


def test_update_norm_bound_rejects_nonsense() -> None:
    with pytest.raises(Exception, match="update_norm_bound"):
        _config(update_norm_bound="sometimes")
    with pytest.raises(Exception, match="update_norm_bound"):
        _config(update_norm_bound=-1.0)
    assert _config(update_norm_bound=0.5).server.update_norm_bound == 0.5


def test_bounds_never_mutate_the_update() -> None:
    from fedtune.server.influence import Bounds

    update = ClientUpdate("c0", 1, 10**9, np.full(NUMEL, 100.0, np.float32), SPEC.digest)
    kept = update.delta.copy()
    bounded, info = Bounds(max_examples=5, norm_bound=1.0, measure=True).apply(update)
    assert bounded.num_examples == 5 and l2_norm(bounded.delta) == pytest.approx(1.0, rel=1e-6)
    assert update.delta.tobytes() == kept.tobytes() and update.num_examples == 10**9
    same, info = Bounds(max_examples=None, norm_bound=None, measure=False).apply(update)
    assert same is update and info == {}
    assert replace(update).delta is update.delta


def _declared(over: str = "cap", clients: int = 5):
    """Clients c0..c{clients-1} declared at enrolment with the counts they report honestly (10 + i)."""
    declared = {f"c{i}": 10 + i for i in range(clients)}
    return parse_config(
        {
            "seed": 1,
            "federation": {"rounds": 2, "clients_per_round": 5},
            "server": {"lr": 0.7},
            "deployment": {"declared_examples": declared, "over_declared": over},
        }
    )


def test_a_claim_above_the_count_declared_at_enrolment_is_weighted_as_declared(caplog) -> None:
    config = _declared()
    strategy, state = build_strategy(config), _state(config)
    inflated = {"c2": (_delta(2 + 10), 10**12)}  # c2's honest update (round 1), claiming 10^12 examples
    new, report = run_round(config, strategy, Network(5, attack=inflated), state)
    honest, _ = run_round(config, strategy, Network(5), state)  # the oracle: c2 claims its declared 12
    assert report.rejected is None and new.params.tobytes() == honest.params.tobytes()
    c2 = next(c for c in report.clients if c["client_id"] == "c2")
    assert c2["num_examples"] == 12 and c2["examples_capped_from"] == 10**12 and c2["examples_declared"] == 12
    assert "client c2 claims 1000000000000 training examples, more than the 12 declared at enrolment" in caplog.text


def test_over_declared_refuse_refuses_the_update_and_an_undeclared_client_is_refused() -> None:
    config = _declared("refuse")
    strategy, state = build_strategy(config), _state(config)
    new, report = run_round(config, strategy, Network(5, attack={"c2": (_delta(12), 13)}), state)
    without, _ = run_round(config, strategy, Network(5, attack={"c2": ("fail",)}), state)  # oracle: c2 absent
    assert [f.reason for f in report.failures] == [
        "rejected: claims 13 training examples, more than the 12 declared at enrolment"
    ]
    assert new.params.tobytes() == without.params.tobytes()
    config = _declared(clients=4)  # c4 is sampled but has no declared count
    _, report = run_round(config, strategy, Network(5), state)
    assert [(f.client_id, f.reason) for f in report.failures] == [
        ("c4", "rejected: client 'c4' declared no example count at enrolment")
    ]


def test_declared_examples_must_name_the_allowed_clients() -> None:
    from fedtune.config.deployment import DeploymentConfig

    with pytest.raises(ValueError, match="no count for b; c not allowed to join"):
        DeploymentConfig(allowed_clients=["a", "b"], declared_examples={"a": 5, "c": 3})
    assert DeploymentConfig(allowed_clients=["a", "b"], declared_examples={"a": 5, "b": 3}).over_declared == "cap"
