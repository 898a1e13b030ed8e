"""`generate` and `easymamba generate` on Mamba-1 models: greedy parity with transformers' `generate`.

The models are random HF `MambaForCausalLM`s loaded through `from_pretrained` (the shared loader), untied: with
a tied head these tiny random models collapse onto one token within a step or two, which would make parity
trivial. Greedy tokens must be equal, not close (an argmax flips only where two logits lie within float32
rounding of each other, which these seeds do not hit).

The reference is valid: transformers 5.23's multi-token cached continuation for Mamba-1 drops the cached SSM
state, but its greedy `generate` prefills once and then feeds one token per step, which it handles correctly;
`test_transformers_greedy_generate_is_a_valid_reference` checks that against cache-free full forwards.
The helpers and the prompt fixtures (`rows`, `padded`: widths 9, 4, 6, left-padded) are test_generation's,
built here on this file's `pair`.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers_mamba1 import random_hf_mamba
from test_generation import LENGTHS, M, PAD, hf_generate, padded, pick_eos, rows  # noqa: F401 (fixtures)
from tokenizers import Tokenizer

import easymamba as em
from easymamba.cli import SHIPPED_MODEL, main


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf_model = random_hf_mamba(seed=13, tie_word_embeddings=False, eos_token_id=None)
    path = tmp_path_factory.mktemp("mamba1_gen") / "hf"
    hf_model.save_pretrained(path)
    model = em.from_pretrained(path)
    assert isinstance(model, em.MambaForCausalLM)
    return hf_model, model


@pytest.fixture(scope="module")
def free(pair, padded):
    """transformers' greedy generate on the left-padded batch, no EOS: [3, 9 + M]."""
    ids, mask = padded
    return hf_generate(pair[0], ids, mask)


@torch.no_grad()
def test_transformers_greedy_generate_is_a_valid_reference(pair, padded, free):
    """Every token transformers' greedy generate (cache, one token per step) chose is the argmax of a cache-free
    forward over the row's sequence up to it (the model is causal, so one full forward scores every prefix):
    exactly a greedy loop of cache-free forwards. Row by row, without the left pads."""
    hf_model, _ = pair
    ids, mask = padded
    for r in range(len(ids)):
        seq = np.concatenate([ids[r, mask[r] == 1], free[r, ids.shape[1]:]])
        logits = hf_model(torch.from_numpy(seq).long()[None], use_cache=False).logits[0].numpy()
        n = len(seq) - M
        np.testing.assert_array_equal(logits[n - 1:-1].argmax(-1), seq[n:])


def test_greedy_matches_transformers_batch_1(pair, rows):
    hf_model, model = pair
    ids = rows[0][None]
    out = em.generate(model, ids, max_new_tokens=M)
    np.testing.assert_array_equal(out.sequences, hf_generate(hf_model, ids))
    np.testing.assert_array_equal(out.num_generated, [M])
    assert isinstance(out.cache, em.MambaCache) and int(out.cache.seqlen_offset) == len(rows[0]) + M


def test_greedy_left_padded_batch_with_eos_matches_transformers(pair, padded, free):
    hf_model, model = pair
    ids, mask = padded
    eos, step = pick_eos(free[:, ids.shape[1]:], row=1)
    want = hf_generate(hf_model, ids, mask, eos_token_id=eos)
    assert (want[1, ids.shape[1] + step + 1:] == PAD).all()               # the EOS fired in row 1 only
    out = em.generate(model, ids, attention_mask=mask, max_new_tokens=M, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(out.sequences, want)
    np.testing.assert_array_equal(out.num_generated, [M, step + 1, M])
    np.testing.assert_array_equal(out.cache.views[0].positions, ids.shape[1] + np.array([M, step + 1, M]))


def test_cli_generate_with_a_mamba1_directory(tmp_path, capsys):
    """`easymamba generate --model DIR` on a saved random Mamba-1 model whose vocabulary is the shipped
    tokenizer's: greedy (--temperature 0) text equals the tokenizer's decoding of transformers' greedy tokens
    from the same directory."""
    tokenizer = Tokenizer.from_file(str(SHIPPED_MODEL / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    hf_model = random_hf_mamba(seed=5, vocab_size=vocab, tie_word_embeddings=False, eos_token_id=None)
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((SHIPPED_MODEL / "tokenizer.json").read_bytes())
    prompt, n = "ROMEO: But soft", 12
    ids = np.asarray([tokenizer.encode(prompt).ids])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        tokens = loaded.generate(torch.from_numpy(ids).long(), max_new_tokens=n, do_sample=False,
                                 pad_token_id=PAD)[0].tolist()
    assert main(["generate", prompt, "--model", str(tmp_path), "--max-new-tokens", str(n), "--temperature", "0",
                 "--no-stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out == tokenizer.decode(tokens) + "\n", (captured.out, tokens)
    assert f"{n} tokens in" in captured.err
    # our generate on the same directory agrees token for token
    ours = em.generate(em.from_pretrained(tmp_path), jnp.asarray(ids), max_new_tokens=n)
    np.testing.assert_array_equal(np.asarray(ours.sequences)[0], tokens)


def test_generate_refuses_a_cache_of_the_other_family_and_bad_ids(pair, rows):
    _, model = pair
    other = em.Mamba2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                            state_size=8, n_groups=1, chunk_size=8)
    cache = em.Mamba2Cache.init_cache(2, em.Mamba2CacheMetaData.from_config(other, 1))
    with pytest.raises(ValueError, match=r"built for model_type 'mamba2', but the model's config has model_type "
                                         r"'mamba'"):
        em.generate(model, rows[0][None], max_new_tokens=2, cache=cache)
    with pytest.raises(ValueError, match=r"token id 97 at position \(0, 1\) is outside the vocabulary"):
        em.generate(model, np.array([[rows[0][0], 97]]), max_new_tokens=2)
