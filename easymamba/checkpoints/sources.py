"""Tensor sources: the HF-named tensors of a directory or a dict, read one at a time.

Every source answers the same questions: `names()`, `shape(name)`, `dtype(name)` (a safetensors code),
`file_of(name)` and `description` (for messages), `read(name)` (the whole tensor, HF layout, numpy),
`read_slice(name, index)` (just the elements of a tuple of slices), `close()`.

- Safetensors (`model.safetensors`, or the shards of `model.safetensors.index.json`; the single file wins when
  both exist, as in transformers) are opened with `safetensors.safe_open(..., framework="numpy")`: the file is
  memory-mapped and `get_slice` reads only the bytes of one device's slice, so a sharded load never holds a
  whole parameter. bfloat16 comes out as `ml_dtypes.bfloat16`; nothing imports torch. Each file's header is
  checked first (`safetensors_format.read_header`), so a bad file fails with a sentence naming it.
- A `pytorch_model.bin` (or its index) is a pickle: it is opened only with
  `torch.load(..., weights_only=True, map_location="cpu")`, and only if torch is installed.
- A dict of torch tensors or arrays (`load_state_dict`).
"""

import logging
import os
import pathlib
import sys
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open

from easymamba.checkpoints.errors import CheckpointError
from easymamba.checkpoints.safetensors_format import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TensorInfo,
    dtype_code,
    read_header,
    read_index,
)

_log = logging.getLogger(__name__)

TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"


def _whole(index: tuple, shape: tuple) -> bool:
    """Whether `index` (slices) covers every element of `shape`, or `shape` has none (`get_slice` refuses
    empty axes)."""
    if 0 in shape:
        return True
    return all(s.indices(n)[:2] == (0, n) for s, n in zip(index, shape)) and len(index) <= len(shape)


