"""Fine-tune a Mamba model (Mamba-2 or Mamba-1, HF layout) on a plain text file, with `easymamba.train`.

    python examples/finetune.py --data my.txt --steps 200 --out runs/ft               # the shipped model
    python examples/finetune.py --data my.txt --model path/to/hf-dir --accum 4 --remat --out runs/ft
    python examples/finetune.py --data my.txt --steps 200 --out runs/ft --resume       # after an interruption

* Model: `easymamba.from_pretrained(--model)` (default: the small Shakespeare model shipped in the package),
  float32 parameters; its `tokenizer.json` (or --tokenizer) tokenizes --data.
* Data: the text's last --eval-fraction of tokens is held out; training batches are random --seq-len windows of
  the rest (`TokenBatcher`: batch i depends only on --seed and i), evaluation scores every held-out token.
* Optimiser: AdamW, linear warmup, cosine decay to lr/10, clipping at global norm 1, no decay on norms/biases.
* Every --save-every steps the whole train state (parameters, optimizer state, step, rng) is saved with orbax to
  OUT/checkpoints; --resume continues from it bit for bit (the run's settings must be the same: OUT/run.json).
* At the end: OUT/model (config.json, model.safetensors, tokenizer.json), loadable by `easymamba.from_pretrained`
  and by transformers; OUT/history.json (loss per step, eval loss).
"""

import argparse
import importlib.resources
import json
import pathlib
import shutil
import time

import numpy as np

# The installed package's copy (importlib.resources), so the default works outside a checkout too.
SHIPPED = importlib.resources.files("easymamba") / "assets" / "tiny-shakespeare"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=pathlib.Path, required=True, help="a UTF-8 text file to fine-tune on")
    p.add_argument("--model", type=pathlib.Path, default=None,
                   help="HF-layout model directory (default: the shipped tiny-shakespeare model)")
    p.add_argument("--tokenizer", type=pathlib.Path, default=None, help="tokenizer.json (default: the model's)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("finetuned"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps / 10)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (must divide --batch)")
    p.add_argument("--remat", action="store_true", help="recompute each block's activations in the backward pass")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint the train state every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.model = args.model or SHIPPED
    args.tokenizer = args.tokenizer or args.model / "tokenizer.json"
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    if args.batch % args.accum:
        p.error(f"--accum {args.accum} must divide --batch {args.batch}")
    if not 0 < args.eval_fraction < 1:
        p.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    return args


def tokenize(args, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    if not args.tokenizer.is_file():
        raise SystemExit(f"no tokenizer at {args.tokenizer}: pass --tokenizer path/to/tokenizer.json")
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    ids = np.asarray(tokenizer.encode(args.data.read_text(encoding="utf-8")).ids, np.int32)
    if ids.size and ids.max() >= vocab_size:
        raise SystemExit(f"{args.tokenizer} produces id {ids.max()}, outside the model's vocabulary of {vocab_size}")
    n_eval = int(len(ids) * args.eval_fraction)
    if len(ids) - n_eval < args.seq_len or n_eval < 2:
        raise SystemExit(f"{args.data} has {len(ids)} tokens: too few for --seq-len {args.seq_len} with "
                         f"{args.eval_fraction:.0%} held out (use a longer text or a smaller --seq-len)")
    return ids[:-n_eval], ids[-n_eval:]


def run_settings(args) -> dict:
    """What determines the run's trajectory: a resumed run must agree on all of it."""
    keys = ("model", "tokenizer", "data", "steps", "lr", "warmup", "weight_decay", "batch", "seq_len", "accum",
            "eval_fraction", "seed")
    return {k: str(getattr(args, k)) if isinstance(getattr(args, k), pathlib.Path) else getattr(args, k)
            for k in keys}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from flax import nnx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    import easymamba as em
    from easymamba import checkpoints, train

    console = Console()
    model = em.from_pretrained(args.model)
    train_ids, eval_ids = tokenize(args, model.config.vocab_size)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    console.print(f"{type(model).__name__} from {args.model}: {n_params:,} parameters; {args.data}: "
                  f"{len(train_ids):,} train / {len(eval_ids):,} held-out tokens; "
                  f"device {jax.devices()[0].device_kind}")

    batches = train.TokenBatcher(train_ids, batch_size=args.batch, seq_len=args.seq_len, seed=args.seed)
    eval_batches = list(train.TokenBatcher(eval_ids, batch_size=args.batch,
                                           seq_len=min(args.seq_len, len(eval_ids)), seed=0).sequential())
    tx = train.make_optimizer(args.lr, total_steps=args.steps, warmup_steps=args.warmup,
                              weight_decay=args.weight_decay)
    state = train.TrainState.create(model, tx, rng=args.seed)
    train_step = train.make_train_step(accum_steps=args.accum, remat=args.remat)
    eval_step = train.make_eval_step()

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_dir, settings_file = args.out / "checkpoints", args.out / "run.json"
    history = {"train": [], "eval": []}
    settings = run_settings(args)
    if args.resume and checkpoints.train_state_step(ckpt_dir) is not None:
        saved = json.loads(settings_file.read_text())
        changed = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
        if changed:
            raise SystemExit(f"--resume with settings that differ from the saved run's (saved, now): {changed}")
        state = checkpoints.load_train_state(ckpt_dir, state)
        history = saved["history"]
        history["train"] = [h for h in history["train"] if h["step"] <= int(state.step)]
        history["eval"] = [h for h in history["eval"] if h["step"] <= int(state.step)]
        console.print(f"resumed from {ckpt_dir} at step {int(state.step)}")
    elif args.resume:
        console.print(f"--resume: no checkpoint in {ckpt_dir}, starting from step 0")

    def save(state):
        # the run's own directory: each save replaces the last version once the new one is written
        checkpoints.save_train_state(state, ckpt_dir, overwrite=True)
        settings_file.write_text(json.dumps({"settings": settings, "history": history}, indent=1))

    if not history["eval"]:
        history["eval"].append({"step": int(state.step), "loss": train.evaluate(eval_step, state, eval_batches)})
        console.print(f"held-out loss before training: {history['eval'][-1]['loss']:.4f}")
    start, tokens = time.time(), 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("fine-tuning", total=args.steps, completed=int(state.step), info="")
        for step in range(int(state.step), args.steps):
            state, metrics = train_step(state, batches(step))
            done = step + 1
            loss = float(metrics["loss"])
            tokens += int(metrics["tokens"])
            history["train"].append({"step": done, "loss": loss, "grad_norm": float(metrics["grad_norm"])})
            if done % args.eval_every == 0 or done == args.steps:
                history["eval"].append({"step": done, "loss": train.evaluate(eval_step, state, eval_batches)})
            info = (f"loss {loss:.3f}  eval {history['eval'][-1]['loss']:.3f} (step {history['eval'][-1]['step']})  "
                    f"{tokens / (time.time() - start):,.0f} tok/s")
            progress.update(task, advance=1, info=info)
            if done % args.save_every == 0 or done == args.steps:
                save(state)

    model_dir = args.out / "model"
    em.save_pretrained(state.model(), model_dir)
    shutil.copyfile(args.tokenizer, model_dir / "tokenizer.json")
    (args.out / "history.json").write_text(json.dumps(history, indent=1))
    summary = {"steps": args.steps, "first_train_loss": history["train"][0]["loss"] if history["train"] else None,
               "final_train_loss": history["train"][-1]["loss"] if history["train"] else None,
               "eval_loss_before": history["eval"][0]["loss"], "eval_loss_after": history["eval"][-1]["loss"],
               "seconds": round(time.time() - start, 1), "model": str(model_dir)}
    console.print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
