"""The ``simulation`` section: which backend runs simulated clients."""

from __future__ import annotations

from typing import Literal

from fedtune.config.base import Section


class SimulationConfig(Section):
    backend: Literal["inprocess"] = "inprocess"  # inprocess: one resident model, clients one after another
