"""FalconH1Config against transformers' FalconH1Config: defaults, round trips through dicts and JSON files for the
tiny test shapes and the published ones, the derived part records, and the refusal of bad values and of keys that
could change the model."""

import dataclasses
import json
import math

import pytest
import transformers
from helpers_falcon_h1 import TINY_A, TINY_B, tiny_hf_falcon_h1_config

from easymamba.config import FalconH1Config
from easymamba.config.parts import AttentionConfig, Mamba2MixerConfig, MLPConfig

# Published shapes. No full config.json of tiiuae's checkpoints is stored where this project can read it; these
# are the values third-party code quotes from them. Falcon-H1-0.5B: a Megatron-Bridge test's copy of its
# config.json (with mamba_d_ssm 1536 = 24 * 64, which transformers' check requires and mlx-lm's defaults for it
# quote); 1.5B and 7B: the architecture fields other projects' tests copy (the rest at transformers' defaults).
FALCON_H1_0_5B = {
    "architectures": ["FalconH1ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_in_multiplier": 1.0, "attention_out_multiplier": 0.9375, "attn_layer_indices": None,
    "embedding_multiplier": 5.656854249492381, "head_dim": 64, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 2048, "key_multiplier": 0.39062499999999994,
    "lm_head_multiplier": 0.0390625, "mamba_chunk_size": 128, "mamba_conv_bias": True, "mamba_d_conv": 4,
    "mamba_d_head": 64, "mamba_d_ssm": 1536, "mamba_d_state": 128, "mamba_expand": 2, "mamba_n_groups": 1,
    "mamba_n_heads": 24, "mamba_norm_before_gate": False, "mamba_proj_bias": False, "mamba_rms_norm": False,
    "mamba_use_mlp": True, "max_position_embeddings": 16384, "mlp_bias": False,
    "mlp_multipliers": [0.8838834764831844, 0.5859375], "model_type": "falcon_h1", "num_attention_heads": 8,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "projectors_bias": False, "rms_norm_eps": 1e-5,
    "rope_scaling": None, "rope_theta": 100000000000.0, "ssm_in_multiplier": 1.25,
    "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
    "ssm_out_multiplier": 0.23570226039551587, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 32784,
}
FALCON_H1_1_5B = {
    "model_type": "falcon_h1", "num_hidden_layers": 24, "hidden_size": 2048, "intermediate_size": 4608,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 65537, "mamba_d_state": 256,
    "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_n_heads": 48, "mamba_d_head": 64, "mamba_d_ssm": 3072,
}
FALCON_H1_7B = {
    "model_type": "falcon_h1", "hidden_size": 3072, "num_hidden_layers": 44, "num_attention_heads": 12,
    "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 130048,
    "tie_word_embeddings": False, "mamba_d_state": 256, "mamba_n_groups": 1, "mamba_n_heads": 24, "mamba_d_head": 128,
    "mamba_d_ssm": 3072, "mamba_expand": 2, "mamba_d_conv": 4, "mamba_chunk_size": 128,
    "max_position_embeddings": 262144, "rope_theta": 1e11, "attn_layer_indices": None,
}
PUBLISHED = {"0.5B": FALCON_H1_0_5B, "1.5B": FALCON_H1_1_5B, "7B": FALCON_H1_7B}
TINY = {"A": TINY_A, "B": TINY_B}

# Keys transformers writes that are bookkeeping, not the model.
_BOOKKEEPING = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "id2label",
                "label2id", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
                "is_encoder_decoder", "problem_type",
                # Keys of the original code that transformers keeps as inert attributes and we read and drop
                # (checked to be the values under which the checkpoint is the network transformers builds).
                "attn_layer_indices", "mamba_use_mlp", "mlp_expansion_factor"}


def _model_keys(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _BOOKKEEPING}


def _hf_from(d: dict) -> transformers.FalconH1Config:
    """transformers' reading of a config.json dict (as `from_pretrained` does)."""
    return transformers.FalconH1Config.from_dict({k: v for k, v in d.items() if k != "model_type"})


