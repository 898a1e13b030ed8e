"""Logit processors and the next-token choice: pure `jnp` functions of `logits [b, v]`, safe under jit and vmap.

Each processor reproduces the transformers 5.25 class of the same name (`generation/logits_process.py`) and
masks with `-inf` where it does; `tests/test_sampling.py` checks each against it. `process_logits` applies
them in the order `GenerationMixin._get_logits_processor` builds its list:

    1. repetition penalty   (`RepetitionPenaltyLogitsProcessor`; greedy and sampling alike)
    2. temperature          (`TemperatureLogitsWarper`)   \
    3. top-k                (`TopKLogitsWarper`)           |  sampling only ("warpers"); each skipped at its
    4. top-p                (`TopPLogitsWarper`)           |  neutral value, as transformers skips it
    5. min-p                (`MinPLogitsWarper`)          /

Letters as in `easymamba.typing`: `b` batch, `l` sequence, `v` vocabulary.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

Scores = Float[Array, "b v"]
Seen = Bool[Array, "b v"]


def apply_temperature(logits: Scores, temperature) -> Scores:
    """`logits / temperature` (`TemperatureLogitsWarper`); temperature > 0."""
    return logits / jnp.asarray(temperature, logits.dtype)


def apply_top_k(logits: Scores, top_k: int) -> Scores:
    """Keep the `top_k` largest logits per row, `-inf` elsewhere (`TopKLogitsWarper`; ties with the k-th kept).

    `top_k` is a Python int (it fixes a shape); 0 turns the filter off, values above v keep everything.
    """
    if top_k <= 0:
        return logits
    k = min(int(top_k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]                            # (b, 1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def apply_top_p(logits: Scores, top_p, min_tokens_to_keep: int = 1) -> Scores:
    """Nucleus filter (`TopPLogitsWarper`): keep the most probable tokens whose probabilities reach `top_p`.

    As transformers: sort ascending, drop every token whose cumulative probability (from the least likely
    up) is <= 1 - top_p, never the `min_tokens_to_keep` most likely. The cut is applied as a threshold on
    the logit, so a token tied with the least likely kept one is kept too (transformers' choice among ties
    follows its unstable sort).
    """
    v = logits.shape[-1]
    ascending = jnp.sort(logits, axis=-1)                                  # (b, v)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = jnp.sum(cumulative <= 1 - jnp.asarray(top_p, cumulative.dtype), axis=-1)  # a prefix: (b,)
    first_kept = jnp.minimum(removed, v - min(int(min_tokens_to_keep), v))
    cutoff = jnp.take_along_axis(ascending, first_kept[:, None], axis=-1)  # (b, 1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def apply_min_p(logits: Scores, min_p, min_tokens_to_keep: int = 1) -> Scores:
    """Drop tokens less probable than `min_p` times the most probable one (`MinPLogitsWarper`)."""
    probs = jax.nn.softmax(logits, axis=-1)                                # (b, v)
    top = jnp.max(probs, axis=-1, keepdims=True)
    remove = probs < jnp.asarray(min_p, probs.dtype) * top
    k = min(int(min_tokens_to_keep), logits.shape[-1])
    kth = jax.lax.top_k(probs, k)[0][..., -1:]                             # the k most likely always stay
    return jnp.where(remove & (probs < kth), -jnp.inf, logits)


def apply_repetition_penalty(logits: Scores, seen: Seen, penalty) -> Scores:
    """CTRL's penalty (`RepetitionPenaltyLogitsProcessor`): each token seen so far, once, has a negative logit
    multiplied and a positive one divided by `penalty` (> 1 discourages repeats, < 1 encourages them)."""
    penalty = jnp.asarray(penalty, logits.dtype)
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def seen_tokens(input_ids: Int[Array, "b l"], vocab_size: int, attention_mask=None) -> Seen:
    """`[b, v]` True where row b holds the token, ignoring positions where `attention_mask` is 0.

    transformers (5.23 `generate`) skips left padding the same way, with `prompt_ignore_length` set to each
    row's count of leading pads.
    """
    b = input_ids.shape[0]
    ids = input_ids if attention_mask is None else jnp.where(attention_mask != 0, input_ids, vocab_size)
    seen = jnp.zeros((b, vocab_size + 1), jnp.bool_)                       # column v absorbs the pads
    return seen.at[jnp.arange(b)[:, None], ids].set(True)[:, :vocab_size]


def add_seen(seen: Seen, tokens: Int[Array, "b"]) -> Seen:
    """Mark `tokens [b]` as seen, one per row."""
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True)


@struct.dataclass
class SamplingParams:
    """What `process_logits` needs. The switches are static (part of the treedef, so a jitted caller retraces
    when they change); the values are array leaves, so new temperatures or top-p reuse the compiled code."""

    temperature: jax.Array                                                 # [] float32, > 0
    top_p: jax.Array                                                       # [] float32 in [0, 1]
    min_p: jax.Array                                                       # [] float32 in [0, 1]
    repetition_penalty: jax.Array                                          # [] float32, > 0
    do_sample: bool = struct.field(pytree_node=False, default=False)
    top_k: int = struct.field(pytree_node=False, default=0)
    use_top_p: bool = struct.field(pytree_node=False, default=False)
    use_min_p: bool = struct.field(pytree_node=False, default=False)
    use_repetition_penalty: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0, repetition_penalty: float = 1.0) -> "SamplingParams":
        """Switch off every processor at its neutral value, as transformers leaves it out of its list; the
        warpers are off when not sampling (their arguments are then ignored, so greedy calls share code)."""
        return cls(temperature=np.float32(temperature), top_p=np.float32(top_p), min_p=np.float32(min_p),
                   repetition_penalty=np.float32(repetition_penalty), do_sample=bool(do_sample),
                   top_k=int(top_k) if do_sample else 0, use_top_p=bool(do_sample and top_p < 1.0),
                   use_min_p=bool(do_sample and min_p > 0.0),
                   use_repetition_penalty=bool(repetition_penalty != 1.0))

    @classmethod
    def from_config(cls, config) -> "SamplingParams":
        """From anything with the fields (a `GenerationConfig`), or a `SamplingParams` as is."""
        if isinstance(config, SamplingParams):
            return config
        return cls.create(do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k,
                          top_p=config.top_p, min_p=config.min_p, repetition_penalty=config.repetition_penalty)


def process_logits(logits: Scores, params, seen: Seen | None = None) -> Scores:
    """Every enabled processor in transformers' order (module docstring). `seen` is required when the
    repetition penalty is on; `params` is a `SamplingParams` or a `GenerationConfig`."""
    params = SamplingParams.from_config(params)
    logits = logits.astype(jnp.float32)
    if params.use_repetition_penalty:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs `seen` [b, v], the tokens so far (seen_tokens)")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.do_sample:
        logits = apply_temperature(logits, params.temperature)
        logits = apply_top_k(logits, params.top_k)
        if params.use_top_p:
            logits = apply_top_p(logits, params.top_p)
        if params.use_min_p:
            logits = apply_min_p(logits, params.min_p)
    return logits


def greedy(logits: Scores) -> Int[Array, "b"]:
    """The most likely token per row (the first on ties, as `torch.argmax`)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_next_token(logits: Scores, rng, params, seen: Seen | None = None) -> Int[Array, "b"]:
    """The next token `[b]` int32: `process_logits`, then argmax (greedy) or a categorical draw with `rng`
    (one key for the whole batch; rows draw independently)."""
    params = SamplingParams.from_config(params)
    scores = process_logits(logits, params, seen)
    if not params.do_sample:
        return greedy(scores)
    return jax.random.categorical(rng, scores, axis=-1).astype(jnp.int32)
