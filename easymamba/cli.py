"""The `easymamba` command line: `generate`, `info` and `convert`.

`easymamba generate [PROMPT ...]` continues prompts with a model: an HF checkpoint directory (config.json +
weights, any family easymamba loads) or an easymamba orbax checkpoint, with the `tokenizer.json` beside it
(default: the small Shakespeare model that ships inside the package, so it works offline). Prompts come as
arguments (several make a batch, left-padded), from stdin (`-`, or no prompt while stdin is a pipe: the whole
text is one prompt), from `--prompt-file` (one prompt per non-blank line) or as token ids (`--ids 1,2,3`).
Decoding: sampling at `--temperature` 0.8 with a fresh random seed unless `--seed` is given (the stats line
on stderr prints the seed, so a run can be repeated); `--temperature 0` is greedy decoding. One prompt
streams its tokens as they come (`--no-stream`: the text at the end); `--json` prints one JSON object per
prompt (prompt, continuation, token counts, timing); `--no-echo` leaves out the prompt.

`easymamba info [MODEL]` prints a model's family, sizes, parameter count, dtype and which kernels run here
(`--json` for a JSON object), reading the config and the tensors' headers, not the weights.

`easymamba convert SRC DST` converts checkpoint directories of any family: an HF one (config.json +
safetensors or pytorch_model.bin, HF or state-spaces layout) to an easymamba orbax checkpoint, and an orbax
checkpoint back to an HF one (safetensors that transformers loads). `--to hf` also turns an HF/torch directory
into safetensors. Parameters keep the source's dtype unless `--dtype` says otherwise, so a round trip HF ->
orbax -> HF gives the same tensors bit for bit; the source's HF `config.json` is written back as it was (only
its dtype updated), and the tokenizer and generation files beside it are copied. DST must not exist or be
empty, unless `--overwrite` (then it must hold a checkpoint of the output kind, which is replaced).

Exit status: 0 on success; 2 for a bad command line (argparse's usage message: flags are checked before
anything loads); 1 for anything else a user can cause (a missing or unreadable file, a model that does not
load, a destination that cannot be written), with one line `easymamba: error: ...` on stderr; 130 on Ctrl-C.
The module imports nothing heavy at import time, so `--help` and argument errors answer at once.
"""

import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import time

