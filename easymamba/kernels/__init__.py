"""Mamba-2 kernels: the SSD scan, the depthwise causal conv1d, and their single-token decode steps.

Public entry points (shapes in `easymamba.typing` letters):

    y, final_state = ssd(x [b,l,h,p], dt [b,l,h], A [h], B [b,l,g,n], C [b,l,g,n], *, chunk_size, ...)
    y, conv_state  = causal_conv1d(x [b,l,c], weight [c,k], bias=None, *, activation="silu", ...)
    y, conv_state  = causal_conv1d_update(x [b,c], conv_state [b,c,k], weight, bias=None, *, activation)
    y, ssm_state   = selective_state_update(ssm_state [b,h,p,n], x [b,h,p], dt [b,h], A, B [b,g,n], C, ...)

`impl` is resolved in `dispatch.py` (see `describe()`). The Pallas kernels live in `ssd_pallas_gpu.py`,
`conv1d_pallas.py` and `state_update_pallas.py` (docs/kernels.md); the pure-JAX references they are tested
against (`ssd_naive`, `ssd_chunked`, `segsum`, `selective_state_update_ref`, `causal_conv1d_ref`,
`causal_conv1d_update_ref`) are re-exported.

Mamba-1's selective scan (`selective_scan_reference.py`): `selective_scan_naive` (the recurrence, ground truth),
`selective_scan_chunked` (the associative-scan prefill form) and `selective_state_update_mamba1` (one decode step).
"""

import math

import jax

from easymamba.kernels.conv1d_pallas import causal_conv1d_pallas, causal_conv1d_update_pallas, conv1d_supported
from easymamba.kernels.conv1d_reference import causal_conv1d_ref, causal_conv1d_update_ref
from easymamba.kernels.dispatch import describe, resolve_impl
from easymamba.kernels.selective_scan_reference import (
    selective_scan_chunked,
    selective_scan_naive,
    selective_state_update_mamba1,
)
from easymamba.kernels.ssd_pallas_gpu import SSDBlockConfig, ssd_pallas, ssd_supported
from easymamba.kernels.ssd_reference import segsum, selective_state_update_ref, ssd_chunked, ssd_naive
from easymamba.kernels.state_update_pallas import selective_state_update_pallas, state_update_supported

__all__ = [
    "ssd",
    "causal_conv1d",
    "causal_conv1d_update",
    "selective_state_update",
    "ssd_naive",
    "ssd_chunked",
    "segsum",
    "selective_state_update_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "describe",
    "ssd_pallas",
    "SSDBlockConfig",
    "causal_conv1d_pallas",
    "causal_conv1d_update_pallas",
    "selective_state_update_pallas",
    "selective_scan_naive",
    "selective_scan_chunked",
    "selective_state_update_mamba1",
]

_SSD_STATIC = ("chunk_size", "dt_softplus", "dt_limit")
_ssd_xla = jax.jit(ssd_chunked, static_argnames=_SSD_STATIC)
_conv_xla = jax.jit(causal_conv1d_ref, static_argnames=("activation",))
_conv_update_xla = jax.jit(causal_conv1d_update_ref, static_argnames=("activation",))
_state_update_xla = jax.jit(selective_state_update_ref, static_argnames=("dt_softplus", "dt_limit"))
_ssd_pallas = jax.jit(ssd_pallas, static_argnames=_SSD_STATIC + ("y_dtype", "config"))
_conv_pallas = jax.jit(causal_conv1d_pallas, static_argnames=("activation",))
_conv_update_pallas = jax.jit(causal_conv1d_update_pallas, static_argnames=("activation",))
_state_update_pallas = jax.jit(selective_state_update_pallas, static_argnames=("dt_softplus", "dt_limit"))


def _static_limit(dt_limit) -> tuple[float, float]:
    """dt_limit as a hashable pair of Python floats, so it can be a static jit argument."""
    low, high = dt_limit
    return float(low), float(high)


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit=(0.0, math.inf),
    initial_state=None,
    seq_idx=None,
    impl: str = "auto",
):
    """The Mamba-2 SSD scan; returns (y [b,l,h,p], final_state [b,h,p,n]) in promote(x.dtype, float32).

    Semantics: `ssd_naive` (the recurrence) — see `easymamba.kernels.ssd_reference` for the math, seq_idx and
    dtype rules. `impl` in ("auto", "pallas", "xla", "reference"), resolved by `dispatch.resolve_impl`.
    """
    impl = resolve_impl(impl, "ssd", shape_ok=x.ndim == B.ndim == 4 and ssd_supported(x.shape[-1], B.shape[-1]))
    fn = {"pallas": _ssd_pallas, "xla": _ssd_xla}.get(impl, ssd_chunked)
    return fn(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=bool(dt_softplus),
        dt_limit=_static_limit(dt_limit),
        initial_state=initial_state,
        seq_idx=seq_idx,
    )


def causal_conv1d(x, weight, bias=None, *, activation="silu", initial_state=None, seq_idx=None, impl="auto"):
    """Depthwise causal conv1d; returns (y [b,l,c], conv_state [b,c,k]) in x's dtype.

    Semantics: `causal_conv1d_ref` (see `easymamba.kernels.conv1d_reference`).
    """
    impl = resolve_impl(impl, "causal_conv1d", shape_ok=weight.ndim == 2 and conv1d_supported(*weight.shape))
    fn = {"pallas": _conv_pallas, "xla": _conv_xla}.get(impl, causal_conv1d_ref)
    return fn(x, weight, bias, activation=activation, initial_state=initial_state, seq_idx=seq_idx)


def causal_conv1d_update(x, conv_state, weight, bias=None, *, activation="silu", impl="auto"):
    """One decode step of the causal conv; returns (y [b,c] in x's dtype, new conv_state [b,c,k])."""
    shape_ok = weight.ndim == 2 and conv1d_supported(*weight.shape)
    impl = resolve_impl(impl, "causal_conv1d_update", shape_ok=shape_ok)
    fn = {"pallas": _conv_update_pallas, "xla": _conv_update_xla}.get(impl, causal_conv1d_update_ref)
    return fn(x, conv_state, weight, bias, activation=activation)


def selective_state_update(
    state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
    impl="auto",
):
    """One decode step of the SSD recurrence; returns (y [b,h,p], new state [b,h,p,n] in state's dtype)."""
    shape_ok = state.ndim == 4 and state_update_supported(*state.shape[2:])
    impl = resolve_impl(impl, "selective_state_update", shape_ok=shape_ok)
    fn = {"pallas": _state_update_pallas, "xla": _state_update_xla}.get(impl, selective_state_update_ref)
    return fn(
        state,
        x,
        dt,
        A,
        B,
        C,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=bool(dt_softplus),
        dt_limit=_static_limit(dt_limit),
    )
