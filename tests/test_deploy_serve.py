"""``fedtune server``'s own config decisions: a deployment bounds updates by default, and a run started on
``deployment.port: 0`` resumes on the port it bound (issue #13, items 2 and 8)."""

from __future__ import annotations

import json

import pytest

from fedtune.config import parse_config
from fedtune.deploy.serve import SERVER_RECORD, deployment_defaults, listen_port
from fedtune.errors import FedtuneError


def test_a_deployment_bounds_updates_unless_told_otherwise() -> None:
    assert parse_config({}).server.update_norm_bound == "auto"  # a simulation: off (bit-identical to before)
    deployed = deployment_defaults(parse_config({})).server
    assert deployed.update_norm_bound == deployed.max_examples_per_client == "adaptive"
    assert parse_config({}).server.max_examples_per_client == "auto"
    for explicit in ("off", 2.5, "adaptive"):
        cfg = parse_config({"server": {"update_norm_bound": explicit}})
        assert deployment_defaults(cfg).server.update_norm_bound == explicit


def test_port_zero_resumes_on_the_recorded_port(tmp_path) -> None:
    cfg = parse_config({"deployment": {"port": 0}})
    assert listen_port(cfg, None) == 0  # a fresh run: any free port
    assert listen_port(cfg, tmp_path) == 0  # no record (a run from before): as configured
    (tmp_path / SERVER_RECORD).write_text(json.dumps({"port": 43121, "address": "127.0.0.1"}))
    assert listen_port(cfg, tmp_path) == 43121
    fixed = parse_config({"deployment": {"port": 50999}})
    assert listen_port(fixed, tmp_path) == 50999  # an explicit port wins
    (tmp_path / SERVER_RECORD).write_text("{not json")
    with pytest.raises(FedtuneError, match=r"deployment\.port"):
        listen_port(cfg, tmp_path)
