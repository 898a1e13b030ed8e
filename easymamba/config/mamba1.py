"""The Mamba-1 configuration (HF `transformers.MambaConfig`): sizes, SSM settings and token ids, with Hugging
Face's names; `MambaConfig`'s docstring describes the fields. It shares `easymamba/config/common.py` with the
Mamba-2 config."""

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from easymamba.config.common import (
    _HF_HARMLESS_KEYS,
    _check_layer_types,
    _check_ssm_top_level,
    _check_time_steps_and_act,
    _check_types,
    _ConfigIO,
    _is_int,
    _load_config_dict,
    _padded_vocab,
    _refuse_unknown,
    _require,
    _ssm_top_level,
)

_MAMBA1_SIZE_FIELDS = ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
                       "intermediate_size")  # last: a bad hidden_size or expand is named before it
_MAMBA1_BOOL_FIELDS = ("use_bias", "use_conv_bias", "residual_in_fp32", "rescale_prenorm_residual", "use_cache",
                       "use_mambapy", "use_associative_scan", "tie_word_embeddings")
_MAMBA1_FLOAT_FIELDS = ("layer_norm_epsilon", "initializer_range", "time_step_scale", "time_step_min",
                        "time_step_max", "time_step_floor")
_DT_INIT_SCHEMES = ("random", "constant")

# ssm_cfg keys of mamba_ssm.modules.mamba_simple.Mamba -> (our field, mamba_ssm default).
_SSM1_CFG_MAP = {"d_state": ("state_size", 16), "d_conv": ("conv_kernel", 4), "expand": ("expand", 2),
                 "dt_rank": ("time_step_rank", "auto"), "dt_min": ("time_step_min", 0.001),
                 "dt_max": ("time_step_max", 0.1), "dt_init": ("time_step_init_scheme", "random"),
                 "dt_scale": ("time_step_scale", 1.0), "dt_init_floor": ("time_step_floor", 1e-4),
                 "conv_bias": ("use_conv_bias", True), "bias": ("use_bias", False)}
