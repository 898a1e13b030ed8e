"""Fused SSD forward as a Mosaic TPU Pallas kernel: one pass over x, B, C, z; the state stays in VMEM.

The TPU form of `ssd_pallas` (`gpu.py`, `triton.py`; same math, same contract; easymamba issue #7). Letters as in
`easymamba.typing`; `hb` is the number of heads one program owns (a "head block"), `gb` the number of B/C groups
those heads read.

Grid (b, h // hb, c) with the chunk axis last and "arbitrary" (sequential), the other two "parallel" (megacore
splits them). One program walks the chunks of one (batch row, head block); the running state of its hb heads,
[hb p, gb n] float32, lives in a VMEM scratch that is zeroed (or loaded from `initial_state`) at chunk 0 and
written out as the final state at the last chunk. Per chunk of q tokens, per head (rows i, sources s):

    acum     = chunk-local cumsum of a = dt A                   # in-kernel, a matmul with a triangle of ones
    Lm[i, s] = exp(acum_i - acum_s)   for s <= i in the same segment, else 0
    y        = ((C Bᵀ) * Lm * dt_s) x                           # intra-chunk, [q, q] @ [q, p]
             + exp(acum_i) * (C stateᵀ)                         # the state entering the chunk, [q, n] @ [n, p]
             + D x ;   y *= silu(z)
    state    = exp(acum_last) state + (x * dt_s exp(acum_last - acum_s))ᵀ B    # [p, q] @ [q, n]

(the `step` of the GPU kernel; the four steps of `ssd_chunked` fused per chunk). Every exp argument is <= 0.

HBM layouts (the TPU block rule: the last two dims of a block are multiples of (8, 128) or the array's own):
* x, z, y are read and written as [b, l, h p] and B, C as [b, l, g n]: row-major reshapes of the caller's
  [b, l, h, p] and [b, l, g, n], which is how the in_proj / conv output they are sliced from is laid out. A
  block is [q, hb p] (or [q, gb n]): `hb` is the smallest head count whose lanes hb p are a multiple of 128 (or
  all h heads), so p = 64 gives hb = 2 and p = 128 gives hb = 1. No transpose and no padding copy of x, z, y,
  B or C (see "Any l" below). Caveat: TPU arrays are tiled over their two minor dims, so merging (h, p) into
  h p is a bitcast only where XLA folds the reshape into the fusion that produces x (the split of the conv
  output in a model); an [b, l, h, p] array already materialized in HBM costs one read and one write to
  reshape (not measured: no TPU here).
* dt goes through XLA once before the kernel: dt_bias, softplus and dt_limit applied, zero-padded to a multiple
  of q and transposed to [b, h // hb, hb, l_pad] float32, so the kernel reads a [hb, q] row block per chunk.
  Cost: one read of dt and one write plus one read of 4 bytes per (token, head), about 3% of the bytes of x, z
  and y (bf16, p = 64); the GPU form pays the same (and a second such array for the cumsum, which here is not
  needed).
* `seq_idx` becomes a float32 [b, 1, l_pad] row of segment starts (1 where seq_idx changes), 4 bytes per token.
* `initial_state` and the final state are [b, h p, gb n]: a bitcast of [b, h, p, n] when gb = 1 (the minor
  dim stays n and p is a multiple of 8). When one head block spans gb > 1 groups, each head's [p, n] sits in
  its group's lanes and the rest is zero; XLA builds and strips that on this small (l-independent) array.

Why the cumsum is computed in the kernel. `jnp.cumsum` does not lower to Mosaic, and the kernel needs the
cumulative log-decay twice: along lanes (sources s) and down sublanes (targets i); moving a [1, q] row into a
[q, 1] column is itself a relayout on TPU. One matmul with a lower-triangular ones matrix gives each orientation
directly from the dt row (the same MXU op either way round), so the kernel reads dt once and XLA writes no
float32 cumsum array (the GPU form's 8 bytes per (token, head)). The segment starts ride in the same matmul
(their in-chunk cumsum is a segment number, so "same segment" is an equality test and no segment id needs to
be carried across chunks). The triangle is exact in bf16; the float32 right-hand side is split into three bf16
parts (hi + mid + lo == the float32 value), so three single-pass bf16 matmuls with float32 accumulation give
float32-accurate sums at half the MXU passes of `Precision.HIGHEST` (six).

Any l: the grid has cdiv(l, q) chunks and the last x/B/C/z/y blocks run past the array's end. Pallas pads
such input blocks with unspecified values and drops out-of-bounds output rows, so the kernel zeroes the x and B
rows past l (only when l % q != 0) before they reach a matmul, and dt is zero there (a no-op step: decay
exp(0) = 1, nothing added). C and z past l only reach output rows that are dropped.

Heads in one block: each head's intra-chunk matmul runs over the whole [q, hb p] block of x and its lanes are
kept by a mask (for p = 64 an MXU of 128 lanes would pad the [q, 64] operand to 128 anyway); C stateᵀ and the
state update are one matmul for the block. When a block spans gb groups, C Bᵀ is formed per group with C's
other lanes masked, and state entries that would pair a head with another group's lanes are masked to zero.

Numerics follow mamba_ssm and the GPU form: matmul operands in the input dtype (bf16 for bf16 inputs), float32
accumulation, float32 state; float32 inputs use `Precision.HIGHEST` (float32) matmuls, since Mosaic's default
for a float32 dot is a single bf16 pass.

What is checked where: `tests/test_kernels_tpu_ssd.py` runs this kernel in Pallas' TPU interpret mode against
the float64 references, and lowers it with `jax.export(..., platforms=("tpu",))` on a CPU machine, which runs the
Pallas -> Mosaic lowering (block rules, primitives) but not the Mosaic compiler passes inside libtpu (layout
assignment, VMEM allocation), which only a TPU run reaches.

Gradients: `jax.custom_vjp` whose backward is `jax.vjp` of `ssd_chunked` (the GPU form's backward="reference").
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.ssd_scan.reference import _check_ssd_args, _process_dt, ssd_chunked_vjp

__all__ = ["ssd_pallas_tpu", "SSDTPUConfig", "ssd_tpu_supported", "head_block"]

LANES = 128  # TPU vreg lanes: the last dim of a block is a multiple of this or the whole array dim
SUBLANES = 8
VMEM_BUDGET = 24 * 2**20  # bytes we let one program use; v5e's default scoped VMEM is 16 MiB, v6e's 32 MiB


@dataclasses.dataclass(frozen=True)
class SSDTPUConfig:
    """Tile parameters of the TPU SSD kernel.

    q: the kernel's chunk length. Compiled, it must be a multiple of 128 (it is the lane dim of the dt block):
      128 matches the v5e MXU side and keeps the per-head [q, q] float32 tiles (decay matrix, C Bᵀ) at 64 KiB;
      256 fills the v6e MXU. Interpret mode accepts any multiple of 8, so CPU tests can use short chunks.
    heads_per_block: heads one program owns; None picks `head_block`'s choice (the smallest legal block).
    """

    q: int = 128
    heads_per_block: int | None = None


def head_block(h: int, g: int, p: int, n: int) -> tuple[int, int]:
    """(hb, gb): the smallest head block whose x lanes (hb p) and B/C lanes (gb n) satisfy the TPU block rule.

    hb divides h, and either divides r = h // g (the block reads one group, gb = 1) or is a multiple of r (the
    block reads gb = hb // r whole groups). hb = h, gb = g always qualifies (blocks equal to the whole array).
    """
    r = h // g
    for hb in range(1, h + 1):
        if h % hb or (r % hb and hb % r):
            continue
        gb = max(1, hb // r)
        if (hb * p % LANES == 0 or hb == h) and (gb * n % LANES == 0 or gb == g):
            return hb, gb
    raise AssertionError("unreachable: hb = h always qualifies")


def _vmem_bytes(hb, gb, p, n, q, in_bytes, y_bytes):
    """Rough VMEM need of one program: double-buffered blocks, the state scratch and the [q, q] temporaries."""
    lanes_x, lanes_b = hb * p, gb * n
    blocks = q * lanes_x * (2 * in_bytes + y_bytes) + 2 * q * lanes_b * in_bytes + 2 * hb * q * 4 + q * 4
    states = 2 * hb * p * lanes_b * 4  # initial + final blocks
    return 2 * (blocks + states) + hb * p * lanes_b * 4 + 6 * q * q * 4 + 4 * q * lanes_x * 4


def ssd_tpu_supported(p: int, n: int, *, h: int | None = None, g: int | None = None, q: int = 128,
                      dtype=jnp.bfloat16) -> bool:
    """Shapes the compiled kernel is built for: p a multiple of 8 that divides 128 or is a multiple of 128
    (so a head block is 128-lane aligned), n a multiple of 128 (B/C blocks and the state's lanes), q a multiple
    of 128, float32 or bfloat16 inputs. With h and g also given: the head block `head_block(h, g, p, n)` has
    128-aligned lanes and fits the VMEM budget (VMEM_BUDGET)."""
    if p <= 0 or p % SUBLANES or (LANES % p and p % LANES) or n <= 0 or n % LANES or q % LANES:
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False
    if h is None or g is None:
        return True
    if g <= 0 or h % g:
        return False
    hb, gb = head_block(h, g, p, n)
    isz = jnp.dtype(dtype).itemsize
    return hb * p % LANES == 0 and _vmem_bytes(hb, gb, p, n, q, isz, 4) <= VMEM_BUDGET


def _split3(v):
    """v (float32) as three bf16 arrays with hi + mid + lo == v exactly (8 + 8 + 8 significand bits)."""
    hi = v.astype(jnp.bfloat16)
    rest = v - hi.astype(jnp.float32)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    return hi, mid, lo


def _tri_sums(tri, rows):
    """Chunk-local cumsums of the float32 rows of `rows` [k, q], in both orientations: ([k, q], [q, k]).

    tri[i, s] = 1 for s <= i. The rows are split into three exact bf16 parts (see the module docstring), each
    multiplied in one bf16 MXU pass with float32 accumulation; the partial sums are added small to large.
    """
    nt = (((1,), (1,)), ((), ()))  # contract the lane dims of both operands: a @ bᵀ
    hi, mid, lo = _split3(rows)
    tri = tri.astype(jnp.bfloat16)
    as_rows = [lax.dot_general(part, tri, nt, preferred_element_type=jnp.float32) for part in (hi, mid, lo)]
    as_cols = [lax.dot_general(tri, part, nt, preferred_element_type=jnp.float32) for part in (hi, mid, lo)]
    return as_rows[0] + (as_rows[1] + as_rows[2]), as_cols[0] + (as_cols[1] + as_cols[2])  # [k, q], [q, k]


def _kernel(*refs, hb, gb, p, n, r, q, l, has_D, has_z, has_init, has_seg):
    refs = list(refs)
    dt_ref, A_ref, x_ref, B_ref, C_ref = refs[:5]
    rest = refs[5:]
    D_ref = rest.pop(0) if has_D else None
    z_ref = rest.pop(0) if has_z else None
    init_ref = rest.pop(0) if has_init else None
    st_ref = rest.pop(0) if has_seg else None
    y_ref, final_ref, state_scr = rest

    ci = pl.program_id(2)
    lanes_x, lanes_b = hb * p, gb * n

    @pl.when(ci == 0)
    def _():
        if has_init:
            state_scr[...] = init_ref[...].astype(jnp.float32)
        else:
            state_scr[...] = jnp.zeros(state_scr.shape, jnp.float32)

    mm = x_ref.dtype  # matmul operand dtype: bf16 for bf16 inputs, else float32
    precision = lax.Precision.HIGHEST if jnp.dtype(mm) != jnp.bfloat16 else None

    def dot(a, b, contract):  # a, b contracted over the given dims, accumulating in float32
        return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)

    row = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    causal = row >= col  # [q(i), q(s)]
    tri = jnp.where(causal, 1.0, 0.0)

    # rows to cumsum: a = dt A of each head (rows 0..hb-1), then the segment starts; padded to 16 rows, a
    # whole bf16 tile (16 sublanes x 128 lanes), since the rows reach the MXU as bf16 parts
    k = pu.round_up(hb + has_seg, 16)
    sub = lax.broadcasted_iota(jnp.int32, (k, q), 0)
    dt_rows = dt_ref[...].astype(jnp.float32)  # [hb, q]
    a_rows = dt_rows * A_ref[...].astype(jnp.float32)  # [hb, q]
    rows = jnp.zeros((k, q), jnp.float32)
    for j in range(hb):
        rows = jnp.where(sub == j, jnp.broadcast_to(a_rows[j:j + 1, :], (k, q)), rows)
    if has_seg:
        rows = jnp.where(sub == hb, jnp.broadcast_to(st_ref[...].astype(jnp.float32), (k, q)), rows)
    cum_rows, cum_cols = _tri_sums(tri, rows)  # [k, q], [q, k]

    x = x_ref[...]  # [q, hb p]
    Bm = B_ref[...]  # [q, gb n]
    Cm = C_ref[...]  # [q, gb n]
    if l % q:  # the last chunk runs past l: its x and B rows hold unspecified values
        valid = lax.broadcasted_iota(jnp.int32, (q, 1), 0) < l - ci * q  # [q, 1]
        x = jnp.where(valid, x, jnp.zeros_like(x))
        Bm = jnp.where(valid, Bm, jnp.zeros_like(Bm))
    xs = x.astype(jnp.float32)  # [q, hb p]

    if has_seg:
        seg_row, seg_col = cum_rows[hb:hb + 1, :], cum_cols[:, hb:hb + 1]  # [1, q], [q, 1]: segment number
        seg_last = seg_row[:, q - 1:]  # [1, 1]
        same = causal & (seg_col == seg_row)  # [q, q]
    else:
        same = causal

    lane = lax.broadcasted_iota(jnp.int32, (1, lanes_x), 1)
    lane_head = [(lane >= j * p) & (lane < (j + 1) * p) for j in range(hb)]  # [1, hb p] each
    srow = lax.broadcasted_iota(jnp.int32, (lanes_x, 1), 0)
    row_head = [(srow >= j * p) & (srow < (j + 1) * p) for j in range(hb)]  # [hb p, 1] each

    if gb == 1:
        CB = [dot(Cm, Bm, ((1,), (1,)))] * hb  # [q, q] for every head of the block
    else:
        blane = lax.broadcasted_iota(jnp.int32, (1, lanes_b), 1)
        CB_group = [dot(jnp.where((blane >= kk * n) & (blane < (kk + 1) * n), Cm, jnp.zeros_like(Cm)), Bm,
                        ((1,), (1,))) for kk in range(gb)]
        CB = [CB_group[j // r] for j in range(hb)]

    state = state_scr[...]  # [hb p, gb n]
    y_state = dot(Cm, state.astype(mm), ((1,), (1,)))  # [q, hb p]: C stateᵀ for every head

    y = jnp.zeros((q, lanes_x), jnp.float32)
    xw_scale = jnp.zeros((lanes_x, q), jnp.float32)  # per (head lane, source s): dt_s exp(acum_last - acum_s)
    keep_rows = jnp.zeros((lanes_x, 1), jnp.float32)  # per state row: decay of the entering state over the chunk
    for j in range(hb):
        acum_row, acum_col = cum_rows[j:j + 1, :], cum_cols[:, j:j + 1]  # [1, q], [q, 1]
        last = acum_row[:, q - 1:]  # [1, 1]: total log-decay of the chunk
        into = jnp.exp(acum_col)  # [q, 1]: decay chunk start -> i
        to_end = jnp.exp(jnp.minimum(last - acum_row, 0.0))  # [1, q]: decay s -> chunk end
        keep = jnp.exp(last)  # [1, 1]
        if has_seg:  # the entering state belongs to segment 0 of the chunk
            into = jnp.where(seg_col == 0, into, 0.0)
            to_end = jnp.where(seg_row == seg_last, to_end, 0.0)
            keep = jnp.where(seg_last == 0, keep, 0.0)

        Lm = jnp.where(same, jnp.exp(jnp.minimum(acum_col - acum_row, 0.0)), 0.0)  # [q, q]
        W = (CB[j] * Lm * dt_rows[j:j + 1, :]).astype(mm)  # [q, q]
        y_j = dot(W, x, ((1,), (0,))) + into * y_state  # [q, hb p]; only head j's lanes are kept
        y = y_j if hb == 1 else jnp.where(lane_head[j], y_j, y)
        w = dt_rows[j:j + 1, :] * to_end  # [1, q]
        xw_scale = jnp.where(row_head[j], w, xw_scale)
        keep_rows = jnp.where(row_head[j], keep, keep_rows)

    if has_D:
        y = y + D_ref[...].astype(jnp.float32) * xs
    if has_z:
        zz = z_ref[...].astype(jnp.float32)
        y = y * zz * jax.nn.sigmoid(zz)
    y_ref[...] = y.astype(y_ref.dtype)

    # state update: (x * w)ᵀ B with x transposed explicitly (float32 transpose, then the per-source scale)
    xw = (xs.T * xw_scale).astype(mm)  # [hb p, q]
    state = keep_rows * state + dot(xw, Bm, ((1,), (0,)))  # [hb p, gb n]
    if gb > 1:  # a head only owns its own group's lanes
        brow = lax.broadcasted_iota(jnp.int32, (lanes_x, lanes_b), 0)
        bcol = lax.broadcasted_iota(jnp.int32, (lanes_x, lanes_b), 1)
        own = functools.reduce(
            jnp.logical_or,
            [(brow >= kk * r * p) & (brow < (kk + 1) * r * p) & (bcol >= kk * n) & (bcol < (kk + 1) * n)
             for kk in range(gb)])
        state = jnp.where(own, state, 0.0)
    state_scr[...] = state

    @pl.when(ci == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = state.astype(final_ref.dtype)


def _to_group_lanes(state, hb, gb, r):
    """[b, h, p, n] -> [b, h p, gb n]: each head's state in the lanes of its group within its head block."""
    b, h, p, n = state.shape
    if gb == 1:
        return state.reshape(b, h * p, n)
    local = (jnp.arange(h) % hb) // r  # [h]: group index of each head inside its block
    onehot = (local[:, None] == jnp.arange(gb)[None, :]).astype(state.dtype)  # [h, gb]
    return jnp.einsum("bhpn,hk->bhpkn", state, onehot).reshape(b, h * p, gb * n)


def _from_group_lanes(state, h, p, n, hb, gb, r):
    """Inverse of `_to_group_lanes` (the other lanes are zero, so a masked sum picks each head's group)."""
    b = state.shape[0]
    if gb == 1:
        return state.reshape(b, h, p, n)
    local = (jnp.arange(h) % hb) // r
    onehot = (local[:, None] == jnp.arange(gb)[None, :]).astype(state.dtype)
    return jnp.einsum("bhpkn,hk->bhpn", state.reshape(b, h, p, gb, n), onehot)


def _forward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, *, dt_softplus, dt_limit, y_dtype, config,
             interpret):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    cdtype = jnp.float32  # the compute dtype (`_check_dtypes`: inputs are float32 or bfloat16)
    q = config.q
    if config.heads_per_block is None:
        hb, gb = head_block(h, g, p, n)
    else:
        hb = config.heads_per_block
        gb = max(1, hb // r)
    nh = h // hb
    c = -(-l // q)
    lp = c * q

    # dt in XLA: bias, softplus, clip, zero-padded and transposed to row blocks [b, h // hb, hb, lp]
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit, cdtype)  # [b, l, h]
    dtp = jnp.pad(dtp, [(0, 0), (0, lp - l), (0, 0)])
    dtp = jnp.swapaxes(dtp, 1, 2).reshape(b, nh, hb, lp)

    xmap = lambda bi, hi, ci: (bi, ci, hi)  # noqa: E731  x, z, y blocks [q, hb p]
    # B, C blocks [q, gb n]: the group block of head block hi (lax.div: `//` on traced ints lowers via sign,
    # which Mosaic only lowers with a TPU attached; the indices are >= 0, so truncation is floor)
    gmap = lambda bi, hi, ci: (bi, ci, lax.div(hi * hb, jnp.asarray(r * gb, hi.dtype)))  # noqa: E731
    smap = lambda bi, hi, ci: (bi, hi, 0)  # noqa: E731  state blocks [hb p, gb n]
    in_specs = [
        pl.BlockSpec((None, None, hb, q), lambda bi, hi, ci: (bi, hi, 0, ci)),  # dt rows
        pl.BlockSpec((None, hb, 1), lambda bi, hi, ci: (hi, 0, 0)),  # A
        pl.BlockSpec((None, q, hb * p), xmap),  # x
        pl.BlockSpec((None, q, gb * n), gmap),  # B
        pl.BlockSpec((None, q, gb * n), gmap),  # C
    ]
    args = [dtp, A.astype(cdtype).reshape(nh, hb, 1), x.reshape(b, l, h * p), B.reshape(b, l, g * n),
            C.reshape(b, l, g * n)]
    if D is not None:
        in_specs.append(pl.BlockSpec((1, hb * p), lambda bi, hi, ci: (0, hi)))
        args.append(jnp.repeat(D.astype(cdtype), p).reshape(1, h * p))
    if z is not None:
        in_specs.append(pl.BlockSpec((None, q, hb * p), xmap))
        args.append(z.reshape(b, l, h * p))
    if initial_state is not None:
        in_specs.append(pl.BlockSpec((None, hb * p, gb * n), smap))
        args.append(_to_group_lanes(initial_state.astype(cdtype), hb, gb, r))
    if seq_idx is not None:
        starts = jnp.concatenate([jnp.zeros((b, 1), bool), seq_idx[:, 1:] != seq_idx[:, :-1]], axis=1)
        starts = jnp.pad(starts.astype(jnp.float32), [(0, 0), (0, lp - l)])  # padding joins the last segment
        in_specs.append(pl.BlockSpec((None, 1, q), lambda bi, hi, ci: (bi, 0, ci)))
        args.append(starts.reshape(b, 1, lp))

    kernel = functools.partial(
        _kernel, hb=hb, gb=gb, p=p, n=n, r=r, q=q, l=l, has_D=D is not None, has_z=z is not None,
        has_init=initial_state is not None, has_seg=seq_idx is not None,
    )
    interpret = pu.tpu_interpret_params(pu.resolve_tpu_interpret(interpret))
    isz = jnp.dtype(x.dtype).itemsize
    need = _vmem_bytes(hb, gb, p, n, q, isz, jnp.dtype(y_dtype).itemsize)
    y, final = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, l, h * p), y_dtype),
                   jax.ShapeDtypeStruct((b, h * p, gb * n), cdtype)),
        grid=(b, nh, c),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, q, hb * p), xmap), pl.BlockSpec((None, hb * p, gb * n), smap)),
        scratch_shapes=[pltpu.VMEM((hb * p, gb * n), cdtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=None if need <= 12 * 2**20 else min(2 * need, 100 * 2**20),
        ),
        interpret=interpret,
        name="ssd_fused_fwd_tpu",
    )(*args)
    return y.reshape(b, l, h, p), _from_group_lanes(final, h, p, n, hb, gb, r)


