"""Mamba2Config against transformers' Mamba2Config: defaults, JSON round trips, the original mamba_ssm
layout, validation messages and the refusal of keys that could change the model."""

import dataclasses
import json
import math

import pytest
import transformers

from easymamba.config import Mamba2Config

INF = float("inf")

# A small valid config (d=64, e=128, h=8, p=16, g=2) so that round trips exercise non-default values.
SMALL = dict(num_heads=8, head_dim=16, vocab_size=100, hidden_size=64, state_size=16, num_hidden_layers=3,
             n_groups=2, chunk_size=32, conv_kernel=3, use_bias=True, use_conv_bias=False,
             residual_in_fp32=False, tie_word_embeddings=True, time_step_limit=(0.01, 5.0),
             eos_token_id=(2, 7), pad_token_id=3, bos_token_id=1, layer_norm_epsilon=1e-6)

# state-spaces/mamba2-130m's config.json, verbatim.
MAMBA2_130M = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
               "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
               "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
               "tie_embeddings": True}


def _hf(**kw):
    return transformers.Mamba2Config(**kw)


def _shared_fields(hf_cfg):
    ours = {f.name for f in dataclasses.fields(Mamba2Config)}
    return sorted(ours & set(hf_cfg.to_dict()))


# ---- defaults ------------------------------------------------------------------------------------


def test_defaults_match_transformers():
    ours, theirs = Mamba2Config(), transformers.Mamba2Config()
    shared = _shared_fields(theirs)
    assert len(shared) >= 27  # every HF field except rms_norm, which 5.23 dropped
    for name in shared:
        want = getattr(theirs, name)
        got = ours.resolved_time_step_rank if name == "time_step_rank" else getattr(ours, name)
        assert got == (tuple(want) if isinstance(want, list) else want), name


def test_derived_properties():
    c = Mamba2Config(**SMALL)
    assert c.intermediate_size == 128 == c.num_heads * c.head_dim
    assert c.conv_dim == 128 + 2 * 2 * 16
    assert c.in_proj_size == 2 * 128 + 2 * 2 * 16 + 8
    assert c.group_size == 64
    assert c.heads_per_group == 4
    assert c.resolved_time_step_rank == 4  # ceil(64 / 16)
    assert Mamba2Config(hidden_size=1000, num_heads=125, head_dim=16, n_groups=5).resolved_time_step_rank == 63
    assert c.replace(time_step_rank=7).resolved_time_step_rank == 7
    d = Mamba2Config()  # Codestral: 2*4096 + 2*8*128 + 128
    assert (d.intermediate_size, d.conv_dim, d.in_proj_size) == (8192, 10240, 18560)


def test_hashable_and_equal():
    a, b = Mamba2Config(**SMALL), Mamba2Config(**{**SMALL, "eos_token_id": [2, 7], "time_step_limit": [0.01, 5]})
    assert a == b and hash(a) == hash(b)
    assert isinstance(b.eos_token_id, tuple) and b.time_step_limit == (0.01, 5.0)
    assert all(type(x) is float for x in b.time_step_limit)
    assert a != a.replace(chunk_size=64)
    assert len({a, b, Mamba2Config()}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.hidden_size = 8  # type: ignore[misc]


def test_replace_validates():
    c = Mamba2Config(**SMALL)
    assert c.replace(num_hidden_layers=7).num_hidden_layers == 7
    with pytest.raises(ValueError, match=r"num_heads \* head_dim \(128\) must equal expand \* hidden_size \(256\)"):
        c.replace(hidden_size=128)


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim",
                                  "state_size", "n_groups", "conv_kernel", "expand"])
@pytest.mark.parametrize("value", [0, -2])
def test_sizes_must_be_positive(name, value):
    with pytest.raises(ValueError, match=rf"{name} \({value}\) must be positive"):
        Mamba2Config(**{**SMALL, name: value})


