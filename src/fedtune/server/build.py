"""Build the server-side strategy from the config (the one place that maps config to strategy objects).

Every strategy is one FedOpt: an aggregator (``server.aggregator``), a server optimiser
(``server.optimizer``) and plug-ins (FedProx options, SCAFFOLD, a LoRA mode); the ``privacy`` section then
wraps it (DP-FedAvg, secure aggregation). The config's cross-section rules were checked when it was loaded
(``fedtune.config.rules``).
"""

from __future__ import annotations

from fedtune.aggregation.robust import make_aggregator
from fedtune.aggregation.server_opt import ServerOptimizer, make_server_optimizer
from fedtune.config.lora_ranks import HetLoraConfig
from fedtune.config.schema import Config
from fedtune.core.strategy import Strategy
from fedtune.privacy.build import wrap_strategy
from fedtune.server.strategies import (
    ClientOptions,
    ClientRankExtras,
    FedExLora,
    FedOpt,
    FfaLora,
    FlexLora,
    FLoRA,
    HetLora,
    Plugin,
    RankAssignment,
    Scaffold,
    SvdLora,
)


def server_optimizer(config: Config) -> ServerOptimizer:
    """``server.optimizer`` with its settings: the step a synchronous round and a FedBuff buffer both take."""
    server = config.server
    return make_server_optimizer(
        server.optimizer, lr=server.lr, momentum=server.momentum, beta1=server.beta1, beta2=server.beta2, tau=server.tau
    )


def build_plugins(config: Config, *, num_clients: int | None) -> list[Plugin]:
    server = config.server
    plugins: list[Plugin] = []
    if server.proximal_mu > 0:
        plugins.append(ClientOptions({"proximal_mu": server.proximal_mu}, name="fedprox"))
    if server.scaffold:
        plugins.append(Scaffold(num_clients=num_clients))
    rslora = config.model.lora is not None and config.model.lora.use_rslora
    ranks = RankAssignment.from_config(server.lora_client_ranks, seed=config.seed, rslora=rslora)
    lora_modes = {
        "ffa": lambda: FfaLora(),
        "fedex": lambda: FedExLora(residual_rank=server.lora_residual_rank),
        "svd": lambda: SvdLora(residual_rank=server.lora_residual_rank),
        "flora": lambda: FLoRA(seed=config.seed, ranks=ranks, residual_rank=server.lora_residual_rank),
        "hetlora": lambda: HetLora(ranks=ranks, options=server.hetlora or HetLoraConfig()),
        "flexlora": lambda: FlexLora(ranks=ranks),
    }
    if server.lora_aggregation in lora_modes:
        plugins.append(lora_modes[server.lora_aggregation]())
    if server.lora_aggregation in ("flora", "hetlora", "flexlora") and config.personalization.finetune_steps:
        plugins.append(ClientRankExtras(ranks))  # each client fine-tunes at its own rank after the last round
    return plugins


def build_strategy(config: Config, *, num_clients: int | None = None) -> Strategy:
    """``num_clients``: the population size, when the caller knows it (SCAFFOLD's N)."""
    server = config.server
    strategy = FedOpt(
        aggregator=make_aggregator(
            server.aggregator,
            trim_fraction=server.trim_fraction,
            num_byzantine=server.num_byzantine,
            num_selected=server.multi_krum_m,
            norm_bound=server.norm_bound,
        ),
        optimizer=server_optimizer(config),
        weighting=server.weighting,
        plugins=build_plugins(config, num_clients=num_clients),
    )
    # --- privacy, last: DP-FedAvg and/or secure aggregation wrap the strategy (unchanged when off) ---
    return wrap_strategy(strategy, config)
