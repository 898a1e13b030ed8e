"""Zamba2 test helpers: tiny configs and random Hugging Face `Zamba2ForCausalLM`s whose every parameter is random.

`randomize_zamba2_` draws every floating parameter afresh at a scale that keeps the logits O(1): matrices (the
LoRA adapters included, which HF initialises like any linear but which a zero draw would hide) ~ N(0, 1/fan_in),
the embedding ~ N(0, 0.3^2) (as a tied LM head it gives logits of std ~ 0.3 sqrt(d)), RMSNorm weights (the gated
one included) 1 +- 0.1, A_log = log U(1, 16), dt_bias so that softplus(dt_bias) ~ 0.05, D ~ 1 +- 0.1, biases
~ N(0, 0.05^2). Persistent floating buffers would be drawn too;
Zamba2 has none. Its only floating buffers are the rotary `inv_freq` / `original_inv_freq` (non-persistent, not
in the checkpoint), which are functions of the config: they are checked against `rope_theta` and left alone,
since a model rebuilt from the config recomputes them.
"""

import math

import torch
import transformers

# Two tiny shapes that between them cover what the family varies: layer patterns (hybrid first / last / adjacent),
# one and two shared blocks, one and two mamba groups, with and without the attention adapters and the rotary
# embedding, GQA (only without attention adapters: HF's k/v adapters write 2 * d
# channels, the full q width, so they need num_key_value_heads == num_attention_heads), MLP and mixer biases.
TINY_A = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=5,
    layers_block_type=["mamba", "hybrid", "mamba", "mamba", "hybrid"],
    mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1, n_mamba_heads=4, chunk_size=8,
    intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_mem_blocks=1,
    use_shared_attention_adapter=False, adapter_rank=6, use_mem_rope=False, hidden_act="gelu",
    add_bias_linear=True, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TINY_B = dict(
    vocab_size=89, hidden_size=24, num_hidden_layers=6,
    layers_block_type=["hybrid", "mamba", "hybrid", "hybrid", "mamba", "hybrid"],
    mamba_d_state=6, mamba_d_conv=3, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=6, chunk_size=4,
    intermediate_size=40, num_attention_heads=3, num_key_value_heads=3, num_mem_blocks=2,
    use_shared_attention_adapter=True, adapter_rank=5, use_mem_rope=True,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0}, hidden_act="gelu",
    add_bias_linear=False, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TINY_CONFIGS = {"a": TINY_A, "b": TINY_B}


def tiny_hf_zamba2_config(name: str = "a", **overrides) -> transformers.Zamba2Config:
    return transformers.Zamba2Config(**{**TINY_CONFIGS[name], **overrides})


@torch.no_grad()
def randomize_zamba2_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every floating parameter (and persistent floating buffer) of a Zamba2 model drawn afresh; see the module
    docstring for the scales. Tied parameters (the shared blocks, a tied LM head) are drawn once."""
    gen = torch.Generator().manual_seed(seed)

    def noise(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    for name, p in model.named_parameters():  # deduplicated: a tied tensor is visited once
        if not p.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            value = torch.log(1 + 15 * torch.rand(p.shape, generator=gen))            # A ~ -U(1, 16)
        elif leaf == "dt_bias":
            value = math.log(math.expm1(0.05)) + 0.5 * noise(p.shape)                 # softplus ~ 0.05
        elif leaf == "D" or "norm" in name:
            value = 1.0 + 0.1 * noise(p.shape)
        elif leaf == "bias":
            value = 0.05 * noise(p.shape)
        elif "embed_tokens" in name:                                                  # tied: the LM head too
            value = 0.3 * noise(p.shape)
        elif "conv1d" in name:                                                        # (c, 1, k)
            value = noise(p.shape) / math.sqrt(p.shape[-1])
        elif p.ndim == 2:                                                             # every linear, adapters too
            value = noise(p.shape) / math.sqrt(p.shape[1])
        else:
            raise AssertionError(f"randomize_zamba2_ does not know parameter {name} {tuple(p.shape)}")
        p.copy_(value.to(p.dtype))

    persistent = dict(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        if not b.is_floating_point():
            continue
        if name in persistent:
            b.copy_(noise(b.shape).to(b.dtype))
        elif name.endswith("inv_freq"):
            # derived from the config: check, keep
            cfg = model.config
            dim = cfg.attention_head_dim
            expected = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
            torch.testing.assert_close(b.float(), expected, rtol=1e-6, atol=0)
        else:
            raise AssertionError(f"randomize_zamba2_ does not know buffer {name} {tuple(b.shape)}")
    return model


def random_hf_zamba2(seed: int = 0, name: str = "a", **overrides) -> transformers.Zamba2ForCausalLM:
    """A randomised float32 `Zamba2ForCausalLM` in eval mode with eager attention, of tiny config `name`."""
    torch.manual_seed(seed)
    config = tiny_hf_zamba2_config(name, **overrides)
    config._attn_implementation = "eager"
    model = transformers.Zamba2ForCausalLM(config).float().eval()
    assert model.config._attn_implementation == "eager"
    return randomize_zamba2_(model, seed + 1)


def temper_attention_(hf):
    """Halve q_proj, k_proj and their adapters' up weights (attention logits x 1/4; still random): drawn as
    `randomize_zamba2_` draws them, config b's attention logits are sharp enough that transformers' own float32
    logits are 6e-5 from its float64 ones, so no float32 port could be checked to 1e-5 (tests/test_zamba2.py)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            adapter_up = name.endswith(".1.weight") and ("_q_adapter_list" in name or "_k_adapter_list" in name)
            if name.endswith(("q_proj.weight", "k_proj.weight")) or adapter_up:
                p.mul_(0.5)
    return hf
