"""Which mesh axis shards which cache dimension, and the checks that keep a spec honest.

A `PartitionSpec` entry is `None` (replicated), one mesh axis name, or a tuple of names (the dimension is
split over their product). Specs here are never dropped, padded past the array's rank, or truncated: a spec
that does not fit its array, or names an axis the mesh lacks, or does not divide a dimension, is an error
that names the array, the dimension, the axis and both sizes.

Letters as in `easymamba/typing.py`: conv state `[b, c, k]`, SSM state `[b, h, p, n]`, positions `[b]`.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AxisEntry: TypeAlias = str | tuple[str, ...] | None

CONV_DIMS = ("b", "c", "k")
SSM_DIMS = ("b", "h", "p", "n")
POSITIONS_DIMS = ("b",)


def normalize_entry(entry: Any, where: str) -> AxisEntry:
    """`None`, a name, or a non-empty tuple of distinct names; lists become tuples so the result hashes."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, (tuple, list)) and entry and all(isinstance(name, str) for name in entry):
        if len(set(entry)) != len(entry):
            raise ValueError(f"{where} names a mesh axis twice: {tuple(entry)!r}")
        return tuple(entry)
    raise ValueError(f"{where} must be None, a mesh axis name, or a tuple of names; got {entry!r}")


@dataclasses.dataclass(frozen=True)
class PartitionAxis:
    """Mesh axis names for each cache dimension (`None` leaves the dimension replicated).

    Attributes:
        batch_axis: shards `b` of every array (data parallelism).
        head_axis: shards `h` of the SSM state (tensor parallelism over heads, as the mixer's weights are).
        head_dim_axis: shards `p` of the SSM state.
        state_axis: shards `n` of the SSM state.
        conv_channel_axis: shards `c` of the conv state. Replicated by default: the conv channels are the
            concatenation `[x | B | C]` of `e + 2 * g * n` columns, so an even split over devices does not
            line up with heads; shard it only if the model shards the conv weights the same way.
        conv_kernel_axis: shards `k` of the conv state (rarely useful: `k` is 4).
        kv_head_axis: shards `kv`, the key/value heads of an attention layer's view (`easymamba.caching.attention`).
            A document written before this field existed reads it as the default.

    EasyDeL's other logical axes (`sequence_axis`, `query_sequence_axis`, `key_sequence_axis`,
    `hidden_state_axis`, `mlp_intermediate_axis`, `vocab_axis`, `expert_axis`, `expert_gate_axis`,
    `attention_dim_axis`, `bias_head_sequence_axis`, `bias_key_sequence_axis`) are accepted, checked and kept
    (in `to_dict` too), so a `PartitionAxis(...)` written for EasyDeL builds here unchanged. They shard nothing:
    no cache array has a sequence, hidden, vocabulary or expert dimension (an attention view's slots stay whole
    along their length, as the forward writes them). All default to None; documents without them read as None.
    """

    batch_axis: AxisEntry = "data"
    head_axis: AxisEntry = "model"
    head_dim_axis: AxisEntry = None
    state_axis: AxisEntry = None
    conv_channel_axis: AxisEntry = None
    conv_kernel_axis: AxisEntry = None
    kv_head_axis: AxisEntry = "model"
    # EasyDeL's names, accepted and kept, applied to nothing (docstring); after the fields above, whose
    # positional order is kept.
    sequence_axis: AxisEntry = None
    query_sequence_axis: AxisEntry = None
    key_sequence_axis: AxisEntry = None
    hidden_state_axis: AxisEntry = None
    mlp_intermediate_axis: AxisEntry = None
    vocab_axis: AxisEntry = None
    expert_axis: AxisEntry = None
    expert_gate_axis: AxisEntry = None
    attention_dim_axis: AxisEntry = None
    bias_head_sequence_axis: AxisEntry = None
    bias_key_sequence_axis: AxisEntry = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = normalize_entry(getattr(self, field.name), f"PartitionAxis.{field.name}")
            object.__setattr__(self, field.name, value)

    def conv_state_spec(self) -> PartitionSpec:
        """Spec for the conv window `[b, c, k]`."""
        return PartitionSpec(self.batch_axis, self.conv_channel_axis, self.conv_kernel_axis)

    def ssm_state_spec(self) -> PartitionSpec:
        """Spec for the SSM state `[b, h, p, n]`."""
        return PartitionSpec(self.batch_axis, self.head_axis, self.head_dim_axis, self.state_axis)

    def positions_spec(self) -> PartitionSpec:
        """Spec for the per-row positions `[b]`."""
        return PartitionSpec(self.batch_axis)

    def view_specs(self) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
        """`(conv, ssm, positions)`, the order `Mamba2CacheView.partition_specs` keeps."""
        return self.conv_state_spec(), self.ssm_state_spec(), self.positions_spec()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: entry_to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "partition_axis") -> "PartitionAxis":
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a dict of mesh axis names; got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{where} has unknown fields {unknown}; expected {names}")
        missing = [name for name in names[:6] if name not in d]  # later fields: their default when absent
        if missing:
            raise ValueError(f"{where} is missing fields {missing}")
        return cls(**{name: normalize_entry(d[name], f"{where}.{name}") for name in names if name in d})


