"""The `easymamba` command line.

`easymamba generate "PROMPT"` generates text with a model directory, Mamba-2 or Mamba-1 as its config.json says
(default: the small Shakespeare model that ships inside the package, so it works offline): the prompt is
tokenized with the directory's `tokenizer.json`, tokens are printed as they are generated (`--no-stream` prints
the text at the end), and a last line on stderr gives tokens/s. `--ids 1,2,3` gives token ids directly instead
of a prompt. Exit status 0 on success, 1 on a bad model directory or input (the message says what and what was
expected).

`easymamba convert SRC DST` converts checkpoint directories of either family: an HF one (config.json +
safetensors or pytorch_model.bin, HF or state-spaces layout) to an easymamba orbax checkpoint, and an orbax
checkpoint back to an HF one (safetensors that transformers loads). `--to hf` also turns an HF/torch directory
into safetensors. Parameters keep the source's dtype unless `--dtype` says otherwise, so a round trip HF ->
orbax -> HF gives the same tensors bit for bit. A rich progress bar on stderr counts the tensors read or
written. Exit status 0 on success, 1 when the checkpoint cannot be converted (the message names the file and
tensor).
"""

import argparse
import pathlib
import sys


def _parser() -> argparse.ArgumentParser:
    from easymamba import __version__

    parser = argparse.ArgumentParser(prog="easymamba", description="Mamba-2 and Mamba-1 language models in JAX")
    parser.add_argument("--version", action="version", version=f"easymamba {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt text (or give --ids)")
    gen.add_argument("--ids", default=None, help="comma-separated prompt token ids instead of a prompt")
    gen.add_argument("--model", default=None, help="model directory (default: the model shipped in the package)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding (default 0.8)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (0: off)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="print tokens as they are generated (default) or the text at the end")
    conv = sub.add_parser("convert", help="convert a checkpoint directory: HF/torch <-> orbax",
                          description="Convert an HF checkpoint directory to an easymamba orbax checkpoint, or an "
                                      "orbax checkpoint to an HF directory (config.json + safetensors).")
    conv.add_argument("src", help="HF directory (config.json + weights) or easymamba orbax checkpoint")
    conv.add_argument("dst", help="output directory (created; an existing one must hold the same kind)")
    conv.add_argument("--to", choices=("orbax", "hf"), default=None,
                      help="output format (default: orbax for an HF source, hf for an orbax source)")
    conv.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="parameter dtype of the output (default: the source's)")
    conv.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard for --to hf (5GB)")
    return parser


class _ConvertError(Exception):
    pass


class _GenerateError(Exception):
    pass


SHIPPED_MODEL = pathlib.Path(__file__).resolve().parent / "assets" / "tiny-shakespeare"


