"""The Mamba-1 mixer (HF `MambaMixer`): in_proj -> causal depthwise conv + SiLU -> x_proj -> selective scan -> gate.

Paper: "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao, 2023), Figure 3 and
Algorithm 2. Official implementation: `mamba_ssm/modules/mamba_simple.py` (`Mamba.forward` / `Mamba.step`);
Hugging Face `transformers.models.mamba.modeling_mamba` (5.25), whose numbers and parameter names this module
reproduces. Letters as in `easymamba.typing`; r is `time_step_rank`.

    hidden (b, l, d) --in_proj--> [ x (e) | z (e) ]
    x --conv1d (depthwise, causal), silu--> x                          (b, l, e)
    x --x_proj--> [ dt (r) | B (n) | C (n) ];  dt --dt_proj.weight--> (b, l, e)
        (Falcon-Mamba, `bcdt_rms_eps`: dt, B and C each RMS-normalised first, with no weight)
    y = S6(x, dt + dt_proj.bias -> softplus, A = -exp(A_log) [e, n], B, C) + D x     (b, l, e) float32
    out = out_proj(y * silu(z))                                          (b, l, d)

The mixer is a pure function of (hidden, conv_state, ssm_state): with no state it runs a whole sequence; with
a state, one token is a decode step (`step`: conv window roll + one state update) and several tokens continue
the sequence from the state (chunked prefill; transformers drops the SSM state there, we do not).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from easymamba import kernels
from easymamba.config import MambaConfig
from easymamba.kernels import (
    Form,
    resolve,
    resolve_impl,
    selective_scan_chunked,
    selective_scan_naive,
    selective_state_update_mamba1,
)
from easymamba.layers import DepthwiseConv1d, kaiming_uniform_init, normal_init
from easymamba.models.common import SSMViewMixer, check_active_rows, hold_rows, init_dt_bias, sow_hook
from easymamba.sharding import MeshRules, constrain

__all__ = ["MambaMixer", "weightless_rms_norm"]


# Jitted once, so that eager calls reuse the compiled scan instead of retracing it; inside an outer jit they inline.
_scan_naive = jax.jit(selective_scan_naive, static_argnames="delta_softplus")
_scan_chunked = jax.jit(selective_scan_chunked, static_argnames=("delta_softplus", "chunk_size"))
_state_update = jax.jit(selective_state_update_mamba1, static_argnames="delta_softplus")


def _scan_fn(kernel_impl: str):
    """The selective scan for a prefill, as `resolve("selective_scan", kernel_impl)` says: the sequential recurrence
    (REFERENCE: "reference", and "auto" on CPU where it measured faster) or the chunked associative scan (XLA: "xla",
    "pallas", which has no selective-scan kernel yet, and "auto" on GPU/TPU where it measured 6-36x faster; timings
    in `easymamba/kernels/selective_scan/reference.py`)."""
    return _scan_naive if resolve("selective_scan", kernel_impl).form is Form.REFERENCE else _scan_chunked


class MambaMixer(SSMViewMixer, nnx.Module):
    """One Mamba-1 mixer (HF `MambaMixer`), parameters named as in HF's state dict, HF's initialisation.

    Hook points (recorded only under `easymamba.interp.run_with_cache`; r is `time_step_rank`):
    `hook_in_proj` (b, l, 2e) the in_proj output [x | z], `hook_conv` (b, l, e) after conv + SiLU + padding mask,
    `hook_x_proj` (b, l, r + 2n) [dt_low_rank | B | C], `hook_dt` (b, l, e) softplus(dt_proj(dt_low_rank)), the
    scan's step size in its compute dtype (float32 unless float64), `hook_ssm_out` (b, l, e) the selective-scan
    output with the D skip, before the gate, `hook_gated` (b, l, e) that times silu(z), `hook_out_proj` (b, l, d).

    `bcdt_rms_eps` (Falcon-Mamba, HF `FalconMambaMixer`; None for Mamba-1): x_proj's three parts dt_low_rank (r),
    B (n) and C (n) are each RMS-normalised over their own last axis before dt_proj and the scan,
    `v * rsqrt(mean(v^2) + eps)`, in float32 and rounded back to x_proj's dtype, with no weight (HF's
    `FalconMambaWeightlessRMSNorm`). `hook_x_proj` records x_proj's output before these norms.
    """

    HOOKS = ("hook_in_proj", "hook_conv", "hook_x_proj", "hook_dt", "hook_ssm_out", "hook_gated", "hook_out_proj")

    def __init__(self, config: MambaConfig, *, layer_idx: int = 0, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto", bcdt_rms_eps: float | None = None):
        resolve_impl(kernel_impl, "causal_conv1d")  # validate the name now, not at the first call
        if bcdt_rms_eps is not None and not (isinstance(bcdt_rms_eps, float) and bcdt_rms_eps > 0.0):
            raise ValueError(f"bcdt_rms_eps ({bcdt_rms_eps!r}) must be a positive float or None")
        self.config = config
        self.bcdt_rms_eps = bcdt_rms_eps
        self.layer_idx = layer_idx
        self.dtype = dtype
        self.kernel_impl = kernel_impl
        d, e, n, r = config.hidden_size, config.intermediate_size, config.state_size, config.resolved_time_step_rank
        std = config.initializer_range

        def normal(key, shape, dt):
            return normal_init(key, shape, std, dt)

        # HF: dt_proj.weight ~ U(-s, s) ("random") or = s ("constant"), s = r^-0.5 * time_step_scale;
        # dt_proj.bias = softplus^-1 of a log-uniform dt in [time_step_min, time_step_max], floored.
        dt_std = r ** -0.5 * config.time_step_scale
        if config.time_step_init_scheme == "constant":
            def dt_weight(key, shape, dt):
                return jnp.full(shape, dt_std, dt)
        else:
            def dt_weight(key, shape, dt):
                return jax.random.uniform(key, shape, jnp.float32, -dt_std, dt_std).astype(dt)

        out_scale = 1.0 / math.sqrt(config.num_hidden_layers) if config.rescale_prenorm_residual else 1.0
        # Logical axes (`easymamba.sharding`): Mamba-1 has no heads; its inner channels e (each with its own conv
        # filter, A row, D, dt and state row) are sharded as `heads`. in_proj [d, 2e] is HF's packed [x | z]: an even
        # split of 2e over M devices gives the first M/2 devices x and the rest z, so the mixer re-shards x and z
        # over e after the matmul (docs/mamba1.md). x_proj and out_proj are row-parallel.
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def axes(*names):
            return {"axes": names}

        self.in_proj = nnx.Linear(d, 2 * e, use_bias=config.use_bias, kernel_init=normal,
                                  kernel_metadata=axes("embed", "heads"), bias_metadata=axes("heads"), **linear)
        self.conv1d = DepthwiseConv1d(e, config.conv_kernel, use_bias=config.use_conv_bias, param_dtype=param_dtype,
                                      rngs=rngs, axis="heads")
        self.x_proj = nnx.Linear(e, config.x_proj_size, use_bias=False, kernel_init=normal,
                                 kernel_metadata=axes("heads", None), **linear)
        self.dt_proj = nnx.Linear(r, e, use_bias=True, kernel_init=dt_weight,
                                  bias_init=lambda key, shape, dt: init_dt_bias(key, shape[0], config, dt),
                                  kernel_metadata=axes(None, "heads"), bias_metadata=axes("heads"), **linear)
        # S4D-real init, as HF and mamba_ssm: A[i, j] = -(j + 1) for every channel i.
        a_row = jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32))
        self.A_log = nnx.Param(jnp.broadcast_to(a_row, (e, n)).astype(param_dtype), axes=("heads", None))
        self.D = nnx.Param(jnp.ones((e,), param_dtype), axes=("heads",))
        self.out_proj = nnx.Linear(
            e, d, use_bias=config.use_bias,
            kernel_init=lambda key, shape, dt: kaiming_uniform_init(key, shape, shape[0], dt, out_scale),
            kernel_metadata=axes("heads", "embed"), bias_metadata=axes("embed"), **linear)
        self.mesh_rules: MeshRules | None = None  # set by easymamba.sharding when the model is sharded

    def __call__(self, hidden: jax.Array, *, attention_mask: jax.Array | None = None,
                 conv_state: jax.Array | None = None,
                 ssm_state: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """hidden (b, l, d) -> (out (b, l, d), (conv_state (b, e, k), ssm_state (b, e, n) float32)).

        `attention_mask` (b, l) of 0/1 zeroes padded positions where HF does: the mixer input before
        in_proj and the conv output after SiLU (so a left-padded row's state stays zero through its pads).
        `conv_state` / `ssm_state` continue a sequence; pass both or neither. One token with states is a
        decode step (`step`).
        """
        if (conv_state is None) != (ssm_state is None):
            raise ValueError("MambaMixer needs both conv_state and ssm_state to continue a sequence, or neither")
        if hidden.shape[1] == 1 and conv_state is not None:
            return self.step(hidden, conv_state, ssm_state, attention_mask=attention_mask)
        return self._forward(hidden, attention_mask, conv_state, ssm_state, decode=False)

    def step(self, hidden: jax.Array, conv_state: jax.Array, ssm_state: jax.Array, *,
             attention_mask: jax.Array | None = None, active_rows: jax.Array | None = None,
             decode_weights: None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One token: hidden (b, 1, d) and the states -> (out (b, 1, d), (conv_state, ssm_state)), as mamba_ssm's
        `Mamba.step`. `attention_mask` (b, >= 1): its last column masks this token. `active_rows` (b,) bool: rows
        where False return their states as given (`hold_rows`). `decode_weights`: always None (`decode_weights()`:
        a Mamba-1 step has no weights to prepare).
        """
        b, l, _ = hidden.shape
        if l != 1 or conv_state is None or ssm_state is None:
            raise ValueError(f"MambaMixer.step takes one token (b, 1, d) and both states; got hidden {hidden.shape}")
        check_active_rows(active_rows, b, conv_state)
        out, states = self._forward(hidden, attention_mask, conv_state, ssm_state, decode=True)
        return out, hold_rows(active_rows, (conv_state, ssm_state), states)

    def decode_weights(self) -> None:
        """None: the Mamba-1 decode step uses its weights as stored."""
        return None

    def _forward(self, hidden, attention_mask, conv_state, ssm_state, decode: bool):
        """The op-by-op mixer: a sequence (prefill or continuation), or one token (`decode`)."""
        cfg = self.config
        b, l, _ = hidden.shape
        n, r = cfg.state_size, cfg.resolved_time_step_rank
        mask = None if attention_mask is None else attention_mask[:, -l:, None].astype(hidden.dtype)  # (b, l, 1)

        if mask is not None:
            hidden = hidden * mask
        xz = self.in_proj(hidden)                                          # (b, l, 2e)
        sow_hook(self, "hook_in_proj", xz)
        x, z = jnp.split(xz, 2, axis=-1)                                   # (b, l, e) each
        # On a mesh every per-channel op (conv, scan, gate) runs on each device's share of e: x and z are pinned
        # there, the packed [x | z] columns of in_proj being split over devices without regard to e
        # (the `axes` in_proj declares); the conv kernel then runs per shard (GSPMD cannot split a Pallas call).
        rules = self.mesh_rules
        x, z = (constrain(a, rules, "batch", None, "heads") for a in (x, z))
        conv_shard = None if rules is None else rules.kernel_axes().for_channels(rules.heads)
        weight = self.conv1d.weight[...].astype(x.dtype)
        bias = None if self.conv1d.bias is None else self.conv1d.bias[...].astype(x.dtype)
        if decode:
            x1, conv_state = kernels.causal_conv1d_update(x[:, 0], conv_state, weight, bias, activation="silu",
                                                          impl=self.kernel_impl, shard=conv_shard)
            x = x1[:, None]                                                # (b, 1, e)
        else:
            x, conv_state = kernels.causal_conv1d(x, weight, bias, activation="silu", initial_state=conv_state,
                                                  impl=self.kernel_impl, shard=conv_shard)
        if mask is not None:
            x = x * mask
        sow_hook(self, "hook_conv", x)
        x_proj = self.x_proj(x)                                            # (b, l, r + 2n)
        sow_hook(self, "hook_x_proj", x_proj)
        dt, B, C = jnp.split(x_proj, [r, r + n], axis=-1)                  # (b,l,r) (b,l,n) (b,l,n)
        if self.bcdt_rms_eps is not None:                                  # Falcon-Mamba
            dt, B, C = (weightless_rms_norm(v, self.bcdt_rms_eps) for v in (dt, B, C))
        # dt_proj's weight only: HF adds the bias inside the scan, in float32, before the softplus.
        dt = dt @ self.dt_proj.kernel[...].astype(dt.dtype)                # (b, l, e)

        A = -jnp.exp(self.A_log[...].astype(jnp.float32))                  # (e, n)
        ssm_kwargs = dict(D=self.D[...], delta_bias=self.dt_proj.bias[...], delta_softplus=True)
        sow_hook(self, "hook_dt", lambda: _step_size(dt, self.dt_proj.bias[...], x.dtype))
        # The gate is applied here rather than inside the scan (the same product in the same dtype, as
        # `_skip_and_gate` forms it), so that the ungated output can be a hook point.
        if decode:
            y, ssm_state = _state_update(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], **ssm_kwargs)
            y = y[:, None]                                                 # (b, 1, e)
        else:
            y, ssm_state = _scan_fn(self.kernel_impl)(x, dt, A, B, C, initial_state=ssm_state, **ssm_kwargs)
        sow_hook(self, "hook_ssm_out", y)                                  # (b, l, e), compute dtype
        y = y * jax.nn.silu(z.astype(y.dtype))
        sow_hook(self, "hook_gated", y)
        out = self.out_proj(y.astype(self.dtype))                          # (b, l, d)
        sow_hook(self, "hook_out_proj", out)
        return out, (conv_state, ssm_state)


def weightless_rms_norm(v: jax.Array, eps: float) -> jax.Array:
    """v (..., m) -> v * rsqrt(mean(v^2) + eps) over the last axis, computed in float32 and rounded back to v's
    dtype (HF `FalconMambaWeightlessRMSNorm`: `_norm(x.float()).type_as(x)`)."""
    v32 = v.astype(jnp.float32)
    return (v32 * jax.lax.rsqrt(jnp.mean(jnp.square(v32), axis=-1, keepdims=True) + eps)).astype(v.dtype)


def _step_size(dt, dt_bias, x_dtype) -> jax.Array:
    """softplus(dt + dt_proj.bias) in the scan's compute dtype promote(x, float32), as the selective scan forms it
    (`_process_delta` in kernels/selective_scan/reference.py); only evaluated for `hook_dt`."""
    dtype = jnp.promote_types(x_dtype, jnp.float32)
    return jax.nn.softplus(dt.astype(dtype) + dt_bias.astype(dtype))
