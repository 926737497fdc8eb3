"""Heterogeneous LoRA ranks (flora / hetlora / flexlora): alpha/r_k scaling against an oracle that trains
each client as a real rank-r_k peft adapter, rank assignment, and no per-round re-initialisation."""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from pydantic import ValidationError

from fedtune.aggregation.lora import lora_pairs
from fedtune.client.train import LocalHooks, LocalRun, local_train
from fedtune.config import parse_config
from fedtune.config.schema import ClientConfig
from fedtune.server.build import build_strategy
from fedtune.server.loop import run_round
from fedtune.server.strategies import RankAssignment
from fedtune.server.strategies.lora import residual_key
from fedtune.transport.inprocess import InProcessTransport
from test_strategies_support import ArrayTask, TinyLoraNet, classification_records, make_config, make_worker, seeded

ALPHA, FULL = 8.0, 16
RANKS = {"c0": 4, "c1": 8, "c2": 16}
D_IN, D_HID = 12, 10


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(D_IN, D_HID, bias=False)
        self.v_proj = torch.nn.Linear(D_HID, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


def scaling(r: int, rslora: bool) -> float:
    return ALPHA / (r**0.5 if rslora else r)


def peft_net(base: Net, r: int, rslora: bool) -> torch.nn.Module:
    cfg = peft.LoraConfig(r=r, lora_alpha=ALPHA, use_rslora=rslora, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(f"base_model.model.{name}")


def factors(model: torch.nn.Module, name: str) -> tuple[np.ndarray, np.ndarray]:
    lyr = layer(model, name)
    b = lyr.lora_B["default"].weight.detach().double().numpy()
    a = lyr.lora_A["default"].weight.detach().double().numpy()
    return b, a


def oracle_client(base, global_model, cid, r, rslora, worker, config, *, mu=0.0):
    """Client ``cid`` as a real rank-r peft adapter: it starts from the global adapter's first r components
    (B scaled by s / s_r, so s_r B_r A_r = s B[:, :r] A[:r]) and trains with the same data, seed and loop
    (plus FedProx's mu/2 ||w - w_start||^2 over its own rank-r factors when ``mu``)."""
    model = peft_net(base, r, rslora)
    ratio = scaling(FULL, rslora) / scaling(r, rslora)
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            b, a = factors(global_model, name)
            layer(model, name).lora_B["default"].weight.copy_(torch.from_numpy(b[:, :r] * ratio))
            layer(model, name).lora_A["default"].weight.copy_(torch.from_numpy(a[:r]))
    task = ArrayTask(model)
    cfg = ClientConfig.model_validate(config.client.model_dump())
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    hooks = LocalHooks(
        loss_terms=[lambda: 0.5 * mu * sum(((p - w) ** 2).sum() for p, w in zip(params, start, strict=True))]
    )
    result = local_train(
        task, worker.examples(cid, train=True), cfg, LocalRun(config.seed, 1, cid), hooks=hooks if mu else LocalHooks()
    )
    return {name: factors(model, name) for name in ("q_proj", "v_proj")}, result.num_examples


@pytest.mark.parametrize(
    ("mode", "rslora", "mu"),
    [
        ("flora", False, 0.0),
        ("flexlora", False, 0.0),
        ("hetlora", False, 0.0),
        ("flexlora", True, 0.0),
        # FedProx: each client's proximal term pulls its rank-r_k factors toward the ones it started from
        ("flexlora", False, 2.0),
        ("hetlora", False, 2.0),
    ],
)
def test_ranks_4_8_16_merge_to_the_sum_of_alpha_over_r_k_products(mode, rslora, mu):
    torch.manual_seed(0)
    base = Net()
    model = peft_net(base, FULL, rslora)
    with torch.no_grad():  # a non-zero global adapter, so truncating it matters
        for name in ("q_proj", "v_proj"):
            layer(model, name).lora_B["default"].weight.normal_(0, 0.3)
    global_start = copy.deepcopy(model)
    records = classification_records(3, dim=D_IN)
    config = make_config(
        server={"lora_aggregation": mode, "lora_client_ranks": RANKS, "proximal_mu": mu},
        model={"lora": {"r": FULL, "alpha": ALPHA, "use_rslora": rslora}},
        federation={"rounds": 1, "clients_per_round": 3},
        client={"optimizer": "adamw", "lr": 0.05, "local_steps": 4},
    )
    worker = make_worker(ArrayTask(model), records)
    strategy = build_strategy(config)
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    state, report = run_round(config, strategy, InProcessTransport(worker), state)
    assert len(report.clients) == 3 and not report.failures

    trained = {
        cid: oracle_client(base, global_start, cid, r, rslora, worker, config, mu=mu) for cid, r in RANKS.items()
    }
    total = sum(n for _, n in trained.values())
    s = scaling(FULL, rslora)
    for pair in lora_pairs(state.spec):
        name = pair.module.removeprefix("base_model.model.")
        w0 = layer(model, name).base_layer.weight.detach().double().numpy()
        residual = state.arrays.get(residual_key(pair.module), np.zeros((pair.out_features, pair.in_features)))
        merged = w0 + s * (residual.astype(np.float64) + pair.product(state.params))
        if mode == "hetlora":  # zero-padding: average the padded factors (client B in global units), then multiply
            b_avg = sum(
                n / total * _pad(f[name][0] * scaling(RANKS[c], rslora) / s, FULL, 1) for c, (f, n) in trained.items()
            )
            a_avg = sum(n / total * _pad(f[name][1], FULL, 0) for c, (f, n) in trained.items())
            oracle = w0 + s * b_avg @ a_avg
        else:  # the exact modes: W0 + sum_k p_k (alpha / r_k) B_k A_k
            oracle = w0 + sum(
                n / total * scaling(RANKS[c], rslora) * f[name][0] @ f[name][1] for c, (f, n) in trained.items()
            )
        np.testing.assert_allclose(merged, oracle, rtol=1e-4, atol=2e-5)
        if mode == "hetlora":  # and it is not the exact average (components above rank 4 were zero-padded)
            exact = w0 + sum(
                n / total * scaling(RANKS[c], rslora) * f[name][0] @ f[name][1] for c, (f, n) in trained.items()
            )
            assert np.abs(merged - exact).max() > 1e-3
    # the worker's resident model is the global layout and scaling again after rank-4 and rank-8 fits
    assert layer(model, "q_proj").scaling["default"] == pytest.approx(s)


def _pad(x: np.ndarray, full: int, axis: int) -> np.ndarray:
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, full - x.shape[axis])
    return np.pad(x, pad)


# --------------------------------------------------------------------------------------------- no re-initialisation


MODES = {
    "naive": {},
    "ffa": {},
    "fedex": {},
    "svd": {},
    "flora": {"lora_client_ranks": {"c0": 1, "c1": 2, "c2": 1, "c3": 2}},
    "hetlora": {"lora_client_ranks": [1, 2]},
    "flexlora": {"lora_client_ranks": {"tiers": [{"r": 1, "fraction": 0.5}, {"r": 2, "fraction": 0.5}]}},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_client_starts_every_round_from_the_adapter_the_server_sent(mode):
    """Snapshot the trainable vector when the first local step starts; it must be what the round's instruction
    carried (the server's state), truncated to the client's rank: B[:, :r_k] s / s_k, A[:r_k], zeros beyond."""
    from fedtune.models.lora import freeze_lora_a

    records = classification_records(4)
    config = make_config(
        server={"lora_aggregation": mode, **MODES[mode]},
        federation={"rounds": 3, "clients_per_round": 4},
        model={"lora": {"r": 2, "alpha": 4.0}},
    )
    task = ArrayTask(seeded(TinyLoraNet))
    if mode == "ffa":
        freeze_lora_a(task.module)
    worker = make_worker(task, records)
    seen = {}

    def snapshot(task, instr, view):
        first = []

        def grab() -> None:
            if not first:
                first.append(True)
                seen[(instr.round, instr.client_id)] = (view.read(), instr.options.get("lora_rank"))

        return LocalHooks(grad_hooks=[grab])

    worker.hook_factories.append(snapshot)  # after the rank hook, which rewrites the received vector
    strategy = build_strategy(config)
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    transport = InProcessTransport(worker)
    ranked = 0
    for round_idx in (1, 2, 3):
        sent = state.params
        state, _ = run_round(config, strategy, transport, state)
        for cid in records:
            got, rank = seen[(round_idx, cid)]
            expected = sent if rank is None else _truncated(sent, state.spec, rank, full=2)
            np.testing.assert_array_equal(got, expected)
            ranked += rank is not None
    assert (ranked > 0) == (mode in ("flora", "hetlora", "flexlora"))


def _truncated(vec, spec, rank, *, full):
    out = vec.astype(np.float64).copy()
    for pair in lora_pairs(spec):
        b = out[pair.b[0] : pair.b[1]].reshape(pair.out_features, pair.rank)
        a = out[pair.a[0] : pair.a[1]].reshape(pair.rank, pair.in_features)
        b[:, :rank] *= rank / full  # s / s_k = (alpha / full) / (alpha / rank)
        b[:, rank:] = 0.0
        a[rank:] = 0.0
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------- assignment


def test_rank_assignment_list_mapping_and_tiers_are_seeded_and_validated():
    tiers = make_config(
        server={
            "lora_aggregation": "hetlora",
            "lora_client_ranks": {"tiers": [{"r": 4, "fraction": 0.25}, {"r": 16, "fraction": 0.75}]},
        },
        model={"lora": {"r": 16}},
    )
    plan = RankAssignment.from_config(tiers.server.lora_client_ranks, seed=5, rslora=False)
    drawn = [plan.rank(f"client_{i}", 16) for i in range(400)]
    assert set(drawn) == {4, 16} and 0.18 < drawn.count(4) / 400 < 0.32  # fraction 0.25, seeded draw
    assert drawn == [
        RankAssignment.from_config(tiers.server.lora_client_ranks, seed=5, rslora=False).rank(f"client_{i}", 16)
        for i in range(400)
    ]
    assert drawn != [
        RankAssignment.from_config(tiers.server.lora_client_ranks, seed=6, rslora=False).rank(f"client_{i}", 16)
        for i in range(400)
    ]
    assert plan.options("client_0", 16) in ({}, {"lora_rank": 4, "lora_rslora": False})

    mapping = RankAssignment(mapping={"a": 2, "b": 8})
    assert (mapping.rank("a", 8), mapping.rank("b", 8)) == (2, 8)
    with pytest.raises(ValueError, match="no rank for client 'c'"):
        mapping.rank("c", 8)

    with pytest.raises(ValidationError, match="sum to 1"):
        make_config(server={"lora_aggregation": "flora", "lora_client_ranks": {"tiers": [{"r": 4, "fraction": 0.5}]}})
    with pytest.raises(ValidationError, match="rank"):  # an unknown key inside a tier
        make_config(server={"lora_aggregation": "flora", "lora_client_ranks": {"tiers": [{"rank": 4, "fraction": 1}]}})
    with pytest.raises(ValidationError, match="only applies to lora_aggregation flora, hetlora or flexlora"):
        make_config(server={"lora_aggregation": "fedex", "lora_client_ranks": [2]})
    with pytest.raises(ValidationError, match=r"may not exceed model\.lora\.r = 8"):  # refused at load
        make_config(server={"lora_aggregation": "flexlora", "lora_client_ranks": {"x": 16}}, model={"lora": {"r": 8}})


# --------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("mode", ["flexlora", pytest.param("hetlora", marks=pytest.mark.slow)])
def test_heterogeneous_export_loads_in_plain_transformers_and_matches_the_servers_eval(mode, tmp_path):
    """tiny-llama, ranks {2, 4} of r = 4: the merged export, loaded with AutoModelForCausalLM alone, gives the
    logits of the model the server evaluates (its vector plus eval_payload, loaded the way a client does)."""
    from transformers import AutoModelForCausalLM

    from fedtune.run.export import export_run
    from test_strategies_e2e import llama_config, run

    raw = llama_config(tmp_path, lora_aggregation=mode, lora_client_ranks=[2, 4])
    raw["client"]["lr"] = 0.3  # visible local changes
    result = run(raw)
    worker, state = result.prepared.worker, result.state
    extras = build_strategy(parse_config(raw)).eval_payload(state)
    assert bool(extras) == (mode == "flexlora")  # flexlora's residual: the part of P beyond rank r
    ids = torch.tensor([[1, 400, 2000, 35, 9, 77, 12000, 2]])
    worker.view.write(state.params)
    with worker.residual.applied(worker.task.module, extras), torch.no_grad():
        served = worker.task.module.eval()(input_ids=ids).logits.detach()
    written = export_run(result.run_dir, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, served, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- deployment


def test_a_participant_trains_at_the_rank_of_its_own_config():
    """--config with model.lora.r = 2 against a flexlora server of r = 4: accepted (any other model difference
    is still refused), the model keeps the server's layout, and the fit is a rank-2 fit announced in the reply."""
    from fedtune.client.build import strategy_extensions
    from fedtune.client.worker import ClientWorker
    from fedtune.core.messages import FitInstruction
    from fedtune.deploy.participant import check_pinned, own_lora_rank, trusted_config
    from fedtune.transport.grpc.client import ParticipantError

    server = make_config(server={"lora_aggregation": "flexlora"}, model={"lora": {"r": 4, "alpha": 4.0}})
    mine = make_config(server={"lora_aggregation": "flexlora"}, model={"lora": {"r": 2, "alpha": 4.0}})
    assert own_lora_rank(mine, server) == 2
    assert trusted_config(server, mine).model.lora.r == 4  # the server's layout, trained at rank 2 inside it
    naive = make_config(model={"lora": {"r": 4, "alpha": 4.0}})
    with pytest.raises(ParticipantError, match=r"model\.lora\.r"):  # a naive server cannot mix ranks
        check_pinned(make_config(model={"lora": {"r": 2, "alpha": 4.0}}), naive)
    with pytest.raises(ParticipantError, match=r"model\.lora\.alpha"):
        check_pinned(
            make_config(server={"lora_aggregation": "flexlora"}, model={"lora": {"r": 2, "alpha": 8.0}}), server
        )

    task = ArrayTask(seeded(lambda: TinyLoraNet(r=4)))
    ext = strategy_extensions(own_rank=own_lora_rank(mine, server))
    worker = ClientWorker(
        task, classification_records(1), hook_factories=ext.hook_factories, update_transforms=ext.update_transforms
    )
    params = worker.current_params()
    instr = FitInstruction("c0", 1, params, worker.view.spec.digest, 0, server.client, {}, {})
    update = worker.fit(instr)
    assert update.metrics["lora_rank"] == 2.0
    sent = params + update.delta
    for pair in lora_pairs(worker.view.spec):
        b, a = pair.factors(sent)
        assert not b[:, 2:].any() and not a[2:].any() and b[:, :2].any()


# --------------------------------------------------------------------------------------------- DP-SGD


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dpsgd_at_a_lower_rank_is_the_private_step_of_the_rank_r_k_adapter():
    """A rank-2 client of a rank-4 adapter under local DP-SGD: each example's gradient clipped over the whole
    vector (the components beyond r_k have zero gradient, so the clip is the rank-r_k adapter's), summed,
    noised with the run's noise stream, the noise beyond r_k masked off, one SGD step, sent in global units.
    Oracle: test_privacy_dpsgd's per-example loop, run on the client's starting point at scaling alpha / r_k."""
    import uuid

    from fedtune.aggregation.lora_ranks import from_client_rank, to_client_rank
    from fedtune.client.build import strategy_extensions
    from fedtune.client.weights import TrainableView
    from fedtune.client.worker import ClientWorker
    from fedtune.config.privacy import DpSgdConfig
    from fedtune.core.messages import FitInstruction
    from fedtune.privacy.dpsgd import DpSgd
    from test_privacy_dpsgd import oracle

    cfg = DpSgdConfig(noise_multiplier=0.8, max_grad_norm=0.05)
    task = ArrayTask(seeded(lambda: TinyLoraNet(r=4)))
    records = classification_records(1)
    n = len(records["c0"][0])
    ext = strategy_extensions()
    dpsgd = DpSgd(cfg, state=f"memory:{uuid.uuid4().hex}")
    worker = ClientWorker(  # DP-SGD's hook first, as build_client_extensions orders them
        task, records, hook_factories=[dpsgd.hooks, *ext.hook_factories], update_transforms=ext.update_transforms
    )
    start = worker.current_params()
    spec, pairs = worker.view.spec, lora_pairs(worker.view.spec)
    oracle_task = ArrayTask(copy.deepcopy(task.module))
    train = ClientConfig(local_steps=1, batch_size=n, lr=0.5, optimizer="sgd", max_grad_norm=None)
    instr = FitInstruction("c0", 2, start, spec.digest, 5, train, options={"lora_rank": 2, "lora_rslora": False})
    update = worker.fit(instr)
    assert update.metrics["lora_rank"] == 2.0 and update.metrics["dpsgd_epsilon"] > 0

    view = TrainableView(oracle_task.module)
    view.write(to_client_rank(start, pairs, 2))
    for name in ("q_proj", "v_proj"):  # s_k = alpha / r_k = 4 / 2
        oracle_task.module.get_submodule(name).scaling["default"] = 2.0
    examples = worker.examples("c0", train=True)
    grads = oracle(
        oracle_task,
        examples,
        lambda ex: torch.nn.functional.cross_entropy(oracle_task.module(ex["x"][None]), ex["y"][None]),
        cfg,
        instr,
    )
    with torch.no_grad():
        trainable = [(name, p) for name, p in oracle_task.module.named_parameters() if p.requires_grad]
        for (name, p), g in zip(trainable, grads, strict=True):
            g = g / n
            if name.endswith("lora_A.default.weight"):
                g[2:] = 0.0  # the noise beyond r_k is masked off
            else:
                g[:, 2:] = 0.0
            p.sub_(0.5 * g.to(p.dtype))
    expected = from_client_rank(view.read(), pairs, 2) - start
    np.testing.assert_allclose(update.delta, expected, rtol=1e-4, atol=1e-6)
    assert any(np.abs(update.delta[p.b[0] : p.b[1]]).max() > 1e-3 for p in pairs)  # the step moved B


# --------------------------------------------------------------------------------------------- personalisation


@pytest.mark.parametrize("mode", ["flora", "hetlora", "flexlora"])
def test_personalisation_methods_with_client_ranks_are_refused_at_load_naming_the_keys(mode):
    """FedSA keeps B local (nothing pairs the clients' A and B on the server), FedPer and Ditto run with naive
    or ffa only; fine-tuning after federation runs at each client's rank (tests/test_hetlora.py)."""
    ranks = {"lora_aggregation": mode, "lora_client_ranks": [2, 4]}
    lora = {"lora": {"r": 4}}
    methods = [{"method": "fedsa"}, {"method": "fedper", "local_params": ["*v_proj*"]}, {"method": "ditto"}]
    for method in methods:
        with pytest.raises(ValidationError, match=rf"runs with server\.lora_aggregation .* not '{mode}'"):
            make_config(server=ranks, model=lora, personalization=method)
    make_config(server=ranks, model=lora, personalization={"finetune_steps": 2})  # the rank hook composes
    make_config(server={"lora_aggregation": "naive"}, model=lora, personalization={"finetune_steps": 2})  # fine
