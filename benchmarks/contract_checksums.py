"""SHA-256 of the final server state (params and every state array) of small simulated runs, one per
strategy family and privacy mode: the check that a refactor of the round contract changes no result.

    PYTHONPATH=src HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/contract_checksums.py [CASE ...]

Run it before and after a change and compare the lines (docs/DESIGN.md, "Checking a refactor").
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rich.console import Console

from _models import DIGITS_CNN
from fedtune.config import parse_config
from fedtune.run.session import simulate

BASE: dict = {
    "seed": 2,
    "model": DIGITS_CNN,
    "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 8}},
    "federation": {"rounds": 2, "clients_per_round": 4},
    "client": {"local_steps": 2, "batch_size": 8, "lr": 0.3, "optimizer": "sgd", "max_grad_norm": None},
    "eval": {"baseline": False, "max_clients": 2, "max_examples_per_client": 8},
    "run": {"plot": False},
}
DP = {"clip": 0.5, "noise_multiplier": 1.0, "sampling": "fixed"}
CASES: dict[str, dict] = {
    "fedavg": {},
    "fedadam": {"server": {"optimizer": "adam", "lr": 0.03}},
    "fedprox+stragglers": {"server": {"proximal_mu": 0.01}, "client": {"straggler_fraction": 0.5}},
    "scaffold": {"server": {"scaffold": True}},
    "median": {"server": {"aggregator": "median"}},
    "uniform": {"server": {"weighting": "uniform"}},
    "dp": {"server": {"weighting": "uniform"}, "privacy": {"dp": DP}},
    "dp-adaptive": {"server": {"weighting": "uniform"}, "privacy": {"dp": {**DP, "adaptive": {"count_noise": 2.0}}}},
    "secagg": {"server": {"weighting": "uniform"}, "privacy": {"secure_aggregation": {}}},
    "secagg-examples": {"server": {"weighting": "examples"}, "privacy": {"secure_aggregation": {}}},
    "dp+secagg+dpsgd": {
        "server": {"weighting": "uniform"},
        "privacy": {
            "dp": DP,
            "secure_aggregation": {},
            "dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        }
    },
    "dp+fedadam": {"server": {"optimizer": "adam", "lr": 0.03, "weighting": "uniform"}, "privacy": {"dp": DP}},
}


def config(case: str, out: Path):
    cfg = {k: dict(v) for k, v in BASE.items() if isinstance(v, dict)} | {"seed": BASE["seed"]}
    for section, values in CASES[case].items():
        cfg[section] = {**cfg.get(section, {}), **values}
    cfg["run"]["out_dir"] = str(out)
    return parse_config(cfg)


def checksum(case: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        state = simulate(config(case, Path(tmp)), console=Console(quiet=True), show_progress=False).state
    h = hashlib.sha256(state.params.tobytes())
    for name in sorted(state.arrays):
        h.update(name.encode() + state.arrays[name].tobytes())
    return f"{state.round} {h.hexdigest()[:16]}"


if __name__ == "__main__":
    for case in sys.argv[1:] or CASES:
        print(f"{case:22s} {checksum(case)}", flush=True)
