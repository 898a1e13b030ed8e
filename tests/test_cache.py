"""Mamba-2 cache: validation, update semantics against numpy, pytree behaviour under jit, bit-exact
documents, and sharded creation on the 8 host devices of conftest.py.

Sizes are small and odd on purpose (c = e + 2 * g * n = 8 + 2 * 2 * 3 = 20) so a transposed or mislabelled
axis shows up as a shape error. Every input is random, never zeros, so a no-op update cannot pass.
"""

import functools
import json
import types
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easymamba.caching import Mamba2Cache, Mamba2CacheMetaData, Mamba2CacheView, PartitionAxis

SIZES = dict(num_hidden_layers=3, batch_size=2, intermediate_size=8, num_heads=4, head_dim=2, state_size=3,
             conv_kernel_size=4, n_groups=2)  # fmt: skip
B, C, K, H, PD, N = 2, 20, 4, 4, 2, 3


def make_meta(partition_axis=PartitionAxis(), **overrides):
    return Mamba2CacheMetaData.create(partition_axis, **{**SIZES, **overrides})


def make_config(**overrides):
    fields = dict(num_hidden_layers=3, intermediate_size=8, num_heads=4, head_dim=2, state_size=3, conv_kernel=4,
                  n_groups=2)  # fmt: skip
    return types.SimpleNamespace(**{**fields, **overrides})


def rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def random_cache(seed, dtype=jnp.float32, ssm_dtype=jnp.float32, partition_axis=PartitionAxis(), specs=None):
    """A cache whose every leaf is random (with a NaN and infinities in the states, to test bit exactness)."""
    rng = np.random.default_rng(seed)
    meta = make_meta(partition_axis)
    cache = Mamba2Cache.init_cache(3, meta, dtype, specs, ssm_dtype=ssm_dtype)
    for i in range(3):
        conv = rand(rng, (B, C, K)).astype(dtype)
        ssm = rand(rng, (B, H, PD, N)).astype(ssm_dtype)
        conv[0, 0, 0], ssm[1, 0, 0, 0], ssm[1, 1, 1, 1] = np.nan, np.inf, -np.inf
        view = cache[i].replace(
            conv_states=jnp.asarray(conv),
            ssm_states=jnp.asarray(ssm),
            positions=jnp.asarray(rng.integers(0, 1000, (B,)), jnp.int32),
            seqlen_offset=jnp.asarray(rng.integers(0, 1000), jnp.int32),
        )
        cache = cache.update_view(i, view)
    return cache


def same_bits(a, b):
    a, b = np.asarray(a).reshape(1, -1), np.asarray(b).reshape(1, -1)  # 2-d, so .view works for 0-d inputs too
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


# -- metadata ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(batch_size=0), r"batch_size must be a positive int; got 0"),
        (dict(state_size=-3), r"state_size must be a positive int; got -3"),
        (dict(head_dim=2.0), r"head_dim must be a positive int; got 2\.0"),
        (dict(n_groups=True), r"n_groups must be a positive int; got True"),
        (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive int"),
        (dict(head_dim=3), r"num_heads \* head_dim \(4 \* 3 = 12\) must equal intermediate_size \(8\)"),
        (dict(n_groups=3), r"num_heads \(4\) must be divisible by n_groups \(3\)"),
    ],
)
def test_metadata_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_meta(**overrides)


def test_metadata_properties_and_from_config():
    meta = make_meta()
    assert meta.conv_dim == 8 + 2 * 2 * 3
    assert meta.conv_state_shape == (B, C, K) and meta.ssm_state_shape == (B, H, PD, N)
    assert hash(meta) == hash(make_meta()) and meta == make_meta()
    assert Mamba2CacheMetaData.from_config(make_config(), batch_size=2) == meta
    axis = PartitionAxis(batch_axis=None)
    assert Mamba2CacheMetaData.from_config(make_config(), 2, axis).partition_axis == axis
    config = make_config()
    del config.conv_kernel
    with pytest.raises(ValueError, match=r"no attribute 'conv_kernel', needed for conv_kernel_size"):
        Mamba2CacheMetaData.from_config(config, batch_size=2)


