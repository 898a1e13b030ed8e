"""The decode step's few-row matmuls alone: GPU kernel time per call, by how XLA is asked to compile them.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 benchmarks/gemv.py

A decode step multiplies b rows (b = batch, often 1) by each layer's weights: in_proj (768 x 3352 at the 130M
shape), out_proj (1536 x 768) and the tied head (768 x 50288). At b = 1 XLA's algebraic simplifier turns such a
dot into an elementwise multiply + reduce fusion ("dot strength reduction") whenever the operands are small
(under ~10M elements). How fast that reduce runs depends on which axis of the weight is contiguous.

Forms, each jitted, bf16 in and out:
* `xla`        `x @ w`, w stored `[k, n]` (how nnx.Linear stores it): the reduce runs down the columns.
* `wT`         `x @ wT.T`, wT stored `[n, k]` (torch's layout): the reduce runs along contiguous rows.
* `pad2`       `x` padded with a zero row to at least 2 rows, then `@ w`, then sliced back.

Time = GPU kernel time per call (sum of the kernels' durations in a jax.profiler trace of `--calls` calls, so
launch and Python overhead are not counted), and the weight bytes over that time against a device copy of the
same bytes (the floor).
"""

import argparse
import collections
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from profile_decode import kernel_events

SHAPES = {"in_proj": (768, 3352), "out_proj": (1536, 768), "head": (768, 50288),
          "in_proj 1.3B": (2048, 8512), "out_proj 1.3B": (4096, 2048)}
FORMS = {
    "xla": lambda x, w, wt: x @ w,
    "wT": lambda x, w, wt: jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ()))),
    "pad2": lambda x, w, wt: (jnp.pad(x, ((0, max(0, 2 - x.shape[0])), (0, 0))) @ w)[:x.shape[0]],
}


def kernel_us(fn, args, calls):
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        events, _ = kernel_events(d)
    names = collections.Counter(ev["name"] for ev in events)
    return sum(float(ev["dur"]) for ev in events) / calls, names


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4,16")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    print(f"few-row matmuls, bf16 ({jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')})")
    print("| shape | rows | floor us | " + " | ".join(f"{f} us" for f in FORMS) + " | kernels |")
    print("|---|---|---|" + "---|" * len(FORMS) + "---|")
    copy = jax.jit(lambda w: w * 1)
    for name, (k, n) in SHAPES.items():
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
        wt = jnp.asarray(np.asarray(w).T.copy())
        floor, _ = kernel_us(copy, (w,), args.calls)
        floor /= 2  # a copy reads and writes the bytes; the matmul only reads them
        for r in rows:
            x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
            times, kinds, outs = {}, {}, {}
            for form, f in FORMS.items():
                fn = jax.jit(f)
                times[form], names = kernel_us(fn, (x, w, wt), args.calls)
                kinds[form] = ",".join(sorted(nm[:28] for nm in names))
                outs[form] = np.asarray(fn(x, w, wt), np.float32)
            ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
            err = {f: float(np.abs(o - ref).max() / np.abs(ref).max()) for f, o in outs.items()}
            print(f"| {name} {k}x{n} | {r} | {floor:.2f} | " + " | ".join(f"{times[f]:.2f}" for f in FORMS)
                  + " | " + " / ".join(kinds[f] for f in FORMS) + f" | err {max(err.values()):.1e}")


if __name__ == "__main__":
    main()
