"""The Pallas kernels against their references: SSD forward, causal conv1d (prefill and update), decode step.

Two tiers run the same checks:
* CPU CI: every kernel in Pallas interpret mode (`interpret=True`), which executes the kernel body itself, at
  small odd shapes (p, n, l not powers of two, l not a multiple of the kernel chunk, g > 1).
* `-m gpu`: the kernels compiled (Triton backend) on a GPU at shapes they compile for, plus a model-level check.

Ground truth: the references evaluated in float64 (x64) on the same inputs, rounded to the tested dtype first,
so the error measured is the kernel's own. Errors are max |a - b| / max |b|. Tolerances, per dtype:
* float32 inputs: 2e-5. The kernels compute in float32 with IEEE float32 matmuls; ~1e-7 per op times sums
  over a chunk (<= 64 terms) and a few chunks.
* bfloat16 inputs, float32 outputs of the decode step and conv: 2e-5 too (math is float32 after the load).
* bfloat16 inputs into the SSD: 2e-2. Like mamba_ssm, the kernel rounds matmul operands to bf16 (the
  decay-weighted C.Bᵀ tile and the carried state before C.stateᵀ): 2^-8 relative per operand, accumulated
  over the chunk; measured ~3e-3 to 8e-3.
* bfloat16 outputs (the conv's y, a bf16 state): one bf16 rounding, 2^-8 = 4e-3, plus the float32 math.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err

from easymamba import kernels
from easymamba.kernels import pallas_util as pu
from easymamba.kernels.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from easymamba.kernels.conv1d.triton import causal_conv1d_pallas, causal_conv1d_update_pallas
from easymamba.kernels import resolver
from easymamba.kernels.resolver import describe, resolve, resolve_impl
from easymamba.kernels.ssd_scan.gpu import (
    MosaicSSDConfig,
    SSDBlockConfig,
    default_config,
    mosaic_gpu_here,
    ssd_pallas,
)
from easymamba.kernels.ssd_scan.mosaic_gpu import mgpu_dims, mgpu_supported
from easymamba.kernels.ssd_scan.triton import kernel_dims, ssd_supported
from easymamba.kernels.ssd_scan.reference import ssd_naive
from easymamba.kernels.state_update.reference import selective_state_update_ref
from easymamba.kernels.state_update.triton import selective_state_update_pallas

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (compiled kernels)")

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def normal(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape), dtype)


def as64(tree):
    is_float_array = lambda a: hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)  # noqa: E731
    return jax.tree.map(lambda a: np.asarray(a, np.float64) if is_float_array(a) else a, tree)


def reference64(fn, *args, **kwargs):
    """fn on float64 copies of the (already rounded) inputs."""
    with jax.enable_x64(True):
        args, kwargs = as64(args), as64(kwargs)
        return jax.tree.map(np.asarray, fn(*args, **kwargs))


def seq_idx_for(b, l, cuts):
    ids = np.zeros((b, l), np.int32)
    for i, cut in enumerate(cuts):
        ids[:, cut:] = i + 1
    ids[1:, : l // 4] += 7  # rows differ, and ids need not start at 0
    return jnp.asarray(ids)


# --------------------------------------------------------------------------------------------------------------
# Decode step: selective_state_update
# --------------------------------------------------------------------------------------------------------------


def check_state_update(seed, *, b, h, p, n, g, dtype, state_dtype, interpret):
    rng = np.random.default_rng(seed)
    f = functools.partial(normal, rng, dtype=dtype)
    state = normal(rng, (b, h, p, n), state_dtype)
    x, dt, B, C, z = f((b, h, p)), f((b, h)), f((b, g, n)), f((b, g, n)), f((b, h, p))
    A = -jnp.exp(normal(rng, (h,), jnp.float32))
    kw = dict(D=f((h,)), z=z, dt_bias=f((h,)), dt_softplus=True, dt_limit=(0.001, 2.0))
    y, s = jax.jit(functools.partial(selective_state_update_pallas, interpret=interpret,
                                     **{k: v for k, v in kw.items() if not isinstance(v, jax.Array)}))(
        state, x, dt, A, B, C, D=kw["D"], z=z, dt_bias=kw["dt_bias"])
    y_ref, s_ref = reference64(selective_state_update_ref, state, x, dt, A, B, C, **kw)
    assert y.dtype == jnp.promote_types(jnp.promote_types(dtype, state_dtype), jnp.float32)
    assert s.dtype == state_dtype
    assert rel_err(y, y_ref) <= 2e-5
    assert rel_err(s, s_ref) <= (2e-5 if state_dtype == jnp.float32 else 4e-3)


@pytest.mark.parametrize("dtype,state_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                               (jnp.bfloat16, jnp.bfloat16)])
def test_state_update_interpret(dtype, state_dtype):
    check_state_update(0, b=2, h=6, p=5, n=7, g=3, dtype=dtype, state_dtype=state_dtype, interpret=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,state_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                               (jnp.bfloat16, jnp.bfloat16)])
def test_state_update_gpu(dtype, state_dtype):
    check_state_update(1, b=3, h=8, p=64, n=128, g=2, dtype=dtype, state_dtype=state_dtype, interpret=False)


def test_state_update_grad_interpret():
    # custom VJP = the reference's VJP; float32, same math order: 1e-6
    rng = np.random.default_rng(2)
    b, h, p, n, g = 2, 4, 3, 5, 2
    f = functools.partial(normal, rng, dtype=jnp.float32)
    args = (f((b, h, p, n)), f((b, h, p)), f((b, h)), -jnp.exp(f((h,))), f((b, g, n)), f((b, g, n)))
    loss = lambda fn, *a: (fn(*a, D=a[1][0, :, 0], dt_softplus=True)[0] ** 2).sum()  # noqa: E731
    kernel = functools.partial(selective_state_update_pallas, interpret=True)
    g_kernel = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 4)))(*args)
    g_ref = jax.jit(jax.grad(functools.partial(loss, selective_state_update_ref), argnums=(0, 1, 2, 4)))(*args)
    for a, r in zip(g_kernel, g_ref):
        assert rel_err(a, r) <= 1e-6


# --------------------------------------------------------------------------------------------------------------
# causal conv1d: prefill and decode update
# --------------------------------------------------------------------------------------------------------------


def check_conv(seed, *, b, l, c, k, dtype, interpret, with_init, with_seq):
    rng = np.random.default_rng(seed)
    f = functools.partial(normal, rng, dtype=dtype)
    x, weight, bias = f((b, l, c)), f((c, k)), f((c,))
    kw = {}
    if with_init:
        kw["initial_state"] = f((b, c, k))
    if with_seq:
        kw["seq_idx"] = seq_idx_for(b, l, [max(l // 3, 1), max(2 * l // 3, 2)])
    y, s = jax.jit(functools.partial(causal_conv1d_pallas, interpret=interpret))(x, weight, bias, **kw)
    y_ref, s_ref = reference64(causal_conv1d_ref, x, weight, bias, **kw)
    assert y.dtype == dtype and s.dtype == dtype
    assert rel_err(y, y_ref) <= (2e-5 if dtype == jnp.float32 else 4e-3)  # bf16: one output rounding
    assert rel_err(s, s_ref) == 0  # the state is a copy of inputs


@pytest.mark.parametrize("l,c,k,dtype,with_init,with_seq", [
    (37, 24, 4, jnp.float32, True, True),
    (3, 16, 4, jnp.float32, True, False),  # l < k: the state keeps initial-state columns
    (70, 12, 3, jnp.bfloat16, False, True),
    (65, 8, 2, jnp.bfloat16, True, True),
])
def test_conv1d_interpret(l, c, k, dtype, with_init, with_seq):
    check_conv(3, b=2, l=l, c=c, k=k, dtype=dtype, interpret=True, with_init=with_init, with_seq=with_seq)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_init,with_seq", [(False, False), (True, True)])
def test_conv1d_gpu(dtype, with_init, with_seq):
    check_conv(4, b=2, l=300, c=384, k=4, dtype=dtype, interpret=False, with_init=with_init, with_seq=with_seq)


def check_conv_update(seed, *, b, c, k, dtype, interpret):
    rng = np.random.default_rng(seed)
    f = functools.partial(normal, rng, dtype=dtype)
    x, state, weight, bias = f((b, c)), f((b, c, k)), f((c, k)), f((c,))
    y, s = jax.jit(functools.partial(causal_conv1d_update_pallas, interpret=interpret))(x, state, weight, bias)
    y_ref, s_ref = reference64(causal_conv1d_update_ref, x, state, weight, bias)
    assert rel_err(y, y_ref) <= (2e-5 if dtype == jnp.float32 else 4e-3)
    assert rel_err(s, s_ref) == 0


@pytest.mark.parametrize("c,k,dtype", [(24, 4, jnp.float32), (10, 3, jnp.bfloat16)])
def test_conv1d_update_interpret(c, k, dtype):
    check_conv_update(5, b=3, c=c, k=k, dtype=dtype, interpret=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv1d_update_gpu(dtype):
    check_conv_update(6, b=5, c=1792, k=4, dtype=dtype, interpret=False)


def test_conv1d_grad_interpret():
    # custom VJP = the reference's VJP; float32: 1e-6
    rng = np.random.default_rng(7)
    x, w, bias, init = (normal(rng, s, jnp.float32) for s in ((2, 9, 8), (8, 4), (8,), (2, 8, 4)))
    loss = lambda fn, *a: (fn(*a, initial_state=init)[0] ** 2).sum()  # noqa: E731
    kernel = functools.partial(causal_conv1d_pallas, interpret=True)
    g_kernel = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(x, w, bias)
    g_ref = jax.jit(jax.grad(functools.partial(loss, causal_conv1d_ref), argnums=(0, 1, 2)))(x, w, bias)
    for a, r in zip(g_kernel, g_ref):
        assert rel_err(a, r) <= 1e-6


# --------------------------------------------------------------------------------------------------------------
# SSD forward
# --------------------------------------------------------------------------------------------------------------


def ssd_inputs(seed, *, b, l, h, p, g, n, dtype):
    rng = np.random.default_rng(seed)
    f = functools.partial(normal, rng, dtype=dtype)
    args = dict(x=f((b, l, h, p)), dt=f((b, l, h)), A=-jnp.exp(normal(rng, (h,), jnp.float32)),
                B=f((b, l, g, n)), C=f((b, l, g, n)))
    extras = dict(D=f((h,)), z=f((b, l, h, p)), dt_bias=f((h,)),
                  initial_state=normal(rng, (b, h, p, n), jnp.float32))
    return args, extras


SSD_VARIANTS = {
    "plain": lambda e, b, l: dict(),
    "full": lambda e, b, l: dict(D=e["D"], z=e["z"], dt_bias=e["dt_bias"], dt_softplus=True,
                                 initial_state=e["initial_state"]),
    "limit": lambda e, b, l: dict(dt_bias=e["dt_bias"], dt_softplus=True, dt_limit=(0.01, 0.3), D=e["D"]),
    "seq_idx": lambda e, b, l: dict(dt_bias=e["dt_bias"], dt_softplus=True, initial_state=e["initial_state"],
                                    seq_idx=seq_idx_for(b, l, [5, l // 2, l // 2 + 1])),
}


def check_ssd(seed, variant, *, b, l, h, p, g, n, dtype, interpret, block_q=None, config=None, y_dtype=None):
    args, extras = ssd_inputs(seed, b=b, l=l, h=h, p=p, g=g, n=n, dtype=dtype)
    kw = SSD_VARIANTS[variant](extras, b, l)
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if not isinstance(v, jax.Array)}
    config = SSDBlockConfig(block_q=block_q) if config is None and block_q is not None else config
    fn = functools.partial(ssd_pallas, config=config, y_dtype=y_dtype, interpret=interpret, **static)
    y, state = jax.jit(fn)(**args, **arrays)
    y_ref, state_ref = reference64(ssd_naive, **args, **kw)
    y_dtype = jnp.float32 if y_dtype is None else y_dtype
    assert y.shape == (b, l, h, p) and y.dtype == y_dtype and state.dtype == jnp.float32
    # a bf16 y adds one rounding (2^-8) to the bf16 operand budget below
    tol = TOL[jnp.dtype(dtype).name]
    assert rel_err(y, y_ref) <= tol, variant
    assert rel_err(state, state_ref) <= tol, variant


@pytest.mark.parametrize("variant,dtype", [(v, jnp.float32) for v in SSD_VARIANTS]
                         + [("full", jnp.bfloat16), ("seq_idx", jnp.bfloat16)])
def test_ssd_interpret(variant, dtype):
    # l = 37 with a chunk of 16: two full chunks and a padded one; g = 2 groups of 2 heads; odd p, n
    check_ssd(8, variant, b=2, l=37, h=4, p=3, g=2, n=5, dtype=dtype, interpret=True, block_q=16)


@pytest.mark.parametrize("l", [1])
def test_ssd_interpret_short(l):
    # one token (l = 16, exactly one chunk, is covered by the padded chunks above)
    check_ssd(9, "full", b=1, l=l, h=2, p=4, g=1, n=4, dtype=jnp.float32, interpret=True, block_q=16)


@gpu
@needs_gpu
@pytest.mark.parametrize("variant", list(SSD_VARIANTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ssd_gpu(variant, dtype):
    check_ssd(10, variant, b=2, l=300, h=8, p=64, g=2, n=128, dtype=dtype, interpret=False, block_q=64)


# The Mosaic GPU form (TMA + wgmma, Hopper): bf16 / f16 operands, p a multiple of 16, n of 64. On the CPU it runs in
# jax's GPU interpreter (TMA copies, barriers and wgmma simulated; register layouts skipped), so the shapes are the
# smallest the form takes: p = n = 64 (n = 128 once), one chunk of 64 plus a padded one (l = 100), g = 2 groups.
MOSAIC_CPU = dict(b=1, l=100, h=4, p=64, g=2, n=64, dtype=jnp.bfloat16, interpret=True)


@pytest.mark.parametrize("variant", list(SSD_VARIANTS))
def test_ssd_mosaic_interpret(variant):
    check_ssd(12, variant, config=MosaicSSDConfig(), **MOSAIC_CPU)


@pytest.mark.parametrize("config,y_dtype,n", [
    (MosaicSSDConfig(num_slots=1), jnp.bfloat16, 64),  # no prefetch: each chunk's copies issued in its own step
    (MosaicSSDConfig(num_slots=3, overlap=False), jnp.bfloat16, 64),  # a deeper ring; y finished before the update
    (MosaicSSDConfig(), jnp.float32, 128),  # float32 y; n = 128 spans two swizzle tiles
])
def test_ssd_mosaic_interpret_configs(config, y_dtype, n):
    check_ssd(13, "full", config=config, y_dtype=y_dtype, **dict(MOSAIC_CPU, n=n))


def test_ssd_mosaic_refuses_what_it_cannot_compile():
    args, _ = ssd_inputs(14, b=1, l=8, h=2, p=64, g=1, n=64, dtype=jnp.float32)
    with pytest.raises(ValueError, match="Mosaic GPU SSD form.*float32"):
        ssd_pallas(**args, config=MosaicSSDConfig())
    args, _ = ssd_inputs(14, b=1, l=8, h=2, p=256, g=1, n=64, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim 256"):  # padded p 256 > the form's 128
        ssd_pallas(**args, config=MosaicSSDConfig())
    with pytest.raises(ValueError, match="block_q must be 64 or 128"):
        MosaicSSDConfig(block_q=32)
    assert not mosaic_gpu_here() or pu.gpu_capability()[0] == 9
    if not ON_GPU:  # interpreted kernels default to the Triton form
        assert isinstance(default_config(100, 64, 128, jnp.bfloat16), SSDBlockConfig)


def test_ssd_mosaic_interpret_padded_head_dim():
    # head_dim 48 runs as 48 (32-byte swizzled tiles), state 40 padded to 64 (mgpu_dims): exact against the
    # float64 recurrence
    native = MosaicSSDConfig(native_head_dim=True)
    assert mgpu_dims(48, 40, native) == (48, 64) and mgpu_dims(48, 40) == (64, 64)
    check_ssd(16, "full", config=native, **dict(MOSAIC_CPU, p=48, n=40))
    check_ssd(16, "full", config=MosaicSSDConfig(), **dict(MOSAIC_CPU, p=48, n=40))


def test_ssd_mosaic_interpret_head_dim_80():
    # Nemotron-H-Nano-9B-v2 / Nemotron-3's head dim 80 at its own size with `native_head_dim` (no padding to
    # 128): 160-byte rows, every wgmma operand tile swizzled at 32 bytes
    native = MosaicSSDConfig(native_head_dim=True)
    assert mgpu_dims(80, 128, native) == (80, 128) and mgpu_dims(80, 128) == (128, 128)
    check_ssd(19, "full", config=native, **dict(MOSAIC_CPU, p=80))


@pytest.mark.skipif(ON_GPU, reason="checks the CUDA lowering from a CPU-only machine")
@pytest.mark.parametrize("p,n", [(64, 128), (80, 128), (48, 64), (96, 128), (64, 256)])
def test_ssd_mosaic_lowers_for_cuda(p, n):
    # Mosaic GPU's lowering (layouts, swizzles, shared-memory budget) runs without a GPU; interpret mode skips
    # it. Lower the forward kernel for CUDA at each head dim / state size the form takes, every option on.
    from easymamba.kernels.ssd_scan.mosaic_gpu import ssd_forward_mgpu
    b, l, h, g = 1, 256, 4, 2
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = (S((b, l, h, p), bf), S((b, l, h), jnp.float32), S((b, l, h), jnp.float32), S((b, l, g, n), bf),
            S((b, l, g, n), bf), S((h,), jnp.float32), S((b, l, h, p), bf), S((b, h, p, n), jnp.float32),
            S((b, l), jnp.int32))
    fn = functools.partial(ssd_forward_mgpu, y_dtype=bf, config=MosaicSSDConfig())
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_ssd_kernel_dims_cover_real_checkpoints(monkeypatch):
    # the head dims and state sizes of released checkpoints all run in the fused forms, padded where needed
    assert kernel_dims(80, 128) == (128, 128) and kernel_dims(64, 128) == (64, 128) and kernel_dims(3, 5) == (16, 16)
    for p in (64, 80, 96, 128):
        for n in (16, 64, 128, 256):
            assert ssd_supported(p, n), (p, n)
            # wgmma tiles: n a multiple of 64; the float32 state [n, p] in registers at most 128 x 128
            assert mgpu_supported(p, n, jnp.bfloat16) == (n >= 64 and p * n <= 128 * 128), (p, n)
    assert ssd_supported(256, 128) and not ssd_supported(256, 256)
    assert not mgpu_supported(80, 128, jnp.float32)
    # on a GPU, impl="pallas" refuses what no form compiles with the rule in words; "auto" says why it takes XLA
    monkeypatch.setattr(resolver, "_pallas_runs_here", lambda backend: (True, "sm_90 GPU"))
    dims = dict(p=256, n=256, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="p <= 128 with n <= 256"):
        resolve("ssd", "pallas", dims=dims, backend="gpu", interpret=False)
    assert "p <= 128 with n <= 256" in resolve("ssd", "auto", dims=dims, backend="gpu", interpret=False).reason


@gpu
@needs_gpu
@pytest.mark.parametrize("p,n,g", [(80, 128, 8), (64, 256, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ssd_gpu_real_checkpoint_shapes(p, n, g, dtype):
    # Nemotron-H-Nano-9B-v2 / Nemotron-3 (head dim 80, 8 groups) and Falcon-H1 (state 256), compiled
    check_ssd(17, "full", b=2, l=300, h=16, p=p, g=g, n=n, dtype=dtype, interpret=False, config=None)


@gpu
@needs_gpu
@pytest.mark.parametrize("variant", list(SSD_VARIANTS))
@pytest.mark.parametrize("y_dtype", [None, jnp.bfloat16])
def test_ssd_mosaic_gpu(variant, y_dtype):
    if not mosaic_gpu_here():
        pytest.skip("the Mosaic GPU form needs a Hopper (sm_90) GPU")
    check_ssd(15, variant, b=2, l=300, h=8, p=64, g=2, n=128, dtype=jnp.bfloat16, interpret=False,
              config=MosaicSSDConfig(), y_dtype=y_dtype)
    assert isinstance(default_config(300, 64, 128, jnp.bfloat16), MosaicSSDConfig)  # what ssd_pallas picks here


def test_ssd_grad_interpret():
    # custom VJP = ssd_chunked's VJP; float32: 1e-5 (the forward differs from the chunked reference by rounding)
    args, extras = ssd_inputs(11, b=1, l=10, h=2, p=3, g=1, n=4, dtype=jnp.float32)
    def loss(fn, x, B):
        return (fn(x, args["dt"], args["A"], B, args["C"], chunk_size=4, D=extras["D"])[0] ** 2).sum()

    kernel = functools.partial(ssd_pallas, interpret=True)
    g_kernel = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1)))(args["x"], args["B"])
    g_ref = jax.jit(jax.grad(functools.partial(loss, kernels.ssd_chunked), argnums=(0, 1)))(args["x"], args["B"])
    for a, r in zip(g_kernel, g_ref):
        assert rel_err(a, r) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# Dispatch and the public wrappers
# --------------------------------------------------------------------------------------------------------------


def test_dispatch_never_picks_pallas_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice (tests/test_dispatch_tpu.py checks the TPU one)")
    for op in ("ssd", "causal_conv1d", "causal_conv1d_update", "selective_state_update"):
        assert resolve_impl("auto", op) == "xla"
        assert resolve_impl("pallas", op) == "pallas"  # runs interpreted on CPU
    table = describe()
    assert all(entry.startswith("xla: ") and "interpret" in entry for entry in table.values())


def test_public_wrappers_route_to_pallas():
    # impl="pallas" on CPU runs the kernels interpreted; float32: 2e-5 against the XLA path
    args, extras = ssd_inputs(12, b=1, l=9, h=2, p=4, g=1, n=4, dtype=jnp.float32)
    kw = dict(D=extras["D"], dt_bias=extras["dt_bias"], dt_softplus=True)
    y_p, s_p = kernels.ssd(*args.values(), chunk_size=4, impl="pallas", **kw)
    y_x, s_x = kernels.ssd(*args.values(), chunk_size=4, impl="xla", **kw)
    assert rel_err(y_p, y_x) <= 2e-5 and rel_err(s_p, s_x) <= 2e-5
    rng = np.random.default_rng(13)
    x, w, state = normal(rng, (1, 5, 8), jnp.float32), normal(rng, (8, 4), jnp.float32), normal(rng, (1, 8, 4),
                                                                                                 jnp.float32)
    for impl in ("pallas", "xla"):
        y, s = kernels.causal_conv1d(x, w, impl=impl)
        y1, s1 = kernels.causal_conv1d_update(x[:, 0], state, w, impl=impl)
        assert rel_err(y, causal_conv1d_ref(x, w)[0]) <= 2e-5
        assert rel_err(y1, causal_conv1d_update_ref(x[:, 0], state, w)[0]) <= 2e-5
    ssm = normal(rng, (1, 2, 4, 4), jnp.float32)
    step = (args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0], args["C"][:, 0])
    y_p, _ = kernels.selective_state_update(ssm, *step, impl="pallas")
    y_r, _ = selective_state_update_ref(ssm, *step)
    assert rel_err(y_p, y_r) <= 2e-5



class TestPublicOpsPallas:
    """impl="pallas" through each public op with `interpret=INTERPRET` (None: the resolver's answer, compiled on a
    GPU), against the XLA path; re-run below with INTERPRET=True, as jax's Pallas attention tests do, so a GPU
    run covers the kernel bodies in the interpreter too. Shapes every form compiles (p, n, c powers of two).
    float32: 2e-5, the kernels' float32 tolerance."""

    INTERPRET = None

    def test_ops(self):
        args, extras = ssd_inputs(16, b=1, l=9, h=2, p=16, g=1, n=16, dtype=jnp.float32)
        kw = dict(chunk_size=4, D=extras["D"], dt_bias=extras["dt_bias"], dt_softplus=True)
        got = kernels.ssd(*args.values(), impl="pallas", interpret=self.INTERPRET, **kw)
        want = kernels.ssd(*args.values(), impl="xla", **kw)
        assert all(rel_err(g, w) <= 2e-5 for g, w in zip(got, want))
        rng = np.random.default_rng(17)
        x, w, state = normal(rng, (1, 5, 16), jnp.float32), normal(rng, (16, 4), jnp.float32), normal(
            rng, (1, 16, 4), jnp.float32)
        got = kernels.causal_conv1d(x, w, impl="pallas", interpret=self.INTERPRET)
        assert rel_err(got[0], causal_conv1d_ref(x, w)[0]) <= 2e-5
        got = kernels.causal_conv1d_update(x[:, 0], state, w, impl="pallas", interpret=self.INTERPRET)
        assert rel_err(got[0], causal_conv1d_update_ref(x[:, 0], state, w)[0]) <= 2e-5
        ssm = normal(rng, (1, 2, 16, 16), jnp.float32)
        step = (args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0], args["C"][:, 0])
        got = kernels.selective_state_update(ssm, *step, impl="pallas", interpret=self.INTERPRET)
        assert rel_err(got[0], selective_state_update_ref(ssm, *step)[0]) <= 2e-5


