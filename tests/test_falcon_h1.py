"""Falcon-H1 against transformers' FalconH1ForCausalLM (5.25), float32 on the CPU.

Two tiny configs (tests/helpers_falcon_h1.py) that between them switch every option: TINY_A (1 group, gated norm
with norm before gate, tied, head_dim given, attention and out_proj biases, conv bias, no dt clamp) and TINY_B
(2 groups, no gated norm, untied, derived head dims, in_proj and MLP biases, no conv bias, a dt clamp of
(0.02, 0.3) that bites). Every parameter of the HF models is random (norm weights, A_log, D, dt_bias, biases
included); every muP multiplier differs from 1. Tolerance: 1e-5 relative (max |diff| / max |reference|) on
logits and hidden states, 1e-5 on the loss.

The decode step's dt clamp: transformers' cached one-token step does not clamp dt to time_step_limit, its
chunked scan does (easymamba/models/falcon_h1.py). easymamba clamps in both, so token by token equals the full
forward; the step-by-step comparisons against transformers use configs whose limit is (0, inf).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import easymamba as em
from easymamba.models import mamba2_mixer
from helpers import check_cache_json_round_trip, fwd, rel_err
from helpers_falcon_h1 import TINY_A, TINY_B, random_hf_falcon_h1

TOL = 1e-5
CONFIGS = {"A": TINY_A, "B": TINY_B}


def to_easymamba(hf_model) -> em.FalconH1ForCausalLM:
    config = em.FalconH1Config.from_hf(hf_model.config.to_dict())
    model = em.FalconH1ForCausalLM(config, rngs=nnx.Rngs(0))
    em.load_state_dict(model, hf_model.state_dict())
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    hf = random_hf_falcon_h1(seed=11, **CONFIGS[request.param])
    return request.param, hf, to_easymamba(hf)


def ids_for(model, seed, b, l):
    return np.random.default_rng(seed).integers(3, model.config.vocab_size, size=(b, l), dtype=np.int32)


@torch.no_grad()
def hf_forward(hf, ids, mask=None, **kwargs):
    extra = {}
    if mask is not None:
        m = torch.from_numpy(np.asarray(mask)).long()
        extra = {"attention_mask": m, "position_ids": (m.cumsum(-1) - 1).clamp(min=0)}
    return hf(torch.from_numpy(np.asarray(ids)).long(), use_cache=False, **extra, **kwargs)


def test_logits_loss_and_hidden_states(pair):
    _, hf, model = pair
    ids = ids_for(model, 1, 3, 21)  # 21 tokens: several SSD chunks (8 and 16) and a ragged last one
    ref = hf_forward(hf, ids, labels=torch.from_numpy(ids).long(), output_hidden_states=True)
    out = fwd(model, jnp.asarray(ids), labels=jnp.asarray(ids), output_hidden_states=True)
    assert rel_err(np.asarray(out.logits), ref.logits.numpy()) <= TOL
    assert abs(float(out.loss) - float(ref.loss)) <= TOL * abs(float(ref.loss))
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(np.asarray(ours), theirs.numpy()) <= TOL


def _padded_batch(model):
    ids = ids_for(model, 2, 3, 13)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    return np.where(mask == 1, ids, 0), mask


def test_left_padding(pair):
    """A left-padded batch equals transformers' (positions counted in real tokens, as its generate passes them),
    and each row equals the row alone, except where transformers' own rows differ: an in_proj bias (TINY_B's
    mamba_proj_bias) makes the padded slots' pre-conv inputs the bias instead of zero, and the conv window of the
    first real tokens reads them (the mask zeroes the mixer's input before in_proj and the conv's output, as HF)."""
    _, hf, model = pair
    ids, mask = _padded_batch(model)
    padded = np.asarray(fwd(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    ref = hf_forward(hf, ids, mask).logits.numpy()
    for r in range(ids.shape[0]):
        real = mask[r] == 1
        assert rel_err(padded[r, real], ref[r, real]) <= TOL
        if real.all():
            continue
        alone = np.asarray(fwd(model, jnp.asarray(ids[r:r + 1, real])).logits)[0]
        if not model.config.mamba_proj_bias:
            assert rel_err(padded[r, real], alone) <= TOL
        else:  # transformers' padded row differs from its row alone just as much
            hf_alone = hf_forward(hf, ids[r:r + 1, real]).logits.numpy()[0]
            assert rel_err(alone, hf_alone) <= TOL
            assert rel_err(ref[r, real], hf_alone) > 1e-4


def test_left_padding_without_in_proj_bias_equals_each_row_alone():
    """TINY_B's shapes without the in_proj bias: every padded row is the row alone."""
    model = to_easymamba(random_hf_falcon_h1(seed=15, **{**TINY_B, "mamba_proj_bias": False}))
    ids, mask = _padded_batch(model)
    padded = np.asarray(fwd(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    for r in range(2):  # the padded rows
        real = mask[r] == 1
        alone = np.asarray(fwd(model, jnp.asarray(ids[r:r + 1, real])).logits)[0]
        assert rel_err(padded[r, real], alone) <= TOL


def test_checkpoint_names_and_round_trips(pair, tmp_path):
    name, hf, model = pair
    ids = ids_for(model, 3, 2, 9)
    want = hf_forward(hf, ids).logits.numpy()
    hf.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        written = set(f.keys())
    table = {spec.hf_name for spec in em.FalconH1ForCausalLM.key_table(model.config)}
    assert written == table                           # the names transformers writes, no more, no fewer
    assert ("lm_head.weight" in written) == (name == "B")  # tied A leaves the head out
    loaded = em.from_pretrained(tmp_path / "hf")
    assert type(loaded) is em.FalconH1ForCausalLM
    assert rel_err(np.asarray(loaded(jnp.asarray(ids)).logits), want) <= TOL

    em.save_pretrained(model, tmp_path / "ours")
    back = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    back.config._attn_implementation = "eager"
    np.testing.assert_array_equal(hf_forward(back, ids).logits.numpy(), want)   # the same tensors, bit for bit


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("pair", ["A"], indirect=True)
def test_sharded_on_8_devices_equals_unsharded(pair):
    name, _, model = pair
    ids = jnp.asarray(ids_for(model, 4, 4, 10))
    mask = np.ones((4, 10), np.int32)
    mask[1, :3] = 0
    want = np.asarray(fwd(model, ids, attention_mask=jnp.asarray(mask)).logits)
    # A: 4 mixer heads and 4 attention heads over model=4, 1 group and 2 KV heads replicated, vocab 97 too;
    # B: 6 heads, 2 groups, 6 attention heads, MLP 80 over model=2, 3 KV heads replicated
    data, size = (2, 4) if name == "A" else (4, 2)
    mesh = em.make_mesh(data=data, model=size, devices=jax.devices()[:8])
    sharded = em.shard_model(nnx.clone(model), mesh)
    got = np.asarray(fwd(sharded, ids, attention_mask=jnp.asarray(mask)).logits)
    assert rel_err(got, want) <= TOL


def test_hooks_and_effective_attention(pair):
    _, hf, model = pair
    cfg = model.config
    ids = ids_for(model, 5, 2, 12)
    ref = hf_forward(hf, ids, output_hidden_states=True)
    names = em.interp.hook_names(model)
    for part in ("mamba.hook_conv", "mamba.hook_dt", "self_attn.hook_attn_pattern", "feed_forward.hook_mlp_out",
                 "hook_resid_mid", "hook_resid_post"):
        assert f"layers.0.{part}" in names
    logits, acts = em.run_with_cache(model, jnp.asarray(ids))
    assert rel_err(np.asarray(logits), ref.logits.numpy()) <= TOL
    for i in range(cfg.num_hidden_layers - 1):  # HF's hidden state i + 1 is layer i's output (the last is normed)
        assert rel_err(np.asarray(acts[f"layers.{i}.hook_resid_post"]), ref.hidden_states[i + 1].numpy()) <= TOL
    pattern = np.asarray(acts["layers.0.self_attn.hook_attn_pattern"])           # (b, H, l, l)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(pattern, 1) == 0)

    # y_i = sum_j M[i, j] x_j + D x_i reproduces the mixer's SSD output
    layer = cfg.num_hidden_layers - 1
    M = np.asarray(em.compute_effective_attention(model, acts, layer=layer, include_dt_scaling=True))  # (b,h,l,l)
    h, p, e = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_intermediate_size
    x = np.asarray(acts[f"layers.{layer}.mamba.hook_conv"])[..., :e].reshape(2, 12, h, p)
    D = np.asarray(model.backbone.layers[layer].mamba.D[...])
    y = np.einsum("bhij,bjhp->bihp", M, x) + D[:, None] * x
    assert rel_err(y, np.asarray(acts[f"layers.{layer}.mamba.hook_ssm_out"])) <= TOL


def test_mixer_token_by_token_equals_its_full_forward():
    """The Falcon-H1 mixer (TINY_B: multipliers, no gated norm, 2 groups; a clamp of (0.5, 1.0) that bites on
    every step) fed one token at a time from its states gives the numbers of one pass over the sequence: the step
    clamps dt as the scan does. transformers' step does not, and its own two paths disagree (next test)."""
    hf = random_hf_falcon_h1(seed=12, **{**TINY_B, "time_step_limit": (0.5, 1.0)})
    model = to_easymamba(hf)
    mixer = model.backbone.layers[1].mamba
    cfg = mixer.config
    assert not mixer._fused_decode()
    u = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size), jnp.float32)
    full, _ = mixer(u)
    k, c = cfg.conv_kernel, cfg.conv_dim
    out, states = mixer(u[:, :4], conv_state=jnp.zeros((2, c, k)),
                        ssm_state=jnp.zeros((2, cfg.num_heads, cfg.head_dim, cfg.state_size)))
    outs = [out]
    for t in range(4, 9):
        out, states = mixer(u[:, t:t + 1], conv_state=states[0], ssm_state=states[1])
        outs.append(out)
    assert rel_err(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full)) <= TOL


