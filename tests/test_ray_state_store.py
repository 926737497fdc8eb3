"""Off-worker client state: every backend returns the newest state saved before the asked round (oracle: a
dict of every save), survives a replayed round, and never aliases the caller's arrays.

The Ray backend is checked in test_ray_backend.py, which owns the Ray session.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.core.state_store import ClientState, DiskStateStore, MemoryStateStore, open_state_store
from fedtune.errors import CheckpointError, ConfigError


@pytest.fixture(params=["memory", "disk"])
def store(request, tmp_path):
    return MemoryStateStore() if request.param == "memory" else DiskStateStore(tmp_path / "client_state")


def state(value: float, **meta) -> ClientState:
    return ClientState({"c": np.full(4, value, np.float32), "count": np.array([int(value)])}, meta)


def test_load_returns_newest_before_round_and_none_before_any(store) -> None:
    assert store.load("c0", "scaffold", round=1) is None
    store.save("c0", "scaffold", state(1.0, steps=5), round=1)
    store.save("c0", "scaffold", state(3.0, steps=7), round=3)
    assert store.load("c0", "scaffold", round=1) is None
    assert store.load("c0", "scaffold", round=3).meta == {"steps": 5}
    loaded = store.load("c0", "scaffold", round=9)
    assert loaded.meta == {"steps": 7}
    np.testing.assert_array_equal(loaded.arrays["c"], np.full(4, 3.0, np.float32))
    assert loaded.arrays["count"].dtype == np.int64
    assert store.load("c1", "scaffold", round=9) is None  # keys are per client
    assert store.load("c0", "dp", round=9) is None  # and per namespace


def test_replayed_round_reads_what_it_read_the_first_time(store) -> None:
    """A crash after the clients of round 3 saved, before the server's checkpoint: the replay of round 3 must
    start from round 2's state, not round 3's, or a resumed run would differ from an uninterrupted one."""
    store.save("c0", "ns", state(1.0), round=1)
    store.save("c0", "ns", state(2.0), round=2)
    first = store.load("c0", "ns", round=3)
    store.save("c0", "ns", state(3.0), round=3)  # ...crash, resume, replay round 3:
    replay = store.load("c0", "ns", round=3)
    np.testing.assert_array_equal(replay.arrays["c"], first.arrays["c"])
    store.save("c0", "ns", state(3.5), round=3)  # the replay's save replaces the first attempt's
    np.testing.assert_array_equal(store.load("c0", "ns", round=4).arrays["c"], np.full(4, 3.5, np.float32))


def test_old_versions_are_pruned_on_disk(tmp_path) -> None:
    store = DiskStateStore(tmp_path)
    for r in range(1, 6):
        store.save("c0", "ns", state(float(r)), round=r)
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert files == ["r00000004.safetensors", "r00000005.safetensors"]  # round 5 read round 4's


def test_stored_arrays_do_not_alias_the_callers(store) -> None:
    mine = state(1.0)
    store.save("c0", "ns", mine, round=1)
    mine.arrays["c"][:] = 99.0
    loaded = store.load("c0", "ns", round=2)
    assert loaded.arrays["c"][0] == 1.0
    loaded.arrays["c"][:] = -1.0
    assert store.load("c0", "ns", round=2).arrays["c"][0] == 1.0


def test_client_ids_with_any_characters_stay_apart(tmp_path) -> None:
    store = DiskStateStore(tmp_path)
    store.save("(hamlet, HAMLET)", "ns", state(1.0), round=1)
    store.save("(hamlet_ HAMLET)", "ns", state(2.0), round=1)  # same slug, different id
    assert store.load("(hamlet, HAMLET)", "ns", round=2).arrays["c"][0] == 1.0
    assert store.load("(hamlet_ HAMLET)", "ns", round=2).arrays["c"][0] == 2.0


def test_bad_keys_and_addresses_are_errors(tmp_path) -> None:
    store = MemoryStateStore()
    with pytest.raises(ValueError, match="namespace"):
        store.save("c0", "../escape", state(1.0), round=1)
    with pytest.raises(ValueError, match="round"):
        store.load("c0", "ns", round=-1)
    with pytest.raises(ConfigError):
        open_state_store("s3://bucket")
    with pytest.raises(ConfigError):
        open_state_store("disk:")
    disk = DiskStateStore(tmp_path)
    disk.save("c0", "ns", state(1.0), round=1)
    next(tmp_path.rglob("*.safetensors")).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        disk.load("c0", "ns", round=2)


def test_open_by_address_reaches_the_same_store(tmp_path) -> None:
    open_state_store(f"disk:{tmp_path}").save("c0", "ns", state(1.0), round=1)
    assert open_state_store(f"disk:{tmp_path}").load("c0", "ns", round=2) is not None
    open_state_store("memory:t").save("c0", "ns", state(1.0), round=1)
    assert open_state_store("memory:t").load("c0", "ns", round=2) is not None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.booleans()), min_size=1, max_size=25))
def test_monotone_rounds_with_replays_match_an_oracle(steps) -> None:
    """Rounds go forward, with any round possibly replayed once (load, then save, like a worker)."""
    store, oracle = MemoryStateStore(), {}
    current = 0
    for advance, replay in steps:
        current = max(current, advance)
        for _ in range(2 if replay else 1):
            older = [r for r in oracle if r < current]
            expected = oracle[max(older)] if older else None
            got = store.load("c", "ns", round=current)
            assert (got.meta["v"] if got else None) == expected
            value = (current * 100 + len(oracle)) if expected is None else expected + 1
            store.save("c", "ns", ClientState({}, {"v": value}), round=current)
            oracle[current] = value
