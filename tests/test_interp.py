"""Hooks and effective attention (`easymamba.interp`) against Hugging Face's torch Mamba-2 and the SSD itself.

Tolerances: 1e-5 relative in float32 throughout. Hook values are compared with HF's intermediates computed in
float32 with a different summation order (XLA vs torch, our chunked SSD vs HF's), a few ulps per layer as in
test_model_parity.py. The effective attention reconstruction sums the same terms as the chunked SSD in a
different order (one (l, l) matrix instead of chunks + carried states); measured ~1e-7.
Most tests share one model and one ids shape, so the compiled forwards are reused (CPU CI time).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers.models.mamba2.modeling_mamba2 as hf_mamba2
from flax import nnx

import easymamba as em
import easymamba.models.causal_lm
import easymamba.models.mamba2_mixer
from easymamba import interp
from helpers import jitted, random_hf_model, random_ids, rel_err, to_easymamba

TOL = 1e-5


def left_padded(rng, lengths, vocab):
    """ids and mask (len(lengths), max(lengths)) with row r's real tokens at the right, junk under the mask."""
    width = max(lengths)
    ids = random_ids(rng, len(lengths), width, vocab)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def pair():
    """A random 2-layer HF model with n_groups=2 and our copy of it."""
    hf_model = random_hf_model(seed=4, n_groups=2)
    return hf_model, to_easymamba(hf_model)


@pytest.fixture(scope="module")
def pair_g1():
    hf_model = random_hf_model(seed=21, n_groups=1)
    return hf_model, to_easymamba(hf_model)


def full_batch(vocab):
    ids = random_ids(np.random.default_rng(1), 2, 21, vocab)
    return ids, np.ones_like(ids)


def padded_batch(vocab):
    return left_padded(np.random.default_rng(2), [17, 9, 4], vocab)


@pytest.fixture(scope="module")
def ids(pair):
    return jnp.asarray(random_ids(np.random.default_rng(6), 2, 12, pair[0].config.vocab_size))


@pytest.fixture(scope="module")
def all_acts(pair, ids):
    return interp.run_with_cache(pair[1], ids)


# --------------------------------------------------------------------------------------------------------------
# Hooks against HF intermediates
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_intermediates(hf_model, ids, mask, monkeypatch):
    """HF activations by our hook names, from torch forward hooks. HF 5.23's mixer never calls its `conv1d` or
    `act` submodules (it passes their weights to `causal_conv1d_fn`), so the conv + SiLU output is taken by
    wrapping that function, and masked as HF masks it right after."""
    got, handles = {}, []
    conv_outs = []
    real_conv = hf_mamba2.causal_conv1d_fn

    def recording_conv(*args, **kwargs):
        out = real_conv(*args, **kwargs)                               # (b, c, l), after SiLU
        conv_outs.append(out.transpose(1, 2))
        return out

    monkeypatch.setattr(hf_mamba2, "causal_conv1d_fn", recording_conv)

    def record(name, take=lambda args, out: out):
        return lambda module, args, out: got.__setitem__(name, take(args, out).float().numpy())

    bb = hf_model.backbone
    handles.append(bb.embeddings.register_forward_hook(record("hook_embed")))
    for i, layer in enumerate(bb.layers):
        pre = f"layers.{i}.mixer."
        handles += [
            layer.mixer.in_proj.register_forward_hook(record(pre + "hook_in_proj")),
            layer.mixer.norm.register_forward_hook(record(pre + "hook_ssm_out", lambda args, out: args[0])),
            layer.mixer.norm.register_forward_hook(record(pre + "hook_inner_norm")),
            layer.mixer.out_proj.register_forward_hook(record(pre + "hook_out_proj")),
            layer.register_forward_hook(record(f"layers.{i}.hook_resid_post")),
        ]
    try:
        hf_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    cfg = hf_model.config
    for i, layer in enumerate(bb.layers):
        pre = f"layers.{i}.mixer."
        got[pre + "hook_conv"] = conv_outs[i].numpy() * mask[:, :, None]
        # the step size as HF's chunk scan forms it from the in_proj output, written out in torch
        dt_raw = torch.from_numpy(got[pre + "hook_in_proj"][..., -cfg.num_heads:])
        dt = torch.nn.functional.softplus(dt_raw + layer.mixer.dt_bias)
        got[pre + "hook_dt"] = torch.clamp(dt, *cfg.time_step_limit).numpy()
        b, l = ids.shape
        got[pre + "hook_ssm_out"] = got[pre + "hook_ssm_out"].reshape(b, l, cfg.num_heads, cfg.head_dim)
    return got


