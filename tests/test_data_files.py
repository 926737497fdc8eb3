"""Your files through Hugging Face datasets: every file format and layout, column mapping, instruction
formats, held-out files, label names, and the errors and warnings for bad or thin data."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from fedtune.config.schema import DataConfig
from fedtune.data.sources import load_federated
from fedtune.data.types import Completion, Conversation, Instruction, LabelledText
from fedtune.errors import DataError, DataWarning

ROWS = [{"text": f"doc {i}", "label": ["sport", "tech", "arts"][i % 3]} for i in range(12)]
ALPACA = [{"instruction": f"q{i}", "input": "" if i % 2 else f"x{i}", "output": f"a{i}"} for i in range(10)]


def load(tmp_path: Path, **cfg: object):
    return load_federated(DataConfig(**cfg), seed=0, cache_dir=tmp_path / "cache")


def records(data) -> list:
    return [r for s in data.clients.values() for r in (*s.train, *s.test)]


def write_arrow_stream(rows: list[dict], path: Path) -> Path:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_rows(rows: list[dict], path: Path) -> Path:
    """``rows`` in the format ``path``'s suffix names (a suffix-less path: a save_to_disk folder)."""
    ds = datasets.Dataset.from_list(rows)
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        ds.to_csv(str(path), index=False)
    elif suffix == ".tsv":
        ds.to_csv(str(path), index=False, sep="\t")
    elif suffix == ".parquet":
        ds.to_parquet(str(path))
    elif suffix == ".arrow":
        write_arrow_stream(rows, path)
    else:
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.csv", "d.tsv", "d.parquet", "d.arrow", "saved"])
def test_every_format_gives_the_same_records(tmp_path: Path, name: str) -> None:
    path = write_rows(ROWS, tmp_path / name)
    data = load(tmp_path, source="classification", path=str(path), partition={"kind": "iid", "num_clients": 2})
    assert data.label_names == ["arts", "sport", "tech"]
    index = {"arts": 0, "sport": 1, "tech": 2}
    expected = sorted((r["text"], index[r["label"]]) for r in ROWS)
    assert sorted((r.text, r.label) for r in records(data)) == expected


