"""The table of cross-section config rules (fedtune.config.rules): every rule fails at load, with its keys
named, on a config that breaks it, and passes on the same config with the contradiction removed."""

from __future__ import annotations

import pytest

from fedtune.config import parse_config
from fedtune.config.rules import RULES
from fedtune.errors import ConfigError

DIGITS = {
    "model": {"kind": "module", "factory": "fedtune.models.cnn:digits_cnn", "lora": None},
    "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 4}},
}
SGD = {"client": {"optimizer": "sgd"}}
UNIFORM = {"server": {"weighting": "uniform"}}
NEWS = {"source": "bbc_news", "partition": {"kind": "iid", "num_clients": 2}}

# rule -> (a config that breaks it, a fragment of the error, the same config made valid)
CASES: dict[str, tuple[dict, str, dict]] = {
    "classification_source": (
        {"model": {"kind": "classification"}, "data": {"source": "shakespeare"}},
        "needs a labelled data.source",
        {"model": {"kind": "classification"}, "data": NEWS},
    ),
    "causal_lm_source": ({"data": NEWS}, "needs a text", {}),
    "dirichlet_needs_labels": (
        {"data": {"source": "shakespeare", "partition": {"kind": "dirichlet_labels", "num_clients": 2}}},
        "dirichlet_labels' needs labelled",
        {"data": {"source": "shakespeare"}},
    ),
    "natural_partition": (
        {**DIGITS, "data": {"source": "digits", "partition": {"kind": "natural"}}},
        "has no natural clients",
        DIGITS,
    ),
    "gradient_checkpointing": (
        {**DIGITS, "client": {"gradient_checkpointing": True}},
        "gradient_checkpointing",
        DIGITS,
    ),
    "hf_trainer_one_process": (
        {"client": {"trainer": "hf"}, "simulation": {"client_nproc": 2}},
        "client_nproc must be 1",
        {"client": {"trainer": "hf"}},
    ),
    "hf_trainer_own_loop": (
        {"client": {"trainer": "hf"}, "server": {"proximal_mu": 0.1}},
        "FedProx",
        {"client": {"trainer": "hf"}},
    ),
    "scaffold_needs_sgd": (
        {"server": {"scaffold": True}},
        "set client.optimizer to 'sgd'",
        {"server": {"scaffold": True}, **SGD},
    ),
    "lora_mode_needs_lora": (
        {**DIGITS, "server": {"lora_aggregation": "fedex"}},
        "needs model.lora",
        DIGITS,
    ),
    "lora_client_ranks": (
        {"model": {"lora": {"r": 4}}, "server": {"lora_aggregation": "flora", "lora_client_ranks": [2, 8]}},
        "may not exceed model.lora.r = 4",
        {"model": {"lora": {"r": 4}}, "server": {"lora_aggregation": "flora", "lora_client_ranks": [2, 4]}},
    ),
    "hetlora_options": (
        {"server": {"lora_aggregation": "flexlora", "hetlora": {"prune_gamma": 0.5}}},
        "server.hetlora only applies to lora_aggregation 'hetlora'",
        {"server": {"lora_aggregation": "hetlora", "hetlora": {"prune_gamma": 0.5}}},
    ),
    "dpsgd_accumulation": (
        {"privacy": {"dpsgd": True}, "client": {"gradient_accumulation_steps": 2}},
        "gradient_accumulation_steps",
        {"privacy": {"dpsgd": True}},
    ),
    "dpsgd_data_parallel": (
        {"privacy": {"dpsgd": True}, "simulation": {"client_nproc": 2}},
        "simulation.client_nproc 2",
        {"privacy": {"dpsgd": True}},
    ),
    "dp_uniform_weights": (
        {"privacy": {"dp": {"noise_multiplier": 1.0}}},
        "server.weighting must be 'uniform'",
        {"privacy": {"dp": {"noise_multiplier": 1.0}}, **UNIFORM},
    ),
    "dp_adaptive_norm_bound": (
        {
            "privacy": {"dp": {"noise_multiplier": 1.0}},
            "server": {"weighting": "uniform", "update_norm_bound": "adaptive"},
        },
        "median norm of the clients' un-noised updates",
        {"privacy": {"dp": {"noise_multiplier": 1.0}}, "server": {"weighting": "uniform", "update_norm_bound": "auto"}},
    ),
    "sum_only_aggregator": (
        {"privacy": {"secure_aggregation": True}, "server": {"aggregator": "median"}},
        "server.aggregator 'median' needs individual updates, which privacy.secure_aggregation",
        {"privacy": {"secure_aggregation": True}},
    ),
    "sum_only_scaffold": (
        {"privacy": {"dp": {"noise_multiplier": 1.0}}, "server": {"weighting": "uniform", "scaffold": True}, **SGD},
        "server.scaffold needs each client's control variate, which privacy.dp",
        {"privacy": {"dp": {"noise_multiplier": 1.0}}, **UNIFORM, **SGD},
    ),
    "sum_only_lora_mode": (
        {"privacy": {"secure_aggregation": True}, "server": {"lora_aggregation": "fedex"}},
        "'fedex' needs individual adapters",
        {"privacy": {"secure_aggregation": True}, "server": {"lora_aggregation": "ffa"}},
    ),
    "distributed_dp": (
        {**UNIFORM, "privacy": {"dp": {"noise_multiplier": 1.0, "distributed": True}}},
        "privacy.dp.distributed needs privacy.secure_aggregation",
        {**UNIFORM, "privacy": {"dp": {"noise_multiplier": 1.0}}},
    ),
    "secagg_availability": (
        {
            "federation": {"clients_per_round": 100},
            "privacy": {"secure_aggregation": {"expected_dropout": 0.3, "neighbours": 8, "threshold": 2 / 3}},
        },
        "neighbours=8 and threshold=0.666",
        {"federation": {"clients_per_round": 100}, "privacy": {"secure_aggregation": {"expected_dropout": 0.3}}},
    ),
    "dpsgd_sample_rate": (
        {"privacy": {"dpsgd": True}, "client": {"full_batch": True}},
        "sample_rate is required with client.full_batch",
        {"privacy": {"dpsgd": {"sample_rate": 0.1}}, "client": {"full_batch": True}},
    ),
    "dpsgd_instruct": (
        {"privacy": {"dpsgd": True}, "data": {"source": "instruct", "path": "x.jsonl"}},
        "data.source 'instruct' is not supported",
        {"data": {"source": "instruct", "path": "x.jsonl"}},
    ),
    "personalization": (
        {"personalization": {"method": "fedsa"}, "privacy": {"dpsgd": True}},
        "local DP-SGD and personalisation cannot be combined",
        {"personalization": {"method": "fedsa"}},
    ),
    "dpsgd_fedprox": (
        {"privacy": {"dpsgd": True}, "server": {"proximal_mu": 0.1}},
        "proximal term",
        {"privacy": {"dpsgd": True}},
    ),
    "lora_residual_rank": (
        {"federation": {"clients_per_round": 3}, "server": {"lora_aggregation": "fedex", "lora_residual_rank": 16}},
        "lora_residual_rank 16 never caps anything: a round's exact residual increment under lora_aggregation "
        "'fedex' has rank at most 16",
        {"federation": {"clients_per_round": 3}, "server": {"lora_aggregation": "fedex", "lora_residual_rank": 15}},
    ),
    "async_mode": (
        {"server": {"fedbuff": {"buffer_size": 2}}},
        "only applies to server.mode 'async'",
        {},
    ),
}


def test_every_rule_has_a_case() -> None:
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_fails_at_load_and_names_its_keys(name: str) -> None:
    broken, fragment, fixed = CASES[name]
    with pytest.raises(ConfigError, match=r"\(top level\)") as err:
        parse_config(broken)
    assert fragment in str(err.value)
    assert RULES[name].check(parse_config(fixed)) is None  # the same config without the contradiction loads
    assert any(key.split(".")[0] in str(err.value) for key in RULES[name].keys)