class TestPublicOpsPallasInterpret(TestPublicOpsPallas):
    INTERPRET = True

@gpu
@needs_gpu
def test_model_logits_pallas_vs_reference_gpu():
    # 130M-shaped (h 24, p 64, n 128, d 768), 4 of its 24 layers to keep the test short, random weights,
    # bf16 activations. Both paths see the same bf16 in_proj outputs; the kernel rounds its matmul operands to
    # bf16 where the reference stays in float32, so logits differ by bf16 rounding propagated through 4
    # layers: tolerance 5e-2 relative to the largest logit.
    from flax import nnx

    import easymamba as em

    config = em.Mamba2Config(vocab_size=1024, hidden_size=768, num_hidden_layers=4, num_heads=24, head_dim=64,
                             state_size=128, n_groups=1, expand=2, conv_kernel=4, chunk_size=256)
    ids = jnp.asarray(np.random.default_rng(14).integers(0, 1024, size=(2, 333)), jnp.int32)
    logits = {}
    for impl in ("pallas", "reference"):
        model = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, kernel_impl=impl)
        graphdef, state = nnx.split(model)
        run = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits)
        logits[impl] = run(state, ids)
    err = rel_err(logits["pallas"], logits["reference"])
    print(f"model logits rel err pallas vs reference: {err:.3e}")
    assert err <= 5e-2
