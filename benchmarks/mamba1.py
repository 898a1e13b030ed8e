"""Mamba-1: prefill time and decode tokens/s of easymamba beside transformers' torch `MambaForCausalLM`.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 benchmarks/mamba1.py --out mamba1.json   # GPU
    PYTHONPATH=. python3 benchmarks/mamba1.py --tiny                                                  # CPU smoke

The model is random (HF initialisation) in bfloat16 with state-spaces/mamba-130m's shape: d_model 768, 24
layers, d_state 16, expand 2, d_conv 4, vocab 50280, tied embeddings. Both implementations run in one process
on the same device.

* decode: for each batch size, `new` tokens generated greedily after a 16-token prompt with EOS disabled, so
  every row runs every step; tokens/s = batch * new / time of the whole call (prefill of 16 included).
  easymamba: `generate(...)` after a warm-up call with the same shapes (the decode loop is one jitted
  `lax.while_loop`). transformers: `generate(min_new_tokens=new, max_new_tokens=new, do_sample=False)`.
* prefill: one forward over [b, prefill_len] tokens that fills the cache and returns the last position's
  logits (ours: the backbone with a cache under `jax.jit`, then the head on the last position; theirs:
  `model(ids, use_cache=True, logits_to_keep=1)`), median of `repeats` after a warm-up.

transformers runs its pure-torch path (the GPU image has no mamba_ssm / causal_conv1d kernels): a sequential
selective scan. Run with `XLA_PYTHON_CLIENT_PREALLOCATE=false` (also set below if unset), or JAX's default
preallocation (75% of the GPU) leaves torch too little memory. `--tiny` is a seconds-long smoke run of both
code paths (transformers on the CPU when there is no GPU). Prints a table; `--out` writes the JSON.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: leave torch room

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import timed  # noqa: E402  (the median-of-repeats timer of benchmarks/generate.py)

SHAPES = {
    "130M": dict(hidden_size=768, num_hidden_layers=24, state_size=16, vocab_size=50280),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, state_size=16, vocab_size=1024),
}


def config_kwargs(name):
    kw = dict(expand=2, conv_kernel=4, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kw.update(SHAPES[name])
    return kw


def bench_easymamba(name, batches, new, prompt_len, prefill_len, prefill_batches, repeats):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import easymamba as em

    cfg = em.MambaConfig(**config_kwargs(name))
    model = em.MambaForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    decode = {}
    for b in batches:
        ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (b, prompt_len)), jnp.int32)

        def run():
            jax.block_until_ready(em.generate(model, ids, max_new_tokens=new).sequences)

        decode[b] = b * new / timed(run, repeats)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids, cache):
        m = nnx.merge(graphdef, state)
        out = m.backbone(ids, cache=cache)
        emb = m.backbone.embeddings                                         # tied head, last position only
        return emb.attend(out.last_hidden_state[:, -1].astype(emb.weight.dtype)), out.cache

    prefill_ms = {}
    for b in prefill_batches:
        ids = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (b, prefill_len)), jnp.int32)
        cache = model.init_cache(b)
        prefill_ms[b] = timed(lambda: jax.block_until_ready(prefill(state, ids, cache)), repeats) * 1e3
    scan = getattr(em.mamba1._scan_fn("auto"), "__name__", "?")          # which prefill scan "auto" picked here
    return {"decode_tok_s": decode, "prefill_ms": prefill_ms, "selective_scan": scan,
            "kernels": em.kernels.describe(), "device": str(jax.devices()[0].device_kind)}


def bench_transformers(name, batches, new, prompt_len, prefill_len, prefill_batches, repeats, allow_cpu):
    try:
        import torch
        import transformers
    except ImportError as exc:
        return {"skipped": f"transformers/torch not importable: {exc}"}
    if torch.cuda.is_available():
        device = "cuda"
    elif allow_cpu:
        device = "cpu"
    else:
        return {"skipped": "no CUDA device for torch"}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    kw = config_kwargs(name)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**kw)).to(device, torch.bfloat16).eval()
    decode = {}
    for b in batches:
        ids = torch.randint(1, kw["vocab_size"], (b, prompt_len), device=device)

        def run():
            with torch.no_grad():
                model.generate(ids, min_new_tokens=new, max_new_tokens=new, do_sample=False, pad_token_id=0)
            sync()

        decode[b] = b * new / timed(run, max(1, repeats // 2))
    prefill_ms = {}
    for b in prefill_batches:
        ids = torch.randint(1, kw["vocab_size"], (b, prefill_len), device=device)

        def prefill():
            with torch.no_grad():
                model(ids, use_cache=True, logits_to_keep=1)
            sync()

        prefill_ms[b] = timed(prefill, max(1, repeats // 2)) * 1e3
    return {"decode_tok_s": decode, "prefill_ms": prefill_ms, "device": device,
            "version": transformers.__version__, "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="130M", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,16,64", help="decode batch sizes")
    parser.add_argument("--new", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--prefill-batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="easymamba,transformers", help="which to run, in order")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.batches, args.new, args.prefill_len, args.prefill_batches, args.repeats = (
            "tiny", "1,4", 8, 64, "1,2", 1)
    import jax

    batches = [int(b) for b in args.batches.split(",")]
    prefill_batches = [int(b) for b in args.prefill_batches.split(",")]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "shape": args.shape, "config": config_kwargs(args.shape), "dtype": "bfloat16", "new_tokens": args.new,
               "prompt_len": 16, "prefill_len": args.prefill_len, "runs": {}}
    common = (args.shape, batches, args.new, 16, args.prefill_len, prefill_batches, args.repeats)
    runners = {"easymamba": lambda: bench_easymamba(*common),
               "transformers": lambda: bench_transformers(*common, allow_cpu=args.tiny)}
    for name in [p for p in args.impls.split(",") if p]:
        t0 = time.time()
        try:
            res = runners[name]()
        except Exception as exc:  # an implementation that breaks is reported, not fatal
            res = {"skipped": f"{type(exc).__name__}: {exc}"}
        res["wall_s"] = round(time.time() - t0, 1)
        results["runs"][name] = res
        print(f"# {name}: {res}", flush=True)

    print(f"\nMamba-1 {args.shape}, {results['device']}, jax {results['jax']}, {results['date']}; bf16; greedy, "
          f"{args.new} new tokens after 16; prefill of b x {args.prefill_len}")
    header = ("| impl | " + " | ".join(f"decode tok/s b{b}" for b in batches) + " | "
              + " | ".join(f"prefill ms b{b}" for b in prefill_batches) + " |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, res in results["runs"].items():
        if "skipped" in res:
            print(f"| {name} | skipped: {res['skipped'][:100]} |")
            continue
        cells = [f"{res['decode_tok_s'][b]:,.0f}" for b in batches] + [f"{res['prefill_ms'][b]:,.1f}"
                                                                         for b in prefill_batches]
        print(f"| {name} ({res['device']}) | " + " | ".join(cells) + " |")
    ours, theirs = results["runs"].get("easymamba", {}), results["runs"].get("transformers", {})
    if "decode_tok_s" in ours and "decode_tok_s" in theirs:
        ratios = {b: ours["decode_tok_s"][b] / theirs["decode_tok_s"][b] for b in batches}
        ratios_p = {b: theirs["prefill_ms"][b] / ours["prefill_ms"][b] for b in prefill_batches}
        results["speedup"] = {"decode": ratios, "prefill": ratios_p}
        print("| easymamba / transformers | " + " | ".join(f"{r:.1f}x" for r in ratios.values()) + " | "
              + " | ".join(f"{r:.1f}x" for r in ratios_p.values()) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
