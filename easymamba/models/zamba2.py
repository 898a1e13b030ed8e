"""Zamba2 (Zyphra's Mamba-2 hybrids with shared transformer blocks): blocks, backbone, causal LM, family record.

Hugging Face counterpart: `transformers.models.zamba2.modeling_zamba2` (5.25). Letters as in `easymamba.typing`;
r is the adapter rank, f the MLP width.

    Zamba2ForCausalLM
      backbone: Zamba2Model                     (HF `model`)
        embeddings: Embedding [v, d]            (HF `embed_tokens`)
        layers[i], per `layers_block_type`:
          "linear_attention"  Zamba2MambaBlock   out = h + mixer(norm(h))
          "hybrid"            Zamba2HybridBlock  t = linear(shared_transformer(h, emb))
                                                 out = h + mixer(norm(h + t))
        norm_f: RMSNorm [d]                     (HF `final_layernorm`)
      lm_head: Linear [d, v]                    (absent when tie_word_embeddings)

    shared_transformer(h, emb), emb the embeddings entering layer 0 (the backbone's input):
        x = input_layernorm([h | emb])                              (b, l, 2d)
        a = self_attn(x)   q/k/v_proj(x) + their LoRA adapters, RoPE when use_mem_rope, scale (hd / 2) ** -0.5
        y = feed_forward(pre_ff_layernorm(a))   gate/up_proj + the LoRA adapter of HF's packed gate_up_proj,
                                                act(gate) * up, down_proj
    no residual inside the block: it reaches the stream only through the mixer's input.

Shared blocks. The hybrid layer of rank r (counting hybrid layers) runs shared block r % num_mem_blocks with adapter
slot r. With tie_word_embeddings (every published model) transformers ties each block's tensors to its first hybrid
layer (the block's owner) and stores them there only, the adapters of every slot of the block included. Here every
hybrid layer has its own `Zamba2SharedTransformer` module (so hooks record per layer), whose norms, projections and
adapter list ARE the owner's objects: one parameter set, which nnx's graph, the key table, save/load and the
sharding rules all see once, under the owner's path. Untied, transformers ties nothing: every hybrid layer owns a
full copy, with the adapters of every slot of its block (used or not), and so does this model.

The mixer is `Mamba2Mixer` on `Zamba2Config.mixer_config` in every layer (conv bias always, gated norm eps 1e-5).
Its dt is clamped to (time_step_min, inf) over a sequence AND in the one-token step, so a model gives the same
numbers run whole or token by token. transformers clamps only over a sequence (its cached step does not clamp);
where softplus(dt + dt_bias) < time_step_min, its cached decoding then departs from its own full forward (and
from easymamba's, which equals that forward).

The cache keeps per hybrid layer (AttentionCacheView, Mamba2CacheView) (the shared block's keys and values at that
layer, then the mixer's states), per Mamba layer a Mamba2CacheView.
"""

import jax.numpy as jnp
from flax import nnx

from easymamba.caching import HybridCache, HybridCacheMetaData
from easymamba.config.zamba2 import Zamba2Config
from easymamba.layers import normal_linear
from easymamba.models.attention import Attention
from easymamba.models.causal_lm import Backbone, CausalLM, ResidualBlock
from easymamba.models.common import sow_hook
from easymamba.models.family import EffectiveAttention, KeySpec, ModelFamily, linear_keys, packed_key
from easymamba.models.mamba2 import mamba2_mixer_keys, mamba2_operands
from easymamba.models.mamba2_mixer import Mamba2Mixer
from easymamba.models.mlp import MLP
from easymamba.norms import RMSNorm
from easymamba.sharding import MeshRules

__all__ = ["Zamba2MambaBlock", "Zamba2HybridBlock", "Zamba2SharedTransformer", "Zamba2Adapter", "LoRA",
           "Zamba2Model", "Zamba2ForCausalLM", "zamba2_key_table", "FAMILY"]


