"""One end-to-end ``simulate`` run per strategy family, through the config, session, worker and loop.

Small and fast: the digits CNN (full-parameter exchange) for the server optimisers, FedProx with
stragglers, SCAFFOLD and a robust rule; the tiny random Llama with LoRA for the LoRA modes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from _models import DIGITS_CNN
from fedtune.aggregation.lora import lora_b_only, lora_pairs
from fedtune.config import parse_config
from fedtune.run.session import simulate


def digits_config(tmp_path: Path, **sections: dict) -> dict:
    cfg: dict = {
        "seed": 1,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 8}},
        "federation": {"rounds": 3, "clients_per_round": 4},
        "client": {"local_steps": 8, "batch_size": 16, "lr": 0.5, "optimizer": "sgd", "max_grad_norm": None},
        "eval": {"batch_size": 128, "max_clients": 4},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def run(cfg: dict):
    return simulate(parse_config(cfg), console=Console(quiet=True), show_progress=False)


DIGITS_CASES = {
    "fedadam": {"server": {"optimizer": "adam", "lr": 0.03}},
    "fedavgm": {"server": {"optimizer": "momentum", "lr": 0.5}},
    "fedprox+stragglers": {"server": {"proximal_mu": 0.01}, "client": {"straggler_fraction": 0.5}},
    "scaffold": {"server": {"scaffold": True}},
    "median": {"server": {"aggregator": "median"}},
}


# one default case per family (FedOpt, FedProx, SCAFFOLD, robust); the rest run with -m slow
FAST_DIGITS = ("fedadam", "fedprox+stragglers", "scaffold", "median")


@pytest.mark.parametrize(
    "case", [c if c in FAST_DIGITS else pytest.param(c, marks=pytest.mark.slow) for c in DIGITS_CASES]
)
def test_digits_runs_learn_and_keep_their_state(case, tmp_path):
    result = run(digits_config(tmp_path, **DIGITS_CASES[case]))
    rounds = result.rounds
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.02, rounds
    assert rounds[-1]["eval_accuracy"] > rounds[0]["eval_accuracy"], rounds
    arrays = result.state.arrays
    if case == "fedadam":
        assert {"opt/m", "opt/v"} <= set(arrays)
    if case == "scaffold":
        assert "scaffold/sum" in arrays and any(k.startswith("scaffold/c/") for k in arrays)
    if case == "fedprox+stragglers":
        import json

        clients = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        stragglers = [c for c in clients if c["kind"] == "client" and c.get("straggler")]
        assert stragglers and all(c["steps"] < 8 for c in stragglers)


def llama_config(tmp_path: Path, **server: object) -> dict:
    corpus = tmp_path / "corpus"
    corpus.mkdir(parents=True)
    lines = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men merely players."]
    for c in range(3):
        (corpus / f"speaker_{c}.txt").write_text(
            "\n\n".join(" ".join(lines[(c + i) % 2] for _ in range(3)) for i in range(8))
        )
    return {
        "seed": 2,
        "model": {
            "name": "tiny-llama",
            "max_length": 32,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
        "data": {"source": "text", "path": str(corpus)},
        "federation": {"rounds": 2, "clients_per_round": 3},
        "client": {"local_steps": 3, "batch_size": 4, "lr": 0.05},
        "eval": {"batch_size": 8},
        "server": dict(server),
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
    }


@pytest.mark.parametrize("mode", ["fedex", *(pytest.param(m, marks=pytest.mark.slow) for m in ("ffa", "flora", "svd"))])
def test_lora_modes_run_on_a_peft_model(mode, tmp_path):
    server = {"lora_aggregation": mode}
    if mode == "flora":
        server["lora_client_ranks"] = [2, 4]
    result = run(llama_config(tmp_path, **server))
    state = result.state
    assert all(np.isfinite(r["eval_loss"]) for r in result.rounds)
    residuals = {k: v for k, v in state.arrays.items() if k.startswith("lora/residual/")}
    if mode == "ffa":  # A is frozen at build time: not exchanged, so it cannot move
        assert lora_b_only(state.spec) == list(state.spec.names)
        assert not residuals
    else:
        pairs = lora_pairs(state.spec)
        assert len(residuals) == len(pairs)
        assert any(np.abs(v).max() > 0 for v in residuals.values())


def test_ffa_uploads_only_b(tmp_path):
    """FFA-LoRA's measured upload is the B matrices alone: half of plain LoRA's bytes on tiny-llama, whose
    adapted layers (q_proj, v_proj: 32 -> 32) have A and B of the same size."""
    measured = {}
    for mode in ("naive", "ffa"):
        raw = llama_config(tmp_path / mode, lora_aggregation=mode)
        raw["federation"]["rounds"] = 1
        result = run(raw)
        measured[mode] = (result.rounds[-1]["bytes_up"], result.rounds[-1]["clients_ok"], result.state.spec)
    (naive_up, naive_ok, naive_spec), (ffa_up, ffa_ok, ffa_spec) = measured["naive"], measured["ffa"]
    b_numel = sum(
        int(np.prod(shape))
        for name, shape in zip(naive_spec.names, naive_spec.shapes, strict=True)
        if name.endswith(".lora_B.weight")
    )
    assert ffa_spec.numel == b_numel and naive_spec.numel == 2 * b_numel
    assert naive_ok == ffa_ok == 3
    assert ffa_up == 3 * 4 * b_numel  # float32 deltas of B, nothing else
    assert ffa_up * 2 == naive_up


def test_residual_hook_on_a_real_peft_layer():
    """LoraResidual on peft's own LoRA Linear: forward == x (W0 + s (R + B A))^T, and a new R replaces the old."""
    import peft

    from fedtune.client.hooks import LoraResidual

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(6, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]))
    layer = model.get_submodule("base_model.model.q_proj")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    w0 = layer.base_layer.weight.detach().clone()
    hook = LoraResidual()
    rng = np.random.default_rng(0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, 6)
    for _ in range(2):
        residual = rng.normal(size=(4, 6)).astype(np.float32)
        hook.load(model, {"lora/residual/base_model.model.q_proj": residual})
        expected = w0 + 3.0 * (torch.from_numpy(residual) + b @ a)  # s = alpha / r = 3
        torch.testing.assert_close(model(x), x @ expected.T, rtol=1e-5, atol=1e-5)
    with hook.applied(model, {}):  # no residual in the request: W0 again
        torch.testing.assert_close(model(x), x @ (w0 + 3.0 * b @ a).T, rtol=1e-5, atol=1e-5)
    hook.reset(model)
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- residual oracle


