"""The hybrid cache and the attention key/value view: validation, writes against a numpy reference (eager, under
jit, in fori_loop and while_loop), bit-exact documents, sharded creation on the 8 host devices of conftest.py, and
compatibility checks that name the layer and field.

No hybrid model exists yet, so a small stand-in config (`ToyConfig`) carries what a hybrid family's config offers
the cache: `model_type`, `layer_cache_kinds`, `mixer_config` (a Mamba2MixerConfig) and `attention_config` (an
AttentionConfig). Its layers cover every form of entry: stateless, mamba2, attention, and (attention, mamba2).
Sizes are small and distinct (kv heads 2, head dim 3, mamba heads 4 of dim 2, state 5) so a transposed axis shows
as a shape error; contents are random, never zeros, so a no-op cannot pass.
"""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easymamba.caching import (
    AttentionCacheMetaData,
    AttentionCacheView,
    HybridCache,
    HybridCacheMetaData,
    Mamba2Cache,
    Mamba2CacheMetaData,
    Mamba2CacheView,
    MambaCacheView,
    PartitionAxis,
)
from easymamba.config import Mamba2Config
from easymamba.config.parts import AttentionConfig, Mamba2MixerConfig
from easymamba.sharding import make_mesh

KINDS = ((), ("mamba2",), ("attention",), ("attention", "mamba2"), ())
B, T, KV, HD = 2, 8, 2, 3
H, PD, N, G, K = 4, 2, 5, 2, 4
C = H * PD + 2 * G * N  # conv channels [x | B | C]


@dataclasses.dataclass
class ToyConfig:
    """What a hybrid family's config offers the cache."""

    layer_cache_kinds: tuple = KINDS
    mixer_config: Mamba2MixerConfig | None = None
    attention_config: AttentionConfig | None = None
    model_type: str = "toy_hybrid"


def make_config(kinds=KINDS, model_type="toy_hybrid", **changes):
    mixer = dict(hidden_size=16, num_heads=H, head_dim=PD, state_size=N, n_groups=G, conv_kernel=K,
                 num_hidden_layers=len(kinds))  # fmt: skip
    attention = dict(in_size=16, num_attention_heads=4, num_key_value_heads=KV, head_dim=HD)
    mixer.update({k: v for k, v in changes.items() if k in mixer})
    attention.update({k: v for k, v in changes.items() if k in attention and k not in mixer})
    return ToyConfig(kinds, Mamba2MixerConfig(**mixer), AttentionConfig(**attention), model_type)


def make_meta(batch_size=B, max_length=T, partition_axis=PartitionAxis(), **changes):
    return HybridCacheMetaData.from_config(make_config(**changes), batch_size, max_length, partition_axis)


def same_bits(a, b):
    a, b = np.asarray(a).reshape(1, -1), np.asarray(b).reshape(1, -1)  # 2-d, so .view works for 0-d inputs too
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def random_cache(seed, dtype=jnp.bfloat16, ssm_dtype=jnp.float32, meta=None):
    """Every leaf random: keys/values/states with a NaN and infinities (bit exactness), valid a random mask."""
    rng = np.random.default_rng(seed)
    meta = make_meta() if meta is None else meta
    cache = HybridCache.init_cache(meta, dtype, ssm_dtype=ssm_dtype)

    def fill(view):
        leaves = {}
        for name in view.LEAVES:
            old = getattr(view, name)
            if name == "valid":
                new = rng.random(old.shape) < 0.5
            elif jnp.issubdtype(old.dtype, jnp.integer):
                new = rng.integers(0, 1000, old.shape).astype(np.int32)
            else:
                new = rng.standard_normal(old.shape).astype(np.float32)
                new.reshape(-1)[:3] = np.nan, np.inf, -np.inf
                new = new.astype(old.dtype)
            leaves[name] = jnp.asarray(new)
        return view.replace(**leaves)

    return HybridCache(cache._map_views(fill), meta)


