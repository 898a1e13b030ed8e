"""Granite-4.0-H (IBM's Mamba-2 + attention hybrid with experts): its backbone, causal LM, key table and family
record. The layer is Bamba's (`easymamba.models.bamba.HybridDecoderLayer`), parameterised by the config.

Hugging Face counterpart: `transformers.models.granitemoehybrid.modeling_granitemoehybrid` (5.25). What differs
from Bamba, all read from `GraniteMoeHybridConfig`:

    h0 = embed_tokens(ids) * embedding_multiplier          (Backbone, the config's `embedding_multiplier`)
    each branch is added as residual + branch * residual_multiplier
    feed-forward = block_sparse_moe(y) + shared_mlp(y)     (MoE: softmax over the top-k router logits, gated
                   or shared_mlp(y) alone without experts    experts; its shared MLP is `shared_mlp`)
    attention scale `attention_multiplier`; rotary over the whole head or no positional encoding at all
    logits = lm_head(h) / logits_scaling                   (CausalLM, the config's `logits_multiplier`)

Checkpoint names (transformers' `save_pretrained`, which renames the experts on the way out) and the modules
here:

    model.embed_tokens.weight                              backbone.embeddings.weight
    model.layers.{i}.input_layernorm.weight                backbone.layers.{i}.input_layernorm.weight
    model.layers.{i}.post_attention_layernorm.weight       backbone.layers.{i}.pre_ff_layernorm.weight
    model.layers.{i}.block_sparse_moe.router.layer.weight  ...feed_forward.gate.kernel           [E, d] / (d, E)
    model.layers.{i}.block_sparse_moe.input_linear.weight  ...feed_forward.experts.{gate,up}_proj
                                                           [E, 2I, d] rows [gate | up] / (E, d, I) each
    model.layers.{i}.block_sparse_moe.output_linear.weight ...feed_forward.experts.down_proj     [E, d, I] / (E, I, d)
    model.layers.{i}.shared_mlp.input_linear.weight        ...{gate,up}_proj.kernel   [2S, d] rows [gate | up]
    model.layers.{i}.shared_mlp.output_linear.weight       ...down_proj.kernel        [d, S]
                                                           (under feed_forward.shared_experts with experts,
                                                           feed_forward without)
    model.layers.{i}.mamba.* | self_attn.*                 backbone.layers.{i}.mixer.*
    model.norm.weight                                      backbone.norm_f.weight
    lm_head.weight (absent when tied)                      lm_head.kernel
"""

from easymamba.config.granitemoehybrid import GraniteMoeHybridConfig
from easymamba.caching import HybridCache, HybridCacheMetaData
from easymamba.models.bamba import (
    HYBRID_EFFECTIVE_ATTENTION,
    HybridDecoderLayer,
    hybrid_mixer_facts,
    hybrid_mixer_keys,
    hybrid_sharding_units,
)
from easymamba.models.causal_lm import Backbone, CausalLM
from easymamba.models.family import KeySpec, ModelFamily, packed_key

__all__ = ["GraniteMoeHybridModel", "GraniteMoeHybridForCausalLM", "granitemoehybrid_key_table", "FAMILY"]


class GraniteMoeHybridModel(Backbone):
    """Embeddings (times `embedding_multiplier`), the `layer_types` layers and the final norm (HF
    `GraniteMoeHybridModel`)."""


class GraniteMoeHybridForCausalLM(CausalLM):
    """Granite-4.0-H language model (HF `GraniteMoeHybridForCausalLM`): `model(input_ids, attention_mask=, cache=,
    labels=, inputs_embeds=, output_hidden_states=, position_ids=)` as HF, logits divided by `logits_scaling`;
    `model.step(tokens, cache)` is one decode step. `init_cache(batch, max_length=...)` preallocates the attention
    layers' key/value slots."""


def granitemoehybrid_key_table(config: GraniteMoeHybridConfig) -> list[KeySpec]:
    """Every tensor of a `GraniteMoeHybridForCausalLM` under the names transformers' `save_pretrained` writes
    (the module docstring's table), in its `state_dict()` order."""
    table = [KeySpec("model.embed_tokens.weight", ("backbone", "embeddings", "weight"), "copy")]
    moe = config.moe_config
    s = config.mlp_config.intermediate_size
    for i, kind in enumerate(config.layer_types):
        hf = f"model.layers.{i}."
        at = ("backbone", "layers", i)
        ff = at + ("feed_forward",)
        table.append(KeySpec(hf + "input_layernorm.weight", at + ("input_layernorm", "weight"), "copy"))
        table.append(KeySpec(hf + "post_attention_layernorm.weight", at + ("pre_ff_layernorm", "weight"), "copy"))
        shared = ff
        if moe is not None:
            experts = ff + ("experts",)
            f = moe.expert_intermediate_size
            table.append(KeySpec(hf + "block_sparse_moe.router.layer.weight", ff + ("gate", "kernel"), "linear"))
            table.append(KeySpec(hf + "block_sparse_moe.input_linear.weight", (), "stacked_linear",
                                 ((experts + ("gate_proj",), f), (experts + ("up_proj",), f))))
            table.append(KeySpec(hf + "block_sparse_moe.output_linear.weight", experts + ("down_proj",),
                                 "stacked_linear"))
            shared = ff + ("shared_experts",)
        table.append(packed_key(hf + "shared_mlp.input_linear.weight", "linear", shared, "kernel",
                                {"gate_proj": s, "up_proj": s}))
        table.append(KeySpec(hf + "shared_mlp.output_linear.weight", shared + ("down_proj", "kernel"), "linear"))
        table += hybrid_mixer_keys(config, kind, hf, at)
    table.append(KeySpec("model.norm.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return table


FAMILY = ModelFamily(
    model_type="granitemoehybrid",
    config_class=GraniteMoeHybridConfig,
    causal_lm=GraniteMoeHybridForCausalLM,
    backbone=GraniteMoeHybridModel,
    blocks=lambda config: [HybridDecoderLayer] * config.num_hidden_layers,
    cache_class=HybridCache,
    cache_metadata=HybridCacheMetaData,
    key_table=granitemoehybrid_key_table,
    mixer_facts=hybrid_mixer_facts,
    sharding_units=hybrid_sharding_units,
    effective_attention=HYBRID_EFFECTIVE_ATTENTION,
    hidden_states_with_embeddings=True,
    embedding_multiplier=lambda config: config.embedding_multiplier,
    logits_multiplier=lambda config: config.logits_multiplier,   # 1 / logits_scaling
    multiplies_inputs_embeds=True,
)
