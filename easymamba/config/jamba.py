"""The Jamba configuration (AI21 Jamba: Mamba-1 + attention + mixture-of-experts hybrids), with Hugging Face's names.

Field names and defaults are those of transformers 5.25's `JambaConfig`
(`transformers/models/jamba/configuration_jamba.py`). Every layer is two residual steps,
`h = h + mixer(input_layernorm(h)); h = h + feed_forward(pre_ff_layernorm(h))`:

    mixer           attention (GQA, no positional encoding) where `i % attn_layer_period == attn_layer_offset`,
                    else a Mamba-1 mixer (width mamba_expand * hidden_size) whose dt, B and C are RMS-normalised
                    with weights (eps `rms_norm_eps`) before dt_proj and the scan
    feed_forward    a mixture of `num_experts` gated experts (softmax over all router logits, then the top
                    `num_experts_per_tok`, the chosen weights NOT renormalised) where
                    `i % expert_layer_period == expert_layer_offset` and `num_experts > 1`, else a gated MLP

All norms are RMSNorms with eps `rms_norm_eps`; `hidden_act` is the MLPs', the experts' and the conv's
activation (silu). The derived part records (`mixer_config`, `attention_config`, `mlp_config`, `moe_config`) are
what the shared parts are built from (`easymamba/config/parts.py`).

Not modelled: the router's load-balancing loss (`output_router_logits=True`, which adds
`router_aux_loss_coef * aux_loss` to transformers' loss, is refused), a `head_dim` other than
hidden_size // num_attention_heads.
"""

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from easymamba.config.common import (
    _HF_HARMLESS_KEYS,
    _check_types,
    _ConfigIO,
    _is_int,
    _load_config_dict,
    _refuse_unknown,
    _require,
)
from easymamba.config.parts import AttentionConfig, MambaMixerConfig, MLPConfig, MoEConfig

__all__ = ["JambaConfig"]

_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "num_experts_per_tok", "num_experts",
                "expert_layer_period", "attn_layer_period", "mamba_d_state", "mamba_d_conv", "mamba_expand")
_BOOL_FIELDS = ("tie_word_embeddings", "use_cache", "output_router_logits", "use_mamba_kernels", "mamba_conv_bias",
                "mamba_proj_bias", "use_mambapy", "use_associative_scan")
