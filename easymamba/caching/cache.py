"""The whole model's cache: one view per layer, as an immutable JAX pytree.

`BaseCache` holds the machinery every family shares; `Mamba2Cache` holds `Mamba2CacheView`s,
`easymamba.caching.mamba1.MambaCache` holds `MambaCacheView`s, and `easymamba.caching.hybrid.HybridCache` holds,
per layer, nothing, one view or several views of the kinds its model's layers keep.

The names follow EasyDeL's `Mamba2Cache` so its users feel at home; unlike it, every update returns a new cache
(safe under `jit`, `lax.while_loop` and buffer donation), the documents round-trip bit for bit, and every
PartitionSpec is checked against its array and mesh before anything is allocated.
"""

import dataclasses
import json
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from easymamba import jsonio
from easymamba.caching import serialization
from easymamba.caching.view import BaseCacheView, Mamba2CacheView, ViewSpecs


def _kinds_summary(kinds: Any) -> str:
    """`layer_cache_kinds` in a few words: its distinct entries, in order of first appearance."""
    seen = list(dict.fromkeys(tuple(k) for k in kinds))
    return ", ".join(map(repr, seen[:6])) + (", ..." if len(seen) > 6 else "")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BaseCache:
    """Shared machinery of the whole-model caches (not used on its own).

    `views[i]` is layer i's view, or `None` in a cache from `init_empty` not yet filled. A subclass sets `VIEW`
    (its view class) and `FORMAT` (the name its documents carry) and is registered with
    `jax.tree_util.register_pytree_with_keys_class`.
    """

    views: tuple[BaseCacheView | None, ...]

    VIEW: ClassVar[type] = BaseCacheView
    FORMAT: ClassVar[str] = ""

    def __post_init__(self):
        name = self.VIEW.__name__
        if not isinstance(self.views, (tuple, list)):
            raise ValueError(f"views must be a tuple of {name} or None; got {type(self.views).__name__}")
        for i, view in enumerate(self.views):
            if view is not None and not isinstance(view, self.VIEW):
                raise ValueError(f"views[{i}] must be a {name} or None; got {type(view).__name__}")
            # a view in another layer's slot would run that layer on this one's state: wrong numbers, no error
            if view is not None and view.layer_index is not None and view.layer_index != i:
                raise ValueError(f"views[{i}] has layer_index {view.layer_index}; slot {i} takes layer {i}'s view "
                                 "(are the views out of order?)")
        object.__setattr__(self, "views", tuple(self.views))

    # -- pytree -----------------------------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("views"), self.views),), None

    def tree_flatten(self):
        return (self.views,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        cache = object.__new__(cls)
        object.__setattr__(cache, "views", tuple(children[0]))
        return cache

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def init_cache(
        cls,
        num_hidden_layers: int,
        metadata: Any,
        dtype: Any = jnp.float32,
        partition_specs: ViewSpecs | None = None,
        mesh: Mesh | None = None,
        *,
        ssm_dtype: Any = jnp.float32,
    ):
        """Zero views for layers `0 .. num_hidden_layers - 1` (`views[i].layer_index == i`).

        `dtype`: conv windows' dtype (the model's compute dtype). `ssm_dtype`: SSM states' (float32 default).
        `partition_specs`: `(conv, ssm, positions)`; `None` takes them from `metadata.partition_axis`.
        `mesh`: check the specs against it and create every array sharded in place (one jitted call).
        """
        if num_hidden_layers != metadata.num_hidden_layers:
            raise ValueError(
                f"num_hidden_layers ({num_hidden_layers}) must equal metadata.num_hidden_layers "
                f"({metadata.num_hidden_layers})"
            )
        layers = list(range(num_hidden_layers))
        return cls(tuple(cls.VIEW.init_many(metadata, layers, partition_specs, dtype, ssm_dtype, mesh)))

    @classmethod
    def init_empty(cls, num_hidden_layers: int):
        """A cache of `num_hidden_layers` empty slots (`None`), filled with `update_view`."""
        if isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int) or num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be a non-negative int; got {num_hidden_layers!r}")
        return cls((None,) * num_hidden_layers)

    # -- access -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, layer_idx: int) -> BaseCacheView | None:
        return self.views[layer_idx]

    def __iter__(self):
        return iter(self.views)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.views)

    def _first_view(self) -> BaseCacheView | None:
        return next((view for view in self.views if view is not None), None)

    @property
    def metadata(self) -> Any:
        """The views' shared metadata (`None` while every slot is empty)."""
        view = self._first_view()
        return None if view is None else view.metadata

    @property
    def seqlen_offset(self) -> jax.Array | None:
        """Tokens consumed (int32 scalar array; every view advances together), `None` while every slot is empty."""
        view = self._first_view()
        return None if view is None else view.seqlen_offset

    def _index(self, layer_idx: int) -> int:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise ValueError(f"layer_idx must be a Python int; got {layer_idx!r}")
        if not -len(self.views) <= layer_idx < len(self.views):
            raise ValueError(f"layer_idx {layer_idx} is out of range for a cache of {len(self.views)} layers")
        return layer_idx % len(self.views)

    def _view(self, layer_idx: int) -> BaseCacheView:
        view = self.views[self._index(layer_idx)]
        if view is None:
            raise ValueError(f"layer {layer_idx} has no view (an init_empty slot); set one with update_view")
        return view

    def _with_view(self, layer_idx: int, view: Any):
        views = list(self.views)
        views[self._index(layer_idx)] = view
        return self.with_views(views)

    def with_views(self, views: Any):
        """A cache of this kind holding `views` (the per-layer entries; a subclass with static fields beside
        `views` keeps them): how a forward returns its renewed cache."""
        return type(self)(tuple(views))

    def _map_views(self, fn: Any) -> tuple:
        """`views` with `fn` applied to every view (empty slots stay `None`)."""
        return tuple(None if v is None else fn(v) for v in self.views)

    def missing_layers(self) -> list[int]:
        """Indices of the layers whose slot should hold a view but is empty (`None`, from `init_empty`)."""
        return [i for i, view in enumerate(self.views) if view is None]

    # -- updates ----------------------------------------------------------------------------------------------
    def update_conv_state(self, layer_idx: int, new_conv_state: Any, cache_position: Any = None):
        """`views[layer_idx].update_conv_state(...)` in a new cache (`[b, c]` rolls in a column; `[b, c, l]`
        shifts in `l` columns, replacing the window when `l >= k`)."""
        return self._with_view(layer_idx, self._view(layer_idx).update_conv_state(new_conv_state, cache_position))

    def update_ssm_state(self, layer_idx: int, new_ssm_state: Any):
        """`views[layer_idx].update_ssm_state(new)` in a new cache (`[b, h, p, n]` for Mamba-2)."""
        return self._with_view(layer_idx, self._view(layer_idx).update_ssm_state(new_ssm_state))

    def update_view(self, layer_idx: int, view: BaseCacheView):
        """A new cache with `views[layer_idx] = view`.

        The view must agree with the cache: its `layer_index` is `layer_idx` (or `None`, then set), its metadata
        equals the other views', and when the slot is filled its leaf dtypes and partition specs are the
        slot's (so the cache's pytree type is unchanged, as a `lax.while_loop` carry requires).
        """
        index = self._index(layer_idx)
        if not isinstance(view, self.VIEW):
            raise ValueError(f"view must be a {self.VIEW.__name__}; got {type(view).__name__}")
        if view.layer_index is not None and view.layer_index != index:
            raise ValueError(f"the view has layer_index {view.layer_index}; it cannot go in slot {index}")
        others = [v for i, v in enumerate(self.views) if v is not None and i != index]
        if others and view.metadata != others[0].metadata:
            view.metadata.check_compatible(others[0].metadata)
            raise ValueError(
                f"the view's partition_axis {view.metadata.partition_axis} differs from the cache's "
                f"{others[0].metadata.partition_axis}"
            )
        current = self.views[index]
        if current is not None:
            if view.metadata != current.metadata:
                view.metadata.check_compatible(current.metadata)
            if view.partition_specs != current.partition_specs:
                raise ValueError(
                    f"the view's partition_specs {view.partition_specs} differ from slot {index}'s "
                    f"{current.partition_specs}"
                )
            for name in view.LEAVES:
                new, old = jnp.dtype(getattr(view, name).dtype), jnp.dtype(getattr(current, name).dtype)
                if new != old:
                    raise ValueError(f"the view's {name} has dtype {new}; slot {index} holds {old}")
        if view.layer_index is None:
            view = dataclasses.replace(view, layer_index=index)
        return self._with_view(index, view)

    def update_seq(self, num: Any, active_rows: Any = None):
        """Advance every view's `positions` and `seqlen_offset` by `num` (an int or an integer scalar array,
        traced or not, e.g. inside `lax.while_loop`); with `active_rows` (b,) bool only those rows' positions."""
        return self.with_views(self._map_views(lambda v: v.update_seq(num, active_rows)))

    def advance(self, row_steps: Any, batch_steps: Any):
        """Every view's `positions` + `row_steps` (b,) and `seqlen_offset` + `batch_steps` (`BaseCacheView.advance`)."""
        return self.with_views(self._map_views(lambda v: v.advance(row_steps, batch_steps)))

    def reset(self):
        """Zero states, positions and offsets in every view; empty slots stay empty."""
        return self.with_views(self._map_views(lambda v: v.reset()))

    def check_compatible(self, other: Any, batch_size: int | None = None) -> None:
        """Raise `ValueError` naming the first size where this cache does not fit `other` (a model config or a
        metadata of this cache's kind) called with `batch_size` rows (`None`: any).

        A model whose config (or metadata) lists `layer_cache_kinds` other than this cache's one view per layer
        keeps a `HybridCache`; this cache is refused by both names before any size is compared.
        """
        kinds = getattr(other, "layer_cache_kinds", None)
        if kinds is not None and any(tuple(k) != (self.VIEW.KIND,) for k in kinds):
            raise ValueError(
                f"the cache does not fit this model: it is a {type(self).__name__}, but the model keeps a HybridCache "
                f"(its layers' cache kinds are {_kinds_summary(kinds)})"
            )
        expected_layers = getattr(other, "num_hidden_layers", None)
        if expected_layers is not None and expected_layers != len(self.views):
            raise ValueError(
                f"the cache does not fit this model: it has {len(self.views)} layers, "
                f"but the model needs num_hidden_layers={expected_layers}"
            )
        for view in self.views:
            if view is not None:
                view.metadata.check_compatible(other, batch_size)

    def shardings(self, mesh: Mesh):
        """The cache's structure with a `NamedSharding` per leaf, for `jax.jit(..., out_shardings=...)`."""
        aux = self.tree_flatten()[1]
        return type(self).tree_unflatten(aux, (self._map_views(lambda v: v.shardings(mesh)),))

    # -- documents --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (numpy arrays, bfloat16 as `ml_dtypes.bfloat16`) that `from_dict` reads back exactly."""
        return serialization.views_to_dict(self.views, self.FORMAT)

    @classmethod
    def from_dict(cls, d: dict[str, Any], mesh: Mesh | None = None):
        """Read `to_dict`'s output; with `mesh`, each array is placed as `NamedSharding(mesh, its spec)`."""
        return cls(serialization.views_from_dict(d, mesh, cls.VIEW, cls.FORMAT))

    def to_json(self) -> str:
        """JSON text; arrays as `{"dtype", "shape", "data": base64 of little-endian bytes}`."""
        return json.dumps(serialization.dict_to_jsonable(self.to_dict()), separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str, mesh: Mesh | None = None):
        d = jsonio.loads(s, "the cache JSON")  # ValueError for bad text, duplicate keys or deep nesting
        return cls.from_dict(serialization.jsonable_to_dict(d, cls.VIEW.LEAVES), mesh)

    def __repr__(self) -> str:
        filled = sum(view is not None for view in self.views)
        return f"{type(self).__name__}({len(self.views)} layers, {filled} filled, metadata={self.metadata})"


@jax.tree_util.register_pytree_with_keys_class
class Mamba2Cache(BaseCache):
    """The Mamba-2 cache: `views[i]` is layer i's `Mamba2CacheView`, or `None` in a cache from `init_empty` not
    yet filled. Documents carry the format name `easymamba.Mamba2Cache`."""

    VIEW: ClassVar[type] = Mamba2CacheView
    FORMAT: ClassVar[str] = serialization.FORMAT
