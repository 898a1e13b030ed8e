"""The Falcon-H1 configuration: attention and a Mamba-2 mixer side by side in every layer, then a gated MLP.

Field names and defaults are those of Hugging Face `transformers.FalconH1Config` (5.25,
`transformers/models/falcon_h1/configuration_falcon_h1.py`), plus `head_dim`, which that class does not declare
but which `FalconH1ForCausalLM` reads (every published checkpoint sets it). The exact forward semantics are in
the project notes on Falcon-H1; the derived records are those of `easymamba/config/parts.py`.

Sizes
    vocab_size, hidden_size (d), num_hidden_layers, intermediate_size (the MLP's width)
    num_attention_heads, num_key_value_heads (None: = num_attention_heads), head_dim (None: d // heads)
    mamba_d_ssm         e, the mixer's inner width; None: mamba_expand * d
    mamba_n_heads, mamba_d_head   h and p with h * p == e; mamba_d_head "auto" becomes e // h at construction
    mamba_n_groups, mamba_d_state, mamba_d_conv, mamba_chunk_size   g, n, k, the SSD chunk length
Biases
    attention_bias (q, k, v, o), mlp_bias (gate, up, down), mamba_proj_bias (the mixer's in_proj),
    projectors_bias (the mixer's out_proj), mamba_conv_bias (the mixer's conv1d)
Mixer
    mamba_rms_norm      the gated RMSNorm is there (True) or the output is just y * silu(z) (False)
    mamba_norm_before_gate   norm(y) * silu(z) (True) or norm(y * silu(z)) (False); only with mamba_rms_norm
    time_step_limit     (lo, hi) clamp of dt in the chunked scan; (0, inf) = no clamp
muP multipliers (all plain floats unless said)
    embedding_multiplier        scales the embedding rows looked up
    lm_head_multiplier          scales the logits
    attention_in_multiplier     scales attention's input (q, k and v all see it), after input_layernorm
    attention_out_multiplier    scales attention's output (after o_proj)
    key_multiplier              scales the keys after k_proj, before RoPE
    ssm_in_multiplier           scales the mixer's input, before in_proj
    ssm_out_multiplier          scales the mixer's output (after out_proj)
    ssm_multipliers             five: in_proj's output parts [z | x | B | C | dt]
    mlp_multipliers             two: the gate projection's output (before the activation), the MLP's output
Other
    rope_parameters     {"rope_type": "default", "rope_theta": t}; other rope types are refused
    rms_norm_eps        eps of every RMSNorm (the gated one too)
    hidden_act          must be "silu"
    tie_word_embeddings, pad/bos/eos_token_id, use_cache, num_logits_to_keep, max_position_embeddings,
    attention_dropout, initializer_range   as in HF (generation, training and initialisation settings)

Layer cache: every layer keeps a Mamba-2 state and an attention key/value view, in that order
(`layer_cache_kinds[i] == ("mamba2", "attention")`): the order the layer runs them in, and the order of
transformers' `LinearAttentionAndFullAttentionLayer` (the linear-attention state, then the key/value cache).
"""

import dataclasses
import math
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
from easymamba.config.parts import AttentionConfig, Mamba2MixerConfig, MLPConfig

__all__ = ["FalconH1Config"]

_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
                "mamba_expand", "max_position_embeddings")
_BOOL_FIELDS = ("tie_word_embeddings", "use_cache", "mamba_conv_bias", "mamba_proj_bias", "mamba_norm_before_gate",
                "mamba_rms_norm", "projectors_bias", "attention_bias", "mlp_bias")
_MULTIPLIERS = ("lm_head_multiplier", "embedding_multiplier", "key_multiplier", "attention_out_multiplier",
                "attention_in_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")
_FLOAT_FIELDS = ("initializer_range", "rms_norm_eps", "attention_dropout") + _MULTIPLIERS
_DEFAULT_ROPE_THETA = 10000.0  # transformers' default when neither rope_parameters nor rope_theta is given


