from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import apply_overrides, dump_config, load_config, parse_config
from fedtune.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_defaults_are_valid_and_round_trip(tmp_path: Path) -> None:
    cfg = parse_config({})
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"federation": {"roundz": 3}}, "federation.roundz: unknown key"),
        ({"client": {"lr": "fast"}}, "client.lr"),
        ({"client": {"lr": -1}}, "client.lr"),
        ({"federation": {"fraction": 0.1, "clients_per_round": 3}}, "federation.clients_per_round"),
        ({"client": {"local_steps": 2, "local_epochs": 1}}, "client.local_steps"),
        ({"model": {"kind": "module"}}, "model.factory"),
        ({"model": {"kind": "classification"}, "data": {"source": "shakespeare"}}, "labelled"),
        ({"data": {"source": "text"}}, "data.path"),
        ({"model": {"lora": {"r": 0}}}, "model.lora.r"),
        ({"data": {"partition": {"kind": "iid"}}}, "num_clients"),
        ("just a string", "mapping"),
    ],
)
def test_config_errors_name_the_key(data: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert needle in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [rounds: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_parse_yaml_values_and_validate(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("federation:\n  rounds: 2\n")
    cfg = load_config(p, ["federation.rounds=9", "client.lr=0.5", "model.lora.target_modules=[q_proj]"])
    assert cfg.federation.rounds == 9 and cfg.client.lr == 0.5 and cfg.model.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match=r"federation\.bogus: unknown key"):
        load_config(p, ["federation.bogus=1"])
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides({}, ["noequals"])


def test_config_is_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_validate(path: Path) -> None:
    load_config(path)
