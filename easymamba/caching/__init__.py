"""Inference caches (Mamba-2 and Mamba-1): immutable pytrees with checked partition specs and lossless documents.

    partition.py      PartitionAxis: mesh axis per cache dimension; spec checks; sharded zeros
    metadata.py       Mamba2CacheMetaData: sizes, validated; compatibility check against a model
    view.py           Mamba2CacheView: one layer's conv window [b, c, k] and SSM state [b, h, p, n]
    serialization.py  dict / JSON documents, bit-exact
    cache.py          Mamba2Cache: one view per layer
    mamba1.py         MambaCacheMetaData, MambaCacheView, MambaCache: the Mamba-1 cache ([b, e, k], [b, e, n]);
                      FalconMambaCache* the same for Falcon-Mamba, under its own model_type and format
"""

from easymamba.caching.cache import Mamba2Cache
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
