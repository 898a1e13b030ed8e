"""The pure-JAX SSD references: chunked form vs the sequential recurrence, decode step, gradients, dispatch.

Ground truth is `ssd_naive` in float64 (x64 fixture). Tolerances: 1e-10 relative for float64 comparisons of two
exact algorithms that only differ in summation order; 1e-8 for gradients (one more reverse pass of rounding).
Errors are max |a - b| / max |b| over the whole array.
"""

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err

from easymamba import kernels
from easymamba.kernels import segsum, selective_state_update_ref, ssd_chunked, ssd_naive
from easymamba.kernels.resolver import IMPLS, resolve_impl


def make_inputs(seed, *, b=2, l=37, h=4, p=3, g=2, n=5, dtype=np.float64):
    """Random normal inputs (never zeros), A = -exp(normal) < 0; optional extras as keyword arrays."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(dtype)  # noqa: E731
    args = dict(
        x=normal(b, l, h, p),
        dt=normal(b, l, h),
        A=-np.exp(normal(h)),
        B=normal(b, l, g, n),
        C=normal(b, l, g, n),
    )
    extras = dict(
        D=normal(h),
        z=normal(b, l, h, p),
        dt_bias=normal(h),
        initial_state=normal(b, h, p, n),
    )
    return args, extras


def seq_idx_for(b, l, lengths):
    """[b, l] int32 seq_idx with segments of the given lengths (the last one takes the rest)."""
    ids = np.concatenate([np.full(m, i) for i, m in enumerate(lengths)] + [np.full(l - sum(lengths), len(lengths))])
    return np.broadcast_to(ids[:l], (b, l)).astype(np.int32)


_STATIC = ("chunk_size", "dt_softplus", "dt_limit")
naive_jit = jax.jit(ssd_naive, static_argnames=_STATIC[1:])
chunked_jit = jax.jit(ssd_chunked, static_argnames=_STATIC)


def run_both(args, kw, chunk_size):
    args = {k: jnp.asarray(v) for k, v in args.items()}
    kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    ref = naive_jit(**args, **kw)
    out = chunked_jit(**args, chunk_size=chunk_size, **kw)
    return ref, out


# --------------------------------------------------------------------------------------------------------------


def test_segsum_matches_definition(x64):
    a = np.random.default_rng(0).normal(size=(3, 6))
    out = np.asarray(segsum(jnp.asarray(a)))
    for i in range(6):
        for j in range(6):
            if j <= i:
                np.testing.assert_allclose(out[:, i, j], a[:, j + 1 : i + 1].sum(-1), rtol=1e-14, atol=1e-14)
            else:
                assert np.all(out[:, i, j] == -np.inf)


CASES = [
    # (id, l, chunk, h, g, extras used, dt options, seq_idx segment lengths)
    ("multiple_g1", 32, 8, 4, 1, ("dt_bias",), dict(dt_softplus=True, dt_limit=(0.01, 0.2)), None),
    ("ragged_all", 37, 8, 4, 2, ("D", "z", "dt_bias", "initial_state"), dict(dt_softplus=True), None),
    ("short", 5, 16, 4, 4, ("initial_state", "D"), dict(dt_softplus=True, dt_limit=(0.01, 0.2)), None),
    ("seq2", 37, 8, 4, 2, ("D", "dt_bias", "initial_state"), dict(dt_softplus=True), (11,)),
    ("seq3_on_edge", 32, 8, 4, 1, ("initial_state", "z"), dict(dt_softplus=True), (8, 13)),
    ("seq3_short", 7, 16, 2, 2, ("initial_state",), dict(dt_softplus=True, dt_limit=(0.01, 0.2)), (2, 3)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunked_matches_naive(x64, case):
    # float64, 1e-10: the two forms are exact rewrites of each other, they differ only in summation order
    name, l, q, h, g, used, dt_kw, lengths = case
    args, extras = make_inputs(zlib.crc32(name.encode()), l=l, h=h, g=g)
    kw = {k: extras[k] for k in used} | dt_kw
    if lengths is not None:
        kw["seq_idx"] = seq_idx_for(2, l, lengths)
    (y_ref, s_ref), (y, s) = run_both(args, kw, q)
    assert y.dtype == jnp.float64 and s.dtype == jnp.float64
    assert y.shape == args["x"].shape and s.shape == (2, h, 3, 5)
    assert rel_err(y, y_ref) <= 1e-10
    assert rel_err(s, s_ref) <= 1e-10


def test_naive_seq_idx_is_segments_run_alone(x64):
    """With seq_idx, the recurrence equals each segment run on its own; initial_state feeds the first only."""
    l, lengths = 18, (6, 6)  # equal lengths share compilations
    args, extras = make_inputs(3, l=l)
    kw = dict(dt_softplus=True, dt_bias=extras["dt_bias"], D=extras["D"])
    y, s = naive_jit(**args, **kw, initial_state=extras["initial_state"], seq_idx=seq_idx_for(2, l, lengths))
    bounds = [0, 6, 12, 18]
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = {key: (v[:, lo:hi] if v.ndim > 1 else v) for key, v in args.items()}
        init = extras["initial_state"] if k == 0 else None
        y_k, s_k = naive_jit(**part, **kw, initial_state=init)
        assert rel_err(y[:, lo:hi], y_k) <= 1e-12
    assert rel_err(s, s_k) <= 1e-12  # the final state is the last segment's


def test_non_monotonic_seq_idx_resets_at_every_change(x64):
    """seq_idx [0.., 1.., 0..] is three segments: the chunked mask must not join the two 0-runs."""
    l = 12
    args, extras = make_inputs(4, l=l)
    seq_idx = np.broadcast_to(np.array([0] * 4 + [1] * 4 + [0] * 4, np.int32), (2, l))
    kw = dict(dt_softplus=True, initial_state=extras["initial_state"], seq_idx=seq_idx)
    (y_ref, s_ref), (y, s) = run_both(args, kw, 8)
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(s, s_ref) <= 1e-10


def test_continuation_with_initial_state(x64):
    # float64, 1e-10: two chunked runs chained through the state vs one run over the whole sequence
    l, t, q = 26, 13, 8  # the split is off the chunk grid; equal halves share one compilation
    args, extras = make_inputs(5, l=l)
    kw = dict(D=extras["D"], dt_bias=extras["dt_bias"], dt_softplus=True)
    full_y, full_s = chunked_jit(**args, **kw, chunk_size=q, initial_state=extras["initial_state"])
    first = {k: (v[:, :t] if v.ndim > 1 else v) for k, v in args.items()}
    second = {k: (v[:, t:] if v.ndim > 1 else v) for k, v in args.items()}
    y1, s1 = chunked_jit(**first, **kw, chunk_size=q, initial_state=extras["initial_state"])
    y2, s2 = chunked_jit(**second, **kw, chunk_size=q, initial_state=s1)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), full_y) <= 1e-10
    assert rel_err(s2, full_s) <= 1e-10


def test_decode_steps_match_naive(x64):
    # float64, 1e-10: the decode step is the recurrence's own step, applied l times
    l = 9
    args, extras = make_inputs(6, l=l)
    kw = dict(D=extras["D"], dt_bias=extras["dt_bias"], dt_softplus=True, dt_limit=(0.01, 0.2))
    y_ref, s_ref = naive_jit(**args, **kw, z=extras["z"], initial_state=extras["initial_state"])
    step = jax.jit(selective_state_update_ref, static_argnames=("dt_softplus", "dt_limit"))
    state, ys = jnp.asarray(extras["initial_state"]), []
    for t in range(l):
        y_t, state = step(
            state, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t], args["C"][:, t],
            z=extras["z"][:, t], **kw,
        )  # fmt: skip
        ys.append(y_t)
    assert state.dtype == jnp.float64
    assert rel_err(jnp.stack(ys, axis=1), y_ref) <= 1e-10
    assert rel_err(state, s_ref) <= 1e-10


def test_float32_chunked_close_to_float64_naive(x64):
    # 1e-5: float32 rounding (~6e-8 per op) accumulates over the l = 64 state updates and the chunk sums
    l = 64
    args, extras = make_inputs(7, l=l)
    kw = dict(dt_bias=extras["dt_bias"], dt_softplus=True)
    y_ref, s_ref = naive_jit(**args, **kw, initial_state=extras["initial_state"])
    args32 = {k: v.astype(np.float32) for k, v in args.items()}
    kw32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    y, s = chunked_jit(**args32, **kw32, chunk_size=16, initial_state=extras["initial_state"].astype(np.float32))
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel_err(s, s_ref) <= 1e-5
    assert rel_err(y, y_ref) <= 1e-5


def test_float32_default_dtype():
    """Without x64 the references compute and return float32; bf16 inputs are upcast."""
    args, extras = make_inputs(8, l=10, dtype=np.float32)
    args = {k: jnp.asarray(v, jnp.bfloat16) for k, v in args.items()}
    y, s = chunked_jit(**args, chunk_size=4, dt_softplus=True)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    y2, s2 = kernels.selective_state_update(
        s.astype(jnp.bfloat16), args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0], args["C"][:, 0]
    )
    assert y2.dtype == jnp.float32 and s2.dtype == jnp.bfloat16


def test_gradients_chunked_match_naive(x64):
    # float64, 1e-8: reverse mode through two exact algorithms, differing only in summation order
    l = 19
    args, extras = make_inputs(9, l=l)
    rng = np.random.default_rng(10)
    w_y, w_s = rng.normal(size=args["x"].shape), rng.normal(size=extras["initial_state"].shape)
    static = dict(dt_softplus=True, dt_bias=jnp.asarray(extras["dt_bias"]), z=jnp.asarray(extras["z"]),
                  seq_idx=jnp.asarray(seq_idx_for(2, l, (7,))))  # fmt: skip
    wrt = dict(args, D=extras["D"], initial_state=extras["initial_state"])
    wrt = {k: jnp.asarray(v) for k, v in wrt.items()}

    def loss(fn, params):
        y, s = fn(**params, **static)
        return jnp.sum(y * w_y) + jnp.sum(s * w_s)

    g_ref = jax.jit(jax.grad(functools.partial(loss, ssd_naive)))(wrt)
    g = jax.jit(jax.grad(functools.partial(loss, functools.partial(ssd_chunked, chunk_size=8))))(wrt)
    for name in ("x", "dt", "A", "B", "C", "D", "initial_state"):
        assert np.all(np.isfinite(g[name])), name
        assert rel_err(g[name], g_ref[name]) <= 1e-8, name


# --------------------------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(dt=np.ones((2, 37, 3))), r"dt has shape \(2, 37, 3\)"),
        (dict(A=np.ones((4, 1))), "A has shape"),
        (dict(B=np.ones((2, 37, 3, 5)), C=np.ones((2, 37, 3, 5))), "h % g must be 0"),
        (dict(C=np.ones((2, 36, 2, 5))), "C has shape"),
        (dict(B=np.ones((3, 37, 2, 5))), "B has shape"),
        (dict(x=np.ones((2, 37, 4))), "x has shape"),
        (dict(D=np.ones((3,))), "D has shape"),
        (dict(z=np.ones((2, 37, 4, 2))), "z has shape"),
        (dict(dt_bias=np.ones((2,))), "dt_bias has shape"),
        (dict(initial_state=np.ones((2, 4, 3, 6))), "initial_state has shape"),
        (dict(seq_idx=np.ones((2, 30), np.int32)), "seq_idx has shape"),
        (dict(seq_idx=np.ones((2, 37), np.float32)), "seq_idx must be an integer"),
        (dict(dt_limit=(0.2, 0.1)), "dt_limit"),
    ],
)
def test_ssd_shape_errors(change, match):
    args, _ = make_inputs(11, dtype=np.float32)
    merged = args | change
    positional = [merged.pop(k) for k in ("x", "dt", "A", "B", "C")]
    for fn in (ssd_naive, functools.partial(ssd_chunked, chunk_size=8)):
        with pytest.raises(ValueError, match=match):
            fn(*positional, **merged)


def test_chunk_size_and_decode_errors():
    args, extras = make_inputs(12, dtype=np.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(**args, chunk_size=0)
    state = extras["initial_state"]
    x, dt, B, C = args["x"][:, 0], args["dt"][:, 0], args["B"][:, 0], args["C"][:, 0]
    with pytest.raises(ValueError, match="x has shape"):
        selective_state_update_ref(state, x[:, :2], dt, args["A"], B, C)
    with pytest.raises(ValueError, match="C has shape"):
        selective_state_update_ref(state, x, dt, args["A"], B, C[:, :, :3])
    with pytest.raises(ValueError, match="h % g must be 0"):
        selective_state_update_ref(state, x, dt, args["A"], B[:, :1].repeat(3, 1), C[:, :1].repeat(3, 1))


def test_resolve_impl_and_describe():
    for op in ("ssd", "causal_conv1d"):
        assert resolve_impl("auto", op) == "xla"
        assert resolve_impl("xla", op) == "xla"
        assert resolve_impl("reference", op) == "reference"
        assert resolve_impl("pallas", op) == "pallas"  # on CPU the Pallas kernels run interpreted
    with pytest.raises(ValueError, match="'triton'") as info:
        resolve_impl("triton", "ssd")
    assert all(impl in str(info.value) for impl in IMPLS)
    with pytest.raises(ValueError, match="'conv2d'"):
        resolve_impl("auto", "conv2d")
    table = kernels.describe()
    assert set(table) == {"ssd", "causal_conv1d", "causal_conv1d_update", "selective_state_update"}
    assert all(entry.startswith("xla") for entry in table.values())


def test_public_ssd_wrapper_impls():
    # the wrapper only routes: "auto" and "xla" share one jitted ssd_chunked, "reference" is ssd_chunked itself
    # (called under the caller's jit here, as models do; eager op-by-op would cost seconds). float32: 1e-6.
    args, extras = make_inputs(13, l=6, h=2, g=1, dtype=np.float32)
    kw = dict(dt_bias=extras["dt_bias"], dt_softplus=True, dt_limit=[0.0, math.inf])
    y_ref, s_ref = kernels.ssd(*args.values(), chunk_size=4, impl="auto", **kw)
    y, s = kernels.ssd(*args.values(), chunk_size=4, impl="xla", **kw)
    assert rel_err(y, y_ref) == 0 and rel_err(s, s_ref) == 0
    y, s = jax.jit(lambda *a: kernels.ssd(*a, chunk_size=4, impl="reference", **kw))(*args.values())
    assert rel_err(y, y_ref) <= 1e-6 and rel_err(s, s_ref) <= 1e-6
    y, s = kernels.ssd(*args.values(), chunk_size=4, impl="pallas", **kw)  # interpret mode on CPU
    assert rel_err(y, y_ref) <= 2e-5 and rel_err(s, s_ref) <= 2e-5  # float32 kernel tolerance (kernels tests)
    with pytest.raises(ValueError, match="'fast'"):
        kernels.ssd(*args.values(), chunk_size=4, impl="fast")
