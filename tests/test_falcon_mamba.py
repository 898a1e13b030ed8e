"""Falcon-Mamba against Hugging Face transformers 5.25's torch `FalconMambaForCausalLM` (random weights, CPU).

Two configs of different sizes: "tied" (d 32, 2 layers, n 8, tied head, the default mixer_rms_eps 1e-6) and
"untied" (d 48, 3 layers, n 16, r 5, k 3, in/out_proj biases, no conv bias, mixer_rms_eps 1e-3, untied head).
Every parameter transformers initialises to a constant (A_log, D, dt_proj.bias, conv and projection biases, the
block and final norm weights) is redrawn (`randomize_mamba1_`); the all-ones weight buffers of the dt/B/C norms,
which transformers never reads, are redrawn too, so that a model reading them would differ.

Tolerances, float32: logits 1e-5 relative (XLA and torch sum in different orders: a few ulps per layer, measured
~3e-7 for Mamba-1, test_mamba1_parity; a missing norm, a wrong eps or a norm over the wrong axis moves logits by
1e-4 to 1e-1); the loss 1e-6 relative (a mean of float32 log-probs); a checkpoint we write and transformers reads
gives transformers' own logits to 1e-6 (the same tensors bit for bit through the same torch code); greedy
tokens and cache round trips exactly.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import transformers.models.falcon_mamba.modeling_falcon_mamba as hf_falcon
from flax import nnx
from helpers import hf_logits, random_ids, rel_err
from helpers_mamba1 import randomize_mamba1_
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_convert_cli import read_all
from test_generation import M, PAD, hf_generate

import easymamba as em
from easymamba import interp
from easymamba.checkpoints import orbax_io as orbax_checkpoint
from easymamba.cli import SHIPPED_MODEL, main
from easymamba.models import family_of

TOL = 1e-5

CASES = {
    "tied": dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=8, tie_word_embeddings=True),
    "untied": dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, state_size=16, time_step_rank=5,
                   conv_kernel=3, use_bias=True, use_conv_bias=False, mixer_rms_eps=1e-3,
                   tie_word_embeddings=False),
}


def hf_config(**overrides) -> transformers.FalconMambaConfig:
    kwargs = dict(expand=2, conv_kernel=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return transformers.FalconMambaConfig(**kwargs)


@torch.no_grad()
def random_hf_falcon(seed: int, **overrides) -> transformers.FalconMambaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.FalconMambaForCausalLM(hf_config(**overrides)).eval()
    randomize_mamba1_(model, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    for name, buffer in model.named_buffers():
        if name.endswith("layernorm.weight"):  # the weightless norms' unused ones (non-persistent buffers)
            buffer.copy_(1.0 + 0.5 * torch.randn(buffer.shape, generator=gen))
    return model


def to_easymamba_falcon(hf_model, **kwargs) -> em.FalconMambaForCausalLM:
    config = em.FalconMambaConfig.from_hf(hf_model.config.to_dict())
    model = em.FalconMambaForCausalLM(config, rngs=nnx.Rngs(0), **kwargs)
    em.load_state_dict(model, hf_model.state_dict())
    return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask, cache):
    out = nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)
    return out.logits, out.cache


def run(model, ids, mask=None, cache=None):
    """(logits, cache) through one module-level jit: equal configs compile once for the whole file."""
    return _forward(*nnx.split(model), jnp.asarray(ids), None if mask is None else jnp.asarray(mask), cache)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """(name, HF model, our copy)."""
    hf_model = random_hf_falcon(seed=len(request.param), **CASES[request.param])
    return request.param, hf_model, to_easymamba_falcon(hf_model)


# ---- the forward ---------------------------------------------------------------------------------------------


def test_logits_loss_and_hidden_states_match_hf(case):
    name, hf_model, model = case
    rng = np.random.default_rng(0)
    ids = random_ids(rng, 3, 17, 96)
    labels = ids.copy()
    labels[0, :4] = -100
    labels[2, -3:] = -100
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids).long(), labels=torch.from_numpy(labels).long(), use_cache=False,
                          output_hidden_states=True)

    @nnx.jit
    def forward(m, ids, labels):
        return m(ids, labels=labels, output_hidden_states=True)

    ours = forward(model, jnp.asarray(ids), jnp.asarray(labels))
    err = rel_err(ours.logits, theirs.logits.numpy())
    loss_err = abs(float(ours.loss) - theirs.loss.item()) / abs(theirs.loss.item())
    print(f"{name}: logits rel err {err:.2e}, loss rel err {loss_err:.2e}")
    assert err <= TOL
    assert loss_err <= 1e-6, (ours.loss, theirs.loss)
    n = hf_model.config.num_hidden_layers
    assert len(ours.hidden_states) == len(theirs.hidden_states) == n + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert rel_err(a, b.numpy()) <= TOL, i
    # the norms are there: the same weights run as Mamba-1 give other logits
    mamba = em.MambaForCausalLM(_as_mamba1(model.config), rngs=nnx.Rngs(0))
    em.load_state_dict(mamba, em.state_dict(model))
    assert rel_err(np.asarray(mamba(jnp.asarray(ids)).logits), theirs.logits.numpy()) > 1e-3


def _as_mamba1(config: em.FalconMambaConfig) -> em.MambaConfig:
    hf = config.to_hf()
    del hf["mixer_rms_eps"]
    return em.MambaConfig.from_hf({**hf, "model_type": "mamba", "architectures": ["MambaForCausalLM"]})


def test_left_padded_batch_matches_rows_alone_and_hf(case):
    """Each row of a left-padded batch against transformers' batched logits, and against the row alone. With
    in_proj's bias ("untied") a pad's in_proj output is the bias, not zero, and the conv window of the first
    real tokens reads it, in transformers as here: there the batched row equals transformers' batched row but
    not the row alone (transformers' own batched and alone rows differ as much)."""
    name, hf_model, model = case
    biased = hf_model.config.use_bias
    rng = np.random.default_rng(3)
    lengths = [14, 2, 7]  # 2: shorter than either conv kernel
    width = max(lengths)
    ids = random_ids(rng, len(lengths), width, 96)  # junk under the mask
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    batched = np.asarray(run(model, ids, mask)[0])
    theirs = hf_logits(hf_model, ids, mask)
    for r, n in enumerate(lengths):
        alone = np.asarray(run(model, ids[r:r + 1, width - n:])[0])[0]
        err_alone = rel_err(batched[r, width - n:], alone)
        err_hf = rel_err(batched[r, width - n:], theirs[r, width - n:])
        print(f"{name} row {r}: vs alone {err_alone:.2e}, vs HF {err_hf:.2e}")
        assert err_hf <= TOL, r
        if not biased or n == width:
            assert err_alone <= TOL, r
        else:
            hf_alone = hf_logits(hf_model, ids[r:r + 1, width - n:])[0]
            assert rel_err(alone, hf_alone) <= TOL, r
            assert rel_err(theirs[r, width - n:], hf_alone) > 1e-3, r


def test_prefill_then_cached_steps_match_hf_full_forward(case):
    """Prefill 9 tokens, then 6 single-token steps through our cache (`model(...)` with l = 1 is `step`), and a
    chunked prefill of 3 more tokens from the cache: every position's logits against transformers' uncached
    full forward over the whole sequence (transformers' own multi-token cached continuation drops the SSM
    state, so its full forward is the reference)."""
    name, hf_model, model = case
    ids = random_ids(np.random.default_rng(9), 2, 18, 96)
    want = hf_logits(hf_model, ids)
    logits, cache = run(model, ids[:, :9], cache=model.init_cache(2))
    assert isinstance(cache, em.FalconMambaCache)
    errs = [rel_err(logits, want[:, :9])]
    for t in range(9, 14):
        logits, cache = run(model, ids[:, t:t + 1], cache=cache)
        errs.append(rel_err(logits[:, 0], want[:, t]))
    logits, cache = nnx.jit(lambda m, tokens, c: m.step(tokens, c))(model, jnp.asarray(ids[:, 14]), cache)
    errs.append(rel_err(logits, want[:, 14]))                         # the step entry point itself
    logits, cache = run(model, ids[:, 15:], cache=cache)
    errs.append(rel_err(logits, want[:, 15:]))
    print(f"{name}: prefill / steps / chunk rel errs {['%.1e' % e for e in errs]}")
    assert max(errs) <= TOL
    assert int(cache.seqlen_offset) == 18


def test_cache_json_round_trip_continues_bit_identically(case):
    _, _, model = case
    ids = random_ids(np.random.default_rng(4), 2, 10, 96)
    _, cache = run(model, ids[:, :7], cache=model.init_cache(2))
    back = em.FalconMambaCache.from_json(cache.to_json())
    assert back.views[0].metadata == cache.views[0].metadata
    assert json.loads(cache.to_json())["format"] == "easymamba.FalconMambaCache"
    for t in range(7, 10):
        a, cache = run(model, ids[:, t:t + 1], cache=cache)
        b, back = run(model, ids[:, t:t + 1], cache=back)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for va, vb in zip(cache.views, back.views):
        np.testing.assert_array_equal(np.asarray(va.ssm_states), np.asarray(vb.ssm_states))
        np.testing.assert_array_equal(np.asarray(va.conv_states), np.asarray(vb.conv_states))


def test_cache_of_the_other_family_is_refused_by_name(case):
    _, _, model = case
    mamba1 = em.MambaCache.init_cache(model.config.num_hidden_layers,
                                      em.MambaCacheMetaData.from_config(model.config, 2))
    with pytest.raises(ValueError, match=r"cache must be a FalconMambaCache .* got MambaCache"):
        model(jnp.asarray([[3, 4], [5, 6]]), cache=mamba1)
    with pytest.raises(ValueError, match=r"format 'easymamba.MambaCache'; expected 'easymamba.FalconMambaCache'"):
        em.FalconMambaCache.from_json(mamba1.to_json())
    # and a Falcon-Mamba cache for a Mamba-1 model of the same sizes
    mamba = em.MambaForCausalLM(_as_mamba1(model.config), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"built for model_type 'falcon_mamba', but the model's config has "
                                         r"model_type 'mamba'"):
        mamba(jnp.asarray([[3, 4], [5, 6]]), cache=model.init_cache(2))


# ---- generation ------------------------------------------------------------------------------------------------


def test_greedy_generate_matches_transformers(case):
    """Left-padded batch, no EOS: transformers' greedy generate prefills once and then feeds one token per step
    (which it handles correctly), so its tokens are the reference."""
    name, hf_model, model = case
    rng = np.random.default_rng(14)
    lengths = [9, 4, 6]
    ids = np.full((3, 9), PAD, np.int32)
    mask = np.zeros((3, 9), np.int32)
    for r, n in enumerate(lengths):
        ids[r, 9 - n:] = random_ids(rng, 1, n, 96)[0]
        mask[r, 9 - n:] = 1
    want = hf_generate(hf_model, ids, mask, eos_token_id=None)
    out = em.generate(model, ids, attention_mask=mask, max_new_tokens=M)
    np.testing.assert_array_equal(np.asarray(out.sequences), want)
    assert isinstance(out.cache, em.FalconMambaCache)
    assert len(set(want[:, 9:].ravel().tolist())) > 3, "degenerate reference: the tokens barely change"


# ---- checkpoints -----------------------------------------------------------------------------------------------


def test_key_table_is_hf_state_dict(case):
    _, hf_model, model = case
    config = model.config
    expected = [k for k in hf_model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")]
    assert [spec.hf_name for spec in em.FalconMambaForCausalLM.key_table(config)] == expected
    assert not any("layernorm" in k for k in hf_model.state_dict())  # the norms' buffers are not persistent
    assert list(em.state_dict(model)) == expected


def test_save_pretrained_both_ways(case, tmp_path):
    name, hf_model, model = case
    ids = random_ids(np.random.default_rng(2), 2, 11, 96)
    want = hf_logits(hf_model, ids)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    ours = em.from_pretrained(tmp_path / "hf")
    assert isinstance(ours, em.FalconMambaForCausalLM) and family_of(ours).model_type == "falcon_mamba"
    assert ours.config == model.config
    err_load = rel_err(run(ours, ids)[0], want)
    assert err_load <= TOL

    out = em.save_pretrained(model, tmp_path / "ours")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "falcon_mamba" and written["architectures"] == ["FalconMambaForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is transformers.FalconMambaForCausalLM
    err_back = rel_err(hf_logits(back, ids), want)
    print(f"{name}: transformers' checkpoint in ours {err_load:.2e}; ours in transformers {err_back:.2e}")
    assert err_back <= 1e-6
    assert em.FalconMambaConfig.from_hf(back.config.to_dict()) == model.config


def test_convert_cli_hf_orbax_hf_is_identical(tmp_path, capsys):
    hf_model = random_hf_falcon(seed=len("tied"), **CASES["tied"])
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    ids = random_ids(np.random.default_rng(2), 2, 11, 96)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert isinstance(orbax_checkpoint.checkpoint_config(tmp_path / "orbax"), em.FalconMambaConfig)
    loaded = orbax_checkpoint.load_checkpoint(tmp_path / "orbax")
    assert isinstance(loaded, em.FalconMambaForCausalLM)
    assert rel_err(run(loaded, ids)[0], hf_logits(hf_model, ids)) <= TOL
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "out"), "--max-shard-size", "20KB"]) == 0
    assert "converted" in capsys.readouterr().err
    assert read_all(tmp_path / "out") == read_all(tmp_path / "hf")
    assert em.FalconMambaConfig.from_hf(tmp_path / "out") == em.FalconMambaConfig.from_hf(tmp_path / "hf")


