"""Bamba (`BambaForCausalLM`) against transformers 5.25's torch model, both tiny configs of
`tests/helpers_hybrid.py` (attention at [1, 3] with 1 Mamba group, untied; attention at [0] with 2 groups, tied,
every bias, a dt limit), every weight random. The checks are `hybrid_parity`'s; errors measured are printed
(`pytest -s`)."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fwd, rel_err
from helpers_hybrid import hf_forward, random_hf_model
from hybrid_parity import (
    TOL,
    check_cache_json,
    check_cached_steps,
    check_generate,
    check_hooks,
    check_left_padding,
    check_logits_loss_hidden_states,
    check_save_load_both_ways,
    check_sharded,
    hf_pieces,
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


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("case", [0], indirect=True)
def test_sharded_equals_unsharded(case):
    print(check_sharded(case))


def test_hooks(case):
    print(check_hooks(case))


def test_partial_rotary_rotates_half_of_each_head(case):
    attention = case.config.attention_config
    assert attention.rotary_dim == attention.head_dim // 2  # BambaConfig's fixed 0.5
    assert np.isclose(attention.scaling, attention.head_dim ** -0.5)


def test_cached_steps(case):
    print(check_cached_steps(case))


def test_greedy_generate_matches_transformers(case):
    check_generate(case)


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("case", [0], indirect=True)
def test_cache_json_round_trip(case):
    check_cache_json(case)


def test_hf_decodes_at_position_0_without_position_ids(case):
    """transformers' Bamba, given a cache and no position_ids, numbers the new tokens from 0 (it ignores the
    cache length): its cached steps then differ from its full forward; ours count real tokens, as generate's
    position_ids do (pinned here so a transformers fix shows up)."""
    ids = np.random.default_rng(7).integers(3, case.config.vocab_size, (2, 16))
    cuts = (7, 11, 12, 13, 14, 15)
    positioned = hf_pieces(case.hf, ids, cuts)
    if case.config.time_step_limit == (0.0, float("inf")):
        assert rel_err(positioned, hf_forward(case.hf, ids)) <= TOL
    assert rel_err(hf_pieces(case.hf, ids, cuts, with_positions=False), positioned) > 1e-3


def test_decode_steps_clamp_dt_as_the_full_forward(tmp_path):
    """With a tight time_step_limit the clamp applies to every path here, so cached steps equal our own full
    forward (and transformers' full forward); transformers' own one-token cached update skips the clamp, so its
    decode departs from its forward by more than 1e-3 (docs/status.md)."""
    hf = random_hf_model(MODEL_TYPE, 3, 0, time_step_limit=(0.2, 0.3))
    hf.save_pretrained(tmp_path)
    ours = em.from_pretrained(tmp_path)
    ids = np.random.default_rng(5).integers(3, ours.config.vocab_size, (2, 10))
    cache = fwd(ours, jnp.asarray(ids[:, :6]), cache=ours.init_cache(2, max_length=10)).cache
    steps = []
    for t in range(6, 10):
        logits, cache = ours.step(jnp.asarray(ids[:, t]), cache)
        steps.append(np.asarray(logits))
    full = hf_forward(hf, ids)[:, 6:]
    assert rel_err(np.stack(steps, 1), np.asarray(fwd(ours, jnp.asarray(ids)).logits)[:, 6:]) <= TOL
    assert rel_err(np.stack(steps, 1), full) <= TOL
    assert rel_err(hf_pieces(hf, ids, (6, 7, 8, 9))[:, 6:], full) > 1e-3  # transformers' steps skip the clamp
