"""Fused SSD forward, Mosaic GPU form (Hopper, sm_90): the chunk walk of `triton.py`, written for TMA and wgmma.

Same algorithm and bytes as the Triton form (one program per (head, batch row), the state on chip across the
walk, x / B / C / z / dt read once, y and the final state written once), different machinery:

* the chunk tiles arrive by TMA into a ring of `num_slots` shared-memory slots, the copy for chunk c + slots - 1
  issued before chunk c is computed, each completing on its own barrier;
* the three matmuls of a chunk are warpgroup MMAs (bf16 / f16 operands, float32 accumulators); the state is
  kept transposed, Sᵀ [n, p] float32 in registers, so no operand needs a transposed shared-memory view:

      CB   = C @ Bᵀ                       wgmma  A = C [q, n] (smem), B = Bᵀ [n, q] (smem)
      y    = exp(acum_i) (C @ Sᵀ)         wgmma  A = C,               B = Sᵀ as bf16 [n, p] (smem)
      y   += (CB * L * dt_j) @ x          wgmma  A = W [q, q] (registers), B = x [q, p] (smem)
      Sᵀ   = exp(acum_last) Sᵀ + Bᵀ @ xw  wgmma  A = Bᵀ [n, q] (smem),    B = xw [q, p] (smem)

  with xw = x * dt_j exp(acum_last - acum_j). Bᵀ comes from a [b, g, n, l] copy of B made by XLA (B is
  n / (h p / g) of x's bytes: 2.5% at the 2.7B shape), and the final state is written [n, p] and swapped back
  by XLA.
* per-token scalars (processed dt and the chunk-local cumsum of dt A, plus the segment masks when `seq_idx` is
  given) are computed by XLA, as in the Triton form, and packed [b, h, chunk, rows, q] so one TMA brings them.

y is rounded to `y_dtype` in shared memory and stored by TMA (one buffer). Only bf16 / f16 x, B, C (the
matmul operand dtype) take this form; p must be a multiple of 16 up to 128 and n a multiple of 64 up to 256
(wgmma tiles). The product pairs tie C, Bᵀ, Sᵀ and x to one shared-memory swizzle, the widest their rows allow
(128 bytes at p 64 or 128; 32 at head dim 80, whose rows are 160 bytes).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from easymamba.kernels import pallas_util as pu

try:  # Mosaic GPU ships with every jaxlib >= 0.9; guard unusual builds
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

try:  # the GPU interpreter (TMA, barriers, wgmma on the CPU); its import path is private in jax 0.10-0.11
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover
    InterpretGPUParams = None

__all__ = ["MosaicSSDConfig", "mgpu_dims", "mgpu_supported", "ssd_forward_mgpu"]

# rows of the packed per-token scalars
_ACUM, _DT, _SEG, _INTO_MASK, _IN_MASK, _KEEP_MASK = range(6)


@dataclasses.dataclass(frozen=True)
class MosaicSSDConfig:
    """Tile and pipeline parameters of the Mosaic GPU SSD kernel."""

    block_q: int = 64
    num_slots: int = 2
    approx_math: bool = True  # exp through the approximate ex2 unit (error ~1e-7 relative, far under bf16's)
    overlap: bool = True  # y's epilogue (D, gate, store) runs while the state update's wgmma does
    # True: a head dim that is a multiple of 16 runs at its own size (head dim 80 as 80, its tiles swizzled at 32
    # bytes); False: padded to a power of two (80 at 128) like the Triton form. False until timed on a GPU: the
    # native tiles are checked interpreted and by lowering on the CPU only (docs/kernels.md)
    native_head_dim: bool = False

    def __post_init__(self):
        if self.block_q not in (64, 128):
            raise ValueError(f"block_q must be 64 or 128 (a wgmma M tile), got {self.block_q}")
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")


def mgpu_dims(p: int, n: int, config: MosaicSSDConfig = MosaicSSDConfig()) -> tuple[int, int]:
    """The head dim and state size this form runs at for a problem of head dim p and state size n: n rounded up
    to a power of two >= 16; p likewise, or with `config.native_head_dim` to a multiple of 16 (a wgmma N side and
    one 32-byte swizzle row of 16-bit values: head dim 80 runs at 80). `ssd_pallas` zero-pads to these sizes
    (exact: `triton.kernel_dims` says why)."""
    kp = pu.round_up(p, 16) if config.native_head_dim else pu.pow2_at_least(p, 16)
    return kp, pu.pow2_at_least(n, 16)


def mgpu_supported(p: int, n: int, dtype, config: MosaicSSDConfig = MosaicSSDConfig()) -> bool:
    """Shapes and dtypes this form compiles: 16-bit operands, p and n padded to `mgpu_dims` with p <= 128, n a
    multiple of 64 (the state update's wgmma M tile) up to 256, and the float32 state Sᵀ [n, p], held in the
    registers of one warpgroup, at most 128 x 128 (128 registers a thread; p 128 with n 256 would also overflow
    shared memory: 280 KB)."""
    kp, kn = mgpu_dims(p, n, config)
    return (
        plgpu is not None
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and kp <= 128 and kn % 64 == 0 and kn <= 256 and kp * kn <= 128 * 128
    )


def _smem(shape, dtype, swizzle=None):
    """Shared memory laid out as TMA and wgmma want it: 8-row tiles, rows swizzled at `swizzle` bytes (None: the
    widest width that fits)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = swizzle or plgpu.find_swizzle(shape[-1] * itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _body(*refs, q, nchunks, r, nslots, overlap, has_D, has_z, has_init, has_seg, interpret):
    refs = list(refs)
    x_g, bt_g, c_g, v_g = refs[:4]
    rest = refs[4:]
    d_g = rest.pop(0) if has_D else None
    z_g = rest.pop(0) if has_z else None
    init_g = rest.pop(0) if has_init else None
    y_g, st_g = rest
    p, n = x_g.shape[-1], c_g.shape[-1]
    mm = x_g.dtype
    f32 = jnp.float32
    hi = lax.axis_index("h")
    bi = lax.axis_index("b")
    gi = lax.div(hi, jnp.int32(r))
    row = plgpu.Layout.WGMMA.reduce(1)  # a vector indexed by an accumulator's row
    col = plgpu.Layout.WGMMA.reduce(0)  # ... by its column

    def cast(v, layout):  # register layouts mean nothing to the GPU interpreter, which has no rule for the cast
        return v if interpret else plgpu.layout_cast(v, layout)

    def iota(dim):
        return lax.broadcasted_iota(jnp.int32, (q, q), dim) if interpret else plgpu.broadcasted_iota(
            jnp.int32, (q, q), dim, layout=plgpu.Layout.WGMMA)

    def rows(v, shape):
        return lax.broadcast_in_dim(v, shape, [0])

    def cols(v, shape):
        return lax.broadcast_in_dim(v, shape, [1])

    ninputs = 5 if has_z else 4

    # Three scopes one after another, so the float32 state buffer of the first and last reuses the loop's
    # shared memory: at n 128, p 64 the loop needs ~105 KB, so two programs fit on one SM.
    def load_state(st_s, bar):
        if not has_init:
            return cast(jnp.zeros((n, p), f32), plgpu.Layout.WGMMA)
        plgpu.copy_gmem_to_smem(init_g.at[bi, hi], st_s, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        return st_s[...]  # [n, p] float32, WGMMA layout

    def store_state(st_s, state):
        st_s[...] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_s, st_g.at[bi, hi])
        plgpu.wait_smem_to_gmem(0)

    def walk(state, bars, x_s, bt_s, c_s, v_s, z_s, y_s, sb_s, w_s):
        def issue(c, slot):
            tok = pl.ds(c * q, q)
            plgpu.copy_gmem_to_smem(x_g.at[bi, tok, hi], x_s.at[slot], bars[0].at[slot])
            plgpu.copy_gmem_to_smem(bt_g.at[bi, gi, :, tok], bt_s.at[slot], bars[1].at[slot])
            plgpu.copy_gmem_to_smem(c_g.at[bi, tok, gi], c_s.at[slot], bars[2].at[slot])
            plgpu.copy_gmem_to_smem(v_g.at[bi, hi, c], v_s.at[slot], bars[3].at[slot])
            if has_z:
                plgpu.copy_gmem_to_smem(z_g.at[bi, tok, hi], z_s.at[slot], bars[4].at[slot])

        for c0 in range(min(nslots - 1, nchunks)):  # fill the ring
            issue(c0, c0)
        D = d_g[hi].astype(f32) if has_D else None
        sb_s[...] = state.astype(mm)
        plgpu.commit_smem()
        causal = iota(0) >= iota(1)

        def step(c, state):
            slot = lax.rem(c, jnp.int32(nslots))
            if nslots > 1:
                ahead = c + (nslots - 1)

                @pl.when(ahead < nchunks)
                def _prefetch():
                    issue(ahead, lax.rem(ahead, jnp.int32(nslots)))
            else:
                issue(c, slot)
            for bar in bars[:ninputs]:
                plgpu.barrier_wait(bar.at[slot])
            xs, bts, cs, vs = x_s.at[slot], bt_s.at[slot], c_s.at[slot], v_s.at[slot]
            y_out = y_g.at[bi, pl.ds(c * q, q), hi]

            acum_r = cast(vs[_ACUM], row)
            acum_c = cast(vs[_ACUM], col)
            dt_r = cast(vs[_DT], row)
            dt_c = cast(vs[_DT], col)
            last = vs[_ACUM, q - 1]  # total log-decay of the chunk (scalar)

            same = causal
            into = jnp.exp(acum_r)  # decay chunk start -> i
            to_end = dt_r * jnp.exp(jnp.minimum(last - acum_r, 0.0))  # dt_j x decay j -> chunk end
            keep = jnp.exp(last)  # decay of the entering state over the chunk
            if has_seg:
                seg_r = cast(vs[_SEG], row)
                seg_c = cast(vs[_SEG], col)
                same = same & (rows(seg_r, (q, q)) == cols(seg_c, (q, q)))
                into = into * cast(vs[_INTO_MASK], row)
                to_end = to_end * cast(vs[_IN_MASK], row)
                keep = keep * vs[_KEEP_MASK, 0]

            def matmuls(cb_acc, y_acc):
                plgpu.wgmma(cb_acc, cs, bts)  # C Bᵀ [q, q]
                plgpu.wgmma(y_acc, cs, sb_s)  # C Sᵀ [q, p]: the state entering the chunk
                plgpu.wgmma_wait(0)
                return cb_acc[...], y_acc[...]

            cb, y0 = pl.run_scoped(matmuls, plgpu.ACC((q, q), f32), plgpu.ACC((q, p), f32))

            decay = jnp.exp(jnp.minimum(rows(acum_r, (q, q)) - cols(acum_c, (q, q)), 0.0))
            w = (jnp.where(same, cb * decay, 0.0) * cols(dt_c, (q, q))).astype(mm)  # [q, q]
            y = y0 * rows(into, (q, p))
            if interpret:  # the interpreter's wgmma reads both operands from shared memory
                w_s[...] = w
                w = w_s

            def intra(acc):
                plgpu.wgmma(acc, w, xs)  # [q, q] @ [q, p]
                plgpu.wgmma_wait(0)
                return acc[...]

            y = y + pl.run_scoped(intra, plgpu.ACC((q, p), f32))
            xf = xs[...].astype(f32)  # [q, p]

            def finish(y):
                if has_D:
                    y = y + xf * D
                if has_z:
                    zf = z_s.at[slot][...].astype(f32)
                    y = y * zf / (1.0 + jnp.exp(-zf))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's y has left y_s
                y_s[...] = y.astype(y_s.dtype)

            if not overlap:
                finish(y)
            xs[...] = (xf * rows(to_end, (q, p))).astype(mm)  # x is read: its slot takes xw
            plgpu.commit_smem()
            if not overlap:
                plgpu.copy_smem_to_gmem(y_s, y_out)

            def update(acc):
                plgpu.wgmma(acc, bts, xs)  # Bᵀ xw: [n, q] @ [q, p]
                if overlap:  # y's epilogue while the tensor cores work
                    finish(y)
                plgpu.wgmma_wait(0)
                return acc[...]

            state = state * keep + pl.run_scoped(update, plgpu.ACC((n, p), f32))
            sb_s[...] = state.astype(mm)
            plgpu.commit_smem()  # also: every read of this slot is done before it is refilled
            if overlap:
                plgpu.copy_smem_to_gmem(y_s, y_out)
            return state

        return lax.fori_loop(jnp.int32(0), jnp.int32(nchunks), step, state)

    # wgmma wants both shared-memory operands of a product swizzled alike, so every operand tile takes the
    # widest swizzle all their rows allow: 128 bytes at p, n, q multiples of 64; 32 at head dim 80 (160-byte rows)
    sw = min(plgpu.find_swizzle(d * jnp.dtype(mm).itemsize * 8) for d in (p, n, q))

    def scopes(bars, init_bar):
        state = pl.run_scoped(lambda st_s: load_state(st_s, init_bar), _smem((n, p), jnp.float32))
        state = pl.run_scoped(
            functools.partial(walk, state, bars),
            _smem((nslots, q, p), mm, sw),  # x (then xw)
            _smem((nslots, n, q), mm, sw),  # Bᵀ
            _smem((nslots, q, n), mm, sw),  # C
            plgpu.SMEM((nslots, v_g.shape[-2], q), jnp.float32),  # packed scalars
            _smem((nslots, q, p), mm) if has_z else None,  # z
            _smem((q, p), y_g.dtype),  # y
            _smem((n, p), mm, sw),  # Sᵀ in the operand dtype
            _smem((q, q), mm, sw) if interpret else None,  # W, interpreter only (compiled, it stays in registers)
        )
        pl.run_scoped(lambda st_s: store_state(st_s, state), _smem((n, p), jnp.float32))

    pl.run_scoped(scopes, [plgpu.Barrier(num_barriers=nslots) for _ in range(ninputs)],
                  plgpu.Barrier(num_barriers=1) if has_init else None)


def ssd_forward_mgpu(x, dtp, acum, B, C, D, z, initial_state, seg, *, y_dtype, config, interpret=False):
    """The fused SSD forward on padded inputs (l a multiple of `config.block_q`): x [b, l, h, p] and z in the
    operand dtype, dtp / acum [b, l, h] float32 (processed dt, chunk-local cumsum of dt A over `block_q`
    chunks), B / C [b, l, g, n], D [h] or None, initial_state [b, h, p, n] float32 or None, seg [b, l] int32
    segment ids or None. Returns (y [b, l, h, p] in `y_dtype`, final_state [b, h, p, n] float32)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q, nslots = config.block_q, config.num_slots
    nchunks = lp // q

    B, C = B.astype(x.dtype), C.astype(x.dtype)  # wgmma takes one operand dtype
    z = None if z is None else z.astype(x.dtype)

    def per_chunk(a):  # [b, lp, h] -> [b, h, nchunks, q]
        return a.reshape(b, nchunks, q, h).transpose(0, 3, 1, 2)

    vec_rows = [per_chunk(acum), per_chunk(dtp)]
    if seg is not None:
        s = seg.reshape(b, nchunks, q)
        last = s[:, :, -1:]
        entering = jnp.concatenate([jnp.zeros_like(last[:, :1]), last[:, :-1]], axis=1)  # the state's segment
        f = lambda m: jnp.broadcast_to(m.astype(jnp.float32)[:, None], (b, h, nchunks, q))  # noqa: E731
        vec_rows += [f(s), f(s == entering), f(s == last), f(jnp.broadcast_to(last == entering, s.shape))]
    vec = jnp.stack(vec_rows, axis=3).astype(jnp.float32)  # [b, h, nchunks, rows, q]
    bt = B.transpose(0, 2, 3, 1)  # [b, g, n, lp]

    args = [x, bt, C, vec]
    if D is not None:
        args.append(D.astype(jnp.float32))
    if z is not None:
        args.append(z)
    if initial_state is not None:
        args.append(jnp.swapaxes(initial_state.astype(jnp.float32), -1, -2))
    body = functools.partial(
        _body, q=q, nchunks=nchunks, r=h // g, nslots=nslots, overlap=config.overlap, has_D=D is not None,
        has_z=z is not None, has_init=initial_state is not None, has_seg=seg is not None, interpret=interpret,
    )
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, lp, h, p), y_dtype), jax.ShapeDtypeStruct((b, h, n, p), jnp.float32)),
        grid=(h, b),
        grid_names=("h", "b"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                            approx_math=config.approx_math),
        interpret=InterpretGPUParams() if interpret else None,
    )
    y, st = kernel(*args)
    return y, jnp.swapaxes(st, -1, -2)
