"""SSD forward + backward timings on one GPU: our kernels, our forward + the reference VJP, and mamba_ssm.

    JAX_PLATFORMS= PYTHONPATH=. python benchmarks/ssd_backward.py [--out results.json] [--quick]
    PYTHONPATH=. python benchmarks/ssd_backward.py --tiny          # CPU smoke test (interpret mode, tiny shapes)

Shapes are the kernels issue's (tokens 32K): 2.7B-like h80 p64 n128 g1 at b16 l2k and b4 l8k, 130M-like h24 at
b4 l8k, Codestral-like h128 g8 at b2 l4k. bf16 x/B/C/y, float32 dt, A, D, dt_bias, states; dt_bias + softplus +
the D skip; random cotangents for y (bf16) and the final state. Each timed call is one forward and one backward
producing the gradients of x, dt, A, B, C, D and dt_bias:

* `pallas`: `ssd_pallas` with the backward kernels (`ssd_pallas_gpu_bwd`), at each `SSDBackwardConfig` of the
  sweep, `default` first (`default_backward_config(l)`: what `ssd_pallas` runs); the best one is reported, every
  one (time and `rel_err`) is in the JSON;
* `pallas+ref_vjp`: the same forward with `backward="reference"` (jax.vjp of `ssd_chunked`, chunk 256: the path
  before the backward kernels);
* `mamba_ssm`: `mamba_chunk_scan_combined` forward + `torch.autograd.backward` (chunk 256, do_bench median),
  imported from the git-ignored `third_party_peers/site` as in benchmarks/ssd.py, skipped with a line when absent.

`fwd` is our forward alone (for scale). `rel_err` is our kernel gradients against the reference-VJP path's
(max |a - b| / max |b| over all gradients; bf16 inputs, so ~1e-2 is rounding).
"""

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (the peer) shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ssd import SHAPES, bench_jax, peer_mamba_ssm, ssd_inputs, to_torch  # noqa: E402

from easymamba.kernels import pallas_util as pu  # noqa: E402
from easymamba.kernels.ssd_scan.gpu import ssd_pallas  # noqa: E402
from easymamba.kernels.ssd_scan.triton_bwd import SSDBackwardConfig, default_backward_config  # noqa: E402

CONFIGS = [  # block_q, num_warps, num_stages, states_num_warps, states_num_stages, input_dtype_partials
    "default",  # default_backward_config(l): what ssd_pallas runs
    SSDBackwardConfig(64, 4, 2, 4, 2, False),
    SSDBackwardConfig(64, 8, 2, 4, 2, False),
    SSDBackwardConfig(64, 8, 1, 4, 2, False),
    SSDBackwardConfig(32, 4, 2, 4, 2, False),
    SSDBackwardConfig(128, 8, 2, 8, 2, False),
    SSDBackwardConfig(32, 4, 1, 4, 2, False),
    SSDBackwardConfig(32, 2, 2, 4, 2, False),
    SSDBackwardConfig(16, 2, 2, 4, 2, False),
    SSDBackwardConfig(32, 4, 3, 4, 2, False),
    # 8 warps: at p x n = 128 x 128 (head dim 80 padded) and 64 x 256 the state and its cotangent, [p, n] float32
    # each, take 256 registers a thread with 4 warps and 128 with 8
    SSDBackwardConfig(32, 8, 1, 8, 2, True),
    SSDBackwardConfig(32, 8, 2, 8, 2, True),
    SSDBackwardConfig(16, 8, 1, 8, 2, True),
    SSDBackwardConfig(64, 8, 1, 8, 2, True),
    # the head dim in blocks (block_p), each a head of its own: a [block_p, n] state a program
    SSDBackwardConfig(32, 4, 1, 4, 2, True, block_p=64),
    SSDBackwardConfig(32, 4, 1, 4, 2, True, block_p=32),
    SSDBackwardConfig(32, 4, 1, 4, 2, True, block_p=16),
    # the configs whose reverse kernel does not spill, or spills least, by ptxas on an H100 compile made without a
    # GPU (benchmarks/deviceless.py backward; docs/benchmarks.md): the default spills 1.2 KB a thread at the 2.7B
    # shape, 8.8 KB at head dim 80 and 5.1 KB at state 256
    SSDBackwardConfig(16, 8, 1, 8, 2, True, block_p=32),
    SSDBackwardConfig(16, 4, 1, 4, 2, True, block_p=32),
    SSDBackwardConfig(16, 4, 1, 4, 2, True, block_p=16),
    SSDBackwardConfig(32, 8, 1, 8, 2, True, block_p=16),
]
TINY_SHAPES = [("tiny h4 g2", 2, 40, 4, 16, 16, 2)]
DIFF = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def config_name(cfg: SSDBackwardConfig) -> str:
    name = f"q{cfg.block_q} w{cfg.num_warps} s{cfg.num_stages} sw{cfg.states_num_warps} ss{cfg.states_num_stages}"
    return name + (" lp" if cfg.input_dtype_partials else "") + (f" bp{cfg.block_p}" if cfg.block_p else "")


