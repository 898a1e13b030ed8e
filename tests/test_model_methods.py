"""Hugging Face's methods on every causal LM: `from_pretrained` (HF and orbax directories, refusing another
family's), `save_pretrained` with `generation_config.json`, `num_parameters` against transformers' count, and
the `generation_config.json` reader. No generation here (test_generation.py runs `model.generate`)."""

import json

import pytest

import easymamba as em
from easymamba.config.generation import GenerationDefaults
from easymamba.models import CausalLM
from helpers import random_hf_model, to_easymamba


@pytest.mark.parametrize("tie", [True, False])
def test_num_parameters_counts_as_transformers(tie):
    hf = random_hf_model(seed=3, tie_word_embeddings=tie)
    model = to_easymamba(hf)
    for exclude in (False, True):
        assert model.num_parameters(exclude_embeddings=exclude) == hf.num_parameters(exclude_embeddings=exclude)
    assert model.num_parameters(only_trainable=True) == hf.num_parameters(only_trainable=True)


def test_from_pretrained_save_pretrained_round_trip_and_family_check(tmp_path):
    model = to_easymamba(random_hf_model(seed=4))
    model.generation_config = GenerationDefaults.from_hf({"max_new_tokens": 5, "eos_token_id": [2, 3],
                                                          "num_beams": 1, "transformers_version": "5.25.0"})
    hf_dir = model.save_pretrained(tmp_path / "hf")
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == [2, 3]
    loaded = em.Mamba2ForCausalLM.from_pretrained(hf_dir)
    assert type(loaded) is em.Mamba2ForCausalLM and loaded.generation_config == model.generation_config
    assert em.state_dict(loaded).keys() == em.state_dict(model).keys()
    em.save_checkpoint(model, tmp_path / "orbax")
    from_orbax = CausalLM.from_pretrained(tmp_path / "orbax")
    assert type(from_orbax) is em.Mamba2ForCausalLM  # the base reads any family
    assert from_orbax.generation_config == model.generation_config  # saved with the orbax checkpoint too
    with pytest.raises(ValueError, match=r"holds a Mamba2ForCausalLM \(model_type 'mamba2'\), not a "
                                         r"MambaForCausalLM \(model_type 'mamba'\)"):
        em.MambaForCausalLM.from_pretrained(hf_dir)
    with pytest.raises(ValueError, match="not a NemotronHForCausalLM"):
        em.NemotronHForCausalLM.from_pretrained(tmp_path / "orbax")
    assert model.generation_config is not None
    model.generation_config = None
    assert model.generation_config is None


def test_generation_config_json_reader():
    d = GenerationDefaults.from_hf({"do_sample": True, "temperature": 0.7, "top_k": 50, "eos_token_id": [1, 2],
                                    "num_beams": 1, "typical_p": 1, "use_cache": True, "bos_token_id": 1})
    assert d.settings() == {"do_sample": True, "temperature": 0.7, "top_k": 50, "eos_token_id": (1, 2)}
    assert d.to_hf()["eos_token_id"] == [1, 2] and d.to_hf()["use_cache"] is True
    # silent on top_k: transformers' GenerationConfig default (50) is implied, and not written back
    silent = GenerationDefaults.from_hf({"do_sample": True, "temperature": 0.7})
    assert silent.top_k == 50 and silent.to_hf() == {"do_sample": True, "temperature": 0.7}
    import transformers  # generate fills a config's unset fields from these (transformers 5.25)
    assert transformers.GenerationConfig._get_default_generation_params()["top_k"] == silent.top_k
    for raw, message in [({"num_beams": 4}, r"sets num_beams = 4, which easymamba's decode loop does not do"),
                         ({"no_repeat_ngram_size": 3}, r"sets no_repeat_ngram_size = 3"),
                         ({"top_k": -1}, r"top_k \(-1\) must be an integer >= 0"),
                         ({"eos_token_id": []}, r"eos_token_id \(\[\]\) must be a non-negative integer"),
                         ({"max_new_tokens": 0}, r"max_new_tokens \(0\) must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message):
            GenerationDefaults.from_hf(raw)