class SafetensorsFile:
    """One safetensors file: its header checked, then opened with `safe_open` (memory-mapped).

    >>> with SafetensorsFile("model.safetensors") as f:
    ...     for name in f: arr = f.get(name)
    """

    def __init__(self, path: "str | os.PathLike"):
        self.path = pathlib.Path(path)
        self.metadata, self.tensors = read_header(self.path)
        self._file = safe_open(self.path, framework="numpy")

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None

    def __iter__(self):
        return iter(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def _handle(self):
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        return self._file

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a numpy array of its own dtype (bfloat16 as ml_dtypes.bfloat16)."""
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name} is not in {self.path}")
        return self._handle().get_tensor(name)

    def get_slice(self, name: str, index: tuple) -> np.ndarray:
        """The elements of `index` (a tuple of slices) of tensor `name`, reading only their bytes."""
        if _whole(index, self.tensors[name].shape):
            return self.get(name)[index]
        return self._handle().get_slice(name)[index]


class SafetensorsSource:
    """The safetensors weights of a directory, one file or the shards of an index."""

    def __init__(self, directory: "str | os.PathLike"):
        self.directory = pathlib.Path(directory)
        single, index = self.directory / SAFE_WEIGHTS_NAME, self.directory / SAFE_WEIGHTS_INDEX_NAME
        self.files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            if single.is_file():
                self.description = str(single)
                self.files.append(SafetensorsFile(single))
                self._where = dict.fromkeys(self.files[0].tensors, self.files[0])
            elif index.is_file():
                self.description = str(index)
                self._open_index(index)
            else:
                raise FileNotFoundError(f"{self.directory} has neither {SAFE_WEIGHTS_NAME} nor "
                                        f"{SAFE_WEIGHTS_INDEX_NAME}")
        except BaseException:
            self.close()
            raise

    def _open_index(self, index: pathlib.Path) -> None:
        by_shard = read_index(index)
        listed = {name for names in by_shard.values() for name in names}
        for shard, names in by_shard.items():
            f = SafetensorsFile(self.directory / shard)
            self.files.append(f)
            for name in names:
                if name not in f:
                    raise CheckpointError(f"{index} places tensor {name} in {shard}, which does not contain it")
                self._where[name] = f
            for name in f:
                if name not in listed:
                    raise CheckpointError(f"{f.path} holds tensor {name}, which {index} does not list")

    def __enter__(self) -> "SafetensorsSource":
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

    def shape(self, name: str) -> tuple:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    def file_of(self, name: str) -> str:
        return str(self._where[name].path)

    def read(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def read_slice(self, name: str, index: tuple) -> np.ndarray:
        return self._where[name].get_slice(name, index)


# ---- in memory: a state dict, or the tensors of torch pickles -------------------------------------------

_TORCH_CODES = {"torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
                "torch.uint8": "U8", "torch.bool": "BOOL"}


def _dtype_code_of(value) -> str:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        return _TORCH_CODES.get(str(value.dtype), str(value.dtype))
    try:
        return dtype_code(value.dtype)
    except (ValueError, TypeError):
        return str(value.dtype)


def _torch_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy in its own dtype (bfloat16 bit for bit, as ml_dtypes.bfloat16)."""
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        torch = sys.modules["torch"]  # a tensor exists, so torch is imported
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class DictSource:
    """HF-named tensors held in memory (a torch state dict, or numpy / jax arrays)."""

    def __init__(self, tensors: Mapping, description: str):
        self._tensors = dict(tensors)
        self.description = description

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> str:
        return _dtype_code_of(self._tensors[name])

    def file_of(self, name: str) -> str:
        return self.description

    def read(self, name: str) -> np.ndarray:
        value = self._tensors[name]
        return _torch_to_numpy(value) if hasattr(value, "detach") else np.asarray(value)

    def read_slice(self, name: str, index: tuple) -> np.ndarray:
        return self.read(name)[index]

    def close(self) -> None:
        pass


def _torch_load(path: pathlib.Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a torch pickle, which easymamba opens only with torch.load(weights_only=True), and torch "
            "is not installed: install torch, or convert the checkpoint to safetensors where torch is "
            "(`easymamba convert SRC DST --to hf`)") from None
    # One line each time a pickle is opened (logging's last-resort handler prints it to stderr when the
    # application set up no logging): the user sees that a pickle was read, and that it was read safely.
    _log.warning("easymamba: reading %s, a torch pickle, with torch.load(weights_only=True): tensors only, no code",
                 path)
    try:
        try:  # mmap keeps the tensors in the file until each is read (zip-format checkpoints only)
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, Mapping) or not all(hasattr(v, "detach") for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict (tensor name -> tensor)")
    return dict(obj)


class TorchSource(DictSource):
    """`pytorch_model.bin`, or the shards a `pytorch_model.bin.index.json` lists."""

    def __init__(self, directory: pathlib.Path, index: bool):
        self._file: dict[str, str] = {}
        tensors = {}
        if index:
            path = directory / TORCH_WEIGHTS_INDEX_NAME
            for shard in read_index(path, "checkpoint index"):
                part = _torch_load(directory / shard)
                tensors.update(part)
                self._file.update(dict.fromkeys(part, str(directory / shard)))
        else:
            path = directory / TORCH_WEIGHTS_NAME
            tensors = _torch_load(path)
            self._file = dict.fromkeys(tensors, str(path))
        super().__init__(tensors, str(path))

    def file_of(self, name: str) -> str:
        return self._file[name]


def open_weights(directory: pathlib.Path):
    """The tensor source of a checkpoint directory: the first found of `model.safetensors`,
    `model.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json`."""
    if (directory / SAFE_WEIGHTS_NAME).is_file() or (directory / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return SafetensorsSource(directory)
    if (directory / TORCH_WEIGHTS_NAME).is_file():
        return TorchSource(directory, index=False)
    if (directory / TORCH_WEIGHTS_INDEX_NAME).is_file():
        return TorchSource(directory, index=True)
    raise FileNotFoundError(f"{directory} holds no weights: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
                            f"{TORCH_WEIGHTS_NAME} or {TORCH_WEIGHTS_INDEX_NAME}")


__all__ = ["DictSource", "SafetensorsFile", "SafetensorsSource", "TORCH_WEIGHTS_INDEX_NAME", "TORCH_WEIGHTS_NAME",
           "TorchSource", "open_weights"]
