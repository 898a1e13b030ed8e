"""What we check in a safetensors file or index before `safetensors.safe_open` reads it.

Format (https://github.com/huggingface/safetensors, "Format"):

    [8 bytes]  n, the header length, unsigned little-endian
    [n bytes]  JSON: {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
                                                          "data_offsets": [begin, end]}, ...}
    [rest]     the data section; each tensor's bytes at [begin, end) of it, little-endian, row-major

Why a pre-check when `safe_open` validates the header itself: safe_open refuses the same files (header size
limit, truncation, bad JSON, byte count versus shape x dtype, gaps, overlaps, trailing bytes, unknown dtype
codes), but its messages name neither the file nor the tensor, and it silently keeps the last of two
duplicate names. Reading only the header (a few KB) costs nothing next to the data, so every bound is checked
here first and a bad file raises `CheckpointError` with a sentence naming file and tensor; safe_open's own
checks stay behind it as a second line.

An index (`*.index.json`, safetensors or `pytorch_model.bin`) is checked for the same reasons: its weight_map must
map names to plain file names of the same directory (no directory part, no `..`, not absolute, no symlink that
resolves elsewhere), so an index cannot point outside it. The JSON of both is read by `easymamba.jsonio.loads`:
duplicate keys, nesting deeper than its bound and bytes that are not UTF-8 are a `CheckpointError` naming the
file. Sizes are Python ints, so a shape whose element count overflows int64 cannot pass as a small one.
"""

import dataclasses
import math
import os
import pathlib
import re
import struct
import sys

import ml_dtypes
import numpy as np

from easymamba import jsonio
from easymamba.checkpoints.errors import CheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit

# safetensors dtype code -> numpy dtype (explicitly little-endian where numpy has a byte order). The float8
# codes are known, so a float8 weight is refused as an unsupported weight dtype rather than an unreadable file;
# safe_open's numpy side cannot hand them out, and nothing here reads them.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in DTYPES.items()}

if sys.byteorder != "little":  # the data section is little-endian; ml_dtypes has no byte-swapped forms
    raise ImportError("easymamba.checkpoints needs a little-endian host")


def dtype_code(dtype) -> str:
    """The safetensors code ("F32", "BF16", ...) of a numpy / ml_dtypes / jax dtype."""
    code = _CODES.get(np.dtype(dtype).newbyteorder("="))
    if code is None:
        raise ValueError(f"dtype {np.dtype(dtype)} has no safetensors code")
    return code


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                  # safetensors code
    shape: tuple[int, ...]
    begin: int                  # byte offsets in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _corrupt(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid safetensors file: {what}")


def load_json(raw: bytes, path) -> object:
    """The JSON of checkpoint file `path` (`easymamba.jsonio.loads`: duplicate keys, deep nesting and bad UTF-8
    refused), every fault a `CheckpointError` naming the file."""
    return jsonio.loads(raw, str(path), CheckpointError)


def _int_list(value, length: int | None = None) -> bool:
    """Whether `value` is a list of non-negative ints (of `length` items when given)."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def read_header(path: "str | os.PathLike") -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """(metadata, tensors by name in file order) of a safetensors file, every bound checked."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {n} is larger than the format's limit of {MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated: its header needs {n} bytes but the file has only "
                                  f"{size - 8} after the length field")
        raw = f.read(n)
    try:
        header = jsonio.loads(raw, "the header", CheckpointError)
    except CheckpointError as exc:
        raise _corrupt(path, str(exc)) from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _corrupt(path, f"tensor {name}: entry must hold dtype, shape and data_offsets, got {entry!r}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise CheckpointError(f"tensor {name} in {path} has dtype {code!r}, which easymamba cannot read "
                                  f"(known: {', '.join(DTYPES)})")
        if not _int_list(shape) or not _int_list(offsets, 2) or offsets[0] > offsets[1]:
            raise _corrupt(path, f"tensor {name}: shape {shape!r} must be a list of non-negative ints and "
                                 f"data_offsets {offsets!r} a pair [begin, end] of them with begin <= end")
        if any(axis >= 2**63 for axis in shape):
            raise _corrupt(path, f"tensor {name}: shape {list(shape)} has an axis beyond int64 (expected sizes "
                                 "below 2**63)")
        info = TensorInfo(name, code, tuple(shape), offsets[0], offsets[1])
        want = math.prod(info.shape) * DTYPES[code].itemsize  # Python ints: no int64 wrap-around
        if info.nbytes != want:
            raise _corrupt(path, f"tensor {name}: data_offsets {offsets} span {info.nbytes} bytes but shape "
                                 f"{list(shape)} of {code} needs {want}")
        if info.end > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {name} needs bytes [{info.begin}, {info.end}) "
                                  f"of the data section, which holds only {data_size} bytes")
        tensors[name] = info

    # The tensors must tile the data section with no gap or overlap, as the reference requires.
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != cursor:
            what = "overlaps the tensor before it" if info.begin < cursor else f"starts after a gap at {cursor}"
            raise _corrupt(path, f"tensor {info.name} at data offset {info.begin} {what}")
        cursor = info.end
    if cursor != data_size:
        raise _corrupt(path, f"{data_size - cursor} bytes follow the last tensor's data (expected none)")
    return metadata, tensors


def _resolves_inside(path: pathlib.Path, directory: pathlib.Path) -> bool:
    """Whether `path` (symlinks followed) lies inside `directory`, or, for a Hugging Face hub cache snapshot
    (`.../models--org--name/snapshots/<rev>/`, whose files are links to `../../blobs/<hash>`), inside its
    repository folder's `blobs/`."""
    real, home = path.resolve(), directory.resolve()
    if real.is_relative_to(home):
        return True
    repo = home.parent.parent
    return home.parent.name == "snapshots" and real.is_relative_to(repo / "blobs")


def read_index(index: pathlib.Path, what: str = "safetensors index") -> dict[str, list[str]]:
    """{shard file: [tensor names]} of a `*.index.json`, in first-seen order; every shard a plain file name (no
    directory part, no `..`, not absolute) of a file inside the index's own directory (a symlink must resolve
    inside it too, or into a hub cache's blobs/). Anything else is a `CheckpointError` naming the entry."""
    try:
        weight_map = load_json(index.read_bytes(), index)["weight_map"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a {what} (JSON with a weight_map): {exc!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        if pathlib.PurePath(shard).name != shard or shard in ("", ".", "..") or "\\" in shard or "\0" in shard:
            raise CheckpointError(f"{index} names shard {shard!r} (for tensor {names[0]}{more}), which is not a plain "
                                  f"file name: every shard must be a file in {index.parent} itself")
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index} names shard {shard} (for tensor {names[0]}{more}) but "
                                  f"{index.parent} has no such file")
        if not _resolves_inside(path, index.parent):
            raise CheckpointError(f"{index} names shard {shard} (for tensor {names[0]}{more}), a link to "
                                  f"{path.resolve()}, outside {index.parent}: every shard must be inside the "
                                  "checkpoint directory")
    return by_shard


__all__ = ["DTYPES", "MAX_HEADER_BYTES", "SAFE_WEIGHTS_INDEX_NAME", "SAFE_WEIGHTS_NAME", "SHARD_RE", "TensorInfo",
           "dtype_code", "load_json", "read_header", "read_index"]
