"""Bamba (IBM's Mamba-2 + attention hybrid): the decoder layer Bamba and Granite-4.0-H share, Bamba's backbone,
causal LM and family record.

Hugging Face counterparts: `transformers.models.bamba.modeling_bamba` (5.25) and, for the shared layer,
`granitemoehybrid.modeling_granitemoehybrid`. Checkpoint names (the key tables map them to the modules here):

    BambaForCausalLM                                  here
      model.embed_tokens [v, d]                       backbone.embeddings
      model.layers[i] (BambaDecoderLayer)             backbone.layers[i] (HybridDecoderLayer)
        input_layernorm [d]                             input_layernorm
        mamba (Mamba-2) | self_attn (rope attention)    mixer (Mamba2Mixer | Attention)
        pre_ff_layernorm [d]                            pre_ff_layernorm
        feed_forward (gated MLP)                        feed_forward (MLP)
      model.final_layernorm [d]                       backbone.norm_f
      lm_head [d, v]   (absent when tied)             lm_head

One layer, both families (`HybridDecoderLayer`), with m = the config's `residual_multiplier` (Bamba: 1):

    h = h + m * mixer(input_layernorm(h))            mixer: Mamba-2 or attention, per `layers_block_type`
    h = h + m * feed_forward(pre_ff_layernorm(h))    feed_forward: the MLP, or the MoE with its shared MLP

The residual is carried in the model dtype. The cache holds a Mamba-2 view for each Mamba layer and a key/value
view for each attention layer (`easymamba.caching.HybridCache`). Positions are counted in real tokens
(`easymamba.models.attention`); transformers' Bamba, called without `position_ids`, numbers a cached call's
tokens from 0 whatever the cache holds, which `generate` never does (it passes them).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from easymamba.caching import HybridCache, HybridCacheMetaData
from easymamba.config.bamba import MAMBA, BambaConfig
from easymamba.models.attention import Attention
from easymamba.models.causal_lm import Backbone, CausalLM
from easymamba.models.common import sow_hook
from easymamba.models.family import EffectiveAttention, KeySpec, ModelFamily, linear_keys
from easymamba.models.mamba2 import mamba2_mixer_keys, mamba2_operands
from easymamba.models.mamba2_mixer import Mamba2Mixer
from easymamba.models.mlp import MLP, MoE
from easymamba.norms import RMSNorm


__all__ = ["HybridDecoderLayer", "BambaModel", "BambaForCausalLM", "bamba_key_table", "hybrid_mixer_keys",
           "hybrid_mixer_facts", "hybrid_sharding_units", "HYBRID_EFFECTIVE_ATTENTION", "FAMILY"]


class HybridDecoderLayer(nnx.Module):
    """A Bamba / Granite-4.0-H layer (HF `BambaDecoderLayer`, `GraniteMoeHybridDecoderLayer`): a token mixer
    (Mamba-2 or attention, as `config.layers_block_type[layer_idx]` says) then a feed-forward (the config's
    MoE with its shared MLP when it has routed experts, else its MLP), each pre-normed and added to the residual
    times `residual_multiplier` (see the module docstring).

    The mixer's state lives in the layer's cache view (a `Mamba2CacheView` or an `AttentionCacheView`), which
    this layer hands to the mixer and returns renewed; the feed-forward has none.

    Hook points: `hook_resid_mid` (b, l, d) after the mixer's residual add, `hook_resid_post` (b, l, d) the
    layer output.
    """

    HOOKS = ("hook_resid_mid", "hook_resid_post")
    remat: bool = False  # set by easymamba.train.make_train_step(remat=True) on the copy it differentiates

    def __init__(self, config, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_impl: str = "auto"):
        d, eps = config.hidden_size, config.rms_norm_eps
        kw = dict(layer_idx=layer_idx, rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_impl=kernel_impl)
        self.kind = config.layers_block_type[layer_idx]
        self.residual_multiplier = float(getattr(config, "residual_multiplier", 1.0))
        self.input_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.mixer = (Mamba2Mixer(config.mixer_config, **kw) if self.kind == MAMBA
                      else Attention(config.attention_config, **kw))
        self.pre_ff_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        moe = config.moe_config
        self.feed_forward = MoE(moe, **kw) if moe is not None else MLP(config.mlp_config, **kw)

    takes_packed = True  # its mixer (Mamba-2 or attention) and feed-forward (per token) take seq_idx

    def __call__(self, hidden: jax.Array, *, attention_mask=None, view=None, position_ids=None, embeddings=None,
                 seq_idx=None):
        """hidden (b, l, d), the layer's cache view or None -> (hidden (b, l, d), the renewed view or None).
        attention_mask (b, >= l) 0/1; position_ids (b, l) reach the attention's rotary embedding; seq_idx (b, l)
        marks packed sequences."""
        del embeddings
        if self.remat:
            return nnx.remat(type(self)._forward)(self, hidden, attention_mask, view, position_ids, seq_idx)
        return self._forward(hidden, attention_mask, view, position_ids, seq_idx)

    def _forward(self, hidden, attention_mask, view, position_ids, seq_idx=None):
        out, view = self.mixer.run(self._norm(self.input_layernorm, hidden), view, attention_mask=attention_mask,
                                   position_ids=position_ids, seq_idx=seq_idx)
        return self._feed_forward(self._add(hidden, out, "hook_resid_mid")), view

    def step(self, hidden: jax.Array, view, *, attention_mask=None, active_rows=None, decode_weights=None,
             position_ids=None, embeddings=None):
        """One token: hidden (b, 1, d), the layer's view -> (hidden (b, 1, d), the renewed view)."""
        del embeddings
        out, view = self.mixer.run_step(self._norm(self.input_layernorm, hidden), view,
                                        attention_mask=attention_mask, position_ids=position_ids,
                                        active_rows=active_rows, decode_weights=decode_weights)
        return self._feed_forward(self._add(hidden, out, "hook_resid_mid")), view

    def decode_weights(self):
        """The mixer's weights prepared once for a decode loop (`Backbone.decode_weights`), or None."""
        return self.mixer.decode_weights()

    def _feed_forward(self, hidden):
        return self._add(hidden, self.feed_forward(self._norm(self.pre_ff_layernorm, hidden)), "hook_resid_post")

    @staticmethod
    def _norm(norm, hidden):
        return norm(hidden.astype(norm.weight.dtype))

    def _add(self, residual, out, hook: str):
        if self.residual_multiplier != 1.0:
            out = out * jnp.asarray(self.residual_multiplier, out.dtype)
        hidden = residual + out
        sow_hook(self, hook, hidden)
        return hidden


