"""What a run does: presets (``smoke`` for tests, ``demo`` for 2 CPU cores in minutes, ``hour`` for 2 CPU
cores in about an hour, ``long`` for a GPU) and overrides.

Imports neither torch nor the example's other modules, so the command line is checked fast.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

# Photos are split by name. Training: colour photos, and grayscale textures (tinted by the colour
# jitter). Held out: never seen in training.
TRAIN_PHOTOS = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
                "camera", "grass", "gravel", "brick", "moon")
HELDOUT_PHOTOS = ("coffee", "rocket")


@dataclass(frozen=True)
class RunConfig:
    """One run. Sizes are (height, width); every stage's targets are coordinates of the 360x640 space."""

    out: Path
    preset: str = "demo"
    size: tuple[int, int] = (48, 80)  # model input
    frames: int = 10  # frames per video
    many: int = 10  # inputs of the scale-up stage
    videos: int = len(TRAIN_PHOTOS)  # training photos used (the first ones)
    batch_size: int = 8
    base_steps: int = 60  # the single-frame model ("pretrained single-frame model")
    steps: int = 500  # each compared stage: single, pair, frames<many>
    lr: float = 3e-4  # Adam, all layers, every stage
    # the compared stages' input layer learns at this multiple of lr: its zero-inflated weights start
    # at zero and Adam moves them by about the rate per step (at 1x the pair learns after ~1000 steps)
    input_lr: float = 30.0
    save_every: int = 50
    eval_targets: int = 3  # target frames scored per evaluation video
    train_eval: int = 3  # training photos scored (new motions, centre crops)
    flow_size: tuple[int, int] = (360, 640)  # resolution the classical baselines run at
    study_batches: int = 9  # equivalence and sweep: a fixed set of this many batches ...
    study_epochs: int = 5  # ... seen this many times (the study overfits a fixed set)
    seed: int = 0
    resume: bool = False

    @property
    def training_photos(self) -> tuple[str, ...]:
        return TRAIN_PHOTOS[: self.videos]

    @property
    def train_videos(self) -> tuple[str, ...]:
        return self.training_photos[: self.train_eval]

    @property
    def heldout_videos(self) -> tuple[str, ...]:
        return HELDOUT_PHOTOS

    def to_json(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"size": (64, 112), "frames": 4, "many": 3, "videos": 3, "batch_size": 2, "base_steps": 2, "steps": 4,
              "save_every": 2, "eval_targets": 1, "train_eval": 1, "flow_size": (64, 112), "study_batches": 2,
              "study_epochs": 2},
    # small inputs: the pair leaves its plateau after 200 to 300 steps at 48x80 (72x128: 300 to 400),
    # and a step costs about as much (2 CPU threads: 0.15 s against 0.20 s; per-layer costs dominate)
    "demo": {},
    # larger inputs and many more steps
    "hour": {"size": (72, 128), "batch_size": 8, "base_steps": 100, "steps": 2500, "save_every": 250},
    # for a GPU machine: inputs at the coordinate resolution, larger batches, many more steps. The
    # classical baselines run on the CPU at about 4 s a frame pair: 9 targets on 2 held-out and 3
    # training photos are 45 pairs, about 3 minutes (all 11 training photos would be 8).
    "long": {"size": (360, 640), "batch_size": 16, "base_steps": 2000, "steps": 20000, "lr": 2e-4, "save_every": 500,
             "eval_targets": 9, "train_eval": 3, "study_batches": 9, "study_epochs": 20},
}
STUDY_SIZE = (120, 240)


def make(out: str | Path, preset: str = "demo", **overrides: Any) -> RunConfig:
    """The preset's configuration with the given overrides (None means: keep the preset's value)."""
    cfg = replace(RunConfig(Path(out), preset), **PRESETS[preset])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
