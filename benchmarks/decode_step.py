"""The fused Mamba-2 decode-step kernel vs its XLA reference: one layer, a whole decode loop, and what launches.

    JAX_PLATFORMS= PYTHONPATH=. python3 benchmarks/decode_step.py --profile --out results.json   # on a GPU
    PYTHONPATH=. python3 benchmarks/decode_step.py --tiny                                       # CPU smoke run

Forms of "the layer between the two matmuls" (easymamba/kernels/decode_step/triton.py), all fed the packed
in_proj output [z | xBC | dt] and A_log: `xla` = the jitted `decode_step_ref` (what the mixer's decode path
computes), `pallas` = the kernel with its default programs (the norm's last step is a small XLA fusion),
`pallas_p64` / `_p32` / `_p16` = 64 / 32 / 16 channels of a head per program (1, 2, 4 programs a head), and
in the loop `pallas_sliced` = the kernel fed z, xBC, dt as separate slices and A = -exp(A_log) computed outside (what a
caller that splits the in_proj output first would pay), `pallas_gemm2` = the kernel with in_proj / out_proj
run on the rows padded to >= 2 (at b = 1 XLA rewrites a [1, d] x [d, f] dot into multiply + reduce fusions,
which run at a third of the memory bandwidth; two rows keep it a matrix product).

* layer: one 130M layer's decode step (h 24, p 64, n 128, g 1, k 4; bf16 activations, float32 state) in a
  jitted `fori_loop` of `--iters` steps (y carried and returned, the states carried and donated); time per
  step. Floor = the states read and written once over the measured copy bandwidth.
* loop: a standalone greedy decoder shaped like the 130M model (d 768, 24 layers, vocab 50288, tied head, bf16,
  float32 residual): per step embed -> 24 x (rmsnorm -> in_proj -> decode step -> out_proj -> residual) ->
  rmsnorm -> lm_head -> argmax, `--steps` steps in one jitted `fori_loop`; tokens/s = batch * steps / time.
* --profile: kernels launched per decode step (a `jax.profiler` trace, GPU stream events / steps) for the
  standalone loop in each form and for easymamba's own model (`Mamba2ForCausalLM`, one jitted cached step),
  with the fusions and custom calls of its optimized HLO (`--dump-hlo`: the HLO texts go to $OUT).
"""

import argparse
import collections
import functools
import glob
import json
import math
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from easymamba.kernels.decode_step.reference import decode_step_ref
from easymamba.kernels.decode_step.triton import decode_step_pallas

SHAPE_130M = dict(d=768, layers=24, h=24, p=64, n=128, g=1, k=4, v=50288)
SHAPE_TINY = dict(d=64, layers=2, h=4, p=16, n=16, g=1, k=4, v=512)
EPS = 1e-5

FORMS = {
    "xla": decode_step_ref,
    "pallas": decode_step_pallas,  # block_p by its default rule
    "pallas_p64": functools.partial(decode_step_pallas, block_p=64),
    "pallas_p32": functools.partial(decode_step_pallas, block_p=32),
    "pallas_p16": functools.partial(decode_step_pallas, block_p=16),
    "pallas_sliced": decode_step_pallas,  # fed slices and A, see make_decoder
    "pallas_gemm2": decode_step_pallas,  # in_proj / out_proj on >= 2 rows, see make_decoder
}