def test_hooks_match_hf_intermediates_g1(pair_g1, monkeypatch):
    _compare_hooks_with_hf(*pair_g1, *full_batch(pair_g1[0].config.vocab_size), monkeypatch)


def test_hooks_match_hf_intermediates_g2_left_padded(pair, monkeypatch):
    # the masked hook (conv) and the unmasked ones (embed, resid) must both line up under left padding
    _compare_hooks_with_hf(*pair, *padded_batch(pair[0].config.vocab_size), monkeypatch)


def _compare_hooks_with_hf(hf_model, model, ids, mask, monkeypatch):
    theirs = hf_intermediates(hf_model, ids, mask, monkeypatch)
    _, ours = interp.run_with_cache(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert list(ours) == interp.hook_names(model) and set(theirs) == set(ours)
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        err = rel_err(ours[name], theirs[name])
        assert err <= TOL, (name, err)


# --------------------------------------------------------------------------------------------------------------
# Effective attention
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["g1_ragged", "g2_left_padded", "g4_limit_chunk_multiple_3_layers"])
def test_effective_attention_reconstructs_ssm_out(case, pair, pair_g1):
    # the first two reuse the HF tests' models and batches (and so their compiled forwards)
    if case == "g1_ragged":                                           # l = 21, chunks of 8
        model = pair_g1[1]
        ids, mask = full_batch(model.config.vocab_size)
    elif case == "g2_left_padded":
        model = pair[1]
        ids, mask = padded_batch(model.config.vocab_size)
    else:
        model = to_easymamba(random_hf_model(seed=8, n_groups=4, num_hidden_layers=3, chunk_size=4,
                                             time_step_limit=(0.02, 0.08)))
        ids, mask = full_batch(model.config.vocab_size)
        ids, mask = ids[:, :16], mask[:, :16]
    cfg = model.config
    _, acts = interp.run_with_cache(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    M_all = interp.compute_effective_attention(model, acts, include_dt_scaling=True)
    n_layers, (b, l) = cfg.num_hidden_layers, ids.shape
    assert M_all.shape == (n_layers, b, cfg.num_heads, l, l)
    above = np.triu(np.ones((l, l), bool), k=1)
    for i, M in enumerate(M_all):
        assert not np.asarray(M)[..., above].any()                    # causal: exactly 0 above the diagonal
        x = acts[f"layers.{i}.mixer.hook_conv"][..., :cfg.intermediate_size].reshape(b, l, cfg.num_heads,
                                                                                     cfg.head_dim)
        D = model.backbone.layers[i].mixer.D[...]
        y = jnp.einsum("bhls,bshp->blhp", M, x) + D[:, None] * x
        err = rel_err(y, acts[f"layers.{i}.mixer.hook_ssm_out"])
        print(f"{case} layer {i}: reconstruction rel err {err:.2e}")
        assert err <= TOL, (i, err)


def test_effective_attention_entries_follow_the_formula(pair, all_acts):
    """A few entries from the definition, in float64 NumPy with an explicit sum over k: no segsum, no einsum."""
    model = pair[1]
    cfg = model.config
    _, acts = all_acts
    M = np.asarray(interp.compute_effective_attention(model, acts, layer=1))
    M_dt = np.asarray(interp.compute_effective_attention(model, acts, layer=1, include_dt_scaling=True))
    xbc = np.asarray(acts["layers.1.mixer.hook_conv"], np.float64)
    dt = np.asarray(acts["layers.1.mixer.hook_dt"], np.float64)
    A = -np.exp(np.asarray(model.backbone.layers[1].mixer.A_log[...], np.float64))
    e, g, n, h = cfg.intermediate_size, cfg.n_groups, cfg.state_size, cfg.num_heads
    b, l = xbc.shape[:2]
    B = xbc[..., e:e + g * n].reshape(b, l, g, n)
    C = xbc[..., e + g * n:].reshape(b, l, g, n)
    for bi, hi, i, j in [(0, 0, 0, 0), (0, 3, 7, 2), (1, 4, 11, 0), (1, 7, 9, 9), (0, 5, 6, 5)]:
        grp = hi // (h // g)
        want = (C[bi, i, grp] @ B[bi, j, grp]) * np.exp(sum(dt[bi, k, hi] * A[hi] for k in range(j + 1, i + 1)))
        assert abs(M[bi, hi, i, j] - want) <= 1e-5 * np.abs(M).max(), (bi, hi, i, j)
        assert abs(M_dt[bi, hi, i, j] - want * dt[bi, j, hi]) <= 1e-5 * np.abs(M_dt).max(), (bi, hi, i, j)


def test_effective_attention_memory_limit(pair, ids, all_acts):
    model = pair[1]
    # one layer: 2 * 8 * 12 * 12 = 2,304 elements; both layers: 4,608
    with pytest.raises(ValueError, match=r"shape \(2, 8, 12, 12\) has 2,304 elements .* max_elements=1,000 "):
        interp.compute_effective_attention(model, ids, layer=0, max_elements=1_000)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 8, 12, 12\) has 4,608 elements .* max_elements=4,000 "):
        interp.compute_effective_attention(model, all_acts[1], max_elements=4_000)
    M = interp.compute_effective_attention(model, ids, max_elements=4_608)
    assert M.shape == (2, 2, 8, 12, 12)
    # from acts recorded with every hook on: the same numbers up to XLA fusing that forward differently
    assert rel_err(interp.compute_effective_attention(model, all_acts[1], layer=-1, max_elements=None), M[1]) <= 1e-6
    with pytest.raises(ValueError, match=r"layer must be an int in \[-2, 2\)"):
        interp.compute_effective_attention(model, ids, layer=2)
    with pytest.raises(ValueError, match=r"acts has no \['layers.1.mixer.hook_conv'"):
        interp.compute_effective_attention(model, {}, layer=1)


