"""SSD forward, decode step and conv1d timings on one GPU, beside the floor and the peers, in one run.

    PYTHONPATH=. python benchmarks/ssd.py [--out results.json] [--quick]
    PYTHONPATH=. python benchmarks/ssd.py --lengths 512,1024,2048,4096,8192,16384 --out ssd_lengths.json
    PYTHONPATH=. python benchmarks/ssd.py --lengths 64,128,256 --tiny --out /tmp/ssd_tiny.json   # CPU smoke run

Prints one table per part (medians in ms) and writes every number to --out. `--lengths` instead times the
SSD forward over a sweep of sequence lengths at one head shape and a constant batch (`--sweep-batch`, default
4; 2.7B-like h80 p64 n128 g1), for easymamba's kernel, its XLA path and each peer present, with the floor at
every point; `benchmarks/plots.py` draws it. The parts' shapes are the issue's (tokens 32K): 2.7B-like
h80 p64 n128 g1 at b16 l2k and b4 l8k, 130M-like h24 at b4 l8k, Codestral-like h128 g8 at b2 l4k;
bf16 x/B/C/z/y, float32 dt, A, D, dt_bias, states. Every SSD call does dt_bias + softplus and the D skip.

Floor: max(minimum bytes / measured copy bandwidth, matmul FLOPs / measured bf16 matmul rate), where the
bytes are x, B, C, dt read once, y (bf16) and the float32 final state written once, and the FLOPs are the
causal-aware count of docs/benchmarks.md. Peers are imported from the git-ignored `third_party_peers/site`
(wheels and a copy of mamba_ssm's Triton files; see docs/benchmarks.md) and skipped, with a line saying so,
when absent.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from easymamba import kernels
from easymamba.kernels import SSDBlockConfig, ssd_chunked, ssd_pallas
from easymamba.kernels.conv1d.reference import causal_conv1d_ref
from easymamba.kernels.conv1d.triton import causal_conv1d_pallas, causal_conv1d_update_pallas
from easymamba.kernels.ssd_scan.gpu import MosaicSSDConfig, default_config
from easymamba.kernels.state_update.reference import selective_state_update_ref
from easymamba.kernels.state_update.triton import selective_state_update_pallas

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "third_party_peers", "site")

SHAPES = [  # name, b, l, h, p, n, g
    ("2.7B b16 l2k", 16, 2048, 80, 64, 128, 1),
    ("2.7B b4 l8k", 4, 8192, 80, 64, 128, 1),
    ("130M b4 l8k", 4, 8192, 24, 64, 128, 1),
    ("Codestral b2 l4k", 2, 4096, 128, 64, 128, 8),
    # Nemotron-H-Nano-9B-v2 / Nemotron-3 mixers: head dim 80 (the Mosaic form runs it at 80, Triton at 128), 8 groups
    ("Nemotron-Nano p80 g8 b2 l8k", 2, 8192, 128, 80, 128, 8),
    ("Falcon-H1 n256 b4 l4k", 4, 4096, 48, 64, 256, 1),  # state 256
]
CONFIGS = [SSDBlockConfig(64, 4, 2), SSDBlockConfig(64, 4, 3), SSDBlockConfig(64, 4, 4), SSDBlockConfig(32, 4, 3),
           SSDBlockConfig(128, 8, 2)]


def bench_jax(fn, *args, iters=20, repeats=7):
    """Median over `repeats` of the mean time of `iters` back-to-back calls (ms); compiled and warmed first."""
    out = fn(*args)
    jax.block_until_ready(out)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(times)


def measure_ceilings(copy_elems=1 << 29, matmul_side=8192):
    x = jnp.ones((copy_elems,), jnp.bfloat16) * 1.5  # 1 GiB by default
    copy = jax.jit(lambda a: a + 1)
    ms = bench_jax(copy, x, iters=10, repeats=5)
    bandwidth = 2 * x.nbytes / (ms * 1e-3)  # bytes read + written per second
    a = jax.random.normal(jax.random.key(0), (matmul_side, matmul_side), jnp.bfloat16)
    mm = jax.jit(lambda u, v: u @ v)
    ms = bench_jax(mm, a, a, iters=10, repeats=5)
    flops = 2 * matmul_side**3 / (ms * 1e-3)
    return bandwidth, flops


def ssd_floor(b, l, h, p, n, g, bandwidth, flops, q=256):
    t = b * l
    nbytes = t * h * p * 2 * 2 + 2 * t * g * n * 2 + t * h * 4 + b * h * p * n * 4
    nflops = t * h * (q * p + 4 * n * p) + t * g * q * n
    return max(nbytes / bandwidth, nflops / flops) * 1e3, nbytes, nflops


def ssd_inputs(b, l, h, p, n, g, seed=0):
    k = jax.random.split(jax.random.key(seed), 8)
    bf = jnp.bfloat16
    return dict(
        x=jax.random.normal(k[0], (b, l, h, p), bf),
        dt=jax.random.normal(k[1], (b, l, h), jnp.float32) - 3.0,
        A=-jnp.exp(jax.random.normal(k[2], (h,), jnp.float32)),
        B=jax.random.normal(k[3], (b, l, g, n), bf),
        C=jax.random.normal(k[4], (b, l, g, n), bf),
        D=jax.random.normal(k[5], (h,), jnp.float32),
        dt_bias=jax.random.normal(k[6], (h,), jnp.float32) * 0.5,
    )


def peer_mamba_ssm():
    sys.path.insert(0, PEERS)
    import torch
    import triton.testing
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return torch, triton.testing.do_bench, mamba_chunk_scan_combined, selective_state_update


def to_torch(torch, a):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    return torch.from_numpy(a).cuda()


def run_ssd(rows, bandwidth, flops, quick, peers=True, only=None):
    torch = mamba2_ssd = ssd_forward = None
    try:
        assert peers, "--no-peers"
        torch, do_bench, mcsc, _ = peer_mamba_ssm()
    except Exception as e:  # noqa: BLE001 - any import failure means the peer is absent
        print(f"mamba_ssm: skipped ({type(e).__name__}: {e})")
    try:
        assert peers, "--no-peers"
        sys.path.insert(0, PEERS)
        from jla.layers.ssm import mamba2_ssd
    except Exception as e:  # noqa: BLE001
        print(f"jax-linear-attention: skipped ({type(e).__name__}: {e})")
    try:
        assert peers, "--no-peers"
        sys.path.insert(0, PEERS)
        from mamba2_jax.modeling import ssd_forward
    except Exception as e:  # noqa: BLE001
        print(f"mamba2-jax: skipped ({type(e).__name__}: {e})")

    for name, b, l, h, p, n, g in SHAPES:
        if only and not any(key in name for key in only):
            continue
        args = ssd_inputs(b, l, h, p, n, g)
        floor, nbytes, nflops = ssd_floor(b, l, h, p, n, g, bandwidth, flops)
        row = dict(shape=name, floor=floor, bytes=nbytes, flops=nflops)
        common = dict(D=args["D"], dt_bias=args["dt_bias"], dt_softplus=True)
        main = (args["x"], args["dt"], args["A"], args["B"], args["C"])

        best = None
        for cfg in CONFIGS[:1] if quick else CONFIGS:
            fn = jax.jit(functools.partial(ssd_pallas, chunk_size=256, y_dtype=jnp.bfloat16, config=cfg, **common))
            try:
                ms = bench_jax(fn, *main)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"  triton form {cfg}: failed ({type(e).__name__}: {str(e)[:200]})")
                continue
            row[f"triton q{cfg.block_q} w{cfg.num_warps} s{cfg.num_stages}"] = ms
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best:
            row["triton"], row["triton_config"] = best[0], str(best[1])
        # the Mosaic GPU form (Hopper), its default and the two knobs off; then what ssd_pallas picks by default
        mosaic = [("mosaic", MosaicSSDConfig()), ("mosaic exact-exp", MosaicSSDConfig(approx_math=False)),
                  ("mosaic no-overlap", MosaicSSDConfig(overlap=False))][:1 if quick else 3]
        if p % 16 == 0 and p & (p - 1):  # a head dim that is no power of two: also at its own size (head dim 80)
            mosaic.append(("mosaic native-p", MosaicSSDConfig(native_head_dim=True)))
        for label, cfg in mosaic:
            try:
                fn = jax.jit(functools.partial(ssd_pallas, chunk_size=256, y_dtype=jnp.bfloat16, config=cfg, **common))
                row[label] = bench_jax(fn, *main)
                if label == "mosaic" and best:
                    ref = jax.jit(functools.partial(ssd_pallas, chunk_size=256, y_dtype=jnp.bfloat16,
                                                    config=best[1], **common))
                    ya, yb = (a[0].astype(jnp.float32) for a in (fn(*main), ref(*main)))
                    row["mosaic_vs_triton_rel"] = float(jnp.linalg.norm(ya - yb) / jnp.linalg.norm(yb))
            except Exception as e:  # noqa: BLE001
                print(f"  {label}: failed ({type(e).__name__}: {str(e)[:300]})")
        fn = jax.jit(functools.partial(ssd_pallas, chunk_size=256, y_dtype=jnp.bfloat16, **common))
        row["pallas"] = bench_jax(fn, *main)
        cfg = default_config(args["x"].shape[1], p, n, args["x"].dtype)
        row["pallas_config"] = type(cfg).__name__
        # the public entry as a model's prefill calls it: impl="auto", y in x's dtype (bf16) by default
        row["auto"] = bench_jax(jax.jit(functools.partial(kernels.ssd, chunk_size=256, impl="auto", **common)), *main)
        row["auto_impl"] = kernels.describe()["ssd"]
        if row.get("triton"):
            row["pallas/triton"] = row["pallas"] / row["triton"]

        xla = jax.jit(lambda x, dt, A, B, C: jax.tree.map(
            lambda a: a, ssd_chunked(x, dt, A, B, C, chunk_size=256, **common)))
        xla_bf16 = jax.jit(lambda *a: (lambda y, s: (y.astype(jnp.bfloat16), s))(*xla(*a)))
        row["xla"] = bench_jax(xla_bf16, *main)

        if mamba2_ssd is not None:
            def jla_fn(x, dt, A, B, C):
                dtp = jax.nn.softplus(dt + args["dt_bias"])
                return mamba2_ssd(x, dtp, A, B, C, d=args["D"], output_final_state=True)
            try:
                row["jla"] = bench_jax(jax.jit(jla_fn), *main)
            except Exception as e:  # noqa: BLE001
                print(f"  jla {name}: failed ({type(e).__name__}: {str(e)[:300]})")
        if ssd_forward is not None:
            r = h // g

            def m2j_fn(x, dt, A, B, C):
                Bh, Ch = jnp.repeat(B, r, axis=2), jnp.repeat(C, r, axis=2)
                return ssd_forward(x, dt, A, Bh, Ch, 256, args["D"], args["dt_bias"], 0.0, float("inf"),
                                   return_final_states=True)
            try:
                row["mamba2_jax"] = bench_jax(jax.jit(m2j_fn), *main)
            except Exception as e:  # noqa: BLE001
                print(f"  mamba2-jax {name}: failed ({type(e).__name__}: {str(e)[:300]})")
        if torch is not None:
            t = {k: to_torch(torch, v) for k, v in args.items()}
            for key in ("x", "B", "C"):
                t[key] = t[key].to(torch.bfloat16)
            def call():
                return mcsc(t["x"], t["dt"], t["A"], t["B"], t["C"], 256, D=t["D"], dt_bias=t["dt_bias"],
                            dt_softplus=True, return_final_states=True)

            call()
            row["mamba_ssm"] = do_bench(call, warmup=50, rep=300, return_mode="median")
            del t
        rows.append(row)
        print(json.dumps(row), flush=True)


def run_decode(rows, bandwidth):
    try:
        torch, do_bench, _, ssu = peer_mamba_ssm()
    except Exception:  # noqa: BLE001
        torch = None
    h, p, n, g = 80, 64, 128, 1
    for b in (1, 64, 256):
        k = jax.random.split(jax.random.key(1), 8)
        state = jax.random.normal(k[0], (b, h, p, n), jnp.float32)
        x = jax.random.normal(k[1], (b, h, p), jnp.bfloat16)
        dt = jax.random.normal(k[2], (b, h), jnp.float32)
        A = -jnp.exp(jax.random.normal(k[3], (h,), jnp.float32))
        B = jax.random.normal(k[4], (b, g, n), jnp.bfloat16)
        C = jax.random.normal(k[5], (b, g, n), jnp.bfloat16)
        D = jnp.ones((h,), jnp.float32)
        bias = jnp.zeros((h,), jnp.float32)
        nbytes = 2 * state.nbytes + 2 * x.nbytes + 2 * B.nbytes + dt.nbytes
        row = dict(shape=f"decode 2.7B layer b{b}", floor=nbytes / bandwidth * 1e3, bytes=nbytes)
        for label, fn in (("pallas", selective_state_update_pallas), ("xla", selective_state_update_ref)):
            step = jax.jit(
                lambda s, x, dt, A, B, C, fn=fn: fn(s, x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True),
                donate_argnums=(0,))
            s = state + 0  # a fresh buffer: the step donates it
            y, s = step(s, x, dt, A, B, C)
            jax.block_until_ready(s)
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(50):
                    y, s = step(s, x, dt, A, B, C)
                jax.block_until_ready(s)
                times.append((time.perf_counter() - t0) / 50 * 1e3)
            row[label] = statistics.median(times)
        if torch is not None:
            ts = to_torch(torch, state)
            tx = to_torch(torch, x).to(torch.bfloat16)
            tdt = to_torch(torch, dt)[..., None].expand(b, h, p)
            tA = to_torch(torch, A)[:, None, None].expand(h, p, n)
            tB, tC = to_torch(torch, B).to(torch.bfloat16), to_torch(torch, C).to(torch.bfloat16)
            tD = to_torch(torch, D)[:, None].expand(h, p)
            tbias = to_torch(torch, bias)[:, None].expand(h, p)
            call = lambda: ssu(ts, tx, tdt, tA, tB, tC, D=tD, dt_bias=tbias, dt_softplus=True)  # noqa: E731
            call()
            row["mamba_ssm"] = do_bench(call, warmup=50, rep=300, return_mode="median")
        rows.append(row)
        print(json.dumps(row), flush=True)


def run_conv(rows, bandwidth):
    b, l, c, k = 4, 8192, 5376, 4
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (b, l, c), jnp.bfloat16)
    w = jax.random.normal(keys[1], (c, k), jnp.bfloat16)
    bias = jax.random.normal(keys[2], (c,), jnp.bfloat16)
    nbytes = 2 * x.nbytes
    row = dict(shape=f"conv1d 2.7B b{b} l{l} c{c}", floor=nbytes / bandwidth * 1e3, bytes=nbytes)
    row["copy"] = bench_jax(jax.jit(lambda a: a + 1), x)
    row["pallas"] = bench_jax(jax.jit(causal_conv1d_pallas), x, w, bias)
    row["xla"] = bench_jax(jax.jit(causal_conv1d_ref), x, w, bias)
    rows.append(row)
    print(json.dumps(row), flush=True)
    state = jax.random.normal(keys[0], (256, c, k), jnp.bfloat16)
    xs = x[0, :256]
    row = dict(shape="conv1d_update b256 c5376", floor=(2 * state.nbytes + 2 * xs.nbytes) / bandwidth * 1e3)
    for label, fn in (("pallas", causal_conv1d_update_pallas),
                      ("xla", __import__("easymamba.kernels", fromlist=["x"]).causal_conv1d_update_ref)):
        step = jax.jit(lambda xs, s, fn=fn: fn(xs, s, w, bias), donate_argnums=(1,))
        s = state + 0  # a fresh buffer: the step donates it
        y, s = step(xs, s)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(50):
                y, s = step(xs, s)
            jax.block_until_ready(s)
            times.append((time.perf_counter() - t0) / 50 * 1e3)
        row[label] = statistics.median(times)
    rows.append(row)
    print(json.dumps(row), flush=True)


# ---- the sequence-length sweep (--lengths) --------------------------------------------------------------------

SWEEP_SHAPE = dict(h=80, p=64, n=128, g=1)   # 2.7B-like heads; the batch stays fixed (--sweep-batch)
TINY_SWEEP_SHAPE = dict(h=4, p=16, n=16, g=1)


def versions():
    """Versions of everything a sweep touches (the plots print them)."""
    import importlib.metadata as md

    out = {"jax": jax.__version__}
    for dist in ("jaxlib", "flax", "easymamba", "torch", "triton"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if os.path.isdir(PEERS):  # the wheels unzipped into third_party_peers/site carry their dist-info
        for dist in md.distributions(path=[PEERS]):
            out[dist.metadata["Name"]] = dist.version
    return out


def ssd_peers(peers=True):
    """{name: callable(args) -> jitted fn of (x, dt, A, B, C) or a torch call} for each peer that imports;
    a peer that does not is reported and left out."""
    found = {}
    if not peers:
        return found
    sys.path.insert(0, PEERS)
    try:
        torch, do_bench, mcsc, _ = peer_mamba_ssm()
        found["mamba_ssm"] = (torch, do_bench, mcsc)
    except Exception as e:  # noqa: BLE001 - any import failure means the peer is absent
        print(f"mamba_ssm: skipped ({type(e).__name__}: {e})")
    try:
        from jla.layers.ssm import mamba2_ssd
        found["jla"] = mamba2_ssd
    except Exception as e:  # noqa: BLE001
        print(f"jax-linear-attention: skipped ({type(e).__name__}: {e})")
    try:
        from mamba2_jax.modeling import ssd_forward
        found["mamba2_jax"] = ssd_forward
    except Exception as e:  # noqa: BLE001
        print(f"mamba2-jax: skipped ({type(e).__name__}: {e})")
    return found


def time_ssd_point(b, l, h, p, n, g, peers, chunk, timing):
    """One sweep point: ms of each implementation on the same inputs (bf16 x/B/C, float32 dt/A/D/dt_bias;
    dt_bias + softplus + D skip; y in bf16); an implementation that fails is recorded as its error."""
    args = ssd_inputs(b, l, h, p, n, g)
    common = dict(D=args["D"], dt_bias=args["dt_bias"], dt_softplus=True)
    main = (args["x"], args["dt"], args["A"], args["B"], args["C"])
    row, errors = {}, {}

    def attempt(name, thunk):
        try:
            row[name] = thunk()
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the sweep
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  {name} l={l}: failed ({errors[name]})")

    attempt("pallas", lambda: bench_jax(jax.jit(functools.partial(
        ssd_pallas, chunk_size=chunk, y_dtype=jnp.bfloat16, **common)), *main, **timing))
    attempt("xla", lambda: bench_jax(jax.jit(lambda *a: (lambda y, s: (y.astype(jnp.bfloat16), s))(
        *ssd_chunked(*a, chunk_size=chunk, **common))), *main, **timing))
    if "jla" in peers:
        def jla_fn(x, dt, A, B, C):
            return peers["jla"](x, jax.nn.softplus(dt + args["dt_bias"]), A, B, C, d=args["D"],
                                output_final_state=True)
        attempt("jla", lambda: bench_jax(jax.jit(jla_fn), *main, **timing))
    if "mamba2_jax" in peers:
        def m2j_fn(x, dt, A, B, C):
            r = h // g
            return peers["mamba2_jax"](x, dt, A, jnp.repeat(B, r, axis=2), jnp.repeat(C, r, axis=2), chunk,
                                       args["D"], args["dt_bias"], 0.0, float("inf"), return_final_states=True)
        attempt("mamba2_jax", lambda: bench_jax(jax.jit(m2j_fn), *main, **timing))
    if "mamba_ssm" in peers:
        torch, do_bench, mcsc = peers["mamba_ssm"]

        def run_torch():
            t = {k: to_torch(torch, v) for k, v in args.items()}
            for key in ("x", "B", "C"):
                t[key] = t[key].to(torch.bfloat16)

            def call():
                return mcsc(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], dt_bias=t["dt_bias"],
                            dt_softplus=True, return_final_states=True)

            call()
            ms = do_bench(call, warmup=50, rep=300, return_mode="median")
            del t
            torch.cuda.empty_cache()
            return ms
        attempt("mamba_ssm", run_torch)
    if errors:
        row["errors"] = errors
    return row


def run_sweep(lengths, batch, shape, bandwidth, flops, peers, chunk=256, timing=None):
    """The SSD forward at `shape` and batch `batch` for every l in `lengths` (constant batch: the work grows
    with l, and the floor with it)."""
    h, p, n, g = shape["h"], shape["p"], shape["n"], shape["g"]
    points = []
    for l in lengths:
        floor, nbytes, nflops = ssd_floor(batch, l, h, p, n, g, bandwidth, flops, q=chunk)
        point = dict(l=l, b=batch, tokens=batch * l, floor=floor, bytes=nbytes, flops=nflops)
        point.update(time_ssd_point(batch, l, h, p, n, g, peers, chunk, timing or {}))
        points.append(point)
        print(json.dumps(point), flush=True)
    return dict(shape=dict(shape, b=batch, chunk=chunk), lengths=list(lengths), points=points)


def table(rows, columns):
    print("| shape | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows:
        cells = []
        for col in columns:
            v = row.get(col)
            cells.append("—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        print(f"| {row['shape']} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="one kernel config per shape")
    parser.add_argument("--parts", default="ssd,decode,conv")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated substrings: run only the SSD shapes whose name holds one")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated sequence lengths: run the SSD length sweep instead of --parts")
    parser.add_argument("--sweep-batch", type=int, default=None, help="batch of every sweep point (default 4)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --lengths: a small head shape, small ceilings, few repeats (a CPU smoke run)")
    opts = parser.parse_args()
    info = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
    if opts.lengths:
        info["versions"] = versions()
        lengths = [int(v) for v in opts.lengths.split(",")]
        batch = opts.sweep_batch or (1 if opts.tiny else 4)
        ceilings = dict(copy_elems=1 << 20, matmul_side=256) if opts.tiny else {}
        bandwidth, flops = measure_ceilings(**ceilings)
        info.update(copy_bandwidth_TBps=bandwidth / 1e12, matmul_TFLOPs=flops / 1e12)
        print(json.dumps(info), flush=True)
        sweep = run_sweep(lengths, batch, TINY_SWEEP_SHAPE if opts.tiny else SWEEP_SHAPE, bandwidth, flops,
                          ssd_peers(not opts.no_peers), chunk=64 if opts.tiny else 256,
                          timing=dict(iters=2, repeats=3) if opts.tiny else None)
        if opts.out:
            with open(opts.out, "w") as f:
                json.dump(dict(info=info, sweep=sweep), f, indent=1)
        names = ["floor", "pallas", "xla", "mamba_ssm", "jla", "mamba2_jax"]
        table([dict(p, shape=f"l{p['l']}") for p in sweep["points"]], names)
        return
    bandwidth, flops = measure_ceilings()
    info.update(copy_bandwidth_TBps=bandwidth / 1e12, matmul_TFLOPs=flops / 1e12)
    print(json.dumps(info), flush=True)
    rows = []
    parts = opts.parts.split(",")
    if "ssd" in parts:
        run_ssd(rows, bandwidth, flops, opts.quick, peers=not opts.no_peers,
                only=opts.shapes.split(",") if opts.shapes else None)
    if "decode" in parts:
        run_decode(rows, bandwidth)
    if "conv" in parts:
        run_conv(rows, bandwidth)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
    print()
    ssd_rows = [r for r in rows if "decode" not in r["shape"] and "conv" not in r["shape"]]
    for r in ssd_rows:
        for peer in ("mamba_ssm", "jla", "xla"):
            if r.get("pallas") and r.get(peer):
                r[f"pallas/{peer}"] = r["pallas"] / r[peer]
        if r.get("auto") and r.get("mamba_ssm"):
            r["auto/mamba_ssm"] = r["auto"] / r["mamba_ssm"]
    for r in ssd_rows:
        if r.get("pallas"):
            r["pallas/floor"] = r["pallas"] / r["floor"]
    table(ssd_rows, ["floor", "pallas", "auto", "triton", "mosaic", "mosaic exact-exp", "mosaic no-overlap",
                     "mosaic native-p", "xla",
                     "mamba_ssm", "jla", "mamba2_jax", "pallas/floor", "pallas/mamba_ssm", "auto/mamba_ssm",
                     "pallas/jla", "pallas/triton", "pallas/xla", "mosaic_vs_triton_rel", "pallas_config",
                     "triton_config"])
    print()
    table([r for r in rows if r not in ssd_rows], ["floor", "copy", "pallas", "xla", "mamba_ssm"])


if __name__ == "__main__":
    main()