def timed(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def guarded(fn, failed, *args):
    """fn(*args), or `failed` after printing why (one form failing to compile must not lose the others' numbers)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported, and the table shows nan
        print(f"{fn.__name__}{args[1:4]} failed: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
        return failed


def copy_bandwidth():
    """Bytes read + written per second by a large jitted elementwise pass (the memory ceiling)."""
    x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB
    f = jax.jit(lambda a: a + 1)
    t, _, _ = timed(lambda: f(x), 10)
    return 2 * x.nbytes / t


# --------------------------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------------------------


def layer_operands(rng, s, b, dtype=jnp.bfloat16):
    h, p, n, g, k = s["h"], s["p"], s["n"], s["g"], s["k"]
    e, c = h * p, h * p + 2 * g * n
    f = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)  # noqa: E731
    params = dict(conv_weight=f(c, k, scale=0.5), conv_bias=f(c, scale=0.1),
                  A_log=jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)), D=f(h) + 1,
                  dt_bias=f(h, scale=0.5) - 2, norm_weight=f(e, scale=0.1) + 1)
    tokens = dict(zxbcdt=f(b, e + c + h))
    states = dict(conv_state=f(b, c, k), ssm_state=jnp.asarray(rng.normal(size=(b, h, p, n)), jnp.float32))
    return params, tokens, states


def bench_layer(s, b, form, iters, repeats):
    step = functools.partial(FORMS[form], n_groups=s["g"], eps=EPS, A_is_log=True)
    params, tokens, states = layer_operands(np.random.default_rng(b), s, b)
    e = s["h"] * s["p"]

    @functools.partial(jax.jit, donate_argnums=(2,))
    def run(params, tokens, states):
        def body(_, carry):
            _, st = carry
            y, conv, ssm = step(tokens["zxbcdt"], st["conv_state"], params["conv_weight"], params["conv_bias"],
                                params["A_log"], params["D"], params["dt_bias"], st["ssm_state"],
                                params["norm_weight"])
            return y, dict(conv_state=conv, ssm_state=ssm)  # y carried and returned: the norm is not dead code

        y0 = jnp.zeros((tokens["zxbcdt"].shape[0], e), tokens["zxbcdt"].dtype)
        return jax.lax.fori_loop(0, iters, body, (y0, states))

    box = [states]

    def call():
        y, box[0] = run(params, tokens, box[0])
        return y

    med, lo, hi = timed(call, repeats)
    return (med / iters, lo / iters, hi / iters), call


# --------------------------------------------------------------------------------------------------------------
# A standalone greedy decoder
# --------------------------------------------------------------------------------------------------------------


def model_params(s, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    d, h, p, n, g, k, v = s["d"], s["h"], s["p"], s["n"], s["g"], s["k"], s["v"]
    e, c = h * p, h * p + 2 * g * n
    f = lambda *shape, scale=1.0, shift=0.0: jnp.asarray(rng.normal(size=shape) * scale + shift, dtype)  # noqa
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), size=h))
    layers = [dict(norm=f(d, scale=0.1, shift=1.0), w_in=f(d, 2 * e + 2 * g * n + h, scale=0.02),
                   conv_weight=f(c, k, scale=0.5), conv_bias=f(c, scale=0.1),
                   dt_bias=jnp.asarray(dt + np.log(-np.expm1(-dt)), dtype),
                   A_log=jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)), D=f(h, scale=0.1, shift=1.0),
                   norm_weight=f(e, scale=0.1, shift=1.0), w_out=f(e, d, scale=0.02 / math.sqrt(s["layers"])))
              for _ in range(s["layers"])]
    return dict(embedding=f(v, d, scale=0.02), final_norm=f(d, scale=0.1, shift=1.0), layers=layers)


def model_states(s, b, dtype=jnp.bfloat16):
    h, p, n, g, k = s["h"], s["p"], s["n"], s["g"], s["k"]
    c = h * p + 2 * g * n
    return ([jnp.zeros((b, c, k), dtype) for _ in range(s["layers"])],
            [jnp.zeros((b, h, p, n), jnp.float32) for _ in range(s["layers"])])


def rms_norm(x, weight):
    x32 = x.astype(jnp.float32)
    return weight * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS)).astype(x.dtype)


def make_decoder(s, form):
    e, g, n = s["h"] * s["p"], s["g"], s["n"]
    sliced = form == "pallas_sliced"
    step = functools.partial(FORMS[form], n_groups=g, eps=EPS, A_is_log=not sliced)

    def matmul(a, w):
        if form != "pallas_gemm2" or a.shape[0] > 1:
            return a @ w
        return (jnp.concatenate([a, a]) @ w)[:1]

    def layer(prm, residual, conv, ssm):
        hidden = rms_norm(residual.astype(prm["norm"].dtype), prm["norm"])  # [b, d]
        zxbcdt, A = matmul(hidden, prm["w_in"]), prm["A_log"]  # [b, 2e + 2gn + h], [h]
        if sliced:  # z [b, e], xBC [b, c], dt [b, h] as separate arrays, and A formed outside the kernel
            zxbcdt = tuple(jnp.split(zxbcdt, [e, 2 * e + 2 * g * n], axis=-1))
            A = -jnp.exp(A.astype(jnp.float32))
        y, conv, ssm = step(zxbcdt, conv, prm["conv_weight"], prm["conv_bias"], A, prm["D"], prm["dt_bias"], ssm,
                            prm["norm_weight"])
        return residual + matmul(y, prm["w_out"]).astype(jnp.float32), conv, ssm

    @functools.partial(jax.jit, donate_argnums=(2, 3))
    def decode(params, tokens, convs, ssms, n_steps):
        def body(i, carry):
            tokens, convs, ssms, checksum = carry
            residual = params["embedding"][tokens].astype(jnp.float32)  # [b, d]
            new_convs, new_ssms = [], []
            for prm, conv, ssm in zip(params["layers"], convs, ssms):
                residual, conv, ssm = layer(prm, residual, conv, ssm)
                new_convs.append(conv)
                new_ssms.append(ssm)
            hidden = rms_norm(residual.astype(params["final_norm"].dtype), params["final_norm"])
            logits = jnp.dot(hidden, params["embedding"].T, preferred_element_type=jnp.float32)  # [b, v]
            tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return tokens, new_convs, new_ssms, checksum + tokens

        return jax.lax.fori_loop(0, n_steps, body, (tokens, convs, ssms, jnp.zeros_like(tokens)))

    return decode


def bench_loop(s, b, form, steps, repeats, params, hlo_path=None):
    decode = make_decoder(s, form)
    convs, ssms = model_states(s, b)
    tokens = jnp.asarray(np.random.default_rng(b).integers(1, s["v"], size=b), jnp.int32)
    box = [(convs, ssms)]

    def call(n_steps=steps):
        out_tokens, convs, ssms, checksum = decode(params, tokens, *box[0], n_steps)
        box[0] = (convs, ssms)
        return checksum

    med, lo, hi = timed(call, repeats)
    if hlo_path:
        with open(hlo_path, "w") as fh:
            fh.write(decode.lower(params, tokens, *box[0], steps).compile().as_text())
    return b * steps / med, call


# --------------------------------------------------------------------------------------------------------------
# Profile: what launches per step
# --------------------------------------------------------------------------------------------------------------


def trace_kernels(fn, calls):
    """GPU kernels (and copies) launched over `calls` calls of fn, from a jax.profiler trace: the stream line with
    the most events. Returns (count, {name: [count, total us]}, {line name: events})."""
    from jax.profiler import ProfileData

    jax.block_until_ready(fn())
    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder):
        for _ in range(calls):
            jax.block_until_ready(fn())
    path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
    lines, best = {}, None
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            events = [(ev.name, ev.duration_ns) for ev in line.events]
            lines[f"{plane.name} | {line.name}"] = len(events)
            if line.name.startswith("Stream") and (best is None or len(events) > len(best)):
                best = events
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, ns in best or []:
        by_name[name][0] += 1
        by_name[name][1] += ns / 1e3
    return len(best or []), dict(by_name), lines


def hlo_launches(text):
    """Fusions, custom calls and copies at the top of an optimized HLO module (not inside fused computations)."""
    fused = set(re.findall(r"calls=%?([\w.\-]+)", text))
    counts, comp = collections.Counter(), None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            comp = head.group(2)
            continue
        if comp in fused:
            continue
        op = re.match(r"^\s+(?:ROOT )?%?[\w.\-]+ = .*? ([a-z\-]+)\(", line)
        if op and op.group(1) in ("fusion", "custom-call", "copy", "copy-start", "dynamic-update-slice", "gather",
                                  "scatter", "reduce", "convert", "transpose", "dot", "while", "conditional"):
            kind = op.group(1)
            if kind == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line)
                kind += f" {target.group(1) if target else '?'}"
            if kind == "fusion":
                fkind = re.search(r"kind=(\w+)", line)
                kind += f" {fkind.group(1) if fkind else '?'}"
            counts[kind] += 1
    return dict(counts)


def profile_model(s, out_dir):
    """easymamba's own Mamba2ForCausalLM, one jitted cached decode step at b = 1 (the tree as it is)."""
    from flax import nnx

    import easymamba as em

    cfg = em.Mamba2Config(vocab_size=s["v"], hidden_size=s["d"], num_hidden_layers=s["layers"], num_heads=s["h"],
                          head_dim=s["p"], state_size=s["n"], n_groups=s["g"], expand=s["h"] * s["p"] // s["d"],
                          conv_kernel=s["k"], chunk_size=256, tie_word_embeddings=True, pad_token_id=0,
                          bos_token_id=0, eos_token_id=0)
    model = em.Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(2,))
    def step(state, tokens, cache):
        out = nnx.merge(graphdef, state)(tokens[:, None], cache=cache)
        return jnp.argmax(out.logits[:, 0], -1).astype(jnp.int32), out.cache

    tokens = jnp.ones((1,), jnp.int32)
    box = [model.init_cache(1)]
    text = step.lower(state, tokens, box[0]).compile().as_text()
    if out_dir:
        with open(os.path.join(out_dir, "model_step_hlo.txt"), "w") as fh:
            fh.write(text)

    def call():
        t, box[0] = step(state, tokens, box[0])
        return t

    calls = 20
    count, by_name, lines = trace_kernels(call, calls)
    return dict(kernels_per_step=count / calls, hlo=hlo_launches(text), by_name=by_name, lines=lines, steps=calls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run; kernels interpreted)")
    ap.add_argument("--batches", default="1,16,64", help="layer benchmark batch sizes")
    ap.add_argument("--loop-batches", default="1,64", help="decode loop batch sizes")
    ap.add_argument("--forms", default="xla,pallas,pallas_p64,pallas_p32,pallas_p16", help="layer benchmark forms")
    ap.add_argument("--loop-forms", default="xla,pallas,pallas_sliced,pallas_p64")
    ap.add_argument("--iters", type=int, default=500, help="layer steps per timed call")
    ap.add_argument("--steps", type=int, default=256, help="decode loop steps per timed call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--model-profile", action=argparse.BooleanOptionalAction, default=True,
                    help="with --profile, also trace easymamba's own model")
    ap.add_argument("--dump-hlo", action="store_true", help="write optimized HLO of the b = 1 loops to $OUT")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    s = SHAPE_TINY if args.tiny else SHAPE_130M
    if args.tiny:
        args.iters, args.steps, args.repeats = min(args.iters, 4), min(args.steps, 4), min(args.repeats, 1)
    forms = args.forms.split(",")  # the layer table's; the loop's below
    out_dir = os.environ.get("OUT")
    results = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, shape=s, layer={}, loop={},
                   profile={})
    bw = copy_bandwidth() if not args.tiny else float("nan")
    results["copy_bytes_per_s"] = bw
    print(f"device {results['device']}, jax {jax.__version__}, copy {bw / 1e12:.2f} TB/s, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    results["xla_flags"] = os.environ.get("XLA_FLAGS", "")

    layer_calls = {}
    print("\n| layer decode step | b | floor us | " + " | ".join(f"{f} us" for f in forms) + " | xla / best |")
    print("|---|---|---|" + "---|" * len(forms) + "---|")
    for b in map(int, filter(None, args.batches.split(","))):
        e, c = s["h"] * s["p"], s["h"] * s["p"] + 2 * s["g"] * s["n"]
        state_bytes = 2 * (b * s["h"] * s["p"] * s["n"] * 4 + b * c * s["k"] * 2) + b * (2 * e + c) * 2
        row = {}
        for f in forms:
            row[f], layer_calls[(b, f)] = guarded(bench_layer, ((math.nan,) * 3, None), s, b, f, args.iters,
                                                  args.repeats)
        results["layer"][b] = dict(floor_us=state_bytes / bw * 1e6, **{f: [t * 1e6 for t in v] for f, v in row.items()})
        best = min((row[f][0] for f in forms if f != "xla"), default=row[forms[0]][0])
        print(f"| 130M layer | {b} | {state_bytes / bw * 1e6:.2f} | "
              + " | ".join(f"{row[f][0] * 1e6:.2f}" for f in forms)
              + f" | {row.get('xla', (float('nan'),))[0] / best:.2f} |", flush=True)

    params = model_params(s)
    forms_layer, forms = forms, args.loop_forms.split(",")
    print("\n| decode loop (24 layers, greedy) | b | " + " | ".join(f"{f} tok/s" for f in forms) + " | best / xla |")
    print("|---|---|" + "---|" * len(forms) + "---|")
    calls = {}
    for b in map(int, filter(None, args.loop_batches.split(","))):
        row = {}
        for f in forms:
            hlo = os.path.join(out_dir, f"loop_{f}_b{b}_hlo.txt") if out_dir and args.dump_hlo and b == 1 and \
                f in ("xla", "pallas") else None
            row[f], calls[(b, f)] = guarded(bench_loop, (math.nan, None), s, b, f, args.steps, args.repeats, params,
                                            hlo)
        results["loop"][b] = row
        best = max((row[f] for f in forms if f != "xla"), default=row[forms[0]])
        print(f"| 130M-shaped | {b} | " + " | ".join(f"{row[f]:,.0f}" for f in forms)
              + f" | {best / row.get('xla', float('nan')):.2f} |", flush=True)

    if args.profile:
        n_steps = 16
        for f in forms:
            if calls.get((1, f)) is None:
                continue
            count, by_name, lines = trace_kernels(functools.partial(calls[(1, f)], n_steps), 1)
            results["profile"][f"loop_{f}"] = dict(kernels_per_step=count / n_steps, by_name=by_name, lines=lines,
                                                   steps=n_steps)
        for f in forms_layer:
            if layer_calls.get((1, f)) is not None:
                count, by_name, lines = trace_kernels(layer_calls[(1, f)], 1)
                results["profile"][f"layer_{f}"] = dict(kernels_per_step=count / args.iters, by_name=by_name,
                                                        lines=lines, steps=args.iters)
        try:
            if args.model_profile:
                results["profile"]["model"] = profile_model(s, out_dir if args.dump_hlo else None)
        except Exception as exc:  # noqa: BLE001 - the model is being restructured in the same tree; report it
            print(f"model profile skipped: {type(exc).__name__}: {exc}")
        print("\n| what (b = 1) | kernels per step | kernel-busy us per step | per layer: kernels | per layer: us |")
        print("|---|---|---|---|---|")
        for key, prof in results["profile"].items():
            busy = sum(us for _, us in prof["by_name"].values()) / prof["steps"]
            per_layer = 1 if key.startswith("layer_") else s["layers"]
            print(f"| {key} | {prof['kernels_per_step']:.1f} | {busy:.1f} | "
                  f"{prof['kernels_per_step'] / per_layer:.2f} | {busy / per_layer:.1f} |")
        for key, prof in results["profile"].items():
            print(f"{key}: kernels with >= 1 launch per layer and step (name: per step, us each)")
            for name, (cnt, us) in sorted(prof["by_name"].items(), key=lambda kv: -kv[1][1]):
                if cnt / prof["steps"] >= (0.9 if key.startswith("layer_") else s["layers"] - 2) or \
                        us / prof["steps"] > 10:
                    print(f"  {name[:70]}: {cnt / prof['steps']:.0f}, {us / cnt:.2f}")
        if "model" in results["profile"]:
            print("model step HLO launches:", json.dumps(results["profile"]["model"]["hlo"]))

    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
