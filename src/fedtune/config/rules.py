"""Every rule that spans config sections, in one table, checked when the config is loaded.

A rule names the keys it relates and returns the error (naming them) or None. ``Config._check`` runs the
whole table, so a contradiction (``server.scaffold: true`` with the default adamw optimiser, DP with example
weighting, SecAgg with a robust aggregator) fails at load, before any model or data is built. Rules within one
section (``server.norm_bound`` needs ``norm_bounded_mean``) stay in that section's validator; rules that need
the transport (SecAgg over a transport that cannot carry it) are in ``fedtune.privacy.build``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.config.asynchronous import async_violation
from fedtune.config.lora_ranks import largest_rank
from fedtune.config.personalization import check_personalization_rules
from fedtune.config.privacy import check_distributed_dp, check_dpsgd_data_parallel, check_secagg_availability
from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.config.schema import Config

CLASSIFICATION_SOURCES = frozenset({"classification", "bbc_news", "python"})
TEXT_SOURCES = frozenset({"shakespeare", "text", "instruct", "python"})
SUM_ONLY = ("privacy.dp", "privacy.secure_aggregation")  # the server sees only a noised or masked sum
# LoRA modes that combine clients' factors non-linearly (or need each rank-r_k adapter)
NEEDS_INDIVIDUAL_UPDATES = ("fedex", "svd", "flora", "flexlora", "hetlora")


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]  # the keys the rule relates (for the table's test and the docs)
    check: Callable[[Config], str | None]  # the error, naming the keys, or None when the config obeys


def _classification_source(c: Config) -> str | None:
    if c.model.kind == "classification" and c.data.source not in CLASSIFICATION_SOURCES:
        return f"model.kind 'classification' needs a labelled data.source, got {c.data.source!r}"
    return None


def _causal_lm_source(c: Config) -> str | None:
    if c.model.kind == "causal_lm" and c.data.source not in TEXT_SOURCES:
        return f"model.kind 'causal_lm' needs a text data.source, got {c.data.source!r}"
    return None


def _dirichlet_needs_labels(c: Config) -> str | None:
    labelled = CLASSIFICATION_SOURCES | {"digits"}
    if c.data.partition.kind == "dirichlet_labels" and c.data.source not in labelled:
        return "data.partition.kind 'dirichlet_labels' needs labelled data"
    return None


def _natural_partition(c: Config) -> str | None:
    # your files (text, instruct, classification) have natural clients when data.path is a folder; python: a
    # dict of datasets is one client per entry (one dataset to partition is refused at build)
    if c.data.partition.kind == "natural" and c.data.source in {"bbc_news", "digits"}:
        return f"data.source {c.data.source!r} has no natural clients: set data.partition.kind"
    return None


def _gradient_checkpointing(c: Config) -> str | None:
    if c.client.gradient_checkpointing and c.model.kind == "module":
        return "client.gradient_checkpointing needs a Hugging Face model (model.kind causal_lm or classification)"
    return None


def _hf_trainer_one_process(c: Config) -> str | None:
    if c.client.trainer == "hf" and c.simulation.client_nproc > 1:
        return "client.trainer 'hf' trains in one process: simulation.client_nproc must be 1"
    return None


def _hf_trainer_own_loop(c: Config) -> str | None:
    in_loop = {
        "server.proximal_mu (FedProx)": c.server.proximal_mu > 0,
        "server.scaffold": c.server.scaffold,
        "privacy.dpsgd": c.privacy.dpsgd is not None,
        "client.straggler_fraction": c.client.straggler_fraction > 0,
        "server.lora_aggregation flora/hetlora/flexlora (client ranks)": c.server.lora_aggregation
        in ("flora", "hetlora", "flexlora"),
    }
    needs_loop = [key for key, on in in_loop.items() if on]
    if c.client.trainer == "hf" and needs_loop:
        return (
            f"client.trainer 'hf' runs transformers.Trainer's own loop, but {', '.join(needs_loop)} acts inside "
            "fedtune's built-in loop: use client.trainer 'builtin'"
        )
    return None


def _scaffold_needs_sgd(c: Config) -> str | None:
    if c.server.scaffold and c.client.optimizer != "sgd":
        return (
            "server.scaffold: SCAFFOLD assumes plain local SGD (its control variates correct SGD steps): "
            f"set client.optimizer to 'sgd' (it is {c.client.optimizer!r})"
        )
    return None


def _lora_mode_needs_lora(c: Config) -> str | None:
    if c.server.lora_aggregation != "naive" and c.model.lora is None:
        return f"server.lora_aggregation {c.server.lora_aggregation!r} needs model.lora (LoRA adapters)"
    return None


def _lora_client_ranks(c: Config) -> str | None:
    ranks, lora = c.server.lora_client_ranks, c.model.lora
    if ranks is not None and lora is not None and largest_rank(ranks) > lora.r:
        return f"server.lora_client_ranks may not exceed model.lora.r = {lora.r}"
    return None


def _hetlora_options(c: Config) -> str | None:
    het = c.server.hetlora
    if het is None:
        return None
    if c.server.lora_aggregation != "hetlora":
        return f"server.hetlora only applies to lora_aggregation 'hetlora', not {c.server.lora_aggregation!r}"
    if het.aggregation == "sparsity" and c.server.aggregator != "mean":
        return (
            "server.hetlora.aggregation 'sparsity' is a weighted mean of the padded replies: it needs "
            f"server.aggregator 'mean', not {c.server.aggregator!r}"
        )
    return None


def _lora_residual_rank(c: Config) -> str | None:
    """A cap at or above the exact increment's largest rank never binds: only its cost (an SVD a module) remains."""
    q, k, lora = c.server.lora_residual_rank, c.federation.clients_per_round, c.model.lora
    if q is None or k is None or lora is None or c.server.lora_aggregation not in ("fedex", "svd", "flora"):
        return None
    # fedex / svd: rank <= (K - 1) r; flora: the stack of K adapters, rank <= K r (fedtune.aggregation.lora)
    flora = c.server.lora_aggregation == "flora"
    bound, how = (k * lora.r, "clients_per_round x") if flora else ((k - 1) * lora.r, "(clients_per_round - 1) x")
    if q >= bound:
        return (
            f"server.lora_residual_rank {q} never caps anything: a round's exact residual increment under "
            f"lora_aggregation {c.server.lora_aggregation!r} has rank at most {bound} ({how} model.lora.r = "
            f"{k} clients, r = {lora.r}); set it below {bound}, or leave it unset for the exact mode"
        )
    return None


