"""One decode step of the SSD recurrence (Mamba-2), in plain JAX: the reference the state-update kernels
(`triton.py`, `mosaic_tpu.py` beside this file) are tested against. Semantics: one step of `ssd_naive`
(`easymamba/kernels/ssd_scan/reference.py`), whose dt rules (`_process_dt`) and argument checks it shares.
"""

import math

import jax
import jax.numpy as jnp

from easymamba.kernels.ssd_scan.reference import _check_dt_limit, _expect, _process_dt
from easymamba.typing import SSMState

__all__ = ["selective_state_update_ref"]


def selective_state_update_ref(
    state: SSMState,
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> tuple[jax.Array, jax.Array]:
    """One recurrence step for one new token: state [b, h, p, n], x [b, h, p], dt [b, h], A [h],
    B and C [b, g, n], D [h], z [b, h, p], dt_bias [h]. Same semantics as `ssd_naive` (dt is clipped to
    dt_limit here too). Returns (y [b, h, p] in the compute dtype promote(x, state, float32),
    new_state [b, h, p, n] in state's dtype). Upstream: `selective_state_update_ref` in mamba_ssm.
    """
    if state.ndim != 4:
        raise ValueError(f"state has shape {tuple(state.shape)}; expected 4 dims (b, h, p, n)")
    b, h, p, n = state.shape
    if B.ndim != 3:
        raise ValueError(f"B has shape {tuple(B.shape)}; expected 3 dims (b, g, n)")
    g = B.shape[1]
    _expect("x", x, (b, h, p), "(b, h, p) from state")
    _expect("dt", dt, (b, h), "(b, h) from state")
    _expect("A", A, (h,), "(h,) from state")
    _expect("B", B, (b, g, n), "(b, g, n) with b, n from state")
    _expect("C", C, (b, g, n), "(b, g, n) from state and B")
    if h % g != 0:
        raise ValueError(f"B has {g} groups (shape {tuple(B.shape)}) but state has {h} heads; h % g must be 0")
    _expect("D", D, (h,), "(h,) from state")
    _expect("z", z, (b, h, p), "(b, h, p) like x")
    _expect("dt_bias", dt_bias, (h,), "(h,) from state")
    _check_dt_limit(dt_limit)

    dtype = jnp.promote_types(jnp.promote_types(x.dtype, state.dtype), jnp.float32)
    r = h // g
    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # [b, h]
    B_heads = jnp.repeat(B.astype(dtype), r, axis=1)  # [b, h, n]
    C_heads = jnp.repeat(C.astype(dtype), r, axis=1)  # [b, h, n]
    xs = x.astype(dtype)  # [b, h, p]
    decay = jnp.exp(dt * A.astype(dtype))  # [b, h]
    new_state = decay[..., None, None] * state.astype(dtype) + jnp.einsum(
        "bh,bhp,bhn->bhpn", dt, xs, B_heads
    )  # [b, h, p, n]
    y = jnp.einsum("bhpn,bhn->bhp", new_state, C_heads)  # [b, h, p]
    if D is not None:
        y = y + D.astype(dtype)[:, None] * xs  # [b, h, p]
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))  # [b, h, p]
    return y, new_state.astype(state.dtype)
