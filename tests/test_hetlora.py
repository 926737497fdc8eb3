"""HetLoRA's rank self-pruning and sparsity-weighted aggregation (server.hetlora), and fine-tuning after
federation at each client's own rank, against hand-computed matrices and plain rank-r_k peft oracles."""

from __future__ import annotations

import copy
import logging
import math
import uuid

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedtune.aggregation.lora import lora_pairs
from fedtune.aggregation.lora_ranks import kept_rank, product_norm, tail_norm, zero_beyond
from fedtune.client.build import strategy_extensions
from fedtune.client.personal import FINETUNED, NS_FINETUNED, Personalizer
from fedtune.client.train import LocalHooks, LocalRun, local_train
from fedtune.client.worker import ClientWorker, evaluate_examples
from fedtune.config.schema import ClientConfig
from fedtune.core.keys import (
    CLIENT_RANK_EXTRA,
    CLIENT_RSLORA_EXTRA,
    NEXT_RANK_METRIC,
    PRUNE_GAMMA_OPTION,
    PRUNE_LAMBDA_OPTION,
    PRUNE_NORM_METRIC,
    PRUNE_PREVIOUS_OPTION,
    RANK_OPTION,
)
from fedtune.core.messages import ClientUpdate, EvalInstruction, FitInstruction
from fedtune.core.params import ParamSpec
from fedtune.core.rng import derive_seed
from fedtune.core.state import load_state, save_state
from fedtune.core.state_store import open_state_store
from fedtune.server.build import build_strategy
from fedtune.server.strategies.lora_ranks import PRUNED_PREFIX
from test_lora_ranks import ALPHA, D_IN, FULL, factors, layer, peft_net, scaling
from test_lora_ranks import Net as RankNet
from test_strategies_support import ArrayTask, classification_records, make_config

# one LoRA module of rank 3: A (3, 2), B (2, 3); flat order A then B
SPEC = ParamSpec(("m.lora_A.weight", "m.lora_B.weight"), ((3, 2), (2, 3)), ("float32",) * 2)
A = np.array([[1.0, 2.0], [0.0, 3.0], [4.0, 0.0]])
B = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])


