"""Jamba against transformers 5.25's `JambaForCausalLM`: random weights (every parameter redrawn: A_log, D, the
dt/B/C norm weights, every RMSNorm, biases, router and experts), two tiny configs with every block kind (Mamba-1 or
attention, each with an MLP or experts; attention first in one, tied and untied heads), float32.

Tolerances: logits, hidden states and router logits within 1e-5 of transformers' relative to their largest
magnitude (float32 through a few layers of different summation orders); the same model run in pieces (cached
steps, chunked prefill, padded rows) within 1e-5 of itself run whole. transformers' Mamba-1 multi-token
continuation of a cache ignores the cached state, so cached runs are compared with its UNCACHED forward.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import check_cache_json_round_trip, fwd, rel_err
from helpers_hybrid import hf_forward, random_hf_model, tiny_config_kwargs

import easymamba as em
from easymamba.config import JambaConfig
from easymamba.interp import compute_effective_attention, run_with_cache

TOL = 1e-5


@pytest.fixture(scope="module", params=[0, 1], ids=["untied-attn-1-4", "tied-attn-first"])
def pair(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory, easymamba's model read from it)."""
    hf = random_hf_model("jamba", seed=20 + request.param, variant=request.param)
    path = tmp_path_factory.mktemp(f"jamba{request.param}")
    hf.save_pretrained(path)
    return hf, path, em.from_pretrained(path)


def ids_for(model, b, l, seed):
    return np.random.default_rng(seed).integers(3, model.config.vocab_size, (b, l))


def test_block_kinds_follow_the_periods(pair):
    hf, _, model = pair
    cfg = model.config
    assert list(cfg.layers_block_type) == hf.config.layers_block_type
    assert [n > 1 for n in hf.config.layers_num_experts] == [ff == "moe" for ff in cfg.layers_feed_forward]
    assert {"mamba", "attention"} <= set(cfg.layers_block_type) and {"mlp", "moe"} <= set(cfg.layers_feed_forward)
    for i, layer in enumerate(model.backbone.layers):
        kind = type(hf.model.layers[i].feed_forward).__name__
        assert (type(layer.feed_forward).__name__ == "MoE") == (kind == "JambaSparseMoeBlock")


def test_logits_loss_and_hidden_states_match_transformers(pair):
    hf, _, model = pair
    ids = ids_for(model, 2, 19, 0)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), labels=torch.from_numpy(ids), output_hidden_states=True)
    out = fwd(model, jnp.asarray(ids), labels=jnp.asarray(ids), output_hidden_states=True)
    assert rel_err(out.logits, ref.logits.numpy()) < TOL
    assert abs(float(out.loss) - float(ref.loss)) < TOL * abs(float(ref.loss))
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(ours, theirs.numpy()) < TOL


def test_router_logits_match_transformers(pair):
    hf, _, model = pair
    ids = ids_for(model, 2, 9, 8)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), output_router_logits=True).router_logits          # one (b*l, E) per MoE
    moe = [i for i, ff in enumerate(model.config.layers_feed_forward) if ff == "moe"]
    names = [f"layers.{i}.feed_forward.hook_router_logits" for i in moe]
    _, acts = run_with_cache(model, jnp.asarray(ids), names=names)
    assert len(ref) == len(moe)
    for name, theirs in zip(names, ref):
        assert acts[name].shape == (2, 9, model.config.num_experts)
        assert rel_err(np.asarray(acts[name]).reshape(18, -1), theirs.numpy()) < TOL


def test_left_padded_rows_equal_each_row_alone(pair):
    hf, _, model = pair
    ids = ids_for(model, 2, 12, 1)
    mask = np.ones_like(ids)
    mask[0, :4] = 0                                            # row 0: 4 pads, then 8 tokens
    out = np.asarray(fwd(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    alone = np.asarray(fwd(model, jnp.asarray(ids[:1, 4:])).logits)
    if model.config.mamba_proj_bias:
        # in_proj's bias is added at the (zeroed) pad positions and reaches the first real tokens through the
        # conv window, in transformers as here: a padded row then differs from the row alone
        assert rel_err(out[0, 4:], alone[0]) > 1e-3
    else:
        assert rel_err(out[0, 4:], alone[0]) < TOL
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)   # no rotary here; passed as generate does
    ref = hf_forward(hf, ids, mask, position_ids)
    assert rel_err(out[0, 4:], ref[0, 4:]) < TOL and rel_err(out[1], ref[1]) < TOL


def test_prefill_chunks_and_cached_steps_equal_the_full_forward(pair):
    hf, _, model = pair
    ids = ids_for(model, 2, 16, 2)
    full = np.asarray(fwd(model, jnp.asarray(ids)).logits)
    cache = model.init_cache(2, max_length=16)
    assert isinstance(cache, em.HybridCache)
    kinds = [type(v).__name__ for v in cache.views]
    assert kinds == ["AttentionCacheView" if k == "attention" else "MambaCacheView"
                     for k in model.config.layers_block_type]
    out = fwd(model, jnp.asarray(ids[:, :7]), cache=cache)           # prefill
    pieces = [np.asarray(out.logits)]
    out = fwd(model, jnp.asarray(ids[:, 7:11]), cache=out.cache)     # chunked prefill
    pieces.append(np.asarray(out.logits))
    cache = out.cache
    step = jax.jit(lambda m, t, c: m.step(t, c))
    for t in range(11, 16):                                     # decode steps
        logits, cache = step(model, jnp.asarray(ids[:, t]), cache)
        pieces.append(np.asarray(logits)[:, None])
    pieced = np.concatenate(pieces, axis=1)
    assert rel_err(pieced, full) < TOL
    assert rel_err(pieced, hf_forward(hf, ids)) < TOL          # transformers' uncached forward
    assert int(cache.seqlen_offset) == 16


def test_greedy_generate_matches_transformers(pair):
    hf, _, model = pair
    ids = ids_for(model, 2, 6, 3)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=8,
                          do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    out = em.generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("pair", [0], indirect=True)
def test_cache_json_round_trip_continues_bit_identically(pair):
    _, _, model = pair
    ids = ids_for(model, 2, 10, 4)
    check_cache_json_round_trip(model, ids)


def test_saved_model_loads_in_transformers(pair, tmp_path):
    hf, _, model = pair
    em.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "jamba"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    ids = ids_for(model, 1, 9, 5)
    assert rel_err(hf_forward(back, ids), hf_forward(hf, ids)) < 1e-6
    # every tensor came back: the state dicts agree exactly
    for name, t in hf.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name].numpy(), t.numpy(), err_msg=name)


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("pair", [0], indirect=True)
def test_sharded_model_matches_unsharded(pair):
    _, path, model = pair
    mesh = em.make_mesh(2, 4)
    sharded = em.from_pretrained(path, mesh=mesh)
    ids = ids_for(model, 2, 9, 6)
    ref = np.asarray(fwd(model, jnp.asarray(ids)).logits)
    out = jax.jit(lambda m, x: m(x).logits)(sharded, em.shard_batch(jnp.asarray(ids), mesh))
    assert rel_err(np.asarray(out), ref) < TOL
    gen = em.generate(sharded, em.shard_batch(jnp.asarray(ids), mesh), max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(gen.sequences),
                                  np.asarray(em.generate(model, jnp.asarray(ids), max_new_tokens=4).sequences))


