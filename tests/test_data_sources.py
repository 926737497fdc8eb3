"""load_federated: dispatch, partitioning, seeded splits, capping, and the cache directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.config.schema import DataConfig
from fedtune.data.cache import default_cache_dir
from fedtune.data.sources import client_ids, keep_largest, load_federated
from fedtune.data.types import ClientSplit, Instruction
from fedtune.errors import DataError


def write_labelled(path: Path, n: int = 200) -> Path:
    rows = [{"text": f"doc {i}", "label": ["sport", "tech", "arts", "news"][i % 4]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def load(tmp_path: Path, seed: int = 0, **cfg: object):
    return load_federated(DataConfig(**cfg), seed=seed, cache_dir=tmp_path / "cache")


def all_records(data) -> list:
    return [r for s in data.clients.values() for r in (*s.train, *s.test)]


def test_classification_iid_partition_covers_the_pool(tmp_path: Path) -> None:
    path = write_labelled(tmp_path / "d.jsonl")
    data = load(tmp_path, source="classification", path=str(path), partition={"kind": "iid", "num_clients": 5})
    assert list(data.clients) == [f"client_00{i}" for i in range(5)]
    assert data.label_names == ["arts", "news", "sport", "tech"]
    texts = sorted(r.text for r in all_records(data))
    assert texts == sorted(f"doc {i}" for i in range(200))
    for split in data.clients.values():
        assert (len(split.train), len(split.test)) == (32, 8)


def test_same_seed_same_data_other_seed_differs(tmp_path: Path) -> None:
    path = write_labelled(tmp_path / "d.jsonl")
    cfg = {"source": "classification", "path": str(path), "partition": {"kind": "dirichlet_labels", "num_clients": 4}}
    a, b, c = load(tmp_path, 1, **cfg), load(tmp_path, 1, **cfg), load(tmp_path, 2, **cfg)
    assert a == b
    assert a != c


def test_split_is_random_not_temporal_for_pooled_sources(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(100)]))
    data = load(tmp_path, source="instruct", path=str(path), partition={"kind": "iid", "num_clients": 1})
    (split,) = data.clients.values()
    assert len(split.test) == 20
    assert split.test != [Instruction(f"q{i}", "", f"a{i}") for i in range(80, 100)]


def test_digits_label_skew(tmp_path: Path) -> None:
    data = load(tmp_path, source="digits", partition={"kind": "dirichlet_labels", "num_clients": 10, "alpha": 0.1})
    assert len(all_records(data)) == 1797
    assert data.label_names == [str(d) for d in range(10)]
    # with alpha=0.1 most clients are dominated by few classes
    dominant = [
        max(sum(r.label == y for r in s.train) for y in range(10)) / len(s.train) for s in data.clients.values()
    ]
    assert sum(d > 0.5 for d in dominant) >= 5


def test_text_folder_natural_clients_and_caps(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    for name, n in [("a", 5), ("b", 20), ("c", 10), ("d", 10)]:
        (folder / f"{name}.txt").write_text("\n\n".join(f"{name}{i}" for i in range(n)))
    data = load(tmp_path, source="text", path=str(folder), max_clients=2, max_examples_per_client=3)
    # train sizes: a=4, b=16, c=8, d=8 -> keep b, then c (tie with d broken by id); sorted order
    assert list(data.clients) == ["b", "c"]
    assert data.clients["b"].train == ["b0", "b1", "b2"]
    assert data.clients["b"].test == ["b16", "b17", "b18", "b19"]


def test_text_single_file_partitioned_keeps_temporal_order(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"p{i:03d}" for i in range(100)))
    data = load(tmp_path, source="text", path=str(path), partition={"kind": "iid", "num_clients": 4})
    assert list(data.clients) == ["client_000", "client_001", "client_002", "client_003"]
    for split in data.clients.values():
        assert split.train == sorted(split.train) and split.test == sorted(split.test)
        assert max(split.train) < min(split.test)
    assert sorted(all_records(data)) == [f"p{i:03d}" for i in range(100)]


def test_shakespeare_source_uses_path_and_plays(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    speeches = "\n\n".join(f"Kent.\nline {i}" for i in range(5))
    (texts / "lear_gut.txt").write_text(f"ACT I.\n\nScene I. Heath.\n\n{speeches}\n")
    (texts / "hamlet_gut.txt").write_text("ACT I.\n\nHam.\nTo be.\n\nHam.\nOr not.\n")
    data = load(tmp_path, source="shakespeare", path=str(texts), plays=["lear"])
    assert list(data.clients) == ["lear/Kent"]
    assert data.clients["lear/Kent"].test == ["line 4"]


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"source": "digits"}, "no natural clients"),
        ({"source": "digits", "partition": {"kind": "iid", "num_clients": 5000}}, "num_clients"),
    ],
)
def test_configuration_errors(tmp_path: Path, cfg: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load(tmp_path, **cfg)


def test_label_skew_needs_labels(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("a\n\nb\n\nc")
    with pytest.raises(DataError, match="labelled"):
        load(tmp_path, source="text", path=str(path), partition={"kind": "dirichlet_labels", "num_clients": 2})


def test_keep_largest_ties_by_id_and_sorted_result() -> None:
    def split(n: int) -> ClientSplit:
        return ClientSplit(list(range(n)), [])

    clients = {"z": split(5), "b": split(2), "a": split(5), "m": split(9)}
    assert list(keep_largest(clients, 2)) == ["a", "m"]
    assert list(keep_largest(clients, 3)) == ["a", "m", "z"]
    assert list(keep_largest(clients, None)) == ["a", "b", "m", "z"]
    assert list(clients) == ["z", "b", "a", "m"]  # input untouched


def test_client_ids_sort_numerically() -> None:
    ids = client_ids(1200)
    assert ids[0] == "client_0000" and ids[-1] == "client_1199"
    assert ids == sorted(ids)
    assert client_ids(3) == ["client_000", "client_001", "client_002"]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "env"))
    assert default_cache_dir("~/explicit") == Path.home() / "explicit"
    assert default_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("FEDTUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir(None) == tmp_path / "home" / ".cache" / "fedtune"
