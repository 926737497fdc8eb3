"""LoRA-aware aggregation: naive averaging of A and B is not the average of B A; the exact modes are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.aggregation.lora import (
    factored_is_smaller,
    fedex_increment_factors,
    fedex_residual,
    lora_b_only,
    lora_pairs,
    naive_product,
    product_mean,
    stack_adapters,
    svd_reproject,
    svd_tail_factors,
)
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.core.params import ParamSpec
from fedtune.models.lora import freeze_lora_a
from fedtune.server.build import build_strategy
from fedtune.server.loop import run_round
from fedtune.server.strategies import FedExLora, FedOpt, FfaLora, FLoRA, RankAssignment, SvdLora
from fedtune.server.strategies.lora import residual_key
from fedtune.transport.inprocess import InProcessTransport
from test_strategies_support import ArrayTask, TinyLoraNet, classification_records, make_config, make_worker, seeded

R, D_IN, D_OUT = 2, 5, 4
SPEC = ParamSpec(
    names=("layer.q_proj.lora_A.weight", "layer.q_proj.lora_B.weight", "head.bias"),
    shapes=((R, D_IN), (D_OUT, R), (3,)),
    dtypes=("float32",) * 3,
)


def random_factors(k, ranks, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(D_OUT, r)), rng.normal(size=(r, D_IN))) for r in ranks[:k]]


def test_naive_average_of_factors_is_not_the_average_of_products():
    factors = random_factors(3, [R] * 3)
    weights = [1.0, 2.0, 5.0]
    exact = sum(w * b @ a for w, (b, a) in zip(np.array(weights) / 8.0, factors, strict=True))  # numpy oracle
    np.testing.assert_allclose(product_mean(factors, weights), exact, rtol=1e-12)
    gap = np.linalg.norm(naive_product(factors, weights) - exact) / np.linalg.norm(exact)
    assert gap > 0.1  # not a rounding difference: the covariance of the factors


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5), st.integers(0, 10_000))
def test_flora_stacking_is_exact_for_heterogeneous_ranks(ranks, seed):
    factors = random_factors(len(ranks), ranks, seed)
    weights = list(np.random.default_rng(seed).uniform(0.1, 5.0, size=len(ranks)))
    b_stack, a_stack = stack_adapters(factors, weights)
    assert a_stack.shape == (sum(ranks), D_IN) and b_stack.shape == (D_OUT, sum(ranks))
    oracle = sum(w * b @ a for w, (b, a) in zip(np.array(weights) / sum(weights), factors, strict=True))
    np.testing.assert_allclose(b_stack @ a_stack, oracle, rtol=1e-10, atol=1e-12)


def test_svd_reprojection_is_exact_up_to_the_rank_and_optimal_beyond():
    rng = np.random.default_rng(3)
    low = rng.normal(size=(D_OUT, 2)) @ rng.normal(size=(2, D_IN))  # rank 2
    b, a, err = svd_reproject(low, 2)
    np.testing.assert_allclose(b @ a, low, atol=1e-10)
    assert err < 1e-12 and b.shape == (D_OUT, 2) and a.shape == (2, D_IN)
    full = rng.normal(size=(D_OUT, D_IN))
    b, a, err = svd_reproject(full, 2)
    s = np.linalg.svd(full, compute_uv=False)  # Eckart-Young: the error is the tail of the spectrum
    assert err == pytest.approx(np.sqrt((s[2:] ** 2).sum() / (s**2).sum()), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 10_000))
def test_fedex_increment_factors_multiply_to_the_residual_at_rank_k_minus_1_times_r(k, r, seed):
    rng = np.random.default_rng(seed)
    factors = [(rng.normal(size=(9, r)), rng.normal(size=(r, 7))) for _ in range(k)]
    weights = list(rng.uniform(0.1, 5.0, size=k))
    b_d, a_d = fedex_increment_factors(factors, weights)
    assert b_d.shape == (9, (k - 1) * r) and a_d.shape == ((k - 1) * r, 7)
    oracle = sum(w * b @ a for w, (b, a) in zip(np.array(weights) / sum(weights), factors, strict=True))
    oracle = oracle - naive_product(factors, weights)  # the dense residual the server adds today
    np.testing.assert_allclose(b_d @ a_d, oracle, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b_d @ a_d, fedex_residual(factors, weights), rtol=1e-10, atol=1e-12)


def test_svd_tail_factors_are_what_the_reprojection_leaves_out():
    rng = np.random.default_rng(4)
    factors = [(rng.normal(size=(12, 2)), rng.normal(size=(2, 10))) for _ in range(3)]
    product = product_mean(factors, [1.0, 2.0, 3.0])  # rank 6 = K r
    b, a, _ = svd_reproject(product, 2, a_row_norm=0.7)
    b_d, a_d = svd_tail_factors(product, 2, bound=6)
    assert b_d.shape == (12, 4) and a_d.shape == (4, 10)  # (K - 1) r components
    np.testing.assert_allclose(b_d @ a_d, product - b @ a, atol=1e-10)
    assert factored_is_smaller(4, 12, 10) and not factored_is_smaller(6, 12, 10)


@pytest.mark.parametrize("plugin", [FedExLora(), SvdLora()], ids=["fedex", "svd"])
def test_a_participant_accumulating_factored_increments_holds_the_servers_residual(plugin):
    """Over three rounds, R_t = R_(t-1) + B_d A_d kept by a participant (float32, rounded as the server
    rounds) equals the dense residual in the server's state to float32 rounding."""
    strategy = FedOpt(plugins=[plugin])
    state = strategy.init_state(np.random.default_rng(0).normal(size=SPEC.numel).astype(np.float32), SPEC)
    (pair,) = lora_pairs(SPEC)
    held = np.zeros((D_OUT, D_IN), np.float32)
    for round_idx in (1, 2, 3):
        ups = client_updates(state.params, seed=round_idx)
        factors = [pair.factors(state.params + u.delta) for u in ups]
        weights = [float(u.num_examples) for u in ups]
        if plugin.name == "fedex":
            b_d, a_d = fedex_increment_factors(factors, weights)
        else:
            b_d, a_d = svd_tail_factors(product_mean(factors, weights), R, bound=len(ups) * R)
        state, _ = strategy.aggregate(state, ups)
        held = (held.astype(np.float64) + b_d.astype(np.float32) @ a_d.astype(np.float32)).astype(np.float32)
        np.testing.assert_allclose(held, state.arrays[residual_key(pair.module)], rtol=1e-5, atol=1e-5)


