"""Mamba-2 inference cache: immutable pytrees with checked partition specs and lossless documents.

    partition.py      PartitionAxis: mesh axis per cache dimension; spec checks; sharded zeros
    metadata.py       Mamba2CacheMetaData: sizes, validated; compatibility check against a model
    view.py           Mamba2CacheView: one layer's conv window [b, c, k] and SSM state [b, h, p, n]
    serialization.py  dict / JSON documents, bit-exact
    cache.py          Mamba2Cache: one view per layer
"""

from easymamba.caching.cache import Mamba2Cache
from easymamba.caching.metadata import Mamba2CacheMetaData
from easymamba.caching.partition import PartitionAxis
from easymamba.caching.view import Mamba2CacheView

__all__ = ["Mamba2Cache", "Mamba2CacheMetaData", "Mamba2CacheView", "PartitionAxis"]
