"""Per-call overhead of a model's forward: `nnx.jit` against `model.compile()` (`CompiledLM`), over the device time.

A many-layer, narrow Mamba-2 makes the Python cost of a call visible: `nnx.jit` walks the model's graph on every
call (split, graph hash, merge), `CompiledLM` hands a plain `jax.jit` the arrays it split once. Timed per call
(dispatch to `block_until_ready` of the logits), median of `--calls` calls after a warm-up:

    device           the forward run `--repeat` times inside one jitted `lax.fori_loop`, divided: no dispatch
    jax.jit(leaves)  plain `jax.jit` over the pre-split state's flat list of arrays: the floor of a call from
                     Python (dispatch of the arrays in C++, the executable's launch)
    jax.jit(State)   plain `jax.jit` over a pre-split `nnx.State` (tests/helpers.py `jitted`): jit flattens the
                     State's Variables in Python on every call
    compiled         `model.compile()(ids)`
    nnx.jit          `nnx.jit(lambda m, x: m(x).logits)(model, ids)`, as flax documents it

overhead = time per call - the floor (jax.jit(leaves)); the device loop's time is printed beside it. The fast
entries are timed round-robin (one call of each in turn), so a busy shared host slows them alike.

    python benchmarks/call_overhead.py [--layers 64] [--hidden 64] [--seq 8] [--calls 200] [--out results.json]
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import flax
import numpy as np
from flax import nnx

import easymamba as em


def call_ms(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return (time.perf_counter() - t0) * 1e3


def round_robin_ms(fns: dict, calls: int) -> dict:
    """Median milliseconds per call of each function, called one after another `calls` times after a warm-up."""
    for fn in fns.values():
        call_ms(fn)  # compile
    times = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            times[name].append(call_ms(fn))
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per entry (nnx.jit: a tenth)")
    parser.add_argument("--repeat", type=int, default=50, help="forwards inside the device-time loop")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    config = em.Mamba2Config(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_heads=args.hidden * 2 // 16, head_dim=16, state_size=16, n_groups=1, expand=2,
                             conv_kernel=4, chunk_size=8)
    model = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    graphdef, state = nnx.split(model)

    leaves, treedef = jax.tree.leaves(state), jax.tree.structure(state)

    @jax.jit
    def plain_state(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    @jax.jit
    def plain_leaves(leaves, ids):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(ids).logits

    @jax.jit
    def device_loop(leaves, ids):
        def body(i, acc):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return acc + model((ids + i) % config.vocab_size).logits[:, -1].sum()
        return jax.lax.fori_loop(0, args.repeat, body, jnp.float32(0))

    fast = model.compile()
    via_nnx_jit = nnx.jit(lambda m, x: m(x).logits)
    slow_calls = max(args.calls // 20, 5)
    device = round_robin_ms({"loop": lambda: device_loop(leaves, ids)}, slow_calls)["loop"] / args.repeat
    rows = round_robin_ms({"jax.jit(leaves)": lambda: plain_leaves(leaves, ids),
                           "compiled": lambda: fast(ids).logits,
                           "jax.jit(State)": lambda: plain_state(state, ids)}, args.calls)
    rows["nnx.jit"] = round_robin_ms({"nnx.jit": lambda: via_nnx_jit(model, ids)}, slow_calls)["nnx.jit"]
    floor = rows["jax.jit(leaves)"]
    n_arrays = len(jax.tree.leaves(state))
    print(f"Mamba-2, {args.layers} layers, hidden {args.hidden}, ids [{args.batch}, {args.seq}], {n_arrays} arrays; "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}, flax {flax.__version__}, "
          f"median of {args.calls} calls")
    print(f"| entry | ms per call | overhead over jax.jit(leaves) (ms) |\n|---|---|---|\n"
          f"| device (fori_loop, per forward) | {device:.3f} | |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.3f} | {ms - floor:+.3f} |")
    if args.out:
        result = {"layers": args.layers, "hidden": args.hidden, "batch": args.batch, "seq": args.seq,
                  "arrays": n_arrays, "calls": args.calls, "device_loop_ms": device, "per_call_ms": rows,
                  "overhead_ms": {k: v - floor for k, v in rows.items()},
                  "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "flax": flax.__version__, "python": platform.python_version()}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