SHIPPED_MODEL = pathlib.Path(__file__).resolve().parent / "assets" / "tiny-shakespeare"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
# What a model directory carries beside its weights that `convert` copies: the tokenizer, its settings and
# the generation defaults (config.json is written, not copied: see _write_source_config).
SIDE_FILES = (TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DTYPES = ("float32", "bfloat16", "float16")


class UserError(Exception):
    """Something the user gave (a path, a file's contents, an input) that cannot be used; one line, exit 1."""


# ---- the command line --------------------------------------------------------------------------------------

def _number(kind, test=lambda v: True, expected: str = ""):
    """An argparse `type` that parses an int or a finite float and checks it; argparse names the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value
    return parse


_COUNT = _number(int, lambda v: v >= 1, "an integer >= 1")
_TEMPERATURE = _number(float, lambda v: v >= 0, ">= 0 (0: greedy)")
_TOP_K = _number(int, lambda v: v >= 0, "an integer >= 0 (0: off)")
_TOP_P = _number(float, lambda v: 0 <= v <= 1, "in [0, 1] (1: off)")
_MIN_P = _number(float, lambda v: 0 <= v <= 1, "in [0, 1] (0: off)")
_PENALTY = _number(float, lambda v: v > 0, "> 0 (1: off)")
_SEED = _number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")


def _parser() -> argparse.ArgumentParser:
    from easymamba import __version__  # the package imports its names lazily: this is cheap

    parser = argparse.ArgumentParser(prog="easymamba", description="Mamba-family language models in JAX")
    parser.add_argument("--version", action="version", version=f"easymamba {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,info,convert}")

    gen = sub.add_parser(
        "generate", help="continue one or more prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue prompts with a model.\n\nDefault decoding: sampling at temperature 0.8 with a fresh "
                    "random seed,\nprinted on the stats line (repeat a run with --seed); --temperature 0 is greedy.",
        epilog="examples:\n  easymamba generate 'ROMEO:'\n  echo 'ROMEO:' | easymamba generate --temperature 0\n"
               "  easymamba generate 'ROMEO:' 'JULIET:' --json --no-echo\n"
               "  easymamba generate --prompt-file prompts.txt --model path/to/checkpoint --seed 7")
    gen.add_argument("prompt", nargs="*", help="prompt text; several make a batch; - reads one prompt from stdin "
                                               "(so does no prompt while stdin is a pipe)")
    gen.add_argument("--prompt-file", metavar="FILE", help="one prompt per non-blank line (- for stdin)")
    gen.add_argument("--ids", metavar="1,2,3", help="comma-separated prompt token ids instead of text")
    gen.add_argument("--model", metavar="DIR", help="HF checkpoint directory or easymamba orbax checkpoint, with "
                     "tokenizer.json beside it (default: the small Shakespeare model shipped in the package)")
    gen.add_argument("--dtype", choices=DTYPES, help="compute and parameter dtype (default: float32 for an HF "
                                                     "directory, as saved for an orbax checkpoint)")
    gen.add_argument("--max-new-tokens", metavar="N", type=_COUNT, default=64,
                     help="tokens to generate per prompt (default 64)")
    gen.add_argument("--temperature", metavar="T", type=_TEMPERATURE, default=0.8,
                     help="0: greedy decoding (argmax); > 0: sample at this temperature (default 0.8)")
    gen.add_argument("--top-k", metavar="K", type=_TOP_K, default=0,
                     help="sample among the k most likely tokens (default 0: off)")
    gen.add_argument("--top-p", metavar="P", type=_TOP_P, default=1.0,
                     help="nucleus sampling mass (default 1.0: off)")
    gen.add_argument("--min-p", metavar="P", type=_MIN_P, default=0.0,
                     help="drop tokens below min-p times the top probability (default 0: off)")
    gen.add_argument("--repetition-penalty", metavar="R", type=_PENALTY, default=1.0,
                     help="> 1 discourages repeats, also when greedy (default 1.0: off)")
    gen.add_argument("--seed", metavar="SEED", type=_SEED,
                     help="sampling seed (default: a fresh random one, printed on the stats line)")
    gen.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="print a single prompt's tokens as they come (default) or the text at the end")
    gen.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                     help="print the prompt before its continuation (default; --no-echo: the continuation only)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt: prompt, text (the continuation), ids, token counts, "
                          "timing, seed")
    gen.set_defaults(run=_generate)

    info = sub.add_parser("info", help="describe a model: family, sizes, parameters, dtype, kernels",
                          description="Describe a model without loading its weights: family, sizes, parameter "
                                      "count, dtype and which kernel form each op runs in on this machine.")
    info.add_argument("model", nargs="?", help="HF checkpoint directory or easymamba orbax checkpoint (default: "
                                               "the shipped model)")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.set_defaults(run=_info)

    conv = sub.add_parser("convert", help="convert a checkpoint directory: HF/torch <-> orbax",
                          description="Convert an HF checkpoint directory to an easymamba orbax checkpoint, or an "
                                      "orbax checkpoint to an HF directory (config.json + safetensors). The "
                                      "tokenizer and generation files beside the source are copied.")
    conv.add_argument("src", help="HF directory (config.json + weights) or easymamba orbax checkpoint")
    conv.add_argument("dst", help="output directory: new or empty (or, with --overwrite, a checkpoint of the "
                                  "output kind)")
    conv.add_argument("--to", choices=("orbax", "hf"), default=None,
                      help="output format (default: orbax for an HF source, hf for an orbax source)")
    conv.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                      help="parameter dtype of the output (default: the source's)")
    conv.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard for --to hf (5GB)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace the checkpoint DST holds (refused by default)")
    conv.set_defaults(run=_convert)
    return parser


# ---- model directories -------------------------------------------------------------------------------------

def _model_dir(path: "str | None") -> tuple[pathlib.Path, str]:
    """(directory, "hf" or "orbax") of a model path, checked without reading any weights."""
    directory = SHIPPED_MODEL if path is None else pathlib.Path(path)
    if not directory.exists():
        raise UserError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise UserError(f"{directory} is a file, not a model directory: give the directory that holds "
                        f"{CONFIG_NAME} and the weights, or an easymamba orbax checkpoint")
    kind = _kind(directory)
    if kind is None:
        raise UserError(f"{directory} is neither an HF checkpoint directory ({CONFIG_NAME} + weights) nor an "
                        "easymamba orbax checkpoint (version directories such as 1/)")
    return directory, kind


def _kind(directory: pathlib.Path) -> "str | None":
    """"hf", "orbax" or None. An orbax checkpoint converted from HF keeps the source's config.json beside its
    version directories, so config.json alone does not make an HF directory; weights or versions decide."""
    has_config = (directory / CONFIG_NAME).is_file()
    if has_config and any((directory / name).is_file() for name in WEIGHT_FILES):
        return "hf"
    if any(child.name.isdigit() and child.is_dir() for child in directory.iterdir()):
        return "orbax"
    return "hf" if has_config else None  # the loader then says which weights are missing


def _load_tokenizer(directory: pathlib.Path, *, required: bool):
    path = directory / TOKENIZER_NAME
    if not path.is_file():
        if required:
            raise UserError(f"{directory} has no {TOKENIZER_NAME}, so text cannot be encoded: put the model's "
                            f"{TOKENIZER_NAME} beside it (easymamba convert copies it) or give token ids with --ids")
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception for any unreadable file
        raise UserError(f"{path} is not a tokenizer the tokenizers library reads: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _load_model(directory: pathlib.Path, kind: str, dtype: "str | None"):
    from easymamba import checkpoints

    if dtype is not None:
        import jax.numpy as jnp

        dtype = jnp.dtype(dtype)
    if kind == "orbax":
        return checkpoints.load_checkpoint(directory, dtype=dtype, param_dtype=dtype)
    return checkpoints.from_pretrained(directory, dtype=dtype, param_dtype=dtype)


def _read_json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a JSON file: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


# ---- generate ----------------------------------------------------------------------------------------------

def _read_prompts(args) -> list[str]:
    """The text prompts, in order: arguments (`-` is stdin), then --prompt-file lines; stdin when none."""
    given = args.prompt or []
    if args.ids is not None:
        if given or args.prompt_file:
            raise UserError("give prompts or --ids, not both")
        return []
    prompts = []
    for prompt in given:
        prompts.append(_stdin_text() if prompt == "-" else prompt)
    if args.prompt_file is not None:
        try:
            text = _stdin_text() if args.prompt_file == "-" else pathlib.Path(args.prompt_file).read_text()
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--prompt-file {args.prompt_file} holds no prompt (only blank lines)")
        prompts.extend(lines)
    if not given and args.prompt_file is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no prompt: give text, - to read it from stdin, --prompt-file FILE or --ids 1,2,3")
        prompts.append(_stdin_text())
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            where = "" if len(prompts) == 1 else f" (prompt {i + 1} of {len(prompts)})"
            raise UserError(f"the prompt is empty{where}; give some text (or token ids with --ids 1,2,3)")
    return prompts


def _stdin_text() -> str:
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text  # `echo ROMEO:` adds a newline the prompt does not have


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UserError("--ids is empty")
    return ids


def _special_ids(directory: pathlib.Path, config) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id): generation_config.json's when it has them (as transformers reads them), else the
    model config's; the pad id defaults to the first EOS id, else 0."""
    eos, pad = config.eos_token_id, getattr(config, "pad_token_id", None)
    path = directory / "generation_config.json"
    if path.is_file():
        extra = _read_json(path)
        eos = extra.get("eos_token_id", eos)
        pad = extra.get("pad_token_id", pad)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    if not all(isinstance(i, int) and i >= 0 for i in eos_ids):
        raise UserError(f"eos_token_id {eos!r} of {directory} must be a token id or a list of them")
    if not isinstance(pad, int) or pad < 0:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, pad


def _stats_line(text: str) -> None:
    """One line on stderr, never wrapped (dim on a terminal)."""
    dim = sys.stderr.isatty()
    print(f"\x1b[2m{text}\x1b[0m" if dim else text, file=sys.stderr, flush=True)


def _generate(args) -> int:
    prompts = _read_prompts(args)
    ids_given = _parse_ids(args.ids) if args.ids is not None else None
    directory, kind = _model_dir(args.model)
    tokenizer = _load_tokenizer(directory, required=ids_given is None)
    if ids_given is not None:
        rows = [ids_given]
    else:
        rows = [tokenizer.encode(p).ids for p in prompts]
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise UserError(f"prompt {empty[0] + 1} encodes to no tokens")
    sampling = args.temperature > 0
    seed = None
    if sampling:
        import secrets

        seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from easymamba.generation import generate, stream_generate

    model = _load_model(directory, kind, args.dtype)
    vocab = model.config.vocab_size
    for row in rows:
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {vocab}) of {directory}")
    eos_ids, pad = _special_ids(directory, model.config)

    def echoed(i: int, text: str) -> str:
        sep = " " if tokenizer is None and text else ""  # token ids are printed space-separated
        return (shown_prompts[i] + sep if args.echo else "") + text

    def decode(toks: list[int]) -> str:
        return tokenizer.decode(toks) if tokenizer is not None else " ".join(map(str, toks))

    def continuation(prompt_ids: list[int], new: list[int]) -> str:
        # decode prompt + continuation together: a decoder that strips a leading space or merges bytes across
        # the boundary (SentencePiece, byte-level) gives a different text for the continuation alone
        if tokenizer is None:
            return " ".join(map(str, new))
        head = decode(prompt_ids)
        whole = decode(prompt_ids + new)
        return whole[len(head):] if whole.startswith(head) else decode(new)

    b, width = len(rows), max(len(r) for r in rows)
    input_ids = np.full((b, width), pad, np.int32)
    mask = np.zeros((b, width), np.int32)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                    temperature=args.temperature if sampling else 1.0, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    eos_token_id=list(eos_ids) or None, pad_token_id=pad,
                    rng=jax.random.key(seed if seed is not None else 0),
                    attention_mask=None if mask.all() else jnp.asarray(mask))
    shown_prompts = prompts if ids_given is None else [decode(ids_given)]
    start = time.perf_counter()
    first = None
    generated: list[list[int]] = [[] for _ in rows]
    stopped = [False] * b
    if args.stream and b == 1 and not args.json:
        shown = echoed(0, "")
        sys.stdout.write(shown)
        sys.stdout.flush()
        for step in stream_generate(model, jnp.asarray(input_ids), **settings):
            first = first or time.perf_counter()
            tok = int(np.asarray(step)[0])
            if tok in eos_ids:
                stopped[0] = True
                break
            generated[0].append(tok)
            text = echoed(0, continuation(rows[0], generated[0]))
            if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(echoed(0, continuation(rows[0], generated[0]))[len(shown):] + "\n")
        sys.stdout.flush()
    else:
        out = generate(model, jnp.asarray(input_ids), **settings)
        sequences, counts = np.asarray(out.sequences), np.asarray(out.num_generated)
        for i in range(b):
            new = sequences[i, width:width + int(counts[i])].tolist()
            stopped[i] = bool(new) and new[-1] in eos_ids
            generated[i] = new[:-1] if stopped[i] else new
    elapsed = time.perf_counter() - start
    total = sum(len(g) for g in generated)
    decoding = f"sampled, temperature {args.temperature:g}, --seed {seed}" if sampling else "greedy"
    if args.json:
        for i, row in enumerate(rows):
            record = {"prompt": shown_prompts[i], "text": continuation(row, generated[i]), "prompt_ids": row,
                      "ids": generated[i], "prompt_tokens": len(row), "generated_tokens": len(generated[i]),
                      "finish_reason": "eos" if stopped[i] else "length", "seconds": round(elapsed, 4),
                      "batch_tokens_per_second": round(total / elapsed, 2) if elapsed > 0 else None,
                      "seed": seed, "model": str(directory), "dtype": str(np.dtype(model.dtype))}
            print(json.dumps(record, ensure_ascii=False))
    elif first is None:  # not streamed
        for i, row in enumerate(rows):
            if i:
                print()
            print(echoed(i, continuation(row, generated[i])))
    if first is not None and len(generated[0]) > 1 and time.perf_counter() > first:
        steady = (f"{(len(generated[0]) - 1) / (time.perf_counter() - first):.1f} tokens/s after the first "
                  f"(first token after {first - start:.2f} s: compile + prefill)")
    else:
        steady = f"{total / elapsed:.1f} tokens/s overall, compile included" if elapsed > 0 else ""
    rows_note = f"{b} prompts, " if b > 1 else ""
    _stats_line(f"{rows_note}{total} tokens in {elapsed:.2f} s: {steady}; {decoding}")
    return 0


