"""The Falcon-Mamba configuration (HF `transformers.FalconMambaConfig` 5.25): Mamba-1's fields and one more,
`mixer_rms_eps`, the eps of the weightless RMS norms the mixer applies to dt, B and C."""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from easymamba.config.common import (
    _HF_HARMLESS_KEYS,
    _check_layer_types,
    _is_int,
    _is_real,
    _load_config_dict,
    _refuse_unknown,
    _require,
)
from easymamba.config.mamba1 import MambaConfig, _auto_rank

# transformers 5.25's FalconMambaConfig.__post_init__ renames this old key to use_mambapy (a torch fallback switch).
_LEGACY_MAMBAPY = "use_falcon_mambapy"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FalconMambaConfig(MambaConfig):
    """Hyperparameters of a Falcon-Mamba language model (HF `transformers.FalconMambaConfig` 5.25: names and
    defaults, those of `MambaConfig` plus `mixer_rms_eps`).

    The network is Mamba-1's (`MambaConfig` describes every shared field) with one change inside each mixer:
    x_proj's three parts dt_low_rank (r), B (n) and C (n) are each RMS-normalised, with no weight, with eps
    `mixer_rms_eps` (default 1e-6), before dt_proj and the selective scan. `intermediate_size` follows
    transformers' rule as in `MambaConfig`: a stored value wins over expand * hidden_size (transformers 5.25
    derives it, then sets any stored value over it).

    `from_hf` reads the HF layout only (`model_type` "falcon_mamba"; there is no original mamba_ssm layout for
    this family). transformers 5.25 resets `use_mambapy` to False unless the file has `use_falcon_mambapy`; both
    are a torch-only fallback switch, kept for round trips, with no effect here.
    """

    model_type: ClassVar[str] = "falcon_mamba"  # HF's `model_type`; not a field

    mixer_rms_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        _require(_is_real(self.mixer_rms_eps), f"mixer_rms_eps ({self.mixer_rms_eps!r}) must be a number")
        object.__setattr__(self, "mixer_rms_eps", float(self.mixer_rms_eps))  # frozen
        _require(self.mixer_rms_eps > 0.0, f"mixer_rms_eps ({self.mixer_rms_eps}) must be > 0")

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "FalconMambaConfig":
        """Read an HF Falcon-Mamba `config.json` (dict, file or directory). Keys that could change the model and
        that this config cannot represent are refused with a `ValueError`."""
        cfg = _load_config_dict(cfg)
        model_type = cfg.get("model_type")
        if model_type in ("mamba", "mamba2"):
            raise ValueError(f"model_type {model_type!r} is not a Falcon-Mamba config: load it with "
                             f"{'MambaConfig' if model_type == 'mamba' else 'Mamba2Config'}, not FalconMambaConfig "
                             "(a Falcon-Mamba mixer normalises dt, B and C; theirs do not)")
        if model_type is not None and model_type != "falcon_mamba":
            raise ValueError(f"model_type ({model_type!r}) must be 'falcon_mamba' for FalconMambaConfig")
        fields = {f.name for f in dataclasses.fields(cls)}
        _refuse_unknown("the config", [k for k in cfg if k not in fields and k not in _HF_HARMLESS_KEYS
                                       and k not in ("layer_types", _LEGACY_MAMBAPY)], "FalconMambaConfig")
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        if _LEGACY_MAMBAPY in cfg:
            kwargs["use_mambapy"] = cfg[_LEGACY_MAMBAPY]
        n_layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        if _is_int(n_layers):
            _check_layer_types(cfg.get("layer_types"), n_layers, "Falcon-Mamba")
        _auto_rank(kwargs, cls.hidden_size)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` content as transformers 5.25 writes it (time_step_rank and intermediate_size
        resolved)."""
        return {**super().to_hf(), "architectures": ["FalconMambaForCausalLM"], "model_type": "falcon_mamba"}
