"""The Mamba-2 configuration: sizes, SSM settings and token ids, with Hugging Face's names.

Field names and defaults are those of Hugging Face `transformers.Mamba2Config` (5.23,
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
from typing import Any

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Hyperparameters of a Mamba-2 language model (HF `transformers.Mamba2Config`'s fields).

    Frozen and hashable, so it can be a static argument of `jax.jit`. Validated at construction: every
    failure is a `ValueError` naming the fields and their values. See the module docstring for fields.
    """

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
        for name in _SIZE_FIELDS + ("chunk_size",):
            v = getattr(self, name)
            _require(_is_int(v), f"{name} ({v!r}) must be an integer")
            _require(v >= 1, f"{name} ({v}) must be >= 1" if name == "chunk_size" else f"{name} ({v}) must be positive")
        for name in _BOOL_FIELDS:
            _require(isinstance(getattr(self, name), bool), f"{name} ({getattr(self, name)!r}) must be True or False")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            _require(_is_real(v), f"{name} ({v!r}) must be a number")
            object.__setattr__(self, name, float(v))  # frozen; 1 and 1.0 alike, so equal configs print alike
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            _require(v is None or _is_int(v), f"{name} ({v!r}) must be an integer or None")
        eos = self.eos_token_id
        eos_ok = (eos is None or _is_int(eos)
                  or (isinstance(eos, (list, tuple)) and len(eos) > 0 and all(_is_int(t) for t in eos)))
        _require(eos_ok, f"eos_token_id ({eos!r}) must be an integer, a non-empty list of integers, or None")
        if isinstance(eos, list):
            object.__setattr__(self, "eos_token_id", tuple(eos))  # a list would make the config unhashable

        limit = self.time_step_limit
        _require(isinstance(limit, (list, tuple)) and len(limit) == 2 and all(_is_real(x) for x in limit),
                 f"time_step_limit ({limit!r}) must be a pair of numbers (lo, hi)")
        lo, hi = float(limit[0]), float(limit[1])
        object.__setattr__(self, "time_step_limit", (lo, hi))
        # Written as `x >= 0` (not `not x < 0`) so that NaN fails too.
        _require(lo >= 0.0, f"time_step_limit lower bound ({lo}) must be >= 0")
        _require(lo <= hi, f"time_step_limit ({lo}, {hi}) must have lower bound <= upper bound")
        for name in ("time_step_min", "time_step_max"):
            _require(getattr(self, name) > 0.0, f"{name} ({getattr(self, name)}) must be > 0")
        _require(self.time_step_min <= self.time_step_max,
                 f"time_step_min ({self.time_step_min}) must be <= time_step_max ({self.time_step_max})")
        _require(self.time_step_floor >= 0.0, f"time_step_floor ({self.time_step_floor}) must be >= 0")
        _require(self.layer_norm_epsilon > 0.0, f"layer_norm_epsilon ({self.layer_norm_epsilon}) must be > 0")
        rank = self.time_step_rank
        _require(rank == "auto" or (_is_int(rank) and rank >= 1),
                 f"time_step_rank ({rank!r}) must be 'auto' or a positive integer")
        _require(self.hidden_act == "silu", f"hidden_act ({self.hidden_act!r}) must be 'silu': the Mamba-2 "
                 "mixer has SiLU wired in after the convolution and in the gate")
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

    def replace(self, **changes: Any) -> "Mamba2Config":
        """A new config with `changes` applied, validated like any other."""
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: "Mapping[str, Any] | str | os.PathLike") -> "Mamba2Config":
        """Read an HF `config.json` or an original state-spaces/mamba_ssm one.

        `cfg` is a dict or a path to a `config.json` file or to the directory holding it. Keys that
        could change the model and that this config cannot represent are refused with a `ValueError`.
        """
        if isinstance(cfg, (str, os.PathLike)):
            path = pathlib.Path(cfg)
            if path.is_dir():
                path = path / "config.json"
            cfg = json.loads(path.read_text())  # Python's json takes the bare `Infinity` token
        if not isinstance(cfg, Mapping):
            raise TypeError(f"from_hf expects a dict or a path, not {type(cfg).__name__}")
        cfg = _decode_special_floats(dict(cfg))
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

    def to_json_string(self) -> str:
        """`to_hf()` as JSON, infinity written as `{"__float__": "Infinity"}` like transformers 5.23."""
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


