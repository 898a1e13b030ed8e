"""A Mamba-2 layer's decode step between in_proj and out_proj, composed of the existing references: the plain JAX
form the fused kernel (`triton.py` beside this file, whose docstring gives the math) is tested against, and the
operand handling (in_proj output and conv weights packed or in parts) both share.

Upstream: mamba_ssm `Mamba2.step` (causal_conv1d_update, selective_state_update, RMSNormGated with
group_size = e / g).
"""

import math
import operator

import jax
import jax.numpy as jnp
from jax import lax

from easymamba.kernels.conv1d.reference import causal_conv1d_update_ref
from easymamba.kernels.state_update.reference import selective_state_update_ref

__all__ = ["decode_step_ref", "check_row_mask"]

_IN_PROJ_PARTS = ("z", "x", "B", "C", "dt")
_CONV_PARTS = ("x", "B", "C")


# --------------------------------------------------------------------------------------------------------------
# Operands: packed or in parts
# --------------------------------------------------------------------------------------------------------------


def _dims(conv_state, ssm_state, n_groups):
    """(b, e, c, k, h, p, n, g) from the two states, with a sentence for each mismatch."""
    if ssm_state.ndim != 4:
        raise ValueError(f"ssm_state has shape {tuple(ssm_state.shape)}; expected 4 dims (b, h, p, n)")
    b, h, p, n = ssm_state.shape
    if conv_state.ndim != 3:
        raise ValueError(f"conv_state has shape {tuple(conv_state.shape)}; expected 3 dims (b, c, k)")
    try:
        g = operator.index(n_groups)
    except TypeError:
        g = None
    if g is None or g < 1 or h % g:
        raise ValueError(f"n_groups ({n_groups!r}) must be a positive integer dividing the number of heads ({h})")
    e = h * p
    c, k = conv_state.shape[1:]
    if conv_state.shape[0] != b or c != e + 2 * g * n:
        raise ValueError(f"conv_state has shape {tuple(conv_state.shape)}; expected (b, e + 2 g n, k) = "
                         f"({b}, {e} + 2 * {g} * {n}, k) from ssm_state (b, h, p, n) = {(b, h, p, n)} and n_groups")
    return b, e, c, k, h, p, n, g


def _sources(name, value, names, widths, lead=(), trail=()):
    """{part: (array, offset)} for an operand given packed (one array holding the parts side by side on the axis
    after `lead`) or as a tuple of the parts (for the in_proj output also (z, xBC, dt))."""
    if not isinstance(value, (tuple, list)):
        value = (value,)
    groups = {1: [names], len(names): [[nm] for nm in names]}
    if names == _IN_PROJ_PARTS:
        groups[3] = [["z"], ["x", "B", "C"], ["dt"]]
    if len(value) not in groups:
        raise ValueError(f"{name} must be one packed array or a tuple of {' or '.join(map(str, sorted(groups)[1:]))} "
                         f"of its parts {names}; got {len(value)} arrays")
    out = {}
    for array, members in zip(value, groups[len(value)]):
        expected = (*lead, sum(widths[m] for m in members), *trail)
        if tuple(array.shape) != expected:
            raise ValueError(f"{name}: the array holding {' | '.join(members)} has shape {tuple(array.shape)}; "
                             f"expected {expected}")
        offset = 0
        for m in members:
            out[m] = (array, offset)
            offset += widths[m]
    return out


def _operands(zxbcdt, conv_weight, conv_bias, conv_state, ssm_state, n_groups):
    """The dims and the {part: (array, offset)} maps of the in_proj output, conv weight and conv bias (or None)."""
    b, e, c, k, h, p, n, g = _dims(conv_state, ssm_state, n_groups)
    widths = dict(z=e, x=e, B=g * n, C=g * n, dt=h)
    act = _sources("zxbcdt", zxbcdt, _IN_PROJ_PARTS, widths, lead=(b,))
    weight = _sources("conv_weight", conv_weight, _CONV_PARTS, widths, trail=(k,))
    bias = None if conv_bias is None else _sources("conv_bias", conv_bias, _CONV_PARTS, widths)
    return (b, e, c, k, h, p, n, g), widths, act, weight, bias


def _part(sources, m, width, axis):
    """Part m as its own array (a slice where it comes packed)."""
    array, offset = sources[m]
    return array if array.shape[axis] == width else lax.slice_in_dim(array, offset, offset + width, axis=axis)


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def _round_like(x, dtype):
    """x rounded to `dtype`'s precision, kept in x's dtype. `reduce_precision`, not a pair of converts: XLA may
    drop a convert pair on GPU (excess precision), and the rounding is part of the semantics (upstream's conv
    returns the activation dtype, which the state update then reads)."""
    if jnp.finfo(dtype).bits >= jnp.finfo(x.dtype).bits:
        return x
    info = jnp.finfo(dtype)
    return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _rms_scale(rms_input, eps: float):
    """rsqrt(mean(x^2) + eps) per row of rms_input [b, d], in float32: the factor an RMS norm multiplies a row by."""
    x = rms_input.astype(jnp.float32)
    return lax.rsqrt(jnp.mean(x * x, axis=-1) + eps)  # [b]


