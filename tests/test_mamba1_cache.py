"""The Mamba-1 cache and the model consuming it: decode steps and chunked prefill continue exactly where a full
forward would, the states equal Hugging Face's after a prefill, and the cache is a checked, lossless pytree.

Tolerance 1e-5 rel on float32 logits and states, as in test_mamba1_parity: a decode step computes the same
recurrence in a different order (one state update instead of a scan), which moves results by float32 rounding
(measured ~1e-7), never by 1e-5. Continuations are checked against our own full forward, not against
transformers' cache: transformers 5.23 drops the cached SSM state when it continues with several tokens.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import jitted, random_ids, rel_err
from helpers_mamba1 import random_hf_mamba, to_easymamba_mamba1
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easymamba.caching import (
    Mamba2Cache,
    Mamba2CacheMetaData,
    MambaCache,
    MambaCacheMetaData,
    MambaCacheView,
    PartitionAxis,
)
from easymamba.config import Mamba2Config
from easymamba.models import Mamba2ForCausalLM

TOL = 1e-5
LENGTH = 12
MAMBA2_META = Mamba2CacheMetaData.create(num_hidden_layers=1, batch_size=2, intermediate_size=16, num_heads=2,
                                         head_dim=8, state_size=4, conv_kernel_size=4, n_groups=1)


@pytest.fixture(scope="module")
def pair():
    hf_model = random_hf_mamba(seed=21, num_hidden_layers=2, tie_word_embeddings=False)
    return hf_model, to_easymamba_mamba1(hf_model)


@pytest.fixture(scope="module")
def forward(pair):
    return jitted(pair[1])  # one jitted function for the module, so equal shapes compile once


@pytest.fixture(scope="module")
def ids(pair):
    return jnp.asarray(random_ids(np.random.default_rng(8), 2, LENGTH, pair[0].config.vocab_size))


@pytest.fixture(scope="module")
def full(forward, ids):
    return np.asarray(forward(ids).logits)


def _decode(forward, cache, tokens):
    """Single-token steps over tokens [b, s]; returns (logits [b, s, v], cache)."""
    logits = []
    for i in range(tokens.shape[1]):
        out = forward(tokens[:, i:i + 1], cache=cache)
        cache = out.cache
        logits.append(np.asarray(out.logits))
    return np.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("t", [1, 3, 9])  # 1 and 3 are shorter than conv_kernel (4)
def test_prefill_then_decode_steps_equal_full_forward(pair, forward, ids, full, t):
    model = pair[1]
    out = forward(ids[:, :t], cache=model.init_cache(2))
    stepped, cache = _decode(forward, out.cache, ids[:, t:])
    err = rel_err(np.concatenate([np.asarray(out.logits), stepped], axis=1), full)
    print(f"prefill {t} + {LENGTH - t} steps: rel err {err:.2e}")
    assert err <= TOL
    assert int(cache.seqlen_offset) == LENGTH
    np.testing.assert_array_equal(np.asarray(cache.views[1].positions), [LENGTH, LENGTH])


@pytest.mark.parametrize("split", [(3, 7), (9, 11)])
def test_prefill_continuation_then_steps_equal_full_forward(pair, forward, ids, full, split):
    model = pair[1]
    a, b = split
    out1 = forward(ids[:, :a], cache=model.init_cache(2))
    out2 = forward(ids[:, a:b], cache=out1.cache)  # a multi-token continuation (chunked prefill)
    stepped, cache = _decode(forward, out2.cache, ids[:, b:])
    got = np.concatenate([np.asarray(out1.logits), np.asarray(out2.logits), stepped], axis=1)
    err = rel_err(got, full)
    print(f"prefill {a} + continue {b - a} + {LENGTH - b} steps: rel err {err:.2e}")
    assert err <= TOL
    assert int(cache.seqlen_offset) == LENGTH


@pytest.mark.parametrize("length", [9, 3])  # 3: shorter than the conv kernel, a left-zero-padded window
def test_prefill_states_equal_hf_cache(pair, forward, ids, length):
    hf_model, model = pair
    ids = ids[:, :length]
    with torch.no_grad():
        hf_cache = hf_model(torch.from_numpy(np.array(ids)).long(), use_cache=True).cache_params
    cache = forward(ids, cache=model.init_cache(2)).cache
    e, n, k = model.config.intermediate_size, model.config.state_size, model.config.conv_kernel
    for i, view in enumerate(cache.views):
        conv, ssm = hf_cache.get_conv_state(i).numpy(), hf_cache.get_recurrent_state(i).numpy()
        assert conv.shape == view.conv_states.shape == (2, e, k)  # [b, e, k]: pre-conv x columns, newest last
        assert ssm.shape == view.ssm_states.shape == (2, e, n)    # [b, e, n]
        assert rel_err(view.conv_states, conv) <= TOL and rel_err(view.ssm_states, ssm) <= TOL
        assert view.ssm_states.dtype == jnp.float32


def test_decode_steps_equal_hf_decode_steps(pair, forward, ids):
    """transformers' single-token decode is correct (only its multi-token continuation is not): compare."""
    hf_model, model = pair
    torch_ids = torch.from_numpy(np.array(ids)).long()
    with torch.no_grad():
        out = hf_model(torch_ids[:, :9], use_cache=True)
        theirs, hf_cache = [out.logits.numpy()], out.cache_params
        for i in range(9, LENGTH):
            out = hf_model(torch_ids[:, i:i + 1], cache_params=hf_cache, use_cache=True)
            theirs.append(out.logits.numpy())
            hf_cache = out.cache_params
    out = forward(ids[:, :9], cache=model.init_cache(2))
    stepped, _ = _decode(forward, out.cache, ids[:, 9:])
    assert rel_err(np.concatenate([np.asarray(out.logits), stepped], axis=1), np.concatenate(theirs, axis=1)) <= TOL


