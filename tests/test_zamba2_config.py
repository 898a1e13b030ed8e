"""Zamba2Config against transformers' Zamba2Config (5.25): defaults, round trips for the tiny and the published
shapes, the parts' records against the modules HF builds, the random-model helper, and the refusals."""

import dataclasses
import json

import pytest
import torch
import transformers
from helpers_zamba2 import TINY_CONFIGS, random_hf_zamba2, tiny_hf_zamba2_config

from easymamba.config import Zamba2Config
from easymamba.config.zamba2 import GATED_NORM_EPS

M, H = "mamba", "hybrid"


def _pattern(hybrids, n):
    return [H if i in hybrids else M for i in range(n)]


# Zyphra/Zamba2-2.7B-Instruct-v2 config.json (HF layout, found with the search tool up to n_mamba_heads; the rest
# is from Zyphra/Zamba2-2.7B-instruct's earlier config.json of the same model: heads, layers, blocks, ids, vocab).
# Whether it sets use_mem_rope / use_shared_attention_adapter was not in what the search returned: HF defaults.
ZAMBA2_2_7B = {
    "adapter_rank": 128, "add_bias_linear": False, "architectures": ["Zamba2ForCausalLM"], "attention_dropout": 0.0,
    "attention_head_dim": 160, "attention_hidden_size": 5120, "bos_token_id": 1, "chunk_size": 256,
    "eos_token_id": 2, "ffn_hidden_size": 10240, "hidden_act": "gelu", "hidden_size": 2560,
    "hybrid_layer_ids": [6, 12, 18, 24, 30, 36, 42, 47, 51], "initializer_range": 0.02, "intermediate_size": 10240,
    "kv_channels": 80, "layers_block_type": _pattern({6, 12, 18, 24, 30, 36, 42, 47, 51}, 54), "mamba_d_conv": 4,
    "mamba_d_state": 64, "mamba_expand": 2, "mamba_headdim": 64, "mamba_ngroups": 1,
    "max_position_embeddings": 4096, "model_type": "zamba2", "n_mamba_heads": 80, "num_attention_heads": 32,
    "num_hidden_layers": 54, "num_key_value_heads": 32, "num_logits_to_keep": 1, "num_mem_blocks": 2,
    "num_query_groups": 32, "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 10000, "torch_dtype": "bfloat16",
    "time_step_limit": None, "vocab_size": 32000,
}
# Zamba2-1.2B and Zamba2-7B: the search found only their pre-transformers config.json files (Zyphra's fork: 'm'/'g'
# layers, state_size, lora_rank, use_shared_attention_lora, ffn_hidden_size, ...). These are those values under HF's
# names, the derived keys as HF 5.25 writes them.
_IDS_1_2B = [5, 11, 17, 23, 29, 35]
ZAMBA2_1_2B = {
    "model_type": "zamba2", "hidden_size": 2048, "num_hidden_layers": 38, "layers_block_type": _pattern(_IDS_1_2B, 38),
    "hybrid_layer_ids": _IDS_1_2B, "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_headdim": 64,
    "n_mamba_heads": 64, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
    "attention_head_dim": 128, "attention_hidden_size": 4096, "kv_channels": 64, "num_query_groups": 32,
    "num_mem_blocks": 1, "use_mem_rope": True, "use_shared_attention_adapter": True, "adapter_rank": 128,
    "rope_theta": 10000, "vocab_size": 32000, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
_IDS_7B = [6, 11] + list(range(17, 78, 6))
ZAMBA2_7B = {
    "model_type": "zamba2", "hidden_size": 3584, "num_hidden_layers": 81, "layers_block_type": _pattern(_IDS_7B, 81),
    "hybrid_layer_ids": _IDS_7B, "mamba_d_state": 64, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_headdim": 64,
    "mamba_ngroups": 2, "n_mamba_heads": 112, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_key_value_heads": 32, "attention_head_dim": 224, "attention_hidden_size": 7168, "kv_channels": 112,
    "num_query_groups": 32, "num_mem_blocks": 2, "use_mem_rope": True, "use_shared_attention_adapter": False,
    "adapter_rank": 128, "rope_theta": 10000, "vocab_size": 32000, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2,
}
PUBLISHED = {"1.2B": ZAMBA2_1_2B, "2.7B": ZAMBA2_2_7B, "7B": ZAMBA2_7B}


def _hf_from_ours(c: Zamba2Config) -> transformers.Zamba2Config:
    return transformers.Zamba2Config(**{k: v for k, v in c.to_hf().items() if k != "architectures"})


def test_defaults_are_transformers_defaults():
    hf = transformers.Zamba2Config()
    ours = Zamba2Config()
    for f in dataclasses.fields(Zamba2Config):
        v = getattr(ours, f.name)
        expected = getattr(hf, f.name)
        if f.name == "rope_parameters":
            v = dict(v)
        assert (list(v) if isinstance(v, tuple) else v) == expected, f.name
    for name in ("hybrid_layer_ids", "attention_hidden_size", "attention_head_dim", "mamba_headdim"):
        assert list(getattr(ours, name)) if name == "hybrid_layer_ids" else getattr(ours, name) == getattr(hf, name)
    assert list(ours.hybrid_layer_ids) == hf.hybrid_layer_ids == [6, 12, 18, 24, 30, 36, 42, 47, 51]
    assert set(ours.to_hf()) <= set(hf.to_dict()) | {"architectures"}
    assert Zamba2Config.from_hf(hf.to_dict()) == ours


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_round_trips(name, tmp_path):
    hf = tiny_hf_zamba2_config(name)
    c = Zamba2Config.from_hf(hf.to_dict())
    assert hash(c) == hash(Zamba2Config.from_hf(c.to_hf()))
    back = _hf_from_ours(c)
    assert back.to_dict() == hf.to_dict()                      # transformers reads to_hf() back to an equal config
    assert Zamba2Config.from_hf(json.loads(c.to_json_string())) == c
    c.save(tmp_path / "ckpt")
    assert Zamba2Config.from_hf(tmp_path / "ckpt") == c
    loaded = transformers.Zamba2Config.from_pretrained(tmp_path / "ckpt").to_dict()
    assert loaded.pop("architectures") == ["Zamba2ForCausalLM"]
    assert loaded == {k: v for k, v in hf.to_dict().items() if k != "architectures"}
    hf.save_pretrained(tmp_path / "hf")                           # and what transformers itself writes
    assert Zamba2Config.from_hf(tmp_path / "hf") == c


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes(name):
    cfg = PUBLISHED[name]
    c = Zamba2Config.from_hf(cfg)
    hf = transformers.Zamba2Config(**{k: v for k, v in cfg.items() if k != "architectures"})
    assert Zamba2Config.from_hf(hf.to_dict()) == c
    # what differs is only what the network never reads: the file's dtype and the inert keys HF keeps as attributes
    inert = {"dtype", "ffn_hidden_size", "time_step_limit"}
    assert ({k: v for k, v in _hf_from_ours(c).to_dict().items() if k not in inert}
            == {k: v for k, v in hf.to_dict().items() if k not in inert})
    for key in ("attention_head_dim", "attention_hidden_size", "mamba_headdim", "hybrid_layer_ids"):
        assert _listed(getattr(c, key)) == getattr(hf, key) == cfg[key], key
    assert c.num_hidden_layers == len(c.layer_cache_kinds)
    assert [i for i, k in enumerate(c.layer_cache_kinds) if k == ("attention", "mamba2")] == cfg["hybrid_layer_ids"]
    assert c.mixer_config.head_dim == 64 and c.attention_config.in_size == 2 * c.hidden_size


def _listed(v):
    return list(v) if isinstance(v, tuple) else v


def test_published_legacy_layout_is_refused():
    legacy = {"model_type": "zamba2", "hidden_size": 2048, "num_hidden_layers": 2, "layers_block_type": ["m", "g"],
              "state_size": 128, "lora_rank": 128, "use_shared_attention_lora": True}
    with pytest.raises(ValueError, match=r"'lora_rank', 'state_size', 'use_shared_attention_lora'.*may differ"):
        Zamba2Config.from_hf(legacy)
    with pytest.raises(ValueError, match=r"\['g', 'm'\].*'m'/'g' names of Zyphra's own fork"):
        Zamba2Config(num_hidden_layers=2, layers_block_type=["m", "g"])


def test_aliases_and_legacy_keys():
    base = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "n_mamba_heads": 4}
    c = Zamba2Config.from_hf({**base, "layer_types": ["mamba", "hybrid"], "head_dim": 16, "rope_theta": 500,
                              "time_step_limit": [0.0, {"__float__": "Infinity"}], "kv_channels": 8})
    assert c.layers_block_type == ("linear_attention", "hybrid") and c.rope_theta == 500.0
    assert c == Zamba2Config.from_hf({**base, "layers_block_type": ["linear_attention", "hybrid"],
                                      "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})
    long = Zamba2Config(**base, layers_block_type=["mamba", "hybrid"], use_long_context=True)
    assert long.max_position_embeddings == 16384 == _hf_from_ours(long).max_position_embeddings


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_part_records_match_the_hf_modules(name):
    model = random_hf_zamba2(0, name)
    c = Zamba2Config.from_hf(model.config.to_dict())
    mix, att, mlp = c.mixer_config, c.attention_config, c.mlp_config
    assert c.moe_config is None
    hybrid = c.hybrid_layer_ids[0]
    layer = model.model.layers[hybrid]
    mixer = layer.mamba_decoder.mamba
    assert (mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups) == (
        mix.num_heads, mix.head_dim, mix.state_size, mix.n_groups)
    assert mixer.in_proj.out_features == 2 * mix.intermediate_size + 2 * mix.n_groups * mix.state_size + mix.num_heads
    assert (mixer.in_proj.bias is not None) == (mixer.out_proj.bias is not None) == mix.use_bias
    assert mixer.conv1d.bias is not None and mix.use_conv_bias and mixer.conv1d.kernel_size[0] == mix.conv_kernel
    assert mixer.norm.variance_epsilon == mix.layer_norm_epsilon == GATED_NORM_EPS
    assert mixer.norm.group_size == mix.intermediate_size // mix.norm_groups
    assert mixer.time_step_limit == mix.time_step_limit and mixer.chunk_size == mix.chunk_size
    attn = layer.shared_transformer.self_attn
    assert attn.q_proj.in_features == att.in_size and attn.o_proj.out_features == att.out_size
    assert attn.head_dim == att.head_dim and attn.scaling == att.scaling != att.head_dim ** -0.5
    assert attn.num_key_value_groups == att.num_attention_heads // att.num_key_value_heads
    assert all(p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    assert not att.qkv_bias and not att.o_bias
    if c.use_mem_rope:
        assert model.model.rotary_emb.inv_freq.numel() * 2 == att.rotary_dim == att.head_dim
        assert att.rope_theta == model.config.rope_parameters["rope_theta"]
    else:
        assert att.rope_theta is None and not hasattr(model.model, "rotary_emb")
    ff = layer.shared_transformer.feed_forward
    assert ff.gate_up_proj.in_features == mlp.hidden_size and ff.gate_up_proj.out_features == 2 * mlp.intermediate_size
    assert (ff.gate_up_proj.bias is not None) == mlp.bias and mlp.gated
    assert type(ff.act_fn).__name__ == "GELUActivation" and mlp.activation == "gelu"
    blocks = [getattr(model.model.layers[i], "shared_transformer").block_id for i in c.hybrid_layer_ids]
    assert blocks == [c.shared_block_index(i) for i in c.hybrid_layer_ids]
    for i in c.hybrid_layer_ids:  # which layer's tensors each hybrid layer runs (the same Parameter objects)
        ours = model.model.layers[i].shared_transformer.self_attn.q_proj.weight
        owner = model.model.layers[c.shared_block_owner(i)].shared_transformer.self_attn.q_proj.weight
        others = [model.model.layers[j].shared_transformer.self_attn.q_proj.weight for j in c.hybrid_layer_ids
                  if c.shared_block_owner(j) != c.shared_block_owner(i)]
        assert ours is owner and all(ours is not w for w in others)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == c.tie_word_embeddings
    cache = transformers.DynamicCache(config=model.config)
    kinds = {"LinearAttentionLayer": ("mamba2",), "LinearAttentionAndFullAttentionLayer": ("attention", "mamba2")}
    assert tuple(kinds[type(lay).__name__] for lay in cache.layers) == c.layer_cache_kinds


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_random_helper_leaves_nothing_at_its_init(name):
    fresh = tiny_hf_zamba2_config(name)
    torch.manual_seed(0)
    init = transformers.Zamba2ForCausalLM(fresh).state_dict()
    model = random_hf_zamba2(0, name)
    for key, value in model.state_dict().items():
        assert not torch.equal(value, init[key]), key
        assert value.unique().numel() > 1, key                    # no constant tensor (ones, zeros, a fill)
    assert model.config._attn_implementation == "eager" and not model.training
    ids = torch.randint(3, fresh.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 3.0


def test_hf_fails_on_the_adapter_shapes_we_refuse():
    config = tiny_hf_zamba2_config("a", use_shared_attention_adapter=True)   # num_key_value_heads 2 of 4
    with pytest.raises(RuntimeError):
        transformers.Zamba2ForCausalLM(config)(torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match=r"use_shared_attention_adapter needs num_key_value_heads \(2\) =="):
        Zamba2Config.from_hf(config.to_dict())


BASE = {**TINY_CONFIGS["b"], "model_type": "zamba2"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": 5}, r"layers_block_type has 6 entries but num_hidden_layers is 5"),
        ({"layers_block_type": ["mamba"] * 5 + ["attention"]}, r"\['attention'\]: a Zamba2 layer is"),
        ({"n_mamba_heads": 5}, r"mamba_expand \* hidden_size \(48\) must be divisible by n_mamba_heads \(5\)"),
        ({"mamba_ngroups": 4}, r"n_mamba_heads \(6\) must be divisible by mamba_ngroups \(4\)"),
        ({"use_shared_attention_adapter": False, "num_key_value_heads": 2},
         r"num_attention_heads \(3\) must be divisible by num_key_value_heads \(2\)"),
        ({"mamba_expand": 1.5}, r"mamba_expand \(1.5\) must be an integer"),
        ({"hidden_act": "swish"}, r"hidden_act \('swish'\) is not an MLP activation easymamba has"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0}},
         r"must be the default RoPE"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1}},
         r"rope_parameters.rope_theta \(-1.0\) must be a positive"),
        ({"rope_theta": 10.0}, r"rope_theta \(10.0\) and rope_parameters.rope_theta \(500.0\) must agree"),
        ({"attention_head_dim": 8}, r"attention_head_dim \(8\) must be 16, what Zamba2Config derives"),
        ({"hybrid_layer_ids": [0, 2]}, r"hybrid_layer_ids \(\[0, 2\]\) must be \[0, 2, 3, 5\]"),
        ({"mamba_headdim": 4}, r"mamba_headdim \(4\) must be 8"),
        ({"attention_hidden_size": 24}, r"attention_hidden_size \(24\) must be 48"),
        ({"ffn_hidden_size": 10}, r"ffn_hidden_size \(10\) must equal intermediate_size \(40\)"),
        ({"layer_types": ["hybrid"] * 6}, r"layer_types .* and layers_block_type .* must agree"),
        ({"time_step_limit": [0.0]}, r"time_step_limit \(\[0.0\]\) must be null or a pair"),
        ({"time_step_min": 0.5, "time_step_max": 0.1},
         r"time_step_min \(0.5\) must be <= time_step_max \(0.1\)"),
        ({"num_logits_to_keep": -1}, r"num_logits_to_keep \(-1\) must be an integer >= 0"),
        ({"model_type": "zamba"}, r"model_type \('zamba'\) must be 'zamba2'"),
        ({"use_shared_mlp_adapter": False}, r"keys that Zamba2Config does not handle: 'use_shared_mlp_adapter'"),
        ({"num_mem_blocks": 0}, r"num_mem_blocks \(0\) must be positive"),
    ],
)
def test_refusals(changes, message):
    with pytest.raises(ValueError, match=message):
        Zamba2Config.from_hf({**BASE, **changes})


def test_shared_block_index_of_a_mamba_layer():
    with pytest.raises(ValueError, match=r"layer 1 is not a hybrid layer; the hybrid layers are \[0, 2, 3, 5\]"):
        Zamba2Config.from_hf(BASE).shared_block_index(1)
    c = Zamba2Config.from_hf(BASE)
    assert [c.shared_block_index(i) for i in (0, 2, 3, 5)] == [0, 1, 0, 1]
    assert [c.shared_block_owner(i) for i in (0, 2, 3, 5)] == [0, 2, 0, 2]
    untied = c.replace(tie_word_embeddings=False)
    assert [untied.shared_block_owner(i) for i in (0, 2, 3, 5)] == [0, 2, 3, 5]


def test_time_step_limit_of_the_mixer_record():
    assert Zamba2Config().mixer_config.time_step_limit == (0.001, float("inf"))
