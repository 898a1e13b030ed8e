"""Falcon-H1 test helpers: tiny configs and random Hugging Face `FalconH1ForCausalLM`s.

Two tiny shapes that between them switch every option the config has: TINY_A (mamba_n_groups 1, the gated RMSNorm
with norm before gate, tied embeddings, head_dim given and != hidden_size // heads, attention and out_proj
biases, no dt clamp) and TINY_B (mamba_n_groups 2, no gated norm, untied, head_dim and mamba_d_head derived,
mamba_d_ssm None so the width is mamba_expand * hidden_size, in_proj and MLP biases, no conv bias, a dt clamp
that bites). Every muP multiplier differs from 1 and from every other. Both dicts have the same keys, so
`random_hf_falcon_h1(seed, **TINY_B)` builds B and any single key can be overridden on either.

Buffers: FalconH1ForCausalLM has three kinds of floating buffer, all non-persistent (absent from the
checkpoint) and all computed from the config: each mixer's `mup_vector` [1, 1, 2e + 2gn + h] (from
ssm_multipliers), and the rotary `inv_freq` / `original_inv_freq` [head_dim / 2] (from rope_theta). Randomising
them would give a model no checkpoint and config describe, so `randomize_falcon_h1_` checks them against the
config's formula instead and refuses a floating buffer it does not know. Persistent floating buffers (none in
5.25) would be randomised.
"""

import math

import torch
import transformers

# Multipliers: all distinct, none 1, products kept O(1) so the logits stay O(1).
TINY_A = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1,
    mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, mamba_conv_bias=True,
    mamba_proj_bias=False, projectors_bias=True, mamba_rms_norm=True, mamba_norm_before_gate=True,
    attention_bias=True, mlp_bias=False, tie_word_embeddings=True, time_step_limit=(0.0, float("inf")),
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
    embedding_multiplier=1.7, lm_head_multiplier=0.45, attention_in_multiplier=0.8,
    attention_out_multiplier=1.3, key_multiplier=0.6, ssm_in_multiplier=1.2, ssm_out_multiplier=0.7,
    ssm_multipliers=[0.55, 1.15, 0.85, 1.35, 0.65], mlp_multipliers=[0.9, 1.1],
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TINY_B = dict(
    vocab_size=113, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=3, head_dim=None, mamba_d_ssm=None, mamba_n_heads=6, mamba_d_head="auto", mamba_n_groups=2,
    mamba_d_state=16, mamba_d_conv=3, mamba_expand=1, mamba_chunk_size=16, mamba_conv_bias=False,
    mamba_proj_bias=True, projectors_bias=False, mamba_rms_norm=False, mamba_norm_before_gate=False,
    attention_bias=False, mlp_bias=True, tie_word_embeddings=False, time_step_limit=(0.02, 0.3),
    rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rms_norm_eps=1e-6,
    embedding_multiplier=0.75, lm_head_multiplier=1.6, attention_in_multiplier=1.25,
    attention_out_multiplier=0.85, key_multiplier=1.45, ssm_in_multiplier=0.65, ssm_out_multiplier=1.35,
    ssm_multipliers=[1.4, 0.6, 1.2, 0.8, 1.1], mlp_multipliers=[1.15, 0.95],
    pad_token_id=0, bos_token_id=1, eos_token_id=[2, 3],
)


def tiny_hf_falcon_h1_config(**overrides) -> transformers.FalconH1Config:
    """TINY_A with `overrides`; a `head_dim` of None is left out (transformers then takes hidden // heads)."""
    kwargs = {**TINY_A, **overrides}
    if kwargs.get("head_dim") is None:
        kwargs.pop("head_dim", None)
    return transformers.FalconH1Config(**kwargs)


def _expected_mup_vector(config) -> torch.Tensor:
    """transformers' muP vector from the config: in_proj's parts [z | x | B | C | dt] times ssm_multipliers."""
    e = config.mamba_d_ssm if config.mamba_d_ssm is not None else int(config.mamba_expand * config.hidden_size)
    gn, h = config.mamba_n_groups * config.mamba_d_state, config.mamba_n_heads
    sizes = (e, e, gn, gn, h)
    return torch.cat([torch.full((n,), float(m)) for n, m in zip(sizes, config.ssm_multipliers)]).view(1, 1, -1)


def _expected_inv_freq(config) -> torch.Tensor:
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


@torch.no_grad()
def randomize_falcon_h1_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fresh random values for every floating parameter of a FalconH1ForCausalLM / FalconH1Model (and any
    persistent floating buffer), at scales that keep the logits O(1) and finite:
    norm weights 1 + 0.1 N, D 1 + 0.2 N, A = -U(1, 16), dt_bias so that softplus(dt_bias) ~ 0.05 * e^(0.5 N),
    biases 0.02 N, conv1d weights 0.4 N, embeddings 0.4 N, every other matrix 0.1 N. The non-persistent buffers
    (`mup_vector`, rotary `inv_freq`) are computed from the config: they are checked, not randomised."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("A_log"):
            value = torch.log(1 + 15 * torch.rand(p.shape, generator=gen))
        elif name.endswith("dt_bias"):
            value = math.log(math.expm1(0.05)) + 0.5 * noise
        elif name.endswith(".D"):
            value = 1.0 + 0.2 * noise
        elif "norm" in name:  # input_layernorm, pre_ff_layernorm, final_layernorm, mamba.norm (gated)
            value = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.02 * noise
        elif "conv1d" in name:
            value = 0.4 * noise
        elif "embed_tokens" in name:
            value = 0.4 * noise
        else:
            value = 0.1 * noise
        p.copy_(value.to(p.dtype))

    persistent = set(model.state_dict())
    mup = _expected_mup_vector(config)
    inv_freq = _expected_inv_freq(config)
    for name, b in model.named_buffers():
        if not b.dtype.is_floating_point:
            continue
        if name in persistent:
            b.copy_((0.1 * torch.randn(b.shape, generator=gen)).to(b.dtype))
        elif name.endswith("mamba.mup_vector"):
            torch.testing.assert_close(b.float(), mup, rtol=0, atol=0, msg=f"{name} is not the config's muP vector")
        elif name.endswith("rotary_emb.inv_freq") or name.endswith("rotary_emb.original_inv_freq"):
            torch.testing.assert_close(b.float(), inv_freq, msg=f"{name} is not the config's RoPE frequencies")
        else:
            raise AssertionError(f"floating buffer {name} is neither in the checkpoint nor one the helper knows how "
                                 "to derive from the config; decide how to randomise or check it")
    return model


def random_hf_falcon_h1(seed: int = 0, **overrides) -> transformers.FalconH1ForCausalLM:
    """A tiny FalconH1ForCausalLM (TINY_A with `overrides`; `**TINY_B` gives B) in float32, eval mode, eager
    attention, every parameter random (`randomize_falcon_h1_` with seed + 1)."""
    torch.manual_seed(seed)
    config = tiny_hf_falcon_h1_config(**overrides)
    config._attn_implementation = "eager"
    model = transformers.FalconH1ForCausalLM(config).float().eval()
    assert model.config._attn_implementation == "eager"
    return randomize_falcon_h1_(model, seed + 1)
