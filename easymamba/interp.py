"""Interpretability: activations by hook name, and the effective attention matrices of Mamba-2 and Mamba-1.

    logits, acts = run_with_cache(model, input_ids, names=None)      # acts["layers.3.mixer.hook_conv"], ...
    M = compute_effective_attention(model, input_ids | acts, layer=3)  # (b, h, l, l) Mamba-2, (b, e, l, l) Mamba-1

Hook names (letters as in `easymamba.typing`; `i` a layer index; r is Mamba-1's `time_step_rank`). Both families:

    hook_embed                      (b, l, d)           embeddings entering layer 0
    layers.i.hook_resid_post        (b, l, d)           block output (the residual stream after layer i)
    layers.i.mixer.hook_out_proj    (b, l, d)           mixer output

Mamba-2 (`Mamba2Mixer`, easymamba/models/mamba2_mixer.py):

    layers.i.mixer.hook_in_proj     (b, l, 2e+2gn+h)    in_proj output [z | xBC | dt]
    layers.i.mixer.hook_conv        (b, l, c)           conv + SiLU output [x | B | C], padding masked
    layers.i.mixer.hook_dt          (b, l, h)           clip(softplus(dt + dt_bias), *time_step_limit)
    layers.i.mixer.hook_ssm_out     (b, l, h, p)        SSD output incl. the D skip, before the gated norm
    layers.i.mixer.hook_inner_norm  (b, l, e)           gated RMS norm output

Mamba-1 (`MambaMixer`, easymamba/models/mamba1_mixer.py):

    layers.i.mixer.hook_in_proj     (b, l, 2e)          in_proj output [x | z]
    layers.i.mixer.hook_conv        (b, l, e)           conv + SiLU output x, padding masked
    layers.i.mixer.hook_x_proj      (b, l, r+2n)        x_proj output [dt_low_rank | B | C]
    layers.i.mixer.hook_dt          (b, l, e)           softplus(dt_proj(dt_low_rank)) (weight and bias)
    layers.i.mixer.hook_ssm_out     (b, l, e)           selective-scan output incl. the D skip, before the gate
    layers.i.mixer.hook_gated       (b, l, e)           hook_ssm_out * silu(z), the input of out_proj

Falcon-Mamba (`FalconMambaMixer`, easymamba/models/falcon_mamba.py): Mamba-1's hooks; hook_x_proj is x_proj's
output before the weightless norms of dt, B and C, hook_dt the step size after them, and the effective
attention normalises B and C from hook_x_proj as the mixer does.

The hook points are `sow_hook` calls in the modules (`easymamba/models/`); each is a no-op unless
`run_with_cache` asked for that name, so a plain forward traces to the same program as one without hooks, and
an unrequested activation is never stored.

Effective attention: the SSM is a linear map from its input x to its output y, y_i = sum_j M[i, j] x_j + D x_i
(the sequence run from a zero state: no cache), one (l, l) lower-triangular matrix per decay channel.

Mamba-2 (paper "Transformers are SSMs", section 4: the SSD as a masked matrix), per head, with a_k = dt_k A
(A = -exp(A_log) < 0, one per head) and B/C of head `h` taken from group `h // (h_total / g)`; x is the conv
output's x part, (b, l, h, p):

    M[i, j] = (C_i . B_j) exp(a_{j+1} + ... + a_i)     for j <= i, 0 above the diagonal

Mamba-1 (paper "Mamba", Algorithm 2: S6 unrolled), per inner channel c, whose decay A[c, :] has one rate per
state n (B, C shared by all channels; x = hook_conv, (b, l, e)):

    M[c, i, j] = sum_n C_i[n] B_j[n] exp(dt_{j+1}[c] A[c, n] + ... + dt_i[c] A[c, n])     for j <= i

Because the exponent depends on n, the Mamba-1 matrix does not factor into (C B^T) times one decay matrix; it
is built from a (b, channels, n, l, l) intermediate, a block of channels at a time. With `include_dt_scaling=True`
column j is multiplied by dt_j (of that head or channel), so y_i = sum_j M[i, j] x_j + D x_i exactly; without it,
y_i = sum_j M[i, j] dt_j x_j + D x_i. The exponents are stable segment sums (`kernels.segsum`), never a ratio or
product of exponentials.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easymamba.kernels import segsum
from easymamba.layers import check_token_ids
from easymamba.models import ModelFamily
from easymamba.models.common import HookValue, check_attention_mask
from easymamba.models.family import EffectiveAttention, Operands

__all__ = ["run_with_cache", "compute_effective_attention", "hook_names", "DEFAULT_MAX_ELEMENTS"]

# 2**28 float32 elements = 1 GiB: the limit on the returned matrices, and on Mamba-1's per-block intermediate.
# The computation's peak is a few times that (segsum's masked copy and its cumsum have the intermediate's shape).
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
        attention_mask = check_attention_mask(attention_mask, *input_ids.shape)
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


def _family(backbone) -> EffectiveAttention:
    """What the effective attention reads from this model's SSM mixers: its family record's answer (the one place
    where the family matters; everything after `operands` is the same math for every family)."""
    family = getattr(backbone, "family", None)
    if not isinstance(family, ModelFamily):
        raise TypeError(f"effective attention reads a family's model; {type(backbone).__name__} has no family record")
    return family.effective_attention


def _ssm_mixer(layer, mixer_class) -> tuple[str, object] | None:
    """(attribute name, module) of the layer's SSM mixer (`mixer` in Mamba-2, Mamba-1 and Nemotron-H blocks,
    `mamba` in Bamba's), or None for a layer without one (attention, MLP, MoE)."""
    for name, value in vars(layer).items():
        if isinstance(value, mixer_class):
            return name, value
    return None


