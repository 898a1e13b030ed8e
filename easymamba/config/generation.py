"""A model directory's `generation_config.json`: the generation defaults its authors chose.

`GenerationDefaults.from_hf(dict | path)` reads the file transformers writes (`GenerationConfig.save_pretrained`);
a model loaded from a directory that has one carries it as `model.generation_config`, and `generate` takes every
setting the caller leaves out (None) from it. Every field is optional: None means "the file does not say", and
`generate`'s own default applies (greedy, temperature 1, top_k 0, top_p 1, no early stop).

    max_new_tokens      tokens to generate (wins over max_length, as in transformers)
    top_k               a file that does not set it implies the default transformers' generate fills in, 50 (used
                        only when sampling, as there); a model without a file samples with top_k 0 (off)
    max_length          the total length, prompt included (transformers' default 20 is NOT implied)
    do_sample, temperature, top_k, top_p, min_p, repetition_penalty
    eos_token_id        an id or a tuple of ids
    pad_token_id, bos_token_id

Settings transformers has and easymamba's decode loop does not (beam search, n-gram bans, forced tokens, ...) are
accepted at their neutral value (`num_beams: 1`, ...) and refused otherwise, so a file asking for a different
decoding is never silently run as greedy or sampling. Keys that do not change the tokens (`transformers_version`,
`use_cache`, `output_scores`, ...) are ignored. `to_hf()` gives back the dict that was read, so `save_pretrained`
writes the file unchanged.

Unlike transformers, a file-less model gets no defaults from its `config.json` (`eos_token_id` there is not
implied); `easymamba.pipeline.TextGenerator` does take them, as transformers' `generate` does.
"""

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from easymamba import jsonio

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers settings the decode loop does not implement, with the values at which they change nothing.
_NEUTRAL = {
    "num_beams": (1,), "num_beam_groups": (1,), "diversity_penalty": (0.0,), "min_length": (0,),
    "min_new_tokens": (None, 0), "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
    "no_repeat_ngram_size": (0,), "encoder_no_repeat_ngram_size": (0,), "encoder_repetition_penalty": (1.0,),
    "bad_words_ids": (None, []), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []), "exponential_decay_length_penalty": (None,),
    "sequence_bias": (None, {}), "guidance_scale": (None, 1.0), "renormalize_logits": (False,),
    "penalty_alpha": (None,), "dola_layers": (None,), "top_h": (None,), "watermarking_config": (None,),
    "stop_strings": (None, []), "token_healing": (False,), "remove_invalid_values": (False,), "max_time": (None,),
}
# Read into the fields below.
_FIELDS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
           "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id")


def _int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """The defaults of a `generation_config.json` (module docstring); hashable, so a model can carry it."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    source: str = "{}"  # the JSON read, sorted (to_hf gives it back)

    def __post_init__(self):
        def check(name: str, ok: bool, expected: str) -> None:
            value = getattr(self, name)
            if value is not None and not ok:
                raise ValueError(f"generation config {name} ({value!r}) must be {expected}")

        check("max_new_tokens", _int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1")
        check("max_length", _int(self.max_length) and self.max_length >= 1, "an integer >= 1")
        check("do_sample", isinstance(self.do_sample, bool), "true or false")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            check(name, _real(getattr(self, name)) and np.isfinite(getattr(self, name)), "a finite number")
        check("top_k", _int(self.top_k) and self.top_k >= 0, "an integer >= 0")
        for name in ("pad_token_id", "bos_token_id"):
            check(name, _int(getattr(self, name)) and getattr(self, name) >= 0, "a non-negative integer")
        eos = self.eos_token_id
        check("eos_token_id", _int(eos) and eos >= 0 or isinstance(eos, (list, tuple)) and len(eos) > 0
              and all(_int(i) and i >= 0 for i in eos), "a non-negative integer or a non-empty list of them")
        if isinstance(eos, list):
            object.__setattr__(self, "eos_token_id", tuple(eos))

    @classmethod
    def from_hf(cls, source: "dict | str | os.PathLike") -> "GenerationDefaults":
        """From a `generation_config.json` dict, file, or the directory holding it."""
        where = "generation config"
        if not isinstance(source, dict):
            path = pathlib.Path(source)
            path = path / GENERATION_CONFIG_NAME if path.is_dir() else path
            where = str(path)
            source = jsonio.load_object(path)
        if not isinstance(source, dict):
            raise ValueError(f"{where} must hold a JSON object; got {type(source).__name__}")
        for key, neutral in _NEUTRAL.items():
            value = source.get(key, neutral[0])
            if not any(value is n or (n is not None and type(value) is type(n) and value == n) or
                       (isinstance(n, float) and _real(value) and value == n) for n in neutral):
                raise ValueError(f"{where} sets {key} = {value!r}, which easymamba's decode loop does not do "
                                 f"(greedy and sampling only); remove it or set it to {neutral[0]!r}")
        try:
            fields = {**_IMPLIED, **{k: source[k] for k in _FIELDS if source.get(k) is not None}}
            return cls(**fields, source=json.dumps(source, sort_keys=True))
        except ValueError as exc:
            if where == "generation config":
                raise
            raise ValueError(f"{where}: {exc}") from None

    def to_hf(self) -> dict:
        """The dict that was read (`from_hf`), or the fields set, for `generation_config.json`."""
        out = json.loads(self.source)
        out.update({k: getattr(self, k) for k in _FIELDS
                    if getattr(self, k) is not None and k not in out and k not in _IMPLIED})
        if isinstance(out.get("eos_token_id"), tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        return out

    def settings(self) -> dict[str, Any]:
        """The fields the file sets, by name (those `generate` reads: all but bos_token_id)."""
        return {k: getattr(self, k) for k in _FIELDS if k != "bos_token_id" and getattr(self, k) is not None}


# what a generation_config.json implies where it is silent (transformers' GenerationConfig defaults that differ
# from generate's own); never written back by `to_hf`
_IMPLIED = {"top_k": 50}

__all__ = ["GENERATION_CONFIG_NAME", "GenerationDefaults"]
