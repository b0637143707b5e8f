"""Command line: ``python -m examples.frame_pair <train|equivalence|sweep|evaluate> [--smoke] ...``.

Outputs go to one run folder (``--out``, default ``runs/frame_pair[_study][_smoke]``): ``metrics.json``,
PNG plots and pictures, and ``models/`` (one ``.safetensors`` file per stage, its metadata in the
file's header). Complete stages found there are reused; an interrupted one continues with
``--resume``. Under ``torchrun`` the training runs with DistributedDataParallel (gloo on CPU,
nccl on GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# torch and the example's modules are imported only after the arguments and the output folder
# are checked, so a bad command line fails at once, before anything heavy is loaded.
if TYPE_CHECKING:
    from . import pipeline


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
    parser.add_argument("command", choices=["train", "equivalence", "sweep", "evaluate"])
    parser.add_argument("runs", nargs="*", help="evaluate: run folders to compare (default: --out)")
    parser.add_argument("--out", help="run folder (default runs/frame_pair, with _study and/or _smoke "
                        "appended for those modes, so their stored models never mix)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and resolution: seconds, for tests")
    parser.add_argument("--resolution", choices=["coords", "study"], default="coords",
                        help="coords: inputs at the coordinate resolution 360x640 (default); study: 120x240")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted stage")
    parser.add_argument("--epochs", type=_int(1))
    parser.add_argument("--videos", type=_int(1))
    parser.add_argument("--frames", type=_int(2), help="frames per video")
    parser.add_argument("--many", type=_int(2), help="inputs of the scale-up stage (about ten)")
    args = parser.parse_args(argv)
    args.out = args.out or "runs/frame_pair" + ("_study" if args.resolution == "study" else "") + (
        "_smoke" if args.smoke else "")
    if args.command == "evaluate":
        _check_runs(parser, [Path(r) for r in args.runs] or [Path(args.out)])
        return args
    if any(v is not None for v in (args.videos, args.frames, args.many)):
        # overrides can conflict with each other or with the mode's defaults (the defaults agree)
        from .data import VIDEOS

        cfg = _config(args)
        if cfg.videos > len(VIDEOS):
            parser.error(f"--videos: expected an int from 1 to {len(VIDEOS)}, got {cfg.videos}")
        if cfg.many > cfg.frames:
            parser.error(f"--many: expected an int <= --frames ({cfg.frames}"
                         f"{'' if args.frames is not None else ', its default'}), got {cfg.many}")
    _check_out(parser, Path(args.out))
    return args


def _config(args: argparse.Namespace) -> pipeline.RunConfig:
    from . import pipeline

    return pipeline.RunConfig.make(args.out, args.smoke, args.resolution == "study", epochs=args.epochs,
                                   videos=args.videos, frames=args.frames, many=args.many, resume=args.resume)


def _say(*text: object) -> None:
    from .fit import world

    if world()[0] == 0:
        print(*text, flush=True)


def _table(rows: list[dict[str, object]], columns: list[str]) -> str:
    cells = [[f"{r[c]:.6f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def train(cfg: pipeline.RunConfig) -> dict[str, object]:
    """Single-frame model, inflated to 2 and to ``cfg.many`` frames, evaluated and stored."""
    from . import pipeline
    from .data import VIDEOS, make_video
    from .evaluate import learning_curves, pictures, score
    from .fit import world

    started = time.time()
    single, h1 = pipeline.single_stage(cfg)
    pair, h2 = pipeline.multi_stage(cfg, single, "pair", 2)
    many, h3 = pipeline.multi_stage(cfg, single, f"frames{cfg.many}", cfg.many)
    metrics: dict[str, object] = {"config": {k: str(v) for k, v in vars(cfg).items()},
                                  "train_loss": {"single": h1.epochs[-1], "pair": h2.epochs[-1],
                                                 f"frames{cfg.many}": h3.epochs[-1]}}
    if world()[0] == 0:
        videos = [make_video(n, cfg.frames, cfg.seed + i) for i, n in enumerate(VIDEOS[: cfg.videos])]
        models = {"single": (single, 1), "pair": (pair, 2), f"frames{cfg.many}": (many, cfg.many)}
        for model, _ in models.values():
            model.eval()
        evaluation = {"baselines": score(None, videos, 1, cfg.size)}
        evaluation.update({name: score(m, videos, n, cfg.size) for name, (m, n) in models.items()})
        metrics["evaluation"] = evaluation
        pictures(cfg.out / "reconstructions.png", models, videos[0], cfg.size)
        learning_curves(cfg.out / "learning_curves.png",
                        {name: {"steps": h.steps, "spikes": h.spikes} for name, h in
                         zip(models, (h1, h2, h3))}, "training loss per step (spikes in red)")
        rows = [{"model": "copy previous frame", "PSNR": evaluation["baselines"]["copy_prev_psnr"],
                 "SSIM": evaluation["baselines"]["copy_prev_ssim"], "EPE px": "-"},
                {"model": "identity map", "PSNR": evaluation["baselines"]["identity_psnr"],
                 "SSIM": evaluation["baselines"]["identity_ssim"], "EPE px": evaluation["baselines"]["identity_epe"]}]
        rows += [{"model": name, "PSNR": s["model_psnr"], "SSIM": s["model_ssim"], "EPE px": s["model_epe"]}
                 for name, s in evaluation.items() if name != "baselines"]
        _say(_table(rows, ["model", "PSNR", "SSIM", "EPE px"]))
    metrics["seconds"] = time.time() - started
    pipeline.write_json(cfg.out / "metrics.json", metrics)
    return metrics


def equivalence(cfg: pipeline.RunConfig) -> dict[str, object]:
    from . import pipeline
    from .evaluate import learning_curves
    from .fit import world

    single, _ = pipeline.single_stage(cfg)
    result = pipeline.equivalence(cfg, single)
    pipeline.write_json(cfg.out / "equivalence.json", result)
    if world()[0] == 0:
        curves = {k: {"steps": v} for k, v in result["curves"].items()}
        learning_curves(cfg.out / "equivalence.png", curves, "last-layer fine-tuning, SGD lr 0.101 (epoch means)")
    _say(f"control (repeat, no zeroing) loss: {result['repeat_control']:.6f}  |diff|: {result['control_diff']:.6f}")
    _say(f"max |prediction difference| single vs two-input (zeroed): {result['max_prediction_diff']:.3g}")
    _say(f"single-input loss: {result['single']:.6f}  two-input (zeroed) loss: {result['zeroed']:.6f}  "
         f"|diff|: {result['diff']:.2g}")
    return result


def sweep(cfg: pipeline.RunConfig) -> list[dict[str, object]]:
    from . import pipeline
    from .evaluate import learning_curves
    from .fit import world

    single, _ = pipeline.single_stage(cfg)
    results = pipeline.sweep(cfg, single)
    pipeline.write_json(cfg.out / "sweep.json", {"results": results})
    if world()[0] == 0:
        learning_curves(cfg.out / "sweep_curves.png",
                        {f"{r['policy']} lr={r['lr']} clip={r['clip']}": r for r in results},
                        "two-frame fine-tuning sweep: loss per step (spikes in red)")
        _say(_table([{**r, "spikes": len(r["spikes"])} for r in results], ["policy", "lr", "clip", "final", "spikes"]))
    return results


def evaluate(runs: list[Path]) -> dict[str, dict[str, float]]:
    """Load the stored models of each run folder and score them side by side."""
    from . import pipeline
    from .data import VIDEOS, make_video
    from .evaluate import score

    table = []
    scores: dict[str, dict[str, float]] = {}
    for run in runs:
        for path in sorted((run / "models").glob("*.safetensors")):
            model, meta = pipeline.load_model(path)
            model.eval()
            cfg = meta["run"]
            size = tuple(int(v) for v in cfg["size"].strip("()").split(","))
            videos = [make_video(n, int(cfg["frames"]), int(cfg["seed"]) + i)
                      for i, n in enumerate(VIDEOS[: int(cfg["videos"])])]
            s = score(model, videos, meta["num_inputs"], size)
            key = f"{run.name}/{meta['stage']}"
            scores[key] = s
            table.append({"model": key, "inputs": meta["num_inputs"], "size": f"{size[0]}x{size[1]}",
                          "train loss": meta["history"]["epochs"][-1], "PSNR": s["model_psnr"],
                          "SSIM": s["model_ssim"], "EPE px": s["model_epe"]})
    _say(_table(table, ["model", "inputs", "size", "train loss", "PSNR", "SSIM", "EPE px"]))
    return scores


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch
    import torch.distributed as dist

    from .fit import world

    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world()[1]))
    cfg = _config(args)
    try:
        if args.command == "evaluate":
            evaluate([Path(r) for r in args.runs] or [cfg.out])
        else:
            {"train": train, "equivalence": equivalence, "sweep": sweep}[args.command](cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