def test_defaults_are_transformers_defaults():
    hf = transformers.FalconH1Config().to_dict()
    ours = FalconH1Config()
    for f in dataclasses.fields(FalconH1Config):
        if f.name == "head_dim":
            assert ours.head_dim is None and "head_dim" not in hf
            continue
        expected = hf[f.name]
        value = getattr(ours, f.name)
        assert (list(value) if isinstance(value, tuple) else value) == expected, f.name
    assert ours.mamba_d_head == 8  # "auto" -> mamba_d_ssm // mamba_n_heads = 1024 // 128, as transformers
    assert ours.to_hf() == {**_model_keys(hf), "architectures": ["FalconH1ForCausalLM"]}


@pytest.mark.parametrize("name", list(TINY) + list(PUBLISHED))
def test_round_trip_through_transformers(name, tmp_path):
    if name in TINY:
        hf = tiny_hf_falcon_h1_config(**TINY[name])
    else:
        hf = _hf_from(PUBLISHED[name])
    ours = FalconH1Config.from_hf(hf.to_dict())
    # What we write, transformers reads back to the same config, and we read that back to ours.
    back = _hf_from(ours.to_hf())
    assert _model_keys(back.to_dict()) == _model_keys(hf.to_dict())
    assert FalconH1Config.from_hf(back.to_dict()) == ours
    # Through files: ours -> transformers' from_pretrained, and transformers' save_pretrained -> ours.
    ours.save(tmp_path / "ours")
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    assert isinstance(loaded, transformers.FalconH1Config)
    assert _model_keys(loaded.to_dict()) == _model_keys(hf.to_dict())
    hf.save_pretrained(tmp_path / "theirs")
    assert FalconH1Config.from_hf(tmp_path / "theirs") == ours
    assert hash(ours) == hash(FalconH1Config.from_hf(tmp_path / "theirs"))
    # The file transformers writes encodes infinity as {"__float__": "Infinity"} (5.x); we read it.
    text = (tmp_path / "theirs" / "config.json").read_text()
    if math.isinf(ours.time_step_limit[1]):
        assert '"__float__": "Infinity"' in text
    # Every architecture field transformers reads matches what the published file says.
    if name in PUBLISHED:
        for key, value in PUBLISHED[name].items():
            if key in ("rope_theta",):
                assert ours.rope_parameters == {"rope_type": "default", "rope_theta": value}
            elif hasattr(ours, key) and key != "model_type":
                v = getattr(ours, key)
                assert (list(v) if isinstance(v, tuple) else v) == value, key


def test_published_shapes_derive_the_expected_parts():
    c = FalconH1Config.from_hf(FALCON_H1_0_5B)
    m = c.mixer_config
    assert (m.num_heads, m.head_dim, m.intermediate_size, m.state_size, m.n_groups, m.conv_kernel) == \
        (24, 64, 1536, 128, 1, 4)
    assert (m.gated_norm, m.use_bias, m.out_proj_bias, m.chunk_size) == (False, False, False, 128)
    assert m.zxbcdt_multipliers == tuple(FALCON_H1_0_5B["ssm_multipliers"])
    a = c.attention_config
    assert (a.head_dim, a.num_attention_heads, a.num_key_value_heads, a.rope_theta) == (64, 8, 2, 1e11)
    assert a.scaling == 64 ** -0.5 and a.key_multiplier == 0.39062499999999994
    assert c.mlp_config.gate_multiplier == 0.8838834764831844 and c.mlp_config.down_multiplier == 0.5859375
    c7 = FalconH1Config.from_hf(FALCON_H1_7B)
    assert c7.mixer_config.intermediate_size == 3072 and c7.attention_config.head_dim == 128
    assert c7.attention_config.num_attention_heads * 128 == 1536 != c7.hidden_size  # head_dim * heads != d


