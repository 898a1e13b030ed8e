"""The depthwise causal conv1d references against torch's F.conv1d, and their own continuation/decode identities.

float64 (x64 fixture), tolerance 1e-12 relative: a k-tap dot product per output, summed in a different order
than torch's. Errors are max |a - b| / max |b|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import rel_err

from easymamba import kernels
from easymamba.kernels import causal_conv1d_ref, causal_conv1d_update_ref

conv_jit = jax.jit(causal_conv1d_ref, static_argnames=("activation",))
update_jit = jax.jit(causal_conv1d_update_ref, static_argnames=("activation",))


def make_inputs(seed, *, b=2, l=11, c=6, k=4, dtype=np.float64):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(dtype)  # noqa: E731
    return normal(b, l, c), normal(c, k), normal(c), normal(b, c, k)  # x, weight, bias, initial_state


def torch_conv(x, weight, bias, activation):
    """Hugging Face's Mamba2Mixer fallback: F.conv1d(padding=k-1, groups=c)[..., :l], then SiLU."""
    c, k = weight.shape
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))  # [b, c, l]
    w = torch.from_numpy(weight)[:, None, :]  # [c, 1, k]
    bt = None if bias is None else torch.from_numpy(bias)
    y = torch.nn.functional.conv1d(xt, w, bt, padding=k - 1, groups=c)[..., : x.shape[1]]
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    return y.numpy().transpose(0, 2, 1)  # [b, l, c]


@pytest.mark.parametrize("l", [11, 2])  # 2 < k: shorter than the kernel
@pytest.mark.parametrize("activation, use_bias", [("silu", True), (None, False)])
def test_matches_torch(x64, l, activation, use_bias):
    x, weight, bias, _ = make_inputs(0, l=l)
    bias = bias if use_bias else None
    y, state = conv_jit(x, weight, bias, activation=activation)
    assert y.dtype == jnp.float64 and y.shape == x.shape
    assert rel_err(y, torch_conv(x, weight, bias, activation)) <= 1e-12
    expected_state = np.concatenate([np.zeros((2, 6, 4)), x.transpose(0, 2, 1)], axis=2)[:, :, -4:]
    np.testing.assert_array_equal(state, expected_state)


@pytest.mark.parametrize("t", [1, 2, 3, 7])  # split points below and above k = 4
def test_continuation_through_conv_state(x64, t):
    x, weight, bias, init = make_inputs(1)
    full_y, full_s = conv_jit(x, weight, bias, initial_state=init)
    y1, s1 = conv_jit(x[:, :t], weight, bias, initial_state=init)
    y2, s2 = conv_jit(x[:, t:], weight, bias, initial_state=s1)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), full_y) <= 1e-12
    np.testing.assert_array_equal(s2, full_s)


def test_initial_state_is_left_context(x64):
    """Prepending the state's last k-1 columns to x and dropping their outputs gives the same y."""
    x, weight, bias, init = make_inputs(2)
    y, _ = conv_jit(x, weight, bias, initial_state=init)
    joined = np.concatenate([init[:, :, 1:].transpose(0, 2, 1), x], axis=1)  # [b, k-1+l, c]
    assert rel_err(y, torch_conv(joined, weight, bias, "silu")[:, 3:]) <= 1e-12


def test_update_steps_match_full_conv(x64):
    x, weight, bias, init = make_inputs(3, l=7)
    full_y, full_s = conv_jit(x, weight, bias, initial_state=init)
    state, ys = jnp.asarray(init), []
    for t in range(x.shape[1]):
        y_t, state = update_jit(x[:, t], state, weight, bias)
        ys.append(y_t)
    assert rel_err(jnp.stack(ys, axis=1), full_y) <= 1e-12
    np.testing.assert_array_equal(state, full_s)


def test_seq_idx_taps_do_not_cross_boundaries(x64):
    """Each segment equals the conv run on it alone; initial_state is context for the first segment only,
    and the returned conv_state is the last segment's own (zeros before its start)."""
    l, bounds = 11, [0, 2, 8, 11]  # a 2-token segment (shorter than k) then two longer ones
    x, weight, bias, init = make_inputs(4, l=l)
    seq_idx = np.broadcast_to(np.repeat([5, 6, 9], np.diff(bounds)), (2, l)).astype(np.int32)
    y, s = conv_jit(x, weight, bias, initial_state=init, seq_idx=seq_idx)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        y_i, s_i = conv_jit(x[:, lo:hi], weight, bias, initial_state=init if i == 0 else None)
        assert rel_err(y[:, lo:hi], y_i) <= 1e-12
    np.testing.assert_array_equal(s, s_i)
    # the last segment is 3 < k tokens long, so the state's first column is a zeroed earlier-segment input
    assert np.all(np.asarray(s)[:, :, 0] == 0)


def test_dtypes_follow_input():
    x, weight, bias, init = make_inputs(5, dtype=np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    y, s = kernels.causal_conv1d(xb, weight, bias)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.bfloat16
    y_ref, _ = causal_conv1d_ref(xb.astype(jnp.float32), weight, bias)
    assert rel_err(y, y_ref) <= 1e-2  # bf16 output rounding (8 bits of mantissa)
    y1, s1 = kernels.causal_conv1d_update(xb[:, 0], init, weight, bias)
    assert y1.dtype == jnp.bfloat16 and s1.dtype == jnp.float32


def test_public_wrapper_impls():
    x, weight, bias, init = make_inputs(6, dtype=np.float32)
    y_ref, s_ref = causal_conv1d_ref(x, weight, bias, initial_state=init)
    for impl in ("auto", "xla", "reference"):
        y, s = kernels.causal_conv1d(x, weight, bias, initial_state=init, impl=impl)
        assert rel_err(y, y_ref) <= 1e-6 and rel_err(s, s_ref) == 0, impl  # 1e-6: float32, jit vs eager fusion
    y, s = kernels.causal_conv1d(x, weight, bias, initial_state=init, impl="pallas")  # interpreted on CPU
    assert rel_err(y, y_ref) <= 2e-5 and rel_err(s, s_ref) == 0
    with pytest.raises(ValueError, match="'cuda'"):
        kernels.causal_conv1d(x, weight, bias, impl="cuda")


def test_shape_and_activation_errors():
    x, weight, bias, init = make_inputs(7, dtype=np.float32)
    with pytest.raises(ValueError, match="weight has shape"):
        causal_conv1d_ref(x, weight[:5], bias)
    with pytest.raises(ValueError, match="bias has shape"):
        causal_conv1d_ref(x, weight, bias[:5])
    with pytest.raises(ValueError, match="initial_state has shape"):
        causal_conv1d_ref(x, weight, bias, initial_state=init[:, :, :3])
    with pytest.raises(ValueError, match="seq_idx has shape"):
        causal_conv1d_ref(x, weight, bias, seq_idx=np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="x has shape"):
        causal_conv1d_ref(x[0], weight, bias)
    with pytest.raises(ValueError, match="'relu'"):
        causal_conv1d_ref(x, weight, bias, activation="relu")
    with pytest.raises(ValueError, match=r"x has shape \(2, 5\)"):
        causal_conv1d_update_ref(x[:, 0, :5], init, weight, bias)
    with pytest.raises(ValueError, match="weight has shape"):
        causal_conv1d_update_ref(x[:, 0], init, weight[:, :3], bias)
