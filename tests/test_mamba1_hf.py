"""Mamba-1 checkpoints through the shared loader (`easymamba.checkpoints`, picked by `model_type`): round trips through
transformers both ways, tied and untied, one file and sharded; the state-spaces layout; `easymamba convert`;
and the errors a wrong checkpoint gets.

Tolerances: our logits against transformers' at 1e-5 relative in float32 (different summation orders between
XLA and torch move them by ~3e-7, test_mamba1_parity; a wrong or misplaced tensor moves them by 1e-2 or more).
A checkpoint we write and transformers reads back must give transformers' own logits to 1e-6 (the same
weights through the same torch code; measured 0): tensors are written bit for bit.
"""

import functools
import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx
from helpers import hf_logits, random_ids, rel_err
from helpers_mamba1 import random_hf_mamba
from test_convert_cli import read_all

import easymamba as em
from easymamba.checkpoints import orbax_io as orbax_checkpoint
from easymamba.cli import main
from easymamba.models import family_of

TOL = 1e-5
IDS = random_ids(np.random.default_rng(0), 2, 11, 96)

CASES = {
    # name: (HF config overrides, max_shard_size for both writers or None for one file)
    "tied_sharded": (dict(tie_word_embeddings=True, vocab_size=96), "20KB"),
    "untied_bias_single_file": (dict(tie_word_embeddings=False, use_bias=True, vocab_size=96), None),
}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def our_logits(model, ids=IDS) -> np.ndarray:
    """Through one module-level jit, so models of equal configs compile once for the whole file."""
    return np.asarray(_forward(*nnx.split(model), ids))


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    """(name, random HF model, its save_pretrained directory, its logits on IDS)."""
    overrides, shard = CASES[request.param]
    hf_model = random_hf_mamba(seed=len(request.param), **overrides)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf_model.save_pretrained(path, **({} if shard is None else {"max_shard_size": shard}))
    return request.param, hf_model, path, hf_logits(hf_model, IDS)


def test_transformers_checkpoint_loads_and_ours_loads_in_transformers(hf_case, tmp_path):
    name, hf_model, path, want = hf_case
    shard = CASES[name][1]
    assert (path / "model.safetensors.index.json").is_file() == (shard is not None)
    model = em.from_pretrained(path)
    assert isinstance(model, em.MambaForCausalLM) and family_of(model).model_type == "mamba"
    assert model.config == em.MambaConfig.from_hf(hf_model.config.to_dict())
    assert rel_err(our_logits(model), want) <= TOL

    # our state dict is transformers' tensor for tensor (a tied model has no lm_head.weight, as HF writes it)
    theirs = {k: v.numpy() for k, v in hf_model.state_dict().items()
              if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    ours = em.state_dict(model)
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)

    out = em.save_pretrained(model, tmp_path / "ours", **({} if shard is None else {"max_shard_size": shard}))
    assert (out / "model.safetensors.index.json").is_file() == (shard is not None)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mamba"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is transformers.MambaForCausalLM
    assert rel_err(hf_logits(back, IDS), want) <= 1e-6
    assert em.MambaConfig.from_hf(back.config.to_dict()) == model.config


def test_hf_test_config_with_stored_intermediate_size(tmp_path):
    """transformers' own Mamba-1 test config stores intermediate_size 32 beside hidden_size 32, expand 2, and
    transformers builds the mixer from the stored value (in_proj [64, 32]): we load that checkpoint, match its
    logits (cached decode included), and write one transformers reads back with the same width."""
    hf_model = random_hf_mamba(seed=21, vocab_size=99, hidden_size=32, intermediate_size=32, expand=2,
                               state_size=16, num_hidden_layers=2)
    assert tuple(hf_model.backbone.layers[0].mixer.in_proj.weight.shape) == (64, 32)
    hf_model.save_pretrained(tmp_path / "hf")
    model = em.from_pretrained(tmp_path / "hf")
    assert isinstance(model, em.MambaForCausalLM)
    assert (model.config.intermediate_size, model.config.expand, model.config.hidden_size) == (32, 2, 32)
    want = hf_logits(hf_model, IDS)
    assert rel_err(our_logits(model), want) <= TOL

    # prefill then one cached step: the cache is sized by the stored width too
    cache = model.init_cache(IDS.shape[0])
    step = model(IDS[:, :-1], cache=cache)
    step = model(IDS[:, -1:], cache=step.cache)
    assert rel_err(np.asarray(step.logits[:, 0]), want[:, -1]) <= TOL

    out = em.save_pretrained(model, tmp_path / "ours")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 32
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert tuple(back.backbone.layers[0].mixer.in_proj.weight.shape) == (64, 32)
    assert rel_err(hf_logits(back, IDS), want) <= 1e-6
    assert em.MambaConfig.from_hf(back.config.to_dict()) == model.config


