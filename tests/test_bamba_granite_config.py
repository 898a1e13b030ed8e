"""BambaConfig and GraniteMoeHybridConfig against transformers 5.25's own config classes: defaults, round trips
(ours -> HF -> ours, HF -> ours -> HF), the published shapes, the part records against the modules HF builds, and
the refusal of bad values and of keys that would change the model."""

import dataclasses
import json
import math

import pytest
import torch
import transformers
from helpers_hybrid import TINY_CONFIGS, random_hf_model, tiny_config_kwargs

from easymamba.config import BambaConfig, GraniteMoeHybridConfig

FAMILIES = {"bamba": (BambaConfig, transformers.BambaConfig),
            "granitemoehybrid": (GraniteMoeHybridConfig, transformers.GraniteMoeHybridConfig)}
TINY = [(mt, v) for mt in FAMILIES for v in range(len(TINY_CONFIGS[mt]))]

# Published config.json files, written down from memory of the hub pages (not fetched here: the machine has no
# network). Keys of 4.x files that 5.25 reads differently (top-level rope_theta, "mamba"/"attention" layer names,
# attn_rotary_emb, use_mamba_kernels, normalization_function) are kept as the hub files have them.
BAMBA_9B = {  # ibm-ai-platform/Bamba-9B (ibm-fms/Bamba-9B)
    "architectures": ["BambaForCausalLM"], "attention_dropout": 0.0, "attn_layer_indices": [9, 18, 27],
    "attn_rotary_emb": 64, "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "mamba_chunk_size": 256, "mamba_conv_bias": True,
    "mamba_d_conv": 4, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_expand": 2, "mamba_n_groups": 1,
    "mamba_n_heads": 128, "mamba_proj_bias": False, "max_position_embeddings": 262144, "model_type": "bamba",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_logits_to_keep": 1,
    "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.48.0.dev0", "use_cache": True, "use_mamba_kernels": True,
    "vocab_size": 128256,
}


def _granite_layers(n: int, attention: tuple[int, ...]) -> list[str]:
    return ["attention" if i in attention else "mamba" for i in range(n)]