def _dpsgd_accumulation(c: Config) -> str | None:
    if c.privacy.dpsgd is not None and c.client.gradient_accumulation_steps > 1:
        return (
            "privacy.dpsgd clips and noises each step's per-example gradients of one batch: "
            "use a larger client.batch_size instead of client.gradient_accumulation_steps"
        )
    return None


def _dpsgd_data_parallel(c: Config) -> str | None:
    try:
        check_dpsgd_data_parallel(c.privacy, c.simulation.client_nproc, nproc_key="simulation.client_nproc")
    except ConfigError as err:
        return str(err)
    return None


def _dp_adaptive_norm_bound(c: Config) -> str | None:
    if c.privacy.dp is not None and c.server.update_norm_bound == "adaptive":
        return (
            "server.update_norm_bound 'adaptive' cannot be used with privacy.dp: the adaptive bound is a multiple "
            "of the median norm of the clients' un-noised updates, a statistic of their data that would reach "
            "the next rounds outside the privacy accounting; DP's clip already bounds every update to "
            "clip_norm (use 'off', 'auto' or a fixed number)"
        )
    return None


def _dp_uniform_weights(c: Config) -> str | None:
    if c.privacy.dp is not None and c.server.weighting != "uniform":
        return (
            "server.weighting must be 'uniform' under privacy.dp: weighting by example count lets one "
            "client count for more than the clip norm C and breaks the sensitivity bound"
        )
    return None


def _sum_only(c: Config) -> list[str]:
    """The privacy keys under which the server sees only a (noised or masked) sum of the updates."""
    on = {"privacy.dp": c.privacy.dp, "privacy.secure_aggregation": c.privacy.secure_aggregation}
    return [key for key, section in on.items() if section is not None]


def _sum_only_aggregator(c: Config) -> str | None:
    for key in _sum_only(c):
        if c.server.aggregator != "mean":
            return (
                f"server.aggregator {c.server.aggregator!r} needs individual updates, which {key} does not give the "
                "server (it sees only a noised or masked sum); use aggregator 'mean'"
            )
    return None


def _sum_only_scaffold(c: Config) -> str | None:
    for key in _sum_only(c):
        if c.server.scaffold:
            return f"server.scaffold needs each client's control variate, which {key} does not reveal"
    return None


def _sum_only_lora_mode(c: Config) -> str | None:
    for key in _sum_only(c):
        if c.server.lora_aggregation in NEEDS_INDIVIDUAL_UPDATES:
            return (
                f"server.lora_aggregation {c.server.lora_aggregation!r} needs individual adapters, incompatible "
                f"with {key}"
            )
    return None


def _dpsgd_sample_rate(c: Config) -> str | None:
    if c.privacy.dpsgd is not None and c.client.full_batch != (c.privacy.dpsgd.sample_rate is not None):
        return (
            "privacy.dpsgd.sample_rate is required with client.full_batch (Poisson-sampled steps) and not "
            "allowed without it (shuffled minibatches are accounted without amplification)"
        )
    return None


def _dpsgd_instruct(c: Config) -> str | None:
    if c.privacy.dpsgd is not None and c.model.kind == "causal_lm" and c.data.source == "instruct":
        return (
            "privacy.dpsgd with data.source 'instruct' is not supported: prompt tokens are masked out of the "
            "loss, so the per-example normalisation DP-SGD needs cannot be read from the batch"
        )
    return None


