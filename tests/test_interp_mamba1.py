"""Mamba-1 hooks and per-channel effective attention (`easymamba.interp`) against HF's torch `MambaForCausalLM`
and the selective scan itself.

Tolerances: 1e-5 relative in float32 throughout. Hook values are compared with HF's intermediates computed in
float32 with a different summation order (XLA vs torch matmuls and scan), a few ulps per layer as in
test_mamba1_parity.py. The reconstruction y = M x + D x sums the same terms as the sequential scan in another
order (one (l, l) matrix per channel instead of a carried state); measured ~1e-7. The entries test is float64
NumPy from the definition, and float32 M agrees with it to ~1e-7 of the largest entry.
CI time: one shared model and batch for most tests, so run_with_cache compiles a handful of forwards in all.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers.models.mamba.modeling_mamba as hf_mamba
from flax import nnx
from helpers import jitted, random_ids, rel_err
from helpers_mamba1 import random_hf_mamba, to_easymamba_mamba1

import easymamba as em
import easymamba.models.causal_lm
import easymamba.models.mamba1_mixer
from easymamba import interp
from easymamba.models.family import Operands

TOL = 1e-5
MIXER_HOOKS = ("hook_in_proj", "hook_conv", "hook_x_proj", "hook_dt", "hook_ssm_out", "hook_gated", "hook_out_proj")


def left_padded(rng, lengths, vocab):
    """ids and mask (len(lengths), max(lengths)): row r's real tokens at the right, random junk under the mask."""
    width = max(lengths)
    ids = random_ids(rng, len(lengths), width, vocab)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def pair():
    """A random 2-layer HF Mamba-1 (untied, with biases) and our copy of it."""
    hf_model = random_hf_mamba(seed=11, tie_word_embeddings=False, use_bias=True)
    return hf_model, to_easymamba_mamba1(hf_model)


@pytest.fixture(scope="module")
def batch(pair):
    """A left-padded batch (rows of 13, 6 and 2 real tokens; 2 is shorter than the conv kernel)."""
    return left_padded(np.random.default_rng(5), [13, 6, 2], pair[0].config.vocab_size)


@pytest.fixture(scope="module")
def all_acts(pair, batch):
    ids, mask = batch
    return interp.run_with_cache(pair[1], jnp.asarray(ids), attention_mask=jnp.asarray(mask))


@pytest.fixture(scope="module")
def M_dt(pair, all_acts):
    """Every layer's matrices with include_dt_scaling, from the recorded acts (compiled once, shared)."""
    return interp.compute_effective_attention(pair[1], all_acts[1], include_dt_scaling=True)


# --------------------------------------------------------------------------------------------------------------
# Hooks against HF intermediates
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_intermediates(hf_model, ids, mask, monkeypatch):
    """HF activations by our hook names. Torch forward hooks on the modules HF calls (embeddings, in_proj,
    x_proj, out_proj, the blocks); HF 5.23's mixer calls neither its `conv1d` nor its `act` module (it passes the
    weights to `causal_conv1d_fn`) nor `dt_proj` (it uses the weight and passes the bias to the scan), so:
    the conv + SiLU output is x_proj's input, masked by HF's `apply_mask_to_padding_states` (its slow path masks
    the mixer input before in_proj and that conv output, nothing else); the step size and the ungated scan
    output are taken by wrapping `mamba_selective_scan` (the same call without z, then HF's gate)."""
    got, handles, scans = {}, [], []
    real_scan = hf_mamba.mamba_selective_scan

    def recording_scan(u, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kwargs):
        ungated = real_scan(u, dt, A, B, C, D=D, z=None, delta_bias=delta_bias, delta_softplus=delta_softplus,
                            **kwargs)
        step = torch.nn.functional.softplus(dt + delta_bias[:, None])                 # (b, e, l)
        scans.append((step.transpose(1, 2), ungated.transpose(1, 2)))
        return ungated * torch.nn.functional.silu(z)

    monkeypatch.setattr(hf_mamba, "mamba_selective_scan", recording_scan)

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


