"""The Mamba-2 configuration: sizes, SSM settings and token ids, with Hugging Face's names.

The Mamba-2 config (the Mamba-1 one is `easymamba/config/mamba1.py`); both share `easymamba/config/common.py`.

Field names and defaults are those of Hugging Face `transformers.Mamba2Config` (5.25,
`transformers/models/mamba2/configuration_mamba2.py`); the defaults are Mamba-Codestral-7B's shapes.
Letters are those of `easymamba/typing.py`.

Sizes
    vocab_size          v, rows of the embedding and of the LM head
    hidden_size         d, the residual stream width
    num_hidden_layers   number of Mamba-2 blocks
    expand              e = expand * d is the mixer's inner width (`intermediate_size`)
    num_heads, head_dim h and p; h * p must equal e
    state_size          n, the SSM state per head is [p, n]
    n_groups            g, groups sharing one B and one C (like GQA's KV groups); h % g == 0. The gated
                        RMSNorm also normalises over these g groups (mamba_ssm, and HF from 5.23).
    conv_kernel         k, width of the causal depthwise convolution over xBC (`conv_dim` channels)
    chunk_size          q, chunk length of the chunked SSD scan (changes speed and rounding only)

Step size dt
    time_step_limit     (lo, hi): dt = clamp(softplus(dt_raw + dt_bias), lo, hi); (0, inf) = no clamp
    time_step_min/max/floor   only used to initialise dt_bias (dt ~ logUniform(min, max), >= floor)
    time_step_rank      unused by Mamba-2 (kept because HF has it); "auto" means ceil(d / 16)

Other
    use_bias / use_conv_bias   biases of in_proj and out_proj / of the convolution
    layer_norm_epsilon         eps of every RMSNorm, the gated one included
    residual_in_fp32           the residual stream is added and carried in float32
    rms_norm                   must be True: there is no LayerNorm variant
    hidden_act                 must be "silu"
    initializer_range, rescale_prenorm_residual   random initialisation only
    tie_word_embeddings        the LM head reuses the embedding matrix
    pad/bos/eos_token_id, use_cache   defaults for generation

`Mamba2Config.from_hf` also reads the original state-spaces/mamba_ssm `config.json` (`d_model`,
`n_layer`, `ssm_cfg`, ...) and refuses every key it does not know to be harmless, so a checkpoint
that describes a different model is never loaded as this one by mistake.
"""

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from easymamba.config.common import (
    _HF_HARMLESS_KEYS,
    _INF,
    _check_layer_types,
    _check_ssm_top_level,
    _check_time_steps_and_act,
    _check_types,
    _ConfigIO,
    _is_int,
    _is_real,
    _load_config_dict,
    _padded_vocab,
    _parse_limit,
    _refuse_unknown,
    _require,
    _ssm_top_level,
)

_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size",
                "n_groups", "conv_kernel", "expand")
_BOOL_FIELDS = ("use_bias", "use_conv_bias", "residual_in_fp32", "rescale_prenorm_residual", "use_cache",
                "tie_word_embeddings", "rms_norm")
_FLOAT_FIELDS = ("layer_norm_epsilon", "initializer_range", "time_step_min", "time_step_max", "time_step_floor")
# ssm_cfg keys of mamba_ssm.modules.mamba2.Mamba2 -> (our field, mamba_ssm default).
_SSM_CFG_MAP = {"d_state": ("state_size", 128), "d_conv": ("conv_kernel", 4), "expand": ("expand", 2),
                "headdim": ("head_dim", 64), "ngroups": ("n_groups", 1), "chunk_size": ("chunk_size", 256),
                "dt_min": ("time_step_min", 0.001), "dt_max": ("time_step_max", 0.1),
                "dt_init_floor": ("time_step_floor", 1e-4), "dt_limit": ("time_step_limit", (0.0, _INF)),
                "bias": ("use_bias", False), "conv_bias": ("use_conv_bias", True)}
# Checked one by one below, or harmless: initialisation-only and runtime/placement options.
_SSM_CFG_OTHER = frozenset({"layer", "d_ssm", "rmsnorm", "norm_before_gate", "D_has_hdim", "activation",
                            "A_init_range", "dt_init", "dt_scale", "conv_init", "use_mem_eff_path", "layer_idx",
                            "process_group", "sequence_parallel", "device", "dtype"})



