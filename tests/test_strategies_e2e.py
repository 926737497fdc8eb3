"""One end-to-end ``simulate`` run per strategy family, through the config, session, worker and loop.

Small and fast: the digits CNN (full-parameter exchange) for the server optimisers, FedProx with
stragglers, SCAFFOLD and a robust rule; the tiny random Llama with LoRA for the LoRA modes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedtune.aggregation.lora import lora_pairs
from fedtune.config import parse_config
from fedtune.run.session import simulate


def digits_config(tmp_path: Path, **sections: dict) -> dict:
    cfg: dict = {
        "seed": 1,
        "model": {
            "kind": "module",
            "factory": "fedtune.models.cnn:digits_cnn",
            "factory_kwargs": {"channels": 4, "hidden": 16},
            "lora": None,
        },
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


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["fedex", *(pytest.param(m, marks=pytest.mark.slow) for m in ("ffa", "flora", "svd"))])
def test_lora_modes_run_on_a_peft_model(mode, tmp_path):
    server = {"lora_aggregation": mode}
    if mode == "flora":
        server["lora_client_ranks"] = [2, 4]
    result = run(llama_config(tmp_path, **server))
    state = result.state
    pairs = lora_pairs(state.spec)
    assert pairs and all(np.isfinite(r["eval_loss"]) for r in result.rounds)
    residuals = {k: v for k, v in state.arrays.items() if k.startswith("lora/residual/")}
    if mode == "ffa":
        from fedtune.run.session import initial_params

        start = initial_params(result.run_dir)
        for p in pairs:  # A never moved
            np.testing.assert_array_equal(state.params[p.a[0] : p.a[1]], start[p.a[0] : p.a[1]])
        assert not residuals
    else:
        assert len(residuals) == len(pairs)
        assert any(np.abs(v).max() > 0 for v in residuals.values())


def test_residual_hook_on_a_real_peft_layer():
    """LoraResidual on peft's own LoRA Linear: forward == x (W0 + s (R + B A))^T, and a new R replaces the old."""
    import peft
    import torch

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
    for _ in range(2):
        residual = rng.normal(size=(4, 6)).astype(np.float32)
        hook.apply(model, "base_model.model.q_proj", residual)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = w0 + 3.0 * (torch.from_numpy(residual) + b @ a)  # s = alpha / r = 3
        x = torch.randn(5, 6)
        torch.testing.assert_close(model(x), x @ expected.T, rtol=1e-5, atol=1e-5)
