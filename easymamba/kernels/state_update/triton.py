"""Pallas kernel for one SSD decode step (`selective_state_update`), with its reference beside it.

One program per (batch row, head): it reads the head's state [p, n] once, applies

    dt    = clip(softplus?(dt + dt_bias), *dt_limit)
    state = exp(dt A) state + dt x (x) B          # (x): outer product, [p] x [n] -> [p, n]
    y     = state C + D x ;   y = y * silu(z)  when z is given

and writes the state back into the same buffer (`input_output_aliases`; donate it under jit to skip the copy)
and y. Upstream: `_selective_scan_update_kernel` in state-spaces/mamba `mamba_ssm/ops/triton/
selective_state_update.py` (its TIE_HDIM path: A, dt, dt_bias one scalar per head). The reference is
`easymamba.kernels.state_update.reference.selective_state_update_ref`; the backward calls its VJP.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.state_update.reference import selective_state_update_ref

__all__ = ["selective_state_update_pallas", "state_update_supported", "selective_state_update_ref"]


def state_update_supported(p: int, n: int) -> bool:
    """Shapes the compiled (Triton) kernel handles: one [p, n] tile per program, both sides powers of two."""
    return pu.is_pow2(p) and pu.is_pow2(n) and p * n <= 128 * 256


def _softplus(v):
    # log1p(exp(v)) overflows for large v; upstream switches to the identity above 20 as well
    return jnp.where(v > 20.0, v, jnp.log1p(jnp.exp(jnp.minimum(v, 20.0))))


def _kernel(*refs, has_D, has_z, has_bias, dt_softplus, dt_limit):
    refs = list(refs)
    state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref = refs[:6]
    rest = refs[6:]
    D_ref = rest.pop(0) if has_D else None
    z_ref = rest.pop(0) if has_z else None
    bias_ref = rest.pop(0) if has_bias else None
    y_ref, state_out_ref = rest

    f32 = jnp.float32
    dt = dt_ref[...].astype(f32)  # scalar
    if has_bias:
        dt = dt + bias_ref[...].astype(f32)
    if dt_softplus:
        dt = _softplus(dt)
    dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
    decay = jnp.exp(dt * A_ref[...].astype(f32))  # scalar

    x = x_ref[...].astype(f32)  # [p]
    B = B_ref[...].astype(f32)  # [n]
    C = C_ref[...].astype(f32)  # [n]
    state = decay * state_ref[...].astype(f32) + (dt * x)[:, None] * B[None, :]  # [p, n]
    y = jnp.sum(state * C[None, :], axis=1)  # [p]
    if has_D:
        y = y + D_ref[...].astype(f32) * x
    if has_z:
        z = z_ref[...].astype(f32)
        y = y * z * jax.nn.sigmoid(z)
    state_out_ref[...] = state.astype(state_out_ref.dtype)
    y_ref[...] = y.astype(y_ref.dtype)


def _forward(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit, interpret):
    b, h, p, n = state.shape
    g = B.shape[1]
    r = h // g
    y_dtype = jnp.promote_types(jnp.promote_types(x.dtype, state.dtype), jnp.float32)
    head = lambda bi, hi: (bi, hi)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, p, n), lambda bi, hi: (bi, hi, 0, 0)),  # state
        pl.BlockSpec((None, None, p), lambda bi, hi: (bi, hi, 0)),  # x
        pl.BlockSpec((None, None), head),  # dt
        pl.BlockSpec((None,), lambda bi, hi: (hi,)),  # A
        pl.BlockSpec((None, None, n), lambda bi, hi: (bi, hi // r, 0)),  # B: head hi reads group hi // r
        pl.BlockSpec((None, None, n), lambda bi, hi: (bi, hi // r, 0)),  # C
    ]
    args = [state, x, dt, A, B, C]
    if D is not None:
        in_specs.append(pl.BlockSpec((None,), lambda bi, hi: (hi,)))
        args.append(D)
    if z is not None:
        in_specs.append(pl.BlockSpec((None, None, p), lambda bi, hi: (bi, hi, 0)))
        args.append(z)
    if dt_bias is not None:
        in_specs.append(pl.BlockSpec((None,), lambda bi, hi: (hi,)))
        args.append(dt_bias)
    kernel = functools.partial(
        _kernel,
        has_D=D is not None,
        has_z=z is not None,
        has_bias=dt_bias is not None,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
    )
    y, new_state = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, h, p), y_dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)),
        grid=(b, h),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, None, p), lambda bi, hi: (bi, hi, 0)),
            pl.BlockSpec((None, None, p, n), lambda bi, hi: (bi, hi, 0, 0)),
        ),
        input_output_aliases={0: 1},
        compiler_params=pu.compiler_params(num_warps=4 if p * n <= 64 * 128 else 8, num_stages=1, interpret=interpret),
        interpret=interpret,
        name="selective_state_update",
    )(*args)
    return y, new_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, interpret):
    return _forward(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                    interpret=interpret)


def _state_update_fwd(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, interpret):
    out = _forward(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                   interpret=interpret)
    return out, (state, x, dt, A, B, C, D, z, dt_bias)


def _state_update_bwd(dt_softplus, dt_limit, interpret, residuals, cotangents):
    # the backward of a decode step is rarely needed (RL / online learning); the reference's VJP is exact
    ref = functools.partial(selective_state_update_ref, dt_softplus=dt_softplus, dt_limit=dt_limit)
    _, vjp = jax.vjp(lambda s, x, dt, A, B, C, D, z, bias: ref(s, x, dt, A, B, C, D=D, z=z, dt_bias=bias),
                     *residuals)
    return vjp(cotangents)


_state_update.defvjp(_state_update_fwd, _state_update_bwd)


def selective_state_update_pallas(
    state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
    interpret: bool | None = None,
):
    """Same contract as `selective_state_update_ref` (shapes, dtypes, dt_limit); one Pallas kernel.

    state [b, h, p, n] (any float dtype; math in float32), x [b, h, p], dt [b, h], A [h], B and C [b, g, n],
    D [h], z [b, h, p], dt_bias [h]. Returns (y [b, h, p] in promote(x, state, float32), new state in state's
    dtype). Compiled on GPU when `state_update_supported(p, n)`; interpreted elsewhere (`interpret` None) or when
    `interpret` is True.
    """
    # the reference validates the shapes and raises the same sentences; evaluate it abstractly (no compute)
    jax.eval_shape(
        functools.partial(selective_state_update_ref, dt_softplus=dt_softplus, dt_limit=dt_limit),
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
    )
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus),
                         (float(dt_limit[0]), float(dt_limit[1])), pu.default_interpret(interpret))