def test_check_compatible_names_the_field():
    meta = make_meta()
    meta.check_compatible(make_config(), batch_size=2)
    meta.check_compatible(make_config())  # batch unchecked
    meta.check_compatible(make_meta(PartitionAxis(head_axis=None)))  # axes do not matter
    with pytest.raises(ValueError, match=r"built with num_heads=4, but the model needs num_heads=8"):
        meta.check_compatible(make_config(num_heads=8, head_dim=1))
    with pytest.raises(ValueError, match=r"built with batch_size=2, but the model needs batch_size=5"):
        meta.check_compatible(make_config(), batch_size=5)
    with pytest.raises(ValueError, match=r"conv_kernel_size=4, but the model needs conv_kernel_size=3"):
        meta.check_compatible(make_meta(conv_kernel_size=3))
    cache = Mamba2Cache.init_cache(3, meta)
    cache.check_compatible(make_config(), batch_size=2)
    with pytest.raises(ValueError, match=r"it has 3 layers, but the model needs num_hidden_layers=4"):
        cache.check_compatible(make_config(num_hidden_layers=4))


def test_partition_axis():
    axis = PartitionAxis(batch_axis=["data", "fsdp"], state_axis="model", head_axis=None)
    assert axis.batch_axis == ("data", "fsdp")
    assert hash(axis) == hash(PartitionAxis(("data", "fsdp"), None, None, "model"))
    assert axis.conv_state_spec() == P(("data", "fsdp"), None, None)
    assert axis.ssm_state_spec() == P(("data", "fsdp"), None, None, "model")
    assert axis.positions_spec() == P(("data", "fsdp"))
    with pytest.raises(ValueError, match=r"PartitionAxis.head_axis must be None, a mesh axis name"):
        PartitionAxis(head_axis=3)
    with pytest.raises(ValueError, match=r"names a mesh axis twice"):
        PartitionAxis(batch_axis=("data", "data"))