def _linear(n_in, n_out, axes, std, *, dtype, param_dtype, rngs, bias=False):
    return normal_linear(n_in, n_out, bias=bias, axes=axes, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class LoRA(nnx.Module):
    """One low-rank adapter: `down` [in, r], then one `up` projection [r, size] per output part (HF's packed
    up-projection kept in the parts the adapted projections have: the MLP's gate and up)."""

    def __init__(self, n_in: int, rank: int, parts: dict[str, tuple[int, str | None]], *, std: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.part_names = tuple(parts)
        self.down = _linear(n_in, rank, (None, None), std, **kw)
        for name, (size, axis) in parts.items():
            setattr(self, name, _linear(rank, size, (None, axis), std, **kw))

    def weights(self, part: str):
        """(down (in, r), up (r, size)) of one output part, as the shared parts' `lora=` takes them."""
        return self.down.kernel[...], getattr(self, part).kernel[...]


class Zamba2Adapter(nnx.Module):
    """One adapter slot: LoRA on q, k and v (`use_shared_attention_adapter`; None otherwise) and on the MLP's
    gate_up (always). HF: `linear_{q,k,v}_adapter_list.{slot}` and `gate_up_proj_adapter_list.{slot}`."""

    def __init__(self, config: Zamba2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        two_d, r, f = config.attention_hidden_size, config.adapter_rank, config.intermediate_size
        if config.use_shared_attention_adapter:
            self.q = LoRA(two_d, r, {"up": (two_d, "attn_heads")}, **kw)
            self.k = LoRA(two_d, r, {"up": (two_d, "kv_heads")}, **kw)
            self.v = LoRA(two_d, r, {"up": (two_d, "kv_heads")}, **kw)
        else:
            self.q = self.k = self.v = None
        self.gate_up = LoRA(config.hidden_size, r, {"gate": (f, "mlp"), "up": (f, "mlp")}, **kw)

    def attention_lora(self):
        if self.q is None:
            return None
        return {"q": self.q.weights("up"), "k": self.k.weights("up"), "v": self.v.weights("up")}

    def mlp_lora(self):
        return {"gate": self.gate_up.weights("gate"), "up": self.gate_up.weights("up")}


def block_slots(config: Zamba2Config, block: int) -> tuple[int, ...]:
    """The adapter slots (hybrid ranks) of shared block `block`, in order: those its HF module holds."""
    return tuple(r for r in range(len(config.hybrid_layer_ids)) if r % config.num_mem_blocks == block)


class Zamba2SharedTransformer(nnx.Module):
    """One hybrid layer's run of a shared block (HF `Zamba2AttentionDecoderLayer`): see the module docstring.

    Built with `owner=None` it makes the block's parameters: `input_layernorm` [2d], `self_attn` (q/k/v/o),
    `pre_ff_layernorm` [d], `feed_forward` (gate/up/down) and `adapters`, one `Zamba2Adapter` per slot of the
    block (`block_slots`). Built with `owner=` another layer's instance, it runs that one's parameters (the same
    objects) through modules of its own (its own hooks). `slot` is the adapter slot this layer uses.
    """

    def __init__(self, config: Zamba2Config, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, owner: "Zamba2SharedTransformer | None" = None):
        rank = config.hybrid_layer_ids.index(layer_idx)
        self.block = config.shared_block_index(layer_idx)
        self.slot_position = block_slots(config, self.block).index(rank)
        shared = owner is not None
        self.self_attn = Attention(config.attention_config, layer_idx=layer_idx, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype, params_from=owner.self_attn if shared else None)
        self.feed_forward = MLP(config.mlp_config, layer_idx=layer_idx, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype, params_from=owner.feed_forward if shared else None)
        if shared:
            self.input_layernorm, self.pre_ff_layernorm = owner.input_layernorm, owner.pre_ff_layernorm
            self.adapters = owner.adapters
        else:
            eps = config.rms_norm_eps
            self.input_layernorm = RMSNorm(config.attention_hidden_size, eps=eps, param_dtype=param_dtype, axis=None)
            self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=eps, param_dtype=param_dtype)
            self.adapters = nnx.List([Zamba2Adapter(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                      for _ in block_slots(config, self.block)])

    def __call__(self, hidden, embeddings, *, attention_mask=None, position_ids=None, view=None, active_rows=None,
                 seq_idx=None):
        """hidden, embeddings (b, l, d) -> (out (b, l, d), the attention's renewed view or None); seq_idx (b, l)
        keeps the attention inside each packed sequence."""
        adapter = self.adapters[self.slot_position]
        norm = self.input_layernorm
        x = norm(jnp.concatenate([hidden, embeddings.astype(hidden.dtype)], axis=-1).astype(norm.weight.dtype))
        attn, view = self.self_attn(x, attention_mask=attention_mask, position_ids=position_ids, view=view,
                                    active_rows=active_rows, lora=adapter.attention_lora(), seq_idx=seq_idx)
        y = self.pre_ff_layernorm(attn.astype(self.pre_ff_layernorm.weight.dtype))
        return self.feed_forward(y, lora=adapter.mlp_lora()), view


class Zamba2MambaBlock(ResidualBlock):
    """`h + mixer(norm(h))` (HF `Zamba2MambaDecoderLayer`: `input_layernorm`, `mamba`), residual in the model
    dtype."""

    MIXER = Mamba2Mixer

    def __init__(self, config: Zamba2Config, **kwargs):
        super().__init__(config, **kwargs)
        self.residual_in_fp32 = False

    @classmethod
    def mixer_config(cls, config: Zamba2Config):
        return config.mixer_config


class Zamba2HybridBlock(nnx.Module):
    """A hybrid layer (HF `Zamba2HybridLayer`): `t = linear(shared_transformer(h, emb))`, then
    `h + mixer(norm(h + t))` (HF `mamba_decoder`: `input_layernorm`, `mamba`). Its cache entry is the tuple
    (AttentionCacheView, Mamba2CacheView).

    Hook points: `hook_shared_out` (b, l, d) the shared block's output after `linear` (what is added to the
    mixer's input), `hook_resid_post` (b, l, d) the layer's output; the shared block's attention and MLP hooks
    are this layer's own (`shared_transformer.self_attn.hook_q`, ...).
    """

    HOOKS = ("hook_shared_out", "hook_resid_post")

    def __init__(self, config: Zamba2Config, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto",
                 owner: Zamba2SharedTransformer | None = None):
        self.shared_transformer = Zamba2SharedTransformer(config, layer_idx=layer_idx, rngs=rngs, dtype=dtype,
                                                          param_dtype=param_dtype, owner=owner)
        self.linear = _linear(config.hidden_size, config.hidden_size, ("embed", None), config.initializer_range,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.mixer = Mamba2Mixer(config.mixer_config, layer_idx=layer_idx, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype, kernel_impl=kernel_impl)
        self.mesh_rules: MeshRules | None = None

    takes_packed = True  # the shared attention and the Mamba-2 mixer take seq_idx; the MLP is per token

    def _shared(self, hidden, embeddings, attention_mask, position_ids, view, active_rows, seq_idx=None):
        if embeddings is None:
            raise ValueError("a Zamba2 hybrid layer needs embeddings= (the backbone's input embeddings)")
        t, view = self.shared_transformer(hidden, embeddings, attention_mask=attention_mask,
                                          position_ids=position_ids, view=view, active_rows=active_rows,
                                          seq_idx=seq_idx)
        t = self.linear(t)
        sow_hook(self, "hook_shared_out", t)
        return self.norm((hidden + t).astype(self.norm.weight.dtype)), view

    def __call__(self, hidden, *, attention_mask=None, view=None, position_ids=None, embeddings=None, seq_idx=None):
        """hidden (b, l, d), the layer's (attention, mamba2) views or None -> (hidden (b, l, d), views or None);
        seq_idx (b, l) marks packed sequences."""
        attn_view, ssm_view = (None, None) if view is None else view
        normed, attn_view = self._shared(hidden, embeddings, attention_mask, position_ids, attn_view, None, seq_idx)
        out, ssm_view = self.mixer.run(normed, ssm_view, attention_mask=attention_mask, seq_idx=seq_idx)
        return self._post(hidden, out), None if view is None else (attn_view, ssm_view)

    def step(self, hidden, view, *, attention_mask=None, active_rows=None, decode_weights=None, position_ids=None,
             embeddings=None):
        """One token: hidden (b, 1, d), the layer's views -> (hidden (b, 1, d), the renewed views)."""
        if view is None:
            raise ValueError("a Zamba2 hybrid layer's decode step needs its (attention, mamba2) cache views")
        attn_view, ssm_view = view
        normed, attn_view = self._shared(hidden, embeddings, attention_mask, position_ids, attn_view, active_rows)
        out, ssm_view = self.mixer.run_step(normed, ssm_view, attention_mask=attention_mask,
                                            active_rows=active_rows, decode_weights=decode_weights)
        return self._post(hidden, out), (attn_view, ssm_view)

    def decode_weights(self):
        return self.mixer.decode_weights()

    def _post(self, hidden, out):
        hidden = hidden + out
        sow_hook(self, "hook_resid_post", hidden)
        return hidden


def _blocks(config: Zamba2Config) -> list:
    """One constructor per layer. The layers are built in order, so a shared block's owner (its first hybrid
    layer) exists before the layers that run its parameters."""
    owners: dict[int, Zamba2SharedTransformer] = {}

    def hybrid(config, *, layer_idx, **kwargs):
        owner = config.shared_block_owner(layer_idx)
        block = Zamba2HybridBlock(config, layer_idx=layer_idx, owner=owners.get(owner), **kwargs)
        owners.setdefault(owner, block.shared_transformer)
        return block

    return [hybrid if kind == "hybrid" else Zamba2MambaBlock for kind in config.layers_block_type]


class Zamba2Model(Backbone):
    """Embeddings, the `layers_block_type` layers and the final norm (HF `Zamba2Model`)."""


class Zamba2ForCausalLM(CausalLM):
    """Zamba2 language model (HF `Zamba2ForCausalLM`): `model(input_ids, attention_mask=, cache=, labels=,
    inputs_embeds=, output_hidden_states=, position_ids=)` as HF; `model.step(tokens, cache)` is one decode step.
    `init_cache(batch, max_length=...)` preallocates the hybrid layers' key/value slots."""



def _shared_block_keys(config: Zamba2Config, hf: str, at: tuple, block: int) -> list[KeySpec]:
    """A shared block's tensors under `hf` ("model.layers.{owner}.shared_transformer."), module path `at`."""
    f = config.intermediate_size
    table = []
    mlp = at + ("feed_forward",)
    gate_up = {"gate_proj": f, "up_proj": f}
    table.append(packed_key(hf + "feed_forward.gate_up_proj.weight", "linear", mlp, "kernel", gate_up))
    if config.add_bias_linear:
        table.append(packed_key(hf + "feed_forward.gate_up_proj.bias", "copy", mlp, "bias", gate_up))
    table += linear_keys(hf + "feed_forward.down_proj", mlp + ("down_proj",), config.add_bias_linear)
    table.append(KeySpec(hf + "input_layernorm.weight", at + ("input_layernorm", "weight"), "copy"))
    table.append(KeySpec(hf + "pre_ff_layernorm.weight", at + ("pre_ff_layernorm", "weight"), "copy"))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        table += linear_keys(hf + "self_attn." + name, at + ("self_attn", name))
    for position, slot in enumerate(block_slots(config, block)):
        adapter = at + ("adapters", position)
        down = KeySpec(f"{hf}feed_forward.gate_up_proj_adapter_list.{slot}.0.weight",
                       adapter + ("gate_up", "down", "kernel"), "linear")
        up = packed_key(f"{hf}feed_forward.gate_up_proj_adapter_list.{slot}.1.weight", "linear",
                        adapter + ("gate_up",), "kernel", {"gate": f, "up": f})
        table += [down, up]
        if config.use_shared_attention_adapter:
            for p in ("q", "k", "v"):
                name = f"{hf}self_attn.linear_{p}_adapter_list.{slot}."
                table.append(KeySpec(name + "0.weight", adapter + (p, "down", "kernel"), "linear"))
                table.append(KeySpec(name + "1.weight", adapter + (p, "up", "kernel"), "linear"))
    return table


def zamba2_key_table(config: Zamba2Config) -> list[KeySpec]:
    """Every tensor of a `Zamba2ForCausalLM` under the names transformers' `save_pretrained` writes: a shared
    block's tensors once, under its owner layer (`Zamba2Config.shared_block_owner`), with every adapter slot of
    the block; per layer its own norm, mixer and (hybrid) `linear`."""
    table = [KeySpec("model.embed_tokens.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i, kind in enumerate(config.layers_block_type):
        hf = f"model.layers.{i}."
        at = ("backbone", "layers", i)
        if kind == "hybrid":
            table += linear_keys(hf + "linear", at + ("linear",))
            table.append(KeySpec(hf + "mamba_decoder.input_layernorm.weight", at + ("norm", "weight"), "copy"))
            table += mamba2_mixer_keys(config.mixer_config, hf + "mamba_decoder.mamba.", at + ("mixer",))
            if config.shared_block_owner(i) == i:
                table += _shared_block_keys(config, hf + "shared_transformer.", at + ("shared_transformer",),
                                            config.shared_block_index(i))
        else:
            table.append(KeySpec(hf + "input_layernorm.weight", at + ("norm", "weight"), "copy"))
            table += mamba2_mixer_keys(config.mixer_config, hf + "mamba.", at + ("mixer",))
    table.append(KeySpec("model.final_layernorm.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return table


def zamba2_mixer_facts(config: Zamba2Config, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, config value, tensor, implied value) for each size the checkpoint's tensors contradict: the
    embedding (vocab_size, hidden_size) and the first layer's mixer (n_mamba_heads, mamba_d_conv)."""
    out = []
    emb_name = "model.embed_tokens.weight"
    emb = shape_of(emb_name)
    if emb is not None and len(emb) == 2:
        if emb[0] != config.vocab_size:
            out.append(("vocab_size", config.vocab_size, emb_name, emb[0]))
        if emb[1] != config.hidden_size:
            out.append(("hidden_size", config.hidden_size, emb_name, emb[1]))
    mixer = "model.layers.0." + ("mamba_decoder.mamba." if config.layers_block_type[0] == "hybrid" else "mamba.")
    a_log = shape_of(mixer + "A_log")
    if a_log is not None and len(a_log) == 1 and a_log[0] != config.n_mamba_heads:
        out.append(("n_mamba_heads", config.n_mamba_heads, mixer + "A_log", a_log[0]))
    conv = shape_of(mixer + "conv1d.weight")
    if conv is not None and len(conv) == 3 and conv[2] != config.mamba_d_conv:
        out.append(("mamba_d_conv", config.mamba_d_conv, mixer + "conv1d.weight", conv[2]))
    return out


def zamba2_sharding_units(config: Zamba2Config) -> dict[str, int]:
    return {"heads": config.n_mamba_heads, "groups": config.mamba_ngroups, "vocab": config.vocab_size,
            "embed": config.hidden_size, "attn_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "mlp": config.intermediate_size, "experts": 1}


FAMILY = ModelFamily(
    model_type="zamba2",
    config_class=Zamba2Config,
    causal_lm=Zamba2ForCausalLM,
    backbone=Zamba2Model,
    blocks=_blocks,
    cache_class=HybridCache,
    cache_metadata=HybridCacheMetaData,
    key_table=zamba2_key_table,
    mixer_facts=zamba2_mixer_facts,
    sharding_units=zamba2_sharding_units,
    effective_attention=EffectiveAttention(Mamba2Mixer, ("hook_conv", "hook_dt"), "heads (h)",
                                           lambda cfg: cfg.mixer_config.num_heads,
                                           lambda cfg, *args: mamba2_operands(cfg.mixer_config, *args)),
    hidden_states_with_embeddings=True,
)
