"""Jamba (AI21's Mamba-1 + attention + mixture-of-experts hybrid): the blocks, backbone, causal LM and the family's
record.

Hugging Face counterpart: `transformers.models.jamba.modeling_jamba` (5.25). Each layer is a mixer and a
feed-forward part, each behind its own pre-norm residual (HF `JambaMambaDecoderLayer`,
`JambaAttentionDecoderLayer`):

    JambaForCausalLM                                          checkpoint names (HF)
      backbone: JambaModel                                    model.
        embeddings: Embedding [v, d]                          model.embed_tokens
        layers[i]: one block per (mixer, feed-forward) pair   model.layers.{i}.
          input_layernorm: RMSNorm [d]                        input_layernorm
          mixer: MambaMixer with weighted dt/B/C norms        mamba.    (dt_layernorm, b_layernorm, c_layernorm)
                 or Attention (GQA, no positional encoding)   self_attn.
          pre_ff_layernorm: RMSNorm [d]                       pre_ff_layernorm
          feed_forward: MLP (gated)                           feed_forward.{gate,up,down}_proj
                        or MoE (softmax router, gated experts) feed_forward.router, feed_forward.experts.{j}.*
        norm_f: RMSNorm [d]                                   model.final_layernorm
      lm_head: Linear [d, v]   (absent when tie_word_embeddings: the embedding matrix is reused)

    h = h + mixer(input_layernorm(h));  h = h + feed_forward(pre_ff_layernorm(h))     (residual in the model dtype)

The experts are stored stacked here ((E, d, f), run as grouped matmuls); transformers 5.25 keeps them stacked in
memory too (`gate_up_proj` [E, 2f, d], `down_proj` [E, d, f]) but its `save_pretrained` writes, and its loader
reads, one tensor per expert (`feed_forward.experts.{j}.gate_proj.weight` ...), which is the table below. The
router's weights are softmax(logits) of the top k experts, not renormalised; transformers computes the logits in
the model dtype, easymamba in float32 (the same in float32 models).

The cache holds a Mamba-1 view per Mamba layer and a key/value view per attention layer
(`easymamba.caching.HybridCache`). Hook points: the block's `hook_resid_mid` (after the mixer's residual) and
`hook_resid_post`, the parts' own (`easymamba.interp`), and the Mamba mixers' `hook_bc`, [B | C] after their
norms, which the effective attention reads.
"""

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from easymamba.caching import HybridCache, HybridCacheMetaData
from easymamba.config.jamba import JambaConfig
from easymamba.models.attention import Attention
from easymamba.models.causal_lm import Backbone, CausalLM
from easymamba.models.common import sow_hook
from easymamba.models.family import EffectiveAttention, KeySpec, ModelFamily, Operands, linear_keys
from easymamba.models.mamba1_mixer import MambaMixer
from easymamba.models.mlp import MLP, MoE
from easymamba.norms import RMSNorm
from easymamba.sharding import MeshRules

__all__ = ["JambaMambaMixer", "JambaBlock", "JambaMambaMLPBlock", "JambaMambaMoEBlock", "JambaAttentionMLPBlock",
           "JambaAttentionMoEBlock", "JambaModel", "JambaForCausalLM", "jamba_key_table", "FAMILY"]


class JambaMambaMixer(MambaMixer):
    """`MambaMixer` built from Jamba's `MambaMixerConfig` (dt / B / C norms with weights, eps `rms_norm_eps`), with
    one more hook point: `hook_bc` (b, l, 2n), [B | C] after the norms, as the selective scan reads them."""

    HOOKS = MambaMixer.HOOKS[:3] + ("hook_bc",) + MambaMixer.HOOKS[3:]


