"""The Mamba-1 inference cache: metadata, per-layer view and whole-model cache, in the Mamba-2 cache's form; and
Falcon-Mamba's, the same classes under its own model_type and document format.

Leaves of a `MambaCacheView` (letters of `easymamba/typing.py`):

    conv_states    [b, e, k]     the k most recent pre-conv x columns (in_proj's x half), newest last: Hugging
                                 Face's convention (`get_conv_state(i)` of transformers 5.23 has this shape);
                                 dtype = the cache dtype (the model's compute dtype)
    ssm_states     [b, e, n]     h_t of the selective scan, one row of n per inner channel; float32 by default
                                 (HF 5.23's `get_recurrent_state(i)`, same shape)
    positions      [b] int32     tokens each row has consumed
    seqlen_offset  [] int32      tokens the cache has consumed

Everything else (functional updates, pytree, bit-exact dict/JSON documents, checked PartitionSpecs, sharded
init) is the machinery of `BaseCacheMetaData` / `SSMCacheView` / `BaseCache` that the Mamba-2 cache uses too.

Sharding: Mamba-1 has no heads; every inner channel e has its own A row and its own state row, so e plays the
heads' part. `PartitionAxis.head_axis` shards e in both the conv window and the SSM state (the channels of the
conv are exactly the SSM's, unlike Mamba-2's [x | B | C]), `state_axis` shards n and `conv_kernel_axis` k.
`head_dim_axis` and `conv_channel_axis` have no dimension here and must be left `None`.
"""

import dataclasses
from typing import Any, ClassVar

import jax
from jax.sharding import PartitionSpec

from easymamba.caching.cache import BaseCache
from easymamba.caching.metadata import BaseCacheMetaData
from easymamba.caching.partition import POSITIONS_DIMS, PartitionAxis
from easymamba.caching.view import SSMCacheView

__all__ = ["MambaCacheMetaData", "MambaCacheView", "MambaCache", "FalconMambaCacheMetaData", "FalconMambaCacheView",
           "FalconMambaCache"]

MAMBA1_CONV_DIMS = ("b", "e", "k")
MAMBA1_SSM_DIMS = ("b", "e", "n")
FORMAT = "easymamba.MambaCache"


@dataclasses.dataclass(frozen=True)
class MambaCacheMetaData(BaseCacheMetaData):
    """Sizes of one Mamba-1 cache and how it is sharded: conv window `[b, e, k]`, SSM state `[b, e, n]`,
    positions `[b]`, with `e = intermediate_size`. Construction validates; an invalid instance cannot exist."""

    num_hidden_layers: int
    batch_size: int
    intermediate_size: int
    state_size: int
    conv_kernel_size: int

    SIZE_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_hidden_layers",
        "batch_size",
        "intermediate_size",
        "state_size",
        "conv_kernel_size",
    )
    # Config attribute read for each metadata field (Hugging Face `MambaConfig` names).
    CONFIG_ATTRS: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_hidden_layers",
        "intermediate_size": "intermediate_size",
        "state_size": "state_size",
        "conv_kernel_size": "conv_kernel",
    }
    LEAF_DIMS: ClassVar[dict[str, tuple[str, ...]]] = {
        "conv_states": MAMBA1_CONV_DIMS,
        "ssm_states": MAMBA1_SSM_DIMS,
        "positions": POSITIONS_DIMS,
        "seqlen_offset": (),
    }
    MODEL_TYPE: ClassVar[str] = "mamba"

    def _check_sizes(self) -> None:
        for name in ("head_dim_axis", "conv_channel_axis"):
            entry = getattr(self.partition_axis, name)
            if entry is not None:
                raise ValueError(
                    f"PartitionAxis.{name} ({entry!r}) must be None for a Mamba-1 cache: it has no such dimension "
                    "(the inner channels e of both states are sharded by head_axis)"
                )

    @classmethod
    def create(
        cls,
        partition_axis: PartitionAxis = PartitionAxis(),
        *,
        num_hidden_layers: int,
        batch_size: int,
        intermediate_size: int,
        state_size: int,
        conv_kernel_size: int,
    ) -> "MambaCacheMetaData":
        """Validated metadata. Raises `ValueError` when a size is not a positive int or when `partition_axis`
        names an axis for a dimension Mamba-1 lacks (`head_dim_axis`, `conv_channel_axis`)."""
        return cls(
            partition_axis=partition_axis,
            num_hidden_layers=num_hidden_layers,
            batch_size=batch_size,
            intermediate_size=intermediate_size,
            state_size=state_size,
            conv_kernel_size=conv_kernel_size,
        )

    @classmethod
    def from_config(
        cls, config: Any, batch_size: int, partition_axis: PartitionAxis = PartitionAxis()
    ) -> "MambaCacheMetaData":
        """Metadata for `config` (anything with `MambaConfig`'s attribute names) and `batch_size` rows."""
        return super().from_config(config, batch_size, partition_axis)

    @property
    def conv_state_shape(self) -> tuple[int, int, int]:
        return (self.batch_size, self.intermediate_size, self.conv_kernel_size)  # (b, e, k)

    @property
    def ssm_state_shape(self) -> tuple[int, int, int]:
        return (self.batch_size, self.intermediate_size, self.state_size)  # (b, e, n)

    def view_specs(self) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
        """conv `[b, e, k]` -> (batch, head, conv_kernel); SSM `[b, e, n]` -> (batch, head, state); positions `[b]`."""
        axis = self.partition_axis
        return (
            PartitionSpec(axis.batch_axis, axis.head_axis, axis.conv_kernel_axis),
            PartitionSpec(axis.batch_axis, axis.head_axis, axis.state_axis),
            axis.positions_spec(),
        )