# -- metadata ------------------------------------------------------------------------------------------------
def test_metadata_from_config():
    meta = make_meta()
    assert meta.layer_cache_kinds == KINDS and meta.num_hidden_layers == 5 and meta.model_type == "toy_hybrid"
    assert meta.batch_size == B and meta.max_length == T
    mamba2 = Mamba2CacheMetaData.create(num_hidden_layers=5, batch_size=B, intermediate_size=H * PD, num_heads=H,
                                        head_dim=PD, state_size=N, conv_kernel_size=K, n_groups=G)  # fmt: skip
    attention = AttentionCacheMetaData.create(batch_size=B, max_length=T, num_key_value_heads=KV, head_dim=HD)
    assert meta.layers == ((), (mamba2,), (attention,), (attention, mamba2), ())
    assert meta == make_meta() and hash(meta) == hash(make_meta())
    assert HybridCacheMetaData.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert attention.leaf_shapes()["keys"] == (B, T, KV, HD) and attention.valid_shape == (B, T)
    # no attention: max_length is not needed (and a Mamba-2-only pattern has no max_length)
    ssm_only = make_meta(max_length=None, kinds=((), ("mamba2",)))
    assert ssm_only.max_length is None and ssm_only.layer_cache_kinds == ((), ("mamba2",))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: make_meta(max_length=None), r"max_length is required: layer 2 has attention"),
        (lambda: make_meta(kinds=((), ("ssm",))), r"layer_cache_kinds\[1\] has unknown kind 'ssm'; known: "
                                                  r"\['mamba2', 'mamba', 'attention'\]"),
        (lambda: make_meta(kinds=("mamba2",)), r"layer_cache_kinds\[0\] must be a tuple of kinds"),
        (lambda: make_meta(kinds=(("attention", "attention"),)), r"layers\[0\] lists kind 'attention' twice"),
        (lambda: make_meta(batch_size=0), r"batch_size must be a positive int; got 0"),
        (lambda: make_meta(max_length=-1), r"max_length must be a positive int; got -1"),
        (lambda: HybridCacheMetaData.from_config(dataclasses.replace(make_config(), attention_config=None), B, T),
         r"config ToyConfig has no attention_config, needed for its 'attention' layers"),
        (lambda: HybridCacheMetaData.from_config(Mamba2Config(), B, T),
         r"config Mamba2Config \(model_type 'mamba2'\) has no layer_cache_kinds: it is not a hybrid"),
        (lambda: HybridCacheMetaData("", ((),)), r"model_type must be a non-empty str"),
        (lambda: HybridCacheMetaData("x", ()), r"layers must be a non-empty tuple"),
        (lambda: HybridCacheMetaData("x", ((PartitionAxis(),),)), r"layers\[0\]\[0\] must be the metadata of a view"),
        (lambda: HybridCacheMetaData("x", (make_meta().layers[2], make_meta(batch_size=3).layers[1])),
         r"layer 1 has batch_size=3, but layer 0 has batch_size=2; every view of a cache shares it"),
        (lambda: HybridCacheMetaData("x", (make_meta().layers[2], make_meta(max_length=9).layers[2])),
         r"layer 1 has max_length=9, but layer 0 has max_length=8"),
        (lambda: AttentionCacheMetaData.create(batch_size=2, max_length=4, num_key_value_heads=2.0, head_dim=3),
         r"num_key_value_heads must be a positive int; got 2\.0"),
    ],
)  # fmt: skip
def test_metadata_validation(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# -- init ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, ssm_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32)])
def test_init_shapes_dtypes_specs(dtype, ssm_dtype):
    meta = make_meta()
    cache = HybridCache.init_cache(meta, dtype, ssm_dtype=ssm_dtype)
    assert cache.metadata is meta and len(cache) == 5 and cache.missing_layers() == []
    assert cache.views[0] is None and cache.views[4] is None
    assert isinstance(cache.views[1], Mamba2CacheView) and isinstance(cache.views[2], AttentionCacheView)
    assert [type(v) for v in cache.views[3]] == [AttentionCacheView, Mamba2CacheView]
    kv_specs = (P("data", None, "model", None), P("data", None, "model", None), P("data", None), P("data"))
    for i, view in ((2, cache.views[2]), (3, cache.views[3][0])):
        assert view.layer_index == i and view.partition_specs == kv_specs
        assert view.keys.shape == view.values.shape == (B, T, KV, HD) and view.keys.dtype == view.values.dtype == dtype
        assert view.valid.shape == (B, T) and view.valid.dtype == jnp.bool_
        assert view.positions.dtype == view.seqlen_offset.dtype == jnp.int32 and view.seqlen_offset.shape == ()
        assert cache.view(i, "attention") is view
    for i, view in ((1, cache.views[1]), (3, cache.views[3][1])):
        assert view.layer_index == i and view.conv_states.shape == (B, C, K) and view.conv_states.dtype == dtype
        assert view.ssm_states.shape == (B, H, PD, N) and view.ssm_states.dtype == ssm_dtype
    assert not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(cache))
    assert int(cache.seqlen_offset) == 0
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype; got int32"):
        HybridCache.init_cache(meta, jnp.int32)
    with pytest.raises(ValueError, match=r"init_cache takes a HybridCacheMetaData; got Mamba2CacheMetaData"):
        HybridCache.init_cache(meta.layers[1][0])
    with pytest.raises(ValueError, match=r"layer 3 keeps views \('attention', 'mamba2'\); say which kind"):
        cache.view(3)
    with pytest.raises(ValueError, match=r"layer 1 keeps views \('mamba2',\), none of kind 'attention'"):
        cache.view(1, "attention")
    single = AttentionCacheView.init(meta.layers[2][0], dtype=dtype, layer_index=7)
    assert single.layer_index == 7 and single.keys.dtype == dtype
    with pytest.raises(ValueError, match=r"partition_specs must be a tuple \(keys, values, valid, positions\) of "
                                         r"four PartitionSpecs"):  # fmt: skip
        AttentionCacheView.init(meta.layers[2][0], (P(), P(), P()))