class JambaBlock(nnx.Module):
    """One Jamba layer: `h + mixer(input_layernorm(h))`, then `+ feed_forward(pre_ff_layernorm(h))`. A block kind
    names its mixer and feed-forward classes and the config records they are built from.

    Offers the block protocol of `easymamba.models.causal_lm.Backbone`: `__call__(hidden, attention_mask=, view=,
    position_ids=, embeddings=)`, `step(...)`, `decode_weights()`. The layer's view (or None) is the mixer's; the
    feed-forward part has no state. Hook points: `hook_resid_mid` (b, l, d) after the mixer's residual,
    `hook_resid_post` (b, l, d) the block output.
    """

    HOOKS = ("hook_resid_mid", "hook_resid_post")
    MIXER: ClassVar[type]
    MIXER_PART: ClassVar[str]
    FEED_FORWARD: ClassVar[type]
    FEED_FORWARD_PART: ClassVar[str]
    remat: bool = False  # as ResidualBlock.remat (easymamba.train turns it on)

    def __init__(self, config: JambaConfig, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto"):
        d, eps = config.hidden_size, config.rms_norm_eps
        parts = dict(layer_idx=layer_idx, rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_impl=kernel_impl)
        self.input_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.mixer = self.MIXER(getattr(config, self.MIXER_PART), **parts)
        self.pre_ff_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.feed_forward = self.FEED_FORWARD(getattr(config, self.FEED_FORWARD_PART), **parts)
        self.mesh_rules: MeshRules | None = None  # set by easymamba.sharding when the model is sharded

    def __call__(self, hidden, *, attention_mask=None, view=None, position_ids=None, embeddings=None):
        """hidden (b, l, d), the layer's view or None -> (hidden (b, l, d), the renewed view or None)."""
        del embeddings
        if self.remat:
            return nnx.remat(type(self)._forward)(self, hidden, attention_mask, view, position_ids)
        return self._forward(hidden, attention_mask, view, position_ids)

    def _forward(self, hidden, attention_mask, view, position_ids):
        out, view = self.mixer.run(self._norm(self.input_layernorm, hidden), view, attention_mask=attention_mask,
                                   position_ids=position_ids)
        return self._feed_forward(hidden + out), view

    def step(self, hidden, view, *, attention_mask=None, active_rows=None, decode_weights=None, position_ids=None,
             embeddings=None):
        """One token: hidden (b, 1, d), the layer's view -> (hidden (b, 1, d), the renewed view)."""
        del embeddings
        out, view = self.mixer.run_step(self._norm(self.input_layernorm, hidden), view,
                                        attention_mask=attention_mask, position_ids=position_ids,
                                        active_rows=active_rows, decode_weights=decode_weights)
        return self._feed_forward(hidden + out), view

    def decode_weights(self):
        return self.mixer.decode_weights()

    @staticmethod
    def _norm(norm, hidden):
        return norm(hidden.astype(norm.weight.dtype))

    def _feed_forward(self, hidden):
        sow_hook(self, "hook_resid_mid", hidden)
        hidden = hidden + self.feed_forward(self._norm(self.pre_ff_layernorm, hidden))
        sow_hook(self, "hook_resid_post", hidden)
        return hidden


class JambaMambaMLPBlock(JambaBlock):
    MIXER, MIXER_PART, FEED_FORWARD, FEED_FORWARD_PART = JambaMambaMixer, "mixer_config", MLP, "mlp_config"


class JambaMambaMoEBlock(JambaBlock):
    MIXER, MIXER_PART, FEED_FORWARD, FEED_FORWARD_PART = JambaMambaMixer, "mixer_config", MoE, "moe_config"


class JambaAttentionMLPBlock(JambaBlock):
    MIXER, MIXER_PART, FEED_FORWARD, FEED_FORWARD_PART = Attention, "attention_config", MLP, "mlp_config"


class JambaAttentionMoEBlock(JambaBlock):
    MIXER, MIXER_PART, FEED_FORWARD, FEED_FORWARD_PART = Attention, "attention_config", MoE, "moe_config"


BLOCKS = {("mamba", "mlp"): JambaMambaMLPBlock, ("mamba", "moe"): JambaMambaMoEBlock,
          ("attention", "mlp"): JambaAttentionMLPBlock, ("attention", "moe"): JambaAttentionMoEBlock}


def jamba_blocks(config: JambaConfig) -> list[type]:
    return [BLOCKS[pair] for pair in zip(config.layers_block_type, config.layers_feed_forward)]


class JambaModel(Backbone):
    """Embeddings, one block per layer and the final norm (HF `JambaModel`)."""


class JambaForCausalLM(CausalLM):
    """Jamba language model (HF `JambaForCausalLM`): `model(input_ids, attention_mask=, cache=, labels=,
    inputs_embeds=, output_hidden_states=, position_ids=)` as HF; `model.step(tokens, cache)` is one decode step.
    `init_cache(batch, max_length=...)` preallocates the attention layers' key/value slots.

    `output_hidden_states=True` returns `num_hidden_layers + 1` arrays (b, l, d) as transformers 5.25 does: the
    embeddings, the outputs of blocks 0 to n-2, then the final norm of block n-1's output."""



def _mamba_keys(config: JambaConfig, hf: str, at: tuple) -> list[KeySpec]:
    table = [KeySpec(hf + "A_log", at + ("A_log",), "copy"), KeySpec(hf + "D", at + ("D",), "copy"),
             KeySpec(hf + "conv1d.weight", at + ("conv1d", "weight"), "conv")]
    if config.mamba_conv_bias:
        table.append(KeySpec(hf + "conv1d.bias", at + ("conv1d", "bias"), "copy"))
    table += linear_keys(hf + "in_proj", at + ("in_proj",), config.mamba_proj_bias)
    table += linear_keys(hf + "x_proj", at + ("x_proj",))
    table += linear_keys(hf + "dt_proj", at + ("dt_proj",), True)
    table += linear_keys(hf + "out_proj", at + ("out_proj",), config.mamba_proj_bias)
    for norm in ("dt_layernorm", "b_layernorm", "c_layernorm"):
        table.append(KeySpec(hf + norm + ".weight", at + (norm, "weight"), "copy"))
    return table


def jamba_key_table(config: JambaConfig) -> list[KeySpec]:
    """Every tensor of a `JambaForCausalLM` under the names transformers' `save_pretrained` writes (experts one
    tensor each, `feed_forward.experts.{j}.gate_proj.weight`), layer by layer. A tied model has no
    `lm_head.weight`."""
    table = [KeySpec("model.embed_tokens.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i, (mixer, ff) in enumerate(zip(config.layers_block_type, config.layers_feed_forward)):
        hf = f"model.layers.{i}."
        at = ("backbone", "layers", i)
        table.append(KeySpec(hf + "input_layernorm.weight", at + ("input_layernorm", "weight"), "copy"))
        if mixer == "mamba":
            table += _mamba_keys(config, hf + "mamba.", at + ("mixer",))
        else:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                table += linear_keys(hf + "self_attn." + name, at + ("mixer", name))
        table.append(KeySpec(hf + "pre_ff_layernorm.weight", at + ("pre_ff_layernorm", "weight"), "copy"))
        ffn = at + ("feed_forward",)
        if ff == "mlp":
            for name in ("gate_proj", "up_proj", "down_proj"):
                table += linear_keys(hf + "feed_forward." + name, ffn + (name,))
        else:
            table.append(KeySpec(hf + "feed_forward.router.weight", ffn + ("gate", "kernel"), "linear"))
            for j in range(config.num_experts):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    table.append(KeySpec(f"{hf}feed_forward.experts.{j}.{name}.weight", ffn + ("experts", name),
                                         "linear", index=j))
    table.append(KeySpec("model.final_layernorm.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return table


def jamba_mixer_facts(config: JambaConfig, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, config value, tensor, implied value) for each Mamba size the first Mamba layer's tensors contradict:
    A_log [e, n] (e = mamba_expand * d), conv1d [e, 1, k], x_proj [r + 2n, e]. (Biases present or absent against
    mamba_proj_bias / mamba_conv_bias show as missing or unexpected tensors.)"""
    out = []
    if "mamba" not in config.layers_block_type:
        return out
    mixer = f"model.layers.{config.layers_block_type.index('mamba')}.mamba."
    a_log = shape_of(mixer + "A_log")
    if a_log is not None and len(a_log) == 2:
        e = config.mamba_expand * config.hidden_size
        if a_log[0] != e:
            out.append(("mamba_expand", config.mamba_expand, mixer + "A_log",
                        f"{a_log[0]} / hidden_size = {a_log[0] / config.hidden_size:g}"))
        if a_log[1] != config.mamba_d_state:
            out.append(("mamba_d_state", config.mamba_d_state, mixer + "A_log", a_log[1]))
        x_proj = shape_of(mixer + "x_proj.weight")
        if x_proj is not None and len(x_proj) == 2 and x_proj[0] - 2 * a_log[1] != config.resolved_dt_rank:
            out.append(("mamba_dt_rank", config.resolved_dt_rank, mixer + "x_proj.weight",
                        f"{x_proj[0]} - 2 * mamba_d_state = {x_proj[0] - 2 * a_log[1]}"))
    conv = shape_of(mixer + "conv1d.weight")
    if conv is not None and len(conv) == 3 and conv[2] != config.mamba_d_conv:
        out.append(("mamba_d_conv", config.mamba_d_conv, mixer + "conv1d.weight", conv[2]))
    return out


def jamba_sharding_units(config: JambaConfig) -> dict[str, int]:
    """The count of each logical axis: `heads` counts the Mamba mixers' inner channels e, as for Mamba-1."""
    return {"heads": config.mamba_expand * config.hidden_size, "vocab": config.vocab_size,
            "embed": config.hidden_size, "attn_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "mlp": config.intermediate_size, "experts": config.num_experts}


def jamba_operands(cfg: JambaConfig, bc, dt, A) -> Operands:
    """The effective attention's operands from hook_bc (b, l, 2n) = [B | C] after the mixer's norms, hook_dt
    (b, l, e), A (e, n): one group, e decay channels, in the scan's compute dtype."""
    n = cfg.mamba_d_state
    dtype = jnp.promote_types(bc.dtype, jnp.float32)
    return Operands(dt.astype(dtype), A.astype(dtype), bc[..., None, :n].astype(dtype),
                    bc[..., None, n:].astype(dtype))


FAMILY = ModelFamily(
    model_type="jamba",
    config_class=JambaConfig,
    causal_lm=JambaForCausalLM,
    backbone=JambaModel,
    blocks=jamba_blocks,
    cache_class=HybridCache,
    cache_metadata=HybridCacheMetaData,
    key_table=jamba_key_table,
    mixer_facts=jamba_mixer_facts,
    sharding_units=jamba_sharding_units,
    effective_attention=EffectiveAttention(JambaMambaMixer, ("hook_bc", "hook_dt"), "inner channels (e)",
                                           lambda cfg: cfg.mamba_expand * cfg.hidden_size, jamba_operands),
    hidden_states_with_embeddings=True,
)
