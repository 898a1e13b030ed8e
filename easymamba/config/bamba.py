"""The Bamba configuration (HF `transformers.BambaConfig`, model_type "bamba"): a stack of Mamba-2 and attention
layers, each followed by a gated MLP. Field names and defaults are transformers 5.25's
(`transformers/models/bamba/configuration_bamba.py`). Granite-4.0-H (`granitemoehybrid.py`) shares the mamba_*
fields and their checks, which live here.

Layers
    num_hidden_layers       L; layer i is attention when i is in `attn_layer_indices`, else Mamba-2
    attn_layer_indices      the attention layers (None or empty: none). HF's `layers_block_type` (and its alias
                            `layer_types`) is derived: "full_attention" / "linear_attention" per layer
Attention (layers in attn_layer_indices)
    num_attention_heads, num_key_value_heads (None: = heads), head_dim (None: hidden_size // heads; an HF
    config only has it when its file does), attention_bias (q, k, v and o alike)
    rope_theta, partial_rotary_factor   stored by HF in `rope_parameters`; the first int(head_dim * factor)
                            channels of each head rotate. BambaConfig hard-codes the factor 0.5 unless
                            `rope_parameters` names one; a top-level `partial_rotary_factor` is overwritten by it
Mamba-2 (the other layers)
    mamba_n_heads h, mamba_d_head p ("auto": mamba_expand * hidden_size // h), mamba_n_groups g,
    mamba_d_state n, mamba_d_conv k, mamba_chunk_size, mamba_expand (HF's mixer width is
    int(mamba_expand * hidden_size), which HF requires to equal h * p), mamba_conv_bias, mamba_proj_bias
    (in_proj and out_proj), time_step_limit (the dt clamp, applied by every path here; HF's one-token decode
    step skips it, so with a limit that bites HF's cached steps differ from HF's own forward, see
    docs/status.md). The gated RMSNorm has eps `rms_norm_eps` and g
    groups of (h * p) // g channels
MLP
    intermediate_size, hidden_act (must be "silu": it is also the Mamba conv activation), mlp_bias
Other
    rms_norm_eps            every RMSNorm (input_layernorm, pre_ff_layernorm, final_layernorm, the gated norm)
    tie_word_embeddings, vocab_size, token ids, use_cache, num_logits_to_keep (logits kept in `generate`),
    max_position_embeddings, attention_dropout, z_loss_coefficient, initializer_range: no effect on inference
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
    _is_int,
    _is_real,
    _load_config_dict,
    _parse_limit,
    _refuse_unknown,
    _require,
)
from easymamba.config.parts import AttentionConfig, Mamba2MixerConfig, MLPConfig, MoEConfig
from easymamba.config.rope import read_rope, rope_hf_dict

# transformers 5.x names of the two layer kinds, and the legacy names it remaps to them.
MAMBA, ATTENTION = "linear_attention", "full_attention"
_LEGACY_LAYER_TYPES = {"mamba": MAMBA, "attention": ATTENTION}

# Fields both IBM hybrids share (checked by `_check_hybrid`).
_HYBRID_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                 "mamba_chunk_size")
_HYBRID_BOOLS = ("use_cache", "tie_word_embeddings", "attention_bias", "mamba_conv_bias", "mamba_proj_bias")
_HYBRID_FLOATS = ("initializer_range", "rms_norm_eps", "attention_dropout", "rope_theta")


def _check_hybrid(cfg: Any, sizes: tuple[str, ...], bools: tuple[str, ...], floats: tuple[str, ...],
                  model_name: str) -> None:
    """Resolve the "auto"/None defaults as HF does, then check what Bamba and Granite-4.0-H share."""
    if cfg.num_key_value_heads is None:
        object.__setattr__(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if cfg.mamba_d_head == "auto":
        for name in ("mamba_expand", "hidden_size", "mamba_n_heads"):
            v = getattr(cfg, name)
            _require(_is_int(v) and v >= 1, f"{name} ({v!r}) must be a positive integer")
        object.__setattr__(cfg, "mamba_d_head", cfg.mamba_expand * cfg.hidden_size // cfg.mamba_n_heads)
    _check_types(cfg, _HYBRID_SIZES + sizes, _HYBRID_BOOLS + bools, _HYBRID_FLOATS + floats)
    _require(cfg.rms_norm_eps > 0.0, f"rms_norm_eps ({cfg.rms_norm_eps}) must be > 0")
    _require(cfg.rope_theta > 0.0, f"rope_theta ({cfg.rope_theta}) must be > 0")
    _require(cfg.hidden_act == "silu", f"hidden_act ({cfg.hidden_act!r}) must be 'silu': it is the MLP's gate "
             f"activation and also the Mamba-2 convolution's, and the {model_name} mixer's gated norm has SiLU "
             "wired in")
    e = cfg.mamba_expand * cfg.hidden_size
    _require(cfg.mamba_n_heads * cfg.mamba_d_head == e,
             f"mamba_n_heads * mamba_d_head ({cfg.mamba_n_heads} * {cfg.mamba_d_head}) must equal mamba_expand * "
             f"hidden_size ({e}): HF's mixer is {e} wide and splits it into the heads")
    _require(cfg.mamba_n_heads % cfg.mamba_n_groups == 0,
             f"mamba_n_heads ({cfg.mamba_n_heads}) must be divisible by mamba_n_groups ({cfg.mamba_n_groups})")
    _require(cfg.num_attention_heads % cfg.num_key_value_heads == 0,
             f"num_attention_heads ({cfg.num_attention_heads}) must be divisible by num_key_value_heads "
             f"({cfg.num_key_value_heads})")
    if cfg.head_dim is None:
        _require(cfg.hidden_size % cfg.num_attention_heads == 0,
                 f"hidden_size ({cfg.hidden_size}) must be divisible by num_attention_heads "
                 f"({cfg.num_attention_heads}) when head_dim is not given")
    else:
        _require(_is_int(cfg.head_dim) and cfg.head_dim >= 1, f"head_dim ({cfg.head_dim!r}) must be a positive "
                 "integer or None")
    limit = cfg.time_step_limit
    _require(isinstance(limit, (list, tuple)) and len(limit) == 2 and all(_is_real(x) for x in limit),
             f"time_step_limit ({limit!r}) must be a pair of numbers (lo, hi); HF's scan cannot run without one")
    lo, hi = float(limit[0]), float(limit[1])
    _require(0.0 <= lo <= hi, f"time_step_limit ({lo}, {hi}) must satisfy 0 <= lo <= hi")
    object.__setattr__(cfg, "time_step_limit", (lo, hi))


def _mixer_record(cfg: Any) -> Mamba2MixerConfig:
    return Mamba2MixerConfig(
        hidden_size=cfg.hidden_size, num_heads=cfg.mamba_n_heads, head_dim=cfg.mamba_d_head,
        state_size=cfg.mamba_d_state, n_groups=cfg.mamba_n_groups, conv_kernel=cfg.mamba_d_conv,
        num_hidden_layers=cfg.num_hidden_layers, chunk_size=cfg.mamba_chunk_size, use_bias=cfg.mamba_proj_bias,
        use_conv_bias=cfg.mamba_conv_bias, layer_norm_epsilon=cfg.rms_norm_eps, time_step_limit=cfg.time_step_limit,
        initializer_range=cfg.initializer_range, gated_norm=True, norm_before_gate=False,
        norm_groups=cfg.mamba_n_groups)


def _hf_head_dim(cfg: Any) -> int:
    return cfg.hidden_size // cfg.num_attention_heads if cfg.head_dim is None else cfg.head_dim


def _hf_fields(cls, cfg: dict[str, Any], config_name: str, extra_known: tuple[str, ...]) -> dict[str, Any]:
    """The keys of `cfg` that are fields of `cls`, unknown network-changing keys refused."""
    fields = {f.name for f in dataclasses.fields(cls)}
    _refuse_unknown("the config", [k for k in cfg if k not in fields and k not in _HF_HARMLESS_KEYS
                                   and k not in extra_known], config_name)
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    if "time_step_limit" in kwargs:
        kwargs["time_step_limit"] = _parse_limit("time_step_limit", kwargs["time_step_limit"])
    return kwargs


def _to_hf(cfg: Any, architecture: str, skip: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": [architecture], "model_type": cfg.model_type}
    for f in dataclasses.fields(cfg):
        if f.name in skip or (f.name == "head_dim" and cfg.head_dim is None):
            continue
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class BambaConfig(_ConfigIO):
    """Hyperparameters of a Bamba language model (HF `transformers.BambaConfig`'s fields; see the module docstring).

    Frozen and hashable (a static argument of `jax.jit`); validated at construction with `ValueError`s that name
    the fields. `mamba_d_head="auto"` and `num_key_value_heads=None` are resolved at construction, as HF does.
    """

    model_type: ClassVar[str] = "bamba"

    vocab_size: int = 128000
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    max_position_embeddings: int = 262144
    attention_dropout: float = 0.0
    attn_layer_indices: tuple[int, ...] | None = None
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, _INF)
    z_loss_coefficient: float = 0.0
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    attention_bias: bool = False
    mlp_bias: bool = False
    head_dim: int | None = None

    def __post_init__(self):
        _check_hybrid(self, ("intermediate_size", "max_position_embeddings"), ("mlp_bias",),
                      ("z_loss_coefficient", "partial_rotary_factor"), "Bamba")
        n = self.num_logits_to_keep
        _require(n is None or (_is_int(n) and n >= 0), f"num_logits_to_keep ({n!r}) must be None or an integer >= 0")
        idx = self.attn_layer_indices
        if idx is not None:
            _require(isinstance(idx, (list, tuple)) and all(_is_int(i) for i in idx),
                     f"attn_layer_indices ({idx!r}) must be a list of layer indices or None")
            _require(all(0 <= i < self.num_hidden_layers for i in idx) and len(set(idx)) == len(idx),
                     f"attn_layer_indices ({list(idx)}) must be distinct layer indices in [0, num_hidden_layers="
                     f"{self.num_hidden_layers})")
            object.__setattr__(self, "attn_layer_indices", tuple(sorted(idx)) if idx else None)
        f = self.partial_rotary_factor
        _require(0.0 < f <= 1.0, f"partial_rotary_factor ({f}) must be in (0, 1]")
        r = int(_hf_head_dim(self) * f)
        _require(r >= 2 and r % 2 == 0, f"int(head_dim * partial_rotary_factor) = int({_hf_head_dim(self)} * {f}) "
                 f"= {r} rotating channels per head must be even and >= 2")

    # ---- layer pattern and part records ----------------------------------------------------------

    @property
    def layers_block_type(self) -> list[str]:
        """Per layer "full_attention" or "linear_attention" (Mamba-2), HF's derived list."""
        attn = set(self.attn_layer_indices or ())
        return [ATTENTION if i in attn else MAMBA for i in range(self.num_hidden_layers)]

    layer_types = layers_block_type  # HF's attribute_map alias

    @property
    def layer_norm_epsilon(self) -> float:
        """The eps of every RMSNorm (`rms_norm_eps`), under the name the shared blocks read."""
        return self.rms_norm_eps

    @property
    def layer_cache_kinds(self) -> tuple[tuple[str, ...], ...]:
        return tuple(("attention",) if t == ATTENTION else ("mamba2",) for t in self.layers_block_type)

    @property
    def mixer_config(self) -> Mamba2MixerConfig | None:
        return _mixer_record(self) if MAMBA in self.layers_block_type else None

    @property
    def attention_config(self) -> AttentionConfig | None:
        if not self.attn_layer_indices:
            return None
        p = _hf_head_dim(self)
        return AttentionConfig(in_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                               num_key_value_heads=self.num_key_value_heads, head_dim=p, scaling=p ** -0.5,
                               qkv_bias=self.attention_bias, o_bias=self.attention_bias, rope_theta=self.rope_theta,
                               rotary_dim=int(p * self.partial_rotary_factor),
                               initializer_range=self.initializer_range)

    @property
    def mlp_config(self) -> MLPConfig:
        """The gated `feed_forward` of every layer: down(silu(gate(x)) * up(x)), biases `mlp_bias`."""
        return MLPConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         activation=self.hidden_act, gated=True, bias=self.mlp_bias,
                         initializer_range=self.initializer_range)

    @property
    def moe_config(self) -> MoEConfig | None:
        return None

    # ---- Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "BambaConfig":
        """Read an HF Bamba `config.json` (dict, file or directory); keys that could change the model and that this
        config cannot represent are refused with a ValueError."""
        cfg = _load_config_dict(cfg)
        if cfg.get("model_type", "bamba") != "bamba":
            raise ValueError(f"model_type ({cfg['model_type']!r}) must be 'bamba' for BambaConfig")
        theta, factor, top_factor = read_rope(cfg, "BambaConfig")
        factor = 0.5 if factor is None else factor  # BambaConfig.__post_init__ hard-codes 0.5 as the fallback
        if top_factor is not None and top_factor != factor:
            raise ValueError(f"partial_rotary_factor ({top_factor!r}) at the top level differs from the one "
                             f"transformers uses ({factor!r}, from rope_parameters or BambaConfig's fixed 0.5); "
                             "put it in rope_parameters if it is meant")
        kwargs = _hf_fields(cls, cfg, "BambaConfig", ("attn_rotary_emb", "use_mamba_kernels", "layer_types",
                                                      "layers_block_type", "num_experts"))
        if cfg.get("num_experts", 1) != 1:
            raise ValueError(f"num_experts ({cfg['num_experts']!r}) must be 1: Bamba's feed-forward is one MLP")
        kwargs.update(rope_theta=theta, partial_rotary_factor=factor)
        out = cls(**kwargs)
        rotary = int(_hf_head_dim(out) * out.partial_rotary_factor)
        if cfg.get("attn_rotary_emb", rotary) != rotary:
            raise ValueError(f"attn_rotary_emb ({cfg['attn_rotary_emb']!r}) differs from the rotating channels "
                             f"transformers uses (int(head_dim * partial_rotary_factor) = {rotary})")
        for key in ("layer_types", "layers_block_type"):
            if key in cfg and [_LEGACY_LAYER_TYPES.get(t, t) for t in cfg[key]] != out.layers_block_type:
                raise ValueError(f"{key} ({cfg[key]!r}) disagrees with attn_layer_indices "
                                 f"({list(out.attn_layer_indices or [])}), which transformers' Bamba follows")
        return out

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content transformers 5.25 writes for this config (infinity stays a float)."""
        out = _to_hf(self, "BambaForCausalLM", ("rope_theta", "partial_rotary_factor"))
        out["rope_parameters"] = rope_hf_dict(self.rope_theta, self.partial_rotary_factor)
        return out
