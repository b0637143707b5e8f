"""Checkpoints of inflated models: one safetensors file holding the weights and the metadata.

A checkpoint is one file, ``<path>.safetensors``. Its header (safetensors' text-only
``__metadata__``) holds, besides the tensors' layout, a format marker, your metadata as one
JSON string (whatever is needed to rebuild the model: architecture, ``num_inputs``,
``init``, policy, hyperparameters, metrics, ...), the state dict's keys in order, which of
them alias which (tied weights are stored once) and a SHA-256 of the tensors. The file is
written to a temporary name in the same folder, flushed to disk, and moved into place with
one ``os.replace``, so a reader or a crash sees either the previous checkpoint or the new
one, never a mix.
Needs the ``safetensors`` package (the ``examples`` extra), imported only when used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import InflateError
from ._tracer import unwrap

__all__ = ["save_checkpoint", "load_checkpoint"]

SUFFIX = ".safetensors"
FORMAT_KEY = "inflate.checkpoint"  # the format marker; its value is the format version
FORMAT_VERSION = "1"
METADATA_KEY = "inflate.metadata"  # the caller's metadata, as one JSON string
ALIASES_KEY = "inflate.aliases"  # JSON object: state-dict key -> the key whose tensor it shares
KEYS_KEY = "inflate.keys"  # JSON list: every state-dict key, in the state dict's order
SHA256_KEY = "inflate.sha256"  # of the stored tensors (names, dtypes, shapes and bytes)
TORCH_KEY = "inflate.torch"  # the torch version that wrote the file (informative)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems do not sync folders; the rename itself is done
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path``'s content with ``data`` in one step, durably.

    ``data`` goes to a new temporary file in the same folder (``.<name>.<random>.tmp``,
    created with the usual permissions), which is flushed and fsynced, then moved over
    ``path`` with one :func:`os.replace`, then the folder is fsynced. A reader opens either
    the old file or the new one; an error leaves ``path`` untouched and removes the
    temporary file; a kill can leave the temporary file behind, never a partial ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     target = _atomic_write(Path(d) / "sub" / "a.txt", b"one")
        ...     _ = _atomic_write(target, b"two")
        ...     print(target.read_bytes(), sorted(p.name for p in target.parent.iterdir()))
        b'two' ['a.txt']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # 0o666 & ~umask, like an ordinary write (mkstemp gives 0o600)
            break
        except FileExistsError:  # pragma: no cover - a 48-bit name collision
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file a path names: ``<path>.safetensors`` (a ``.safetensors`` or ``.json`` suffix is dropped)."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (SUFFIX, ".json") else base
    return base.with_name(base.name + SUFFIX)


def _check_json(value: Any, where: str, active: set[int]) -> None:
    """Refuse what JSON would not give back: non-str keys, NaN/infinity, non-JSON types, cycles."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InflateError(f"{where}: expected a finite float (JSON has no NaN or infinity), got {value}")
        return
    if isinstance(value, (dict, list, tuple)):
        if id(value) in active:
            raise InflateError(f"{where}: expected a tree of JSON values, got a reference cycle")
        active.add(id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InflateError(f"{where}: expected str keys, got {key!r} ({type(key).__name__})")
                _check_json(item, f"{where}[{key!r}]", active)
        else:
            for i, item in enumerate(value):
                _check_json(item, f"{where}[{i}]", active)
        active.discard(id(value))
        return
    raise InflateError(f"{where}: expected a JSON value (str, int, float, bool, None, list, tuple or dict), "
                       f"got {type(value).__name__}")


def _metadata_json(metadata: Any) -> str:
    if not isinstance(metadata, dict):
        raise InflateError(f"metadata: expected a dict with str keys and JSON-serializable values, "
                           f"got {type(metadata).__name__}")
    _check_json(metadata, "metadata", set())
    return json.dumps(metadata, allow_nan=False, sort_keys=True, separators=(",", ":"))


def _storage(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Where ``t``'s memory is (None for tensors without memory of their own: empty or meta)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr())


def _dedup(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU tensors safetensors accepts, and ``{alias: canonical key}`` for the tied ones.

    Keys that are the same view of the same memory (tied weights) are stored once, under
    the first key; other tensors that share memory (a view of part of another) are copied.
    """
    seen: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    users: dict[tuple[Any, ...], int] = {}
    kept: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.device.type == "meta":
            got = (type(value).__name__ if not isinstance(value, torch.Tensor)
                   else "a tensor on the meta device (no data)" if value.device.type == "meta"
                   else f"a {value.layout} tensor")
            raise InflateError(f"state dict {key!r}: expected a dense tensor with data, got {got}")
        value = value.detach()
        where = _storage(value)
        if where is not None:
            view = (*where, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
            if view in seen:
                aliases[key] = seen[view]
                continue
            seen[view] = key
            users[where] = users.get(where, 0) + 1
        kept[key] = value
    out = {}
    for key, value in kept.items():
        where = _storage(value)
        copy = value.cpu().contiguous()
        if where is not None and users[where] > 1 and _storage(copy) == where:
            copy = copy.clone()  # still the memory of another stored tensor
        out[key] = copy
    return out, aliases


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s state dict and ``metadata`` to one file, atomically.

    The file is ``<path>.safetensors``: the tensors (parameters and buffers, on the CPU)
    and, in the header, ``metadata`` as JSON, which keys are tied and a SHA-256 of the
    tensors. It is written to a temporary file in the same folder, fsynced, and moved into
    place with one :func:`os.replace`: a reader, a crash or an error sees the previous
    checkpoint or the new one, never a mix. Everything is checked before anything is
    written, so a refused save leaves the previous checkpoint byte for byte.

    Tied weights (two state-dict keys for one tensor, e.g. shared embeddings) are stored
    once; :func:`load_checkpoint` gives both keys the same tensor back.

    Args:
        path: the checkpoint, with or without the ``.safetensors`` suffix.
        model: the model (DataParallel/DDP/``torch.compile`` wrappers are looked through).
        metadata: what is needed to rebuild it: a dict with str keys whose values JSON
            holds exactly (str, int, finite float, bool, None, lists, str-keyed dicts;
            tuples come back as lists).

    Returns:
        The path of the checkpoint file.

    Raises:
        InflateError: metadata that is not such a dict, or a state-dict entry that is not a
            dense tensor with data; nothing is written.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> net = nn.Conv2d(6, 4, 3)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     print(save_checkpoint(f"{d}/ckpt", net, {"num_inputs": 2, "init": "zero"}).name)
        ...     state, meta = load_checkpoint(f"{d}/ckpt")
        ckpt.safetensors
        >>> meta, tuple(state["weight"].shape)
        ({'init': 'zero', 'num_inputs': 2}, (4, 6, 3, 3))
    """
    from safetensors.torch import save

    text = _metadata_json(metadata)
    state = unwrap(model).state_dict()
    tensors, aliases = _dedup(state)
    header = {FORMAT_KEY: FORMAT_VERSION, METADATA_KEY: text, ALIASES_KEY: json.dumps(aliases, sort_keys=True),
              KEYS_KEY: json.dumps(list(state)), SHA256_KEY: _digest(tensors), TORCH_KEY: torch.__version__}
    return _atomic_write(_file(path), save(tensors, metadata=header))


def _header(file: Path, blob: bytes) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file, or InflateError."""
    what = "a safetensors file (an 8-byte little-endian header length, a JSON header, the tensors)"
    if len(blob) < 8:
        raise InflateError(f"checkpoint {file}: expected {what}, got {len(blob)} bytes")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise InflateError(f"checkpoint {file}: expected {what}, got a header length of {size} bytes "
                           f"in a file of {len(blob)} bytes (truncated or not safetensors)")
    try:
        header = json.loads(blob[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise InflateError(f"checkpoint {file}: expected {what}, got a header that is not UTF-8 JSON "
                           f"({error})") from error
    if not isinstance(header, dict):
        raise InflateError(f"checkpoint {file}: expected {what}, got a {type(header).__name__} as header")
    return header


def _json_field(file: Path, fields: dict[str, Any], key: str, expected: type) -> Any:
    try:
        value = json.loads(fields.get(key))
    except (TypeError, ValueError) as error:
        raise InflateError(f"checkpoint {file}: expected JSON in header field {key!r}, got "
                           f"{str(fields.get(key))[:80]!r} ({error})") from error
    if not isinstance(value, expected) or not all(isinstance(k, str) for k in value):
        raise InflateError(f"checkpoint {file}: expected a JSON {expected.__name__} of str in header field "
                           f"{key!r}, got {type(value).__name__}")
    return value


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The file is read once (it is never seen half-written, even while another process
    saves over it), its format marker and SHA-256 are checked, and tied keys get their
    shared tensor back: :meth:`~torch.nn.Module.load_state_dict` then fills both names, and
    a model that ties them stays tied.

    Args:
        path: the checkpoint, with or without the ``.safetensors`` suffix.

    Returns:
        ``(state_dict, metadata)``: CPU tensors by state-dict key, in the saved state
        dict's order, and the metadata given to :func:`save_checkpoint`.

    Raises:
        InflateError: a missing file, or one that is not such a checkpoint: truncated,
            damaged (the SHA-256 differs), not safetensors, a safetensors file from
            elsewhere, or the two-file format (``.safetensors`` + ``.json``) of earlier
            development versions, which is not read. The message names the file.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> from inflate import inflate_first_conv
        >>> wide = inflate_first_conv(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, init="zero")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_checkpoint(f"{d}/m", wide, {"num_inputs": 2, "init": "zero"})
        ...     state, meta = load_checkpoint(f"{d}/m.safetensors")
        >>> rebuilt = inflate_first_conv(nn.Sequential(nn.Conv2d(3, 4, 3)), meta["num_inputs"], init=meta["init"])
        >>> rebuilt.load_state_dict(state)
        <All keys matched successfully>
    """
    from safetensors.torch import load

    file = _file(path)
    try:
        blob = file.read_bytes()
    except FileNotFoundError:
        raise InflateError(f"checkpoint: expected a file {file}, found none") from None
    fields = _header(file, blob).get("__metadata__")
    if not isinstance(fields, dict) or FORMAT_KEY not in fields:
        got = ("one without metadata" if not isinstance(fields, dict)
               else f"one whose metadata has the keys {sorted(fields)}")
        sidecar = file.with_suffix(".json")
        hint = (f"; with {sidecar.name} next to it, it looks like the two-file format of earlier development "
                "versions, which is not read: save the model again") if sidecar.exists() else ""
        raise InflateError(f"checkpoint {file}: expected a safetensors file written by save_checkpoint (header "
                           f"metadata key {FORMAT_KEY!r}), got {got}{hint}")
    if fields[FORMAT_KEY] != FORMAT_VERSION:
        raise InflateError(f"checkpoint {file}: expected format version {FORMAT_VERSION}, "
                           f"got {fields[FORMAT_KEY]!r} (written by another version of inflate?)")
    metadata = _json_field(file, fields, METADATA_KEY, dict)
    aliases = _json_field(file, fields, ALIASES_KEY, dict)
    keys = _json_field(file, fields, KEYS_KEY, list)
    try:
        state = load(blob)
    except Exception as error:  # safetensors' own errors (SafetensorError, ValueError, ...) on a damaged file
        raise InflateError(f"checkpoint {file}: expected readable tensors, got {type(error).__name__}: {error}") \
            from error
    digest = _digest(state)
    if digest != fields.get(SHA256_KEY):
        raise InflateError(f"checkpoint {file}: expected tensors with sha256 {fields.get(SHA256_KEY)}, "
                           f"got {digest} (the file is damaged)")
    for alias, key in aliases.items():
        if not isinstance(key, str) or key not in state or alias in state:
            raise InflateError(f"checkpoint {file}: expected {alias!r} to alias a stored tensor, got {key!r}")
        state[alias] = state[key]
    if sorted(keys) != sorted(state):
        missing, unlisted = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
        raise InflateError(f"checkpoint {file}: expected a tensor for each of the {len(keys)} keys in header field "
                           f"{KEYS_KEY!r}, got {len(state)} (missing: {missing[:5]}, not listed: {unlisted[:5]})")
    return {key: state[key] for key in keys}, metadata
