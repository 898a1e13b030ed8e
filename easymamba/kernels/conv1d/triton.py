"""Pallas kernels for Mamba's depthwise causal conv1d: the prefill over a sequence and the decode update.

    y[t, c] = act(bias[c] + sum_{i=0..k-1} weight[c, i] * xpad[t + i, c]),   xpad = x left-padded by k-1

(semantics, conv-state convention, `seq_idx` and dtype rules: `easymamba.kernels.conv1d.reference`).

Prefill: one program per (batch row, block of `block_l` tokens, block of `block_c` channels), channels-last
[b, l, c] as the in_proj output comes. Each tap is a gather of rows t + i - (k-1) (clamped into the sequence,
then masked): rows before the start read the initial state, rows across a `seq_idx` boundary read zero, so
every output tile is written once from one pass over its inputs (re-reads of the k-1 halo rows hit cache).
The returned conv_state (the last k pre-conv columns) is k columns of x: it is taken with the reference on
the sequence's tail, not in the kernel. Upstream: the channel-last kernel of Dao-AILab/causal-conv1d
(`causal_conv1d_channellast_fwd_kernel`), which also fuses SiLU.

Decode update: one program per (batch row, block of channels) rolls the window [block_c, k] by one column,
writes x as the newest, and returns act(window . weight + bias); the state is updated in place
(`input_output_aliases`). Upstream: `causal_conv1d_update` of the same repository.

Prefill backward: one program per (batch row, block of tokens, block of channels) as the forward. With
u = the pre-activation, du = dy * act'(u), it writes
    dx[s]      = sum_i weight[:, i] du[s + (k-1) - i]      (masked where the tap crossed a segment boundary)
and per-block partials of dweight[:, i] = sum_t du[t] xpad[t + i] and dbias = sum_t du[t], which XLA sums over
batch rows and blocks (deterministic: no atomics). u is recomputed at the k rows s .. s+k-1 each output row
needs (2k-1 shifted gathers of x, the halo hits cache). The initial state's gradient (through the first k-1
outputs) and the conv_state output's gradient (a copy of inputs) are the reference's VJP on those few rows.
The decode update's VJP is the reference's.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = [
    "causal_conv1d_pallas",
    "causal_conv1d_update_pallas",
    "conv1d_supported",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
]


def _channel_block(c: int, cap: int) -> int:
    """The largest power of two <= cap that divides c (1 at worst), so channel blocks never straddle the end."""
    block = cap
    while c % block:
        block //= 2
    return block


def conv1d_supported(c: int, k: int) -> bool:
    """Shapes the compiled (Triton) kernels handle well: power-of-two k, channels in blocks of >= 16."""
    return pu.is_pow2(k) and _channel_block(c, 128) >= 16


def _act(y, activation):
    return y * jax.nn.sigmoid(y) if activation == "silu" else y


# --------------------------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------------------------


def _conv_kernel(*refs, l, k, block_l, block_c, has_bias, has_init, has_seg, activation):
    refs = list(refs)
    x_ref, w_ref = refs[:2]
    rest = refs[2:]
    bias_ref = rest.pop(0) if has_bias else None
    init_ref = rest.pop(0) if has_init else None
    seg_ref = rest.pop(0) if has_seg else None
    (y_ref,) = rest

    f32 = jnp.float32
    c0 = pl.program_id(2) * block_c
    t = pl.program_id(1) * block_l + lax.broadcasted_iota(jnp.int32, (block_l,), 0)  # [T] output positions
    cols = c0 + lax.broadcasted_iota(jnp.int32, (1, block_c), 1)  # [1, C] channel indices (for the init gather)
    if has_seg:
        seg_t = seg_ref[jnp.minimum(t, l - 1)]  # [T]
    acc = jnp.zeros((block_l, block_c), f32)
    if has_bias:
        acc = acc + bias_ref[...].astype(f32)[None, :]
    for i in range(k):  # tap i reads position t + i - (k-1); k is 2..4
        src = t + (i - (k - 1))  # [T]
        rows = jnp.clip(src, 0, l - 1)
        tap = x_ref[rows, pl.ds(c0, block_c)].astype(f32)  # [T, C] gather of whole rows
        inside = src >= 0  # [T]
        if has_seg:
            inside = inside & (seg_ref[rows] == seg_t)
        tap = jnp.where(inside[:, None], tap, 0.0)
        if has_init:
            # position src < 0 is column k + src of the initial state, context for segment 0 only
            from_ctx = src < 0
            if has_seg:
                from_ctx = from_ctx & (seg_t == 0)
            kcol = jnp.clip(src + k, 0, k - 1)[:, None]  # [T, 1]
            ctx = init_ref[cols, kcol].astype(f32)  # [T, C]
            tap = jnp.where(from_ctx[:, None], ctx, tap)
        acc = acc + w_ref[:, i].astype(f32)[None, :] * tap
    y_ref[...] = _act(acc, activation).astype(y_ref.dtype)


def _segments(seq_idx):
    """seq_idx renumbered 0, 1, 2, ... at every change, so segment membership is an equality test."""
    starts = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)
    return jnp.cumsum(jnp.pad(starts, [(0, 0), (1, 0)]), axis=1).astype(jnp.int32)


def _conv_forward(x, weight, bias, initial_state, seq_idx, *, activation, interpret, block_l=64):
    b, l, c = x.shape
    k = weight.shape[1]
    block_c = _channel_block(c, 128)
    block_l = min(block_l, pu.pow2_at_least(l))
    n_l = pl.cdiv(l, block_l)
    in_specs = [
        pl.BlockSpec((None, l, c), lambda bi, j, ci: (bi, 0, 0)),  # the whole row: taps gather from it
        pl.BlockSpec((block_c, k), lambda bi, j, ci: (ci, 0)),
    ]
    args = [x, weight]
    if bias is not None:
        in_specs.append(pl.BlockSpec((block_c,), lambda bi, j, ci: (ci,)))
        args.append(bias)
    if initial_state is not None:
        in_specs.append(pl.BlockSpec((None, c, k), lambda bi, j, ci: (bi, 0, 0)))
        args.append(initial_state)
    if seq_idx is not None:
        in_specs.append(pl.BlockSpec((None, l), lambda bi, j, ci: (bi, 0)))
        args.append(_segments(seq_idx))
    kernel = functools.partial(
        _conv_kernel, l=l, k=k, block_l=block_l, block_c=block_c, has_bias=bias is not None,
        has_init=initial_state is not None, has_seg=seq_idx is not None, activation=activation,
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, n_l * block_l, c), x.dtype),  # padded rows are sliced off below
        grid=(b, n_l, c // block_c),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_l, block_c), lambda bi, j, ci: (bi, j, ci)),
        compiler_params=pu.compiler_params(num_warps=4, num_stages=1, interpret=interpret),
        interpret=interpret,
        name="causal_conv1d",
    )(*args)
    if n_l * block_l != l:
        y = y[:, :l]
    # the conv state is the window over the last k positions; the reference on the tail is exact and cheap
    tail = min(l, k)
    _, conv_state = causal_conv1d_ref(
        x[:, l - tail :], weight, bias, activation=activation,
        initial_state=initial_state if l < k else None,
        seq_idx=None if seq_idx is None else seq_idx[:, l - tail :],
    )
    return y, conv_state


def _conv_bwd_kernel(*refs, l, k, block_l, block_c, has_bias, has_init, has_seg, activation, cdtype):
    refs = list(refs)
    x_ref, w_ref, dy_ref = refs[:3]
    rest = refs[3:]
    bias_ref = rest.pop(0) if has_bias else None
    init_ref = rest.pop(0) if has_init else None
    seg_ref = rest.pop(0) if has_seg else None
    dx_ref, dw_ref = rest[:2]
    dbias_ref = rest[2] if has_bias else None

    c0 = pl.program_id(2) * block_c
    s = pl.program_id(1) * block_l + lax.broadcasted_iota(jnp.int32, (block_l,), 0)  # [T] this block's rows
    cols = c0 + lax.broadcasted_iota(jnp.int32, (1, block_c), 1)  # [1, C]
    chans = pl.ds(c0, block_c)
    seg_of = lambda d: seg_ref[jnp.clip(s + d, 0, l - 1)]  # noqa: E731  [T] segment of row s + d

    def tap(m, i):
        """The forward's tap i of output row s + m (position s + m + i - (k-1)), masked as the forward masks it.
        Re-gathered at each use (the rows hit cache) so that few [T, C] tiles are live at once."""
        d = m + i - (k - 1)
        src = s + d
        value = x_ref[jnp.clip(src, 0, l - 1), chans].astype(cdtype)  # [T, C]
        inside = src >= 0
        if has_seg:
            inside = inside & (seg_of(d) == seg_of(m))
        value = jnp.where(inside[:, None], value, 0.0)
        if has_init and d < 0:
            from_ctx = src < 0
            if has_seg:
                from_ctx = from_ctx & (seg_of(m) == 0)
            ctx = init_ref[cols, jnp.clip(src + k, 0, k - 1)[:, None]].astype(cdtype)  # [T, C]
            value = jnp.where(from_ctx[:, None], ctx, value)
        return value

    dx = jnp.zeros((block_l, block_c), cdtype)
    for m in range(k):  # output row s + m reads x[s] through tap k-1-m
        u = jnp.zeros((block_l, block_c), cdtype)
        if has_bias:
            u = u + bias_ref[...].astype(cdtype)[None, :]
        for i in range(k):
            u = u + w_ref[:, i].astype(cdtype)[None, :] * tap(m, i)
        t = s + m
        du = dy_ref[jnp.clip(t, 0, l - 1), chans].astype(cdtype)  # [T, C]
        if activation == "silu":
            sig = jax.nn.sigmoid(u)
            du = du * sig * (1.0 + u * (1.0 - sig))
        du = jnp.where((t < l)[:, None], du, 0.0)
        if m == 0:  # this block's own rows: the weight and bias partial sums
            for i in range(k):
                dw_ref[i, :] = jnp.sum(du * tap(0, i), axis=0).astype(dw_ref.dtype)
            if has_bias:
                dbias_ref[...] = jnp.sum(du, axis=0).astype(dbias_ref.dtype)
        contrib = w_ref[:, k - 1 - m].astype(cdtype)[None, :] * du
        if has_seg:  # row s + m reads x[s] unless a segment boundary lies between them
            contrib = jnp.where((seg_of(m) == seg_of(0))[:, None], contrib, 0.0)
        dx = dx + contrib
    dx_ref[...] = dx.astype(dx_ref.dtype)


def _conv_backward(x, weight, bias, initial_state, seq_idx, dy, dstate, *, activation, interpret, block_l=32,
                   num_warps=4):
    """Gradients of (y, conv_state) with respect to (x, weight, bias, initial_state); None for absent ones.
    block_l 32 (half the forward's): the program holds ~4 [block_l, block_c] float32 tiles, the forward 2."""
    b, l, c = x.shape
    k = weight.shape[1]
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    block_c = _channel_block(c, 128)
    block_l = min(block_l, pu.pow2_at_least(l))
    n_l = pl.cdiv(l, block_l)
    in_specs = [
        pl.BlockSpec((None, l, c), lambda bi, j, ci: (bi, 0, 0)),  # x: the whole row, gathered from
        pl.BlockSpec((block_c, k), lambda bi, j, ci: (ci, 0)),
        pl.BlockSpec((None, l, c), lambda bi, j, ci: (bi, 0, 0)),  # dy: the whole row, gathered from
    ]
    args = [x, weight, dy]
    if bias is not None:
        in_specs.append(pl.BlockSpec((block_c,), lambda bi, j, ci: (ci,)))
        args.append(bias)
    if initial_state is not None:
        in_specs.append(pl.BlockSpec((None, c, k), lambda bi, j, ci: (bi, 0, 0)))
        args.append(initial_state)
    if seq_idx is not None:
        in_specs.append(pl.BlockSpec((None, l), lambda bi, j, ci: (bi, 0)))
        args.append(_segments(seq_idx))
    out_shape = [jax.ShapeDtypeStruct((b, n_l * block_l, c), x.dtype),  # padded rows are sliced off below
                 jax.ShapeDtypeStruct((b, n_l, k, c), cdtype)]
    out_specs = [pl.BlockSpec((None, block_l, block_c), lambda bi, j, ci: (bi, j, ci)),
                 pl.BlockSpec((None, None, k, block_c), lambda bi, j, ci: (bi, j, 0, ci))]
    if bias is not None:
        out_shape.append(jax.ShapeDtypeStruct((b, n_l, c), cdtype))
        out_specs.append(pl.BlockSpec((None, None, block_c), lambda bi, j, ci: (bi, j, ci)))
    kernel = functools.partial(
        _conv_bwd_kernel, l=l, k=k, block_l=block_l, block_c=block_c, has_bias=bias is not None,
        has_init=initial_state is not None, has_seg=seq_idx is not None, activation=activation, cdtype=cdtype,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(b, n_l, c // block_c),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        compiler_params=pu.compiler_params(num_warps=num_warps, num_stages=1, interpret=interpret),
        interpret=interpret,
        name="causal_conv1d_bwd",
    )(*args)
    dx, dw_part = outs[0], outs[1]
    dx = dx if n_l * block_l == l else dx[:, :l]
    dweight = jnp.swapaxes(dw_part.sum(axis=(0, 1)), 0, 1).astype(weight.dtype)  # [c, k]
    dbias = None if bias is None else outs[2].sum(axis=(0, 1)).astype(bias.dtype)

    # conv_state is a copy of the last k input columns (initial-state columns too when l < k): the reference's
    # VJP on that tail. The initial state feeds the first k-1 outputs only: the reference's VJP on that head.
    tail = min(l, k)
    seq_tail = None if seq_idx is None else seq_idx[:, l - tail :]
    state_of = lambda xt, init: causal_conv1d_ref(  # noqa: E731
        xt, weight, bias, activation=activation, initial_state=init if l < k else None, seq_idx=seq_tail)[1]
    _, state_vjp = jax.vjp(state_of, x[:, l - tail :], initial_state)
    dx_tail, dinit = state_vjp(dstate)
    dx = dx.at[:, l - tail :].set((dx[:, l - tail :].astype(cdtype) + dx_tail.astype(cdtype)).astype(x.dtype))
    if initial_state is not None:
        head = min(l, k - 1)
        y_of = lambda init: causal_conv1d_ref(  # noqa: E731
            x[:, :head], weight, bias, activation=activation, initial_state=init,
            seq_idx=None if seq_idx is None else seq_idx[:, :head])[0]
        _, y_vjp = jax.vjp(y_of, initial_state)
        (dinit_y,) = y_vjp(dy[:, :head])
        dinit = (dinit.astype(cdtype) + dinit_y.astype(cdtype)).astype(initial_state.dtype)
    return dx, dweight, dbias, dinit


BACKWARDS = ("pallas", "reference")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _conv(x, weight, bias, initial_state, seq_idx, activation, backward, interpret):
    return _conv_forward(x, weight, bias, initial_state, seq_idx, activation=activation, interpret=interpret)


def _conv_fwd(x, weight, bias, initial_state, seq_idx, activation, backward, interpret):
    out = _conv(x, weight, bias, initial_state, seq_idx, activation, backward, interpret)
    return out, (x, weight, bias, initial_state, seq_idx)


def _conv_bwd(activation, backward, interpret, residuals, cotangents):
    x, weight, bias, initial_state, seq_idx = residuals
    if backward == "pallas":
        dy, dstate = cotangents
        return (*_conv_backward(x, weight, bias, initial_state, seq_idx, dy, dstate, activation=activation,
                                interpret=interpret), None)
    ref = lambda x, w, bias, init: causal_conv1d_ref(  # noqa: E731
        x, w, bias, activation=activation, initial_state=init, seq_idx=seq_idx)
    _, vjp = jax.vjp(ref, x, weight, bias, initial_state)
    return (*vjp(cotangents), None)


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_conv1d_pallas(x, weight, bias=None, *, activation="silu", initial_state=None, seq_idx=None,
                         backward="pallas", interpret: bool | None = None):
    """Same contract as `causal_conv1d_ref`: x [b, l, c], weight [c, k], bias [c], initial_state [b, c, k],
    seq_idx [b, l] int -> (y [b, l, c], conv_state [b, c, k]) in x's dtype. One Pallas kernel for y; the
    gradient is the backward kernel (`backward="pallas"`) or the reference's VJP (`backward="reference"`).
    `interpret`: Pallas' interpreter (None: compiled on a GPU, interpreted elsewhere)."""
    jax.eval_shape(  # validates shapes and activation with the reference's sentences; no compute
        functools.partial(causal_conv1d_ref, activation=activation), x, weight, bias,
        initial_state=initial_state, seq_idx=seq_idx,
    )
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    return _conv(x, weight, bias, initial_state, seq_idx, activation, backward, pu.default_interpret(interpret))


# --------------------------------------------------------------------------------------------------------------
# Decode update
# --------------------------------------------------------------------------------------------------------------


def _update_kernel(*refs, k, block_c, has_bias, activation):
    refs = list(refs)
    x_ref, state_ref, w_ref = refs[:3]
    rest = refs[3:]
    bias_ref = rest.pop(0) if has_bias else None
    y_ref, state_out_ref = rest

    f32 = jnp.float32
    rows = lax.broadcasted_iota(jnp.int32, (block_c, 1), 0)
    col = lax.broadcasted_iota(jnp.int32, (1, k), 1)
    shifted = state_ref[rows, jnp.minimum(col + 1, k - 1)].astype(f32)  # [C, k]: column j <- column j + 1
    x = x_ref[...].astype(f32)  # [C]
    window = jnp.where(col == k - 1, x[:, None], shifted)  # [C, k]: x is the newest column
    y = jnp.sum(window * w_ref[...].astype(f32), axis=1)  # [C]
    if has_bias:
        y = y + bias_ref[...].astype(f32)
    state_out_ref[...] = window.astype(state_out_ref.dtype)
    y_ref[...] = _act(y, activation).astype(y_ref.dtype)


def _update_forward(x, conv_state, weight, bias, *, activation, interpret):
    b, c, k = conv_state.shape
    block_c = _channel_block(c, 256)
    in_specs = [
        pl.BlockSpec((None, block_c), lambda bi, ci: (bi, ci)),
        pl.BlockSpec((None, block_c, k), lambda bi, ci: (bi, ci, 0)),
        pl.BlockSpec((block_c, k), lambda bi, ci: (ci, 0)),
    ]
    args = [x, conv_state, weight]
    if bias is not None:
        in_specs.append(pl.BlockSpec((block_c,), lambda bi, ci: (ci,)))
        args.append(bias)
    kernel = functools.partial(_update_kernel, k=k, block_c=block_c, has_bias=bias is not None,
                               activation=activation)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, c), x.dtype), jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype)),
        grid=(b, c // block_c),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, block_c), lambda bi, ci: (bi, ci)),
                   pl.BlockSpec((None, block_c, k), lambda bi, ci: (bi, ci, 0))),
        input_output_aliases={1: 1},
        compiler_params=pu.compiler_params(num_warps=4, num_stages=1, interpret=interpret),
        interpret=interpret,
        name="causal_conv1d_update",
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _update(x, conv_state, weight, bias, activation, interpret):
    return _update_forward(x, conv_state, weight, bias, activation=activation, interpret=interpret)


def _update_fwd(x, conv_state, weight, bias, activation, interpret):
    return _update(x, conv_state, weight, bias, activation, interpret), (x, conv_state, weight, bias)


def _update_bwd(activation, interpret, residuals, cotangents):
    ref = functools.partial(causal_conv1d_update_ref, activation=activation)
    _, vjp = jax.vjp(ref, *residuals)
    return vjp(cotangents)


_update.defvjp(_update_fwd, _update_bwd)


def causal_conv1d_update_pallas(x, conv_state, weight, bias=None, *, activation="silu",
                                interpret: bool | None = None):
    """Same contract as `causal_conv1d_update_ref`: x [b, c], conv_state [b, c, k], weight [c, k], bias [c]
    -> (y [b, c] in x's dtype, new conv_state in conv_state's dtype). One Pallas kernel."""
    jax.eval_shape(functools.partial(causal_conv1d_update_ref, activation=activation), x, conv_state, weight, bias)
    return _update(x, conv_state, weight, bias, activation, pu.default_interpret(interpret))
