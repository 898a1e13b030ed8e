"""How an HF tensor and the flax parameters it fills relate: one `KeySpec` per tensor, four layout kinds.

    linear          torch `[out, in]`     <->  flax kernel `[in, out]`   (transpose)
    stacked_linear  torch `[E, out, in]`  <->  flax `[E, in, out]`       (transpose the last two axes: E experts
                                                                         saved as one tensor, Granite-4.0-H)
    conv            torch `[c, 1, k]`     <->  flax `[c, k]`             (drop the channel-group axis)
    copy            same layout

A tensor HF packs (Mamba-2's `in_proj` `[z | x | B | C | dt]`, `conv1d` `[x | B | C]`) lists its parts
(`KeySpec.parts`): split on load, concatenated on save, so a mesh can shard each part on its own axis
(docs/sharding.md). The packed axis is HF's out features or channels (the first axis; the second for
"stacked_linear"), the flax kernel's last for "linear" and "stacked_linear".

`FlaxView` is a source tensor seen in flax layout and read only when indexed, so a sharded load reads each
device's slice of a file and nothing more.
"""

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from easymamba.models import KeySpec


def to_flax_layout(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "stacked_linear":
        return array.swapaxes(-1, -2)
    if kind == "conv":
        return array[:, 0, :]
    return array


def to_hf_layout(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "stacked_linear":
        return array.swapaxes(-1, -2)
    if kind == "conv":
        return array[:, None, :]
    return array


def hf_shape(kind: str, flax_shape: tuple) -> tuple:
    if kind == "linear":
        return tuple(reversed(flax_shape))
    if kind == "stacked_linear":
        return (*flax_shape[:-2], flax_shape[-1], flax_shape[-2])
    if kind == "conv":
        return (flax_shape[0], 1, flax_shape[1])
    return tuple(flax_shape)


def _flax_shape_of(kind: str, shape: tuple) -> tuple:
    """The inverse of `hf_shape`."""
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "stacked_linear":
        return (*shape[:-2], shape[-1], shape[-2])
    if kind == "conv":
        return (shape[0], shape[2])
    return tuple(shape)


def _hf_index(kind: str, index: tuple) -> tuple:
    """A flax-layout index (one slice per axis) as the HF-layout index that reads the same elements."""
    if kind == "linear":
        return tuple(reversed(index))
    if kind == "stacked_linear":
        return (*index[:-2], index[-1], index[-2])
    if kind == "conv":
        return (index[0], slice(0, 1), index[1])
    return index


def param_at(model, path) -> nnx.Param:
    obj = model
    for step in path:
        obj = obj[step] if isinstance(step, int) else getattr(obj, step)
    return obj


def packed_axis(kind: str) -> int:
    """The flax axis along which a packed tensor's parts sit (HF's first axis in flax layout)."""
    return -1 if kind in ("linear", "stacked_linear") else 0


def flax_shape(model, spec: KeySpec) -> tuple:
    """The flax-layout shape of `spec`'s tensor in `model` (the parts joined along the packed axis; one entry of
    a stacked parameter)."""
    if spec.index is not None:
        return tuple(param_at(model, spec.path).shape[1:])
    if not spec.parts:
        return tuple(param_at(model, spec.path).shape)
    shapes = [list(param_at(model, path).shape) for path in spec.targets]
    axis = packed_axis(spec.kind) % len(shapes[0])
    joined = shapes[0]
    joined[axis] = sum(shape[axis] for shape in shapes)
    return tuple(joined)


class FlaxView:
    """A source tensor in flax layout, read lazily: `view[index]` reads only the HF slice `index` covers.

    read_hf(index) -> numpy array in HF layout, `index` a tuple of step-1 slices, one per HF axis.
    """

    def __init__(self, read_hf: Callable[[tuple], np.ndarray], kind: str, shape_hf: tuple,
                 window: tuple[int, int, int] | None = None):
        self._read_hf, self.kind, self._shape_hf = read_hf, kind, tuple(shape_hf)
        self._window = window   # (flax axis, start, length) of one packed part, or None for the whole tensor
        shape = list(_flax_shape_of(kind, self._shape_hf))
        if window is not None:
            shape[window[0]] = window[2]
        self.shape = tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def narrow(self, axis: int, start: int, length: int) -> "FlaxView":
        """The part [start, start + length) along flax `axis` (a packed tensor's part), still unread."""
        if self._window is not None:
            raise ValueError("a FlaxView is narrowed once, to one packed part")
        return FlaxView(self._read_hf, self.kind, self._shape_hf, (axis % self.ndim, start, length))

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        full = list(index) + [slice(None)] * (self.ndim - len(index))
        bounds = []
        for axis, (s, n) in enumerate(zip(full, self.shape)):
            if not isinstance(s, slice):
                raise TypeError(f"FlaxView takes slices, got {s!r}")
            start, stop, step = s.indices(n)
            if step != 1:
                raise ValueError(f"FlaxView reads contiguous slices, got step {step}")
            if self._window is not None and axis == self._window[0]:
                start, stop = start + self._window[1], stop + self._window[1]
            bounds.append(slice(start, stop))
        return to_flax_layout(self.kind, self._read_hf(_hf_index(self.kind, tuple(bounds))))


class StackedView:
    """Tensors that fill the entries of one parameter stacked along its first axis (HF's one tensor per expert),
    seen as that parameter: `view[index]` reads only the entries and slices `index` covers."""

    def __init__(self, entries: list):
        self.entries = list(entries)
        self.shape = (len(self.entries), *self.entries[0].shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        first, rest = (index[0] if index else slice(None)), index[1:]
        start, stop, step = first.indices(self.shape[0])
        return np.stack([np.asarray(self.entries[i][rest]) for i in range(start, stop, step)])


def read_flax(model, spec: KeySpec) -> np.ndarray:
    """`spec`'s tensor from `model` as one host array in flax layout (the parts concatenated)."""
    if spec.index is not None:
        return np.asarray(jax.device_get(param_at(model, spec.path)[spec.index]))
    values = [np.asarray(jax.device_get(param_at(model, path)[...])) for path in spec.targets]
    return values[0] if len(values) == 1 else np.concatenate(values, axis=packed_axis(spec.kind))


def split_parts(spec: KeySpec, array) -> list[tuple[tuple, object]]:
    """(module path, view) for each parameter `spec`'s flax-layout `array` (numpy or `FlaxView`) fills;
    views, never copies."""
    if not spec.parts:
        return [(spec.path, array)]
    axis = packed_axis(spec.kind) % array.ndim
    out, start = [], 0
    for path, size in spec.parts:
        if isinstance(array, FlaxView):
            out.append((path, array.narrow(axis, start, size)))
        else:
            index = [slice(None)] * array.ndim
            index[axis] = slice(start, start + size)
            out.append((path, array[tuple(index)]))
        start += size
    return out


__all__ = ["FlaxView", "StackedView", "KeySpec", "flax_shape", "hf_shape", "packed_axis", "param_at",
           "read_flax", "split_parts", "to_flax_layout", "to_hf_layout"]
