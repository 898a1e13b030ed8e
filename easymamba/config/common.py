"""What both configs share: type and value checks, reading a `config.json`, the JSON handling of infinity, the
keys of an HF file that do not change the network, and the original mamba_ssm layout's top level."""

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from easymamba import jsonio

_INF = float("inf")


# Keys of an HF config.json that do not change the network: bookkeeping, and the generic options of
# transformers' PreTrainedConfig (5.23's `Mamba2Config().to_dict()` emits the first group; older
# versions wrote the rest) that Mamba2ForCausalLM never reads.
_HF_HARMLESS_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "_commit_hash",
    "torch_dtype", "dtype", "use_bfloat16", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "id2label", "label2id", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "torchscript", "tf_legacy_loss", "pruned_heads", "_attn_implementation_autoset",
    # Generation defaults that 4.x wrote into config.json; they steer `generate`, not the network.
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
    # transformers 4.44 stored norm_before_gate (default True) but its torch path always gated before the
    # norm, as mamba_ssm does with norm_before_gate=False; 4.46 removed it and hard-codes False. The
    # weights behind any HF Mamba-2 config are therefore run gate-first whatever this key says.
    "norm_before_gate",
    # mamba_ssm's choice of a fused Triton add+norm kernel; the same arithmetic either way.
    "fused_add_norm",
})