@jax.tree_util.register_pytree_with_keys_class
class MambaCacheView(SSMCacheView):
    """Per-layer Mamba-1 cache: conv window `[b, e, k]`, SSM state `[b, e, n]`, positions `[b]`, seqlen_offset `[]`.

    Same methods as `Mamba2CacheView` (`init`, `update_conv_state`, `update_ssm_state`, `update_seq`, `reset`,
    `replace`, `shardings`), each returning a new view.
    """

    METADATA: ClassVar[type] = MambaCacheMetaData
    KIND: ClassVar[str] = "mamba"


@jax.tree_util.register_pytree_with_keys_class
class MambaCache(BaseCache):
    """The Mamba-1 cache: `views[i]` is layer i's `MambaCacheView`, or `None` in a cache from `init_empty` not yet
    filled. Same methods as `Mamba2Cache`; documents carry the format name `easymamba.MambaCache`."""

    VIEW: ClassVar[type] = MambaCacheView
    FORMAT: ClassVar[str] = FORMAT


# ---- Falcon-Mamba --------------------------------------------------------------------------------------------
# Falcon-Mamba keeps exactly Mamba-1's states (its mixer adds weightless norms, no state). Its cache is Mamba-1's
# under its own model_type and document format, so that a cache built for one family is refused by name by the
# other (the compatibility check compares model_type before any size).


@dataclasses.dataclass(frozen=True)
class FalconMambaCacheMetaData(MambaCacheMetaData):
    """`MambaCacheMetaData` for Falcon-Mamba configs (`model_type` "falcon_mamba"): the same sizes and shapes."""

    MODEL_TYPE: ClassVar[str] = "falcon_mamba"


@jax.tree_util.register_pytree_with_keys_class
class FalconMambaCacheView(MambaCacheView):
    """One Falcon-Mamba layer's cache: `MambaCacheView`'s leaves, with `FalconMambaCacheMetaData`."""

    METADATA: ClassVar[type] = FalconMambaCacheMetaData


@jax.tree_util.register_pytree_with_keys_class
class FalconMambaCache(MambaCache):
    """The Falcon-Mamba cache: `MambaCache` of `FalconMambaCacheView`s; documents carry the format name
    `easymamba.FalconMambaCache`."""

    VIEW: ClassVar[type] = FalconMambaCacheView
    FORMAT: ClassVar[str] = "easymamba.FalconMambaCache"
