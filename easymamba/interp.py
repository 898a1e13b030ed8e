"""Interpretability: activations by hook name, and Mamba-2's effective attention matrices.

    logits, acts = run_with_cache(model, input_ids, names=None)      # acts["layers.3.mixer.hook_conv"], ...
    M = compute_effective_attention(model, input_ids | acts, layer=3)  # (b, h, l, l)

Hook names (letters as in `easymamba.typing`; `i` a layer index):

    hook_embed                      (b, l, d)           embeddings entering layer 0
    layers.i.mixer.hook_in_proj     (b, l, 2e+2gn+h)    in_proj output [z | xBC | dt]
    layers.i.mixer.hook_conv        (b, l, c)           conv + SiLU output [x | B | C], padding masked
    layers.i.mixer.hook_dt          (b, l, h)           clip(softplus(dt + dt_bias), *time_step_limit)
    layers.i.mixer.hook_ssm_out     (b, l, h, p)        SSD output incl. the D skip, before the gated norm
    layers.i.mixer.hook_inner_norm  (b, l, e)           gated RMS norm output
    layers.i.mixer.hook_out_proj    (b, l, d)           mixer output
    layers.i.hook_resid_post        (b, l, d)           block output (the residual stream after layer i)

The hook points are `sow_hook` calls in the modules (`easymamba/mixer.py`, `easymamba/model.py`); each is a
no-op unless `run_with_cache` asked for that name, so a plain forward traces to the same program as one
without hooks, and an unrequested activation is never stored.

Effective attention (Mamba-2 paper, "Transformers are SSMs", section 4: the SSD as a masked matrix). Per head,
with a_k = dt_k A (A = -exp(A_log) < 0) and B/C of head `h` taken from group `h // (h_total / g)`:

    M[i, j] = (C_i . B_j) exp(a_{j+1} + ... + a_i)     for j <= i, 0 above the diagonal
    y_i     = sum_j M[i, j] dt_j x_j + D x_i           (x: the conv output's x part, (b, l, h, p))

With `include_dt_scaling=True` column j is multiplied by dt_j, so y_i = sum_j M[i, j] x_j + D x_i exactly
(the sequence run from a zero state: no cache). The exponent is a stable segment sum (`kernels.segsum`), never
a ratio or product of exponentials.
"""

from collections.abc import Callable, Iterable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from easymamba.kernels import segsum
from easymamba.layers import check_token_ids
from easymamba.mixer import HookValue
from easymamba.model import _check_attention_mask

__all__ = ["run_with_cache", "compute_effective_attention", "hook_names", "DEFAULT_MAX_ELEMENTS"]

# 2**28 float32 elements = 1 GiB for the returned matrices; the computation's peak is a few times that
# (segsum's masked copy and its cumsum are (b, h, l, l) too, per layer).
DEFAULT_MAX_ELEMENTS = 2**28


# --------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------


def _backbone(model):
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "layers"):
        raise TypeError(f"expected a causal LM with a .backbone holding .layers (e.g. Mamba2ForCausalLM), got "
                        f"{type(model).__name__}")
    return backbone


def _hooked_modules(backbone) -> list[tuple[str, nnx.Module]]:
    """(name prefix, module) for every module with hook points, in forward order: the backbone's own hooks
    first, then per layer the mixer's before the block's (the block output comes after its mixer)."""
    found = [(path, m) for path, m in nnx.iter_modules(backbone) if getattr(type(m), "HOOKS", ())]

    def forward_order(item):
        path = item[0]
        return path[:2], -len(path)                                   # ("layers", i), deeper (mixer) first

    return [("".join(f"{part}." for part in path), m) for path, m in sorted(found, key=forward_order)]


def hook_names(model) -> list[str]:
    """Every hook name `model` offers, in forward order (`hook_embed`, `layers.0.mixer.hook_in_proj`, ...)."""
    return [prefix + hook for prefix, m in _hooked_modules(_backbone(model)) for hook in type(m).HOOKS]


