"""The Nemotron-H configuration (NVIDIA Nemotron-H / Nemotron-3 hybrids), with Hugging Face's names.

Field names and defaults are those of transformers 5.25's `NemotronHConfig`
(`transformers/models/nemotron_h/configuration_nemotron_h.py`). The layer pattern is `layers_block_type`, one of
"linear_attention" (a Mamba-2 mixer), "full_attention" (attention with GQA and no positional encoding), "mlp"
(a relu2 MLP) or "moe" (routed relu2 experts with a sigmoid, grouped router and a shared expert) per layer; the
legacy names "mamba" / "attention" and the legacy `hybrid_override_pattern` string ("M", "*", "-", "E") are read
too. `num_hidden_layers` is the pattern's length.

Every layer is `h + mixer(norm(h))` with the one RMSNorm eps `layer_norm_epsilon`; the Mamba-2 mixer's gated norm
is grouped over `n_groups` and its width is `mamba_num_heads * mamba_head_dim` (`expand` is not used by the
network). The derived part records (`mixer_config`, `attention_config`, `mlp_config`, `moe_config`) are what the
shared parts are built from (`easymamba/config/parts.py`).

Multi-token-prediction layers (`num_nextn_predict_layers > 0`, `mtp_layers_block_type`) are not run (nor does
transformers 5.25, which drops their weights on load): their `mtp.*` tensors are carried through loading and
saving unchanged (`CausalLM.carried_tensors`). Not modelled: sliding-window attention (`sliding_window` must be
None).
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from easymamba.config.common import (
    _HF_HARMLESS_KEYS,
    _INF,
    _check_types,
    _ConfigIO,
    _load_config_dict,
    _parse_limit,
    _refuse_unknown,
    _require,
)
from easymamba.config.parts import ACTIVATIONS, AttentionConfig, Mamba2MixerConfig, MLPConfig, MoEConfig

__all__ = ["NemotronHConfig", "NEMOTRON_H_LAYER_KINDS"]

NEMOTRON_H_LAYER_KINDS = ("linear_attention", "full_attention", "mlp", "moe")
_LEGACY_KINDS = {"mamba": "linear_attention", "attention": "full_attention"}
_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}

_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "conv_kernel",
                "chunk_size", "n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings")
_BOOL_FIELDS = ("tie_word_embeddings", "use_cache", "attention_bias", "mlp_bias", "use_conv_bias",
                "mamba_proj_bias", "norm_topk_prob", "use_bias", "residual_in_fp32", "rescale_prenorm_residual",
                "moe_shared_expert_overlap", "output_router_logits", "use_mamba_kernels")
_FLOAT_FIELDS = ("time_step_min", "time_step_max", "time_step_floor", "routed_scaling_factor", "initializer_range",
                 "layer_norm_epsilon", "attention_dropout", "hidden_dropout")
# HF's old names of some fields (NemotronHConfig.__post_init__ reads them).
_ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
            "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max", "mamba_dt_limit": "time_step_limit",
            "mamba_dt_init_floor": "time_step_floor", "mamba_conv_bias": "use_conv_bias",
            "mamba_chunk_size": "chunk_size", "num_local_experts": "n_routed_experts",
            "layer_types": "layers_block_type"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class NemotronHConfig(_ConfigIO):
    """Hyperparameters of a Nemotron-H model (HF `NemotronHConfig`'s fields). Frozen, hashable, validated."""

    model_type: ClassVar[str] = "nemotron_h"

    vocab_size: int = 131072
    hidden_size: int = 4096
    layers_block_type: tuple[str, ...] = ("linear_attention", "moe", "full_attention", "mlp")
    tie_word_embeddings: bool = False
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    use_mamba_kernels: bool = True
    ssm_state_size: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_limit: tuple[float, float] = (0.0, _INF)
    time_step_floor: float = 1e-4
    use_conv_bias: bool = True
    chunk_size: int = 128
    mamba_proj_bias: bool = False
    mamba_ssm_cache_dtype: str = "float32"
    n_routed_experts: int = 8
    output_router_logits: bool = False
    n_shared_experts: int = 1
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    moe_shared_expert_overlap: bool = True
    num_experts_per_tok: int = 2
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 0
    mtp_layers_block_type: tuple[str, ...] = ("full_attention", "moe")
    use_bias: bool = False
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = False
    hidden_dropout: float = 0.0
    rescale_prenorm_residual: bool = True

    def __post_init__(self):
        for name in ("layers_block_type", "mtp_layers_block_type"):
            kinds = getattr(self, name)
            _require(isinstance(kinds, (list, tuple)) and len(kinds) > 0 and all(isinstance(k, str) for k in kinds),
                     f"{name} ({kinds!r}) must be a non-empty list of layer kinds {list(NEMOTRON_H_LAYER_KINDS)}")
            kinds = tuple(_LEGACY_KINDS.get(k, k) for k in kinds)
            bad = sorted(set(kinds) - set(NEMOTRON_H_LAYER_KINDS))
            _require(not bad, f"{name} has unknown layer kinds {bad}; known: {list(NEMOTRON_H_LAYER_KINDS)}")
            object.__setattr__(self, name, kinds)
        _check_types(self, _SIZE_FIELDS, _BOOL_FIELDS, _FLOAT_FIELDS)
        object.__setattr__(self, "time_step_limit", _parse_limit("time_step_limit", self.time_step_limit))
        _require(self.mlp_hidden_act in ACTIVATIONS,
                 f"mlp_hidden_act ({self.mlp_hidden_act!r}) must be one of {list(ACTIVATIONS)}")
        _require(self.mamba_hidden_act in ("silu", "swish"),
                 f"mamba_hidden_act ({self.mamba_hidden_act!r}) must be 'silu': the Mamba-2 conv activation")
        _require(self.sliding_window is None,
                 f"sliding_window ({self.sliding_window!r}) must be None: easymamba's attention is full causal")
        _require(isinstance(self.num_nextn_predict_layers, int) and not isinstance(self.num_nextn_predict_layers, bool)
                 and self.num_nextn_predict_layers >= 0,
                 f"num_nextn_predict_layers ({self.num_nextn_predict_layers!r}) must be a non-negative integer")
        _require(self.moe_latent_size is None or (isinstance(self.moe_latent_size, int) and self.moe_latent_size > 0),
                 f"moe_latent_size ({self.moe_latent_size!r}) must be a positive integer or None")
        _require(self.mamba_ssm_cache_dtype in ("float32", "bfloat16", "float16"),
                 f"mamba_ssm_cache_dtype ({self.mamba_ssm_cache_dtype!r}) must be float32, bfloat16 or float16")
        # The derived records check the relations (heads vs groups, experts vs groups, ...).
        self.mixer_config, self.attention_config, self.mlp_config, self.moe_config  # noqa: B018

    # ---- derived ---------------------------------------------------------------------------------------------

    @property
    def ties_lm_head(self) -> bool:
        """False: transformers 5.25's `NemotronHForCausalLM` keeps its own `lm_head` (no tied-weight keys), so
        `tie_word_embeddings` changes nothing in the network; it is kept for the round trip."""
        return False

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        """The legacy one-letter pattern ("M", "*", "-", "E" per layer)."""
        letters = {kind: letter for letter, kind in _PATTERN.items()}
        return "".join(letters[kind] for kind in self.layers_block_type)

    @property
    def layer_cache_kinds(self) -> tuple[tuple[str, ...], ...]:
        kinds = {"linear_attention": ("mamba2",), "full_attention": ("attention",), "mlp": (), "moe": ()}
        return tuple(kinds[kind] for kind in self.layers_block_type)

    @property
    def mixer_config(self) -> Mamba2MixerConfig:
        return Mamba2MixerConfig(
            hidden_size=self.hidden_size, num_heads=self.mamba_num_heads, head_dim=self.mamba_head_dim,
            state_size=self.ssm_state_size, n_groups=self.n_groups, conv_kernel=self.conv_kernel,
            num_hidden_layers=self.num_hidden_layers, chunk_size=self.chunk_size, use_bias=self.use_bias,
            use_conv_bias=self.use_conv_bias, layer_norm_epsilon=self.layer_norm_epsilon,
            time_step_limit=self.time_step_limit, time_step_min=self.time_step_min,
            time_step_max=self.time_step_max, time_step_floor=self.time_step_floor,
            initializer_range=self.initializer_range, rescale_prenorm_residual=self.rescale_prenorm_residual)

    @property
    def attention_config(self) -> AttentionConfig:
        # transformers 5.25 builds q/k/v/o without biases whatever `attention_bias` says; so does easymamba.
        return AttentionConfig(in_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                               num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                               rope_theta=None, initializer_range=self.initializer_range)

    @property
    def mlp_config(self) -> MLPConfig:
        return MLPConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         activation=self.mlp_hidden_act, gated=False, bias=self.mlp_bias,
                         initializer_range=self.initializer_range)

    @property
    def moe_config(self) -> MoEConfig:
        shared = MLPConfig(hidden_size=self.hidden_size, intermediate_size=self.moe_shared_expert_intermediate_size,
                           activation=self.mlp_hidden_act, gated=False, bias=self.mlp_bias,
                           initializer_range=self.initializer_range)
        return MoEConfig(hidden_size=self.hidden_size, num_experts=self.n_routed_experts,
                         top_k=self.num_experts_per_tok, expert_intermediate_size=self.moe_intermediate_size,
                         activation=self.mlp_hidden_act, gated=False, router="sigmoid_grouped",
                         norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
                         n_group=self.n_group, topk_group=self.topk_group, latent_size=self.moe_latent_size,
                         bias=self.mlp_bias, shared=shared, initializer_range=self.initializer_range)

    # ---- Hugging Face interop --------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "NemotronHConfig":
        """Read an HF `config.json` (dict, file or directory); keys that would change the model and that this
        config cannot represent are refused with a `ValueError`."""
        cfg = _load_config_dict(cfg)
        model_type = cfg.get("model_type", "nemotron_h")
        if model_type != "nemotron_h":
            raise ValueError(f"model_type ({model_type!r}) must be 'nemotron_h' for NemotronHConfig")
        cfg = dict(cfg)
        for old, new in _ALIASES.items():
            if old in cfg:
                value = cfg.pop(old)
                cfg.setdefault(new, value)
        pattern = cfg.pop("hybrid_override_pattern", None)
        if pattern is not None and "layers_block_type" not in cfg:
            if not isinstance(pattern, str) or set(pattern) - set(_PATTERN):
                raise ValueError(f"hybrid_override_pattern ({pattern!r}) must be a string of {sorted(_PATTERN)}")
            cfg["layers_block_type"] = [_PATTERN[c] for c in pattern]
        mtp_pattern = cfg.pop("mtp_hybrid_override_pattern", None)
        if mtp_pattern is not None and "mtp_layers_block_type" not in cfg and isinstance(mtp_pattern, str):
            cfg["mtp_layers_block_type"] = [_PATTERN.get(c, c) for c in mtp_pattern]
        n_layers = cfg.pop("num_hidden_layers", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        _refuse_unknown("the config", [k for k in cfg if k not in fields and k not in _HF_HARMLESS_KEYS],
                        "NemotronHConfig")
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        for name in ("layers_block_type", "mtp_layers_block_type", "eos_token_id"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        config = cls(**kwargs)
        if n_layers is not None and n_layers != config.num_hidden_layers:
            raise ValueError(f"num_hidden_layers ({n_layers}) disagrees with layers_block_type, which has "
                             f"{config.num_hidden_layers} layers")
        return config

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content, as a dict."""
        out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["num_hidden_layers"] = self.num_hidden_layers
        return out
