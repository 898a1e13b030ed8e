"""Mamba-2: the block, backbone and causal LM (HF `Mamba2Block`, `Mamba2Model`, `Mamba2ForCausalLM`) and the
family's record (key table, checkpoint checks, sharding table, effective-attention operands).

Official implementation: `mamba_ssm/models/mixer_seq_simple.py` and `mamba_ssm/modules/mamba2.py`; module and
parameter names follow Hugging Face so checkpoints map one to one:

    Mamba2ForCausalLM
      backbone: Mamba2Model
        embeddings: Embedding [v, d]
        layers[i]: Mamba2Block
          norm: RMSNorm [d]
          mixer: Mamba2Mixer (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj)
        norm_f: RMSNorm [d]
      lm_head: Linear [d, v]   (absent when tie_word_embeddings: the embedding matrix is reused)
"""

import jax.numpy as jnp

from easymamba.caching import Mamba2Cache, Mamba2CacheMetaData
from easymamba.config import Mamba2Config
from easymamba.models.causal_lm import Backbone, CausalLM, ResidualBlock
from easymamba.models.family import EffectiveAttention, KeySpec, ModelFamily, Operands, packed_key
from easymamba.models.mamba2_mixer import Mamba2Mixer

__all__ = ["Mamba2Block", "Mamba2Model", "Mamba2ForCausalLM", "mamba2_key_table", "mamba2_mixer_keys", "FAMILY"]


class Mamba2Block(ResidualBlock):
    """Pre-norm residual block around a `Mamba2Mixer`: `h + mixer(norm(h))`, the residual in float32 if
    `residual_in_fp32`. Hook point: `hook_resid_post` (b, l, d), the block output."""

    MIXER = Mamba2Mixer


class Mamba2Model(Backbone):
    """Embeddings, `num_hidden_layers` Mamba-2 blocks and the final norm (HF `Mamba2Model`).

    Hook point: `hook_embed` (b, l, d), the embeddings (or `inputs_embeds`) entering layer 0.
    """


class Mamba2ForCausalLM(CausalLM):
    """Mamba-2 language model (HF `Mamba2ForCausalLM`): backbone + tied or untied output head.

    `model(input_ids, attention_mask=, cache=, labels=, inputs_embeds=, output_hidden_states=)` as HF;
    `model.step(tokens, cache)` is one decode step (`easymamba.models.causal_lm.CausalLM`).

    `output_hidden_states=True` returns `num_hidden_layers + 1` arrays (b, l, d), as transformers 5.25's
    generic output capture does: the embeddings, blocks 0..n-2's outputs, then norm_f(block n-1's output); the
    last block's raw output is not included.
    """


def mamba2_mixer_keys(config, hf: str, mixer: tuple) -> list[KeySpec]:
    """One Mamba-2 mixer's tensors: HF names under `hf` ("backbone.layers.3.mixer."), module path `mixer`.
    `config` is a `Mamba2Config` or a hybrid's `Mamba2MixerConfig`. HF packs in_proj as [z | x | B | C | dt] and
    conv1d as [x | B | C]; the model keeps those parts apart (`KeySpec.parts`)."""
    e, h, gn = config.intermediate_size, config.num_heads, config.n_groups * config.state_size
    in_parts = {"z": e, "x": e, "B": gn, "C": gn, "dt": h}
    conv_parts = {"x": e, "B": gn, "C": gn}
    table = [packed_key(hf + "in_proj.weight", "linear", mixer + ("in_proj",), "kernel", in_parts)]
    if config.use_bias:
        table.append(packed_key(hf + "in_proj.bias", "copy", mixer + ("in_proj",), "bias", in_parts))
    table.append(packed_key(hf + "conv1d.weight", "conv", mixer + ("conv1d",), "weight", conv_parts))
    if config.use_conv_bias:
        table.append(packed_key(hf + "conv1d.bias", "copy", mixer + ("conv1d",), "bias", conv_parts))
    for name in ("dt_bias", "A_log", "D"):
        table.append(KeySpec(hf + name, mixer + (name,), "copy"))
    if getattr(config, "gated_norm", True):
        table.append(KeySpec(hf + "norm.weight", mixer + ("norm", "weight"), "copy"))
    table.append(KeySpec(hf + "out_proj.weight", mixer + ("out_proj", "kernel"), "linear"))
    out_proj_bias = getattr(config, "out_proj_bias", None)  # Mamba2MixerConfig's (Falcon-H1: projectors_bias)
    if config.use_bias if out_proj_bias is None else out_proj_bias:
        table.append(KeySpec(hf + "out_proj.bias", mixer + ("out_proj", "bias"), "copy"))
    return table


