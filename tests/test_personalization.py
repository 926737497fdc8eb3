"""Personalisation against oracles, through the real worker, transport, strategy and loop (tiny LoRA net).

FedSA-LoRA: only A travels; after a round the global A is the example-weighted mean of the clients' trained
A, and each client's stored B is the B a plain local_train of the whole adapter gives (oracle); round 2
starts from the client's own B. FedPer: the local parameters are outside every message (a transport spy).
Ditto: lambda=0 is independent local training (oracle: local_train in a loop) and leaves the global model
bit-identical to a run without Ditto; a large lambda pulls the personal model onto the global one.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from fedtune.client.build import strategy_extensions
from fedtune.client.personal import FINETUNED, NS_DITTO, NS_LOCAL, PERSONAL, Personalizer
from fedtune.client.train import LocalHooks, LocalRun, local_train
from fedtune.client.weights import TrainableView
from fedtune.config.schema import Config
from fedtune.core.messages import ClientEval
from fedtune.core.rng import derive_seed
from fedtune.core.state_store import open_state_store
from fedtune.errors import ModelError
from fedtune.models.lora import trainable_parameters
from fedtune.models.personal import freeze_local_params, local_parameters
from fedtune.server.build import build_strategy
from fedtune.server.loop import run_rounds
from fedtune.transport.inprocess import InProcessTransport
from test_strategies_support import ArrayTask, TinyLoraNet, classification_records, make_config, seeded

LATEST = 1 << 40


class Spy:
    """The in-process transport, recording every array that crosses it."""

    def __init__(self, inner: InProcessTransport) -> None:
        self.inner = inner
        self.sent: list[np.ndarray] = []
        self.received: list[np.ndarray] = []

    def client_ids(self) -> list[str]:
        return self.inner.client_ids()

    def fit(self, instructions):
        for instr in instructions:
            self.sent += [instr.params, *instr.extras.values()]
        for reply in self.inner.fit(instructions):
            if hasattr(reply, "delta"):
                self.received += [reply.delta, *reply.extras.values()]
            yield reply

    def evaluate(self, instructions):
        for instr in instructions:
            self.sent += [instr.params, *instr.extras.values()]
        yield from self.inner.evaluate(instructions)


def personal_config(personalization: dict, *, rounds: int = 2, **sections) -> Config:
    return make_config(
        federation={"rounds": rounds, "clients_per_round": 3},
        personalization=personalization,
        model={"lora": {"r": 2}},
        **sections,
    )


def build(config: Config, records):
    """(task, worker, store): a worker with the config's personalisation, state in a fresh memory store."""
    task = ArrayTask(seeded(TinyLoraNet))
    freeze_local_params(task.module, config.personalization)  # what build_run_task does
    address = f"memory:{uuid.uuid4().hex}"
    personal = Personalizer(
        config.personalization, config.client, state=address, seed=config.seed, rounds=config.federation.rounds
    )
    ext = strategy_extensions()
    from fedtune.client.worker import ClientWorker

    worker = ClientWorker(task, records, hook_factories=ext.hook_factories, personal=personal)
    return task, worker, open_state_store(address)


def federate(config: Config, worker, *, spy: bool = False):
    transport = Spy(InProcessTransport(worker)) if spy else InProcessTransport(worker)
    strategy = build_strategy(config, num_clients=len(worker.records))
    states, reports = [], []
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    states.append(state)

    def record(new, report):
        states.append(new)
        reports.append(report)

    run_rounds(config, strategy, transport, state, on_round=record)
    return states, reports, transport


