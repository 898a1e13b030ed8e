"""Small parameter-holding layers shared by Mamba-2 and Mamba-1: token embedding, depthwise conv, init helpers.

Parameter names mirror Hugging Face's (`embeddings.weight`, `conv1d.weight`, `conv1d.bias`) so the
checkpoint key table in `easymamba.hf` is a plain rename plus a reshape.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
    ids = np.asarray(input_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"token id {int(ids[where])} at position {where} is outside the vocabulary [0, {vocab_size}); "
            f"{int(bad.sum())} id(s) out of range"
        )


def normal_init(key, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


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
        self.weight = nnx.Param(normal_init(rngs.params(), (num_embeddings, features), init_std, param_dtype))

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
                 rngs: nnx.Rngs):
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nnx.Param(kaiming_uniform_init(rngs.params(), (channels, kernel_size), kernel_size,
                                                     param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else None
