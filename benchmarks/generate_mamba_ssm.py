"""The peer of `benchmarks/generate.py`: mamba_ssm's `MambaLMHeadModel.generate` with CUDA graphs (`cg=True`),
decode tokens/s and prefill time at the same shapes, in a process that never imports JAX (with both in one
process, mamba_ssm's CUDA-graph capture fails).

    python3 benchmarks/peers/setup_gpu_peers.sh                     # once per GPU machine: builds causal-conv1d
    PYTHONPATH=third_party_peers/site:/tmp/peers python3 benchmarks/generate_mamba_ssm.py --out peer.json

Models are random (mamba_ssm's own initialisation) in bfloat16 with the shapes of `generate.py`'s `SHAPES`
(Mamba-2 layers: state 128, head dim 64, one group, conv 4, expand 2, chunk 256; tied head; vocabulary 50288),
built as `MambaLMHeadModel(MambaConfig(ssm_cfg={"layer": "Mamba2", ...}))` with mamba_ssm's fused add + norm
and residuals in float32, its defaults. For each batch size, `new` tokens are generated greedily (`top_k=1`)
after a 16-token prompt with no EOS, so every row runs every step; tokens/s = batch * new / median time of a
whole `generate` call after a warm-up call with the same shapes (which captures the CUDA graph). Prefill: one
forward over [b, prefill_len] tokens into fresh `InferenceParams` (filling the states), median ms.

Where the sources come from: mamba_ssm's Python sources (state-spaces/mamba, `mamba_ssm/` with an empty
`__init__.py` so the optional selective-scan extension is never imported) in the git-ignored
`third_party_peers/site`, and causal-conv1d built on the GPU machine from its source (docs/benchmarks.md,
"Peers"). Without causal-conv1d, mamba_ssm's step falls back to a slower torch conv: the script says which.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate import SHAPES  # noqa: E402  (generate.py imports JAX only inside its functions)

assert "jax" not in sys.modules, "this peer must run in a process without JAX"


def build(name, torch):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    shape = SHAPES[name]
    head_dim = shape.get("head_dim", 64)
    expand = 2
    assert shape["num_heads"] * head_dim == expand * shape["hidden_size"], (name, shape)
    ssm = dict(layer="Mamba2", d_state=shape.get("state_size", 128), headdim=head_dim, ngroups=1, d_conv=4,
               expand=expand, chunk_size=256)
    config = MambaConfig(d_model=shape["hidden_size"], d_intermediate=0, n_layer=shape["num_hidden_layers"],
                         vocab_size=50288, ssm_cfg=ssm, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                         pad_vocab_size_multiple=8, tie_embeddings=True)
    torch.manual_seed(0)
    return MambaLMHeadModel(config, device="cuda", dtype=torch.bfloat16).eval()


def median_ms(fn, torch, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="130M,1.3B")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--prefill-batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from mamba_ssm.utils.generation import InferenceParams

    try:
        import causal_conv1d  # noqa: F401
        conv = "causal_conv1d (CUDA)"
    except ImportError:
        conv = "torch fallback (causal_conv1d not importable)"
    import mamba_ssm.modules.mamba2 as m2
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "conv": conv, "causal_conv1d_update_in_mamba_ssm": m2.causal_conv1d_update is not None,
            "new": args.new, "prompt_len": args.prompt_len, "prefill_len": args.prefill_len}
    print(json.dumps(info), flush=True)
    rows = {}
    for name in args.shapes.split(","):
        model = build(name, torch)
        row = {"decode_tok_s": {}, "prefill_ms": {}}
        for b in (int(v) for v in args.batches.split(",")):
            ids = torch.randint(3, 50288, (b, args.prompt_len), device="cuda")
            max_length = args.prompt_len + args.new
            try:
                with torch.inference_mode():
                    ms = median_ms(lambda: model.generate(ids, max_length=max_length, top_k=1, cg=True,
                                                          eos_token_id=None), torch, args.repeats)
                row["decode_tok_s"][b] = b * args.new / (ms / 1e3)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded, the other batches still run
                row["decode_tok_s"][b] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                torch.cuda.empty_cache()
            print(f"# {name} b{b}: {row['decode_tok_s'][b]} tok/s", flush=True)
        for b in (int(v) for v in args.prefill_batches.split(",")):
            ids = torch.randint(3, 50288, (b, args.prefill_len), device="cuda")

            def prefill():
                params = InferenceParams(max_seqlen=args.prefill_len + 1, max_batch_size=b)
                return model(ids, inference_params=params, num_last_tokens=1).logits

            with torch.inference_mode():
                row["prefill_ms"][b] = median_ms(prefill, torch, max(args.repeats, 5))
            print(f"# {name} prefill [{b}, {args.prefill_len}]: {row['prefill_ms'][b]:.2f} ms", flush=True)
        rows[name] = row
        model = None  # free the GPU memory before the next shape
        torch.cuda.empty_cache()
    batches = [int(v) for v in args.batches.split(",")]
    print("| shape | impl | " + " | ".join(f"decode tok/s b{b}" for b in batches) + " | prefill ms |")
    print("|---|---|" + "---|" * len(batches) + "---|")
    for name, row in rows.items():
        cells = [f"{v:,.0f}" if isinstance(v := row["decode_tok_s"][b], float) else str(v)[:40] for b in batches]
        prefill = ", ".join(f"b{b} {ms:.1f}" for b, ms in row["prefill_ms"].items())
        print(f"| {name} | mamba_ssm (cg) | " + " | ".join(cells) + f" | {prefill} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
