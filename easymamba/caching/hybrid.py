"""The cache of a hybrid model: per layer nothing, one view, or several views side by side, as one JAX pytree.

A hybrid model mixes layers with Mamba-2 mixers, attention, and no state at all (MLP / MoE); some families put an
attention and a Mamba-2 mixer side by side in one layer. Its config lists, per layer, the cache kinds the layer
keeps (`layer_cache_kinds`, see `easymamba.config.parts`): `()`, `("mamba2",)`, `("attention",)`,
`("attention", "mamba2")`, ... Kinds and their views:

    "mamba2"     Mamba2CacheView     metadata from `config.mixer_config` (a `Mamba2MixerConfig`)
    "mamba"      MambaCacheView      metadata from `config.mixer_config` (`MambaConfig`'s attribute names)
    "attention"  AttentionCacheView  metadata from `config.attention_config` (an `AttentionConfig`) and the
                                     caller's `max_length`

`HybridCacheMetaData` holds the family's `model_type` and each layer's tuple of view metadata (`()` for a layer
without state). `HybridCache.views[i]` is `None` (a stateless layer, or a slot not filled yet), the layer's view,
or, for a layer of several kinds, the tuple of its views in the kinds' order. Every view's `layer_index` is `i`;
all views advance together (`update_seq`, `advance`), so `seqlen_offset` is any view's.

The machinery is `BaseCache`'s and the views' own; documents carry the format name `easymamba.HybridCache`:

    {"format": "easymamba.HybridCache", "version": 1, "num_hidden_layers": L,
     "metadata": {"model_type": ..., "layers": [[{"kind": "attention", ...sizes, "partition_axis": {...}}, ...]]},
     "views": [None | [{"kind": "mamba2", ...that view's document (`serialization.view_to_dict`)}, ...], ...]}
"""

import dataclasses
import json
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from easymamba import jsonio
from easymamba.caching import partition, serialization
from easymamba.caching.attention import AttentionCacheMetaData, AttentionCacheView
from easymamba.caching.cache import BaseCache, Mamba2Cache
from easymamba.caching.mamba1 import MambaCache, MambaCacheView
from easymamba.caching.metadata import BaseCacheMetaData
from easymamba.caching.partition import PartitionAxis
from easymamba.caching.view import BaseCacheView, Mamba2CacheView, float_dtype

__all__ = ["HybridCacheMetaData", "HybridCache"]

FORMAT = "easymamba.HybridCache"
VIEW_CLASSES: dict[str, type[BaseCacheView]] = {
    cls.KIND: cls for cls in (Mamba2CacheView, MambaCacheView, AttentionCacheView)
}
_KIND_OF = {cls.METADATA: kind for kind, cls in VIEW_CLASSES.items()}
_SSM_KINDS = ("mamba2", "mamba")
_MISFIT = "the cache does not fit this model: "
# The caches of models without `layer_cache_kinds`, by the model_type their metadata fits.
_PLAIN_CACHES = {cls.VIEW.METADATA.MODEL_TYPE: cls for cls in (Mamba2Cache, MambaCache)}


def _kind_of(metadata: Any, where: str) -> str:
    kind = _KIND_OF.get(type(metadata))
    if kind is None:
        raise ValueError(f"{where} must be the metadata of a view of kind {sorted(VIEW_CLASSES)} "
                         f"({', '.join(c.__name__ for c in _KIND_OF)}); got {type(metadata).__name__}")
    return kind