# --------------------------------------------------------------------------------------------------------------
# Filtering, and hooks off costing nothing
# --------------------------------------------------------------------------------------------------------------


def test_names_filter_stores_only_requested(pair, ids):
    model = pair[1]
    wanted = ["layers.1.hook_resid_post", "hook_embed", "layers.0.mixer.hook_dt"]
    _, acts = interp.run_with_cache(model, ids, names=wanted)
    assert list(acts) == ["hook_embed", "layers.0.mixer.hook_dt", "layers.1.hook_resid_post"]
    # the same selection compute_effective_attention makes, so this reuses its compiled forward
    _, acts = interp.run_with_cache(model, ids, names=lambda name: name.endswith(("hook_conv", "hook_dt")))
    assert list(acts) == [f"layers.{i}.mixer.hook_{k}" for i in range(2) for k in ("conv", "dt")]
    assert jax.eval_shape(lambda i: interp.run_with_cache(model, i, names=[]), ids)[1] == {}
    with pytest.raises(ValueError, match=r"unknown hook name\(s\) \['layers.2.hook_resid_post'\]"):
        interp.run_with_cache(model, ids, names=["layers.2.hook_resid_post"])
    # only the requested hooks become outputs of the traced program
    jaxpr = jax.make_jaxpr(lambda i: interp.run_with_cache(model, i, names=wanted))(ids)
    assert len(jaxpr.out_avals) == 1 + len(wanted)


