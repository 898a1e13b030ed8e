"""Bamba (`BambaForCausalLM`) against transformers 5.25's torch model, both tiny configs of
`tests/helpers_hybrid.py` (attention at [1, 3] with 1 Mamba group, untied; attention at [0] with 2 groups, tied,
every bias, a dt limit), every weight random. The checks are `hybrid_parity`'s; errors measured are printed
(`pytest -s`)."""

import numpy as np
import pytest
from hybrid_parity import (
    check_hooks,
    check_left_padding,
    check_logits_loss_hidden_states,
    check_save_load_both_ways,
    check_sharded,
    make_case,
)

import easymamba as em

MODEL_TYPE = "bamba"


@pytest.fixture(scope="module", params=[0, 1], ids=["attn13_untied", "attn0_tied_bias"])
def case(request, tmp_path_factory):
    return make_case(MODEL_TYPE, request.param, tmp_path_factory.mktemp(f"hf{request.param}"))


def test_family_and_layers(case):
    assert type(case.ours) is em.BambaForCausalLM and isinstance(case.ours.config, em.BambaConfig)
    kinds = [type(layer.mixer).__name__ for layer in case.ours.backbone.layers]
    assert kinds == ["Attention" if t == "full_attention" else "Mamba2Mixer"
                     for t in case.config.layers_block_type]
    assert all(type(layer.feed_forward).__name__ == "MLP" for layer in case.ours.backbone.layers)


def test_logits_loss_hidden_states(case):
    print(check_logits_loss_hidden_states(case))


def test_left_padding(case):
    print(check_left_padding(case))


def test_save_load_both_ways(case, tmp_path):
    print(check_save_load_both_ways(case, tmp_path))


def test_sharded_equals_unsharded(case):
    print(check_sharded(case))


def test_hooks(case):
    print(check_hooks(case))


def test_partial_rotary_rotates_half_of_each_head(case):
    attention = case.config.attention_config
    assert attention.rotary_dim == attention.head_dim // 2  # BambaConfig's fixed 0.5
    assert np.isclose(attention.scaling, attention.head_dim ** -0.5)
