"""Text in, text out: a model, its tokenizer and its generation defaults, as one object.

    gen = TextGenerator.from_pretrained(model_dir)
    gen.generate("ROMEO:", max_new_tokens=40)                 -> str, the continuation only
    gen.generate(["ROMEO:", "JULIET:"], max_new_tokens=40)    -> list[str] (left padding, one batch)
    for piece in gen.stream("ROMEO:", max_new_tokens=40): print(piece, end="")
    gen.chat([{"role": "user", "content": "Hi"}])             -> str (the tokenizer's chat template)

`model_dir` is what a Hugging Face model directory holds: the model (safetensors or torch weights with
`config.json`, or an easymamba orbax checkpoint), `tokenizer.json` (the `tokenizers` library), and optionally
`tokenizer_config.json` (special tokens, `chat_template`) and `generation_config.json` (the defaults; see
`easymamba.config.generation`).

Defaults, as transformers' `generate` takes them: each setting left at None comes from `generation_config.json`,
else from the model's `config.json` for the EOS and pad ids, else from `easymamba.generate`'s defaults (greedy).
Sampling with neither `seed` nor `rng` draws a fresh seed, so two calls give two samples (as transformers does).

The text: each row's tokens are decoded with the prompt's and the prompt's text is cut off the front (as
transformers' `TextGenerationPipeline` does, so tokenizers that drop a word's leading space when decoding it
alone still give `" world"`); special tokens are skipped, and a row's final EOS is never part of its text.

Stop strings (`stop=["\\n\\n", ...]`): a row's text ends just before the first one it produces (the stop string
is not included), and generation stops once every row has ended. With stop strings the tokens come from the
streaming step (`easymamba.stream_generate`: one jitted decode step per token, the same step the loop runs), so
decoding can stop as soon as every row has its stop string; without, from the one jitted loop of `generate`.
`stream` holds back text that might be the start of a stop string until it is known not to be.
"""

