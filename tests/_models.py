"""Model sections shared by tests: the small digits CNN (a plain ``torch.nn.Module``, full-parameter)."""

from __future__ import annotations

DIGITS_CNN = {
    "kind": "module",
    "factory": "fedtune.models.cnn:digits_cnn",
    "factory_kwargs": {"channels": 4, "hidden": 16},
    "lora": None,
}