class _FrozenDict(dict):
    """A dict that cannot change and hashes, so that a config holding one stays hashable (a `jax.jit` static)."""

    def __hash__(self):  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _immutable(self, *args, **kwargs):
        raise TypeError("rope_parameters of a FalconH1Config cannot be changed; use config.replace(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _immutable  # type: ignore


def _rope_parameters(value: Any) -> _FrozenDict:
    """{"rope_theta": float, "rope_type": "default"} from None or a dict; other rope types are refused."""
    if value is None:
        value = {}
    _require(isinstance(value, Mapping), f"rope_parameters ({value!r}) must be a dict or None")
    value = dict(value)
    rope_type = value.get("rope_type", value.get("type", "default"))
    _require(rope_type == "default", f"rope_parameters has rope_type {rope_type!r}: only 'default' rotary "
             "embeddings (plain RoPE over the whole head) are supported for Falcon-H1, not scaled variants")
    unknown = sorted(set(value) - {"rope_type", "type", "rope_theta"})
    _require(not unknown, f"rope_parameters has keys {unknown} that default RoPE does not use; the model they "
             "describe may differ, so they are refused (only rope_type and rope_theta are read)")
    theta = value.get("rope_theta", _DEFAULT_ROPE_THETA)
    _require(_is_real(theta) and math.isfinite(theta) and theta > 0,
             f"rope_parameters['rope_theta'] ({theta!r}) must be a positive number")
    return _FrozenDict(rope_theta=float(theta), rope_type="default")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FalconH1Config(_ConfigIO):
    """Hyperparameters of a Falcon-H1 language model (HF `transformers.FalconH1Config`'s fields, plus `head_dim`).

    Frozen and hashable. Validated at construction: every failure is a `ValueError` naming the field and its
    value. `mamba_d_head="auto"` and `num_key_value_heads=None` are resolved as transformers resolves them, so a
    config equals the one transformers writes back. See the module docstring for the fields.
    """

    model_type: ClassVar[str] = "falcon_h1"  # HF's `model_type`; not a field

    vocab_size: int = 128000
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    max_position_embeddings: int = 8192
    attention_dropout: float = 0.0
    mamba_d_ssm: int | None = 1024
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    time_step_limit: tuple[float, float] = (0.0, _INF)
    projectors_bias: bool = False
    rope_parameters: Mapping[str, Any] | None = None
    lm_head_multiplier: float = 1.0
    embedding_multiplier: float = 1.0
    mlp_multipliers: tuple[float, float] | None = None
    key_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    ssm_multipliers: tuple[float, float, float, float, float] | None = None
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _check_types(self, _SIZE_FIELDS, _BOOL_FIELDS, _FLOAT_FIELDS, at_least_one=("mamba_chunk_size",))
        for name in ("mamba_d_ssm", "head_dim"):
            v = getattr(self, name)
            _require(v is None or (_is_int(v) and v >= 1), f"{name} ({v!r}) must be a positive integer or None")
        k = self.num_logits_to_keep
        _require(k is None or (_is_int(k) and k >= 0), f"num_logits_to_keep ({k!r}) must be an integer >= 0 or None")
        _require(self.hidden_act == "silu", f"hidden_act ({self.hidden_act!r}) must be 'silu': the Falcon-H1 mixer "
                 "gates with SiLU whatever this says, and its convolution and the MLP use this activation")
        _require(self.rms_norm_eps > 0.0, f"rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        _require(0.0 <= self.attention_dropout <= 1.0,
                 f"attention_dropout ({self.attention_dropout}) must be in [0, 1]")
        for name in _MULTIPLIERS:
            _require(math.isfinite(getattr(self, name)), f"{name} ({getattr(self, name)}) must be finite")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                 f"({self.num_key_value_heads})")

        limit = self.time_step_limit
        _require(isinstance(limit, (list, tuple)) and len(limit) == 2 and all(_is_real(x) for x in limit),
                 f"time_step_limit ({limit!r}) must be a pair of numbers (lo, hi)")
        lo, hi = float(limit[0]), float(limit[1])
        _require(lo >= 0.0, f"time_step_limit lower bound ({lo}) must be >= 0")
        _require(lo <= hi, f"time_step_limit ({lo}, {hi}) must have lower bound <= upper bound")
        object.__setattr__(self, "time_step_limit", (lo, hi))

        self._set_multipliers("mlp_multipliers", 2, "(gate, down)")
        self._set_multipliers("ssm_multipliers", 5, "(z, x, B, C, dt)")
        object.__setattr__(self, "rope_parameters", _rope_parameters(self.rope_parameters))

        e, h = self.mamba_intermediate_size, self.mamba_n_heads
        _require(e % h == 0, f"mamba_n_heads ({h}) must divide the mixer width ({e}: mamba_d_ssm, or mamba_expand "
                 "* hidden_size when mamba_d_ssm is None)")
        if self.mamba_d_head == "auto":
            object.__setattr__(self, "mamba_d_head", e // h)
        p = self.mamba_d_head
        _require(_is_int(p) and p >= 1, f"mamba_d_head ({p!r}) must be 'auto' or a positive integer")
        _require(p * h == e, f"mamba_d_head * mamba_n_heads ({p} * {h} = {p * h}) must equal the mixer width ({e})")
        _require(h % self.mamba_n_groups == 0,
                 f"mamba_n_heads ({h}) must be divisible by mamba_n_groups ({self.mamba_n_groups})")
        hd = self.resolved_head_dim
        _require(hd >= 1, f"hidden_size // num_attention_heads ({hd}) must be >= 1 when head_dim is not given")
        _require(hd % 2 == 0, f"the attention head dim ({hd}) must be even: RoPE rotates channel pairs")

    def _set_multipliers(self, name: str, n: int, what: str) -> None:
        v = getattr(self, name)
        if v is None:
            v = (1.0,) * n
        _require(isinstance(v, (list, tuple)) and len(v) == n and all(_is_real(x) and math.isfinite(x) for x in v),
                 f"{name} ({v!r}) must be {n} finite numbers {what}")
        object.__setattr__(self, name, tuple(float(x) for x in v))

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def mamba_intermediate_size(self) -> int:
        """e: mamba_d_ssm, or mamba_expand * hidden_size when mamba_d_ssm is None (transformers' rule)."""
        return self.mamba_expand * self.hidden_size if self.mamba_d_ssm is None else self.mamba_d_ssm

    @property
    def resolved_head_dim(self) -> int:
        """The attention head dim: head_dim, or hidden_size // num_attention_heads when it is None."""
        return self.hidden_size // self.num_attention_heads if self.head_dim is None else self.head_dim

    @property
    def layer_norm_epsilon(self) -> float:
        """The eps of the model's plain RMSNorms under the name the shared backbone reads: rms_norm_eps."""
        return self.rms_norm_eps

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @property
    def layer_types(self) -> list[str]:
        """transformers' `layer_types` (`layers_block_type`): "hybrid" for every layer."""
        return ["hybrid"] * self.num_hidden_layers

    # ---- the records the shared parts take -------------------------------------------------------

    @property
    def mixer_config(self) -> Mamba2MixerConfig:
        """The Mamba-2 mixer of every layer. `ssm_in_multiplier` and `ssm_out_multiplier` are not in it: the layer
        scales the mixer's input and output (the padding mask commutes with the input scale)."""
        return Mamba2MixerConfig(
            hidden_size=self.hidden_size, num_heads=self.mamba_n_heads, head_dim=self.mamba_d_head,
            state_size=self.mamba_d_state, n_groups=self.mamba_n_groups, conv_kernel=self.mamba_d_conv,
            num_hidden_layers=self.num_hidden_layers, chunk_size=self.mamba_chunk_size,
            use_bias=self.mamba_proj_bias, out_proj_bias=self.projectors_bias, use_conv_bias=self.mamba_conv_bias,
            layer_norm_epsilon=self.rms_norm_eps, time_step_limit=self.time_step_limit,
            initializer_range=self.initializer_range, gated_norm=self.mamba_rms_norm,
            norm_before_gate=self.mamba_norm_before_gate, norm_groups=self.mamba_n_groups,
            zxbcdt_multipliers=self.ssm_multipliers)

    @property
    def attention_config(self) -> AttentionConfig:
        """The attention of every layer: GQA, full RoPE, scale head_dim ** -0.5, keys times key_multiplier.
        `attention_in_multiplier` and `attention_out_multiplier` are applied by the layer."""
        hd = self.resolved_head_dim
        return AttentionConfig(
            in_size=self.hidden_size, out_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=hd, scaling=hd ** -0.5,
            qkv_bias=self.attention_bias, o_bias=self.attention_bias, rope_theta=self.rope_theta, rotary_dim=hd,
            key_multiplier=self.key_multiplier, initializer_range=self.initializer_range)

    @property
    def mlp_config(self) -> MLPConfig:
        """The feed-forward block: down(silu(gate(x) * m0) * up(x)) * m1, with (m0, m1) = mlp_multipliers."""
        return MLPConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         activation=self.hidden_act, gated=True, bias=self.mlp_bias,
                         gate_multiplier=self.mlp_multipliers[0], down_multiplier=self.mlp_multipliers[1],
                         initializer_range=self.initializer_range)

    @property
    def moe_config(self) -> None:
        """Falcon-H1 has no mixture of experts."""
        return None

    @property
    def layer_cache_kinds(self) -> tuple[tuple[str, ...], ...]:
        """Per layer ("mamba2", "attention"): both parts run side by side, the mixer first (see the module doc)."""
        return (("mamba2", "attention"),) * self.num_hidden_layers

    # ---- Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "FalconH1Config":
        """Read an HF Falcon-H1 `config.json` (a dict, the file or its directory).

        Keys that could change the model and that this config cannot represent are refused with a `ValueError`;
        the 4.x spelling `rope_theta` / `rope_scaling` is read into `rope_parameters`.
        """
        cfg = _load_config_dict(cfg)
        model_type = cfg.get("model_type")
        if model_type is not None and model_type != "falcon_h1":
            raise ValueError(f"model_type ({model_type!r}) must be 'falcon_h1' for FalconH1Config")
        return cls(**_hf_kwargs(cfg))

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content, as a dict (tuples become lists; infinity stays a float)."""
        out: dict[str, Any] = {"architectures": ["FalconH1ForCausalLM"], "model_type": "falcon_h1"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "head_dim" and v is None:
                continue  # transformers reads an absent head_dim as hidden_size // num_attention_heads
            if f.name == "rope_parameters":
                v = dict(v)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# Keys of a Falcon-H1 config.json that FalconH1ForCausalLM (5.25) never reads, with the values under which the
# checkpoint behind them is the network transformers builds. None: any value.
_FALCON_INERT = {
    # The original remote code's switches; transformers builds attention, the mixer and the MLP in every layer.
    "attn_layer_indices": (None,),
    "mamba_use_mlp": (True,),
    # The original code's MLP sizing rule; transformers takes intermediate_size.
    "mlp_expansion_factor": None,
}


def _hf_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from an HF Falcon-H1 config dict."""
    fields = {f.name for f in dataclasses.fields(FalconH1Config)}
    legacy = ("rope_theta", "rope_scaling", "layer_types", "layers_block_type")
    _refuse_unknown("the config", [k for k in cfg if k not in fields and k not in _HF_HARMLESS_KEYS
                                   and k not in _FALCON_INERT and k not in legacy], "FalconH1Config")
    for key, allowed in _FALCON_INERT.items():
        if key in cfg and allowed is not None and cfg[key] not in allowed:
            raise ValueError(f"{key} ({cfg[key]!r}) must be one of {list(allowed)}: transformers' Falcon-H1 builds "
                             "attention, the Mamba-2 mixer and the MLP in every layer, which a checkpoint written "
                             "with this setting does not have")
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    n_layers = kwargs.get("num_hidden_layers", 32)
    for key in ("layer_types", "layers_block_type"):
        types = cfg.get(key)
        if types is not None and (not isinstance(types, list) or any(t != "hybrid" for t in types)
                                  or len(types) != n_layers):
            raise ValueError(f"{key} ({types!r}) must list 'hybrid' once per layer ({n_layers} layers): every "
                             "Falcon-H1 layer runs attention and the Mamba-2 mixer side by side")

    rope = kwargs.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        if rope is not None:
            raise ValueError("the config has both rope_parameters and rope_scaling; give one")
        rope = scaling
    if "rope_theta" in cfg:
        theta = cfg["rope_theta"]
        if isinstance(rope, Mapping) and "rope_theta" in rope and rope["rope_theta"] != theta:
            raise ValueError(f"rope_theta ({theta!r}) differs from rope_parameters['rope_theta'] "
                             f"({rope['rope_theta']!r})")
        rope = {**(dict(rope) if isinstance(rope, Mapping) else {}), "rope_theta": theta}
    if rope is not None or "rope_parameters" in kwargs:
        kwargs["rope_parameters"] = rope

    if "time_step_limit" in kwargs:
        if kwargs["time_step_limit"] is None:
            raise ValueError("time_step_limit (None) must be a pair (lo, hi): transformers' Falcon-H1 mixer clamps "
                             "dt with it and fails without one; (0, inf) means no clamp")
        kwargs["time_step_limit"] = _parse_limit("time_step_limit", kwargs["time_step_limit"])
    for name in _MULTIPLIERS:
        if name in kwargs and kwargs[name] is None:
            raise ValueError(f"{name} (None) must be a number: transformers multiplies by it")
    return kwargs
