"""The privacy section: defaults off, switches, and contradictions as errors that name the key."""

from __future__ import annotations

import pytest

from fedtune.config import parse_config
from fedtune.errors import ConfigError
from fedtune.privacy.build import client_privacy, wrap_strategy
from fedtune.server.build import build_strategy

DIGITS = {
    "model": {"kind": "module", "factory": "fedtune.models.cnn:digits_cnn", "lora": None},
    "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 10}},
}


def cfg(privacy: dict, **sections):
    return parse_config({**DIGITS, "privacy": privacy, **sections})


def test_privacy_is_off_by_default_and_builds_nothing() -> None:
    config = parse_config(DIGITS)
    assert not config.privacy.enabled
    strategy = build_strategy(config)
    assert wrap_strategy(strategy, config) is strategy
    assert client_privacy(config) == ([], [])


@pytest.mark.parametrize(
    ("privacy", "sections", "key"),
    [
        ({"dp": {"noise_multiplier": 1.0}}, {}, "server.weighting"),  # default weighting is by examples
        (
            {"dp": {"noise_multiplier": 1.0, "target_epsilon": 2.0}},
            {"server": {"weighting": "uniform"}},
            "target_epsilon",
        ),
        ({"dp": {}}, {"server": {"weighting": "uniform"}}, "privacy.dp.noise_multiplier"),
        (
            {"dp": {"noise_multiplier": 1.0, "sampling": "fixed", "accountant": "pld"}},
            {"server": {"weighting": "uniform"}},
            "privacy.dp.accountant",
        ),
        (
            {"dp": {"target_epsilon": 3.0, "epsilon_budget": 2.0}},
            {"server": {"weighting": "uniform"}},
            "epsilon_budget",
        ),
        (
            {"dp": {"noise_multiplier": 1.0, "adaptive": {"count_noise": 0.4}}},
            {"server": {"weighting": "uniform"}},
            "count_noise",
        ),
        ({"secure_aggregation": True}, {"server": {"aggregator": "krum"}}, "server.aggregator"),
        ({"secure_aggregation": True}, {"server": {"aggregator": "median"}}, "server.aggregator"),
        (
            {"dp": {"noise_multiplier": 1.0}},
            {"server": {"weighting": "uniform", "aggregator": "trimmed_mean"}},
            "server.aggregator",
        ),
        (
            {"secure_aggregation": True},
            {"server": {"scaffold": True, "optimizer": "sgd"}, "client": {"optimizer": "sgd"}},
            "server.scaffold",
        ),
        ({"secure_aggregation": {"threshold": 0.4}}, {}, "threshold"),
        ({"secure_aggregation": {"value_bits": 40}}, {}, "value_bits"),
        ({"dpsgd": {"sample_rate": 0.1}}, {}, "privacy.dpsgd.sample_rate"),
        ({"dpsgd": {}}, {"client": {"full_batch": True}}, "privacy.dpsgd.sample_rate"),
        ({"dpsgd": {}}, {"server": {"proximal_mu": 0.1}}, "server.proximal_mu"),
        ({"dp": {"noise_multiplier": 1.0, "typo": 1}}, {"server": {"weighting": "uniform"}}, "typo"),
    ],
)
def test_contradictions_are_errors_that_name_the_key(privacy: dict, sections: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg(privacy, **sections)


def test_dpsgd_refuses_instruction_data() -> None:
    with pytest.raises(ConfigError, match="instruct"):
        parse_config(
            {
                "model": {"name": "tiny-llama"},
                "data": {"source": "instruct", "path": "x.json", "partition": {"kind": "iid", "num_clients": 2}},
                "privacy": {"dpsgd": True},
            }
        )


def test_valid_private_configs_build_wrapped_strategies() -> None:
    from fedtune.privacy.dp_fedavg import DPFedAvg
    from fedtune.privacy.secagg.strategy import SecureAggregation

    both = cfg(
        {"dp": {"noise_multiplier": 1.0}, "secure_aggregation": True},
        server={"weighting": "uniform", "optimizer": "adam"},
    )
    assert isinstance(build_strategy(both), DPFedAvg)
    secure = cfg({"secure_aggregation": {"neighbours": 4}}, server={"optimizer": "momentum"})
    assert isinstance(build_strategy(secure), SecureAggregation)
    hooks, transforms = client_privacy(
        cfg({"dp": {"noise_multiplier": 1.0}, "dpsgd": True}, server={"weighting": "uniform"})
    )
    assert len(hooks) == 1 and len(transforms) == 1  # DP-SGD's hook (its finish saves the ledger); DP's clip
    assert cfg({"secure_aggregation": False}).privacy.secure_aggregation is None


def test_secagg_is_refused_over_a_transport_that_would_see_plaintext() -> None:
    from fedtune.server.summing import check_secagg_transport
    from fedtune.transport.base import Capabilities

    class GrpcServerTransport:  # stands in for a networked transport not started for SecAgg
        capabilities = Capabilities()

    with pytest.raises(ConfigError, match="plaintext"):
        check_secagg_transport(cfg({"secure_aggregation": True}), GrpcServerTransport())
    check_secagg_transport(cfg({}), GrpcServerTransport())  # nothing to refuse without SecAgg


def test_dpsgd_with_data_parallel_clients_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.dpsgd cannot run with simulation\.client_nproc 2"):
        cfg({"dpsgd": True}, simulation={"client_nproc": 2})
    assert cfg({"dpsgd": True}, simulation={"client_nproc": 1}).privacy.dpsgd is not None
    assert cfg({}, simulation={"client_nproc": 2}).simulation.client_nproc == 2  # data parallel alone is fine