def _names(entry: str | tuple[str, ...]) -> tuple[str, ...]:
    return entry if isinstance(entry, tuple) else (entry,)


def normalize_spec(spec: Any, where: str) -> PartitionSpec:
    """A `PartitionSpec` whose entries are `None`, names or tuples of names (no `UNCONSTRAINED`)."""
    if not isinstance(spec, PartitionSpec):
        raise ValueError(f"{where} must be a jax.sharding.PartitionSpec; got {spec!r}")
    entries = [normalize_entry(entry, f"{where} entry {i}") for i, entry in enumerate(spec)]
    used = [name for entry in entries if entry is not None for name in _names(entry)]
    if len(set(used)) != len(used):
        raise ValueError(f"{where} uses a mesh axis on two dimensions: {spec}")
    return PartitionSpec(*entries)


def check_spec(
    spec: PartitionSpec,
    shape: Sequence[int],
    dims: Sequence[str],
    array: str,
    mesh: Mesh | None = None,
) -> None:
    """Raise `ValueError` unless `spec` fits an array of `shape` (dim letters `dims`) on `mesh`.

    Without a mesh only the rank is checked; with one, every axis must exist and divide its dimension.
    """
    label = f"{array} [{', '.join(dims)}]"
    if len(spec) > len(shape):
        raise ValueError(
            f"partition spec {spec} for {label} has {len(spec)} entries but the array has rank {len(shape)}"
        )
    if mesh is None:
        return
    sizes = dict(mesh.shape)
    for i, entry in enumerate(spec):
        if entry is None:
            continue
        names = _names(entry)
        for name in names:
            if name not in sizes:
                raise ValueError(
                    f"partition spec {spec} for {label} names mesh axis {name!r}, which the mesh lacks; "
                    f"the mesh's axes are {tuple(mesh.axis_names)}"
                )
        split = math.prod(sizes[name] for name in names)
        if shape[i] % split:
            axis = repr(names[0]) if len(names) == 1 else repr(names)
            raise ValueError(
                f"dim {i} ({dims[i]}) of {label} has size {shape[i]}, which mesh axis {axis} of size {split} "
                f"does not divide"
            )


def entry_to_json(entry: AxisEntry) -> None | str | list[str]:
    return list(entry) if isinstance(entry, tuple) else entry


def fit_spec(spec: PartitionSpec, rank: int) -> PartitionSpec:
    """`spec` cut or padded with None to `rank` entries: one spec for arrays of several ranks (EasyDeL's
    single-spec `partition_specs`). The entries past `rank` are dropped, so only a spec written for the
    largest array keeps all of its axes."""
    entries = tuple(spec)[:rank]
    return PartitionSpec(*entries, *([None] * (rank - len(entries))))


def spec_to_json(spec: PartitionSpec) -> list[None | str | list[str]]:
    return [entry_to_json(entry) for entry in spec]


def spec_from_json(entries: Any, where: str) -> PartitionSpec:
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"{where} must be a list of entries (None, a name, or a list of names); got {entries!r}")
    normalized = (normalize_entry(entry, f"{where} entry {i}") for i, entry in enumerate(entries))
    return normalize_spec(PartitionSpec(*normalized), where)


@functools.lru_cache(maxsize=64)
def _sharded_zeros_fn(layout: tuple[tuple[tuple[int, ...], np.dtype, NamedSharding], ...]):
    shardings = tuple(sharding for _, _, sharding in layout)

    def zeros():
        return tuple(jnp.zeros(shape, dtype) for shape, dtype, _ in layout)

    return jax.jit(zeros, out_shardings=shardings)


def zeros(
    layout: Sequence[tuple[tuple[int, ...], Any, PartitionSpec]],
    mesh: Mesh | None = None,
) -> list[jax.Array]:
    """Zeros for each `(shape, dtype, spec)`; with a mesh, each made in place as `NamedSharding(mesh, spec)`.

    One jitted call makes all of them, so no array is ever whole on one device. Specs must already be checked.
    """
    if mesh is None:
        return [jnp.zeros(shape, dtype) for shape, dtype, _ in layout]
    key = tuple((tuple(shape), np.dtype(dtype), NamedSharding(mesh, spec)) for shape, dtype, spec in layout)
    return list(_sharded_zeros_fn(key)())