# ---- info --------------------------------------------------------------------------------------------------

def _mixer_sizes(config) -> dict:
    mixer = getattr(config, "mixer_config", None) or config
    if hasattr(mixer, "head_dim") and hasattr(mixer, "chunk_size"):  # Mamba-2 (SSD)
        return {"mixer": "mamba2", "heads": mixer.num_heads, "head_dim": mixer.head_dim,
                "state_size": mixer.state_size, "groups": mixer.n_groups, "conv_kernel": mixer.conv_kernel,
                "chunk_size": mixer.chunk_size}
    return {"mixer": "mamba", "intermediate_size": mixer.intermediate_size, "state_size": mixer.state_size,
            "conv_kernel": mixer.conv_kernel,
            "time_step_rank": getattr(mixer, "resolved_time_step_rank", mixer.time_step_rank)}


def _kernels(sizes: dict, dtype) -> dict:
    """op -> "impl: reason" for what `kernel_impl="auto"` runs here at this model's sizes."""
    from easymamba.kernels import resolver

    k = sizes["conv_kernel"]
    if sizes["mixer"] == "mamba2":
        p, n = sizes["head_dim"], sizes["state_size"]
        c = sizes["heads"] * p + 2 * sizes["groups"] * n
        dims = {"ssd": dict(p=p, n=n, dtype=dtype), "causal_conv1d": dict(c=c, k=k),
                "causal_conv1d_update": dict(c=c, k=k), "selective_state_update": dict(p=p, n=n),
                "decode_step": dict(p=p, n=n, k=k)}
    else:
        c = sizes["intermediate_size"]
        dims = {"selective_scan": {}, "causal_conv1d": dict(c=c, k=k), "causal_conv1d_update": dict(c=c, k=k)}
    return {op: resolver.describe(op, **d) if d else str(resolver.resolve(op)) for op, d in dims.items()}


