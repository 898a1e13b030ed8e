"""Shared test helpers: random Hugging Face reference models and our converted copies.

HF initialises norms and D to 1 and biases to 0; a parity test on such weights would not notice a
missing bias or a swapped norm weight, so `randomize_` redraws every parameter at a realistic scale.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import easymamba as em


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error every numeric test reports. A non-finite `a` (the result under
    test) fails here with that said, rather than as a NaN that compares false against the tolerance."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "the result under test has non-finite values"
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tiny_hf_config(**overrides) -> transformers.Mamba2Config:
    kwargs = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=16,
                  n_groups=1, expand=2, conv_kernel=4, chunk_size=8, use_bias=False, use_conv_bias=True,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return transformers.Mamba2Config(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("A_log"):
            p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=gen)))        # A ~ -U(1, 16)
        elif name.endswith("dt_bias"):
            p.copy_(math.log(math.expm1(0.05)) + 0.5 * noise)                       # softplus ~ 0.05
        elif name.endswith(".D") or "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif "conv1d" in name:
            p.copy_(0.4 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


def random_hf_model(seed: int = 0, **overrides) -> transformers.Mamba2ForCausalLM:
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(tiny_hf_config(**overrides)).eval()
    return randomize_(model, seed + 1)


def to_easymamba(hf_model, **kwargs) -> em.Mamba2ForCausalLM:
    config = em.Mamba2Config.from_hf(hf_model.config.to_dict())
    model = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0), **kwargs)
    em.load_state_dict(model, hf_model.state_dict())
    return model


@torch.no_grad()
def hf_logits(hf_model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    kwargs = {} if attention_mask is None else {"attention_mask": torch.from_numpy(np.asarray(attention_mask))}
    out = hf_model(torch.from_numpy(np.array(ids)).long(), use_cache=False, **kwargs)
    return out.logits.float().numpy()


def random_ids(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    return rng.integers(3, vocab, size=(batch, length), dtype=np.int32)


def jitted(model):
    """A jitted `model(ids, attention_mask=..., cache=...)` that retraces only on new shapes (tests run faster
    than eager op-by-op dispatch); returns the output pytree."""
    import jax

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, attention_mask, cache):
        return nnx.merge(graphdef, state)(ids, attention_mask=attention_mask, cache=cache)

    return lambda ids, attention_mask=None, cache=None: run(state, ids, attention_mask, cache)


def _forward(model, input_ids, **kwargs):
    return model(input_ids, **kwargs)


_jitted_forward = nnx.jit(_forward, static_argnames=("output_hidden_states",))


def fwd(model, input_ids, **kwargs):
    """`model(input_ids, **kwargs)` as one jitted call. Run eagerly, a model compiles each op for each new shape
    (about 10 s for a tiny six-layer hybrid on CPU); one jit of the whole forward takes about 2 s, so the tests
    that run many shapes call this. The numbers are the same computation's."""
    return _jitted_forward(model, input_ids, **kwargs)


def check_cache_json_round_trip(model, ids) -> None:
    """A bfloat16 hybrid cache filled by `ids` (b, l), written to JSON and read back, continues bit-identically:
    the next step's logits and every leaf of the cache it returns are equal to those of the original."""
    cache = model.init_cache(ids.shape[0], max_length=ids.shape[1] + 2, dtype=jnp.bfloat16)
    cache = fwd(model, jnp.asarray(ids), cache=cache).cache
    again = em.HybridCache.from_json(cache.to_json())
    a, ca = model.step(jnp.asarray(ids[:, 0]), cache)
    b, cb = model.step(jnp.asarray(ids[:, 0]), again)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
