"""Lossless cache documents: a plain dict of numpy arrays, and JSON with arrays as base64 of their bytes.

A view's document:

    {"layer_index": 3 | None, "metadata": {...sizes, "partition_axis": {...}},
     "partition_specs": {"conv_states": [...], "ssm_states": [...], "positions": [...]},
     "dtype": "bfloat16", "ssm_dtype": "float32",
     "conv_states": array, "ssm_states": array, "positions": array, "seqlen_offset": array}

Spec entries are `None`, a name, or a list of names. In JSON an array is
`{"dtype": "bfloat16", "shape": [2, 3], "data": base64(raw little-endian bytes)}`, so NaN payloads, infinities
and bfloat16 survive bit for bit (no text formatting of floats anywhere). Reading checks every field: a missing
field, an unknown dtype, or an array whose shape or dtype disagrees with the metadata and the declared dtypes
is a `ValueError` naming the field and what was expected.
"""

import base64
import binascii
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from easymamba.caching import partition
from easymamba.caching.view import (
    LEAVES,
    BaseCacheView,
    Mamba2CacheView,
    check_specs_on_mesh,
    expected_shapes,
    normalize_specs,
    place_leaf,
)

FORMAT = "easymamba.Mamba2Cache"  # the Mamba-2 document's format; each cache class names its own
VERSION = 1

DTYPES = {
    name: np.dtype(dtype)
    for name, dtype in {
        "float64": np.float64,
        "float32": np.float32,
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
        "float8_e5m2": ml_dtypes.float8_e5m2,
        "int64": np.int64,
        "int32": np.int32,
    }.items()
}
_SPEC_FIELDS = ("conv_states", "ssm_states", "positions")
_VIEW_FIELDS = ("layer_index", "metadata", "partition_specs", "dtype", "ssm_dtype", *LEAVES)


def dtype_from_name(name: Any, where: str) -> np.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"{where} has unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _require(d: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a dict; got {type(d).__name__}")
    missing = [name for name in fields if name not in d]
    if missing:
        raise ValueError(f"{where} is missing fields {missing}")
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; expected {list(fields)}")


