"""Logit processors against transformers' classes of the same name, and the samplers' statistics.

The filters (top-k, top-p, min-p) only compare and mask, so on the same float32 logits they must agree with
transformers exactly (assert_array_equal, -inf included). Temperature and the repetition penalty divide by a
scalar, which XLA rewrites as a multiply by its reciprocal: one rounding more than torch's true division, so
those match to 1 ulp (rel <= 2.4e-7, `assert_scores_equal`) with identical -inf masks. Random logits have no
ties, so the order in which either library breaks a tie at a top-k / top-p cut never matters here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers.generation.logits_process as lp

from easymamba import sampling
from easymamba.sampling import SamplingParams
from helpers import random_hf_model

V = 64


@pytest.fixture(scope="module")
def logits():
    return (3.0 * np.random.default_rng(0).standard_normal((5, V))).astype(np.float32)


ULP = 2.4e-7  # float32 machine epsilon: one rounding of x * (1 / t) against x / t


def assert_scores_equal(got, want, err_msg=""):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=err_msg)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=ULP, atol=0, err_msg=err_msg)


def hf(processor, logits, input_ids=None):
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else torch.from_numpy(input_ids)
    return processor(ids, torch.from_numpy(logits.copy())).numpy()


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 2.5])
def test_temperature_matches_hf(logits, t):
    assert_scores_equal(sampling.apply_temperature(jnp.asarray(logits), t), hf(lp.TemperatureLogitsWarper(t), logits))


@pytest.mark.parametrize("k", [1, 2, 10, V - 1, V, 3 * V])
def test_top_k_matches_hf(logits, k):
    got = np.asarray(sampling.apply_top_k(jnp.asarray(logits), k))
    np.testing.assert_array_equal(got, hf(lp.TopKLogitsWarper(k), logits))
    assert (np.isfinite(got).sum(-1) == min(k, V)).all()


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_p_matches_hf(logits, p, keep):
    got = np.asarray(sampling.apply_top_p(jnp.asarray(logits), p, min_tokens_to_keep=keep))
    np.testing.assert_array_equal(got, hf(lp.TopPLogitsWarper(p, min_tokens_to_keep=keep), logits))
    assert (np.isfinite(got).sum(-1) >= keep).all()


def test_top_p_after_top_k_matches_hf(logits):
    """top-p on logits top-k already masked (the -inf entries have probability 0), as generate chains them."""
    masked = hf(lp.TopKLogitsWarper(12), logits)
    got = sampling.apply_top_p(sampling.apply_top_k(jnp.asarray(logits), 12), 0.8)
    np.testing.assert_array_equal(got, hf(lp.TopPLogitsWarper(0.8), masked))


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("keep", [1, 4])
def test_min_p_matches_hf(logits, min_p, keep):
    got = sampling.apply_min_p(jnp.asarray(logits), min_p, min_tokens_to_keep=keep)
    np.testing.assert_array_equal(got, hf(lp.MinPLogitsWarper(min_p, min_tokens_to_keep=keep), logits))


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 4.0])
def test_repetition_penalty_matches_hf(logits, penalty):
    ids = np.random.default_rng(1).integers(0, V, (5, 40))                 # repeats within rows
    seen = sampling.seen_tokens(jnp.asarray(ids), V)
    got = sampling.apply_repetition_penalty(jnp.asarray(logits), seen, penalty)
    assert_scores_equal(got, hf(lp.RepetitionPenaltyLogitsProcessor(penalty), logits, ids))


def test_repetition_penalty_skips_left_padding_as_hf(logits):
    """transformers' generate passes each row's count of leading pads as `prompt_ignore_length`; our mask."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, (5, 30))
    pads = np.array([0, 5, 29, 12, 1])
    mask = (np.arange(30)[None] >= pads[:, None]).astype(np.int32)
    seen = sampling.seen_tokens(jnp.asarray(ids), V, jnp.asarray(mask))
    got = sampling.apply_repetition_penalty(jnp.asarray(logits), seen, 1.7)
    want = hf(lp.RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=torch.from_numpy(pads)), logits, ids)
    assert_scores_equal(got, want)


def test_add_seen_marks_one_token_per_row():
    seen = sampling.add_seen(jnp.zeros((3, V), bool), jnp.array([4, 0, 63]))
    assert np.asarray(seen).sum() == 3 and bool(seen[0, 4]) and bool(seen[1, 0]) and bool(seen[2, 63])


