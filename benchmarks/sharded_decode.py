"""Tensor-parallel prefill and decode of a 2.7B-shaped Mamba-2 on N GPUs, against the same model on one GPU.

    PYTHONPATH=. python benchmarks/sharded_decode.py [--gpus 2] [--out results.json] [--quick] [--tiny]

The model is Mamba-2 2.7B's shape (d 2560, 64 layers, h 80, p 64, n 128, g 1, vocab 50288) with random weights,
bfloat16 parameters and compute, built sharded with `init_sharded` (no checkpoint needed). Two placements:

    1 GPU     mesh (1, 1) on the first device
    N GPUs    mesh (1, N): heads / channels over "model" (tensor parallel), B/C replicated (g = 1), vocab split

Prefill: the jitted forward over `[b, l]` from a fresh cache (`model.init_cache(b)`), median of repeats, ms.
Decode: `generate` with greedy decoding and no EOS, so every row runs `m` steps; decode time is
`t(generate m) - t(generate 1)` (the prefill and the first token cancel) and tokens/s = b * (m - 1) / that.
Every call is compiled and warmed first. Prints one table and writes every number to --out (JSON), for
docs/benchmarks.md (device, date, versions and command go with the numbers).
"""

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import easymamba as em

CONFIG_2P7B = dict(vocab_size=50288, hidden_size=2560, num_hidden_layers=64, num_heads=80, head_dim=64,
                   state_size=128, n_groups=1, expand=2, conv_kernel=4, chunk_size=256, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, n_groups=1,
            chunk_size=64, tie_word_embeddings=True)     # --tiny: a smoke test of this script on any machine
PREFILL = [(1, 2048), (4, 2048), (1, 8192)]     # (b, l)
DECODE = [1, 8, 32, 128]                        # batch sizes; prompt 128 tokens
PROMPT, NEW = 128, 256


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` (which blocks on its result) over `repeats`, in ms, after one warm call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build(config, mesh):
    make = lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,  # noqa: E731
                                        param_dtype=jnp.bfloat16)
    model = em.init_sharded(make, mesh)
    jax.block_until_ready(nnx.state(model))
    return model


def bench_placement(name, config, mesh, args):
    model = build(config, mesh)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, i, c: nnx.merge(graphdef, s).backbone(i, cache=c).last_hidden_state)
    rng = np.random.default_rng(0)
    rows = []
    for b, l in (PREFILL[:1] if args.quick else PREFILL):
        ids = em.shard_batch(rng.integers(0, config.vocab_size, (b, l)).astype(np.int32), mesh)
        ms = timed(lambda: jax.block_until_ready(forward(state, ids, model.init_cache(b))), args.repeats)
        rows.append({"placement": name, "part": "prefill", "b": b, "l": l, "ms": ms,
                     "tokens_per_s": b * l / (ms * 1e-3)})
        print(f"{name:>8} prefill b{b} l{l}: {ms:9.2f} ms  {b * l / (ms * 1e-3):12.0f} tok/s", flush=True)
    for b in (DECODE[:2] if args.quick else DECODE):
        if b % mesh.shape["data"]:
            continue
        ids = em.shard_batch(rng.integers(0, config.vocab_size, (b, PROMPT)).astype(np.int32), mesh)
        new = 32 if args.quick else NEW

        def run(m, ids=ids):
            return jax.block_until_ready(em.generate(model, ids, max_new_tokens=m).sequences)

        full, one = timed(lambda: run(new), args.repeats), timed(lambda: run(1), args.repeats)
        decode_ms = max(full - one, 1e-6)
        rows.append({"placement": name, "part": "decode", "b": b, "prompt": PROMPT, "new_tokens": new,
                     "ms": decode_ms, "ms_per_step": decode_ms / (new - 1),
                     "tokens_per_s": b * (new - 1) / (decode_ms * 1e-3)})
        rate = b * (new - 1) / (decode_ms * 1e-3)
        print(f"{name:>8} decode  b{b}: {decode_ms / (new - 1):9.3f} ms/step {rate:10.0f} tok/s", flush=True)
    del model, state
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="devices of the tensor-parallel placement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one prefill shape, two batch sizes, 32 tokens")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of 2.7B (checks the script runs)")
    parser.add_argument("--out", default=None, help="write every number here (JSON)")
    args = parser.parse_args()

    devices = jax.devices()
    if len(devices) < args.gpus:
        raise SystemExit(f"--gpus {args.gpus} needs that many devices; jax sees {len(devices)}: {devices}")
    config = em.Mamba2Config(**(TINY if args.tiny else CONFIG_2P7B))
    print(f"devices: {[d.device_kind for d in devices[:args.gpus]]}; jax {jax.__version__}; "
          f"kernels: {em.kernels.describe()['ssd']}", flush=True)
    rows = bench_placement("1 GPU", config, em.make_mesh(1, 1, devices=devices[:1]), args)
    rows += bench_placement(f"{args.gpus} GPUs", config, em.make_mesh(1, args.gpus, devices=devices[:args.gpus]),
                            args)

    print("\n| part | shape | 1 GPU | " + f"{args.gpus} GPUs (TP) | speed-up |\n|---|---|---|---|---|")
    single = {(r["part"], r["b"], r.get("l")): r for r in rows if r["placement"] == "1 GPU"}
    for r in rows:
        if r["placement"] == "1 GPU":
            continue
        base = single.get((r["part"], r["b"], r.get("l")))
        shape = f"b{r['b']} l{r['l']}" if r["part"] == "prefill" else f"b{r['b']}"
        unit = "ms" if r["part"] == "prefill" else "tok/s"
        mine = r["ms"] if r["part"] == "prefill" else r["tokens_per_s"]
        theirs = base["ms"] if r["part"] == "prefill" else base["tokens_per_s"]
        speedup = theirs / mine if r["part"] == "prefill" else mine / theirs
        print(f"| {r['part']} | {shape} | {theirs:.1f} {unit} | {mine:.1f} {unit} | {speedup:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "jax": jax.__version__,
                       "devices": [d.device_kind for d in devices[:args.gpus]],
                       "config": TINY if args.tiny else CONFIG_2P7B, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