def _generate(args) -> int:
    import time

    from rich.console import Console

    if args.max_new_tokens <= 0:
        raise _GenerateError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompt is not None and args.ids is not None:
        raise _GenerateError("give a prompt or --ids, not both")
    if args.ids is None and (args.prompt is None or not args.prompt.strip()):
        raise _GenerateError("the prompt is empty; give some text (or token ids with --ids 1,2,3)")
    model_dir = SHIPPED_MODEL if args.model is None else pathlib.Path(args.model)
    if not model_dir.is_dir():
        raise _GenerateError(f"model directory {model_dir} does not exist")
    tokenizer_path = model_dir / "tokenizer.json"
    tokenizer = None
    if tokenizer_path.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    elif args.ids is None:
        raise _GenerateError(f"model directory {model_dir} has no tokenizer.json; give token ids with --ids")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from easymamba.checkpoints import from_pretrained
    from easymamba.generation import generate, stream_generate

    model = from_pretrained(model_dir)
    vocab = model.config.vocab_size
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise _GenerateError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
        if not ids:
            raise _GenerateError("--ids is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise _GenerateError(f"token id {bad[0]} is outside the vocabulary [0, {vocab}) of {model_dir}")
    else:
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise _GenerateError("the prompt encodes to no tokens")
    eos = model.config.eos_token_id
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                    temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    eos_token_id=eos, rng=jax.random.key(args.seed))
    input_ids = jnp.asarray([ids], jnp.int32)
    decode = (lambda toks: tokenizer.decode(toks)) if tokenizer is not None else (lambda toks: " ".join(map(str, toks)))
    err = Console(stderr=True)
    start = time.perf_counter()
    generated: list[int] = []
    eos_ids = set(eos if isinstance(eos, (tuple, list)) else ([] if eos is None else [eos]))
    if args.stream:
        prompt_text = decode(ids) + ("" if tokenizer is not None else " ")  # ids are space-separated
        sys.stdout.write(prompt_text)
        sys.stdout.flush()
        shown = ""
        first = None
        for step in stream_generate(model, input_ids, **settings):
            if first is None:
                first = time.perf_counter()
            tok = int(np.asarray(step)[0])
            if tok in eos_ids:
                break
            generated.append(tok)
            text = decode(generated)
            if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(decode(generated)[len(shown):] + "\n")
    else:
        out = generate(model, input_ids, **settings)
        first = start
        n = int(np.asarray(out.num_generated)[0])
        generated = [t for t in np.asarray(out.sequences)[0, len(ids):len(ids) + n].tolist() if t not in eos_ids]
        print(decode(ids + generated))
    elapsed = time.perf_counter() - start
    first = first or start
    decode_s = time.perf_counter() - first
    steady = f"{(len(generated) - 1) / decode_s:.1f} tokens/s after the first" if args.stream and len(generated) > 1 \
        and decode_s > 0 else f"{len(generated) / elapsed:.1f} tokens/s overall"
    first_note = f" (first token after {first - start:.2f} s: compile + prefill)" if args.stream else ""
    err.print(f"[dim]{len(generated)} tokens in {elapsed:.2f} s: {steady}{first_note}[/dim]")
    return 0


def _convert(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from easymamba import checkpoints
    from easymamba.checkpoints.hf_reader import CONFIG_NAME

    src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
    if checkpoints.is_checkpoint(src):
        kind = "orbax"
    elif (src / CONFIG_NAME).is_file():
        kind = "hf"
    else:
        raise _ConvertError(f"{src} is neither an HF checkpoint directory (config.json + weights) nor an "
                            "easymamba orbax checkpoint")
    to = args.to or ("hf" if kind == "orbax" else "orbax")
    if dst.exists() and dst.resolve() == src.resolve():
        raise _ConvertError(f"SRC and DST are the same directory ({src}); write to a new one")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        same_kind = checkpoints.is_checkpoint(dst) if to == "orbax" else (dst / CONFIG_NAME).is_file()
        if not same_kind:
            raise _ConvertError(f"{dst} exists and is not an empty directory or an {to} checkpoint; refusing to "
                                "write into it")
    if args.dtype != "auto":
        import jax.numpy as jnp

        param_dtype = jnp.dtype(args.dtype)
    else:
        param_dtype = checkpoints.checkpoint_dtype(src) if kind == "hf" else None  # orbax: each as saved

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        def tracker(description):
            task = bar.add_task(description, total=None)
            return lambda done, total, name: bar.update(task, completed=done, total=total)

        if kind == "hf":
            console.print(f"reading HF checkpoint {src}")
            model = checkpoints.from_pretrained(src, param_dtype=param_dtype, progress=tracker("reading tensors"))
        else:
            console.print(f"reading orbax checkpoint {src}")
            model = checkpoints.load_checkpoint(src, param_dtype=param_dtype)
        if to == "hf":
            console.print(f"writing HF checkpoint {dst}")
            checkpoints.save_pretrained(model, dst, max_shard_size=args.max_shard_size,
                                        progress=tracker("writing tensors"))
            where = dst
        else:
            console.print(f"writing orbax checkpoint {dst}")
            where = checkpoints.save_checkpoint(model, dst)
    console.print(f"converted {src} ({kind}) -> {where} ({to})")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        from easymamba.checkpoints import CheckpointError

        try:
            return _generate(args)
        except (_GenerateError, CheckpointError, ValueError) as exc:
            print(f"easymamba generate: error: {exc}", file=sys.stderr)
            return 1
    if args.command == "convert":
        from easymamba.checkpoints import CheckpointError

        try:
            return _convert(args)
        except (_ConvertError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
            print(f"easymamba convert: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
