"""The exact LoRA modes under bf16 autocast: the residual is applied in float32 beside W0, not rounded away."""

from __future__ import annotations

import numpy as np
import peft
import torch

from fedtune.client.hooks import LoraResidual

RESIDUAL = "lora/residual/"
KEY = RESIDUAL + "base_model.model.q_proj"


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(64, 48, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def residual_part(model, residual, x, *, separate: bool) -> torch.Tensor:
    """What the residual adds to the layer's output under bf16 autocast: f(W0 + s R) - f(W0)."""
    hook = LoraResidual(separate=separate)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        with hook.applied(model, {KEY: residual}):
            with_r = model(x).float()
        without = model(x).float()
    return with_r - without


def test_the_residual_survives_bf16_autocast_only_when_applied_beside_w0():
    """A residual of 1e-4 beside base weights of order 1 (bf16 ulp there: 2^-8..2^-7): folded into W0 and
    cast to bf16 it is lost in rounding; added in float32 beside W0 it is applied exactly."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        model.get_submodule("base_model.model.q_proj").base_layer.weight.normal_(0, 1.0)
    residual = (1e-4 * np.random.default_rng(0).normal(size=(48, 64))).astype(np.float32)
    x = torch.randn(8, 64)
    oracle = x.double() @ (2.0 * torch.from_numpy(residual).double()).T  # s = alpha / r = 2
    separate = residual_part(model, residual, x, separate=True)
    folded = residual_part(model, residual, x, separate=False)
    torch.testing.assert_close(separate.double(), oracle, rtol=1e-4, atol=1e-6)
    # folded: most entries of W0 + s R round to W0's bf16 value (the residual is lost there), the few near a
    # rounding boundary jump by a whole ulp: what reaches the output is rounding noise, not s R
    relative = (folded.double() - oracle).norm() / oracle.norm()
    assert relative > 0.5, relative


def split_model(b: np.ndarray, a: np.ndarray, w0: torch.Tensor):
    """The Net above with LoRA r=2 (s = 2) holding adapter factors (B, A) over base weight ``w0``."""
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    layer = model.get_submodule("base_model.model.q_proj")
    with torch.no_grad():
        layer.base_layer.weight.copy_(w0)
        layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
    return model


def test_two_splits_of_one_product_give_the_same_output_under_bf16_to_float32_rounding():
    """fedex and svd hold the same s (R + B A) split two ways. Under bf16 autocast with the residual applied
    beside W0, the outputs must agree to float32 rounding: peft's own forward rounds s B A x to bf16, which is
    why the hook recomputes the whole change in float32; with R folded into W0 they differ at bf16 scale."""
    rng = np.random.default_rng(1)
    w0 = torch.randn(48, 64)
    b1, a1 = rng.normal(size=(48, 2)).astype(np.float32), rng.normal(size=(2, 64)).astype(np.float32)
    b2, a2 = (0.5 * rng.normal(size=(48, 2))).astype(np.float32), rng.normal(size=(2, 64)).astype(np.float32)
    total = b1.astype(np.float64) @ a1 + 0.3 * rng.normal(size=(48, 64))  # R + B A, the same in both splits
    r1, r2 = (total - b1 @ a1).astype(np.float32), (total - b2 @ a2).astype(np.float32)
    x = torch.randn(8, 64)
    outputs = {}
    for separate in (True, False):
        for label, (b, a, r) in {"fedex": (b1, a1, r1), "svd": (b2, a2, r2)}.items():
            model = split_model(b, a, w0)
            hook = LoraResidual(separate=separate)
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), hook.applied(model, {KEY: r}):
                outputs[separate, label] = model(x).double()
    oracle = x.double() @ w0.bfloat16().double().T + x.double() @ (2.0 * torch.from_numpy(total)).T
    gap = (outputs[True, "fedex"] - outputs[True, "svd"]).abs().max().item()
    scale = oracle.abs().max().item()
    assert gap < 1e-5 * scale, (gap, scale)  # float32 rounding of sums of 64 terms
    # the bf16 W0 x is computed as bf16 (rounded products); the change is exact to float32
    torch.testing.assert_close(outputs[True, "fedex"], oracle, rtol=0, atol=0.05 * scale)
    folded_gap = (outputs[False, "fedex"] - outputs[False, "svd"]).abs().max().item()
    assert folded_gap > 100 * gap, (folded_gap, gap)


def test_the_bf16_residual_hook_trains_the_adapter_like_float32():
    """Gradients reach lora_A and lora_B through the hook's float32 path and match float32 training's up to
    the bf16 rounding of W0 x (inputs and W0 are bf16-exact here; the bf16 output of W0 x is not)."""
    rng = np.random.default_rng(2)
    w0 = torch.randn(48, 64).bfloat16().float()
    b, a = rng.normal(size=(48, 2)).astype(np.float32), rng.normal(size=(2, 64)).astype(np.float32)
    r = (0.1 * rng.normal(size=(48, 64))).astype(np.float32)
    x = torch.randn(8, 64).bfloat16().float()
    grads = []
    for bf16 in (True, False):
        model = split_model(b, a, w0)
        hook = LoraResidual(separate=bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), hook.applied(model, {KEY: r}):
            model(x).float().pow(2).sum().backward()
        layer = model.get_submodule("base_model.model.q_proj")
        grads.append([layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad])
    for g_bf16, g_fp32 in zip(*grads, strict=True):
        assert g_bf16 is not None and g_bf16.dtype == torch.float32
        relative = ((g_bf16 - g_fp32).norm() / g_fp32.norm()).item()
        assert relative < 1e-2, relative  # bf16 output rounding: 2^-9 relative per entry


def test_fedex_and_svd_evaluate_alike_after_a_bf16_round(tmp_path):
    """The whole path (simulate, worker, strategy, evaluation) under ``compute_dtype: bfloat16``: after one
    round fedex and svd hold the same global model split two ways, and their held-out losses agree to float32
    rounding (before the float32 change path they differed by 3.1e-5; with R folded into W0 by 1.3e-4)."""
    from test_strategies_e2e import llama_config, run

    losses, residual = {}, 0.0
    for mode in ("fedex", "svd"):
        raw = llama_config(tmp_path / mode, lora_aggregation=mode)
        raw["model"]["compute_dtype"] = "bfloat16"
        raw["federation"]["rounds"] = 1
        raw["client"]["lr"] = 0.3  # a large step, so fedex's residual is far from zero
        result = run(raw)
        losses[mode] = result.rounds[-1]["eval_loss"]
        if mode == "fedex":
            residual = max(float(np.abs(v).max()) for k, v in result.state.arrays.items() if k.startswith(RESIDUAL))
    assert residual > 1e-3, residual
    assert abs(losses["fedex"] - losses["svd"]) < 1e-6, losses


def test_the_bf16_residual_hook_reuses_the_base_layers_output_and_matches_recomputing_it():
    """Under bf16 the hook replaces peft's output by W0 x + s (B A + R) x; W0 x is the one peft's base layer
    computed in the same forward (one base matmul per call, not two), and the output and gradients equal
    those of recomputing W0 x in the hook (the earlier hook) exactly."""
    torch.manual_seed(0)
    w0 = torch.randn(48, 64)
    b = np.random.default_rng(1).normal(size=(48, 2)).astype(np.float32)
    a = np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32)
    residual = (1e-3 * np.random.default_rng(3).normal(size=(48, 64))).astype(np.float32)
    x = torch.randn(8, 64)

    def run(hook: LoraResidual) -> tuple[torch.Tensor, torch.Tensor, int]:
        model = split_model(b, a, w0)
        base = model.get_submodule("base_model.model.q_proj").base_layer
        calls = []
        base.register_forward_hook(lambda *_: calls.append(1))
        hook.load(model, {KEY: residual})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        grad = model.get_submodule("base_model.model.q_proj").lora_B["default"].weight.grad
        return out.detach(), grad.clone(), len(calls)

    class Recomputing(LoraResidual):
        def _capture_hook(self, key):
            return lambda *_: None

    out, grad, calls = run(LoraResidual(separate=True))
    old_out, old_grad, old_calls = run(Recomputing(separate=True))
    assert (calls, old_calls) == (1, 2)
    assert out.dtype == torch.float32
    assert torch.equal(out, old_out)
    assert torch.equal(grad, old_grad)