def to_host(x: jax.Array, where: str) -> np.ndarray:
    """A numpy copy of `x`, gathered from its devices (dtype kept; bfloat16 as `ml_dtypes.bfloat16`)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError(f"{where} spans devices of other processes; gather it before serializing")
    return np.array(jax.device_get(x), copy=True)


# -- one array as JSON ----------------------------------------------------------------------------------------
def _uint(itemsize: int, order: str) -> np.dtype:
    return np.dtype(f"{order}u{itemsize}")


def array_to_json(a: np.ndarray) -> dict[str, Any]:
    """`{"dtype", "shape", "data"}` with `data` the base64 of the little-endian bytes (C order)."""
    a = np.asarray(a, order="C")  # not ascontiguousarray: it turns a 0-d array into 1-d
    raw = a.view(_uint(a.dtype.itemsize, "=")).astype(_uint(a.dtype.itemsize, "<"), copy=False)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": base64.b64encode(raw.tobytes()).decode("ascii")}


def array_from_json(obj: Any, where: str) -> np.ndarray:
    _require(obj, ("dtype", "shape", "data"), where)
    dtype = dtype_from_name(obj["dtype"], f"{where}.dtype")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"{where}.shape must be a list of non-negative ints; got {shape!r}")
    if not isinstance(obj["data"], str):
        raise ValueError(f"{where}.data must be a base64 string; got {type(obj['data']).__name__}")
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{where}.data is not valid base64: {err}") from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{where}.data holds {len(raw)} bytes, but shape {tuple(shape)} of {dtype.name} needs {expected}"
        )
    words = np.frombuffer(raw, dtype=_uint(dtype.itemsize, "<")).astype(_uint(dtype.itemsize, "="))
    return words.view(dtype).reshape(tuple(shape))


# -- one view -------------------------------------------------------------------------------------------------
def view_to_dict(view: BaseCacheView) -> dict[str, Any]:
    where = f"layer {view.layer_index}"
    d: dict[str, Any] = {
        "layer_index": view.layer_index,
        "metadata": view.metadata.to_dict(),
        "partition_specs": {n: partition.spec_to_json(s) for n, s in zip(_SPEC_FIELDS, view.partition_specs)},
        "dtype": np.dtype(view.conv_states.dtype).name,
        "ssm_dtype": np.dtype(view.ssm_states.dtype).name,
    }
    d.update({name: to_host(getattr(view, name), f"{where} {name}") for name in LEAVES})
    return d


def view_from_dict(d: Any, where: str, mesh: Mesh | None = None,
                   view_cls: type[BaseCacheView] = Mamba2CacheView) -> BaseCacheView:
    _require(d, _VIEW_FIELDS, where)
    index = d["layer_index"]
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise ValueError(f"{where}.layer_index must be an int or None; got {index!r}")
    metadata = view_cls.METADATA.from_dict(d["metadata"], f"{where}.metadata")
    _require(d["partition_specs"], _SPEC_FIELDS, f"{where}.partition_specs")
    specs = tuple(
        partition.spec_from_json(d["partition_specs"][name], f"{where}.partition_specs.{name}")
        for name in _SPEC_FIELDS
    )
    specs = normalize_specs(specs, metadata)
    dtypes = {
        "conv_states": dtype_from_name(d["dtype"], f"{where}.dtype"),
        "ssm_states": dtype_from_name(d["ssm_dtype"], f"{where}.ssm_dtype"),
        "positions": np.dtype(np.int32),
        "seqlen_offset": np.dtype(np.int32),
    }
    for name in ("conv_states", "ssm_states"):
        if not jnp.issubdtype(dtypes[name], jnp.floating):
            raise ValueError(f"{where} declares {name} of dtype {dtypes[name].name}; it must be a float type")
    shapes = expected_shapes(metadata)
    leaves = {}
    for name in LEAVES:
        value = d[name]
        if isinstance(value, jax.Array):
            value = to_host(value, f"{where}.{name}")
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{where}.{name} must be a numpy array; got {type(value).__name__}")
        if value.shape != shapes[name]:
            raise ValueError(f"{where}.{name} must have shape {shapes[name]} (from the metadata); found {value.shape}")
        if value.dtype != dtypes[name]:
            raise ValueError(f"{where}.{name} must have dtype {dtypes[name].name}; found {value.dtype.name}")
        leaves[name] = np.array(value, copy=True)  # device_put may alias host memory; own what it aliases
    if mesh is not None:
        check_specs_on_mesh(metadata, specs, mesh)
    placed = {name: place_leaf(value, name, specs, mesh) for name, value in leaves.items()}
    return view_cls(**placed, metadata=metadata, partition_specs=specs, layer_index=index)


# -- a whole cache's documents --------------------------------------------------------------------------------
def views_to_dict(views: tuple[BaseCacheView | None, ...], fmt: str = FORMAT) -> dict[str, Any]:
    return {
        "format": fmt,
        "version": VERSION,
        "num_hidden_layers": len(views),
        "views": [None if view is None else view_to_dict(view) for view in views],
    }


def views_from_dict(d: Any, mesh: Mesh | None = None, view_cls: type[BaseCacheView] = Mamba2CacheView,
                    fmt: str = FORMAT) -> tuple[BaseCacheView | None, ...]:
    _require(d, ("format", "version", "num_hidden_layers", "views"), "cache document")
    if d["format"] != fmt:
        raise ValueError(f"cache document has format {d['format']!r}; expected {fmt!r}")
    if d["version"] != VERSION:
        raise ValueError(f"cache document has version {d['version']!r}; this easymamba reads version {VERSION}")
    views = d["views"]
    if not isinstance(views, (list, tuple)):
        raise ValueError(f"cache document views must be a list; got {type(views).__name__}")
    if d["num_hidden_layers"] != len(views):
        raise ValueError(
            f"cache document num_hidden_layers is {d['num_hidden_layers']!r} but it holds {len(views)} views"
        )
    return tuple(None if v is None else view_from_dict(v, f"views[{i}]", mesh, view_cls) for i, v in enumerate(views))


def dict_to_jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """`views_to_dict`'s output with every array replaced by `array_to_json`."""
    out = dict(d)
    out["views"] = [
        None if v is None else {k: array_to_json(x) if k in LEAVES else x for k, x in v.items()} for v in d["views"]
    ]
    return out


def jsonable_to_dict(d: Any) -> Any:
    """Inverse of `dict_to_jsonable`; structure errors are left to `views_from_dict`, which names them."""
    if not isinstance(d, dict) or not isinstance(d.get("views"), list):
        return d
    out = dict(d)
    out["views"] = [
        {k: array_from_json(x, f"views[{i}].{k}") if k in LEAVES else x for k, x in v.items()}
        if isinstance(v, dict)
        else v
        for i, v in enumerate(d["views"])
    ]
    return out
