"""Sweep a model registry with the zoo check, one process per model, resumable.

    python -m tests.zoo_sweep timm --out runs/timm.jsonl [--min-params 2e8] [--max-params 1.2e9]
                                   [--interleave 8] [--timeout 1800]

Each model is checked by :func:`tests.zoo.outcome` in its own process: a model that runs out of
memory or time is recorded (``crashed``, ``timeout``) and the sweep goes on. One JSON line per
model is appended to ``--out`` (name, parameters, outcome, seconds, peak memory in GiB: the
process's resident set, or the GPU's under ``INFLATE_ZOO_DEVICE=cuda``); models already there
are skipped, so an interrupted sweep resumes where it stopped. ``--interleave k`` takes every
k-th name, then the next k-th...: any prefix of the sweep is a uniform sample of the registry.
Parameter counts are taken on the meta device and cached in ``<out>.counts.json``. The
environment variables of :mod:`tests.test_zoo` apply (``INFLATE_ZOO_MAX_PARAMS``,
``INFLATE_ZOO_MAX_PARAMS32``, ``INFLATE_ZOO_DEVICE``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path


def _registry(name: str):
    """(names, build) of a registry: ``timm`` or ``torchvision``."""
    from . import test_zoo

    if name == "timm":
        import timm

        return timm.list_models(), test_zoo._timm_build
    import torchvision

    return torchvision.models.list_models(module=torchvision.models), test_zoo._torchvision_build


def count(registry: str, name: str) -> int | None:
    """Parameters of a model built on the meta device (None if it cannot be built there)."""
    from . import zoo

    if registry == "timm":
        import timm

        return zoo.meta_count(lambda: timm.create_model(name))
    import torchvision

    return zoo.meta_count(lambda: torchvision.models.get_model(name, weights=None))


def one(registry: str, name: str) -> dict[str, object]:
    """Check one model in this process; what it prints is its JSON line."""
    import torch

    from . import zoo

    warnings.filterwarnings("ignore")
    started = time.time()
    result = zoo.outcome(lambda: _registry(registry)[1](name))
    if os.environ.get("INFLATE_ZOO_DEVICE", "cpu").startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"name": name, "outcome": result, "seconds": round(time.time() - started, 1), "peak_gib": round(peak, 1)}


def _order(names: list[str], interleave: int) -> list[str]:
    return [n for k in range(interleave) for n in names[k::interleave]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.zoo_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("registry", choices=["timm", "torchvision"])
    parser.add_argument("--out", type=Path, help="JSON lines to append to (and resume from)")
    parser.add_argument("--min-params", type=float, default=0, help="only models with more parameters than this")
    parser.add_argument("--max-params", type=float, default=float("inf"), help="only models with at most this many")
    parser.add_argument("--interleave", type=int, default=1, help="every k-th name first (a uniform sample)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one model may take")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: check this model, print its line
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.registry, args.one)), flush=True)
        return 0
    if args.out is None:
        parser.error("--out: expected a file to append the results to, got none")
    names = _registry(args.registry)[0]
    cache = args.out.with_suffix(".counts.json")
    counts = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [n for n in names if n not in counts]
    for name in missing:
        counts[name] = count(args.registry, name)
    if missing:
        cache.write_text(json.dumps(counts))
    done = {json.loads(line)["name"] for line in args.out.read_text().splitlines()} if args.out.exists() else set()
    todo = [n for n in _order(names, args.interleave) if n not in done
            and args.min_params < (counts[n] or 0) <= args.max_params]
    print(f"{len(todo)} to check ({len(done)} already in {args.out})", flush=True)
    for name in todo:
        started = time.time()
        try:
            child = subprocess.run([sys.executable, "-m", "tests.zoo_sweep", args.registry, "--one", name],
                                   capture_output=True, text=True, timeout=args.timeout, check=False)
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if child.returncode == 0 and lines else {
                "name": name, "outcome": f"crashed: exit status {child.returncode}: {child.stderr.strip()[-200:]}"}
        except subprocess.TimeoutExpired:
            row = {"name": name, "outcome": f"timeout: over {args.timeout:.0f} s"}
        row = {"registry": args.registry, "params": counts[name], **row,
               "seconds": row.get("seconds", round(time.time() - started, 1))}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:50s} {row['outcome']} ({row['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
