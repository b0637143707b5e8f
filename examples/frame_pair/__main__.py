"""Command line: ``python -m examples.frame_pair <train|equivalence|sweep|evaluate|throughput> [--preset P] ...``.

Outputs go to one run folder (``--out``, default ``runs/frame_pair[_study][_smoke|_hour|_long]``):
``metrics.json``, PNG figures, and ``models/`` (one ``.safetensors`` file per stage, its metadata in
the file's header). Complete stages found there are reused; an interrupted one continues with
``--resume``. Under ``torchrun`` the training runs with DistributedDataParallel (gloo on CPU,
nccl on GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# torch and the example's modules are imported only after the arguments and the output folder
# are checked, so a bad command line fails at once, before anything heavy is loaded.
if TYPE_CHECKING:
    from . import config


def _int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: an int in ``[low, high]`` (no upper bound when ``high`` is None)."""
    expected = f"an int >= {low}" if high is None else f"an int from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    """An argparse ``type=``: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """``--out`` must be a folder, or creatable, and writable: create it and a temp file in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out, prefix=".write-check-")
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        reason = "an existing file" if out.is_file() else (error.strerror or type(error).__name__)
        parser.error(f"--out: expected a writable folder (existing or creatable), got {str(out)!r} ({reason})")


def _check_runs(parser: argparse.ArgumentParser, runs: list[Path]) -> None:
    """evaluate: every run folder must hold stored models."""
    for run in runs:
        if not run.is_dir():
            parser.error(f"evaluate: expected a run folder with models/*.safetensors, got {str(run)!r} "
                         "(no such folder)")
        if not any((run / "models").glob("*.safetensors")):
            parser.error(f"evaluate: expected a run folder with models/*.safetensors, got {str(run)!r} "
                         "(no stored models)")


def _args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; a bad one exits with status 2 and a one-line error.

    For train, equivalence and sweep the output folder is created (if missing) and checked
    for writing; for evaluate the run folders must hold stored models. Nothing is trained here.
    """
    parser = argparse.ArgumentParser(prog="python -m examples.frame_pair", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["train", "equivalence", "sweep", "evaluate", "throughput"])
    parser.add_argument("runs", nargs="*", help="evaluate only: run folders to compare (default: --out)")
    parser.add_argument("--out", help="run folder (default runs/frame_pair, with _study, _smoke, _hour or _long appended "
                        "for those settings, so their stored models never mix)")
    parser.add_argument("--preset", choices=["smoke", "demo", "hour", "long"], default=None,
                        help="demo (default): 2 CPU cores, minutes; hour: 2 CPU cores, about an hour; "
                        "long: a GPU machine, hours; smoke: seconds")
    parser.add_argument("--smoke", action="store_true", help="the same as --preset smoke")
    parser.add_argument("--resolution", choices=["preset", "coords", "study"], default="preset",
                        help="model input size: the preset's (default), coords 360x640, or study 120x240")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted stage")
    parser.add_argument("--steps", type=_int(1), help="steps of each compared stage (single, pair, frames<many>)")
    parser.add_argument("--base-steps", type=_int(1), help="steps of the single-frame model's stage")
    parser.add_argument("--input-lr", type=_positive, help="the compared stages' input layer learning rate, as a "
                        "multiple of the others' (default 30, which shortens the pair's plateau about 4x; 1: one rate)")
    parser.add_argument("--videos", type=_int(1), help="training photos used (the first ones)")
    parser.add_argument("--frames", type=_int(2), help="frames per video")
    parser.add_argument("--many", type=_int(2), help="inputs of the scale-up stage (about ten)")
    parser.add_argument("--minutes", type=_int(1), help="throughput only: the training time to size the preset to")
    args = parser.parse_intermixed_args(argv)  # run folders may come after options
    if args.smoke and args.preset not in (None, "smoke"):
        parser.error(f"--smoke: expected no other --preset, got --preset {args.preset}")
    args.preset = "smoke" if args.smoke else args.preset or "demo"
    args.out = args.out or "runs/frame_pair" + ("_study" if args.resolution == "study" else "") + (
        "" if args.preset == "demo" else f"_{args.preset}")
    if args.command == "evaluate":
        _check_runs(parser, [Path(r) for r in args.runs] or [Path(args.out)])
        return args
    if args.minutes is not None and args.command != "throughput":
        parser.error(f"--minutes: expected only with throughput, got it with {args.command}")
    if args.runs:
        parser.error(f"{args.command}: expected no run folders (only evaluate takes them; use --out), "
                     f"got {' '.join(args.runs)!r}")
    from .config import TRAIN_PHOTOS

    cfg = _config(args)
    if cfg.videos > len(TRAIN_PHOTOS):
        parser.error(f"--videos: expected an int from 1 to {len(TRAIN_PHOTOS)}, got {cfg.videos}")
    if cfg.many > cfg.frames:
        parser.error(f"--many: expected an int <= --frames ({cfg.frames}"
                     f"{'' if args.frames is not None else ', its default'}), got {cfg.many}")
    if args.command != "throughput":  # it writes nothing
        _check_out(parser, Path(args.out))
    return args


