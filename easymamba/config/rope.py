"""Rotary-embedding settings of an HF `config.json`, read as transformers 5.25 standardises them.

5.x keeps them in one dict, `rope_parameters` = {"rope_type", "rope_theta", "partial_rotary_factor"?}; files
written by 4.x have top-level `rope_theta` and `rope_scaling` (None or a dict with "type"/"rope_type") instead.
transformers' precedence (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`): a value in the dict
(`rope_scaling` replaces `rope_parameters` when given), then the top-level key, then the default (theta 10000).
Only the plain "default" rope type is supported here; scaled types (linear, dynamic, yarn, llama3, ...) change
the frequencies and are refused rather than run unscaled.
"""

from typing import Any

from easymamba.config.common import _is_real

DEFAULT_THETA = 10_000.0
_ROPE_DICT_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})


def read_rope(cfg: dict[str, Any], config_name: str) -> tuple[Any, Any, Any]:
    """(rope_theta, the dict's partial_rotary_factor or None, the top-level partial_rotary_factor or None).

    Pops `rope_parameters`, `rope_scaling`, `rope_theta` and `partial_rotary_factor` from `cfg`. Raises
    ValueError for a rope type other than "default" and for keys of the dict that this reader does not know.
    """
    params = cfg.pop("rope_parameters", None)
    scaling = cfg.pop("rope_scaling", None)
    params = scaling or params or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters ({params!r}) must be a JSON object or null")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"rope_parameters ({params!r}) is nested per layer type; {config_name} has one rotary "
                         "embedding for all attention layers")
    unknown = sorted(set(params) - _ROPE_DICT_KEYS)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported: {config_name} here runs only the plain "
                         "'default' rotary embedding (inv_freq = theta ** (-2i / dim)); a scaled rope would change "
                         "every attention score")
    if unknown:
        raise ValueError(f"rope_parameters has keys that {config_name} does not handle: {unknown}")
    top_theta = cfg.pop("rope_theta", None)
    theta = params.get("rope_theta", DEFAULT_THETA if top_theta is None else top_theta)
    if not _is_real(theta) or not theta > 0:
        raise ValueError(f"rope_theta ({theta!r}) must be a positive number")
    return theta, params.get("partial_rotary_factor"), cfg.pop("partial_rotary_factor", None)


def rope_hf_dict(theta: float, partial_rotary_factor: float | None = None) -> dict[str, Any]:
    """`rope_parameters` as transformers 5.25 writes it."""
    out: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
    if partial_rotary_factor is not None:
        out["partial_rotary_factor"] = partial_rotary_factor
    return out