@pytest.mark.parametrize("name", list(TINY))
def test_derived_records_tiny(name):
    hf = tiny_hf_falcon_h1_config(**TINY[name])
    c = FalconH1Config.from_hf(hf.to_dict())
    e = hf.mamba_d_ssm if hf.mamba_d_ssm is not None else hf.mamba_expand * hf.hidden_size
    assert c.mamba_intermediate_size == e
    m = c.mixer_config
    assert isinstance(m, Mamba2MixerConfig)
    assert (m.hidden_size, m.num_heads, m.head_dim, m.intermediate_size) == \
        (hf.hidden_size, hf.mamba_n_heads, hf.mamba_d_head, e)
    assert (m.state_size, m.n_groups, m.norm_groups, m.conv_kernel, m.chunk_size) == \
        (hf.mamba_d_state, hf.mamba_n_groups, hf.mamba_n_groups, hf.mamba_d_conv, hf.mamba_chunk_size)
    assert (m.use_bias, m.out_proj_bias, m.use_conv_bias) == \
        (hf.mamba_proj_bias, hf.projectors_bias, hf.mamba_conv_bias)
    assert (m.gated_norm, m.norm_before_gate) == (hf.mamba_rms_norm, hf.mamba_norm_before_gate)
    assert m.layer_norm_epsilon == hf.rms_norm_eps and m.time_step_limit == tuple(hf.time_step_limit)
    assert m.zxbcdt_multipliers == tuple(hf.ssm_multipliers)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    a = c.attention_config
    assert isinstance(a, AttentionConfig)
    assert (a.in_size, a.out_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.rotary_dim) == \
        (hf.hidden_size, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, head_dim, head_dim)
    assert a.scaling == head_dim ** -0.5 and a.key_multiplier == hf.key_multiplier
    assert (a.qkv_bias, a.o_bias) == (hf.attention_bias, hf.attention_bias)
    assert a.rope_theta == hf.rope_parameters["rope_theta"]
    mlp = c.mlp_config
    assert isinstance(mlp, MLPConfig) and mlp.gated and mlp.activation == "silu" and mlp.bias == hf.mlp_bias
    assert (mlp.hidden_size, mlp.intermediate_size) == (hf.hidden_size, hf.intermediate_size)
    assert (mlp.gate_multiplier, mlp.down_multiplier) == tuple(hf.mlp_multipliers)
    assert c.moe_config is None
    assert c.layer_cache_kinds == (("mamba2", "attention"),) * hf.num_hidden_layers
    assert c.layer_types == hf.layer_types
    for k in ("embedding_multiplier", "lm_head_multiplier", "attention_in_multiplier", "attention_out_multiplier",
              "ssm_in_multiplier", "ssm_out_multiplier"):
        assert getattr(c, k) == getattr(hf, k) != 1.0, k


def test_tiny_configs_switch_every_option():
    assert TINY_A.keys() == TINY_B.keys()
    for key in ("mamba_n_groups", "mamba_rms_norm", "tie_word_embeddings", "mamba_proj_bias", "projectors_bias",
                "attention_bias", "mlp_bias", "mamba_conv_bias", "mamba_norm_before_gate", "head_dim", "mamba_d_ssm"):
        assert TINY_A[key] != TINY_B[key], key
    for tiny in (TINY_A, TINY_B):
        values = [tiny[k] for k in tiny if k.endswith("_multiplier")] + tiny["ssm_multipliers"] + \
            tiny["mlp_multipliers"]
        assert 1.0 not in values and len(set(values)) == len(values)


def test_legacy_rope_and_infinity_tags():
    base = {"model_type": "falcon_h1", "rope_theta": 1e11, "rope_scaling": None,
            "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    c = FalconH1Config.from_hf(base)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 1e11} and c.time_step_limit == (0.0, math.inf)
    # (transformers decodes the infinity tag when it reads a file, not in from_dict)
    assert _hf_from({k: v for k, v in base.items() if k != "time_step_limit"}).rope_parameters == c.rope_parameters
    c = FalconH1Config.from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})
    assert c.rope_theta == 123.0
    c = FalconH1Config.from_hf({"rope_scaling": {"type": "default"}, "rope_theta": 7.0})
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 7.0}
    assert json.loads(c.to_json_string())["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    with pytest.raises(TypeError, match="cannot be changed"):
        c.rope_parameters["rope_theta"] = 1.0
    assert FalconH1Config(num_key_value_heads=None).num_key_value_heads == 32


_SHAPE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=32,
              mamba_n_heads=4, mamba_d_state=8, vocab_size=97, num_hidden_layers=2)


