"""MambaConfig against transformers' MambaConfig: defaults, JSON round trips, the hub's mixed layout, the original
mamba_ssm layout, validation messages and the refusal of keys that could change the model."""

import dataclasses
import json
import math

import pytest
import transformers

from easymamba.config import Mamba2Config, MambaConfig

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8)

# state-spaces/mamba-130m-hf's config.json (transformers 4.39 wrote it; the original layout's keys ride along).
MAMBA_130M_HF = {
    "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "d_inner": 1536, "d_model": 768,
    "eos_token_id": 0, "expand": 2, "fused_add_norm": True, "hidden_act": "silu", "hidden_size": 768,
    "initializer_range": 0.1, "intermediate_size": 1536, "layer_norm_epsilon": 1e-05, "model_type": "mamba",
    "n_layer": 24, "num_hidden_layers": 24, "pad_token_id": 0, "pad_vocab_size_multiple": 8,
    "rescale_prenorm_residual": False, "residual_in_fp32": True, "rms_norm": True, "ssm_cfg": {},
    "state_size": 16, "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_max": 0.1,
    "time_step_min": 0.001, "time_step_rank": 48, "time_step_scale": 1.0, "torch_dtype": "float32",
    "transformers_version": "4.39.0.dev0", "use_bias": False, "use_cache": True, "use_conv_bias": True,
    "vocab_size": 50280,
}
# state-spaces/mamba-130m's original config.json.
MAMBA_130M_ORIGINAL = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
                       "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}


def test_defaults_are_transformers_defaults():
    hf = transformers.MambaConfig().to_dict()
    ours = MambaConfig()
    for f in dataclasses.fields(MambaConfig):
        expected = hf[f.name]
        if f.name == "time_step_rank":
            assert ours.resolved_time_step_rank == expected == 48 and ours.time_step_rank == "auto"
        else:
            assert getattr(ours, f.name) == expected, f.name
    assert set(ours.to_hf()) <= set(hf)  # every key we write, transformers writes too
    assert ours.intermediate_size == hf["intermediate_size"] == 1536
    assert ours.x_proj_size == 48 + 2 * 16
    assert MambaConfig.model_type == "mamba" and Mamba2Config.model_type == "mamba2"


def test_hf_round_trips():
    c = MambaConfig(**SMALL, time_step_rank=5, tie_word_embeddings=False, use_bias=True, eos_token_id=[2, 3])
    assert c.eos_token_id == (2, 3) and hash(c) == hash(MambaConfig.from_hf(c.to_hf()))
    assert MambaConfig.from_hf(c.to_hf()) == c
    hf = transformers.MambaConfig(**{k: v for k, v in c.to_hf().items() if k not in ("architectures",)})
    assert MambaConfig.from_hf(hf.to_dict()) == c
    assert MambaConfig.from_hf(json.loads(c.to_json_string())) == c
    # transformers saves time_step_rank resolved; equal to ceil(d / 16) it reads back as "auto"
    auto = MambaConfig(**SMALL)
    assert auto.to_hf()["time_step_rank"] == 2
    assert MambaConfig.from_hf(transformers.MambaConfig(**SMALL).to_dict()) == auto


def test_save_and_read_from_directory(tmp_path):
    c = MambaConfig(**SMALL, use_conv_bias=False)
    path = c.save(tmp_path / "ckpt")
    assert path.name == "config.json"
    assert MambaConfig.from_hf(tmp_path / "ckpt") == c == MambaConfig.from_hf(path)
    loaded = transformers.MambaConfig.from_pretrained(tmp_path / "ckpt")
    assert loaded.intermediate_size == 64 and loaded.use_conv_bias is False and loaded.time_step_rank == 2


def test_hub_mamba_130m_hf_config():
    c = MambaConfig.from_hf(MAMBA_130M_HF)
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size) == (768, 24, 50280, 1536)
    assert c.time_step_rank == "auto" and c.resolved_time_step_rank == 48 and c.tie_word_embeddings