def test_init_empty_update_view_and_missing_layers():
    meta = make_meta()
    full = HybridCache.init_cache(meta)
    empty = HybridCache.init_empty(meta)
    assert empty.missing_layers() == [1, 2, 3] and empty.seqlen_offset is None
    assert Mamba2Cache.init_empty(3).missing_layers() == [0, 1, 2]  # the BaseCache version
    assert Mamba2Cache.init_empty(3).update_view(1, Mamba2CacheView.init(meta.layers[1][0])).missing_layers() == [0, 2]
    unindexed = AttentionCacheView.init(meta.layers[2][0])
    filled = empty.update_view(2, unindexed).update_view(3, full.views[3])
    assert filled.missing_layers() == [1] and filled.views[2].layer_index == 2 and empty.views[2] is None
    with pytest.raises(ValueError, match=r"views\[0\] must be None: layer 0 keeps no state; got AttentionCacheView"):
        empty.update_view(0, unindexed)
    with pytest.raises(ValueError, match=r"views\[1\] must be a Mamba2CacheView \(layer 1 keeps \('mamba2',\)\); "
                                         r"got AttentionCacheView"):  # fmt: skip
        empty.update_view(1, unindexed)
    with pytest.raises(ValueError, match=r"views\[3\] must be a tuple \(AttentionCacheView, Mamba2CacheView\)"):
        empty.update_view(3, unindexed)
    with pytest.raises(ValueError, match=r"views\[3\]\[1\] must be a Mamba2CacheView .* got AttentionCacheView"):
        empty.update_view(3, (unindexed, unindexed))
    with pytest.raises(ValueError, match=r"views\[2\] has layer_index 3; it cannot go in layer 2"):
        empty.update_view(2, full.views[3][0])
    with pytest.raises(ValueError, match=r"views\[2\]: it was built with num_key_value_heads=4, but the model needs "
                                         r"num_key_value_heads=2"):  # fmt: skip
        empty.update_view(2, AttentionCacheView.init(make_meta(num_key_value_heads=4).layers[2][0]))
    with pytest.raises(ValueError, match=r"the view's keys has dtype bfloat16; layer 2 holds float32"):
        full.update_view(2, AttentionCacheView.init(meta.layers[2][0], dtype=jnp.bfloat16))
    with pytest.raises(ValueError, match=r"views has 3 entries, but the metadata has 5 layers"):
        HybridCache((None,) * 3, meta)
    with pytest.raises(ValueError, match=r"HybridCache takes a HybridCacheMetaData; got a Mamba2CacheMetaData"):
        HybridCache((None,) * 5, meta.layers[1][0])


# -- the attention view: write then read -----------------------------------------------------------------------
def chunks(seed, lengths, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((B, n, KV, HD)).astype(dtype), rng.standard_normal((B, n, KV, HD)).astype(dtype),
             rng.random((B, n)) < 0.7) for n in lengths]  # fmt: skip


