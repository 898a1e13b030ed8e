"""The model consuming the cache: decode steps and chunked prefill continue exactly where a full forward would.

Tolerance 1e-5 rel on float32 logits, as in test_model_parity: a decode step computes the same recurrence
in a different order (one state update instead of a chunked scan), which moves results by float32 rounding
(measured ~1e-7..1e-6), never by 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import easymamba as em
from helpers import jitted, random_hf_model, random_ids, rel_err, to_easymamba

TOL = 1e-5
LENGTH = 12


@pytest.fixture(scope="module")
def pair():
    hf_model = random_hf_model(seed=21, n_groups=2, num_hidden_layers=2)
    return hf_model, to_easymamba(hf_model)


@pytest.fixture(scope="module")
def ids(pair):
    return jnp.asarray(random_ids(np.random.default_rng(8), 2, LENGTH, pair[0].config.vocab_size))


@pytest.mark.parametrize("t", [1, 3, 5, 9])  # 1 and 3 are shorter than conv_kernel (4)
def test_prefill_then_decode_steps_equal_full_forward(pair, ids, t):
    _, model = pair
    forward = jitted(model)
    full = np.asarray(forward(ids).logits)
    out = forward(ids[:, :t], cache=model.init_cache(2))
    logits = [np.asarray(out.logits)]
    cache = out.cache
    for i in range(t, LENGTH):
        out = forward(ids[:, i:i + 1], cache=cache)
        cache = out.cache
        logits.append(np.asarray(out.logits))
    stepped = np.concatenate(logits, axis=1)
    err = rel_err(stepped, full)
    assert err <= TOL, err
    assert int(cache.seqlen_offset) == LENGTH
    np.testing.assert_array_equal(np.asarray(cache.views[0].positions), [LENGTH, LENGTH])


@pytest.mark.parametrize("split", [(2, 7), (5, 9), (4, 11)])
def test_prefill_continuation_then_steps_equal_full_forward(pair, ids, split):
    _, model = pair
    forward = jitted(model)
    full = np.asarray(forward(ids).logits)
    a, b = split
    out1 = forward(ids[:, :a], cache=model.init_cache(2))
    out2 = forward(ids[:, a:b], cache=out1.cache)          # a multi-token continuation (chunked prefill)
    logits = [out1.logits, out2.logits]
    cache = out2.cache
    for i in range(b, LENGTH):
        out = forward(ids[:, i:i + 1], cache=cache)
        cache = out.cache
        logits.append(out.logits)
    assert rel_err(np.concatenate([np.asarray(x) for x in logits], axis=1), full) <= TOL


def test_prefill_states_equal_hf_cache(pair, ids):
    hf_model, model = pair
    with torch.no_grad():
        hf_cache = hf_model(torch.from_numpy(np.array(ids)).long(), use_cache=True).cache_params
    cache = jitted(model)(ids, cache=model.init_cache(2)).cache
    for i, view in enumerate(cache.views):
        # conv windows hold raw in_proj outputs; the SSM state is the end of a length-12 scan
        assert rel_err(view.conv_states, hf_cache.get_conv_state(i).numpy()) <= TOL
        assert rel_err(view.ssm_states, hf_cache.get_recurrent_state(i).numpy()) <= TOL
        assert view.ssm_states.dtype == jnp.float32


def test_short_prefill_states_equal_hf_cache(pair):
    """A 2-token prompt (shorter than the conv kernel) leaves a left-zero-padded window, as HF's."""
    hf_model, model = pair
    ids = jnp.asarray(random_ids(np.random.default_rng(9), 2, 2, hf_model.config.vocab_size))
    with torch.no_grad():
        hf_cache = hf_model(torch.from_numpy(np.array(ids)).long(), use_cache=True).cache_params
    cache = jitted(model)(ids, cache=model.init_cache(2)).cache
    for i, view in enumerate(cache.views):
        assert rel_err(view.conv_states, hf_cache.get_conv_state(i).numpy()) <= TOL
        assert rel_err(view.ssm_states, hf_cache.get_recurrent_state(i).numpy()) <= TOL


def test_left_padded_prefill_then_decode_matches_rows_alone(pair):
    _, model = pair
    forward = jitted(model)
    rng = np.random.default_rng(10)
    lengths, width, steps = [8, 3], 8, 4
    vocab = model.config.vocab_size
    rows = [random_ids(rng, 1, n + steps, vocab) for n in lengths]
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = rows[r][0, :n]
        mask[r, width - n:] = 1
    out = forward(jnp.asarray(ids), jnp.asarray(mask), model.init_cache(2))
    cache, got = out.cache, []
    for s in range(steps):
        tok = np.array([[rows[0][0, lengths[0] + s]], [rows[1][0, lengths[1] + s]]], np.int32)
        out = forward(jnp.asarray(tok), None, cache)
        cache = out.cache
        got.append(np.asarray(out.logits)[:, 0])
    for r, n in enumerate(lengths):
        alone = np.asarray(forward(jnp.asarray(rows[r])).logits)[0, n:]
        assert rel_err(np.stack([g[r] for g in got]), alone) <= TOL