def test_lora_pairs_find_factors_and_reject_orphans():
    (pair,) = lora_pairs(SPEC)
    assert (pair.module, pair.rank, pair.in_features, pair.out_features) == ("layer.q_proj", R, D_IN, D_OUT)
    orphan = ParamSpec(names=("x.lora_B.weight",), shapes=((D_OUT, R),), dtypes=("float32",))
    with pytest.raises(ValueError, match="no matching lora_A"):
        lora_pairs(orphan)


# --------------------------------------------------------------------------------------------- plug-ins


def client_updates(global_vec, seed=1, k=3, spec=SPEC):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        delta = rng.normal(0, 0.5, size=spec.numel).astype(np.float32)
        out.append(ClientUpdate(f"c{i}", 1, 2 + 3 * i, delta, spec.digest))
    return out


def effective(state, module="layer.q_proj"):
    """R + B A of the global model (the residual is zero when the mode keeps none)."""
    (pair,) = lora_pairs(state.spec)
    residual = state.arrays.get(residual_key(module), np.zeros((D_OUT, D_IN), np.float32))
    return residual.astype(np.float64) + pair.product(state.params)


def client_product_mean(state, updates, ranks=None):
    (pair,) = lora_pairs(state.spec)
    factors = []
    for i, u in enumerate(updates):
        b, a = pair.factors(state.params + u.delta)
        r = ranks[i] if ranks else R
        factors.append((b[:, :r], a[:r]))
    return state.arrays.get(residual_key(pair.module), 0) + product_mean(factors, [u.num_examples for u in updates])