def test_cli_generate_with_a_falcon_mamba_directory(tmp_path, capsys):
    """`easymamba generate --model DIR` on a saved random Falcon-Mamba whose vocabulary is the shipped
    tokenizer's: greedy text equals the decoding of transformers' greedy tokens from the same directory."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(SHIPPED_MODEL / "tokenizer.json"))
    hf_model = random_hf_falcon(seed=5, **{**CASES["tied"], "vocab_size": tokenizer.get_vocab_size(),
                                           "tie_word_embeddings": False, "eos_token_id": None})
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((SHIPPED_MODEL / "tokenizer.json").read_bytes())
    prompt, n = "ROMEO: But soft", 12
    ids = np.asarray([tokenizer.encode(prompt).ids])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        tokens = loaded.generate(torch.from_numpy(ids).long(), max_new_tokens=n, do_sample=False,
                                 pad_token_id=PAD)[0].tolist()
    assert main(["generate", prompt, "--model", str(tmp_path), "--max-new-tokens", str(n), "--temperature", "0",
                 "--no-stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out == tokenizer.decode(tokens) + "\n", (captured.out, tokens)


# ---- sharding --------------------------------------------------------------------------------------------------


def test_sharded_on_8_devices_matches_unsharded(tmp_path):
    """A (2, 4) mesh: the inner channels e = 64 and the vocabulary 96 over "model", rows over "data". Prefill,
    3 decode steps and greedy generate against the same weights unsharded (the norms act on x_proj's output,
    which the row-parallel x_proj all-reduces first, so each device normalises whole vectors)."""
    batch, steps = 8, 3
    hf_model = random_hf_falcon(seed=31, **{**CASES["tied"], "tie_word_embeddings": False})
    hf_model.save_pretrained(tmp_path / "hf")
    ids = random_ids(np.random.default_rng(5), batch, 12, 96)
    plain = to_easymamba_falcon(hf_model)
    logits, cache = run(plain, ids, cache=plain.init_cache(batch))
    assert rel_err(logits, hf_logits(hf_model, ids)) <= TOL
    want, greedy = [np.asarray(logits)], [np.argmax(np.asarray(logits)[:, -1], -1)]
    for _ in range(steps):
        logits, cache = run(plain, greedy[-1][:, None].astype(np.int32), cache=cache)
        want.append(np.asarray(logits))
        greedy.append(np.argmax(want[-1][:, -1], -1))

    mesh = em.make_mesh(2, 4)
    model = em.from_pretrained(tmp_path / "hf", mesh=mesh)
    a_log = model.backbone.layers[0].mixer.A_log[...]
    assert a_log.sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)
    cache = model.init_cache(batch)
    assert cache.views[0].ssm_states.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model", None)), 3)
    logits, cache = run(model, em.shard_batch(ids, mesh), cache=cache)
    errs = [rel_err(logits, want[0])]
    for t in range(steps):
        logits, cache = run(model, em.shard_batch(greedy[t][:, None].astype(np.int32), mesh), cache=cache)
        errs.append(rel_err(logits, want[t + 1]))
    print(f"sharded vs unsharded rel errs {['%.1e' % e for e in errs]}")
    assert max(errs) <= TOL
    gen = em.generate(model, em.shard_batch(ids, mesh), max_new_tokens=steps + 1)
    np.testing.assert_array_equal(np.asarray(gen.sequences), np.concatenate([ids, np.stack(greedy, 1)], axis=1))


# ---- hooks and effective attention -------------------------------------------------------------------------------


MIXER_HOOKS = ("hook_in_proj", "hook_conv", "hook_x_proj", "hook_dt", "hook_ssm_out", "hook_gated", "hook_out_proj")


@torch.no_grad()
def hf_intermediates(hf_model, ids, mask, monkeypatch):
    """HF activations by our hook names (as test_interp_mamba1: forward hooks on the modules transformers calls,
    and its `mamba_selective_scan` wrapped for the step size and the ungated output)."""
    got, handles, scans = {}, [], []
    real_scan = hf_falcon.mamba_selective_scan

    def recording_scan(u, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kwargs):
        ungated = real_scan(u, dt, A, B, C, D=D, z=None, delta_bias=delta_bias, delta_softplus=delta_softplus,
                            **kwargs)
        step = torch.nn.functional.softplus(dt + delta_bias[:, None])                 # (b, e, l)
        scans.append((step.transpose(1, 2), ungated.transpose(1, 2)))
        return ungated * torch.nn.functional.silu(z)

    monkeypatch.setattr(hf_falcon, "mamba_selective_scan", recording_scan)

    def record(name, take=lambda args, out: out):
        return lambda module, args, out: got.__setitem__(name, take(args, out).float().numpy())

    bb = hf_model.backbone
    handles.append(bb.embeddings.register_forward_hook(record("hook_embed")))
    for i, layer in enumerate(bb.layers):
        pre = f"layers.{i}.mixer."
        handles += [
            layer.mixer.in_proj.register_forward_hook(record(pre + "hook_in_proj")),
            layer.mixer.x_proj.register_forward_hook(record(pre + "hook_conv", lambda args, out: args[0])),
            layer.mixer.x_proj.register_forward_hook(record(pre + "hook_x_proj")),
            layer.mixer.out_proj.register_forward_hook(record(pre + "hook_gated", lambda args, out: args[0])),
            layer.mixer.out_proj.register_forward_hook(record(pre + "hook_out_proj")),
            layer.register_forward_hook(record(f"layers.{i}.hook_resid_post")),
        ]
    try:
        hf_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert len(scans) == len(bb.layers), "HF did not call mamba_selective_scan: the wrapper recorded nothing"
    for i, (step, ungated) in enumerate(scans):
        got[f"layers.{i}.mixer.hook_dt"] = step.numpy()
        got[f"layers.{i}.mixer.hook_ssm_out"] = ungated.numpy()
    return got


def test_hooks_match_hf_and_effective_attention_reconstructs(case, monkeypatch):
    name, hf_model, model = case
    ids = random_ids(np.random.default_rng(5), 3, 13, 96)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :11] = 0
    logits, acts = interp.run_with_cache(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    theirs = hf_intermediates(hf_model, ids, mask, monkeypatch)
    assert list(acts) == interp.hook_names(model) and set(theirs) == set(acts)
    assert interp.hook_names(model)[1:1 + len(MIXER_HOOKS)] == [f"layers.0.mixer.{h}" for h in MIXER_HOOKS]
    worst = max(rel_err(acts[k], theirs[k]) for k in acts)
    print(f"{name}: worst hook rel err {worst:.2e}")
    for key in acts:
        assert rel_err(acts[key], theirs[key]) <= TOL, key

    # y = M x + D x per inner channel, with M from the normalised B and C (from the acts, and from the ids)
    cfg = model.config
    M_all = interp.compute_effective_attention(model, acts, include_dt_scaling=True)
    assert M_all.shape == (cfg.num_hidden_layers, 3, cfg.intermediate_size, 13, 13)
    for i, M_layer in enumerate(M_all):
        x = acts[f"layers.{i}.mixer.hook_conv"]
        D = model.backbone.layers[i].mixer.D[...]
        y = jnp.einsum("bcij,bjc->bic", M_layer, x) + D * x
        err = rel_err(y, acts[f"layers.{i}.mixer.hook_ssm_out"])
        print(f"{name} layer {i}: reconstruction rel err {err:.2e}")
        assert err <= TOL, (i, err)
    M_ids = interp.compute_effective_attention(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                               layer=-1, include_dt_scaling=True, channels=[0, 5, -1])
    assert rel_err(M_ids, np.asarray(M_all[-1])[:, [0, 5, cfg.intermediate_size - 1]]) <= 1e-6
    # Mamba-1's operands (B and C without the norms) would not reconstruct it
    wrong = interp._effective_attention(
        em.models.mamba1.mamba1_operands(cfg, acts["layers.0.mixer.hook_x_proj"], acts["layers.0.mixer.hook_dt"],
                                         -jnp.exp(model.backbone.layers[0].mixer.A_log[...])),
        jnp.arange(cfg.intermediate_size), include_dt_scaling=True, block=None)
    x = acts["layers.0.mixer.hook_conv"]
    y = jnp.einsum("bcij,bjc->bic", wrong, x) + model.backbone.layers[0].mixer.D[...] * x
    assert rel_err(y, acts["layers.0.mixer.hook_ssm_out"]) > 1e-3


# ---- config ------------------------------------------------------------------------------------------------------


def test_config_round_trips_through_transformers():
    for kwargs in ({}, CASES["untied"], dict(hidden_size=64, expand=3, time_step_rank=7, eos_token_id=[2, 5],
                                            residual_in_fp32=False, layer_norm_epsilon=1e-6)):
        ours = em.FalconMambaConfig(**kwargs)
        theirs = transformers.FalconMambaConfig(**ours.to_hf())
        assert em.FalconMambaConfig.from_hf(theirs.to_dict()) == ours, kwargs
        assert em.FalconMambaConfig.from_hf(json.loads(ours.to_json_string())) == ours
        assert theirs.mixer_rms_eps == ours.mixer_rms_eps and theirs.intermediate_size == ours.intermediate_size
    assert em.FalconMambaConfig.from_hf(transformers.FalconMambaConfig().to_dict()) == em.FalconMambaConfig()
    # a stored intermediate_size wins over expand * hidden_size, in transformers 5.25 as here
    stored = transformers.FalconMambaConfig(hidden_size=32, expand=2, intermediate_size=48)
    assert stored.intermediate_size == 48
    assert em.FalconMambaConfig.from_hf(stored.to_dict()).intermediate_size == 48
    # the old name of the torch fallback switch
    assert em.FalconMambaConfig.from_hf({"model_type": "falcon_mamba", "use_falcon_mambapy": True}).use_mambapy
    assert em.FalconMambaConfig().replace(hidden_size=64).intermediate_size == 128


def test_config_refusals():
    with pytest.raises(ValueError, match=r"model_type 'mamba' is not a Falcon-Mamba config: load it with "
                                         r"MambaConfig"):
        em.FalconMambaConfig.from_hf(em.MambaConfig().to_hf())
    with pytest.raises(ValueError, match=r"model_type \('falcon_mamba'\) must be 'mamba' for MambaConfig"):
        em.MambaConfig.from_hf(em.FalconMambaConfig().to_hf())
    with pytest.raises(ValueError, match=r"keys that FalconMambaConfig does not handle: 'ssm_cfg'"):
        em.FalconMambaConfig.from_hf({**em.FalconMambaConfig().to_hf(), "ssm_cfg": {}})
    with pytest.raises(ValueError, match=r"mixer_rms_eps \(0.0\) must be > 0"):
        em.FalconMambaConfig(mixer_rms_eps=0)
    with pytest.raises(ValueError, match=r"mixer_rms_eps \('1e-6'\) must be a number"):
        em.FalconMambaConfig(mixer_rms_eps="1e-6")
    with pytest.raises(ValueError, match=r"layer_types has 3 entries but num_hidden_layers is 2"):
        em.FalconMambaConfig.from_hf({"model_type": "falcon_mamba", "num_hidden_layers": 2,
                                      "layer_types": ["mamba"] * 3})
    with pytest.raises(TypeError, match=r"MambaModel needs a MambaConfig of model_type 'mamba', got a "
                                        r"FalconMambaConfig of model_type 'falcon_mamba'"):
        nnx.eval_shape(lambda: em.MambaForCausalLM(em.FalconMambaConfig(), rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"FalconMambaModel needs a FalconMambaConfig, got MambaConfig"):
        nnx.eval_shape(lambda: em.FalconMambaForCausalLM(em.MambaConfig(), rngs=nnx.Rngs(0)))
    assert em.models.config_from_hf(em.FalconMambaConfig().to_hf()) == em.FalconMambaConfig()