@pytest.mark.parametrize("name", ["hidden_size", "chunk_size", "expand"])
def test_sizes_must_be_integers(name):
    with pytest.raises(ValueError, match=rf"{name} \(1\.5\) must be an integer"):
        Mamba2Config(**{**SMALL, name: 1.5})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_heads": 16}, r"num_heads \* head_dim \(256\) must equal expand \* hidden_size \(128\)"),
        ({"hidden_size": 48, "num_heads": 6, "head_dim": 16, "n_groups": 4},
         r"num_heads \(6\) must be divisible by n_groups \(4\)"),
        ({"chunk_size": 0}, r"chunk_size \(0\) must be >= 1"),
        ({"time_step_min": 0.0}, r"time_step_min \(0\.0\) must be > 0"),
        ({"time_step_min": -1e-3}, r"time_step_min \(-0\.001\) must be > 0"),
        ({"time_step_max": 0}, r"time_step_max \(0\.0\) must be > 0"),
        ({"time_step_min": 0.5, "time_step_max": 0.1},
         r"time_step_min \(0\.5\) must be <= time_step_max \(0\.1\)"),
        ({"time_step_floor": -1.0}, r"time_step_floor \(-1\.0\) must be >= 0"),
        ({"time_step_limit": (-0.5, 1.0)}, r"time_step_limit lower bound \(-0\.5\) must be >= 0"),
        ({"time_step_limit": (2.0, 1.0)}, r"time_step_limit \(2\.0, 1\.0\) must have lower bound <= upper"),
        ({"time_step_limit": (0.0, 1.0, 2.0)}, r"time_step_limit \(\(0\.0, 1\.0, 2\.0\)\) must be a pair"),
        ({"time_step_limit": (float("nan"), 1.0)}, r"time_step_limit lower bound \(nan\) must be >= 0"),
        ({"hidden_act": "gelu"}, r"hidden_act \('gelu'\) must be 'silu'"),
        ({"rms_norm": False}, r"rms_norm \(False\) must be True: .*no LayerNorm variant"),
        ({"layer_norm_epsilon": 0.0}, r"layer_norm_epsilon \(0\.0\) must be > 0"),
        ({"time_step_rank": "big"}, r"time_step_rank \('big'\) must be 'auto' or a positive integer"),
        ({"time_step_rank": 0}, r"time_step_rank \(0\) must be 'auto' or a positive integer"),
        ({"use_bias": 1}, r"use_bias \(1\) must be True or False"),
        ({"layer_norm_epsilon": "1e-5"}, r"layer_norm_epsilon \('1e-5'\) must be a number"),
        ({"eos_token_id": []}, r"eos_token_id \(\[\]\) must be an integer, a non-empty list"),
        ({"eos_token_id": "2"}, r"eos_token_id \('2'\) must be an integer"),
        ({"pad_token_id": 1.0}, r"pad_token_id \(1\.0\) must be an integer or None"),
    ],
)
def test_validation_messages(changes, message):
    with pytest.raises(ValueError, match=message):
        Mamba2Config(**{**SMALL, **changes})


def test_token_ids_may_be_none():
    c = Mamba2Config(**{**SMALL, "pad_token_id": None, "eos_token_id": None})
    assert c.pad_token_id is None and c.eos_token_id is None


# ---- HF layout and round trips -------------------------------------------------------------------


def test_round_trip_through_transformers_objects():
    ours = Mamba2Config(**SMALL)
    d = ours.to_hf()
    assert d["model_type"] == "mamba2" and d["architectures"] == ["Mamba2ForCausalLM"]
    assert d["time_step_limit"] == [0.01, 5.0] and d["eos_token_id"] == [2, 7]
    theirs = _hf(**d)
    for name in _shared_fields(theirs):
        if name != "time_step_rank":
            want = getattr(ours, name)
            assert getattr(theirs, name) == (list(want) if isinstance(want, tuple) else want), name
    assert Mamba2Config.from_hf(theirs.to_dict()) == ours
    assert Mamba2Config.from_hf(json.loads(theirs.to_json_string())) == ours


