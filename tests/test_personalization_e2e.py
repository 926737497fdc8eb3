"""Personalisation through ``simulate`` and the CLI: the clients' own state (in the run directory's client
state store) survives an interruption bit for bit, the round records carry each client's personalised
metric beside the global one, and ``fedtune export/generate --client`` use a client's personalised model."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from _models import DIGITS_CNN
from fedtune.cli import app
from fedtune.client.personal import NS_DITTO, NS_FINETUNED, NS_LOCAL
from fedtune.config import parse_config
from fedtune.core.state import load_state
from fedtune.core.state_store import open_state_store
from fedtune.run.session import simulate

pytestmark = pytest.mark.timeout(600)
LATEST = 1 << 40
PERSONALIZATION = {
    "fedper": {"method": "fedper", "local_params": ["head.4.*"], "finetune_steps": 2},
    "ditto": {"method": "ditto", "ditto_lambda": 0.5, "ditto_steps": 3},
}


def digits_config(out: Path, *, rounds: int, personalization: dict):
    return parse_config(
        {
            "seed": 1,  # client_003 is sampled in rounds 1 and 3, not 2
            "model": DIGITS_CNN,
            "data": {"source": "digits", "partition": {"kind": "dirichlet_labels", "alpha": 0.3, "num_clients": 6}},
            "federation": {"rounds": rounds, "clients_per_round": 3},
            "client": {"local_steps": 4, "batch_size": 16, "optimizer": "sgd", "lr": 0.05},
            "eval": {"baseline": False, "max_examples_per_client": 16},
            "personalization": personalization,
            "run": {"out_dir": str(out), "plot": False, "threads": 1},
        }
    )


def run(cfg, resume_dir: Path | None = None):
    return simulate(cfg, resume_dir=resume_dir, show_progress=False, console=Console(file=io.StringIO()))


def records(run_dir: Path, kind: str, *, last: int = 4) -> list[dict]:
    """The run's lines of ``kind`` without timings, and without the fine-tuned figures of rounds before
    ``last`` (the shorter runs of an interrupted federation fine-tune after their own last round)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            k: v
            for k, v in r.items()
            if k not in ("seconds", "fit_seconds") and (r["round"] == last or "finetuned" not in k)
        }
        for r in lines
        if r["kind"] == kind
    ]


def saved(run_dir: Path, namespace: str) -> dict[str, dict[str, np.ndarray]]:
    store = open_state_store(f"disk:{run_dir / 'client_state'}")
    out = {}
    for cid in [f"client_{i:03d}" for i in range(6)]:
        state = store.load(cid, namespace, round=LATEST)
        if state is not None:
            out[cid] = state.arrays
    return out


@pytest.mark.parametrize("method", ["fedper", pytest.param("ditto", marks=pytest.mark.slow)])
def test_interrupted_and_replayed_run_equals_an_uninterrupted_one(method: str, tmp_path: Path) -> None:
    spec = PERSONALIZATION[method]
    whole = run(digits_config(tmp_path / "whole", rounds=4, personalization=spec)).run_dir

    first = run(digits_config(tmp_path / "parts", rounds=2, personalization=spec)).run_dir
    checkpoint = tmp_path / "checkpoint-round-2.safetensors"
    shutil.copy(first / "checkpoint.safetensors", checkpoint)
    run(digits_config(tmp_path / "parts", rounds=3, personalization=spec), resume_dir=first)  # clients save round 3
    shutil.copy(checkpoint, first / "checkpoint.safetensors")  # ... the server "crashes" before its checkpoint
    resumed = run(digits_config(tmp_path / "parts", rounds=4, personalization=spec), resume_dir=first).run_dir

    np.testing.assert_array_equal(
        load_state(resumed / "checkpoint.safetensors").params, load_state(whole / "checkpoint.safetensors").params
    )
    assert records(resumed, "eval_client") == records(whole, "eval_client")
    assert records(resumed, "round") == records(whole, "round")
    namespace = NS_DITTO if method == "ditto" else NS_LOCAL
    got, expected = saved(resumed, namespace), saved(whole, namespace)
    assert set(got) == set(expected) and len(got) >= 4
    for cid in expected:
        for key in expected[cid]:
            np.testing.assert_array_equal(got[cid][key], expected[cid][key])
    last = records(whole, "round")[-1]
    assert "eval_personal_client_mean_accuracy" in last and "eval_client_mean_accuracy" in last
    lines = [r for r in records(whole, "eval_client") if r["round"] == 4]
    assert lines and all("personal_accuracy" in r for r in lines)
    if spec.get("finetune_steps"):
        assert "eval_finetuned_client_mean_accuracy" in last and all("finetuned_loss" in r for r in lines)
        assert saved(whole, NS_FINETUNED)