# -- init and updates ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, ssm_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                              (jnp.bfloat16, jnp.bfloat16)])  # fmt: skip
def test_init_shapes_dtypes(dtype, ssm_dtype):
    kwargs = {} if ssm_dtype == jnp.float32 else dict(ssm_dtype=ssm_dtype)  # float32 must be the default
    cache = Mamba2Cache.init_cache(3, make_meta(), dtype, **kwargs)
    assert len(cache) == cache.num_hidden_layers == 3 and cache.metadata == make_meta()
    for i, view in enumerate(cache):
        assert view.layer_index == i
        assert view.conv_states.shape == (B, C, K) and view.conv_states.dtype == dtype
        assert view.ssm_states.shape == (B, H, PD, N) and view.ssm_states.dtype == ssm_dtype
        assert view.positions.shape == (B,) and view.positions.dtype == jnp.int32
        assert view.seqlen_offset.shape == () and view.seqlen_offset.dtype == jnp.int32
        assert view.partition_specs == (P("data", None, None), P("data", "model", None, None), P("data"))
        assert not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(view))
    single = Mamba2CacheView.init(make_meta(), None, dtype, 7, ssm_dtype=ssm_dtype)
    assert single.layer_index == 7 and single.ssm_states.dtype == ssm_dtype
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype; got int32"):
        Mamba2Cache.init_cache(3, make_meta(), jnp.int32)
    with pytest.raises(ValueError, match=r"num_hidden_layers \(2\) must equal metadata.num_hidden_layers \(3\)"):
        Mamba2Cache.init_cache(2, make_meta())
    with pytest.raises(ValueError, match=r"tuple \(conv_states, ssm_states, positions\) of three PartitionSpecs"):
        Mamba2Cache.init_cache(3, make_meta(), partition_specs=[P("data", "model")])
    with pytest.raises(ValueError, match=r"spec .* for positions \[b\] has 2 entries but the array has rank 1"):
        Mamba2Cache.init_cache(3, make_meta(), partition_specs=(P(), P(), P("data", None)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_update_conv_state_rolls_like_huggingface(dtype):
    rng = np.random.default_rng(0)
    cache = Mamba2Cache.init_cache(3, make_meta(), dtype)
    window = rand(rng, (B, C, K)).astype(dtype)
    cache = cache.update_view(1, cache[1].replace(conv_states=jnp.asarray(window)))
    for _ in range(K + 2):  # more steps than the window holds, so old columns fall out
        column = rand(rng, (B, C))
        # transformers 4.57: conv_states.roll(shifts=-1, dims=-1); conv_states[:, :, -1] = new
        window = np.roll(window, -1, axis=-1)
        window[:, :, -1] = column.astype(dtype)
        cache = cache.update_conv_state(1, jnp.asarray(column), cache_position=jnp.arange(1))
        assert same_bits(cache[1].conv_states, window)
    assert not np.any(np.asarray(cache[0].conv_states)) and not np.any(np.asarray(cache[2].conv_states))


def test_update_conv_state_window_replace_and_continuation():
    rng = np.random.default_rng(1)
    view = Mamba2CacheView.init(make_meta()).replace(conv_states=jnp.asarray(rand(rng, (B, C, K))))
    full = rand(rng, (B, C, K))
    np.testing.assert_array_equal(view.update_conv_state(full).conv_states, full)
    longer = rand(rng, (B, C, K + 3))  # a prefill longer than k keeps its last k columns
    np.testing.assert_array_equal(view.update_conv_state(longer).conv_states, longer[:, :, -K:])
    short = rand(rng, (B, C, 2))  # a chunk shorter than k shifts in
    expected = np.concatenate([np.asarray(view.conv_states), short], -1)[:, :, -K:]
    np.testing.assert_array_equal(view.update_conv_state(short).conv_states, expected)
    with pytest.raises(ValueError, match=r"new_conv_state must have shape \(2, 20\) \[b, c\] .* found \(2, 19\)"):
        view.update_conv_state(jnp.ones((B, C - 1)))
    with pytest.raises(ValueError, match=r"found \(2, 20, 4, 1\)"):
        view.update_conv_state(jnp.ones((B, C, K, 1)))


def test_update_ssm_state_casts_and_checks():
    rng = np.random.default_rng(2)
    new = rand(rng, (B, H, PD, N))
    cache = Mamba2Cache.init_cache(3, make_meta(), jnp.bfloat16)
    updated = cache.update_ssm_state(2, jnp.asarray(new, jnp.bfloat16))
    assert updated[2].ssm_states.dtype == jnp.float32  # the state stays float32 under a bfloat16 model
    np.testing.assert_array_equal(updated[2].ssm_states, new.astype(ml_dtypes.bfloat16).astype(np.float32))
    low = Mamba2Cache.init_cache(3, make_meta(), ssm_dtype=jnp.bfloat16).update_ssm_state(0, jnp.asarray(new))
    assert same_bits(low[0].ssm_states, new.astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match=r"new_ssm_state \[b, h, p, n\] must have shape \(2, 4, 2, 3\); found"):
        cache.update_ssm_state(0, jnp.ones((B, H, N, PD)))
    with pytest.raises(ValueError, match=r"layer 0 has no view"):
        Mamba2Cache.init_empty(3).update_ssm_state(0, jnp.asarray(new))


def test_replace_checks_leaves():
    view = Mamba2CacheView.init(make_meta(), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"conv_states \[b, c, k\] must have shape \(2, 20, 4\); found \(2, 4, 20\)"):
        view.replace(conv_states=jnp.ones((B, K, C), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"conv_states must have dtype bfloat16 \(the cache's\); found float32"):
        view.replace(conv_states=jnp.ones((B, C, K), jnp.float32))
    with pytest.raises(ValueError, match=r"positions must have dtype int32 .* found float32"):
        view.replace(positions=jnp.ones((B,), jnp.float32))
    with pytest.raises(ValueError, match=r"replace takes only the leaves .* got \['metadata'\]"):
        view.replace(metadata=make_meta())


def test_update_seq_reset_and_immutability():
    cache = random_cache(3)
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(cache)]
    advanced = cache.update_seq(5).update_seq(jnp.asarray(2, jnp.int32))
    for new, old in zip(advanced, cache):
        np.testing.assert_array_equal(new.positions, np.asarray(old.positions) + 7)
        assert int(new.seqlen_offset) == int(old.seqlen_offset) + 7 and new.positions.dtype == jnp.int32
    updated = advanced.update_conv_state(0, jnp.ones((B, C))).update_ssm_state(1, jnp.ones((B, H, PD, N)))
    zeroed = updated.reset()
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(zeroed))
    assert [x.dtype for x in jax.tree_util.tree_leaves(zeroed)] == [x.dtype for x in jax.tree_util.tree_leaves(cache)]
    for old, now in zip(before, jax.tree_util.tree_leaves(cache)):  # nothing above touched `cache`
        assert same_bits(old, now)
    with pytest.raises(ValueError, match=r"num must be an integer scalar"):
        cache.update_seq(jnp.ones((B,), jnp.int32))
    with pytest.raises(ValueError, match=r"num must be an integer scalar"):
        cache.update_seq(1.5)


def test_advance_moves_each_row_by_its_own_count():
    """`advance` is `update_seq` with a count per row: what a decode loop applies once at its end."""
    cache = random_cache(3)
    rows = jnp.arange(B, dtype=jnp.int32) + 1
    advanced = cache.advance(rows, 4)
    for new, old in zip(advanced, cache):
        np.testing.assert_array_equal(new.positions, np.asarray(old.positions) + np.arange(B) + 1)
        assert int(new.seqlen_offset) == int(old.seqlen_offset) + 4 and new.positions.dtype == jnp.int32
        assert same_bits(new.ssm_states, old.ssm_states)
    same = jax.jit(lambda c, r: c.advance(r, jnp.max(r)))(cache, rows)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(cache.advance(rows, B))):
        assert same_bits(a, b)
    with pytest.raises(ValueError, match=rf"row_steps must be integers of shape \({B},\) \(batch,\); found int32 "
                                         rf"of shape \({B + 1},\)"):
        cache.advance(jnp.ones((B + 1,), jnp.int32), 1)
    with pytest.raises(ValueError, match=r"row_steps must be integers"):
        cache.advance(jnp.ones((B,), jnp.float32), 1)
    with pytest.raises(ValueError, match=r"num must be an integer scalar"):
        cache.advance(rows, rows)


