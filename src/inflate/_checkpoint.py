"""Checkpoints of inflated models: safetensors weights + JSON metadata, written atomically.

A checkpoint is two files, ``<path>.safetensors`` and ``<path>.json``. The JSON holds
whatever is needed to rebuild the model (architecture, ``num_inputs``, ``init``,
policy, hyperparameters, metrics, ...) and the weights' SHA-256, so a pair that was
not written together is detected. Each file is written to a temporary name and
renamed into place, so a crash leaves the previous checkpoint intact. Needs the
``safetensors`` package (the ``examples`` extra), imported only when used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import InflateError
from ._tracer import unwrap

__all__ = ["save_checkpoint", "load_checkpoint"]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".safetensors", ".json") else base
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s state dict and ``metadata`` (JSON-serializable) atomically.

    Weights first, metadata last: the metadata names the weights' hash, so a reader
    never pairs new metadata with old weights.

    Args:
        path: base path; ``.safetensors`` and ``.json`` are appended.
        model: the model (wrappers are looked through).
        metadata: what is needed to rebuild it.

    Returns:
        The path of the metadata file.

    Raises:
        InflateError: metadata that is not JSON-serializable (nothing is written).

    Example:
        >>> import tempfile, torch.nn as nn
        >>> net = nn.Conv2d(6, 4, 3)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_checkpoint(f"{d}/ckpt", net, {"num_inputs": 2, "init": "zero"})
        ...     state, meta = load_checkpoint(f"{d}/ckpt")
        >>> meta["num_inputs"], tuple(state["weight"].shape)
        (2, (4, 6, 3, 3))
    """
    from safetensors.torch import save

    try:
        json.dumps(metadata)
    except TypeError as error:
        raise InflateError(f"metadata: expected JSON-serializable values, got {error}") from error
    weights, meta = _paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    blob = save(state)
    _atomic_write(weights, blob)
    record = {**metadata, "weights": weights.name, "sha256": hashlib.sha256(blob).hexdigest(),
              "torch": torch.__version__}
    _atomic_write(meta, json.dumps(record, indent=2, sort_keys=True).encode())
    return meta


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(state_dict, metadata)``.

    Raises:
        InflateError: a missing file, or weights whose hash differs from the metadata's.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> from inflate import inflate_first_conv
        >>> wide = inflate_first_conv(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, init="zero")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_checkpoint(f"{d}/m", wide, {"num_inputs": 2, "init": "zero"})
        ...     state, meta = load_checkpoint(f"{d}/m")
        >>> rebuilt = inflate_first_conv(nn.Sequential(nn.Conv2d(3, 4, 3)), meta["num_inputs"], init=meta["init"])
        >>> rebuilt.load_state_dict(state)
        <All keys matched successfully>
    """
    from safetensors.torch import load

    weights, meta = _paths(path)
    if not weights.exists() or not meta.exists():
        raise InflateError(f"checkpoint: expected {weights} and {meta}, found "
                           f"{[p.name for p in (weights, meta) if p.exists()] or 'neither'}")
    record = json.loads(meta.read_text())
    blob = weights.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != record.get("sha256"):
        raise InflateError(f"checkpoint {weights}: expected sha256 {record.get('sha256')}, got {digest} "
                           "(weights and metadata were not written together)")
    return load(blob), record
