"""Build the server-side strategy from the config (the one place that maps config to strategy objects)."""

from __future__ import annotations

from fedtune.config.schema import Config
from fedtune.server.strategy import FedAvg, Strategy


def build_strategy(config: Config) -> Strategy:
    return FedAvg(config.server)