def test_original_mamba_130m_config(tmp_path):
    c = MambaConfig.from_hf(MAMBA_130M_ORIGINAL)
    assert c == MambaConfig.from_hf(MAMBA_130M_HF)  # the conversion script's result, vocab padded to 50280
    (tmp_path / "config.json").write_text(json.dumps(MAMBA_130M_ORIGINAL))
    assert MambaConfig.from_hf(tmp_path) == c


def test_original_ssm_cfg_mapping():
    ssm = {"layer": "Mamba1", "d_state": 4, "d_conv": 3, "expand": 3, "dt_rank": 7, "dt_min": 0.002, "dt_max": 0.2,
           "dt_init": "constant", "dt_scale": 2.0, "dt_init_floor": 1e-3, "conv_bias": False, "bias": True,
           "use_fast_path": True, "layer_idx": None}
    c = MambaConfig.from_hf({"d_model": 64, "n_layer": 3, "vocab_size": 1001, "ssm_cfg": ssm, "tie_embeddings": False,
                             "residual_in_fp32": False, "pad_vocab_size_multiple": 16})
    assert (c.state_size, c.conv_kernel, c.expand, c.time_step_rank) == (4, 3, 3, 7)
    assert (c.time_step_min, c.time_step_max, c.time_step_floor, c.time_step_scale) == (0.002, 0.2, 1e-3, 2.0)
    assert (c.time_step_init_scheme, c.use_conv_bias, c.use_bias) == ("constant", False, True)
    assert (c.tie_word_embeddings, c.residual_in_fp32, c.vocab_size) == (False, False, 1008)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_model": 512}, r"d_model \(512\) must equal hidden_size \(768\): .*two different models"),
        ({"n_layer": 12}, r"n_layer \(12\) must equal num_hidden_layers \(24\)"),
        ({"d_inner": 3072}, r"d_inner \(3072\) must equal intermediate_size \(1536\)"),
        ({"intermediate_size": 3072}, r"d_inner \(1536\) must equal intermediate_size \(3072\)"),
        ({"rms_norm": False}, r"rms_norm \(False\) must be True: .*no LayerNorm variant"),
        ({"ssm_cfg": {"d_state": 32}}, r"ssm_cfg.d_state \(32\) must equal state_size \(16\)"),
        ({"ssm_cfg": {"dt_rank": 40}}, r"ssm_cfg.dt_rank \(40\) must equal time_step_rank \(48\)"),
        ({"ssm_cfg": {"layer": "Mamba2"}}, r"Mamba-2 checkpoint; load it with Mamba2Config"),
        ({"ssm_cfg": []}, r"ssm_cfg \(\[\]\) must be a JSON object"),
        ({"pad_vocab_size_multiple": 0}, r"pad_vocab_size_multiple \(0\) must be a positive integer"),
        ({"layer_types": ["mamba"] * 23}, r"layer_types has 23 entries but num_hidden_layers is 24"),
        ({"layer_types": ["attention"] * 24}, r"layer_types .* must contain only .*Mamba-1 model"),
        ({"model_type": "mamba2"}, r"Mamba-2 config: load it with Mamba2Config, not MambaConfig"),
        ({"model_type": "falcon_mamba"}, r"model_type \('falcon_mamba'\) must be 'mamba'"),
        ({"num_heads": 24}, r"the config has keys that MambaConfig does not handle: 'num_heads'.*may differ"),
        ({"use_rms_norm_bc_dt": True}, r"'use_rms_norm_bc_dt'.*may differ"),
    ],
)
def test_hf_layout_refusals(changes, message):
    with pytest.raises(ValueError, match=message):
        MambaConfig.from_hf({**MAMBA_130M_HF, **changes})