@torch.no_grad()
def test_transformers_step_skips_the_dt_clamp():
    """Why the step-by-step comparisons against transformers use a (0, inf) limit: with a limit that bites
    ((0.5, 1.0) against step sizes ~0.05), transformers' cached one-token step gives other logits than its own full
    forward; with (0, inf) the two agree."""
    ids = torch.from_numpy(np.random.default_rng(6).integers(3, 113, size=(1, 10))).long()
    gaps = {}
    for limit in ((0.5, 1.0), (0.0, float("inf"))):
        hf = random_hf_falcon_h1(seed=13, **{**TINY_B, "time_step_limit": limit})
        full = hf(ids, use_cache=False).logits[0, -1]
        prefill = hf(ids[:, :-1], use_cache=True)
        step = hf(ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True).logits[0, -1]
        gaps[limit[1]] = rel_err(step.numpy(), full.numpy())
    assert gaps[float("inf")] <= TOL
    assert gaps[1.0] > 1e-3


def test_fused_decode_only_for_the_default_mixer(monkeypatch):
    """The fused Pallas decode step computes the default Mamba-2 mixer; Falcon-H1's options send a step op by op."""
    pallas = types.SimpleNamespace(form=types.SimpleNamespace(is_pallas=True))
    monkeypatch.setattr(mamba2_mixer.kernels, "resolve", lambda *args, **kwargs: pallas)
    falcon = em.FalconH1Config(**{k: v for k, v in TINY_A.items()})
    rngs = nnx.Rngs(0)
    for overrides in ({}, {"mamba_rms_norm": False}, {"mamba_norm_before_gate": False}):
        mixer = em.Mamba2Mixer(falcon.replace(**overrides).mixer_config, rngs=rngs)
        assert not mixer._fused_decode() and mixer.decode_weights() is None
    default = falcon.mixer_config
    plain = em.Mamba2Mixer(type(default)(**{**default.__dict__, "zxbcdt_multipliers": None,
                                            "norm_before_gate": False}), rngs=rngs)
    assert plain._fused_decode()


