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

The entry point, `ssd_pallas` (`gpu.py` beside this file), does the dt processing, padding and custom VJP and
calls `forward_triton` here or the Mosaic GPU form (`mosaic_gpu.py`); the backward is `triton_bwd.py`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from easymamba.kernels import pallas_util as pu

__all__ = ["SSDBlockConfig", "ssd_supported", "kernel_dims", "forward_triton"]


@dataclasses.dataclass(frozen=True)
class SSDBlockConfig:
    """Tile and launch parameters of the fused SSD kernel (Triton backend on GPU)."""

    block_q: int = 64
    num_warps: int = 4
    num_stages: int = 2


def kernel_dims(p: int, n: int) -> tuple[int, int]:
    """The head dim and state size the kernels run at for a problem of head dim p and state size n: each rounded
    up to a power of two >= 16 (tensor-core matmul sides). `ssd_pallas` zero-pads x, z, D and the state along p,
    and B, C and the state along n, to these sizes and slices the results back; this is exact, since the SSD
    never mixes head-dim columns (column j of y and of the state reads column j of x alone) and a zero column of
    B and C adds nothing to any dot over n. Head dim 80 (Nemotron-H-Nano-9B-v2, Nemotron-3) runs at 128."""
    return pu.pow2_at_least(p, 16), pu.pow2_at_least(n, 16)


def ssd_supported(p: int, n: int) -> bool:
    """Shapes the compiled (Triton) kernel handles, padded to `kernel_dims`: any p, n whose padded state [p', n']
    is at most 128 * 256 elements (it lives in registers): every head dim up to 128 with state up to 256, and
    head dim up to 256 with state up to 128."""
    kp, kn = kernel_dims(p, n)
    return p >= 1 and n >= 1 and kp * kn <= 128 * 256


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


def forward_triton(x, dtp, acum, B, C, D, z, initial_state, seg, *, y_dtype, config, interpret: bool):
    """The Triton form's kernel on padded operands (dt processed, acum its chunk-local cumsum of dt A, seg the
    segment ids): returns (y [b, lp, h, p] in y_dtype, final_state [b, h, p, n])."""
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
        compiler_params=pu.compiler_params(num_warps=config.num_warps, num_stages=config.num_stages,
                                           interpret=interpret),
        interpret=interpret,
        name="ssd_fused_fwd",
    )(*args)
    return y, final_state
