"""Checkpoints: bit-exact round trip, atomic writes, clear errors, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from potluck.store.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=g)
    flat[3] = float("nan")
    flat[4] = float("-inf")
    return {
        "global": flat,
        "server/momentum": torch.randn(7, 3, generator=g, dtype=torch.float64),
        "server/step": torch.tensor(12, dtype=torch.int64),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, dtype=torch.float32),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view whose equality means bit equality (NaNs included)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return t.contiguous().view(ints[t.element_size()])


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    tensors = _tensors()
    meta = {"round": 7, "algorithm": {"name": "fedavgm", "beta": 0.9}, "tags": ["a", "b"]}
    path = tmp_path / "round-000007.safetensors"
    save_checkpoint(path, Checkpoint(tensors, meta))
    loaded = load_checkpoint(path)
    assert loaded.meta == meta
    assert set(loaded.tensors) == set(tensors)
    for name, t in tensors.items():
        got = loaded.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(_bits(got), _bits(t)), name


def test_empty_tensors_and_non_contiguous(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a.safetensors", Checkpoint({}, {"round": 0}))
    assert load_checkpoint(tmp_path / "a.safetensors").tensors == {}
    t = torch.arange(12.0).reshape(3, 4).T
    save_checkpoint(tmp_path / "b.safetensors", Checkpoint({"t": t}, {}))
    assert torch.equal(load_checkpoint(tmp_path / "b.safetensors").tensors["t"], t)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, Checkpoint({"w": torch.zeros(3)}, {"v": 1}))
    save_checkpoint(path, Checkpoint({"w": torch.ones(3)}, {"v": 2}))
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert load_checkpoint(path).meta == {"v": 2}


def test_failed_write_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, Checkpoint({"w": torch.zeros(3)}, {"v": 1}))

    def boom(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(path, Checkpoint({"w": torch.ones(3)}, {"v": 2}))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert load_checkpoint(path).meta == {"v": 1}


def test_meta_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "x.safetensors", Checkpoint({}, {"p": object()}))
    assert not list(tmp_path.iterdir())


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_checkpoint(path)


@pytest.mark.parametrize("cut", [1, 100, 4000, 4100])
def test_truncated_file_is_a_clear_error(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, Checkpoint(_tensors(), {"round": 1}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"\xff" * 64, pickle.dumps({"global": [1.0, 2.0]})],
    ids=["empty", "text", "huge-header", "pickle"],
)
def test_corrupt_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a potluck checkpoint"):
        load_checkpoint(path)


def test_file_is_plain_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    tensors = _tensors()
    save_checkpoint(path, Checkpoint(tensors, {"round": 3}))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert json.loads(header.pop("__metadata__")["potluck"]) == {"round": 3}
    assert set(header) == set(tensors)
    end = max(h["data_offsets"][1] for h in header.values())
    assert len(data) == 8 + n + end
    assert (header["global"]["dtype"], header["global"]["shape"]) == ("F32", [1000])


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, Checkpoint(_tensors(), {"round": 3}))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_checkpoint(path).meta == {"round": 3}