def test_hooks_match_hf_intermediates_left_padded(pair, batch, all_acts, monkeypatch):
    # the masked hooks (conv and what follows) and the unmasked ones (embed, in_proj of a zeroed input, resid)
    # must all line up under left padding
    hf_model, model = pair
    theirs = hf_intermediates(hf_model, *batch, monkeypatch)
    _, ours = all_acts
    assert list(ours) == interp.hook_names(model) and set(theirs) == set(ours)
    assert interp.hook_names(model)[:1 + len(MIXER_HOOKS) + 1] == (
        ["hook_embed"] + [f"layers.0.mixer.{h}" for h in MIXER_HOOKS] + ["layers.0.hook_resid_post"])
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        err = rel_err(ours[name], theirs[name])
        assert err <= TOL, (name, err)


# --------------------------------------------------------------------------------------------------------------
# Effective attention
# --------------------------------------------------------------------------------------------------------------


def _reconstruct(model, acts, M, layer, channels):
    """sum_j M[c, i, j] x_j[c] + D[c] x_i[c] for the channels of M, x = hook_conv."""
    x = acts[f"layers.{layer}.mixer.hook_conv"][..., channels]                    # (b, l, s)
    D = model.backbone.layers[layer].mixer.D[...][channels]
    return jnp.einsum("bcij,bjc->bic", M, x) + D * x


def test_effective_attention_reconstructs_ssm_out_left_padded(pair, batch, all_acts, M_dt):
    model = pair[1]
    cfg = model.config
    _, acts = all_acts
    M_all = M_dt
    (b, l), e = batch[0].shape, cfg.intermediate_size
    assert M_all.shape == (cfg.num_hidden_layers, b, e, l, l) and M_all.dtype == jnp.float32
    above = np.triu(np.ones((l, l), bool), k=1)
    for i, M in enumerate(M_all):
        assert not np.asarray(M)[..., above].any()                                 # exactly 0 above the diagonal
        err = rel_err(_reconstruct(model, acts, M, i, np.arange(e)), acts[f"layers.{i}.mixer.hook_ssm_out"])
        print(f"left padded, layer {i}: reconstruction rel err {err:.2e}")
        assert err <= TOL, (i, err)


def test_effective_attention_reconstructs_other_config_and_channel_subset():
    """rank 5, n = 4, conv width 3, 3 layers, a channel subset in blocks of channels (a small max_elements)."""
    hf_model = random_hf_mamba(seed=12, num_hidden_layers=3, time_step_rank=5, state_size=4, conv_kernel=3,
                               use_conv_bias=False)
    model = to_easymamba_mamba1(hf_model)
    ids = jnp.asarray(random_ids(np.random.default_rng(8), 2, 10, hf_model.config.vocab_size))
    _, acts = interp.run_with_cache(
        model, ids, names=lambda n: n.endswith(("hook_conv", "hook_x_proj", "hook_dt", "hook_ssm_out")))
    channels = [63, 0, 17, -2, 17, 30, 5]                                        # any order, repeats, negatives
    # (b, n, l, l) = 800 elements per channel: max_elements 2,000 runs blocks of at most 2 channels, here 2, 2, 2
    # and a remainder of 1 (lax.map's scanned and remainder parts both)
    M = interp.compute_effective_attention(model, acts, layer=-1, include_dt_scaling=True, channels=channels,
                                           max_elements=2_000)
    assert M.shape == (2, 7, 10, 10)
    picked = np.asarray(channels) % 64
    err = rel_err(_reconstruct(model, acts, M, 2, picked), acts["layers.2.mixer.hook_ssm_out"][..., picked])
    print(f"rank 5, n 4, channel subset: reconstruction rel err {err:.2e}")
    assert err <= TOL


