"""Falcon-H1 (TII): attention and a Mamba-2 mixer side by side in every layer, then a gated MLP, with muP multipliers.

Hugging Face counterpart: `transformers.models.falcon_h1.modeling_falcon_h1` (5.25). The module tree and the
names transformers' `save_pretrained` writes (the key table maps one to the other):

    FalconH1ForCausalLM (CausalLM)             HF FalconH1ForCausalLM
      backbone: FalconH1Model (Backbone)       model
        embeddings: Embedding [v, d]           model.embed_tokens           rows times embedding_multiplier
        layers[i]: FalconH1Block               model.layers.i
          input_layernorm: RMSNorm [d]
          mamba: Mamba2Mixer                   mamba.*  (muP multipliers on in_proj's parts, optional gated norm)
          self_attn: Attention                 self_attn.{q,k,v,o}_proj  (GQA, full-head RoPE, key_multiplier)
          pre_ff_layernorm: RMSNorm [d]
          feed_forward: MLP                    feed_forward.{gate,up,down}_proj  (gated SiLU, mlp_multipliers)
        norm_f: RMSNorm [d]                    model.final_layernorm
      lm_head: Linear [d, v]                   lm_head  (absent when tied); logits times lm_head_multiplier

One layer, with u the normed input (the residual in the model dtype):

    u = input_layernorm(h)
    m = mamba(u * ssm_in_multiplier) * ssm_out_multiplier          (the mixer masks padding; the scale commutes)
    a = self_attn(u * attention_in_multiplier) * attention_out_multiplier
    h = h + (m + a)
    h = h + feed_forward(pre_ff_layernorm(h))

The cache keeps, per layer, a tuple of views in `config.layer_cache_kinds` order: (Mamba2CacheView,
AttentionCacheView), the mixer's state first as transformers' cache layer keeps it.

The decode step's dt: transformers' cached one-token step (`mamba2_selective_state_update`) does not clamp dt to
`time_step_limit`, while its chunked scan (every forward of more than one token) does; with a limit that bites,
HF's logits for a token differ between a full forward and a token-by-token decode. easymamba clamps in both, so a
model run in one piece or token by token gives the same numbers (tests/test_falcon_h1.py shows both); the two
agree with transformers exactly when the limit is (0, inf), the default and every published config's.
"""

import jax
from flax import nnx

from easymamba.caching import HybridCache, HybridCacheMetaData
from easymamba.config.falcon_h1 import FalconH1Config
from easymamba.models.attention import Attention
from easymamba.models.causal_lm import Backbone, CausalLM
from easymamba.models.common import sow_hook
from easymamba.models.family import EffectiveAttention, KeySpec, ModelFamily, linear_keys
from easymamba.models.mamba2 import mamba2_mixer_keys, mamba2_operands
from easymamba.models.mamba2_mixer import Mamba2Mixer
from easymamba.models.mlp import MLP
from easymamba.norms import RMSNorm
from easymamba.sharding import MeshRules

__all__ = ["FalconH1Block", "FalconH1Model", "FalconH1ForCausalLM", "falcon_h1_key_table", "FAMILY"]


