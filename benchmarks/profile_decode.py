"""Where a decode step's time goes: the GPU kernels of one `generate` call, by name, from a jax.profiler trace.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 benchmarks/profile_decode.py --batch 1 --out prof/

Runs a random 130M-shaped bf16 model (as benchmarks/decode_paths.py), traces one warm `generate` call of `--new`
tokens and prints, per kernel name: launches per decode step, mean duration (us) and share of GPU time; then the
GPU busy time per step against the step's wall time (the rest is launch gaps and host work).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def kernel_events(trace_dir):
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    files += glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no trace file under {trace_dir}: {glob.glob(trace_dir + '/**', recursive=True)}")
    with gzip.open(sorted(files, key=os.path.getmtime)[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {}
    for ev in events:
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            names[ev["pid"]] = ev["args"]["name"]
    gpu = {pid for pid, nm in names.items() if "gpu" in nm.lower() and "host" not in nm.lower()}
    out = [ev for ev in events if ev.get("ph") == "X" and ev.get("pid") in gpu]
    return out, names


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--out", default="profile_decode")
    args = parser.parse_args()
    from flax import nnx

    import easymamba as em

    cfg = em.Mamba2Config(vocab_size=50288, n_groups=1, expand=2, conv_kernel=4, chunk_size=256,
                          tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0, hidden_size=768,
                          num_hidden_layers=24, num_heads=24, head_dim=64, state_size=128)
    model = em.Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    for layer in model.backbone.layers:
        layer.mixer.kernel_impl = args.impl
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (args.batch, 16)), jnp.int32)
    run = lambda: jax.block_until_ready(em.generate(model, ids, max_new_tokens=args.new).sequences)  # noqa
    run()
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    jax.profiler.start_trace(args.out, create_perfetto_trace=True)
    run()
    jax.profiler.stop_trace()
    events, names = kernel_events(args.out)
    print("processes:", sorted(set(names.values()))[:20])
    by = collections.defaultdict(list)
    for ev in events:
        by[ev["name"]].append(float(ev["dur"]))
    total = sum(sum(v) for v in by.values())
    steps = args.new
    print(f"b{args.batch}, {steps} new tokens: wall {wall * 1e3:.2f} ms ({args.batch * steps / wall:,.0f} tok/s), "
          f"{wall / steps * 1e6:.1f} us/step; GPU kernel time {total / 1e3:.2f} ms = {total / steps:.1f} us/step")
    print("| kernel | per step | mean us | total % |")
    print("|---|---|---|---|")
    for nm, d in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:40]:
        print(f"| {nm[:90]} | {len(d) / steps:.1f} | {np.mean(d):.2f} | {100 * sum(d) / total:.1f} |")
    # gaps between consecutive kernels on the busiest stream
    streams = collections.defaultdict(list)
    for ev in events:
        streams[(ev["pid"], ev["tid"])].append((float(ev["ts"]), float(ev["dur"])))
    key = max(streams, key=lambda s: len(streams[s]))
    seq = sorted(streams[key])
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(seq, seq[1:])]
    print(f"busiest stream: {len(seq)} kernels, gap median {np.median(gaps):.2f} us, mean {np.mean(gaps):.2f} us, "
          f"span {(seq[-1][0] + seq[-1][1] - seq[0][0]) / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