def _ssm_layers(backbone, mixer_class) -> list[tuple[str, object]]:
    """Per layer, the `_ssm_mixer` entry, or None (a list as long as the layers)."""
    return [_ssm_mixer(layer, mixer_class) for layer in backbone.layers]


def _effective_attention(op: Operands, channels: jax.Array, *, include_dt_scaling: bool,
                         block: int | None) -> jax.Array:
    """One layer's matrices for the decay channels `channels` (s,) int: M (b, s, l, l), zero above the diagonal.

    A (h,) (Mamba-2): M = (C B^T) * exp(segsum(dt A)), one (l, l) segment sum per head. A (h, n) (Mamba-1): the
    decay differs per state, so M = sum_n (C_i[n] B_j[n]) exp(segsum(dt A[:, n])), through a (b, block, n, l, l)
    intermediate, `block` channels at a time (`lax.map`), which bounds the memory.
    """
    b, l, h = op.dt.shape
    group = channels // (h // op.B.shape[2])                        # (s,) the B/C group each channel reads
    dt = jnp.moveaxis(op.dt, 2, 1)[:, channels]                     # (b, s, l)
    A = op.A[channels]                                              # (s,) or (s, n)
    if A.ndim == 1:
        decay = jnp.exp(segsum(dt * A[:, None]))                    # (b, s, l, l): 0 above the diagonal
        CB = jnp.einsum("blgn,bsgn->bgls", op.C, op.B)              # (b, g, l, l)
        M = CB[:, group] * decay                                    # (b, s, l, l)
        return M * dt[:, :, None, :] if include_dt_scaling else M   # column j times dt_j

    def one_channel(args):
        dt_c, A_c, g_c = args                                       # (b, l), (n,), ()
        decay = jnp.exp(segsum(dt_c[:, None, :] * A_c[:, None]))    # (b, n, l, l): 0 above the diagonal
        M = jnp.einsum("bln,bjn,bnlj->blj", op.C[:, :, g_c], op.B[:, :, g_c], decay)  # (b, l, l)
        return M * dt_c[:, None, :] if include_dt_scaling else M

    M = jax.lax.map(one_channel, (jnp.moveaxis(dt, 1, 0), A, group), batch_size=block)  # (s, b, l, l)
    return jnp.moveaxis(M, 0, 1)                                    # (b, s, l, l)


@partial(jax.jit, static_argnames=("operands", "config", "include_dt_scaling", "block"))
def _effective_attention_layers(hooks, A, channels, *, operands, config, include_dt_scaling, block):
    """Stacked layers: each of `hooks` (z, ...), A (z, h[, n]) -> (z, b, s, l, l), one layer at a time so the
    temporaries stay one layer's (or one channel block's) size."""
    def one_layer(args):
        *hook_values, A_layer = args
        return _effective_attention(operands(config, *hook_values, A_layer), channels,
                                    include_dt_scaling=include_dt_scaling, block=block)

    return jax.lax.map(one_layer, (*hooks, A))


def _num_elements(shape) -> int:
    elements = 1
    for s in shape:
        elements *= int(s)
    return elements


def _check_size(shape: tuple[int, ...], max_elements: int | None) -> None:
    elements = _num_elements(shape)
    if max_elements is not None and elements > max_elements:
        raise ValueError(
            f"effective attention of shape {shape} has {elements:,} elements ({elements * 4 / 2**30:.2f} GiB in "
            f"float32), over the limit max_elements={max_elements:,} ({max_elements * 4 / 2**30:.2f} GiB); pass "
            f"a larger max_elements (or None) to compute it anyway, or use fewer tokens, rows, layers or channels")


