"""Zamba2 against transformers 5.25's `Zamba2ForCausalLM`: random weights (every parameter redrawn by
`helpers_zamba2.randomize_zamba2_`: A_log, D, dt_bias, every norm, biases and the LoRA adapters included), the two
tiny configs of `helpers_zamba2` (a: untied, one block, GQA, biases, no adapters on q/k/v, no RoPE; b: tied, two
shared blocks over four hybrid layers, q/k/v adapters, RoPE, two Mamba groups), float32.

Conditioning: drawn as the helper draws them, config b's attention logits are sharp enough that transformers' own
float32 logits are 6e-5 from its float64 logits (a rounding amplified ~100x through the softmaxes), so no float32
port could be checked to 1e-5. The fixture tempers the attention logits (q_proj, k_proj and their adapters' up
weights halved; still random) and `test_reference_is_well_conditioned` pins HF's float32-vs-float64 error below
TOL / 2, so that the 1e-5 comparisons below measure the port, not the rounding.

dt clamp: transformers clamps dt to (time_step_min, inf) over a sequence but not in its cached one-token step;
easymamba clamps in both, so its model gives the same numbers run whole or token by token
(`test_dt_clamp_is_the_same_whole_and_token_by_token` shows both behaviours with a dt_bias where the clamp bites).
The comparisons of step-by-step decoding with transformers (generate) use weights where the clamp does not bite,
which `test_greedy_generate_matches_transformers` checks on the tokens it compares.

Tolerances: logits and hidden states within 1e-5 of transformers' relative to their largest magnitude; the same
model run in pieces (cached steps, chunked prefill, padded rows) within 1e-5 of itself run whole.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import check_cache_json_round_trip, fwd, rel_err
from helpers_hybrid import hf_forward
from helpers_zamba2 import random_hf_zamba2, temper_attention_

import easymamba as em
from easymamba.interp import compute_effective_attention, run_with_cache

TOL = 1e-5


@pytest.fixture(scope="module", params=["a", "b"], ids=["untied-gqa-biases", "tied-two-blocks-rope-adapters"])
def pair(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory, easymamba's model read from it)."""
    hf = temper_attention_(random_hf_zamba2(20, request.param))
    path = tmp_path_factory.mktemp(f"zamba2{request.param}")
    hf.save_pretrained(path)
    return hf, path, em.from_pretrained(path)


def ids_for(model, b, l, seed):
    return np.random.default_rng(seed).integers(3, model.config.vocab_size, (b, l))


def test_reference_is_well_conditioned(pair):
    hf, _, model = pair
    ids = torch.from_numpy(ids_for(model, 2, 19, 0))
    with torch.no_grad():
        r32 = hf(ids).logits
        r64 = copy.deepcopy(hf).double()(ids).logits
    assert rel_err(r32.numpy(), r64.numpy()) < TOL / 2


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


def test_shared_blocks_are_one_parameter_set(pair):
    _, path, model = pair
    cfg = model.config
    layers = model.backbone.layers
    owners = {cfg.shared_block_owner(i) for i in cfg.hybrid_layer_ids}
    assert len(owners) == (cfg.num_mem_blocks if cfg.tie_word_embeddings else len(cfg.hybrid_layer_ids))
    for i in cfg.hybrid_layer_ids:
        mine, theirs = layers[i].shared_transformer, layers[cfg.shared_block_owner(i)].shared_transformer
        if mine is not theirs:   # runs the owner's parameters (the same objects) through modules of its own
            assert mine.self_attn.q_proj is theirs.self_attn.q_proj and mine.adapters is theirs.adapters
            assert mine.self_attn is not theirs.self_attn
    # the state holds what transformers' checkpoint holds, once, tensor for tensor (unused adapter slots too)
    from safetensors.numpy import load_file
    ref = load_file(path / "model.safetensors")
    ours = em.state_dict(model)
    assert set(ours) == set(ref)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, ref[name], err_msg=name)


