"""One layer's cache as an immutable JAX pytree: the machinery every view shares, and the SSM views.

`BaseCacheView` holds the machinery (checks, functional updates, pytree, sharded init) that every family's view
shares. A view class declares its leaves and its metadata class; the metadata gives each leaf's shape, dimension
letters and dtype role (`BaseCacheMetaData.leaf_shapes()`, `LEAF_DIMS`, `LEAF_DTYPES`):

    LEAVES        the array leaves, in pytree order; every view has `positions` and `seqlen_offset`
    SPEC_LEAVES   the leaves that carry a PartitionSpec, in the order of `partition_specs` (the others are
                  scalars, always replicated)
    METADATA      the metadata class
    KIND          the name a hybrid cache's layer kinds use for it ("mamba2", "mamba", "attention")

`SSMCacheView` adds the conv window and the SSM state and their updates; `Mamba2CacheView` is the Mamba-2 one,
`easymamba.caching.mamba1.MambaCacheView` the Mamba-1 one, and `easymamba.caching.attention.AttentionCacheView`
the key/value view of an attention layer.

Mamba-2 leaves (letters of `easymamba/typing.py`):

    conv_states    [b, c, k]     the k most recent pre-conv, pre-activation xBC columns, newest last (Hugging
                                 Face's convention, `Mamba2Cache.update_conv_state` in transformers 4.57);
                                 dtype = the cache dtype (the model's compute dtype)
    ssm_states     [b, h, p, n]  h_t of the recurrence; float32 by default whatever the cache dtype, as
                                 transformers 5.x keeps it (`ssm_dtype` may ask for e.g. bfloat16)
    positions      [b] int32     tokens each row has consumed, so the next token's position
    seqlen_offset  [] int32      tokens the cache has consumed; an array, so it can advance in `lax.while_loop`

Static (the treedef): `metadata`, `partition_specs` (one per `SPEC_LEAVES`; `(conv, ssm, positions)` for the SSM
views), `layer_index`. Every method returns a new view; nothing is mutated. Shapes and dtypes are checked when a
view is built or updated, on the static shapes, so inside `jit` the checks cost nothing at run time.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Int

from easymamba.caching import partition
from easymamba.caching.metadata import BaseCacheMetaData, Mamba2CacheMetaData

LEAVES = ("conv_states", "ssm_states", "positions", "seqlen_offset")  # the SSM views' leaves
ViewSpecs = tuple[PartitionSpec, ...]
FLOAT_ROLES = ("dtype", "ssm_dtype")  # dtype roles the view is built with; the others are fixed
FIXED_DTYPES = {"int32": jnp.dtype(jnp.int32), "bool": jnp.dtype(jnp.bool_)}
_COUNT = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def expected_shapes(metadata: BaseCacheMetaData) -> dict[str, tuple[int, ...]]:
    return metadata.leaf_shapes()


def float_dtype(dtype: Any, name: str) -> jnp.dtype:
    """`dtype` as a floating dtype; None is float32 (`jnp.dtype(None)` would be float64, which JAX narrows with
    a warning unless x64 is on)."""
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype; got {dtype}")
    return dtype


def _check_leaf(name: str, value: Any, shape: tuple[int, ...], dtype: jnp.dtype | None,
                dims: tuple[str, ...], role: str) -> None:
    """`value` must be an array of `shape`; of `dtype` when given, else of its role's dtype (floating for the
    "dtype" / "ssm_dtype" roles)."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise ValueError(f"{name} must be an array of shape {shape}; got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} [{', '.join(dims)}] must have shape {shape}; found {tuple(value.shape)}")
    found = jnp.dtype(value.dtype)
    if dtype is not None:
        if found != dtype:
            raise ValueError(f"{name} must have dtype {dtype} (the cache's); found {found}")
    elif role in FIXED_DTYPES:
        if found != FIXED_DTYPES[role]:
            raise ValueError(f"{name} must have dtype {FIXED_DTYPES[role]}; found {found}")
    elif not jnp.issubdtype(found, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype; found {found}")


def _as_int32_step(num: Any) -> jax.Array:
    """A scalar integer step (Python int or integer array, traced or not) as int32."""
    if isinstance(num, bool):
        raise ValueError(f"num must be an integer scalar; got {num!r}")
    try:
        step = jnp.asarray(num)
    except TypeError:
        raise ValueError(f"num must be an integer scalar; got {num!r}") from None
    if step.ndim != 0 or not jnp.issubdtype(step.dtype, jnp.integer):
        raise ValueError(f"num must be an integer scalar; got {step.dtype} of shape {step.shape}")
    return step.astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BaseCacheView:
    """Shared machinery of the per-layer views (not used on its own).

    A subclass is a frozen dataclass whose fields are its `LEAVES` (in that order), then `metadata`,
    `partition_specs = None` and `layer_index = None`; it sets `METADATA`, `LEAVES`, `SPEC_LEAVES` and `KIND` and
    is registered with `jax.tree_util.register_pytree_with_keys_class`. Build one with `init`; change one with
    `update_seq`, `advance`, `reset`, `replace` or the subclass's own updates, each returning a new view.
    """

    METADATA: ClassVar[type] = BaseCacheMetaData
    LEAVES: ClassVar[tuple[str, ...]] = ()
    SPEC_LEAVES: ClassVar[tuple[str, ...]] = ()
    KIND: ClassVar[str] = ""

    def __post_init__(self):
        if not isinstance(self.metadata, self.METADATA):
            raise ValueError(f"metadata must be a {self.METADATA.__name__}; got {self.metadata!r}")
        index = self.layer_index
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise ValueError(f"layer_index must be an int or None; got {self.layer_index!r}")
        object.__setattr__(self, "partition_specs", self.normalize_specs(self.partition_specs, self.metadata))
        shapes = self.metadata.leaf_shapes()
        for name in self.LEAVES:
            _check_leaf(name, getattr(self, name), shapes[name], None, self.metadata.LEAF_DIMS[name],
                        self.metadata.LEAF_DTYPES[name])

    # -- pytree -----------------------------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        children = tuple((jax.tree_util.GetAttrKey(name), getattr(self, name)) for name in self.LEAVES)
        return children, (self.metadata, self.partition_specs, self.layer_index)

    def tree_flatten(self):
        leaves = tuple(getattr(self, name) for name in self.LEAVES)
        return leaves, (self.metadata, self.partition_specs, self.layer_index)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation here: JAX unflattens with placeholders (None, ShapeDtypeStruct, shardings, batched
        # tracers) whose shapes are not the cache's.
        view = object.__new__(cls)
        for name, value in zip(cls.LEAVES, children):
            object.__setattr__(view, name, value)
        for name, value in zip(("metadata", "partition_specs", "layer_index"), aux):
            object.__setattr__(view, name, value)
        return view

    # -- partition specs --------------------------------------------------------------------------------------
    @classmethod
    def normalize_specs(cls, partition_specs: Any, metadata: BaseCacheMetaData) -> ViewSpecs:
        """One PartitionSpec per `SPEC_LEAVES`, each checked against its leaf's rank; `None` takes them from
        `metadata.view_specs()` (that is, from `metadata.partition_axis`). A single PartitionSpec (as EasyDeL
        passes one) is a convenience: it is applied to every leaf, cut or padded with None to the leaf's rank
        (`partition.fit_spec`: `P("data", "model")` gives conv `P("data", "model", None)`, SSM
        `P("data", "model", None, None)`, positions `P("data")`)."""
        names = cls.SPEC_LEAVES
        shapes = metadata.leaf_shapes()
        if partition_specs is None:
            partition_specs = metadata.view_specs()
        elif isinstance(partition_specs, PartitionSpec):
            partition_specs = tuple(partition.fit_spec(partition_specs, len(shapes[n])) for n in names)
        elif not (
            isinstance(partition_specs, (tuple, list)) and len(partition_specs) == len(names)
        ):
            raise ValueError(
                f"partition_specs must be a tuple ({', '.join(names)}) of {_COUNT.get(len(names), len(names))} "
                f"PartitionSpecs, or one PartitionSpec for all of them; got {partition_specs!r}"
            )
        specs = tuple(partition.normalize_spec(s, f"partition spec for {n}") for n, s in zip(names, partition_specs))
        for name, spec in zip(names, specs):
            partition.check_spec(spec, shapes[name], metadata.LEAF_DIMS[name], name)
        return specs

    @classmethod
    def check_specs_on_mesh(cls, metadata: BaseCacheMetaData, specs: ViewSpecs, mesh: Mesh) -> None:
        """Every spec's mesh axes exist on `mesh` and divide their dimension (`partition.check_spec`)."""
        shapes = metadata.leaf_shapes()
        for name, spec in zip(cls.SPEC_LEAVES, specs):
            partition.check_spec(spec, shapes[name], metadata.LEAF_DIMS[name], name, mesh)

    @classmethod
    def leaf_spec(cls, specs: ViewSpecs, name: str) -> PartitionSpec:
        """Leaf `name`'s spec; a leaf outside `SPEC_LEAVES` (a scalar counter) is replicated."""
        return dict(zip(cls.SPEC_LEAVES, specs)).get(name, PartitionSpec())

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def leaf_dtypes(cls, metadata: BaseCacheMetaData, dtype: Any, ssm_dtype: Any) -> dict[str, jnp.dtype]:
        """Leaf name -> dtype: the cache `dtype`, `ssm_dtype` or the fixed one, by the metadata's dtype role."""
        chosen = {"dtype": jnp.dtype(dtype), "ssm_dtype": jnp.dtype(ssm_dtype), **FIXED_DTYPES}
        return {name: chosen[metadata.LEAF_DTYPES[name]] for name in cls.LEAVES}

    @classmethod
    def layout(cls, metadata: BaseCacheMetaData, specs: ViewSpecs, dtype: Any,
               ssm_dtype: Any) -> list[tuple[tuple[int, ...], jnp.dtype, PartitionSpec]]:
        """`(shape, dtype, spec)` of each leaf in `LEAVES` order, for `partition.zeros`."""
        shapes, dtypes = metadata.leaf_shapes(), cls.leaf_dtypes(metadata, dtype, ssm_dtype)
        return [(shapes[name], dtypes[name], cls.leaf_spec(specs, name)) for name in cls.LEAVES]

    @classmethod
    def init(
        cls,
        metadata: BaseCacheMetaData,
        partition_specs: ViewSpecs | None = None,
        dtype: Any = jnp.float32,
        layer_index: int | None = None,
        *,
        ssm_dtype: Any = jnp.float32,
        mesh: Mesh | None = None,
    ):
        """A zero view. `dtype` is the conv window's or the keys'/values' (the model's compute dtype),
        `ssm_dtype` the SSM state's (ignored by a view without one).

        With `mesh`, the specs are checked against it and every array is created already sharded as
        `NamedSharding(mesh, spec)`; without one the specs are only recorded.
        """
        return cls.init_many(metadata, [layer_index], partition_specs, dtype, ssm_dtype, mesh)[0]

    @classmethod
    def init_many(
        cls,
        metadata: BaseCacheMetaData,
        layer_indices: list[int | None],
        partition_specs: ViewSpecs | None,
        dtype: Any,
        ssm_dtype: Any,
        mesh: Mesh | None,
    ) -> list:
        """Zero views for `layer_indices`, all made by one call (one jitted call on a mesh)."""
        if not isinstance(metadata, cls.METADATA):
            raise ValueError(f"metadata must be a {cls.METADATA.__name__}; got {metadata!r}")
        dtype = float_dtype(dtype, "dtype")
        ssm_dtype = float_dtype(ssm_dtype, "ssm_dtype")
        specs = cls.normalize_specs(partition_specs, metadata)
        if mesh is not None:
            cls.check_specs_on_mesh(metadata, specs, mesh)
        arrays = partition.zeros(cls.layout(metadata, specs, dtype, ssm_dtype) * len(layer_indices), mesh)
        n = len(cls.LEAVES)
        return [
            cls(
                **dict(zip(cls.LEAVES, arrays[n * i : n * i + n])),
                metadata=metadata,
                partition_specs=specs,
                layer_index=index,
            )
            for i, index in enumerate(layer_indices)
        ]

    # -- updates ----------------------------------------------------------------------------------------------
    def replace(self, **fields: Any):
        """A new view with some leaves replaced; each must keep its shape and dtype (a `lax.while_loop` carry
        must not change type). Use the view's own updates (`update_ssm_state`, `write`, ...) to cast on the way
        in."""
        unknown = sorted(set(fields) - set(self.LEAVES))
        if unknown:
            raise ValueError(f"replace takes only the leaves {list(self.LEAVES)}; got {unknown}")
        shapes = self.metadata.leaf_shapes()
        for name, value in fields.items():
            current = getattr(self, name)
            expected_dtype = jnp.dtype(current.dtype) if hasattr(current, "dtype") else None
            _check_leaf(name, value, shapes[name], expected_dtype, self.metadata.LEAF_DIMS[name],
                        self.metadata.LEAF_DTYPES[name])
        # numpy inputs become device arrays (checked first: jnp.asarray would narrow float64 silently)
        return dataclasses.replace(self, **{name: jnp.asarray(value) for name, value in fields.items()})

    def update_seq(self, num: Any, active_rows: Any = None):
        """Advance every row's position and `seqlen_offset` by `num` (an int or integer scalar, may be traced).
        `active_rows` (b,) bool: only those rows' positions advance (the others were held; `seqlen_offset`, the
        batch's count, advances regardless)."""
        step = _as_int32_step(num)
        rows = jnp.broadcast_to(step, self.positions.shape)
        if active_rows is not None:
            if tuple(jnp.shape(active_rows)) != tuple(self.positions.shape):
                raise ValueError(f"active_rows must have shape {tuple(self.positions.shape)} (batch,); found "
                                 f"{tuple(jnp.shape(active_rows))}")
            rows = jnp.where(active_rows, rows, 0)
        return self.advance(rows, step)

    def advance(self, row_steps: Any, batch_steps: Any):
        """`positions` + `row_steps` (b,) integers (each row's own count) and `seqlen_offset` + `batch_steps` (an
        integer scalar): `update_seq` with a count per row, for a decode loop that advances the counters once at
        its end instead of once per step (`easymamba.generation`)."""
        rows = jnp.asarray(row_steps)
        if tuple(rows.shape) != tuple(self.positions.shape) or not jnp.issubdtype(rows.dtype, jnp.integer):
            raise ValueError(f"row_steps must be integers of shape {tuple(self.positions.shape)} (batch,); found "
                             f"{rows.dtype} of shape {tuple(rows.shape)}")
        step = _as_int32_step(batch_steps)
        return dataclasses.replace(self, positions=(self.positions + rows).astype(jnp.int32),
                                   seqlen_offset=(self.seqlen_offset + step).astype(jnp.int32))

    def reset(self):
        """Every leaf zero (states, positions, offset; `False` for a bool leaf); dtypes, specs and (outside `jit`)
        shardings kept."""
        return dataclasses.replace(self, **{name: jnp.zeros_like(getattr(self, name)) for name in self.LEAVES})

    # -- sharding ---------------------------------------------------------------------------------------------
    def shardings(self, mesh: Mesh):
        """The view's structure with a `NamedSharding` per leaf, for `jax.jit(..., out_shardings=...)`."""
        self.check_specs_on_mesh(self.metadata, self.partition_specs, mesh)
        leaves = [NamedSharding(mesh, self.leaf_spec(self.partition_specs, name)) for name in self.LEAVES]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self), leaves)

    def __repr__(self) -> str:
        def describe(x):
            return f"{jnp.dtype(x.dtype).name}{list(x.shape)}" if hasattr(x, "shape") else repr(x)

        leaves = ", ".join(f"{name}={describe(getattr(self, name))}" for name in self.LEAVES)
        return (f"{type(self).__name__}(layer_index={self.layer_index}, {leaves}, "
                f"partition_specs={self.partition_specs})")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SSMCacheView(BaseCacheView):
    """Shared form of the SSM views (not used on its own): conv window, SSM state, positions, seqlen_offset, with
    `update_conv_state` and `update_ssm_state`. Shapes come from the metadata's `conv_state_shape` and
    `ssm_state_shape`."""

    conv_states: jax.Array
    ssm_states: jax.Array
    positions: Int[Array, "b"]
    seqlen_offset: Int[Array, ""]
    metadata: BaseCacheMetaData
    partition_specs: ViewSpecs = None
    layer_index: int | None = None

    LEAVES: ClassVar[tuple[str, ...]] = LEAVES
    SPEC_LEAVES: ClassVar[tuple[str, ...]] = ("conv_states", "ssm_states", "positions")

    def update_conv_state(self, new_conv_state: Any, cache_position: Any = None):
        """Shift new pre-conv columns into the window.

        new_conv_state:
            `[b, c]`: one decode step. The window rolls left by one and the column lands at index `k - 1`
                (transformers' `conv_states.roll(-1, -1); conv_states[:, :, -1] = new`).
            `[b, c, l]`: `l` columns, oldest first. The window becomes the last `k` columns of
                `concat([window, new], -1)`: for `l >= k` (a prefill) that is `new[..., -k:]`, so a `[b, c, k]`
                window built by the prefill (left zero-padded when the prompt is shorter than `k`) replaces
                the whole window; for `l < k` it continues a chunked prefill.
        cache_position: accepted for EasyDeL's signature and ignored. The window always holds the `k` most
            recent columns, so where it is written does not depend on the position.

        The result is cast to the window's dtype.
        """
        del cache_position  # position-independent, see the docstring
        b, c, k = self.metadata.conv_state_shape
        new_conv_state = jnp.asarray(new_conv_state)
        if new_conv_state.ndim == 2 and tuple(new_conv_state.shape) == (b, c):
            new = new_conv_state[:, :, None]  # (b, c, 1)
        elif new_conv_state.ndim == 3 and tuple(new_conv_state.shape[:2]) == (b, c) and new_conv_state.shape[2] > 0:
            new = new_conv_state  # (b, c, l)
        else:
            raise ValueError(
                f"new_conv_state must have shape {(b, c)} [b, c] or {(b, c, 'l')} [b, c, l] with l >= 1; "
                f"found {tuple(new_conv_state.shape)}"
            )
        new = new.astype(self.conv_states.dtype)
        if new.shape[2] >= k:
            window = new[:, :, new.shape[2] - k :]
        else:
            window = jnp.concatenate([self.conv_states[:, :, new.shape[2] :], new], axis=-1)  # (b, c, k)
        return dataclasses.replace(self, conv_states=window)

    def update_ssm_state(self, new_ssm_state: Any):
        """Replace the SSM state (`[b, h, p, n]` for Mamba-2), cast to the state's dtype (float32 unless asked
        otherwise)."""
        shape = self.metadata.ssm_state_shape
        if not hasattr(new_ssm_state, "shape") or tuple(new_ssm_state.shape) != shape:
            found = tuple(new_ssm_state.shape) if hasattr(new_ssm_state, "shape") else type(new_ssm_state).__name__
            dims = ", ".join(self.metadata.LEAF_DIMS["ssm_states"])
            raise ValueError(f"new_ssm_state [{dims}] must have shape {shape}; found {found}")
        return dataclasses.replace(self, ssm_states=jnp.asarray(new_ssm_state).astype(self.ssm_states.dtype))


@jax.tree_util.register_pytree_with_keys_class
class Mamba2CacheView(SSMCacheView):
    """Per-layer Mamba-2 cache (EasyDeL's `Mamba2CacheView`, without the mutation): conv window `[b, c, k]`,
    SSM state `[b, h, p, n]`, positions `[b]`, seqlen_offset `[]` (see the module docstring)."""

    METADATA: ClassVar[type] = Mamba2CacheMetaData
    KIND: ClassVar[str] = "mamba2"


def place_leaf(value: Any, name: str, spec: PartitionSpec, mesh: Mesh | None) -> jax.Array:
    """Put a host array on the default device, or on `mesh` as `NamedSharding(mesh, spec)` (bits unchanged)."""
    if mesh is None:
        array = jnp.asarray(value)
    else:
        array = jax.device_put(value, NamedSharding(mesh, spec))
    if array.dtype != value.dtype:  # float64 / int64 without jax_enable_x64 would be narrowed silently
        raise ValueError(f"{name} has dtype {value.dtype}, which JAX cannot hold here (enable jax_enable_x64?)")
    return array