def reference(pieces, dtype):
    """Keys, values, valid after writing `pieces` one after another into zero slots (numpy)."""
    keys, values, valid = np.zeros((B, T, KV, HD), dtype), np.zeros((B, T, KV, HD), dtype), np.zeros((B, T), bool)
    at = 0
    for k, v, m in pieces:
        n = k.shape[1]
        keys[:, at : at + n], values[:, at : at + n], valid[:, at : at + n] = k, v, m
        at += n
    return keys, values, valid


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_writes_fill_slots_in_order(dtype):
    meta = make_meta()
    cache = HybridCache.init_cache(meta, dtype)
    pieces = chunks(0, [3, 1, 1, 2])
    for k, v, m in pieces:
        before = cache
        cache = cache.write(3, k, v, m)
        assert int(cache.seqlen_offset) == int(before.seqlen_offset)  # write does not advance
        cache = cache.update_seq(k.shape[1])
    keys, values, valid = reference(pieces, np.dtype(dtype))
    view = cache.view(3, "attention")
    assert same_bits(view.keys, keys) and same_bits(view.values, values) and same_bits(view.valid, valid)
    np.testing.assert_array_equal(view.real_tokens(), valid.sum(-1))
    assert view.real_tokens().dtype == jnp.int32 and int(cache.seqlen_offset) == 7
    assert not np.any(np.asarray(cache.views[2].keys))  # layer 2's attention untouched
    # every view advanced together
    assert all(int(v.seqlen_offset) == 7 for entry in cache.views if entry is not None
               for v in (entry if isinstance(entry, tuple) else (entry,)))  # fmt: skip
    # an integer mask (an attention_mask) is read as nonzero = real
    as_int = HybridCache.init_cache(meta).views[2].write(pieces[0][0], pieces[0][1], pieces[0][2].astype(np.int32))
    assert same_bits(as_int.valid[:, :3], pieces[0][2])


def test_write_checks_shapes_and_overflow():
    view = AttentionCacheView.init(make_meta().layers[2][0])
    k, v, m = chunks(1, [3])[0]
    with pytest.raises(ValueError, match=r"k_new \[b, l, kv, hd\] must have shape \(2, 'l', 2, 3\) with l >= 1; "
                                         r"found \(2, 3, 3, 2\)"):  # fmt: skip
        view.write(k.transpose(0, 1, 3, 2), v, m)
    with pytest.raises(ValueError, match=r"v_new \[b, l, kv, hd\] must have k_new's shape \(2, 3, 2, 3\)"):
        view.write(k, v[:, :2], m)
    with pytest.raises(ValueError, match=r"valid_new \[b, l\] must have shape \(2, 3\); found \(2, 2\)"):
        view.write(k, v, m[:, :2])
    with pytest.raises(ValueError, match=r"valid_new must be bool .* found float32"):
        view.write(k, v, m.astype(np.float32))
    with pytest.raises(ValueError, match=r"cannot write 9 slots into a cache of max_length=8"):
        view.write(*chunks(2, [9])[0])
    near_end = view.update_seq(6)
    with pytest.raises(ValueError, match=r"writing 3 slots at seqlen_offset 6 overflows the cache: 6 \+ 3 > "
                                         r"max_length=8; build the cache with a larger max_length"):  # fmt: skip
        near_end.write(k, v, m)
    near_end.write(k[:, :2], v[:, :2], m[:, :2])  # exactly fills the cache


def test_writes_traced_in_jit_and_fori_loop():
    meta = make_meta()
    cache = HybridCache.init_cache(meta, jnp.bfloat16)
    pieces = chunks(3, [2, 2, 2])

    @jax.jit
    def step(cache, k, v, m):
        return cache.write(2, k, v, m).write(3, v, k, m).update_seq(k.shape[1])

    jitted = cache
    for k, v, m in pieces:
        jitted = step(jitted, k, v, m)
    eager = cache
    for k, v, m in pieces:
        eager = eager.write(2, k, v, m).write(3, v, k, m).update_seq(2)
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(cache)
    assert all(map(same_bits, jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)))
    keys, values, valid = reference(pieces, ml_dtypes.bfloat16)
    assert same_bits(jitted.views[2].keys, keys) and same_bits(jitted.views[3][0].keys, values)

    # one token per iteration from a stacked [b, s, kv, hd] input, the offset a traced array
    ks, vs, ms = (np.concatenate(parts, axis=1) for parts in zip(*pieces))

    def body(i, c):
        k = jax.lax.dynamic_slice_in_dim(ks, i, 1, axis=1)
        v = jax.lax.dynamic_slice_in_dim(vs, i, 1, axis=1)
        m = jax.lax.dynamic_slice_in_dim(ms, i, 1, axis=1)
        return c.write(2, k, v, m).write(3, v, k, m).update_seq(1)

    looped = jax.jit(lambda c: jax.lax.fori_loop(0, 6, body, c))(cache)
    assert all(map(same_bits, jax.tree_util.tree_leaves(looped), jax.tree_util.tree_leaves(eager)))
    np.testing.assert_array_equal(looped.views[2].real_tokens(), valid.sum(-1))