def mamba2_key_table(config: Mamba2Config) -> list[KeySpec]:
    """Every tensor a `Mamba2ForCausalLM` with this config has, in HF's naming and order."""
    table = [KeySpec("backbone.embeddings.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i in range(config.num_hidden_layers):
        hf = f"backbone.layers.{i}."
        at = ("backbone", "layers", i)
        table.append(KeySpec(hf + "norm.weight", at + ("norm", "weight"), "copy"))
        table += mamba2_mixer_keys(config, hf + "mixer.", at + ("mixer",))
    table.append(KeySpec("backbone.norm_f.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return table


def mamba2_mixer_facts(config: Mamba2Config, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, the config's value, tensor, the value its shape implies) for each Mamba-2 mixer size the
    layer-0 tensors contradict."""
    out = []
    mixer = "backbone.layers.0.mixer."
    a_log = shape_of(mixer + "A_log")                                   # [h]
    if a_log is not None and len(a_log) == 1 and a_log[0] != config.num_heads:
        out.append(("num_heads", config.num_heads, mixer + "A_log", a_log[0]))
    norm = shape_of(mixer + "norm.weight")                              # [e]
    if norm is not None and len(norm) == 1 and norm[0] != config.intermediate_size:
        out.append(("expand * hidden_size", config.intermediate_size, mixer + "norm.weight", norm[0]))
    conv = shape_of(mixer + "conv1d.weight")                            # [e + 2gn, 1, k]
    if conv is not None and len(conv) == 3:
        if conv[2] != config.conv_kernel:
            out.append(("conv_kernel", config.conv_kernel, mixer + "conv1d.weight", conv[2]))
        gn = config.n_groups * config.state_size
        if norm is not None and len(norm) == 1 and conv[0] != norm[0] + 2 * gn:
            out.append(("n_groups * state_size", gn, mixer + "conv1d.weight", f"({conv[0]} - {norm[0]}) / 2"))
    return out


def mamba2_operands(cfg: Mamba2Config, conv, dt, A) -> Operands:
    """The effective attention's operands from hook_conv (b, l, c) = [x | B | C], hook_dt (b, l, h), A (h,)."""
    b, l, _ = conv.shape
    e, g, n = cfg.intermediate_size, cfg.n_groups, cfg.state_size
    dtype = jnp.promote_types(conv.dtype, jnp.float32)
    B = conv[..., e:e + g * n].astype(dtype).reshape(b, l, g, n)    # (b, l, g, n)
    C = conv[..., e + g * n:].astype(dtype).reshape(b, l, g, n)     # (b, l, g, n)
    return Operands(dt.astype(dtype), A.astype(dtype), B, C)


def mamba2_sharding_units(config: Mamba2Config) -> dict[str, int]:
    """How many units each logical axis has, for the divisibility rules: e shards in whole heads."""
    return {"heads": config.num_heads, "groups": config.n_groups, "vocab": config.vocab_size,
            "embed": config.hidden_size}


FAMILY = ModelFamily(
    model_type="mamba2",
    config_class=Mamba2Config,
    causal_lm=Mamba2ForCausalLM,
    backbone=Mamba2Model,
    blocks=lambda config: [Mamba2Block] * config.num_hidden_layers,
    cache_class=Mamba2Cache,
    cache_metadata=Mamba2CacheMetaData,
    key_table=mamba2_key_table,
    mixer_facts=mamba2_mixer_facts,
    sharding_units=mamba2_sharding_units,
    effective_attention=EffectiveAttention(Mamba2Mixer, ("hook_conv", "hook_dt"), "heads (h)",
                                           lambda cfg: cfg.num_heads, mamba2_operands),
    hidden_states_with_embeddings=True,  # transformers >= 5.25
)