def _config(args: argparse.Namespace) -> config.RunConfig:
    from . import config

    size = {"preset": None, "coords": (360, 640), "study": config.STUDY_SIZE}[args.resolution]
    return config.make(args.out, args.preset, size=size, steps=args.steps, base_steps=args.base_steps,
                       videos=args.videos, frames=args.frames, many=args.many, input_lr=args.input_lr,
                       resume=args.resume or None)


def _table(rows: list[dict[str, object]], columns: list[str]) -> str:
    cells = [[f"{r[c]:.2f}" if isinstance(r[c], float) else "-" if r[c] is None else str(r[c]) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def train(cfg: config.RunConfig) -> dict[str, object]:
    """Train, evaluate and store (pipeline.run); write metrics.json and print the table."""
    from . import ddp, pipeline, store

    metrics = pipeline.run(cfg)
    if ddp.world()[0] == 0:
        store.write_json(cfg.out / "metrics.json", metrics)
        h, t, s = metrics["heldout"], metrics["train"], metrics["stereo"]
        rows = [{"method": name, "held-out EPE": h[name]["epe"], "held-out PSNR": h[name]["psnr"],
                 "train EPE": t[name]["epe"], "train PSNR": t[name]["psnr"],
                 "Middlebury EPE": s.get(name, {}).get("epe"), "Middlebury PSNR": s.get(name, {}).get("psnr")}
                for name in h]
        ddp.say(_table(rows, list(rows[0])))
        ddp.say(f"held-out: {', '.join(metrics['heldout_videos'])}; {metrics['seconds']:.0f} s")
    return metrics


def equivalence(cfg: config.RunConfig) -> dict[str, object]:
    from . import ddp, evaluate, pipeline, store, study

    single, _ = pipeline.single_frame_model(cfg)
    result = study.equivalence(cfg, single)
    if ddp.world()[0] == 0:
        store.write_json(cfg.out / "equivalence.json", result)
        curves = {k: {"steps": v} for k, v in result["curves"].items()}
        evaluate.learning_curves(cfg.out / "equivalence.png", curves, "last-layer fine-tuning, SGD lr 0.101 "
                                 "(epoch means)")
    ddp.say(f"control (repeat, no zeroing) loss: {result['repeat_control']:.6f}  |diff|: {result['control_diff']:.2g}")
    ddp.say(f"max |prediction difference| single vs two-input (zeroed): {result['max_prediction_diff']:.3g}")
    ddp.say(f"single-input loss: {result['single']:.6f}  two-input (zeroed) loss: {result['zeroed']:.6f}  "
            f"|diff|: {result['diff']:.2g}")
    return result


def sweep(cfg: config.RunConfig) -> list[dict[str, object]]:
    from . import ddp, evaluate, pipeline, store, study

    single, _ = pipeline.single_frame_model(cfg)
    results = study.sweep(cfg, single)
    if ddp.world()[0] == 0:
        store.write_json(cfg.out / "sweep.json", {"results": results})
        evaluate.learning_curves(cfg.out / "sweep_curves.png",
                                 {f"{r['policy']} lr={r['lr']} clip={r['clip']}": r for r in results},
                                 "two-frame fine-tuning sweep: loss per step (spikes in red)")
        ddp.say(_table([{**r, "lr": str(r["lr"]), "clip": str(r["clip"] or "-"), "final": f"{r['final']:.6f}",
                         "spikes": len(r["spikes"])} for r in results],
                       ["policy", "lr", "clip", "final", "spikes"]))
    return results


def throughput(cfg: config.RunConfig, minutes: int | None = None) -> list[dict[str, object]]:
    """Time a few steps of each stage here and project the preset's training time (and resize it)."""
    from . import pipeline
    from .throughput import measure

    rows = measure(cfg)
    print(_table(rows, list(rows[0])))
    total = sum(r["minutes"] for r in rows)
    print(f"{cfg.preset} preset on {pipeline.device()}: training about {total:.3g} min (evaluation not included)")
    if minutes is not None:
        scale = minutes / total
        print(f"to train in about {minutes} min: --steps {max(1, int(cfg.steps * scale))} "
              f"--base-steps {max(1, int(cfg.base_steps * scale))}")
    return rows


def evaluate(runs: list[Path]) -> dict[str, dict[str, float]]:
    """Rebuild the complete stored models of each run folder; score them on its held-out videos and
    the Middlebury pair (next to the identity map)."""
    from . import config, store
    from . import evaluate as scoring
    from .data import eval_targets, make_video, stereo_pair

    table, scores = [], {}
    pair = stereo_pair()
    for run in runs:
        models, cfg = {}, None
        for path in sorted((run / "models").glob("*.safetensors")):
            try:
                model, meta = store.load_model(path)
            except ValueError as error:
                print(f"skipped: {error}", file=sys.stderr)
                continue
            models[meta["stage"]] = (model, meta["num_inputs"])
            cfg = meta["run"]
        if cfg is None:
            continue
        size, frames = tuple(cfg["size"]), cfg["frames"]
        methods = scoring.methods(models, size, size)
        del methods["phase_correlation"], methods["tvl1"], methods["ilk"]
        targets = eval_targets(frames, cfg["eval_targets"])
        videos = [make_video(n, frames, 10_000 + i) for i, n in enumerate(config.HELDOUT_PHOTOS)]
        held, stereo = scoring.score_videos(videos, targets, methods), scoring.score_stereo(pair, methods)
        for name in methods:
            key = f"{run.name}/{name}"
            scores[key] = {"heldout_epe": held[name]["epe"], "heldout_psnr": held[name]["psnr"],
                           "stereo_epe": stereo.get(name, {}).get("epe"),
                           "stereo_psnr": stereo.get(name, {}).get("psnr")}
            table.append({"model": key, "inputs": models[name][1] if name in models else "-",
                          "size": f"{size[0]}x{size[1]}", **scores[key]})
    print(_table(table, ["model", "inputs", "size", "heldout_epe", "heldout_psnr", "stereo_epe", "stereo_psnr"]),
          flush=True)
    return scores


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from . import ddp

    ddp.start()
    cfg = _config(args)
    try:
        if args.command == "evaluate":
            evaluate([Path(r) for r in args.runs] or [cfg.out])
        elif args.command == "throughput":
            throughput(cfg, args.minutes)
        else:
            {"train": train, "equivalence": equivalence, "sweep": sweep}[args.command](cfg)
    finally:
        ddp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
