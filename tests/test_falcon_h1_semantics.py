"""What the Falcon-H1 notes say about FalconH1ForCausalLM (transformers 5.25), checked by running it: a plain
torch reimplementation written from the notes (sequential SSM recurrence, eager attention) must give HF's logits
and hidden states, with and without left padding; the decode-step and generate behaviours the notes describe
are checked on HF itself. float32, random weights (`randomize_falcon_h1_`), tolerance 1e-5 relative on logits."""

import pytest
import torch
import torch.nn.functional as F
from helpers_falcon_h1 import TINY_B, random_hf_falcon_h1

from easymamba.config import FalconH1Config

TOL = 1e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    """x [b, h, l, p], pos [b, l]: rotate-half RoPE over the whole head."""
    p = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, p, 2, dtype=torch.float) / p))
    ang = pos[..., None].float() * inv
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rot = torch.cat([-x[..., p // 2:], x[..., : p // 2]], -1)
    return x * cos + rot * sin


def reference_forward(hf, ids, mask=None):
    """Logits [b, l, v] and hidden states (embeddings, after each layer but the last, final-normed) of the note."""
    c = FalconH1Config.from_hf(hf.config.to_dict())
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    b, l = ids.shape
    mask = torch.ones(b, l) if mask is None else mask.float()
    pos = torch.arange(l)[None].expand(b, l)  # forward without position_ids: 0..l-1 whatever the mask
    m = c.mixer_config
    e, h, p, g, n, k = m.intermediate_size, m.num_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel
    mup = torch.cat([torch.full((s,), v) for s, v in zip((e, e, g * n, g * n, h), m.zxbcdt_multipliers)])
    a = c.attention_config
    x = sd["model.embed_tokens.weight"][ids] * c.embedding_multiplier
    states = [x]
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        lin = lambda name, t: F.linear(t, sd[pre + name + ".weight"], sd.get(pre + name + ".bias"))  # noqa: E731
        u = _rms(x, sd[pre + "input_layernorm.weight"], c.rms_norm_eps)
        # Mamba-2 side: mask, ssm_in, in_proj, muP vector, conv + silu, mask, SSM, gate/norm, out_proj, ssm_out.
        zxbcdt = lin("mamba.in_proj", u * mask[..., None] * c.ssm_in_multiplier) * mup
        z, xbc, dt = zxbcdt.split([e, e + 2 * g * n, h], -1)
        w = sd[pre + "mamba.conv1d.weight"]
        xbc = F.conv1d(F.pad(xbc.transpose(1, 2), (k - 1, 0)), w, sd.get(pre + "mamba.conv1d.bias"),
                       groups=xbc.shape[-1])
        xbc = F.silu(xbc).transpose(1, 2) * mask[..., None]
        xs, B, C = xbc.split([e, g * n, g * n], -1)
        dt = F.softplus(dt + sd[pre + "mamba.dt_bias"]).clamp(*m.time_step_limit)
        A = -torch.exp(sd[pre + "mamba.A_log"])
        xs, B, C = xs.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
        B, C = B.repeat_interleave(h // g, 2), C.repeat_interleave(h // g, 2)  # head j uses group j // (h / g)
        s, ys = torch.zeros(b, h, p, n), []
        for t in range(l):
            s = s * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * xs[:, t])[..., None] * \
                B[:, t, :, None]
            ys.append((s @ C[:, t, :, :, None])[..., 0] + sd[pre + "mamba.D"][:, None] * xs[:, t])
        y = torch.stack(ys, 1).reshape(b, l, e)
        if c.mamba_rms_norm:
            wn = sd[pre + "mamba.norm.weight"].view(g, e // g)
            if not c.mamba_norm_before_gate:
                y = y * F.silu(z)
            y = _rms(y.view(b, l, g, e // g), wn, c.rms_norm_eps).reshape(b, l, e)
            if c.mamba_norm_before_gate:
                y = y * F.silu(z)
        else:
            y = y * F.silu(z)
        mamba_out = lin("mamba.out_proj", y) * c.ssm_out_multiplier
        # Attention side: input times attention_in, keys times key_multiplier before RoPE, GQA, causal + padding.
        ua = u * c.attention_in_multiplier
        hd, nh, nkv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
        q = lin("self_attn.q_proj", ua).view(b, l, nh, hd).transpose(1, 2)
        kk = (lin("self_attn.k_proj", ua).view(b, l, nkv, hd) * c.key_multiplier).transpose(1, 2)
        v = lin("self_attn.v_proj", ua).view(b, l, nkv, hd).transpose(1, 2)
        q, kk = _rope(q, pos, a.rope_theta), _rope(kk, pos, a.rope_theta)
        kk, v = kk.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = (q @ kk.transpose(2, 3)) * hd ** -0.5
        allowed = torch.ones(l, l).tril().bool()[None] & mask.bool()[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, l, nh * hd)
        att_out = lin("self_attn.o_proj", att) * c.attention_out_multiplier
        x = x + mamba_out + att_out
        # Feed-forward.
        f = _rms(x, sd[pre + "pre_ff_layernorm.weight"], c.rms_norm_eps)
        gate = F.silu(lin("feed_forward.gate_proj", f) * c.mlp_multipliers[0])
        x = x + lin("feed_forward.down_proj", lin("feed_forward.up_proj", f) * gate) * c.mlp_multipliers[1]
        states.append(x)
    x = _rms(x, sd["model.final_layernorm.weight"], c.rms_norm_eps)
    states[-1] = x
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return F.linear(x, head) * c.lm_head_multiplier, states


CASES = {"A": {}, "B": TINY_B, "A-norm-after-gate": dict(mamba_norm_before_gate=False),
         "A-groups-2-norm": dict(mamba_n_groups=2)}


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_reference_matches_hf(name):
    hf = random_hf_falcon_h1(3, **CASES[name])
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, hf.config.vocab_size, (2, 13), generator=gen)
    out = hf(ids, output_hidden_states=True)
    logits, states = reference_forward(hf, ids)
    assert torch.isfinite(out.logits).all() and out.logits.abs().max() < 50
    assert _rel(logits, out.logits) < TOL, _rel(logits, out.logits)
    assert len(out.hidden_states) == hf.config.num_hidden_layers + 1
    for ours, theirs in zip(states, out.hidden_states):
        assert _rel(ours, theirs) < TOL
    # Left padding: the mixer zeroes padded positions (input and conv output), attention masks them as keys.
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :4] = 0
    out = hf(ids, attention_mask=mask)
    logits, _ = reference_forward(hf, ids, mask)
    assert _rel(logits[:, 4:], out.logits[:, 4:]) < TOL
    assert _rel(logits[1], out.logits[1]) < TOL


@torch.no_grad()
def test_mup_vector_is_a_derived_buffer():
    hf = random_hf_falcon_h1(0)
    names = {n for n, _ in hf.named_buffers()}
    assert "model.layers.0.mamba.mup_vector" in names and "model.layers.0.mamba.mup_vector" not in hf.state_dict()
    assert hf.model.layers[0].mamba.mup_vector.shape == (1, 1, 2 * 32 + 2 * 8 + 4)


@torch.no_grad()
def test_decode_step_skips_the_dt_clamp():
    """The cached single-token step (`mamba2_selective_state_update`) never clamps dt with time_step_limit; the
    chunked scan does. With a limit (0.5, 1.0) that lifts every dt (~0.05 here) the step's logits differ from the
    full forward's; with no limit they agree."""
    for overrides, same in ((dict(time_step_limit=(0.0, float("inf"))), True), (dict(time_step_limit=(0.5, 1.0)),
                                                                                 False)):
        hf = random_hf_falcon_h1(5, **{**TINY_B, **overrides})
        ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
        full = hf(ids).logits[:, -1]
        pre = hf(ids[:, :-1], use_cache=True)
        step = hf(ids[:, -1:], cache=pre.cache, use_cache=True).logits[:, -1]
        assert (_rel(step, full) < TOL) == same, _rel(step, full)


@torch.no_grad()
def test_generate_position_ids_with_left_padding():
    """generate() derives position_ids from the mask (cumsum - 1, padded slots 0): a left-padded row generates what
    the unpadded row does; forward() without position_ids uses 0..l-1 whatever the mask."""
    hf = random_hf_falcon_h1(2)
    ids = torch.randint(3, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    seen = []
    hook = hf.model.rotary_emb.register_forward_hook(lambda mod, args, kw, out: seen.append(kw["position_ids"].clone()),
                                                     with_kwargs=True)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    a = hf.generate(padded, attention_mask=mask, **kw)[:, 9:]
    hook.remove()
    b = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)[:, 6:]
    assert torch.equal(a, b)
    assert [s.tolist() for s in seen] == [[[0, 0, 0, 0, 1, 2, 3, 4, 5]], [[6]], [[7]], [[8]]]
