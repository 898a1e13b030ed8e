"""Decode tokens/s and prefill time of `easymamba.generate`, beside transformers (torch) and mamba2-jax.

    PYTHONPATH=. python3 benchmarks/generate.py --out results.json            # on a GPU machine
    PYTHONPATH=. python3 benchmarks/generate.py --tiny                        # smoke run on a CPU
    PYTHONPATH=. python3 benchmarks/generate.py --prefill-lens 512,1024,2048 --out results.json   # + a sweep

Models are random (HF initialisation) in bfloat16: a 130M-shaped one (d 768, 24 layers, 24 heads of 64,
state 128) and a 1.3B-shaped one (d 2048, 48 layers, 64 heads), and a hybrid, `nemotron-h-8b`: Nemotron-H-8B's
shape (52 layers: 24 Mamba-2 (128 heads of 64, 8 groups, state 128), 24 relu2 MLPs of 21504, 4 attention layers
of 32 query / 8 key-value heads of 128; d 4096, vocabulary 131072). For each batch size, `new` tokens are
generated greedily after a 16-token prompt with EOS disabled, so every row runs every step.

* easymamba: `generate(...)` after a warm-up call with the same shapes (compiled once; the decode loop is one
  `lax.while_loop`); tokens/s = batch * new / time of the whole call (prefill included, negligible at 16).
* transformers: `Mamba2ForCausalLM.generate(min_new_tokens=new, max_new_tokens=new, do_sample=False)` in bf16
  on the same GPU. The GPU image has no mamba_ssm / causal_conv1d, so this is HF's pure-torch path.
* mamba2-jax (PyPI 1.1.2, imported from the git-ignored `third_party_peers/site` when present): it has no
  generate, so its own jitted `forward` with a cache is called once per token in a Python loop (greedy argmax
  inside the jit), which is how its README decodes.

Prefill: [b, 2048] tokens into a fresh cache, the head on the last position only (ours: `model.compile().prefill`,
at each of `--prefill-batches`; transformers: its full forward at b 1).
`--prefill-lens 512,...,16384` also times that forward at each length (`prefill_ms_by_len` in the JSON); a
length that fails, e.g. out of memory, is recorded as its error and the rest goes on (the decode numbers are
kept). `benchmarks/plots.py` draws the decode and prefill sweeps. Peers that are absent are skipped and
reported as such. Prints a table; `--out` writes the JSON.
Run with `XLA_PYTHON_CLIENT_PREALLOCATE=false`, or JAX's default preallocation (75% of the GPU) leaves torch
too little memory for transformers' pure-torch scan.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "third_party_peers", "site")

SHAPES = {
    "130M": dict(hidden_size=768, num_hidden_layers=24, num_heads=24),
    "1.3B": dict(hidden_size=2048, num_hidden_layers=48, num_heads=64),
    "2.7B": dict(hidden_size=2560, num_hidden_layers=64, num_heads=80),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, state_size=16),
    # the Mamba-2 mixer of Nemotron-Nano-9B-v2 / Nemotron-3 (128 heads of 80, 8 groups) in a pure Mamba-2 stack
    "p80": dict(hidden_size=5120, num_hidden_layers=24, num_heads=128, head_dim=80, n_groups=8),
}


# The hybrid shapes: Nemotron-H (model_type nemotron_h). Nemotron-H-8B's layer pattern is four blocks of
# "M-M-M-M*-M-M-" (M Mamba-2, - MLP, * attention).
HYBRID_SHAPES = {
    "nemotron-h-8b": dict(vocab_size=131072, hidden_size=4096, layers_block_type=list("M-M-M-M*-M-M-" * 4),
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=21504,
                          mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4,
                          chunk_size=128),
    "nemotron-h-tiny": dict(vocab_size=512, hidden_size=64, layers_block_type=list("M-M*"), num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=4,
                            mamba_head_dim=32, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=32),
}
# --loop-graphs: the decode loop's XLA options (easymamba.generation.LOOP_COMPILER_OPTIONS)
_GRAPH_TYPES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
LOOP_GRAPHS = {
    "while": {"xla_gpu_enable_command_buffer": _GRAPH_TYPES, "xla_gpu_graph_min_graph_size": 1},
    "while-unrolled": {"xla_gpu_enable_command_buffer": _GRAPH_TYPES, "xla_gpu_graph_min_graph_size": 1,
                       "xla_gpu_command_buffer_unroll_loops": True},
}
_LETTERS = {"M": "mamba", "-": "mlp", "*": "attention", "E": "moe"}


def hybrid_kwargs(name):
    kw = dict(HYBRID_SHAPES[name], pad_token_id=0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    kw["layers_block_type"] = [_LETTERS[c] for c in kw["layers_block_type"]]
    return kw


def config_kwargs(name):
    kw = dict(vocab_size=50288, head_dim=64, state_size=128, n_groups=1, expand=2, conv_kernel=4, chunk_size=256,
              tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kw.update(SHAPES[name])
    return kw


def timed(fn, repeats):
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def sweep_lengths(prefill_ms, lengths):
    """{length: ms} of `prefill_ms(length)`, or {length: "error ..."} where it fails (e.g. out of memory), so
    one length does not end the sweep."""
    out = {}
    for length in lengths or ():
        try:
            out[length] = prefill_ms(length)
        except Exception as exc:  # noqa: BLE001 - recorded, the next length still runs
            out[length] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        print(f"#   prefill l={length}: {out[length]}", flush=True)
    return out


def bench_easymamba(name, batches, new, prompt_len, prefill_len, repeats, prefill_lens=None, prefill_batches=(1,),
                    state_dtype=None):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import easymamba as em

    if name in HYBRID_SHAPES:
        kw = hybrid_kwargs(name)
        cfg = em.NemotronHConfig(**dict(kw, layers_block_type=tuple(kw["layers_block_type"])))
        model = em.NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    else:
        cfg = em.Mamba2Config(**config_kwargs(name))
        model = em.Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rows = {}
    for b in batches:
        ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (b, prompt_len)), jnp.int32)

        def run():
            out = em.generate(model, ids, max_new_tokens=new, state_dtype=state_dtype)
            jax.block_until_ready(out.sequences)

        try:
            rows[b] = b * new / timed(run, repeats)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest batch: recorded, the rest runs
            rows[b] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        print(f"#   decode b{b}: {rows[b]}", flush=True)
    # The prefill a user calls: `model.compile().prefill` (the head on the last position only, the cache built
    # inside the jit), as mamba_ssm's peer runs its forward with `num_last_tokens=1`.
    fast = model.compile()

    def prefill_ms(length, batch=1):
        ids = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, length)), jnp.int32)
        return timed(lambda: jax.block_until_ready(fast.prefill(ids, max_length=length)), max(repeats, 5)) * 1e3

    by_batch = {}
    for b in prefill_batches:
        by_batch[b] = sweep_lengths(lambda length: prefill_ms(length, b), [prefill_len])[prefill_len]
    return {"decode_tok_s": rows, "prefill_ms": by_batch.get(1), "prefill_ms_by_batch": by_batch,
            "prefill_ms_by_len": sweep_lengths(prefill_ms, prefill_lens),
            "kernels": em.kernels.describe() if hasattr(em, "kernels") else None}


def bench_transformers(name, batches, new, prompt_len, prefill_len, repeats, prefill_lens=None, prefill_batches=()):
    try:
        import torch
        import transformers
    except ImportError as exc:
        return {"skipped": f"transformers/torch not importable: {exc}"}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device for torch"}
    torch.manual_seed(0)
    if name in HYBRID_SHAPES:
        kw = hybrid_kwargs(name)
        with torch.device("cuda"):  # an 8B model built on the host in float32 takes minutes
            model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**kw))
    else:
        kw = config_kwargs(name)
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kw))
    model = model.to("cuda", torch.bfloat16).eval()
    rows = {}
    for b in batches:
        ids = torch.randint(1, kw["vocab_size"], (b, prompt_len), device="cuda")

        def run():
            with torch.no_grad():
                model.generate(ids, min_new_tokens=new, max_new_tokens=new, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()

        rows[b] = b * new / timed(run, max(1, repeats // 2))
    def prefill_ms(length):
        ids = torch.randint(1, kw["vocab_size"], (1, length), device="cuda")

        def prefill():
            with torch.no_grad():
                model(ids, use_cache=True)
            torch.cuda.synchronize()

        try:
            return timed(prefill, repeats) * 1e3
        finally:
            torch.cuda.empty_cache()  # an out-of-memory length must not starve the next one

    return {"decode_tok_s": rows, "prefill_ms": sweep_lengths(prefill_ms, [prefill_len])[prefill_len],
            "prefill_ms_by_len": sweep_lengths(prefill_ms, prefill_lens), "version": transformers.__version__}


def bench_mamba2_jax(name, batches, new, prompt_len, prefill_len, repeats, prefill_lens=None, prefill_batches=()):
    if name in HYBRID_SHAPES:
        return {"skipped": "mamba2-jax has no hybrid models"}
    if os.path.isdir(PEERS) and PEERS not in sys.path:
        sys.path.insert(0, PEERS)
    try:
        import jax
        import jax.numpy as jnp
        import mamba2_jax
        from flax import nnx
    except ImportError as exc:
        return {"skipped": f"mamba2_jax not importable (put the wheel in {PEERS}): {exc}"}
    kw = config_kwargs(name)
    cfg = mamba2_jax.Mamba2Config(vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"],
                                  state_size=kw["state_size"], head_dim=kw["head_dim"],
                                  num_hidden_layers=kw["num_hidden_layers"], chunk_size=kw["chunk_size"])
    model = mamba2_jax.Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)

    @jax.jit
    def step(state, ids, cache):
        out = nnx.merge(graphdef, state)(ids, cache=cache)
        return jnp.argmax(out["logits"][:, -1], -1)[:, None].astype(jnp.int32), out["cache"]

    rows = {}
    for b in batches:
        ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (b, prompt_len)), jnp.int32)

        def run():
            cache = mamba2_jax.create_empty_cache(cfg, b, dtype=jnp.bfloat16)
            tok, cache = step(state, ids, cache)
            for _ in range(new - 1):
                tok, cache = step(state, tok, cache)
            jax.block_until_ready(tok)

        rows[b] = b * new / timed(run, max(1, repeats // 2))
    def prefill_ms(length):
        ids = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (1, length)), jnp.int32)
        cache = mamba2_jax.create_empty_cache(cfg, 1, dtype=jnp.bfloat16)
        return timed(lambda: jax.block_until_ready(step(state, ids, cache)), repeats) * 1e3

    return {"decode_tok_s": rows, "prefill_ms": sweep_lengths(prefill_ms, [prefill_len])[prefill_len],
            "prefill_ms_by_len": sweep_lengths(prefill_ms, prefill_lens), "version": mamba2_jax.__version__}


def versions():
    """Versions of what the run imports (the plots print them)."""
    import importlib.metadata as md

    out = {}
    for dist in ("jax", "jaxlib", "flax", "easymamba", "torch", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if os.path.isdir(PEERS):
        for dist in md.distributions(path=[PEERS]):
            out[dist.metadata["Name"]] = dist.version
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="130M,1.3B")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--prefill-lens", default=None,
                        help="comma-separated lengths: also time the prefill at each (a sweep for the plots)")
    parser.add_argument("--prefill-batches", default="1",
                        help="easymamba: batches of the [b, prefill-len] prefill (the mamba_ssm peer's default: 1,8)")
    parser.add_argument("--state-dtype", default=None,
                        help="easymamba: generate's state_dtype (bfloat16: SSM states kept in bf16, as mamba_ssm)")
    parser.add_argument("--loop-graphs", choices=("while", "while-unrolled"), default=None,
                        help="easymamba: compile the decode loop with XLA command buffers for WHILE / CONDITIONAL "
                             "(the whole loop one CUDA graph; -unrolled: its body unrolled in the graph)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="easymamba,transformers,mamba2_jax", help="which to run, in order")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.batches, args.new, args.prefill_len, args.repeats = "tiny,nemotron-h-tiny", "1,4", 8, 64, 1
        args.prefill_batches = "1,2"
    prefill_lens = [int(v) for v in args.prefill_lens.split(",")] if args.prefill_lens else None
    prefill_batches = [int(v) for v in args.prefill_batches.split(",") if v]
    import jax

    if args.loop_graphs:
        from easymamba import generation
        generation.LOOP_COMPILER_OPTIONS.update(LOOP_GRAPHS[args.loop_graphs])
    batches = [int(b) for b in args.batches.split(",")]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "state_dtype": args.state_dtype,
               "loop_graphs": args.loop_graphs,
               "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new, "prefill_len": args.prefill_len,
               "prefill_lens": prefill_lens, "batches": batches, "versions": versions(), "runs": {}}
    runners = {"easymamba": bench_easymamba, "transformers": bench_transformers, "mamba2_jax": bench_mamba2_jax}
    names = [p for p in args.impls.split(",") if p]
    for shape in args.shapes.split(","):
        for name in names:
            t0 = time.time()
            try:
                extra = {"state_dtype": args.state_dtype} if name == "easymamba" else {}
                res = runners[name](shape, batches, args.new, 16, args.prefill_len, args.repeats,
                                    prefill_lens=prefill_lens, prefill_batches=prefill_batches, **extra)
            except Exception as exc:  # a peer that breaks is reported, not fatal
                res = {"skipped": f"{type(exc).__name__}: {exc}"}
            res["wall_s"] = round(time.time() - t0, 1)
            results["runs"][f"{shape}/{name}"] = res
            print(f"# {shape} {name}: {res}", flush=True)
    print(f"\n{results['device']}, jax {results['jax']}, {results['date']}; greedy, {args.new} new tokens, "
          f"bf16; prefill of [b, {args.prefill_len}] (ms)")
    header = "| shape | impl | " + " | ".join(f"decode tok/s b{b}" for b in batches) + " | prefill ms |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for key, res in results["runs"].items():
        shape, name = key.split("/")
        if "skipped" in res:
            print(f"| {shape} | {name} | skipped: {res['skipped'][:80]} |")
            continue
        cells = " | ".join(f"{v:,.0f}" if isinstance(v := res["decode_tok_s"][b], float) else str(v)[:40]
                           for b in batches)
        by_batch = res.get("prefill_ms_by_batch") or {1: res["prefill_ms"]}
        prefill = ", ".join(f"b{b} {ms:.1f}" if isinstance(ms, float) else f"b{b} {str(ms)[:60]}"
                            for b, ms in by_batch.items())
        print(f"| {shape} | {name} | {cells} | {prefill} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
