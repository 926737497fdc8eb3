from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.core.params import ParamSpec, check_vector
from fedtune.core.state import ServerState, load_state, save_state
from fedtune.errors import CheckpointError, UpdateRejected

SPEC = ParamSpec(names=("a.weight", "b.bias"), shapes=((3, 4), (5,)), dtypes=("float32", "float32"))


def _flat() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SPEC.numel).astype(np.float32)


def test_spec_offsets_digest_and_mismatch() -> None:
    spec = SPEC
    assert spec.numel == 17
    assert [(n, a, b) for n, a, b, _ in spec.offsets()] == [("a.weight", 0, 12), ("b.bias", 12, 17)]
    other = ParamSpec(names=("a.weight", "b.bias"), shapes=((4, 3), (5,)), dtypes=("float32", "float32"))
    assert other.digest != spec.digest
    assert "a.weight" in spec.describe_mismatch(other) and "[4, 3]" in spec.describe_mismatch(other)


def test_check_vector_rejects_lies() -> None:
    spec = SPEC
    with pytest.raises(UpdateRejected, match="16 values"):
        check_vector(np.zeros(16, np.float32), spec)
    with pytest.raises(UpdateRejected, match="float64"):
        check_vector(np.zeros(17, np.float64), spec)
    bad = np.zeros(17, np.float32)
    bad[[2, 5]] = [np.nan, np.inf]
    with pytest.raises(UpdateRejected, match="2 NaN or Inf"):
        check_vector(bad, spec)


def test_state_checkpoint_round_trip(tmp_path: Path) -> None:
    flat, spec = _flat(), SPEC
    state = ServerState(round=3, params=flat, spec=spec, arrays={"m": flat * 2}, extra={"eps": [1.5]})
    path = tmp_path / "ckpt.safetensors"
    save_state(state, path, config_digest="abc")
    back = load_state(path, config_digest="abc")
    assert back.round == 3 and back.spec == spec and back.extra == {"eps": [1.5]}
    np.testing.assert_array_equal(back.params, flat)
    np.testing.assert_array_equal(back.arrays["m"], flat * 2)
    with pytest.raises(CheckpointError, match="different configuration"):
        load_state(path, config_digest="other")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp files left behind


def test_corrupt_or_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(bad)
