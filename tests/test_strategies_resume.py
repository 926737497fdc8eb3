"""Resume: k rounds, a checkpoint through save_state/load_state, then the rest == an uninterrupted run.

Each case carries state beyond the parameters: server-optimiser moments, SCAFFOLD's server and client
controls, LoRA residuals; and client-side randomness (stragglers, FLoRA ranks and re-initialisation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.core.state import load_state, save_state
from fedtune.models.lora import freeze_lora_a
from test_strategies_support import (
    ArrayTask,
    TinyLoraNet,
    classification_records,
    make_config,
    regression_records,
    run_federation,
    seeded,
)

CASES = {
    "adam+scaffold+fedprox+stragglers": dict(
        server={"optimizer": "adam", "lr": 0.05, "scaffold": True, "proximal_mu": 0.1},
        client={"local_steps": 4, "straggler_fraction": 0.5, "lr": 0.05},
        model=None,
    ),
    "yogi+median": dict(server={"optimizer": "yogi", "lr": 0.05, "aggregator": "median"}, client={}, model=None),
    "momentum+ffa": dict(
        server={"optimizer": "momentum", "lr": 0.5, "lora_aggregation": "ffa"}, client={}, model="lora"
    ),
    "flora": dict(server={"lora_aggregation": "flora", "lora_client_ranks": [1, 2]}, client={}, model="lora"),
}


class Crash(Exception):
    pass


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_resume_equals_an_uninterrupted_run(case, tmp_path):
    spec = CASES[case]
    config = make_config(
        server=spec["server"],
        client=spec["client"],
        federation={"rounds": 4, "clients_per_round": 3},
        eval={"every": 100},
        model={"lora": {"r": 2}},
    )
    if spec["model"] == "lora":
        records = classification_records(5)

        def task():
            lora_task = ArrayTask(seeded(TinyLoraNet))
            if spec["server"].get("lora_aggregation") == "ffa":
                freeze_lora_a(lora_task.module)  # what build_run_task does for a peft model
            return lora_task
    else:
        records = regression_records(5)

        def task():
            return ArrayTask(seeded(lambda: torch.nn.Linear(4, 1)), loss_kind="mse")

    uninterrupted, _, _ = run_federation(config, task(), records)

    checkpoint = tmp_path / "state.safetensors"

    def crash_after_two(state, report):
        save_state(state, checkpoint, config_digest="test")
        if state.round == 2:
            raise Crash

    with pytest.raises(Crash):
        run_federation(config, task(), records, on_round=crash_after_two)
    restored = load_state(checkpoint, config_digest="test")
    assert restored.round == 2
    resumed, _, _ = run_federation(config, task(), records, state=restored)  # a fresh worker and strategy

    np.testing.assert_array_equal(resumed.params, uninterrupted.params)
    assert set(resumed.arrays) == set(uninterrupted.arrays) and resumed.arrays
    for key, value in uninterrupted.arrays.items():
        np.testing.assert_array_equal(resumed.arrays[key], value, err_msg=key)