def _lowered_forward(model, ids, mask=None, cache=None):
    graphdef, state = nnx.split(model)

    def forward(state, ids, mask, cache):
        out = nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)
        return out.logits, out.cache

    return jax.jit(forward).lower(state, ids, mask, cache).as_text()


def _strip_module_name(hlo: str) -> str:
    return re.sub(r"^module @\w+", "module", hlo)


def test_hooks_off_leave_the_compiled_forward_unchanged(pair, ids, monkeypatch):
    """The jitted forward's StableHLO is identical with the sow_hook calls in place and with them replaced by
    a function that does nothing (the code as it was before hooks), for a full, a masked and a decode call;
    and run_with_cache with no names compiles to that same program."""
    model = pair[1]
    mask = jnp.ones((2, 12), jnp.int32).at[1, :3].set(0)
    calls = [dict(), dict(mask=mask), dict(ids=ids[:, :1], cache=model.init_cache(2))]
    with_hooks = [_lowered_forward(model, **({"ids": ids} | c)) for c in calls]
    graphdef, state = nnx.split(model)
    no_names = interp._run_hooked.lower(graphdef, state, ids, None, selected=()).as_text()
    monkeypatch.setattr(easymamba.models.mamba2_mixer, "sow_hook", lambda *args, **kwargs: None)
    monkeypatch.setattr(easymamba.models.causal_lm, "sow_hook", lambda *args, **kwargs: None)
    without = [_lowered_forward(model, **({"ids": ids} | c)) for c in calls]
    for a, b in zip(with_hooks, without):
        assert a == b
    assert _strip_module_name(no_names) == _strip_module_name(without[0])


def test_run_with_cache_logits_and_model_unchanged(pair, ids, all_acts):
    model = pair[1]
    graphdef = nnx.graphdef(model)
    plain = np.asarray(jitted(model)(ids).logits)
    np.testing.assert_array_equal(np.asarray(interp.run_with_cache(model, ids, names=[])[0]), plain)
    logits, acts = all_acts
    # every hook an output: XLA may fuse differently, so a few ulps rather than bit for bit
    assert rel_err(logits, plain) <= 1e-6
    assert nnx.graphdef(model) == graphdef                        # no hook state left behind on the modules
    # under jax.jit with the model closed over (its modules belong to no trace: run_with_cache marks a copy)
    @jax.jit
    def both(i):
        return (interp.run_with_cache(model, i, names=lambda n: "mixer" in n),
                interp.compute_effective_attention(model, i, layer=0))

    (jit_logits, jit_acts), M = both(ids)
    assert rel_err(jit_logits, plain) <= 1e-6
    assert set(jit_acts) == {n for n in acts if "mixer" in n}
    assert rel_err(M, interp.compute_effective_attention(model, acts, layer=0)) <= 1e-6
    assert em.run_with_cache is interp.run_with_cache
    assert em.compute_effective_attention is interp.compute_effective_attention


def test_run_with_cache_through_rematerialised_blocks(pair, ids, all_acts, monkeypatch):
    """Blocks marked for remat (as `make_train_step(remat=True)` marks its copy) record the same activations:
    `sow` inside `nnx.remat` reaches the hook store. Same math, possibly different fusion: 1e-6."""
    model = nnx.clone(pair[1])
    for layer in model.backbone.layers:
        layer.remat = True
    wrapped = []
    real_remat = nnx.remat
    monkeypatch.setattr(nnx, "remat", lambda fn, *a, **k: wrapped.append(fn) or real_remat(fn, *a, **k))
    logits, acts = interp.run_with_cache(model, ids)
    assert len(wrapped) == len(model.backbone.layers)                 # the blocks did run through nnx.remat
    want_logits, want = all_acts
    assert list(acts) == list(want)
    assert rel_err(logits, want_logits) <= 1e-6
    for name, value in acts.items():
        assert value.shape == want[name].shape and rel_err(value, want[name]) <= 1e-6, name