def _channel_block(b: int, n: int, l: int, num: int, max_elements: int | None) -> int:
    """Channels per block of a per-state decay, so that the (b, block, n, l, l) intermediate stays within
    `max_elements` (DEFAULT_MAX_ELEMENTS when None); blocks of near-equal size."""
    per_channel = _num_elements((b, n, l, l))
    if max_elements is not None and per_channel > max_elements:
        raise ValueError(
            f"Mamba-1 effective attention builds a (b, channels, n, l, l) intermediate; one channel alone is "
            f"{(b, n, l, l)} = {per_channel:,} elements, over the limit max_elements={max_elements:,}; pass a "
            f"larger max_elements (or None), or use fewer tokens or rows")
    most = max(1, (DEFAULT_MAX_ELEMENTS if max_elements is None else max_elements) // per_channel)
    blocks = -(-num // most)
    return -(-num // blocks)


def _check_channels(channels, count: int, axis: str) -> np.ndarray:
    """`channels` (indices into M's channel axis, negative from the end) -> (s,) int32 in [0, count)."""
    if isinstance(channels, (int, np.integer, str, bytes)) or not isinstance(channels, (Sequence, np.ndarray,
                                                                                         jax.Array, range)):
        raise ValueError(f"channels must be a sequence of indices into the {count} {axis} (e.g. [0, 7] or "
                         f"range(16)), got {channels!r}")
    try:
        index = np.asarray(channels)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise ValueError("channels must be concrete indices (a list, range or NumPy array), not a traced value; "
                         "they set the result's shape") from err
    if index.ndim != 1 or index.size == 0 or not (np.issubdtype(index.dtype, np.integer)):
        raise ValueError(f"channels must be a non-empty 1-D sequence of ints indexing the {count} {axis}, got "
                         f"shape {index.shape} of dtype {index.dtype}")
    bad = index[(index < -count) | (index >= count)]
    if bad.size:
        raise ValueError(f"channel index(es) {bad[:4].tolist()} out of range: this model's layers have {count} "
                         f"{axis}, so indices must lie in [-{count}, {count})")
    return (index % count).astype(np.int32)


def compute_effective_attention(model, inputs, *, layer: int | None = None, include_dt_scaling: bool = False,
                                channels: Sequence[int] | None = None, attention_mask=None,
                                max_elements: int | None = DEFAULT_MAX_ELEMENTS) -> jax.Array:
    """The SSM's effective attention matrices M (module docstring), float32, zero above the diagonal:
    Mamba-2 (b, h, l, l) per head, Mamba-1 (b, e, l, l) per inner channel; (z, b, ., l, l) with `layer=None`, z
    the model's SSM layers (every layer of a pure SSM model; a hybrid's attention, MLP and MoE layers have none).

    `inputs`: token ids (b, l) — the forward is run here, recording only the hooks needed (Mamba-2 `hook_conv`
    and `hook_dt`, Mamba-1 `hook_x_proj` and `hook_dt`) of the layers needed (`attention_mask` applies) — or the
    `acts` of `run_with_cache` holding those hooks.
    `include_dt_scaling`: multiply column j by dt_j, so y_i = sum_j M[i, j] x_j + D x_i reproduces
    `hook_ssm_out`. `channels`: indices of the heads (Mamba-2) or inner channels (Mamba-1) to compute, in that
    order (default all); the channel axis then has len(channels) entries.
    `max_elements`: refuse results with more elements than this (default 2**28, 1 GiB in float32) unless
    raised, or None for no limit; Mamba-1's (b, channels, n, l, l) intermediate is built in blocks of channels
    that each stay within it too. The computation needs a few times the larger of the two.
    Vectorised over positions; jit-able. TransformerLens's Mamba-2 `compute_effective_attention` computes the
    Mamba-2 matrices.
    """
    backbone = _backbone(model)
    cfg = model.config
    family = _family(backbone)
    n_layers = len(backbone.layers)
    ssm = _ssm_layers(backbone, family.mixer)
    if layer is not None:
        if not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"layer must be an int in [-{n_layers}, {n_layers}) or None, got {layer!r}")
        layer %= n_layers
        if ssm[layer] is None:
            kinds = [i for i, entry in enumerate(ssm) if entry is not None]
            raise ValueError(f"layer {layer} ({type(backbone.layers[layer]).__name__}) has no SSM mixer; the "
                             f"effective attention is defined for the SSM layers {kinds}")
    layers = [i for i, entry in enumerate(ssm) if entry is not None] if layer is None else [layer]
    num = family.num_channels(cfg)
    index = np.arange(num, dtype=np.int32) if channels is None else _check_channels(channels, num,
                                                                                    family.channel_axis)
    wanted = [f"layers.{i}.{ssm[i][0]}.{hook}" for i in layers for hook in family.hooks]
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
    out_shape = (b, index.size, l, l) if layer is not None else (len(layers), b, index.size, l, l)
    _check_size(out_shape, max_elements)
    A = jnp.stack([-jnp.exp(ssm[i][1].A_log[...].astype(jnp.float32)) for i in layers])  # (z, h[, n])
    block = None if A.ndim == 2 else _channel_block(b, A.shape[-1], l, index.size, max_elements)
    if not isinstance(inputs, Mapping):
        _, acts = run_with_cache(model, inputs, names=wanted, attention_mask=attention_mask)

    hooks = tuple(jnp.stack([acts[f"layers.{i}.{ssm[i][0]}.{hook}"] for i in layers]) for hook in family.hooks)
    M = _effective_attention_layers(hooks, A, jnp.asarray(index), operands=family.operands, config=cfg,
                                    include_dt_scaling=bool(include_dt_scaling), block=block)  # (z, b, s, l, l)
    return M[0] if layer is not None else M