@pytest.mark.parametrize("changes, message, hf_refuses", [
    (dict(mamba_n_heads=5), r"mamba_n_heads \(5\) must divide the mixer width \(32", True),
    (dict(mamba_d_head=4), r"mamba_d_head \* mamba_n_heads \(4 \* 4 = 16\) must equal the mixer width \(32\)", True),
    (dict(mamba_d_ssm=None, mamba_expand=1, mamba_n_heads=3), r"mamba_n_heads \(3\) must divide the mixer width", True),
    (dict(mamba_n_groups=3), r"mamba_n_heads \(4\) must be divisible by mamba_n_groups \(3\)", False),
    (dict(num_key_value_heads=3), r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)", False),
    (dict(hidden_act="gelu"), r"hidden_act \('gelu'\) must be 'silu'", False),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), r"rope_type 'linear'", False),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor", False),
    (dict(rope_parameters={"rope_theta": -1.0}), r"rope_theta'\] \(-1.0\) must be a positive number", False),
    (dict(time_step_limit=(0.5, 0.1)), r"time_step_limit \(0.5, 0.1\) must have lower bound <= upper bound", False),
    (dict(time_step_limit=(-0.1, 1.0)), r"time_step_limit lower bound \(-0.1\) must be >= 0", False),
    (dict(ssm_multipliers=[1.0, 1.0]), r"ssm_multipliers \(\[1.0, 1.0\]\) must be 5 finite numbers", False),
    (dict(mlp_multipliers=[1.0, math.nan]), r"mlp_multipliers .* must be 2 finite numbers", False),
    (dict(key_multiplier=math.inf), r"key_multiplier \(inf\) must be finite", False),
    (dict(hidden_size=0), r"hidden_size \(0\) must be positive", False),
    (dict(mamba_rms_norm=1), r"mamba_rms_norm \(1\) must be True or False", True),
    (dict(head_dim=0), r"head_dim \(0\) must be a positive integer or None", False),
    (dict(head_dim=7), r"attention head dim \(7\) must be even", False),
])
def test_bad_values(changes, message, hf_refuses):
    with pytest.raises(ValueError, match=message):
        FalconH1Config(**{**_SHAPE, **changes})
    with pytest.raises(ValueError, match=message):
        FalconH1Config.from_hf({**_SHAPE, **changes})
    if hf_refuses:  # transformers' own check refuses these too
        with pytest.raises(Exception):
            transformers.FalconH1Config(**{**_SHAPE, **changes})


@pytest.mark.parametrize("extra, message", [
    ({"sliding_window": 128}, r"keys that FalconH1Config does not handle: 'sliding_window'"),
    ({"quantization": {"bits": 4}}, r"'quantization'"),
    ({"attn_layer_indices": [0, 2]}, r"attn_layer_indices \(\[0, 2\]\) must be one of \[None\]"),
    ({"mamba_use_mlp": False}, r"mamba_use_mlp \(False\) must be one of \[True\]"),
    ({"layer_types": ["hybrid", "mamba"]}, r"layer_types .* must list 'hybrid' once per layer \(2 layers\)"),
    ({"layer_types": ["hybrid"]}, r"must list 'hybrid' once per layer"),
    ({"time_step_limit": None}, r"time_step_limit \(None\) must be a pair"),
    ({"ssm_out_multiplier": None}, r"ssm_out_multiplier \(None\) must be a number"),
    ({"model_type": "falcon_mamba"}, r"model_type \('falcon_mamba'\) must be 'falcon_h1'"),
    ({"rope_theta": 5.0, "rope_parameters": {"rope_theta": 6.0}}, r"rope_theta \(5.0\) differs"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_type 'dynamic'"),
    ({"time_step_limit": [0.0, "nope"]}, r"time_step_limit .* must hold numbers"),
])
def test_refused_keys(extra, message):
    with pytest.raises(ValueError, match=message):
        FalconH1Config.from_hf({**_SHAPE, **extra})


def test_harmless_keys_are_read():
    c = FalconH1Config.from_hf({**_SHAPE, "mlp_expansion_factor": 8, "attn_layer_indices": None,
                                "mamba_use_mlp": True, "layer_types": ["hybrid", "hybrid"], "torch_dtype": "bfloat16",
                                "transformers_version": "4.53.0", "eos_token_id": [11, 228]})
    assert c == FalconH1Config(**_SHAPE, eos_token_id=(11, 228))
