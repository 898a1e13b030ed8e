"""Mosaic TPU Pallas kernels for Mamba's depthwise causal conv1d: the prefill over a sequence and the decode update.

    y[t, c] = act(bias[c] + sum_{i=0..k-1} weight[c, i] * xpad[t + i, c]),   xpad = x left-padded by k-1

(semantics, the conv-state convention, `seq_idx` and dtype rules: `easymamba.kernels.conv1d.reference`; the
GPU forms are in `triton.py` beside this file).

Prefill: grid (b, c / block_c, l / block_l); channels on the 128-wide lane axis, tokens on sublanes, as the
in_proj output comes ([b, l, c]). The l axis is "arbitrary" (sequential): a VMEM window of P + block_l float32
rows (P = k - 1 rounded up to 8 sublanes) holds the last P input rows of the previous l block above the current
block, so each tap is one load at a static row offset and every input byte is read from HBM once. The window's
top is the initial state (transposed to rows by the wrapper) or zeros at the first l block. A last l block that
runs past the sequence is partial: its extra rows are never written back and, the conv being causal, feed no
real output. With `seq_idx`, the wrapper turns the segment ids into each row's reach (how many taps back stay in
its segment, k - 1 for the first segment, whose context is the initial state), broadcast to 128 lanes as the
segment ids of jax's TPU flash attention are: the kernel only compares (512 bytes a row, read once per channel
block; only with seq_idx). The returned conv_state (the last k pre-conv columns, k rows of x) is the reference
on the sequence's tail, outside the kernel.

Decode update: grid (b / block_b, c / 128), block_b the largest divisor of b up to 8 (x and y travel as
[b / block_b, block_b, c] so their blocks span a whole dim). The state block [block_b, 128, k] keeps the cache's
[b, c, k] layout (channels on sublanes, k on lanes), while x and y have channels on lanes; the kernel moves a
row of 128 channels between the two orientations with a masked reduction over an iota identity (exact, no
transpose op), shifts the window by one column with lane masks, and writes the state in place
(`input_output_aliases`). A k-wide minor dim fills 4 of a vreg's 128 lanes (and likely of each HBM tile): a
[b, k, c] cache would be lane-dense, but the layout is the cache's choice, not this kernel's.

Backward (both): `jax.vjp` of the reference (a `jax.custom_vjp`); the conv's backward is not a TPU kernel yet.

Checked here: the kernels run in Pallas' TPU interpret mode against the float64 references, and lower through
Pallas -> Mosaic (`jax.export(..., platforms=("tpu",))` yields a `tpu_custom_call`) at realistic shapes. The
Mosaic compiler passes inside libtpu (layouts, VMEM allocation) are not reachable without a TPU: untested there.
Block sizes are untuned. Upstream: `causal_conv1d_fwd` / `causal_conv1d_update` of Dao-AILab/causal-conv1d.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = ["causal_conv1d_tpu", "causal_conv1d_update_tpu", "conv1d_tpu_supported"]

LANES = 128  # the TPU vector lane width: channel blocks are multiples of it
SUBLANES = 8
ROW_ALIGN = 16  # l blocks are multiples of 16 rows: the sublane tile of bfloat16 (8 for float32)
MAX_K = 16  # the taps are unrolled in the kernel body; Mamba uses k = 4
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)  # no float64 on TPU


# TPU helpers, shared with state_update/mosaic_tpu.py


def pick_row(v, r):
    """Row r (static or traced) of v [R, L] as [1, L], by a masked sum over sublanes (no unaligned slice)."""
    rows = lax.broadcasted_iota(jnp.int32, v.shape, 0)
    return jnp.sum(jnp.where(rows == r, v, 0.0), axis=0, keepdims=True)


def lanes_to_sublanes(row):
    """[1, L] -> [L, 1] exactly: a masked sum over lanes of the row broadcast against an iota identity (no
    transpose op; L is at most a few hundred here)."""
    n = row.shape[1]
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, jnp.broadcast_to(row, (n, n)), 0.0), axis=1, keepdims=True)


def sublanes_to_lanes(col):
    """[L, 1] -> [1, L], the same way over sublanes."""
    n = col.shape[0]
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, jnp.broadcast_to(col, (n, n)), 0.0), axis=0, keepdims=True)


def conv1d_tpu_supported(c: int, k: int) -> bool:
    """Shapes the TPU kernels are written for: channels in whole 128-lane blocks, 2 <= k <= 16."""
    return c % LANES == 0 and 2 <= k <= MAX_K


def _check_supported(name, x, c, k):
    if not conv1d_tpu_supported(c, k):
        raise ValueError(f"{name} needs c (conv channels) a multiple of {LANES} and 2 <= k <= {MAX_K}, got c={c}, "
                         f"k={k}; use the XLA path (causal_conv1d_ref) for these shapes")
    if not any(x.dtype == d for d in DTYPES):
        raise ValueError(f"{name} takes x in float32, bfloat16 or float16 (TPUs have no float64), got {x.dtype}")


def _channel_block(c: int, cap: int) -> int:
    """The largest multiple of 128 lanes <= cap that divides c (c is a multiple of 128)."""
    block = max(cap // LANES, 1) * LANES
    while c % block:
        block -= LANES
    return block


def _act(y, activation):
    return y * jax.nn.sigmoid(y) if activation == "silu" else y


# --------------------------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------------------------


def _conv_kernel(*refs, k, pad, block_l, block_c, has_bias, has_init, has_seg, activation):
    refs = list(refs)
    x_ref, w_ref = refs[:2]
    rest = refs[2:]
    bias_ref = rest.pop(0) if has_bias else None
    init_ref = rest.pop(0) if has_init else None
    reach_ref = rest.pop(0) if has_seg else None
    y_ref, win_ref = rest  # win: [pad + block_l, block_c] float32, rows pad - (k-1) .. pad - 1 the carried rows

    f32 = jnp.float32

    @pl.when(pl.program_id(2) == 0)
    def _start():  # a new (batch row, channel block): the context is the initial state, or zeros
        win_ref[0:pad, :] = init_ref[...] if has_init else jnp.zeros((pad, block_c), f32)

    win_ref[pad : pad + block_l, :] = x_ref[...].astype(f32)
    if has_seg:
        reach = jnp.tile(reach_ref[...], (1, block_c // LANES))  # [L, C]: taps back that stay in the segment
    acc = jnp.zeros((block_l, block_c), f32) if not has_bias else jnp.broadcast_to(bias_ref[...], (block_l, block_c))
    for i in range(k):  # tap i reads row t - d, d = k-1-i rows back
        d = k - 1 - i
        tap = win_ref[pl.ds(pad - d, block_l), :]  # [L, C]
        if has_seg and d > 0:
            tap = jnp.where(reach >= d, tap, 0.0)
        acc = acc + w_ref[i] * tap  # w_ref[i]: [1, C]
    y_ref[...] = _act(acc, activation).astype(y_ref.dtype)
    carry = win_ref[block_l : block_l + pad, :]  # the last `pad` rows seen: context for the next l block
    win_ref[0:pad, :] = carry


def _reach(seq_idx, k):
    """[b, l] int32: how many rows back a row's taps stay in its segment, capped at k-1. The first segment
    reaches into the initial state (k-1); a later one back to its first row."""
    l = seq_idx.shape[1]
    starts = seq_idx[:, 1:] != seq_idx[:, :-1]  # [b, l-1]
    seg = jnp.cumsum(jnp.pad(starts.astype(jnp.int32), [(0, 0), (1, 0)]), axis=1)  # [b, l] 0, 1, 2, ...
    t = jnp.arange(l, dtype=jnp.int32)
    first = lax.cummax(jnp.where(jnp.pad(starts, [(0, 0), (1, 0)]), t, 0), axis=1)  # [b, l] segment's first row
    return jnp.where(seg == 0, k - 1, jnp.minimum(t - first, k - 1)).astype(jnp.int32)


def _conv_forward(x, weight, bias, initial_state, seq_idx, *, activation, interpret, block_l, block_c):
    b, l, c = x.shape
    k = weight.shape[1]
    f32 = jnp.float32
    pad = pu.round_up(k - 1, SUBLANES)
    block_c = _channel_block(c, block_c)
    block_l = min(block_l, pu.round_up(l, ROW_ALIGN))
    n_l = pl.cdiv(l, block_l)

    in_specs = [
        pl.BlockSpec((None, block_l, block_c), lambda bi, ci, j: (bi, j, ci)),
        pl.BlockSpec((k, 1, block_c), lambda bi, ci, j: (0, 0, ci)),  # taps as rows: w_ref[i] is [1, C]
    ]
    args = [x, jnp.swapaxes(weight, 0, 1).astype(f32)[:, None, :]]  # [k, 1, c]
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, block_c), lambda bi, ci, j: (0, ci)))
        args.append(bias.astype(f32)[None, :])  # [1, c]
    if initial_state is not None:
        # the context rows the first l block reads: initial-state columns 1..k-1 at window rows pad-(k-1)..pad-1
        context = jnp.swapaxes(initial_state, 1, 2)[:, 1:, :].astype(f32)  # [b, k-1, c]
        in_specs.append(pl.BlockSpec((None, pad, block_c), lambda bi, ci, j: (bi, 0, ci)))
        args.append(jnp.pad(context, [(0, 0), (pad - (k - 1), 0), (0, 0)]))  # [b, pad, c]
    if seq_idx is not None:
        in_specs.append(pl.BlockSpec((None, block_l, LANES), lambda bi, ci, j: (bi, j, 0)))
        args.append(jnp.broadcast_to(_reach(seq_idx, k)[:, :, None], (b, l, LANES)))  # [b, l, 128]

    kernel = functools.partial(
        _conv_kernel, k=k, pad=pad, block_l=block_l, block_c=block_c, has_bias=bias is not None,
        has_init=initial_state is not None, has_seg=seq_idx is not None, activation=activation,
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, l, c), x.dtype),
        grid=(b, c // block_c, n_l),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_l, block_c), lambda bi, ci, j: (bi, j, ci)),
        scratch_shapes=[pltpu.VMEM((pad + block_l, block_c), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pu.tpu_interpret_params(interpret),
        name="causal_conv1d_tpu",
    )(*args)

    # conv_state is k columns of the input (initial-state columns too when l < k): the reference on the tail
    tail = min(l, k)
    _, conv_state = causal_conv1d_ref(
        x[:, l - tail :], weight, bias, activation=activation,
        initial_state=initial_state if l < k else None,
        seq_idx=None if seq_idx is None else seq_idx[:, l - tail :],
    )
    return y, conv_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _conv(x, weight, bias, initial_state, seq_idx, activation, interpret, block_l, block_c):
    return _conv_forward(x, weight, bias, initial_state, seq_idx, activation=activation, interpret=interpret,
                         block_l=block_l, block_c=block_c)


def _conv_fwd(x, weight, bias, initial_state, seq_idx, activation, interpret, block_l, block_c):
    out = _conv(x, weight, bias, initial_state, seq_idx, activation, interpret, block_l, block_c)
    return out, (x, weight, bias, initial_state, seq_idx)


def _conv_bwd(activation, interpret, block_l, block_c, residuals, cotangents):
    x, weight, bias, initial_state, seq_idx = residuals
    ref = lambda x, w, bias, init: causal_conv1d_ref(  # noqa: E731
        x, w, bias, activation=activation, initial_state=init, seq_idx=seq_idx)
    _, vjp = jax.vjp(ref, x, weight, bias, initial_state)
    return (*vjp(cotangents), None)


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_conv1d_tpu(x, weight, bias=None, *, activation="silu", initial_state=None, seq_idx=None,
                      interpret=None, block_l: int = 512, block_c: int = 256):
    """Same contract as `causal_conv1d_ref`: x [b, l, c], weight [c, k], bias [c], initial_state [b, c, k],
    seq_idx [b, l] int -> (y [b, l, c], conv_state [b, c, k]) in x's dtype; any l.

    One Mosaic TPU kernel for y (module docstring). `interpret`: None runs the kernel compiled on a TPU and in
    Pallas' TPU interpreter elsewhere; True / False force it. `block_l` (a multiple of 16) and `block_c` (capped
    to a multiple of 128 dividing c) are the tile; the gradient is the reference's VJP.
    """
    jax.eval_shape(  # validates shapes and activation with the reference's sentences; no compute
        functools.partial(causal_conv1d_ref, activation=activation), x, weight, bias,
        initial_state=initial_state, seq_idx=seq_idx,
    )
    _check_supported("causal_conv1d_tpu", x, x.shape[2], weight.shape[1])
    if block_l % ROW_ALIGN or block_l <= 0:
        raise ValueError(f"block_l must be a positive multiple of {ROW_ALIGN} rows, got {block_l}")
    if block_c < LANES:
        raise ValueError(f"block_c must be at least {LANES} lanes, got {block_c}")
    return _conv(x, weight, bias, initial_state, seq_idx, activation, pu.resolve_tpu_interpret(interpret), block_l, block_c)


# --------------------------------------------------------------------------------------------------------------
# Decode update
# --------------------------------------------------------------------------------------------------------------


def _column(v, j):
    """Column j of v [C, k] as [C, 1], by a masked sum over lanes."""
    cols = lax.broadcasted_iota(jnp.int32, v.shape, 1)
    return jnp.sum(jnp.where(cols == j, v, 0.0), axis=1, keepdims=True)


def _update_kernel(*refs, k, block_b, has_bias, activation):
    refs = list(refs)
    x_ref, state_ref, w_ref = refs[:3]
    rest = refs[3:]
    bias_ref = rest.pop(0) if has_bias else None
    y_ref, state_out_ref = rest

    f32 = jnp.float32
    xs = x_ref[...].astype(f32)  # [B, C] channels on lanes
    w = w_ref[...].astype(f32)  # [C, k] channels on sublanes, like the state
    lane = lax.broadcasted_iota(jnp.int32, w.shape, 1)
    ys = jnp.zeros(xs.shape, f32)
    for r in range(block_b):
        s = state_ref[r].astype(f32)  # [C, k]
        x_col = lanes_to_sublanes(pick_row(xs, r))  # [C, 1]
        window = jnp.where(lane == k - 1, x_col, 0.0)  # x is the newest column; column j <- column j + 1
        for j in range(k - 1):
            window = jnp.where(lane == j, _column(s, j + 1), window)
        y = sublanes_to_lanes(jnp.sum(window * w, axis=1, keepdims=True))  # [1, C]
        if has_bias:
            y = y + bias_ref[...].astype(f32)
        ys = jnp.where(lax.broadcasted_iota(jnp.int32, ys.shape, 0) == r, _act(y, activation), ys)
        state_out_ref[r] = window.astype(state_out_ref.dtype)
    y_ref[...] = ys.astype(y_ref.dtype)


def _batch_block(b: int) -> int:
    """Rows per program: the largest divisor of b up to 8, so that no batch block is partial (a partial block
    of the in-place state would leave rows past b to the compiler's edge handling; Pallas' interpreter refuses
    it outright)."""
    return max(d for d in range(1, min(b, SUBLANES) + 1) if b % d == 0)


def _update_forward(x, conv_state, weight, bias, *, activation, interpret):
    b, c, k = conv_state.shape
    block_b = _batch_block(b)
    # x and y as [b / block_b, block_b, c]: their blocks [block_b, 128] then span a whole second-minor dim
    in_specs = [
        pl.BlockSpec((None, block_b, LANES), lambda bi, ci: (bi, 0, ci)),
        pl.BlockSpec((block_b, LANES, k), lambda bi, ci: (bi, ci, 0)),
        pl.BlockSpec((LANES, k), lambda bi, ci: (ci, 0)),
    ]
    args = [x.reshape(b // block_b, block_b, c), conv_state, weight]
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, LANES), lambda bi, ci: (0, ci)))
        args.append(bias[None, :])
    kernel = functools.partial(_update_kernel, k=k, block_b=block_b, has_bias=bias is not None,
                               activation=activation)
    y, new_state = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b // block_b, block_b, c), x.dtype),
                   jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype)),
        grid=(b // block_b, c // LANES),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, block_b, LANES), lambda bi, ci: (bi, 0, ci)),
                   pl.BlockSpec((block_b, LANES, k), lambda bi, ci: (bi, ci, 0))),
        input_output_aliases={1: 1},  # the state is updated in place (donate it under jit to skip the copy)
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pu.tpu_interpret_params(interpret),
        name="causal_conv1d_update_tpu",
    )(*args)
    return y.reshape(b, c), new_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _update(x, conv_state, weight, bias, activation, interpret):
    return _update_forward(x, conv_state, weight, bias, activation=activation, interpret=interpret)


def _update_fwd(x, conv_state, weight, bias, activation, interpret):
    return _update(x, conv_state, weight, bias, activation, interpret), (x, conv_state, weight, bias)


def _update_bwd(activation, interpret, residuals, cotangents):
    _, vjp = jax.vjp(functools.partial(causal_conv1d_update_ref, activation=activation), *residuals)
    return vjp(cotangents)


_update.defvjp(_update_fwd, _update_bwd)


def causal_conv1d_update_tpu(x, conv_state, weight, bias=None, *, activation="silu", interpret=None):
    """Same contract as `causal_conv1d_update_ref`: x [b, c], conv_state [b, c, k], weight [c, k], bias [c]
    -> (y [b, c] in x's dtype, new conv_state in conv_state's dtype). One Mosaic TPU kernel, the state updated
    in place; `interpret` as in `causal_conv1d_tpu`; the gradient is the reference's VJP."""
    jax.eval_shape(functools.partial(causal_conv1d_update_ref, activation=activation), x, conv_state, weight, bias)
    _check_supported("causal_conv1d_update_tpu", x, conv_state.shape[1], conv_state.shape[2])
    return _update(x, conv_state, weight, bias, activation, pu.resolve_tpu_interpret(interpret))