def test_transformers_save_pretrained_loads(tmp_path):
    theirs = _hf(hidden_size=256, num_heads=8, head_dim=64, n_groups=1, num_hidden_layers=2, vocab_size=1000,
                 tie_word_embeddings=True)
    theirs.save_pretrained(tmp_path)
    want = Mamba2Config(hidden_size=256, num_heads=8, head_dim=64, n_groups=1, num_hidden_layers=2,
                        vocab_size=1000, tie_word_embeddings=True)
    assert Mamba2Config.from_hf(tmp_path) == want
    assert Mamba2Config.from_hf(str(tmp_path / "config.json")) == want


def test_our_save_loads_in_transformers(tmp_path):
    ours = Mamba2Config(**SMALL)
    text = ours.to_json_string()
    assert '{"__float__": "Infinity"}' not in text  # SMALL's limit is finite; the default below is not
    written = ours.save(tmp_path / "model")
    assert written == tmp_path / "model" / "config.json"
    theirs = transformers.Mamba2Config.from_pretrained(tmp_path / "model")
    assert (theirs.hidden_size, theirs.n_groups, theirs.eos_token_id) == (64, 2, [2, 7])
    assert Mamba2Config.from_hf(theirs.to_dict()) == ours
    assert Mamba2Config.from_hf(tmp_path / "model") == ours

    default = Mamba2Config()
    path = default.save(tmp_path / "default.json")
    assert json.loads(path.read_text())["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    theirs = transformers.Mamba2Config.from_json_file(path)
    assert list(theirs.time_step_limit) == [0.0, INF]
    assert Mamba2Config.from_hf(path) == default
    assert Mamba2Config.from_hf(theirs.to_dict()) == default


def test_we_write_infinity_as_transformers_does():
    ours = json.loads(Mamba2Config().to_json_string())
    theirs = json.loads(transformers.Mamba2Config().to_json_string())
    assert ours["time_step_limit"] == theirs["time_step_limit"]


@pytest.mark.parametrize("upper", ["Infinity", '{"__float__": "Infinity"}', '"Infinity"', '"inf"'])
def test_time_step_limit_json_forms(tmp_path, upper):
    text = '{"model_type": "mamba2", "hidden_size": 64, "num_heads": 8, "head_dim": 16, "n_groups": 2, ' \
           f'"time_step_limit": [0.0, {upper}]}}'
    (tmp_path / "config.json").write_text(text)
    assert Mamba2Config.from_hf(tmp_path).time_step_limit == (0.0, INF)


def test_time_step_limit_negative_infinity_string_is_refused_by_validation():
    with pytest.raises(ValueError, match=r"time_step_limit lower bound \(-inf\) must be >= 0"):
        Mamba2Config.from_hf({"time_step_limit": ["-Infinity", 1.0]})
    with pytest.raises(ValueError, match=r"time_step_limit .* only strings read are infinities"):
        Mamba2Config.from_hf({"time_step_limit": [0.0, "lots"]})


def test_resolved_time_step_rank_reads_back_as_auto():
    assert Mamba2Config.from_hf({**Mamba2Config(**SMALL).to_hf(), "time_step_rank": 4}) == Mamba2Config(**SMALL)
    # A stale value (converters often leave 256) is kept: it is unused, and not ours to change.
    assert Mamba2Config.from_hf({**Mamba2Config(**SMALL).to_hf(), "time_step_rank": 256}).time_step_rank == 256


def test_harmless_hf_keys_accepted():
    d = {**Mamba2Config(**SMALL).to_hf(), "torch_dtype": "bfloat16", "transformers_version": "4.44.0.dev0",
         "norm_before_gate": True, "rms_norm": True, "use_cache": False, "_name_or_path": "x",
         "id2label": {"0": "a"}, "label2id": {"a": 0}, "output_hidden_states": False, "return_dict": True,
         "attn_layer_idx": [], "layer_types": ["linear_attention"] * 3, "fused_add_norm": True,
         "max_length": 20, "temperature": 1.0}
    assert Mamba2Config.from_hf(d) == Mamba2Config(**SMALL).replace(use_cache=False)


@pytest.mark.parametrize("key, value", [("d_mlp", 128), ("use_mambapy", True), ("ssm_layer", "Mamba2"),
                                        ("quantization_config", {"bits": 4})])
def test_unknown_hf_key_refused(key, value):
    with pytest.raises(ValueError, match=rf"'{key}'.*may differ"):
        Mamba2Config.from_hf({**Mamba2Config(**SMALL).to_hf(), key: value})


@pytest.mark.parametrize("value", [128, 999])
def test_stored_intermediate_size_ignored_as_transformers_does(value):
    """transformers' Mamba2Mixer takes expand * hidden_size whatever config.json stores (5.25 builds such a
    model), so the key cannot change the model: read and dropped, not refused."""
    stored = {**Mamba2Config(**SMALL).to_hf(), "intermediate_size": value}
    hf = transformers.Mamba2Model(transformers.Mamba2Config(**{k: v for k, v in stored.items()
                                                               if k not in ("architectures", "model_type")}))
    assert hf.layers[0].mixer.intermediate_size == Mamba2Config(**SMALL).intermediate_size
    assert Mamba2Config.from_hf(stored) == Mamba2Config(**SMALL)


def test_unknown_keys_all_named():
    with pytest.raises(ValueError, match=r"'d_mlp', 'ssm_layer'"):
        Mamba2Config.from_hf({"ssm_layer": "x", "d_mlp": 1})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attn_layer_idx": [1]}, r"attn_layer_idx \(\[1\]\) must be empty: hybrid attention"),
        ({"layer_types": ["mamba", "full_attention", "mamba"]}, r"layer_types .* must contain only"),
        ({"layer_types": ["mamba"] * 2}, r"layer_types has 2 entries but num_hidden_layers is 3"),
        ({"model_type": "mamba"}, r"Mamba-1 config: load it with MambaConfig"),
        ({"model_type": "llama"}, r"model_type \('llama'\) must be 'mamba2'"),
        ({"rms_norm": False}, r"rms_norm \(False\) must be True"),
    ],
)
def test_hf_layout_refusals(changes, message):
    with pytest.raises(ValueError, match=message):
        Mamba2Config.from_hf({**Mamba2Config(**SMALL).to_hf(), **changes})


