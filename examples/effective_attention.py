"""Plot one SSM layer's effective attention, one heatmap per head (Mamba-2 mixers) or inner channel (Mamba-1
mixers), for a prompt.

    pip install -e ".[examples]"          # matplotlib
    python examples/effective_attention.py --layer 3 --out docs/images/effective_attention.png
    python examples/effective_attention.py --model path/to/any/hf/dir --prompt "..." --no-dt-scaling

`--model` is any directory `easymamba.from_pretrained` reads (every family with SSM layers: Mamba-2, Mamba-1 and
the hybrids; `--layer` must be one of its SSM layers) with its `tokenizer.json`; with none it uses the small
Shakespeare model that ships inside the package. Row i of a head's map is
how much each earlier token j feeds output position i: M[i, j] = (C_i . B_j) exp(dt_{j+1} A + ... + dt_i A),
times dt_j unless --no-dt-scaling (see docs/interpretability.md). The colour scale is signed and symmetric per
head; the upper triangle (the future) is blank.
"""

import argparse
import importlib.resources
import pathlib

import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

import easymamba as em

ASSET = importlib.resources.files("easymamba") / "assets" / "tiny-shakespeare"
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=pathlib.Path, default=ASSET, help="model directory (any family)")
    parser.add_argument("--channels", type=int, default=8,
                        help="plot the first N heads / inner channels (Mamba-1 layers have hundreds)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--no-dt-scaling", action="store_true", help="plot (C_i . B_j) decay without dt_j")
    parser.add_argument("--max-tokens", type=int, default=48, help="keep the first N tokens of the prompt")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("effective_attention.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = em.from_pretrained(args.model)   # float32 whatever the checkpoint stores
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    reads = em.models.family_of(model).effective_attention   # what M reads from this family's SSM mixers
    unit = "head" if "head" in reads.channel_axis else "channel"
    ids = tokenizer.encode(args.prompt).ids[: args.max_tokens]
    labels = [tokenizer.decode([i]).replace("\n", "\\n") for i in ids]
    channels = list(range(min(args.channels, reads.num_channels(model.config))))
    M = em.compute_effective_attention(model, jnp.asarray([ids], jnp.int32), layer=args.layer,
                                       include_dt_scaling=not args.no_dt_scaling, channels=channels)
    M = np.asarray(M[0])                                              # (channels, l, l)
    h, l = M.shape[0], M.shape[1]

    cols = min(h, 4)
    rows = -(-h // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    future = np.triu(np.ones((l, l), bool), k=1)
    for head, ax in enumerate(axes.flat):
        if head >= h:
            ax.axis("off")
            continue
        scale = float(np.abs(M[head]).max()) or 1.0
        image = ax.imshow(np.ma.masked_array(M[head], future), cmap="RdBu_r", vmin=-scale, vmax=scale,
                          interpolation="nearest")
        ax.set_title(f"{unit} {channels[head]}")
        step = max(1, l // 12)
        ticks = list(range(0, l, step))
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    kind = "(C·B) decay" if args.no_dt_scaling else "(C·B) decay · dt"
    fig.suptitle(f"{type(model).__name__} effective attention, layer {args.layer}: M[i, j] = {kind}   "
                 f"(rows: output position i, columns: source j; {l} tokens)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: {h} {unit}s x {l} tokens, layer {args.layer}")


if __name__ == "__main__":
    main()
