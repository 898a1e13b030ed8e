"""Inference caches (Mamba-2, Mamba-1, hybrid): immutable pytrees with checked partition specs and lossless
documents.

    partition.py      PartitionAxis: mesh axis per cache dimension; spec checks; sharded zeros
    metadata.py       BaseCacheMetaData, Mamba2CacheMetaData: sizes, validated; leaf shapes, dims, dtype roles;
                      compatibility check against a model
    view.py           BaseCacheView (views declare their leaves), SSMCacheView, Mamba2CacheView: one layer's conv
                      window [b, c, k] and SSM state [b, h, p, n]
    serialization.py  dict / JSON documents of any view class, bit-exact
    cache.py          BaseCache, Mamba2Cache: one view per layer
    mamba1.py         MambaCacheMetaData, MambaCacheView, MambaCache: the Mamba-1 cache ([b, e, k], [b, e, n]);
                      FalconMambaCache* the same for Falcon-Mamba, under its own model_type and format
    attention.py      AttentionCacheMetaData, AttentionCacheView: an attention layer's keys and values
                      [b, t, kv, hd], valid [b, t]
    hybrid.py         HybridCacheMetaData, HybridCache: per layer no view, one, or several side by side
"""

from easymamba.caching.attention import AttentionCacheMetaData, AttentionCacheView
from easymamba.caching.cache import Mamba2Cache
from easymamba.caching.hybrid import HybridCache, HybridCacheMetaData
from easymamba.caching.mamba1 import (
    FalconMambaCache,
    FalconMambaCacheMetaData,
    FalconMambaCacheView,
    MambaCache,
    MambaCacheMetaData,
    MambaCacheView,
)
from easymamba.caching.metadata import Mamba2CacheMetaData
from easymamba.caching.partition import PartitionAxis
from easymamba.caching.view import Mamba2CacheView

__all__ = [
    "AttentionCacheMetaData",
    "AttentionCacheView",
    "HybridCache",
    "HybridCacheMetaData",
    "FalconMambaCache",
    "FalconMambaCacheMetaData",
    "FalconMambaCacheView",
    "Mamba2Cache",
    "Mamba2CacheMetaData",
    "Mamba2CacheView",
    "MambaCache",
    "MambaCacheMetaData",
    "MambaCacheView",
    "PartitionAxis",
]
