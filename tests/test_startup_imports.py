"""A run imports only what it uses: a plain-module run on in-memory data, from the CLI's set-up to its end,
never imports transformers, peft, datasets, scikit-learn, Opacus, cryptography, gRPC, Ray or (with
``run.plot: false``) matplotlib (seconds of start-up and hundreds of MB). Checked in a fresh interpreter, since
this test process imports them all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ["transformers", "peft", "datasets", "sklearn", "opacus", "cryptography", "grpc", "ray", "matplotlib"]

RUN = """
import json, sys, tempfile
import torch
from torch.utils.data import TensorDataset
import fedtune
import fedtune.cli
import fedtune.run.session

HEAVY = {heavy!r}
fedtune.cli._quiet_libraries()  # what every CLI command does first
at_start = [m for m in HEAVY if m in sys.modules]
g = torch.Generator().manual_seed(1)
x = torch.randn(40, 4, generator=g)
torch.manual_seed(0)
cfg = {{
    "seed": 5,
    "data": {{"partition": {{"kind": "iid", "num_clients": 2}}}},
    "federation": {{"rounds": 2, "clients_per_round": 2}},
    "client": {{"local_steps": 2, "batch_size": 8}},
    "run": {{"out_dir": {out!r}, "plot": False}},
}}
fedtune.simulate(cfg, model=torch.nn.Linear(4, 2), datasets=TensorDataset(x, (x[:, 0] > 0).long()), quiet=True)
print(json.dumps({{"at_start": at_start, "at_end": [m for m in HEAVY if m in sys.modules]}}))
"""


def test_a_plain_module_run_imports_no_heavy_library(tmp_path: Path) -> None:
    code = RUN.format(heavy=HEAVY, out=str(tmp_path / "runs"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["at_start"] == []
    # report.html's chart is drawn without matplotlib (fedtune.run.svgchart): only run.plot's metrics.png uses it
    assert seen["at_end"] == []
