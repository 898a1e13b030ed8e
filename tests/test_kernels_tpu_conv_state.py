"""The Mosaic TPU kernels for the causal conv1d (prefill, decode update) and the SSD decode step, on a CPU.

Two checks, both needed because no TPU is at hand:
* execution: each kernel in Pallas' TPU interpret mode (`interpret=True`: `pltpu.InterpretParams()`, which runs
  the kernel body with its grid, blocks, VMEM scratch and SMEM) at tiny shapes that still cross block edges
  (l not a multiple of the l block, two channel blocks, a partial batch block, two head blocks), against the
  reference in float64 on the same (already rounded) inputs;
* lowering: `jax.export(..., platforms=("tpu",))` of each kernel with interpret=False at a realistic shape, which
  runs the Pallas -> Mosaic lowering (block-shape rules, unsupported primitives) and must give a
  `tpu_custom_call`. The Mosaic compiler passes inside libtpu are not reachable here.

Budget: each interpreted case costs ~2 s on 2 CPU cores (compiling the interpreter's program dominates), so the
cases are few and each covers several features; tests/test_dispatch_tpu.py runs every kernel once more, in
float32 with every option, through the public ops of `easymamba.kernels`.

Errors are max |a - b| / max |b|. Tolerances:
* float32: 2e-5. The kernels compute in float32; a conv output is k <= 4 products and a bias, a state-update
  output a sum of n = 128 products; ~1e-7 per op.
* bfloat16 outputs (the conv's y, a bfloat16 state): 4e-3 = 2^-8, one bfloat16 rounding (half an ulp, 2^-9
  relative) plus the float32 math.
* the conv states: 0. They are copies of inputs.
* gradients: 1e-6. The custom VJP is the reference's VJP at the same float32 inputs; only XLA's fusion order can
  differ.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from helpers import rel_err

from easymamba.kernels.conv1d.mosaic_tpu import (
    causal_conv1d_tpu,
    causal_conv1d_update_tpu,
    conv1d_tpu_supported,
)
from easymamba.kernels.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from easymamba.kernels.pallas_util import resolve_tpu_interpret as resolve_interpret
from easymamba.kernels.state_update.mosaic_tpu import selective_state_update_tpu, state_update_tpu_supported
from easymamba.kernels.state_update.reference import selective_state_update_ref

F32_TOL = 2e-5
BF16_TOL = 4e-3
GRAD_TOL = 1e-6


def normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def reference64(fn, *args, **kwargs):
    """fn on float64 copies of the (already rounded) inputs."""
    def to64(a):
        return np.asarray(a, np.float64) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a

    with jax.enable_x64(True):
        args, kwargs = jax.tree.map(to64, args), jax.tree.map(to64, kwargs)
        return jax.tree.map(np.asarray, fn(*args, **kwargs))


def seq_idx_for(b, l, cuts):
    """Segment ids that change at `cuts`; rows differ and ids need not start at 0."""
    ids = np.zeros((b, l), np.int32)
    for i, cut in enumerate(cuts):
        ids[:, cut:] = i + 1
    ids[1:] += 5
    return jnp.asarray(ids)


def tol(dtype):
    return F32_TOL if dtype == jnp.float32 else BF16_TOL


# --------------------------------------------------------------------------------------------------------------
# causal conv1d prefill
# --------------------------------------------------------------------------------------------------------------

CONV_CASES = {
    # l = 37 in l blocks of 16: two full blocks and a partial one; c = 256 in two channel blocks; segments that
    # change at an l-block edge (16) and one row later (a one-row segment), with an initial state
    "f32-all": dict(l=37, c=256, k=4, dtype=jnp.float32, bias=True, init=True, cuts=(16, 17), act="silu"),
    # bf16, k = 3, no bias, no activation, l = 48: three whole l blocks
    "bf16-k3-seq-noact": dict(l=48, c=128, k=3, dtype=jnp.bfloat16, bias=False, init=False, cuts=(9,), act=None),
    "f32-short": dict(l=3, c=128, k=4, dtype=jnp.float32, bias=True, init=True, cuts=None, act="silu"),  # l < k
}


def conv_inputs(seed, *, l, c, k, dtype, bias, init, cuts, b=2):
    rng = np.random.default_rng(seed)
    x, weight = normal(rng, (b, l, c), dtype), normal(rng, (c, k), dtype)
    kw = {"bias": normal(rng, (c,), dtype) if bias else None}
    if init:
        kw["initial_state"] = normal(rng, (b, c, k), dtype)
    if cuts:
        kw["seq_idx"] = seq_idx_for(b, l, cuts)
    return x, weight, kw


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv1d_tpu_interpret(case):
    spec = dict(CONV_CASES[case])
    act = spec.pop("act")
    x, weight, kw = conv_inputs(0, **spec)
    fn = functools.partial(causal_conv1d_tpu, activation=act, interpret=True, block_l=16, block_c=128)
    y, state = jax.jit(fn)(x, weight, **kw)
    y_ref, state_ref = reference64(functools.partial(causal_conv1d_ref, activation=act), x, weight, **kw)
    assert y.shape == y_ref.shape and y.dtype == x.dtype and state.dtype == x.dtype
    assert rel_err(y, y_ref) <= tol(x.dtype), case
    assert rel_err(state, state_ref) == 0, case  # the state is a copy of inputs


def test_conv1d_tpu_grad_interpret():
    x, weight, kw = conv_inputs(1, l=21, c=128, k=4, dtype=jnp.float32, bias=True, init=True, cuts=(7,))
    seq_idx = kw.pop("seq_idx")
    kernel = functools.partial(causal_conv1d_tpu, seq_idx=seq_idx, interpret=True, block_l=16)
    ref = functools.partial(causal_conv1d_ref, seq_idx=seq_idx)
    rng = np.random.default_rng(2)
    cotangents = (normal(rng, x.shape), normal(rng, kw["initial_state"].shape))

    def grads(fn):
        wrapped = lambda x, w, bias, init: fn(x, w, bias, initial_state=init)  # noqa: E731
        _, vjp = jax.vjp(wrapped, x, weight, kw["bias"], kw["initial_state"])
        return vjp(cotangents)

    for got, want in zip(jax.jit(lambda: grads(kernel))(), jax.jit(lambda: grads(ref))()):
        assert rel_err(got, want) <= GRAD_TOL


# --------------------------------------------------------------------------------------------------------------
# causal conv1d decode update
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,c,k,dtype,bias,act", [
    # two channel blocks, batch blocks of 5 rows (the largest divisor of 10 up to 8); float32 with bias and
    # SiLU, one batch block of 2 rows: tests/test_dispatch_tpu.py
    (10, 256, 3, jnp.bfloat16, False, None),
])
def test_conv1d_update_tpu_interpret(b, c, k, dtype, bias, act):
    rng = np.random.default_rng(3)
    x, state, weight = normal(rng, (b, c), dtype), normal(rng, (b, c, k), dtype), normal(rng, (c, k), dtype)
    bias = normal(rng, (c,), dtype) if bias else None
    fn = functools.partial(causal_conv1d_update_tpu, activation=act, interpret=True)
    y, new_state = jax.jit(fn)(x, state, weight, bias)
    y_ref, state_ref = reference64(functools.partial(causal_conv1d_update_ref, activation=act), x, state, weight, bias)
    assert y.dtype == dtype and new_state.dtype == dtype
    assert rel_err(y, y_ref) <= tol(dtype)
    assert rel_err(new_state, state_ref) == 0  # a shifted copy of inputs


def test_conv1d_update_tpu_grad_interpret():
    rng = np.random.default_rng(4)
    args = (normal(rng, (2, 128)), normal(rng, (2, 128, 4)), normal(rng, (128, 4)), normal(rng, (128,)))
    cotangents = (normal(rng, (2, 128)), normal(rng, (2, 128, 4)))

    def grads(fn):
        _, vjp = jax.vjp(fn, *args)
        return vjp(cotangents)

    kernel = functools.partial(causal_conv1d_update_tpu, interpret=True)
    for got, want in zip(jax.jit(lambda: grads(kernel))(), jax.jit(lambda: grads(causal_conv1d_update_ref))()):
        assert rel_err(got, want) <= GRAD_TOL


# --------------------------------------------------------------------------------------------------------------
# selective_state_update (the SSD decode step)
# --------------------------------------------------------------------------------------------------------------


def state_update_inputs(seed, *, b, h, p, n, g, dtype, state_dtype):
    rng = np.random.default_rng(seed)
    f = functools.partial(normal, rng, dtype=dtype)
    args = (normal(rng, (b, h, p, n), state_dtype), f((b, h, p)), f((b, h)), -jnp.exp(normal(rng, (h,))),
            f((b, g, n)), f((b, g, n)))
    extras = dict(D=f((h,)), z=f((b, h, p)), dt_bias=f((h,)))
    return args, extras


@pytest.mark.parametrize("dtype,state_dtype,full,block_h", [
    # float32 with every option: tests/test_dispatch_tpu.py
    (jnp.bfloat16, jnp.bfloat16, True, None),
    (jnp.float32, jnp.float32, False, None),  # no D, z, dt_bias, softplus; the default dt_limit
    (jnp.bfloat16, jnp.float32, True, 8),  # h = 16 in two blocks of 8 heads: a traced head -> group map
])
def test_state_update_tpu_interpret(dtype, state_dtype, full, block_h):
    h, g = (4, 2) if block_h is None else (16, 4)
    args, extras = state_update_inputs(5, b=2, h=h, p=8, n=128, g=g, dtype=dtype, state_dtype=state_dtype)
    arrays = extras if full else {}
    static = dict(dt_softplus=True, dt_limit=(0.05, 1.5)) if full else {}
    fn = functools.partial(selective_state_update_tpu, interpret=True, block_h=block_h, **static)
    y, state = jax.jit(fn)(*args, **arrays)
    y_ref, state_ref = reference64(functools.partial(selective_state_update_ref, **static), *args, **arrays)
    assert y.dtype == jnp.float32 and state.dtype == state_dtype
    assert rel_err(y, y_ref) <= F32_TOL  # y is float32 whatever the inputs: one float32 computation
    assert rel_err(state, state_ref) <= tol(state_dtype)


def test_state_update_tpu_grad_interpret():
    args, extras = state_update_inputs(6, b=2, h=4, p=8, n=128, g=2, dtype=jnp.float32, state_dtype=jnp.float32)
    static = dict(dt_softplus=True, dt_limit=(0.05, 1.5))
    rng = np.random.default_rng(7)
    cotangents = (normal(rng, (2, 4, 8)), normal(rng, (2, 4, 8, 128)))

    def grads(fn):
        wrapped = lambda *a: fn(*a[:6], D=a[6], z=a[7], dt_bias=a[8], **static)  # noqa: E731
        _, vjp = jax.vjp(wrapped, *args, extras["D"], extras["z"], extras["dt_bias"])
        return vjp(cotangents)

    kernel = functools.partial(selective_state_update_tpu, interpret=True)
    for got, want in zip(jax.jit(lambda: grads(kernel))(), jax.jit(lambda: grads(selective_state_update_ref))()):
        assert rel_err(got, want) <= GRAD_TOL


# --------------------------------------------------------------------------------------------------------------
# Lowering to Mosaic at realistic shapes (Mamba-2 130M: c = 1536 + 256, k = 4; h = 24, p = 64, n = 128)
# --------------------------------------------------------------------------------------------------------------

S = jax.ShapeDtypeStruct


def lowers_to_mosaic(fn, *args, **kwargs):
    exported = export.export(jax.jit(fn), platforms=("tpu",))(*args, **kwargs)
    return "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("options", [False, True])
def test_conv1d_tpu_lowers(options):
    b, l, c, k = 2, 512, 1536 + 256, 4
    kw = dict(bias=S((c,), jnp.float32), initial_state=S((b, c, k), jnp.bfloat16),
              seq_idx=S((b, l), jnp.int32)) if options else {}
    fn = lambda x, w, **kw: causal_conv1d_tpu(x, w, interpret=False, **kw)  # noqa: E731
    assert lowers_to_mosaic(fn, S((b, l, c), jnp.bfloat16), S((c, k), jnp.float32), **kw)


def test_conv1d_update_tpu_lowers():
    b, c, k = 8, 1536 + 256, 4
    fn = functools.partial(causal_conv1d_update_tpu, interpret=False)
    assert lowers_to_mosaic(fn, S((b, c), jnp.bfloat16), S((b, c, k), jnp.bfloat16), S((c, k), jnp.float32),
                            S((c,), jnp.float32))


def test_state_update_tpu_lowers():
    b, h, p, n, g = 8, 24, 64, 128, 1
    bf16 = jnp.bfloat16
    fn = functools.partial(selective_state_update_tpu, dt_softplus=True, dt_limit=(0.0, 100.0), interpret=False)
    assert lowers_to_mosaic(fn, S((b, h, p, n), jnp.float32), S((b, h, p), bf16), S((b, h), bf16),
                            S((h,), jnp.float32), S((b, g, n), bf16), S((b, g, n), bf16), D=S((h,), jnp.float32),
                            z=S((b, h, p), bf16), dt_bias=S((h,), jnp.float32))


# --------------------------------------------------------------------------------------------------------------
# What the kernels refuse, in sentences
# --------------------------------------------------------------------------------------------------------------


def test_tpu_kernels_refuse_unsupported_shapes():
    assert resolve_interpret(None) == (jax.default_backend() != "tpu")
    assert conv1d_tpu_supported(1792, 4) and not conv1d_tpu_supported(200, 4) and not conv1d_tpu_supported(128, 1)
    assert state_update_tpu_supported(64, 128) and not state_update_tpu_supported(5, 128)
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match=r"multiple of 128 .* got c=200, k=4"):
        causal_conv1d_tpu(normal(rng, (1, 8, 200)), normal(rng, (200, 4)))
    with pytest.raises(ValueError, match=r"got c=96, k=4"):
        causal_conv1d_update_tpu(normal(rng, (1, 96)), normal(rng, (1, 96, 4)), normal(rng, (96, 4)))
    with pytest.raises(ValueError, match=r"block_l must be a positive multiple of 16 rows, got 24"):
        causal_conv1d_tpu(normal(rng, (1, 8, 128)), normal(rng, (128, 4)), block_l=24)
    with pytest.raises(ValueError, match=r"weight has shape"):  # the reference's shape sentences come first
        causal_conv1d_tpu(normal(rng, (1, 8, 128)), normal(rng, (64, 4)))
    args, _ = state_update_inputs(9, b=1, h=4, p=5, n=128, g=1, dtype=jnp.float32, state_dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"p \(head dim\) a multiple of 8, .* got p=5, n=128"):
        selective_state_update_tpu(*args)
    args, _ = state_update_inputs(9, b=1, h=12, p=8, n=128, g=1, dtype=jnp.float32, state_dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"block_h must divide h \(12\) .* got 8"):
        selective_state_update_tpu(*args, block_h=8)
