"""The flax Mamba-1 model against Hugging Face transformers' torch `MambaForCausalLM` (random weights, CPU).

Tolerance: logits rel err <= 1e-5 in float32. Both sides compute in float32 with different summation orders
(XLA vs torch matmuls and scan), which moves logits by a few ulps per layer (measured ~3e-7); 1e-5 leaves room
for that and still fails on any real semantic error (a missing bias, a swapped x/z half, a mask in the wrong
place changes logits by 1e-2 or more).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import hf_logits, jitted, random_ids, rel_err
from helpers_mamba1 import random_hf_mamba, to_easymamba_mamba1

from easymamba.config import Mamba2Config, MambaConfig
from easymamba.checkpoints.layout import to_hf_layout
from easymamba.models import MambaForCausalLM, MambaMixer, mamba1_key_table

TOL = 1e-5

PARITY_CASES = {
    # name: (HF config overrides, sequence length)
    "tied": (dict(tie_word_embeddings=True), 19),
    "untied_bias": (dict(tie_word_embeddings=False, use_bias=True), 24),
    "three_layers_rank5_no_conv_bias": (dict(num_hidden_layers=3, time_step_rank=5, use_conv_bias=False,
                                             conv_kernel=3), 7),
}


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_logits_match_hf(name):
    overrides, length = PARITY_CASES[name]
    hf_model = random_hf_mamba(seed=len(name), **overrides)
    model = to_easymamba_mamba1(hf_model)
    ids = random_ids(np.random.default_rng(0), 2, length, hf_model.config.vocab_size)
    ours = np.asarray(jitted(model)(jnp.asarray(ids)).logits)
    err = rel_err(ours, hf_logits(hf_model, ids))
    print(f"{name}: logits rel err {err:.2e}")
    assert err <= TOL


def test_associative_scan_form_matches_hf():
    """kernel_impl="xla" runs the chunked associative scan (the GPU/TPU prefill form) instead of the recurrence."""
    hf_model = random_hf_mamba(seed=4, tie_word_embeddings=False)
    model = to_easymamba_mamba1(hf_model, kernel_impl="xla")
    ids = random_ids(np.random.default_rng(6), 2, 19, hf_model.config.vocab_size)
    err = rel_err(jitted(model)(jnp.asarray(ids)).logits, hf_logits(hf_model, ids))
    print(f"associative scan: logits rel err {err:.2e}")
    assert err <= TOL


def test_loss_and_hidden_states_match_hf():
    hf_model = random_hf_mamba(seed=3, tie_word_embeddings=False, num_hidden_layers=3)
    model = to_easymamba_mamba1(hf_model)
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 3, 15, hf_model.config.vocab_size)
    labels = ids.copy()
    labels[0, :4] = -100
    labels[1, 7] = -100
    labels[2, -3:] = -100
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids).long(), labels=torch.from_numpy(labels).long(), use_cache=False,
                          output_hidden_states=True)

    @nnx.jit
    def forward(m, ids, labels):
        return m(ids, labels=labels, output_hidden_states=True)

    ours = forward(model, jnp.asarray(ids), jnp.asarray(labels))
    # Loss is a mean of ~40 float32 log-probs: agreement to 1e-6 relative is float32 rounding.
    assert abs(float(ours.loss) - theirs.loss.item()) <= 1e-6 * abs(theirs.loss.item()), (ours.loss, theirs.loss)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert rel_err(a, b.numpy()) <= TOL


def test_left_padding_matches_rows_alone_and_hf():
    hf_model = random_hf_mamba(seed=7)
    model = to_easymamba_mamba1(hf_model)
    rng = np.random.default_rng(3)
    lengths = [14, 3]  # the short row is shorter than the conv kernel
    width = max(lengths)
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    rows = []
    for r, n in enumerate(lengths):
        row = random_ids(rng, 1, n, hf_model.config.vocab_size)
        rows.append(row)
        ids[r, width - n:] = row[0]
        ids[r, :width - n] = rng.integers(3, hf_model.config.vocab_size, width - n)  # junk under the mask
        mask[r, width - n:] = 1
    forward = jitted(model)
    batched = np.asarray(forward(jnp.asarray(ids), jnp.asarray(mask)).logits)
    theirs = hf_logits(hf_model, ids, mask)
    for r, n in enumerate(lengths):
        alone = np.asarray(forward(jnp.asarray(rows[r])).logits)[0]
        assert rel_err(batched[r, width - n:], alone) <= TOL, r
        assert rel_err(batched[r, width - n:], theirs[r, width - n:]) <= TOL, r


def test_key_table_is_hf_state_dict():
    """Names, order and shapes of the key table are those of HF's state dict (lm_head only when untied)."""
    for overrides in (dict(tie_word_embeddings=True), dict(tie_word_embeddings=False, use_bias=True,
                                                           use_conv_bias=False)):
        hf_model = random_hf_mamba(seed=1, **overrides)
        config = MambaConfig.from_hf(hf_model.config.to_dict())
        model = nnx.eval_shape(lambda: MambaForCausalLM(config, rngs=nnx.Rngs(0)))
        table = mamba1_key_table(config)
        hf_sd = hf_model.state_dict()
        expected = [k for k in hf_sd if not (config.tie_word_embeddings and k == "lm_head.weight")]
        assert [spec.hf_name for spec in table] == expected
        assert MambaForCausalLM.key_table(config) == table
        for name, path, kind in ((spec.hf_name, spec.path, spec.kind) for spec in table):
            obj = model
            for step in path:
                obj = obj[step] if isinstance(step, int) else getattr(obj, step)
            assert to_hf_layout(kind, np.zeros(obj.shape)).shape == tuple(hf_sd[name].shape), name