def _dpsgd_fedprox(c: Config) -> str | None:
    if c.privacy.dpsgd is not None and c.server.proximal_mu > 0:
        return (
            "server.proximal_mu > 0 with privacy.dpsgd: DP-SGD replaces each step's gradient by the private "
            "one, which would silently drop FedProx's proximal term"
        )
    return None


def _distributed_dp(c: Config) -> str | None:
    if c.privacy.dp is None or not c.privacy.dp.distributed:
        return None
    try:
        check_distributed_dp(c.privacy, c.federation.clients_per_round)
    except ValueError as err:
        return str(err)
    return None


def _secagg_availability(c: Config) -> str | None:
    if c.privacy.secure_aggregation is None:
        return None
    try:
        check_secagg_availability(c.privacy.secure_aggregation, c.federation.clients_per_round)
    except ValueError as err:
        return str(err)
    return None


def _personalization(c: Config) -> str | None:
    try:
        check_personalization_rules(c)
    except ValueError as err:
        return str(err)
    return None


RULES: dict[str, Rule] = {
    "classification_source": Rule(("model.kind", "data.source"), _classification_source),
    "causal_lm_source": Rule(("model.kind", "data.source"), _causal_lm_source),
    "dirichlet_needs_labels": Rule(("data.partition.kind", "data.source"), _dirichlet_needs_labels),
    "natural_partition": Rule(("data.partition.kind", "data.source"), _natural_partition),
    "gradient_checkpointing": Rule(("client.gradient_checkpointing", "model.kind"), _gradient_checkpointing),
    "hf_trainer_one_process": Rule(("client.trainer", "simulation.client_nproc"), _hf_trainer_one_process),
    "hf_trainer_own_loop": Rule(("client.trainer", "server.*", "privacy.dpsgd", "client.*"), _hf_trainer_own_loop),
    "scaffold_needs_sgd": Rule(("server.scaffold", "client.optimizer"), _scaffold_needs_sgd),
    "lora_mode_needs_lora": Rule(("server.lora_aggregation", "model.lora"), _lora_mode_needs_lora),
    "lora_client_ranks": Rule(("server.lora_client_ranks", "model.lora.r"), _lora_client_ranks),
    "hetlora_options": Rule(("server.hetlora", "server.lora_aggregation", "server.aggregator"), _hetlora_options),
    "lora_residual_rank": Rule(
        ("server.lora_residual_rank", "server.lora_aggregation", "model.lora.r", "federation.clients_per_round"),
        _lora_residual_rank,
    ),
    "dpsgd_accumulation": Rule(("privacy.dpsgd", "client.gradient_accumulation_steps"), _dpsgd_accumulation),
    "dpsgd_data_parallel": Rule(("privacy.dpsgd", "simulation.client_nproc"), _dpsgd_data_parallel),
    "dp_uniform_weights": Rule(("privacy.dp", "server.weighting"), _dp_uniform_weights),
    "dp_adaptive_norm_bound": Rule(("privacy.dp", "server.update_norm_bound"), _dp_adaptive_norm_bound),
    "sum_only_aggregator": Rule((*SUM_ONLY, "server.aggregator"), _sum_only_aggregator),
    "sum_only_scaffold": Rule((*SUM_ONLY, "server.scaffold"), _sum_only_scaffold),
    "sum_only_lora_mode": Rule((*SUM_ONLY, "server.lora_aggregation"), _sum_only_lora_mode),
    "distributed_dp": Rule(
        ("privacy.dp.distributed", "privacy.secure_aggregation", "federation.clients_per_round"), _distributed_dp
    ),
    "secagg_availability": Rule(
        ("privacy.secure_aggregation", "federation.clients_per_round"), _secagg_availability
    ),
    "dpsgd_sample_rate": Rule(("privacy.dpsgd.sample_rate", "client.full_batch"), _dpsgd_sample_rate),
    "dpsgd_instruct": Rule(("privacy.dpsgd", "model.kind", "data.source"), _dpsgd_instruct),
    "dpsgd_fedprox": Rule(("privacy.dpsgd", "server.proximal_mu"), _dpsgd_fedprox),
    "personalization": Rule(
        ("personalization", "model.lora", "server.lora_aggregation", "privacy.dpsgd", "client.*"), _personalization
    ),
    "async_mode": Rule(("server.mode", "server.fedbuff", "simulation.client_speed", "privacy.*"), async_violation),
}


def violations(config: Config) -> list[str]:
    """Every rule the config breaks, in table order (empty: it obeys them all)."""
    return [msg for rule in RULES.values() if (msg := rule.check(config)) is not None]


def check_rules(config: Config) -> None:
    """Raise ValueError (inside pydantic: reported like any other config error) naming the first broken rule."""
    broken = violations(config)
    if broken:
        raise ValueError(broken[0])