def test_left_padded_prefill_then_decode_matches_rows_alone(pair, forward):
    model = pair[1]
    rng = np.random.default_rng(10)
    lengths, width, steps = [9, 3], 9, LENGTH - 9
    vocab = model.config.vocab_size
    rows = [random_ids(rng, 1, n + steps, vocab) for n in lengths]
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = rows[r][0, :n]
        ids[r, :width - n] = rng.integers(3, vocab, width - n)  # junk under the mask
        mask[r, width - n:] = 1
    out = forward(jnp.asarray(ids), jnp.asarray(mask), model.init_cache(2))
    tokens = jnp.asarray(np.stack([rows[r][0, n:] for r, n in enumerate(lengths)]))
    stepped, _ = _decode(forward, out.cache, tokens)
    for r, n in enumerate(lengths):
        alone = np.asarray(forward(jnp.asarray(np.repeat(rows[r], 2, axis=0))).logits)[0]  # (2, n + steps): batch 2
        assert rel_err(np.asarray(out.logits)[r, width - n:], alone[:n]) <= TOL
        assert rel_err(stepped[r], alone[n:]) <= TOL


def test_cache_round_trip_is_exact_and_continues_identically(pair, forward, ids):
    model = pair[1]
    cache = forward(ids[:, :9], cache=model.init_cache(2)).cache
    for restored in (MambaCache.from_json(cache.to_json()), MambaCache.from_dict(cache.to_dict())):
        assert type(restored) is MambaCache and len(restored) == 2
        for a, b in zip(cache.views, restored.views):
            assert type(b) is MambaCacheView and a.metadata == b.metadata
            assert a.partition_specs == b.partition_specs and a.layer_index == b.layer_index
            for name in ("conv_states", "ssm_states", "positions", "seqlen_offset"):
                x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    a = forward(ids[:, 9:10], cache=cache)
    b = forward(ids[:, 9:10], cache=restored)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    # bfloat16 windows and NaN payloads survive too (bytes, not formatted floats)
    bf = model.init_cache(2, dtype=jnp.bfloat16)
    view = bf.views[0]
    bf = bf.update_view(0, view.replace(conv_states=jnp.full(view.conv_states.shape, jnp.nan, jnp.bfloat16)))
    back = MambaCache.from_json(bf.to_json())
    assert back.views[0].conv_states.dtype == jnp.bfloat16
    assert np.asarray(back.views[0].conv_states).tobytes() == np.asarray(bf.views[0].conv_states).tobytes()
    with pytest.raises(ValueError, match=r"format 'easymamba.MambaCache'; expected 'easymamba.Mamba2Cache'"):
        Mamba2Cache.from_json(cache.to_json())


