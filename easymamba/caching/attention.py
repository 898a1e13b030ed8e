"""An attention layer's key/value cache: metadata and per-layer view, in the SSM caches' form.

Leaves of an `AttentionCacheView` (letters: b batch, t slot (`max_length` of them), kv key/value heads, hd head dim):

    keys           [b, t, kv, hd]  preallocated; slot j holds the key of the j-th token the batch wrote
                                   (`seqlen_offset` counts them); dtype = the cache dtype (the model's compute
                                   dtype)
    values         [b, t, kv, hd]  the values, likewise
    valid          [b, t] bool     slot j of row r holds a real token (not padding) that later tokens attend to
    positions      [b] int32       tokens each row has consumed (as in the SSM views)
    seqlen_offset  [] int32        the next slot to write, shared by every row; an array, so it can advance in
                                   `lax.while_loop`

Slots are written in the order the batch consumes tokens, padding included (left-padded prompts write their pads
with `valid = False`), so slot j is the same step for every row and one `dynamic_update_slice` writes a whole
step. A row's real tokens so far, `valid.sum(-1)` (`real_tokens()`), is the rotary position of its next token.

`write` puts new slots at `seqlen_offset` and does not advance it: the caller advances every view of the cache
together with `update_seq` / `advance`, as for the SSM views, so all layers' counters stay equal.

Sharding (`PartitionAxis`): `batch_axis` shards b of every leaf, `kv_head_axis` shards kv (as the attention's key
and value projections are sharded by head; a sharded model's rules replicate kv when it does not divide the mesh
axis); t and hd stay whole. An axis that does not divide kv is refused when the cache is made on a mesh.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Bool, Int

from easymamba.caching.metadata import BaseCacheMetaData
from easymamba.caching.partition import POSITIONS_DIMS, PartitionAxis
from easymamba.caching.view import BaseCacheView, ViewSpecs

__all__ = ["AttentionCacheMetaData", "AttentionCacheView"]

KV_DIMS = ("b", "t", "kv", "hd")
VALID_DIMS = ("b", "t")


@dataclasses.dataclass(frozen=True)
class AttentionCacheMetaData(BaseCacheMetaData):
    """Sizes of one attention layer's key/value cache and how it is sharded: keys and values `[b, t, kv, hd]` with
    `t = max_length` slots, `valid [b, t]`, positions `[b]`. Construction validates; an invalid instance cannot
    exist."""

    batch_size: int
    max_length: int
    num_key_value_heads: int
    head_dim: int

    SIZE_FIELDS: ClassVar[tuple[str, ...]] = ("batch_size", "max_length", "num_key_value_heads", "head_dim")
    # Read from `easymamba.config.parts.AttentionConfig`; max_length is the caller's (how many tokens the cache
    # must hold), not the model's.
    CONFIG_ATTRS: ClassVar[dict[str, str]] = {"num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim"}
    LEAF_DIMS: ClassVar[dict[str, tuple[str, ...]]] = {
        "keys": KV_DIMS,
        "values": KV_DIMS,
        "valid": VALID_DIMS,
        "positions": POSITIONS_DIMS,
        "seqlen_offset": (),
    }
    LEAF_DTYPES: ClassVar[dict[str, str]] = {
        "keys": "dtype",
        "values": "dtype",
        "valid": "bool",
        "positions": "int32",
        "seqlen_offset": "int32",
    }
    MODEL_TYPE: ClassVar[str] = ""  # an attention part belongs to many families; the hybrid cache checks the family

    @classmethod
    def create(
        cls,
        partition_axis: PartitionAxis = PartitionAxis(),
        *,
        batch_size: int,
        max_length: int,
        num_key_value_heads: int,
        head_dim: int,
    ) -> "AttentionCacheMetaData":
        """Validated metadata. Raises `ValueError` when a size is not a positive int."""
        return cls(
            partition_axis=partition_axis,
            batch_size=batch_size,
            max_length=max_length,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
        )

    @classmethod
    def from_config(
        cls,
        attention_config: Any,
        batch_size: int,
        max_length: int,
        partition_axis: PartitionAxis = PartitionAxis(),
    ) -> "AttentionCacheMetaData":
        """Metadata for `attention_config` (an `easymamba.config.parts.AttentionConfig`, or anything with its
        `num_key_value_heads` and `head_dim`), `batch_size` rows and `max_length` slots."""
        return cls.create(partition_axis, batch_size=batch_size, max_length=max_length,
                          **cls._sizes_from_config(attention_config))

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, self.max_length, self.num_key_value_heads, self.head_dim)  # (b, t, kv, hd)

    @property
    def valid_shape(self) -> tuple[int, int]:
        return (self.batch_size, self.max_length)  # (b, t)

    def leaf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "keys": self.kv_shape,
            "values": self.kv_shape,
            "valid": self.valid_shape,
            "positions": self.positions_shape,
            "seqlen_offset": (),
        }

    def view_specs(self) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec, PartitionSpec]:
        """keys, values `[b, t, kv, hd]` -> (batch, None, head, None); valid `[b, t]` -> (batch, None);
        positions `[b]` -> (batch,)."""
        axis = self.partition_axis
        kv = PartitionSpec(axis.batch_axis, None, axis.kv_head_axis, None)
        return kv, kv, PartitionSpec(axis.batch_axis, None), axis.positions_spec()

    def check_compatible(self, other: Any, batch_size: int | None = None, max_length: int | None = None) -> None:
        """Raise `ValueError` naming the first size where this cache does not fit `other`.

        `other` is another `AttentionCacheMetaData` or an attention config (read as in `from_config`). Every size
        must be equal except `max_length`: a cache with more slots than needed fits. The slots needed are
        `max_length` when given, else `other.max_length` for a metadata; a config states none, so without
        `max_length` the slots are not checked. `batch_size` as in `BaseCacheMetaData.check_compatible`.
        """
        needed = max_length
        if isinstance(other, AttentionCacheMetaData):
            needed = other.max_length if needed is None else needed
            other = dataclasses.replace(other, max_length=self.max_length)  # compared below, as "at least"
        super().check_compatible(other, batch_size)
        if needed is not None and needed > self.max_length:
            raise ValueError(
                f"the cache does not fit this model: it was built with max_length={self.max_length}, "
                f"but the model needs max_length >= {needed}"
            )


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AttentionCacheView(BaseCacheView):
    """Per-layer key/value cache: keys and values `[b, t, kv, hd]`, `valid [b, t]` bool, positions `[b]`,
    seqlen_offset `[]` (see the module docstring).

    Methods as the SSM views (`init`, `init_many`, `replace`, `update_seq`, `advance`, `reset`, `shardings`),
    each returning a new view, plus `write` (new slots at `seqlen_offset`) and `real_tokens`.
    `partition_specs` is `(keys, values, valid, positions)`.
    """

    keys: jax.Array
    values: jax.Array
    valid: Bool[Array, "b t"]
    positions: Int[Array, "b"]
    seqlen_offset: Int[Array, ""]
    metadata: AttentionCacheMetaData
    partition_specs: ViewSpecs = None
    layer_index: int | None = None

    METADATA: ClassVar[type] = AttentionCacheMetaData
    LEAVES: ClassVar[tuple[str, ...]] = ("keys", "values", "valid", "positions", "seqlen_offset")
    SPEC_LEAVES: ClassVar[tuple[str, ...]] = ("keys", "values", "valid", "positions")
    KIND: ClassVar[str] = "attention"

    def write(self, k_new: Any, v_new: Any, valid_new: Any) -> "AttentionCacheView":
        """Write `l` new slots at `seqlen_offset`: keys `k_new [b, l, kv, hd]`, values `v_new [b, l, kv, hd]` (cast
        to the cache dtype) and `valid_new [b, l]` (bool, or integers where nonzero means a real token, as an
        attention mask).

        The offset is NOT advanced: call `update_seq(l)` (on the whole cache, once per step) afterwards, as for the
        SSM views. Works traced, inside `jit`, `lax.while_loop` and `lax.fori_loop` (`jax.lax.dynamic_update_slice`).

        Overflow: when the offset is concrete (outside `jit`), `seqlen_offset + l > max_length` raises
        `ValueError`. Traced, the offset's value is unknown here, and `dynamic_update_slice` clamps the start to
        `max_length - l`: an overflowing write overwrites the newest slots instead of failing, so a caller under
        `jit` must ensure `seqlen_offset + l <= max_length` before it starts (the decode loop checks its length
        against the cache once, outside `jit`).

        On a mesh, use `AxisType.Auto` axes as the models do (`easymamba.make_mesh`): under `Explicit` axes JAX
        requires the update's sharding to equal the cache's and refuses the write.
        """
        b, t, kv, hd = self.metadata.kv_shape
        k_new, v_new, valid_new = jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(valid_new)
        if k_new.ndim != 4 or (k_new.shape[0], k_new.shape[2], k_new.shape[3]) != (b, kv, hd) or k_new.shape[1] < 1:
            raise ValueError(f"k_new [b, l, kv, hd] must have shape {(b, 'l', kv, hd)} with l >= 1; found "
                             f"{tuple(k_new.shape)}")
        length = k_new.shape[1]
        if tuple(v_new.shape) != tuple(k_new.shape):
            raise ValueError(f"v_new [b, l, kv, hd] must have k_new's shape {tuple(k_new.shape)}; found "
                             f"{tuple(v_new.shape)}")
        if tuple(valid_new.shape) != (b, length):
            raise ValueError(f"valid_new [b, l] must have shape {(b, length)}; found {tuple(valid_new.shape)}")
        if not (valid_new.dtype == jnp.bool_ or jnp.issubdtype(valid_new.dtype, jnp.integer)):
            raise ValueError(f"valid_new must be bool (or integers, nonzero = real token); found {valid_new.dtype}")
        if length > t:
            raise ValueError(f"cannot write {length} slots into a cache of max_length={t}")
        offset = self.seqlen_offset
        if not isinstance(offset, jax.core.Tracer) and int(offset) + length > t:
            raise ValueError(f"writing {length} slots at seqlen_offset {int(offset)} overflows the cache: "
                             f"{int(offset)} + {length} > max_length={t}; build the cache with a larger max_length")
        zero = jnp.zeros((), jnp.int32)
        start = offset.astype(jnp.int32)
        keys = jax.lax.dynamic_update_slice(self.keys, k_new.astype(self.keys.dtype), (zero, start, zero, zero))
        values = jax.lax.dynamic_update_slice(self.values, v_new.astype(self.values.dtype), (zero, start, zero, zero))
        valid = jax.lax.dynamic_update_slice(self.valid, valid_new != 0, (zero, start))
        return dataclasses.replace(self, keys=keys, values=values, valid=valid)

    def real_tokens(self) -> Int[Array, "b"]:
        """`[b]` int32: each row's real (valid) tokens so far, `valid.sum(-1)`; the rotary position of its next
        token."""
        return self.valid.sum(-1, dtype=jnp.int32)
