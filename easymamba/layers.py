"""Small parameter-holding layers shared by Mamba-2 and Mamba-1: token embedding, depthwise conv, init helpers.

Parameter names mirror Hugging Face's (`embeddings.weight`, `conv1d.weight`, `conv1d.bias`) so the
checkpoint key table in `easymamba.checkpoints` is a plain rename plus a reshape. `SplitLinear` and `SplitConv1d` keep
a tensor that HF packs (Mamba-2's `in_proj [z|x|B|C|dt]`, `conv1d [x|B|C]`) as one parameter per logical
part, so each part can be sharded on its own axis (docs/sharding.md); `easymamba.checkpoints` splits and re-packs them
at the checkpoint boundary.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint


def is_concrete(x) -> bool:
    """True when `x` holds values we can read now (not a tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Refuse ids outside [0, vocab_size) before any work is done.

    JAX gathers clamp out-of-range indices silently, so an id of 70000 in a 50k vocabulary would quietly
    read the last row. Checked eagerly whenever the ids are concrete; under `jit` the embedding instead
    returns NaN rows for bad ids (see `Embedding`), so the error still shows in the logits.
    """
    if not is_concrete(input_ids):
        return
    if isinstance(input_ids, jax.Array) and not input_ids.is_fully_addressable:
        # a global array under jax.distributed: each process checks the rows it holds
        for shard in input_ids.addressable_shards:
            offset = tuple(s.start or 0 for s in shard.index) if shard.index else ()
            _check_ids(np.asarray(shard.data), vocab_size, offset)
        return
    _check_ids(np.asarray(input_ids), vocab_size, ())


def _check_ids(ids: np.ndarray, vocab_size: int, offset: tuple) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        local = tuple(int(i) for i in np.argwhere(bad)[0])
        where = tuple(i + (offset[k] if k < len(offset) else 0) for k, i in enumerate(local))
        raise ValueError(
            f"token id {int(ids[local])} at position {where} is outside the vocabulary [0, {vocab_size}); "
            f"{int(bad.sum())} id(s) out of range"
        )


def low_rank_delta(x: jax.Array, down: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """A low-rank (LoRA) adapter's contribution `(x @ down) @ up`: x (..., in), down (in, r), up (r, out) ->
    (..., out) in `dtype` (the projection's compute dtype, to which the caller adds it)."""
    return (x.astype(dtype) @ down.astype(dtype)) @ up.astype(dtype)


def normal_init(key, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def normal_linear(n_in: int, n_out: int, *, bias: bool, axes: tuple, std: float, dtype, param_dtype,
                  rngs: nnx.Rngs) -> nnx.Linear:
    """`nnx.Linear` [n_in -> n_out] with an N(0, std^2) kernel (HF's `_init_weights`), zero bias, and the logical
    sharding axes `axes` of its kernel (the bias takes the output's)."""
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=lambda key, shape, dt: normal_init(key, shape, std, dt), rngs=rngs,
                      kernel_metadata={"axes": axes}, bias_metadata={"axes": axes[1:]})


def kaiming_uniform_init(key, shape, fan_in: int, dtype, scale: float = 1.0) -> jax.Array:
    """torch's default Linear/Conv init, `kaiming_uniform_(a=sqrt(5))`: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = scale / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class Embedding(nnx.Module):
    """Token embedding `[v, d]`, N(0, initializer_range^2) as HF initialises it."""

    def __init__(self, num_embeddings: int, features: int, *, init_std: float = 0.1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.weight = nnx.Param(normal_init(rngs.params(), (num_embeddings, features), init_std, param_dtype),
                                axes=("vocab", "embed"))

    def __call__(self, input_ids: jax.Array) -> jax.Array:  # (b, l) -> (b, l, d)
        check_token_ids(input_ids, self.num_embeddings)
        valid = (input_ids >= 0) & (input_ids < self.num_embeddings)
        rows = jnp.take(self.weight[...], jnp.where(valid, input_ids, 0), axis=0)
        rows = jnp.where(valid[..., None], rows, jnp.nan)  # poison bad ids under jit instead of clamping
        return rows.astype(self.dtype)

    def attend(self, hidden: jax.Array) -> jax.Array:  # (b, l, d) -> (b, l, v): the tied output head
        return hidden @ self.weight[...].astype(hidden.dtype).T


class DepthwiseConv1d(nnx.Module):
    """The causal depthwise conv's parameters: `weight [c, k]` (HF stores `[c, 1, k]`), `bias [c]`.

    The convolution itself lives in `easymamba.kernels` (reference, XLA and Pallas forms); this module only
    owns the parameters and HF's initialisation (torch's Conv1d default for the weight, zero bias).
    """

    def __init__(self, channels: int, kernel_size: int, *, use_bias: bool = True, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, axis: str | None = "heads"):
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nnx.Param(kaiming_uniform_init(rngs.params(), (channels, kernel_size), kernel_size,
                                                     param_dtype), axes=(axis, None))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), axes=(axis,)) if use_bias else None


class SplitLinear(nnx.Module):
    """One linear map whose output features are stored as named parts: `parts[name]` is an `nnx.Linear`
    `[in_features, size]` for each `(name, size)` of `sizes`, in order.

    `y = x @ [W_1 | W_2 | ...]` computed part by part, so a part can be sharded over a mesh axis that would not
    split the concatenation evenly (HF's `in_proj [z | x | B | C | dt]`: heads and groups have different
    sizes). The call returns the parts' outputs as a tuple in `sizes` order. Each part is initialised with
    its own key from `kernel_init(key, (in_features, size), dtype)`. `axes[name]` is the logical axis a part's
    output features shard over (`easymamba.sharding`); the input features are the residual stream, `embed`.
    """

    def __init__(self, in_features: int, sizes: dict[str, int], *, use_bias: bool, dtype, param_dtype,
                 kernel_init, rngs: nnx.Rngs, axes: dict[str, str | None] | None = None):
        if not sizes:
            raise ValueError("SplitLinear needs at least one part")
        axes = {} if axes is None else axes
        self.in_features = in_features
        self.part_names = tuple(sizes)
        for name, size in sizes.items():
            axis = axes.get(name)
            setattr(self, name, nnx.Linear(in_features, size, use_bias=use_bias, dtype=dtype,
                                           param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs,
                                           kernel_metadata={"axes": ("embed", axis)},
                                           bias_metadata={"axes": (axis,)}))

    @property
    def out_features(self) -> int:
        return sum(getattr(self, name).out_features for name in self.part_names)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:  # (..., in) -> each (..., size)
        return tuple(getattr(self, name)(x) for name in self.part_names)

    def packed(self, x: jax.Array) -> jax.Array:  # (..., in) -> (..., out_features)
        """`x @ [W_1 | W_2 | ...]` as ONE matmul over the concatenated parts (unsharded models: one GEMM instead of
        one per part)."""
        kernel, bias = self.packed_params()
        return linear(getattr(self, self.part_names[0]), x, kernel, bias)

    def packed_params(self) -> tuple[jax.Array, jax.Array | None]:
        """The parts' kernels `[in, out_features]` and biases (or None) concatenated in order."""
        parts = [getattr(self, name) for name in self.part_names]
        kernel = jnp.concatenate([part.kernel[...] for part in parts], axis=-1)
        bias = None if parts[0].bias is None else jnp.concatenate([part.bias[...] for part in parts], axis=-1)
        return kernel, bias


def few_row_kernel(kernel: jax.Array) -> jax.Array:
    """A `[k, n]` kernel laid out with k contiguous (k-minor), for a matmul of a few rows (a decode step).

    XLA computes a one-row dot as a multiply + reduce over k. Stored row-major ([k, n], n contiguous), as every
    parameter is, that reduce runs down the columns: 6.7 us for the 130M in_proj, and XLA writes out_proj's whole
    [e, d] product before reducing it (2.7 + 3.8 us). With k contiguous it runs along rows: 4.5 and 2.7 us
    (bf16, b1, H100; docs/benchmarks.md). Same values, a different physical layout: only XLA sees it. The
    relayout is a copy of the weight: make it once, before a decode loop (`Mamba2Mixer.decode_weights`), as a
    step jitted alone would pay it on every call.
    """
    return with_layout_constraint(kernel, Layout(major_to_minor=(1, 0)))


def linear(module: nnx.Linear, x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *,
           few_rows: bool = False) -> jax.Array:
    """`x @ kernel + bias` with `module`'s dtype promotion and precision (nnx.Linear's arithmetic);
    `few_rows=True` lays the kernel out with `few_row_kernel` first."""
    x, kernel, bias = module.promote_dtype((x, kernel, bias), dtype=module.dtype)
    if few_rows:
        kernel = few_row_kernel(kernel)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    return y if bias is None else y + bias


class SplitConv1d(nnx.Module):
    """A depthwise conv's parameters stored as named channel parts: a `DepthwiseConv1d` `[size, k]` per
    `(name, size)` of `sizes`. A depthwise conv acts on each channel alone, so running it part by part is
    the packed conv exactly; the parts can be sharded apart (HF's `conv1d [x | B | C]`), each over the logical
    axis `axes[name]` names."""

    def __init__(self, sizes: dict[str, int], kernel_size: int, *, use_bias: bool = True, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, axes: dict[str, str | None] | None = None):
        if not sizes:
            raise ValueError("SplitConv1d needs at least one part")
        axes = {} if axes is None else axes
        self.kernel_size = kernel_size
        self.part_names = tuple(sizes)
        for name, size in sizes.items():
            setattr(self, name, DepthwiseConv1d(size, kernel_size, use_bias=use_bias, param_dtype=param_dtype,
                                                rngs=rngs, axis=axes.get(name)))

    @property
    def channels(self) -> int:
        return sum(getattr(self, name).channels for name in self.part_names)

    def packed(self, dtype) -> tuple[jax.Array, jax.Array | None]:
        """The parts' weights `[c, k]` and biases `[c]` concatenated in order (HF's packed conv1d), in `dtype`."""
        convs = [getattr(self, name) for name in self.part_names]
        weight = jnp.concatenate([conv.weight[...] for conv in convs], axis=0).astype(dtype)
        if convs[0].bias is None:
            return weight, None
        return weight, jnp.concatenate([conv.bias[...] for conv in convs], axis=0).astype(dtype)