def test_stored_intermediate_size_wins_over_expand():
    """transformers' rule: MambaModel builds its mixer from a stored intermediate_size (HF's own Mamba-1 test
    config stores 32 with hidden_size 32, expand 2), and writes it back."""
    hf = transformers.MambaConfig(hidden_size=32, intermediate_size=32, expand=2, state_size=16,
                                  num_hidden_layers=2, vocab_size=99)
    assert hf.intermediate_size == 32
    ours = MambaConfig.from_hf(hf.to_dict())
    assert ours.intermediate_size == 32 and ours.expand == 2
    assert ours.to_hf()["intermediate_size"] == 32
    assert MambaConfig.from_hf(json.loads(ours.to_json_string())) == ours
    # The hub's legacy d_inner rides along; it must agree with the stored value, not with expand * hidden_size.
    c = MambaConfig.from_hf({**MAMBA_130M_HF, "intermediate_size": 3072, "d_inner": 3072})
    assert (c.intermediate_size, c.expand, c.hidden_size) == (3072, 2, 768)
    # A differing stored value survives replace; a derived one follows the new sizes.
    assert ours.replace(hidden_size=48).intermediate_size == 32
    assert MambaConfig(**SMALL).replace(expand=3).intermediate_size == 96
    assert MambaConfig(**SMALL) == MambaConfig(**SMALL, intermediate_size=64)
    with pytest.raises(ValueError, match=r"intermediate_size \(0\) must be positive"):
        MambaConfig(**SMALL, intermediate_size=0)


def test_hf_layout_harmless_keys_and_ssm_cfg_that_agrees():
    d = {**MAMBA_130M_HF, "ssm_cfg": {"layer": "Mamba1", "d_state": 16, "dt_rank": "auto", "expand": 2},
         "use_mambapy": True, "id2label": {"0": "a"}, "max_length": 20, "layer_types": ["mamba"] * 24}
    assert MambaConfig.from_hf(d) == MambaConfig.from_hf(MAMBA_130M_HF).replace(use_mambapy=True)


@pytest.mark.parametrize(
    "changes, ssm, message",
    [
        ({}, {"layer": "Mamba2"}, r"ssm_cfg.layer is 'Mamba2': this is a Mamba-2 checkpoint"),
        ({}, {"layer": "Mamba3"}, r"ssm_cfg.layer \('Mamba3'\) must be 'Mamba1' or absent"),
        ({}, {"headdim": 64}, r"ssm_cfg has keys that MambaConfig does not handle: 'headdim'"),
        ({"norm_epsilon": 1e-6}, None, r"mamba_ssm config has keys that MambaConfig does not handle: 'norm_epsilon'"),
        ({"d_intermediate": 1536}, None, r"d_intermediate \(1536\) must be 0: .*MLP.*Mamba-1 model"),
        ({"attn_layer_idx": [3]}, None, r"attn_layer_idx \(\[3\]\) must be empty: hybrid attention"),
        ({"rms_norm": False}, None, r"rms_norm \(False\) must be True"),
        ({"pad_vocab_size_multiple": 0}, None, r"pad_vocab_size_multiple \(0\) must be integers, the multiple pos"),
        ({"model_type": "mamba2"}, None, r"Mamba-2 config: load it with Mamba2Config"),
        ({}, {"dt_init": "xavier"}, r"time_step_init_scheme \('xavier'\) must be one of \('random', 'constant'\)"),
    ],
)
def test_original_layout_refusals(changes, ssm, message):
    cfg = {**MAMBA_130M_ORIGINAL, **changes}
    if ssm is not None:
        cfg["ssm_cfg"] = ssm
    with pytest.raises(ValueError, match=message):
        MambaConfig.from_hf(cfg)