_SSM1_CFG_OTHER = frozenset({"layer", "use_fast_path", "layer_idx", "device", "dtype"})
# Original-layout keys that HF Mamba-1 checkpoints (state-spaces/mamba-*-hf) also carry next to the HF fields.
# transformers ignores them; we read them only to check that they describe the same model.
_MAMBA1_HF_LEGACY = {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "d_inner": "intermediate_size"}
_MAMBA1_HF_EXTRA = frozenset({"layer_types", "ssm_cfg", "rms_norm", "pad_vocab_size_multiple", *_MAMBA1_HF_LEGACY})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig(_ConfigIO):
    """Hyperparameters of a Mamba-1 language model (HF `transformers.MambaConfig` 5.25: names and defaults,
    the defaults being state-spaces/mamba-130m's widths with 32 layers).

    Sizes: `vocab_size` v, `hidden_size` d, `num_hidden_layers`, `intermediate_size` e (the mixer's inner width;
    None, the default, means expand * d and is resolved at construction; a stored value wins over `expand`, as
    transformers' `MambaModel` builds its mixer from it), `state_size` n (the SSM state is [e, n]: one row of A
    per inner channel), `conv_kernel` k, `time_step_rank` r (the width of dt's low-rank projection, "auto" =
    ceil(d / 16)).
    Initialisation only: `initializer_range`, `time_step_scale`, `time_step_init_scheme` ("random" or
    "constant" dt_proj weights), `time_step_min/max/floor` (dt_proj.bias), `rescale_prenorm_residual`.
    torch-implementation switches kept for round trips, with no effect here: `use_mambapy`,
    `use_associative_scan`. The rest as in `Mamba2Config`.

    `from_hf` reads the HF layout (`model_type` "mamba"; the hub's state-spaces/mamba-*-hf files also carry
    `d_model`, `n_layer`, `ssm_cfg`, ..., which must agree with the HF fields) and the original state-spaces
    layout (`d_model`, `n_layer`, `ssm_cfg` with `layer` "Mamba1" or absent; the vocabulary is padded to
    `pad_vocab_size_multiple`, default 8, as HF's conversion script does).
    """

    model_type: ClassVar[str] = "mamba"  # HF's `model_type`; not a field

    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 0
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: int | str = "auto"
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    use_mambapy: bool = False
    use_associative_scan: bool = True
    tie_word_embeddings: bool = True
    intermediate_size: int | None = None  # e; None: expand * hidden_size (see the class docstring)

    def __post_init__(self):
        if self.intermediate_size is None and _is_int(self.expand) and _is_int(self.hidden_size):
            object.__setattr__(self, "intermediate_size", self.expand * self.hidden_size)  # frozen
        _check_types(self, _MAMBA1_SIZE_FIELDS, _MAMBA1_BOOL_FIELDS, _MAMBA1_FLOAT_FIELDS)
        _check_time_steps_and_act(self, "Mamba-1", "the gate silu(z)")
        _require(self.time_step_init_scheme in _DT_INIT_SCHEMES,
                 f"time_step_init_scheme ({self.time_step_init_scheme!r}) must be one of {_DT_INIT_SCHEMES}")

    def replace(self, **changes: Any) -> "MambaConfig":
        """A new config with `changes` applied, validated like any other. An `intermediate_size` equal to
        expand * hidden_size counts as derived and follows new `hidden_size` / `expand`; one that differs is
        kept unless `changes` names it."""
        if "intermediate_size" not in changes and self.intermediate_size == self.expand * self.hidden_size:
            changes["intermediate_size"] = None
        return super().replace(**changes)

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def resolved_time_step_rank(self) -> int:
        """r: time_step_rank with "auto" resolved to ceil(hidden_size / 16), as HF does."""
        return math.ceil(self.hidden_size / 16) if self.time_step_rank == "auto" else self.time_step_rank

    @property
    def x_proj_size(self) -> int:
        """Output width of x_proj: [dt (r) | B (n) | C (n)]."""
        return self.resolved_time_step_rank + 2 * self.state_size

    # ---- Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "MambaConfig":
        """Read an HF Mamba-1 `config.json` or an original state-spaces/mamba_ssm one (dict, file or directory).

        Keys that could change the model and that this config cannot represent are refused with a `ValueError`.
        """
        cfg = _load_config_dict(cfg)
        model_type = cfg.get("model_type")
        if model_type == "mamba2":
            raise ValueError("model_type 'mamba2' is a Mamba-2 config: load it with Mamba2Config, not MambaConfig")
        if model_type is not None and model_type != "mamba":
            raise ValueError(f"model_type ({model_type!r}) must be 'mamba' for MambaConfig")
        if "d_model" in cfg and "hidden_size" not in cfg:
            return cls(**_mamba1_ssm_kwargs(cfg))
        return cls(**_mamba1_hf_kwargs(cfg))

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content as transformers 5.25 writes it (time_step_rank and intermediate_size
        resolved)."""
        out: dict[str, Any] = {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["time_step_rank"] = self.resolved_time_step_rank
        return out


def _auto_rank(kwargs: dict[str, Any], default_hidden: int) -> None:
    """Read a resolved time_step_rank equal to ceil(hidden / 16) back as "auto" (transformers saves it resolved),
    so that a round trip through transformers gives an equal config."""
    rank, hidden = kwargs.get("time_step_rank"), kwargs.get("hidden_size", default_hidden)
    if _is_int(rank) and _is_int(hidden) and rank == math.ceil(hidden / 16):
        kwargs["time_step_rank"] = "auto"


def _mamba1_ssm_cfg_kwargs(ssm: dict[str, Any]) -> dict[str, Any]:
    """Our fields from a Mamba-1 `ssm_cfg` (mamba_ssm's defaults for absent keys)."""
    layer = ssm.get("layer", "Mamba1")  # mamba_ssm's create_block defaults to Mamba1
    if layer == "Mamba2":
        raise ValueError("ssm_cfg.layer is 'Mamba2': this is a Mamba-2 checkpoint; load it with Mamba2Config, "
                         "not MambaConfig")
    if layer != "Mamba1":
        raise ValueError(f"ssm_cfg.layer ({layer!r}) must be 'Mamba1' or absent")
    _refuse_unknown("ssm_cfg", [k for k in ssm if k not in _SSM1_CFG_MAP and k not in _SSM1_CFG_OTHER], "MambaConfig")
    return {field: ssm.get(key, default) for key, (field, default) in _SSM1_CFG_MAP.items()}


def _mamba1_ssm_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from the original layout (as HF's convert_mamba_ssm_checkpoint_to_pytorch.py)."""
    top, ssm = _ssm_top_level(cfg, "MambaConfig")
    kw = _mamba1_ssm_cfg_kwargs(ssm)
    _check_ssm_top_level(top, "Mamba-1")
    kw.update(hidden_size=top["d_model"], num_hidden_layers=top["n_layer"], vocab_size=_padded_vocab(top),
              tie_word_embeddings=top["tie_embeddings"], residual_in_fp32=top["residual_in_fp32"])
    _auto_rank(kw, 0)
    return kw


def _mamba1_hf_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from the HF layout, checking the original-layout keys the hub files carry too."""
    fields = {f.name for f in dataclasses.fields(MambaConfig)}
    _refuse_unknown("the config", [k for k in cfg if k not in fields and k not in _HF_HARMLESS_KEYS
                                   and k not in _MAMBA1_HF_EXTRA], "MambaConfig")
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    defaults = MambaConfig()
    resolved = {name: kwargs.get(name, getattr(defaults, name)) for name in ("hidden_size", "num_hidden_layers",
                                                                             "expand")}
    hidden, expand = resolved["hidden_size"], resolved["expand"]
    # transformers' rule: a stored intermediate_size wins over expand * hidden_size (its MambaModel builds
    # in_proj, conv1d, A_log, ... from the stored value; HF's own Mamba-1 tests store 32 with d 32, expand 2).
    stored = kwargs.get("intermediate_size")
    derived = expand * hidden if _is_int(hidden) and _is_int(expand) else None
    resolved["intermediate_size"] = derived if stored is None else stored
    for legacy, field in _MAMBA1_HF_LEGACY.items():
        if legacy in cfg and cfg[legacy] != resolved[field]:
            raise ValueError(f"{legacy} ({cfg[legacy]!r}) must equal {field} ({resolved[field]!r}): the config "
                             "describes two different models")
    if cfg.get("rms_norm", True) is not True:
        raise ValueError(f"rms_norm ({cfg['rms_norm']!r}) must be True: this Mamba-1 model has only RMSNorm, "
                         "no LayerNorm variant")
    multiple = cfg.get("pad_vocab_size_multiple", 1)
    if not _is_int(multiple) or multiple < 1:
        raise ValueError(f"pad_vocab_size_multiple ({multiple!r}) must be a positive integer")
    _check_layer_types(cfg.get("layer_types"), resolved["num_hidden_layers"], "Mamba-1")
    _auto_rank(kwargs, defaults.hidden_size)
    if "ssm_cfg" in cfg:
        ssm = cfg["ssm_cfg"]
        if not isinstance(ssm, dict):
            raise ValueError(f"ssm_cfg ({ssm!r}) must be a JSON object")
        from_ssm = _mamba1_ssm_cfg_kwargs(ssm)
        for key, (field, _) in _SSM1_CFG_MAP.items():
            if key not in ssm:
                continue
            ours = kwargs.get(field, getattr(defaults, field))
            theirs = from_ssm[field]
            if field == "time_step_rank":  # compare resolved ranks: "auto" and 48 may be the same
                ours, theirs = (math.ceil(hidden / 16) if r == "auto" and _is_int(hidden) else r
                                for r in (ours, theirs))
            if ours != theirs:
                raise ValueError(f"ssm_cfg.{key} ({ssm[key]!r}) must equal {field} ({ours!r}): the config "
                                 "describes two different models")
    return kwargs