# -- updates over every view ---------------------------------------------------------------------------------
def test_update_seq_advance_reset_and_ssm_updates():
    cache = random_cache(4)
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(cache)]
    advanced = cache.update_seq(3).advance(jnp.asarray([1, 2], jnp.int32), 2)
    old_views = [v for e in cache.views if e is not None for v in (e if isinstance(e, tuple) else (e,))]
    new_views = [v for e in advanced.views if e is not None for v in (e if isinstance(e, tuple) else (e,))]
    assert len(new_views) == 4
    for old, new in zip(old_views, new_views):
        np.testing.assert_array_equal(new.positions, np.asarray(old.positions) + [4, 5])
        assert int(new.seqlen_offset) == int(old.seqlen_offset) + 5
    rng = np.random.default_rng(5)
    column, state = rng.standard_normal((B, C)).astype(np.float32), rng.standard_normal((B, H, PD, N))
    updated = cache.update_conv_state(3, column).update_ssm_state(3, state.astype(np.float32))
    assert same_bits(updated.views[3][1].conv_states[:, :, -1], column.astype(ml_dtypes.bfloat16))
    assert same_bits(updated.views[3][1].ssm_states, state.astype(np.float32))
    assert updated.views[3][0] is cache.views[3][0]  # the layer's attention view is untouched
    with pytest.raises(ValueError, match=r"layer 2 keeps views \('attention',\), no SSM state"):
        cache.update_ssm_state(2, state)
    zeroed = cache.reset()
    assert not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(zeroed))
    dtypes = [x.dtype for x in jax.tree_util.tree_leaves(cache)]
    assert [x.dtype for x in jax.tree_util.tree_leaves(zeroed)] == dtypes and zeroed.metadata == cache.metadata
    assert all(map(same_bits, before, jax.tree_util.tree_leaves(cache)))  # nothing above touched `cache`


# -- pytree, jit, while_loop ---------------------------------------------------------------------------------
def test_pytree_jit_and_while_loop_carry():
    cache = random_cache(6)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 4 + 5 + 5 + 4 and all(isinstance(x, jax.Array) for x in leaves)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(back) is HybridCache and back.metadata == cache.metadata
    assert type(back.views[3]) is tuple and back.views[0] is None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(cache)]
    assert paths[4:7] == [".views[2].keys", ".views[2].values", ".views[2].valid"]
    assert paths[9] == ".views[3][0].keys" and paths[14] == ".views[3][1].conv_states"
    out = jax.jit(lambda c: c)(cache)
    assert jax.tree_util.tree_structure(out) == treedef and all(map(same_bits, jax.tree_util.tree_leaves(out), leaves))
    assert jax.tree_util.tree_leaves(HybridCache.init_empty(cache.metadata)) == []

    pieces = chunks(7, [1] * 4)
    ks, vs, ms = (np.concatenate(parts, axis=1) for parts in zip(*pieces))
    start = HybridCache.init_cache(cache.metadata, jnp.bfloat16)

    def body(carry):
        i, c = carry
        k, v, m = (jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1) for x in (ks, vs, ms))
        c = c.write(2, k, v, m).update_conv_state(1, jnp.full((B, C), i, jnp.float32)).update_seq(1)
        return i + 1, c

    _, looped = jax.jit(lambda c: jax.lax.while_loop(lambda carry: carry[0] < 4, body, (0, c)))(start)
    keys, _, valid = reference(pieces, ml_dtypes.bfloat16)
    assert same_bits(looped.views[2].keys, keys) and same_bits(looped.views[2].valid, valid)
    np.testing.assert_array_equal(np.asarray(looped.views[1].conv_states[0, 0], np.float32), [0, 1, 2, 3])
    assert int(looped.seqlen_offset) == 4 and int(looped.views[3][1].seqlen_offset) == 4