def _select(available: list[str], names) -> list[str]:
    if names is None:
        return list(available)
    if callable(names):
        return [n for n in available if names(n)]
    if isinstance(names, str):
        names = [names]
    names, known = list(names), set(available)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown hook name(s) {unknown[:4]}; this model has {len(available)} hooks, e.g. "
                         f"{available[:3] + available[-2:]} (see easymamba.interp.hook_names(model))")
    wanted = set(names)
    return [n for n in available if n in wanted]


def run_with_cache(model, input_ids, *, names: Iterable[str] | Callable[[str], bool] | None = None,
                   attention_mask=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run the forward and return (logits (b, l, v) float32, acts {hook name: activation}).

    `names`: None for every hook, a list of names, or a predicate `name -> bool`; only the selected hook points
    record anything (the others are not computed for storage at all). `acts` is in forward order.
    `attention_mask` (b, l) of 0/1, left padding, as for the model. The forward is jitted (compiled once per
    model structure, selection and shapes) and may itself be called under `jax.jit` / `nnx.jit`. The cache is
    not used: every activation belongs to one forward over `input_ids` from a zero state.
    TransformerLens's `run_with_cache` is the model for the interface.
    """
    _backbone(model)
    available = hook_names(model)
    selected = tuple(_select(available, names))
    check_token_ids(input_ids, model.config.vocab_size)             # eagerly, while the ids are readable
    if attention_mask is not None and getattr(input_ids, "ndim", None) == 2:
        attention_mask = _check_attention_mask(attention_mask, *input_ids.shape)
    graphdef, state = nnx.split(model)
    logits, acts = _run_hooked(graphdef, state, input_ids, attention_mask, selected=selected)
    return logits, {name: acts[name] for name in selected}      # jit hands dicts back key-sorted


@partial(jax.jit, static_argnames=("graphdef", "selected"))
def _run_hooked(graphdef, state, input_ids, attention_mask, *, selected: tuple[str, ...]):
    # Hooks are requested by marking modules, on a copy merged here (the same parameter arrays): the caller's
    # model is never mutated.
    model = nnx.merge(graphdef, state)
    for prefix, m in _hooked_modules(model.backbone):
        local = frozenset(hook for hook in type(m).HOOKS if prefix + hook in selected)
        if local:
            m.__hooks__ = local                                     # read by sow_hook
    out, captured = nnx.capture(model, HookValue)(input_ids, attention_mask=attention_mask)
    acts = {}
    for path, var in nnx.to_flat_state(captured):
        path = path[1:] if path[:1] == ("backbone",) else path
        acts[".".join(str(part) for part in path)] = var.get_value()
    return out.logits, acts


# --------------------------------------------------------------------------------------------------------------
# Effective attention
# --------------------------------------------------------------------------------------------------------------


def _effective_attention(xbc, dt, A, *, e: int, g: int, n: int, include_dt_scaling: bool) -> jax.Array:
    """One layer: xbc (b, l, c) the conv output, dt (b, l, h) the processed step size, A (h,) -> M (b, h, l, l)."""
    b, l, _ = xbc.shape
    h = dt.shape[-1]
    dtype = jnp.promote_types(xbc.dtype, jnp.float32)
    B = xbc[..., e:e + g * n].astype(dtype).reshape(b, l, g, n)     # (b, l, g, n)
    C = xbc[..., e + g * n:].astype(dtype).reshape(b, l, g, n)      # (b, l, g, n)
    dt = jnp.moveaxis(dt.astype(dtype), 1, 2)                       # (b, h, l)
    decay = jnp.exp(segsum(dt * A.astype(dtype)[:, None]))          # (b, h, l, s): 0 above the diagonal
    CB = jnp.einsum("blgn,bsgn->bgls", C, B)                        # (b, g, l, s)
    M = CB[:, :, None] * decay.reshape(b, g, h // g, l, l)          # (b, g, r, l, s): head h reads group h // r
    M = M.reshape(b, h, l, l)                                       # (b, h, l, s)
    if include_dt_scaling:
        M = M * dt[:, :, None, :]                                   # column s times dt_s
    return M


@partial(jax.jit, static_argnames=("e", "g", "n", "include_dt_scaling"))
def _effective_attention_layers(xbc, dt, A, *, e, g, n, include_dt_scaling):
    """Stacked layers: xbc (z, b, l, c), dt (z, b, l, h), A (z, h) -> (z, b, h, l, l), one layer at a time so
    the temporaries stay one layer's size."""
    return jax.lax.map(lambda args: _effective_attention(*args, e=e, g=g, n=n,
                                                         include_dt_scaling=include_dt_scaling), (xbc, dt, A))


def _check_size(shape: tuple[int, ...], max_elements: int | None) -> None:
    elements = 1
    for s in shape:
        elements *= int(s)
    if max_elements is not None and elements > max_elements:
        raise ValueError(
            f"effective attention of shape {shape} has {elements:,} elements ({elements * 4 / 2**30:.2f} GiB in "
            f"float32), over the limit max_elements={max_elements:,} ({max_elements * 4 / 2**30:.2f} GiB); pass "
            f"a larger max_elements (or None) to compute it anyway, or use fewer tokens, rows or layers")


def compute_effective_attention(model, inputs, *, layer: int | None = None, include_dt_scaling: bool = False,
                                attention_mask=None, max_elements: int | None = DEFAULT_MAX_ELEMENTS
                                ) -> jax.Array:
    """The SSD's effective attention matrices M (module docstring): (b, h, l, l) for one layer, (n_layers, b, h,
    l, l) with `layer=None`; float32, zero above the diagonal.

    `inputs`: token ids (b, l) — the forward is run here, recording only `hook_conv` and `hook_dt` of the
    layers needed (`attention_mask` applies) — or the `acts` of `run_with_cache` holding those hooks.
    `include_dt_scaling`: multiply column j by dt_j, so y_i = sum_j M[i, j] x_j + D x_i reproduces
    `hook_ssm_out`. `max_elements`: refuse results with more elements than this (default 2**28, 1 GiB in
    float32; the computation needs a few times that) unless raised, or None for no limit.
    Vectorised over positions (one segment sum per head); jit-able. TransformerLens's Mamba-2
    `compute_effective_attention` computes the same matrices.
    """
    # TODO(mamba1): the per-channel (b, e, l, l) form for MambaForCausalLM, once easymamba.mamba1 lands.
    backbone = _backbone(model)
    cfg = model.config
    n_layers = len(backbone.layers)
    if layer is not None:
        if not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"layer must be an int in [-{n_layers}, {n_layers}) or None, got {layer!r}")
        layer %= n_layers
    layers = list(range(n_layers)) if layer is None else [layer]
    wanted = [f"layers.{i}.mixer.{hook}" for i in layers for hook in ("hook_conv", "hook_dt")]

    if isinstance(inputs, Mapping):
        missing = [name for name in wanted if name not in inputs]
        if missing:
            raise ValueError(f"acts has no {missing[:4]}; record them with run_with_cache(model, ids, names=...) "
                             f"or pass the token ids instead")
        if attention_mask is not None:
            raise ValueError("attention_mask applies when token ids are given; acts already carry their mask")
        acts = inputs
        b, l = acts[wanted[0]].shape[:2]
    else:
        if getattr(inputs, "ndim", None) != 2:
            raise ValueError(f"inputs must be token ids (b, l) or the acts dict of run_with_cache, got "
                             f"{type(inputs).__name__} of shape {getattr(inputs, 'shape', None)}")
        b, l = inputs.shape
    out_shape = (b, cfg.num_heads, l, l) if layer is not None else (n_layers, b, cfg.num_heads, l, l)
    _check_size(out_shape, max_elements)
    if not isinstance(inputs, Mapping):
        _, acts = run_with_cache(model, inputs, names=wanted, attention_mask=attention_mask)

    xbc = jnp.stack([acts[f"layers.{i}.mixer.hook_conv"] for i in layers])           # (z, b, l, c)
    dt = jnp.stack([acts[f"layers.{i}.mixer.hook_dt"] for i in layers])              # (z, b, l, h)
    A = jnp.stack([-jnp.exp(backbone.layers[i].mixer.A_log[...].astype(jnp.float32)) for i in layers])  # (z, h)
    M = _effective_attention_layers(xbc, dt, A, e=cfg.intermediate_size, g=cfg.n_groups, n=cfg.state_size,
                                    include_dt_scaling=bool(include_dt_scaling))    # (z, b, h, l, l)
    return M[0] if layer is not None else M
