"""The Mamba-2 mixer: in_proj -> causal depthwise conv + SiLU -> SSD -> gated grouped RMS norm -> out_proj.

Official implementation: `mamba_ssm/modules/mamba2.py` (`Mamba2.forward` / `Mamba2.step`); Hugging Face
`transformers.models.mamba2.modeling_mamba2.Mamba2Mixer` (5.23), whose numbers this module reproduces.

    hidden (b, l, d) --in_proj--> [ z (e) | xBC (c = e + 2gn) | dt (h) ]
    xBC --conv1d, silu--> [ x (e) = (h, p) | B (g, n) | C (g, n) ]
    y = SSD(x, dt, A, B, C, D)                       (b, l, h, p), float32
    out = out_proj(gated_rms_norm(y, z))             (b, l, d)

With a cache the mixer continues from `conv_state` (the last k pre-conv inputs) and `ssm_state`
(the SSM state, float32): one token is a decode step (window roll + one state update), several tokens are a
chunked prefill that starts from those states. It is a pure function of its inputs: the new states are
returned, never written in place.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from easymamba import kernels
from easymamba.config import Mamba2Config
from easymamba.layers import DepthwiseConv1d, kaiming_uniform_init
from easymamba.norms import GatedRMSNorm


def _inverse_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


class HookValue(nnx.Intermediate):
    """An activation recorded at a `hook_*` point; `easymamba.interp.run_with_cache` is what asks for them."""


def sow_hook(module: nnx.Module, name: str, value) -> None:
    """Record `value` (an array, or a zero-argument function returning one) as `name` on `module`, but only
    when `run_with_cache` requested that hook (it marks `module.__hooks__` on the copy of the model it runs).
    Otherwise nothing happens and nothing is traced: the forward without hooks is op for op the
    forward before hooks existed. A function is called only when requested, so a hook that needs extra math
    (`hook_dt`) costs nothing unless asked for.
    """
    if name in getattr(module, "__hooks__", ()):
        module.sow(HookValue, name, value() if callable(value) else value,
                   reduce_fn=lambda _, new: new, init_fn=lambda: None)


def init_dt_bias(key, num_heads: int, config: Mamba2Config, dtype) -> jax.Array:
    """HF/mamba_ssm: dt log-uniform in [time_step_min, time_step_max], floored, stored as softplus^-1(dt)."""
    lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = jnp.exp(jax.random.uniform(key, (num_heads,), jnp.float32) * (hi - lo) + lo)
    dt = jnp.maximum(dt, config.time_step_floor)
    return _inverse_softplus(dt).astype(dtype)


class Mamba2Mixer(nnx.Module):
    """One Mamba-2 SSM mixer (HF `Mamba2Mixer`), parameters named as in HF's state dict.

    Hook points (recorded only under `easymamba.interp.run_with_cache`): `hook_in_proj` (b, l, 2e+2gn+h),
    `hook_conv` (b, l, c) after conv + SiLU + padding mask, `hook_dt` (b, l, h) after dt_bias, softplus and
    limit, `hook_ssm_out` (b, l, h, p) the SSD output with the D skip, `hook_inner_norm` (b, l, e),
    `hook_out_proj` (b, l, d).
    """

    HOOKS = ("hook_in_proj", "hook_conv", "hook_dt", "hook_ssm_out", "hook_inner_norm", "hook_out_proj")

    def __init__(self, config: Mamba2Config, *, layer_idx: int = 0, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto"):
        self.config = config
        self.layer_idx = layer_idx
        self.dtype = dtype
        self.kernel_impl = kernel_impl
        d, e, h = config.hidden_size, config.intermediate_size, config.num_heads
        std = config.initializer_range

        self.in_proj = nnx.Linear(
            d, config.in_proj_size, use_bias=config.use_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=lambda key, shape, dt: (std * jax.random.normal(key, shape, jnp.float32)).astype(dt),
            rngs=rngs)
        self.conv1d = DepthwiseConv1d(config.conv_dim, config.conv_kernel, use_bias=config.use_conv_bias,
                                      param_dtype=param_dtype, rngs=rngs)
        self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), h, config, param_dtype))
        # HF's deterministic A init (A = -[1, 2, ..., h]); mamba_ssm draws A ~ U(1, 16) instead.
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)).astype(param_dtype))
        self.D = nnx.Param(jnp.ones((h,), param_dtype))
        self.norm = GatedRMSNorm(e, n_groups=config.n_groups, eps=config.layer_norm_epsilon,
                                 param_dtype=param_dtype)
        out_scale = 1.0 / math.sqrt(config.num_hidden_layers) if config.rescale_prenorm_residual else 1.0
        self.out_proj = nnx.Linear(
            e, d, use_bias=config.use_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=lambda key, shape, dt: kaiming_uniform_init(key, shape, shape[0], dt, out_scale),
            rngs=rngs)

    def __call__(self, hidden: jax.Array, *, attention_mask: jax.Array | None = None,
                 conv_state: jax.Array | None = None, ssm_state: jax.Array | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """hidden (b, l, d) -> (out (b, l, d), (conv_state (b, c, k), ssm_state (b, h, p, n) float32)).

        `attention_mask` (b, l) of 0/1 zeroes padded positions where HF does: the mixer input before
        in_proj and the conv output after SiLU (so left-padded rows keep a zero state through the pads).
        `conv_state` / `ssm_state` continue a sequence; pass both or neither.
        """
        cfg = self.config
        b, l, _ = hidden.shape
        e, h, p, g, n = cfg.intermediate_size, cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size
        if (conv_state is None) != (ssm_state is None):
            raise ValueError("Mamba2Mixer needs both conv_state and ssm_state to continue a sequence, or neither")
        decode = l == 1 and conv_state is not None
        mask = None if attention_mask is None else attention_mask[:, -l:, None].astype(hidden.dtype)  # (b, l, 1)

        if mask is not None:
            hidden = hidden * mask
        zxbcdt = self.in_proj(hidden)                                      # (b, l, 2e + 2gn + h)
        sow_hook(self, "hook_in_proj", zxbcdt)
        z, xbc, dt = jnp.split(zxbcdt, [e, e + cfg.conv_dim], axis=-1)     # (b,l,e) (b,l,c) (b,l,h)
        weight = self.conv1d.weight[...].astype(xbc.dtype)
        bias = None if self.conv1d.bias is None else self.conv1d.bias[...].astype(xbc.dtype)
        if decode:
            xbc1, conv_state = kernels.causal_conv1d_update(xbc[:, 0], conv_state, weight, bias,
                                                            activation="silu")
            xbc = xbc1[:, None]                                            # (b, 1, c)
        else:
            xbc, conv_state = kernels.causal_conv1d(xbc, weight, bias, activation="silu",
                                                    initial_state=conv_state, impl=self.kernel_impl)
        if mask is not None:
            xbc = xbc * mask
        sow_hook(self, "hook_conv", xbc)
        x, B, C = jnp.split(xbc, [e, e + g * n], axis=-1)                   # (b,l,e) (b,l,gn) (b,l,gn)

        A = -jnp.exp(self.A_log[...].astype(jnp.float32))                  # (h,)
        ssm_kwargs = dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True,
                          dt_limit=cfg.time_step_limit)
        sow_hook(self, "hook_dt", lambda: _step_size(dt, self.dt_bias[...], cfg.time_step_limit, x.dtype))
        if decode:
            y, ssm_state = kernels.selective_state_update(
                ssm_state, x[:, 0].reshape(b, h, p), dt[:, 0], A, B[:, 0].reshape(b, g, n),
                C[:, 0].reshape(b, g, n), **ssm_kwargs)
            y = y[:, None]                                                 # (b, 1, h, p)
        else:
            y, ssm_state = kernels.ssd(
                x.reshape(b, l, h, p), dt, A, B.reshape(b, l, g, n), C.reshape(b, l, g, n),
                chunk_size=cfg.chunk_size, initial_state=ssm_state, impl=self.kernel_impl, **ssm_kwargs)
        sow_hook(self, "hook_ssm_out", y)                                  # (b, l, h, p)
        y = self.norm(y.reshape(b, l, e), z)                               # (b, l, e)
        sow_hook(self, "hook_inner_norm", y)
        out = self.out_proj(y.astype(self.dtype))                          # (b, l, d)
        sow_hook(self, "hook_out_proj", out)
        return out, (conv_state, ssm_state)


def _step_size(dt, dt_bias, dt_limit, x_dtype) -> jax.Array:
    """The step size the SSD kernels use, clip(softplus(dt + dt_bias), *dt_limit) in their compute dtype
    promote(x, float32) (`_process_dt` in kernels/ssd_reference.py); only evaluated for `hook_dt`."""
    dtype = jnp.promote_types(x_dtype, jnp.float32)
    return jnp.clip(jax.nn.softplus(dt.astype(dtype) + dt_bias.astype(dtype)), dt_limit[0], dt_limit[1])
