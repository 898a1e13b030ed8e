"""Feed-forward parts without state: the MLP (gated or plain) and the mixture of experts, one implementation each
for every family (Nemotron-H, Bamba, Granite-4.0-H, Falcon-H1, Zamba2, Jamba).

Hugging Face counterparts (transformers 5.25): `NemotronHMLP` (plain, relu2), `BambaMLP` / `FalconH1MLP` /
`Zamba2MLP` / `GraniteMoeHybridMLP` (gated), `NemotronHMoE` (sigmoid router with groups and a correction bias,
plain experts, latent projections, shared experts), `GraniteMoeHybridMoE` (softmax over the top-k logits, gated
experts), `JambaSparseMoeBlock` (softmax then top-k).

    MLP   gated:  out = down(act(gate(x) * gate_multiplier) * up(x)) * down_multiplier
          plain:  out = down(act(up(x)))
    MoE   weights, experts = route(router(x))                       top_k per token
          out = sum_j weights_j * expert_j(x)  (+ shared(x))       experts as grouped matmuls (ragged_dot)

The experts run as grouped matmuls: the (token, expert) assignments are sorted by expert and each expert's
rows multiply its weights in one `jax.lax.ragged_dot`, so the work is that of the tokens routed, not of every
expert on every token.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from easymamba.config.parts import MLPConfig, MoEConfig
from easymamba.layers import low_rank_delta, normal_init, normal_linear
from easymamba.models.common import sow_hook
from easymamba.sharding import MeshRules, constrain

__all__ = ["MLP", "MoE", "activation", "route"]


def activation(name: str):
    """HF's `ACT2FN[name]` for the activations easymamba knows (`easymamba.config.parts.ACTIVATIONS`)."""
    if name == "silu":
        return jax.nn.silu
    if name == "relu2":
        return lambda x: jnp.square(jax.nn.relu(x))
    if name == "relu":
        return jax.nn.relu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_pytorch_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {name!r}")


def _linear(n_in, n_out, bias, axes, std, *, dtype, param_dtype, rngs):
    return normal_linear(n_in, n_out, bias=bias, axes=axes, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class _Stateless:
    """The mixer protocol of `easymamba.models.causal_lm.ResidualBlock` for a part without state: the view
    passes through untouched. Token by token, so packed sequences (`seq_idx`) need nothing."""

    PACKED = True

    def run(self, hidden, view, **_):
        return self(hidden), view

    def run_step(self, hidden, view, **_):
        return self(hidden), view

    def decode_weights(self):
        return None


class MLP(_Stateless, nnx.Module):
    """A gated or plain MLP (see the module docstring); parameters `gate_proj` (gated only), `up_proj`,
    `down_proj` as HF names them. Hook point: `hook_mlp_out` (b, l, d).

    A call may add low-rank adapters to the projections (`lora=`, Zamba2's per-layer LoRA on its shared block's
    gate_up). `params_from=` builds an MLP that runs another one's projections (the same parameter objects).
    """

    HOOKS = ("hook_mlp_out",)

    def __init__(self, config: MLPConfig, *, layer_idx: int = 0, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto", params_from: "MLP | None" = None):
        del layer_idx, kernel_impl
        c = config
        self.config = config
        self.act = activation(c.activation)
        self.mesh_rules: MeshRules | None = None
        if params_from is not None:
            if params_from.config != config:
                raise ValueError("params_from must be an MLP of the same MLPConfig")
            self.gate_proj, self.up_proj = params_from.gate_proj, params_from.up_proj
            self.down_proj = params_from.down_proj
            return
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        std = c.initializer_range
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, c.bias, ("embed", "mlp"), std, **kw) \
            if c.gated else None
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, c.bias, ("embed", "mlp"), std, **kw)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, c.bias, ("mlp", "embed"), std, **kw)

    def __call__(self, hidden: jax.Array, lora=None) -> jax.Array:
        """hidden (..., d) -> (..., d). lora: {"gate" | "up": (down (d, r), up (r, f))}, low-rank adapters added
        to those projections' outputs for this call."""
        c = self.config
        rules = self.mesh_rules
        lora = {} if lora is None else lora
        unknown = set(lora) - ({"gate", "up"} if self.gate_proj is not None else {"up"})
        if unknown:
            raise ValueError(f"lora adapts this MLP's projections 'up' (and 'gate' when gated); got {sorted(unknown)}")

        def project(proj, name):
            out = proj(hidden)
            if name in lora:
                out = out + low_rank_delta(hidden, *lora[name], out.dtype)
            return out

        up = project(self.up_proj, "up")
        up = constrain(up, rules, "batch", None, "mlp") if hidden.ndim == 3 else up
        if self.gate_proj is None:
            inner = self.act(up)
        else:
            gate = project(self.gate_proj, "gate")
            if c.gate_multiplier != 1.0:
                gate = gate * jnp.asarray(c.gate_multiplier, gate.dtype)
            inner = self.act(gate) * up
        out = self.down_proj(inner)
        if c.down_multiplier != 1.0:
            out = out * jnp.asarray(c.down_multiplier, out.dtype)
        sow_hook(self, "hook_mlp_out", out)
        return out