def _describe(directory: pathlib.Path, kind: str) -> dict:
    """What `info` prints. "parameters" counts the elements of the stored tensors, a tied lm_head once (HF's
    `num_parameters()` also leaves out the tensors it keeps as buffers, e.g. Nemotron-H's router correction
    bias)."""
    import jax
    import numpy as np

    from easymamba.checkpoints import hf_reader, orbax_io
    from easymamba.models import config_from_hf, family_of

    if kind == "orbax":
        meta = orbax_io._read_meta(orbax_io._latest(directory.absolute()))
        config = config_from_hf(meta["config"])
        shapes = {name: spec["shape"] for name, spec in meta["params"].items()}
        dtypes = sorted({spec["dtype"] for spec in meta["params"].values()})
        compute = meta["dtype"]
    else:
        from easymamba.checkpoints.sources import open_weights

        config = hf_reader.read_config(directory)
        src = open_weights(directory)
        try:
            names = [n for n in src.names() if not (config.tie_word_embeddings and n == "lm_head.weight")]
            shapes = {n: src.shape(n) for n in names}
        finally:
            src.close()
        dtypes = [str(hf_reader.checkpoint_dtype(directory))]
        compute = "float32"  # from_pretrained's default; `generate --dtype` changes it
    family = family_of(config)
    sizes = {"layers": config.num_hidden_layers, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}
    kinds = getattr(config, "layer_cache_kinds", None)
    if kinds is not None:
        count = {}
        for layer in kinds:
            name = "+".join(layer) or "mlp"
            count[name] = count.get(name, 0) + 1
        sizes["layer_kinds"] = count
    sizes.update(_mixer_sizes(config))
    attention = getattr(config, "attention_config", None)
    if attention is not None:
        sizes.update(attention_heads=attention.num_attention_heads, kv_heads=attention.num_key_value_heads,
                     attention_head_dim=attention.head_dim)
    moe = getattr(config, "moe_config", None)
    if moe is not None:
        sizes.update(experts=moe.num_experts, experts_per_token=moe.top_k)
    return {"model": str(directory), "format": kind, "family": config.model_type,
            "class": family.causal_lm.__name__, "sizes": sizes,
            "parameters": int(sum(int(np.prod(s)) for s in shapes.values())),
            "param_dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "compute_dtype": compute,
            "backend": f"{jax.default_backend()} ({jax.device_count()} device{'s' * (jax.device_count() > 1)})",
            "kernels": _kernels(sizes, np.dtype(dtypes[0]) if len(dtypes) == 1 else np.float32)}


