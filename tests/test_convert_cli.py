"""`easymamba convert` and `easymamba info`: HF -> orbax -> HF gives the same tensors bit for bit (names, dtypes,
bytes), the source's config.json as it was and the tokenizer and generation files beside it; a torch .bin
converts to safetensors that transformers loads; a non-empty destination is refused unless --overwrite; bad
input exits 1 with one line."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors
import torch
import transformers
from flax import nnx

import easymamba as em
from easymamba import cli
from easymamba.checkpoints import orbax_io as orbax_checkpoint
from easymamba.checkpoints.sources import SafetensorsSource
from easymamba.cli import SHIPPED_MODEL, main
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


SIDE_FILES = {"generation_config.json": {"eos_token_id": 0, "pad_token_id": 0, "max_new_tokens": 32},
              "tokenizer_config.json": {"model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"},
              "special_tokens_map.json": {"eos_token": "<|endoftext|>"}}


def shipped_copy(path):
    """The shipped model with a config.json as a user's may be: fields the writer would spell differently
    (time_step_rank 4, not "auto"), one it would add (norm_before_gate) left out, transformers_version, and the
    tokenizer and generation files transformers writes beside it."""
    shutil.copytree(SHIPPED_MODEL, path, ignore=shutil.ignore_patterns("training.json"))
    raw = json.loads((path / "config.json").read_text())
    raw.update(time_step_rank=4, transformers_version="5.25.0")
    del raw["norm_before_gate"]
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    for name, content in SIDE_FILES.items():
        (path / name).write_text(json.dumps(content))
    return raw


def test_convert_keeps_config_json_and_the_files_beside_it(tmp_path, capsys):
    raw = shipped_copy(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    assert "copied tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json" in \
        capsys.readouterr().err
    for out in ("orbax", "back"):
        for name in ("tokenizer.json", *SIDE_FILES):
            assert (tmp_path / out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), (out, name)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back == dict(raw, dtype="bfloat16")           # as it was, plus the dtype the writer records
    assert [k for k in back if k != "dtype"] == list(raw)  # in its order
    assert read_all(tmp_path / "back") == read_all(tmp_path / "hf")

    # the orbax checkpoint generates, with the tokenizer beside it, the HF directory's text
    texts = []
    for model in ("hf", "orbax"):
        assert main(["generate", "ROMEO:", "--model", str(tmp_path / model), "--max-new-tokens", "8",
                     "--temperature", "0", "--json", "--dtype", "float32"]) == 0
        texts.append(json.loads(capsys.readouterr().out)["text"])
    assert texts[0] == texts[1] and texts[0]

    # info reads either form without loading the weights; its count is the loaded model's
    infos = []
    for model in ("hf", "orbax"):
        assert main(["info", str(tmp_path / model), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    loaded = em.from_pretrained(tmp_path / "hf")
    count = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(loaded, nnx.Param)))
    for info in infos:
        assert info["parameters"] == count == 3_640_976 and info["param_dtype"] == "bfloat16"
        assert info["family"] == "mamba2" and info["class"] == "Mamba2ForCausalLM"
        assert info["sizes"] | {"mixer": "mamba2"} == info["sizes"] and info["sizes"]["layers"] == 6
        assert {info["sizes"][k] for k in ("heads", "head_dim", "state_size")} == {8, 64}
        assert set(info["kernels"]) == {"ssd", "causal_conv1d", "causal_conv1d_update", "selective_state_update",
                                        "decode_step"}
    assert [infos[0]["format"], infos[1]["format"]] == ["hf", "orbax"]

    (tmp_path / "orbax" / "tokenizer.json").unlink()
    assert main(["generate", "ROMEO:", "--model", str(tmp_path / "orbax")]) == 1
    assert "orbax has no tokenizer.json, so text cannot be encoded" in capsys.readouterr().err


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "family      mamba2 (Mamba2ForCausalLM, mamba2 mixer)" in out
    assert "parameters  3,640,976 (3.6 M)" in out and "dtype       parameters bfloat16" in out
    assert "  ssd                     xla: " in out  # on CPU, and why


def test_convert_refuses_to_replace_what_dst_holds(tmp_path, capsys):
    """A non-empty DST is refused before the source is read (its broken weights are never reached) and nothing in
    DST is touched; --overwrite replaces only a checkpoint of the output kind."""
    shipped_copy(tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x05")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(tmp_path / "broken"), str(tmp_path / "busy"), *extra]) == 1
        err = capsys.readouterr().err
        assert ("exists and is not empty; refusing" if not extra else "does not hold an orbax checkpoint") in err
        assert "truncated" not in err and os.listdir(tmp_path / "busy") == ["notes.txt"]

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax"), "--overwrite", "--dtype", "float32"]) == 0
    assert [p.name for p in orbax_checkpoint.versions(tmp_path / "orbax")] == ["2"]
    assert em.load_checkpoint(tmp_path / "orbax").backbone.embeddings.weight.dtype == np.float32
    capsys.readouterr()

    (tmp_path / "a-file").write_text("x")
    cases = [([str(tmp_path / "nope"), str(tmp_path / "x")], "nope does not exist"),
             ([str(tmp_path / "a-file"), str(tmp_path / "x")], "a-file is a file, not a checkpoint directory"),
             ([str(tmp_path / "hf"), str(tmp_path / "a-file")], "a-file is a file, not a directory"),
             ([str(tmp_path / "hf"), str(tmp_path / "a-file" / "sub")], "is not a writable directory"),
             ([str(tmp_path / "hf"), str(tmp_path / "hf")], "SRC and DST are the same directory")]
    for argv, message in cases:
        assert main(["convert", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("easymamba: error: ") and err.count("\n") == 1 and message in err, (argv, err)


def test_unreadable_source_and_read_only_destination_are_one_line(tmp_path, capsys, monkeypatch):
    """What the OS refuses (permissions: the tests run as root, so the refusal is injected where the OS would
    raise it) is one line naming the file, not a traceback."""
    shipped_copy(tmp_path / "hf")

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(em.checkpoints, "from_pretrained", refuse)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.endswith(f"easymamba: error: {tmp_path / 'hf'}: Permission denied\n")
    monkeypatch.undo()
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    assert f"cannot write to {tmp_path / 'out'}: {tmp_path} is not a writable directory" in capsys.readouterr().err