def test_block_refuses_a_wrong_view():
    model = to_easymamba(random_hf_falcon_h1(seed=14, **TINY_A))
    hidden = jnp.zeros((1, 3, model.config.hidden_size))
    with pytest.raises(ValueError, match="tuple of 2 cache views"):
        model.backbone.layers[0](hidden, view="not a view")


# ---- the hybrid cache: a (Mamba2CacheView, AttentionCacheView) tuple per layer --------------------------------


def test_prefill_chunks_and_cached_steps_equal_the_full_forward(pair):
    """Prefill, a chunked prefill and decode steps give the full forward's logits; TINY_B's dt clamp bites and
    the steps agree all the same (easymamba's step clamps dt as its scan does)."""
    _, _, model = pair
    ids = ids_for(model, 7, 2, 16)
    full = np.asarray(fwd(model, jnp.asarray(ids)).logits)
    cache = model.init_cache(2, max_length=16)
    assert isinstance(cache, em.HybridCache)
    assert [type(v).__name__ for v in cache.views[0]] == ["Mamba2CacheView", "AttentionCacheView"]
    out = fwd(model, jnp.asarray(ids[:, :7]), cache=cache)               # prefill
    pieces = [np.asarray(out.logits)]
    out = fwd(model, jnp.asarray(ids[:, 7:11]), cache=out.cache)         # chunked prefill
    pieces.append(np.asarray(out.logits))
    cache = out.cache
    step = jax.jit(lambda m, t, c: m.step(t, c))
    for t in range(11, 16):                                         # decode steps
        logits, cache = step(model, jnp.asarray(ids[:, t]), cache)
        pieces.append(np.asarray(logits)[:, None])
    assert rel_err(np.concatenate(pieces, axis=1), full) <= TOL
    assert int(cache.seqlen_offset) == 16


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_generate_matches_transformers(name):
    """Greedy tokens equal transformers' generate, left padding included, and transformers' per-step logits
    (its cached one-token steps) equal our full forward over the sequence. With a (0, inf) limit: transformers'
    step does not clamp dt (module docstring)."""
    hf = random_hf_falcon_h1(seed=16, **{**CONFIGS[name], "time_step_limit": (0.0, float("inf"))})
    model = to_easymamba(hf)
    ids = ids_for(model, 8, 2, 6)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    ids = np.where(mask == 1, ids, 0)
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                          max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True)
    sequences = ref.sequences.numpy()
    out = em.generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(out.sequences), sequences)
    full_mask = np.concatenate([mask, np.ones((2, 8), mask.dtype)], axis=1)
    logits = np.asarray(fwd(model, jnp.asarray(sequences), attention_mask=jnp.asarray(full_mask)).logits)
    hf_steps = np.stack([s.numpy() for s in ref.logits], axis=1)                 # (b, 8, v), positions 5 .. 12
    assert rel_err(logits[:, 5:13], hf_steps) <= TOL


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("pair", ["A"], indirect=True)
def test_cache_json_round_trip_continues_bit_identically(pair):
    _, _, model = pair
    ids = ids_for(model, 9, 2, 10)
    check_cache_json_round_trip(model, ids)
