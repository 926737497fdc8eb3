"""fedtune: federated fine-tuning of language models with LoRA adapters.

The Python API (docs/PYTHON_API.md): ``fedtune.simulate`` runs a simulated federation from a config and,
optionally, your own model, datasets, loss and evaluation; ``fedtune.participate`` federates your own
training loop (in simulation, or against ``fedtune server`` over gRPC).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Config", "Job", "SimulationResult", "federate", "participate", "simulate"]

if TYPE_CHECKING:
    from fedtune.api import SimulationResult, federate, participate, simulate
    from fedtune.client.external import Job
    from fedtune.config.schema import Config


def __getattr__(name: str) -> Any:
    # imported on first use: `import fedtune` (and every CLI start) stays free of torch and transformers
    if name in ("simulate", "participate", "federate", "SimulationResult"):
        from fedtune import api

        return getattr(api, name)
    if name == "Job":
        from fedtune.client.external import Job

        return Job
    if name == "Config":
        from fedtune.config.schema import Config

        return Config
    raise AttributeError(f"module 'fedtune' has no attribute {name!r}")
