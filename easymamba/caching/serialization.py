"""Lossless cache documents: a plain dict of numpy arrays, and JSON with arrays as base64 of their bytes.

A view's document (a Mamba-2 one here; any view class is written the same way from its `LEAVES`, `SPEC_LEAVES`
and its metadata's dtype roles):

    {"layer_index": 3 | None, "metadata": {...sizes, "partition_axis": {...}},
     "partition_specs": {"conv_states": [...], "ssm_states": [...], "positions": [...]},   # one per SPEC_LEAVES
     "dtype": "bfloat16", "ssm_dtype": "float32",          # the float dtype roles the view's leaves use
     "conv_states": array, "ssm_states": array, "positions": array, "seqlen_offset": array}   # its LEAVES

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
from easymamba.caching.view import FIXED_DTYPES, FLOAT_ROLES, LEAVES, BaseCacheView, Mamba2CacheView, place_leaf

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
        "bool": np.bool_,
    }.items()
}


def dtype_roles(view_cls: type[BaseCacheView]) -> tuple[str, ...]:
    """The float dtype roles (`"dtype"`, `"ssm_dtype"`) that `view_cls`'s leaves use: the document's dtype fields."""
    roles = set(view_cls.METADATA.LEAF_DTYPES[name] for name in view_cls.LEAVES)
    return tuple(role for role in FLOAT_ROLES if role in roles)


def _view_fields(view_cls: type[BaseCacheView]) -> tuple[str, ...]:
    return ("layer_index", "metadata", "partition_specs", *dtype_roles(view_cls), *view_cls.LEAVES)


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
    if dtype == np.bool_ and np.any(words > 1):
        raise ValueError(f"{where}.data holds a byte other than 0 and 1, which is no bool")
    return words.view(dtype).reshape(tuple(shape))


# -- one view -------------------------------------------------------------------------------------------------
def view_to_dict(view: BaseCacheView) -> dict[str, Any]:
    where = f"layer {view.layer_index}"
    roles = view.metadata.LEAF_DTYPES
    d: dict[str, Any] = {
        "layer_index": view.layer_index,
        "metadata": view.metadata.to_dict(),
        "partition_specs": {n: partition.spec_to_json(s) for n, s in zip(view.SPEC_LEAVES, view.partition_specs)},
    }
    for role in dtype_roles(type(view)):  # the dtype of the first leaf of that role (they all share it)
        d[role] = np.dtype(getattr(view, next(n for n in view.LEAVES if roles[n] == role)).dtype).name
    d.update({name: to_host(getattr(view, name), f"{where} {name}") for name in view.LEAVES})
    return d


def view_from_dict(d: Any, where: str, mesh: Mesh | None = None,
                   view_cls: type[BaseCacheView] = Mamba2CacheView) -> BaseCacheView:
    _require(d, _view_fields(view_cls), where)
    index = d["layer_index"]
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise ValueError(f"{where}.layer_index must be an int or None; got {index!r}")
    metadata = view_cls.METADATA.from_dict(d["metadata"], f"{where}.metadata")
    _require(d["partition_specs"], view_cls.SPEC_LEAVES, f"{where}.partition_specs")
    specs = tuple(
        partition.spec_from_json(d["partition_specs"][name], f"{where}.partition_specs.{name}")
        for name in view_cls.SPEC_LEAVES
    )
    specs = view_cls.normalize_specs(specs, metadata)
    chosen = {role: dtype_from_name(d[role], f"{where}.{role}") for role in dtype_roles(view_cls)}
    chosen.update({role: np.dtype(dtype) for role, dtype in FIXED_DTYPES.items()})
    dtypes = {name: chosen[metadata.LEAF_DTYPES[name]] for name in view_cls.LEAVES}
    for name in view_cls.LEAVES:
        if metadata.LEAF_DTYPES[name] in FLOAT_ROLES and not jnp.issubdtype(dtypes[name], jnp.floating):
            raise ValueError(f"{where} declares {name} of dtype {dtypes[name].name}; it must be a float type")
    shapes = metadata.leaf_shapes()
    leaves = {}
    for name in view_cls.LEAVES:
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
        view_cls.check_specs_on_mesh(metadata, specs, mesh)
    placed = {name: place_leaf(value, name, view_cls.leaf_spec(specs, name), mesh) for name, value in leaves.items()}
    return view_cls(**placed, metadata=metadata, partition_specs=specs, layer_index=index)


def view_to_jsonable(v: dict[str, Any]) -> dict[str, Any]:
    """A view document with every array replaced by `array_to_json`."""
    return {k: array_to_json(x) if isinstance(x, np.ndarray) else x for k, x in v.items()}


def view_from_jsonable(v: Any, leaves: tuple[str, ...], where: str) -> Any:
    """Inverse of `view_to_jsonable` for a view with `leaves`; structure errors are left to `view_from_dict`."""
    if not isinstance(v, dict):
        return v
    return {k: array_from_json(x, f"{where}.{k}") if k in leaves else x for k, x in v.items()}


# -- a whole cache's documents --------------------------------------------------------------------------------
def views_to_dict(views: tuple[BaseCacheView | None, ...], fmt: str = FORMAT) -> dict[str, Any]:
    return {
        "format": fmt,
        "version": VERSION,
        "num_hidden_layers": len(views),
        "views": [None if view is None else view_to_dict(view) for view in views],
    }


def check_format(d: Any, fmt: str) -> None:
    """A document of another cache class is refused by both formats' names, before its fields are read (they
    differ between the classes)."""
    if isinstance(d, dict) and "format" in d and d["format"] != fmt:
        raise ValueError(f"cache document has format {d['format']!r}; expected {fmt!r}")


def views_from_dict(d: Any, mesh: Mesh | None = None, view_cls: type[BaseCacheView] = Mamba2CacheView,
                    fmt: str = FORMAT) -> tuple[BaseCacheView | None, ...]:
    check_format(d, fmt)
    _require(d, ("format", "version", "num_hidden_layers", "views"), "cache document")
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
    out["views"] = [None if v is None else view_to_jsonable(v) for v in d["views"]]
    return out


def jsonable_to_dict(d: Any, leaves: tuple[str, ...] = LEAVES) -> Any:
    """Inverse of `dict_to_jsonable` for views with `leaves`; structure errors are left to `views_from_dict`,
    which names them."""
    if not isinstance(d, dict) or not isinstance(d.get("views"), list):
        return d
    out = dict(d)
    out["views"] = [view_from_jsonable(v, leaves, f"views[{i}]") for i, v in enumerate(d["views"])]
    return out
