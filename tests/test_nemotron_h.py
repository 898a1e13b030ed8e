"""Nemotron-H against transformers 5.25's `NemotronHForCausalLM`: random weights (every parameter and persistent
buffer redrawn, A_log, D, dt_bias, norms, biases and the router's correction bias included), two tiny configs
with every layer kind (Mamba-2, attention, MLP, MoE), float32.

Tolerances: logits and hidden states within 1e-5 of transformers' relative to their largest magnitude; the same
model run in pieces (cached steps, chunked prefill, padded rows) within 1e-5 of itself run whole.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import check_cache_json_round_trip, fwd, rel_err
from helpers_hybrid import hf_forward, random_hf_model

import easymamba as em
from easymamba.interp import run_with_cache

TOL = 1e-5


@pytest.fixture(scope="module", params=[0, 1], ids=["every-kind", "latent-experts-tied"])
def pair(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory, easymamba's model read from it)."""
    hf = random_hf_model("nemotron_h", seed=10 + request.param, variant=request.param)
    path = tmp_path_factory.mktemp(f"nemotron_h{request.param}")
    hf.save_pretrained(path)
    return hf, path, em.from_pretrained(path)


def ids_for(model, b, l, seed):
    return np.random.default_rng(seed).integers(3, model.config.vocab_size, (b, l))


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


