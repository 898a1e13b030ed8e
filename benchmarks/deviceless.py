"""What an H100 would run, read off compiles made on a CPU-only machine: no GPU, no timing.

XLA compiles for a GPU it does not have when given the GPU's description (a compile-only "cuda" topology from a
target config, `H100_TARGET` below). What it emits is what the GPU machine would run: the same HLO passes, the
same Triton pipeline for the Pallas kernels, the same PTX. Two reports, each a table:

  decode     the decode loop as `generate` compiles it: the kernels one step launches, by kind (XLA fusions,
             Pallas kernels, library calls, copies), per shape and batch, with the loop at one and at two steps a
             trip (`generation.LOOP_UNROLL`). At batch 1 a step is bound by launches (130M: ~2.9 us each), so
             the count is what the step time follows.
  backward   the SSD backward kernels' registers and spills per thread (`ptxas -v` on the PTX XLA emits), per
             `SSDBackwardConfig` at the shapes of benchmarks/ssd_backward.py's sweep: a kernel that spills
             reads and writes local memory in its inner loop.

Not covered: the Mosaic GPU kernels (compiled when the program first runs on a GPU, not by XLA's compile) and
anything timed. Set-up, in a venv of its own (the CUDA plugin makes jax look for a GPU; the nvcc wheel it pulls in
brings ptxas):

    python -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install "jax[cuda12]==0.10.2" -e .
    /tmp/gvenv/bin/python benchmarks/deviceless.py decode backward [--shapes 130M,2.7B] [--batches 1,64]
"""

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")  # compile-only: never touch a GPU, even where one is
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the plugin's version check needs a driver

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# An H100 SXM as XLA describes it (its GpuTargetConfig); CUDA runtime 12.8, cuDNN 9.7.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def h100():
    """A sharding on one compile-only H100; its ShapeDtypeStructs lower and compile for CUDA."""
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET, topology="1x1x1")
    mesh = topologies.make_mesh(topo, (1,), ("d",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def as_gpu():
    """From here on, the kernels are chosen and built as on an sm_90 GPU (the resolver, interpret mode)."""
    from easymamba.kernels import pallas_util as pu
    pu.on_gpu = lambda: True
    pu.gpu_capability = lambda: (9, 0)
    jax.default_backend = lambda: "gpu"


def compile_for(fn, args, sharding, dump, options=None):
    """`fn` compiled for the H100 at abstract `args`, XLA's dumps (HLO text, PTX) under `dump`; (seconds, HLO)."""
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    shutil.rmtree(dump, ignore_errors=True)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compile(
        dict(options or {}, xla_dump_to=dump))
    return time.perf_counter() - t0, compiled.as_text()


# -- decode ------------------------------------------------------------------------------------------------------
_OP = re.compile(r"\s*(?:ROOT )?%[\w.\-]+ = .*? ([a-z\-]+)\(")
_FREE = {"get-tuple-element", "bitcast", "tuple", "parameter", "constant"}  # no launch


def computations(hlo: str) -> dict[str, list[str]]:
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            cur = comps[m.group(1)] = []
        elif cur is not None and line.startswith("  "):
            cur.append(line)
    return comps


def launches(lines: list[str]) -> collections.Counter:
    """The operations of one computation that launch work, by kind: XLA fusions (gemm fusions apart), Pallas
    (Triton) kernels, other custom calls (cuBLAS), copies, and anything else that is not free."""
    kinds = collections.Counter()
    for line in lines:
        m = _OP.match(line)
        if not m or m.group(1) in _FREE:
            continue
        op = m.group(1)
        if op == "fusion":
            kinds["gemm" if "kind=kCustom" in line else "fusion"] += 1
        elif op == "custom-call":
            kinds["pallas" if "__gpu$xla.gpu.triton" in line else "library"] += 1
        else:
            kinds[op] += 1
    return kinds


def decode_loop(shape: str, batch: int, new: int, sharding):
    """The arguments `generate`'s loop is called with, as abstract values, and the loop function (nothing runs:
    the model is `nnx.eval_shape`d, the carry built by `jax.eval_shape`)."""
    import easymamba as em
    from easymamba import generation
    from easymamba.sampling import SamplingParams
    from generate import HYBRID_SHAPES, config_kwargs, hybrid_kwargs

    # the shapes and settings benchmarks/generate.py times: Mamba-2 stacks, and the Nemotron-H hybrid shapes
    if shape in HYBRID_SHAPES:
        kw = hybrid_kwargs(shape)
        cfg = em.NemotronHConfig(**dict(kw, layers_block_type=tuple(kw["layers_block_type"])))
        family = em.NemotronHForCausalLM
    else:
        cfg, family = em.Mamba2Config(**config_kwargs(shape)), em.Mamba2ForCausalLM
    model = nnx.eval_shape(lambda: family(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    ids = jnp.ones((batch, 4), jnp.int32)
    settings = dict(do_sample=None, temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                    eos_token_id=None, pad_token_id=None, output_logits=False, decode_weights=True)
    config = generation._config(model, ids, None, new, None, settings)
    static = generation._Settings.of(config)
    params = SamplingParams.from_config(config)
    entry = generation._split(model)
    state = [v.get_raw_value() for v in entry.variables]
    logits = jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32)
    carry = jax.eval_shape(lambda lg: generation._start_carry(static, lg, ids, None, params), logits)
    # key/value slots for the prompt and every new token where the family has attention layers (as generate)
    cache = jax.eval_shape(lambda: model.init_cache(batch, max_length=ids.shape[1] + new))
    carry = carry.replace(cache=cache)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    fn = generation._jit("loop", generation._loop, entry.graphdef, static, donate_argnums=(1,))
    return fn, (state, carry, rng, params)


def report_decode(shapes, batches, new, sharding, work):
    from easymamba import generation
    print("\n## decode: kernels one step launches (the loop body as compiled for an H100, per step)\n")
    print("| shape | batch | steps a trip | launches a step | fusions | gemms | Pallas | library | copies | other "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in shapes:
        for batch in batches:
            for unroll in (1, 2) if hasattr(generation, "LOOP_UNROLL") else (1,):  # (an older checkout: one)
                if hasattr(generation, "LOOP_UNROLL"):
                    generation.LOOP_UNROLL["gpu"] = unroll
                fn, args = decode_loop(shape, batch, new, sharding)
                seconds, hlo = compile_for(fn, args, sharding, os.path.join(work, f"decode_{shape}_{batch}"))
                comps = computations(hlo)
                bodies = re.findall(r"body=%([\w.\-]+)", hlo)
                body = max(bodies, key=lambda b: len(comps.get(b, [])))  # the step loop (not a kernel's own)
                k = launches(comps[body])
                per = {name: k[name] / unroll for name in ("fusion", "gemm", "pallas", "library", "copy")}
                other = sum(k.values()) / unroll - sum(per.values())
                total = sum(k.values()) / unroll
                print(f"| {shape} | {batch} | {unroll} | {total:g} | {per['fusion']:g} | {per['gemm']:g} | "
                      f"{per['pallas']:g} | {per['library']:g} | {per['copy']:g} | {other:g} | {seconds:.1f} |",
                      flush=True)
                rows.append(dict(shape=shape, batch=batch, unroll=unroll, launches=total, compile_s=seconds, **per))
    if hasattr(generation, "LOOP_UNROLL"):
        generation.LOOP_UNROLL["gpu"] = 2
    return rows


# -- backward ----------------------------------------------------------------------------------------------------
def ptxas() -> str:
    try:  # the nvcc wheel's (a namespace package: no __file__)
        import nvidia.cuda_nvcc
        for folder in nvidia.cuda_nvcc.__path__:
            if os.path.exists(path := os.path.join(folder, "bin", "ptxas")):
                return path
    except ImportError:
        pass
    path = shutil.which("ptxas")
    if path is None:
        raise SystemExit("the backward report needs ptxas: pip install nvidia-cuda-nvcc-cu12 (jax[cuda12] brings "
                         "it) or put CUDA's bin on PATH")
    return path


def kernel_resources(dump: str, pattern: str) -> dict[str, dict]:
    """ptxas -v (sm_90a) over every PTX file under `dump`: {kernel: {regs, spill_stores, spill_loads}} for the
    kernels whose name matches `pattern`."""
    out = {}
    for ptx in sorted(glob.glob(os.path.join(dump, "*.ptx"))):
        result = subprocess.run([ptxas(), "-v", "-arch=sm_90a", ptx, "-o", os.devnull], capture_output=True,
                                text=True)
        name = None
        for line in result.stderr.splitlines():
            if m := re.search(r"Compiling entry function '([^']+)'", line):
                name = m.group(1) if re.search(pattern, m.group(1)) else None
            elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
                out.setdefault(name, {}).update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
            elif name and (m := re.search(r"Used (\d+) registers", line)):
                out.setdefault(name, {})["regs"] = int(m.group(1))
    return out


BACKWARD_SHAPES = {  # b, l, h, p, g, n: benchmarks/ssd_backward.py's 2.7B shape, head dim 80, state 256
    "2.7B b4 l2k": (4, 2048, 80, 64, 1, 128),
    "p80 g8 b2 l2k": (2, 2048, 128, 80, 8, 128),
    "n256 b4 l2k": (4, 2048, 48, 64, 1, 256),
}


def report_backward(config_ids, sharding, work):
    from easymamba.kernels.ssd_scan.gpu import ssd_pallas
    from ssd_backward import CONFIGS

    from easymamba.kernels.ssd_scan.triton_bwd import default_backward_config

    bf, f32 = jnp.bfloat16, jnp.float32
    print("\n## backward: registers / spilled bytes a thread (stores, loads), ptxas -v for sm_90a\n")
    print("| shape | config | block_q | warps | block_p | ssd_bwd regs | ssd_bwd spills | ssd_bwd_states regs | "
          "ssd_bwd_states spills |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape, (b, l, h, p, g, n) in BACKWARD_SHAPES.items():
        args = ((b, l, h, p), (b, l, h), (h,), (b, l, g, n), (b, l, g, n), (h,), (b, l, h, p), (h,))
        dtypes = (bf, f32, f32, bf, bf, f32, bf, f32)
        args = [jax.ShapeDtypeStruct(s, d) for s, d in zip(args, dtypes)]
        for i in config_ids:
            config = default_backward_config(l) if CONFIGS[i] == "default" else CONFIGS[i]

            def loss(x, dt, A, B, C, D, z, dt_bias, config=config):
                y, state = ssd_pallas(x, dt, A, B, C, chunk_size=64, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                      y_dtype=bf, backward_config=config)
                return y.astype(f32).sum() + state.sum()

            dump = os.path.join(work, f"backward_{i}")
            name = CONFIGS[i] if CONFIGS[i] == "default" else i
            try:
                compile_for(jax.grad(loss, argnums=tuple(range(8))), args, sharding, dump)
            except Exception as exc:  # noqa: BLE001 -- a config that does not compile is a result too
                print(f"| {shape} | {name} | {config.block_q} | {config.num_warps} | {config.block_p or '-'} | "
                      f"does not compile: {str(exc).splitlines()[0][:90]} | | | |", flush=True)
                rows.append(dict(shape=shape, config=i, error=str(exc).splitlines()[0]))
                continue
            res = kernel_resources(dump, r"^ssd_bwd")
            cell = lambda k, f: (res.get(k, {}).get("regs", "?") if f == "regs"  # noqa: E731
                                 else f"{res.get(k, {}).get('spill_stores', '?')} / "
                                      f"{res.get(k, {}).get('spill_loads', '?')}")
            print(f"| {shape} | {name} | {config.block_q} | {config.num_warps} | {config.block_p or '-'} | "
                  f"{cell('ssd_bwd', 'regs')} | {cell('ssd_bwd', 'spill')} | {cell('ssd_bwd_states', 'regs')} | "
                  f"{cell('ssd_bwd_states', 'spill')} |", flush=True)
            rows.append(dict(shape=shape, config=i, kernels=res))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", choices=("decode", "backward"))
    parser.add_argument("--shapes", default="130M,1.3B,2.7B",
                        help="decode: model shapes (benchmarks/generate.py's SHAPES or HYBRID_SHAPES)")
    parser.add_argument("--batches", default="1,64", help="decode: batch sizes")
    parser.add_argument("--new", type=int, default=16, help="decode: max_new_tokens (an even count)")
    parser.add_argument("--configs", default=None, help="backward: indices into ssd_backward.CONFIGS (all)")
    parser.add_argument("--keep", default=None, help="a folder to keep XLA's dumps in (default: a temporary one)")
    args = parser.parse_args()
    sharding = h100()
    as_gpu()
    print(f"# compiled for: NVIDIA H100 80GB HBM3 (compile-only), jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    work = args.keep or tempfile.mkdtemp(prefix="deviceless-")
    try:
        if "decode" in args.reports:
            report_decode(args.shapes.split(","), [int(b) for b in args.batches.split(",")], args.new, sharding,
                          work)
        if "backward" in args.reports:
            from ssd_backward import CONFIGS
            ids = range(len(CONFIGS)) if args.configs is None else [int(i) for i in args.configs.split(",")]
            report_backward(ids, sharding, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