def oracle_train(config: Config, records, cid: str, round_idx: int, start: dict[str, torch.Tensor], *, seed=None):
    """A plain local_train of the whole adapter (A and B trainable) from ``start``: what the client should do."""
    task = ArrayTask(seeded(TinyLoraNet))
    params = trainable_parameters(task.module)
    with torch.no_grad():
        for name, value in start.items():
            params[name].copy_(value)
    examples = task.encode(records[cid][0], train=True)
    local_train(
        task,
        examples,
        config.client,
        LocalRun(config.seed if seed is None else seed, round_idx, cid, rounds=config.federation.rounds),
        hooks=LocalHooks(),
    )
    return {n: p.detach().clone() for n, p in trainable_parameters(task.module).items()}


def unflat(flat: np.ndarray, view: TrainableView) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(flat[a:b].copy()).view(s) for n, a, b, s in view.spec.offsets()}


def test_fedsa_shares_a_only_averages_it_and_keeps_each_clients_b() -> None:
    config = personal_config({"method": "fedsa"})
    records = classification_records(3)
    task, worker, store = build(config, records)
    assert all(".lora_A." in n for n in worker.view.spec.names), worker.view.spec.names
    initial = {n: p.detach().clone() for n, p in task.module.named_parameters() if "lora_" in n}
    states, reports, spy = federate(config, worker, spy=True)
    # only A crosses the transport, in both directions
    assert {a.size for a in spy.sent + spy.received} == {worker.view.spec.numel}
    ids = sorted(records)

    # round 1: oracle from the common initial adapter
    start = {n.replace(".default", ""): v for n, v in initial.items()}
    trained = {cid: oracle_train(config, records, cid, 1, start) for cid in ids}
    a_names = list(worker.view.spec.names)
    counts = [len(records[cid][0]) for cid in ids]
    for name in a_names:
        mean = np.average([trained[cid][name].numpy() for cid in ids], axis=0, weights=counts)
        got = unflat(states[1].params, worker.view)[name].numpy()
        np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-6)
    round1_b = {cid: store.load(cid, NS_LOCAL, round=2).arrays for cid in ids}
    for cid in ids:
        for name, value in round1_b[cid].items():
            np.testing.assert_allclose(value, trained[cid][name].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(round1_b[ids[0]]["q_proj.lora_B.weight"], round1_b[ids[1]]["q_proj.lora_B.weight"])

    # round 2 starts from the aggregated A and the client's OWN B
    for cid in ids:
        start = unflat(states[1].params, worker.view) | {n: torch.from_numpy(v) for n, v in round1_b[cid].items()}
        expected = oracle_train(config, records, cid, 2, start)
        for name, value in store.load(cid, NS_LOCAL, round=LATEST).arrays.items():
            np.testing.assert_allclose(value, expected[name].numpy(), rtol=1e-5, atol=1e-6)
    # outside a fit the resident model holds the initial B again (the global model's evaluation saw that)
    for name, param in local_parameters(task.module).items():
        assert torch.equal(param, start_b(initial, name)) and not param.requires_grad
    # and evaluation reports each client's personalised metric beside the global one
    last = reports[-1]
    assert set(last.eval_personal) == {PERSONAL} and set(last.eval_personal[PERSONAL]) == set(last.eval_clients)
    assert any(last.eval_personal[PERSONAL][c] != last.eval_clients[c] for c in ids)


def start_b(initial: dict[str, torch.Tensor], stable: str) -> torch.Tensor:
    return next(v for n, v in initial.items() if n.replace(".default", "") == stable)


def test_fedper_local_parameters_never_cross_the_transport() -> None:
    config = personal_config({"method": "fedper", "local_params": ["v_proj.*"]})
    records = classification_records(3)
    _task, worker, store = build(config, records)
    assert not any(n.startswith("v_proj") for n in worker.view.spec.names)
    _, reports, spy = federate(config, worker, spy=True)
    local = {cid: store.load(cid, NS_LOCAL, round=LATEST).arrays for cid in records}
    assert set(local["c0"]) == {"v_proj.lora_A.weight", "v_proj.lora_B.weight"}
    # no array that crossed the transport has the size of, or contains, any client's local values
    local_sizes = {v.size for arrays in local.values() for v in arrays.values()}
    assert {a.size for a in spy.sent + spy.received} == {worker.view.spec.numel}
    assert worker.view.spec.numel not in local_sizes
    values = np.concatenate([v.ravel() for arrays in local.values() for v in arrays.values()])
    crossed = np.concatenate([a.ravel() for a in spy.sent + spy.received])
    assert not np.isin(values, crossed).any()
    assert reports[-1].eval_personal[PERSONAL]


def ditto_run(lam: float, rounds: int = 3):
    config = personal_config(
        {"method": "ditto", "ditto_lambda": lam},
        rounds=rounds,
        client={"local_steps": 4, "lr": 0.1, "optimizer": "sgd"},
    )
    records = classification_records(3)
    _task, worker, store = build(config, records)
    states, reports, _ = federate(config, worker)
    return config, records, worker, store, states, reports


def test_ditto_lambda_zero_is_independent_local_training_and_leaves_the_global_model_alone() -> None:
    config, records, worker, store, states, _ = ditto_run(0.0)
    initial = unflat(states[0].params, worker.view)
    for cid in records:  # every client is sampled every round: v_k trained 3 times from the initial model
        v = initial
        for r in (1, 2, 3):
            v = oracle_train(config, records, cid, r, v, seed=derive_seed(config.seed, "ditto"))
        got = unflat(store.load(cid, NS_DITTO, round=LATEST).arrays["params"], worker.view)
        for name in v:
            torch.testing.assert_close(got[name], v[name], rtol=1e-5, atol=1e-6)
    # the global model is exactly what the same run without Ditto computes
    plain = personal_config({}, rounds=3, client={"local_steps": 4, "lr": 0.1, "optimizer": "sgd"})
    _, plain_worker, _ = build(plain, records)
    plain_states, _, _ = federate(plain, plain_worker)
    np.testing.assert_array_equal(states[-1].params, plain_states[-1].params)


def test_ditto_large_lambda_pulls_the_personal_model_onto_the_global_one() -> None:
    def distance(lam: float) -> float:
        _, records, _worker, store, states, _ = ditto_run(lam)
        anchor = states[-2].params  # the global model the clients received in the last round
        return max(
            float(np.linalg.norm(store.load(c, NS_DITTO, round=LATEST).arrays["params"] - anchor)) for c in records
        )

    # sgd lr 0.1: v settles near w - grad F(v) / lambda, so the distance falls like 1 / lambda
    free, some, pulled = distance(0.0), distance(1.0), distance(9.0)
    assert pulled < some < free and pulled < 0.3 * free, (pulled, some, free)


def test_finetuning_after_the_last_round_is_reported_and_matches_an_oracle() -> None:
    config = personal_config({"finetune_steps": 3}, rounds=2)
    records = classification_records(3)
    _task, worker, _store = build(config, records)
    states, reports, _ = federate(config, worker)
    assert FINETUNED not in reports[0].eval_personal  # only after the last round
    last = reports[-1].eval_personal[FINETUNED]
    assert set(last) == set(records)
    for cid in records:
        steps = config.client.model_copy(update={"local_steps": 3})
        tuned = ArrayTask(seeded(TinyLoraNet))
        TrainableView(tuned.module).write(states[-1].params)
        local_train(
            tuned,
            tuned.encode(records[cid][0], train=True),
            steps,
            LocalRun(derive_seed(config.seed, "finetune"), 2, cid),
        )
        held_out = tuned.collate(tuned.encode(records[cid][1], train=False))
        assert last[cid] == tuned.eval_batch(held_out)


def test_local_patterns_must_match_and_leave_something_shared() -> None:
    from fedtune.config.personalization import PersonalizationConfig

    with pytest.raises(ModelError, match="matches no trainable parameter"):
        freeze_local_params(TinyLoraNet(), PersonalizationConfig(method="fedper", local_params=["*head*"]))
    with pytest.raises(ModelError, match="nothing would be shared"):
        freeze_local_params(TinyLoraNet(), PersonalizationConfig(method="fedper", local_params=["re:."]))
    net = TinyLoraNet()
    local = freeze_local_params(net, PersonalizationConfig(method="fedper", local_params=["re:^v_proj"]))
    assert set(local) == {"v_proj.lora_A.weight", "v_proj.lora_B.weight"}
    assert set(trainable_parameters(net)) == {"q_proj.lora_A.weight", "q_proj.lora_B.weight"}


def test_client_eval_personal_sums_cross_the_grpc_wire() -> None:
    from fedtune.errors import UpdateRejected
    from fedtune.tasks.base import EvalSums
    from fedtune.transport.grpc.protocol import eval_from_result, eval_result_payload

    sent = ClientEval("c0", 3, EvalSums(2.5, 5, 3, 5), {PERSONAL: EvalSums(1.0, 5, 4, 5)})
    payload = eval_result_payload(sent, task_id="t", session="s")
    assert eval_from_result(payload, client_id="c0") == sent
    plain = eval_result_payload(ClientEval("c0", 3, EvalSums(2.5, 5, 3, 5)), task_id="t", session="s")
    assert eval_from_result(plain, client_id="c0").personal == {}
    payload.scalars["personal"] = {"stolen": payload.scalars["personal"][PERSONAL]}
    with pytest.raises(UpdateRejected, match="personal"):
        eval_from_result(payload, client_id="c0")
    payload.scalars["personal"] = {PERSONAL: {"loss_sum": 1.0, "count": 5, "correct": 6, "examples": 5}}
    with pytest.raises(UpdateRejected, match="inconsistent"):
        eval_from_result(payload, client_id="c0")


REFUSED = {
    "unknown key": ({"personalization": {"method": "fedsa", "lamda": 1}}, "lamda"),
    "unknown method": ({"personalization": {"method": "pfedme"}}, "method"),
    "fedper without names": ({"personalization": {"method": "fedper"}}, "local_params"),
    "names without fedper/fedsa": ({"personalization": {"method": "ditto", "local_params": ["x"]}}, "local_params"),
    "lambda without ditto": ({"personalization": {"method": "fedsa", "ditto_lambda": 1.0}}, "ditto_lambda"),
    "fedsa without lora": ({"personalization": {"method": "fedsa"}, "model": {"lora": None}}, "model.lora"),
    "fedsa with ffa": ({"personalization": {"method": "fedsa"}, "server": {"lora_aggregation": "ffa"}}, "ffa"),
    "ditto with fedex": ({"personalization": {"method": "ditto"}, "server": {"lora_aggregation": "fedex"}}, "fedex"),
    "dp-sgd": (
        {"personalization": {"method": "ditto"}, "privacy": {"dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}},
        "dpsgd",
    ),
    "hf trainer": ({"personalization": {"finetune_steps": 2}, "client": {"trainer": "hf"}}, "builtin"),
    "stragglers": (
        {"personalization": {"method": "fedsa"}, "client": {"local_steps": 3, "straggler_fraction": 0.5}},
        "straggler",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_config_refuses_what_personalisation_cannot_honour(case: str) -> None:
    from fedtune.config import parse_config
    from fedtune.errors import ConfigError

    sections, key = REFUSED[case]
    with pytest.raises(ConfigError, match=key):
        parse_config(sections)


def test_config_accepts_privacy_that_sees_only_the_shared_part() -> None:
    """SecAgg sums, and DP-FedAvg clips and noises, the shared update only: local parts never leave."""
    from fedtune.config import parse_config

    cfg = parse_config(
        {
            "personalization": {"method": "fedsa"},
            "server": {"weighting": "uniform"},
            "privacy": {"dp": {"noise_multiplier": 1.0, "clip": 1.0}, "secure_aggregation": {}},
        }
    )
    assert cfg.personalization.method == "fedsa"
