"""The round contract (fedtune.core.strategy): declared needs, begin_round once a round, the loop forming a sum
strategy's sum (in the clear or over what the transport declares), no synthetic updates, no stand-in vectors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from fedtune.aggregation.robust import make_aggregator
from fedtune.aggregation.server_opt import make_server_optimizer
from fedtune.config import parse_config
from fedtune.core.messages import ClientEval, ClientUpdate, EvalInstruction, FitInstruction, HeldUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.sums import LinearSum, SumPlan
from fedtune.errors import ConfigError
from fedtune.privacy.dp_fedavg import DPFedAvg
from fedtune.privacy.errors import PrivacyError, SecAggAbort
from fedtune.privacy.secagg.driver import SecureSummer
from fedtune.privacy.sums import plain_sum
from fedtune.server.loop import aggregate_round, run_rounds
from fedtune.server.strategies import ClientOptions, FedExLora, FedOpt, FfaLora, Scaffold
from fedtune.server.summing import summer_for
from fedtune.tasks.base import EvalSums
from fedtune.transport.base import SIMULATED, Capabilities

D = 6
SPEC = ParamSpec(names=("w",), shapes=((D,),), dtypes=("float32",))


def updates(k: int, round_idx: int = 1) -> list[ClientUpdate]:
    rng = np.random.default_rng(k)
    return [
        ClientUpdate(f"c{i}", round_idx, 3 + i, (0.1 * rng.standard_normal(D)).astype(np.float32), SPEC.digest)
        for i in range(k)
    ]


def test_needs_are_declared_by_the_parts_and_composed() -> None:
    assert FedOpt(plugins=(ClientOptions({"proximal_mu": 0.1}, name="fedprox"), FfaLora())).needs.linear
    nonlinear = FedOpt(aggregator=make_aggregator("median"), plugins=(Scaffold(), FedExLora())).needs
    assert nonlinear.individual == ("server.aggregator 'median'", "the 'scaffold' plug-in", "the 'fedex' plug-in")
    assert nonlinear.extras == ("scaffold/dc",)
    with pytest.raises(ConfigError, match="the 'scaffold' plug-in needs individual updates"):
        DPFedAvg(FedOpt(plugins=(Scaffold(),)), parse_config(_dp_cfg()).privacy.dp, parse_config(_dp_cfg()).federation,
                 seed=0)  # fmt: skip


def test_step_mean_is_the_fold_of_the_mean_as_one_update() -> None:
    """What the DP and SecAgg wrappers step with: bit-identical to folding one update carrying the mean."""
    strategy = FedOpt(optimizer=make_server_optimizer("adam", lr=0.1), weighting="uniform")
    state = strategy.init_state(np.linspace(-1, 1, D, dtype=np.float32), SPEC)
    mean = np.random.default_rng(3).standard_normal(D)  # float64, as a noised sum divided by m is
    one = ClientUpdate("aggregate", 1, 1, mean.astype(np.float32), SPEC.digest)
    folded, _ = strategy.aggregate(state, [one])
    stepped, metrics = strategy.step_mean(state, mean)
    assert np.array_equal(folded.params, stepped.params) and metrics["aggregated"] == 1
    assert all(np.array_equal(folded.arrays[k], stepped.arrays[k]) for k in folded.arrays)


class Population:
    def __init__(self, n: int) -> None:
        self.ids = [f"c{i}" for i in range(n)]
        self.capabilities = SIMULATED

    def client_ids(self) -> list[str]:
        return list(self.ids)

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate]:
        for instr in instructions:
            delta = np.full(D, 0.01 * (self.ids.index(instr.client_id) + 1), np.float32)
            yield ClientUpdate(instr.client_id, instr.round, 5, delta, SPEC.digest, extras={})

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval]:
        for instr in instructions:
            yield ClientEval(instr.client_id, instr.round, EvalSums(1.0, 1))

    def close(self) -> None:
        pass


def _dp_cfg(rounds: int = 3) -> dict:
    return {
        "federation": {"rounds": rounds, "clients_per_round": 4},
        "server": {"weighting": "uniform"},
        "eval": {"every": 100},
        "privacy": {"dp": {"clip": 1.0, "noise_multiplier": 1.0, "sampling": "fixed"}},
    }


class Counting(DPFedAvg):
    begun = 0

    def begin_round(self, state, *, population):  # type: ignore[no-untyped-def]
        Counting.begun += 1
        return super().begin_round(state, population=population)


def test_the_loop_begins_each_round_once_and_forms_the_planned_sum() -> None:
    cfg = parse_config(_dp_cfg())
    dp = Counting(FedOpt(weighting="uniform"), cfg.privacy.dp, cfg.federation, seed=1)
    plans: list[SumPlan] = []

    def summer(replies, plan: SumPlan) -> LinearSum:  # type: ignore[no-untyped-def]
        plans.append(plan)
        return plain_sum(replies, plan)

    Counting.begun = 0
    final = run_rounds(cfg, dp, Population(10), dp.init_state(np.zeros(D, np.float32), SPEC), summer=summer)
    assert final.round == 3 and Counting.begun == 3
    assert [p.round for p in plans] == [1, 2, 3] and all(p.l2_bound == 1.0 for p in plans)
    assert not hasattr(dp, "summer")  # the strategy holds neither a summer nor a transport


def test_an_aborted_sum_reaches_the_strategy_as_a_reason() -> None:
    cfg = parse_config(_dp_cfg())
    dp = DPFedAvg(FedOpt(weighting="uniform"), cfg.privacy.dp, cfg.federation, seed=1)
    state = dp.begin_round(dp.init_state(np.zeros(D, np.float32), SPEC), population=10)

    def aborting(replies, plan):  # type: ignore[no-untyped-def]
        raise SecAggAbort("only 2 of 4 masked inputs")

    new, metrics = aggregate_round(dp, state, iter(updates(4)), aborting)
    assert metrics["secagg_abort"] == "only 2 of 4 masked inputs" and metrics["dp_charged"] == 0
    assert np.array_equal(new.params, state.params) and new.round == 1


def test_the_summer_follows_the_transports_declared_capabilities() -> None:
    plain = parse_config({})
    secagg = parse_config({"privacy": {"secure_aggregation": True}})

    class Network:
        def __init__(self, capabilities: Capabilities) -> None:
            self.capabilities = capabilities

        def secagg_exchange(self, round_idx, stage, messages):  # type: ignore[no-untyped-def]
            return {}

    assert summer_for(plain, Network(Capabilities())) is plain_sum
    local = summer_for(secagg, Network(SIMULATED))
    assert isinstance(local, SecureSummer) and local.network is None  # simulated over the handed-over updates
    carrier = Network(Capabilities(secure_sum=True))
    remote = summer_for(secagg, carrier)
    assert isinstance(remote, SecureSummer) and remote.network is carrier
    with pytest.raises(ConfigError, match="plaintext"):
        summer_for(secagg, Network(Capabilities()))


def test_held_updates_are_summed_only_by_secagg_over_the_network() -> None:
    held = [HeldUpdate(f"c{i}", 1, 5, SPEC.digest) for i in range(3)]
    plan = SumPlan(round=1, numel=D)
    with pytest.raises(PrivacyError, match="in the clear"):
        plain_sum(held, plan)
    with pytest.raises(PrivacyError, match="no SecAgg network"):
        SecureSummer(parse_config({"privacy": {"secure_aggregation": True}}).privacy.secure_aggregation, seed=0)(
            held, plan
        )
    with pytest.raises(PrivacyError, match="folds each one"):
        aggregate_round(FedOpt(), FedOpt().init_state(np.zeros(D, np.float32), SPEC), iter(held), plain_sum)
