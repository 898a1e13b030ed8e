"""Mosaic TPU Pallas kernel for one SSD decode step (`selective_state_update`), the TPU form of
`triton.py` beside this file. Per head (letters of `easymamba.typing`):

    dt    = clip(softplus?(dt + dt_bias), *dt_limit)
    state = exp(dt A) state + dt x (x) B          # (x): outer product, [p] x [n] -> [p, n]
    y     = state C + D x ;   y = y * silu(z)  when z is given

Grid (b, h / block_h), both parallel. A program holds block_h heads' states [block_h, p, n] (n on the 128
lanes, p on sublanes), reads them once and writes them back into the same buffer (`input_output_aliases`;
donate the state under jit to skip the copy). x, z and y move as [block_h, p] tiles (p on lanes, as they lie
in HBM); the per-head scalars dt [b, h], A, D, dt_bias [h] sit in SMEM (float32), and B, C come as the batch
row's whole [g, n]. The heads of a block are an unrolled loop: a head's x row becomes a [p, 1] column by a
masked sum over an iota identity (exact, no transpose op), the state update is elementwise, and y's row is an
MXU product C . state^T at float32 precision. The softplus and exp run on a lane row, not on the scalar unit.

Checked here: interpret mode against the float64 reference and the Pallas -> Mosaic lowering
(`jax.export(..., platforms=("tpu",))`); the Mosaic compiler passes inside libtpu are not reachable without a
TPU, so compiling on one is untested. Block sizes are untuned. Upstream: `_selective_scan_update_kernel` of
state-spaces/mamba (its TIE_HDIM path); reference: `selective_state_update_ref` (`reference.py` beside this
file), whose VJP is the backward.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.conv1d.mosaic_tpu import lanes_to_sublanes, pick_row
from easymamba.kernels.state_update.reference import selective_state_update_ref

__all__ = ["selective_state_update_tpu", "state_update_tpu_supported"]

LANES = 128
SUBLANES = 8
BLOCK_BYTES = 1 << 20  # a state block's float32 size cap: in + out, double-buffered, is 4 MiB of VMEM
MAX_BLOCK_H = 32  # heads are an unrolled loop in the kernel body
NT = (((1,), (1,)), ((), ()))  # a . b^T


def state_update_tpu_supported(p: int, n: int) -> bool:
    """Shapes the TPU kernel is written for: a head's [p, n] state in whole (8, 128) tiles, at most 1 MiB."""
    return p % SUBLANES == 0 and n % LANES == 0 and p * n * 4 <= BLOCK_BYTES


def _head_block(h: int, p: int, n: int) -> int:
    """The most heads per program whose float32 state fits BLOCK_BYTES: a divisor of h that is h itself or a
    multiple of 8 (the sublane rule for the [block_h, p] tiles of x, z and y)."""
    legal = [hb for hb in range(1, h + 1) if h % hb == 0 and (hb == h or hb % SUBLANES == 0)]
    fitting = [hb for hb in legal if hb * p * n * 4 <= BLOCK_BYTES and hb <= MAX_BLOCK_H]
    return max(fitting) if fitting else min(legal)


def _softplus(v):
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))  # = log(1 + e^v) without overflow


def _kernel(*refs, h, r, block_h, has_D, has_z, has_bias, dt_softplus, dt_limit):
    refs = list(refs)
    state_ref, x_ref, B_ref, C_ref = refs[:4]
    rest = refs[4:]
    z_ref = rest.pop(0) if has_z else None
    dt_ref, A_ref = rest[:2]  # SMEM: dt [b * h], A [h]
    rest = rest[2:]
    D_ref = rest.pop(0) if has_D else None
    bias_ref = rest.pop(0) if has_bias else None
    y_ref, state_out_ref = rest

    f32 = jnp.float32
    bi = pl.program_id(0)
    h0 = pl.program_id(1) * block_h
    n = B_ref.shape[1]
    xs = x_ref[...].astype(f32)  # [H, p]
    zs = z_ref[...].astype(f32) if has_z else None  # [H, p]
    Bs = B_ref[...].astype(f32)  # [g, n]
    Cs = C_ref[...].astype(f32)  # [g, n]
    ys = jnp.zeros(xs.shape, f32)
    for i in range(block_h):
        head = h0 + i
        dt = jnp.full((1, n), dt_ref[bi * h + head], f32)  # [1, n]: one value on every lane
        if has_bias:
            dt = dt + bias_ref[head]
        if dt_softplus:
            dt = _softplus(dt)
        dt = jnp.maximum(dt, dt_limit[0])
        if dt_limit[1] != math.inf:
            dt = jnp.minimum(dt, dt_limit[1])
        decay = jnp.exp(dt * A_ref[head])  # [1, n]
        group = lax.div(head, r)  # head >= 0, so truncation is floor; jnp's // adds sign fix-ups for negatives
        x_row = pick_row(xs, i)  # [1, p]
        state = decay * state_ref[i].astype(f32) + lanes_to_sublanes(x_row) * (dt * pick_row(Bs, group))  # [p, n]
        state_out_ref[i] = state.astype(state_out_ref.dtype)
        y = lax.dot_general(pick_row(Cs, group), state, NT, precision=lax.Precision.HIGHEST,
                            preferred_element_type=f32)  # [1, p]
        if has_D:
            y = y + D_ref[head] * x_row
        if has_z:
            z = pick_row(zs, i)
            y = y * (z * jax.nn.sigmoid(z))
        ys = jnp.where(lax.broadcasted_iota(jnp.int32, ys.shape, 0) == i, y, ys)
    y_ref[...] = ys.astype(y_ref.dtype)


