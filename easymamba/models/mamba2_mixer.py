"""The Mamba-2 mixer: in_proj -> causal depthwise conv + SiLU -> SSD -> gated grouped RMS norm -> out_proj.

Official implementation: `mamba_ssm/modules/mamba2.py` (`Mamba2.forward` / `Mamba2.step`); Hugging Face
`transformers.models.mamba2.modeling_mamba2.Mamba2Mixer` (5.25), whose numbers this module reproduces.

    hidden (b, l, d) --in_proj--> [ z (e) | xBC (c = e + 2gn) | dt (h) ]
    xBC --conv1d, silu--> [ x (e) = (h, p) | B (g, n) | C (g, n) ]
    y = SSD(x, dt, A, B, C, D)                       (b, l, h, p), float32
    out = out_proj(gated_rms_norm(y, z))             (b, l, d)

Options of a hybrid's `Mamba2MixerConfig` (all off for `Mamba2Config`, whose numbers they leave untouched):
`zxbcdt_multipliers` scale in_proj's five output parts (bias included) before the conv and before dt_bias
(Falcon-H1's muP vector); `norm_before_gate` normalises y before the gate; `gated_norm=False` drops the norm
(out = out_proj(y * silu(z)), no norm weight); `out_proj_bias` gives out_proj a bias apart from in_proj's. The
fused decode-step kernel computes the default mixer only; with any option set a step runs op by op.

in_proj and conv1d hold those parts as separate parameters (`in_proj.{z,x,B,C,dt}`, `conv1d.{x,B,C}`), so a mesh
can shard heads and groups independently; Hugging Face's packed tensors are split and re-joined by
`easymamba.checkpoints` (docs/sharding.md). On a mesh (`mesh_rules`, set by `easymamba.sharding`) the mixer
constrains its activations to the rules and passes the layout to the kernels, which run Pallas per shard.

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
from easymamba.kernels import mamba2_decode_step
from easymamba.layers import SplitConv1d, SplitLinear, few_row_kernel, kaiming_uniform_init, linear
from easymamba.models.common import (
    SSMViewMixer,
    check_active_rows,
    hold_rows,
    init_dt_bias,
    norm_folded,
    sow_hook,
)
from easymamba.norms import GatedRMSNorm
from easymamba.sharding import MeshRules, constrain


class Mamba2Mixer(SSMViewMixer, nnx.Module):
    """One Mamba-2 SSM mixer (HF `Mamba2Mixer`), parameters named as in HF's state dict.

    Hook points (recorded only under `easymamba.interp.run_with_cache`): `hook_in_proj` (b, l, 2e+2gn+h),
    `hook_conv` (b, l, c) after conv + SiLU + padding mask, `hook_dt` (b, l, h) after dt_bias, softplus and
    limit, `hook_ssm_out` (b, l, h, p) the SSD output with the D skip, `hook_inner_norm` (b, l, e),
    `hook_out_proj` (b, l, d).
    """

    HOOKS = ("hook_in_proj", "hook_conv", "hook_dt", "hook_ssm_out", "hook_inner_norm", "hook_out_proj")
    PACKED = True  # takes seq_idx: the conv and the SSD restart at every segment

    def __init__(self, config: Mamba2Config, *, layer_idx: int = 0, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto"):
        self.config = config
        self.layer_idx = layer_idx
        self.dtype = dtype
        self.kernel_impl = kernel_impl
        d, e, h = config.hidden_size, config.intermediate_size, config.num_heads
        std = config.initializer_range

        gn = config.n_groups * config.state_size
        # HF packs in_proj as [z | x | B | C | dt] and conv1d as [x | B | C]; the parts are kept apart so each can
        # be sharded on its own axis (heads, groups), which no even split of the packed axis does.
        # easymamba.checkpoints splits and re-packs them at the checkpoint boundary (docs/sharding.md).
        # Logical axes (`easymamba.sharding`): z, x, dt and everything per head over `heads`, B and C over `groups`.
        axes = {"z": "heads", "x": "heads", "B": "groups", "C": "groups", "dt": "heads"}
        self.in_proj = SplitLinear(
            d, {"z": e, "x": e, "B": gn, "C": gn, "dt": h}, use_bias=config.use_bias, dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=lambda key, shape, dt: (std * jax.random.normal(key, shape, jnp.float32)).astype(dt),
            rngs=rngs, axes=axes)
        self.conv1d = SplitConv1d({"x": e, "B": gn, "C": gn}, config.conv_kernel, use_bias=config.use_conv_bias,
                                  param_dtype=param_dtype, rngs=rngs, axes=axes)
        self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), h, config, param_dtype), axes=("heads",))
        # HF's deterministic A init (A = -[1, 2, ..., h]); mamba_ssm draws A ~ U(1, 16) instead.
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)).astype(param_dtype),
                               axes=("heads",))
        self.D = nnx.Param(jnp.ones((h,), param_dtype), axes=("heads",))
        # Options of `Mamba2MixerConfig` (a `Mamba2Config` has none of them: its mixer is the default one).
        self.gated_norm = bool(getattr(config, "gated_norm", True))
        multipliers = getattr(config, "zxbcdt_multipliers", None)
        self.zxbcdt_multipliers = None if multipliers is None else tuple(float(m) for m in multipliers)
        out_proj_bias = getattr(config, "out_proj_bias", None)
        out_proj_bias = config.use_bias if out_proj_bias is None else bool(out_proj_bias)
        # gated_norm False: y * silu(z), no norm and no parameter (Falcon-H1's mamba_rms_norm=False).
        self.norm = GatedRMSNorm(e, n_groups=getattr(config, "norm_groups", config.n_groups),
                                 eps=config.layer_norm_epsilon, param_dtype=param_dtype,
                                 norm_before_gate=bool(getattr(config, "norm_before_gate", False))) \
            if self.gated_norm else None
        out_scale = 1.0 / math.sqrt(config.num_hidden_layers) if config.rescale_prenorm_residual else 1.0
        self.out_proj = nnx.Linear(  # row-parallel: one all-reduce per layer on a mesh
            e, d, use_bias=out_proj_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=lambda key, shape, dt: kaiming_uniform_init(key, shape, shape[0], dt, out_scale),
            rngs=rngs, kernel_metadata={"axes": ("heads", "embed")}, bias_metadata={"axes": ("embed",)})
        self.mesh_rules: MeshRules | None = None  # set by easymamba.sharding when the model is sharded

    def __call__(self, hidden: jax.Array, *, attention_mask: jax.Array | None = None,
                 conv_state: jax.Array | None = None, ssm_state: jax.Array | None = None,
                 seq_idx: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """hidden (b, l, d) -> (out (b, l, d), (conv_state (b, c, k), ssm_state (b, h, p, n) float32)).

        `attention_mask` (b, l) of 0/1 zeroes padded positions where HF does: the mixer input before
        in_proj and the conv output after SiLU (so left-padded rows keep a zero state through the pads).
        `conv_state` / `ssm_state` continue a sequence (chunked prefill); pass both or neither. One token with
        states is a decode step (`step`). `seq_idx` (b, l) int: packed sequences, one segment id per token
        (non-decreasing along l): the conv window and the SSM state restart where it changes, so each segment
        computes as if run alone (with states, they continue the first segment only).
        """
        if (conv_state is None) != (ssm_state is None):
            raise ValueError("Mamba2Mixer needs both conv_state and ssm_state to continue a sequence, or neither")
        if hidden.shape[1] == 1 and conv_state is not None and seq_idx is None:
            return self.step(hidden, conv_state, ssm_state, attention_mask=attention_mask)
        return self._forward(hidden, attention_mask, conv_state, ssm_state, decode=False, seq_idx=seq_idx)

    def step(self, hidden: jax.Array, conv_state: jax.Array, ssm_state: jax.Array, *,
             attention_mask: jax.Array | None = None, active_rows: jax.Array | None = None,
             decode_weights: dict | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One token: hidden (b, 1, d) and the states -> (out (b, 1, d), (conv_state, ssm_state)), as mamba_ssm's
        `Mamba2.step`. Unsharded, unhooked and unmasked, on a GPU, this is the fused decode-step kernel.

        `attention_mask` (b, >= 1): its last column masks this token. `active_rows` (b,) bool: rows where False
        return their states as given (`hold_rows`). `decode_weights`: this mixer's `decode_weights()`, made once
        before a decode loop (used by the fused decode step; ignored elsewhere).
        """
        b, l, _ = hidden.shape
        if l != 1 or conv_state is None or ssm_state is None:
            raise ValueError(f"Mamba2Mixer.step takes one token (b, 1, d) and both states; got hidden {hidden.shape}")
        check_active_rows(active_rows, b, conv_state)
        if attention_mask is None and self._fused_decode():
            return self._fused_decode_step(hidden, conv_state, ssm_state, active_rows, decode_weights)
        if norm_folded(decode_weights):
            raise ValueError("decode_weights made with the block's norm folded in (pre_norm=) are for the fused "
                             "decode step, which this step does not take (a mask, hooks, a mesh or kernel_impl "
                             "changed since they were made); make them again, or pass none")
        out, states = self._forward(hidden, attention_mask, conv_state, ssm_state, decode=True)
        return out, hold_rows(active_rows, (conv_state, ssm_state), states)

    def _forward(self, hidden, attention_mask, conv_state, ssm_state, decode: bool, seq_idx=None):
        """The op-by-op mixer: a sequence (prefill or continuation), or one token (`decode`)."""
        cfg = self.config
        b, l, _ = hidden.shape
        e, h, p, g, n = cfg.intermediate_size, cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size
        mask = None if attention_mask is None else attention_mask[:, -l:, None].astype(hidden.dtype)  # (b, l, 1)
        if mask is not None:
            hidden = hidden * mask
        rules = self.mesh_rules
        if rules is None:
            z, x, B, C, dt, conv_state = self._project_and_conv_packed(hidden, mask, conv_state, decode, seq_idx)
        else:
            z, x, B, C, dt, conv_state = self._project_and_conv_parts(hidden, mask, conv_state, decode, rules,
                                                                      seq_idx)
        shard = None if rules is None else rules.kernel_axes()

        A = -jnp.exp(self.A_log[...].astype(jnp.float32))                  # (h,)
        limit = cfg.time_step_limit
        ssm_kwargs = dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True, dt_limit=limit)
        sow_hook(self, "hook_dt", lambda: _step_size(dt, self.dt_bias[...], limit, x.dtype))
        if decode:
            y, ssm_state = kernels.selective_state_update(
                ssm_state, x[:, 0].reshape(b, h, p), dt[:, 0], A, B[:, 0].reshape(b, g, n),
                C[:, 0].reshape(b, g, n), impl=self.kernel_impl, shard=shard, **ssm_kwargs)
            y = y[:, None]                                                 # (b, 1, h, p)
        else:
            y, ssm_state = kernels.ssd(
                x.reshape(b, l, h, p), dt, A, B.reshape(b, l, g, n), C.reshape(b, l, g, n),
                chunk_size=cfg.chunk_size, initial_state=ssm_state, seq_idx=seq_idx, impl=self.kernel_impl,
                shard=shard, **ssm_kwargs)
        sow_hook(self, "hook_ssm_out", y)                                  # (b, l, h, p)
        if self.norm is None:  # y (float32) * silu(z) (z in the model dtype), as HF's Falcon-H1 without the norm
            y = y.reshape(b, l, e) * jax.nn.silu(z)                       # (b, l, e)
        else:
            y = self.norm(y.reshape(b, l, e), z)                           # (b, l, e)
        sow_hook(self, "hook_inner_norm", y)
        out = self.out_proj(y.astype(self.dtype))                          # (b, l, d)
        sow_hook(self, "hook_out_proj", out)
        return out, (conv_state, ssm_state)

    def _fused_decode(self) -> bool:
        """Whether a one-token step (no mask) takes the fused decode-step kernel: unsharded, unhooked, and the
        kernel is what `kernel_impl` resolves to here."""
        cfg = self.config
        # The kernel computes the default mixer only: the gated norm after the gate, no muP multipliers.
        default = (self.norm is not None and not self.norm.norm_before_gate and self.zxbcdt_multipliers is None)
        return (default and self.mesh_rules is None and not getattr(self, "__hooks__", ())
                and kernels.resolve("decode_step", self.kernel_impl, dims=dict(
                    p=cfg.head_dim, n=cfg.state_size, k=cfg.conv_kernel)).form.is_pallas)

    FOLDS_PRE_NORM = True  # decode_weights(pre_norm=) takes the block's RMS norm into the fused decode step

    def decode_weights(self, pre_norm=None) -> dict | None:
        """in_proj's parts packed into one kernel, and out_proj's kernel, both laid out for few rows
        (`layers.few_row_kernel`), for a decode loop to make ONCE, outside the loop, and pass to every step
        (`decode_weights=`). Made inside the step, XLA keeps in_proj's concatenation in the loop, fused into the
        matmul, which then indexes five operands: 4.4 us per layer against 3.6 for one packed kernel (130M, b1,
        H100; docs/benchmarks.md); and a step jitted alone (the streaming path) would relayout both weights on
        every call, so without them the step uses the weights as stored. None when this mixer's decode step is
        not the fused one (a mesh, hooks or a non-Pallas kernel_impl).

        `pre_norm`: the block's RMS norm before this mixer (`ResidualBlock.decode_weights`). in_proj(w * x * s)
        = s * (x @ (w[:, None] * W)) for the norm's weight w and a row's factor s = rsqrt(mean(x^2) + eps): with no
        in_proj bias, w goes into the packed kernel (multiplied in float32, then rounded once), `"rms_eps"` into
        the result, and each step hands the un-normalised input to the kernel, which forms s itself
        (`mamba2_decode_step(rms_input=)`). Two launches a layer and step fewer: the norm's sum of squares and its
        multiply (benchmarks/deviceless.py decode). The numbers are the norm's to rounding: bf16 rounds x and
        w * W instead of the normalised input."""
        if not self._fused_decode():
            return None
        kernel, bias = self.in_proj.packed_params()
        first = getattr(self.in_proj, self.in_proj.part_names[0])
        fold = pre_norm is not None and bias is None
        if fold:
            kernel = pre_norm.weight[...].astype(jnp.float32)[:, None] * kernel.astype(jnp.float32)
        kernel, bias = first.promote_dtype((kernel, bias), dtype=first.dtype)
        out_kernel = self.out_proj.kernel[...].astype(self.out_proj.dtype)
        weights = {"in_proj_kernel": few_row_kernel(kernel), "in_proj_bias": bias,
                   "out_proj_kernel": few_row_kernel(out_kernel)}
        if fold:
            weights["rms_eps"] = float(pre_norm.eps)
        return weights

    def _fused_decode_step(self, hidden, conv_state, ssm_state, active_rows, decode_weights=None):
        """One token of an unsharded model, no mask, no hooks: in_proj, then conv update + SiLU + state update +
        D + gate + grouped norm as one Pallas kernel (`kernels/decode_step/triton.py`; the norm's last multiply is
        a small XLA fusion), then out_proj. Same numbers as the op-by-op path (tests/test_decode_step_pallas.py).
        Operands go to the kernel as they are stored (conv weights in parts, A_log): anything computed from them
        before the custom call is one more launch per layer and token."""
        cfg = self.config
        rms_input, rms_eps = None, 1e-5
        if decode_weights is None:
            zxbcdt = self.in_proj.packed(hidden)[:, 0]                     # (b, 2e + 2gn + h)
        else:
            first = getattr(self.in_proj, self.in_proj.part_names[0])
            zxbcdt = linear(first, hidden, decode_weights["in_proj_kernel"], decode_weights["in_proj_bias"],
                            few_rows=True)[:, 0]
            if norm_folded(decode_weights):  # hidden is the block's input, the norm's weight in in_proj's kernel
                rms_input, rms_eps = hidden[:, 0], decode_weights["rms_eps"]
        conv = self.conv1d
        parts = [getattr(conv, name) for name in conv.part_names]         # x, B, C
        weight = tuple(part.weight[...].astype(zxbcdt.dtype) for part in parts)
        bias = None if parts[0].bias is None else tuple(part.bias[...].astype(zxbcdt.dtype) for part in parts)
        y, conv_state, ssm_state = mamba2_decode_step(
            zxbcdt, conv_state, weight, bias, self.A_log[...], self.D[...], self.dt_bias[...], ssm_state,
            self.norm.weight[...], active_rows, rms_input, n_groups=cfg.n_groups, eps=self.norm.eps,
            dt_limit=cfg.time_step_limit, A_is_log=True, y_dtype=self.dtype, rms_eps=rms_eps, impl="pallas")
        proj = self.out_proj
        if decode_weights is None:
            out = proj(y[:, None].astype(self.dtype))                      # (b, 1, d)
        else:
            out = linear(proj, y[:, None].astype(self.dtype), decode_weights["out_proj_kernel"],
                         None if proj.bias is None else proj.bias[...], few_rows=True)
        return out, (conv_state, ssm_state)

    def _project_and_conv_parts(self, hidden, mask, conv_state, decode, rules, seq_idx=None):
        """in_proj and the conv part by part, each sharded its own way (models placed on a mesh)."""
        cfg = self.config
        e, g, n = cfg.intermediate_size, cfg.n_groups, cfg.state_size
        z, x, B, C, dt = self.in_proj(hidden)                              # (b,l,e) (b,l,e) (b,l,gn) x2 (b,l,h)
        if self.zxbcdt_multipliers is not None:  # the same products as the packed path's, part by part
            z, x, B, C, dt = (a * jnp.asarray(m, a.dtype) for a, m in zip((z, x, B, C, dt), self.zxbcdt_multipliers))
        if decode:
            # One-row matmuls: left alone, XLA fuses each part's dot into the conv window's concatenate as a slow
            # reduction (measured 3.6 ms per 130M decode step on an H100 instead of ~0.7); the barrier keeps
            # them as GEMMs.
            z, x, B, C, dt = jax.lax.optimization_barrier((z, x, B, C, dt))
        z, x, dt = (constrain(a, rules, "batch", None, "heads") for a in (z, x, dt))
        B, C = (constrain(a, rules, "batch", None, "groups") for a in (B, C))
        sow_hook(self, "hook_in_proj", lambda: jnp.concatenate([z, x, B, C, dt], axis=-1))  # (b, l, 2e + 2gn + h)

        # The depthwise conv acts on each channel alone, so it runs on x, B and C apart, each sharded its own way
        # (x over heads, B and C over groups or replicated); the packed conv state [x | B | C] is cut around it.
        shard = None if rules is None else rules.kernel_axes()
        parts = {"x": (x, "heads"), "B": (B, "groups"), "C": (C, "groups")}
        states = (None,) * 3 if conv_state is None else jnp.split(conv_state, [e, e + g * n], axis=1)
        outs, new_states = [], []
        for (name, (part, axis)), state in zip(parts.items(), states):
            conv = getattr(self.conv1d, name)
            weight = conv.weight[...].astype(part.dtype)
            bias = None if conv.bias is None else conv.bias[...].astype(part.dtype)
            part_shard = None if shard is None else shard.for_channels(getattr(rules, axis))
            if state is not None:  # a local slice of the channel-replicated cache state: no communication
                state = constrain(constrain(state, rules, "batch", None, None), rules, "batch", axis, None)
            if decode:
                y, state = kernels.causal_conv1d_update(part[:, 0], state, weight, bias, activation="silu",
                                                        impl=self.kernel_impl, shard=part_shard)
                y = y[:, None]                                             # (b, 1, channels)
            else:
                y, state = kernels.causal_conv1d(part, weight, bias, activation="silu", initial_state=state,
                                                 seq_idx=seq_idx, impl=self.kernel_impl, shard=part_shard)
            y = constrain(y, rules, "batch", None, axis)
            outs.append(y if mask is None else y * mask)
            new_states.append(state)
        x, B, C = outs                                                     # (b,l,e) (b,l,gn) (b,l,gn)
        if decode and conv_state is not None and rules is not None:
            # The window rolled by one, the new column written last (the conv update's convention): built from the
            # channel-replicated input state, so only the new column [b, c] crosses devices, not the window.
            column = jnp.concatenate([constrain(part[:, 0].astype(conv_state.dtype), rules, "batch", None)
                                      for part, _ in parts.values()], axis=-1)                 # (b, c)
            conv_state = jnp.concatenate([conv_state[:, :, 1:], column[:, :, None]], axis=2)
        else:  # HF's packed [x | B | C] (b, c, k), joined channel-replicated as the cache keeps it
            conv_state = jnp.concatenate([constrain(part_state, rules, "batch", None, None)
                                          for part_state in new_states], axis=1)
        sow_hook(self, "hook_conv", lambda: jnp.concatenate([x, B, C], axis=-1))

        return z, x, B, C, dt, conv_state

    def _project_and_conv_packed(self, hidden, mask, conv_state, decode, seq_idx=None):
        """in_proj as one GEMM and the conv on the packed [x | B | C] channels (unsharded models): fewer, larger
        kernels, which is what a batch-1 decode step is bound by."""
        cfg = self.config
        e, g, n = cfg.intermediate_size, cfg.n_groups, cfg.state_size
        zxbcdt = self.in_proj.packed(hidden)                               # (b, l, 2e + 2gn + h)
        if self.zxbcdt_multipliers is not None:
            zxbcdt = zxbcdt * self._mup_vector(zxbcdt.dtype)
        sow_hook(self, "hook_in_proj", zxbcdt)
        z, xbc, dt = jnp.split(zxbcdt, [e, e + cfg.conv_dim], axis=-1)     # (b,l,e) (b,l,c) (b,l,h)
        weight, bias = self.conv1d.packed(xbc.dtype)
        if decode:
            xbc1, conv_state = kernels.causal_conv1d_update(xbc[:, 0], conv_state, weight, bias, activation="silu",
                                                            impl=self.kernel_impl)
            xbc = xbc1[:, None]                                            # (b, 1, c)
        else:
            xbc, conv_state = kernels.causal_conv1d(xbc, weight, bias, activation="silu", initial_state=conv_state,
                                                    seq_idx=seq_idx, impl=self.kernel_impl)
        if mask is not None:
            xbc = xbc * mask
        sow_hook(self, "hook_conv", xbc)
        x, B, C = jnp.split(xbc, [e, e + g * n], axis=-1)                   # (b,l,e) (b,l,gn) (b,l,gn)
        return z, x, B, C, dt, conv_state

    def _mup_vector(self, dtype) -> jax.Array:
        """(2e + 2gn + h,) the muP multipliers of in_proj's parts [z | x | B | C | dt] (HF Falcon-H1's
        `mup_vector`, in the activations' dtype as HF casts the buffer with the model)."""
        cfg = self.config
        e, gn, h = cfg.intermediate_size, cfg.n_groups * cfg.state_size, cfg.num_heads
        return jnp.concatenate([jnp.full((size,), m, jnp.float32) for size, m in
                                zip((e, e, gn, gn, h), self.zxbcdt_multipliers)]).astype(dtype)


def _step_size(dt, dt_bias, dt_limit, x_dtype) -> jax.Array:
    """The step size the SSD kernels use, clip(softplus(dt + dt_bias), *dt_limit) in their compute dtype
    promote(x, float32) (`_process_dt` in kernels/ssd_scan/reference.py); only evaluated for `hook_dt`."""
    dtype = jnp.promote_types(x_dtype, jnp.float32)
    return jnp.clip(jax.nn.softplus(dt.astype(dtype) + dt_bias.astype(dtype)), dt_limit[0], dt_limit[1])
