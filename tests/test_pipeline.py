"""`TextGenerator`: text in, text out, against transformers' generate and the tokenizers library's decode.

The reference is transformers' `Mamba2ForCausalLM.generate` on the shipped model (easymamba/assets/tiny-shakespeare)
with the prompts encoded, left-padded and decoded by `tokenizers` directly. Greedy text must be equal, not close.
Budget: the model is 3.6M parameters and every call generates M = 8 tokens, so the loop compiles for b = 2
(the batch) and b = 1, and the streaming step once (b = 1; a step's shapes do not depend on the prompt length).
"""

import importlib.resources
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer

import easymamba as em

MODEL_DIR = importlib.resources.files("easymamba") / "assets" / "tiny-shakespeare"
M = 8
PROMPTS = ["First Citizen:\nBefore we proceed", "ROMEO:"]  # the first is the longest: the batch leaves it unpadded


@pytest.fixture(scope="module")
def gen():
    return em.TextGenerator.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def expected():
    """transformers' greedy continuations of the left-padded batch, decoded by `tokenizers` (the config's EOS and
    pad id 0 apply, as transformers takes them from config.json). Row 0 has no padding: it is also the
    continuation of PROMPTS[0] alone."""
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    hf = transformers.Mamba2ForCausalLM.from_pretrained(str(MODEL_DIR)).eval()
    rows = [tok.encode(p).ids for p in PROMPTS]
    width = max(map(len, rows))
    assert len(rows[0]) == width
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    with torch.no_grad():
        batch = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=M,
                            do_sample=False).numpy()
    texts = [tok.decode(batch[i, width:].tolist()) for i in range(len(rows))]
    return {"batch": texts, "alone": texts[0]}


def test_greedy_text_matches_transformers_batch_single_and_stream(gen, expected):
    """The batch runs generate's jitted loop; a single prompt here runs the streaming step (stream, and generate
    with stop strings, which also steps), each compiled once."""
    assert gen.generate(PROMPTS, max_new_tokens=M) == expected["batch"]      # one left-padded batch
    pieces = list(gen.stream(PROMPTS[0], max_new_tokens=M))
    assert "".join(pieces) == expected["alone"] and len(pieces) > 3, pieces  # pieces as they come
    single = gen.generate(PROMPTS[0], max_new_tokens=M, stop="never there")  # a string gives a string
    assert single == expected["alone"]
    full = gen.generate(PROMPTS, max_new_tokens=M, return_full_text=True)
    assert full == [p + e for p, e in zip(PROMPTS, expected["batch"])]


def test_stop_strings_end_the_text_before_them(gen, expected):
    text = expected["alone"]
    stop = text[3:6]
    cut = text[:text.find(stop)]
    assert gen.generate(PROMPTS[0], max_new_tokens=M, stop=[stop, "never there"]) == cut
    assert "".join(gen.stream(PROMPTS[0], max_new_tokens=M, stop=stop)) == cut
    assert gen.generate(PROMPTS[0], max_new_tokens=M, stop="never there") == text    # none found: all of it
    batch = gen.generate(PROMPTS, max_new_tokens=M, stop=stop)
    assert batch == [b[:b.find(stop)] if stop in b else b for b in expected["batch"]]


def test_directory_defaults_and_chat_template(gen, expected, tmp_path):
    """generation_config.json sets the defaults; tokenizer_config.json's chat_template renders as transformers
    renders it; chat continues the rendered conversation."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}ROMEO:{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"max_new_tokens": M, "eos_token_id": 0, "pad_token_id": 0, "transformers_version": "5.25.0"}))
    local = em.TextGenerator.from_pretrained(tmp_path)
    assert local.model.generation_config.max_new_tokens == M
    assert local.generate(PROMPTS) == expected["batch"]                        # max_new_tokens from the file
    messages = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "I will."}]
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    want = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    assert local.apply_chat_template(messages) == want
    with pytest.raises(ValueError, match="has no chat_template"):
        gen.apply_chat_template(messages)
    plain = em.TextGenerator(gen.model, gen.tokenizer, {"chat_template": "{{ messages[-1]['content'] }}"})
    reply = plain.chat([{"role": "user", "content": PROMPTS[0]}], max_new_tokens=M, stop="never there")
    assert reply == expected["alone"]


def test_bad_input_is_named(gen, tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        em.TextGenerator.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list of strings"):
        gen.generate([1, 2], max_new_tokens=M)
    with pytest.raises(ValueError, match="prompt 1 .* encodes to no tokens"):
        gen.generate(["a", ""], max_new_tokens=M)
    with pytest.raises(ValueError, match="stream takes one prompt string"):
        next(gen.stream(PROMPTS, max_new_tokens=M))
    with pytest.raises(ValueError, match=r"stop \(\[''\]\) must be a non-empty string"):
        gen.generate("a", max_new_tokens=M, stop=[""])
    with pytest.raises(ValueError, match="pass seed or rng, not both"):
        gen.generate("a", max_new_tokens=M, seed=1, rng=np.zeros(2, np.uint32))


def test_num_return_sequences_are_generates_rows(gen):
    # n samples of one prompt: the texts of easymamba.generate's repeated rows, same key, decoded by tokenizers
    import jax
    import jax.numpy as jnp

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    ids = tok.encode("ROMEO:").ids
    out = em.generate(gen.model, jnp.asarray([ids]), max_new_tokens=M, do_sample=True, temperature=1.0,
                      rng=jax.random.key(3), num_return_sequences=3, eos_token_id=0, pad_token_id=0)
    want = [tok.decode(row[len(ids):].tolist()) for row in np.asarray(out.sequences)]
    texts = gen.generate("ROMEO:", max_new_tokens=M, do_sample=True, temperature=1.0, seed=3, num_return_sequences=3)
    assert texts == want and len(set(texts)) > 1
    nested = gen.generate(["ROMEO:", "JULIET:"], max_new_tokens=M, do_sample=True, seed=3, num_return_sequences=2)
    assert [len(x) for x in nested] == [2, 2]
    with pytest.raises(ValueError, match="needs sampling"):
        gen.generate("ROMEO:", max_new_tokens=M, num_return_sequences=2)
