"""The safetensors file format, read and written with numpy only (no torch, no `safetensors` package).

Format (https://github.com/huggingface/safetensors, "Format"):

    [8 bytes]  n, the header length, unsigned little-endian
    [n bytes]  JSON: {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
                                                          "data_offsets": [begin, end]}, ...}
    [rest]     the data section; each tensor's bytes at [begin, end) of it, little-endian, row-major

Choices:
- Reading memory-maps the file (`numpy.memmap`) and hands out one tensor at a time, so a loader can stream a
  checkpoint larger than host memory into devices without ever holding it twice. bfloat16 and float8 come
  from `ml_dtypes`; nothing here imports torch.
- Every header is checked before any tensor is read, as strictly as the reference (Rust) implementation:
  offsets must tile the data section exactly, a byte count must match shape x dtype. A truncated or corrupt
  file raises `CheckpointError` naming the file and, where one is to blame, the tensor.
- Arrays returned by `SafetensorsFile.get` are read-only views of the mapping: copy them before keeping them
  past `close()` (`jax.device_put` aliases host memory on CPU, so the loaders copy first).
- Writing takes (name, shape, dtype, producer) entries: offsets come from shapes, so each tensor's bytes are
  produced and written one at a time. Headers are padded with spaces to 8 bytes, as the reference does.
  Files are written to a temporary name and renamed into place, so a crash never leaves a half-written file
  under a real name.
- Sharding follows transformers: tensors are packed in order into shards of at most `max_shard_size` bytes
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
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit

# safetensors dtype code -> numpy dtype (explicitly little-endian where numpy has a byte order).
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
    raise ImportError("easymamba.safetensors_io needs a little-endian host")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it stands; the message names the file and the tensor."""


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


def read_header(path: "str | os.PathLike") -> tuple[dict[str, str], dict[str, TensorInfo], int]:
    """(metadata, tensors by name in file order, byte offset of the data section), all checked."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {n} is larger than the format's limit of {_MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated: its header needs {n} bytes but the file has only "
                                  f"{size - 8} after the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _corrupt(path, f"tensor {name}: entry must hold dtype, shape and data_offsets, got {entry!r}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in DTYPES:
            raise CheckpointError(f"tensor {name} in {path} has dtype {code!r}, which easymamba cannot read "
                                  f"(known: {', '.join(DTYPES)})")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise _corrupt(path, f"tensor {name}: bad shape {shape!r} or data_offsets {offsets!r}")
        info = TensorInfo(name, code, tuple(shape), offsets[0], offsets[1])
        want = int(np.prod(info.shape, dtype=np.int64)) * DTYPES[code].itemsize
        if info.nbytes != want:
            raise _corrupt(path, f"tensor {name}: data_offsets {offsets} span {info.nbytes} bytes but shape "
                                 f"{list(shape)} of {code} needs {want}")
        if info.end > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {name} needs bytes [{info.begin}, {info.end}) "
                                  f"of the data section, which holds only {data_size} bytes")
        tensors[name] = info

    # The reference implementation also requires the tensors to tile the data section with no gap or overlap.
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != cursor:
            what = "overlaps the tensor before it" if info.begin < cursor else f"starts after a gap at {cursor}"
            raise _corrupt(path, f"tensor {info.name} at data offset {info.begin} {what}")
        cursor = info.end
    if cursor != data_size:
        raise _corrupt(path, f"{data_size - cursor} bytes follow the last tensor's data (expected none)")
    return metadata, tensors, data_start


class SafetensorsFile:
    """One safetensors file, memory-mapped; tensors are read one at a time with `get`.

    >>> with SafetensorsFile("model.safetensors") as f:
    ...     for name in f: arr = f.get(name)     # read-only view, valid until close()
    """

    def __init__(self, path: "str | os.PathLike"):
        self.path = pathlib.Path(path)
        self.metadata, self.tensors, self._data_start = read_header(self.path)
        size = self.path.stat().st_size
        # np.memmap refuses a zero-length mapping; a file of only a header needs none.
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._map is not None:
            self._map._mmap.close()
            self._map = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only numpy array viewing the file (bfloat16 as ml_dtypes.bfloat16)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is not in {self.path}")
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype)
        if self._map is None:
            raise ValueError(f"{self.path} is closed")
        start = self._data_start + info.begin
        return self._map[start:start + info.nbytes].view(dtype).reshape(info.shape)


class SafetensorsCheckpoint:
    """The safetensors weights of a directory: `model.safetensors`, or the shards listed by
    `model.safetensors.index.json` (the single file wins when both exist, as in transformers)."""

    def __init__(self, directory: "str | os.PathLike"):
        self.directory = pathlib.Path(directory)
        single, index = self.directory / SAFE_WEIGHTS_NAME, self.directory / SAFE_WEIGHTS_INDEX_NAME
        self.files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            if single.is_file():
                self.source = single
                self.files.append(SafetensorsFile(single))
                self._where = dict.fromkeys(self.files[0].tensors, self.files[0])
            elif index.is_file():
                self.source = index
                self._open_index(index)
            else:
                raise FileNotFoundError(f"{self.directory} has neither {SAFE_WEIGHTS_NAME} nor "
                                        f"{SAFE_WEIGHTS_INDEX_NAME}")
        except BaseException:
            self.close()
            raise

    def _open_index(self, index: pathlib.Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (JSON with a weight_map): {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            path = self.directory / shard
            if pathlib.PurePath(shard).name != shard or not path.is_file():
                more = f" and {len(names) - 1} more" if len(names) > 1 else ""
                raise CheckpointError(f"{index} names shard {shard} (for tensor {names[0]}{more}) but "
                                      f"{self.directory} has no such file")
            f = SafetensorsFile(path)
            self.files.append(f)
            for name in names:
                if name not in f:
                    raise CheckpointError(f"{index} places tensor {name} in {shard}, which does not contain it")
                self._where[name] = f
            for name in f:
                if name not in weight_map:
                    raise CheckpointError(f"{path} holds tensor {name}, which {index} does not list")

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self.files:
            f.close()

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].tensors[name]

    def file_of(self, name: str) -> pathlib.Path:
        return self._where[name].path

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


# ---- writing ----------------------------------------------------------------------------------------

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
        stale = p.name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or _SHARD_RE.match(p.name)
        if stale and p.name not in keep:
            p.unlink()
    return written
