"""Checkpoints: round trip, atomic writes, mismatched pairs detected."""

import copy

import pytest
import torch
from torch import nn

from inflate import InflateError, inflate_first_conv, load_checkpoint, save_checkpoint

pytest.importorskip("safetensors")


def test_round_trip_rebuilds_the_inflated_model(tmp_path):
    torch.manual_seed(0)
    net = inflate_first_conv(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 2, init="zero")
    meta_path = save_checkpoint(tmp_path / "run" / "model", net, {"num_inputs": 2, "init": "zero", "loss": 0.25})
    assert meta_path.name == "model.json"
    state, meta = load_checkpoint(tmp_path / "run" / "model")
    rebuilt = inflate_first_conv(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), meta["num_inputs"],
                                 init=meta["init"])
    rebuilt.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), rebuilt.state_dict().values()))
    assert meta["loss"] == 0.25 and meta["weights"] == "model.safetensors"


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net = nn.Linear(2, 2)
    save_checkpoint(tmp_path / "m", net, {"step": 1})
    before = (tmp_path / "m.safetensors").read_bytes()
    import inflate._checkpoint as ckpt

    real = ckpt.os.fsync
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m", copy.deepcopy(net).requires_grad_(False).apply(
            lambda m: torch.nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None), {"step": 2})
    monkeypatch.setattr(ckpt.os, "fsync", real)
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert load_checkpoint(tmp_path / "m")[1]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]  # no temp files left


def test_mismatched_and_missing_files_are_detected(tmp_path):
    save_checkpoint(tmp_path / "a", nn.Linear(2, 2), {})
    save_checkpoint(tmp_path / "b", nn.Linear(2, 2), {})
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(InflateError, match="were not written together"):
        load_checkpoint(tmp_path / "a")
    with pytest.raises(InflateError, match="found neither"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(InflateError, match="JSON-serializable"):
        save_checkpoint(tmp_path / "d", nn.Linear(2, 2), {"bad": object()})
    assert not (tmp_path / "d.safetensors").exists()
