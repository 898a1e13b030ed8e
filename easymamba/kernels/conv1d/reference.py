"""Pure-JAX references for Mamba's depthwise causal conv1d (full sequence and single-token update).

    y[t, c] = act(bias[c] + sum_{i=0..k-1} weight[c, i] * xpad[t + i, c]),   xpad = x left-padded by k-1

Taps run oldest -> newest: weight[:, k-1] multiplies the current token. This is torch's
`F.conv1d(x^T, weight[:, None], bias, padding=k-1, groups=c)[..., :l]`, as in Hugging Face's Mamba2Mixer
and the `causal_conv1d_ref` / `causal_conv1d_update_ref` of Dao-AILab/causal-conv1d.

Conv state (Hugging Face's convention): the k most recent PRE-conv inputs, newest at index k-1, [b, c, k].
Given as `initial_state`, its last k-1 columns are the left context instead of zeros. With `seq_idx`, a tap
that reaches back across a segment boundary (wherever seq_idx changes) reads zero; the initial state is
context for the first segment only, and the returned conv_state holds zeros in the columns that belong to
an earlier segment than the last token's, so decoding continues the last segment as if it had run alone.

Dtypes: the math runs in promote_types(x.dtype, float32); y and conv_state come back in x's dtype
(the update returns its new state in conv_state's dtype).
"""

import jax
import jax.numpy as jnp

from easymamba.typing import ConvInput, ConvState, ConvWeight

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref"]

ACTIVATIONS = ("silu", None)


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activate(y, activation):
    return jax.nn.silu(y) if activation == "silu" else y


def _expect(name, array, expected, meaning):
    if array is not None and tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {meaning} = {tuple(expected)}")


def causal_conv1d_ref(
    x: ConvInput,
    weight: ConvWeight,
    bias: jax.Array | None = None,
    *,
    activation: str | None = "silu",
    initial_state: ConvState | None = None,
    seq_idx: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal conv over a whole sequence: x [b, l, c], weight [c, k], bias [c],
    initial_state [b, c, k], seq_idx [b, l] int. Returns (y [b, l, c], conv_state [b, c, k]), both in x's
    dtype; conv_state is the last k columns of concat(initial_state or zeros, x^T) (so l < k works).
    """
    if x.ndim != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected 3 dims (b, l, c)")
    b, l, c = x.shape
    if weight.ndim != 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected 2 dims (c, k)")
    k = weight.shape[1]
    _expect("weight", weight, (c, k), "(c, k) with c from x")
    _expect("bias", bias, (c,), "(c,) from x")
    _expect("initial_state", initial_state, (b, c, k), "(b, c, k) from x and weight")
    _expect("seq_idx", seq_idx, (b, l), "(b, l) from x")
    _check_activation(activation)

    dtype = jnp.promote_types(x.dtype, jnp.float32)
    if initial_state is None:
        context = jnp.zeros((b, c, k), dtype)  # [b, c, k]
    else:
        context = initial_state.astype(dtype)  # [b, c, k]
    window = jnp.concatenate([context, jnp.swapaxes(x.astype(dtype), 1, 2)], axis=2)  # [b, c, k + l]
    conv_state = window[:, :, -k:]  # [b, c, k]

    xpad = jnp.swapaxes(window[:, :, 1:], 1, 2)  # [b, k-1+l, c]: the context's last k-1 columns, then x
    if seq_idx is not None:
        starts = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)  # [b, l-1]
        seg = jnp.cumsum(jnp.pad(starts, [(0, 0), (1, 0)]), axis=1)  # [b, l]: 0, 1, ... renumbered segments
        seg_pad = jnp.pad(seg, [(0, 0), (k - 1, 0)])  # [b, k-1+l]: the context belongs to segment 0

    y = jnp.zeros((b, l, c), dtype) if bias is None else jnp.broadcast_to(bias.astype(dtype), (b, l, c))
    for i in range(k):  # tap i reads position t + i - (k-1): k is small (4), so a readable loop
        tap = xpad[:, i : i + l]  # [b, l, c]
        if seq_idx is not None:
            tap = jnp.where((seg_pad[:, i : i + l] == seg)[..., None], tap, 0)  # [b, l, c]
        y = y + weight[:, i].astype(dtype) * tap  # [b, l, c]
    y = _activate(y, activation)  # [b, l, c]

    if seq_idx is not None:
        # keep only the columns of the last token's segment (window column j is position j - k)
        seg_window = jnp.pad(seg, [(0, 0), (k, 0)])[:, -k:]  # [b, k]
        conv_state = jnp.where((seg_window == seg[:, -1:])[:, None, :], conv_state, 0)  # [b, c, k]
    return y.astype(x.dtype), conv_state.astype(x.dtype)


def causal_conv1d_update_ref(
    x: jax.Array,
    conv_state: ConvState,
    weight: ConvWeight,
    bias: jax.Array | None = None,
    *,
    activation: str | None = "silu",
) -> tuple[jax.Array, jax.Array]:
    """One decode step: x [b, c], conv_state [b, c, k], weight [c, k], bias [c]. Shifts the window left by one,
    writes x as the newest column and returns (y = act(sum(window * weight, -1) + bias) [b, c] in x's dtype,
    new_conv_state [b, c, k] in conv_state's dtype).
    """
    if conv_state.ndim != 3:
        raise ValueError(f"conv_state has shape {tuple(conv_state.shape)}; expected 3 dims (b, c, k)")
    b, c, k = conv_state.shape
    _expect("x", x, (b, c), "(b, c) from conv_state")
    _expect("weight", weight, (c, k), "(c, k) from conv_state")
    _expect("bias", bias, (c,), "(c,) from conv_state")
    _check_activation(activation)

    dtype = jnp.promote_types(x.dtype, jnp.float32)
    window = jnp.concatenate([conv_state[:, :, 1:].astype(dtype), x.astype(dtype)[:, :, None]], axis=2)  # [b,c,k]
    y = jnp.sum(window * weight.astype(dtype), axis=-1)  # [b, c]
    if bias is not None:
        y = y + bias.astype(dtype)  # [b, c]
    y = _activate(y, activation)  # [b, c]
    return y.astype(x.dtype), window.astype(conv_state.dtype)
