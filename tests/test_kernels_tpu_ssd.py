"""The TPU SSD kernel (`ssd_pallas_tpu`) on a CPU machine: two checks, both needed.

1. Execution: the kernel body runs in Pallas' TPU interpret mode (`interpret=True`) against `ssd_naive`, the
   sequential recurrence, evaluated in float64 on the same (already rounded) inputs. Shapes are tiny and odd
   on purpose: l not a multiple of the kernel chunk q (the interpreter fills the rows past l with NaN, so a
   missing mask shows up as NaN) and l a multiple of it, g > 1, head blocks that span two groups and head
   blocks inside one group, several chunks, and the default q = 128 once.
2. Lowering: `jax.export(..., platforms=("tpu",))` of the compiled kernel (`interpret=False`) at two realistic
   shapes. This runs the Pallas -> Mosaic lowering here (TPU block rules, primitives that do not lower) and
   executes nothing; the Mosaic compiler passes inside libtpu need a TPU.

Budget: each interpreted case costs ~2-3 s on 2 CPU cores (compiling the interpreter's program dominates), so
the cases are few and each covers several features; tests/test_dispatch_tpu.py runs the kernel once more
through `easymamba.kernels.ssd`.

Errors are max |a - b| / max |b|. Tolerances:
* float32 inputs: 2e-5. float32 math with float32-accurate matmuls (Precision.HIGHEST; the in-kernel cumsum
  is accurate to float32 rounding); ~1e-7 per op over sums of <= 128 terms; measured <= 1.2e-6.
* bfloat16 inputs: 2e-2. Like mamba_ssm, the kernel rounds its matmul operands to bf16 (the decay-weighted
  C Bᵀ tile, the carried state before C stateᵀ, the weighted x before the state update): 2^-8 relative per
  operand, accumulated over a chunk; measured 1.7e-3 to 3.5e-3.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from helpers import rel_err

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.ssd_scan.mosaic_tpu import SSDTPUConfig, head_block, ssd_pallas_tpu, ssd_tpu_supported
from easymamba.kernels.ssd_scan.reference import ssd_chunked, ssd_naive

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def reference64(fn, *args, **kwargs):
    """fn on float64 copies of the (already rounded) float inputs; integer inputs (seq_idx) pass unchanged."""
    def up(a):
        return np.asarray(a, np.float64) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a

    with jax.enable_x64(True):
        out = fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return jax.tree.map(np.asarray, out)


def make_inputs(seed, *, b, l, h, p, g, n, dtype):
    rng = np.random.default_rng(seed)
    f = lambda shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    args = dict(x=f((b, l, h, p)), dt=f((b, l, h)), A=-jnp.exp(jnp.asarray(rng.normal(size=(h,)), jnp.float32)),
                B=f((b, l, g, n)), C=f((b, l, g, n)))
    extras = dict(D=f((h,)), z=f((b, l, h, p)), dt_bias=f((h,)),
                  initial_state=jnp.asarray(rng.normal(size=(b, h, p, n)), jnp.float32))
    return args, extras


def segments(b, l, cuts):
    """seq_idx with a segment boundary at each cut; rows differ and ids need not start at 0."""
    ids = np.zeros((b, l), np.int32)
    for i, cut in enumerate(cuts):
        ids[:, cut:] = i + 1
    ids[1:] += 3
    ids[1:, cuts[0] // 2:] += 1  # row 1 gets one more boundary, early in the first chunk
    return jnp.asarray(ids)


VARIANTS = {
    # D skip, z gate, dt bias + softplus + a dt_limit that clips at both ends, initial state
    "full": lambda e, b, l: dict(D=e["D"], z=e["z"], dt_bias=e["dt_bias"], dt_softplus=True, dt_limit=(0.05, 0.8),
                                 initial_state=e["initial_state"]),
    # three segments: boundaries at l // 3 and 33 (q = 32: inside a chunk, and at or just after a chunk
    # start), and in row 1 a fourth segment early in the first chunk
    "seq_idx": lambda e, b, l: dict(dt_bias=e["dt_bias"], dt_softplus=True, initial_state=e["initial_state"],
                                    z=e["z"], seq_idx=segments(b, l, [l // 3, 33])),
}


def run_interpret(seed, variant, *, b, l, h, p, g, n, dtype, q, y_dtype=None):
    args, extras = make_inputs(seed, b=b, l=l, h=h, p=p, g=g, n=n, dtype=dtype)
    kw = VARIANTS[variant](extras, b, l)
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if not isinstance(v, jax.Array)}
    config = SSDTPUConfig() if q is None else SSDTPUConfig(q=q)
    fn = functools.partial(ssd_pallas_tpu, config=config, interpret=True, y_dtype=y_dtype, **static)
    y, state = jax.jit(fn)(**args, **arrays)
    y_ref, state_ref = reference64(ssd_naive, **args, **kw)
    assert y.shape == (b, l, h, p) and state.shape == (b, h, p, n)
    assert y.dtype == (jnp.float32 if y_dtype is None else y_dtype) and state.dtype == jnp.float32
    return rel_err(y, y_ref), rel_err(state, state_ref)


# (shape, q): what each shape exercises
SHAPES = {
    # hb = h = 4 heads in a block spanning both groups (gb = 2); q = 32: 3 chunks, the last one partial
    "span": (dict(b=2, l=70, h=4, p=16, g=2, n=16), 32),
    # p = 64 (hb = 2) and n = 128 with g = 2: two head blocks on the grid, one group each, B/C blocks picked by
    # group index; l = 96 = 3 whole chunks (no tail mask)
    "mamba": (dict(b=1, l=96, h=4, p=64, g=2, n=128), 32),
    # the default q = 128: a single chunk, partial (l = 96); p = 128, one head per block
    "q128": (dict(b=1, l=96, h=2, p=128, g=2, n=128), None),
}

# (shape, variant, input dtype, y_dtype); bf16 y (half the output bytes, as mamba_ssm returns it) adds one bf16
# rounding, 2^-8 = 4e-3, which the bf16 tolerance covers. A call without options takes a subset of these paths
# (each option adds a branch); the p128-q256 lowering below has none.
CASES = [
    ("span", "full", jnp.float32, None),
    ("span", "seq_idx", jnp.float32, None),
    ("mamba", "seq_idx", jnp.bfloat16, jnp.bfloat16),
    ("q128", "full", jnp.float32, None),
]


@pytest.mark.parametrize("shape,variant,dtype,y_dtype", CASES,
                         ids=[f"{s}-{v}-{jnp.dtype(d).name}" + ("-y_bf16" if y else "") for s, v, d, y in CASES])
def test_ssd_tpu_interpret(shape, variant, dtype, y_dtype):
    dims, q = SHAPES[shape]
    err_y, err_state = run_interpret(20, variant, **dims, dtype=dtype, q=q, y_dtype=y_dtype)
    tol = TOL[jnp.dtype(dtype).name]
    assert err_y <= tol, (shape, variant, err_y)
    assert err_state <= tol, (shape, variant, err_state)


def test_ssd_tpu_grad_interpret():
    # custom VJP = jax.vjp of ssd_chunked (same chunk_size); the cotangent 2 y comes from the kernel's y, which
    # differs from the reference's by float32 rounding: 1e-5
    args, extras = make_inputs(22, b=1, l=20, h=2, p=8, g=1, n=8, dtype=jnp.float32)
    names = ("x", "dt", "B", "C")

    def loss(fn, x, dt, B, C, D, initial_state, **static):
        y, state = fn(x, dt, args["A"], B, C, chunk_size=8, D=D, z=extras["z"], dt_softplus=True,
                      initial_state=initial_state, **static)
        return (y ** 2).sum() + (state ** 2).sum()

    diff = [args[k] for k in names] + [extras["D"], extras["initial_state"]]
    kernel = functools.partial(loss, ssd_pallas_tpu, config=SSDTPUConfig(q=8), interpret=True)
    g_kernel = jax.jit(jax.grad(kernel, argnums=tuple(range(6))))(*diff)
    g_ref = jax.jit(jax.grad(functools.partial(loss, ssd_chunked), argnums=tuple(range(6))))(*diff)
    for a, r in zip(g_kernel, g_ref):
        assert rel_err(a, r) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# Lowering to Mosaic TPU (nothing executes)
# --------------------------------------------------------------------------------------------------------------

LOWERINGS = {
    # g = h = 8: each head block (2 heads of p = 64) spans two groups; l = 500, a partial last chunk; every
    # option, seq_idx
    "g8-tail": (dict(b=2, l=500, h=8, p=64, g=8, n=128), "all", 128),
    # p = 128 (one head per block), g = 1, q = 256, no options
    "p128-q256": (dict(b=1, l=1024, h=4, p=128, g=1, n=128), "plain", 256),
}


def export_tpu(dims, options, q, dtype):
    b, l, h, p, g, n = (dims[k] for k in "blhpgn")
    S = jax.ShapeDtypeStruct
    args = [S((b, l, h, p), dtype), S((b, l, h), dtype), S((h,), jnp.float32), S((b, l, g, n), dtype),
            S((b, l, g, n), dtype)]
    kw = {}
    if options == "all":
        kw = dict(D=S((h,), jnp.float32), z=S((b, l, h, p), dtype), dt_bias=S((h,), jnp.float32),
                  initial_state=S((b, h, p, n), jnp.float32), seq_idx=S((b, l), jnp.int32))

    def fn(x, dt, A, B, C, kw):
        return ssd_pallas_tpu(x, dt, A, B, C, dt_softplus=True, dt_limit=(0.0, 10.0), y_dtype=dtype,
                              config=SSDTPUConfig(q=q), interpret=False, **kw)

    return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args, kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(LOWERINGS))
def test_ssd_tpu_lowers_to_mosaic(name, dtype):
    dims, options, q = LOWERINGS[name]
    exported = export_tpu(dims, options, q, dtype)
    text = exported.mlir_module()
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 1  # the whole forward is one Mosaic kernel
    b, l, h, p, n = (dims[k] for k in "blhpn")
    y, state = exported.out_avals
    assert y.shape == (b, l, h, p) and y.dtype == dtype
    assert state.shape == (b, h, p, n) and state.dtype == jnp.float32


# --------------------------------------------------------------------------------------------------------------
# What the compiled kernel handles, and the errors for what it does not
# --------------------------------------------------------------------------------------------------------------


def test_ssd_tpu_supported():
    assert ssd_tpu_supported(64, 128) and ssd_tpu_supported(128, 256) and ssd_tpu_supported(32, 128)
    assert ssd_tpu_supported(64, 128, h=24, g=1) and ssd_tpu_supported(64, 128, h=8, g=8)
    assert not ssd_tpu_supported(48, 128)  # head blocks would not be 128-lane aligned
    assert not ssd_tpu_supported(64, 16)  # B/C blocks and the state need 128 lanes
    assert not ssd_tpu_supported(64, 128, q=64)
    assert not ssd_tpu_supported(64, 128, dtype=jnp.float16)
    assert not ssd_tpu_supported(64, 128, h=3, g=1)  # hb = 3: 192 lanes
    assert not ssd_tpu_supported(128, 256, h=80, g=1, q=1024)  # over the VMEM budget
    assert head_block(8, 1, 64, 128) == (2, 1) and head_block(8, 8, 64, 128) == (2, 2)
    assert head_block(4, 2, 16, 16) == (4, 2) and head_block(24, 8, 64, 128) == (6, 2)


def test_ssd_tpu_interpret_default():
    # interpret=None: compiled only on a TPU backend; True / False force it
    expected = jax.default_backend() != "tpu"
    params = lambda interpret: pu.tpu_interpret_params(pu.resolve_tpu_interpret(interpret))  # noqa: E731
    assert isinstance(params(None), pltpu.InterpretParams) == expected
    assert isinstance(params(True), pltpu.InterpretParams)
    assert params(False) is False


@pytest.mark.parametrize("case,kwargs,error,match", [
    ("p48", dict(p=48), ValueError, r"head_dim p = 48.*ssd_tpu_supported"),
    ("n16", dict(n=16), ValueError, r"state size n = 16"),
    ("q64", dict(config=SSDTPUConfig(q=64)), ValueError, r"config.q \(64\) must be a multiple of 128"),
    ("q_odd", dict(config=SSDTPUConfig(q=12), interpret=True), ValueError, r"positive multiple of 8"),
    ("hb", dict(config=SSDTPUConfig(heads_per_block=3), interpret=True), ValueError, r"heads_per_block \(3\)"),
    ("config", dict(config=(128,)), TypeError, r"SSDTPUConfig"),
    ("f16", dict(dtype=jnp.float16, interpret=True), ValueError, r"takes x in float32 or bfloat16, got float16"),
    ("shape", dict(bad_A=True), ValueError, r"A has shape \(3,\); expected"),
])
def test_ssd_tpu_errors(case, kwargs, error, match):
    kwargs = dict(kwargs)
    b, l, h, g = 1, 16, 4, 2
    p, n = kwargs.pop("p", 64), kwargs.pop("n", 128)
    dtype = kwargs.pop("dtype", jnp.float32)
    bad_A = kwargs.pop("bad_A", False)
    kwargs.setdefault("interpret", False)
    x, dt = jnp.ones((b, l, h, p), dtype), jnp.ones((b, l, h), dtype)
    A = -jnp.ones((3 if bad_A else h,))
    B = jnp.ones((b, l, g, n), dtype)
    with pytest.raises(error, match=match):
        ssd_pallas_tpu(x, dt, A, B, B, **kwargs)


def test_ssd_tpu_refuses_float64():
    # a TPU has no float64 (and the TPU interpreter refuses it): a clear error instead of a wrong-dtype result
    with jax.enable_x64(True):
        x, B = jnp.ones((1, 8, 2, 8), jnp.float64), jnp.ones((1, 8, 1, 8), jnp.float64)
        with pytest.raises(ValueError, match=r"takes x in float32 or bfloat16, got float64"):
            ssd_pallas_tpu(x, x[..., 0], -jnp.ones(2), B, B, interpret=True)
