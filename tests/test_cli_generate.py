"""`easymamba generate` end to end in a subprocess, with the model that ships in the package (offline)."""

import os
import shutil
import subprocess
import sys

import pytest

from easymamba.cli import SHIPPED_MODEL


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as a user has
    return subprocess.run([sys.executable, "-m", "easymamba.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_with_the_shipped_model():
    proc = run_cli("generate", "ROMEO:", "--max-new-tokens", "40", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("ROMEO:")
    words = text[len("ROMEO:"):].split()
    assert len(words) >= 10, text                          # 40 BPE tokens of English are >= 10 words
    assert sum(w.strip(".,;:!?'[]").isalpha() for w in words) >= len(words) // 2, text
    assert "tokens/s" in proc.stderr
    # the same seed gives the same text; the non-streaming path prints the same continuation
    again = run_cli("generate", "ROMEO:", "--max-new-tokens", "40", "--seed", "0", "--no-stream")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == text.strip()


@pytest.mark.parametrize("args, message", [
    (("generate", ""), "the prompt is empty"),
    (("generate", "ROMEO:", "--max-new-tokens", "0"), "--max-new-tokens must be >= 1, got 0"),
    (("generate", "--ids", "1,4096"), r"token id 4096 is outside the vocabulary [0, 4096)"),
    (("generate", "--ids", "1,x"), "--ids must be comma-separated integers"),
    (("generate", "hi", "--model", "/nonexistent/model"), "model directory /nonexistent/model does not exist"),
])
def test_generate_errors(args, message):
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr


def test_generate_model_without_tokenizer(tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(SHIPPED_MODEL / name, tmp_path / name)
    proc = run_cli("generate", "hi", "--model", str(tmp_path), timeout=120)
    assert proc.returncode == 1 and "has no tokenizer.json; give token ids with --ids" in proc.stderr
    proc = run_cli("generate", "--ids", "3,4,5", "--model", str(tmp_path), "--max-new-tokens", "4",
                   "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    assert ids[:3] == ["3", "4", "5"] and len(ids) <= 7 and all(t.isdigit() for t in ids)


def test_version():
    proc = run_cli("--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("easymamba ")