_GRANITE_COMMON = {
    "architectures": ["GraniteMoeHybridForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_multiplier": 0.0078125, "bos_token_id": 100257, "embedding_multiplier": 12, "eos_token_id": 100257,
    "hidden_act": "silu", "init_method": "mup", "initializer_range": 0.1, "mamba_chunk_size": 256,
    "mamba_conv_bias": True, "mamba_d_conv": 4, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_expand": 2,
    "mamba_n_groups": 1, "mamba_proj_bias": False, "max_position_embeddings": 131072,
    "model_type": "granitemoehybrid", "normalization_function": "rmsnorm", "num_hidden_layers": 40,
    "layer_types": _granite_layers(40, (5, 15, 25, 35)), "output_router_logits": False, "pad_token_id": 100256,
    "position_embedding_type": "nope", "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000, "router_aux_loss_coef": 0.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.56.0", "use_cache": True, "vocab_size": 100352,
}
GRANITE_4_H_TINY = {**_GRANITE_COMMON, "hidden_size": 1536, "intermediate_size": 512, "logits_scaling": 6,
                    "mamba_n_heads": 48, "num_attention_heads": 12, "num_key_value_heads": 4,
                    "num_experts_per_tok": 6, "num_local_experts": 64, "shared_intermediate_size": 1024}
GRANITE_4_H_SMALL = {**_GRANITE_COMMON, "hidden_size": 4096, "intermediate_size": 768, "logits_scaling": 16,
                     "mamba_n_heads": 128, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_experts_per_tok": 10, "num_local_experts": 72, "shared_intermediate_size": 1536}
PUBLISHED = [("bamba", BAMBA_9B), ("granitemoehybrid", GRANITE_4_H_TINY), ("granitemoehybrid", GRANITE_4_H_SMALL)]


def hf_view(hf_config, model_type: str) -> dict:
    """What the network depends on, as transformers holds it: our fields under HF's names, rope_parameters, the
    derived layer pattern and the attention head width."""
    ours = {f.name for f in dataclasses.fields(FAMILIES[model_type][0])} - {"rope_theta", "partial_rotary_factor"}
    d = hf_config.to_dict()
    view = {k: d.get(k) for k in ours}
    for k in ("time_step_limit", "attn_layer_indices", "layer_types", "eos_token_id"):
        if isinstance(view.get(k), (list, tuple)):
            view[k] = list(view[k])
    view["rope_parameters"] = dict(hf_config.rope_parameters)
    view["layers_block_type"] = list(hf_config.layers_block_type)
    view["head_dim"] = getattr(hf_config, "head_dim", None)
    return view


@pytest.mark.parametrize("model_type", FAMILIES)
def test_defaults_are_transformers_defaults(model_type):
    ours_cls, hf_cls = FAMILIES[model_type]
    ours, hf = ours_cls(), hf_cls()
    assert hf_view(hf_cls(**ours.to_hf()), model_type) == hf_view(hf, model_type)
    assert ours_cls.from_hf(hf.to_dict()) == ours
    assert set(ours.to_hf()) <= set(hf.to_dict())  # every key we write, transformers writes too
    assert ours_cls.model_type == model_type


@pytest.mark.parametrize("model_type,variant", TINY)
def test_tiny_round_trips(model_type, variant, tmp_path):
    ours_cls, hf_cls = FAMILIES[model_type]
    hf = hf_cls(**tiny_config_kwargs(model_type, variant))
    ours = ours_cls.from_hf(hf.to_dict())
    # ours -> HF: the constructor and from_dict read back the same network
    assert hf_view(hf_cls(**ours.to_hf()), model_type) == hf_view(hf, model_type)
    assert hf_view(hf_cls.from_dict(ours.to_hf()), model_type) == hf_view(hf, model_type)
    # through JSON files both ways (infinity as {"__float__": "Infinity"})
    path = ours.save(tmp_path / "ours")
    assert hf_view(hf_cls.from_pretrained(path.parent), model_type) == hf_view(hf, model_type)
    hf.save_pretrained(tmp_path / "hf")
    assert ours_cls.from_hf(tmp_path / "hf") == ours == ours_cls.from_hf(json.loads(ours.to_json_string()))
    assert hash(ours) == hash(ours_cls.from_hf(ours.to_hf()))


@pytest.mark.parametrize("model_type,published", PUBLISHED)
def test_published_shapes(model_type, published):
    ours_cls, hf_cls = FAMILIES[model_type]
    ours = ours_cls.from_hf(published)
    hf = hf_cls.from_dict(dict(published))
    assert hf_view(hf_cls(**ours.to_hf()), model_type) == hf_view(hf, model_type)
    assert ours_cls.from_hf(hf.to_dict()) == ours
    kinds = ours.layer_cache_kinds
    assert len(kinds) == ours.num_hidden_layers
    assert [i for i, k in enumerate(kinds) if k == ("attention",)] == (
        [9, 18, 27] if model_type == "bamba" else [5, 15, 25, 35])
    mixer, attn = ours.mixer_config, ours.attention_config
    assert mixer.intermediate_size == 2 * ours.hidden_size and mixer.norm_groups == 1
    if model_type == "bamba":
        assert (attn.head_dim, attn.rotary_dim, attn.rope_theta) == (128, 64, 10000.0)
        assert ours.mlp_config.intermediate_size == 14336 and ours.moe_config is None
    else:
        assert attn.rope_theta is None and attn.scaling == 0.0078125
        assert ours.embedding_multiplier == 12.0 and ours.residual_multiplier == 0.22
        moe = ours.moe_config
        assert moe.shared == ours.mlp_config and moe.num_experts == published["num_local_experts"]
        assert moe.top_k == published["num_experts_per_tok"] and moe.router == "softmax_topk"


@pytest.mark.parametrize("model_type,variant", TINY)
def test_part_records_match_the_modules_hf_builds(model_type, variant):
    """Each record against the module transformers builds from the same config: sizes, eps, scale, rope width."""
    model = random_hf_model(model_type, 0, variant)
    ours = FAMILIES[model_type][0].from_hf(model.config.to_dict())
    layers = model.model.layers
    assert ours.layer_cache_kinds == tuple(("mamba2",) if getattr(layer, "mamba", None) is not None else ("attention",)
                                           for layer in layers)
    mixer = next(layer.mamba for layer in layers if getattr(layer, "mamba", None) is not None)
    m = ours.mixer_config
    assert (m.intermediate_size, m.num_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel, m.chunk_size) == (
        mixer.intermediate_size, mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size,
        mixer.conv_kernel_size, mixer.chunk_size)
    assert (m.use_bias, m.use_conv_bias) == (mixer.in_proj.bias is not None, mixer.conv1d.bias is not None)
    assert m.layer_norm_epsilon == mixer.norm.variance_epsilon and m.time_step_limit == tuple(mixer.time_step_limit)
    assert m.intermediate_size // m.norm_groups == mixer.norm.group_size
    attn = next(layer.self_attn for layer in layers if getattr(layer, "self_attn", None) is not None)
    a = ours.attention_config
    assert (a.head_dim, a.scaling, a.num_key_value_heads) == (attn.head_dim, attn.scaling,
                                                             a.num_attention_heads // attn.num_key_value_groups)
    assert a.qkv_bias == (attn.q_proj.bias is not None) and a.o_bias == (attn.o_proj.bias is not None)
    rotary = model.model.rotary_emb
    assert (a.rotary_dim is None) == (rotary is None)
    if rotary is not None:
        assert a.rotary_dim == 2 * rotary.inv_freq.numel()
        expected = 1.0 / (a.rope_theta ** (torch.arange(0, a.rotary_dim, 2, dtype=torch.float) / a.rotary_dim))
        torch.testing.assert_close(rotary.inv_freq, expected, rtol=0, atol=0)
    if model_type == "bamba":
        ff = layers[0].feed_forward
        assert (ours.mlp_config.intermediate_size, ours.mlp_config.bias) == (ff.intermediate_size,
                                                                           ff.gate_proj.bias is not None)
        assert math.isclose(layers[0].input_layernorm.variance_epsilon, ours.rms_norm_eps)
    else:
        shared = layers[0].shared_mlp
        assert ours.mlp_config.intermediate_size == shared.hidden_size and ours.mlp_config.gated
        assert shared.input_linear.weight.shape[0] == 2 * ours.mlp_config.intermediate_size
        moe = layers[0].block_sparse_moe
        assert (ours.moe_config is None) == (moe is None)
        if moe is not None:
            assert (ours.moe_config.num_experts, ours.moe_config.top_k) == (moe.router.num_experts, moe.router.top_k)
            assert moe.experts.gate_up_proj.shape[1] == 2 * ours.moe_config.expert_intermediate_size
        assert layers[0].residual_multiplier == ours.residual_multiplier
        assert model.model.embedding_multiplier == ours.embedding_multiplier
        assert model.config.logits_scaling == ours.logits_scaling


def test_hf_readings_of_rope_and_layer_names():
    """Legacy spellings are read as transformers reads them."""
    b = BambaConfig.from_hf({"model_type": "bamba", "rope_scaling": None, "rope_theta": 500, "num_hidden_layers": 3,
                             "attn_layer_indices": [2, 0], "layer_types": ["attention", "mamba", "attention"]})
    assert (b.rope_theta, b.partial_rotary_factor, b.attn_layer_indices) == (500.0, 0.5, (0, 2))
    assert b.layers_block_type == ["full_attention", "linear_attention", "full_attention"]
    full = BambaConfig.from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 3.0,
                                                    "partial_rotary_factor": 1.0}})
    assert full.attention_config is None and full.partial_rotary_factor == 1.0
    assert transformers.BambaConfig(**full.to_hf()).rope_parameters["partial_rotary_factor"] == 1.0
    g = GraniteMoeHybridConfig.from_hf({"num_hidden_layers": 2, "layers_block_type": ["mamba", "attention"],
                                        "rope_parameters": {"type": "default", "rope_theta": 7.0}})
    assert g.layer_types == ("linear_attention", "full_attention") and g.rope_theta == 7.0
    assert g.attention_config.rope_theta is None  # position_embedding_type None: no rotary embedding
    lim = BambaConfig.from_hf({"time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert lim.time_step_limit == (0.0, math.inf)
    assert BambaConfig.from_hf({"time_step_limit": [0.0, "inf"]}).time_step_limit == (0.0, math.inf)
    assert '"Infinity"' in lim.to_json_string()
    head = BambaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_n_heads=8,
                       attn_layer_indices=[0], num_hidden_layers=2)
    assert head.attention_config.head_dim == 16 and head.attention_config.rotary_dim == 8
    assert transformers.BambaConfig(**head.to_hf()).head_dim == 16


@pytest.mark.parametrize("model_type,changes,match", [
    ("bamba", {"mamba_d_head": 32}, r"mamba_n_heads \* mamba_d_head"),
    ("bamba", {"mamba_n_groups": 3}, "divisible by mamba_n_groups"),
    ("bamba", {"num_key_value_heads": 3}, "divisible by num_key_value_heads"),
    ("bamba", {"hidden_act": "gelu"}, "must be 'silu'"),
    ("bamba", {"attn_layer_indices": [4]}, r"in \[0, num_hidden_layers=4\)"),
    ("bamba", {"attn_layer_indices": [1, 1]}, "distinct"),
    ("bamba", {"partial_rotary_factor": 0.375}, "must be even"),
    ("bamba", {"time_step_limit": (0.5, 0.1)}, "0 <= lo <= hi"),
    ("bamba", {"time_step_limit": None}, "pair of numbers"),
    ("bamba", {"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ("bamba", {"mamba_n_heads": 0}, "mamba_n_heads"),
    ("bamba", {"vocab_size": 1.5}, "vocab_size"),
    ("granitemoehybrid", {"layer_types": ["mamba", "moe", "mamba", "mamba"]}, "must contain only"),
    ("granitemoehybrid", {"layer_types": ["mamba"]}, "has 1 entries but num_hidden_layers is 4"),
    ("granitemoehybrid", {"num_experts_per_tok": 5}, "at most num_local_experts"),
    ("granitemoehybrid", {"num_local_experts": -1}, "num_local_experts"),
    ("granitemoehybrid", {"position_embedding_type": "alibi"}, "position_embedding_type"),
    ("granitemoehybrid", {"logits_scaling": 0}, "logits_scaling"),
    ("granitemoehybrid", {"shared_intermediate_size": 0}, "shared_intermediate_size"),
])
def test_bad_values_are_refused(model_type, changes, match):
    kwargs = tiny_config_kwargs(model_type, 0, **changes)
    kwargs.pop("rope_theta", None)
    with pytest.raises(ValueError, match=match):
        FAMILIES[model_type][0](**kwargs)


@pytest.mark.parametrize("model_type,extra,match", [
    ("bamba", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ("bamba", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ("bamba", {"rope_parameters": {"rope_type": "default", "beta": 1}}, "does not handle"),
    ("bamba", {"partial_rotary_factor": 1.0}, "top level differs"),
    ("bamba", {"attn_rotary_emb": 8}, "attn_rotary_emb"),
    ("bamba", {"num_experts": 4}, "num_experts"),
    ("bamba", {"layer_types": ["mamba"] * 4}, "disagrees with attn_layer_indices"),
    ("bamba", {"sliding_window": 16}, "does not handle: 'sliding_window'"),
    ("bamba", {"model_type": "mamba2"}, "must be 'bamba'"),
    ("granitemoehybrid", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ("granitemoehybrid", {"partial_rotary_factor": 0.5}, "must be 1 or absent"),
    ("granitemoehybrid", {"normalization_function": "layernorm"}, "must be 'rmsnorm'"),
    ("granitemoehybrid", {"mlp_bias": True}, "does not handle: 'mlp_bias'"),
    ("granitemoehybrid", {"model_type": "bamba"}, "must be 'granitemoehybrid'"),
])
def test_keys_that_would_change_the_model_are_refused(model_type, extra, match):
    ours_cls, hf_cls = FAMILIES[model_type]
    cfg = {**hf_cls(**tiny_config_kwargs(model_type, 0)).to_dict(), **extra}
    with pytest.raises(ValueError, match=match):
        ours_cls.from_hf(cfg)


def test_harmless_keys_are_read():
    BambaConfig.from_hf({**BAMBA_9B, "z_loss_coefficient": 0.1, "use_mamba_kernels": False})
    GraniteMoeHybridConfig.from_hf({**GRANITE_4_H_TINY, "init_method": "normal", "output_router_logits": True})