def _scale_rows(zxbcdt, scale):
    """The in_proj output (packed or its parts) with each row times scale [b], rounded back to its dtype."""
    one = lambda a: _round_like(a.astype(jnp.float32) * scale[:, None], a.dtype).astype(a.dtype)  # noqa: E731
    return tuple(map(one, zxbcdt)) if isinstance(zxbcdt, (tuple, list)) else one(zxbcdt)


def decode_step_ref(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight, active=None,
                    rms_input=None, *, n_groups: int, eps: float, dt_limit=(0.0, math.inf), A_is_log: bool = False,
                    y_dtype=None, rms_eps: float = 1e-5):
    """A Mamba-2 layer's decode step from the existing references: conv update + SiLU, state update, gated norm.

    zxbcdt: the in_proj output for one token, [b, 2e + 2gn + h] packed as [z | x | B | C | dt] (HF), or the
    tuple (z [b, e], xBC [b, c], dt [b, h]), or (z, x [b, e], B [b, gn], C [b, gn], dt); dt raw (before dt_bias).
    conv_state [b, c, k]; conv_weight [c, k] or its (x, B, C) parts [e | gn, k]; conv_bias [c], parts, or None;
    A [h] (float32, negative; or A_log when `A_is_log`); D [h]; dt_bias [h]; ssm_state [b, h, p, n];
    norm_weight [e]; active [b] bool or None (rows where False keep both states). Returns (y [b, e] in y_dtype
    (default z's), the input of out_proj; new conv_state in conv_state's dtype; new ssm_state in ssm_state's dtype).

    rms_input [b, d] or None: the block's input before its RMS norm, when zxbcdt is in_proj of that input with the
    norm's weight folded into in_proj (`Mamba2Mixer.decode_weights(pre_norm=)`): each row of zxbcdt is first
    multiplied by the norm's factor rsqrt(mean(rms_input^2) + rms_eps) (`_rms_scale`) and rounded back to its
    dtype, which makes it in_proj of the normalised input. (The fused kernel does this itself: the norm then costs
    no launch of its own.)
    """
    (b, e, c, k, h, p, n, g), widths, act, weight, bias = _operands(zxbcdt, conv_weight, conv_bias, conv_state,
                                                                    ssm_state, n_groups)
    check_row_mask(active, b)
    if rms_input is not None:
        if rms_input.ndim != 2 or rms_input.shape[0] != b:
            raise ValueError(f"rms_input has shape {tuple(rms_input.shape)}; expected (b, d) with b = {b}")
        zxbcdt = _scale_rows(zxbcdt, _rms_scale(rms_input, rms_eps))
        act = _operands(zxbcdt, conv_weight, conv_bias, conv_state, ssm_state, n_groups)[2]
    old_conv, old_ssm = conv_state, ssm_state
    z, dt = _part(act, "z", e, 1), _part(act, "dt", h, 1)
    join = lambda src, axis: jnp.concatenate([_part(src, m, widths[m], axis) for m in _CONV_PARTS], axis)  # noqa
    xBC, w = join(act, 1), join(weight, 0)  # [b, c], [c, k]
    bvec = None if bias is None else join(bias, 0)  # [c]
    xBC, conv_state = causal_conv1d_update_ref(xBC, conv_state, w, bvec, activation="silu")
    xBC = _round_like(xBC.astype(jnp.promote_types(xBC.dtype, jnp.float32)), xBC.dtype)
    x, B, C = jnp.split(xBC, [e, e + g * n], axis=-1)  # [b, e] [b, gn] [b, gn]
    if A_is_log:
        A = -jnp.exp(A.astype(jnp.float32))
    y, ssm_state = selective_state_update_ref(
        ssm_state, x.reshape(b, h, p), dt, A, B.reshape(b, g, n), C.reshape(b, g, n), D=D, dt_bias=dt_bias,
        dt_softplus=True, dt_limit=dt_limit)  # y [b, h, p] float32
    # GatedRMSNorm (easymamba.norms) in float32: weight * rmsnorm_per_group(y * silu(z))
    gated = y.reshape(b, e).astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    grouped = gated.reshape(b, g, e // g)  # [b, g, e/g]
    normed = grouped * lax.rsqrt(jnp.mean(jnp.square(grouped), axis=-1, keepdims=True) + eps)
    y = norm_weight.astype(jnp.float32) * normed.reshape(b, e)
    if active is not None:
        conv_state = jnp.where(active[:, None, None], conv_state, old_conv)
        ssm_state = jnp.where(active[:, None, None, None], ssm_state, old_ssm)
    return y.astype(z.dtype if y_dtype is None else y_dtype), conv_state, ssm_state


def check_row_mask(mask, b: int, name: str = "active") -> None:
    """A per-row mask of held rows (`active` here, a mixer's `active_rows`): None or bool of shape (b,)."""
    if mask is not None and (tuple(mask.shape) != (b,) or mask.dtype != jnp.bool_):
        raise ValueError(f"{name} must be a bool array of shape (batch,) = ({b},); got {mask.dtype}"
                         f"{list(mask.shape)}")
