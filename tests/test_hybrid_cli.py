"""`easymamba generate --model DIR` and `easymamba convert` on a directory transformers saved, for each hybrid
family the CLI tests of its own file do not cover (Nemotron-H and Falcon-Mamba have theirs): the printed tokens
are transformers' greedy ones, and HF -> orbax -> HF gives back every tensor bit for bit."""

import numpy as np
import pytest
import torch
from helpers_falcon_h1 import random_hf_falcon_h1
from helpers_hybrid import random_hf_model
from helpers_zamba2 import random_hf_zamba2
from safetensors.numpy import load_file

from easymamba.cli import main

BUILDERS = {
    "bamba": lambda: random_hf_model("bamba", seed=21),
    "granitemoehybrid": lambda: random_hf_model("granitemoehybrid", seed=22),
    "jamba": lambda: random_hf_model("jamba", seed=23),
    "falcon_h1": lambda: random_hf_falcon_h1(seed=24, time_step_limit=(0.0, float("inf"))),
    "zamba2": lambda: random_hf_zamba2(seed=25),
}


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_cli_generate_and_convert(model_type, tmp_path, capsys):
    hf = BUILDERS[model_type]()
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    assert main(["generate", "--model", str(path), "--ids", "5,6,7", "--max-new-tokens", "4", "--temperature", "0",
                 "--no-stream"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    eos = hf.config.eos_token_id
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)[0].tolist()
    n = len(printed)
    assert printed == ref[:n] and n >= 4, (printed, ref)                 # it stops early only at an EOS id
    assert main(["convert", str(path), str(tmp_path / "orbax")]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after), model_type
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