def test_mismatched_cache_is_refused(pair, ids):
    model = pair[1]
    cfg = model.config

    def cache_for(**changes):
        other = nnx.eval_shape(lambda: type(model)(cfg.replace(**changes), rngs=nnx.Rngs(0)))
        return other.init_cache(2)

    with pytest.raises(ValueError, match=r"built with batch_size=3, but the model needs batch_size=2"):
        model(ids, cache=model.init_cache(3))
    with pytest.raises(ValueError, match=r"it has 3 layers, but the model needs num_hidden_layers=2"):
        model(ids, cache=cache_for(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"built with state_size=4, but the model needs state_size=8"):
        model(ids, cache=cache_for(state_size=4))
    with pytest.raises(ValueError, match=r"built with intermediate_size=96, but the model needs intermediate_size=64"):
        model(ids, cache=cache_for(hidden_size=48))
    with pytest.raises(ValueError, match=r"conv_kernel_size=3, but the model needs conv_kernel_size=4"):
        model(ids, cache=cache_for(conv_kernel=3))
    with pytest.raises(ValueError, match=r"hold no state"):
        model(ids, cache=MambaCache.init_empty(2))
    mamba2 = nnx.eval_shape(lambda: Mamba2ForCausalLM(
        Mamba2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=8,
                     n_groups=1), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"cache must be a MambaCache .* got Mamba2Cache"):
        model(ids, cache=mamba2.init_cache(2))
    # ... and the Mamba-2 model's check refuses a Mamba-1 cache by its model_type, before any shape goes wrong
    with pytest.raises(ValueError, match=r"built for model_type 'mamba', but the model's config has .* 'mamba2'"):
        model.init_cache(2).check_compatible(mamba2.config, 2)


def test_metadata_views_and_functional_updates(pair):
    model = pair[1]
    meta = MambaCacheMetaData.from_config(model.config, 2)
    assert meta == MambaCacheMetaData.create(num_hidden_layers=2, batch_size=2, intermediate_size=64, state_size=8,
                                             conv_kernel_size=4)
    assert (meta.conv_state_shape, meta.ssm_state_shape, meta.positions_shape) == ((2, 64, 4), (2, 64, 8), (2,))
    back = MambaCacheMetaData.from_dict(meta.to_dict())
    assert back == meta and hash(back) == hash(meta)
    assert meta.view_specs() == (P("data", "model", None), P("data", "model", None), P("data"))
    with pytest.raises(ValueError, match=r"batch_size must be a positive int; got 0"):
        MambaCacheMetaData.from_config(model.config, 0)
    with pytest.raises(ValueError, match=r"PartitionAxis.conv_channel_axis \('model'\) must be None for a Mamba-1"):
        MambaCacheMetaData.from_config(model.config, 2, PartitionAxis(conv_channel_axis="model", head_axis=None))
    with pytest.raises(ValueError, match=r"PartitionAxis.head_dim_axis \('x'\) must be None"):
        MambaCacheMetaData.from_config(model.config, 2, PartitionAxis(head_dim_axis="x"))
    with pytest.raises(ValueError, match=r"has no attribute 'conv_kernel', needed for conv_kernel_size"):
        MambaCacheMetaData.from_config(dataclasses.make_dataclass("C", ["num_hidden_layers", "intermediate_size",
                                                                        "state_size"])(2, 64, 8), 2)

    cache = model.init_cache(2)
    view = cache.views[0]
    col = jnp.arange(2 * 64, dtype=jnp.float32).reshape(2, 64)
    rolled = view.update_conv_state(col)
    np.testing.assert_array_equal(np.asarray(rolled.conv_states[:, :, -1]), np.asarray(col))
    assert float(jnp.abs(view.conv_states).sum()) == 0.0  # nothing mutated
    new_ssm = jnp.ones((2, 64, 8), jnp.bfloat16)
    assert view.update_ssm_state(new_ssm).ssm_states.dtype == jnp.float32  # cast to the cache's dtype
    with pytest.raises(ValueError, match=r"new_ssm_state \[b, e, n\] must have shape \(2, 64, 8\); found \(2, 8, 64\)"):
        view.update_ssm_state(jnp.ones((2, 8, 64)))
    with pytest.raises(ValueError, match=r"conv_states \[b, e, k\] must have shape \(2, 64, 4\); found \(2, 4, 64\)"):
        view.replace(conv_states=jnp.zeros((2, 4, 64)))
    with pytest.raises(ValueError, match=r"view must be a MambaCacheView; got Mamba2CacheView"):
        cache.update_view(0, Mamba2Cache.init_cache(1, MAMBA2_META).views[0])
    advanced = cache.update_conv_state(1, col).update_ssm_state(1, new_ssm).update_seq(5)
    assert type(advanced) is MambaCache and int(advanced.seqlen_offset) == 5 and int(cache.seqlen_offset) == 0
    assert float(advanced.reset().views[1].conv_states.sum()) == 0.0
    leaves, treedef = jax.tree_util.tree_flatten(advanced)
    assert len(leaves) == 8 and type(jax.tree_util.tree_unflatten(treedef, leaves)) is MambaCache


def test_sharded_init_and_spec_checks(pair):
    model = pair[1]
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    cache = model.init_cache(2, mesh=mesh)
    for view in cache.views:
        conv_spec, ssm_spec, pos_spec = view.partition_specs
        assert (conv_spec, ssm_spec) == (P("data", "model", None), P("data", "model", None))
        assert view.conv_states.sharding.is_equivalent_to(NamedSharding(mesh, conv_spec), 3)
        assert view.ssm_states.sharding.is_equivalent_to(NamedSharding(mesh, ssm_spec), 3)
        assert view.positions.sharding.is_equivalent_to(NamedSharding(mesh, pos_spec), 1)
    restored = MambaCache.from_json(cache.to_json(), mesh=mesh)
    assert restored.views[0].ssm_states.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model", None)), 3)
    with pytest.raises(ValueError, match=r"dim 0 \(b\) of conv_states \[b, e, k\] has size 3, which mesh axis 'data'"):
        model.init_cache(3, mesh=mesh)
    meta = MambaCacheMetaData.from_config(model.config, 2)
    with pytest.raises(ValueError, match=r"for ssm_states \[b, e, n\] has 4 entries but the array has rank 3"):
        MambaCache.init_cache(2, meta, partition_specs=(P(), P("data", "model", None, None), P()))
    with pytest.raises(ValueError, match=r"names mesh axis 'tensor', which the mesh lacks"):
        model.init_cache(2, mesh=mesh, partition_axis=PartitionAxis(head_axis="tensor"))


def test_decode_inside_while_loop(pair, forward, ids, full):
    """The generation loop's shape: the cache is a while_loop carry whose type a step keeps (dtypes, specs), and
    positions and offset advance as arrays."""
    model = pair[1]
    graphdef, state = nnx.split(model)

    @jax.jit
    def loop(state, cache, ids):
        def body(carry):
            i, cache, acc = carry
            tok = jax.lax.dynamic_slice_in_dim(ids, i, 1, axis=1)
            out = nnx.merge(graphdef, state)(tok, cache=cache)
            return i + 1, out.cache, acc + out.logits[:, 0].sum()
        return jax.lax.while_loop(lambda c: c[0] < LENGTH, body, (jnp.int32(3), cache, jnp.float32(0)))

    _, cache, acc = loop(state, forward(ids[:, :3], cache=model.init_cache(2)).cache, ids)
    assert abs(float(acc) - full[:, 3:].sum()) <= 1e-4 * np.abs(full[:, 3:]).sum()
    assert int(cache.seqlen_offset) == LENGTH
