"""Fused Pallas SSD forward (GPU form): one kernel, one pass over x, B, C, z, no intermediates in HBM.

Upstream mamba_ssm runs the SSD forward as five Triton kernels that round-trip float32 chunk states and a float32
C.Bᵀ through device memory (docs: ../shared/research/performance_anchors.md §1.2). Here one program owns one
(head, batch row) and walks its sequence chunk by chunk, keeping the state [p, n] in registers (float32):

    for each chunk of q tokens (rows i, sources j; a = dt A, acum = chunk-local cumsum of a):
        Lm[i, j] = exp(acum_i - acum_j)   for j <= i in the same segment, else 0
        y        = ((C Bᵀ) * Lm * dt_j) x                       # intra-chunk, [q, q] @ [q, p]
                 + exp(acum_i) * (C stateᵀ)                     # the state entering the chunk, [q, n] @ [n, p]
                 + D x ;   y *= silu(z)
        state    = exp(acum_last) state + (x * dt_j exp(acum_last - acum_j))ᵀ B    # [p, q] @ [q, n]

(the four steps of `ssd_chunked`, fused per chunk). Bytes moved: x, B, C, z, dt once in; y and the final state
once out; plus two float32 scalars per (token, head) that XLA computes before the kernel (processed dt and the
chunk-local cumsum of dt A: cumsum does not lower in Pallas' GPU backends, and it is 3% of the traffic).

`block_q` (the kernel's chunk, 64 by default: a [q, q] float32 tile must fit in registers) is independent of
the model's `chunk_size`: the SSD result does not depend on the chunk length except through rounding.
Parallelism is b * h programs; each runs l / block_q chunk steps in sequence.

Numerics follow mamba_ssm: matmul operands in the input dtype (bf16 for bf16 inputs), float32 accumulation,
float32 state; every exp argument is <= 0. float32 inputs use IEEE float32 matmuls (no tf32).

The custom VJP's backward is the Pallas backward of `ssd_pallas_gpu_bwd` (a state pass and a reverse walk over
chunks, derivation in that module's docstring); `backward="reference"` (or a shape the compiled backward does not
handle, `ssd_backward_supported`) takes `jax.vjp` of `ssd_chunked` instead.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.ssd_pallas_gpu_bwd import (
    SSDBackwardConfig,
    default_backward_config,
    ssd_backward_pallas,
    ssd_backward_supported,
)
from easymamba.kernels.ssd_pallas_mgpu import MosaicSSDConfig, mgpu_supported, ssd_forward_mgpu
from easymamba.kernels.ssd_reference import _check_ssd_args, _process_dt, _segment_ids, ssd_chunked_vjp

__all__ = ["ssd_pallas", "SSDBlockConfig", "MosaicSSDConfig", "SSDBackwardConfig", "default_config", "ssd_supported",
           "mosaic_gpu_here"]

BACKWARDS = ("pallas", "reference")


@dataclasses.dataclass(frozen=True)
class SSDBlockConfig:
    """Tile and launch parameters of the fused SSD kernel (Triton backend on GPU)."""

    block_q: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_config(l: int, p: int, n: int, dtype):
    """The kernel form and tiles `ssd_pallas` uses when given no config, for length l, head dim p, state size n
    and operand dtype `dtype`.

    On a Hopper GPU (sm_90), compiled, for bf16 / f16 operands the Mosaic GPU form takes (`mgpu_supported`):
    `MosaicSSDConfig()`, measured 0.80-0.97x the Triton form's time at the four benchmark shapes
    (docs/benchmarks.md). Everywhere else the Triton form, measured on an H100: q 64 and 4 warps; 2 pipeline
    stages up to l 4096, 3 above (at l 8192 two stages cost 1.1-1.5x, at l 2048 three stages cost 1.1x).
    """
    if mosaic_gpu_here() and mgpu_supported(p, n, dtype):
        return MosaicSSDConfig()
    return SSDBlockConfig(block_q=64, num_warps=4, num_stages=2 if l <= 4096 else 3)


def mosaic_gpu_here() -> bool:
    """Whether the Mosaic GPU form compiles here: kernels compiled (not interpreted) on a Hopper GPU (wgmma is
    sm_90 only)."""
    cap = pu.gpu_capability()
    return not pu.interpret_mode() and cap is not None and cap[0] == 9


def ssd_supported(p: int, n: int) -> bool:
    """Shapes the compiled (Triton) kernel handles: p and n powers of two >= 16 (tensor-core matmul sides)."""
    return pu.is_pow2(p) and pu.is_pow2(n) and p >= 16 and n >= 16 and p * n <= 128 * 256


def _kernel(*refs, q, nchunks, has_D, has_z, has_init, has_seg, cdtype):
    refs = list(refs)
    x_ref, dt_ref, acum_ref, B_ref, C_ref = refs[:5]
    rest = refs[5:]
    D_ref = rest.pop(0) if has_D else None
    z_ref = rest.pop(0) if has_z else None
    init_ref = rest.pop(0) if has_init else None
    seg_ref = rest.pop(0) if has_seg else None
    y_ref, state_ref = rest

    p, n = state_ref.shape
    mm = x_ref.dtype if x_ref.dtype != jnp.float64 else cdtype  # matmul operand dtype
    row = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    causal = row >= col
    D = D_ref[...].astype(cdtype) if has_D else None

    # float32 operands: HIGHEST, else Triton's default for a float32 dot is tf32 (~5e-4 relative error)
    precision = lax.Precision.HIGHEST if jnp.dtype(mm) != jnp.bfloat16 else None

    def dot(a, b, contract):  # a @ b with the given contracting dims, accumulating in cdtype
        return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=cdtype)

    def step(c, carry):
        state, state_seg = carry  # [p, n] cdtype; segment id the state belongs to
        start = pl.multiple_of(c * q, q)
        s = pl.ds(start, q)
        x = x_ref[s, :]  # [q, p]
        Bm = B_ref[s, :]  # [q, n]
        Cm = C_ref[s, :]  # [q, n]
        dt = dt_ref[s].astype(cdtype)  # [q]
        acum = acum_ref[s].astype(cdtype)  # [q]
        last = acum_ref[start + q - 1].astype(cdtype)  # scalar: total log-decay of the chunk

        same = causal
        into = jnp.exp(acum)  # [q]: decay chunk start -> i
        to_end = jnp.exp(jnp.minimum(last - acum, 0.0))  # [q]: decay j -> chunk end
        keep = jnp.exp(last)  # scalar: decay of the entering state over the chunk
        if has_seg:
            seg = seg_ref[s]  # [q]
            seg_last = seg_ref[start + q - 1]
            same = same & (seg[:, None] == seg[None, :])
            into = jnp.where(seg == state_seg, into, 0.0)
            to_end = jnp.where(seg == seg_last, to_end, 0.0)
            keep = jnp.where(seg_last == state_seg, keep, 0.0)
            state_seg = seg_last

        CB = dot(Cm, Bm, ((1,), (1,)))  # [q, q]
        Lm = jnp.where(same, jnp.exp(jnp.minimum(acum[:, None] - acum[None, :], 0.0)), 0.0)  # [q, q]
        W = (CB * Lm * dt[None, :]).astype(mm)  # [q, q]
        y = dot(W, x, ((1,), (0,)))  # [q, p]
        y = y + into[:, None] * dot(Cm, state.astype(mm), ((1,), (1,)))  # [q, p]
        xs = x.astype(cdtype)
        if has_D:
            y = y + D * xs
        if has_z:
            zz = z_ref[s, :].astype(cdtype)
            y = y * zz * jax.nn.sigmoid(zz)
        y_ref[s, :] = y.astype(y_ref.dtype)

        xw = (xs * (dt * to_end)[:, None]).astype(mm)  # [q, p]
        state = keep * state + dot(xw, Bm, ((0,), (0,)))  # [p, n]
        return state, state_seg

    state0 = init_ref[...].astype(cdtype) if has_init else jnp.zeros((p, n), cdtype)
    state, _ = lax.fori_loop(0, nchunks, step, (state0, jnp.int32(0)))
    state_ref[...] = state.astype(state_ref.dtype)


def _forward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, *, dt_softplus, dt_limit, y_dtype, config):
    b, l, h, p = x.shape
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    q = config.block_q
    pad = (-l) % q
    lp = l + pad
    nchunks = lp // q

    def pad_l(a):
        return a if pad == 0 else jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

    # dt processing and the chunk-local cumsum in XLA: [b, lp, h] float32 each (padded dt = 0: a no-op step)
    dtp = pad_l(_process_dt(dt, dt_bias, dt_softplus, dt_limit, cdtype))  # [b, lp, h]
    acum = jnp.cumsum((dtp * A.astype(cdtype)).reshape(b, nchunks, q, h), axis=2).reshape(b, lp, h)
    seg = None
    if seq_idx is not None:
        seg = _segment_ids(seq_idx).astype(jnp.int32)
        seg = seg if pad == 0 else jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")  # padding joins the last segment
    x, B, C, z = pad_l(x), pad_l(B), pad_l(C), None if z is None else pad_l(z)
    if isinstance(config, MosaicSSDConfig):
        y, final_state = ssd_forward_mgpu(x, dtp, acum, B, C, D, z, initial_state, seg, y_dtype=y_dtype,
                                          config=config, interpret=pu.interpret_mode())
    else:
        y, final_state = _forward_triton(x, dtp, acum, B, C, D, z, initial_state, seg, y_dtype=y_dtype,
                                         config=config)
    return (y if pad == 0 else y[:, :l]), final_state


def _forward_triton(x, dtp, acum, B, C, D, z, initial_state, seg, *, y_dtype, config):
    b, lp, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    q = config.block_q
    nchunks = lp // q
    dtp, acum = jnp.swapaxes(dtp, 1, 2), jnp.swapaxes(acum, 1, 2)  # [b, h, lp]

    seq_spec = lambda *block: pl.BlockSpec(block, lambda hi, bi: (bi, 0, hi, 0))  # noqa: E731
    grp_spec = pl.BlockSpec((None, lp, None, n), lambda hi, bi: (bi, 0, hi // r, 0))
    in_specs = [
        seq_spec(None, lp, None, p),  # x
        pl.BlockSpec((None, None, lp), lambda hi, bi: (bi, hi, 0)),  # dt (processed)
        pl.BlockSpec((None, None, lp), lambda hi, bi: (bi, hi, 0)),  # acum
        grp_spec,  # B
        grp_spec,  # C
    ]
    args = [x, dtp, acum, B, C]
    if D is not None:
        in_specs.append(pl.BlockSpec((None,), lambda hi, bi: (hi,)))
        args.append(D)
    if z is not None:
        in_specs.append(seq_spec(None, lp, None, p))
        args.append(z)
    if initial_state is not None:
        in_specs.append(pl.BlockSpec((None, None, p, n), lambda hi, bi: (bi, hi, 0, 0)))
        args.append(initial_state)
    if seg is not None:
        in_specs.append(pl.BlockSpec((None, lp), lambda hi, bi: (bi, 0)))
        args.append(seg)

    kernel = functools.partial(
        _kernel, q=q, nchunks=nchunks, has_D=D is not None, has_z=z is not None,
        has_init=initial_state is not None, has_seg=seg is not None, cdtype=cdtype,
    )
    y, final_state = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, lp, h, p), y_dtype), jax.ShapeDtypeStruct((b, h, p, n), cdtype)),
        grid=(h, b),  # heads fastest, so the programs in flight share one batch row's B and C in L2
        in_specs=in_specs,
        out_specs=(seq_spec(None, lp, None, p), pl.BlockSpec((None, None, p, n), lambda hi, bi: (bi, hi, 0, 0))),
        compiler_params=pu.compiler_params(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=pu.interpret_mode(),
        name="ssd_fused_fwd",
    )(*args)
    return y, final_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static):
    dt_softplus, dt_limit, y_dtype, config, _, _ = static
    return _forward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus=dt_softplus,
                    dt_limit=dt_limit, y_dtype=y_dtype, config=config)


def _ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static):
    out = _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static)
    return out, (x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)


def _ssd_bwd(static, residuals, cotangents):
    dt_softplus, dt_limit, y_dtype, _, chunk_size, backward = static
    *diff, seq_idx = residuals
    x, B = diff[0], diff[3]
    if backward != "reference" and (pu.interpret_mode() or ssd_backward_supported(x.shape[3], B.shape[3])):
        dy, dfinal = cotangents
        grads = ssd_backward_pallas(*diff, seq_idx, dy, dfinal, dt_softplus=dt_softplus, dt_limit=dt_limit,
                                    config=backward)
        return (*grads, None)
    return ssd_chunked_vjp(diff, seq_idx, cotangents, chunk_size=chunk_size, dt_softplus=dt_softplus,
                           dt_limit=dt_limit, y_dtype=y_dtype)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int = 256,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit=(0.0, math.inf),
    initial_state=None,
    seq_idx=None,
    y_dtype=None,
    config: SSDBlockConfig | None = None,
    backward: str = "pallas",
    backward_config: SSDBackwardConfig | None = None,
):
    """The SSD forward as one fused Pallas kernel; same contract as `ssd_chunked` (shapes, dt rules, seq_idx,
    any l), returning (y [b, l, h, p], final_state [b, h, p, n]).

    y comes back in `y_dtype` (default: the compute dtype promote(x, float32), as the references do; pass
    x.dtype to halve the output bytes as mamba_ssm does); final_state in the compute dtype. `chunk_size` only
    sets the chunking of the backward (the reference's); the kernel's own chunk is `config.block_q`. The config's
    type picks the form: `SSDBlockConfig` the Triton form, `MosaicSSDConfig` the Mosaic GPU form (Hopper, bf16 /
    f16); None takes `default_config`, which picks the Mosaic form where it compiles.

    Gradients: `backward="pallas"` (default) runs the backward kernels of `ssd_pallas_gpu_bwd` with
    `backward_config` (`default_backward_config(l)` when None), falling back to the reference VJP for shapes the
    compiled backward does not handle; `backward="reference"` always takes `jax.vjp` of `ssd_chunked`.
    """
    _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_limit)
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    y_dtype = jnp.dtype(cdtype if y_dtype is None else y_dtype)
    config = default_config(x.shape[1], x.shape[3], B.shape[3], x.dtype) if config is None else config
    if isinstance(config, MosaicSSDConfig) and not mgpu_supported(x.shape[3], B.shape[3], x.dtype):
        raise ValueError(
            f"the Mosaic GPU SSD form (MosaicSSDConfig) takes bf16 / f16 x with head_dim and state size multiples "
            f"of 64 (<= 128 and <= 256); got x {x.dtype}, head_dim {x.shape[3]}, state size {B.shape[3]}"
        )
    if backward == "pallas":
        backward = default_backward_config(x.shape[1]) if backward_config is None else backward_config
    static = (bool(dt_softplus), (float(dt_limit[0]), float(dt_limit[1])), y_dtype, config, int(chunk_size),
              backward)
    return _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static)
