"""Plot one layer's Mamba-2 effective attention, one heatmap per head, for a prompt.

    pip install -e ".[examples]"          # matplotlib
    python examples/effective_attention.py --layer 3 --out docs/images/effective_attention.png
    python examples/effective_attention.py --model path/to/hf_mamba2 --prompt "..." --no-dt-scaling

With no `--model` it uses the small Shakespeare model that ships inside the package. Row i of a head's map is
how much each earlier token j feeds output position i: M[i, j] = (C_i . B_j) exp(dt_{j+1} A + ... + dt_i A),
times dt_j unless --no-dt-scaling (see docs/interpretability.md). The colour scale is signed and symmetric per
head; the upper triangle (the future) is blank.
"""

import argparse
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import easymamba as em

ASSET = pathlib.Path(em.__file__).parent / "assets" / "tiny-shakespeare"
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun."


def load(directory: pathlib.Path) -> em.Mamba2ForCausalLM:
    """config.json + model.safetensors (any float dtype, upcast to float32) -> Mamba2ForCausalLM."""
    model = em.Mamba2ForCausalLM(em.Mamba2Config.from_hf(directory), rngs=nnx.Rngs(0))
    weights = load_file(directory / "model.safetensors")
    em.load_state_dict(model, {k: v.astype(np.float32) for k, v in weights.items()})
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=pathlib.Path, default=ASSET, help="HF Mamba-2 directory")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--no-dt-scaling", action="store_true", help="plot (C_i . B_j) decay without dt_j")
    parser.add_argument("--max-tokens", type=int, default=48, help="keep the first N tokens of the prompt")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("effective_attention.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = load(args.model)
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    ids = tokenizer.encode(args.prompt).ids[: args.max_tokens]
    labels = [tokenizer.decode([i]).replace("\n", "\\n") for i in ids]
    M = em.compute_effective_attention(model, jnp.asarray([ids], jnp.int32), layer=args.layer,
                                       include_dt_scaling=not args.no_dt_scaling)
    M = np.asarray(M[0])                                              # (h, l, l)
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
        ax.set_title(f"head {head}")
        step = max(1, l // 12)
        ticks = list(range(0, l, step))
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    kind = "(C·B) decay" if args.no_dt_scaling else "(C·B) decay · dt"
    fig.suptitle(f"Mamba-2 effective attention, layer {args.layer}: M[i, j] = {kind}   "
                 f"(rows: output position i, columns: source j; {l} tokens)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: {h} heads x {l} tokens, layer {args.layer}")


if __name__ == "__main__":
    main()