def test_restored_cache_continues_identically(pair, ids):
    _, model = pair
    forward = jitted(model)
    cache = forward(ids[:, :7], cache=model.init_cache(2)).cache
    restored = em.Mamba2Cache.from_json(cache.to_json())
    a = forward(ids[:, 7:8], cache=cache)
    b = forward(ids[:, 7:8], cache=restored)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    for va, vb in zip(a.cache.views, b.cache.views):
        np.testing.assert_array_equal(np.asarray(va.ssm_states), np.asarray(vb.ssm_states))


def test_bfloat16_ssm_state_cache_decodes(pair, ids):
    """A bfloat16 SSM state halves decode bytes; logits stay within bfloat16 rounding of the float32 run."""
    _, model = pair
    forward = jitted(model)
    full = np.asarray(forward(ids).logits)
    out = forward(ids[:, :6], cache=model.init_cache(2, ssm_dtype=jnp.bfloat16))
    cache, logits = out.cache, [out.logits]
    for i in range(6, LENGTH):
        out = forward(ids[:, i:i + 1], cache=cache)
        cache, logits = out.cache, logits + [out.logits]
    assert cache.views[0].ssm_states.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa (rel 4e-3 per rounding); 6 steps of rounding the state stay < 5e-2.
    assert rel_err(np.concatenate([np.asarray(x) for x in logits], 1), full) <= 5e-2


def test_jitted_decode_step_with_donated_cache_traces_once(pair, ids):
    _, model = pair
    graphdef, state = nnx.split(model)
    traces = []

    def step(state, cache, tok):
        traces.append(1)
        out = nnx.merge(graphdef, state)(tok, cache=cache)
        return out.logits, out.cache

    step = jax.jit(step, donate_argnums=(1,))
    cache = jitted(model)(ids[:, :5], cache=model.init_cache(2)).cache
    for i in range(5, 10):
        _, cache = step(state, cache, ids[:, i:i + 1])
    assert len(traces) == 1
    assert int(cache.seqlen_offset) == 10


def test_cache_decode_inside_while_loop(pair, ids):
    """Positions and offset advance as arrays inside lax.while_loop (the generation loop's shape)."""
    _, model = pair
    graphdef, state = nnx.split(model)
    cache0 = jitted(model)(ids[:, :4], cache=model.init_cache(2)).cache

    @jax.jit
    def loop(state, cache, ids):
        def body(carry):
            i, cache, acc = carry
            tok = jax.lax.dynamic_slice_in_dim(ids, i, 1, axis=1)
            out = nnx.merge(graphdef, state)(tok, cache=cache)
            return i + 1, out.cache, acc + out.logits[:, 0].sum()
        return jax.lax.while_loop(lambda c: c[0] < LENGTH, body, (jnp.int32(4), cache, jnp.float32(0)))

    _, cache, acc = loop(state, cache0, ids)
    full = np.asarray(jitted(model)(ids).logits)
    assert abs(float(acc) - full[:, 4:].sum()) <= 1e-4 * np.abs(full[:, 4:]).sum()
    assert int(cache.seqlen_offset) == LENGTH


def test_update_seq_false_leaves_the_counters_and_steps_the_states(pair, ids):
    """`update_seq=False` (the generation loop's step) returns the states of a normal step and the counters as
    given; `cache.advance` later brings them to what per-step updates give."""
    _, model = pair
    cache0 = jitted(model)(ids[:, :4], cache=model.init_cache(2)).cache
    tok = ids[:, 4:5]
    stepped = model(tok, cache=cache0)
    held_logits, held_cache = model.step(tok[:, 0], cache0, update_seq=False)
    np.testing.assert_array_equal(held_logits, stepped.logits[:, 0])
    for h, s, c in zip(held_cache.views, stepped.cache.views, cache0.views):
        np.testing.assert_array_equal(h.ssm_states, s.ssm_states)
        np.testing.assert_array_equal(h.conv_states, s.conv_states)
        np.testing.assert_array_equal(h.positions, c.positions)
        assert int(h.seqlen_offset) == int(c.seqlen_offset) == 4
    caught_up = held_cache.advance(jnp.ones((2,), jnp.int32), 1)
    for a, b in zip(jax.tree_util.tree_leaves(caught_up), jax.tree_util.tree_leaves(stepped.cache)):
        np.testing.assert_array_equal(a, b)


def test_mismatched_cache_is_refused(pair, ids):
    _, model = pair
    with pytest.raises(ValueError, match=r"batch_size"):
        model(ids, cache=model.init_cache(3))
    other = em.Mamba2ForCausalLM(model.config.replace(num_hidden_layers=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"3 layers.*num_hidden_layers=2"):
        model(ids, cache=other.init_cache(2))
    wider = em.Mamba2ForCausalLM(model.config.replace(state_size=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"state_size"):
        model(ids, cache=wider.init_cache(2))
    with pytest.raises(ValueError, match=r"hold no state"):
        model(ids, cache=em.Mamba2Cache.init_empty(2))


def test_model_init_cache_on_a_mesh(pair):
    _, model = pair
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    cache = model.init_cache(2, mesh=mesh)
    for view in cache.views:
        conv_spec, ssm_spec, _ = view.partition_specs
        assert view.ssm_states.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, ssm_spec), 4)
        assert view.conv_states.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, conv_spec), 3)
        assert view.conv_states.dtype == jnp.float32 and view.ssm_states.dtype == jnp.float32