def test_left_padded_rows_equal_each_row_alone(pair):
    hf, _, model = pair
    ids = ids_for(model, 2, 12, 1)
    mask = np.ones_like(ids)
    mask[0, :4] = 0                                            # row 0: 4 pads, then 8 tokens
    out = np.asarray(fwd(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    alone = np.asarray(fwd(model, jnp.asarray(ids[:1, 4:])).logits)
    if model.config.add_bias_linear:
        # in_proj's bias is added at the (zeroed) pad positions and reaches the first real tokens through the
        # conv window, in transformers as here: a padded row then differs from the row alone
        assert rel_err(out[0, 4:], alone[0]) > 1e-3
    else:
        assert rel_err(out[0, 4:], alone[0]) < TOL
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)   # as transformers' generate passes them
    ref = hf_forward(hf, ids, mask, position_ids)
    assert rel_err(out[0, 4:], ref[0, 4:]) < TOL and rel_err(out[1], ref[1]) < TOL


def test_prefill_chunks_and_cached_steps_equal_the_full_forward(pair):
    _, _, model = pair
    ids = ids_for(model, 2, 16, 2)
    full = np.asarray(fwd(model, jnp.asarray(ids)).logits)
    cache = model.init_cache(2, max_length=16)
    assert isinstance(cache, em.HybridCache)
    out = fwd(model, jnp.asarray(ids[:, :7]), cache=cache)           # prefill
    pieces = [np.asarray(out.logits)]
    out = fwd(model, jnp.asarray(ids[:, 7:11]), cache=out.cache)     # chunked prefill
    pieces.append(np.asarray(out.logits))
    cache = out.cache
    step = jax.jit(lambda m, t, c: m.step(t, c))
    for t in range(11, 16):                                     # decode steps
        logits, cache = step(model, jnp.asarray(ids[:, t]), cache)
        pieces.append(np.asarray(logits)[:, None])
    assert rel_err(np.concatenate(pieces, axis=1), full) < TOL
    assert int(cache.seqlen_offset) == 16


def _step_sizes(model, ids):
    """min over layers, rows, tokens and heads of softplus(dt + dt_bias) before any clamp, over `ids`."""
    names = [f"layers.{i}.mixer.hook_in_proj" for i in range(model.config.num_hidden_layers)]
    _, acts = run_with_cache(model, jnp.asarray(ids), names=names)
    h = model.config.n_mamba_heads
    return min(float(jnp.min(jax.nn.softplus(acts[name][..., -h:] + model.backbone.layers[i].mixer.dt_bias[...])))
               for i, name in enumerate(names))


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
    # transformers' decode steps do not clamp dt: these weights must not need the clamp for the comparison to
    # be of the same model
    assert _step_sizes(model, ref[:, 2:]) > model.config.time_step_min


def test_dt_clamp_is_the_same_whole_and_token_by_token(pair):
    """With dt_bias = -12 in every mixer (softplus ~ 6e-6 < time_step_min): easymamba run whole equals it run token
    by token and equals transformers' full forward; transformers' own cached steps depart from that forward."""
    hf, _, model = pair
    hf = copy.deepcopy(hf)
    sd = em.state_dict(model)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("dt_bias"):
                p.fill_(-12.0)
                sd[name] = np.full_like(sd[name], -12.0)
    ours = copy.deepcopy(model)
    em.load_state_dict(ours, sd)
    ids = ids_for(model, 1, 10, 8)
    full = np.asarray(fwd(ours, jnp.asarray(ids)).logits)
    assert rel_err(full, hf_forward(hf, ids)) < TOL
    cache = ours.init_cache(1, max_length=10)
    out = fwd(ours, jnp.asarray(ids[:, :6]), cache=cache)
    pieces, cache = [np.asarray(out.logits)], out.cache
    for t in range(6, 10):
        logits, cache = ours.step(jnp.asarray(ids[:, t]), cache)
        pieces.append(np.asarray(logits)[:, None])
    assert rel_err(np.concatenate(pieces, axis=1), full) < TOL
    with torch.no_grad():                                       # transformers: prefill, then one cached step
        pre = hf(torch.from_numpy(ids[:, :9]), use_cache=True)
        last = hf(torch.from_numpy(ids[:, 9:]), cache=pre.cache, use_cache=True).logits.numpy()
    assert rel_err(last[:, -1], full[:, -1]) > 3 * TOL            # 2.4e-4 (a), 1.3e-4 (b); ours 1e-6


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("pair", ["a"], indirect=True)
def test_cache_json_round_trip_continues_bit_identically(pair):
    _, _, model = pair
    ids = ids_for(model, 2, 10, 4)
    check_cache_json_round_trip(model, ids)


def test_saved_model_loads_in_transformers(pair, tmp_path):
    hf, _, model = pair
    em.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "zamba2"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    ids = ids_for(model, 1, 9, 5)
    assert rel_err(hf_forward(back, ids), hf_forward(hf, ids)) < 1e-6
    again = em.from_pretrained(tmp_path)
    for x, y in zip(jax.tree.leaves(nnx_state(again)), jax.tree.leaves(nnx_state(model))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def nnx_state(model):
    from flax import nnx
    return nnx.state(model)


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("pair", ["a"], indirect=True)
def test_sharded_model_matches_unsharded(pair):
    _, path, model = pair
    split = 4 if model.config.n_mamba_heads % 4 == 0 else 2      # the mamba heads must divide the model axis
    mesh = em.make_mesh(8 // split, split)
    sharded = em.from_pretrained(path, mesh=mesh)
    ids = ids_for(model, 8 // split, 9, 6)
    ref = np.asarray(fwd(model, jnp.asarray(ids)).logits)
    out = jax.jit(lambda m, x: m(x).logits)(sharded, em.shard_batch(jnp.asarray(ids), mesh))
    assert rel_err(np.asarray(out), ref) < TOL
    gen = em.generate(sharded, em.shard_batch(jnp.asarray(ids), mesh), max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(gen.sequences),
                                  np.asarray(em.generate(model, jnp.asarray(ids), max_new_tokens=4).sequences))


def test_hooks_record_each_hybrid_layer_and_effective_attention(pair):
    _, _, model = pair
    cfg = model.config
    first, last = cfg.hybrid_layer_ids[0], cfg.hybrid_layer_ids[-1]
    names = [f"layers.{i}.shared_transformer.self_attn.hook_attn_pattern" for i in (first, last)]
    names += [f"layers.{first}.hook_shared_out", f"layers.{first}.shared_transformer.feed_forward.hook_mlp_out"]
    ids = ids_for(model, 1, 7, 7)
    _, acts = run_with_cache(model, jnp.asarray(ids), names=names)
    for name in names[:2]:
        pattern = np.asarray(acts[name])
        assert pattern.shape == (1, cfg.num_attention_heads, 7, 7)
        np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
        assert np.all(np.triu(pattern[0], k=1) == 0)            # causal
    # a block shared by two layers records each layer's own pattern
    assert rel_err(acts[names[0]], acts[names[1]]) > 1e-3
    assert acts[names[2]].shape == acts[names[3]].shape == (1, 7, cfg.hidden_size)
    M = compute_effective_attention(model, jnp.asarray(ids), layer=first)
    assert M.shape == (1, cfg.n_mamba_heads, 7, 7)


def test_state_dict_checks(pair):
    _, _, model = pair
    sd = em.state_dict(model)
    if model.config.tie_word_embeddings:   # a redundant head equal to the embedding is accepted, another refused
        em.load_state_dict(copy.deepcopy(model), {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]})
        with pytest.raises(em.CheckpointError, match="differs from model.embed_tokens.weight"):
            em.load_state_dict(model, {**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1})
    first = "model.layers.0." + ("mamba_decoder.mamba." if model.config.layers_block_type[0] == "hybrid" else "mamba.")
    with pytest.raises(em.CheckpointError, match="n_mamba_heads"):
        em.load_state_dict(model, {**sd, first + "A_log": np.zeros(model.config.n_mamba_heads + 1, np.float32)})
    with pytest.raises(em.CheckpointError, match="missing"):
        em.load_state_dict(model, {k: v for k, v in sd.items() if "adapter_list" not in k})
