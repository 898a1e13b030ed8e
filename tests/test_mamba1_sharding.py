"""Sharded Mamba-1 on 8 host devices: the same logits, decode steps and greedy tokens as one device, and every
parameter and cache leaf where the rules put it.

References are independent of the sharding code: the HF torch logits of the random model, and the same weights
run unsharded. Tolerance 1e-5 relative on float32 logits, as test_sharding: a sharded forward reduces in a
different order (x_proj's and out_proj's all-reduces), which moves results by float32 rounding (~1e-7), never
by 1e-5; greedy tokens must be identical. The expected PartitionSpecs are written out from the rules as
docs/mamba1.md states them, not computed by easymamba.sharding.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import hf_logits, random_ids, rel_err
from helpers_mamba1 import random_hf_mamba, to_easymamba_mamba1
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import easymamba as em
from easymamba.sharding import mesh_rules_of

TOL = 1e-5
BATCH, LENGTH, STEPS = 8, 12, 3
MESH = (2, 4)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, cache):
    out = nnx.merge(graphdef, state)(ids, cache=cache)
    return out.logits, out.cache


def run(model, ids, cache=None):
    return _forward(*nnx.split(model), ids, cache)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The random HF model (untied; vocab 96 and e = 64 divide the model axis), its directory, the prompt, and,
    unsharded, a greedy decode by hand: the logits of the prefill and of each decode step, and the STEPS + 1
    tokens chosen from them (what `generate` must produce)."""
    hf_model = random_hf_mamba(seed=31, vocab_size=96, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("mamba1_sharding") / "hf"
    hf_model.save_pretrained(path)
    ids = random_ids(np.random.default_rng(5), BATCH, LENGTH, 96)
    model = to_easymamba_mamba1(hf_model)
    logits, cache = run(model, jnp.asarray(ids), model.init_cache(BATCH))
    assert rel_err(logits, hf_logits(hf_model, ids)) <= TOL
    want, greedy = [np.asarray(logits)], [np.argmax(np.asarray(logits)[:, -1], -1)]
    for _ in range(STEPS):
        logits, cache = run(model, jnp.asarray(greedy[-1][:, None], jnp.int32), cache)
        want.append(np.asarray(logits))
        greedy.append(np.argmax(want[-1][:, -1], -1))
    return hf_model, path, ids, np.stack(greedy, axis=1), want


def expected_spec(path: tuple) -> P:
    """docs/mamba1.md's rules on a (data, model) mesh: the inner channels e over model (in_proj's packed 2e
    columns, conv, x_proj's input, dt_proj's output, A_log, D, out_proj's input), vocab over model, d
    replicated."""
    names = tuple(p for p in path if not isinstance(p, int))
    table = {
        ("embeddings", "weight"): P("model", None), ("lm_head", "kernel"): P(None, "model"),
        ("in_proj", "kernel"): P(None, "model"), ("conv1d", "weight"): P("model", None), ("conv1d", "bias"): P("model"),
        ("x_proj", "kernel"): P("model", None), ("dt_proj", "kernel"): P(None, "model"),
        ("dt_proj", "bias"): P("model"), ("mixer", "A_log"): P("model", None), ("mixer", "D"): P("model"),
        ("out_proj", "kernel"): P("model", None), ("norm", "weight"): P(None), ("norm_f", "weight"): P(None),
    }
    return table[names[-2:]]


def same_spec(a: P, b: P) -> bool:
    """Specs equal up to trailing Nones (jax may drop them)."""
    def strip(spec):
        entries = list(spec)
        while entries and entries[-1] is None:
            entries.pop()
        return tuple(entries)
    return strip(a) == strip(b)


def check_cache(cache, mesh):
    for view in cache.views:
        for leaf in ("conv_states", "ssm_states"):                   # [b, e, k] and [b, e, n]: e over model
            array = getattr(view, leaf)
            assert array.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model", None)), 3), leaf


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, elements per device) of every collective in a compiled HLO module."""
    out = []
    for m in re.finditer(r"= (\(?[a-z0-9]+\[[0-9,]*\][^ ]*) (all-gather|all-reduce|all-to-all|collective-permute|"
                         r"reduce-scatter)\(", hlo):
        dims = re.search(r"\[([0-9,]*)\]", m.group(1)).group(1)
        out.append((m.group(2), int(np.prod([int(x) for x in dims.split(",") if x]))))
    return out


def test_sharded_load_forward_decode_and_generate_match_unsharded(setup):
    _, path, ids, greedy, want = setup
    mesh = em.make_mesh(*MESH)
    model = em.from_pretrained(path, mesh=mesh)             # each device reads its own slices, by the rules
    for p, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        assert value.sharding.mesh == mesh and same_spec(value.sharding.spec, expected_spec(p)), (p, value.sharding)
    cache = model.init_cache(BATCH)                          # sharded by the model's rules, on its mesh
    check_cache(cache, mesh)
    logits, cache = run(model, em.shard_batch(ids, mesh), cache)
    assert rel_err(logits, want[0]) <= TOL
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model")), 3)
    for t in range(STEPS):                                   # decode steps continue from the sharded cache
        logits, cache = run(model, em.shard_batch(greedy[:, t:t + 1].astype(np.int32), mesh), cache)
        assert rel_err(logits, want[t + 1]) <= TOL, t
        check_cache(cache, mesh)
    # what a decode step moves between devices: the all-reduces of x_proj [b/2, 1, r + 2n] and out_proj
    # [b/2, 1, d] (and the vocab-split embedding's), and the re-sharding of in_proj's packed [x | z] output over e
    # (collective-permutes of at most [b/2, 1, 2e/4]); never a gathered cache window or state
    one = em.shard_batch(greedy[:, :1].astype(np.int32), mesh)
    ops = _collectives(_forward.lower(*nnx.split(model), one, cache).compile().as_text())
    e, r, n, d = 64, model.config.resolved_time_step_rank, model.config.state_size, model.config.hidden_size
    assert {op for op, _ in ops} <= {"all-reduce", "collective-permute"}, ops
    assert {size for op, size in ops if op == "all-reduce"} == {BATCH // 2 * (r + 2 * n), BATCH // 2 * d}, ops
    assert max(size for op, size in ops if op == "collective-permute") <= BATCH // 2 * 2 * e // 4, ops
    gen = em.generate(model, em.shard_batch(ids, mesh), max_new_tokens=STEPS + 1)
    np.testing.assert_array_equal(np.asarray(gen.sequences), np.concatenate([ids, greedy], axis=1))
    check_cache(gen.cache, mesh)


def test_shard_model_and_init_sharded(setup):
    hf_model, _, ids, _, want = setup
    mesh = em.make_mesh(*MESH)
    model = em.shard_model(to_easymamba_mamba1(hf_model), mesh)
    assert mesh_rules_of(model).heads == "model"
    logits, _ = run(model, em.shard_batch(ids, mesh), model.init_cache(BATCH))  # the compiled prefill above
    assert rel_err(logits, want[0]) <= TOL
    assert em.state_dict(model).keys() == em.state_dict(to_easymamba_mamba1(hf_model)).keys()

    # born sharded (one layer: the initialiser's compile is what costs here); HF's deterministic A_log init
    config = model.config.replace(num_hidden_layers=1)
    sharded = em.init_sharded(lambda: em.MambaForCausalLM(config, rngs=nnx.Rngs(3)), em.make_mesh(1, 8))
    for p, var in nnx.to_flat_state(nnx.state(sharded)):
        assert same_spec(var.get_value().sharding.spec, expected_spec(p)), p
    a_log = sharded.backbone.layers[0].mixer.A_log[...]
    np.testing.assert_allclose(np.asarray(a_log), np.log(np.tile(np.arange(1, 9), (64, 1))), rtol=1e-6)


def test_uneven_inner_channels_are_refused():
    config = em.MambaConfig(vocab_size=96, hidden_size=10, num_hidden_layers=1, state_size=4)  # e = 20
    with pytest.raises(ValueError, match=r"heads \(20\) is not divisible by mesh axis 'model' of size 8"):
        em.init_sharded(lambda: em.MambaForCausalLM(config, rngs=nnx.Rngs(0)), em.make_mesh(1, 8))