def _client_products(config, prepared, run_dir):
    """Replay round 1 (a fit is a pure function of its instruction): each sampled client's local (B_k, A_k)
    per LoRA module, its example count, and the strategy's aggregate of those replies."""
    from fedtune.core.messages import FitInstruction
    from fedtune.run.session import initial_params
    from fedtune.server.build import build_strategy
    from fedtune.server.loop import sample_round

    worker = prepared.worker
    strategy = build_strategy(config)
    state = strategy.init_state(initial_params(run_dir), worker.view.spec)
    factors, sizes, updates = [], [], []
    for cid in sample_round(config, list(worker.records), 1):
        arrays, options = strategy.fit_payload(state, cid)
        train = config.client
        update = worker.fit(
            FitInstruction(cid, 1, state.params, state.spec.digest, config.seed, train, arrays, options)
        )
        local = state.params + update.delta
        factors.append({p.module: p.factors(local) for p in lora_pairs(state.spec)})
        sizes.append(update.num_examples)
        updates.append(update)
    return factors, sizes, strategy.aggregate(state, updates)[0]


def _oracle_model(factors, sizes, scaling, cache_dir):
    """A plain transformers model whose adapted weights are W0 + s sum_k p_k B_k A_k (p_k = n_k / n)."""
    from fedtune.models.hub import load_causal_lm

    model, tokenizer = load_causal_lm("tiny-llama", cache_dir)
    p = np.asarray(sizes, np.float64) / sum(sizes)
    with torch.no_grad():
        for module in factors[0]:
            product = sum(pk * f[module][0] @ f[module][1] for pk, f in zip(p, factors, strict=True))
            weight = model.get_parameter(module.removeprefix("base_model.model.") + ".weight")
            weight.add_(torch.from_numpy(scaling * product).to(weight.dtype))
    return model, tokenizer


def _pooled_loss(task, worker, clients, batch_size):
    from fedtune.client.worker import evaluate_examples
    from fedtune.tasks.base import EvalSums

    pooled = sum((evaluate_examples(task, worker.examples(c, train=False), batch_size) for c in clients), EvalSums())
    return pooled.loss_sum / pooled.count