def test_effective_attention_entries_follow_the_formula(pair, all_acts, M_dt):
    """A few entries from the definition in float64 NumPy with explicit sums over k and n: no segsum, no einsum."""
    model = pair[1]
    cfg = model.config
    _, acts = all_acts
    M = np.asarray(interp.compute_effective_attention(model, acts)[1])
    M_dt = np.asarray(M_dt[1])
    x_proj = np.asarray(acts["layers.1.mixer.hook_x_proj"], np.float64)
    dt = np.asarray(acts["layers.1.mixer.hook_dt"], np.float64)
    A = -np.exp(np.asarray(model.backbone.layers[1].mixer.A_log[...], np.float64))   # (e, n)
    r, n = cfg.resolved_time_step_rank, cfg.state_size
    B, C = x_proj[..., r:r + n], x_proj[..., r + n:]
    for bi, c, i, j in [(0, 0, 0, 0), (0, 5, 12, 3), (0, 63, 9, 9), (1, 40, 12, 8), (0, 17, 7, 1)]:
        want = sum(C[bi, i, s] * B[bi, j, s] * np.exp(sum(dt[bi, k, c] * A[c, s] for k in range(j + 1, i + 1)))
                   for s in range(n))
        assert abs(M[bi, c, i, j] - want) <= 1e-5 * np.abs(M).max(), (bi, c, i, j)
        assert abs(M_dt[bi, c, i, j] - want * dt[bi, j, c]) <= 1e-5 * np.abs(M_dt).max(), (bi, c, i, j)


def test_per_head_and_per_state_decay_paths_agree():
    """The Mamba-2 path (one decay rate per head: C B^T times one segsum) and the Mamba-1 path (a rate per channel
    and state, summed over n in blocks of channels) are the same matrices when A[c, n] = A[c]; with groups
    (channel c reads group c // (h / g)) and a channel subset. Random operands, no model, float32."""
    rng = np.random.default_rng(3)
    b, l, h, g, n = 2, 9, 6, 3, 4
    op = Operands(dt=jnp.asarray(rng.uniform(0.01, 0.2, (b, l, h)), jnp.float32),
                  A=jnp.asarray(-rng.uniform(1, 16, h), jnp.float32),
                  B=jnp.asarray(rng.standard_normal((b, l, g, n)), jnp.float32),
                  C=jnp.asarray(rng.standard_normal((b, l, g, n)), jnp.float32))
    subset = [4, 0, 4, 5]

    @jax.jit                                                     # one compile instead of op-by-op dispatch
    def three(op):
        per_head = interp._effective_attention(op, jnp.arange(h), include_dt_scaling=True, block=None)
        per_state = interp._effective_attention(op._replace(A=jnp.broadcast_to(op.A[:, None], (h, n))),
                                                jnp.arange(h), include_dt_scaling=True, block=4)  # blocks of 4, 2
        picked = interp._effective_attention(op, jnp.asarray(subset), include_dt_scaling=True, block=None)
        return per_head, per_state, picked

    per_head, per_state, picked = three(op)
    assert per_head.shape == per_state.shape == (b, h, l, l)
    assert rel_err(per_state, per_head) <= 1e-6                  # sums over n in another order: a few ulps
    # the same products, gathered: equal up to XLA fusing them differently
    assert rel_err(picked, np.asarray(per_head)[:, subset]) <= 1e-7