class FalconH1Block(nnx.Module):
    """One Falcon-H1 layer (HF `FalconH1DecoderLayer`): the Mamba-2 mixer and attention read the same normed input
    side by side, each scaled by its multipliers, then the gated MLP (see the module docstring).

    `view`: the layer's cache entry, a tuple of views in `config.layer_cache_kinds` order, or None.
    Hook points: `hook_resid_mid` (b, l, d) after the mixer and attention are added, `hook_resid_post` (b, l, d)
    the layer output; the parts have their own (`mamba.hook_*`, `self_attn.hook_*`, `feed_forward.hook_mlp_out`).
    """

    HOOKS = ("hook_resid_mid", "hook_resid_post")
    remat: bool = False  # set by easymamba.train (make_train_step(remat=True)) on the copy it differentiates

    def __init__(self, config: FalconH1Config, *, layer_idx: int, rngs: nnx.Rngs, dtype=jax.numpy.float32,
                 param_dtype=jax.numpy.float32, kernel_impl: str = "auto"):
        d, eps = config.hidden_size, config.rms_norm_eps
        kw = dict(layer_idx=layer_idx, rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_impl=kernel_impl)
        self.layer_idx = layer_idx
        self.kinds = tuple(config.layer_cache_kinds[layer_idx])
        self.input_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.mamba = Mamba2Mixer(config.mixer_config, **kw)
        self.self_attn = Attention(config.attention_config, **kw)
        self.pre_ff_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.feed_forward = MLP(config.mlp_config, **kw)
        self.ssm_in_multiplier = float(config.ssm_in_multiplier)
        self.ssm_out_multiplier = float(config.ssm_out_multiplier)
        self.attention_in_multiplier = float(config.attention_in_multiplier)
        self.attention_out_multiplier = float(config.attention_out_multiplier)
        self.mesh_rules: MeshRules | None = None  # set by easymamba.sharding when the model is sharded

    takes_packed = True  # Mamba-2 and attention side by side, both take seq_idx

    def __call__(self, hidden: jax.Array, *, attention_mask=None, view=None, position_ids=None, embeddings=None,
                 seq_idx=None):
        """hidden (b, l, d), the layer's views or None -> (hidden (b, l, d), the renewed views or None); seq_idx
        (b, l) marks packed sequences."""
        del embeddings
        if self.remat:
            return nnx.remat(type(self)._forward)(self, hidden, attention_mask, view, position_ids,
                                                  seq_idx=seq_idx)
        return self._forward(hidden, attention_mask, view, position_ids, seq_idx=seq_idx)

    def step(self, hidden: jax.Array, view, *, attention_mask=None, active_rows=None, decode_weights=None,
             position_ids=None, embeddings=None):
        """One token: hidden (b, 1, d), the layer's views -> (hidden (b, 1, d), the renewed views)."""
        del embeddings
        return self._forward(hidden, attention_mask, view, position_ids, step=True, active_rows=active_rows,
                             decode_weights=decode_weights)

    def decode_weights(self):
        """The mixer's weights prepared once for a decode loop, or None (`Mamba2Mixer.decode_weights`)."""
        return self.mamba.decode_weights()

    def _views(self, view):
        if view is None:
            return None, None
        if not isinstance(view, tuple) or len(view) != len(self.kinds):
            raise ValueError(f"layer {self.layer_idx} needs a tuple of {len(self.kinds)} cache views {self.kinds}, "
                             f"got {type(view).__name__}")
        return view[self.kinds.index("mamba2")], view[self.kinds.index("attention")]

    def _forward(self, hidden, attention_mask, view, position_ids, *, step=False, active_rows=None,
                 decode_weights=None, seq_idx=None):
        mamba_view, attn_view = self._views(view)
        residual = hidden
        u = self.input_layernorm(hidden)                                          # (b, l, d)
        if step:
            m, mamba_view = self.mamba.run_step(u * self.ssm_in_multiplier, mamba_view,
                                                attention_mask=attention_mask, active_rows=active_rows,
                                                decode_weights=decode_weights)
            a, attn_view = self.self_attn.run_step(u * self.attention_in_multiplier, attn_view,
                                                   attention_mask=attention_mask, position_ids=position_ids,
                                                   active_rows=active_rows)
        else:
            m, mamba_view = self.mamba.run(u * self.ssm_in_multiplier, mamba_view, attention_mask=attention_mask,
                                           seq_idx=seq_idx)
            a, attn_view = self.self_attn.run(u * self.attention_in_multiplier, attn_view,
                                              attention_mask=attention_mask, position_ids=position_ids,
                                              seq_idx=seq_idx)
        hidden = residual + (m * self.ssm_out_multiplier + a * self.attention_out_multiplier)
        sow_hook(self, "hook_resid_mid", hidden)
        hidden = hidden + self.feed_forward(self.pre_ff_layernorm(hidden))
        sow_hook(self, "hook_resid_post", hidden)
        if view is None:
            return hidden, None
        renewed = {"mamba2": mamba_view, "attention": attn_view}
        return hidden, tuple(renewed[kind] for kind in self.kinds)


class FalconH1Model(Backbone):
    """Embeddings (times embedding_multiplier), the Falcon-H1 layers and the final norm (HF `FalconH1Model`)."""


class FalconH1ForCausalLM(CausalLM):
    """Falcon-H1 language model (HF `FalconH1ForCausalLM`): `model(input_ids, attention_mask=, cache=, labels=,
    inputs_embeds=, output_hidden_states=, position_ids=)` as HF (logits times lm_head_multiplier);
    `model.step(tokens, cache)` is one decode step. `init_cache(batch, max_length=...)` preallocates the attention
    views' key/value slots."""