def test_update_view_and_init_empty():
    empty = Mamba2Cache.init_empty(3)
    assert empty.views == (None, None, None) and empty.metadata is None and empty.seqlen_offset is None
    view = Mamba2CacheView.init(make_meta())
    filled = empty.update_view(2, view)
    assert filled[2].layer_index == 2 and filled[0] is None and empty[2] is None
    with pytest.raises(ValueError, match=r"layer_index 2; it cannot go in slot 0"):
        filled.update_view(0, filled[2])
    with pytest.raises(ValueError, match=r"built with batch_size=3, but the model needs batch_size=2"):
        filled.update_view(0, Mamba2CacheView.init(make_meta(batch_size=3)))
    with pytest.raises(ValueError, match=r"ssm_states has dtype bfloat16; slot 2 holds float32"):
        filled.update_view(2, Mamba2CacheView.init(make_meta(), ssm_dtype=jnp.bfloat16))
    with pytest.raises(ValueError, match=r"layer_idx 3 is out of range for a cache of 3 layers"):
        filled.update_view(3, view)


# -- pytree and jit ------------------------------------------------------------------------------------------
def test_pytree_leaves_and_jit():
    cache = random_cache(4)
    leaves = jax.tree_util.tree_leaves(cache)
    assert len(leaves) == 4 * 3 and all(isinstance(x, jax.Array) for x in leaves)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(cache)]
    assert paths[:2] == [".views[0].conv_states", ".views[0].ssm_states"]
    out = jax.jit(lambda c: c)(cache)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(cache)
    assert all(same_bits(a, b) for a, b in zip(jax.tree_util.tree_leaves(out), leaves))
    assert jax.tree_util.tree_leaves(Mamba2Cache.init_empty(2)) == []


