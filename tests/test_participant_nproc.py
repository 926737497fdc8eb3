"""`fedtune client --nproc 2`: the participant's worker trains data-parallel and matches one process."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from rich.console import Console

from fedtune.client.distributed import DistributedClientWorker
from fedtune.config import dump_config, parse_config
from fedtune.core.messages import FitInstruction
from fedtune.deploy.participant import worker_factory
from fedtune.transport.grpc.client import Joined


@pytest.mark.timeout(300)
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
            train=yaml.safe_load(dump_config(config))["client"],
        )
        a, b = single.fit(instr), multi.fit(instr)
        assert a.num_examples == b.num_examples
        np.testing.assert_allclose(b.delta, a.delta, rtol=1e-4, atol=1e-6)
        assert np.abs(a.delta).max() > 1e-4  # it trained
    finally:
        multi.close()
