"""`easymamba generate` with the model that ships in the package (offline), in process through `main([...])`
(one JAX start-up for the file); the one thing only a fresh interpreter shows, that `--help` and argument
errors do not start JAX, in one subprocess."""

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

from easymamba import cli
from easymamba.cli import SHIPPED_MODEL, main

ROOT = SHIPPED_MODEL.parents[2]


def test_help_and_argument_errors_do_not_import_jax():
    code = (
        "import sys, time; t = time.perf_counter(); import easymamba.cli as c\n"
        "for argv in (['--help'], ['generate', '--help'], ['generate', 'x', '--top-p', '2']):\n"
        "    try:\n"
        "        c.main(argv)\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code, file=sys.stderr)\n"
        "print('seconds', time.perf_counter() - t, file=sys.stderr)\n"
        "assert 'jax' not in sys.modules and 'easymamba.models' not in sys.modules, sorted(sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("exit 0") == 2 and "exit 2" in proc.stderr
    assert "argument --top-p: must be in [0, 1] (1: off), got 2" in proc.stderr
    assert "usage: easymamba" in proc.stdout and "generate" in proc.stdout
    print(proc.stderr.splitlines()[-1])  # the time, for the record (not asserted: CI machines vary)


def reference_continuation(prompt: str, max_new_tokens: int) -> str:
    """Greedy text after `prompt` from the Python API (tokenizers + from_pretrained + generate)."""
    from easymamba import from_pretrained, generate

    tok = Tokenizer.from_file(str(SHIPPED_MODEL / "tokenizer.json"))
    ids = tok.encode(prompt).ids
    out = generate(from_pretrained(SHIPPED_MODEL), jnp.asarray([ids]), max_new_tokens=max_new_tokens,
                   eos_token_id=0)
    new = np.asarray(out.sequences)[0, len(ids):len(ids) + int(out.num_generated[0])].tolist()
    new = [t for t in new if t != 0]
    return tok.decode(ids + new)[len(tok.decode(ids)):]


def run(capsys, *argv, stdin=None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_text_matches_the_python_api(capsys, monkeypatch):
    expected = reference_continuation("ROMEO:", 8)
    code, out, err = run(capsys, "generate", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0, err
    assert out == "ROMEO:" + expected + "\n"
    assert len(err.splitlines()) == 1 and "tokens/s" in err and err.rstrip().endswith("greedy"), err
    # the same text without streaming, without the echo, from stdin and from `-`
    assert run(capsys, "generate", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0", "--no-stream")[1] == out
    assert run(capsys, "generate", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0",
               "--no-echo")[1] == expected + "\n"
    assert run(capsys, "generate", "--max-new-tokens", "8", "--temperature", "0", stdin="ROMEO:\n",
               monkeypatch=monkeypatch)[1] == out
    assert run(capsys, "generate", "-", "--max-new-tokens", "8", "--temperature", "0", stdin="ROMEO:",
               monkeypatch=monkeypatch)[1] == out


def test_the_command_in_a_pipe_end_to_end(tmp_path):
    # what a shell user runs: the module as a program, the prompt on stdin, JSON on stdout; and a user error
    # (a file given as --model) as one line on stderr and exit 1, no traceback
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "easymamba", "generate", "--max-new-tokens", "8", "--temperature",
                           "0", "--json"], input="ROMEO:\n", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["prompt"] == "ROMEO:" and record["text"] == reference_continuation("ROMEO:", 8)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"not a model")
    proc = subprocess.run([sys.executable, "-m", "easymamba", "generate", "x", "--model", str(a_file)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("easymamba: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "is a file" in proc.stderr, proc.stderr


def test_sampling_prints_its_seed_and_the_seed_repeats_the_run(capsys):
    """Default decoding samples with a fresh seed and prints it; --seed N repeats the run, and samples as the Python
    API does with rng=jax.random.key(N)."""
    from easymamba import from_pretrained, generate

    code, out, err = run(capsys, "generate", "ROMEO:", "--max-new-tokens", "8")
    assert code == 0, err
    seed = err.split("--seed ")[1].split()[0]
    assert "sampled, temperature 0.8" in err and seed.isdigit()
    code, again, err = run(capsys, "generate", "ROMEO:", "--max-new-tokens", "8", "--seed", seed, "--json")
    record = json.loads(again)
    assert code == 0 and out == "ROMEO:" + record["text"] + "\n" and record["seed"] == int(seed)
    # stderr is not a terminal here (captured): the stats line is one line however long, with no colour codes
    assert err.count("\n") == 1 and "\x1b" not in err and len(err) > 80, err
    ref = generate(from_pretrained(SHIPPED_MODEL), jnp.asarray([record["prompt_ids"]]), max_new_tokens=8,
                   do_sample=True, temperature=0.8, eos_token_id=0, pad_token_id=0, rng=jax.random.key(int(seed)))
    assert record["ids"] == [t for t in np.asarray(ref.sequences)[0, 5:].tolist() if t != 0][:len(record["ids"])]


def test_batch_from_a_prompt_file_as_json(capsys, tmp_path):
    """Prompts of different lengths are left-padded into one batch; each row gets its own greedy text."""
    prompts = ["ROMEO:", "JULIET: O Romeo, Romeo"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n")
    code, out, err = run(capsys, "generate", "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens",
                         "8", "--temperature", "0", "--json", "--dtype", "float32")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    tok = Tokenizer.from_file(str(SHIPPED_MODEL / "tokenizer.json"))
    for prompt, record in zip(prompts, records):
        assert record["text"] == reference_continuation(prompt, 8), prompt
        assert record["prompt_ids"] == tok.encode(prompt).ids and record["prompt_tokens"] == len(record["prompt_ids"])
        assert record["generated_tokens"] == len(record["ids"]) == 8 and record["finish_reason"] == "length"
        assert record["seed"] is None and record["dtype"] == "float32" and record["seconds"] > 0
    assert err.startswith("2 prompts, 16 tokens in ")
    # two positional prompts make the same batch; plain text output separates them with a blank line
    code, out, _ = run(capsys, "generate", *prompts, "--max-new-tokens", "8", "--temperature", "0", "--no-echo")
    assert out == "\n\n".join(r["text"] for r in records) + "\n"


def test_model_without_tokenizer_takes_ids(capsys, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(SHIPPED_MODEL / name, tmp_path / name)
    code, _, err = run(capsys, "generate", "hi", "--model", str(tmp_path))
    assert code == 1 and "has no tokenizer.json, so text cannot be encoded" in err and "--ids" in err
    code, out, err = run(capsys, "generate", "--ids", "3,4,5,6,7", "--model", str(tmp_path), "--max-new-tokens", "8",
                         "--temperature", "0", "--no-stream")
    assert code == 0, err
    ids = out.split()
    assert ids[:5] == ["3", "4", "5", "6", "7"] and len(ids) <= 13 and all(t.isdigit() for t in ids)
    code, out, err = run(capsys, "generate", "--ids", "3,4,5,6,7", "--model", str(tmp_path), "--max-new-tokens", "8",
                         "--temperature", "0", "--json", "--dtype", "bfloat16", "--no-echo")
    record = json.loads(out)
    assert code == 0 and record["dtype"] == "bfloat16" and record["prompt"] == "3 4 5 6 7", err
    assert record["text"] == " ".join(map(str, record["ids"])) and 1 <= len(record["ids"]) <= 8


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--temperature", "-1"], "argument --temperature: must be >= 0 (0: greedy), got -1"),
    (["generate", "x", "--top-p", "1.5"], "argument --top-p: must be in [0, 1] (1: off), got 1.5"),
    (["generate", "x", "--top-k", "-2"], "argument --top-k: must be an integer >= 0 (0: off), got -2"),
    (["generate", "x", "--min-p", "nan"], "argument --min-p: must be in [0, 1] (0: off), got nan"),
    (["generate", "x", "--repetition-penalty", "0"], "argument --repetition-penalty: must be > 0 (1: off), got 0"),
    (["generate", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
    (["generate", "x", "--seed", "y"], "argument --seed: expected an integer, got 'y'"),
    (["generate", "x", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
])
def test_flag_errors_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """Anything a user can cause exits 1 with one line `easymamba: error: ...`, before a model is loaded."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "badtok").mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(SHIPPED_MODEL / name, tmp_path / "badtok" / name)
    (tmp_path / "badtok" / "tokenizer.json").write_text('{"model": ')
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "blank.txt").write_text("\n  \n")
    cases = [
        (["generate", ""], "the prompt is empty"),
        (["generate", "a", " "], "the prompt is empty (prompt 2 of 2)"),
        (["generate", "--ids", "1,4096"], "token id 4096 is outside the vocabulary [0, 4096)"),
        (["generate", "--ids", "1,x"], "--ids must be comma-separated integers"),
        (["generate", "hi", "--ids", "1"], "give prompts or --ids, not both"),
        (["generate", "hi", "--model", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
        (["generate", "hi", "--model", str(tmp_path / "a-file")], "a-file is a file, not a model directory"),
        (["generate", "--ids", "1,2", "--model", str(tmp_path / "empty")], "is neither an HF checkpoint directory"),
        (["generate", "hi", "--model", str(tmp_path / "badtok")], "is not a tokenizer the tokenizers library reads"),
        (["generate", "--prompt-file", str(tmp_path / "nope.txt")], "nope.txt: No such file or directory"),
        (["generate", "--prompt-file", str(tmp_path / "blank.txt")], "holds no prompt (only blank lines)"),
        (["info", str(tmp_path / "empty")], "is neither an HF checkpoint directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("easymamba: error: ") and err.count("\n") == 1 and message in err, (argv, err)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["generate"]) == 1 and "the prompt is empty" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_model", interrupted)
    assert main(["generate", "ROMEO:"]) == 130
    assert capsys.readouterr().err == "easymamba: interrupted\n"