def falcon_h1_key_table(config: FalconH1Config) -> list[KeySpec]:
    """Every tensor of a `FalconH1ForCausalLM` under the names transformers' `save_pretrained` writes (`model.*`,
    `lm_head.weight` when untied), layer by layer. The muP vector and the rotary frequencies are buffers
    transformers computes from the config, not tensors of the file."""
    mixer_config = config.mixer_config
    table = [KeySpec("model.embed_tokens.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        at = ("backbone", "layers", i)
        for name in ("gate_proj", "up_proj", "down_proj"):
            table += linear_keys(hf + "feed_forward." + name, at + ("feed_forward", name), config.mlp_bias)
        table += mamba2_mixer_keys(mixer_config, hf + "mamba.", at + ("mamba",))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            table += linear_keys(hf + "self_attn." + name, at + ("self_attn", name), config.attention_bias)
        table.append(KeySpec(hf + "input_layernorm.weight", at + ("input_layernorm", "weight"), "copy"))
        table.append(KeySpec(hf + "pre_ff_layernorm.weight", at + ("pre_ff_layernorm", "weight"), "copy"))
    table.append(KeySpec("model.final_layernorm.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return table


def falcon_h1_mixer_facts(config: FalconH1Config, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, config value, tensor, implied value) for each size layer 0's tensors contradict: the mixer's heads,
    conv width and channels, and the attention's query and key/value widths."""
    out = []
    at = "model.layers.0."
    a_log = shape_of(at + "mamba.A_log")                                         # [h]
    if a_log is not None and len(a_log) == 1 and a_log[0] != config.mamba_n_heads:
        out.append(("mamba_n_heads", config.mamba_n_heads, at + "mamba.A_log", a_log[0]))
    conv = shape_of(at + "mamba.conv1d.weight")                                  # [e + 2gn, 1, k]
    if conv is not None and len(conv) == 3:
        if conv[2] != config.mamba_d_conv:
            out.append(("mamba_d_conv", config.mamba_d_conv, at + "mamba.conv1d.weight", conv[2]))
        channels = config.mixer_config.conv_dim
        if conv[0] != channels:
            out.append(("mamba width + 2 * mamba_n_groups * mamba_d_state", channels, at + "mamba.conv1d.weight",
                        conv[0]))
    hd = config.resolved_head_dim
    for name, field, heads in (("q_proj", "num_attention_heads", config.num_attention_heads),
                               ("k_proj", "num_key_value_heads", config.num_key_value_heads)):
        shape = shape_of(at + f"self_attn.{name}.weight")                        # [heads * head_dim, d]
        if shape is not None and len(shape) == 2 and shape[0] != heads * hd:
            out.append((f"{field} * head_dim", heads * hd, at + f"self_attn.{name}.weight", shape[0]))
    return out


def falcon_h1_sharding_units(config: FalconH1Config) -> dict[str, int]:
    """How many units each logical axis has: mixer heads and groups, attention heads, MLP width, vocab, d."""
    return {"heads": config.mamba_n_heads, "groups": config.mamba_n_groups, "vocab": config.vocab_size,
            "embed": config.hidden_size, "attn_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "mlp": config.intermediate_size}


FAMILY = ModelFamily(
    model_type="falcon_h1",
    config_class=FalconH1Config,
    causal_lm=FalconH1ForCausalLM,
    backbone=FalconH1Model,
    blocks=lambda config: [FalconH1Block] * config.num_hidden_layers,
    cache_class=HybridCache,
    cache_metadata=HybridCacheMetaData,
    key_table=falcon_h1_key_table,
    mixer_facts=falcon_h1_mixer_facts,
    sharding_units=falcon_h1_sharding_units,
    effective_attention=EffectiveAttention(Mamba2Mixer, ("hook_conv", "hook_dt"), "heads (h)",
                                           lambda cfg: cfg.mamba_n_heads,
                                           lambda cfg, *args: mamba2_operands(cfg.mixer_config, *args)),
    hidden_states_with_embeddings=True,  # (embeddings * multiplier, layers 0 .. n-2, final normed state)
    embedding_multiplier=lambda config: config.embedding_multiplier,
    logits_multiplier=lambda config: config.lm_head_multiplier,
)