def test_headerless_csv_with_column_indices_and_label_skew(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("".join(f"{i % 2},text number {i}\n" for i in range(40)))
    data = load(
        tmp_path,
        source="classification",
        path=str(path),
        columns={"label": 0, "text": 1},
        partition={"kind": "dirichlet_labels", "num_clients": 2, "alpha": 0.5},
    )
    assert data.label_names == ["0", "1"]
    assert sorted(r.text for r in records(data)) == sorted(f"text number {i}" for i in range(40))
    assert all(r.label == int(r.text.split()[-1]) % 2 for r in records(data))  # the first row is data too


def test_saved_dataset_dict_and_class_label_names(tmp_path: Path) -> None:
    features = datasets.Features({"text": datasets.Value("string"), "y": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": ["bad", "good", "meh", "fine"], "y": [0, 1, 0, 1]}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    data = load(
        tmp_path,
        source="classification",
        path=str(tmp_path / "saved"),
        columns={"label": "y"},
        partition={"kind": "iid", "num_clients": 1},
    )
    assert data.label_names == ["neg", "pos"]
    assert sorted((r.text, r.label) for r in records(data)) == [("bad", 0), ("fine", 1), ("good", 1), ("meh", 0)]


def test_label_names_list_and_file(tmp_path: Path) -> None:
    path = write_rows(ROWS, tmp_path / "d.jsonl")
    names = ["tech", "sport", "arts", "unused"]
    kw = {"source": "classification", "path": str(path), "partition": {"kind": "iid", "num_clients": 1}}
    data = load(tmp_path, label_names=names, **kw)
    assert data.label_names == names
    assert {(r.text, r.label) for r in records(data)} == {(r["text"], names.index(r["label"])) for r in ROWS}
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    assert load(tmp_path, label_names=str(tmp_path / "labels.txt"), **kw) == data
    with pytest.raises(DataError, match=r"label 'arts' is neither one of data.label_names"):
        load(tmp_path, label_names=["tech", "sport"], **kw)


def test_folder_is_one_client_per_file_with_labels_numbered_together(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    sites.mkdir()
    write_rows(ROWS[:6], sites / "north.csv")
    write_rows([{"text": f"s{i}", "label": "zoo"} for i in range(5)], sites / "south.csv")
    data = load(tmp_path, source="classification", path=str(sites))
    assert list(data.clients) == ["north", "south"]
    assert data.label_names == ["arts", "sport", "tech", "zoo"]
    assert all(r.label == 3 for r in (*data.clients["south"].train, *data.clients["south"].test))
    assert [len(data.clients[c].test) for c in data.clients] == [1, 1]


def test_instruct_folder_with_per_client_test_files(tmp_path: Path) -> None:
    sites, held = tmp_path / "sites", tmp_path / "held"
    sites.mkdir()
    held.mkdir()
    write_rows(ALPACA[:6], sites / "a.json")
    write_rows(ALPACA[6:], sites / "b.json")
    write_rows([{"instruction": "ta", "output": "oa"}], held / "a.json")
    write_rows([{"instruction": "tb", "output": "ob"}], held / "b.json")
    data = load(tmp_path, source="instruct", path=str(sites), test_path=str(held))
    assert list(data.clients) == ["a", "b"]
    assert data.clients["a"].train == [Instruction(f"q{i}", "" if i % 2 else f"x{i}", f"a{i}") for i in range(6)]
    assert data.clients["a"].test == [Instruction("ta", "", "oa")]
    assert data.clients["b"].test == [Instruction("tb", "", "ob")]
    (held / "b.json").unlink()
    with pytest.raises(DataError, match=r"missing \['b'\]"):
        load(tmp_path, source="instruct", path=str(sites), test_path=str(held))


def test_single_test_file_is_spread_over_partitioned_clients(tmp_path: Path) -> None:
    train = write_rows(ALPACA, tmp_path / "train.jsonl")
    test = write_rows([{"instruction": f"t{i}", "output": f"o{i}"} for i in range(7)], tmp_path / "test.jsonl")
    cfg = {"source": "instruct", "path": str(train), "test_path": str(test)}
    data = load(tmp_path, partition={"kind": "iid", "num_clients": 3}, **cfg)
    assert sum(len(s.train) for s in data.clients.values()) == 10  # nothing of the training file held out
    assert sorted(r.instruction for s in data.clients.values() for r in s.test) == [f"t{i}" for i in range(7)]
    assert sorted(len(s.test) for s in data.clients.values()) == [2, 2, 3]
    with pytest.raises(DataError, match="layout"):
        load(
            tmp_path,
            source="instruct",
            path=str(train),
            test_path=str(tmp_path),
            partition={"kind": "iid", "num_clients": 1},
        )


def test_text_from_a_table_folder(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    sites.mkdir()
    for name in ("x", "y"):
        write_rows([{"body": f"{name} para {i}"} for i in range(5)], sites / f"{name}.parquet")
    data = load(tmp_path, source="text", path=str(sites), columns={"text": "body"})
    assert data.clients["x"].train == [f"x para {i}" for i in range(4)]
    assert data.clients["x"].test == ["x para 4"]  # temporal: the last record is held out


def test_instruction_formats_are_detected_or_named(tmp_path: Path) -> None:
    messages = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
        for i in range(4)
    ]
    path = write_rows(messages, tmp_path / "m.jsonl")
    kw = {"source": "instruct", "partition": {"kind": "iid", "num_clients": 1}}
    data = load(tmp_path, path=str(path), **kw)
    assert sorted(records(data), key=str)[0] == Conversation((("user", "hi 0"), ("assistant", "yo 0")))

    pc = write_rows([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)], tmp_path / "pc.json")
    assert sorted(records(load(tmp_path, path=str(pc), **kw)), key=str)[0] == Completion("p0", "c0")

    conv = [
        {
            "prompt": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "completion": [{"role": "assistant", "content": f"d{i}"}],
        }
        for i in range(3)
    ]
    data = load(tmp_path, path=str(write_rows(conv, tmp_path / "conv.parquet")), format="prompt_completion", **kw)
    first = sorted(records(data), key=str)[0]
    assert first == Conversation((("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d0")), train_from=3)


def test_column_mapping_for_alpaca_and_messages(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(4)]
    path = write_rows(rows, tmp_path / "qa.csv")
    kw = {"source": "instruct", "partition": {"kind": "iid", "num_clients": 1}}
    data = load(tmp_path, path=str(path), columns={"instruction": "question", "output": "answer"}, **kw)
    assert sorted(records(data), key=str) == [Instruction(f"q{i}", "", f"a{i}") for i in range(4)]
    chats = [
        {"dialog": [{"role": "user", "content": "u"}, {"role": "assistant", "content": f"v{i}"}]} for i in range(3)
    ]
    data = load(tmp_path, path=str(write_rows(chats, tmp_path / "c.json")), columns={"messages": "dialog"}, **kw)
    assert all(isinstance(r, Conversation) for r in records(data))
    with pytest.raises(DataError, match=r"no column 'questio' .*\['question', 'answer', 'id'\]"):
        load(tmp_path, path=str(path), columns={"instruction": "questio", "output": "answer"}, **kw)


def test_encoding_option(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,a\nna\xefve,b\n".encode("latin-1"))
    kw = {"source": "classification", "path": str(path), "partition": {"kind": "iid", "num_clients": 1}}
    with pytest.raises(DataError, match=r"latin\.csv"):
        load(tmp_path, **kw)
    data = load(tmp_path, encoding="latin-1", **kw)
    assert sorted(r.text for r in records(data)) == ["café", "naïve"]


@pytest.mark.parametrize(
    ("setup", "cfg", "match"),
    [
        (lambda d: None, {"path": "nope.json"}, r"nope\.json does not exist"),
        (lambda d: (d / "empty").mkdir(), {"path": "empty"}, "holds no data files"),
        (
            lambda d: (
                (d / "mix").mkdir()
                or (write_rows(ALPACA, d / "mix" / "a.json") and write_rows(ALPACA, d / "mix" / "b.csv"))
            ),
            {"path": "mix"},
            "mixed formats",
        ),
        (
            lambda d: (
                (d / "mf").mkdir()
                or (
                    write_rows(ALPACA, d / "mf" / "a.jsonl")
                    and write_rows([{"prompt": "p", "completion": "c"}] * 3, d / "mf" / "b.jsonl")
                )
            ),
            {"path": "mf"},
            "mixed instruction formats",
        ),
        (
            lambda d: write_rows([{"q": "x", "a": "y"}] * 3, d / "odd.json"),
            {"path": "odd.json"},
            "cannot tell the instruction format from the columns \\['q', 'a'\\]",
        ),
        (lambda d: write_rows(ALPACA, d / "one.json"), {"path": "one.json"}, "no natural clients"),
    ],
)
def test_clear_errors(tmp_path: Path, setup, cfg: dict, match: str) -> None:
    setup(tmp_path)
    cfg = {**cfg, "path": str(tmp_path / cfg["path"])}
    with pytest.raises(DataError, match=match):
        load(tmp_path, source="instruct", **cfg)


def test_unknown_format_and_column_fields_are_config_errors() -> None:
    with pytest.raises(ValueError, match="format"):
        DataConfig(source="instruct", path="x", format="sharegpt")
    with pytest.raises(ValueError, match=r"data.columns.label: not a field of data.source 'instruct'"):
        DataConfig(source="instruct", path="x", columns={"label": "y"})


def test_thin_text_clients_warn_with_counts_or_fail(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "long.txt").write_text("\n\n".join(f"p{i}" for i in range(5)))
    (folder / "short.txt").write_text("only one paragraph")
    with pytest.warns(DataWarning, match=r"1 of 2 clients have too few records to hold any out .*: short"):
        data = load(tmp_path, source="text", path=str(folder))
    assert data.clients["short"] == type(data.clients["short"])(["only one paragraph"], [])
    (folder / "long.txt").write_text("also one")
    with pytest.raises(DataError, match="no client has held-out data"):
        load(tmp_path, source="text", path=str(folder))


def test_labelled_text_records_keep_file_order(tmp_path: Path) -> None:
    path = write_rows(ROWS[:3], tmp_path / "d.parquet")
    data = load(tmp_path, source="classification", path=str(tmp_path), label_names=["sport", "tech", "arts"])
    assert list(data.clients) == ["d"]
    assert [*data.clients["d"].train, *data.clients["d"].test] != [] and path.exists()
    assert sorted(records(data), key=lambda r: r.text) == [LabelledText(f"doc {i}", i) for i in range(3)]


def test_a_participant_maps_string_labels_through_label_names(tmp_path: Path) -> None:
    from fedtune.deploy.participant import load_local_split

    path = tmp_path / "named.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{['spam', 'ham'][i % 2]}\n" for i in range(6)))
    cfg = DataConfig(source="classification", path="x", label_names=["ham", "spam"])
    split = load_local_split(cfg, str(path), seed=0, client_id="a", cache_dir=tmp_path)
    assert {(r.text, r.label) for r in (*split.train, *split.test)} == {(f"t{i}", 1 - i % 2) for i in range(6)}


def test_a_folder_can_be_pooled_and_repartitioned_with_its_test_files(tmp_path: Path) -> None:
    sites, held = tmp_path / "sites", tmp_path / "held"
    sites.mkdir()
    held.mkdir()
    for name, rows in (("a", ALPACA[:4]), ("b", ALPACA[4:])):
        write_rows(rows, sites / f"{name}.jsonl")
        write_rows([{"instruction": f"t{name}{i}", "output": "o"} for i in range(3)], held / f"{name}.jsonl")
    cfg = {"source": "instruct", "path": str(sites), "test_path": str(held)}
    data = load(tmp_path, partition={"kind": "dirichlet_sizes", "num_clients": 3, "alpha": 1.0}, **cfg)
    assert list(data.clients) == ["client_000", "client_001", "client_002"]
    assert sorted(r.instruction for s in data.clients.values() for r in s.train) == sorted(
        r["instruction"] for r in ALPACA
    )
    assert sorted(r.instruction for s in data.clients.values() for r in s.test) == sorted(
        f"t{n}{i}" for n in "ab" for i in range(3)
    )