def test_effective_attention_limits_and_bad_channels(pair, batch, all_acts):
    model = pair[1]
    ids = jnp.asarray(batch[0])
    acts = all_acts[1]
    # result: one layer 3 * 64 * 13 * 13 = 32,448 elements; per channel the intermediate is 3 * 8 * 13 * 13
    with pytest.raises(ValueError, match=r"shape \(3, 64, 13, 13\) has 32,448 elements .* max_elements=30,000 "):
        interp.compute_effective_attention(model, ids, layer=0, max_elements=30_000)
    with pytest.raises(ValueError, match=r"one channel alone is \(3, 8, 13, 13\) = 4,056 elements, over the "
                                         r"limit max_elements=4,000"):
        interp.compute_effective_attention(model, acts, layer=0, channels=[1, 2], max_elements=4_000)
    for bad, message in [([3, 64], r"index\(es\) \[64\] out of range: .* 64 inner channels \(e\), so indices "
                                   r"must lie in \[-64, 64\)"),
                         ([-65], r"index\(es\) \[-65\] out of range"),
                         ([], r"non-empty 1-D sequence of ints"),
                         ([1.0, 2.0], r"non-empty 1-D sequence of ints .* dtype float64"),
                         (3, r"channels must be a sequence of indices into the 64 inner channels \(e\)")]:
        with pytest.raises(ValueError, match=message):
            interp.compute_effective_attention(model, acts, layer=0, channels=bad)
    # Mamba-2's channels are its heads (an abstract model: the check runs before any computation)
    mamba2 = nnx.eval_shape(lambda: em.Mamba2ForCausalLM(em.Mamba2Config(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=16),
        rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"index\(es\) \[8\] out of range: .* 8 heads \(h\), so indices must lie "
                                         r"in \[-8, 8\)"):
        interp.compute_effective_attention(mamba2, ids, channels=[0, 8])
    with pytest.raises(ValueError, match=r"acts has no \['layers.1.mixer.hook_x_proj'"):
        interp.compute_effective_attention(model, {}, layer=1)
    with pytest.raises(ValueError, match=r"layer must be an int in \[-2, 2\)"):
        interp.compute_effective_attention(model, acts, layer=2)


# --------------------------------------------------------------------------------------------------------------
# Filtering, and hooks off costing nothing
# --------------------------------------------------------------------------------------------------------------


def test_names_filter_and_logits(pair, batch, all_acts, M_dt):
    model = pair[1]
    ids, mask = jnp.asarray(batch[0]), jnp.asarray(batch[1])
    wanted = ["layers.1.hook_resid_post", "hook_embed", "layers.0.mixer.hook_gated"]
    shapes = jax.eval_shape(lambda i: interp.run_with_cache(model, i, names=wanted, attention_mask=mask), ids)[1]
    assert set(shapes) == set(wanted)                        # (eval_shape hands dicts back key-sorted)
    # from token ids, the forward records only hook_x_proj and hook_dt (a predicate selection of the same names
    # traces the same outputs); the same matrices as from the acts of the forward with every hook on
    selected = jax.eval_shape(
        lambda i: interp.run_with_cache(model, i, names=lambda n: n.endswith(("x_proj", "dt"))), ids)[1]
    assert set(selected) == {f"layers.{i}.mixer.hook_{k}" for i in range(2) for k in ("x_proj", "dt")}
    M = interp.compute_effective_attention(model, ids, attention_mask=mask, include_dt_scaling=True)
    assert rel_err(M, M_dt) <= 1e-6
    with pytest.raises(ValueError, match=r"unknown hook name\(s\) \['layers.0.mixer.hook_inner_norm'\]"):
        interp.run_with_cache(model, ids, names=["layers.0.mixer.hook_inner_norm"])  # a Mamba-2 name
    # every hook on: the plain forward's logits up to a few ulps (XLA fuses differently); with no hooks the
    # program is the plain forward's itself (test_hooks_off_leave_the_compiled_forward_unchanged)
    plain = np.asarray(jitted(model)(ids, mask).logits)
    assert rel_err(all_acts[0], plain) <= 1e-6
    assert jax.eval_shape(lambda i: interp.run_with_cache(model, i, names=[]), ids)[1] == {}


def _lowered_forward(model, ids, mask=None, cache=None):
    graphdef, state = nnx.split(model)

    def forward(state, ids, mask, cache):
        out = nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)
        return out.logits, out.cache

    return jax.jit(forward).lower(state, ids, mask, cache).as_text()


def test_hooks_off_leave_the_compiled_forward_unchanged(pair, batch, monkeypatch):
    """The jitted forward's StableHLO is identical with the sow_hook calls in place and with them replaced by a
    function that does nothing, for a full, a masked and a decode call; run_with_cache with no names lowers to
    that same program (lowering only: nothing is compiled)."""
    model = pair[1]
    ids, mask = jnp.asarray(batch[0]), jnp.asarray(batch[1])
    calls = [dict(), dict(mask=mask), dict(ids=ids[:, :1], cache=model.init_cache(3))]
    with_hooks = [_lowered_forward(model, **({"ids": ids} | c)) for c in calls]
    graphdef, state = nnx.split(model)
    no_names = interp._run_hooked.lower(graphdef, state, ids, None, selected=()).as_text()
    monkeypatch.setattr(easymamba.models.mamba1_mixer, "sow_hook", lambda *args, **kwargs: None)
    monkeypatch.setattr(easymamba.models.causal_lm, "sow_hook", lambda *args, **kwargs: None)
    without = [_lowered_forward(model, **({"ids": ids} | c)) for c in calls]
    for a, b in zip(with_hooks, without):
        assert a == b
    assert re.sub(r"^module @\w+", "module", no_names) == re.sub(r"^module @\w+", "module", without[0])