def test_left_padded_rows_equal_each_row_alone(pair):
    hf, _, model = pair
    ids = ids_for(model, 2, 12, 1)
    mask = np.ones_like(ids)
    mask[0, :4] = 0                                            # row 0: 4 pads, then 8 tokens
    out = np.asarray(fwd(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    alone = np.asarray(fwd(model, jnp.asarray(ids[:1, 4:])).logits)
    if model.config.use_bias:
        # in_proj's bias is added at the (zeroed) pad positions and reaches the first real tokens through the
        # conv window, in transformers as here: a padded row then differs from the row alone
        assert rel_err(out[0, 4:], alone[0]) > 1e-3
    else:
        assert rel_err(out[0, 4:], alone[0]) < TOL
    # transformers' forward counts positions with the pads unless told; generate passes cumsum(mask) - 1
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
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
    assert saved["model_type"] == "nemotron_h"
    import transformers
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    ids = ids_for(model, 1, 9, 5)
    assert rel_err(hf_forward(back, ids), hf_forward(hf, ids)) < 1e-6


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


def test_hooks_record_attention_mlp_and_router(pair):
    _, _, model = pair
    kinds = model.config.layers_block_type
    att, moe = kinds.index("full_attention"), kinds.index("moe")
    names = [f"layers.{att}.mixer.hook_attn_pattern", f"layers.{att}.mixer.hook_q",
             f"layers.{moe}.mixer.hook_router_logits"]
    ids = ids_for(model, 1, 7, 7)
    _, acts = run_with_cache(model, jnp.asarray(ids), names=names)
    pattern = np.asarray(acts[names[0]])
    assert pattern.shape == (1, model.config.num_attention_heads, 7, 7)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(pattern[0], k=1) == 0)                # causal
    assert acts[names[2]].shape == (1, 7, model.config.n_routed_experts)


def test_effective_attention_reconstructs_the_ssm_layers(pair):
    """y = M x + D x over the Mamba-2 layers only (the attention, MLP and MoE layers have no M)."""
    from easymamba.interp import compute_effective_attention

    _, _, model = pair
    m = model.config.mixer_config
    ids = ids_for(model, 2, 11, 8)
    ssm = [i for i, kind in enumerate(model.config.layers_block_type) if kind == "linear_attention"]
    names = [f"layers.{i}.mixer.{hook}" for i in ssm for hook in ("hook_conv", "hook_dt", "hook_ssm_out")]
    _, acts = run_with_cache(model, jnp.asarray(ids), names=names)
    M_all = compute_effective_attention(model, acts, include_dt_scaling=True)
    assert M_all.shape == (len(ssm), 2, m.num_heads, 11, 11)
    for i, M in zip(ssm, M_all):
        x = acts[f"layers.{i}.mixer.hook_conv"][..., :m.intermediate_size].reshape(2, 11, m.num_heads, m.head_dim)
        D = model.backbone.layers[i].mixer.D[...]
        y = jnp.einsum("bhls,bshp->blhp", M, x) + D[:, None] * x
        assert rel_err(y, acts[f"layers.{i}.mixer.hook_ssm_out"]) < TOL
    attention_layer = model.config.layers_block_type.index("full_attention")
    with pytest.raises(ValueError, match=f"layer {attention_layer} .* has no SSM mixer"):
        compute_effective_attention(model, jnp.asarray(ids), layer=attention_layer)


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("pair", [1], indirect=True)
def test_cli_generate_and_convert(pair, tmp_path, capsys):
    """`easymamba generate --model DIR` prints transformers' greedy tokens; `convert` HF -> orbax -> HF keeps
    every tensor bit for bit."""
    from safetensors.numpy import load_file

    from easymamba.cli import main

    hf, path, _ = pair
    assert main(["generate", "--model", str(path), "--ids", "5,6,7", "--max-new-tokens", "5",
                 "--temperature", "0", "--no-stream"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0].tolist()
    assert printed == ref[:len(printed)] and len(printed) >= 4    # it stops early only at an EOS id
    assert main(["convert", str(path), str(tmp_path / "orbax")]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


@pytest.mark.parametrize("pair", [0], indirect=True)
def test_generate_refuses_a_cache_too_short(pair):
    """Key/value slots run out before the last token: refused by name before any work (a jitted write past the
    end would otherwise land on the last slot silently)."""
    _, _, model = pair
    cache = model.init_cache(1, max_length=8)
    with pytest.raises(ValueError, match=r"holds 8 key/value slots \(max_length\), but its 0 tokens \+ the prompt's 5 "
                                         r"\+ max_new_tokens \(4\) need 9"):
        em.generate(model, jnp.asarray([[5, 6, 7, 8, 9]]), max_new_tokens=4, cache=cache)


def test_multi_token_prediction_tensors_load_and_round_trip(tmp_path):
    # A checkpoint with num_nextn_predict_layers = 1 and mtp.* tensors (names as NVIDIA's Nemotron-3 checkpoints
    # write them; bfloat16 and float32): transformers 5.25 drops them on load and never runs them, easymamba
    # carries them (CausalLM.carried_tensors) through save_pretrained and orbax bit for bit.
    from safetensors.numpy import load_file, save_file
    import ml_dtypes

    hf = random_hf_model("nemotron_h", seed=31, variant=0, num_nextn_predict_layers=1)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    (weights,) = src.glob("*.safetensors")
    tensors = load_file(weights)
    rng = np.random.default_rng(7)
    d = hf.config.hidden_size
    mtp = {"mtp.layers.0.enorm.weight": rng.normal(size=(d,)).astype(np.float32),
           "mtp.layers.0.hnorm.weight": rng.normal(size=(d,)).astype(np.float32),
           "mtp.layers.0.eh_proj.weight": rng.normal(size=(d, 2 * d)).astype(ml_dtypes.bfloat16),
           "mtp.layers.0.mixer.q_proj.weight": rng.normal(size=(d, d)).astype(ml_dtypes.bfloat16)}
    save_file({**tensors, **mtp}, weights, metadata={"format": "pt"})

    model = em.from_pretrained(src)
    assert set(model.carried_tensors) == set(mtp)
    for name, array in mtp.items():
        assert model.carried_tensors[name].dtype == array.dtype
        np.testing.assert_array_equal(model.carried_tensors[name], array)
    ids = ids_for(model, 1, 9, 8)
    assert rel_err(fwd(model, jnp.asarray(ids)).logits, hf_forward(hf, ids)) < TOL  # MTP layers are not run

    out = tmp_path / "out"
    em.save_pretrained(model, out)
    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(f))
    for name, array in mtp.items():
        assert written[name].dtype == array.dtype
        np.testing.assert_array_equal(written[name], array)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    import transformers
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    assert rel_err(hf_forward(back, ids), hf_forward(hf, ids)) < 1e-6

    restored = em.load_checkpoint(em.save_checkpoint(model, tmp_path / "orbax").parent)
    for name, array in mtp.items():
        np.testing.assert_array_equal(restored.carried_tensors[name], array)
    assert em.from_pretrained(em.save_pretrained(restored, tmp_path / "again")).carried_tensors.keys() == mtp.keys()