@pytest.fixture(scope="module")
def fedsa_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fedsa")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for c, words in enumerate(["now is the winter of our discontent", "to be or not to be that is the question"]):
        (corpus / f"c{c}.txt").write_text("\n\n".join(f"{words} {i}." for i in range(10)))
    cfg = parse_config(
        {
            "model": {"name": "tiny-llama", "max_length": 16, "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
            "data": {"source": "text", "path": str(corpus)},
            "federation": {"rounds": 1, "clients_per_round": 2},
            "client": {"local_steps": 2, "batch_size": 4, "lr": 0.05},
            "personalization": {"method": "fedsa", "finetune_steps": 1},
            "run": {"out_dir": str(tmp / "runs"), "plot": False},
        }
    )
    return run(cfg).run_dir


def test_export_and_generate_use_a_clients_personalised_adapter(fedsa_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from fedtune.data.cache import default_cache_dir
    from fedtune.models.hub import load_causal_lm
    from fedtune.models.personal import local_parameters
    from fedtune.run.personal_export import personal_task

    client = "c1"
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(fedsa_run), str(tmp_path / "out"), "--client", client])
    assert result.exit_code == 0, result.output
    # oracle: the client's own B, as its state store holds it, on the global A of the checkpoint
    task = personal_task(fedsa_run, client)
    stored = saved_b(fedsa_run, client)
    for name, param in local_parameters(task.module).items():
        np.testing.assert_array_equal(param.detach().numpy(), stored[name])
    assert any(np.abs(v).sum() > 0 for v in stored.values())  # B trained away from zero
    ids = torch.tensor([[1, 400, 2000, 35, 9, 77]])
    task.module.eval()
    with torch.no_grad():
        expected = task.module(input_ids=ids).logits
    base, _ = load_causal_lm("tiny-llama", default_cache_dir(None))
    loaded = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    # the client's model differs from the global one (whose B is zero under FedSA)
    glob = runner.invoke(app, ["export", str(fedsa_run), str(tmp_path / "global")])
    assert glob.exit_code == 0, glob.output
    base, _ = load_causal_lm("tiny-llama", default_cache_dir(None))
    global_model = PeftModel.from_pretrained(base, tmp_path / "global" / "adapter").eval()
    with torch.no_grad():
        assert not torch.allclose(global_model(input_ids=ids).logits, expected, atol=1e-4)

    args = ["generate", str(fedsa_run), "--prompt", "now is", "--greedy", "--max-new-tokens", "4"]
    personal_text = runner.invoke(app, [*args, "--client", client])
    assert personal_text.exit_code == 0, personal_text.output
    tuned = runner.invoke(app, [*args, "--client", client, "--finetuned"])
    assert tuned.exit_code == 0, tuned.output
    unknown = runner.invoke(app, [*args, "--client", "nobody"])
    assert unknown.exit_code != 0 and "nobody" in unknown.output


def saved_b(run_dir: Path, client: str) -> dict[str, np.ndarray]:
    return open_state_store(f"disk:{run_dir / 'client_state'}").load(client, NS_LOCAL, round=LATEST).arrays


def test_fedper_under_dp_fedavg_and_secure_aggregation(tmp_path: Path) -> None:
    """The shared part is clipped, masked and noised as usual; the local head never leaves and still trains."""
    cfg = digits_config(tmp_path, rounds=2, personalization={"method": "fedper", "local_params": ["head.4.*"]})
    data = cfg.model_dump(mode="json")
    data["server"]["weighting"] = "uniform"
    data["privacy"] = {"dp": {"noise_multiplier": 0.5, "clip": 1.0}, "secure_aggregation": {}}
    result = run(parse_config(data))
    last = records(result.run_dir, "round", last=2)[-1]
    assert last["clients_ok"] >= 1 and last["clients_failed"] == 0 and "eval_personal_accuracy" in last
    heads = saved(result.run_dir, NS_LOCAL)
    assert heads and all(set(h) == {"head.4.weight", "head.4.bias"} for h in heads.values())


@pytest.mark.slow  # starts a private Ray
def test_ray_backend_equals_inprocess_with_state_in_ray(tmp_path: Path) -> None:
    """Clients served by any of two Ray actors: their heads live in Ray's object store (client_state 'ray')."""
    spec = PERSONALIZATION["fedper"]
    inprocess = run(digits_config(tmp_path / "inproc", rounds=3, personalization=spec)).run_dir
    cfg = digits_config(tmp_path / "ray", rounds=3, personalization=spec)
    data = cfg.model_dump(mode="json")
    data["simulation"] = {"backend": "ray", "num_workers": 2, "num_cpus": 2, "client_state": "ray"}
    on_ray = run(parse_config(data)).run_dir
    np.testing.assert_array_equal(
        load_state(on_ray / "checkpoint.safetensors").params, load_state(inprocess / "checkpoint.safetensors").params
    )
    assert records(on_ray, "eval_client", last=3) == records(inprocess, "eval_client", last=3)