def _info(args) -> int:
    directory, kind = _model_dir(args.model)
    described = _describe(directory, kind)
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    sizes = ", ".join(f"{k} {v}" for k, v in described["sizes"].items() if k not in ("layer_kinds", "mixer"))
    kinds = described["sizes"].get("layer_kinds")
    lines = [f"model       {described['model']} ({described['format']})",
             f"family      {described['family']} ({described['class']}, {described['sizes']['mixer']} mixer)",
             f"sizes       {sizes}"]
    if kinds:
        lines.append("layers      " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    lines += [f"parameters  {described['parameters']:,} ({described['parameters'] / 1e6:.1f} M)",
              f"dtype       parameters {described['param_dtype']}, compute {described['compute_dtype']}",
              f"backend     {described['backend']}", "kernels     (kernel_impl='auto')"]
    lines += [f"  {op:<23} {why}" for op, why in described["kernels"].items()]
    print("\n".join(lines))
    return 0


# ---- convert -----------------------------------------------------------------------------------------------

def _check_destination(src: pathlib.Path, dst: pathlib.Path, to: str, overwrite: bool) -> None:
    """Refuse, before anything is read or written, a DST that would lose what it holds or cannot be written."""
    if dst.exists() and dst.resolve() == src.resolve():
        raise UserError(f"SRC and DST are the same directory ({src}); write to a new one")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} is a file, not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise UserError(f"{dst} exists and is not empty; refusing to write into it (choose a new "
                            f"directory, or give --overwrite to replace the {to} checkpoint it holds)")
        if _kind(dst) != to:
            raise UserError(f"{dst} does not hold an {to} checkpoint; --overwrite replaces only a checkpoint of "
                            "the output kind, never other files: choose a new directory")
    parent = dst
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {dst}: {parent} is not a writable directory")