def test_mamba2_config_points_mamba1_configs_to_mamba_config():
    with pytest.raises(ValueError, match=r"Mamba-1 config: load it with MambaConfig"):
        Mamba2Config.from_hf(MAMBA_130M_HF)
    with pytest.raises(ValueError, match=r"Mamba-1 checkpoint; load it with MambaConfig"):
        Mamba2Config.from_hf(MAMBA_130M_ORIGINAL)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 0}, r"hidden_size \(0\) must be positive"),
        ({"vocab_size": -3}, r"vocab_size \(-3\) must be positive"),
        ({"state_size": 1.5}, r"state_size \(1\.5\) must be an integer"),
        ({"num_hidden_layers": True}, r"num_hidden_layers \(True\) must be an integer"),
        ({"expand": 0}, r"expand \(0\) must be positive"),
        ({"conv_kernel": 0}, r"conv_kernel \(0\) must be positive"),
        ({"use_bias": 1}, r"use_bias \(1\) must be True or False"),
        ({"use_mambapy": "no"}, r"use_mambapy \('no'\) must be True or False"),
        ({"tie_word_embeddings": None}, r"tie_word_embeddings \(None\) must be True or False"),
        ({"layer_norm_epsilon": "1e-5"}, r"layer_norm_epsilon \('1e-5'\) must be a number"),
        ({"time_step_scale": None}, r"time_step_scale \(None\) must be a number"),
        ({"layer_norm_epsilon": 0.0}, r"layer_norm_epsilon \(0\.0\) must be > 0"),
        ({"time_step_min": 0.0}, r"time_step_min \(0\.0\) must be > 0"),
        ({"time_step_max": -1}, r"time_step_max \(-1\.0\) must be > 0"),
        ({"time_step_min": 0.5, "time_step_max": 0.1}, r"time_step_min \(0\.5\) must be <= time_step_max \(0\.1\)"),
        ({"time_step_floor": -1.0}, r"time_step_floor \(-1\.0\) must be >= 0"),
        ({"time_step_rank": "big"}, r"time_step_rank \('big'\) must be 'auto' or a positive integer"),
        ({"time_step_rank": 0}, r"time_step_rank \(0\) must be 'auto' or a positive integer"),
        ({"time_step_init_scheme": "xavier"}, r"time_step_init_scheme \('xavier'\) must be one of"),
        ({"hidden_act": "gelu"}, r"hidden_act \('gelu'\) must be 'silu': the Mamba-1 mixer"),
        ({"eos_token_id": []}, r"eos_token_id \(\[\]\) must be an integer, a non-empty list"),
        ({"pad_token_id": 1.0}, r"pad_token_id \(1\.0\) must be an integer or None"),
        ({"bos_token_id": "1"}, r"bos_token_id \('1'\) must be an integer or None"),
    ],
)
def test_validation_messages(changes, message):
    with pytest.raises(ValueError, match=message):
        MambaConfig(**{**SMALL, **changes})


def test_replace_validates_and_floats_normalise():
    c = MambaConfig(**SMALL, time_step_scale=2)
    assert c.time_step_scale == 2.0 and isinstance(c.time_step_scale, float)
    assert c.replace(hidden_size=48).intermediate_size == 96
    with pytest.raises(ValueError, match=r"hidden_size \(0\) must be positive"):
        c.replace(hidden_size=0)
    assert MambaConfig(**{**SMALL, "hidden_size": 100}).resolved_time_step_rank == math.ceil(100 / 16) == 7


def test_from_hf_rejects_other_types():
    with pytest.raises(TypeError, match="dict or a path"):
        MambaConfig.from_hf(42)  # type: ignore[arg-type]


def test_config_from_hf_picks_the_family():
    from easymamba.models import config_from_hf

    assert type(config_from_hf(MAMBA_130M_HF)) is MambaConfig
    assert type(config_from_hf(MAMBA_130M_ORIGINAL)) is MambaConfig  # no ssm_cfg.layer: mamba_ssm's Mamba1
    assert config_from_hf(MambaConfig(**SMALL).to_hf()) == MambaConfig(**SMALL)
    mamba2 = Mamba2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=1)
    assert config_from_hf(mamba2.to_hf()) == mamba2
    assert type(config_from_hf({**MAMBA_130M_ORIGINAL, "ssm_cfg": {"layer": "Mamba2"}})) is Mamba2Config
    no_type = {k: v for k, v in mamba2.to_hf().items() if k not in ("model_type", "architectures")}
    assert config_from_hf(no_type) == mamba2
    with pytest.raises(ValueError, match=r"model_type \('llama'\) must be 'mamba2' \(Mamba2Config\) or 'mamba'"):
        config_from_hf({"model_type": "llama"})
