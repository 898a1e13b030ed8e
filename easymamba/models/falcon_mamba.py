"""Falcon-Mamba: the mixer, block, backbone and causal LM (HF `FalconMambaMixer`, `FalconMambaBlock`,
`FalconMambaModel`, `FalconMambaForCausalLM`) and the family's record.

Falcon-Mamba (TII, "Falcon Mamba: The First Competitive Attention-free 7B Language Model", 2024) is Mamba-1 with
one change inside each mixer: x_proj's outputs dt_low_rank (r), B (n) and C (n) are each RMS-normalised over
their own last axis, with eps `mixer_rms_eps` and no weight, before dt_proj and the selective scan (HF's
`FalconMambaWeightlessRMSNorm`: in float32, rounded back to x_proj's dtype; its all-ones `weight` buffers are not
persistent, so no checkpoint holds them). Everything else, the parameter names and the checkpoint layout, the
cache states, `output_hidden_states`' order (the outputs of blocks 0 to n-1, then the final norm of block n-1's
output) and the sharding, is Mamba-1's (`easymamba.models.mamba1`), reused here.

    FalconMambaForCausalLM
      backbone: FalconMambaModel
        embeddings: Embedding [v, d]
        layers[i]: FalconMambaBlock
          norm: RMSNorm [d]
          mixer: FalconMambaMixer (a MambaMixer with bcdt_rms_eps = mixer_rms_eps)
        norm_f: RMSNorm [d]
      lm_head: Linear [d, v]   (absent when tie_word_embeddings: the embedding matrix is reused)

The cache is `FalconMambaCache` (Mamba-1's states under model_type "falcon_mamba"). The decode step is the
mixer's op-by-op `step`, the norms included (Mamba-1 has no fused decode kernel). Hook points: Mamba-1's
(`hook_x_proj` records x_proj's output before the norms; `hook_dt` the scan's step size after them).
"""

import jax.numpy as jnp

from easymamba.caching.mamba1 import FalconMambaCache, FalconMambaCacheMetaData
from easymamba.config import FalconMambaConfig
from easymamba.models.causal_lm import Backbone, CausalLM, ResidualBlock
from easymamba.models.family import EffectiveAttention, KeySpec, ModelFamily, Operands
from easymamba.models.mamba1 import mamba1_key_table, mamba1_mixer_facts, mamba1_sharding_units
from easymamba.models.mamba1_mixer import MambaMixer, weightless_rms_norm

__all__ = ["FalconMambaMixer", "FalconMambaBlock", "FalconMambaModel", "FalconMambaForCausalLM",
           "falcon_mamba_key_table", "FAMILY"]


class FalconMambaMixer(MambaMixer):
    """`MambaMixer` with the dt / B / C norms on, their eps the config's `mixer_rms_eps` (HF `FalconMambaMixer`).
    Same parameters, hooks, shapes and calls as `MambaMixer`."""

    def __init__(self, config: FalconMambaConfig, **kwargs):
        if not isinstance(config, FalconMambaConfig):
            raise TypeError(f"FalconMambaMixer needs a FalconMambaConfig, got {type(config).__name__}")
        super().__init__(config, bcdt_rms_eps=config.mixer_rms_eps, **kwargs)


class FalconMambaBlock(ResidualBlock):
    """Pre-norm residual block around a `FalconMambaMixer`: `h + mixer(norm(h))`, the residual in float32 if
    `residual_in_fp32`. Hook point: `hook_resid_post` (b, l, d), the block output."""

    MIXER = FalconMambaMixer


class FalconMambaModel(Backbone):
    """Embeddings, `num_hidden_layers` Falcon-Mamba blocks and the final norm (HF `FalconMambaModel`).

    Hook point: `hook_embed` (b, l, d), the embeddings (or `inputs_embeds`) entering layer 0.
    """


class FalconMambaForCausalLM(CausalLM):
    """Falcon-Mamba language model (HF `FalconMambaForCausalLM`): backbone + tied (the default) or untied head.

    Called like `MambaForCausalLM` and returns the same `Mamba2CausalLMOutput` (logits float32, loss with HF's
    shift and -100 ignore index, the new `FalconMambaCache`, hidden states on request: `num_hidden_layers + 1`
    arrays (b, l, d), the outputs of blocks 0 to n-1 and then the final norm of block n-1's output, as
    transformers 5.25 returns them).
    """


def falcon_mamba_key_table(config: FalconMambaConfig) -> list[KeySpec]:
    """Every tensor a `FalconMambaForCausalLM` has, in the order of HF's `state_dict()`: Mamba-1's table (the
    norms of dt, B and C have no weights in a checkpoint)."""
    return mamba1_key_table(config)


def falcon_mamba_operands(cfg: FalconMambaConfig, x_proj, dt, A) -> Operands:
    """The effective attention's operands from hook_x_proj (b, l, r + 2n) = [dt_low_rank | B | C] before the
    norms, hook_dt (b, l, e), A (e, n): B and C normalised as the mixer normalises them (in float32, rounded to
    x_proj's dtype), then taken to the scan's compute dtype; one group, e decay channels."""
    r, n = cfg.resolved_time_step_rank, cfg.state_size
    dtype = jnp.promote_types(x_proj.dtype, jnp.float32)            # the selective scan's compute dtype
    B = weightless_rms_norm(x_proj[..., r:r + n], cfg.mixer_rms_eps)[..., None, :].astype(dtype)    # (b, l, 1, n)
    C = weightless_rms_norm(x_proj[..., r + n:], cfg.mixer_rms_eps)[..., None, :].astype(dtype)     # (b, l, 1, n)
    return Operands(dt.astype(dtype), A.astype(dtype), B, C)


FAMILY = ModelFamily(
    model_type="falcon_mamba",
    config_class=FalconMambaConfig,
    causal_lm=FalconMambaForCausalLM,
    backbone=FalconMambaModel,
    blocks=lambda config: [FalconMambaBlock] * config.num_hidden_layers,
    cache_class=FalconMambaCache,
    cache_metadata=FalconMambaCacheMetaData,
    key_table=falcon_mamba_key_table,
    mixer_facts=mamba1_mixer_facts,
    sharding_units=mamba1_sharding_units,
    effective_attention=EffectiveAttention(FalconMambaMixer, ("hook_x_proj", "hook_dt"), "inner channels (e)",
                                           lambda cfg: cfg.intermediate_size, falcon_mamba_operands),
)
