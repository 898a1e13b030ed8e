"""Mamba-1's selective scan: the chunked associative form and the decode step against the sequential recurrence.

Ground truth: `selective_scan_naive` in float64 (the recurrence one token at a time). The parallel form reorders
the products and sums, so in float64 it agrees to ~1e-16 relative; 1e-10 fails on any real error (a misplaced
initial state, a padded step that moves the state, a wrong chunk boundary gives 1e-2 or more). The recurrence
itself is checked against Hugging Face's torch `mamba_selective_scan` in float32 (1e-5: torch and XLA round
float32 differently).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import rel_err

from easymamba.kernels.selective_scan.reference import (
    selective_scan_chunked,
    selective_scan_naive,
    selective_state_update_mamba1,
)

TOL64 = 1e-10

# jitted once per shape: eager op-by-op dispatch of a lax.scan is what would make these tests slow
naive = jax.jit(selective_scan_naive, static_argnames="delta_softplus")
chunked = jax.jit(selective_scan_chunked, static_argnames=("delta_softplus", "chunk_size"))
step = jax.jit(selective_state_update_mamba1, static_argnames="delta_softplus")


def _inputs(seed, b, l, e, n, dtype=np.float64):
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    return dict(
        u=arr(b, l, e), delta=arr(b, l, e, scale=0.5), A=jnp.asarray(-rng.uniform(1, 16, (e, n)), dtype),
        B=arr(b, l, n), C=arr(b, l, n), D=arr(e), z=arr(b, l, e), delta_bias=arr(e, scale=0.5) - 3.0,
        h0=arr(b, e, n),
    )


def _run(fn, d, sl=slice(None), initial_state=None, full=True, **kw):
    extra = dict(D=d["D"], z=d["z"][:, sl], delta_bias=d["delta_bias"], delta_softplus=True) if full else {}
    return fn(d["u"][:, sl], d["delta"][:, sl], d["A"], d["B"][:, sl], d["C"][:, sl], initial_state=initial_state,
              **extra, **kw)


# One shape for every float64 test (b, l, e, n) = (2, 37, 6, 5), so the jitted functions compile once per length.
SHAPE = (2, 37, 6, 5)


def test_chunked_equals_naive_float64(x64):
    d = _inputs(0, *SHAPE)
    y0, s0 = _run(naive, d, initial_state=d["h0"])
    for chunk_size in (None, 8):  # l = 37: one chunk; five chunks, the last one padded with 3 identity steps
        y1, s1 = _run(chunked, d, initial_state=d["h0"], chunk_size=chunk_size)
        assert y1.dtype == s1.dtype == jnp.float64
        assert rel_err(y1, y0) <= TOL64 and rel_err(s1, s0) <= TOL64, (chunk_size, rel_err(y1, y0), rel_err(s1, s0))
    y0, s0 = _run(naive, d)  # no initial state: a zero start
    y1, s1 = _run(chunked, d, chunk_size=8)
    assert rel_err(y1, y0) <= TOL64 and rel_err(s1, s0) <= TOL64


def test_plain_scan_without_options_float64(x64):
    """No D, z, bias or softplus: y_t = h_t C_t only; both forms agree and delta is used as given."""
    d = _inputs(1, *SHAPE)
    d["delta"] = jnp.abs(d["delta"])
    y0, s0 = _run(naive, d, full=False)
    y1, s1 = _run(chunked, d, full=False, chunk_size=8)
    assert rel_err(y1, y0) <= TOL64 and rel_err(s1, s0) <= TOL64
    # the first step by hand: h_1 = delta_0 u_0 B_0 (zero start), y_0 = h_1 . C_0
    h1 = d["delta"][0, 0, :, None] * d["u"][0, 0, :, None] * d["B"][0, 0][None]
    np.testing.assert_allclose(y0[0, 0], h1 @ d["C"][0, 0], rtol=1e-12)


@pytest.mark.parametrize("fn", [naive, chunked], ids=["naive", "chunked"])
def test_continuation_from_final_state_float64(x64, fn):
    """Scanning [0, 9) and then [9, l) from its final state is scanning [0, l) (a chunked prefill)."""
    split = 9
    d = _inputs(2, *SHAPE)
    kw = {} if fn is naive else {"chunk_size": 8}
    y_full, s_full = _run(naive, d, initial_state=d["h0"])
    y_a, s_a = _run(fn, d, slice(0, split), initial_state=d["h0"], **kw)
    y_b, s_b = _run(fn, d, slice(split, None), initial_state=s_a, **kw)
    assert rel_err(jnp.concatenate([y_a, y_b], axis=1), y_full) <= TOL64
    assert rel_err(s_b, s_full) <= TOL64


def test_decode_steps_equal_scan_float64(x64):
    d = _inputs(3, *SHAPE)
    y_full, s_full = _run(naive, d, initial_state=d["h0"])
    y_pre, state = _run(chunked, d, slice(0, 16), initial_state=d["h0"], chunk_size=8)  # two whole chunks
    ys = [y_pre]
    for t in range(16, SHAPE[1]):
        y, state = step(
            state, d["u"][:, t], d["delta"][:, t], d["A"], d["B"][:, t], d["C"][:, t], D=d["D"], z=d["z"][:, t],
            delta_bias=d["delta_bias"], delta_softplus=True)
        assert y.shape == (2, 6) and state.dtype == jnp.float64
        ys.append(y[:, None])
    assert rel_err(jnp.concatenate(ys, axis=1), y_full) <= TOL64
    assert rel_err(state, s_full) <= TOL64


def test_dtypes_float32_compute_and_state_dtype():
    d = _inputs(4, 2, 9, 4, 3, dtype=np.float32)
    bf = {k: v.astype(jnp.bfloat16) for k, v in d.items()}
    y, s = _run(chunked, bf, chunk_size=4)
    assert y.dtype == s.dtype == jnp.float32  # bfloat16 inputs: the scan still runs and returns float32
    y, s = _run(naive, bf)
    assert y.dtype == s.dtype == jnp.float32
    state = jnp.zeros((2, 4, 3), jnp.bfloat16)
    y, new = step(state, d["u"][:, 0], d["delta"][:, 0], d["A"], d["B"][:, 0],
                                           d["C"][:, 0])
    assert y.dtype == jnp.float32 and new.dtype == jnp.bfloat16  # the state keeps its own dtype


def test_naive_matches_huggingface_torch_scan():
    """The recurrence against transformers 5.23's `mamba_selective_scan` fallback (float32, zero start)."""
    from transformers.models.mamba import modeling_mamba

    d = _inputs(5, 2, 17, 6, 4, dtype=np.float32)
    y, state = _run(naive, d)

    def t(x):  # HF's layout is channel-major: [b, e, l] / [b, n, l]
        return torch.from_numpy(np.array(x)).transpose(1, 2).contiguous()

    with torch.no_grad():
        hf_y, hf_state = modeling_mamba.mamba_selective_scan(
            t(d["u"]), t(d["delta"]), torch.from_numpy(np.array(d["A"])), t(d["B"]), t(d["C"]),
            D=torch.from_numpy(np.array(d["D"])), z=t(d["z"]),
            delta_bias=torch.from_numpy(np.array(d["delta_bias"])), delta_softplus=True, return_last_state=True)
    assert rel_err(y, hf_y.transpose(1, 2).numpy()) <= 1e-5
    assert rel_err(state, hf_state.numpy()) <= 1e-5


def test_shape_errors_name_the_argument():
    d = _inputs(6, 2, 5, 4, 3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"u has shape \(2, 5\); expected 3 dims \(b, l, e\)"):
        selective_scan_naive(d["u"][..., 0], d["delta"], d["A"], d["B"], d["C"])
    with pytest.raises(ValueError, match=r"A has shape \(3, 4\); expected \(e, n\) with e from u = \(4, 4\)"):
        selective_scan_chunked(d["u"], d["delta"], d["A"].T, d["B"], d["C"])
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 3, 4\); expected \(b, e, n\)"):
        selective_scan_chunked(d["u"], d["delta"], d["A"], d["B"], d["C"], initial_state=d["h0"].swapaxes(1, 2))
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None"):
        selective_scan_chunked(d["u"], d["delta"], d["A"], d["B"], d["C"], chunk_size=0)
    with pytest.raises(ValueError, match=r"B has shape \(2, 4\); expected \(b, n\) from state = \(2, 3\)"):
        selective_state_update_mamba1(d["h0"], d["u"][:, 0], d["delta"][:, 0], d["A"], d["u"][:, 0],
                                      d["C"][:, 0])
