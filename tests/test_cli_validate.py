"""The CLI that helps before a run: did-you-mean, --version, init, validate / --dry-run, model.factory imports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedtune import __version__
from fedtune.cli import app
from fedtune.config import parse_config
from fedtune.errors import ConfigError, DataError, ModelError
from fedtune.models.hub import builtin_hint
from fedtune.run.scaffold import guess_data, starting_config
from fedtune.tasks.build import build_module

runner = CliRunner()


def test_unknown_keys_suggest_the_closest_valid_key() -> None:
    cases = {
        "federation": ({"roundz": 3}, "federation.roundz: unknown key; did you mean 'rounds'?"),
        "model": ({"lora": {"alhpa": 8}}, "model.lora.alhpa: unknown key; did you mean 'alpha'?"),
        "client": ({"rounds": 3}, "client.rounds: unknown key; did you mean 'federation.rounds'?"),
    }
    for section, (value, expected) in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config({section: value})
        assert expected in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config({"zzzz": 1})
    assert "zzzz: unknown key" in str(err.value) and "did you mean" not in str(err.value)


def test_a_mistyped_builtin_model_name_gets_a_suggestion() -> None:
    assert builtin_hint("tiny-lama") == "; did you mean 'tiny-llama'?"
    assert builtin_hint("all-minilm-l6") == "; did you mean 'all-minilm-l6-v2'?"
    assert builtin_hint("someone/gpt-neo") == ""


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fedtune {__version__}"


def _corpus(root: Path, clients: int = 3) -> Path:
    root.mkdir(parents=True)
    for c in range(clients):
        paras = [f"Speaker {c} says line {i}: the quality of mercy is not strained at all." for i in range(12)]
        (root / f"speaker_{c}.txt").write_text("\n\n".join(paras))
    return root


def test_init_writes_a_config_that_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = _corpus(tmp_path / "corpus")
    out = tmp_path / "fedtune.yaml"
    result = runner.invoke(app, ["init", str(data), "--out", str(out), "--model", "tiny-llama"])
    assert result.exit_code == 0, result.output
    assert "text data" in result.output
    cfg = yaml.safe_load(out.read_text())
    assert cfg["data"] == {"source": "text", "path": str(data), "partition": {"kind": "natural"}}
    assert cfg["federation"]["clients_per_round"] == 3  # no more than there are clients

    again = runner.invoke(app, ["init", str(data), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output  # an existing config is never overwritten silently

    checked = runner.invoke(app, ["validate", str(out), "--set", "model.max_length=16"])
    assert checked.exit_code == 0, checked.output
    for cid in ("speaker_0", "speaker_1", "speaker_2"):
        assert cid in checked.output
    assert "trainable parameters" in checked.output and "nothing was trained" in checked.output
    assert not (tmp_path / "runs").exists()  # validate makes no run directory

    dry = runner.invoke(app, ["run", str(out), "--dry-run", "--set", "model.max_length=16"])
    assert dry.exit_code == 0, dry.output
    assert "nothing was trained" in dry.output and not (tmp_path / "runs").exists()

    typo = runner.invoke(app, ["validate", str(out), "--set", "federation.roundz=3"])
    assert typo.exit_code == 2
    assert "federation.roundz: unknown key; did you mean 'rounds'?" in typo.output


def test_validate_counts_match_what_a_run_builds(tmp_path: Path) -> None:
    """The sizes validate prints are the ones the simulation trains on (session.prepare), checked by hand."""
    from fedtune.run.validate import validate

    data = _corpus(tmp_path / "corpus", clients=2)
    cfg = parse_config(
        {
            "model": {"name": "tiny-llama", "max_length": 16, "lora": {"r": 2, "target_modules": ["q_proj"]}},
            "data": {"source": "text", "path": str(data)},
            "client": {"local_epochs": 2, "batch_size": 4},
        }
    )
    report = validate(cfg)
    assert [c.client_id for c in report.clients] == ["speaker_0", "speaker_1"]
    for c in report.clients:
        assert c.local_steps == 2 * -(-c.train_examples // 4)
        assert c.train_records + c.test_records == 12
    # LoRA r=2 on q_proj of every layer: A (2 x hidden) + B (hidden x 2)
    from fedtune.data.cache import default_cache_dir
    from fedtune.models.hub import resolve_model

    hf = json.loads((Path(resolve_model("tiny-llama", default_cache_dir(None))) / "config.json").read_text())
    assert report.trainable_params == hf["num_hidden_layers"] * (2 * hf["hidden_size"] + hf["hidden_size"] * 2)


def test_validate_names_a_mistyped_model(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"model": {"name": "tiny-lama"}, "data": {"source": "text", "path": str(_corpus(tmp_path / "corpus"))}}
        )
    )
    result = runner.invoke(app, ["validate", str(cfg)])
    assert result.exit_code == 2
    assert "did you mean 'tiny-llama'?" in result.output


def test_init_guesses_instruct_and_classification(tmp_path: Path) -> None:
    one = tmp_path / "book.txt"
    one.write_text("A paragraph.\n\nAnother one.")
    guess = guess_data(one)
    assert guess.source == "text" and guess.data["partition"] == {"kind": "iid", "num_clients": 4}
    parse_config(starting_config(guess))

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "output": str(i)}) for i in range(8)))
    guess = guess_data(alpaca)
    assert guess.source == "instruct"
    parse_config(starting_config(guess))  # a valid config

    reviews = tmp_path / "reviews.csv"
    reviews.write_text("review,sentiment\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(10)))
    guess = guess_data(reviews)
    assert guess.source == "classification"
    cfg = starting_config(guess)
    assert cfg["data"]["text_field"] == "review" and cfg["data"]["label_field"] == "sentiment"
    assert cfg["model"]["kind"] == "classification"
    parse_config(cfg)

    two = tmp_path / "two.tsv"  # unknown column names: the longer one is the text
    two.write_text("a\tb\nx\ta much longer piece of text\ny\tanother long piece of text\n")
    guess = guess_data(two)
    assert (guess.data["text_field"], guess.data["label_field"]) == ("b", "a")

    odd = tmp_path / "odd.csv"
    odd.write_text("p,q,r\n1,2,3\n")
    with pytest.raises(DataError, match="cannot tell the kind of data"):
        guess_data(odd)


# ----------------------------------------------------------------------------------------- model.factory


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory with the user's model files, as the current directory (and not on sys.path)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    return tmp_path


def test_factory_imports_from_the_current_directory(user_dir: Path) -> None:
    (user_dir / "h12_mymodel.py").write_text(
        "import torch\ndef build(width=3):\n    return torch.nn.Linear(width, 2)\n"
    )
    module = build_module("h12_mymodel:build", {"width": 5})
    assert module.in_features == 5
    assert str(user_dir) not in sys.path  # the current directory was on the path only for the import


def test_errors_inside_the_users_factory_name_the_config_key(user_dir: Path) -> None:
    (user_dir / "h12_raising.py").write_text("def build():\n    raise ValueError('bad width')\n")
    with pytest.raises(ModelError, match=r"model.factory 'h12_raising:build' raised ValueError: bad width"):
        build_module("h12_raising:build", {})
    (user_dir / "h12_typeerr.py").write_text("def build(width=1):\n    return None + width\n")
    with pytest.raises(ModelError, match=r"raised TypeError"):  # a TypeError inside is not "rejected kwargs"
        build_module("h12_typeerr:build", {"width": 2})
    with pytest.raises(ModelError, match=r"rejected model.factory_kwargs"):
        build_module("h12_typeerr:build", {"depth": 2})
    (user_dir / "h12_broken.py").write_text("raise RuntimeError('module-level failure')\n")
    with pytest.raises(ModelError, match=r"importing module 'h12_broken' raised RuntimeError: module-level failure"):
        build_module("h12_broken:build", {})
    (user_dir / "h12_needs.py").write_text("import h12_not_installed_anywhere\n")
    with pytest.raises(ModelError, match=r"importing 'h12_needs' failed: No module named 'h12_not_installed"):
        build_module("h12_needs:build", {})


def test_a_missing_factory_module_says_how_to_make_it_importable(user_dir: Path) -> None:
    with pytest.raises(ModelError) as err:
        build_module("h12_nowhere:build", {})
    message = str(err.value)
    assert "cannot import module 'h12_nowhere'" in message
    assert str(user_dir) in message and "PYTHONPATH" in message
