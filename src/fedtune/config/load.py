"""Load a YAML config, apply ``--set key=value`` overrides, validate, and explain errors by key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedtune.config.schema import Config
from fedtune.config.suggest import unknown_key_message
from fedtune.errors import ConfigError


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = unknown_key_message(Config, item["loc"])
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "<dict>") -> Config:
    """Validate a nested mapping into a Config, raising ConfigError that names each bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    return data if data is not None else {}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``a.b.c=value`` applied; the value is parsed as YAML.

    >>> apply_overrides({"federation": {"rounds": 3}}, ["federation.rounds=5", "seed=7"])
    {'federation': {'rounds': 5}, 'seed': 7}
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config file."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return parse_config(data, source=str(path))


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML (every default spelled out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
