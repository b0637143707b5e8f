"""Checkpoints: one file, exact round trip, atomic saves (errors, kills, concurrent readers), checked
metadata, damaged and foreign files refused, tied weights."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import inflate._checkpoint as ckpt
from inflate import InflateError, inflate_first_conv, load_checkpoint, save_checkpoint

safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so NaN payloads and the sign of zero count."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _fill(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)


def _consistent(state: dict[str, torch.Tensor], meta: dict) -> bool:
    """Every tensor holds the step the metadata names: weights and metadata of one save."""
    return all(bool((v == meta["step"]).all()) for v in state.values())


def _in_place(path, data: bytes, pause: float = 0.0):
    """A non-atomic write over the file itself (the negative control of the atomicity tests)."""
    path = Path(path)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(pause)
        f.write(data[len(data) // 2 :])
    return path


# --- the format and the round trip ---------------------------------------------------------------


def test_round_trip_rebuilds_the_inflated_model_from_one_file(tmp_path):
    torch.manual_seed(0)
    net = inflate_first_conv(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 2, init="zero")
    metadata = {"num_inputs": 2, "init": "zero", "loss": 0.25, "history": {"epochs": [1.5, 0.5]}, "note": None}
    written = save_checkpoint(tmp_path / "run" / "model", net, metadata)
    assert written == tmp_path / "run" / "model.safetensors"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["model.safetensors"]  # one file, no sidecar
    for name in ("model", "model.safetensors", "model.json"):  # the names the API has always accepted
        state, meta = load_checkpoint(tmp_path / "run" / name)
        assert meta == metadata  # exactly what was given: nothing added, nothing lost
    rebuilt = inflate_first_conv(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), meta["num_inputs"],
                                 init=meta["init"])
    rebuilt.load_state_dict(state)
    assert all(_bitwise_equal(a, b) for a, b in zip(net.state_dict().values(), rebuilt.state_dict().values()))


def test_round_trip_is_bitwise_exact(tmp_path):
    torch.manual_seed(0)
    net = nn.Linear(7, 5).double()
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 5e-324, 1 / 3], dtype=torch.float64)
    special[4:5].view(torch.int64).bitwise_or_(0x5)  # a NaN with a payload
    net.register_buffer("special", special)
    net.register_buffer("steps", torch.tensor([2**62 + 1, -3], dtype=torch.int64))
    net.register_buffer("bf16", torch.randn(3, dtype=torch.bfloat16))
    net.register_buffer("mask", torch.tensor([True, False]))
    net.register_buffer("scalar", torch.tensor(0.1, dtype=torch.float64))
    net.register_buffer("strided", torch.randn(4, 6, dtype=torch.float64).t())  # not contiguous
    save_checkpoint(tmp_path / "m", net, {})
    state, _ = load_checkpoint(tmp_path / "m")
    original = net.state_dict()
    assert list(state) == list(original)  # the state dict's order, too
    assert all(_bitwise_equal(state[k], original[k]) for k in original)
    # negative control: the comparison sees what torch.equal or == would not
    assert not _bitwise_equal(torch.tensor(0.0), torch.tensor(-0.0))
    assert not _bitwise_equal(special, torch.where(special.isnan(), torch.tensor(float("nan"), dtype=torch.float64),
                                                   special))


def test_the_header_holds_the_marker_the_metadata_and_the_hash(tmp_path):
    path = save_checkpoint(tmp_path / "m", nn.Linear(2, 2), {"epoch": 3})
    with safetensors_torch.safe_open(str(path), "pt") as f:  # readable by any safetensors reader
        header = f.metadata()
        assert sorted(f.keys()) == ["bias", "weight"]
    assert header[ckpt.FORMAT_KEY] == "1"
    assert json.loads(header[ckpt.METADATA_KEY]) == {"epoch": 3}
    assert json.loads(header[ckpt.ALIASES_KEY]) == {}
    assert json.loads(header[ckpt.KEYS_KEY]) == ["weight", "bias"]
    assert len(header[ckpt.SHA256_KEY]) == 64 and header[ckpt.TORCH_KEY] == torch.__version__


# --- atomic saves -------------------------------------------------------------------------------


def test_one_save_is_fsync_replace_fsync_of_the_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + ("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {Path(src).parent == Path(dst).parent}")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    path = save_checkpoint(tmp_path / "m", nn.Linear(2, 2), {})
    assert events == ["fsync file", "replace True", "fsync folder"]  # one rename, within the folder
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # the permissions of an ordinary write


@pytest.mark.parametrize("fail", ["write", "replace"])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail):
    net = nn.Linear(2, 2)
    _fill(net, 1)
    path = save_checkpoint(tmp_path / "m", net, {"step": 1})
    before = path.read_bytes()
    _fill(net, 2)

    def broken(*args):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.os, "fsync" if fail == "write" else "replace", broken)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path / "m", net, {"step": 2})
    assert path.read_bytes() == before
    state, meta = load_checkpoint(path)
    assert meta["step"] == 1 and _consistent(state, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left
    # negative control: the same save, unbroken, does replace it
    save_checkpoint(tmp_path / "m", net, {"step": 2})
    assert path.read_bytes() != before and load_checkpoint(path)[1]["step"] == 2


KILLER = textwrap.dedent('''
    """Fork savers looping over one checkpoint, SIGKILL each at a random instant, load what is left."""
    import json, os, random, signal, stat, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    torch.set_num_threads(1)
    import inflate._checkpoint as ckpt
    from inflate import InflateError, load_checkpoint, save_checkpoint

    real_fsync = os.fsync

    def slow_disk_fsync(fd):  # a slow disk: the file's fsync takes 10 ms (the rename does not wait for it)
        real_fsync(fd)
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            time.sleep(0.01)

    os.fsync = slow_disk_fsync

    def in_place(path, data):  # the negative control: write over the file itself, in two halves
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.01)
            f.write(data[len(data) // 2 :])
        return path

    def trials(folder, count, rng):
        folder.mkdir()
        model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))  # 0.5 MB

        def save(step):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(step)
            save_checkpoint(folder / "m", model, {"step": step})

        save(0)
        results, last = [], 0
        for trial in range(count):
            first = (trial + 1) * 100_000  # this saver's steps: first + 1, first + 2, ...
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:
                step = first
                while os.getppid() == parent:  # an orphan stops
                    step += 1
                    save(step)
                os._exit(0)
            try:
                time.sleep(rng.uniform(0.01, 0.06))
            finally:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            temps = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
            for p in temps:
                p.unlink()
            try:
                state, meta = load_checkpoint(folder / "m")
            except InflateError as err:
                results.append({"error": str(err)})
                continue
            step = meta["step"]
            results.append({"step": step, "previous": last, "ours": step > first, "temp": bool(temps),
                            "consistent": all(bool((v == step).all()) for v in state.values())})
            last = step
        return results

    folder, count = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(0)
    atomic = trials(folder / "atomic", count, rng)
    ckpt._atomic_write = in_place
    in_place = trials(folder / "in_place", count, rng)
    print(json.dumps({"atomic": atomic, "in_place": in_place}))
''')


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked savers (POSIX)")
def test_saves_killed_at_random_instants_leave_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    atomic = results["atomic"]
    assert [r for r in atomic if "error" in r] == []
    assert all(r["consistent"] for r in atomic)  # weights and metadata of one save
    assert all(r["step"] >= r["previous"] for r in atomic)  # never an older checkpoint than before the kill
    assert any(r["ours"] for r in atomic), "the savers never saved before the kill: the test did not test"
    assert any(r["temp"] for r in atomic), "no kill landed in the middle of a save: the test did not test"
    # negative control: the same kills against a save that writes over the file itself break it
    assert sum("error" in r or not r["consistent"] for r in results["in_place"]) >= 2, results["in_place"]


def _readers_during_saves(path: Path, seconds: float, stop_at_first_failure: bool = False):
    """Save in a thread while loading in a loop; (saves, loads, failures)."""
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    _fill(model, 0)
    save_checkpoint(path, model, {"step": 0})
    stop, saves = threading.Event(), [0]

    def writer():
        while not stop.is_set():
            saves[0] += 1
            _fill(model, saves[0])
            save_checkpoint(path, model, {"step": saves[0]})

    thread = threading.Thread(target=writer)
    thread.start()
    loads, failures = 0, []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not (stop_at_first_failure and failures):
            try:
                state, meta = load_checkpoint(path)
                if not _consistent(state, meta):
                    failures.append(f"step {meta['step']} with other weights")
            except InflateError as err:
                failures.append(str(err))
            loads += 1
    finally:
        stop.set()
        thread.join()
    return saves[0], loads, failures


def test_a_reader_looping_during_saves_never_fails(tmp_path):
    saves, loads, failures = _readers_during_saves(tmp_path / "m", seconds=1.0)
    assert failures == []
    assert saves >= 10 and loads >= 10, (saves, loads)  # they did overlap


def test_a_reader_during_in_place_writes_fails(tmp_path, monkeypatch):
    # negative control of the test above: the same loop, the file written over in place
    monkeypatch.setattr(ckpt, "_atomic_write", lambda path, data: _in_place(path, data, pause=0.001))
    _, _, failures = _readers_during_saves(tmp_path / "m", seconds=3.0, stop_at_first_failure=True)
    assert failures and str(tmp_path / "m.safetensors") in failures[0]


# --- what is refused ----------------------------------------------------------------------------


def _cycle():
    d = {"a": 1}
    d["self"] = d
    return d


@pytest.mark.parametrize(("metadata", "message"), [
    ({1: "a"}, r"metadata: expected str keys, got 1 \(int\)"),
    (["a", "b"], r"metadata: expected a dict with str keys and JSON-serializable values, got list"),
    ("step", r"metadata: expected a dict .*, got str"),
    ({"run": {"sizes": {2: 3}}}, r"metadata\['run'\]\['sizes'\]: expected str keys, got 2 \(int\)"),
    ({"path": Path("data")}, r"metadata\['path'\]: expected a JSON value \(.*\), got (PosixPath|WindowsPath)"),
    ({"loss": [0.5, float("nan")]}, r"metadata\['loss'\]\[1\]: expected a finite float .*, got nan"),
    ({"lr": float("inf")}, r"metadata\['lr'\]: expected a finite float .*, got inf"),
    ({"x": object()}, r"metadata\['x'\]: expected a JSON value .*, got object"),
    ({"t": torch.tensor(1.0)}, r"metadata\['t'\]: expected a JSON value .*, got Tensor"),
    (_cycle(), r"metadata\['self'\]: expected a tree of JSON values, got a reference cycle"),
], ids=["int key", "list", "str", "nested int key", "Path", "NaN", "inf", "object", "tensor", "cycle"])
def test_invalid_metadata_is_refused_before_anything_is_written(tmp_path, metadata, message):
    net = nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "m", net, {"step": 1})
    before = path.read_bytes()
    _fill(net, 2)
    with pytest.raises(InflateError, match=message):
        save_checkpoint(tmp_path / "m", net, metadata)
    assert path.read_bytes() == before  # the previous checkpoint, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    # negative control: valid metadata is written
    save_checkpoint(tmp_path / "m", net, {"step": 2, "sizes": [1, 2], "ok": True, "none": None})
    assert path.read_bytes() != before


def test_a_state_dict_entry_that_is_not_a_dense_tensor_is_refused_before_anything_is_written(tmp_path):
    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"not": "a tensor"}

        def set_extra_state(self, state):
            pass

    path = save_checkpoint(tmp_path / "m", nn.Linear(2, 2), {})
    before = path.read_bytes()
    with pytest.raises(InflateError, match=r"state dict '_extra_state': expected a dense tensor .*, got dict"):
        save_checkpoint(tmp_path / "m", Extra(2, 2), {})
    assert path.read_bytes() == before


def _rewrite(blob: bytes, change) -> bytes:
    """``blob`` with its JSON header passed through ``change`` (the tensors' bytes kept)."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


def _set(key, value):
    return lambda header: header["__metadata__"].__setitem__(key, value)


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0x01])


