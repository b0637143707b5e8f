"""Peak extra memory of inflation, as a multiple of the widened layers' new weights.

Goal: ``inflate_first_conv(model, N)`` needs at most 2x the bytes of the widened
weights on top of the model (no copy of the model; discovery and the replay run on
the meta device).

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen call during
inflation and keeps a weak reference to each CPU storage it produces that the model
did not already own; after every call the storages still alive are summed, and the
largest sum is the peak. Deterministic: no timing, no process-wide memory counters.

Run: ``python benchmarks/inflation_memory.py``.
"""

from __future__ import annotations

import timm
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from _timing import table
from inflate import find_input_layers, inflate_first_conv

GOAL = 2.0
MODELS = ["resnet18", "convnext_tiny", "tf_efficientnet_lite0", "vit_base_patch16_224", "vit_large_patch16_224"]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the CPU storages made during the mode that are alive at once."""

    def __init__(self, owned: set[int]) -> None:
        super().__init__()
        self.owned = owned  # storages of the model as it was: not extra
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.owned and key not in self.alive:
                    self.alive[key] = (StorageWeakRef(storage), storage.nbytes())
        self.alive = {k: v for k, v in self.alive.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


def measure(name: str, num_inputs: int) -> tuple[int, int]:
    """(bytes of the widened weights, peak extra bytes during inflation)."""
    model = timm.create_model(name)
    owned = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    names = find_input_layers(model)
    with LiveBytes(owned) as live:
        inflate_first_conv(model, num_inputs)
    widened = sum(model.get_submodule(n).weight.nbytes for n in names)
    return widened, live.peak


def main() -> None:
    rows = []
    for name in MODELS:
        for n in (2, 10):
            widened, peak = measure(name, n)
            ratio = peak / widened
            rows.append([name, n, f"{widened / 1e6:.3f}", f"{peak / 1e6:.3f}", f"{ratio:.2f}x",
                         "yes" if ratio <= GOAL else "no"])
    print(f"Peak extra memory of inflate_first_conv (torch {torch.__version__}, timm {timm.__version__}; "
          f"goal: <= {GOAL:g}x the widened weights)\n")
    print(table(["model", "N", "widened (MB)", "peak extra (MB)", "peak / widened", f"<= {GOAL:g}x"], rows))


if __name__ == "__main__":
    main()