def _write_source_config(src: pathlib.Path, dst: pathlib.Path, model, to: str) -> None:
    """Put the source's HF config.json, as it was, beside (orbax) or into (HF) the output, when it describes the
    converted model: the writer regenerates config.json from the config class (HF's defaults, its own field
    names), which would rewrite fields the source chose and drop others (`transformers_version`). The dtype
    fields are the one thing updated, to the output's. A state-spaces config.json is not HF's form: left out."""
    from easymamba.models import config_from_hf

    path = src / CONFIG_NAME
    if not path.is_file():
        return
    raw = _read_json(path)
    if "model_type" not in raw:
        return
    try:
        same = config_from_hf(raw) == model.config
    except (ValueError, TypeError):
        same = False
    if not same:
        return
    if to == "hf":
        written = _read_json(dst / CONFIG_NAME)
        for key in ("dtype", "torch_dtype"):
            if key in raw or key == "dtype":
                raw[key] = written.get("dtype", raw.get(key))
    tmp = dst / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(raw, indent=2) + "\n")  # the source's key order
    os.replace(tmp, dst / CONFIG_NAME)


def _convert(args) -> int:
    src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
    if not src.exists():
        raise UserError(f"{src} does not exist")
    if not src.is_dir():
        raise UserError(f"{src} is a file, not a checkpoint directory")
    kind = _kind(src)
    if kind is None:
        raise UserError(f"{src} is neither an HF checkpoint directory ({CONFIG_NAME} + weights) nor an "
                        "easymamba orbax checkpoint")
    to = args.to or ("hf" if kind == "orbax" else "orbax")
    _check_destination(src, dst, to, args.overwrite)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from easymamba import checkpoints

    if args.dtype != "auto":
        import jax.numpy as jnp

        param_dtype = jnp.dtype(args.dtype)
    else:
        param_dtype = checkpoints.checkpoint_dtype(src) if kind == "hf" else None  # orbax: each as saved

    console = Console(stderr=True, soft_wrap=True)  # soft_wrap: a long path is not broken into a pipe's 80 columns
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        def tracker(description):
            task = bar.add_task(description, total=None)
            return lambda done, total, name: bar.update(task, completed=done, total=total)

        console.print(f"reading {kind} checkpoint {src}", markup=False, highlight=False)
        if kind == "hf":
            model = checkpoints.from_pretrained(src, param_dtype=param_dtype, progress=tracker("reading tensors"))
        else:
            model = checkpoints.load_checkpoint(src, param_dtype=param_dtype)
        console.print(f"writing {to} checkpoint {dst}", markup=False, highlight=False)
        if to == "hf":
            checkpoints.save_pretrained(model, dst, max_shard_size=args.max_shard_size,
                                        progress=tracker("writing tensors"), overwrite=args.overwrite)
            where = dst
        else:
            where = checkpoints.save_checkpoint(model, dst, overwrite=args.overwrite)
    _write_source_config(src, dst, model, to)
    copied = [name for name in SIDE_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    also = f"; copied {', '.join(copied)}" if copied else ""
    console.print(f"converted {src} ({kind}) -> {where} ({to}){also}", markup=False, highlight=False)
    return 0


# ---- entry point -------------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:  # raw OS errors: "[Errno 13] ..." otherwise
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None) -> int:
    """Run the `easymamba` command with `argv` (default `sys.argv[1:]`); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if sys.stdout.isatty():  # end a streamed line, so the message starts a line of its own
            print(flush=True)
        print("easymamba: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `easymamba generate ... | head -1`: the reader has gone, nothing more to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except (UserError, ValueError, OSError) as exc:  # CheckpointError is a ValueError
        print(f"easymamba: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