def test_state_spaces_layout_safetensors(tmp_path):
    """The original mamba_ssm layout: `d_model` / `n_layer` / `ssm_cfg` without `layer` (mamba_ssm's Mamba1),
    the vocabulary padded to `pad_vocab_size_multiple`, `backbone.embedding.weight` and a tied `lm_head.weight`
    stored beside it (as mamba_ssm saves it), in safetensors."""
    hf_model = random_hf_mamba(seed=len("tied_sharded"), **CASES["tied_sharded"][0])  # the same weights
    sd = {k: v.clone().contiguous() for k, v in hf_model.state_dict().items()}
    sd["backbone.embedding.weight"] = sd.pop("backbone.embeddings.weight")
    assert torch.equal(sd["lm_head.weight"], sd["backbone.embedding.weight"])
    (tmp_path / "ss").mkdir()
    safetensors.torch.save_file(sd, tmp_path / "ss" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ss" / "config.json").write_text(json.dumps({
        "d_model": 32, "n_layer": 2, "vocab_size": 90, "pad_vocab_size_multiple": 16, "tie_embeddings": True,
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "ssm_cfg": {"d_state": 8}}))
    model = em.from_pretrained(tmp_path / "ss")
    assert isinstance(model, em.MambaForCausalLM) and model.config.vocab_size == 96
    assert rel_err(our_logits(model), hf_logits(hf_model, IDS)) <= TOL


@pytest.mark.parametrize("hf_case", ["tied_sharded"], indirect=True)  # one case: the path is family-independent
def test_convert_cli_hf_orbax_hf_is_identical(hf_case, tmp_path, capsys):
    """`easymamba convert` on a Mamba-1 directory: HF -> orbax -> HF gives back the same bytes and config."""
    _, _, path, want = hf_case
    assert main(["convert", str(path), str(tmp_path / "orbax")]) == 0
    assert orbax_checkpoint.is_checkpoint(tmp_path / "orbax")
    assert isinstance(orbax_checkpoint.checkpoint_config(tmp_path / "orbax"), em.MambaConfig)
    assert rel_err(our_logits(orbax_checkpoint.load_checkpoint(tmp_path / "orbax")), want) <= TOL
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "out"), "--max-shard-size", "20KB"]) == 0
    assert "converted" in capsys.readouterr().err
    assert read_all(tmp_path / "out") == read_all(path)
    assert em.MambaConfig.from_hf(tmp_path / "out") == em.MambaConfig.from_hf(path)


# ---- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hf_case", ["untied_bias_single_file"], indirect=True)
def test_unknown_model_type_is_refused_by_name(hf_case, tmp_path):
    _, _, path, _ = hf_case
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(em.CheckpointError, match=r"config.json has model_type 'llama', which is not a model "
                                                 r"easymamba loads; it loads model_type 'mamba2' "
                                                 r"\(Mamba2ForCausalLM\), 'mamba' \(MambaForCausalLM\)"):
        em.from_pretrained(tmp_path / "llama")


def test_config_contradicting_the_tensors_is_named():
    """Each Mamba-1 size the tensors contradict is named with the tensor and the value its shape implies; the
    model is left untouched."""
    hf_model = random_hf_mamba(seed=3, vocab_size=96, state_size=16, time_step_rank=5)
    wrong = em.MambaConfig.from_hf({**hf_model.config.to_dict(), "state_size": 8, "time_step_rank": 4})
    model = nnx.eval_shape(lambda: em.MambaForCausalLM(wrong, rngs=nnx.Rngs(0)))
    with pytest.raises(em.CheckpointError) as info:
        em.load_state_dict(model, hf_model.state_dict())
    message = str(info.value)
    assert ("says state_size = 8, but backbone.layers.0.mixer.A_log in the state dict has shape (64, 16), which "
            "means state_size = 16") in message, message
    assert ("says time_step_rank = 4, but backbone.layers.0.mixer.x_proj.weight in the state dict has shape "
            "(37, 64), which means time_step_rank = 37 - 2 * state_size = 5") in message, message
    # a Mamba-2 state dict is not a Mamba-1 one: the key table names what is missing
    mamba2 = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=16, n_groups=1,
        tie_word_embeddings=True))
    right = em.MambaConfig.from_hf(hf_model.config.to_dict())
    model = nnx.eval_shape(lambda: em.MambaForCausalLM(right, rngs=nnx.Rngs(0)))
    with pytest.raises(em.CheckpointError, match=r"tensor backbone.layers.0.mixer.x_proj.weight is missing from the "
                                                 r"state dict \(and 5 more"):
        em.load_state_dict(model, mamba2.state_dict())