def _check_dtypes(**arrays):
    """x, B, C, z reach the kernel as they are: float32 or bfloat16 (a TPU has no float64; the TPU interpreter
    simulates its memory and refuses it too)."""
    for name, a in arrays.items():
        if a is not None and jnp.dtype(a.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"the TPU SSD kernel takes {name} in float32 or bfloat16, got {a.dtype}; use "
                             f"ssd_chunked (impl='xla') for other dtypes")


def _check_config(config, h, g, p, n, dtype, compiled):
    if not isinstance(config, SSDTPUConfig):
        raise TypeError(f"config must be an SSDTPUConfig, got {type(config).__name__}")
    q = config.q
    if not isinstance(q, int) or q <= 0 or q % SUBLANES:
        raise ValueError(f"config.q must be a positive multiple of {SUBLANES}, got {q!r}")
    r = h // g
    hb = config.heads_per_block
    if hb is not None and (not isinstance(hb, int) or hb <= 0 or h % hb or (r % hb and hb % r)):
        raise ValueError(f"config.heads_per_block ({hb!r}) must divide h ({h}) and divide or be a multiple of "
                         f"the heads per group r = h // g ({r})")
    if not compiled:
        return
    if q % LANES:
        raise ValueError(f"config.q ({q}) must be a multiple of {LANES} for the compiled TPU kernel (it is the "
                         f"lane dim of the dt block); smaller chunks run only in interpret mode")
    if hb is not None and not ((hb * p % LANES == 0 or hb == h) and (max(1, hb // r) * n % LANES == 0
                                                                      or max(1, hb // r) == g)):
        raise ValueError(f"config.heads_per_block ({hb}) gives blocks of {hb * p} lanes of x and "
                         f"{max(1, hb // r) * n} lanes of B/C; the compiled kernel needs multiples of {LANES} "
                         f"(or all {h * p} / {g * n} lanes)")
    if not ssd_tpu_supported(p, n, h=h, g=g, q=q, dtype=dtype):
        hb_, gb_ = head_block(h, g, p, n) if hb is None else (hb, max(1, hb // r))
        raise ValueError(
            f"the compiled TPU SSD kernel does not handle head_dim p = {p}, state size n = {n} with h = {h} heads "
            f"in g = {g} groups (head block of {hb_} heads, {gb_} groups): it needs p a multiple of 8 dividing "
            f"128 or a multiple of 128, n a multiple of 128, lanes hb * p a multiple of 128 and a block within "
            f"{VMEM_BUDGET >> 20} MiB of VMEM (ssd_tpu_supported); use the XLA path (impl='xla') for these shapes")


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static):
    dt_softplus, dt_limit, y_dtype, config, _, interpret = static
    return _forward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus=dt_softplus,
                    dt_limit=dt_limit, y_dtype=y_dtype, config=config, interpret=interpret)


def _ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static):
    out = _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static)
    return out, (x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)


def _ssd_bwd(static, residuals, cotangents):
    dt_softplus, dt_limit, y_dtype, _, chunk_size, _ = static
    *diff, seq_idx = residuals
    return ssd_chunked_vjp(diff, seq_idx, cotangents, chunk_size=chunk_size, dt_softplus=dt_softplus,
                           dt_limit=dt_limit, y_dtype=y_dtype)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas_tpu(
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
    config: SSDTPUConfig | None = None,
    interpret: bool | None = None,
):
    """The SSD forward as one fused Mosaic TPU kernel; same contract as `ssd_pallas` / `ssd_chunked`: x
    [b, l, h, p], dt [b, l, h], A [h], B and C [b, l, g, n], D [h], z [b, l, h, p], dt_bias [h], initial_state
    [b, h, p, n], seq_idx [b, l] int, any l; x, B, C, z in float32 or bfloat16 (the others are cast to float32
    in XLA). Returns (y [b, l, h, p] in `y_dtype` (default promote(x, float32) = float32), final_state
    [b, h, p, n] in float32).

    `chunk_size` only sets the chunking of the backward (`jax.vjp` of `ssd_chunked`); the kernel's own chunk is
    `config.q` (`SSDTPUConfig()` when None). `interpret`: None runs the kernel compiled on a TPU backend and in
    Pallas' TPU interpret mode elsewhere; True / False force interpret mode / compilation (False on a CPU
    machine is what `jax.export(..., platforms=("tpu",))` needs to lower the real kernel).
    """
    _, _, h, p, g, n = _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_limit)
    config = SSDTPUConfig() if config is None else config
    _check_dtypes(x=x, B=B, C=C, z=z)
    compiled = not pu.resolve_tpu_interpret(interpret)
    _check_config(config, h, g, p, n, x.dtype, compiled)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    y_dtype = jnp.dtype(jnp.float32 if y_dtype is None else y_dtype)  # promote(x, float32) for these inputs
    interpret = None if interpret is None else bool(interpret)
    static = (bool(dt_softplus), (float(dt_limit[0]), float(dt_limit[1])), y_dtype, config, int(chunk_size),
              interpret)
    return _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static)