# ---- original mamba_ssm layout -------------------------------------------------------------------


def test_mamba2_130m_original_config(tmp_path):
    c = Mamba2Config.from_hf(MAMBA2_130M)
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (768, 24, 50288)
    assert (c.num_heads, c.head_dim, c.state_size, c.n_groups, c.expand) == (24, 64, 128, 1, 2)
    assert c.tie_word_embeddings and c.residual_in_fp32
    assert (c.conv_kernel, c.chunk_size, c.time_step_limit) == (4, 256, (0.0, INF))
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 0, 0)
    assert (c.conv_dim, c.in_proj_size) == (1792, 3352)  # conv1d [1792, 1, 4]; in_proj [3352, 768]
    (tmp_path / "config.json").write_text(json.dumps(MAMBA2_130M))
    assert Mamba2Config.from_hf(tmp_path) == c


def test_original_ssm_cfg_mapping_and_defaults():
    ssm = {"layer": "Mamba2", "d_state": 64, "d_conv": 3, "expand": 2, "headdim": 32, "ngroups": 4,
           "chunk_size": 128, "dt_min": 0.002, "dt_max": 0.2, "dt_init_floor": 1e-3,
           "dt_limit": [0.0, "Infinity"], "bias": True, "conv_bias": False, "d_ssm": 512,
           "A_init_range": [1, 16], "activation": "swish", "use_mem_eff_path": False, "rmsnorm": True,
           "norm_before_gate": False, "D_has_hdim": False, "layer_idx": None, "dt_scale": 1.0}
    c = Mamba2Config.from_hf({"d_model": 256, "n_layer": 2, "vocab_size": 1001, "ssm_cfg": ssm,
                              "residual_in_fp32": False, "tie_embeddings": False})
    assert (c.state_size, c.conv_kernel, c.head_dim, c.n_groups, c.num_heads) == (64, 3, 32, 4, 16)
    assert (c.chunk_size, c.time_step_min, c.time_step_max, c.time_step_floor) == (128, 0.002, 0.2, 1e-3)
    assert (c.use_bias, c.use_conv_bias, c.residual_in_fp32, c.tie_word_embeddings) == (True, False, False, False)
    assert c.vocab_size == 1008  # mamba_ssm's default pad_vocab_size_multiple is 8
    assert c.time_step_limit == (0.0, INF)


