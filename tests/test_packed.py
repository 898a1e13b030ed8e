"""Packed sequences: several sequences in one row, marked by `seq_idx` (or by `position_ids` that restart at 0, Hugging
Face's `DataCollatorWithFlattening` convention), each computed as if it ran alone.

The reference is transformers' model run on each sequence alone (random weights, every parameter redrawn), so the
check is independent of easymamba's own forward: the conv window and the SSM state must restart at every sequence
and attention must stay inside it (Mamba-2; the hybrids Nemotron-H, Bamba, Granite-4.0-H, Falcon-H1 and Zamba2,
whose reference runs in float64). float32, relative error within 1e-5 of the largest logit.
Gradients: the packed loss's gradient equals the gradient of the per-sequence losses summed, within 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import fwd, hf_logits, random_hf_model, rel_err, to_easymamba
from helpers_hybrid import hf_forward
from helpers_hybrid import random_hf_model as random_hybrid_hf_model

import easymamba as em
from easymamba.models import causal_lm_loss_sum, seq_idx_from_position_ids
from easymamba.train import causal_lm_loss_fn

TOL = 1e-5
LENGTHS = [(5, 9, 7), (12, 9)]  # two rows of 21 tokens: three and two sequences


def packed_batch(rng, vocab):
    """ids (2, 21), seq_idx (2, 21), position_ids (2, 21) restarting at 0, and each row's sequences."""
    ids, seq, pos, pieces = [], [], [], []
    for lengths in LENGTHS:
        parts = [rng.integers(3, vocab, n) for n in lengths]
        pieces.append(parts)
        ids.append(np.concatenate(parts))
        seq.append(np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]))
        pos.append(np.concatenate([np.arange(n) for n in lengths]))
    return np.stack(ids), np.stack(seq).astype(np.int32), np.stack(pos).astype(np.int32), pieces


def check_against_alone(packed_logits, pieces, alone_logits):
    for row, parts in enumerate(pieces):
        start = 0
        for part in parts:
            want = alone_logits(part[None])[0]
            got = np.asarray(packed_logits[row, start:start + len(part)])
            assert rel_err(got, want) < TOL, (row, start)
            start += len(part)


@pytest.fixture(scope="module")
def mamba2_pair():
    hf = random_hf_model(seed=3, n_groups=2, use_conv_bias=True)
    return hf, to_easymamba(hf)


def test_mamba2_packed_rows_equal_each_sequence_alone_in_transformers(mamba2_pair):
    hf, model = mamba2_pair
    ids, seq_idx, pos, pieces = packed_batch(np.random.default_rng(0), model.config.vocab_size)
    by_seq = np.asarray(fwd(model, jnp.asarray(ids), seq_idx=jnp.asarray(seq_idx)).logits)
    check_against_alone(by_seq, pieces, lambda part: hf_logits(hf, part))
    by_pos = np.asarray(fwd(model, jnp.asarray(ids), position_ids=jnp.asarray(pos)).logits)
    np.testing.assert_array_equal(by_pos, by_seq)  # the collator's convention is the same segmentation
    unpacked = np.asarray(fwd(model, jnp.asarray(ids)).logits)
    assert rel_err(unpacked[0, 5:14], by_seq[0, 5:14]) > 1e-3  # without seq_idx the state leaks across


def test_mamba2_packed_gradients_equal_the_sequences_summed(mamba2_pair):
    _, model = mamba2_pair
    ids, seq_idx, _, pieces = packed_batch(np.random.default_rng(1), model.config.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, batch):
        return causal_lm_loss_fn(nnx.merge(graphdef, params), batch)[0]

    grad = jax.jit(jax.grad(loss))
    packed = grad(params, {"input_ids": jnp.asarray(ids), "seq_idx": jnp.asarray(seq_idx)})
    summed = None
    for parts in pieces:
        for part in parts:
            g = grad(params, {"input_ids": jnp.asarray(part[None])})
            summed = g if summed is None else jax.tree.map(jnp.add, summed, g)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(packed),
                                 jax.tree_util.tree_leaves_with_path(summed)):
        assert rel_err(a, b) < TOL, path


def test_packed_loss_leaves_out_each_sequence_start(mamba2_pair):
    _, model = mamba2_pair
    ids, seq_idx, pos, pieces = packed_batch(np.random.default_rng(2), model.config.vocab_size)
    total, count = causal_lm_loss_fn(model, {"input_ids": jnp.asarray(ids), "position_ids": jnp.asarray(pos)})
    assert int(count) == sum(len(part) - 1 for parts in pieces for part in parts)
    alone = sum(float(causal_lm_loss_sum(model(jnp.asarray(part[None])).logits, jnp.asarray(part[None]))[0])
                for parts in pieces for part in parts)
    assert abs(float(total) - alone) < TOL * abs(alone)


@pytest.mark.parametrize("model_type", ["nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "zamba2"])
def test_hybrid_packed_rows_equal_each_sequence_alone_in_transformers(model_type, tmp_path):
    # Mamba-2 and attention (kept inside each sequence, rotary positions restarting), MLP and MoE layers;
    # Falcon-H1 runs Mamba-2 and attention side by side, Zamba2 a shared attention block before its mixers
    if model_type == "falcon_h1":
        from helpers_falcon_h1 import TINY_B, random_hf_falcon_h1
        hf = random_hf_falcon_h1(seed=21, **TINY_B)
    elif model_type == "zamba2":
        from helpers_zamba2 import random_hf_zamba2, temper_attention_
        hf = temper_attention_(random_hf_zamba2(seed=21, name="b"))  # rotary, LoRA adapters, two shared blocks
    else:
        hf = random_hybrid_hf_model(model_type, seed=21, variant=0)
    hf.save_pretrained(tmp_path)
    model = em.from_pretrained(tmp_path)
    ids, seq_idx, pos, pieces = packed_batch(np.random.default_rng(3), model.config.vocab_size)
    logits = np.asarray(fwd(model, jnp.asarray(ids), seq_idx=jnp.asarray(seq_idx)).logits)
    # the reference in float64 (transformers' own float32 logits of the sharper configs are ~1e-5 from it)
    hf64 = hf.double()
    check_against_alone(logits, pieces, lambda part: hf_forward(hf64, part))
    np.testing.assert_array_equal(seq_idx_from_position_ids(pos), seq_idx + 1)


def test_packed_sequences_refused_where_they_cannot_be_right(mamba2_pair):
    _, model = mamba2_pair
    ids = jnp.ones((1, 6), jnp.int32)
    seq_idx = jnp.asarray([[0, 0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="seq_idx must be an integer array of shape"):
        model(ids, seq_idx=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="without a cache"):
        model(ids, seq_idx=seq_idx, cache=model.init_cache(1))
    # refused before any parameter is read: an abstract Mamba-1 model is enough
    mamba1 = nnx.eval_shape(lambda: em.MambaForCausalLM(
        em.MambaConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, state_size=4), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="does not take packed sequences"):
        mamba1(ids, seq_idx=seq_idx)
