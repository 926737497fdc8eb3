"""Composable server strategies: FedOpt = aggregator + server optimiser + plug-ins (SCAFFOLD, LoRA modes)."""

from fedtune.server.strategies.fedopt import ClientOptions, FedOpt, NoFold, Plugin, PluginFold
from fedtune.server.strategies.flexlora import FlexLora
from fedtune.server.strategies.hetlora import HetLora
from fedtune.server.strategies.lora import FedExLora, FfaLora, FLoRA, SvdLora
from fedtune.server.strategies.lora_ranks import ClientRankExtras, RankAssignment
from fedtune.server.strategies.scaffold import Scaffold

__all__ = [
    "ClientOptions",
    "ClientRankExtras",
    "FLoRA",
    "FedExLora",
    "FedOpt",
    "FfaLora",
    "FlexLora",
    "HetLora",
    "NoFold",
    "Plugin",
    "PluginFold",
    "RankAssignment",
    "Scaffold",
    "SvdLora",
]