@pytest.mark.parametrize(
    "changes, ssm_changes, message",
    [
        ({}, {"layer": "Mamba1"}, r"Mamba-1 checkpoint; load it with MambaConfig"),
        ({"ssm_cfg": {}}, None, r"ssm_cfg.layer is 'Mamba1' \(mamba_ssm's default when absent\)"),
        ({}, {"layer": "Mamba3"}, r"ssm_cfg.layer \('Mamba3'\) must be 'Mamba2'"),
        ({"d_intermediate": 1536}, {}, r"d_intermediate \(1536\) must be 0: .*MLP"),
        ({"attn_layer_idx": [3, 9]}, {}, r"attn_layer_idx \(\[3, 9\]\) must be empty: hybrid attention"),
        ({"rms_norm": False}, {}, r"rms_norm \(False\) must be True: .*no LayerNorm variant"),
        ({}, {"rmsnorm": False}, r"ssm_cfg.rmsnorm \(False\) must be True"),
        ({}, {"norm_before_gate": True}, r"ssm_cfg.norm_before_gate \(True\) must be False"),
        ({}, {"D_has_hdim": True}, r"ssm_cfg.D_has_hdim \(True\) must be False"),
        ({}, {"d_ssm": 1024}, r"ssm_cfg.d_ssm \(1024\) must be None or expand \* d_model \(1536\)"),
        ({}, {"activation": "relu"}, r"ssm_cfg.activation \('relu'\) must be 'silu' or 'swish'"),
        ({}, {"headdim": 100}, r"expand \* d_model \(1536\) must be divisible by ssm_cfg.headdim \(100\)"),
        ({}, {"learnable_init_states": True}, r"ssm_cfg has keys .*'learnable_init_states'.*may differ"),
        ({"norm_epsilon": 1e-6}, {}, r"mamba_ssm config has keys .*'norm_epsilon'.*may differ"),
        ({"model_type": "mamba"}, {}, r"Mamba-1 config: load it with MambaConfig"),
        ({}, {"ngroups": 5}, r"num_heads \(24\) must be divisible by n_groups \(5\)"),
    ],
)
def test_original_layout_refusals(changes, ssm_changes, message):
    cfg = {**MAMBA2_130M, **changes}
    if ssm_changes is not None:
        cfg["ssm_cfg"] = {**cfg["ssm_cfg"], **ssm_changes}
    with pytest.raises(ValueError, match=message):
        Mamba2Config.from_hf(cfg)


def test_original_layout_d_ssm_equal_to_inner_is_fine():
    c = Mamba2Config.from_hf({**MAMBA2_130M, "ssm_cfg": {"layer": "Mamba2", "d_ssm": 1536}})
    assert c == Mamba2Config.from_hf(MAMBA2_130M)


def test_from_hf_rejects_other_types():
    with pytest.raises(TypeError, match="dict or a path"):
        Mamba2Config.from_hf(42)  # type: ignore[arg-type]


def test_time_step_rank_auto_matches_hf_formula():
    for d in (64, 768, 1000, 4096):
        assert Mamba2Config(hidden_size=d, num_heads=2 * d // 8, head_dim=8, n_groups=1
                            ).resolved_time_step_rank == math.ceil(d / 16) == _hf(hidden_size=d, num_heads=2 * d // 8,
                                                                                  head_dim=8).time_step_rank