def flat(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.concatenate([a.reshape(-1), b.reshape(-1)]).astype(np.float32)


# --------------------------------------------------------------------------------------------- the math


def test_tail_norm_product_norm_and_kept_rank_against_hand_computed_matrices():
    pairs = lora_pairs(SPEC)
    # gamma 0.5 of rank 3: keep floor(1.5) = 1; the tail is B[:, 1:3] = [[0, 2], [1, 2]] (norm 3) and
    # A[1:3] = [[0, 3], [4, 0]] (norm 5)
    assert kept_rank(3, 0.5) == 1
    assert tail_norm(flat(B, A), pairs, 3, 0.5) == pytest.approx(3.0 * 5.0)
    # a rank-2 client: g = floor(1.0) = 1, tail B[:, 1:2] = [[0], [1]] (1), A[1:2] = [[0, 3]] (3)
    assert tail_norm(flat(B, A), pairs, 2, 0.5) == pytest.approx(1.0 * 3.0)
    # ||B[:, :2] A[:2]||_F: B[:, :2] A[:2] = [[1, 2], [0, 3]], norm sqrt(14)
    assert product_norm(flat(B, A), pairs, 2) == pytest.approx(math.sqrt(14.0))
    cut = zero_beyond(flat(B, A), pairs, 1)
    np.testing.assert_array_equal(cut, flat(np.array([[1.0, 0, 0], [0, 0, 0]]), np.array([[1.0, 2], [0, 0], [0, 0]])))
    assert [kept_rank(r, g) for r, g in ((100, 0.29), (8, 0.75), (2, 0.75), (1, 0.9))] == [29, 6, 1, 0]


def test_hetlora_section_is_validated_naming_its_keys():
    lora = {"lora": {"r": 4}}
    with pytest.raises(ValidationError, match="prune_gamma"):
        make_config(model=lora, server={"lora_aggregation": "hetlora", "hetlora": {"prune_gamma": 1.0}})
    with pytest.raises(ValidationError, match="prune_lambda is the self-pruning regulariser: it needs prune_gamma"):
        make_config(model=lora, server={"lora_aggregation": "hetlora", "hetlora": {"prune_lambda": 0.1}})
    with pytest.raises(ValidationError, match=r"aggregation 'sparsity' .* needs server\.aggregator 'mean'"):
        make_config(
            model=lora,
            server={"lora_aggregation": "hetlora", "aggregator": "median", "hetlora": {"aggregation": "sparsity"}},
        )
    with pytest.raises(ValidationError, match=r"server\.hetlora only applies to lora_aggregation 'hetlora'"):
        make_config(model=lora, server={"lora_aggregation": "flora", "hetlora": {"prune_gamma": 0.5}})


# --------------------------------------------------------------------------------------------- the server


def het_strategy(hetlora: dict, ranks: dict[str, int]):
    config = make_config(
        model={"lora": {"r": 3}},
        server={"lora_aggregation": "hetlora", "lora_client_ranks": ranks, "hetlora": hetlora},
    )
    strategy = build_strategy(config)
    rng = np.random.default_rng(0)
    state = strategy.init_state(rng.normal(size=SPEC.numel).astype(np.float32), SPEC)
    return strategy, state


def reply(state, cid: str, local: np.ndarray, *, n: int = 10, **metrics: float) -> ClientUpdate:
    return ClientUpdate(cid, state.round + 1, n, (local - state.params).astype(np.float32), SPEC.digest, metrics)


def test_sparsity_weighted_aggregation_is_the_norm_weighted_mean_of_the_padded_adapters():
    strategy, state = het_strategy({"aggregation": "sparsity"}, {"c0": 1, "c1": 3})
    b0, a0 = np.array([[2.0, 0, 0], [0, 0, 0]]), np.array([[0.0, 3.0], [0, 0], [0, 0]])  # B0 A0 = [[0, 6], [0, 0]]
    junk = flat(np.array([[2.0, 5, 5], [0, 5, 5]]), np.array([[0.0, 3], [5, 5], [5, 5]]))  # c0 beyond its rank
    local1 = flat(B, A)  # B A = [[9, 2], [8, 3]]: norm sqrt(158)
    s0, s1 = 6.0, math.sqrt(81 + 4 + 64 + 9)
    new, _ = strategy.aggregate(state, [reply(state, "c0", junk, n=1), reply(state, "c1", local1, n=100)])
    expected = (s0 * flat(b0, a0).astype(np.float64) + s1 * local1) / (s0 + s1)  # the example counts play no part
    np.testing.assert_allclose(new.params, expected, rtol=1e-6, atol=1e-6)
    # the default weights are the data weights (the zero-padding average as before)
    plain, state0 = het_strategy({}, {"c0": 1, "c1": 3})
    padded = flat(b0, a0)
    new, _ = plain.aggregate(state0, [reply(state0, "c0", padded, n=1), reply(state0, "c1", local1, n=3)])
    np.testing.assert_allclose(new.params, (1 * padded + 3 * local1) / 4, rtol=1e-6, atol=1e-6)


def test_self_pruning_records_lower_the_next_payload_and_survive_a_checkpoint(tmp_path, caplog):
    strategy, state = het_strategy({"prune_gamma": 0.5, "prune_lambda": 0.1}, {"c0": 3, "c1": 2})
    _, first = strategy.fit_payload(state, "c0")
    assert first == {PRUNE_GAMMA_OPTION: 0.5, PRUNE_LAMBDA_OPTION: 0.1}  # full rank, nothing to compare with yet
    local = flat(B, A)
    state, metrics = strategy.aggregate(
        state,
        [
            reply(state, "c0", local, lora_rank=3.0, **{PRUNE_NORM_METRIC: 15.0, NEXT_RANK_METRIC: 3.0}),
            reply(state, "c1", zero_beyond(local, lora_pairs(SPEC), 2), lora_rank=2.0, **{PRUNE_NORM_METRIC: 3.0}),
        ],
    )
    assert metrics["hetlora_mean_rank"] == 3.0  # c1 announced no next rank: nothing recorded for it
    assert strategy.fit_payload(state, "c0")[1][PRUNE_PREVIOUS_OPTION] == 15.0
    assert PRUNE_PREVIOUS_OPTION not in strategy.fit_payload(state, "c1")[1]
    # c0 prunes to floor(0.5 * 3) = 1: from now on it is sent rank 1, and no norm (the tail window moved)
    state, _ = strategy.aggregate(
        state, [reply(state, "c0", local, lora_rank=3.0, **{PRUNE_NORM_METRIC: 2.0, NEXT_RANK_METRIC: 1.0})]
    )
    after = strategy.fit_payload(state, "c0")[1]
    assert after[RANK_OPTION] == 1 and PRUNE_PREVIOUS_OPTION not in after
    path = tmp_path / "checkpoint.safetensors"
    save_state(state, path, config_digest="x")
    resumed = load_state(path)
    assert strategy.fit_payload(resumed, "c0") == strategy.fit_payload(state, "c0")
    np.testing.assert_array_equal(resumed.arrays[PRUNED_PREFIX + "c0"][:1], [1.0])
    # a reply claiming a rank above the one it trained at is not believed
    with caplog.at_level(logging.WARNING):
        bogus, _ = strategy.aggregate(
            resumed,
            [reply(resumed, "c1", local, lora_rank=2.0, **{PRUNE_NORM_METRIC: 1.0, NEXT_RANK_METRIC: 3.0})],
        )
    assert "reports self-pruning to rank 3" in caplog.text and PRUNED_PREFIX + "c1" not in bogus.arrays


# --------------------------------------------------------------------------------------------- the client


def rank_worker(seed: int = 0, *, rslora: bool = False):
    torch.manual_seed(seed)
    base = RankNet()
    model = peft_net(base, FULL, rslora)
    with torch.no_grad():  # a non-zero global adapter, so truncation and the tail matter
        for name in ("q_proj", "v_proj"):
            layer(model, name).lora_B["default"].weight.normal_(0, 0.3)
    records = classification_records(2, dim=D_IN)
    ext = strategy_extensions()
    worker = ClientWorker(ArrayTask(model), records, hook_factories=ext.hook_factories)
    return base, model, worker, ext


CLIENT = {"optimizer": "adamw", "lr": 0.05, "local_steps": 4, "batch_size": 4, "max_grad_norm": None}


def fit_instruction(worker, cid: str, **options) -> FitInstruction:
    return FitInstruction(
        cid, 1, worker.current_params(), worker.view.spec.digest, 3, ClientConfig(**CLIENT), options=options
    )


def test_self_pruning_client_trains_with_the_papers_regulariser_and_prunes_when_the_tail_fell():
    _, model, worker, ext = rank_worker()
    start = copy.deepcopy(model)
    gamma, lam = 0.5, 0.7
    instr = fit_instruction(worker, "c0", **{PRUNE_GAMMA_OPTION: gamma, PRUNE_LAMBDA_OPTION: lam})
    update = worker.fit(instr)
    # oracle: the same rank-16 adapter trained by a plain local_train with the paper's term added to the loss
    params = {n: p for n, p in start.named_parameters() if p.requires_grad}
    g = kept_rank(FULL, gamma)

    def regulariser() -> torch.Tensor:
        total = torch.zeros(())
        for name in ("q_proj", "v_proj"):
            b = params[f"base_model.model.{name}.lora_B.default.weight"]
            a = params[f"base_model.model.{name}.lora_A.default.weight"]
            total = total + torch.linalg.norm(b[:, g:]) * torch.linalg.norm(a[g:])
        return lam * total

    task = ArrayTask(start)
    local_train(
        task, worker.examples("c0", train=True), instr.train, LocalRun(3, 1, "c0"), hooks=LocalHooks([regulariser])
    )
    trained = instr.params + update.delta
    pairs = lora_pairs(worker.view.spec)
    for name in ("q_proj", "v_proj"):
        b, a = factors(start, name)
        pair = next(p for p in pairs if p.module.endswith(name))
        got_b, got_a = pair.factors(trained)
        np.testing.assert_allclose(got_b, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_a, a, rtol=1e-5, atol=1e-6)
    # P_k by hand from the oracle's factors
    oracle = [factors(start, n) for n in ("q_proj", "v_proj")]
    expected = sum(np.linalg.norm(b[:, g:]) * np.linalg.norm(a[g:]) for b, a in oracle)
    assert update.metrics[PRUNE_NORM_METRIC] == pytest.approx(expected, rel=1e-5)
    assert update.metrics[NEXT_RANK_METRIC] == FULL  # no previous norm: nothing to compare with
    # a previous norm above this one: it prunes to floor(gamma r) and remembers it (as a participant does)
    worker.view.write(instr.params)
    again = worker.fit(fit_instruction(worker, "c0", **{PRUNE_GAMMA_OPTION: gamma, PRUNE_PREVIOUS_OPTION: 1e9}))
    assert again.metrics[NEXT_RANK_METRIC] == g and ext.ranks.pruned == {"c0": g}
    # ... and trains at that rank afterwards even if a server offers more
    worker.view.write(instr.params)
    later = worker.fit(fit_instruction(worker, "c0", **{RANK_OPTION: FULL}))
    assert later.metrics["lora_rank"] == g
    beyond = [p.factors(instr.params + later.delta)[1][g:] for p in pairs]
    assert all(np.all(a == 0) for a in beyond)  # zero beyond the rank it trains at
    # below the previous norm: no prune
    worker.view.write(instr.params)
    kept = worker.fit(fit_instruction(worker, "c1", **{PRUNE_GAMMA_OPTION: gamma, PRUNE_PREVIOUS_OPTION: 1e-12}))
    assert kept.metrics[NEXT_RANK_METRIC] == FULL


# --------------------------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize(
    ("mode", "rslora"), [("flexlora", False), ("flexlora", True), ("flora", False), ("hetlora", False)]
)
def test_finetune_after_federation_trains_the_clients_rank_at_its_own_scaling(mode, rslora):
    """A client of rank 4 in a rank-16 adapter fine-tunes only its first 4 components, scaled by alpha / 4
    (alpha / 2 under rsLoRA); the finetuned metric is that model's, and the saved vector is it in global
    units. Oracle: a real rank-4 peft adapter started from the truncated global one, trained the same way."""
    base, model, worker, ext = rank_worker(1, rslora=rslora)
    rank, steps = 4, 3
    config = make_config(
        model={"lora": {"r": FULL, "alpha": ALPHA, "use_rslora": rslora}},
        server={"lora_aggregation": mode, "lora_client_ranks": {"c0": rank, "c1": FULL}},
        personalization={"finetune_steps": steps},
        federation={"rounds": 1, "clients_per_round": 2},
        client=CLIENT,
    )
    address = f"memory:{uuid.uuid4().hex}"
    worker.personal = Personalizer(
        config.personalization, config.client, state=address, seed=config.seed, rounds=1, ranks=ext.ranks
    )
    start = copy.deepcopy(model)
    glob = worker.current_params()
    strategy = build_strategy(config)
    state = strategy.init_state(glob, worker.view.spec).evolve(round=1)
    extras = strategy.eval_payload(state, client_id="c0")
    assert extras[CLIENT_RANK_EXTRA].tolist() == [rank] and extras[CLIENT_RSLORA_EXTRA].tolist() == [int(rslora)]
    assert CLIENT_RANK_EXTRA not in strategy.eval_payload(state)  # the global model's evaluation: no rank
    instr = EvalInstruction("c0", 1, glob, worker.view.spec.digest, 8, None, extras)
    result = worker.evaluate(instr)

    oracle = peft_net(base, rank, rslora)
    ratio = scaling(FULL, rslora) / scaling(rank, rslora)
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            b, a = factors(start, name)
            layer(oracle, name).lora_B["default"].weight.copy_(torch.from_numpy(b[:, :rank] * ratio))
            layer(oracle, name).lora_A["default"].weight.copy_(torch.from_numpy(a[:rank]))
    task = ArrayTask(oracle)
    cfg = config.client.model_copy(update={"local_steps": steps, "lr_scheduler_type": "constant"})
    local_train(task, worker.examples("c0", train=True), cfg, LocalRun(derive_seed(config.seed, "finetune"), 1, "c0"))
    expected = evaluate_examples(task, worker.examples("c0", train=False), 8)
    got = result.personal[FINETUNED]
    assert got.count == expected.count and got.loss_sum == pytest.approx(expected.loss_sum, rel=1e-5)

    saved = open_state_store(address).load("c0", NS_FINETUNED, round=1 << 40)
    assert saved.meta["lora_rank"] == rank
    vec = saved.arrays["params"]
    for pair in lora_pairs(worker.view.spec):
        name = pair.module.rsplit(".", 1)[-1]
        b, a = pair.factors(vec)
        ob, oa = factors(oracle, name)
        np.testing.assert_allclose(b[:, :rank], ob / ratio, rtol=1e-4, atol=1e-6)  # global units: B s_k / s
        np.testing.assert_allclose(a[:rank], oa, rtol=1e-4, atol=1e-6)
        assert not b[:, rank:].any() and not a[rank:].any()
    # the worker's model is the global one again, at the global scaling
    np.testing.assert_array_equal(worker.current_params(), glob)
    assert all(layer(model, n).scaling["default"] == scaling(FULL, rslora) for n in ("q_proj", "v_proj"))