def test_update_seq_inside_while_loop():
    cache = Mamba2Cache.init_cache(3, make_meta(), jnp.bfloat16)

    def body(carry):
        i, c = carry
        c = c.update_conv_state(0, jnp.full((B, C), i, jnp.float32)).update_seq(i + 1)  # traced step
        return i + 1, c

    _, out = jax.jit(lambda c: jax.lax.while_loop(lambda carry: carry[0] < 4, body, (0, c)))(cache)
    for view in out:
        np.testing.assert_array_equal(view.positions, np.full((B,), 1 + 2 + 3 + 4))
        assert int(view.seqlen_offset) == 10
    np.testing.assert_array_equal(out[0].conv_states[0, 0], [0, 1, 2, 3])


def test_donated_step_traces_once():
    traces = 0

    @functools.partial(jax.jit, donate_argnums=0)
    def step(cache, column, state):
        nonlocal traces
        traces += 1
        return cache.update_conv_state(1, column).update_ssm_state(1, state).update_seq(1)

    rng = np.random.default_rng(5)
    cache = Mamba2Cache.init_cache(3, make_meta(), jnp.bfloat16)
    for _ in range(5):
        cache = step(cache, jnp.asarray(rand(rng, (B, C))), jnp.asarray(rand(rng, (B, H, PD, N))))
    assert traces == 1
    assert int(cache.seqlen_offset) == 5 and cache[1].conv_states.dtype == jnp.bfloat16


# -- documents -----------------------------------------------------------------------------------------------
SPECS = (P(("data", "model"), None, None), P("data", None, "model", None), P(("data", "model")))


@pytest.mark.parametrize("dtype, ssm_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                              (jnp.bfloat16, jnp.bfloat16)])  # fmt: skip
@pytest.mark.parametrize("form", ["dict", "json"])
def test_round_trip_is_exact(dtype, ssm_dtype, form):
    axis = PartitionAxis(batch_axis=("data", "fsdp"), head_axis=None, state_axis="model")
    cache = random_cache(6, dtype, ssm_dtype, axis, SPECS)
    if form == "dict":
        doc = cache.to_dict()
        assert isinstance(doc["views"][0]["conv_states"], np.ndarray)
        back = Mamba2Cache.from_dict(doc)
        for view in doc["views"]:  # the document and the cache share no memory
            view["ssm_states"][...] = 7
    else:
        text = cache.to_json()
        json.loads(text)  # plain JSON
        back = Mamba2Cache.from_json(text)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(cache)  # metadata, specs, indices
    for old, new in zip(cache, back):
        assert new.metadata == old.metadata and new.metadata.partition_axis == axis
        assert new.partition_specs == SPECS and new.layer_index == old.layer_index
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(back)):
        assert same_bits(a, b), (a.dtype, b.dtype)


def test_round_trip_empty_and_partial():
    for cache in (Mamba2Cache.init_empty(3), Mamba2Cache.init_empty(3).update_view(1, random_cache(7)[1])):
        for back in (Mamba2Cache.from_dict(cache.to_dict()), Mamba2Cache.from_json(cache.to_json())):
            assert [v is None for v in back] == [v is None for v in cache]
            assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(cache)
            assert all(map(same_bits, jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(back)))


