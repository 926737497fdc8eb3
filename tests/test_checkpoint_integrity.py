"""Checkpoints carry a SHA-256 of their tensors, checked on load; the previous checkpoint is kept and
resumed (with a warning) when the latest is corrupt; a resumed serve repeats only the lost round (#13 item 6),
and the config digest says truly what it covers (#13 item 8)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from safetensors import safe_open

from fedtune.config import parse_config
from fedtune.core.params import ParamSpec
from fedtune.core.state import (
    CorruptCheckpoint,
    ServerState,
    load_latest,
    load_state,
    previous_path,
    save_state,
)
from fedtune.errors import CheckpointError
from fedtune.run import rundir, session

SPEC = ParamSpec(names=("w",), shapes=((1000,),), dtypes=("float32",))


def _state(round_idx: int) -> ServerState:
    params = np.arange(1000, dtype=np.float32) * round_idx
    return ServerState(round_idx, params, SPEC, arrays={"opt/m": params + 1}, extra={"r": round_idx})


def _flip_tensor_byte(path: Path, *, tensor: str = "params") -> None:
    """Flip one byte inside ``tensor``'s data (not the header: that corruption the parser already catches)."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    start = 8 + header_len + header[tensor]["data_offsets"][0]
    raw[start + 17] ^= 0x40
    path.write_bytes(bytes(raw))


def test_flipped_tensor_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_state(_state(3), path, config_digest="d")
    with safe_open(str(path), framework="numpy") as fh:
        assert len(json.loads(fh.metadata()["fedtune"])["sha256"]) == 64
    for tensor in ("params", "arrays/opt/m"):
        save_state(_state(3), path, config_digest="d")
        _flip_tensor_byte(path, tensor=tensor)
        with pytest.raises(CorruptCheckpoint, match="SHA-256"):
            load_state(path, config_digest="d")


def test_the_previous_checkpoint_is_kept_and_used_when_the_latest_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_state(_state(1), path, config_digest="d")
    assert not previous_path(path).exists()
    save_state(_state(2), path, config_digest="d")
    assert previous_path(path).name == "checkpoint.prev.safetensors"
    assert load_state(previous_path(path)).round == 1 and load_state(path).round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.safetensors", "checkpoint.safetensors"]

    state, warning = load_latest(path, config_digest="d")
    assert state.round == 2 and warning is None
    _flip_tensor_byte(path)
    state, warning = load_latest(path, config_digest="d")
    assert state.round == 1 and "SHA-256" in warning and "checkpoint.prev.safetensors" in warning
    np.testing.assert_array_equal(state.params, _state(1).params)
    path.unlink()  # a crash between the two renames cannot happen (a hard link), but a lost file can
    assert load_latest(path, config_digest="d")[0].round == 1


def test_no_fallback_for_a_different_configuration_or_two_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_state(_state(1), path, config_digest="d")
    save_state(_state(2), path, config_digest="d")
    with pytest.raises(CheckpointError, match="different configuration"):
        load_latest(path, config_digest="other")
    _flip_tensor_byte(path)
    _flip_tensor_byte(previous_path(path))
    with pytest.raises(CorruptCheckpoint, match="prev"):
        load_latest(path, config_digest="d")