import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from easymamba import jsonio
from easymamba.checkpoints import from_pretrained, is_checkpoint, load_checkpoint
from easymamba.checkpoints.hf_reader import read_generation_config
from easymamba.generation import generate, model_defaults, stream_generate

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(entry: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or transformers' AddedToken dict."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


class TextGenerator:
    """A causal LM with its tokenizer: `generate`, `stream` and `chat` on text (module docstring).

    model             any family's causal LM (`easymamba.from_pretrained`)
    tokenizer         a `tokenizers.Tokenizer`
    tokenizer_config  the dict of `tokenizer_config.json` (special tokens, `chat_template`), or None
    """

    def __init__(self, model, tokenizer, tokenizer_config: dict | None = None):
        if not hasattr(model, "backbone") or not hasattr(model, "config"):
            raise ValueError(f"model must be a causal LM such as Mamba2ForCausalLM; got {type(model).__name__}")
        if not (hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "decode")):
            raise ValueError(f"tokenizer must be a tokenizers.Tokenizer; got {type(tokenizer).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer_config = dict(tokenizer_config or {})
        # transformers' fallback for a generation config without them: the model config's ids
        defaults, config = model_defaults(model), model.config
        self._fallback = {name: getattr(config, name, None) for name in ("eos_token_id", "pad_token_id")
                          if name not in defaults and getattr(config, name, None) is not None}

    @classmethod
    def from_pretrained(cls, model_dir: "str | os.PathLike", *, dtype=None, param_dtype=None,
                        **load_kwargs) -> "TextGenerator":
        """The model, tokenizer and defaults of `model_dir` (module docstring). `dtype` / `param_dtype` and
        `load_kwargs` (`mesh`, `kernel_impl`, ...) go to `easymamba.from_pretrained` or, for an orbax
        checkpoint, `easymamba.load_checkpoint`."""
        from tokenizers import Tokenizer

        directory = pathlib.Path(model_dir)
        if not directory.is_dir():
            raise ValueError(f"model_dir ({model_dir}) must be a directory holding the model and {TOKENIZER_NAME}")
        tokenizer_file = directory / TOKENIZER_NAME
        if not tokenizer_file.is_file():
            raise ValueError(f"{directory} has no {TOKENIZER_NAME}; TextGenerator needs the tokenizer beside the "
                             "model (a `tokenizers` file, as Hugging Face model directories hold)")
        if is_checkpoint(directory):
            model = load_checkpoint(directory, dtype=dtype, param_dtype=param_dtype, **load_kwargs)
        else:
            model = from_pretrained(directory, dtype=dtype, param_dtype=param_dtype, **load_kwargs)
        if getattr(model, "generation_config", None) is None:
            defaults = read_generation_config(directory)
            if defaults is not None:
                model.generation_config = defaults
        config_file = directory / TOKENIZER_CONFIG_NAME
        tokenizer_config = None
        if config_file.is_file():
            tokenizer_config = jsonio.load_object(config_file)
        return cls(model, Tokenizer.from_file(str(tokenizer_file)), tokenizer_config)

    # -- settings ------------------------------------------------------------------------------------------------
    def _settings(self, kwargs: dict, seed, rng) -> dict:
        settings = {k: v for k, v in kwargs.items() if v is not None}
        for name, value in self._fallback.items():
            settings.setdefault(name, value)
        if seed is not None and rng is not None:
            raise ValueError("pass seed or rng, not both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise ValueError(f"seed ({seed!r}) must be an integer")
            rng = jax.random.key(int(seed))
        if rng is None and self._samples(settings):
            rng = jax.random.key(int(np.random.SeedSequence().entropy % 2**63))  # a fresh sample per call
        if rng is not None:
            settings["rng"] = rng
        return settings

    def _samples(self, settings: dict) -> bool:
        """Whether these settings sample: their do_sample, else the model directory's, else greedy."""
        return bool(settings.get("do_sample", model_defaults(self.model).get("do_sample", False)))

    def _eos_ids(self, settings: dict) -> tuple[int, ...]:
        eos = settings.get("eos_token_id", model_defaults(self.model).get("eos_token_id"))
        return () if eos is None else (int(eos),) if isinstance(eos, (int, np.integer)) else tuple(eos)

    # -- tokens <-> text -------------------------------------------------------------------------------------------
    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ValueError(f"prompt {empty[0]} ({texts[empty[0]]!r}) encodes to no tokens; give some text")
        return ids

    def _batch(self, rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Left-padded ids [b, l] and their mask (None when every row has the same length)."""
        width = max(map(len, rows))
        ids = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        return ids, None if mask.all() else mask

    def _continuation(self, prompt: list[int], new: list[int], skip_special_tokens: bool) -> str:
        """The text `new` adds after `prompt`: decoded together, the prompt's own text cut off the front."""
        full = self.tokenizer.decode(prompt + new, skip_special_tokens=skip_special_tokens)
        head = self.tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens)
        if full.startswith(head):
            return full[len(head):]
        return self.tokenizer.decode(new, skip_special_tokens=skip_special_tokens)

    @staticmethod
    def _check_stop(stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop ({stop!r}) must be a non-empty string or a list of them")
        return tuple(stop)

    @staticmethod
    def _cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
        """`text` up to the first stop string in it, and whether there was one."""
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    # -- generation ------------------------------------------------------------------------------------------------
    def _prompts(self, prompts) -> tuple[list[str], bool]:
        if isinstance(prompts, str):
            return [prompts], True
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
            return list(prompts), False
        raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r:.80}")

    def _rows(self, texts: list[str], settings: dict, stop: tuple[str, ...], skip_special_tokens: bool,
              add_special_tokens: bool) -> Iterator[list[str]]:
        """Each row's continuation so far, after each decode step (with stop strings) or once at the end."""
        prompts = self._encode(texts, add_special_tokens)
        pad = settings.get("pad_token_id", model_defaults(self.model).get("pad_token_id"))
        eos = self._eos_ids(settings)
        pad = pad if pad is not None else eos[0] if eos else 0
        ids, mask = self._batch(prompts, pad)
        if not stop:  # the whole loop in one jitted call
            out = generate(self.model, ids, attention_mask=mask, **settings)
            seqs, counts = np.asarray(out.sequences[:, ids.shape[1]:]), np.asarray(out.num_generated)
            new = [seqs[i, :counts[i]].tolist() for i in range(len(prompts))]
            yield [self._continuation(p, n[:-1] if n and n[-1] in eos else n, skip_special_tokens)
                   for p, n in zip(prompts, new)]
            return
        new: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)  # EOS or a stop string
        texts_now = [""] * len(prompts)
        for tokens in stream_generate(self.model, ids, attention_mask=mask, **settings):
            for i, token in enumerate(tokens.tolist()):
                if ended[i]:
                    continue
                if token in eos:
                    ended[i] = True
                else:
                    new[i].append(token)
                texts_now[i], hit = self._cut(self._continuation(prompts[i], new[i], skip_special_tokens), stop)
                ended[i] = ended[i] or hit
            yield list(texts_now)
            if all(ended):
                break

    def generate(self, prompts: "str | list[str]", *, max_new_tokens: int | None = None,
                 max_length: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, eos_token_id=None, pad_token_id=None,
                 stop: "str | list[str] | None" = None, seed: int | None = None, rng=None,
                 return_full_text: bool = False, skip_special_tokens: bool = True,
                 add_special_tokens: bool = True, num_return_sequences: int = 1) -> "str | list":
        """The continuation of `prompts` (a string -> a string; a list -> a list, run as one left-padded batch).

        The settings are `easymamba.generate`'s; None takes the model directory's defaults (module docstring).
        stop                 a string or strings: each row's text ends before the first it produces
        seed / rng           the sampling key (an int, or a `jax.random.key`); neither: a fresh one
        return_full_text     prompt + continuation instead of the continuation alone
        add_special_tokens   let the tokenizer add its special tokens (a BOS) to the prompts
        num_return_sequences n > 1 samples per prompt (sampling only), as `generate`'s: a string -> a list of n
                             strings; a list -> a list of such lists
        """
        texts, single = self._prompts(prompts)
        stop = self._check_stop(stop)
        n = num_return_sequences
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_return_sequences ({n!r}) must be an integer >= 1")
        settings = self._settings(dict(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                                       pad_token_id=pad_token_id), seed, rng)
        if n > 1 and not self._samples(settings):
            raise ValueError(f"num_return_sequences={n} needs sampling (do_sample=True): greedy decoding gives "
                             "the same text every time")
        rows = [t for t in texts for _ in range(n)]  # each prompt's n rows together, as generate repeats them
        outs = [""] * len(rows)
        for outs in self._rows(rows, settings, stop, skip_special_tokens, add_special_tokens):
            pass
        if return_full_text:
            outs = [t + o for t, o in zip(rows, outs)]
        if n > 1:
            outs = [outs[i * n:(i + 1) * n] for i in range(len(texts))]
        return outs[0] if single else outs

    def stream(self, prompt: str, *, max_new_tokens: int | None = None, max_length: int | None = None,
               do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
               eos_token_id=None, pad_token_id=None, stop: "str | list[str] | None" = None, seed: int | None = None,
               rng=None, skip_special_tokens: bool = True, add_special_tokens: bool = True) -> Iterator[str]:
        """`generate` for one prompt, as the pieces of its continuation as they are produced: joined, they are
        `generate`'s text. A piece is yielded once it is final: text ending in an incomplete character (a
        token that is part of a multi-byte one) or that could begin a stop string waits for the next token."""
        if not isinstance(prompt, str):
            raise ValueError(f"stream takes one prompt string; got {type(prompt).__name__} (use generate for a "
                             "batch)")
        stop = self._check_stop(stop) or ()
        settings = self._settings(dict(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                                       pad_token_id=pad_token_id), seed, rng)
        # Stepping token by token: a stop string that never comes is the only one that can end it.
        sentinel = stop or ("\0never\0",)
        shown = 0
        text = ""
        for (text,) in self._rows([prompt], settings, sentinel, skip_special_tokens, add_special_tokens):
            safe = len(text.rstrip("\ufffd"))
            for s in stop:  # keep back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[safe - k:safe] == s[:k]:
                        safe -= k
                        break
            if safe > shown:
                yield text[shown:safe]
                shown = safe
        if len(text) > shown:
            yield text[shown:]

    # -- chat ------------------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The `chat_template` of tokenizer_config.json (its "default" one when it lists several), or None."""
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra) -> str:
        """The conversation `messages` ([{"role": ..., "content": ...}, ...]) rendered by the tokenizer's chat
        template, as transformers' `apply_chat_template(tokenize=False)` renders it (jinja2, sandboxed; the
        template sees `messages`, `add_generation_prompt`, the special tokens and `extra`)."""
        template = self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json carries none); "
                             "format the prompt yourself and call generate")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts; got {messages!r:.80}")
        try:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("chat templates are rendered with jinja2: pip install 'jinja2>=3.1.6'") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        special = {k: _token_text(self.tokenizer_config.get(k)) for k in _SPECIAL}
        special = {k: v for k, v in special.items() if v is not None}
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **{**special, **extra})

    def chat(self, messages: list[dict], **kwargs) -> str:
        """The reply to a conversation: `apply_chat_template(messages)` continued by `generate(**kwargs)`. The
        rendered text already holds the template's special tokens, so none are added on encoding."""
        kwargs.setdefault("add_special_tokens", False)
        return self.generate(self.apply_chat_template(messages), **kwargs)


__all__ = ["TextGenerator"]