def fwd_bwd(backward, config, chunk_size):
    """jit(args, dy, dfinal -> gradients of DIFF) through ssd_pallas' custom VJP."""
    def primal(x, dt, A, B, C, D, dt_bias):
        return ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                          y_dtype=jnp.bfloat16, backward=backward, backward_config=config)

    def run(args, dy, dfinal):
        _, vjp = jax.vjp(primal, *(args[k] for k in DIFF))
        return vjp((dy, dfinal))

    return jax.jit(run)


def rel_err(got, want):
    num = max(float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) for a, b in zip(got, want))
    den = max(float(jnp.abs(b.astype(jnp.float32)).max()) for b in want)
    return num / den


def run_shape(shape, configs, mcsc, torch, do_bench, *, chunk_size, iters, repeats):
    name, b, l, h, p, n, g = shape
    args = ssd_inputs(b, l, h, p, n, g)
    k = jax.random.split(jax.random.key(1), 2)
    dy = jax.random.normal(k[0], (b, l, h, p), jnp.bfloat16)
    dfinal = jax.random.normal(k[1], (b, h, p, n), jnp.float32)
    row = dict(shape=name)
    bench = functools.partial(bench_jax, iters=iters, repeats=repeats)

    fwd = jax.jit(lambda a: ssd_pallas(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=chunk_size, D=a["D"],
                                       dt_bias=a["dt_bias"], dt_softplus=True, y_dtype=jnp.bfloat16))
    row["fwd"] = bench(fwd, args)
    ref_fn = fwd_bwd("reference", None, chunk_size)
    try:
        row["pallas+ref_vjp"] = bench(ref_fn, args, dy, dfinal)
        want = ref_fn(args, dy, dfinal)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest shape: reported, not fatal
        print(f"  reference VJP {name}: failed ({type(e).__name__}: {str(e)[:200]})")
        want = None

    best = None
    for cfg in configs:
        cfg = default_backward_config(l) if cfg == "default" else cfg
        fn = fwd_bwd("pallas", cfg, chunk_size)
        try:
            ms = bench(fn, args, dy, dfinal)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
            print(f"  pallas {config_name(cfg)}: failed ({type(e).__name__}: {str(e)[:300]})")
            continue
        row[f"pallas {config_name(cfg)}"] = ms
        if want is not None:
            row[f"rel_err {config_name(cfg)}"] = rel_err(fn(args, dy, dfinal), want)
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best:
        row["pallas"], row["pallas_config"] = best[0], config_name(best[1])
        row["rel_err"] = row.get(f"rel_err {config_name(best[1])}")

    if mcsc is not None:
        t = {key: to_torch(torch, v) for key, v in args.items()}
        for key in ("x", "B", "C"):
            t[key] = t[key].to(torch.bfloat16)
        leaves = [t[key].requires_grad_() for key in DIFF]
        tdy = to_torch(torch, dy).to(torch.bfloat16)

        def forward():
            return mcsc(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=t["D"], dt_bias=t["dt_bias"],
                        dt_softplus=True, return_final_states=True)

        _, final = forward()
        tdfinal = to_torch(torch, dfinal).to(final.dtype)

        def call():
            y, final = forward()
            torch.autograd.backward([y, final], [tdy, tdfinal])

        call()
        row["mamba_ssm"] = do_bench(call, warmup=25, rep=200, grad_to_none=leaves, return_mode="median")
        del t, leaves
        torch.cuda.empty_cache()
    for base in ("mamba_ssm", "pallas+ref_vjp"):
        if row.get("pallas") and row.get(base):
            row[f"pallas/{base}"] = row["pallas"] / row[base]
    return row


def table(rows, columns):
    print("| shape | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows:
        cells = []
        for col in columns:
            v = row.get(col)
            cells.append("—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
        print(f"| {row['shape']} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="the default backward config only")
    parser.add_argument("--configs", default=None, help="indices into CONFIGS, e.g. 0,1")
    parser.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0,2")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, interpret mode, no peers")
    opts = parser.parse_args()

    shapes, configs, chunk_size, iters, repeats = SHAPES, CONFIGS, 256, 10, 5
    if opts.tiny:
        shapes, configs, chunk_size, iters, repeats = TINY_SHAPES, [SSDBackwardConfig(block_q=16)], 16, 1, 1
    if opts.shapes:
        shapes = [shapes[int(i)] for i in opts.shapes.split(",")]
    if opts.configs:
        configs = [configs[int(i)] for i in opts.configs.split(",")]
    if opts.quick:
        configs = configs[:1]  # the default config

    info = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                interpret=pu.default_interpret(None))
    mcsc = torch = do_bench = None
    if not (opts.no_peers or opts.tiny):
        try:
            torch, do_bench, mcsc, _ = peer_mamba_ssm()
            info["torch"] = torch.__version__
        except Exception as e:  # noqa: BLE001 - any import failure means the peer is absent
            print(f"mamba_ssm: skipped ({type(e).__name__}: {e})")
    print(json.dumps(info), flush=True)

    rows = []
    for shape in shapes:
        row = run_shape(shape, configs, mcsc, torch, do_bench, chunk_size=chunk_size, iters=iters, repeats=repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
    print()
    table(rows, ["fwd", "pallas", "pallas+ref_vjp", "mamba_ssm", "pallas/mamba_ssm", "pallas/pallas+ref_vjp",
                 "rel_err", "pallas_config"])


if __name__ == "__main__":
    main()
