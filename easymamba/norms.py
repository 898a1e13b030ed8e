"""RMS norms: the plain one between blocks and the gated, grouped one inside the Mamba-2 mixer.

Official implementations: `mamba_ssm/ops/triton/layer_norm.py` (`RMSNorm`) and
`mamba_ssm/ops/triton/layernorm_gated.py` (`RMSNorm(group_size=..., norm_before_gate=False)`);
Hugging Face `Mamba2RMSNorm` / `MambaRMSNormGated` (transformers >= 5.23 for the grouped form).
"""

import jax
import jax.numpy as jnp
from flax import nnx


def _rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, in x's dtype (callers pass float32)."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """`weight * normalize(x)`: statistics in float32, rounded to the input dtype before the weight (as HF)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=None, param_dtype=jnp.float32, axis: str = "embed"):
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis,))  # axes: easymamba.sharding

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., d) -> (..., d)
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm expects a last axis of {self.dim}, got shape {x.shape}")
        normed = _rms_normalize(x.astype(jnp.float32), self.eps).astype(x.dtype)
        out = self.weight[...] * normed
        return out if self.dtype is None else out.astype(self.dtype)


class GatedRMSNorm(nnx.Module):
    """Mamba-2's output norm: gate first, then RMS-normalise each group of `dim // n_groups` channels.

    `y = weight * rmsnorm_per_group(x * silu(z))`. The groups are contiguous slices of the head-major
    channel vector, so group `g` covers heads `g * h/g ... (g+1) * h/g - 1`: the same head -> group map the
    SSD uses for B and C. With `n_groups == 1` this is an ordinary RMS norm over all channels.
    (mamba_ssm `RMSNorm(group_size=e // g, norm_before_gate=False)`; HF `MambaRMSNormGated` >= 5.23.)

    `norm_before_gate=True` normalises first and gates after: `y = (weight * rmsnorm_per_group(x)) * silu(z)`
    (HF `FalconH1RMSNormGated`'s default; the gate multiplies in float32, then the result takes x's dtype).
    """

    def __init__(self, dim: int, *, n_groups: int = 1, eps: float = 1e-5, dtype=None, param_dtype=jnp.float32,
                 axis: str = "heads", norm_before_gate: bool = False):
        if dim % n_groups != 0:
            raise ValueError(f"GatedRMSNorm dim ({dim}) must be divisible by n_groups ({n_groups})")
        self.dim = dim
        self.n_groups = n_groups
        self.eps = eps
        self.dtype = dtype
        self.norm_before_gate = norm_before_gate
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis,))  # groups of whole heads

    def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:  # (..., e), (..., e)
        if x.shape[-1] != self.dim:
            raise ValueError(f"GatedRMSNorm expects a last axis of {self.dim}, got shape {x.shape}")
        input_dtype = x.dtype
        h = x.astype(jnp.float32)
        if gate is not None and not self.norm_before_gate:
            h = h * jax.nn.silu(gate.astype(jnp.float32))
        grouped = h.reshape(*h.shape[:-1], self.n_groups, self.dim // self.n_groups)  # (..., g, e/g)
        h = _rms_normalize(grouped, self.eps).reshape(h.shape)
        if self.norm_before_gate:
            out = self.weight[...] * h
            if gate is not None:
                out = out * jax.nn.silu(gate.astype(jnp.float32))
            out = out.astype(input_dtype)
        else:
            out = self.weight[...] * h.astype(input_dtype)
        return out if self.dtype is None else out.astype(self.dtype)
