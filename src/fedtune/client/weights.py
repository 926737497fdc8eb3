"""A zero-copy view of a module's trainable parameters as one flat float32 vector.

The resident model is reused for every simulated client: ``write`` copies the global vector into the
parameters in place, ``read`` gathers them back. Names drop peft's adapter label (``.default``, see
``fedtune.models.lora.stable_name``) so the spec does not depend on what the adapter was called.
"""

from __future__ import annotations

import numpy as np
import torch

from fedtune.core.params import ParamSpec, check_vector
from fedtune.models.lora import trainable_parameters


class TrainableView:
    def __init__(self, module: torch.nn.Module) -> None:
        named = list(trainable_parameters(module).items())
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.params = [p for _, p in named]
        self.spec = ParamSpec(
            names=tuple(n for n, _ in named),
            shapes=tuple(tuple(p.shape) for _, p in named),
            dtypes=tuple("float32" for _ in named),
        )
        self._offsets = [(start, stop) for _, start, stop, _ in self.spec.offsets()]

    def read(self) -> np.ndarray:
        """The current trainable values as a new flat float32 vector."""
        out = np.empty(self.spec.numel, dtype=np.float32)
        with torch.no_grad():
            for p, (start, stop) in zip(self.params, self._offsets, strict=True):
                # one copy_ casts to float32 and moves to the CPU; the slice is cut on the NumPy side, where it
                # costs a fraction of a torch slice (this runs once per client per round)
                torch.from_numpy(out[start:stop]).copy_(p.detach().reshape(-1))
        return out

    def write(self, flat: np.ndarray) -> None:
        """Copy ``flat`` into the parameters in place (``flat`` itself is not modified)."""
        check_vector(flat, self.spec, who="parameter vector")
        with torch.no_grad():
            for p, (start, stop), shape in zip(self.params, self._offsets, self.spec.shapes, strict=True):
                p.copy_(torch.from_numpy(flat[start:stop].reshape(shape)))  # NumPy views: see ``read``
