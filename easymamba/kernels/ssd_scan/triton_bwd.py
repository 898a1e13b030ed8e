"""Pallas backward of the fused SSD (GPU form): two kernels and a little XLA, no atomics.

The forward (`triton.py`, same letters) computes per chunk of q tokens, per (head, batch row), with
a = dt A, acum the chunk-local cumsum of a, last = acum_{q-1}, S the [p, n] state entering the chunk:

    Lm[i, j] = exp(acum_i - acum_j) [j <= i, same segment]     into_i = exp(acum_i) [seg_i = seg(S)]
    W        = (C Bᵀ) * Lm * dt_j                              to_end_j = exp(last - acum_j) [seg_j = seg_last]
    u        = W x + into_i (C Sᵀ)_i + D x                     keep = exp(last) [seg_last = seg(S)]
    y        = u * silu(z)                                      S'   = keep S + (x * dt_j to_end_j)ᵀ B

Reverse-mode, per chunk, given dy [q, p] and dS' [p, n] (the cotangent of the state leaving the chunk):

    g        = dy * silu(z)                  dz = dy * u * silu'(z)           dD += Σ g * x
    dW       = g xᵀ                          P = dW * (C Bᵀ) * Lm             M = P * dt_j
    dx       = Wᵀ g + D g + (B dS'ᵀ) * (dt_j to_end_j)
    dC       = (dW * Lm * dt_j) B + into_i (g S)
    dB       = (dW * Lm * dt_j)ᵀ C + (x * dt_j to_end_j) dS'
    e_j      = Σ_p (B dS'ᵀ)[j] * x_j         (the cotangent of dt_j to_end_j)
    d(dt)_j  = Σ_i P[i, j] + e_j to_end_j    (the direct dependence; the one through a = dt A comes below)
    dacum    = Σ_j M[i, j] - Σ_i M[i, j] + into_i Σ_n C_i * (g S)_i - e_j dt_j to_end_j
               + [i = q-1] (Σ_j e_j dt_j to_end_j + keep Σ dS' * S)
    dS       = keep dS' + (into * g)ᵀ C      (the cotangent of the state entering the chunk)

Each masked factor (Lm, into, to_end, keep: zero across a seq_idx boundary) carries its mask into its
derivative, because every derivative above is written with the masked factor itself (d exp(v) = exp(v) dv);
the dS left after the first chunk is the initial state's gradient. The forward's `min(., 0)` clamps on the exp
arguments are identities here (acum is a running sum of a <= 0, so acum_i - acum_j <= 0 exactly for j <= i).

Kernels, one program per (head, batch row), grid (h, b) as the forward:
  1. `_states_kernel` walks chunks first to last and writes the state entering each chunk, [b, h, c * p, n] in
     the matmul operand dtype (bf16 for bf16 inputs, as the forward rounds the state before C Sᵀ; mamba_ssm
     stores its chunk states in the input dtype too). Recomputing them here, not saving them in the forward,
     keeps the custom VJP's residuals to the inputs (training memory) and the inference forward unchanged.
  2. `_bwd_kernel` walks chunks last to first carrying dS [p, n] in float32 and writes dx, dz, per-head dB and
     dC, and three per-(token, head) float32 rows: d(dt) (direct), d(acum), Σ_p g x (for dD). With z it
     recomputes u (two more matmuls) instead of saving it in the forward.
Then XLA finishes: the VJP of the dt preprocessing (dt_bias, softplus, clip, padding, the chunk-local cumsum of
dt A, i.e. a reverse cumsum) turns d(dt) and d(acum) into d(dt_raw), dA, d(dt_bias); sums over b and l give dD;
per-head dB and dC are summed over the heads of a group (float32 partials [b, l, h, n] when h > g, or input-dtype
ones: `SSDBackwardConfig.input_dtype_partials`). Every
reduction is an XLA reduction or a loop inside one program: results are bitwise run-to-run deterministic.

Numerics as the forward: matmul operands in the input dtype (bf16 for bf16 inputs; the cotangents g, dW * Lm * dt
and dS' are rounded to it before their matmuls), float32 accumulation, float32 dS carry; float32 inputs use IEEE
float32 dots. float64 inputs (x64, interpret mode) run every step in float64: that is how the derivation above
is checked against `jax.vjp(ssd_chunked)` to ~1e-12 (tests/test_kernels_backward.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.ssd_scan.reference import _process_dt, _segment_ids

__all__ = ["SSDBackwardConfig", "backward_dims", "default_backward_config", "ssd_backward_supported",
           "ssd_backward_pallas"]


@dataclasses.dataclass(frozen=True)
class SSDBackwardConfig:
    """Tile and launch parameters of the two backward kernels (Triton backend on GPU). `block_q` is the chunk of
    both (the states are stored at its boundaries); the reverse kernel holds more [q, q] and [q, n] tiles live
    than the forward (dS, dW, P, M besides the forward's tiles), so its chunk and warps are separate knobs. The
    defaults are the H100 sweep's best (benchmarks/ssd_backward.py, docs/benchmarks.md): q 32 with 4 warps; q 64
    spills and runs 1.1-1.7x slower, 2 warps or q 16 run 10x slower."""

    block_q: int = 32
    num_warps: int = 4
    num_stages: int = 1
    states_num_warps: int = 4
    states_num_stages: int = 2
    # With h > g, dB and dC leave the reverse kernel per head ([b, l, h, n], summed over a group's heads by XLA),
    # the largest intermediate of the backward. True: the partials in the input dtype (for bf16 inputs half the
    # bytes; each partial rounded to 2^-9 relative before the float32 sum, the same size as the rounding of the
    # bf16 gradient itself). False: float32 partials. float32 inputs get float32 partials either way.
    input_dtype_partials: bool = True
    # Head-dim block: with p > block_p, the head dim is cut into p / block_p blocks, each run as a head of its
    # own (the SSD never mixes head-dim columns; dt, A, D, dt_bias are repeated per block and their gradients
    # summed back, dB and dC summed with the group's heads). Each program then holds a [block_p, n] state and its
    # cotangent instead of [p, n]: at p x n = 128 x 128 (head dim 80, padded) 4 warps would need 256 registers a
    # thread for them. It costs C Bᵀ recomputed per block. None: the whole head dim in one program.
    block_p: int | None = None

    def __post_init__(self):
        if self.block_p is not None and not (pu.is_pow2(self.block_p) and self.block_p >= 16):
            raise ValueError(f"block_p must be a power of two >= 16 or None, got {self.block_p}")


def backward_dims(p: int, n: int, config: SSDBackwardConfig) -> tuple[int, int]:
    """The head dim and state size `ssd_backward_pallas` takes for a problem of head dim p and state size n: n a
    power of two >= 16; p a power of two >= 16, or with `config.block_p` below that, p rounded up to a multiple of
    block_p (head dim 80 at block_p 16: 80, five blocks; at 64: 128, two)."""
    kp = pu.pow2_at_least(p, 16)
    if config.block_p is not None and config.block_p < kp:
        kp = pu.round_up(p, config.block_p)
    return kp, pu.pow2_at_least(n, 16)


def default_backward_config(l: int) -> SSDBackwardConfig:
    """Measured on an H100 (docs/benchmarks.md, 2.7B/130M/Codestral shapes): one pipeline stage up to l 4096,
    three above (at l 8192: 8.5 ms vs 8.9 with one stage; at l 2048: 7.3 ms vs 8.2 with two)."""
    return SSDBackwardConfig(num_stages=1 if l <= 4096 else 3)


def ssd_backward_supported(p: int, n: int) -> bool:
    """Shapes the compiled backward handles: p and n powers of two >= 16, and the state plus its float32
    cotangent ([p, n] each) small enough to stay in registers (p * n <= 64 * 256); larger states take the
    reference VJP."""
    return pu.is_pow2(p) and pu.is_pow2(n) and p >= 16 and n >= 16 and p * n <= 64 * 256


def _dot_fn(mm, cdtype):
    # float32 operands: HIGHEST, else Triton's default for a float32 dot is tf32 (~5e-4 relative error)
    precision = lax.Precision.HIGHEST if jnp.dtype(mm) != jnp.bfloat16 else None

    def dot(a, b, contract):  # a @ b with the given contracting dims, accumulating in cdtype
        return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=cdtype)

    return dot


def _chunk_factors(acum_ref, seg_ref, start, q, state_seg, has_seg, cdtype):
    """The forward's per-chunk decay factors, masked for seq_idx: (acum [q], Lm mask [q, q], into [q],
    to_end [q], keep scalar, seg_last)."""
    acum = acum_ref[pl.ds(start, q)].astype(cdtype)  # [q]
    last = acum_ref[start + q - 1].astype(cdtype)  # scalar
    row = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    same = row >= col
    into = jnp.exp(acum)  # [q]
    to_end = jnp.exp(jnp.minimum(last - acum, 0.0))  # [q]
    keep = jnp.exp(last)
    seg_last = state_seg
    if has_seg:
        seg = seg_ref[pl.ds(start, q)]  # [q]
        seg_last = seg_ref[start + q - 1]
        same = same & (seg[:, None] == seg[None, :])
        into = jnp.where(seg == state_seg, into, 0.0)
        to_end = jnp.where(seg == seg_last, to_end, 0.0)
        keep = jnp.where(seg_last == state_seg, keep, 0.0)
    return acum, same, into, to_end, keep, seg_last


# --------------------------------------------------------------------------------------------------------------
# Kernel 1: the state entering each chunk
# --------------------------------------------------------------------------------------------------------------


def _states_kernel(*refs, q, nchunks, has_init, has_seg, cdtype):
    refs = list(refs)
    x_ref, dt_ref, acum_ref, B_ref = refs[:4]
    rest = refs[4:]
    init_ref = rest.pop(0) if has_init else None
    seg_ref = rest.pop(0) if has_seg else None
    (states_ref,) = rest  # [c * p, n]

    p, n = x_ref.shape[1], B_ref.shape[1]
    mm = x_ref.dtype if x_ref.dtype != jnp.float64 else cdtype
    dot = _dot_fn(mm, cdtype)

    def step(c, carry):
        state, state_seg = carry  # [p, n] cdtype; the segment it belongs to
        states_ref[pl.ds(pl.multiple_of(c * p, p), p), :] = state.astype(states_ref.dtype)
        start = pl.multiple_of(c * q, q)
        s = pl.ds(start, q)
        _, _, _, to_end, keep, seg_last = _chunk_factors(acum_ref, seg_ref, start, q, state_seg, has_seg, cdtype)
        dt = dt_ref[s].astype(cdtype)  # [q]
        xw = (x_ref[s, :].astype(cdtype) * (dt * to_end)[:, None]).astype(mm)  # [q, p]
        state = keep * state + dot(xw, B_ref[s, :], ((0,), (0,)))  # [p, n]
        return state, seg_last

    state0 = init_ref[...].astype(cdtype) if has_init else jnp.zeros((p, n), cdtype)
    lax.fori_loop(0, nchunks, step, (state0, jnp.int32(0)))


# --------------------------------------------------------------------------------------------------------------
# Kernel 2: the reverse walk
# --------------------------------------------------------------------------------------------------------------


def _bwd_kernel(*refs, q, nchunks, has_D, has_z, has_init, has_seg, cdtype):
    refs = list(refs)
    x_ref, dt_ref, acum_ref, B_ref, C_ref, states_ref, dy_ref, dfinal_ref = refs[:8]
    rest = refs[8:]
    D_ref = rest.pop(0) if has_D else None
    z_ref = rest.pop(0) if has_z else None
    seg_ref = rest.pop(0) if has_seg else None
    dx_ref, dB_ref, dC_ref, ddt_ref, dacum_ref = rest[:5]
    rest = rest[5:]
    dD_ref = rest.pop(0) if has_D else None
    dz_ref = rest.pop(0) if has_z else None
    dinit_ref = rest.pop(0) if has_init else None

    p, n = dfinal_ref.shape
    mm = x_ref.dtype if x_ref.dtype != jnp.float64 else cdtype
    dot = _dot_fn(mm, cdtype)
    D = D_ref[...].astype(cdtype) if has_D else None
    is_last = lax.broadcasted_iota(jnp.int32, (q,), 0) == q - 1

    def step(i, dS):  # dS [p, n] cdtype: the cotangent of the state leaving chunk c
        c = nchunks - 1 - i
        start = pl.multiple_of(c * q, q)
        s = pl.ds(start, q)
        # the state entering chunk c belongs to the segment of the token before it (segment 0 for chunk 0)
        state_seg = seg_ref[jnp.maximum(start - 1, 0)] if has_seg else jnp.int32(0)
        acum, same, into, to_end, keep, _ = _chunk_factors(acum_ref, seg_ref, start, q, state_seg, has_seg, cdtype)
        x = x_ref[s, :]  # [q, p]
        Bm = B_ref[s, :]  # [q, n]
        Cm = C_ref[s, :]  # [q, n]
        dt = dt_ref[s].astype(cdtype)  # [q]
        S = states_ref[pl.ds(pl.multiple_of(c * p, p), p), :]  # [p, n], matmul dtype
        dy = dy_ref[s, :].astype(cdtype)  # [q, p]
        xs = x.astype(cdtype)

        CB = dot(Cm, Bm, ((1,), (1,)))  # [q, q]
        Lm = jnp.where(same, jnp.exp(jnp.minimum(acum[:, None] - acum[None, :], 0.0)), 0.0)  # [q, q]
        CBL = CB * Lm
        Wm = (CBL * dt[None, :]).astype(mm)  # [q, q]: the forward's intra-chunk matrix, as it rounded it
        if has_z:  # recompute u, the output before the gate
            u = dot(Wm, x, ((1,), (0,))) + into[:, None] * dot(Cm, S.astype(mm), ((1,), (1,)))  # [q, p]
            if has_D:
                u = u + D * xs
            zz = z_ref[s, :].astype(cdtype)
            sig = jax.nn.sigmoid(zz)
            g = dy * zz * sig  # [q, p]
            dz_ref[s, :] = (dy * u * sig * (1.0 + zz * (1.0 - sig))).astype(dz_ref.dtype)
        else:
            g = dy
        gm = g.astype(mm)

        # output from the entering state: u += into_i (C Sᵀ)_i
        gS = dot(gm, S.astype(mm), ((1,), (0,)))  # [q, n]
        dC = into[:, None] * gS  # [q, n]
        dacum = into * jnp.sum(Cm.astype(cdtype) * gS, axis=1)  # [q]

        # intra-chunk output: u += W x with W = (C Bᵀ) * Lm * dt_j
        dW = dot(gm, x, ((1,), (1,)))  # [q, q]
        P = dW * CBL  # [q, q]
        ddt = jnp.sum(P, axis=0)  # [q]
        M = P * dt[None, :]
        dacum = dacum + jnp.sum(M, axis=1) - jnp.sum(M, axis=0)
        dCB = (dW * Lm * dt[None, :]).astype(mm)  # [q, q]
        dC = dC + dot(dCB, Bm, ((1,), (0,)))  # [q, n]
        dB = dot(dCB, Cm, ((0,), (0,)))  # [q, n]
        dx = dot(Wm, gm, ((0,), (0,)))  # [q, p]: Wᵀ g
        if has_D:
            dx = dx + D * g
            dD_ref[s] = jnp.sum(g * xs, axis=1).astype(dD_ref.dtype)

        # state update: S' = keep S + (x * dt_j to_end_j)ᵀ B
        dSm = dS.astype(mm)
        dxw = dot(Bm, dSm, ((1,), (1,)))  # [q, p]
        wj = dt * to_end  # [q]
        dx = dx + dxw * wj[:, None]
        dB = dB + dot((xs * wj[:, None]).astype(mm), dSm, ((1,), (0,)))  # [q, n]
        e = jnp.sum(dxw * xs, axis=1)  # [q]
        ddt = ddt + e * to_end
        et = e * wj
        dlast = jnp.sum(et) + keep * jnp.sum(dS * S.astype(cdtype))
        dacum = dacum - et + jnp.where(is_last, dlast, 0.0)

        dx_ref[s, :] = dx.astype(dx_ref.dtype)
        dB_ref[s, :] = dB.astype(dB_ref.dtype)
        dC_ref[s, :] = dC.astype(dC_ref.dtype)
        ddt_ref[s] = ddt.astype(ddt_ref.dtype)
        dacum_ref[s] = dacum.astype(dacum_ref.dtype)
        return keep * dS + dot((into[:, None] * g).astype(mm), Cm, ((0,), (0,)))  # [p, n]

    dS = lax.fori_loop(0, nchunks, step, dfinal_ref[...].astype(cdtype))
    if has_init:
        dinit_ref[...] = dS.astype(dinit_ref.dtype)


# --------------------------------------------------------------------------------------------------------------
# The backward
# --------------------------------------------------------------------------------------------------------------


def chunked_dt(dt, A, dt_bias, *, q, dt_softplus, dt_limit, cdtype):
    """The kernels' dt inputs, as the forward makes them: (processed dt, chunk-local cumsum of dt A), each
    [b, h, lp] in cdtype, lp = l rounded up to a multiple of q, padded with dt = 0 (an exact no-op step)."""
    b, l, h = dt.shape
    pad = (-l) % q
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit, cdtype)  # [b, l, h]
    dtp = jnp.pad(dtp, [(0, 0), (0, pad), (0, 0)])  # [b, lp, h]
    lp = l + pad
    acum = jnp.cumsum((dtp * A.astype(cdtype)).reshape(b, lp // q, q, h), axis=2).reshape(b, lp, h)
    return jnp.swapaxes(dtp, 1, 2), jnp.swapaxes(acum, 1, 2)  # [b, h, lp] each


def ssd_backward_pallas(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dy, dfinal, *, dt_softplus,
                        dt_limit, config: SSDBackwardConfig | None = None, interpret: bool | None = None):
    """Gradients of `ssd_pallas`'s (y, final_state) with respect to (x, dt, A, B, C, D, z, dt_bias,
    initial_state), given their cotangents dy [b, l, h, p] and dfinal [b, h, p, n]; None for absent inputs.
    Each gradient comes back in its input's dtype. Arguments as `ssd_chunked` (already validated). `interpret`:
    Pallas' interpreter (None: compiled on a GPU, interpreted elsewhere)."""
    interpret = pu.default_interpret(interpret)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    mm = x.dtype if x.dtype != jnp.float64 else cdtype
    config = default_backward_config(l) if config is None else config
    if config.block_p is not None and p > config.block_p:
        return _backward_in_head_dim_blocks(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dy, dfinal,
                                            dt_softplus=dt_softplus, dt_limit=dt_limit, config=config,
                                            interpret=interpret)
    q = config.block_q
    pad = (-l) % q
    lp = l + pad
    nchunks = lp // q

    def pad_l(a):
        return a if pad == 0 else jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

    prep = functools.partial(chunked_dt, q=q, dt_softplus=dt_softplus, dt_limit=dt_limit, cdtype=cdtype)
    (dtp, acum), prep_vjp = jax.vjp(prep, dt, A, dt_bias)
    seg = None
    if seq_idx is not None:
        seg = _segment_ids(seq_idx).astype(jnp.int32)
        seg = seg if pad == 0 else jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")  # padding joins the last segment

    seq_spec = lambda last: pl.BlockSpec((None, lp, None, last), lambda hi, bi: (bi, 0, hi, 0))  # noqa: E731
    row_spec = pl.BlockSpec((None, None, lp), lambda hi, bi: (bi, hi, 0))
    grp_spec = pl.BlockSpec((None, lp, None, n), lambda hi, bi: (bi, 0, hi // r, 0))
    pn_spec = pl.BlockSpec((None, None, p, n), lambda hi, bi: (bi, hi, 0, 0))
    states_spec = pl.BlockSpec((None, None, nchunks * p, n), lambda hi, bi: (bi, hi, 0, 0))
    seg_spec = pl.BlockSpec((None, lp), lambda hi, bi: (bi, 0))
    xp, Bp, Cp = pad_l(x), pad_l(B), pad_l(C)
    has_init, has_seg = initial_state is not None, seq_idx is not None

    # 1. the state entering each chunk
    in_specs = [seq_spec(p), row_spec, row_spec, grp_spec]
    args = [xp, dtp, acum, Bp]
    if has_init:
        in_specs.append(pn_spec)
        args.append(initial_state)
    if has_seg:
        in_specs.append(seg_spec)
        args.append(seg)
    states = pl.pallas_call(
        functools.partial(_states_kernel, q=q, nchunks=nchunks, has_init=has_init, has_seg=has_seg, cdtype=cdtype),
        out_shape=jax.ShapeDtypeStruct((b, h, nchunks * p, n), mm),
        grid=(h, b),
        in_specs=in_specs,
        out_specs=states_spec,
        compiler_params=pu.compiler_params(num_warps=config.states_num_warps, num_stages=config.states_num_stages,
                                           interpret=interpret),
        interpret=interpret,
        name="ssd_bwd_states",
    )(*args)

    # 2. the reverse walk
    in_specs = [seq_spec(p), row_spec, row_spec, grp_spec, grp_spec, states_spec, seq_spec(p), pn_spec]
    args = [xp, dtp, acum, Bp, Cp, states, pad_l(dy), dfinal]
    # per-head dB, dC, summed over the heads of a group below
    part_dtype = B.dtype if r == 1 or config.input_dtype_partials else cdtype
    out_shape = [jax.ShapeDtypeStruct((b, lp, h, p), x.dtype), jax.ShapeDtypeStruct((b, lp, h, n), part_dtype),
                 jax.ShapeDtypeStruct((b, lp, h, n), part_dtype), jax.ShapeDtypeStruct((b, h, lp), cdtype),
                 jax.ShapeDtypeStruct((b, h, lp), cdtype)]
    out_specs = [seq_spec(p), seq_spec(n), seq_spec(n), row_spec, row_spec]
    if D is not None:
        in_specs.append(pl.BlockSpec((None,), lambda hi, bi: (hi,)))
        args.append(D)
        out_shape.append(jax.ShapeDtypeStruct((b, h, lp), cdtype))
        out_specs.append(row_spec)
    if z is not None:
        in_specs.append(seq_spec(p))
        args.append(pad_l(z))
        out_shape.append(jax.ShapeDtypeStruct((b, lp, h, p), z.dtype))
        out_specs.append(seq_spec(p))
    if has_seg:
        in_specs.append(seg_spec)
        args.append(seg)
    if has_init:
        out_shape.append(jax.ShapeDtypeStruct((b, h, p, n), cdtype))
        out_specs.append(pn_spec)
    kernel = functools.partial(_bwd_kernel, q=q, nchunks=nchunks, has_D=D is not None, has_z=z is not None,
                               has_init=has_init, has_seg=has_seg, cdtype=cdtype)
    outs = list(pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(h, b),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        compiler_params=pu.compiler_params(num_warps=config.num_warps, num_stages=config.num_stages,
                                           interpret=interpret),
        interpret=interpret,
        name="ssd_bwd",
    )(*args))
    dx, dB_h, dC_h, ddtp, dacum = outs[:5]
    outs = outs[5:]
    dD_rows = outs.pop(0) if D is not None else None
    dz = outs.pop(0) if z is not None else None
    dinit = outs.pop(0) if has_init else None

    # 3. XLA: the dt chain rule (reverse cumsum, softplus / clip / bias), sums over b, l and a group's heads
    ddt, dA, ddt_bias = prep_vjp((ddtp, dacum))
    unpad = lambda a: a if pad == 0 else a[:, :l]  # noqa: E731
    if r == 1:
        dB, dC = unpad(dB_h), unpad(dC_h).astype(C.dtype)
    else:
        dB = unpad(dB_h).reshape(b, l, g, r, n).sum(3, dtype=cdtype).astype(B.dtype)
        dC = unpad(dC_h).reshape(b, l, g, r, n).sum(3, dtype=cdtype).astype(C.dtype)
    dD = None if D is None else dD_rows.sum(axis=(0, 2)).astype(D.dtype)
    dz = None if z is None else unpad(dz)
    dinit = None if dinit is None else dinit.astype(initial_state.dtype)
    return unpad(dx), ddt, dA, dB, dC, dD, dz, ddt_bias, dinit


def _backward_in_head_dim_blocks(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dy, dfinal, *, config,
                                 **kw):
    """`ssd_backward_pallas` with the head dim cut into `config.block_p` blocks, each a head of its own
    (`SSDBackwardConfig.block_p` says why); p must be a multiple of block_p (`backward_dims`)."""
    b, l, h, p = x.shape
    n, bp = B.shape[3], config.block_p
    if p % bp:
        raise ValueError(f"head dim {p} is not a multiple of block_p {bp}: pad it to backward_dims(p, n, config)")
    s = p // bp
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    heads = lambda a: None if a is None else a.reshape(*a.shape[:-2], h * s, bp)  # noqa: E731  [.., h, p]
    state = lambda a: None if a is None else a.reshape(b, h * s, bp, n)  # noqa: E731  [b, h, p, n]
    rep = lambda a: None if a is None else jnp.repeat(a, s, axis=-1)  # noqa: E731  [.., h] per block
    grads = ssd_backward_pallas(heads(x), rep(dt), rep(A), B, C, rep(D), heads(z), rep(dt_bias), state(initial_state),
                                seq_idx, heads(dy), state(dfinal), config=dataclasses.replace(config, block_p=None),
                                **kw)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = grads

    def fold(a):  # a per-block gradient of a per-head input [.., h * s] -> [.., h], summed over the blocks
        return None if a is None else a.reshape(*a.shape[:-1], h, s).sum(-1, dtype=cdtype).astype(a.dtype)

    unheads = lambda a: None if a is None else a.reshape(*a.shape[:-2], h, p)  # noqa: E731
    return (unheads(dx), fold(ddt), fold(dA), dB, dC, fold(dD), unheads(dz), fold(ddt_bias),
            None if dinit is None else dinit.reshape(b, h, p, n))