def test_malformed_documents_raise():
    cache = random_cache(8, jnp.bfloat16)

    def broken(edit):
        doc = cache.to_dict()
        edit(doc)
        return doc

    cases = [
        (lambda d: d["views"][1].update(ssm_states=np.zeros((B, H, N, PD), np.float32)),
         r"views\[1\].ssm_states must have shape \(2, 4, 2, 3\) \(from the metadata\); found \(2, 4, 3, 2\)"),
        (lambda d: d["views"][0].update(conv_states=d["views"][0]["conv_states"].astype(np.float32)),
         r"views\[0\].conv_states must have dtype bfloat16; found float32"),
        (lambda d: d["views"][0].update(positions=d["views"][0]["positions"].astype(np.int64)),
         r"views\[0\].positions must have dtype int32; found int64"),
        (lambda d: d["views"][2].pop("ssm_states"), r"views\[2\] is missing fields \['ssm_states'\]"),
        (lambda d: d["views"][0]["metadata"].pop("n_groups"), r"views\[0\].metadata is missing fields \['n_groups'\]"),
        (lambda d: d["views"][0].update(dtype="float7"), r"views\[0\].dtype has unknown dtype 'float7'"),
        (lambda d: d["views"][0]["metadata"].update(head_dim=3), r"views\[0\].metadata: num_heads \* head_dim"),
        (lambda d: d.update(version=99), r"version 99; this easymamba reads version 1"),
        (lambda d: d.pop("views"), r"cache document is missing fields \['views'\]"),
    ]  # fmt: skip
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            Mamba2Cache.from_dict(broken(edit))

    def broken_json(edit):
        doc = json.loads(cache.to_json())
        edit(doc["views"][0]["conv_states"])
        return json.dumps(doc)

    json_cases = [
        (lambda a: a.update(dtype="complex7"), r"views\[0\].conv_states.dtype has unknown dtype 'complex7'"),
        (lambda a: a.update(data=a["data"][:-8]), r"views\[0\].conv_states.data holds \d+ bytes, but shape"),
        (lambda a: a.update(shape=[2, 20, 3]), r"views\[0\].conv_states.data holds 320 bytes, but shape \(2, 20, 3\)"),
        (lambda a: a.update(dtype="float32"), r"views\[0\].conv_states.data holds 320 bytes"),
        (lambda a: a.pop("shape"), r"views\[0\].conv_states is missing fields \['shape'\]"),
    ]  # fmt: skip
    for edit, match in json_cases:
        with pytest.raises(ValueError, match=match):
            Mamba2Cache.from_json(broken_json(edit))
    with pytest.raises(ValueError, match=r"the cache JSON is not JSON"):
        Mamba2Cache.from_json("{not json")


# -- sharding on 8 host devices ------------------------------------------------------------------------------
@pytest.fixture
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"))


def test_sharded_init_places_every_array(mesh):
    meta = make_meta(batch_size=4, num_heads=8, head_dim=1)
    cache = Mamba2Cache.init_cache(3, meta, jnp.bfloat16, mesh=mesh)
    for view in cache:
        specs = dict(zip(("conv_states", "ssm_states", "positions"), view.partition_specs), seqlen_offset=P())
        for name, spec in specs.items():
            array = getattr(view, name)
            assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), name
    assert cache[0].ssm_states.sharding.spec == P("data", "model", None, None)
    assert cache[0].ssm_states.addressable_shards[0].data.shape == (2, 2, 1, N)  # 4/2 rows, 8/4 heads
    # updates, a reset and a document keep the layout
    step = jax.jit(lambda c: c.update_ssm_state(0, jnp.ones((4, 8, 1, N))).update_seq(1),
                   out_shardings=cache.shardings(mesh))  # fmt: skip
    for again in (step(cache), cache.reset(), Mamba2Cache.from_json(cache.to_json(), mesh=mesh)):
        assert again[0].ssm_states.sharding.is_equivalent_to(cache[0].ssm_states.sharding, 4)
        assert again[2].positions.sharding.is_equivalent_to(cache[2].positions.sharding, 1)