DAMAGE = {
    "empty": lambda b: b"",
    "truncated in the length": lambda b: b[:5],
    "truncated in the header": lambda b: b[:60],
    "truncated in the tensors": lambda b: b[:-7],
    "garbage": lambda b: bytes(range(256)) * 8,
    "a text file": lambda b: b'{"step": 1}\n',
    "header not UTF-8": lambda b: (8).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc{}  ",
    "header not JSON": lambda b: (8).to_bytes(8, "little") + b"{step: 1",
    "header a list": lambda b: (8).to_bytes(8, "little") + b"[1, 2] ",
    "foreign safetensors": lambda b: safetensors_torch.save({"w": torch.ones(2)}),
    "foreign with metadata": lambda b: safetensors_torch.save({"w": torch.ones(2)}, metadata={"format": "pt"}),
    "another format version": lambda b: _rewrite(b, _set(ckpt.FORMAT_KEY, "99")),
    "metadata not JSON": lambda b: _rewrite(b, _set(ckpt.METADATA_KEY, '{"step": ')),
    "metadata a list": lambda b: _rewrite(b, _set(ckpt.METADATA_KEY, "[1, 2]")),
    "aliases missing": lambda b: _rewrite(b, lambda h: h["__metadata__"].pop(ckpt.ALIASES_KEY)),
    "alias of nothing": lambda b: _rewrite(b, _set(ckpt.ALIASES_KEY, '{"bias2": "nope"}')),
    "keys not a list": lambda b: _rewrite(b, _set(ckpt.KEYS_KEY, '{"weight": 1}')),
    "a key without tensor": lambda b: _rewrite(b, _set(ckpt.KEYS_KEY, '["weight", "bias", "scale"]')),
    "unknown dtype": lambda b: _rewrite(b, lambda h: h["weight"].__setitem__("dtype", "F99")),
    "offsets past the end": lambda b: _rewrite(b, lambda h: h["bias"].__setitem__("data_offsets", [0, 10**6])),
    "a flipped bit in the tensors": _flip_last_byte,
    "weights renamed": lambda b: _rewrite(b, lambda h: h.__setitem__("bias2", h.pop("bias"))),
}


