"""One Pallas kernel for a Mamba-2 layer's decode step between in_proj and out_proj, with its reference beside it.

For one new token per batch row (letters of `easymamba.typing`; c = e + 2gn conv channels, r = h / g heads a
group), from the in_proj output [z | x | B | C | dt] (HF's packing; xBC = [x | B | C] before the conv):

    window = [conv_state[:, 1:] | xBC]                   conv_state' = window                [c, k]
    xBC    = silu(window . conv_weight + conv_bias)      rounded to the activation dtype     [c]
    dt     = clip(softplus(dt + dt_bias), *dt_limit)                                         [h]
    S      = exp(dt A) S + dt x (x) B                    S = ssm_state, float32              [h, p, n]
    y      = (S C + D x) * silu(z)                                                           [h, p] = [e]
    y      = norm_weight * y * rsqrt(mean(y^2 over each group of e / g channels) + eps)     [e]

which is `Mamba2Mixer.__call__` at l == 1 with a cache, op for op: `causal_conv1d_update` + SiLU,
`selective_state_update` (dt_softplus, no z) and `GatedRMSNorm(y, z)` (mamba_ssm `Mamba2.step`).
`decode_step_ref` is those references composed. With `rms_input` x [b, d], first each row's [z | xBC | dt] is
multiplied by rsqrt(mean(x^2) + rms_eps) and rounded back to its dtype: the block's RMS norm, whose weight the
caller folded into in_proj (`Mamba2Mixer.decode_weights(pre_norm=)`), so the norm costs no launch of its own.

The kernel: one program per (batch row, head, block of `block_p` channels of the head; the whole head at large
batch, down to 16 channels at small, so that b = 1 still spreads over the GPU).
A program rolls the conv window of its channels and of its group's B and C (recomputed by each program of the
group, 2 n k MACs; the group's first program writes them back), updates its [block_p, n] slice of the state
and writes the gated y in float32 with its sum of squares. The grouped RMS norm then finishes in XLA, one small
fusion over [b, e]: a group spans heads of different programs. (A program per (batch row, group) that owns the
norm was measured 6x slower at b = 1 and 2x at b = 64: b g programs walking r states in turn; docs/benchmarks.md.)

Operands are read in place, so nothing runs between in_proj and the kernel: the in_proj output may come packed
[b, 2e + 2gn + h] or as parts (z, xBC, dt) or (z, x, B, C, dt); the conv weight [c, k] and bias [c] packed or
as (x, B, C) parts; `A_is_log=True` takes the parameter A_log and forms A = -exp(A_log) in the kernel. (Each
slice, concatenation or -exp left to XLA before a custom call is one more launch per layer and step.)

The SSM state is updated in place (`input_output_aliases`; donate it under jit). The conv state is not: every
program of a group reads the group's B / C window, so an in-place write by one of them would race with the
others' reads; a new conv state buffer is written instead.

`active` [b] bool (optional): rows where False keep both states as they were (a finished row of a batch that
generation keeps stepping); their y is computed as without `active` (and means nothing). The kernel writes those
rows' loaded states back unchanged, so holding a row costs no pass over the state (a `where` after the call
would read both states and break the in-place update).

Upstream: mamba_ssm `Mamba2.step` (causal_conv1d_update, selective_state_update with TIE_HDIM, RMSNormGated
with group_size = e / g). Backward: the VJP of `decode_step_ref` (a custom VJP, as the other kernels here).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.decode_step.reference import _operands, decode_step_ref

__all__ = ["decode_step_pallas", "decode_step_supported"]


def decode_step_supported(p: int, n: int, k: int) -> bool:
    """Shapes the compiled (Triton) kernel handles: [block_p, n] state tiles and [block_p | n, k] conv windows with
    power-of-two sides, so n and k powers of two, and p a power of two or a multiple of 16 (head dim 80, 96: its
    programs then take 16 or 32 channels each, `_default_block_p`); p * n <= 128 * 256."""
    return ((pu.is_pow2(p) or (p > 0 and p % 16 == 0)) and pu.is_pow2(n) and pu.is_pow2(k)
            and p * n <= 128 * 256)


# --------------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------------


def _softplus(v):
    # log1p(exp(v)) overflows for large v; above 20 softplus(v) = v to float32 precision (as upstream)
    return jnp.where(v > 20.0, v, jnp.log1p(jnp.exp(jnp.minimum(v, 20.0))))


def _kernel(*refs, where, n_in, e, g, n, p, k, r, block_p, dt_limit, A_is_log, has_active, rms):
    """`where[part] = (input position, offset)` for z, x, B, C, dt, w_x, w_B, w_C and (if any) b_x, b_B, b_C;
    then the inputs conv_state, A, D, dt_bias, ssm_state, then the row's RMS-norm input when `rms` = (eps, d,
    chunk, steps): d elements (zero-padded to steps * chunk), its sum of squares read `chunk` elements at a time;
    then the row's `active` flag [1] int32 when `has_active`."""
    n_ops = n_in - int(has_active) - int(rms is not None)
    ins, (y_ref, ss_ref, conv_out_ref, state_out_ref) = refs[:n_in], refs[n_in:]
    conv_ref, A_ref, D_ref, dtb_ref, state_ref = ins[n_ops - 5:n_ops]
    live = ins[n_in - 1][0] != 0 if has_active else None  # this row steps (else its states stay as loaded)
    f32 = jnp.float32

    def load(part, start, size):  # [size] of an operand given packed or in parts
        pos, offset = where[part]
        return ins[pos][pl.ds(offset + start, size)]

    hi, pj = pl.program_id(1), pl.program_id(2)
    gi = hi // r
    c0 = hi * p + pj * block_p  # this program's channels, within x (and within z and y)
    state = state_ref[...].astype(f32)  # [P, n], loaded first so its latency overlaps the conv's loads
    if rms is not None:  # the block's RMS norm, whose weight in_proj holds: this row's factor, from its input
        rms_eps, d, chunk, steps = rms

        def add_squares(i, acc):
            v = ins[n_ops][pl.ds(pl.multiple_of(i * chunk, chunk), chunk)].astype(f32)
            return acc + jnp.sum(v * v)

        norm_scale = lax.rsqrt(lax.fori_loop(0, steps, add_squares, jnp.zeros((), f32)) / d + rms_eps)

    def scaled(v):  # a value of the in_proj output, times the norm's factor, rounded back to its dtype
        return v if rms is None else (v.astype(f32) * norm_scale).astype(v.dtype)

    def act(part, start, size):
        return scaled(load(part, start, size))

    z = act("z", c0, block_p).astype(f32)  # [P]
    pos, offset = where["dt"]
    dt = scaled(ins[pos][offset + hi]).astype(f32) + dtb_ref[...].astype(f32)
    A = A_ref[...].astype(f32)
    A = -jnp.exp(A) if A_is_log else A
    D = D_ref[...].astype(f32)

    col = lax.broadcasted_iota(jnp.int32, (1, k), 1)  # [1, k]

    def conv(part, start, size, row0):
        """Conv + SiLU of `size` channels of `part` from `start` (rows row0.. of the packed conv state): (output
        [size] float32, rounded to the activation dtype as the reference; new window [size, k])."""
        rows = row0 + lax.broadcasted_iota(jnp.int32, (size, 1), 0)  # [S, 1]
        shifted = conv_ref[rows, jnp.minimum(col + 1, k - 1)].astype(f32)  # [S, k]: column j <- column j + 1
        new = act(part, start, size)  # [S]
        window = jnp.where(col == k - 1, new.astype(f32)[:, None], shifted)  # [S, k]
        wpos, woff = where["w_" + part]
        acc = jnp.sum(window * ins[wpos][pl.ds(woff + start, size), :].astype(f32), axis=1)  # [S]
        if "b_" + part in where:
            acc = acc + load("b_" + part, start, size).astype(f32)
        if live is not None:  # a held row writes back the window it had
            window = jnp.where(live, window, conv_ref[rows, col].astype(f32))
        return (acc * jax.nn.sigmoid(acc)).astype(new.dtype).astype(f32), window

    x, x_win = conv("x", c0, block_p, c0)  # [P], [P, k]
    B, B_win = conv("B", gi * n, n, e + gi * n)  # [n], [n, k]
    C, C_win = conv("C", gi * n, n, e + g * n + gi * n)

    dt = jnp.clip(_softplus(dt), dt_limit[0], dt_limit[1])
    old = state
    state = jnp.exp(dt * A) * state + (dt * x)[:, None] * B[None, :]  # [P, n]
    y = (jnp.sum(state * C[None, :], axis=1) + D * x) * (z * jax.nn.sigmoid(z))  # [P]
    if live is not None:
        state = jnp.where(live, state, old)

    state_out_ref[...] = state.astype(state_out_ref.dtype)
    y_ref[...] = y  # float32, gated, not yet normalised
    ss_ref[...] = jnp.sum(y * y)
    conv_out_ref[pl.ds(c0, block_p), :] = x_win.astype(conv_out_ref.dtype)

    @pl.when((hi % r == 0) & (pj == 0))  # the group's first program writes the group's B / C windows, once
    def _():
        conv_out_ref[pl.ds(e + gi * n, n), :] = B_win.astype(conv_out_ref.dtype)
        conv_out_ref[pl.ds(e + g * n + gi * n, n), :] = C_win.astype(conv_out_ref.dtype)