@pytest.mark.parametrize("plugin", [FedExLora(), SvdLora(), FLoRA(seed=1)], ids=["fedex", "svd", "flora"])
def test_exact_modes_equal_the_weighted_mean_of_products(plugin):
    strategy = FedOpt(plugins=[plugin])
    rng = np.random.default_rng(0)
    state = strategy.init_state(rng.normal(size=SPEC.numel).astype(np.float32), SPEC)
    for round_idx in (1, 2):  # the second round starts from a non-zero residual
        ups = [
            ClientUpdate(u.client_id, round_idx, u.num_examples, u.delta, u.spec_digest)
            for u in client_updates(state.params, seed=round_idx)
        ]
        target = client_product_mean(state, ups)
        naive = FedOpt().aggregate(state, ups)[0]
        before = state.params
        state, _ = strategy.aggregate(state, ups)
        np.testing.assert_allclose(effective(state), target, rtol=1e-5, atol=1e-6)
        assert np.linalg.norm(effective(naive) - target) > 1e-2  # naive FedAvg misses it
        # non-LoRA parameters are plain FedAvg (np.average oracle)
        oracle_bias = np.average([u.delta[-3:] for u in ups], axis=0, weights=[u.num_examples for u in ups])
        np.testing.assert_allclose(state.params[-3:] - before[-3:], oracle_bias, rtol=1e-5, atol=1e-6)
    assert state.round == 2


def test_flora_heterogeneous_ranks_use_each_clients_own_components():
    plugin = FLoRA(seed=0, ranks=RankAssignment(seed=0, choices=(1, 2)))
    ranks = [plugin.client_rank(f"c{i}", R) for i in range(3)]
    assert set(ranks) == {1, 2}  # the seeded draw gives both ranks here
    strategy = FedOpt(plugins=[plugin])
    state = strategy.init_state(np.random.default_rng(0).normal(size=SPEC.numel).astype(np.float32), SPEC)
    payloads = [strategy.fit_payload(state, f"c{i}")[1] for i in range(3)]
    assert [p.get("lora_rank", R) for p in payloads] == ranks
    (pair,) = lora_pairs(SPEC)
    ups = []
    for u, rank in zip(client_updates(state.params), ranks, strict=True):  # replies are zero beyond r_k
        b, a = pair.factors(state.params + u.delta)
        b[:, rank:], a[rank:] = 0.0, 0.0
        local = pair.write(state.params + u.delta, b, a)
        ups.append(ClientUpdate(u.client_id, u.round, u.num_examples, local - state.params, u.spec_digest))
    target = client_product_mean(state, ups, ranks=ranks)
    new, metrics = strategy.aggregate(state, ups)
    np.testing.assert_allclose(effective(new), target, rtol=1e-5, atol=1e-6)
    assert metrics["flora_stacked_rank"] == sum(ranks)
    assert not pair.factors(new.params)[0].any()  # B re-initialised to zero, A fresh


# FFA-LoRA: A is frozen at build time, so the exchanged vector holds B (and the head) only
SPEC_B = ParamSpec(
    names=("layer.q_proj.lora_B.weight", "head.bias"), shapes=((D_OUT, R), (3,)), dtypes=("float32",) * 2
)


def test_ffa_is_exact_because_a_is_shared():
    shared_a = np.random.default_rng(7).normal(size=(R, D_IN))  # every client's (seeded, frozen) A
    strategy = FedOpt(plugins=[FfaLora()])
    state = strategy.init_state(np.random.default_rng(0).normal(size=SPEC_B.numel).astype(np.float32), SPEC_B)
    assert strategy.fit_payload(state, "c0") == ({}, {})  # nothing to tell clients: A is not trainable
    ups = client_updates(state.params, spec=SPEC_B)
    weights = np.array([u.num_examples for u in ups], dtype=np.float64)
    b_of = lambda vec: vec[: D_OUT * R].astype(np.float64).reshape(D_OUT, R)  # noqa: E731
    # the oracle: the example-weighted mean of the clients' products B_k A
    target = sum(w * b_of(state.params + u.delta) @ shared_a for w, u in zip(weights / weights.sum(), ups, strict=True))
    new, _ = strategy.aggregate(state, ups)
    np.testing.assert_allclose(b_of(new.params) @ shared_a, target, rtol=1e-5, atol=1e-6)
    oracle_head = np.average([u.delta[-3:] for u in ups], axis=0, weights=weights)
    np.testing.assert_allclose(new.params[-3:] - state.params[-3:], oracle_head, rtol=1e-5, atol=1e-6)


def test_ffa_refuses_a_spec_that_exchanges_a():
    assert lora_b_only(SPEC_B) == ["layer.q_proj.lora_B.weight"]
    with pytest.raises(ValueError, match=r"lora_A\.weight' is trainable"):
        FedOpt(plugins=[FfaLora()]).init_state(np.zeros(SPEC.numel, np.float32), SPEC)
    head_only = ParamSpec(names=("head.bias",), shapes=((3,),), dtypes=("float32",))
    with pytest.raises(ValueError, match="no lora_B"):
        lora_b_only(head_only)


