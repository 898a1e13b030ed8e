"""easymamba's decode paths on one GPU: `generate` tokens/s per path, and the few-row matmul kernel alone.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 benchmarks/decode_paths.py --out decode_paths.json
    PYTHONPATH=. python3 benchmarks/decode_paths.py --tiny          # CPU smoke run (kernels interpreted)

Paths of the mixer's decode step (easymamba/models/mamba2_mixer.py), on a random 130M-shaped model (d 768, 24 layers, h 24,
p 64, n 128, vocab 50288, tied head) in bf16, greedy, 16-token prompt, EOS off:

* `xla`        every mixer's `kernel_impl = "xla"`: the op-by-op decode step (conv update, state update, norm
               as XLA fusions; in_proj / out_proj as XLA dots).
* `fused`      the default on an sm_80+ GPU ("auto"): the fused decode-step kernel (kernels/decode_step/triton.py)
               between XLA's in_proj and out_proj.
* `fused+eos`  the same with an EOS id set (one that the run never samples in practice), so the loop checks
               for early stopping (every `generation.STEPS_PER_CHECK` steps) instead of running a static count.

tokens/s = b * new / wall time of a whole `generate` call (prefill of 16 tokens, Python and dispatch included),
median of `--repeats` after a warm-up call.
"""

import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@contextlib.contextmanager
def path(model, name):
    layers = model.backbone.layers
    saved = [layer.mixer.kernel_impl for layer in layers]
    try:
        if name.endswith("+eos"):
            name = name[:-len("+eos")]
        if name == "xla":
            for layer in layers:
                layer.mixer.kernel_impl = "xla"
        elif name != "fused":
            raise ValueError(name)
        yield
    finally:
        for layer, impl in zip(layers, saved):
            layer.mixer.kernel_impl = impl


def bench_generate(shape, batches, new, repeats, paths):
    from flax import nnx

    import easymamba as em

    cfg = em.Mamba2Config(vocab_size=50288, n_groups=1, expand=2, conv_kernel=4, chunk_size=256,
                          tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0, **shape)
    model = em.Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rows, tokens = {}, {}
    for name in paths:
        rows[name] = {}
        with path(model, name):
            for b in batches:
                ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (b, 16)), jnp.int32)
                out = {}

                stop = dict(eos_token_id=cfg.vocab_size - 1) if name.endswith("+eos") else {}

                def run():
                    out["seq"] = em.generate(model, ids, max_new_tokens=new, **stop).sequences
                    jax.block_until_ready(out["seq"])

                rows[name][b] = b * new / median_time(run, repeats)
                tokens[(name, b)] = np.asarray(out["seq"])
    same = {f"{name} b{b}": bool(np.array_equal(tokens[(name, b)], tokens[(paths[0], b)]))
            for name in paths for b in batches}
    return rows, same


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", default="xla,fused")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    paths = args.paths.split(",")
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "new_tokens": args.new}
    if args.tiny:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, state_size=16)
        batches, args.new, args.repeats = [1, 2], 4, 1
    else:
        shape = dict(hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, state_size=128)
    rows, same = bench_generate(shape, batches, args.new, args.repeats, paths)
    print(f"generate tokens/s ({info['device']}, jax {info['jax']}, {args.new} new tokens)")
    print("| path | " + " | ".join(f"b{b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for name in paths:
        print(f"| {name} | " + " | ".join(f"{rows[name][b]:,.0f}" for b in batches) + " |")
    print("tokens equal to the first path's:", same)
    result = {"info": info, "generate_tok_s": rows, "same_tokens": same}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
