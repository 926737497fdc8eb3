"""`fedtune client --nproc 2`: the participant's worker trains data-parallel and matches one process; DP-SGD is
refused there; a participant's DP-SGD ledger stays in its own cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml
from rich.console import Console

from fedtune.client.distributed import DistributedClientWorker
from fedtune.config import dump_config, parse_config
from fedtune.config.schema import ClientConfig
from fedtune.core.messages import FitInstruction
from fedtune.deploy.participant import worker_factory
from fedtune.errors import ConfigError
from fedtune.run.rundir import config_digest
from fedtune.transport.grpc.client import Joined


def test_nproc_two_matches_one_process() -> None:
    config = parse_config(
        {
            "model": {"kind": "module", "factory": "fedtune.models.cnn:digits_cnn", "lora": None},
            "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 4}},
            # full batch + plain SGD: two ranks each averaging half the batch give the same step
            "client": {"local_steps": 3, "full_batch": True, "optimizer": "sgd", "lr": 0.1},
            "run": {"threads": 1},
        }
    )
    joined = Joined("s", "alice", dump_config(config), 5.0, 0.5, None, None, {})  # type: ignore[arg-type]
    quiet = Console(quiet=True)
    single = worker_factory("partition:client_001", console=quiet)(joined)
    multi = worker_factory("partition:client_001", console=quiet, nproc=2)(joined)
    try:
        assert isinstance(multi, DistributedClientWorker)
        instr = FitInstruction(
            client_id="alice",
            round=1,
            params=single.current_params(),
            spec_digest=single.view.spec.digest,
            seed=config.seed,
            train=ClientConfig.model_validate(yaml.safe_load(dump_config(config))["client"]),
        )
        a, b = single.fit(instr), multi.fit(instr)
        assert a.num_examples == b.num_examples
        np.testing.assert_allclose(b.delta, a.delta, rtol=1e-4, atol=1e-6)
        assert np.abs(a.delta).max() > 1e-4  # it trained
    finally:
        multi.close()


DPSGD = {
    "model": {"kind": "module", "factory": "fedtune.models.cnn:digits_cnn", "lora": None},
    "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 4}},
    "client": {"local_steps": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.1},
    "privacy": {"dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}},
    "run": {"threads": 1},
}


def test_nproc_two_with_dpsgd_is_refused_naming_both_keys() -> None:
    joined = Joined("s", "alice", dump_config(parse_config(DPSGD)), 5.0, 0.5, None, None, {})  # type: ignore[arg-type]
    make = worker_factory("partition:client_001", console=Console(quiet=True), nproc=2)
    with pytest.raises(ConfigError, match=r"privacy\.dpsgd cannot run with --nproc 2"):
        make(joined)


def test_the_participant_keeps_its_dpsgd_ledger_in_its_own_cache(tmp_path) -> None:
    """Whatever store the server's config names, a participant's ledger lands under its own cache dir."""
    server_cfg = parse_config({**DPSGD, "simulation": {"client_state": f"disk:{tmp_path / 'server'}"}})
    local = parse_config({**DPSGD, "data": {**DPSGD["data"], "cache_dir": str(tmp_path / "mine")}})
    joined = Joined("s", "alice", dump_config(server_cfg), 5.0, 0.5, None, None, {})  # type: ignore[arg-type]
    worker = worker_factory("partition:client_001", local_config=local, console=Console(quiet=True))(joined)
    train = server_cfg.client
    instr = FitInstruction("alice", 1, worker.current_params(), worker.view.spec.digest, 0, train)
    first = worker.fit(instr)
    again = worker.fit(dataclasses.replace(instr, round=2))
    assert again.metrics["dpsgd_epsilon"] > first.metrics["dpsgd_epsilon"] > 0
    ledgers = list((tmp_path / "mine" / "client_state" / config_digest(server_cfg) / "dpsgd").rglob("*.safetensors"))
    assert len(ledgers) == 2  # rounds 1 and 2 (the version round 2 read is kept for a replay)
    assert not (tmp_path / "server").exists()