_FLOAT_FIELDS = ("initializer_range", "rms_norm_eps", "router_aux_loss_coef", "attention_dropout")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JambaConfig(_ConfigIO):
    """Hyperparameters of a Jamba model (HF `JambaConfig`'s fields and defaults). Frozen, hashable, validated.

    `mamba_dt_rank` "auto" is ceil(hidden_size / 16), as transformers resolves it (and saves it resolved;
    `from_hf` reads that value back as "auto"). `use_mamba_kernels`, `use_mambapy`, `use_associative_scan` choose
    torch implementations and `attention_dropout`, `router_aux_loss_coef`, `max_position_embeddings` do not
    change the network's outputs here; they are kept for round trips.
    """

    model_type: ClassVar[str] = "jamba"

    vocab_size: int = 65536
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    max_position_embeddings: int = 262144
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_experts: int = 16
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    use_mamba_kernels: bool = True
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    use_mambapy: bool = False
    use_associative_scan: bool = True

    def __post_init__(self):
        _check_types(self, _SIZE_FIELDS, _BOOL_FIELDS, _FLOAT_FIELDS)
        for name, period in (("attn_layer_offset", "attn_layer_period"),
                             ("expert_layer_offset", "expert_layer_period")):
            offset, p = getattr(self, name), getattr(self, period)
            _require(_is_int(offset) and 0 <= offset < p,
                     f"{name} ({offset!r}) must be an integer in [0, {period}={p})")
        rank = self.mamba_dt_rank
        _require(rank == "auto" or (_is_int(rank) and rank >= 1),
                 f"mamba_dt_rank ({rank!r}) must be 'auto' or a positive integer")
        _require(self.hidden_act == "silu", f"hidden_act ({self.hidden_act!r}) must be 'silu': the Mamba mixer "
                 "has SiLU wired in after its convolution and in its gate, and transformers uses hidden_act there")
        _require(self.rms_norm_eps > 0.0, f"rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                 f"({self.num_key_value_heads})")
        _require(not self.output_router_logits,
                 "output_router_logits must be False: with it transformers adds the router's load-balancing loss "
                 "(router_aux_loss_coef * aux_loss) to the loss, which easymamba does not compute")
        # The derived records check the relations (experts vs top_k, ...).
        self.mixer_config, self.attention_config, self.mlp_config, self.moe_config  # noqa: B018

    # ---- derived ---------------------------------------------------------------------------------------------

    @property
    def layer_norm_epsilon(self) -> float:
        """The eps of every RMSNorm (`rms_norm_eps`), under the name the shared blocks read."""
        return self.rms_norm_eps

    @property
    def resolved_dt_rank(self) -> int:
        """r: `mamba_dt_rank` with "auto" resolved to ceil(hidden_size / 16)."""
        return math.ceil(self.hidden_size / 16) if self.mamba_dt_rank == "auto" else self.mamba_dt_rank

    @property
    def head_dim(self) -> int:
        """Each attention head's width: hidden_size // num_attention_heads (HF's default)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def layers_block_type(self) -> tuple[str, ...]:
        """Per layer its mixer: "attention" or "mamba" (HF `JambaConfig.layers_block_type`)."""
        return tuple("attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
                     for i in range(self.num_hidden_layers))

    @property
    def layers_num_experts(self) -> tuple[int, ...]:
        """Per layer its experts (HF's `layers_num_experts`): `num_experts` on the expert layers, else 1."""
        return tuple(self.num_experts if i % self.expert_layer_period == self.expert_layer_offset else 1
                     for i in range(self.num_hidden_layers))

    @property
    def layers_feed_forward(self) -> tuple[str, ...]:
        """Per layer its feed-forward part: "moe" (more than one expert) or "mlp", as transformers builds it."""
        return tuple("moe" if n > 1 else "mlp" for n in self.layers_num_experts)

    @property
    def layer_cache_kinds(self) -> tuple[tuple[str, ...], ...]:
        return tuple(("attention",) if kind == "attention" else ("mamba",) for kind in self.layers_block_type)

    @property
    def mixer_config(self) -> MambaMixerConfig | None:
        if "mamba" not in self.layers_block_type:
            return None
        return MambaMixerConfig(
            hidden_size=self.hidden_size, intermediate_size=self.mamba_expand * self.hidden_size,
            state_size=self.mamba_d_state, conv_kernel=self.mamba_d_conv, time_step_rank=self.resolved_dt_rank,
            num_hidden_layers=self.num_hidden_layers, use_bias=self.mamba_proj_bias,
            use_conv_bias=self.mamba_conv_bias, bcdt_rms_eps=self.rms_norm_eps, bcdt_norm_weights=True,
            initializer_range=self.initializer_range)

    @property
    def attention_config(self) -> AttentionConfig | None:
        if "attention" not in self.layers_block_type:
            return None
        return AttentionConfig(in_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                               num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                               rope_theta=None, initializer_range=self.initializer_range)

    @property
    def mlp_config(self) -> MLPConfig | None:
        if "mlp" not in self.layers_feed_forward:
            return None
        return MLPConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         activation=self.hidden_act, gated=True, initializer_range=self.initializer_range)

    @property
    def moe_config(self) -> MoEConfig | None:
        if "moe" not in self.layers_feed_forward:
            return None
        return MoEConfig(hidden_size=self.hidden_size, num_experts=self.num_experts, top_k=self.num_experts_per_tok,
                         expert_intermediate_size=self.intermediate_size, activation=self.hidden_act, gated=True,
                         router="softmax", norm_topk_prob=False, initializer_range=self.initializer_range)

    # ---- Hugging Face interop --------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "JambaConfig":
        """Read an HF `config.json` (dict, file or directory); keys that would change the model and that this
        config cannot represent are refused with a `ValueError`."""
        cfg = dict(_load_config_dict(cfg))
        model_type = cfg.get("model_type", "jamba")
        if model_type != "jamba":
            raise ValueError(f"model_type ({model_type!r}) must be 'jamba' for JambaConfig")
        if "num_local_experts" in cfg:  # HF's attribute_map alias
            value = cfg.pop("num_local_experts")
            if cfg.setdefault("num_experts", value) != value:
                raise ValueError(f"num_local_experts ({value!r}) and num_experts ({cfg['num_experts']!r}) are two "
                                 "names for one field and disagree")
        if cfg.get("num_key_value_heads", 0) is None:  # HF: None means one KV head per query head
            cfg["num_key_value_heads"] = cfg.get("num_attention_heads", cls.num_attention_heads)
        fields = {f.name for f in dataclasses.fields(cls)}
        head_dim = cfg.pop("head_dim", None)
        layer_types = cfg.pop("layer_types", None)
        _refuse_unknown("the config", [k for k in cfg if k not in fields and k not in _HF_HARMLESS_KEYS],
                        "JambaConfig")
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        rank, hidden = kwargs.get("mamba_dt_rank"), kwargs.get("hidden_size", cls.hidden_size)
        if _is_int(rank) and _is_int(hidden) and rank == math.ceil(hidden / 16):
            kwargs["mamba_dt_rank"] = "auto"  # transformers saves "auto" resolved; read it back as "auto"
        config = cls(**kwargs)
        if head_dim is not None and head_dim != config.head_dim:
            raise ValueError(f"head_dim ({head_dim!r}) must be hidden_size // num_attention_heads "
                             f"({config.head_dim}): other attention head widths are not modelled")
        if layer_types is not None:
            expected = ["full_attention" if k == "attention" else "linear_attention" for k in config.layers_block_type]
            if list(layer_types) != expected:
                raise ValueError(f"layer_types ({layer_types!r}) disagrees with attn_layer_period / "
                                 f"attn_layer_offset, which give {expected}")
        return config

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content, as transformers 5.25 writes it (mamba_dt_rank resolved)."""
        out: dict[str, Any] = {"architectures": ["JambaForCausalLM"], "model_type": "jamba"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["mamba_dt_rank"] = self.resolved_dt_rank
        return out