def route(logits: jax.Array, config: MoEConfig, correction_bias: jax.Array | None = None):
    """Router logits (t, E) float32 -> (weights (t, k) float32, experts (t, k) int32), as the family's HF router
    computes them (`easymamba.config.parts.ROUTERS`)."""
    c = config
    k = c.top_k
    if c.router == "softmax_topk":
        top, idx = jax.lax.top_k(logits, k)
        return jax.nn.softmax(top, axis=-1), idx
    if c.router == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        weights, idx = jax.lax.top_k(probs, k)
        if c.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights, idx
    # sigmoid_grouped: choose groups by the sum of their two best corrected scores, then experts within them;
    # the weights are the uncorrected scores of the chosen experts.
    scores = jax.nn.sigmoid(logits)                                                   # (t, E)
    choice = scores if correction_bias is None else scores + correction_bias.astype(jnp.float32)
    t, e = choice.shape
    if c.n_group > 1 and c.topk_group < c.n_group:
        grouped = choice.reshape(t, c.n_group, e // c.n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, e // c.n_group))[0], axis=-1)   # (t, G)
        _, groups = jax.lax.top_k(group_scores, c.topk_group)
        keep = jnp.zeros((t, c.n_group), bool).at[jnp.arange(t)[:, None], groups].set(True)
        choice = jnp.where(jnp.repeat(keep, e // c.n_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if c.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * c.routed_scaling_factor, idx


class MoE(_Stateless, nnx.Module):
    """Routed experts plus an optional shared MLP (see the module docstring).

    Parameters: `gate` (the router, kernel (d, E) float32, plus `e_score_correction_bias` (E,) for the
    sigmoid router), `experts.up_proj` (E, in, f), `experts.gate_proj` (E, in, f) when gated,
    `experts.down_proj` (E, f, in), `shared_experts` (an `MLP`) when configured, `fc1_latent_proj` /
    `fc2_latent_proj` with a latent width. Hook points: `hook_router_logits` (b, l, E) float32, `hook_moe_out`.
    """

    HOOKS = ("hook_router_logits", "hook_moe_out")

    def __init__(self, config: MoEConfig, *, layer_idx: int = 0, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto"):
        del layer_idx, kernel_impl
        c = config
        self.config = config
        self.dtype = dtype
        std = c.initializer_range
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The router stays float32 whatever the model dtype (HF keeps it so: `_keep_in_fp32_modules`).
        self.gate = _linear(c.hidden_size, c.num_experts, False, ("embed", None), std, dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=rngs)
        self.e_score_correction_bias = (nnx.Param(jnp.zeros((c.num_experts,), jnp.float32), axes=(None,))
                                        if c.router == "sigmoid_grouped" else None)
        if c.latent_size is not None:
            self.fc1_latent_proj = _linear(c.hidden_size, c.latent_size, c.bias, ("embed", None), std, **kw)
            self.fc2_latent_proj = _linear(c.latent_size, c.hidden_size, c.bias, (None, "embed"), std, **kw)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self.experts = Experts(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.shared_experts = None if c.shared is None else MLP(c.shared, rngs=rngs, dtype=dtype,
                                                                 param_dtype=param_dtype)
        self.mesh_rules: MeshRules | None = None

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden (b, l, d) -> (b, l, d)."""
        c = self.config
        b, l, d = hidden.shape
        flat = hidden.reshape(b * l, d)
        logits = self.gate(flat.astype(jnp.float32))                                 # (t, E) float32
        sow_hook(self, "hook_router_logits", lambda: logits.reshape(b, l, c.num_experts))
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias[...]
        weights, idx = route(logits, c, bias)
        x = flat if self.fc1_latent_proj is None else self.fc1_latent_proj(flat)
        y = self.experts(x, weights.astype(x.dtype), idx)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        out = y.reshape(b, l, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        sow_hook(self, "hook_moe_out", out)
        return out


class Experts(nnx.Module):
    """E expert MLPs stored stacked, (E, in, f) and (E, f, in), run as grouped matmuls over the tokens routed
    to each."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = config
        self.config = config
        self.dtype = dtype
        e, n_in, f = c.num_experts, c.expert_in_size, c.expert_intermediate_size
        std = c.initializer_range

        def param(shape, axes):
            return nnx.Param(normal_init(rngs.params(), shape, std, param_dtype), axes=axes)

        self.gate_proj = param((e, n_in, f), ("experts", None, None)) if c.gated else None
        self.up_proj = param((e, n_in, f), ("experts", None, None))
        self.down_proj = param((e, f, n_in), ("experts", None, None))
        self.act = activation(c.activation)

    def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """x (t, in), weights (t, k), experts (t, k) int -> sum_j weights[:, j] * expert_{experts[:, j]}(x)."""
        t, n_in = x.shape
        k = experts.shape[1]
        e = self.config.num_experts
        flat_expert = experts.reshape(-1)                                            # (t k,)
        order = jnp.argsort(flat_expert, stable=True)
        token = order // k                                                           # the token of each sorted row
        sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)                # (E,)
        rows = x[token].astype(self.dtype)                                           # (t k, in), sorted by expert

        def grouped(lhs, w):
            return jax.lax.ragged_dot(lhs, w[...].astype(self.dtype), sizes)

        up = grouped(rows, self.up_proj)
        inner = self.act(grouped(rows, self.gate_proj)) * up if self.gate_proj is not None else self.act(up)
        out = grouped(inner, self.down_proj)                                         # (t k, in)
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        return jnp.zeros((t, n_in), out.dtype).at[token].add(out)
