"""The Zamba2 configuration: a Mamba-2 backbone with shared transformer blocks, with Hugging Face's names.

Field names and defaults are those of `transformers.Zamba2Config` (5.25, `transformers/models/zamba2/
configuration_zamba2.py`); the defaults are Zamba2-2.7B's backbone shapes (not its n_mamba_heads, 80). The forward
semantics are written down in the project notes (zamba2.md); letters are those of `easymamba/typing.py`.

Layers
    layers_block_type   per layer "linear_attention" (a Mamba-2 layer; "mamba" is read as this, as HF does) or
                        "hybrid" (the shared transformer block, a per-layer linear d -> d, then the layer's own
                        Mamba-2 layer). None: HF's 54-layer pattern. `hybrid_layer_ids` lists the hybrid layers.
    num_mem_blocks      shared blocks; the i-th hybrid layer (counting hybrid layers only) uses block
                        i % num_mem_blocks. Shared only with tie_word_embeddings: HF 5.25 ties nothing
                        without it (`shared_block_owner`).
Mamba-2 mixer (every layer)
    mamba_d_state n, mamba_d_conv k, mamba_expand (e = mamba_expand * d), mamba_ngroups g, n_mamba_heads h;
    `mamba_headdim` p = e // h. chunk_size. The conv always has a bias (HF ignores use_conv_bias); the gated
    norm's eps is 1e-5 whatever rms_norm_eps says; dt is clamped to (time_step_min, inf) over a sequence and not
    clamped in the cached one-token step.
Shared block
    reads [h | embeddings] (2d): attention over 2d with num_attention_heads heads of `attention_head_dim` =
    2d // num_attention_heads, softmax scale (attention_head_dim / 2) ** -0.5, no biases, RoPE (rope_parameters)
    only when use_mem_rope; then a gated MLP d -> intermediate_size (None: 4d) -> d with hidden_act and biases
    when add_bias_linear. use_shared_attention_adapter adds per-hybrid-layer LoRA adapters (rank adapter_rank) to
    q, k and v; the MLP's gate_up_proj always has them.
Other
    add_bias_linear     biases of in_proj / out_proj of every mixer and of the MLPs (never of the attention)
    rms_norm_eps        every RMSNorm except the mixer's gated one
    tie_word_embeddings, pad/bos/eos_token_id, use_cache, num_logits_to_keep, max_position_embeddings,
    use_long_context (sets max_position_embeddings to 16384, as HF; no other effect with the default RoPE),
    use_mamba_kernels, use_mem_eff_path, attention_dropout, initializer_range, time_step_max/floor: kept as HF
    has them; they do not change the inference network.
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
    _refuse_unknown,
    _require,
)
from easymamba.config.parts import ACTIVATIONS, AttentionConfig, Mamba2MixerConfig, MLPConfig

__all__ = ["Zamba2Config"]

_MAMBA, _HYBRID = "linear_attention", "hybrid"
_LAYER_NAMES = {"mamba": _MAMBA, _MAMBA: _MAMBA, _HYBRID: _HYBRID}  # HF 5.x's legacy remap, restricted to Zamba2
# HF's default pattern (Zamba2-2.7B): hybrid layers 6, 12, ..., 42, 47, 51 of 54.
_DEFAULT_PATTERN = ((_MAMBA,) + ((_MAMBA,) * 5 + (_HYBRID,)) * 7 + (_MAMBA,) * 4 + (_HYBRID,) + (_MAMBA,) * 3
                    + (_HYBRID,) + (_MAMBA,) * 2)
# The mixer's gated RMSNorm eps, hard-coded in HF's Zamba2MambaMixer.
GATED_NORM_EPS = 1e-5

_SIZE_FIELDS = ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "mamba_d_state",
                "mamba_d_conv", "mamba_expand", "mamba_ngroups", "n_mamba_heads", "chunk_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "num_mem_blocks", "adapter_rank")
_BOOL_FIELDS = ("use_mamba_kernels", "use_conv_bias", "use_mem_eff_path", "add_bias_linear",
                "use_shared_attention_adapter", "use_mem_rope", "use_cache", "use_long_context", "tie_word_embeddings")
_FLOAT_FIELDS = ("time_step_min", "time_step_max", "time_step_floor", "attention_dropout", "initializer_range",
                 "rms_norm_eps")
# What HF's __post_init__ derives and `to_dict()` writes (published config.json files carry them). A stored value
# overrides the derived one in HF 5.25, so each must equal what this config derives (checked in from_hf).
_DERIVED_KEYS = ("attention_hidden_size", "attention_head_dim", "mamba_headdim", "hybrid_layer_ids")
# Written by HF (or by 4.x) and never read by Zamba2ForCausalLM: kv_channels = d // heads and num_query_groups =
# heads (Megatron names); time_step_limit (the 5.25 mixer hard-codes (time_step_min, inf)).
_UNUSED_KEYS = frozenset({"kv_channels", "num_query_groups", "time_step_limit"})


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True, kw_only=True)
class Zamba2Config(_ConfigIO):
    """Hyperparameters of a Zamba2 language model (HF `transformers.Zamba2Config`'s fields).

    Frozen and hashable: `layers_block_type` is a tuple of HF 5.25's names, `rope_parameters` a sorted tuple of
    (key, value) pairs (a dict is accepted and `to_hf` writes a dict). Validated at construction: every failure is
    a `ValueError` naming the fields and their values. See the module docstring for fields.
    """

    model_type: ClassVar[str] = "zamba2"  # HF's `model_type`; not a field

    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    hidden_size: int = 2560
    num_hidden_layers: int = 54
    layers_block_type: tuple[str, ...] | None = None
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_ngroups: int = 1
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    n_mamba_heads: int = 8
    use_mamba_kernels: bool = True
    use_conv_bias: bool = True
    chunk_size: int = 256
    use_mem_eff_path: bool = False
    add_bias_linear: bool = False
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    attention_dropout: float = 0.0
    num_mem_blocks: int = 1
    use_shared_attention_adapter: bool = False
    adapter_rank: int = 128
    use_mem_rope: bool = False
    rope_parameters: tuple[tuple[str, Any], ...] | None = None
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    num_logits_to_keep: int = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    use_long_context: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self):
        # HF's resolution of the None defaults (`intermediate_size or 4 * d`, so 0 also means 4d, as in HF).
        if self.intermediate_size is None or self.intermediate_size == 0:
            object.__setattr__(self, "intermediate_size",  # frozen
                               4 * self.hidden_size if _is_int(self.hidden_size) else self.hidden_size)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.use_long_context is True:
            object.__setattr__(self, "max_position_embeddings", 16384)  # as HF's __post_init__
        _check_types(self, _SIZE_FIELDS, _BOOL_FIELDS, _FLOAT_FIELDS)
        _require(_is_int(self.num_logits_to_keep) and self.num_logits_to_keep >= 0,
                 f"num_logits_to_keep ({self.num_logits_to_keep!r}) must be an integer >= 0")

        self._check_layers()
        self._check_rope()
        d, e, h, g = self.hidden_size, self.mamba_expand * self.hidden_size, self.n_mamba_heads, self.mamba_ngroups
        _require(e % h == 0, f"mamba_expand * hidden_size ({e}) must be divisible by n_mamba_heads ({h}): the "
                 "mixer splits its inner width into n_mamba_heads heads of mamba_headdim channels")
        _require(h % g == 0, f"n_mamba_heads ({h}) must be divisible by mamba_ngroups ({g})")
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        _require(heads % kv == 0,
                 f"num_attention_heads ({heads}) must be divisible by num_key_value_heads ({kv})")
        _require(2 * d >= heads, f"num_attention_heads ({heads}) must be at most 2 * hidden_size ({2 * d}): the "
                 "attention head dim is 2 * hidden_size // num_attention_heads")
        if self.use_shared_attention_adapter:
            _require(kv == heads and 2 * d % heads == 0,
                     f"use_shared_attention_adapter needs num_key_value_heads ({kv}) == num_attention_heads "
                     f"({heads}) dividing 2 * hidden_size ({2 * d}): HF's q/k/v adapters all write 2 * hidden_size "
                     "channels, and its model fails on any other shape")
        _require(self.hidden_act in ACTIVATIONS,
                 f"hidden_act ({self.hidden_act!r}) is not an MLP activation easymamba has; known: {list(ACTIVATIONS)}")
        for name in ("time_step_min", "time_step_max"):
            _require(getattr(self, name) > 0.0, f"{name} ({getattr(self, name)}) must be > 0")
        _require(self.time_step_min <= self.time_step_max,
                 f"time_step_min ({self.time_step_min}) must be <= time_step_max ({self.time_step_max})")
        _require(self.time_step_floor >= 0.0, f"time_step_floor ({self.time_step_floor}) must be >= 0")
        _require(self.rms_norm_eps > 0.0, f"rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        _require(self.attention_dropout >= 0.0, f"attention_dropout ({self.attention_dropout}) must be >= 0")

    def _check_layers(self):
        types = self.layers_block_type
        if types is None:
            types = _DEFAULT_PATTERN
        _require(isinstance(types, (list, tuple)) and all(isinstance(t, str) for t in types),
                 f"layers_block_type ({types!r}) must be a list of layer type names")
        bad = sorted({t for t in types if t not in _LAYER_NAMES})
        _require(not bad, f"layers_block_type has {bad}: a Zamba2 layer is 'linear_attention' (or its legacy name "
                 "'mamba') or 'hybrid'; the pre-transformers 'm'/'g' names of Zyphra's own fork are not read")
        types = tuple(_LAYER_NAMES[t] for t in types)
        object.__setattr__(self, "layers_block_type", types)
        _require(len(types) == self.num_hidden_layers,
                 f"layers_block_type has {len(types)} entries but num_hidden_layers is {self.num_hidden_layers}")

    def _check_rope(self):
        rope = self.rope_parameters
        if rope is None:
            rope = {"rope_type": "default", "rope_theta": 10000.0}
        if isinstance(rope, Mapping):
            rope = tuple(sorted(rope.items()))
        _require(isinstance(rope, tuple) and all(isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str)
                                                 for kv in rope),
                 f"rope_parameters ({self.rope_parameters!r}) must be a dict")
        rope = tuple((k, float(v) if k == "rope_theta" and _is_real(v) else _freeze(v)) for k, v in rope)
        object.__setattr__(self, "rope_parameters", rope)
        params = dict(rope)
        theta = params.get("rope_theta")
        _require(_is_real(theta) and theta > 0, f"rope_parameters.rope_theta ({theta!r}) must be a positive number")
        if self.use_mem_rope:
            kind = params.get("rope_type", "default")
            _require(kind == "default" and set(params) <= {"rope_type", "rope_theta"},
                     f"rope_parameters ({params!r}) must be the default RoPE (rope_type 'default' and rope_theta): "
                     "scaled RoPE variants are not part of easymamba's Zamba2")

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def hybrid_layer_ids(self) -> tuple[int, ...]:
        """Indices of the hybrid layers (HF's `hybrid_layer_ids`)."""
        return tuple(i for i, t in enumerate(self.layers_block_type) if t == _HYBRID)

    def shared_block_index(self, layer: int) -> int:
        """Which shared block hybrid layer `layer` runs: its rank among the hybrid layers, mod num_mem_blocks."""
        ids = self.hybrid_layer_ids
        if layer not in ids:
            raise ValueError(f"layer {layer} is not a hybrid layer; the hybrid layers are {list(ids)}")
        return ids.index(layer) % self.num_mem_blocks

    def shared_block_owner(self, layer: int) -> int:
        """The hybrid layer whose `shared_transformer` weights hybrid layer `layer` runs (the checkpoint stores
        them there only). With tie_word_embeddings, the first hybrid layer of the same shared block; without it,
        `layer` itself: HF 5.25 applies none of its tied-weight keys when tie_word_embeddings is False, so every
        hybrid layer then has a block of its own (its adapters still sit at the slot of its hybrid rank)."""
        block = self.shared_block_index(layer)
        if not self.tie_word_embeddings:
            return layer
        return next(i for i in self.hybrid_layer_ids if self.shared_block_index(i) == block)

    @property
    def attention_hidden_size(self) -> int:
        """2d: the shared block reads [h | embeddings]."""
        return 2 * self.hidden_size

    @property
    def attention_head_dim(self) -> int:
        """2d // num_attention_heads (HF's `attention_head_dim`, also its `head_dim`)."""
        return self.attention_hidden_size // self.num_attention_heads

    @property
    def mamba_intermediate_size(self) -> int:
        """e = mamba_expand * d."""
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_headdim(self) -> int:
        """p = e // n_mamba_heads."""
        return self.mamba_intermediate_size // self.n_mamba_heads

    @property
    def layer_norm_epsilon(self) -> float:
        """rms_norm_eps, under the name the shared backbone reads for its norms (every RMSNorm but the mixer's)."""
        return self.rms_norm_eps

    @property
    def rope_theta(self) -> float:
        return dict(self.rope_parameters)["rope_theta"]

    # ---- the parts' settings -------------------------------------------------------------------

    @property
    def mixer_config(self) -> Mamba2MixerConfig:
        """Every layer's Mamba-2 mixer: HF's Zamba2MambaMixer (bias on the conv always; gated norm over g groups
        with eps 1e-5; dt clamped to (time_step_min, inf) over a sequence, unclamped in the one-token step)."""
        return Mamba2MixerConfig(
            hidden_size=self.hidden_size, num_heads=self.n_mamba_heads, head_dim=self.mamba_headdim,
            state_size=self.mamba_d_state, n_groups=self.mamba_ngroups, conv_kernel=self.mamba_d_conv,
            num_hidden_layers=self.num_hidden_layers, chunk_size=self.chunk_size, use_bias=self.add_bias_linear,
            use_conv_bias=True, layer_norm_epsilon=GATED_NORM_EPS, time_step_limit=(self.time_step_min, _INF),
            time_step_min=self.time_step_min, time_step_max=self.time_step_max,
            time_step_floor=self.time_step_floor, initializer_range=self.initializer_range,
            norm_groups=self.mamba_ngroups)

    @property
    def attention_config(self) -> AttentionConfig:
        """The shared blocks' attention: reads 2d, writes d, scale (head_dim / 2) ** -0.5, no biases, RoPE over
        the whole head only when use_mem_rope. The LoRA adapters are not part of this record."""
        hd = self.attention_head_dim
        return AttentionConfig(
            in_size=self.attention_hidden_size, out_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=hd, scaling=(hd / 2) ** -0.5, qkv_bias=False, o_bias=False,
            rope_theta=self.rope_theta if self.use_mem_rope else None, rotary_dim=hd if self.use_mem_rope else None,
            initializer_range=self.initializer_range)

    @property
    def mlp_config(self) -> MLPConfig:
        """The shared blocks' MLP: gated act(gate) * up over d (gate_up_proj's first half is the gate)."""
        return MLPConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         activation=self.hidden_act, gated=True, bias=self.add_bias_linear,
                         initializer_range=self.initializer_range)

    @property
    def moe_config(self) -> None:
        return None

    @property
    def layer_cache_kinds(self) -> tuple[tuple[str, ...], ...]:
        """Per layer: ("attention", "mamba2") for a hybrid layer (the shared block runs first), ("mamba2",)."""
        return tuple(("attention", "mamba2") if t == _HYBRID else ("mamba2",) for t in self.layers_block_type)

    # ---- Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "Zamba2Config":
        """Read an HF `config.json` (dict, file, or the directory holding it). Keys that could change the model
        and that this config cannot represent are refused with a `ValueError`; HF's derived keys must agree."""
        cfg = _load_config_dict(cfg)
        model_type = cfg.get("model_type")
        if model_type is not None and model_type != "zamba2":
            raise ValueError(f"model_type ({model_type!r}) must be 'zamba2' for Zamba2Config")
        fields = {f.name for f in dataclasses.fields(cls)}
        aliases = {"layer_types": "layers_block_type", "head_dim": "attention_head_dim"}  # HF's attribute_map
        known = fields | set(_DERIVED_KEYS) | _UNUSED_KEYS | set(aliases) | {"rope_theta", "ffn_hidden_size"}
        _refuse_unknown("the config", [k for k in cfg if k not in known and k not in _HF_HARMLESS_KEYS],
                        "Zamba2Config")
        cfg = dict(cfg)
        for alias, name in aliases.items():
            if alias in cfg:
                value = cfg.pop(alias)
                if name in cfg and cfg[name] != value:
                    raise ValueError(f"{alias} ({value!r}) and {name} ({cfg[name]!r}) must agree: HF reads one as the "
                                     "other")
                cfg[name] = value
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        if "rope_theta" in cfg:  # 4.x's top-level key; 5.x moves it into rope_parameters
            rope = dict(kwargs.get("rope_parameters") or {"rope_type": "default"})
            if "rope_theta" in rope and rope["rope_theta"] != cfg["rope_theta"]:
                raise ValueError(f"rope_theta ({cfg['rope_theta']!r}) and rope_parameters.rope_theta "
                                 f"({rope['rope_theta']!r}) must agree")
            rope["rope_theta"] = cfg["rope_theta"]
            kwargs["rope_parameters"] = rope
        limit = cfg.get("time_step_limit")
        _require(limit is None or (isinstance(limit, (list, tuple)) and len(limit) == 2
                                   and all(_is_real(x) for x in limit)),
                 f"time_step_limit ({limit!r}) must be null or a pair of numbers (HF 5.25's Zamba2 mixer ignores it)")
        config = cls(**kwargs)
        for key in _DERIVED_KEYS:
            if key in cfg:
                value, ours = cfg[key], getattr(config, key)
                if _freeze(value) != ours:
                    raise ValueError(f"{key} ({value!r}) must be {list(ours) if isinstance(ours, tuple) else ours}, "
                                     f"what Zamba2Config derives from the other fields: HF 5.25 lets a stored value "
                                     f"override its own derivation, giving a model easymamba does not build")
        if "ffn_hidden_size" in cfg and cfg["ffn_hidden_size"] != config.intermediate_size:
            raise ValueError(f"ffn_hidden_size ({cfg['ffn_hidden_size']!r}) must equal intermediate_size "
                             f"({config.intermediate_size}): the older name of the MLP width")
        return config

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content, as a dict (tuples become lists; infinity stays a float)."""
        out: dict[str, Any] = {"architectures": ["Zamba2ForCausalLM"], "model_type": "zamba2"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "rope_parameters":
                v = {k: list(x) if isinstance(x, tuple) else x for k, x in v}
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out
