"""The exact LoRA modes under bf16 autocast: the residual is applied in float32 beside W0, not rounded away."""

from __future__ import annotations

import numpy as np
import peft
import torch

from fedtune.client.hooks import LoraResidual

KEY = "lora/residual/base_model.model.q_proj"


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
