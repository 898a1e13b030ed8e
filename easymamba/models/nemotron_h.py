"""Nemotron-H (NVIDIA Nemotron-H / Nemotron-3 hybrids): the blocks, backbone, causal LM and the family's record.

Hugging Face counterpart: `transformers.models.nemotron_h.modeling_nemotron_h` (5.25), whose module names these
keep (checkpoints map one to one):

    NemotronHForCausalLM
      backbone: NemotronHModel
        embeddings: Embedding [v, d]
        layers[i]: one block per `layers_block_type` entry, each `h + mixer(norm(h))`:
          "linear_attention"  mixer: Mamba2Mixer (Mamba-2, grouped gated norm)
          "full_attention"    mixer: Attention (GQA, no positional encoding)
          "mlp"               mixer: MLP (up, relu2, down)
          "moe"               mixer: MoE (sigmoid grouped router with correction bias, relu2 experts, shared expert)
        norm_f: RMSNorm [d]
      lm_head: Linear [d, v]   (always its own: transformers 5.25 never ties it, whatever tie_word_embeddings)

The residual is carried in the model dtype (transformers' block ignores `residual_in_fp32`). The cache holds a
Mamba-2 view for each Mamba layer, a key/value view for each attention layer and nothing for the MLP and MoE
layers (`easymamba.caching.HybridCache`).
"""


from easymamba.caching import HybridCache, HybridCacheMetaData
from easymamba.config.nemotron_h import NemotronHConfig
from easymamba.models.attention import Attention
from easymamba.models.causal_lm import Backbone, CausalLM, ResidualBlock
from easymamba.models.family import EffectiveAttention, KeySpec, ModelFamily, linear_keys
from easymamba.models.mamba2 import mamba2_mixer_keys, mamba2_operands
from easymamba.models.mamba2_mixer import Mamba2Mixer
from easymamba.models.mlp import MLP, MoE

__all__ = ["NemotronHMambaBlock", "NemotronHAttentionBlock", "NemotronHMLPBlock", "NemotronHMoEBlock",
           "NemotronHModel", "NemotronHForCausalLM", "nemotron_h_key_table", "FAMILY"]