def test_the_folder_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync, real_open = os.fsync, os.open
    names: dict[int, str] = {}

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        names[fd] = str(path)
        return fd

    def tracking_fsync(fd):
        synced.append(names.get(fd, "file"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "fsync", tracking_fsync)
    save_state(_state(1), tmp_path / "checkpoint.safetensors", config_digest="d")
    assert synced[-1] == str(tmp_path)  # the directory, last: after the rename


def test_serve_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path: Path) -> None:
    from test_influence import NUMEL, Network
    from test_influence import SPEC as SMALL

    config = parse_config(
        {
            "seed": 1,
            "federation": {"rounds": 3, "clients_per_round": 3},
            "run": {"out_dir": str(tmp_path), "plot": False},
        }
    )
    init = (np.linspace(-1, 1, NUMEL, dtype=np.float32), SMALL)
    quiet = Console(quiet=True)
    whole = session.coordinate(config, Network(4), init=init, accuracy=False, console=quiet, show_progress=False)
    # the same run, stopped after round 2, then its latest checkpoint corrupted on disk
    two = config.model_copy(update={"federation": config.federation.model_copy(update={"rounds": 2})})
    part = session.coordinate(two, Network(4), init=init, accuracy=False, console=quiet, show_progress=False)
    _flip_tensor_byte(part.run_dir / rundir.CHECKPOINT)
    console = Console(record=True, width=200)
    resumed = session.coordinate(
        config, Network(4), init=init, accuracy=False, console=console, resume_dir=part.run_dir, show_progress=False
    )
    text = " ".join(console.export_text().split())
    assert "resuming from the previous checkpoint" in text and "after round 1" in text
    assert resumed.state.params.tobytes() == whole.state.params.tobytes()
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3]  # round 2 repeated once, not twice


def _digest(**deployment: object) -> str:
    return rundir.config_digest(parse_config({"deployment": deployment}))


def test_the_config_digest_covers_the_codec_but_not_addresses_or_limits() -> None:
    plain = _digest()
    assert _digest(port=1234, address="0.0.0.0", round_timeout_s=5.0, max_clients=9) == plain
    assert _digest(codec="none", codec_block=64) == plain  # no codec: its options change nothing
    assert _digest(codec="int8") != plain
    assert _digest(codec="int8", codec_block=64) != _digest(codec="int8")


def test_the_checkpoint_sink_writes_in_the_background_one_at_a_time_and_close_waits(tmp_path: Path) -> None:
    """CheckpointSink writes while the next round trains: after close the file is the last round's state, the
    one before it is kept, and the bytes are what save_state writes (the metadata included)."""
    from fedtune.run.sinks import CheckpointSink, RunEnd

    path = tmp_path / "checkpoint.safetensors"
    sink = CheckpointSink(path, "d")
    for r in (1, 2, 3):
        sink.on_round(_state(r), [{}])
    sink.close(RunEnd("finished", _state(3)))
    assert load_state(path, config_digest="d").round == 3 and load_state(previous_path(path)).round == 2
    direct = tmp_path / "direct" / "checkpoint.safetensors"
    save_state(_state(3), direct, config_digest="d")
    assert path.read_bytes() == direct.read_bytes()


def test_the_checkpoint_keeps_the_extras_of_its_round_and_a_failed_write_is_raised(tmp_path: Path) -> None:
    """The state's JSON extras are read when the round is handed over (a later change to that dict does not
    reach the file); a write that fails is raised by the next round's checkpoint or by close, not lost."""
    from fedtune.run.sinks import CheckpointSink, RunEnd

    path = tmp_path / "checkpoint.safetensors"
    sink = CheckpointSink(path, "d")
    state = _state(1)
    sink.on_round(state, [{}])
    state.extra["r"] = 99  # what a careless strategy might do after the round
    sink.wait()
    assert load_state(path).extra == {"r": 1}

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    bad = CheckpointSink(blocked / "checkpoint.safetensors", "d")
    bad.on_round(_state(1), [{}])
    with pytest.raises(OSError):
        bad.on_round(_state(2), [{}])  # round 1's write failed: raised before round 2's starts
    bad.on_round(_state(3), [{}])
    with pytest.raises(OSError):
        bad.close(RunEnd("finished", _state(3)))


def test_the_config_digest_covers_the_influence_bounds() -> None:
    """Declared example counts and what happens above them change how much an update weighs: a checkpoint
    of a run with other bounds must not be resumed as if it were this one's."""
    plain = _digest()
    assert _digest(over_declared="cap", require_declared_examples=False) == plain  # the defaults: as before
    declared = _digest(declared_examples={"a": 10, "b": 20})
    assert declared != plain
    assert _digest(declared_examples={"a": 10, "b": 21}) != declared
    assert _digest(declared_examples={"a": 10, "b": 20}, over_declared="refuse") != declared
    assert _digest(over_declared="refuse") != plain  # it also governs counts declared at Join
    assert _digest(require_declared_examples=True) != plain
