"""Granite-4.0-H (`GraniteMoeHybridForCausalLM`) against transformers 5.25's torch model, both tiny configs of
`tests/helpers_hybrid.py` (4 experts top 2 + shared MLP, rope, untied; no experts, no positional encoding, tied,
biases), with every multiplier away from 1 and every weight random. The checks are `hybrid_parity`'s; errors
measured are printed (`pytest -s`)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import fwd, rel_err
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

MODEL_TYPE = "granitemoehybrid"


@pytest.fixture(scope="module", params=[0, 1], ids=["moe_rope_untied", "dense_nope_tied_bias"])
def case(request, tmp_path_factory):
    return make_case(MODEL_TYPE, request.param, tmp_path_factory.mktemp(f"hf{request.param}"))


def test_family_and_layers(case):
    assert type(case.ours) is em.GraniteMoeHybridForCausalLM
    ff = {type(layer.feed_forward).__name__ for layer in case.ours.backbone.layers}
    assert ff == ({"MoE"} if case.config.num_local_experts else {"MLP"})


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
    errors = check_hooks(case)
    if case.config.num_local_experts:  # hook_router_logits: the logits HF's router returns, every MoE layer
        _, acts = em.run_with_cache(case.ours, jnp.asarray(case.ids), names=lambda n: "router" in n)
        captured = {}
        handles = [layer.block_sparse_moe.router.register_forward_hook(
            lambda module, args, out, i=i: captured.__setitem__(i, out[0])) for i, layer in
            enumerate(case.hf.model.layers)]
        try:
            with torch.no_grad():
                case.hf(torch.from_numpy(case.ids).long(), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        for i, router in captured.items():
            errors[f"router_logits_{i}"] = rel_err(acts[f"layers.{i}.feed_forward.hook_router_logits"],
                                                   router.reshape(2, 13, -1).numpy())
        assert len(captured) == case.config.num_hidden_layers
        assert all(err <= TOL for err in errors.values()), errors
    print(errors)


def test_inputs_embeds_are_scaled_too(case):
    """HF multiplies `inputs_embeds` by embedding_multiplier as it does the looked-up embeddings."""
    ids = jnp.asarray(case.ids)
    embeds = case.ours.backbone.embeddings(ids)
    np.testing.assert_array_equal(np.asarray(case.ours(inputs_embeds=embeds).logits),
                                  np.asarray(case.ours(ids).logits))
    with torch.no_grad():
        ref = case.hf(inputs_embeds=torch.from_numpy(np.asarray(embeds)), use_cache=False).logits.numpy()
    assert rel_err(case.ours(inputs_embeds=embeds).logits, ref) <= TOL


def test_multipliers_reach_the_model(case):
    cfg = case.config
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) != (1.0, 1.0, 1.0)
    assert cfg.logits_multiplier == 1.0 / cfg.logits_scaling
    assert all(layer.residual_multiplier == cfg.residual_multiplier for layer in case.ours.backbone.layers)


def test_cached_steps(case):
    print(check_cached_steps(case))


def test_greedy_generate_matches_transformers(case):
    check_generate(case)


# one config is enough for this path (the other config's numerics are checked above); keeps CI short
@pytest.mark.parametrize("case", [0], indirect=True)
def test_cache_json_round_trip(case):
    check_cache_json(case)


def test_hf_counts_cached_positions_itself(case):
    """Unlike Bamba, transformers' Granite-4.0-H numbers cached tokens from the cache length without
    position_ids."""
    ids = np.random.default_rng(7).integers(3, case.config.vocab_size, (2, 16))
    cuts = (7, 11, 12, 13, 14, 15)
    assert rel_err(hf_pieces(case.hf, ids, cuts, with_positions=False), hf_pieces(case.hf, ids, cuts)) <= TOL
