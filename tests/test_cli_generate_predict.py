"""The CLI after a run: generate's sampling flags and model defaults, export --dtype, predict for classifiers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.config import parse_config
from fedtune.data.cache import default_cache_dir
from fedtune.errors import ConfigError
from fedtune.models.hub import resolve_model
from fedtune.run.generate import model_generation_defaults, sampling_settings
from fedtune.run.session import simulate

runner = CliRunner()
MAX_TOKENS_FROM_FILE = 9


def test_sampling_settings_precedence() -> None:
    assert sampling_settings({}) == ({"do_sample": True, "temperature": 0.8, "top_p": 0.95}, 60)
    model = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 20}
    assert sampling_settings(model) == ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, 20)
    assert sampling_settings(model, temperature=1.2, max_new_tokens=5) == (
        {"do_sample": True, "temperature": 1.2, "top_p": 0.9},
        5,
    )
    assert sampling_settings(model, greedy=True) == ({"do_sample": False}, 20)
    assert sampling_settings({"temperature": 0.7}) == ({"do_sample": False}, 60)  # transformers: no do_sample
    assert sampling_settings({"do_sample": False}, top_p=0.5) == ({"do_sample": True, "top_p": 0.5}, 60)
    for bad in ({"greedy": True, "temperature": 1.0}, {"temperature": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ConfigError):
            sampling_settings({}, **bad)


def test_model_generation_defaults_reads_only_what_the_file_sets(tmp_path: Path) -> None:
    assert model_generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "_from_model_config": True}))
    assert model_generation_defaults(tmp_path) == {}  # derived from config.json: no generation choices
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 20, "eos_token_id": 2}))
    assert model_generation_defaults(tmp_path) == {"do_sample": True, "top_k": 20}
    assert model_generation_defaults("someone/hub-id") == {}


def _write_corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    for c in range(2):
        paras = [f"Client {c} paragraph {i}: now is the winter of our discontent made summer." for i in range(10)]
        (root / f"c{c}.txt").write_text("\n\n".join(paras))
    return root


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-round run of tiny-llama loaded from a local folder whose generation_config.json says greedy."""
    tmp = tmp_path_factory.mktemp("lm")
    folder = tmp / "my-tiny"
    shutil.copytree(resolve_model("tiny-llama", default_cache_dir(None)), folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "max_new_tokens": MAX_TOKENS_FROM_FILE, "eos_token_id": 2})
    )
    cfg = parse_config(
        {
            "model": {"name": str(folder), "max_length": 16, "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
            "data": {"source": "text", "path": str(_write_corpus(tmp / "corpus"))},
            "federation": {"rounds": 1, "clients_per_round": 2},
            "client": {"local_steps": 2, "batch_size": 4, "lr": 0.05},
            "run": {"out_dir": str(tmp / "runs"), "plot": False},
        }
    )
    return simulate(cfg, console=Console(quiet=True), show_progress=False).run_dir


def _generate(run_dir: Path, *args: str) -> str:
    result = runner.invoke(app, ["generate", str(run_dir), "--prompt", "Now is the winter", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_generate_defaults_come_from_generation_config(lm_run: Path) -> None:
    from fedtune.run.artifacts import load_trained_task
    from fedtune.run.generate import generate_text

    task, _ = load_trained_task(lm_run)
    greedy = generate_text(task, "Now is the winter", max_new_tokens=MAX_TOKENS_FROM_FILE, seed=None, chat=False)
    # the file says greedy, MAX_TOKENS_FROM_FILE tokens: the seed changes nothing, and the text is printed as is
    # (one print, no wrapping at 80 columns, no markup), so stdout is exactly the text plus a newline
    assert _generate(lm_run, "--seed", "1") == greedy + "\n"
    assert _generate(lm_run, "--seed", "2") == greedy + "\n"
    assert _generate(lm_run, "--greedy") == greedy + "\n"
    longer = _generate(lm_run, "--greedy", "--max-new-tokens", str(MAX_TOKENS_FROM_FILE + 6))
    assert longer.startswith(greedy) and len(longer) > len(greedy) + 1


def test_generate_sampling_flags(lm_run: Path) -> None:
    from fedtune.run.artifacts import load_trained_task
    from fedtune.run.generate import generate_text

    task, _ = load_trained_task(lm_run)
    hot = {"do_sample": True, "temperature": 5.0}
    expected = generate_text(task, "Now is the winter", max_new_tokens=12, seed=4, chat=False, sampling=hot)
    sampled = _generate(lm_run, "--temperature", "5", "--seed", "4", "--max-new-tokens", "12")
    assert sampled == expected + "\n"
    assert sampled != _generate(lm_run, "--greedy", "--max-new-tokens", "12")  # sampling a random model differs
    clash = runner.invoke(app, ["generate", str(lm_run), "--prompt", "x", "--greedy", "--top-p", "0.5"])
    assert clash.exit_code == 2 and "--greedy" in clash.output


def test_export_dtype(lm_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert runner.invoke(app, ["export", str(lm_run), str(tmp_path / "f32")]).exit_code == 0
    result = runner.invoke(app, ["export", str(lm_run), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    full = load_file(str(tmp_path / "f32" / "model" / "model.safetensors"))
    half = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    assert full.keys() == half.keys()
    for name, tensor in full.items():
        assert half[name].dtype == torch.bfloat16
        assert torch.equal(half[name], tensor.to(torch.bfloat16)), name  # merged in float32, cast once
    adapter = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.bfloat16 for t in adapter.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "model")
    assert next(model.parameters()).dtype == torch.bfloat16

    f16 = runner.invoke(app, ["export", str(lm_run), str(tmp_path / "f16"), "--dtype", "float16"])
    assert f16.exit_code == 0
    assert load_file(str(tmp_path / "f16" / "model" / "model.safetensors"))[name].dtype == torch.float16
    bad = runner.invoke(app, ["export", str(lm_run), str(tmp_path / "x"), "--dtype", "int8"])
    assert bad.exit_code == 2 and "float32, bfloat16, float16" in bad.output


def test_predict_needs_a_classifier(lm_run: Path) -> None:
    result = runner.invoke(app, ["predict", str(lm_run), "--text", "hello"])
    assert result.exit_code == 2 and "classifier" in result.output


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("clf")
    rows = [(f"a good happy great film number {i}", "positive") for i in range(12)]
    rows += [(f"a bad awful boring film number {i}", "negative") for i in range(12)]
    (tmp / "reviews.csv").write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    cfg = parse_config(
        {
            "model": {
                "kind": "classification",
                "name": "all-minilm-l6-v2",
                "max_length": 16,
                "lora": {"r": 2, "target_modules": ["query", "value"]},
            },
            "data": {
                "source": "classification",
                "path": str(tmp / "reviews.csv"),
                "partition": {"kind": "iid", "num_clients": 2},
            },
            "federation": {"rounds": 1, "clients_per_round": 2},
            "client": {"local_steps": 2, "batch_size": 8, "lr": 0.01},
            "run": {"out_dir": str(tmp / "runs"), "plot": False},
        }
    )
    return simulate(cfg, console=Console(quiet=True), show_progress=False).run_dir


def test_predict_prints_label_names_and_probabilities(classifier_run: Path) -> None:
    from fedtune.run.artifacts import load_trained_task

    texts = ["a great happy film", "an awful boring film"]
    result = runner.invoke(app, ["predict", str(classifier_run), "--json", "--text", texts[0], "--text", texts[1]])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    # the oracle: softmax of the federated model's logits, computed here without the predict code path
    task, _ = load_trained_task(classifier_run)
    enc = task.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        task.module.eval()
        probs = torch.softmax(task.module(**enc).logits.float(), dim=-1)
    names = ["negative", "positive"]  # string labels are numbered in sorted order
    for line, text, row in zip(lines, texts, probs.tolist(), strict=True):
        assert line["text"] == text
        assert list(line["probabilities"]) == names
        assert line["probabilities"] == pytest.approx(dict(zip(names, row, strict=True)), abs=1e-5)
        assert line["label"] == names[max(range(2), key=row.__getitem__)]

    plain = runner.invoke(app, ["predict", str(classifier_run)], input="a great film\n\nanother line\n")
    assert plain.exit_code == 0
    assert len(plain.stdout.splitlines()) == 2 and "positive=" in plain.stdout

    (classifier_run / "labels.json").unlink()  # without names: class ids
    ids = runner.invoke(app, ["predict", str(classifier_run), "--json", "--text", texts[0]])
    assert list(json.loads(ids.stdout)["probabilities"]) == ["0", "1"]


def test_dry_run_of_a_resume_checks_the_run_config(lm_run: Path) -> None:
    metrics = (lm_run / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["run", "--resume", str(lm_run), "--dry-run", "--set", "federation.rounds=2"])
    assert result.exit_code == 0, result.output
    assert "2 rounds" in result.output and "nothing was trained" in result.output
    assert (lm_run / "metrics.jsonl").read_text() == metrics  # the run is untouched
