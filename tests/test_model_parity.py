"""The flax Mamba-2 model against Hugging Face transformers' torch `Mamba2ForCausalLM` (random weights, CPU).

Tolerance: logits rel err <= 1e-5 in float32. Both sides compute in float32 with different summation
orders (XLA vs torch matmuls, our chunked SSD vs HF's), which moves logits by a few ulps per layer
(measured ~1e-7..1e-6); 1e-5 leaves room for that and still fails on any real semantic error (a wrong
group map, a missing bias or mask changes logits by 1e-2 or more).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import easymamba as em
from helpers import hf_logits, jitted, random_hf_model, random_ids, rel_err, to_easymamba

TOL = 1e-5

PARITY_CASES = {
    # name: (HF config overrides, sequence length)
    "g1_chunk_multiple": (dict(n_groups=1), 24),
    "g2_ragged": (dict(n_groups=2), 19),
    "g4_tied": (dict(n_groups=4, tie_word_embeddings=True), 13),
    "bias_untied": (dict(use_bias=True, n_groups=1), 30),
    "three_layers_short": (dict(num_hidden_layers=3, chunk_size=16, n_groups=2), 5),
    "no_conv_bias_limit": (dict(use_conv_bias=False, time_step_limit=(0.02, 0.08)), 17),
}


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_logits_match_hf(name):
    overrides, length = PARITY_CASES[name]
    hf_model = random_hf_model(seed=len(name), **overrides)
    model = to_easymamba(hf_model)
    ids = random_ids(np.random.default_rng(0), 2, length, hf_model.config.vocab_size)
    ours = np.asarray(jitted(model)(jnp.asarray(ids)).logits)
    err = rel_err(ours, hf_logits(hf_model, ids))
    print(f"{name}: logits rel err {err:.2e}")
    assert err <= TOL


def test_loss_matches_hf_with_ignored_labels():
    hf_model = random_hf_model(seed=3, n_groups=2)
    model = to_easymamba(hf_model)
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 3, 15, hf_model.config.vocab_size)
    labels = ids.copy()
    labels[0, :4] = -100
    labels[1, 7] = -100
    labels[2, -3:] = -100
    with torch.no_grad():
        hf_loss = hf_model(torch.from_numpy(ids).long(), labels=torch.from_numpy(labels).long(),
                           use_cache=False).loss.item()
    loss = float(model(jnp.asarray(ids), labels=jnp.asarray(labels)).loss)
    # Loss is a mean of ~40 float32 log-probs: agreement to 1e-6 relative is float32 rounding.
    assert abs(loss - hf_loss) <= 1e-6 * abs(hf_loss), (loss, hf_loss)


def test_hidden_states_match_hf():
    hf_model = random_hf_model(seed=5, n_groups=2, num_hidden_layers=3)
    model = to_easymamba(hf_model)
    ids = random_ids(np.random.default_rng(2), 2, 11, hf_model.config.vocab_size)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids).long(), output_hidden_states=True, use_cache=False).hidden_states
    ours = model(jnp.asarray(ids), output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert rel_err(a, b.numpy()) <= TOL


@pytest.mark.parametrize("n_groups", [1, 2])
def test_left_padding_matches_rows_alone(n_groups):
    hf_model = random_hf_model(seed=7, n_groups=n_groups)
    model = to_easymamba(hf_model)
    rng = np.random.default_rng(3)
    lengths = [14, 9, 3]
    width = max(lengths)
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    rows = []
    for r, n in enumerate(lengths):
        row = random_ids(rng, 1, n, hf_model.config.vocab_size)
        rows.append(row)
        ids[r, width - n:] = row[0]
        ids[r, :width - n] = rng.integers(3, hf_model.config.vocab_size, width - n)  # junk under the mask
        mask[r, width - n:] = 1
    forward = jitted(model)
    batched = np.asarray(forward(jnp.asarray(ids), jnp.asarray(mask)).logits)
    for r, n in enumerate(lengths):
        alone = np.asarray(forward(jnp.asarray(rows[r])).logits)[0]
        err = rel_err(batched[r, width - n:], alone)
        assert err <= TOL, (r, err)
    # ... and the padded batch agrees with HF's masked forward on the real tokens as well.
    theirs = hf_logits(hf_model, ids, mask)
    for r, n in enumerate(lengths):
        assert rel_err(batched[r, width - n:], theirs[r, width - n:]) <= TOL


def test_inputs_embeds_equals_ids():
    hf_model = random_hf_model(seed=11)
    model = to_easymamba(hf_model)
    ids = jnp.asarray(random_ids(np.random.default_rng(4), 2, 9, hf_model.config.vocab_size))
    embeds = model.backbone.embeddings(ids)
    np.testing.assert_array_equal(np.asarray(model(ids).logits), np.asarray(model(inputs_embeds=embeds).logits))


def test_jit_forward_matches_eager_and_poisons_bad_ids():
    hf_model = random_hf_model(seed=13, n_groups=2)
    model = to_easymamba(hf_model)
    ids = jnp.asarray(random_ids(np.random.default_rng(5), 2, 10, hf_model.config.vocab_size))

    @nnx.jit
    def forward(m, x):
        return m(x).logits

    eager = np.asarray(model(ids).logits)
    assert rel_err(forward(model, ids), eager) <= 1e-6
    # Under jit the ids are not readable, so a bad id cannot raise; it must not be clamped silently either.
    bad = ids.at[1, 4].set(hf_model.config.vocab_size + 5)
    out = np.asarray(forward(model, bad))
    assert np.isnan(out[1, 4:]).all() and np.isfinite(out[0]).all()


def test_out_of_range_token_ids_are_refused():
    model = em.Mamba2ForCausalLM(em.Mamba2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_heads=4,
                                                 head_dim=8, state_size=8, n_groups=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"token id 50 at position \(0, 2\) is outside the vocabulary \[0, 50\)"):
        model(jnp.asarray([[1, 2, 50, 3]]))
    with pytest.raises(ValueError, match=r"token id -1 .* outside the vocabulary"):
        model(jnp.asarray([[-1, 2]]))
    with pytest.raises(ValueError, match=r"label 77 is outside the vocabulary \[0, 50\)"):
        model(jnp.asarray([[1, 2]]), labels=jnp.asarray([[1, 77]]))
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 and 1"):
        model(jnp.asarray([[1, 2]]), attention_mask=jnp.asarray([[1, 2]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch=1, seq_len>=2\)"):
        model(jnp.asarray([[1, 2]]), attention_mask=jnp.asarray([[1]]))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seq_len\)"):
        model(jnp.asarray([1, 2]))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()


def test_fresh_model_is_hf_initialised():
    """A fresh model is a realistic model: HF's A_log, D, dt range, conv/out_proj/in_proj scales."""
    cfg = em.Mamba2Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                          state_size=16, n_groups=2)
    model = em.Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    mixer = model.backbone.layers[0].mixer
    np.testing.assert_allclose(np.asarray(mixer.A_log[...]), np.log(np.arange(1, 9)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mixer.D[...]), np.ones(8))
    dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
    assert (dt >= cfg.time_step_min * 0.999).all() and (dt <= cfg.time_step_max * 1.001).all()
    weights = em.state_dict(model)  # HF names and layouts: in_proj and conv1d are packed there as in HF
    conv = weights["backbone.layers.0.mixer.conv1d.weight"]
    assert np.abs(conv).max() <= 0.5 and abs(conv.std() - 0.5 / np.sqrt(3)) < 0.03
    out = np.asarray(mixer.out_proj.kernel[...])
    assert np.abs(out).max() <= 1 / np.sqrt(cfg.intermediate_size)
    assert abs(weights["backbone.layers.0.mixer.in_proj.weight"].std() - 0.1) < 0.01
    assert abs(np.asarray(model.backbone.embeddings.weight[...]).std() - 0.1) < 0.01
    assert np.isfinite(np.asarray(model(jnp.asarray([[1, 2, 3]])).logits)).all()