def _default_block_p(b: int, h: int, p: int) -> int:
    """Channels of a head per program: the whole head once there are >= 1024 programs, else halved down to 16 so
    that small batches still spread over the GPU (H100, 130M layer, docs/benchmarks.md: the kernel 3.3 us with 16
    channels vs 4.0 with 64 at b = 1; the layer step 13.4 vs 15.2 us at b = 16; equal at b = 64). A head dim that
    is a multiple of 16 but no power of two starts from its largest power-of-two divisor (80: 16, 96: 32), the
    widest block the compiled kernel loads."""
    bp = p & -p if p % 16 == 0 and not pu.is_pow2(p) else p
    while b * h * (p // bp) < 1024 and bp > 16 and bp % 2 == 0:
        bp //= 2
    return bp


def _rms_chunk(d: int) -> int:
    """Elements of the RMS-norm input a kernel reads at a time: the largest power of two dividing d, at most 1024
    (Triton loads power-of-two shapes; `_kernel_call` zero-pads a d with no factor of 16)."""
    return min(d & -d, 1024)


def _kernel_call(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, active=None, rms_input=None,
                 *, n_groups, dt_limit, A_is_log, block_p, interpret, rms_eps=1e-5):
    """The pallas_call: (gated y [b, e] float32, sums of its squares per program [b, h * p / block_p], new
    conv_state, new ssm_state). Batch rows and heads are independent here (a mesh can run it per shard); the
    norm's group reduction, which spans heads, is `_finish_norm`'s."""
    (b, e, c, k, h, p, n, g), _, act, weight, bias = _operands(zxbcdt, conv_weight, conv_bias, conv_state,
                                                               ssm_state, n_groups)
    r = h // g
    bp = _default_block_p(b, h, p) if block_p is None else block_p
    if not 1 <= bp <= p or p % bp:
        raise ValueError(f"block_p ({bp}) must divide the head dim p ({p})")
    npb = p // bp

    # every distinct array once, in this order: activations (rows), conv weights, conv biases, then the rest
    inputs, specs, where = [], [], {}

    def add(part, array, offset, spec):
        for pos, seen in enumerate(inputs):
            if seen is array:
                break
        else:
            pos = len(inputs)
            inputs.append(array)
            specs.append(spec)
        where[part] = (pos, offset)

    whole_row = lambda *shape: pl.BlockSpec((None, *shape), lambda bi, hi, pj: (bi,) + (0,) * len(shape))  # noqa
    everything = lambda *shape: pl.BlockSpec(shape, lambda bi, hi, pj: (0,) * len(shape))  # noqa: E731
    for m, (array, offset) in act.items():
        add(m, array, offset, whole_row(array.shape[1]))
    for m, (array, offset) in weight.items():
        add("w_" + m, array, offset, everything(*array.shape))
    for m, (array, offset) in (bias or {}).items():
        add("b_" + m, array, offset, everything(*array.shape))
    per_head = pl.BlockSpec((None,), lambda bi, hi, pj: (hi,))
    state_spec = pl.BlockSpec((None, None, bp, n), lambda bi, hi, pj: (bi, hi, pj, 0))
    inputs += [conv_state, A, D, dt_bias, ssm_state]
    specs += [whole_row(c, k), per_head, per_head, per_head, state_spec]
    state_pos = len(inputs) - 1
    rms = None
    if rms_input is not None:
        d = rms_input.shape[1]
        padded = rms_input if _rms_chunk(d) >= 16 else jnp.pad(rms_input, ((0, 0), (0, (-d) % 16)))
        chunk = _rms_chunk(padded.shape[1])
        rms = (float(rms_eps), d, chunk, padded.shape[1] // chunk)
        inputs.append(padded)
        specs.append(whole_row(padded.shape[1]))
    if active is not None:
        inputs.append(active.astype(jnp.int32)[:, None])  # [b, 1]
        specs.append(whole_row(1))
    n_in = len(inputs)

    kernel = functools.partial(_kernel, where=where, n_in=n_in, e=e, g=g, n=n, p=p, k=k, r=r, block_p=bp,
                               dt_limit=dt_limit, A_is_log=A_is_log, has_active=active is not None, rms=rms)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, e), jnp.float32), jax.ShapeDtypeStruct((b, h * npb), jnp.float32),
                   jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
                   jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype)),
        grid=(b, h, npb),
        in_specs=specs,
        out_specs=(pl.BlockSpec((None, bp), lambda bi, hi, pj: (bi, hi * npb + pj)),
                   pl.BlockSpec((None, None), lambda bi, hi, pj: (bi, hi * npb + pj)),
                   whole_row(c, k), state_spec),
        input_output_aliases={state_pos: 3},
        compiler_params=pu.compiler_params(num_warps=4 if bp * n <= 64 * 128 else 8, num_stages=1, interpret=interpret),
        interpret=interpret,
        name="mamba2_decode_step",
    )(*inputs)