def _parts(entry: Any) -> tuple:
    """A layer's views as a tuple (`()` for `None`)."""
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class HybridCacheMetaData:
    """The static description of a hybrid cache: the family and, per layer, its views' metadata.

    model_type  the `model_type` of the configs it fits (checked by `check_compatible`)
    layers      per layer, a tuple of view metadata (`Mamba2CacheMetaData`, `MambaCacheMetaData`,
                `AttentionCacheMetaData`), `()` for a layer without state; the kinds follow from their classes

    Every view has the same `batch_size`, every attention view the same `max_length`, and no layer lists a kind
    twice. Frozen and hashable: it is the cache's static pytree part.
    """

    model_type: str
    layers: tuple[tuple[BaseCacheMetaData, ...], ...]

    def __post_init__(self):
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ValueError(f"model_type must be a non-empty str; got {self.model_type!r}")
        if not isinstance(self.layers, (tuple, list)) or not self.layers:
            raise ValueError(f"layers must be a non-empty tuple (one tuple of view metadata per layer); "
                             f"got {self.layers!r}")
        layers = []
        for i, parts in enumerate(self.layers):
            if not isinstance(parts, (tuple, list)):
                raise ValueError(f"layers[{i}] must be a tuple of view metadata (() for a layer without state); "
                                 f"got {type(parts).__name__}")
            kinds = [_kind_of(meta, f"layers[{i}][{j}]") for j, meta in enumerate(parts)]
            twice = next((kind for j, kind in enumerate(kinds) if kind in kinds[:j]), None)
            if twice is not None:
                raise ValueError(f"layers[{i}] lists kind {twice!r} twice; a layer keeps one view of each kind")
            layers.append(tuple(parts))
        object.__setattr__(self, "layers", tuple(layers))
        first: dict[str, tuple[int, int]] = {}
        for i, parts in enumerate(self.layers):
            for meta in parts:
                sizes = {"batch_size": meta.batch_size}
                if isinstance(meta, AttentionCacheMetaData):
                    sizes["max_length"] = meta.max_length
                for name, value in sizes.items():
                    if name not in first:
                        first[name] = (i, value)
                    elif first[name][1] != value:
                        raise ValueError(f"layer {i} has {name}={value}, but layer {first[name][0]} has "
                                         f"{name}={first[name][1]}; every view of a cache shares it")

    @classmethod
    def from_config(
        cls,
        config: Any,
        batch_size: int,
        max_length: int | None = None,
        partition_axis: PartitionAxis = PartitionAxis(),
    ) -> "HybridCacheMetaData":
        """Metadata for a hybrid family's `config` and `batch_size` rows.

        Reads `config.model_type` and `config.layer_cache_kinds`; the views' sizes come from
        `config.mixer_config` ("mamba2", "mamba") and `config.attention_config` ("attention"). `max_length`, the
        tokens the attention views hold (prompt and generated), is required when some layer has attention and
        unused otherwise.
        """
        model_type = getattr(config, "model_type", None)
        if not isinstance(model_type, str):
            raise ValueError(f"config {type(config).__name__} has no str model_type; got {model_type!r}")
        kinds = getattr(config, "layer_cache_kinds", None)
        if kinds is None:
            raise ValueError(f"config {type(config).__name__} (model_type {model_type!r}) has no layer_cache_kinds: "
                             "it is not a hybrid family's config")
        if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)):
            raise ValueError(f"config.layer_cache_kinds must be a tuple of per-layer tuples of kinds; got {kinds!r}")
        made: dict[str, BaseCacheMetaData] = {}  # one instance per kind, shared by its layers

        def meta_for(kind: str, layer: int) -> BaseCacheMetaData:
            if kind not in made:
                if kind == "attention":
                    if max_length is None:
                        raise ValueError(f"max_length is required: layer {layer} has attention, whose key/value "
                                         "cache preallocates max_length slots (prompt + new tokens)")
                    made[kind] = AttentionCacheMetaData.from_config(
                        _part(config, "attention_config", kind), batch_size, max_length, partition_axis)
                else:
                    made[kind] = VIEW_CLASSES[kind].METADATA.from_config(
                        _part(config, "mixer_config", kind), batch_size, partition_axis)
            return made[kind]

        layers = []
        for i, layer_kinds in enumerate(kinds):
            if isinstance(layer_kinds, str) or not isinstance(layer_kinds, (tuple, list)):
                raise ValueError(f"config.layer_cache_kinds[{i}] must be a tuple of kinds (() for a layer without "
                                 f"state); got {layer_kinds!r}")
            unknown = [kind for kind in layer_kinds if kind not in VIEW_CLASSES]
            if unknown:
                raise ValueError(f"config.layer_cache_kinds[{i}] has unknown kind {unknown[0]!r}; "
                                 f"known: {list(VIEW_CLASSES)}")
            layers.append(tuple(meta_for(kind, i) for kind in layer_kinds))
        return cls(model_type, tuple(layers))

    # -- derived ----------------------------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_cache_kinds(self) -> tuple[tuple[str, ...], ...]:
        """Per layer, its views' kinds (the config's `layer_cache_kinds`)."""
        return tuple(tuple(_KIND_OF[type(meta)] for meta in parts) for parts in self.layers)

    @property
    def batch_size(self) -> int | None:
        """The views' batch size (`None` when no layer keeps state)."""
        return next((meta.batch_size for parts in self.layers for meta in parts), None)

    @property
    def max_length(self) -> int | None:
        """The attention views' slots (`None` without attention)."""
        return next((m.max_length for parts in self.layers for m in parts if isinstance(m, AttentionCacheMetaData)),
                    None)

    # -- compatibility ----------------------------------------------------------------------------------------
    def check_compatible(self, other: Any, batch_size: int | None = None, max_length: int | None = None) -> None:
        """Raise `ValueError` naming the first layer and field where this cache does not fit `other`.

        `other` is another `HybridCacheMetaData` or a hybrid family's config (read as in `from_config`). Compared in
        order: model_type, layer count, each layer's kinds, then each view's sizes, layer by layer. `batch_size`
        (`None`: any) is the batch the model is called with. Attention slots: the cache must hold at least
        `max_length` when given, else at least `other.max_length` for a metadata; a config states none, so they
        are not checked then (more slots than needed fit). Metadata of a plain cache (`Mamba2CacheMetaData`, ...)
        or a config without `layer_cache_kinds` is refused by both caches' names.
        """
        if isinstance(other, BaseCacheMetaData):
            plain = next((c.__name__ for c in _PLAIN_CACHES.values() if c.VIEW.METADATA is type(other)), None)
            raise ValueError(f"{_MISFIT}it is a HybridCache, but the model keeps a {plain or 'cache'} (it was "
                             f"compared with a {type(other).__name__})")
        if isinstance(other, HybridCacheMetaData):
            model_type, kinds = other.model_type, other.layer_cache_kinds
            needed_slots = other.max_length if max_length is None else max_length
        else:
            model_type, kinds = getattr(other, "model_type", None), getattr(other, "layer_cache_kinds", None)
            needed_slots = max_length
            if kinds is None:
                plain = _PLAIN_CACHES.get(model_type)
                keeps = f"a {plain.__name__}" if plain is not None else "no HybridCache (no layer_cache_kinds)"
                raise ValueError(f"{_MISFIT}it is a HybridCache, but a model of model_type {model_type!r} keeps "
                                 f"{keeps}")
        if isinstance(model_type, str) and model_type != self.model_type:
            raise ValueError(f"{_MISFIT}it was built for model_type {self.model_type!r}, but the model's config has "
                             f"model_type {model_type!r}")
        kinds = tuple(tuple(k) for k in kinds)
        if len(kinds) != len(self.layers):
            raise ValueError(f"{_MISFIT}it has {len(self.layers)} layers, but the model needs "
                             f"num_hidden_layers={len(kinds)}")
        for i, (mine, theirs) in enumerate(zip(self.layer_cache_kinds, kinds)):
            if mine != theirs:
                raise ValueError(f"{_MISFIT}layer {i} keeps views {mine}, but the model's layer {i} needs {theirs}")
        for i, parts in enumerate(self.layers):
            for j, meta in enumerate(parts):
                kind = _KIND_OF[type(meta)]
                if isinstance(other, HybridCacheMetaData):
                    target = other.layers[i][j]
                else:
                    target = _part(other, "attention_config" if kind == "attention" else "mixer_config", kind)
                try:
                    if kind == "attention":
                        meta.check_compatible(target, batch_size, needed_slots)
                    else:
                        meta.check_compatible(target, batch_size)
                except ValueError as err:
                    message = str(err).removeprefix(_MISFIT)
                    raise ValueError(f"{_MISFIT}layer {i} ({kind}): {message}") from None

    # -- documents --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "layers": [[{"kind": _KIND_OF[type(m)], **m.to_dict()} for m in parts] for parts in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "metadata") -> "HybridCacheMetaData":
        serialization._require(d, ("model_type", "layers"), where)
        if not isinstance(d["layers"], list):
            raise ValueError(f"{where}.layers must be a list; got {type(d['layers']).__name__}")
        layers = []
        for i, parts in enumerate(d["layers"]):
            if not isinstance(parts, list):
                raise ValueError(f"{where}.layers[{i}] must be a list; got {type(parts).__name__}")
            metas = []
            for j, part in enumerate(parts):
                at = f"{where}.layers[{i}][{j}]"
                if not isinstance(part, dict) or part.get("kind") not in VIEW_CLASSES:
                    kind = part.get("kind") if isinstance(part, dict) else part
                    raise ValueError(f"{at}.kind must be one of {list(VIEW_CLASSES)}; got {kind!r}")
                fields = {k: v for k, v in part.items() if k != "kind"}
                metas.append(VIEW_CLASSES[part["kind"]].METADATA.from_dict(fields, at))
            layers.append(tuple(metas))
        try:
            return cls(d["model_type"], tuple(layers))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def _part(config: Any, attr: str, kind: str) -> Any:
    part = getattr(config, attr, None)
    if part is None:
        raise ValueError(f"config {type(config).__name__} has no {attr}, needed for its {kind!r} layers")
    return part


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class HybridCache(BaseCache):
    """The cache of a hybrid model: `views[i]` is `None` (a layer without state, or a slot not filled yet), layer
    i's view, or the tuple of its views for a layer of several kinds, as `cache_metadata.layers[i]` says.

    `cache_metadata` (the `metadata` property) is static: part of the treedef, like the views' metadata. Build
    one with `init_cache(metadata)` (or `init_empty(metadata)` and `update_view`); every update returns a new
    cache. Documents carry the format name `easymamba.HybridCache`.
    """

    views: tuple[Any, ...]
    cache_metadata: HybridCacheMetaData

    VIEW: ClassVar[type] = BaseCacheView
    FORMAT: ClassVar[str] = FORMAT

    def __post_init__(self):
        if isinstance(self.cache_metadata, BaseCacheMetaData):
            raise ValueError(f"a HybridCache takes a HybridCacheMetaData; got a {type(self.cache_metadata).__name__} "
                             "(a plain cache's metadata)")
        if not isinstance(self.cache_metadata, HybridCacheMetaData):
            raise ValueError(f"cache_metadata must be a HybridCacheMetaData; got {self.cache_metadata!r}")
        if not isinstance(self.views, (tuple, list)):
            raise ValueError(f"views must be a tuple (one entry per layer); got {type(self.views).__name__}")
        if len(self.views) != self.cache_metadata.num_hidden_layers:
            raise ValueError(f"views has {len(self.views)} entries, but the metadata has "
                             f"{self.cache_metadata.num_hidden_layers} layers")
        for i, entry in enumerate(self.views):
            self._check_entry(i, entry)
        object.__setattr__(self, "views", tuple(self.views))

    def _check_entry(self, i: int, entry: Any) -> None:
        """`entry` may stand in slot i: `None`, or the views of layer i's kinds with its metadata."""
        if entry is None:
            return
        metas = self.cache_metadata.layers[i]
        kinds = tuple(_KIND_OF[type(m)] for m in metas)
        if not metas:
            raise ValueError(f"views[{i}] must be None: layer {i} keeps no state; got {type(entry).__name__}")
        if len(metas) == 1 and isinstance(entry, tuple):
            raise ValueError(f"views[{i}] must be one {VIEW_CLASSES[kinds[0]].__name__} (layer {i} keeps {kinds}); "
                             f"got a tuple of {len(entry)}")
        if len(metas) > 1 and not (isinstance(entry, tuple) and len(entry) == len(metas)):
            names = ", ".join(VIEW_CLASSES[k].__name__ for k in kinds)
            raise ValueError(f"views[{i}] must be a tuple ({names}) (layer {i} keeps {kinds}); got {entry!r:.80}")
        for j, (view, meta, kind) in enumerate(zip(_parts(entry), metas, kinds)):
            at = f"views[{i}]" if len(metas) == 1 else f"views[{i}][{j}]"
            view_cls = VIEW_CLASSES[kind]
            if not isinstance(view, view_cls):
                raise ValueError(f"{at} must be a {view_cls.__name__} (layer {i} keeps {kinds}); "
                                 f"got {type(view).__name__}")
            if view.metadata != meta:
                if view.metadata.partition_axis == meta.partition_axis:
                    try:
                        view.metadata.check_compatible(meta)
                    except ValueError as err:
                        raise ValueError(f"{at}: {str(err).removeprefix(_MISFIT)}") from None
                raise ValueError(f"{at} has metadata {view.metadata}; layer {i} of the cache needs {meta}")
            if view.layer_index != i:
                raise ValueError(f"{at} has layer_index {view.layer_index}; it cannot go in layer {i}")

    # -- pytree -----------------------------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("views"), self.views),), self.cache_metadata

    def tree_flatten(self):
        return (self.views,), self.cache_metadata

    @classmethod
    def tree_unflatten(cls, aux, children):
        cache = object.__new__(cls)  # no validation: JAX unflattens with placeholders (see BaseCacheView)
        object.__setattr__(cache, "views", tuple(children[0]))
        object.__setattr__(cache, "cache_metadata", aux)
        return cache

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def init_cache(
        cls,
        metadata: HybridCacheMetaData,
        dtype: Any = jnp.float32,
        *,
        ssm_dtype: Any = jnp.float32,
        mesh: Mesh | None = None,
    ) -> "HybridCache":
        """Zero views for every layer that keeps state, with the default specs of each view's `partition_axis`.

        `dtype`: conv windows' and keys'/values' dtype (the model's compute dtype). `ssm_dtype`: SSM states'
        (float32 default). `mesh`: check every spec against it and create every array sharded in place, all in
        one jitted call.
        """
        if not isinstance(metadata, HybridCacheMetaData):
            raise ValueError(f"HybridCache.init_cache takes a HybridCacheMetaData; got {type(metadata).__name__}"
                             + (" (a plain cache's: use that cache's init_cache)"
                                if isinstance(metadata, BaseCacheMetaData) else ""))
        dtype, ssm_dtype = float_dtype(dtype, "dtype"), float_dtype(ssm_dtype, "ssm_dtype")
        plan, layout = [], []
        for i, parts in enumerate(metadata.layers):
            for meta in parts:
                kind = _KIND_OF[type(meta)]
                view_cls = VIEW_CLASSES[kind]
                try:
                    specs = view_cls.normalize_specs(None, meta)
                    if mesh is not None:
                        view_cls.check_specs_on_mesh(meta, specs, mesh)
                except ValueError as err:
                    raise ValueError(f"layer {i} ({kind}): {err}") from None
                plan.append((i, view_cls, meta, specs, len(layout)))
                layout += view_cls.layout(meta, specs, dtype, ssm_dtype)
        arrays = partition.zeros(layout, mesh)
        entries: list[list[BaseCacheView]] = [[] for _ in metadata.layers]
        for i, view_cls, meta, specs, start in plan:
            leaves = dict(zip(view_cls.LEAVES, arrays[start : start + len(view_cls.LEAVES)]))
            entries[i].append(view_cls(**leaves, metadata=meta, partition_specs=specs, layer_index=i))
        return cls(tuple(_entry(parts) for parts in entries), metadata)

    @classmethod
    def init_empty(cls, metadata: HybridCacheMetaData) -> "HybridCache":
        """A cache whose every slot is `None`, filled with `update_view` (`missing_layers()` lists what is left)."""
        if not isinstance(metadata, HybridCacheMetaData):
            raise ValueError(f"HybridCache.init_empty takes a HybridCacheMetaData; got {type(metadata).__name__}")
        return cls((None,) * metadata.num_hidden_layers, metadata)

    # -- access -----------------------------------------------------------------------------------------------
    @property
    def metadata(self) -> HybridCacheMetaData:
        return self.cache_metadata

    def _first_view(self) -> BaseCacheView | None:
        return next((view for entry in self.views for view in _parts(entry)), None)

    def missing_layers(self) -> list[int]:
        """Indices of the layers that keep state but whose slot is `None`."""
        return [i for i, (entry, parts) in enumerate(zip(self.views, self.cache_metadata.layers))
                if parts and entry is None]

    def view(self, layer_idx: int, kind: str | None = None) -> BaseCacheView:
        """Layer `layer_idx`'s view of `kind` ("mamba2", "mamba", "attention"); `kind` may be left out when the
        layer keeps one view."""
        index = self._index(layer_idx)
        kinds = self.cache_metadata.layer_cache_kinds[index]
        if kind is None:
            if len(kinds) != 1:
                raise ValueError(f"layer {index} keeps views {kinds}; say which kind")
            kind = kinds[0]
        if kind not in kinds:
            raise ValueError(f"layer {index} keeps views {kinds}, none of kind {kind!r}")
        entry = self.views[index]
        if entry is None:
            raise ValueError(f"layer {index} has no view (an init_empty slot); set one with update_view")
        return _parts(entry)[kinds.index(kind)]

    def _ssm_kind(self, layer_idx: int) -> str:
        kinds = self.cache_metadata.layer_cache_kinds[self._index(layer_idx)]
        kind = next((k for k in kinds if k in _SSM_KINDS), None)
        if kind is None:
            raise ValueError(f"layer {self._index(layer_idx)} keeps views {kinds}, no SSM state")
        return kind

    def _with_part(self, layer_idx: int, kind: str, view: BaseCacheView) -> "HybridCache":
        index = self._index(layer_idx)
        parts = list(_parts(self.views[index]))
        parts[self.cache_metadata.layer_cache_kinds[index].index(kind)] = view
        return self._with_view(index, _entry(parts))

    def with_views(self, views: Any) -> "HybridCache":
        return type(self)(tuple(views), self.cache_metadata)

    def _map_views(self, fn: Any) -> tuple:
        return tuple(None if entry is None else _entry([fn(v) for v in _parts(entry)]) for entry in self.views)

    # -- updates ----------------------------------------------------------------------------------------------
    def update_conv_state(self, layer_idx: int, new_conv_state: Any, cache_position: Any = None) -> "HybridCache":
        """The layer's SSM view's `update_conv_state(...)`, in a new cache."""
        kind = self._ssm_kind(layer_idx)
        view = self.view(layer_idx, kind).update_conv_state(new_conv_state, cache_position)
        return self._with_part(layer_idx, kind, view)

    def update_ssm_state(self, layer_idx: int, new_ssm_state: Any) -> "HybridCache":
        """The layer's SSM view's `update_ssm_state(new)`, in a new cache."""
        kind = self._ssm_kind(layer_idx)
        return self._with_part(layer_idx, kind, self.view(layer_idx, kind).update_ssm_state(new_ssm_state))

    def write(self, layer_idx: int, k_new: Any, v_new: Any, valid_new: Any) -> "HybridCache":
        """The layer's attention view's `write(k_new, v_new, valid_new)`, in a new cache (the offset is not
        advanced; see `AttentionCacheView.write`)."""
        return self._with_part(layer_idx, "attention", self.view(layer_idx, "attention").write(k_new, v_new, valid_new))

    def update_view(self, layer_idx: int, view: Any) -> "HybridCache":
        """A new cache with `views[layer_idx] = view` (one view, or the tuple of the layer's views).

        Each view must have the layer's metadata and `layer_index` `layer_idx` (or `None`, then set); when the
        slot is filled, its leaf dtypes and partition specs must be the slot's (so the cache's pytree type is
        unchanged, as a `lax.while_loop` carry requires).
        """
        index = self._index(layer_idx)
        parts = [v if not isinstance(v, BaseCacheView) or v.layer_index is not None
                 else dataclasses.replace(v, layer_index=index) for v in _parts(view)]
        entry = None if view is None else _entry(parts) if isinstance(view, tuple) else parts[0]
        self._check_entry(index, entry)
        current = self.views[index]
        if current is not None and entry is not None:
            for j, (new, old) in enumerate(zip(_parts(entry), _parts(current))):
                if new.partition_specs != old.partition_specs:
                    raise ValueError(f"the view's partition_specs {new.partition_specs} differ from layer {index}'s "
                                     f"{old.partition_specs}")
                for name in new.LEAVES:
                    a, b = jnp.dtype(getattr(new, name).dtype), jnp.dtype(getattr(old, name).dtype)
                    if a != b:
                        raise ValueError(f"the view's {name} has dtype {a}; layer {index} holds {b}")
        return self._with_view(index, entry)

    def check_compatible(self, other: Any, batch_size: int | None = None, max_length: int | None = None) -> None:
        """`HybridCacheMetaData.check_compatible` of this cache's metadata: raise `ValueError` naming the first
        layer and field where it does not fit `other` (a hybrid config or metadata), `batch_size` rows (`None`:
        any) and `max_length` attention slots (`None`: unchecked for a config)."""
        self.cache_metadata.check_compatible(other, batch_size, max_length)

    # -- documents --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (numpy arrays, bfloat16 as `ml_dtypes.bfloat16`) that `from_dict` reads back exactly."""
        return {
            "format": FORMAT,
            "version": serialization.VERSION,
            "num_hidden_layers": len(self.views),
            "metadata": self.cache_metadata.to_dict(),
            "views": [None if entry is None else [{"kind": v.KIND, **serialization.view_to_dict(v)}
                                                  for v in _parts(entry)] for entry in self.views],
        }

    @classmethod
    def from_dict(cls, d: Any, mesh: Mesh | None = None) -> "HybridCache":
        """Read `to_dict`'s output; with `mesh`, each array is placed as `NamedSharding(mesh, its spec)`."""
        serialization.check_format(d, FORMAT)
        serialization._require(d, ("format", "version", "num_hidden_layers", "metadata", "views"), "cache document")
        if d["version"] != serialization.VERSION:
            raise ValueError(f"cache document has version {d['version']!r}; this easymamba reads version "
                             f"{serialization.VERSION}")
        metadata = HybridCacheMetaData.from_dict(d["metadata"], "cache document metadata")
        views = d["views"]
        if not isinstance(views, list):
            raise ValueError(f"cache document views must be a list; got {type(views).__name__}")
        if not d["num_hidden_layers"] == len(views) == metadata.num_hidden_layers:
            raise ValueError(f"cache document num_hidden_layers is {d['num_hidden_layers']!r}, it holds "
                             f"{len(views)} views and its metadata {metadata.num_hidden_layers} layers")
        entries = []
        for i, (docs, kinds) in enumerate(zip(views, metadata.layer_cache_kinds)):
            if docs is None:
                entries.append(None)
                continue
            if not kinds:
                raise ValueError(f"views[{i}] must be None: layer {i} keeps no state; got {type(docs).__name__}")
            if not isinstance(docs, list) or len(docs) != len(kinds):
                found = f"a list of {len(docs)}" if isinstance(docs, list) else type(docs).__name__
                raise ValueError(f"views[{i}] must be None or a list of {len(kinds)} view documents (layer {i} keeps "
                                 f"{kinds}); got {found}")
            parts = []
            for j, (doc, kind) in enumerate(zip(docs, kinds)):
                where = f"views[{i}][{j}]"
                if not isinstance(doc, dict) or doc.get("kind") != kind:
                    found = doc.get("kind") if isinstance(doc, dict) else doc
                    raise ValueError(f"{where}.kind must be {kind!r} (layer {i} keeps {kinds}); got {found!r}")
                fields = {k: v for k, v in doc.items() if k != "kind"}
                parts.append(serialization.view_from_dict(fields, where, mesh, VIEW_CLASSES[kind]))
            entries.append(_entry(parts))
        return cls(tuple(entries), metadata)

    def to_json(self) -> str:
        """JSON text; arrays as `{"dtype", "shape", "data": base64 of little-endian bytes}`."""
        d = self.to_dict()
        d["views"] = [None if docs is None else [serialization.view_to_jsonable(v) for v in docs]
                      for docs in d["views"]]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str, mesh: Mesh | None = None) -> "HybridCache":
        d = jsonio.loads(s, "the cache JSON")  # ValueError for bad text, duplicate keys or deep nesting
        if isinstance(d, dict) and isinstance(d.get("views"), list):  # structure errors are left to from_dict
            d["views"] = [
                [serialization.view_from_jsonable(v, _leaves_of(v), f"views[{i}][{j}]") for j, v in enumerate(docs)]
                if isinstance(docs, list) else docs
                for i, docs in enumerate(d["views"])
            ]
        return cls.from_dict(d, mesh)

    def __repr__(self) -> str:
        kinds = self.cache_metadata.layer_cache_kinds
        filled = sum(entry is not None for entry in self.views)
        return (f"HybridCache({len(self.views)} layers, {filled} of {sum(bool(k) for k in kinds)} with state filled, "
                f"model_type={self.cache_metadata.model_type!r}, kinds={kinds})")


def _entry(parts: list[BaseCacheView]) -> Any:
    """A layer's views as a cache entry: `None`, the one view, or the tuple of several."""
    return None if not parts else parts[0] if len(parts) == 1 else tuple(parts)


def _leaves_of(doc: Any) -> tuple[str, ...]:
    view_cls = VIEW_CLASSES.get(doc.get("kind")) if isinstance(doc, dict) else None
    return () if view_cls is None else view_cls.LEAVES