@pytest.mark.parametrize("mode", ["fedex", "svd", "flora"])
def test_evaluation_and_export_see_the_residual(mode, tmp_path):
    """After a round, the server's evaluation and the exported model are W0 + s sum_k p_k B_k A_k, computed
    here from the clients' own adapters; the adapters alone (no residual) are a different model."""
    from transformers import AutoModelForCausalLM

    from fedtune.core.messages import EvalInstruction
    from fedtune.data.cache import default_cache_dir
    from fedtune.models.hub import load_causal_lm
    from fedtune.run.export import export_run, load_adapter_export
    from fedtune.server.loop import eval_clients
    from fedtune.tasks.causal_lm import CausalLMTask

    server = {"lora_aggregation": mode, **({"lora_client_ranks": [2, 4]} if mode == "flora" else {})}
    raw = llama_config(tmp_path, **server)
    raw["federation"]["rounds"] = 1
    raw["client"]["lr"] = 0.3  # large enough local changes that the residual moves the loss visibly
    config = parse_config(raw)
    result = run(raw)
    prepared, state = result.prepared, result.state
    factors, sizes, replayed = _client_products(config, prepared, result.run_dir)
    np.testing.assert_array_equal(replayed.params, state.params)  # the replay is the run's round

    cache = default_cache_dir(None)
    oracle, tokenizer = _oracle_model(factors, sizes, 8 / 4, cache)  # s = alpha / r
    oracle_task = CausalLMTask(oracle, tokenizer, config.model.max_length)
    clients = eval_clients(config, list(prepared.worker.records))
    expected = _pooled_loss(oracle_task, prepared.worker, clients, config.eval.batch_size)
    got = result.rounds[-1]["eval_loss"]  # what the server's evaluation reported
    assert got == pytest.approx(expected, rel=0, abs=2e-6)

    # the adapters alone (what evaluation saw before residuals travelled with it) miss the residual
    digest = state.spec.digest
    bare = [prepared.worker.evaluate(EvalInstruction(c, 1, state.params, digest, 8, None)) for c in clients]
    adapters_only = sum(e.sums.loss_sum for e in bare) / sum(e.sums.count for e in bare)
    assert abs(adapters_only - expected) > 1e-4, (adapters_only, expected)  # 50x the tolerance above

    ids = torch.tensor([[1, 400, 2000, 35, 9, 77, 12000, 2]])
    oracle_logits = oracle.eval()(input_ids=ids).logits.detach()
    written = export_run(result.run_dir, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    torch.testing.assert_close(plain(input_ids=ids).logits.detach(), oracle_logits, rtol=1e-4, atol=1e-4)
    assert (written["adapter"] / "base_weights.safetensors").is_file()
    restored = load_adapter_export(load_causal_lm("tiny-llama", cache)[0], written["adapter"]).eval()
    torch.testing.assert_close(restored(input_ids=ids).logits.detach(), oracle_logits, rtol=1e-4, atol=1e-4)


def test_bytes_down_count_the_residual(tmp_path):
    """FedEx-LoRA's fit carries the residual: dense (one out x in float32 matrix per adapted layer) to a
    client that holds none, then only the last round's increment as its factors, rank (K-1) r, to a client
    that holds the previous version (fedtune.server.strategies.lora_wire). The reported download counts what
    was sent: the adapter vector, the residual in whichever form, and the version numbers (8 bytes each)."""
    from fedtune.aggregation.lora import lora_pairs
    from fedtune.server.strategies.lora import RESIDUAL_PREFIX

    raw = llama_config(tmp_path, lora_aggregation="fedex")
    raw["federation"]["rounds"] = 2
    result = run(raw)
    spec = result.state.spec
    residual = sum(v.nbytes for k, v in result.state.arrays.items() if k.startswith(RESIDUAL_PREFIX))
    assert residual > 4 * spec.numel  # dense out x in per layer, against rank-r adapters
    trained = [row for row in result.rounds if row["round"] > 0]  # round 0 is the baseline evaluation
    assert len(trained) == 2
    first, second = trained
    assert first["clients_ok"] == second["clients_ok"] == 3  # every client, both rounds
    assert first["bytes_down"] == 3 * (4 * spec.numel + residual + 8)  # first contact: dense, and its version
    increment = sum(4 * 2 * p.rank * (p.out_features + p.in_features) for p in lora_pairs(spec))  # (K-1) r = 2 r
    assert increment < residual  # 32 x 32 layers, r 4, K 3: half the dense bytes
    assert second["bytes_down"] == 3 * (4 * spec.numel + increment + 16)  # the factors, version and base
    # evaluations carry the residual too, counted apart: the baseline's is dense (nobody holds a copy), the
    # later ones are the increment since the version each client's fit kept
    baseline = result.rounds[0]
    assert baseline["round"] == 0 and baseline["eval_bytes_down"] == 3 * (4 * spec.numel + residual + 8)
    assert first["eval_bytes_down"] == second["eval_bytes_down"] == 3 * (4 * spec.numel + increment + 16)