class _NemotronHBlock(ResidualBlock):
    """`h + mixer(norm(h))`, the residual in the model dtype (HF `NemotronHBlock`)."""

    PART: str

    def __init__(self, config: NemotronHConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.residual_in_fp32 = False

    @classmethod
    def mixer_config(cls, config: NemotronHConfig):
        return getattr(config, cls.PART)


class NemotronHMambaBlock(_NemotronHBlock):
    MIXER = Mamba2Mixer
    PART = "mixer_config"


class NemotronHAttentionBlock(_NemotronHBlock):
    MIXER = Attention
    PART = "attention_config"


class NemotronHMLPBlock(_NemotronHBlock):
    MIXER = MLP
    PART = "mlp_config"


class NemotronHMoEBlock(_NemotronHBlock):
    MIXER = MoE
    PART = "moe_config"


BLOCKS = {"linear_attention": NemotronHMambaBlock, "full_attention": NemotronHAttentionBlock,
          "mlp": NemotronHMLPBlock, "moe": NemotronHMoEBlock}


class NemotronHModel(Backbone):
    """Embeddings, the `layers_block_type` blocks and the final norm (HF `NemotronHModel`)."""


class NemotronHForCausalLM(CausalLM):
    """Nemotron-H language model (HF `NemotronHForCausalLM`): `model(input_ids, attention_mask=, cache=, labels=,
    inputs_embeds=, output_hidden_states=, position_ids=)` as HF; `model.step(tokens, cache)` is one decode step.
    `init_cache(batch, max_length=...)` preallocates the attention layers' key/value slots."""



def nemotron_h_key_table(config: NemotronHConfig) -> list[KeySpec]:
    """Every tensor of a `NemotronHForCausalLM` under the names transformers' `save_pretrained` writes (experts
    one tensor each, `experts.{j}.up_proj.weight`), layer by layer."""
    table = [KeySpec("backbone.embeddings.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i, kind in enumerate(config.layers_block_type):
        hf = f"backbone.layers.{i}."
        at = ("backbone", "layers", i)
        mixer = at + ("mixer",)
        table.append(KeySpec(hf + "norm.weight", at + ("norm", "weight"), "copy"))
        if kind == "linear_attention":
            table += mamba2_mixer_keys(config.mixer_config, hf + "mixer.", mixer)
        elif kind == "full_attention":
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                table += linear_keys(hf + "mixer." + name, mixer + (name,), False)
        elif kind == "mlp":
            for name in ("up_proj", "down_proj"):
                table += linear_keys(hf + "mixer." + name, mixer + (name,), config.mlp_bias)
        else:
            table.append(KeySpec(hf + "mixer.gate.weight", mixer + ("gate", "kernel"), "linear"))
            table.append(KeySpec(hf + "mixer.gate.e_score_correction_bias", mixer + ("e_score_correction_bias",),
                                 "copy"))
            for j in range(config.n_routed_experts):
                for name in ("up_proj", "down_proj"):
                    table.append(KeySpec(f"{hf}mixer.experts.{j}.{name}.weight", mixer + ("experts", name),
                                         "linear", index=j))
            for name in ("up_proj", "down_proj"):
                table += linear_keys(hf + "mixer.shared_experts." + name, mixer + ("shared_experts", name),
                                 config.mlp_bias)
            if config.moe_latent_size is not None:
                for name in ("fc1_latent_proj", "fc2_latent_proj"):
                    table += linear_keys(hf + "mixer." + name, mixer + (name,), config.mlp_bias)
    table.append(KeySpec("backbone.norm_f.weight", ("backbone", "norm_f", "weight"), "copy"))
    table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))  # never tied (`ties_lm_head`)
    return table


def nemotron_h_mixer_facts(config: NemotronHConfig, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, config value, tensor, implied value) for each size the first Mamba-2 layer's tensors contradict."""
    out = []
    if "linear_attention" not in config.layers_block_type:
        return out
    i = config.layers_block_type.index("linear_attention")
    mixer = f"backbone.layers.{i}.mixer."
    a_log = shape_of(mixer + "A_log")
    if a_log is not None and len(a_log) == 1 and a_log[0] != config.mamba_num_heads:
        out.append(("mamba_num_heads", config.mamba_num_heads, mixer + "A_log", a_log[0]))
    conv = shape_of(mixer + "conv1d.weight")
    if conv is not None and len(conv) == 3 and conv[2] != config.conv_kernel:
        out.append(("conv_kernel", config.conv_kernel, mixer + "conv1d.weight", conv[2]))
    return out


def nemotron_h_sharding_units(config: NemotronHConfig) -> dict[str, int]:
    return {"heads": config.mamba_num_heads, "groups": config.n_groups, "vocab": config.vocab_size,
            "embed": config.hidden_size, "attn_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "mlp": config.intermediate_size,
            "experts": config.n_routed_experts}


FAMILY = ModelFamily(
    model_type="nemotron_h",
    config_class=NemotronHConfig,
    causal_lm=NemotronHForCausalLM,
    backbone=NemotronHModel,
    blocks=lambda config: [BLOCKS[kind] for kind in config.layers_block_type],
    cache_class=HybridCache,
    cache_metadata=HybridCacheMetaData,
    key_table=nemotron_h_key_table,
    mixer_facts=nemotron_h_mixer_facts,
    sharding_units=nemotron_h_sharding_units,
    effective_attention=EffectiveAttention(Mamba2Mixer, ("hook_conv", "hook_dt"), "heads (h)",
                                           lambda cfg: cfg.mixer_config.num_heads,
                                           lambda cfg, *args: mamba2_operands(cfg.mixer_config, *args)),
    hidden_states_with_embeddings=True,
    # multi-token-prediction layers: loaded and written back as they are (transformers 5.25 drops them on load)
    carried_prefixes=lambda config: ("mtp.",) if config.num_nextn_predict_layers > 0 else (),
)