def test_hooks_and_effective_attention(pair):
    _, _, model = pair
    kinds = model.config.layers_block_type
    att, mamba = kinds.index("attention"), kinds.index("mamba")
    m = f"layers.{mamba}.mixer."
    names = [f"layers.{att}.mixer.hook_attn_pattern", f"layers.{att}.hook_resid_mid", m + "hook_conv",
             m + "hook_bc", m + "hook_dt", m + "hook_ssm_out"]
    ids = ids_for(model, 1, 7, 7)
    _, acts = run_with_cache(model, jnp.asarray(ids), names=names)
    pattern = np.asarray(acts[names[0]])
    assert pattern.shape == (1, model.config.num_attention_heads, 7, 7)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(pattern[0], k=1) == 0)                # causal
    assert acts[names[1]].shape == (1, 7, model.config.hidden_size)
    # y_i = sum_j M[i, j] x_j + D x_i reproduces the scan's output: M is built from the NORMED B and C (hook_bc)
    M = np.asarray(compute_effective_attention(model, acts, layer=mamba, include_dt_scaling=True))   # (b, e, l, l)
    x = np.asarray(acts[m + "hook_conv"])                                                             # (b, l, e)
    D = np.asarray(model.backbone.layers[mamba].mixer.D[...])
    y = np.einsum("bcij,bjc->bic", M, x) + D * x
    assert rel_err(y, np.asarray(acts[m + "hook_ssm_out"])) < TOL
    with pytest.raises(ValueError, match="has no SSM mixer"):
        compute_effective_attention(model, jnp.asarray(ids), layer=att)


@pytest.mark.parametrize("variant", [0, 1])
def test_config_round_trips_through_transformers(variant):
    kwargs = tiny_config_kwargs("jamba", variant)
    theirs = transformers.JambaConfig(**kwargs)
    ours = JambaConfig.from_hf(theirs.to_dict())
    back = transformers.JambaConfig(**{k: v for k, v in ours.to_hf().items()
                                       if k not in ("architectures", "model_type")})
    assert back.to_dict() == {**theirs.to_dict(), "architectures": back.to_dict().get("architectures")}
    assert JambaConfig.from_hf(back.to_dict()) == ours
    assert JambaConfig.from_hf(JambaConfig().to_hf()) == JambaConfig()
    assert JambaConfig().to_hf()["mamba_dt_rank"] == transformers.JambaConfig().mamba_dt_rank == 256


def test_config_refusals():
    base = JambaConfig().to_hf()
    with pytest.raises(ValueError, match="does not handle: 'sliding_window'"):
        JambaConfig.from_hf({**base, "sliding_window": 4})
    with pytest.raises(ValueError, match="output_router_logits"):
        JambaConfig.from_hf({**base, "output_router_logits": True})
    with pytest.raises(ValueError, match="attn_layer_offset"):
        JambaConfig(attn_layer_period=2, attn_layer_offset=2)
    with pytest.raises(ValueError, match="hidden_act"):
        JambaConfig(hidden_act="gelu")
    with pytest.raises(ValueError, match="head_dim"):
        JambaConfig.from_hf({**base, "head_dim": 64})
    with pytest.raises(ValueError, match="model_type"):
        JambaConfig.from_hf({**base, "model_type": "mamba"})
    alias = {k: v for k, v in base.items() if k != "num_experts"}
    assert JambaConfig.from_hf({**alias, "num_local_experts": 4}).num_experts == 4
    with pytest.raises(ValueError, match="disagree"):
        JambaConfig.from_hf({**base, "num_local_experts": 4})