@pytest.mark.parametrize("damage", ["intact", *DAMAGE])
def test_damaged_and_foreign_files_are_refused_naming_the_file(tmp_path, damage):
    net = nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "m", net, {"step": 1})
    if damage == "intact":  # negative control: the undamaged file loads
        assert load_checkpoint(path)[1] == {"step": 1}
        return
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(InflateError) as refused:
        load_checkpoint(tmp_path / "m")
    assert f"checkpoint {path}: expected " in str(refused.value)


def test_a_missing_file_and_the_old_two_file_format_are_refused(tmp_path):
    with pytest.raises(InflateError, match=r"checkpoint: expected a file .*missing\.safetensors, found none"):
        load_checkpoint(tmp_path / "missing")
    # the earlier development format: plain safetensors weights + a JSON sidecar with their hash
    (tmp_path / "old.safetensors").write_bytes(safetensors_torch.save(nn.Linear(2, 2).state_dict()))
    (tmp_path / "old.json").write_text('{"num_inputs": 2, "sha256": "..."}')
    with pytest.raises(InflateError, match=r"old\.safetensors: .*two-file format .* save the model again"):
        load_checkpoint(tmp_path / "old")


# --- tied weights -------------------------------------------------------------------------------


class Tied(nn.Module):
    """An encoder and a decoder sharing one weight Parameter, and a buffer viewing part of it."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.encoder = nn.Linear(4, 4, bias=False)
        self.decoder = nn.Linear(4, 4)
        if tie:
            self.decoder.weight = self.encoder.weight
        self.register_buffer("first_row", self.encoder.weight.detach()[0])


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    with pytest.raises(RuntimeError, match="share memory"):  # what safetensors alone does with it
        safetensors_torch.save(model.state_dict())
    path = save_checkpoint(tmp_path / "m", model, {})
    stored = safetensors_torch.load(path.read_bytes())
    assert sorted(stored) == ["decoder.bias", "encoder.weight", "first_row"]  # the tied weight once
    state, _ = load_checkpoint(path)
    assert list(state) == list(model.state_dict())
    assert state["decoder.weight"] is state["encoder.weight"]
    assert _bitwise_equal(state["decoder.weight"], model.encoder.weight.detach())
    assert _bitwise_equal(state["first_row"], model.encoder.weight.detach()[0])

    torch.manual_seed(1)
    tied = Tied()  # other values; loading ties nothing new and unties nothing
    tied.load_state_dict(state)
    assert tied.decoder.weight is tied.encoder.weight
    assert _bitwise_equal(tied.encoder.weight.detach(), model.encoder.weight.detach())
    untied = Tied(tie=False)
    untied.load_state_dict(state)
    assert _bitwise_equal(untied.decoder.weight.detach(), model.encoder.weight.detach())
    assert _bitwise_equal(untied.encoder.weight.detach(), model.encoder.weight.detach())
    # negative control: an untied model stores both weights
    assert sorted(safetensors_torch.load(save_checkpoint(tmp_path / "u", untied, {}).read_bytes())) == [
        "decoder.bias", "decoder.weight", "encoder.weight", "first_row"]