def test_sharded_init_checks_specs(mesh):
    meta = make_meta(batch_size=4, num_heads=8, head_dim=1)
    with pytest.raises(ValueError, match=r"names mesh axis 'tensor', which the mesh lacks; .* \('data', 'model'\)"):
        Mamba2Cache.init_cache(3, make_meta(PartitionAxis(head_axis="tensor"), batch_size=4, num_heads=8, head_dim=1),
                               mesh=mesh)  # fmt: skip
    with pytest.raises(ValueError, match=r"dim 0 \(b\) of conv_states \[b, c, k\] has size 3, which mesh axis "
                                         r"'data' of size 2 does not divide"):  # fmt: skip
        Mamba2Cache.init_cache(3, make_meta(batch_size=3, num_heads=8, head_dim=1), mesh=mesh)
    with pytest.raises(ValueError, match=r"dim 1 \(c\) of conv_states \[b, c, k\] has size 20, which mesh axis "
                                         r"\('data', 'model'\) of size 8 does not divide"):  # fmt: skip
        Mamba2Cache.init_cache(3, meta, partition_specs=(P(None, ("data", "model")), P(), P()), mesh=mesh)
    with pytest.raises(ValueError, match=r"has 4 entries but the array has rank 3"):
        Mamba2Cache.init_cache(3, meta, partition_specs=(P("data", None, None, None), P(), P()), mesh=mesh)
    with pytest.raises(ValueError, match=r"uses a mesh axis on two dimensions"):
        Mamba2Cache.init_cache(3, meta, partition_specs=(P("data", "data"), P(), P()), mesh=mesh)
    doc = Mamba2Cache.init_cache(3, make_meta(batch_size=3, num_heads=8, head_dim=1)).to_dict()
    with pytest.raises(ValueError, match=r"has size 3, which mesh axis 'data' of size 2 does not divide"):
        Mamba2Cache.from_dict(doc, mesh=mesh)


# -- EasyDeL's habits ----------------------------------------------------------------------------------------------
def test_easydel_single_spec_axis_names_and_dtype_none():
    """One PartitionSpec for the whole view (each leaf's rank), EasyDeL's PartitionAxis names kept through a
    document, `dtype=None` as float32 without a float64 warning, and the EasyDeL example's inconsistent sizes
    refused with the sizes that would fix them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # jnp.zeros(float64) would warn about the narrowing
        cache = Mamba2Cache.init_cache(3, make_meta(), dtype=None, partition_specs=P("data", "model"))
    view = cache.views[0]
    assert view.conv_states.dtype == jnp.float32 and view.ssm_states.dtype == jnp.float32
    assert view.partition_specs == (P("data", "model", None), P("data", "model", None, None), P("data"))
    axis = PartitionAxis(sequence_axis="sp", hidden_state_axis="tp", vocab_axis=("tp", "fsdp"), expert_axis=None)
    assert axis.vocab_axis == ("tp", "fsdp") and axis.ssm_state_spec() == PartitionAxis().ssm_state_spec()
    assert PartitionAxis.from_dict(json.loads(json.dumps(axis.to_dict()))) == axis
    old = {k: v for k, v in PartitionAxis().to_dict().items() if k not in ("kv_head_axis", "sequence_axis")}
    assert PartitionAxis.from_dict(old) == PartitionAxis()           # a document from before the new fields
    meta = make_meta(axis)
    assert Mamba2Cache.from_json(Mamba2Cache.init_cache(3, meta).to_json()).metadata.partition_axis == axis
    with pytest.raises(ValueError, match=r"PartitionAxis.sequence_axis must be None, a mesh axis name"):
        PartitionAxis(sequence_axis=1)
    with pytest.raises(ValueError, match=r"\(16 \* 64 = 1024\) must equal intermediate_size \(2816\); change one "
                                         r"of them: intermediate_size=1024 or num_heads=44 or head_dim=176"):
        Mamba2CacheMetaData.create(num_hidden_layers=2, batch_size=1, intermediate_size=2816, num_heads=16,
                                   head_dim=64, state_size=16, conv_kernel_size=4, n_groups=1)