@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config(_ConfigIO):
    """Hyperparameters of a Mamba-2 language model (HF `transformers.Mamba2Config`'s fields).

    Frozen and hashable, so it can be a static argument of `jax.jit`. Validated at construction: every
    failure is a `ValueError` naming the fields and their values. See the module docstring for fields.
    """

    model_type: ClassVar[str] = "mamba2"  # HF's `model_type`; not a field

    num_heads: int = 128
    head_dim: int = 64
    vocab_size: int = 32768
    hidden_size: int = 4096
    state_size: int = 128
    num_hidden_layers: int = 64
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    expand: int = 2
    conv_kernel: int = 4
    n_groups: int = 8
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: int | str = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, _INF)
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    chunk_size: int = 256
    tie_word_embeddings: bool = False
    rms_norm: bool = True

    def __post_init__(self):
        _check_types(self, _SIZE_FIELDS, _BOOL_FIELDS, _FLOAT_FIELDS, at_least_one=("chunk_size",))

        limit = self.time_step_limit
        _require(isinstance(limit, (list, tuple)) and len(limit) == 2 and all(_is_real(x) for x in limit),
                 f"time_step_limit ({limit!r}) must be a pair of numbers (lo, hi)")
        lo, hi = float(limit[0]), float(limit[1])
        object.__setattr__(self, "time_step_limit", (lo, hi))
        # Written as `x >= 0` (not `not x < 0`) so that NaN fails too.
        _require(lo >= 0.0, f"time_step_limit lower bound ({lo}) must be >= 0")
        _require(lo <= hi, f"time_step_limit ({lo}, {hi}) must have lower bound <= upper bound")
        _check_time_steps_and_act(self, "Mamba-2", "the gate")
        _require(self.rms_norm is True, f"rms_norm ({self.rms_norm!r}) must be True: this Mamba-2 model has "
                 "only RMSNorm, no LayerNorm variant")
        hp, e = self.num_heads * self.head_dim, self.expand * self.hidden_size
        _require(hp == e, f"num_heads * head_dim ({hp}) must equal expand * hidden_size ({e})")
        _require(self.num_heads % self.n_groups == 0,
                 f"num_heads ({self.num_heads}) must be divisible by n_groups ({self.n_groups})")

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def intermediate_size(self) -> int:
        """e = expand * hidden_size = num_heads * head_dim."""
        return int(self.expand * self.hidden_size)

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: xBC = [x (e) | B (g*n) | C (g*n)]."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """Output width of in_proj: [z (e) | xBC (conv_dim) | dt (h)]."""
        return 2 * self.intermediate_size + 2 * self.n_groups * self.state_size + self.num_heads

    @property
    def group_size(self) -> int:
        """Channels of e per group of the gated RMSNorm (e // g)."""
        return self.intermediate_size // self.n_groups

    @property
    def heads_per_group(self) -> int:
        """Heads that share one B and one C (h // g); head i uses group i // heads_per_group."""
        return self.num_heads // self.n_groups

    @property
    def resolved_time_step_rank(self) -> int:
        """time_step_rank with "auto" resolved to ceil(hidden_size / 16), as HF does."""
        return math.ceil(self.hidden_size / 16) if self.time_step_rank == "auto" else self.time_step_rank

    # ---- Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "Mamba2Config":
        """Read an HF `config.json` or an original state-spaces/mamba_ssm one.

        `cfg` is a dict or a path to a `config.json` file or to the directory holding it. Keys that
        could change the model and that this config cannot represent are refused with a `ValueError`.
        """
        cfg = _load_config_dict(cfg)
        model_type = cfg.get("model_type")
        if model_type == "mamba":
            raise ValueError("model_type 'mamba' is a Mamba-1 config: load it with MambaConfig, not Mamba2Config")
        if model_type is not None and model_type != "mamba2":
            raise ValueError(f"model_type ({model_type!r}) must be 'mamba2' for Mamba2Config")
        if "d_model" in cfg:
            return cls(**_mamba_ssm_kwargs(cfg))
        return cls(**_hf_kwargs(cfg))

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content, as a dict (tuples become lists; infinity stays a float)."""
        out: dict[str, Any] = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        # transformers 4.44 read this key (default True) in its CUDA path; writing False keeps that version
        # gate-first like every other. Later versions keep it as an inert attribute.
        out["norm_before_gate"] = False
        return out


def _hf_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from the HF layout."""
    fields = {f.name for f in dataclasses.fields(Mamba2Config)}
    # A stored intermediate_size is ignored, as transformers does: its Mamba2Mixer always takes expand * hidden_size
    # (5.25 builds a model from a config that stores any other value), so the key cannot change the model.
    _refuse_unknown("the config", [k for k in cfg if k not in fields and k not in _HF_HARMLESS_KEYS
                                   and k not in ("attn_layer_idx", "attn_cfg", "layer_types", "intermediate_size")])
    if cfg.get("attn_layer_idx"):
        raise ValueError(f"attn_layer_idx ({cfg['attn_layer_idx']!r}) must be empty: hybrid attention layers "
                         "are not part of this Mamba-2 model")
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    _check_layer_types(cfg.get("layer_types"), kwargs.get("num_hidden_layers", 64), "Mamba-2")
    if "time_step_limit" in kwargs:
        kwargs["time_step_limit"] = _parse_limit("time_step_limit", kwargs["time_step_limit"])
    # transformers resolves "auto" before saving; read the resolved value back as "auto" so that a round
    # trip through transformers gives an equal config. (Mamba-2 never uses time_step_rank.)
    rank, hidden = kwargs.get("time_step_rank"), kwargs.get("hidden_size", 4096)
    if _is_int(rank) and _is_int(hidden) and rank == math.ceil(hidden / 16):
        kwargs["time_step_rank"] = "auto"
    return kwargs


def _mamba_ssm_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from the original state-spaces/mamba_ssm layout (as HF's conversion script)."""
    top, ssm = _ssm_top_level(cfg, "Mamba2Config")
    layer = ssm.get("layer", "Mamba1")  # mamba_ssm's create_block defaults to Mamba1
    if layer == "Mamba1":
        raise ValueError("ssm_cfg.layer is 'Mamba1' (mamba_ssm's default when absent): this is a Mamba-1 "
                         "checkpoint; load it with MambaConfig, not Mamba2Config")
    if layer != "Mamba2":
        raise ValueError(f"ssm_cfg.layer ({layer!r}) must be 'Mamba2'")
    _refuse_unknown("ssm_cfg", [k for k in ssm if k not in _SSM_CFG_MAP and k not in _SSM_CFG_OTHER])
    _check_ssm_top_level(top, "Mamba-2")
    if ssm.get("rmsnorm", True) is not True:
        raise ValueError(f"ssm_cfg.rmsnorm ({ssm['rmsnorm']!r}) must be True: the mixer's gated RMSNorm "
                         "cannot be left out here")
    if ssm.get("norm_before_gate", False) is not False:
        raise ValueError(f"ssm_cfg.norm_before_gate ({ssm['norm_before_gate']!r}) must be False: this model "
                         "gates before the norm, as mamba_ssm's default and HF do")
    if ssm.get("D_has_hdim", False) is not False:
        raise ValueError(f"ssm_cfg.D_has_hdim ({ssm['D_has_hdim']!r}) must be False: D here has one value "
                         "per head, not one per head channel")
    if ssm.get("activation", "silu") not in ("silu", "swish"):
        raise ValueError(f"ssm_cfg.activation ({ssm['activation']!r}) must be 'silu' or 'swish'")

    kw = {field: ssm.get(key, default) for key, (field, default) in _SSM_CFG_MAP.items()}
    kw["time_step_limit"] = _parse_limit("ssm_cfg.dt_limit", kw["time_step_limit"])
    d_model, expand, headdim = top["d_model"], kw["expand"], kw["head_dim"]
    for name, v in (("d_model", d_model), ("ssm_cfg.expand", expand), ("ssm_cfg.headdim", headdim)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} ({v!r}) must be a positive integer")
    d_inner = expand * d_model
    if ssm.get("d_ssm") is not None and ssm["d_ssm"] != d_inner:
        raise ValueError(f"ssm_cfg.d_ssm ({ssm['d_ssm']!r}) must be None or expand * d_model ({d_inner}): "
                         "a smaller one turns the remaining channels into a gated MLP, which this model lacks")
    if d_inner % headdim:
        raise ValueError(f"expand * d_model ({d_inner}) must be divisible by ssm_cfg.headdim ({headdim})")

    kw.update(hidden_size=d_model, num_hidden_layers=top["n_layer"], num_heads=d_inner // headdim,
              vocab_size=_padded_vocab(top), tie_word_embeddings=top["tie_embeddings"],
              residual_in_fp32=top["residual_in_fp32"], pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return kw


# ==== Mamba-1 ====================================================================================

