"""`easymamba convert`: HF -> orbax -> HF gives the same tensors bit for bit (names, dtypes, bytes, config),
a torch .bin converts to safetensors that transformers loads, and bad input exits 1 with a message."""

import json

import numpy as np
import pytest
import safetensors
import torch
import transformers

import easymamba as em
from easymamba.checkpoints import orbax_io as orbax_checkpoint
from easymamba.checkpoints.sources import SafetensorsSource
from easymamba.cli import main
from helpers import hf_logits, random_hf_model, random_ids, rel_err


def read_all(directory) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes) for every tensor of an HF directory, via our reader."""
    with SafetensorsSource(directory) as ckpt:
        return {n: (ckpt.info(n).dtype, ckpt.info(n).shape, ckpt.read(n).tobytes()) for n in ckpt.names()}


@pytest.mark.parametrize("dtype,overrides,shard", [
    (torch.bfloat16, dict(n_groups=2, tie_word_embeddings=True), "20KB"),
    (torch.float32, dict(n_groups=1, use_bias=True), None),
])
def test_hf_orbax_hf_round_trip_is_identical(tmp_path, capsys, dtype, overrides, shard):
    hf_model = random_hf_model(seed=12, **overrides).to(dtype)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    hf_model.save_pretrained(tmp_path / "hf", **kwargs)

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert orbax_checkpoint.is_checkpoint(tmp_path / "orbax")
    err = capsys.readouterr().err
    n = len(read_all(tmp_path / "hf"))
    assert f"{n}/{n}" in err and "converted" in err, err  # the progress bar counted every tensor

    back = ["convert", str(tmp_path / "orbax"), str(tmp_path / "out")] + ([] if shard is None else
                                                                          ["--max-shard-size", shard])
    assert main(back) == 0
    assert read_all(tmp_path / "out") == read_all(tmp_path / "hf")
    assert em.Mamba2Config.from_hf(tmp_path / "out") == em.Mamba2Config.from_hf(tmp_path / "hf")
    # The reference reader agrees with ours on the written files.
    with safetensors.safe_open(sorted((tmp_path / "out").glob("*.safetensors"))[0], "pt") as f:
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), hf_model.state_dict()[name]), name


def test_state_spaces_bin_to_safetensors(tmp_path):
    hf_model = random_hf_model(seed=13, vocab_size=96, n_groups=2, tie_word_embeddings=True)
    (tmp_path / "ss").mkdir()
    sd = hf_model.state_dict()
    sd["backbone.embedding.weight"] = sd.pop("backbone.embeddings.weight")
    torch.save(sd, tmp_path / "ss" / "pytorch_model.bin")
    (tmp_path / "ss" / "config.json").write_text(json.dumps({
        "d_model": 32, "n_layer": 2, "vocab_size": 90, "pad_vocab_size_multiple": 16, "tie_embeddings": True,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 8}}))
    assert main(["convert", str(tmp_path / "ss"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = random_ids(np.random.default_rng(2), 2, 9, 90)
    assert rel_err(hf_logits(loaded, ids), hf_logits(hf_model, ids)) <= 1e-6  # same weights, same torch code


def test_bad_input_exits_1_with_a_message(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1
    assert "is neither an HF checkpoint directory" in capsys.readouterr().err

    hf_model = random_hf_model(seed=14)
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "busy")]) == 1
    assert "refusing to write into it" in capsys.readouterr().err

    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x05")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "new")]) == 1
    assert "model.safetensors is truncated" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