# -- documents -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dict", "json"])
def test_round_trip_is_exact(form):
    axis = PartitionAxis(batch_axis=("data", "fsdp"), head_axis="model", state_axis="model2")
    cache = random_cache(8, jnp.bfloat16, jnp.float32, make_meta(partition_axis=axis))
    if form == "dict":
        doc = cache.to_dict()
        assert doc["format"] == "easymamba.HybridCache" and doc["views"][0] is None
        assert [d["kind"] for d in doc["views"][3]] == ["attention", "mamba2"]
        assert doc["views"][2][0]["valid"].dtype == np.bool_ and doc["views"][2][0]["dtype"] == "bfloat16"
        assert set(doc["views"][1][0]) >= {"dtype", "ssm_dtype"} and "ssm_dtype" not in doc["views"][2][0]
        back = HybridCache.from_dict(doc)
        doc["views"][2][0]["keys"][...] = 7  # the document and the cache share no memory
    else:
        text = cache.to_json()
        plain = json.loads(text)
        assert plain["views"][2][0]["valid"]["dtype"] == "bool" and plain["views"][3][0]["kind"] == "attention"
        back = HybridCache.from_json(text)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(cache)  # metadata, specs, indices
    assert back.metadata == cache.metadata and back.views[2].metadata.partition_axis == axis
    assert back.views[3][0].partition_specs == (P(("data", "fsdp"), None, "model", None),) * 2 + (
        P(("data", "fsdp"), None), P(("data", "fsdp")))
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(back)):
        assert same_bits(a, b), (a.dtype, b.dtype)
    assert np.isnan(np.asarray(back.views[2].keys, np.float32)).any()


def test_round_trip_partial_and_malformed():
    cache = random_cache(9)
    partial = HybridCache.init_empty(cache.metadata).update_view(3, cache.views[3])
    for back in (HybridCache.from_dict(partial.to_dict()), HybridCache.from_json(partial.to_json())):
        assert back.missing_layers() == [1, 2]
        assert all(map(same_bits, jax.tree_util.tree_leaves(partial), jax.tree_util.tree_leaves(back)))

    def broken(edit):
        doc = cache.to_dict()
        edit(doc)
        return doc

    cases = [
        (lambda d: d["views"][3].reverse(), r"views\[3\]\[0\].kind must be 'attention' \(layer 3 keeps "
                                            r"\('attention', 'mamba2'\)\); got 'mamba2'"),
        (lambda d: d["views"][2][0].update(valid=d["views"][2][0]["valid"].astype(np.int32)),
         r"views\[2\]\[0\].valid must have dtype bool; found int32"),
        (lambda d: d["views"][2][0].update(keys=d["views"][2][0]["keys"][:, :4]),
         r"views\[2\]\[0\].keys must have shape \(2, 8, 2, 3\) \(from the metadata\); found \(2, 4, 2, 3\)"),
        (lambda d: d["views"][2][0].pop("valid"), r"views\[2\]\[0\] is missing fields \['valid'\]"),
        (lambda d: d["views"].__setitem__(0, []), r"views\[0\] must be None: layer 0 keeps no state; got list"),
        (lambda d: d["views"].__setitem__(3, d["views"][3][:1]), r"views\[3\] must be None or a list of 2 view "
                                                                 r"documents .* got a list of 1"),
        (lambda d: d["metadata"]["layers"][2][0].update(kind="mamba7"),
         r"cache document metadata.layers\[2\]\[0\].kind must be one of \['mamba2', 'mamba', 'attention'\]"),
        (lambda d: d["views"][2][0]["metadata"].update(max_length=9),
         r"views\[2\]\[0\].keys must have shape \(2, 9, 2, 3\) \(from the metadata\); found \(2, 8, 2, 3\)"),
        (lambda d: d["views"][2][0]["metadata"]["partition_axis"].update(state_axis="model"),
         r"views\[2\] has metadata .*state_axis='model'.*; layer 2 of the cache needs"),
        (lambda d: d.update(num_hidden_layers=4), r"num_hidden_layers is 4, it holds 5 views and its metadata 5"),
        (lambda d: d.update(format="easymamba.Mamba2Cache"),
         r"format 'easymamba.Mamba2Cache'; expected 'easymamba.HybridCache'"),
    ]  # fmt: skip
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            HybridCache.from_dict(broken(edit))
    # a document of the other kind, either way round, is refused by both names
    mamba2 = Mamba2Cache.init_cache(5, cache.metadata.layers[1][0])
    with pytest.raises(ValueError, match=r"format 'easymamba.Mamba2Cache'; expected 'easymamba.HybridCache'"):
        HybridCache.from_json(mamba2.to_json())
    with pytest.raises(ValueError, match=r"format 'easymamba.HybridCache'; expected 'easymamba.Mamba2Cache'"):
        Mamba2Cache.from_dict(cache.to_dict())
    doc = json.loads(cache.to_json())
    doc["views"][2][0]["valid"]["data"] = "Ag" + doc["views"][2][0]["valid"]["data"][2:]  # first byte 2
    with pytest.raises(ValueError, match=r"views\[2\]\[0\].valid.data holds a byte other than 0 and 1"):
        HybridCache.from_json(json.dumps(doc))