class BambaModel(Backbone):
    """Embeddings, the `layers_block_type` layers and the final norm (HF `BambaModel`)."""


class BambaForCausalLM(CausalLM):
    """Bamba language model (HF `BambaForCausalLM`): `model(input_ids, attention_mask=, cache=, labels=,
    inputs_embeds=, output_hidden_states=, position_ids=)` as HF; `model.step(tokens, cache)` is one decode step.
    `init_cache(batch, max_length=...)` preallocates the attention layers' key/value slots."""



def hybrid_mixer_keys(config, kind: str, hf: str, at: tuple) -> list[KeySpec]:
    """The token mixer of layer `hf` ("model.layers.{i}."), held at `at` + ("mixer",): HF's `mamba.*` for a
    Mamba-2 layer, `self_attn.{q,k,v,o}_proj.*` for an attention layer."""
    if kind == MAMBA:
        return mamba2_mixer_keys(config.mixer_config, hf + "mamba.", at + ("mixer",))
    table = []
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        table += linear_keys(hf + "self_attn." + name, at + ("mixer", name), config.attention_bias)
    return table


def bamba_key_table(config: BambaConfig) -> list[KeySpec]:
    """Every tensor of a `BambaForCausalLM` under the names transformers' `save_pretrained` writes, in its
    `state_dict()` order."""
    table = [KeySpec("model.embed_tokens.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i, kind in enumerate(config.layers_block_type):
        hf = f"model.layers.{i}."
        at = ("backbone", "layers", i)
        for name in ("gate_proj", "up_proj", "down_proj"):
            table += linear_keys(hf + "feed_forward." + name, at + ("feed_forward", name), config.mlp_bias)
        table.append(KeySpec(hf + "input_layernorm.weight", at + ("input_layernorm", "weight"), "copy"))
        table.append(KeySpec(hf + "pre_ff_layernorm.weight", at + ("pre_ff_layernorm", "weight"), "copy"))
        table += hybrid_mixer_keys(config, kind, hf, at)
    table.append(KeySpec("model.final_layernorm.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return table


def hybrid_mixer_facts(config, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, config value, tensor, implied value) for each size the first Mamba-2 layer's tensors contradict
    (Bamba and Granite-4.0-H name them alike)."""
    out = []
    if MAMBA not in config.layers_block_type:
        return out
    mixer = f"model.layers.{config.layers_block_type.index(MAMBA)}.mamba."
    a_log = shape_of(mixer + "A_log")                                   # [h]
    if a_log is not None and len(a_log) == 1 and a_log[0] != config.mamba_n_heads:
        out.append(("mamba_n_heads", config.mamba_n_heads, mixer + "A_log", a_log[0]))
    norm = shape_of(mixer + "norm.weight")                              # [e]
    e = config.mamba_n_heads * config.mamba_d_head
    if norm is not None and len(norm) == 1 and norm[0] != e:
        out.append(("mamba_n_heads * mamba_d_head", e, mixer + "norm.weight", norm[0]))
    conv = shape_of(mixer + "conv1d.weight")                            # [e + 2gn, 1, k]
    if conv is not None and len(conv) == 3:
        if conv[2] != config.mamba_d_conv:
            out.append(("mamba_d_conv", config.mamba_d_conv, mixer + "conv1d.weight", conv[2]))
        gn = config.mamba_n_groups * config.mamba_d_state
        if norm is not None and len(norm) == 1 and conv[0] != norm[0] + 2 * gn:
            out.append(("mamba_n_groups * mamba_d_state", gn, mixer + "conv1d.weight",
                        f"({conv[0]} - {norm[0]}) / 2"))
    return out


def hybrid_sharding_units(config) -> dict[str, int]:
    """The count of each logical axis: Mamba heads and groups, attention heads, the MLP width (Granite: the
    shared MLP's), the routed experts when there are any."""
    units = {"heads": config.mamba_n_heads, "groups": config.mamba_n_groups, "vocab": config.vocab_size,
             "embed": config.hidden_size, "attn_heads": config.num_attention_heads,
             "kv_heads": config.num_key_value_heads, "mlp": config.mlp_config.intermediate_size}
    if config.moe_config is not None:
        units["experts"] = config.moe_config.num_experts
    return units


# The effective attention of the Mamba-2 layers (the attention layers have their own pattern hook).
HYBRID_EFFECTIVE_ATTENTION = EffectiveAttention(
    Mamba2Mixer, ("hook_conv", "hook_dt"), "heads (h)", lambda cfg: cfg.mamba_n_heads,
    lambda cfg, *args: mamba2_operands(cfg.mixer_config, *args))


FAMILY = ModelFamily(
    model_type="bamba",
    config_class=BambaConfig,
    causal_lm=BambaForCausalLM,
    backbone=BambaModel,
    blocks=lambda config: [HybridDecoderLayer] * config.num_hidden_layers,
    cache_class=HybridCache,
    cache_metadata=HybridCacheMetaData,
    key_table=bamba_key_table,
    mixer_facts=hybrid_mixer_facts,
    sharding_units=hybrid_sharding_units,
    effective_attention=HYBRID_EFFECTIVE_ATTENTION,
    hidden_states_with_embeddings=True,
)
