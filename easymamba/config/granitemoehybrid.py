"""The Granite-4.0-H configuration (HF `transformers.GraniteMoeHybridConfig`, model_type "granitemoehybrid"):
Mamba-2 and attention layers as in Bamba (`bamba.py`, whose mamba_* fields and checks it shares), each followed
by a shared gated MLP plus, when `num_local_experts > 0`, routed experts; muP-style multipliers around it.
Field names and defaults are transformers 5.25's (`granitemoehybrid/configuration_granitemoehybrid.py`).

Layers
    layer_types             per layer "linear_attention" (Mamba-2) or "full_attention"; files may use the legacy
                            "mamba" / "attention", which transformers remaps (and so does this class). None: all
                            Mamba-2. `layers_block_type` is HF's alias
Attention
    num_attention_heads, num_key_value_heads (None: = heads), head_dim (None: hidden_size // heads),
    attention_bias (q, k, v and o), attention_multiplier (the softmax scale itself, not head_dim ** -0.5)
    position_embedding_type "rope": rotary embedding over the whole head (Granite's rope ignores any
                            partial_rotary_factor); None or "nope": no positional encoding
    rope_theta              stored by HF in `rope_parameters`
Feed-forward
    shared_intermediate_size  the shared MLP (`shared_mlp`, one packed input_linear [gate | up]), every layer
    num_local_experts, num_experts_per_tok, intermediate_size   the routed experts (softmax over the top-k router
                            logits); 0 experts: the shared MLP alone
Multipliers
    embedding_multiplier    scales the token embeddings
    residual_multiplier     scales each branch (mixer, feed-forward) before it is added to the residual
    logits_scaling          the LM head's logits are divided by it
Other
    rms_norm_eps            every RMSNorm (input_layernorm, post_attention_layernorm, norm, the gated norm)
    output_router_logits, router_aux_loss_coef, attention_dropout, initializer_range, max_position_embeddings,
    use_cache, token ids: no effect on inference
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from easymamba.config.bamba import (
    _LEGACY_LAYER_TYPES,
    ATTENTION,
    MAMBA,
    _check_hybrid,
    _hf_fields,
    _hf_head_dim,
    _mixer_record,
    _to_hf,
)
from easymamba.config.common import _INF, _ConfigIO, _is_int, _load_config_dict, _require
from easymamba.config.parts import AttentionConfig, Mamba2MixerConfig, MLPConfig, MoEConfig
from easymamba.config.rope import read_rope, rope_hf_dict

_POSITION_TYPES = (None, "nope", "rope")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraniteMoeHybridConfig(_ConfigIO):
    """Hyperparameters of a Granite-4.0-H language model (HF `transformers.GraniteMoeHybridConfig`'s fields; see the
    module docstring). Frozen, hashable, validated at construction; `mamba_d_head="auto"`,
    `num_key_value_heads=None` and `layer_types=None` are resolved at construction, as HF does."""

    model_type: ClassVar[str] = "granitemoehybrid"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    shared_intermediate_size: int = 1024
    position_embedding_type: str | None = None
    layer_types: tuple[str, ...] | None = None
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: int | str = "auto"
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, _INF)
    head_dim: int | None = None

    def __post_init__(self):
        _check_hybrid(self, ("intermediate_size", "max_position_embeddings", "shared_intermediate_size",
                             "num_experts_per_tok"), ("output_router_logits",),
                      ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier",
                       "router_aux_loss_coef"), "Granite-4.0-H")
        e = self.num_local_experts
        _require(_is_int(e) and e >= 0, f"num_local_experts ({e!r}) must be an integer >= 0 (0: no routed experts)")
        if e:
            _require(self.num_experts_per_tok <= e, f"num_experts_per_tok ({self.num_experts_per_tok}) must be at "
                     f"most num_local_experts ({e})")
        _require(self.logits_scaling != 0.0, "logits_scaling (0.0) must be nonzero: the logits are divided by it")
        _require(self.position_embedding_type in _POSITION_TYPES,
                 f"position_embedding_type ({self.position_embedding_type!r}) must be one of {list(_POSITION_TYPES)}")
        types = self.layer_types
        if types is None:
            types = (MAMBA,) * self.num_hidden_layers
        _require(isinstance(types, (list, tuple)), f"layer_types ({types!r}) must be a list of layer types")
        types = tuple(_LEGACY_LAYER_TYPES.get(t, t) for t in types)
        _require(all(t in (MAMBA, ATTENTION) for t in types),
                 f"layer_types ({list(types)!r}) must contain only 'linear_attention' / 'mamba' or "
                 "'full_attention' / 'attention'")
        _require(len(types) == self.num_hidden_layers,
                 f"layer_types has {len(types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        object.__setattr__(self, "layer_types", types)

    # ---- layer pattern and part records ----------------------------------------------------------

    @property
    def layers_block_type(self) -> tuple[str, ...]:
        """HF's alias of `layer_types`."""
        return self.layer_types

    @property
    def layer_norm_epsilon(self) -> float:
        """The eps of every RMSNorm (`rms_norm_eps`), under the name the shared blocks read."""
        return self.rms_norm_eps

    @property
    def logits_multiplier(self) -> float:
        """What the causal LM multiplies its logits by: 1 / `logits_scaling` (HF divides by it)."""
        return 1.0 / self.logits_scaling

    @property
    def layer_cache_kinds(self) -> tuple[tuple[str, ...], ...]:
        return tuple(("attention",) if t == ATTENTION else ("mamba2",) for t in self.layer_types)

    @property
    def mixer_config(self) -> Mamba2MixerConfig | None:
        return _mixer_record(self) if MAMBA in self.layer_types else None

    @property
    def attention_config(self) -> AttentionConfig | None:
        if ATTENTION not in self.layer_types:
            return None
        rope = self.position_embedding_type == "rope"
        return AttentionConfig(in_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                               num_key_value_heads=self.num_key_value_heads, head_dim=_hf_head_dim(self),
                               scaling=self.attention_multiplier, qkv_bias=self.attention_bias,
                               o_bias=self.attention_bias, rope_theta=self.rope_theta if rope else None,
                               rotary_dim=_hf_head_dim(self) if rope else None,
                               initializer_range=self.initializer_range)

    @property
    def mlp_config(self) -> MLPConfig:
        """The shared MLP (`shared_mlp`) of every layer: output_linear(silu(g) * u), [g | u] = input_linear(x), no
        biases. Without routed experts it is the whole feed-forward; with them it is `moe_config.shared`."""
        return MLPConfig(hidden_size=self.hidden_size, intermediate_size=self.shared_intermediate_size,
                         activation=self.hidden_act, gated=True, bias=False,
                         initializer_range=self.initializer_range)

    @property
    def moe_config(self) -> MoEConfig | None:
        """The routed experts plus the shared MLP (None without experts): softmax over the top-k router logits."""
        if not self.num_local_experts:
            return None
        return MoEConfig(hidden_size=self.hidden_size, num_experts=self.num_local_experts,
                         top_k=self.num_experts_per_tok, expert_intermediate_size=self.intermediate_size,
                         activation=self.hidden_act, gated=True, router="softmax_topk", norm_topk_prob=False,
                         bias=False, shared=self.mlp_config, initializer_range=self.initializer_range)

    # ---- Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "GraniteMoeHybridConfig":
        """Read an HF Granite-4.0-H `config.json` (dict, file or directory); keys that could change the model and
        that this config cannot represent are refused with a ValueError."""
        cfg = _load_config_dict(cfg)
        if cfg.get("model_type", "granitemoehybrid") != "granitemoehybrid":
            raise ValueError(f"model_type ({cfg['model_type']!r}) must be 'granitemoehybrid' for "
                             "GraniteMoeHybridConfig")
        theta, factor, top_factor = read_rope(cfg, "GraniteMoeHybridConfig")
        for value in (factor, top_factor):
            if value not in (None, 1, 1.0):
                raise ValueError(f"partial_rotary_factor ({value!r}) must be 1 or absent: transformers' Granite-4.0-H "
                                 "rotates whole heads whatever this says, so a file that names another factor is "
                                 "ambiguous")
        norm = cfg.pop("normalization_function", "rmsnorm")
        if norm != "rmsnorm":
            raise ValueError(f"normalization_function ({norm!r}) must be 'rmsnorm': the model has only RMSNorm")
        if "layers_block_type" in cfg:
            if "layer_types" in cfg and cfg["layer_types"] != cfg["layers_block_type"]:
                raise ValueError("layer_types and layers_block_type (its alias) disagree")
            cfg["layer_types"] = cfg.pop("layers_block_type")
        kwargs = _hf_fields(cls, cfg, "GraniteMoeHybridConfig", ("init_method",))
        kwargs["rope_theta"] = theta
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content transformers 5.25 writes for this config (infinity stays a float)."""
        out = _to_hf(self, "GraniteMoeHybridForCausalLM", ("rope_theta",))
        out["rope_parameters"] = rope_hf_dict(self.rope_theta)
        return out