# -- compatibility -------------------------------------------------------------------------------------------
def test_check_compatible_names_layer_and_field():
    cache = HybridCache.init_cache(make_meta())
    cache.check_compatible(make_config(), batch_size=B)
    cache.check_compatible(make_config())  # batch unchecked
    cache.check_compatible(make_meta(max_length=5), B)  # more slots than needed fit
    cache.check_compatible(make_config(), B, max_length=T)
    cache.check_compatible(make_meta(partition_axis=PartitionAxis(head_axis=None)))  # axes do not matter
    cases = [
        (make_config(model_type="other"), {}, r"it was built for model_type 'toy_hybrid', but the model's config has "
                                              r"model_type 'other'"),
        (make_config(kinds=KINDS[:4]), {}, r"it has 5 layers, but the model needs num_hidden_layers=4"),
        (make_config(kinds=((), ("attention",), ("attention",), ("attention", "mamba2"), ())), {},
         r"layer 1 keeps views \('mamba2',\), but the model's layer 1 needs \('attention',\)"),
        (make_config(num_key_value_heads=1), {}, r"layer 2 \(attention\): it was built with num_key_value_heads=2, "
                                                 r"but the model needs num_key_value_heads=1"),
        (make_config(state_size=3), {}, r"layer 1 \(mamba2\): it was built with state_size=5, but the model needs "
                                        r"state_size=3"),
        (make_config(), dict(batch_size=3), r"layer 1 \(mamba2\): it was built with batch_size=2, but the model "
                                            r"needs batch_size=3"),
        (make_config(), dict(max_length=9), r"layer 2 \(attention\): it was built with max_length=8, but the model "
                                            r"needs max_length >= 9"),
        (make_meta(max_length=12), {}, r"layer 2 \(attention\): .* max_length >= 12"),
        (make_meta(head_dim=4, num_heads=2), {}, r"layer 1 \(mamba2\): it was built with num_heads=4, but the model "
                                                 r"needs num_heads=2"),
    ]  # fmt: skip
    for other, kwargs, match in cases:
        with pytest.raises(ValueError, match="the cache does not fit this model: " + match):
            cache.check_compatible(other, **kwargs)


def test_a_cache_of_the_other_kind_is_refused_by_both_names():
    hybrid = HybridCache.init_cache(make_meta())
    mamba2_meta = make_meta().layers[1][0]
    mamba2 = Mamba2Cache.init_cache(5, mamba2_meta)
    mamba2_config = Mamba2Config(hidden_size=4, num_heads=4, head_dim=2, state_size=5, n_groups=2,
                                 num_hidden_layers=5)  # fmt: skip
    with pytest.raises(ValueError, match=r"it is a HybridCache, but a model of model_type 'mamba2' keeps a "
                                         r"Mamba2Cache"):  # fmt: skip
        hybrid.check_compatible(mamba2_config, B)
    with pytest.raises(ValueError, match=r"it is a HybridCache, but the model keeps a Mamba2Cache \(it was compared "
                                         r"with a Mamba2CacheMetaData\)"):  # fmt: skip
        hybrid.check_compatible(mamba2_meta)
    with pytest.raises(ValueError, match=r"it is a Mamba2Cache, but the model keeps a HybridCache \(its layers' "
                                         r"cache kinds are \(\), \('mamba2',\), \('attention',\), "
                                         r"\('attention', 'mamba2'\)\)"):  # fmt: skip
        mamba2.check_compatible(make_config(), B)
    with pytest.raises(ValueError, match=r"it is a Mamba2Cache, but the model keeps a HybridCache"):
        mamba2.check_compatible(make_meta())
    # a config that lists one mamba2 view per layer is a plain Mamba-2 model's: the Mamba2Cache fits
    plain = types.SimpleNamespace(**{f.name: getattr(mamba2_config, f.name) for f in dataclasses.fields(mamba2_config)},
                                  intermediate_size=mamba2_config.intermediate_size, model_type="mamba2",
                                  layer_cache_kinds=(("mamba2",),) * 5)  # fmt: skip
    mamba2.check_compatible(plain, B)
    with pytest.raises(ValueError, match=r"views\[1\] must be a Mamba2CacheView .* got Mamba2Cache"):
        HybridCache.init_empty(make_meta()).update_view(1, mamba2)


