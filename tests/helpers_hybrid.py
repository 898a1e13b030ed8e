"""Test tooling for the hybrid families: random Hugging Face reference models of any model_type, and their logits.

HF initialises norm weights, D and biases to constants (1 or 0) and A_log to log(1..h); a parity test on such
weights would not notice a missing bias, a swapped norm weight or a head order mix-up. `randomize_hf_` redraws
every floating parameter and every floating persistent buffer (router correction biases, ...) of a torch model
at a scale where activations and logits stay O(1). Non-persistent buffers (the rotary `inv_freq`) are derived
from the config and never saved, so they are left alone: changing them would test a model no config describes.

Tiny configs, two per family, differ in layer pattern, Mamba groups, tied embeddings, biases and (Granite) in
experts and rotary embedding; `random_hf_model(model_type, seed, variant=..., **overrides)` builds one.
"""

import math

import numpy as np
import torch
import transformers

# Two tiny configs per family: HF constructor keywords. Sizes are small but every divisibility is non-trivial:
# GQA (4 query heads over 2 KV heads), Mamba heads over groups, partial rotary (Bamba rotates 4 of 8 channels).
TINY_CONFIGS: dict[str, tuple[dict, ...]] = {
    "nemotron_h": (
        # every kind of layer, 2 Mamba groups, 2 expert groups of which a token may use 1, untied head
        dict(vocab_size=97, hidden_size=32, layers_block_type=["mamba", "attention", "mlp", "moe", "mamba",
             "attention"], num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=8,
             mamba_head_dim=8, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=8, intermediate_size=48,
             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             moe_shared_expert_intermediate_size=24, n_group=2, topk_group=1, routed_scaling_factor=1.5,
             tie_word_embeddings=False, layer_norm_epsilon=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        # one Mamba group, latent experts, biased MLPs, unnormalised top-k, tied head, a different pattern
        dict(vocab_size=89, hidden_size=32, layers_block_type=["mamba", "moe", "mamba", "attention", "mlp"],
             num_attention_heads=4, num_key_value_heads=1, head_dim=16, mamba_num_heads=4, mamba_head_dim=16,
             n_groups=1, ssm_state_size=8, conv_kernel=3, chunk_size=4, intermediate_size=40, mlp_bias=True,
             use_bias=True, n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=12,
             moe_shared_expert_intermediate_size=20, moe_latent_size=16, norm_topk_prob=False,
             routed_scaling_factor=2.5, tie_word_embeddings=True, layer_norm_epsilon=1e-6, pad_token_id=0,
             bos_token_id=1, eos_token_id=2),
    ),
    "bamba": (
        dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, attn_layer_indices=[1, 3],
             num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1,
             mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, tie_word_embeddings=False,
             rope_theta=10000.0, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        dict(vocab_size=89, hidden_size=32, intermediate_size=40, num_hidden_layers=3, attn_layer_indices=[0],
             num_attention_heads=4, num_key_value_heads=1, mamba_n_heads=8, mamba_d_head="auto", mamba_n_groups=2,
             mamba_d_state=8, mamba_d_conv=3, mamba_expand=2, mamba_chunk_size=4, tie_word_embeddings=True,
             attention_bias=True, mlp_bias=True, mamba_proj_bias=True, mamba_conv_bias=True, rope_theta=500.0,
             rms_norm_eps=1e-6, time_step_limit=(0.01, 3.0), pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
    "granitemoehybrid": (
        dict(vocab_size=97, hidden_size=32, intermediate_size=16, shared_intermediate_size=24, num_hidden_layers=4,
             layer_types=["mamba", "attention", "mamba", "attention"], num_attention_heads=4, num_key_value_heads=2,
             num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1,
             mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, position_embedding_type="rope",
             rope_theta=10000.0, embedding_multiplier=1.7, residual_multiplier=0.6, attention_multiplier=0.3,
             logits_scaling=2.5, tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
             eos_token_id=2),
        dict(vocab_size=89, hidden_size=32, intermediate_size=16, shared_intermediate_size=40, num_hidden_layers=3,
             layer_types=["attention", "mamba", "mamba"], num_attention_heads=4, num_key_value_heads=1,
             num_local_experts=0, num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head="auto", mamba_n_groups=2,
             mamba_d_state=8, mamba_d_conv=3, mamba_expand=2, mamba_chunk_size=4, position_embedding_type=None,
             attention_bias=True, mamba_proj_bias=True, embedding_multiplier=3.0, residual_multiplier=0.4,
             attention_multiplier=0.2, logits_scaling=1.5, tie_word_embeddings=True, rms_norm_eps=1e-6,
             pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
}


def tiny_config_kwargs(model_type: str, variant: int = 0, **overrides) -> dict:
    """A copy of TINY_CONFIGS[model_type][variant] with `overrides` applied."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny configs for model_type {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    kwargs = {k: (list(v) if isinstance(v, list) else v) for k, v in TINY_CONFIGS[model_type][variant].items()}
    kwargs.update(overrides)
    return kwargs


def _is_norm_weight(name: str, t: torch.Tensor) -> bool:
    *_, module, leaf = ["", *name.split(".")]
    return t.ndim == 1 and leaf == "weight" and ("norm" in module or module.startswith("ln"))


@torch.no_grad()
def randomize_hf_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every floating parameter and persistent floating buffer of `model` in place; returns `model`.

    Matrices (and stacked expert matrices [E, out, in]) ~ N(0, 1/fan_in), fan_in their last axis, so each
    projection keeps O(1) activations; the input embedding ~ N(0, 1), or N(0, 1/d) when the LM head shares it.
    Norm weights 1 + 0.1 N; biases (and any other vector, router correction biases included) 0.1 N; depthwise
    conv kernels 0.4 N. Mamba: A = -exp(A_log) ~ -U(1, 16), softplus(dt_bias) ~ 0.05 * exp(0.5 N), D ~ 1 + 0.2 N.
    """
    gen = torch.Generator().manual_seed(seed)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    heads = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embeddings is not None and heads is not None and heads.weight is embeddings.weight
    persistent = set(model.state_dict())
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in persistent]
    for name, t in tensors:
        if not torch.is_floating_point(t):
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            value = torch.log(1 + 15 * torch.rand(t.shape, generator=gen))
        elif leaf == "dt_bias":
            value = math.log(math.expm1(0.05)) + 0.5 * noise
        elif leaf == "D":
            value = 1.0 + 0.2 * noise
        elif _is_norm_weight(name, t):
            value = 1.0 + 0.1 * noise
        elif "conv1d" in name and t.ndim == 3:
            value = 0.4 * noise
        elif embeddings is not None and t is embeddings.weight:
            value = noise / math.sqrt(t.shape[-1]) if tied else noise  # tied: it is the LM head too
        elif t.ndim >= 2:
            value = noise / math.sqrt(t.shape[-1])
        else:
            value = 0.1 * noise
        t.copy_(value.to(t.dtype))
    return model


def random_hf_model(model_type: str, seed: int = 0, variant: int = 0, **config_overrides) -> torch.nn.Module:
    """An HF `*ForCausalLM` of `model_type` from its tiny config (`variant`, with `config_overrides`), in float32
    eval mode with eager attention (and eager experts where the model has experts), every weight random."""
    config = transformers.AutoConfig.for_model(model_type, **tiny_config_kwargs(model_type, variant,
                                                                                   **config_overrides))
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": "eager"}
    model_class = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    if getattr(model_class, "_can_set_experts_implementation", lambda: False)():
        kwargs["experts_implementation"] = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs).eval()
    return randomize_hf_(model, seed + 1)


@torch.no_grad()
def hf_forward(model: torch.nn.Module, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """Logits [b, l, v] (float32 numpy) of one cache-free forward pass over token ids [b, l]."""
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask)).long()
    if position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids)).long()
    out = model(torch.from_numpy(np.asarray(ids)).long(), use_cache=False, **kwargs)
    return out.logits.float().numpy()