def test_processors_apply_in_transformers_generate_order():
    """transformers' own generate (sampling, every processor on, left-padded batch) records its raw logits and
    its processed scores per step; `process_logits` on the raw logits, with the tokens seen so far, must give
    the processed scores. This checks the order and the pad handling end to end, not just each class."""
    model = random_hf_model(seed=5)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, model.config.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0
    ids[1, :4] = 0
    settings = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=True,
                             max_new_tokens=6, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                             output_scores=True, output_logits=True, **settings)
    params = SamplingParams.create(do_sample=True, **settings)
    vocab = model.config.vocab_size

    @jax.jit
    def process(raw, ids, mask):
        return sampling.process_logits(raw, params, sampling.seen_tokens(ids, vocab, mask))

    sequences = out.sequences.numpy()
    full_mask = np.concatenate([mask, np.ones((2, 6), np.int64)], axis=1)
    for step, (raw, scores) in enumerate(zip(out.logits, out.scores)):
        so_far = full_mask * (np.arange(15) < 9 + step)                    # the tokens before this step
        got = process(jnp.asarray(raw.numpy()), jnp.asarray(sequences), jnp.asarray(so_far))
        assert_scores_equal(got, scores.numpy(), err_msg=f"step {step}")
        assert np.isinf(scores.numpy()).any()                              # the filters really cut


def test_greedy_params_switch_the_warpers_off():
    params = SamplingParams.create(do_sample=False, temperature=0.2, top_k=3, top_p=0.5, min_p=0.3)
    assert (params.top_k, params.use_top_p, params.use_min_p, params.use_repetition_penalty) == (0, False, False, False)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, V)), jnp.float32)
    np.testing.assert_array_equal(sampling.process_logits(x, params), x)
    np.testing.assert_array_equal(sampling.sample_next_token(x, None, params), np.argmax(np.asarray(x), -1))


def test_penalty_without_seen_is_refused(logits):
    with pytest.raises(ValueError, match="seen"):
        sampling.process_logits(jnp.asarray(logits), SamplingParams.create(repetition_penalty=1.2))


def draws(logits, params, key, n):
    """`n` draws of `sample_next_token` on the same logits, one key each (vmap, one compiled call)."""
    keys = jax.random.split(key, n)
    return np.asarray(jax.jit(jax.vmap(lambda k: sampling.sample_next_token(logits, k, params)))(keys))


def test_fixed_rng_reproduces_and_keys_differ(logits):
    params = SamplingParams.create(do_sample=True, temperature=1.5)
    x = jnp.asarray(logits)
    a, b = draws(x, params, jax.random.key(8), 64), draws(x, params, jax.random.key(8), 64)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a[:, 0])) > 1                                     # the key matters


def test_top_k_1_sampling_equals_greedy(logits):
    params = SamplingParams.create(do_sample=True, temperature=0.6, top_k=1)
    got = draws(jnp.asarray(logits), params, jax.random.key(9), 256)
    np.testing.assert_array_equal(got, np.broadcast_to(np.argmax(logits, -1), got.shape))


def test_top_p_samples_only_the_nucleus_with_renormalised_frequencies():
    """8,000 draws (vmap over keys) from a fixed 16-token distribution with top_p = 0.75.

    The nucleus is computed here in float64 from its definition (the fewest most-likely tokens whose mass
    reaches 0.75; the chosen logits keep the cut far from any rounding). Every draw must lie in it, and the
    counts must fit the probabilities renormalised over it: Pearson's chi-square below its 0.999 quantile.
    The key is fixed, so the test is deterministic; with a fresh key it would fail 1 run in 1,000.
    """
    logits = np.log(np.array([30, 20, 12, 9, 7, 5, 4, 3, 3, 2, 1.5, 1.2, 1, 0.8, 0.5, 1], np.float64))
    probs = np.exp(logits) / np.exp(logits).sum()
    order = np.argsort(-probs)
    size = int(np.searchsorted(np.cumsum(probs[order]), 0.75) + 1)        # mass of first size-1 < 0.75 <= size
    nucleus = np.sort(order[:size])
    n = 8000
    params = SamplingParams.create(do_sample=True, top_p=0.75)
    x = jnp.asarray(logits[None], jnp.float32)
    counts = np.bincount(draws(x, params, jax.random.key(1), n)[:, 0], minlength=len(logits))
    assert set(np.flatnonzero(counts)) <= set(nucleus.tolist()), (np.flatnonzero(counts), nucleus)
    expected = n * probs[nucleus] / probs[nucleus].sum()
    chi2 = float(np.sum((counts[nucleus] - expected) ** 2 / expected))
    assert chi2 < scipy.stats.chi2.ppf(0.999, df=len(nucleus) - 1), chi2
