"""The Pallas backward kernels (SSD and causal conv1d) against `jax.vjp` of the references.

CPU CI runs the kernels in Pallas interpret mode (the kernel bodies themselves) at tiny odd shapes: p, n, c not
powers of two, l not a multiple of the kernel's chunk, g > 1, initial states, seq_idx (including a one-token
segment and rows whose ids differ), dt bias / softplus / limit, D, z, and random cotangents for both outputs
(y and the final state / conv state). `-m gpu` runs the same checks compiled (Triton) at model-like shapes.

Ground truth: `jax.vjp` of `ssd_chunked` / `causal_conv1d_ref` in float64 on the same (already rounded) inputs
and cotangents, so the error measured is the kernel's own. Errors are max |a - b| / max |b| per gradient.
Tolerances:
* float64 inputs (x64; the SSD kernel then computes in float64): 1e-12. Same math, different summation order;
  measured <= 1e-15. This is the check of the derivation in `ssd_scan/triton_bwd.py`'s docstring.
* float32 inputs: 2e-5. IEEE float32 matmuls, ~1e-7 per operation, summed over a chunk (<= 64 terms), carried
  across chunks in the float32 state cotangent, and summed over b * l tokens for dA, dD, dt_bias, dweight;
  measured <= 7e-7 on CPU.
* bfloat16 inputs: 2e-2 (the forward's bf16 tolerance). The SSD backward rounds its matmul operands to bf16
  (2^-8 relative each, as the forward and mamba_ssm do) and every gradient is returned in bf16 (2^-9);
  measured <= 5e-3 (SSD) and <= 2.5e-3 (conv).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.conv1d.reference import causal_conv1d_ref
from easymamba.kernels.conv1d.triton import causal_conv1d_pallas
from easymamba.kernels.ssd_scan.gpu import MosaicSSDConfig, SSDBlockConfig, ssd_pallas
from easymamba.kernels.ssd_scan.reference import ssd_chunked
from easymamba.kernels.ssd_scan import triton_bwd
from easymamba.kernels.ssd_scan.triton_bwd import SSDBackwardConfig, backward_dims, ssd_backward_pallas

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (compiled kernels)")

TOL = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 2e-2}
SSD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
CONV_NAMES = ("x", "weight", "bias", "initial_state")


def seq_idx_for(b, l, cuts):
    ids = np.zeros((b, l), np.int32)
    for i, cut in enumerate(cuts):
        ids[:, cut:] = i + 1
    ids[1:, : l // 4] += 7  # rows differ, and ids need not start at 0
    return jnp.asarray(ids)


def as64(a):
    return None if a is None else jnp.asarray(np.asarray(a, np.float64))


def check_grads(got, want, names, inputs, tol):
    """Every present input has a gradient of its own dtype within tol; absent inputs get None."""
    for name, a, w, x in zip(names, got, want, inputs):
        if x is None:
            assert a is None, name
            continue
        assert a.dtype == x.dtype and a.shape == x.shape, (name, a.dtype, a.shape)
        err = rel_err(a, w)
        assert err <= tol, f"d{name}: relative error {err:.2e} > {tol:.0e}"


# --------------------------------------------------------------------------------------------------------------
# SSD
# --------------------------------------------------------------------------------------------------------------


def ssd_case(seed, *, b, l, h, p, g, n, dtype, full, y_dtype=None):
    """Inputs (raw dt, A < 0, every option when `full`), static options and random cotangents (dy, dfinal)."""
    rng = np.random.default_rng(seed)
    f = lambda *shape, dt=dtype: jnp.asarray(rng.normal(size=shape), dt)  # noqa: E731
    inputs = [f(b, l, h, p), f(b, l, h), -jnp.exp(f(h, dt=jnp.float32)), f(b, l, g, n), f(b, l, g, n)]
    if full:
        inputs += [f(h), f(b, l, h, p), f(h), f(b, h, p, n, dt=jnp.float32)]
        static = dict(dt_softplus=True, dt_limit=(0.0, 0.7))
        seq_idx = seq_idx_for(b, l, [5, l // 2, l // 2 + 1])  # includes a one-token segment
    else:
        inputs += [None] * 4
        static = dict(dt_softplus=False, dt_limit=(0.0, float("inf")))  # raw normal dt, clipped at 0 by the limit
        seq_idx = None
    cdtype = jnp.promote_types(dtype, jnp.float32)
    cotangents = (f(b, l, h, p, dt=y_dtype or cdtype), f(b, h, p, n, dt=cdtype))
    return inputs, static, seq_idx, cotangents


def ssd_reference_grads(inputs, static, seq_idx, cotangents):
    """jax.vjp of ssd_chunked in float64."""
    with jax.enable_x64(True):
        def ref(x, dt, A, B, C, D, z, dt_bias, init):
            return ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, z=z, dt_bias=dt_bias, initial_state=init,
                               seq_idx=seq_idx, **static)

        grads = jax.jit(lambda args, cot: jax.vjp(ref, *args)[1](cot))  # jit: eager op-by-op costs ~4x the time
        out = grads(list(map(as64, inputs)), tuple(map(as64, cotangents)))
        return [None if a is None else np.asarray(a) for a in out]


def test_ssd_backward_float64_derivation():
    # the kernels run in float64: the backward's math against the reference VJP to rounding. l = 37 with a chunk
    # of 16 (a padded chunk), g = 2 groups of 2 heads, every option, seq_idx with a one-token segment
    with jax.enable_x64(True):
        inputs, static, seq_idx, cot = ssd_case(0, b=2, l=37, h=4, p=3, g=2, n=5, dtype=jnp.float64, full=True)
        inputs[2], inputs[8] = as64(inputs[2]), as64(inputs[8])
        fn = functools.partial(ssd_backward_pallas, config=SSDBackwardConfig(block_q=16), interpret=True, **static)
        got = jax.jit(fn)(*inputs, seq_idx, *cot)
        want = ssd_reference_grads(inputs, static, seq_idx, cot)
        check_grads(got, want, SSD_NAMES, inputs, TOL["float64"])


def check_ssd_vjp(seed, *, b, l, h, p, g, n, dtype, full, y_dtype, block_q, interpret, config=None,
                  backward_config=None):
    """jax.vjp of the public `ssd_pallas` (forward kernel + custom VJP -> backward kernels); the forward's
    `config` defaults to the Triton form's `SSDBlockConfig(block_q)`, the backward's to `SSDBackwardConfig(block_q)`."""
    inputs, static, seq_idx, cot = ssd_case(seed, b=b, l=l, h=h, p=p, g=g, n=n, dtype=dtype, full=full,
                                            y_dtype=y_dtype)
    config = SSDBlockConfig(block_q=block_q) if config is None else config
    backward_config = SSDBackwardConfig(block_q=block_q) if backward_config is None else backward_config
    fn = functools.partial(ssd_pallas, chunk_size=8, y_dtype=y_dtype, config=config,
                           backward_config=backward_config, interpret=interpret, **static)

    def grads(x, dt, A, B, C, D, z, dt_bias, init):
        primal = lambda *a: fn(*a[:5], D=a[5], z=a[6], dt_bias=a[7], initial_state=a[8], seq_idx=seq_idx)  # noqa: E731
        return jax.vjp(primal, x, dt, A, B, C, D, z, dt_bias, init)[1](cot)

    got = jax.jit(grads)(*inputs)
    check_grads(got, ssd_reference_grads(inputs, static, seq_idx, cot), SSD_NAMES, inputs,
                TOL[jnp.dtype(dtype).name])


def test_ssd_backward_float32_plain():
    # no D / z / dt_bias / initial state / seq_idx; one group; l = 32, a multiple of the chunk 16 (no padding)
    check_ssd_vjp(1, b=2, l=32, h=2, p=4, g=1, n=3, dtype=jnp.float32, full=False, y_dtype=None, block_q=16,
                  interpret=True)


def test_ssd_backward_bfloat16_full():
    # bf16 x, B, C, z, y; every option; g = 2 groups of 2 heads; l = 37 with a chunk of 16
    check_ssd_vjp(2, b=2, l=37, h=4, p=3, g=2, n=5, dtype=jnp.bfloat16, full=True, y_dtype=jnp.bfloat16,
                  block_q=16, interpret=True)


def test_ssd_backward_after_the_mosaic_forward_at_head_dim_80():
    # the Mosaic forward (native_head_dim) runs head dim 80 as 80; the backward kernels take powers of two, so the
    # custom VJP pads the residuals and cotangents to 128 and slices the gradients back: against the reference VJP
    check_ssd_vjp(5, b=1, l=100, h=4, p=80, g=2, n=64, dtype=jnp.bfloat16, full=True, y_dtype=jnp.bfloat16,
                  block_q=64, interpret=True, config=MosaicSSDConfig(native_head_dim=True))


@pytest.mark.parametrize("p,block_p,padded", [(80, 16, 80), (80, 64, 128), (64, 32, 64)])
def test_ssd_backward_in_head_dim_blocks(p, block_p, padded, monkeypatch):
    # block_p cuts the head dim into blocks run as heads of their own (dt, A, D, dt_bias repeated, their
    # gradients summed back; dB, dC summed with the group's heads): the same gradients, every option on, bf16.
    # The Mosaic forward runs head dim 80 as 80, so block_p 16 takes it in five blocks with no padding.
    config = SSDBackwardConfig(block_q=16, block_p=block_p)
    assert backward_dims(p, 64, config)[0] == padded
    split = []
    blocks = triton_bwd._backward_in_head_dim_blocks
    monkeypatch.setattr(triton_bwd, "_backward_in_head_dim_blocks",
                        lambda x, *a, **k: split.append(x.shape[-1]) or blocks(x, *a, **k))
    check_ssd_vjp(6, b=2, l=37, h=4, p=p, g=2, n=64, dtype=jnp.bfloat16, full=True, y_dtype=jnp.bfloat16,
                  block_q=16, interpret=True, config=MosaicSSDConfig(native_head_dim=True), backward_config=config)
    assert split == [padded]  # the kernels ran at `padded`, in padded / block_p blocks
    with pytest.raises(ValueError, match="block_p must be a power of two"):
        SSDBackwardConfig(block_p=80)


def test_ssd_backward_option_routes():
    # backward="reference" keeps jax.vjp(ssd_chunked); the default runs the two backward kernels; bad values raise
    inputs, _, _, _ = ssd_case(3, b=1, l=8, h=2, p=4, g=1, n=4, dtype=jnp.float32, full=False)
    loss = lambda backward, x: ssd_pallas(x, *inputs[1:5], chunk_size=4, backward=backward,  # noqa: E731
                                          interpret=True)[0].sum()
    kernel = str(jax.make_jaxpr(jax.grad(functools.partial(loss, "pallas")))(inputs[0]))
    reference = str(jax.make_jaxpr(jax.grad(functools.partial(loss, "reference")))(inputs[0]))
    assert "ssd_bwd_states" in kernel and "ssd_bwd" in kernel
    assert "ssd_bwd_states" not in reference
    with pytest.raises(ValueError, match="backward must be one of"):
        ssd_pallas(*inputs[:5], chunk_size=4, backward="triton")


@pytest.mark.skipif(ON_GPU or pu.TritonParams is None, reason="checks the CUDA lowering from a CPU-only machine")
def test_backward_kernels_lower_for_triton(monkeypatch):
    # Pallas' Triton lowering (to the Triton IR a GPU would compile) runs without a GPU: it refuses
    # non-power-of-two arrays and primitives it has no rule for. Lower the gradients of both ops at a model-like
    # shape (p 64, n 128, bf16, every option) for CUDA, so CPU CI catches a kernel change that cannot compile.
    monkeypatch.setattr(pu, "on_gpu", lambda: True)  # compiled-mode paths: Triton params, interpret=False
    b, l, h, p, g, n = 2, 100, 4, 64, 2, 128
    inputs, static, seq_idx, cot = ssd_case(7, b=b, l=l, h=h, p=p, g=g, n=n, dtype=jnp.bfloat16, full=True,
                                            y_dtype=jnp.bfloat16)
    def ssd_grads(backward_config=None):
        return lambda *a: jax.vjp(
            lambda *a: ssd_pallas(*a[:5], chunk_size=64, D=a[5], z=a[6], dt_bias=a[7], initial_state=a[8],
                                  seq_idx=seq_idx, y_dtype=jnp.bfloat16, backward_config=backward_config,
                                  **static), *a)[1](cot)

    conv_in = (inputs[0].reshape(b, l, h * p), jnp.ones((h * p, 4), jnp.bfloat16), jnp.ones((h * p,), jnp.bfloat16),
               jnp.ones((b, h * p, 4), jnp.bfloat16))
    conv_grads = lambda *a: jax.vjp(  # noqa: E731
        lambda *a: causal_conv1d_pallas(*a[:3], initial_state=a[3], seq_idx=seq_idx), *a)[1](
        (conv_in[0], conv_in[3]))
    # the second: the head dim in blocks of 32 (block_p), the same two kernels at p 32
    for fn, args, kernels in ((ssd_grads(), inputs, ("ssd_bwd_states", "ssd_bwd")),
                              (ssd_grads(SSDBackwardConfig(block_p=32)), inputs, ("ssd_bwd_states", "ssd_bwd")),
                              (conv_grads, conv_in, ("causal_conv1d_bwd",))):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == len(kernels)  # the forward's outputs are unused: DCE'd
        assert all(f'"{name}"' in text for name in kernels)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("full", [False, True])
def test_ssd_backward_gpu(dtype, full):
    check_ssd_vjp(4, b=2, l=300, h=8, p=64, g=2, n=128, dtype=dtype, full=full,
                  y_dtype=jnp.bfloat16 if dtype == jnp.bfloat16 else None, block_q=64, interpret=False)


# --------------------------------------------------------------------------------------------------------------
# causal conv1d
# --------------------------------------------------------------------------------------------------------------


def check_conv_vjp(seed, *, b, l, c, k, dtype, full, activation, interpret):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    inputs = [f(b, l, c), f(c, k), f(c) if full else None, f(b, c, k) if full else None]
    seq_idx = seq_idx_for(b, l, [max(l // 3, 1), max(2 * l // 3, 2)]) if full and l > 2 else None
    cot = (f(b, l, c), f(b, c, k))

    def grads(x, w, bias, init):
        primal = functools.partial(causal_conv1d_pallas, activation=activation, seq_idx=seq_idx, interpret=interpret)
        return jax.vjp(lambda *a: primal(*a[:3], initial_state=a[3]), x, w, bias, init)[1](cot)

    got = jax.jit(grads)(*inputs)
    with jax.enable_x64(True):
        ref = lambda x, w, bias, init: causal_conv1d_ref(  # noqa: E731
            x, w, bias, activation=activation, initial_state=init, seq_idx=seq_idx)
        grads = jax.jit(lambda args, cot: jax.vjp(ref, *args)[1](cot))
        want = [None if a is None else np.asarray(a) for a in grads(list(map(as64, inputs)), tuple(map(as64, cot)))]
    check_grads(got, want, CONV_NAMES, inputs, TOL[jnp.dtype(dtype).name])


@pytest.mark.parametrize("l,c,k,dtype,full,activation", [
    (37, 24, 4, jnp.float64, True, "silu"),  # kernel math in float64: bias, initial state, seq_idx
    (3, 16, 4, jnp.float32, True, "silu"),  # l < k: the conv state's gradient reaches the initial state
    (70, 12, 3, jnp.bfloat16, False, None),  # two token blocks, odd k, no bias / state / activation
])
def test_conv1d_backward_interpret(l, c, k, dtype, full, activation):
    with jax.enable_x64(dtype == jnp.float64):
        check_conv_vjp(5, b=2, l=l, c=c, k=k, dtype=dtype, full=full, activation=activation, interpret=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("full", [False, True])
def test_conv1d_backward_gpu(dtype, full):
    check_conv_vjp(6, b=2, l=300, c=384, k=4, dtype=dtype, full=full, activation="silu", interpret=False)
