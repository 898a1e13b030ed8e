"""Pure-JAX references for the Mamba-2 SSD (state space duality) layer.

Paper: "Transformers are SSMs" (Dao & Gu, 2024), section 6 and Listing 1. Official implementation:
state-spaces/mamba, `mamba_ssm/modules/ssd_minimal.py` (chunked form) and the `*_ref` functions at the end of
`mamba_ssm/ops/triton/selective_state_update.py` (decode step). Letters as in `easymamba.typing`; in addition
`r = h // g` is the number of heads that share one group of B/C (head `i` uses group `i // r`).

The recurrence, per head (A is a negative scalar per head, the state h_t is [p, n]):

    dt_t  = clip(softplus?(dt_t + dt_bias), *dt_limit)
    h_t   = exp(dt_t A) h_{t-1} + dt_t x_t (x) B_t          # (x): outer product, [p] x [n] -> [p, n]
    y_t   = h_t C_t + D x_t ;   y_t = y_t * silu(z_t)  when z is given

With a_t = dt_t A and segsum(a)[i, j] = a_{j+1} + ... + a_i (j <= i, else -inf), the sequence is cut into
chunks of q tokens and computed in four steps (Mamba-2 paper, Listing 1):

    1. intra-chunk (diagonal blocks):  Y_diag[i] = sum_{j <= i in chunk} (C_i . B_j) exp(segsum(a)[i, j]) dt_j x_j
    2. per-chunk states:               S_c = sum_{j in chunk c} exp(a_{j+1} + ... + a_{end}) dt_j x_j (x) B_j
    3. inter-chunk recurrence:         H_c = sum_{c' <= c} exp(segsum(A_tot)[c, c']) S_{c'-1}
                                       over chunk totals A_tot with the initial state as S_{-1}; H_c is the
                                       state entering chunk c, and the last one is the final state
    4. state -> output:                Y_off[i] = exp(a_{start} + ... + a_i) C_i . H_{chunk(i)}

    y = Y_diag + Y_off + D x

Packed sequences (`seq_idx`): the state resets to zero wherever `seq_idx[t] != seq_idx[t-1]`; `initial_state`
belongs to the first segment only and `final_state` is the state of the last segment after its last token.
In the chunked form every exp(segsum) entry that links two positions in different segments is masked to zero.

Dtypes: all math runs in the compute dtype `promote_types(x.dtype, float32)` (float64 for float64 inputs under
x64, float32 otherwise); `y` and `final_state` come back in it, as in Hugging Face's `torch_forward`.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from easymamba.typing import GroupProj, SSMInput, SSMState, StepSize

__all__ = ["segsum", "ssd_naive", "ssd_chunked", "ssd_chunked_vjp"]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def segsum(a: jax.Array) -> jax.Array:
    """Stable segment sum: out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, -inf above the diagonal.

    Computed by masking an expanded copy and a cumsum, never as cumsum[i] - cumsum[j]: the difference of two
    large running sums loses the small segment sums to cancellation (`segsum` in ssd_minimal.py).
    """
    t = a.shape[-1]
    expanded = jnp.broadcast_to(a[..., :, None], a.shape + (t,))  # [..., t(i), t(j)] holding a[i]
    strictly_lower = jnp.tril(jnp.ones((t, t), dtype=bool), k=-1)
    expanded = jnp.where(strictly_lower, expanded, 0)  # keep a[i] only where i > j
    out = jnp.cumsum(expanded, axis=-2)  # [..., t, t]: sum_{k=j+1..i} a[k]
    lower = jnp.tril(jnp.ones((t, t), dtype=bool), k=0)
    return jnp.where(lower, out, -jnp.inf)  # [..., t, t]


def _segment_ids(seq_idx: jax.Array) -> jax.Array:
    """[b, l] ids 0, 1, 2, ... that step up wherever seq_idx changes, so segment membership is an equality test.

    Renumbering makes a non-monotonic seq_idx (e.g. [0, 0, 1, 1, 0]) mean three segments, as in the recurrence.
    """
    starts = jnp.concatenate(
        [jnp.zeros_like(seq_idx[:, :1], dtype=jnp.int32), (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)],
        axis=1,
    )  # [b, l]
    return jnp.cumsum(starts, axis=1)  # [b, l]


def _process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    """dt + dt_bias, softplus if asked, clip to dt_limit (always: a no-op for (0, inf)), in the compute dtype."""
    dt = dt.astype(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(dtype)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return jnp.clip(dt, dt_limit[0], dt_limit[1])


def _check_dt_limit(dt_limit):
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"dt_limit must be a pair (low, high) with low <= high, got {dt_limit!r}")


def _expect(name, array, expected, meaning):
    """Raise a ValueError naming `name` when `array.shape != expected` (`meaning` spells the letters out)."""
    if array is not None and tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {meaning} = {tuple(expected)}")


def _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_limit):
    """Validate the SSD argument shapes; return (b, l, h, p, g, n)."""
    if x.ndim != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected 4 dims (b, l, h, p)")
    b, l, h, p = x.shape
    if B.ndim != 4:
        raise ValueError(f"B has shape {tuple(B.shape)}; expected 4 dims (b, l, g, n)")
    g, n = B.shape[2], B.shape[3]
    _expect("dt", dt, (b, l, h), "(b, l, h) from x")
    _expect("A", A, (h,), "(h,) from x")
    _expect("B", B, (b, l, g, n), "(b, l, g, n) with b, l from x")
    _expect("C", C, (b, l, g, n), "(b, l, g, n) from x and B")
    if h % g != 0:
        raise ValueError(f"B has {g} groups (shape {tuple(B.shape)}) but x has {h} heads; h % g must be 0")
    _expect("D", D, (h,), "(h,) from x")
    _expect("z", z, (b, l, h, p), "(b, l, h, p) like x")
    _expect("dt_bias", dt_bias, (h,), "(h,) from x")
    _expect("initial_state", initial_state, (b, h, p, n), "(b, h, p, n) from x and B")
    _expect("seq_idx", seq_idx, (b, l), "(b, l) from x")
    if seq_idx is not None and not jnp.issubdtype(seq_idx.dtype, jnp.integer):
        raise ValueError(f"seq_idx must be an integer array, got dtype {seq_idx.dtype}")
    _check_dt_limit(dt_limit)
    return b, l, h, p, g, n


# --------------------------------------------------------------------------------------------------------------
# Sequential recurrence: the ground truth
# --------------------------------------------------------------------------------------------------------------


def ssd_naive(
    x: SSMInput,
    dt: StepSize,
    A: jax.Array,
    B: GroupProj,
    C: GroupProj,
    *,
    D: jax.Array | None = None,
    z: SSMInput | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: SSMState | None = None,
    seq_idx: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The SSD as its sequential recurrence, one `lax.scan` step per token; slow, exact, the ground truth.

    Args: x [b, l, h, p], dt [b, l, h] (raw, before dt_bias/softplus/clip), A [h] (negative), B and C
    [b, l, g, n], D [h], z [b, l, h, p], dt_bias [h], initial_state [b, h, p, n], seq_idx [b, l] int.
    Returns (y [b, l, h, p], final_state [b, h, p, n]) in the compute dtype (module docstring).
    Upstream: `selective_state_update_ref` in mamba_ssm applied at every step.
    """
    b, l, h, p, g, n = _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_limit)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    r = h // g

    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # [b, l, h]
    A = A.astype(dtype)  # [h]
    B_heads = jnp.repeat(B.astype(dtype), r, axis=2)  # [b, l, h, n]: head i reads group i // r
    C_heads = jnp.repeat(C.astype(dtype), r, axis=2)  # [b, l, h, n]
    xs = x.astype(dtype)  # [b, l, h, p]
    if seq_idx is None:
        reset = jnp.zeros((b, l), dtype=bool)  # [b, l]
    else:
        reset = jnp.concatenate([jnp.zeros((b, 1), bool), seq_idx[:, 1:] != seq_idx[:, :-1]], axis=1)  # [b, l]
    state0 = (
        jnp.zeros((b, h, p, n), dtype) if initial_state is None else initial_state.astype(dtype)
    )  # [b, h, p, n]

    def step(state, inputs):
        x_t, dt_t, B_t, C_t, reset_t = inputs  # [b,h,p] [b,h] [b,h,n] [b,h,n] [b]
        state = jnp.where(reset_t[:, None, None, None], 0, state)  # [b, h, p, n]: a new segment starts empty
        decay = jnp.exp(dt_t * A)  # [b, h]
        state = decay[..., None, None] * state + jnp.einsum("bh,bhp,bhn->bhpn", dt_t, x_t, B_t)  # [b, h, p, n]
        y_t = jnp.einsum("bhpn,bhn->bhp", state, C_t)  # [b, h, p]
        return state, y_t

    time_major = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731  [b, l, ...] -> [l, b, ...]
    final_state, y = lax.scan(
        step, state0, (time_major(xs), time_major(dt), time_major(B_heads), time_major(C_heads), time_major(reset))
    )
    y = jnp.moveaxis(y, 0, 1)  # [b, l, h, p]
    if D is not None:
        y = y + D.astype(dtype)[:, None] * xs  # [b, l, h, p]
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))  # [b, l, h, p]
    return y, final_state