def test_fresh_model_is_hf_initialised():
    """A fresh model is a realistic model: HF's A_log, D, dt_proj, conv/out_proj/in_proj/x_proj scales."""
    cfg = MambaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, state_size=16)
    model = MambaForCausalLM(cfg, rngs=nnx.Rngs(0))
    mixer = model.backbone.layers[0].mixer
    e, r = cfg.intermediate_size, cfg.resolved_time_step_rank
    np.testing.assert_allclose(np.asarray(mixer.A_log[...]), np.log(np.tile(np.arange(1, 17), (e, 1))), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mixer.D[...]), np.ones(e))
    dt = np.asarray(jax.nn.softplus(mixer.dt_proj.bias[...]))
    assert (dt >= cfg.time_step_min * 0.999).all() and (dt <= cfg.time_step_max * 1.001).all()
    assert np.log(dt).std() > 0.5 * (np.log(0.1) - np.log(0.001)) / np.sqrt(12)  # log-uniform, not constant
    w = np.asarray(mixer.dt_proj.kernel[...])
    assert np.abs(w).max() <= r ** -0.5 and abs(w.std() - r ** -0.5 / np.sqrt(3)) < 0.05
    conv = np.asarray(mixer.conv1d.weight[...])
    assert np.abs(conv).max() <= 0.5 and abs(conv.std() - 0.5 / np.sqrt(3)) < 0.03
    assert np.abs(np.asarray(mixer.out_proj.kernel[...])).max() <= 1 / np.sqrt(e)
    for w in (mixer.in_proj.kernel, mixer.x_proj.kernel, model.backbone.embeddings.weight):
        assert abs(np.asarray(w[...]).std() - 0.1) < 0.01
    assert model.lm_head is None  # tied by default, as HF
    constant = MambaMixer(cfg.replace(time_step_init_scheme="constant", time_step_scale=2.0), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(constant.dt_proj.kernel[...]), 2.0 * r ** -0.5, rtol=1e-6)
    assert np.isfinite(np.asarray(jitted(model)(jnp.asarray([[1, 2, 3]])).logits)).all()


def test_inputs_embeds_and_bad_inputs():
    hf_model = random_hf_mamba(seed=9)
    model = to_easymamba_mamba1(hf_model)
    ids = jnp.asarray(random_ids(np.random.default_rng(4), 2, 9, hf_model.config.vocab_size))

    @nnx.jit
    def from_embeds(m, ids):
        return m(inputs_embeds=m.backbone.embeddings(ids)).logits

    np.testing.assert_array_equal(np.asarray(jitted(model)(ids).logits), np.asarray(from_embeds(model, ids)))
    with pytest.raises(ValueError, match=r"token id 97 at position \(0, 2\) is outside the vocabulary \[0, 97\)"):
        model(jnp.asarray([[1, 2, 97, 3]]))
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 and 1"):
        model(jnp.asarray([[1, 2]]), attention_mask=jnp.asarray([[1, 2]]))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seq_len\)"):
        model(jnp.asarray([1, 2]))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(ValueError, match=r"impl must be one of"):
        nnx.eval_shape(lambda: MambaForCausalLM(model.config, rngs=nnx.Rngs(0), kernel_impl="fast"))
    with pytest.raises(TypeError, match=r"MambaModel needs a MambaConfig, got Mamba2Config"):
        nnx.eval_shape(lambda: MambaForCausalLM(Mamba2Config(), rngs=nnx.Rngs(0)))
