"""`model.compile()` (`CompiledLM`): the model's own computation, called through a state split once.

References are the model's call under `nnx.jit` (tests/helpers.py `fwd`): the same traced program, so logits,
losses and caches must be bit-identical. Where the compiled entry computes something differently on purpose
(`prefill` applies the head to the last position only, `score` gathers log-probabilities), the comparison is
within float32 rounding, rel 1e-6 (a (1, d) x (d, v) product against a row of the (l, d) x (d, v) one).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import easymamba as em
from easymamba.models.compiled import _TRACES
from helpers import fwd, random_hf_model, random_ids, rel_err, to_easymamba
from helpers_hybrid import random_hf_model as random_hf_hybrid


@pytest.fixture(scope="module")
def model():
    return to_easymamba(random_hf_model(0))


def _equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_call_matches_the_model_logits_loss_and_left_padding(model):
    fast = model.compile()
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 2, 11, model.config.vocab_size)
    labels = ids.copy()
    labels[0, :3] = -100
    mask = np.ones_like(ids)
    mask[1, :4] = 0                                                             # left padding in row 1
    out = fast(ids, attention_mask=mask, labels=labels)
    ref = fwd(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), labels=jnp.asarray(labels))
    _equal((out.logits, out.loss), (ref.logits, ref.loss))
    # same shapes, dtypes and optional inputs: no new trace (device arrays and numpy alike)
    traces = dict(_TRACES)
    again = fast(jnp.asarray(ids), attention_mask=mask, labels=jnp.asarray(labels))
    assert _TRACES == traces
    _equal(again.logits, out.logits)


def test_prefill_then_steps_continue_as_the_model(model):
    fast = model.compile()
    rng = np.random.default_rng(2)
    ids = random_ids(rng, 2, 9, model.config.vocab_size)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    last, cache = fast.prefill(ids[:, :6], attention_mask=mask[:, :6])
    ref = fwd(model, jnp.asarray(ids[:, :6]), attention_mask=jnp.asarray(mask[:, :6]), cache=model.init_cache(2))
    assert last.shape == (2, model.config.vocab_size)
    assert rel_err(last, ref.logits[:, -1]) < 1e-6       # the head on one row against a row of the whole product
    _equal(cache, ref.cache)
    ref_cache = ref.cache
    for t in range(6, 8):                                 # (b, 1) with a cache: the model's decode step
        out = fast(ids[:, t:t + 1], cache=cache)
        ref = fwd(model, jnp.asarray(ids[:, t:t + 1]), cache=ref_cache)
        _equal((out.logits, out.cache), (ref.logits, ref.cache))
        cache, ref_cache = out.cache, ref.cache
    with pytest.raises(ValueError, match="left padding"):
        fast.prefill(ids, attention_mask=np.flip(mask, axis=1).copy())
    with pytest.raises(ValueError, match="vocabulary"):
        fast(np.full((1, 3), model.config.vocab_size))


def test_score_is_the_log_softmax_of_the_next_token(model):
    fast = model.compile()
    ids = random_ids(np.random.default_rng(3), 2, 10, model.config.vocab_size)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    logp = np.asarray(jax.nn.log_softmax(fwd(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits))
    want = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]          # (b, l-1)
    got = np.asarray(fast.score(ids, attention_mask=mask))
    assert got.shape == (2, 9)
    real = mask[:, 1:] == 1
    assert rel_err(got[real], want[real]) < 1e-6
    assert np.all(got[~real] == 0)                         # padding scores nothing
    with pytest.raises(ValueError, match="seq_len >= 2"):
        fast.score(ids[:, :1])


def test_snapshot_until_refresh():
    model = to_easymamba(random_hf_model(4))
    fast = model.compile()
    ids = random_ids(np.random.default_rng(4), 1, 5, model.config.vocab_size)
    before = np.asarray(fast(ids).logits)
    kernel = model.lm_head.kernel
    kernel.set_value(kernel.get_value() * 2.0)             # as a training step or load_state_dict rebinds it
    np.testing.assert_array_equal(np.asarray(fast(ids).logits), before)
    traces = dict(_TRACES)
    assert fast.refresh() is fast
    _equal(fast(ids).logits, fwd(model, jnp.asarray(ids)).logits)
    assert _TRACES == traces                               # same structure: the compiled code is kept
    assert not np.array_equal(np.asarray(fast(ids).logits), before)


def test_hybrid_family_prefill_and_continuation(tmp_path):
    random_hf_hybrid("nemotron_h", 5, layers_block_type=["mamba", "attention"]).save_pretrained(tmp_path)
    model = em.from_pretrained(tmp_path)                 # every weight random (building ours eagerly takes ~3 s)
    fast = model.compile()
    ids = random_ids(np.random.default_rng(5), 2, 8, model.config.vocab_size)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="max_length"):
        fast.prefill(ids[:, :6], attention_mask=mask[:, :6])
    last, cache = fast.prefill(ids[:, :6], attention_mask=mask[:, :6], max_length=8)
    ref = fwd(model, jnp.asarray(ids[:, :6]), attention_mask=jnp.asarray(mask[:, :6]),
              cache=model.init_cache(2, max_length=8))
    assert rel_err(last, ref.logits[:, -1]) < 1e-6
    _equal(cache, ref.cache)
    out = fast(ids[:, 6:8], attention_mask=mask, cache=cache)   # a chunked prefill continuing the cache
    assert out.logits.shape == (2, 2, model.config.vocab_size)
    ref = fwd(model, jnp.asarray(ids[:, 6:8]), attention_mask=jnp.asarray(mask), cache=ref.cache)
    _equal((out.logits, out.cache), (ref.logits, ref.cache))
