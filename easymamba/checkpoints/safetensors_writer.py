"""Writing safetensors one tensor at a time, sharded as transformers shards.

Why not `safetensors.numpy.save_file`: it takes every tensor of a file as one in-memory dict, so a 5 GB shard
would be whole on the host, gathered from the devices, before its first byte is written. Here a tensor is a
(name, shape, dtype, producer) entry: offsets come from shapes, so the header is written first and each
tensor's bytes are produced (fetched from the devices) and written one at a time. The header follows the
format exactly (padded with spaces to 8 bytes, as the reference writes it); `safe_open` reads the result
(tests/test_hf_io.py, tests/test_convert_cli.py). Files are written to a temporary name and renamed into
place, so a crash never leaves a half-written file under a real name.

Sharding follows transformers: tensors are packed in order into shards of at most `max_shard_size` bytes
(a tensor larger than that gets a shard of its own), named `model-00001-of-0000N.safetensors`, with a
`model.safetensors.index.json` holding `{"metadata": {"total_size": ...}, "weight_map": {name: file}}`.
Sizes such as "5GB" are decimal (5 * 10**9), "5GiB" binary, as in transformers.
"""

import dataclasses
import json
import os
import pathlib
import re
import struct
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from easymamba.checkpoints.safetensors_format import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, SHARD_RE, dtype_code


@dataclasses.dataclass(frozen=True)
class TensorToWrite:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]   # called once, when the tensor's bytes are written

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: "int | str") -> int:
    """Bytes in `size`: an int, or a string such as "5GB" (5 * 10**9), "500MiB", "10MB", "2048"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"max_shard_size ({size!r}) must be a byte count such as 5GB, 500MiB, 10MB or 4096")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(f"max_shard_size must be an int or a string, not {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"max_shard_size ({size!r}) must be positive")
    return value


def _header_bytes(entries: Sequence[TensorToWrite], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": dtype_code(e.dtype), "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_file(path: "str | os.PathLike", entries: Sequence[TensorToWrite], *,
               metadata: Mapping[str, str] | None = None,
               on_tensor: Callable[[str], None] | None = None) -> pathlib.Path:
    """Write one safetensors file, producing each tensor only when its bytes are due."""
    path = pathlib.Path(path)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names in {names}")
    header = _header_bytes(entries, metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for e in entries:
                arr = np.asarray(e.produce())
                if tuple(arr.shape) != tuple(e.shape) or arr.dtype.newbyteorder("=") != np.dtype(e.dtype):
                    raise ValueError(f"tensor {e.name}: produced {arr.dtype}{list(arr.shape)}, declared "
                                     f"{np.dtype(e.dtype)}{list(e.shape)}")
                arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))  # the host is little-endian
                f.write(arr.reshape(-1).view(np.uint8).data)
                if on_tensor is not None:
                    on_tensor(e.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def plan_shards(entries: Sequence[TensorToWrite], max_shard_size: "int | str") -> list[list[TensorToWrite]]:
    """Pack entries, in order, into shards of at most `max_shard_size` bytes (transformers' greedy rule)."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorToWrite]] = [[]]
    used = 0
    for e in entries:
        if shards[-1] and used + e.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(e)
        used += e.nbytes
    return shards


def write_sharded(directory: "str | os.PathLike", entries: Sequence[TensorToWrite], *,
                  max_shard_size: "int | str" = "5GB", metadata: Mapping[str, str] | None = None,
                  on_tensor: Callable[[str], None] | None = None) -> list[pathlib.Path]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` when the tensors exceed
    `max_shard_size`; remove weight files of an earlier save that the new one does not use. Returns the
    files written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(entries, max_shard_size)
    written: list[pathlib.Path] = []
    if len(shards) == 1:
        written.append(write_file(directory / SAFE_WEIGHTS_NAME, shards[0], metadata=metadata,
                                  on_tensor=on_tensor))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            written.append(write_file(directory / name, shard, metadata=metadata, on_tensor=on_tensor))
            weight_map.update(dict.fromkeys((e.name for e in shard), name))
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        tmp = directory / f".{SAFE_WEIGHTS_INDEX_NAME}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, directory / SAFE_WEIGHTS_INDEX_NAME)
        written.append(directory / SAFE_WEIGHTS_INDEX_NAME)
    keep = {p.name for p in written}
    for p in directory.iterdir():  # a stale single file would shadow new shards (loaders prefer it)
        stale = p.name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or SHARD_RE.match(p.name)
        if stale and p.name not in keep:
            p.unlink()
    return written


__all__ = ["TensorToWrite", "parse_size", "plan_shards", "write_file", "write_sharded"]
