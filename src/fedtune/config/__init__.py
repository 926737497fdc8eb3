"""One validated configuration tree, loaded from YAML."""

from fedtune.config.load import apply_overrides, dump_config, load_config, parse_config
from fedtune.config.schema import Config

__all__ = ["Config", "apply_overrides", "dump_config", "load_config", "parse_config"]