def _refuse_unknown(where: str, unknown: list[str]) -> None:
    if unknown:
        names = ", ".join(repr(k) for k in sorted(unknown))
        raise ValueError(f"{where} has keys that Mamba2Config does not handle: {names}; the model they describe "
                         "may differ from the one easymamba builds, so they are refused rather than ignored")


def _hf_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from the HF layout."""
    fields = {f.name for f in dataclasses.fields(Mamba2Config)}
    _refuse_unknown("the config", [k for k in cfg if k not in fields and k not in _HF_HARMLESS_KEYS
                                   and k not in ("attn_layer_idx", "attn_cfg", "layer_types")])
    if cfg.get("attn_layer_idx"):
        raise ValueError(f"attn_layer_idx ({cfg['attn_layer_idx']!r}) must be empty: hybrid attention layers "
                         "are not part of this Mamba-2 model")
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    n_layers = kwargs.get("num_hidden_layers", 64)
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or any(t not in ("linear_attention", "mamba") for t in layer_types):
            raise ValueError(f"layer_types ({layer_types!r}) must contain only 'linear_attention' or 'mamba': "
                             "other layer types are not part of this Mamba-2 model")
        if len(layer_types) != n_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")
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
    _refuse_unknown("the mamba_ssm config", [k for k in cfg if k not in _SSM_TOP_DEFAULTS
                                             and k not in _HF_HARMLESS_KEYS])
    top = {**_SSM_TOP_DEFAULTS, **cfg}
    ssm = top["ssm_cfg"]
    if not isinstance(ssm, dict):
        raise ValueError(f"ssm_cfg ({ssm!r}) must be a JSON object")
    layer = ssm.get("layer", "Mamba1")  # mamba_ssm's create_block defaults to Mamba1
    if layer == "Mamba1":
        raise ValueError("ssm_cfg.layer is 'Mamba1' (mamba_ssm's default when absent): this is a Mamba-1 "
                         "checkpoint; load it with MambaConfig, not Mamba2Config")
    if layer != "Mamba2":
        raise ValueError(f"ssm_cfg.layer ({layer!r}) must be 'Mamba2'")
    _refuse_unknown("ssm_cfg", [k for k in ssm if k not in _SSM_CFG_MAP and k not in _SSM_CFG_OTHER])
    if top["d_intermediate"] != 0:
        raise ValueError(f"d_intermediate ({top['d_intermediate']!r}) must be 0: a nonzero value adds an MLP "
                         "block after each mixer, which this Mamba-2 model does not have")
    if top["attn_layer_idx"]:
        raise ValueError(f"attn_layer_idx ({top['attn_layer_idx']!r}) must be empty: hybrid attention layers "
                         "are not part of this Mamba-2 model")
    if top["rms_norm"] is not True:
        raise ValueError(f"rms_norm ({top['rms_norm']!r}) must be True: this Mamba-2 model has only RMSNorm, "
                         "no LayerNorm variant")
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

    vocab, multiple = top["vocab_size"], top["pad_vocab_size_multiple"]
    if not _is_int(vocab) or not _is_int(multiple) or multiple < 1:
        raise ValueError(f"vocab_size ({vocab!r}) and pad_vocab_size_multiple ({multiple!r}) must be integers, "
                         "the multiple positive")
    kw.update(hidden_size=d_model, num_hidden_layers=top["n_layer"], num_heads=d_inner // headdim,
              vocab_size=-(-vocab // multiple) * multiple, tie_word_embeddings=top["tie_embeddings"],
              residual_in_fp32=top["residual_in_fp32"], pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return kw
