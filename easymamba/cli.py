"""The `easymamba` command line.

`easymamba generate` needs the decode loop and the small model that ships in the package; both belong to the
generation work that has not landed yet, so today the command says so plainly and exits with status 2 rather
than printing made-up text.

`easymamba convert SRC DST` converts checkpoint directories: an HF one (config.json + safetensors or
pytorch_model.bin, HF or state-spaces layout) to an easymamba orbax checkpoint, and an orbax checkpoint back to
an HF one (safetensors that transformers loads). `--to hf` also turns an HF/torch directory into safetensors.
Parameters keep the source's dtype unless `--dtype` says otherwise, so a round trip HF -> orbax -> HF gives the
same tensors bit for bit. A rich progress bar on stderr counts the tensors read or written. Exit status 0 on
success, 1 when the checkpoint cannot be converted (the message names the file and tensor).
"""

import argparse
import pathlib
import sys


def _parser() -> argparse.ArgumentParser:
    from easymamba import __version__

    parser = argparse.ArgumentParser(prog="easymamba", description="Mamba-2 language models in JAX")
    parser.add_argument("--version", action="version", version=f"easymamba {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="model directory (default: the model shipped in the package)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, default=0)
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


def _convert(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from easymamba import hf, orbax_checkpoint

    src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
    if orbax_checkpoint.is_checkpoint(src):
        kind = "orbax"
    elif (src / hf.CONFIG_NAME).is_file():
        kind = "hf"
    else:
        raise _ConvertError(f"{src} is neither an HF checkpoint directory (config.json + weights) nor an "
                            "easymamba orbax checkpoint")
    to = args.to or ("hf" if kind == "orbax" else "orbax")
    if dst.exists() and dst.resolve() == src.resolve():
        raise _ConvertError(f"SRC and DST are the same directory ({src}); write to a new one")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        same_kind = orbax_checkpoint.is_checkpoint(dst) if to == "orbax" else (dst / hf.CONFIG_NAME).is_file()
        if not same_kind:
            raise _ConvertError(f"{dst} exists and is not an empty directory or an {to} checkpoint; refusing to "
                                "write into it")
    if args.dtype != "auto":
        import jax.numpy as jnp

        param_dtype = jnp.dtype(args.dtype)
    else:
        param_dtype = hf.checkpoint_dtype(src) if kind == "hf" else None  # orbax: each as saved

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        def tracker(description):
            task = bar.add_task(description, total=None)
            return lambda done, total, name: bar.update(task, completed=done, total=total)

        if kind == "hf":
            console.print(f"reading HF checkpoint {src}")
            model = hf.from_pretrained(src, param_dtype=param_dtype, progress=tracker("reading tensors"))
        else:
            console.print(f"reading orbax checkpoint {src}")
            model = orbax_checkpoint.load_checkpoint(src, param_dtype=param_dtype)
        if to == "hf":
            console.print(f"writing HF checkpoint {dst}")
            hf.save_pretrained(model, dst, max_shard_size=args.max_shard_size, progress=tracker("writing tensors"))
            where = dst
        else:
            console.print(f"writing orbax checkpoint {dst}")
            where = orbax_checkpoint.save_checkpoint(model, dst)
    console.print(f"converted {src} ({kind}) -> {where} ({to})")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        print("easymamba generate: no model ships with this version yet, and the decode loop is not built; "
              "both arrive with the generation work (see docs/status.md). The model forward, the cache and "
              "the HF state-dict bridge work today: see README.md.", file=sys.stderr)
        return 2
    if args.command == "convert":
        from easymamba.safetensors_io import CheckpointError

        try:
            return _convert(args)
        except (_ConvertError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
            print(f"easymamba convert: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
