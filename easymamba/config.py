"""The Mamba-2 and Mamba-1 configurations: sizes, SSM settings and token ids, with Hugging Face's names.

`Mamba2Config` is described below; `MambaConfig` (Mamba-1, HF `transformers.MambaConfig`) is described in its
own docstring further down. Both share the JSON, infinity and harmless-key handling of this file.

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
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any, ClassVar

_INF = float("inf")

_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size",
                "n_groups", "conv_kernel", "expand")
_BOOL_FIELDS = ("use_bias", "use_conv_bias", "residual_in_fp32", "rescale_prenorm_residual", "use_cache",
                "tie_word_embeddings", "rms_norm")
_FLOAT_FIELDS = ("layer_norm_epsilon", "initializer_range", "time_step_min", "time_step_max", "time_step_floor")

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
        cfg = json.loads(path.read_text())  # Python's json takes the bare `Infinity` token
    if not isinstance(cfg, Mapping):
        raise TypeError(f"from_hf expects a dict or a path, not {type(cfg).__name__}")
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