def _sum_by_halves(x):
    """x [..., m] summed over its last axis as log2(m) elementwise adds of halves. A `reduce` to one value a row
    is a kernel of its own in XLA (one launch a layer and step: 24 of a 130M step's 151.5 at b = 1, compiled for an
    H100; benchmarks/deviceless.py), where these adds fuse into the norm's multiply that consumes them."""
    odd = None  # the last element of each odd length, set aside (slices only: a concatenate splits the fusion)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        if x.shape[-1] % 2:
            odd = x[..., -1] if odd is None else odd + x[..., -1]
        x = x[..., :half] + x[..., half:2 * half]
    return x[..., 0] if odd is None else x[..., 0] + odd


def _finish_norm(y, ss, norm_weight, *, n_groups, eps, y_dtype):
    """The grouped RMS norm from the kernel's gated y [b, e] and per-program sums of squares: one small XLA fusion
    (the sums added by halves, `_sum_by_halves`, so that XLA fuses them in)."""
    b, e = y.shape
    g = n_groups
    scale = lax.rsqrt(_sum_by_halves(ss.reshape(b, g, -1)) / (e // g) + eps)  # [b, g]
    y = norm_weight.astype(jnp.float32).reshape(g, e // g) * y.reshape(b, g, e // g) * scale[..., None]
    return y.reshape(b, e).astype(y_dtype)


def _forward(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight, active, rms_input,
             *, n_groups, eps, dt_limit, A_is_log, y_dtype, rms_eps, block_p, interpret):
    y, ss, conv_state, ssm_state = _kernel_call(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias,
                                                ssm_state, active, rms_input, n_groups=n_groups, dt_limit=dt_limit,
                                                A_is_log=A_is_log, block_p=block_p, interpret=interpret,
                                                rms_eps=rms_eps)
    z_dtype = (zxbcdt[0] if isinstance(zxbcdt, (tuple, list)) else zxbcdt).dtype
    y = _finish_norm(y, ss, norm_weight, n_groups=n_groups, eps=eps, y_dtype=z_dtype if y_dtype is None else y_dtype)
    return y, conv_state, ssm_state


_NONDIFF = ("n_groups", "eps", "dt_limit", "A_is_log", "y_dtype", "rms_eps", "block_p", "interpret")
_N_OPERANDS = 11  # zxbcdt ... norm_weight, active, rms_input


@functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(_N_OPERANDS, _N_OPERANDS + len(_NONDIFF))))
def _decode_step(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight, active,
                 rms_input, *statics):
    return _forward(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight, active,
                    rms_input, **dict(zip(_NONDIFF, statics)))


def _decode_step_fwd(*args):
    return _decode_step(*args), args[:_N_OPERANDS]


def _decode_step_bwd(*rest):
    # a decode step's backward is rare (RL, online learning): the reference's VJP, exact
    statics, (residuals, cotangents) = dict(zip(_NONDIFF, rest[:len(_NONDIFF)])), rest[len(_NONDIFF):]
    statics.pop("block_p")
    statics.pop("interpret")
    *residuals, active, rms_input = residuals
    _, vjp = jax.vjp(lambda *a: decode_step_ref(*a[:-1], active, a[-1], **statics), *residuals, rms_input)
    *grads, d_rms = vjp(cotangents)  # d_rms None without rms_input
    return (*grads, None, d_rms)  # `active` is a bool mask: no cotangent


_decode_step.defvjp(_decode_step_fwd, _decode_step_bwd)


def _static(n_groups, eps, dt_limit, y_dtype):
    lo, hi = dt_limit
    if not lo <= hi:
        raise ValueError(f"dt_limit must be a pair (low, high) with low <= high, got {dt_limit!r}")
    return int(n_groups), float(eps), (float(lo), float(hi)), None if y_dtype is None else jnp.dtype(y_dtype)


def decode_step_pallas(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight,
                       active=None, rms_input=None, *, n_groups: int, eps: float, dt_limit=(0.0, math.inf),
                       A_is_log: bool = False, y_dtype=None, rms_eps: float = 1e-5, block_p: int | None = None,
                       interpret: bool | None = None):
    """Same contract as `decode_step_ref`; one Pallas kernel plus the norm's last step in XLA. Compiled on GPU
    (shapes: `decode_step_supported`), interpreted elsewhere. `block_p`: channels of a head per program, dividing p (a
    power of two where compiled; default: the whole head, or its largest power-of-two divisor, at large b h, fewer
    at small; `_default_block_p`). `interpret`: Pallas'
    interpreter (None: compiled on a GPU, interpreted elsewhere)."""
    n_groups, eps, dt_limit, y_dtype = _static(n_groups, eps, dt_limit, y_dtype)
    kw = dict(n_groups=n_groups, eps=eps, dt_limit=dt_limit, A_is_log=bool(A_is_log), y_dtype=y_dtype,
              rms_eps=float(rms_eps))
    jax.eval_shape(functools.partial(decode_step_ref, **kw),  # the reference's shape checks; abstract, no compute
                   zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight, active,
                   rms_input)
    return _decode_step(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight, active,
                        rms_input, *kw.values(), None if block_p is None else int(block_p),
                        pu.default_interpret(interpret))