# The original mamba_ssm layout (mamba_ssm/models/config_mamba.py MambaConfig), with its defaults.
_SSM_TOP_DEFAULTS = {"d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {},
                     "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
                     "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
# Resource bounds every family's config meets (`check_resource_bounds`), so that a config asking for more than
# any machine holds is refused before anything is built or read (docs/refuses.md):
MAX_SIZE = 2**31 - 1       # any size, count or token id: an axis or an index of an int32-indexed array
MAX_LAYERS = 1024          # num_hidden_layers: eight times the deepest published Mamba-family model
MAX_CHUNK_SIZE = 4096      # a chunked-SSD chunk: the scan holds a (chunk, chunk) block per head and chunk
MAX_PARAMETERS = 2**40     # parameters (a lower estimate: embedding, head, one norm per layer): 4 TiB in float32


def _ints_of(value: Any, name: str, depth: int = 0):
    """(field name, int) of every int in a config field: the field itself, or the ints of its lists."""
    if _is_int(value):
        yield name, value
    elif isinstance(value, (list, tuple)) and depth < 2:
        for i, item in enumerate(value):
            yield from _ints_of(item, f"{name}[{i}]", depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type) and depth < 2:
        for f in dataclasses.fields(value):
            yield from _ints_of(getattr(value, f.name), f"{name}.{f.name}", depth + 1)


def check_resource_bounds(cfg: Any) -> None:
    """Refuse a config (of any family) that asks for more than a machine can hold, before any work: every int
    field within MAX_SIZE, `num_hidden_layers` within MAX_LAYERS, every `*chunk_size` within MAX_CHUNK_SIZE, and
    the parameters' lower estimate (embedding, an untied head, a norm per layer) within MAX_PARAMETERS. Raises
    `ValueError` naming the field, its value and the bound."""
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        for field, v in _ints_of(getattr(cfg, f.name), f.name):
            _require(abs(v) <= MAX_SIZE, f"{name}.{field} ({v}) must be at most {MAX_SIZE} in magnitude: sizes and "
                     "token ids index int32 arrays")
            if field.endswith("chunk_size"):
                _require(v <= MAX_CHUNK_SIZE, f"{name}.{field} ({v}) must be at most {MAX_CHUNK_SIZE}: the chunked "
                         "scan holds a (chunk, chunk) block per head and chunk")
    layers = getattr(cfg, "num_hidden_layers", 0)
    _require(not _is_int(layers) or layers <= MAX_LAYERS,
             f"{name}.num_hidden_layers ({layers}) must be at most {MAX_LAYERS}")
    vocab, d = getattr(cfg, "vocab_size", 0), getattr(cfg, "hidden_size", 0)
    if _is_int(vocab) and _is_int(d) and _is_int(layers):
        tied = getattr(cfg, "ties_lm_head", getattr(cfg, "tie_word_embeddings", True))
        estimate = vocab * d * (1 if tied else 2) + layers * d
        _require(estimate <= MAX_PARAMETERS,
                 f"{name} asks for at least {estimate:.3g} parameters (vocab_size {vocab} x hidden_size {d}"
                 f"{'' if tied else ' x 2 (untied head)'} + a norm per layer), more than the bound of "
                 f"{MAX_PARAMETERS:.3g} ({MAX_PARAMETERS * 4 / 2**40:.0f} TiB in float32)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

def _check_types(cfg: Any, sizes: tuple[str, ...], bools: tuple[str, ...], floats: tuple[str, ...],
                 at_least_one: tuple[str, ...] = ()) -> None:
    """Sizes are positive ints, flags bools, floats numbers (stored as float), token ids ints or None."""
    for name in sizes + at_least_one:
        v = getattr(cfg, name)
        _require(_is_int(v), f"{name} ({v!r}) must be an integer")
        _require(v >= 1, f"{name} ({v}) must be >= 1" if name in at_least_one else f"{name} ({v}) must be positive")
    for name in bools:
        _require(isinstance(getattr(cfg, name), bool), f"{name} ({getattr(cfg, name)!r}) must be True or False")
    for name in floats:
        v = getattr(cfg, name)
        _require(_is_real(v), f"{name} ({v!r}) must be a number")
        object.__setattr__(cfg, name, float(v))  # frozen; 1 and 1.0 alike, so equal configs print alike
    for name in ("pad_token_id", "bos_token_id"):
        v = getattr(cfg, name)
        _require(v is None or _is_int(v), f"{name} ({v!r}) must be an integer or None")
    eos = cfg.eos_token_id
    eos_ok = (eos is None or _is_int(eos)
              or (isinstance(eos, (list, tuple)) and len(eos) > 0 and all(_is_int(t) for t in eos)))
    _require(eos_ok, f"eos_token_id ({eos!r}) must be an integer, a non-empty list of integers, or None")
    if isinstance(eos, list):
        object.__setattr__(cfg, "eos_token_id", tuple(eos))  # a list would make the config unhashable


def _check_time_steps_and_act(cfg: Any, model_name: str, gate: str) -> None:
    """The dt initialisation range, the norm eps, time_step_rank and the activation (both families)."""
    for name in ("time_step_min", "time_step_max"):
        _require(getattr(cfg, name) > 0.0, f"{name} ({getattr(cfg, name)}) must be > 0")
    _require(cfg.time_step_min <= cfg.time_step_max,
             f"time_step_min ({cfg.time_step_min}) must be <= time_step_max ({cfg.time_step_max})")
    _require(cfg.time_step_floor >= 0.0, f"time_step_floor ({cfg.time_step_floor}) must be >= 0")
    _require(cfg.layer_norm_epsilon > 0.0, f"layer_norm_epsilon ({cfg.layer_norm_epsilon}) must be > 0")
    rank = cfg.time_step_rank
    _require(rank == "auto" or (_is_int(rank) and rank >= 1),
             f"time_step_rank ({rank!r}) must be 'auto' or a positive integer")
    _require(cfg.hidden_act == "silu", f"hidden_act ({cfg.hidden_act!r}) must be 'silu': the {model_name} "
             f"mixer has SiLU wired in after the convolution and in {gate}")


def _load_config_dict(cfg: "Mapping[str, Any] | str | os.PathLike") -> dict[str, Any]:
    """A config dict from a dict, a `config.json` path or its directory, with 5.x's infinity tags decoded."""
    if isinstance(cfg, (str, os.PathLike)):
        path = pathlib.Path(cfg)
        if path.is_dir():
            path = path / "config.json"
        cfg = jsonio.loads(path.read_bytes(), str(path))  # Python's json takes the bare `Infinity` token
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{path} holds a JSON {type(cfg).__name__}; expected an object (a config)")
    if not isinstance(cfg, Mapping):
        raise TypeError(f"from_hf expects a dict or a path, not {type(cfg).__name__}")
    if jsonio.depth(cfg) > jsonio.MAX_DEPTH:  # a dict given directly: refused before the recursive decoding below
        raise ValueError(f"the config nests deeper than {jsonio.MAX_DEPTH} levels (expected a flat document)")
    return _decode_special_floats(dict(cfg))


class _ConfigIO:
    """`replace`, `to_json_string` and `save` for the frozen config dataclasses (each has `to_hf()`)."""

    def replace(self, **changes: Any):
        """A new config with `changes` applied, validated like any other."""
        return dataclasses.replace(self, **changes)

    def to_json_string(self) -> str:
        """`to_hf()` as JSON, infinity written as `{"__float__": "Infinity"}` like transformers 5.25."""
        return json.dumps(_encode_special_floats(self.to_hf()), indent=2, sort_keys=True) + "\n"

    def save(self, path: "str | os.PathLike") -> pathlib.Path:
        """Write `config.json` into directory `path` (created if needed), or to `path` if it ends in .json."""
        path = pathlib.Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "config.json"
        path.write_text(self.to_json_string())
        return path

# ---- JSON helpers -------------------------------------------------------------------------------

_FLOAT_TAGS = {"Infinity": _INF, "-Infinity": -_INF, "NaN": float("nan")}
_INF_STRINGS = {"inf": _INF, "+inf": _INF, "infinity": _INF, "+infinity": _INF, "-inf": -_INF, "-infinity": -_INF}


def _decode_special_floats(obj: Any) -> Any:
    """Undo transformers 5.x's `{"__float__": "Infinity"}` encoding, anywhere in the tree."""
    if isinstance(obj, dict):
        tag = obj.get("__float__")
        if len(obj) == 1 and isinstance(tag, str) and tag in _FLOAT_TAGS:
            return _FLOAT_TAGS[tag]
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


def _encode_special_floats(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


def _parse_limit(name: str, value: Any) -> Any:
    """A dt limit pair whose items may be the strings "Infinity" / "inf" / "-Infinity" (third-party tools)."""
    if not isinstance(value, (list, tuple)):
        return value  # the constructor's check names the field and the value
    items = []
    for x in value:
        if isinstance(x, str):
            if x.strip().lower() not in _INF_STRINGS:
                raise ValueError(f"{name} ({value!r}) must hold numbers; the only strings read are infinities")
            x = _INF_STRINGS[x.strip().lower()]
        items.append(x)
    return tuple(items)


def _refuse_unknown(where: str, unknown: list[str], config_name: str = "Mamba2Config") -> None:
    if unknown:
        names = ", ".join(repr(k) for k in sorted(unknown))
        raise ValueError(f"{where} has keys that {config_name} does not handle: {names}; the model they describe "
                         "may differ from the one easymamba builds, so they are refused rather than ignored")


def _check_layer_types(layer_types: Any, n_layers: Any, model_name: str) -> None:
    """HF 5.x writes `layer_types`; every entry must be a Mamba layer, one per layer."""
    if layer_types is None:
        return
    if not isinstance(layer_types, list) or any(t not in ("linear_attention", "mamba") for t in layer_types):
        raise ValueError(f"layer_types ({layer_types!r}) must contain only 'linear_attention' or 'mamba': "
                         f"other layer types are not part of this {model_name} model")
    if len(layer_types) != n_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")


def _ssm_top_level(cfg: dict[str, Any], config_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The original layout's top level over mamba_ssm's defaults, and its `ssm_cfg` (checked to be a dict)."""
    _refuse_unknown("the mamba_ssm config", [k for k in cfg if k not in _SSM_TOP_DEFAULTS
                                             and k not in _HF_HARMLESS_KEYS], config_name)
    top = {**_SSM_TOP_DEFAULTS, **cfg}
    ssm = top["ssm_cfg"]
    if not isinstance(ssm, dict):
        raise ValueError(f"ssm_cfg ({ssm!r}) must be a JSON object")
    return top, ssm


def _check_ssm_top_level(top: dict[str, Any], model_name: str) -> None:
    """What the original layout's top level can add that neither family here has: MLPs, attention, LayerNorm."""
    if top["d_intermediate"] != 0:
        raise ValueError(f"d_intermediate ({top['d_intermediate']!r}) must be 0: a nonzero value adds an MLP "
                         f"block after each mixer, which this {model_name} model does not have")
    if top["attn_layer_idx"]:
        raise ValueError(f"attn_layer_idx ({top['attn_layer_idx']!r}) must be empty: hybrid attention layers "
                         f"are not part of this {model_name} model")
    if top["rms_norm"] is not True:
        raise ValueError(f"rms_norm ({top['rms_norm']!r}) must be True: this {model_name} model has only RMSNorm, "
                         "no LayerNorm variant")


def _padded_vocab(top: dict[str, Any]) -> int:
    """vocab_size rounded up to pad_vocab_size_multiple, as mamba_ssm sizes its embedding."""
    vocab, multiple = top["vocab_size"], top["pad_vocab_size_multiple"]
    if not _is_int(vocab) or not _is_int(multiple) or multiple < 1:
        raise ValueError(f"vocab_size ({vocab!r}) and pad_vocab_size_multiple ({multiple!r}) must be integers, "
                         "the multiple positive")
    return -(-vocab // multiple) * multiple


def hf_config_dict(cfg: "Mapping[str, Any] | str | os.PathLike") -> tuple[str, dict[str, Any]]:
    """(model_type, the config dict) of a `config.json` (dict, file or directory). `model_type` is the file's own;
    an original mamba_ssm file (no model_type) is "mamba2" when `ssm_cfg.layer` is "Mamba2" and "mamba"
    otherwise (mamba_ssm's default layer); an HF file without one is "mamba2" when it has Mamba-2's fields.
    `easymamba.models.config_from_hf` reads the config with the class its family names."""
    cfg = _load_config_dict(cfg)
    model_type = cfg.get("model_type")
    if model_type is None and "d_model" in cfg and isinstance(cfg.get("ssm_cfg", {}), dict):
        model_type = "mamba2" if cfg.get("ssm_cfg", {}).get("layer", "Mamba1") == "Mamba2" else "mamba"
    if model_type is None:  # HF layout without model_type: Mamba-2's fields tell it apart
        model_type = "mamba2" if "num_heads" in cfg or "n_groups" in cfg else "mamba"
    return model_type, cfg