# --------------------------------------------------------------------------------------------------------------
# Chunked form: the four steps of the Mamba-2 paper
# --------------------------------------------------------------------------------------------------------------


def ssd_chunked(
    x: SSMInput,
    dt: StepSize,
    A: jax.Array,
    B: GroupProj,
    C: GroupProj,
    *,
    chunk_size: int,
    D: jax.Array | None = None,
    z: SSMInput | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: SSMState | None = None,
    seq_idx: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The SSD in chunks of `chunk_size` tokens (the four steps of the module docstring); same contract as
    `ssd_naive`. Any `l`: the sequence is zero-padded inside to a multiple of chunk_size after dt is processed
    (padded dt = 0 decays by exp(0) = 1 and adds nothing), and the output is sliced back.

    jit-able with `chunk_size`, `dt_softplus`, `dt_limit` static; differentiable. Upstream: `ssd_minimal_discrete`
    in mamba_ssm and `torch_forward` of Hugging Face's Mamba2Mixer; seq_idx handling follows mamba_ssm's
    `mamba_chunk_scan_combined(seq_idx=...)`.
    """
    b, l, h, p, g, n = _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_limit)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    r, q = h // g, chunk_size
    pad = (-l) % q
    c = (l + pad) // q

    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # [b, l, h]
    xs = x.astype(dtype)  # [b, l, h, p]

    def chunks(a):  # [b, l, ...] -> [b, c, q, ...], zero-padded at the end
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape((b, c, q) + a.shape[2:])

    x_dt = chunks(xs * dt[..., None]).reshape(b, c, q, g, r, p)  # [b, c, q, g, r, p]: dt_j x_j
    B_c = chunks(B.astype(dtype))  # [b, c, q, g, n]
    C_c = chunks(C.astype(dtype))  # [b, c, q, g, n]
    a = chunks(dt * A.astype(dtype))  # [b, c, q, h]: a_t = dt_t A
    a = jnp.moveaxis(a, 3, 1).reshape(b, g, r, c, q)  # [b, g, r, c, q]
    a_cumsum = jnp.cumsum(a, axis=-1)  # [b, g, r, c, q]: a_start + ... + a_i

    # log-decays between positions, with entries across a segment boundary masked to -inf (exp -> 0)
    log_L = segsum(a)  # [b, g, r, c, q, s]
    log_in = a_cumsum  # [b, g, r, c, q]: chunk start -> i, for step 4
    if seq_idx is not None:
        seg = jnp.pad(_segment_ids(seq_idx), [(0, 0), (0, pad)], mode="edge").reshape(b, c, q)  # [b, c, q]
        same_qs = seg[:, :, :, None] == seg[:, :, None, :]  # [b, c, q, s]
        log_L = jnp.where(same_qs[:, None, None], log_L, -jnp.inf)  # [b, g, r, c, q, s]
        # the state entering chunk c belongs to the segment of the token before it (segment 0 for chunk 0)
        seg_end = seg[:, :, -1]  # [b, c]
        seg_enter = jnp.concatenate([jnp.zeros_like(seg_end[:, :1]), seg_end], axis=1)  # [b, z]
        same_in = seg == seg_enter[:, :-1, None]  # [b, c, q]
        log_in = jnp.where(same_in[:, None, None], log_in, -jnp.inf)  # [b, g, r, c, q]

    # 1. intra-chunk outputs (diagonal blocks)
    L = jnp.exp(log_L)  # [b, g, r, c, q, s]
    CB = jnp.einsum("bcqgn,bcsgn->bgcqs", C_c, B_c)  # [b, g, c, q, s]
    y_diag = jnp.einsum("bgcqs,bgrcqs,bcsgrp->bcqgrp", CB, L, x_dt)  # [b, c, q, g, r, p]

    # 2. per-chunk states from a zero start; decay j -> chunk end is the last row of the (masked) segsum
    decay_to_end = jnp.exp(log_L[..., -1, :])  # [b, g, r, c, s]
    states = jnp.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", B_c, decay_to_end, x_dt)  # [b, c, g, r, p, n]

    # 3. inter-chunk recurrence over chunk totals, the initial state entering as chunk "-1"
    if initial_state is None:
        state0 = jnp.zeros((b, 1, g, r, p, n), dtype)  # [b, 1, g, r, p, n]
    else:
        state0 = initial_state.astype(dtype).reshape(b, 1, g, r, p, n)  # [b, 1, g, r, p, n]
    states = jnp.concatenate([state0, states], axis=1)  # [b, z, g, r, p, n], z = c + 1
    a_total = jnp.pad(a_cumsum[..., -1], [(0, 0)] * 3 + [(1, 0)])  # [b, g, r, z]
    log_chunk = segsum(a_total)  # [b, g, r, z(to), z(from)]
    if seq_idx is not None:
        same_zz = seg_enter[:, :, None] == seg_enter[:, None, :]  # [b, z, z]
        log_chunk = jnp.where(same_zz[:, None, None], log_chunk, -jnp.inf)  # [b, g, r, z, z]
    # einsum letters: the target chunk boundary is "z", the source one "c" (both run over c + 1 entries here)
    entering = jnp.einsum("bgrzc,bcgrpn->bzgrpn", jnp.exp(log_chunk), states)  # [b, z, g, r, p, n]
    states_in, final_state = entering[:, :-1], entering[:, -1]  # [b, c, g, r, p, n], [b, g, r, p, n]

    # 4. state -> output
    y_off = jnp.einsum("bcqgn,bcgrpn,bgrcq->bcqgrp", C_c, states_in, jnp.exp(log_in))  # [b, c, q, g, r, p]

    y = (y_diag + y_off).reshape(b, c * q, h, p)[:, :l]  # [b, l, h, p]
    if D is not None:
        y = y + D.astype(dtype)[:, None] * xs  # [b, l, h, p]: the skip uses x, not dt * x
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))  # [b, l, h, p]
    return y, final_state.reshape(b, h, p, n)


# --------------------------------------------------------------------------------------------------------------
# Single-token decode step
# --------------------------------------------------------------------------------------------------------------


def ssd_chunked_vjp(residuals, seq_idx, cotangents, *, chunk_size, dt_softplus, dt_limit, y_dtype):
    """The VJP of `ssd_chunked` (y cast to `y_dtype`) at `residuals` = (x, dt, A, B, C, D, z, dt_bias,
    initial_state) for `cotangents` = (dy, dfinal_state): the backward that a kernel's `custom_vjp` takes when it
    has no backward kernel of its own. Returns the 9 cotangents, then None for `seq_idx`."""

    def ref(x, dt, A, B, C, D, z, dt_bias, initial_state):
        y, state = ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                               dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_state,
                               seq_idx=seq_idx)
        return y.astype(y_dtype), state

    _, vjp = jax.vjp(ref, *residuals)
    return (*vjp(cotangents), None)
