"""Training-step throughput of a 130M-shaped Mamba-2 with `easymamba.train` on one GPU.

    JAX_PLATFORMS= PYTHONPATH=. python3 benchmarks/train_step.py --out train_step.json     # on a GPU
    PYTHONPATH=. python3 benchmarks/train_step.py --tiny                                    # CPU smoke run
    JAX_PLATFORMS= PYTHONPATH=. python3 benchmarks/train_step.py --packed 1,8 --out t.json   # + packed rows

Random model (d 768, 24 layers, h 24, p 64, n 128, vocab 50288, tied head), parameters in float32 with bf16
activations (`dtype=bfloat16`: the usual mixed-precision setup) or all-bf16 parameters (`--param-dtype
bfloat16`), AdamW (`make_optimizer`), random tokens. tokens/s = batch * seq_len / median step time (after two
warm-up steps; the step donates its state). Kernels: whatever `impl="auto"` picks (Pallas SSD forward and
backward on sm_80+). `--packed 1,8`: each row also packed with 8 sequences (`seq_idx`: the conv and the SSD
restart at each, and each sequence's first token is not scored); 1 is unpacked.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--packed", default="1", help="sequences per row, comma-separated (1: unpacked)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from flax import nnx

    import easymamba as em

    shape = dict(hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, state_size=128)
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, state_size=16)
        batches, args.seq_len, args.steps = [2], 64, 2
    cfg = em.Mamba2Config(vocab_size=50288, n_groups=1, expand=2, conv_kernel=4, chunk_size=256,
                          tie_word_embeddings=True, **shape)
    rows = {}
    for b, packed in [(b, k) for b in batches for k in (int(v) for v in args.packed.split(","))]:
        model = em.Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                     param_dtype=jnp.dtype(args.param_dtype))
        state = em.TrainState.create(model, em.make_optimizer(3e-4, total_steps=1000, warmup_steps=10))
        step = em.make_train_step(remat=args.remat)
        ids = np.random.default_rng(b).integers(0, cfg.vocab_size, (b, args.seq_len)).astype(np.int32)
        batch = {"input_ids": jnp.asarray(ids)}
        if packed > 1:  # `packed` equal sequences per row
            seg = np.arange(args.seq_len) * packed // args.seq_len
            batch["seq_idx"] = jnp.asarray(np.broadcast_to(seg, ids.shape).astype(np.int32))
        for _ in range(2):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        rows[f"{b}" if packed == 1 else f"{b} packed x{packed}"] = {
            "step_ms": t * 1e3, "tokens_s": b * args.seq_len / t, "loss": float(metrics["loss"])}
        del state
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "seq_len": args.seq_len, "param_dtype": args.param_dtype, "remat": args.remat,
            "kernels": em.kernels.describe()}
    print(f"train step, 130M-shaped, {info['device']}, jax {info['jax']}, l {args.seq_len}, params "
          f"{args.param_dtype}, bf16 activations, remat {args.remat}")
    print("| batch | step ms | tokens/s | loss |")
    print("|---|---|---|---|")
    for b, r in rows.items():
        print(f"| {b} | {r['step_ms']:.1f} | {r['tokens_s']:,.0f} | {r['loss']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