# --------------------------------------------------------------------------------------------- end to end


def layer_weights(module):
    return {
        name: layer.effective_weight().detach().clone()
        for name, layer in (("q_proj", module.q_proj), ("v_proj", module.v_proj))
    }


@pytest.mark.parametrize("mode", ["fedex", "svd", "flora", "ffa"])
def test_one_round_through_the_worker_equals_fedavg_of_effective_weights(mode):
    """Oracle: run every sampled client alone, read its effective weights W0 + R + s B A, average them."""
    records = classification_records(4)
    server = {"lora_aggregation": mode}
    if mode == "flora":
        server["lora_client_ranks"] = [1, 2]
    config = make_config(server=server, federation={"rounds": 2, "clients_per_round": 4}, model={"lora": {"r": 2}})
    task = ArrayTask(seeded(TinyLoraNet))
    if mode == "ffa":  # what build_run_task does for a peft model
        assert freeze_lora_a(task.module) == ["q_proj.lora_A.weight", "v_proj.lora_A.weight"]
    worker = make_worker(task, records)
    strategy = build_strategy(config)
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    transport = InProcessTransport(worker)
    for _ in range(2):  # round 2 starts from a non-zero residual (and, for flora, re-initialised adapters)
        ids = list(records)
        client_weights, sizes = [], []
        for cid in ids:  # the oracle: each client's local model, trained alone
            arrays, options = strategy.fit_payload(state, cid)
            instr = FitInstruction(
                cid,
                state.round + 1,
                state.params,
                state.spec.digest,
                config.seed,
                config.client,
                arrays,
                options,
            )
            update = worker.fit(instr)
            client_weights.append(layer_weights(task.module))
            sizes.append(update.num_examples)
        oracle = {
            k: sum(w[k] * n for w, n in zip(client_weights, sizes, strict=True)) / sum(sizes) for k in client_weights[0]
        }
        state, _ = run_round(config, strategy, transport, state)
        # the global model's effective weights: load the new residual the way a client does
        worker.view.write(state.params)
        worker.residual.load(task.module, strategy.eval_payload(state))
        got = layer_weights(task.module)
        for k in oracle:
            torch.testing.assert_close(got[k], oracle[k], rtol=1e-5, atol=1e-5)


def test_svd_reprojection_can_keep_the_scale_of_a_and_no_component_is_dead():
    """a_row_norm: the same product (Eckart-Young), every A row of norm c, and a zero singular value leaves
    A's row non-zero (balanced factors would zero both A's row and B's column: a component no gradient moves)."""
    rng = np.random.default_rng(4)
    low = rng.normal(size=(D_OUT, 1)) @ rng.normal(size=(1, D_IN))  # rank 1 of a rank-2 adapter
    b_bal, a_bal, _ = svd_reproject(low, 2)
    b, a, err = svd_reproject(low, 2, a_row_norm=0.5)
    np.testing.assert_allclose(b @ a, low, atol=1e-10)
    np.testing.assert_allclose(b_bal @ a_bal, low, atol=1e-10)
    assert err < 1e-12
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), [0.5, 0.5], rtol=1e-12)
    assert np.linalg.norm(a_bal[1]) < 1e-7 and np.linalg.norm(b_bal[:, 1]) < 1e-7  # dead when balanced
    with pytest.raises(ValueError, match="positive"):
        svd_reproject(low, 2, a_row_norm=0.0)


def test_only_a_replys_first_r_k_components_count():
    """A reply's components beyond its rank (a client that did not mask, or a reply the update-norm bound
    scaled) are dropped; an announced rank above the assigned one counts as the assigned one."""
    plugin = FLoRA(seed=0, ranks=RankAssignment(mapping={"c0": 1, "c1": 1, "c2": 1}))
    strategy = FedOpt(plugins=[plugin])
    state = strategy.init_state(np.random.default_rng(0).normal(size=SPEC.numel).astype(np.float32), SPEC)
    ups = client_updates(state.params)  # random: non-zero in the second component
    loud = ClientUpdate("c0", 1, ups[0].num_examples, ups[0].delta, SPEC.digest, metrics={"lora_rank": 2.0})
    ups = [loud, *ups[1:]]
    target = client_product_mean(state, ups, ranks=[1, 1, 1])
    new, _ = strategy.aggregate(state, ups)
    np.testing.assert_allclose(effective(new), target, rtol=1e-5, atol=1e-6)