def _forward(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit, interpret, block_h):
    b, h, p, n = state.shape
    g = B.shape[1]
    f32 = jnp.float32
    y_dtype = jnp.promote_types(jnp.promote_types(x.dtype, state.dtype), f32)
    heads = lambda bi, hi: (bi, hi, 0)  # noqa: E731
    group = lambda bi, hi: (bi, 0, 0)  # noqa: E731
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)  # the whole (small) array, read as scalars
    in_specs = [
        pl.BlockSpec((None, block_h, p, n), lambda bi, hi: (bi, hi, 0, 0)),
        pl.BlockSpec((None, block_h, p), heads),
        pl.BlockSpec((None, g, n), group),
        pl.BlockSpec((None, g, n), group),
    ]
    args = [state, x, B, C]
    if z is not None:
        in_specs.append(pl.BlockSpec((None, block_h, p), heads))
        args.append(z)
    # SMEM holds 32-bit scalars: the wrapper casts these few values to float32
    in_specs += [smem, smem]
    args += [dt.astype(f32).reshape(b * h), A.astype(f32)]
    for extra in (D, dt_bias):
        if extra is not None:
            in_specs.append(smem)
            args.append(extra.astype(f32))
    kernel = functools.partial(
        _kernel, h=h, r=h // g, block_h=block_h, has_D=D is not None, has_z=z is not None,
        has_bias=dt_bias is not None, dt_softplus=dt_softplus, dt_limit=dt_limit,
    )
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, h, p), y_dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)),
        grid=(b, h // block_h),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, block_h, p), heads),
                   pl.BlockSpec((None, block_h, p, n), lambda bi, hi: (bi, hi, 0, 0))),
        input_output_aliases={0: 1},  # the state is updated in place
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pu.tpu_interpret_params(interpret),
        name="selective_state_update_tpu",
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, interpret, block_h):
    return _forward(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                    interpret=interpret, block_h=block_h)


def _state_update_fwd(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, interpret, block_h):
    out = _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, interpret, block_h)
    return out, (state, x, dt, A, B, C, D, z, dt_bias)


def _state_update_bwd(dt_softplus, dt_limit, interpret, block_h, residuals, cotangents):
    ref = functools.partial(selective_state_update_ref, dt_softplus=dt_softplus, dt_limit=dt_limit)
    _, vjp = jax.vjp(lambda s, x, dt, A, B, C, D, z, bias: ref(s, x, dt, A, B, C, D=D, z=z, dt_bias=bias),
                     *residuals)
    return vjp(cotangents)


_state_update.defvjp(_state_update_fwd, _state_update_bwd)


def selective_state_update_tpu(
    state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
    interpret=None, block_h: int | None = None,
):
    """Same contract as `selective_state_update_ref`: state [b, h, p, n] (float32 or bfloat16; math in float32),
    x [b, h, p], dt [b, h], A [h], B and C [b, g, n], D [h], z [b, h, p], dt_bias [h]. Returns (y [b, h, p] in
    promote(x, state, float32), new state in state's dtype). One Mosaic TPU kernel, the state updated in place.

    `interpret`: None runs it compiled on a TPU and in Pallas' TPU interpreter elsewhere; True / False force it.
    `block_h`: heads per program (default: the most whose state fits 1 MiB; h itself or a multiple of 8
    dividing h). The gradient is the reference's VJP.
    """
    # the reference validates the shapes and raises the same sentences; evaluate it abstractly (no compute)
    jax.eval_shape(
        functools.partial(selective_state_update_ref, dt_softplus=dt_softplus, dt_limit=dt_limit),
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
    )
    b, h, p, n = state.shape
    if not state_update_tpu_supported(p, n):
        raise ValueError(f"selective_state_update_tpu needs p (head dim) a multiple of {SUBLANES}, n (state size) "
                         f"a multiple of {LANES} and p * n * 4 <= {BLOCK_BYTES} bytes, got p={p}, n={n}; use the "
                         "XLA path (selective_state_update_ref) for these shapes")
    for name, array in (("state", state), ("x", x)):
        if array.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"selective_state_update_tpu takes {name} in float32, bfloat16 or float16 (TPUs have "
                             f"no float64), got {array.dtype}")
    if block_h is None:
        block_h = _head_block(h, p, n)
    elif h % block_h or not (block_h == h or block_h % SUBLANES == 0):
        raise ValueError(f"block_h must divide h ({h}) and be h itself or a multiple of {SUBLANES}, got {block_h}")
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus),
                         (float(dt_limit[0]), float(dt_limit[1])), pu.resolve_tpu_interpret(interpret), block_h)