def test_mamba1_kind():
    """"mamba" layers keep Mamba-1 views ([b, e, k], [b, e, n]) read from a MambaConfig-like mixer_config."""
    mixer = types.SimpleNamespace(num_hidden_layers=3, intermediate_size=6, state_size=N, conv_kernel=K)
    config = ToyConfig(((), ("mamba",), ("attention", "mamba")), mixer, make_config().attention_config)
    meta = HybridCacheMetaData.from_config(config, B, T)
    assert meta.layer_cache_kinds == ((), ("mamba",), ("attention", "mamba"))
    cache = random_cache(10, meta=meta)
    assert isinstance(cache.views[1], MambaCacheView) and cache.views[2][1].ssm_states.shape == (B, 6, N)
    back = HybridCache.from_json(cache.to_json())
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(cache)
    assert all(map(same_bits, jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(back)))
    cache.check_compatible(config, B)
    with pytest.raises(ValueError, match=r"layer 1 \(mamba\): it was built with state_size=5, but the model needs "
                                         r"state_size=4"):  # fmt: skip
        cache.check_compatible(dataclasses.replace(config, mixer_config=types.SimpleNamespace(
            num_hidden_layers=3, intermediate_size=6, state_size=4, conv_kernel=K)))


# -- sharding on 8 host devices ------------------------------------------------------------------------------
@pytest.fixture
def mesh():
    return make_mesh(2, 4)  # AxisType.Auto axes, as easymamba's models need (easymamba/sharding.py)


def test_sharded_init_places_every_array(mesh):
    assert len(jax.devices()) == 8  # conftest.py's host devices
    meta = make_meta(batch_size=4, num_key_value_heads=4, num_heads=8, head_dim=1)
    cache = HybridCache.init_cache(meta, jnp.bfloat16, mesh=mesh)
    for entry in cache.views:
        for view in () if entry is None else entry if isinstance(entry, tuple) else (entry,):
            specs = dict(zip(view.SPEC_LEAVES, view.partition_specs), seqlen_offset=P())
            for name, spec in specs.items():
                array = getattr(view, name)
                assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), (view.KIND, name)
    keys = cache.views[3][0].keys
    assert keys.sharding.spec == P("data", None, "model", None)
    assert keys.addressable_shards[0].data.shape == (2, T, 1, HD)  # 4/2 rows, 4/4 kv heads
    assert cache.views[2].valid.addressable_shards[0].data.shape == (2, T)
    # a traced write and advance keep the layout; so do a reset and a document read onto the mesh
    k = jnp.ones((4, 2, 4, HD))
    step = jax.jit(lambda c: c.write(2, k, k, jnp.ones((4, 2), bool)).update_seq(2),
                   out_shardings=cache.shardings(mesh))  # fmt: skip
    for again in (step(cache), cache.reset(), HybridCache.from_json(cache.to_json(), mesh=mesh)):
        assert again.views[2].keys.sharding.is_equivalent_to(cache.views[2].keys.sharding, 4)
        assert again.views[3][1].ssm_states.sharding.is_equivalent_to(cache.views[3][1].ssm_states.sharding, 4)
    assert int(step(cache).seqlen_offset) == 2


def test_sharded_init_checks_specs(mesh):
    with pytest.raises(ValueError, match=r"layer 2 \(attention\): dim 2 \(kv\) of keys \[b, t, kv, hd\] has size 2, "
                                         r"which mesh axis 'model' of size 4 does not divide"):  # fmt: skip
        HybridCache.init_cache(make_meta(batch_size=4, num_heads=8, head_dim=1), mesh=mesh)
    with pytest.raises(ValueError, match=r"layer 1 \(mamba2\): dim 0 \(b\) of conv_states \[b, c, k\] has size 3"):
        HybridCache.init_cache(make_meta(batch_size=3, num_key_value_heads=4, num_heads=8, head_dim=1), mesh=mesh)
    unsharded_heads = make_meta(batch_size=4, partition_axis=PartitionAxis(head_axis=None, kv_head_axis=None))
    cache = HybridCache.init_cache(unsharded_heads, mesh=mesh)  # kv heads replicated: any count fits
    assert cache.views[2].keys.sharding.spec == P("data", None, None, None)
    doc = HybridCache.init_cache(make_meta(batch_size=4, num_heads=8, head_dim=1)).to_dict()
    with pytest.raises(ValueError, match=r"dim 2 \(kv\) of keys \[b, t, kv, hd\] has size 2, which mesh axis 'model'"):
        HybridCache.from_dict(doc, mesh=mesh)
