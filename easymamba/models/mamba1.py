"""Mamba-1: the block, backbone and causal LM (HF `MambaBlock`, `MambaModel`, `MambaForCausalLM`) and the family's
record (key table, checkpoint checks, sharding table, effective-attention operands).

    MambaForCausalLM
      backbone: MambaModel
        embeddings: Embedding [v, d]
        layers[i]: MambaBlock
          norm: RMSNorm [d]
          mixer: MambaMixer (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj)
        norm_f: RMSNorm [d]
      lm_head: Linear [d, v]   (absent when tie_word_embeddings: the embedding matrix is reused)

The cache is `MambaCache` (conv state `[b, e, k]`, SSM state `[b, e, n]`; a sharded model's cache puts rows over
`batch` and e over `heads`). Hook points: `hook_embed`, per layer `hook_resid_post` and the mixer's
`hook_in_proj`, `hook_conv`, `hook_x_proj`, `hook_dt`, `hook_ssm_out`, `hook_gated`, `hook_out_proj`.
"""

import jax.numpy as jnp

from easymamba.caching.mamba1 import MambaCache, MambaCacheMetaData
from easymamba.config import MambaConfig
from easymamba.models.causal_lm import Backbone, CausalLM, ResidualBlock
from easymamba.models.family import EffectiveAttention, KeySpec, ModelFamily, Operands
from easymamba.models.mamba1_mixer import MambaMixer

__all__ = ["MambaBlock", "MambaModel", "MambaForCausalLM", "mamba1_key_table", "FAMILY"]


class MambaBlock(ResidualBlock):
    """Pre-norm residual block around a `MambaMixer`: `h + mixer(norm(h))`, the residual in float32 if
    `residual_in_fp32`. Hook point: `hook_resid_post` (b, l, d), the block output."""

    MIXER = MambaMixer


class MambaModel(Backbone):
    """Embeddings, `num_hidden_layers` Mamba-1 blocks and the final norm (HF `MambaModel`). Returns
    `Mamba2Output`.

    Hook point: `hook_embed` (b, l, d), the embeddings (or `inputs_embeds`) entering layer 0.
    """


class MambaForCausalLM(CausalLM):
    """Mamba-1 language model (HF `MambaForCausalLM`): backbone + tied (the default) or untied output head.

    Called like `Mamba2ForCausalLM` and returns the same `Mamba2CausalLMOutput` (logits float32, loss with
    HF's shift and -100 ignore index, the new `MambaCache`, hidden states on request).

    `output_hidden_states=True` returns `num_hidden_layers + 1` arrays (b, l, d), as transformers 5.25's
    `MambaForCausalLM` does, in an order unlike Mamba-2's: the outputs of blocks 0 to n-1, then the final norm
    applied to block n-1's output (no embeddings).
    """


def mamba1_key_table(config: MambaConfig) -> list[KeySpec]:
    """Every tensor a `MambaForCausalLM` with this config has, in the order of HF's `state_dict()`. Mamba-1 keeps
    HF's tensors whole (no packed parts). A tied model has no `lm_head.weight` (HF's state dict repeats the
    embedding there)."""
    table = [("backbone.embeddings.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i in range(config.num_hidden_layers):
        hf, at = f"backbone.layers.{i}.", ("backbone", "layers", i)
        mixer, m = hf + "mixer.", at + ("mixer",)
        table.append((hf + "norm.weight", at + ("norm", "weight"), "copy"))
        table.append((mixer + "A_log", m + ("A_log",), "copy"))
        table.append((mixer + "D", m + ("D",), "copy"))
        table.append((mixer + "conv1d.weight", m + ("conv1d", "weight"), "conv"))
        if config.use_conv_bias:
            table.append((mixer + "conv1d.bias", m + ("conv1d", "bias"), "copy"))
        table.append((mixer + "in_proj.weight", m + ("in_proj", "kernel"), "linear"))
        if config.use_bias:
            table.append((mixer + "in_proj.bias", m + ("in_proj", "bias"), "copy"))
        table.append((mixer + "x_proj.weight", m + ("x_proj", "kernel"), "linear"))
        table.append((mixer + "dt_proj.weight", m + ("dt_proj", "kernel"), "linear"))
        table.append((mixer + "dt_proj.bias", m + ("dt_proj", "bias"), "copy"))
        table.append((mixer + "out_proj.weight", m + ("out_proj", "kernel"), "linear"))
        if config.use_bias:
            table.append((mixer + "out_proj.bias", m + ("out_proj", "bias"), "copy"))
    table.append(("backbone.norm_f.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return [KeySpec(*entry) for entry in table]


def mamba1_mixer_facts(config: MambaConfig, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, the config's value, tensor, the value its shape implies) for each Mamba-1 mixer size the layer-0
    tensors contradict: A_log [e, n], conv1d [e, 1, k], x_proj [r + 2n, e]."""
    out = []
    mixer = "backbone.layers.0.mixer."
    a_log = shape_of(mixer + "A_log")
    if a_log is not None and len(a_log) == 2:
        if a_log[0] != config.intermediate_size:
            out.append(("intermediate_size", config.intermediate_size, mixer + "A_log", a_log[0]))
        if a_log[1] != config.state_size:
            out.append(("state_size", config.state_size, mixer + "A_log", a_log[1]))
    conv = shape_of(mixer + "conv1d.weight")
    if conv is not None and len(conv) == 3 and conv[2] != config.conv_kernel:
        out.append(("conv_kernel", config.conv_kernel, mixer + "conv1d.weight", conv[2]))
    x_proj = shape_of(mixer + "x_proj.weight")
    if x_proj is not None and len(x_proj) == 2 and a_log is not None and len(a_log) == 2:
        rank = x_proj[0] - 2 * a_log[1]
        if rank != config.resolved_time_step_rank:
            out.append(("time_step_rank", config.resolved_time_step_rank, mixer + "x_proj.weight",
                        f"{x_proj[0]} - 2 * state_size = {rank}"))
    return out


def mamba1_operands(cfg: MambaConfig, x_proj, dt, A) -> Operands:
    """The effective attention's operands from hook_x_proj (b, l, r + 2n) = [dt_low_rank | B | C], hook_dt
    (b, l, e), A (e, n): one group, e decay channels."""
    r, n = cfg.resolved_time_step_rank, cfg.state_size
    dtype = jnp.promote_types(x_proj.dtype, jnp.float32)            # the selective scan's compute dtype
    B = x_proj[..., None, r:r + n].astype(dtype)                    # (b, l, 1, n)
    C = x_proj[..., None, r + n:].astype(dtype)                     # (b, l, 1, n)
    return Operands(dt.astype(dtype), A.astype(dtype), B, C)


def mamba1_sharding_units(config: MambaConfig) -> dict[str, int]:
    """How many units each logical axis has, for the divisibility rules: `heads` counts the inner channels e."""
    return {"heads": config.intermediate_size, "vocab": config.vocab_size, "embed": config.hidden_size}


FAMILY = ModelFamily(
    model_type="mamba",
    config_class=MambaConfig,
    causal_lm=MambaForCausalLM,
    backbone=MambaModel,
    blocks=lambda config: [MambaBlock] * config.num_hidden_layers,
    cache_class=MambaCache,
    cache_metadata=MambaCacheMetaData,
    key_table=mamba1_key_table,
    mixer_facts=mamba1_mixer_facts,
    sharding_units=mamba1_sharding_units,
    effective_attention=EffectiveAttention(MambaMixer, ("hook_x_proj", "hook_dt"), "inner channels (e)",
                                           lambda cfg: cfg.intermediate_size, mamba1_operands),
)
