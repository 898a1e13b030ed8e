"""Sharded inference on 8 host devices: the same numbers as one device, and every array where the rules put it.

References are independent of the sharding code: Hugging Face torch logits of the random model, and the same
weights run unsharded. Tolerance 1e-5 relative on float32 logits, as in test_model_parity: a sharded forward
reduces in a different order (out_proj's all-reduce, the norm's statistics over shards), which moves results
by float32 rounding (~1e-7..1e-6), never by 1e-5; greedy tokens must be identical.

The expected PartitionSpecs below are written out from the rules as docs/sharding.md states them, not computed
by easymamba.sharding, so a wrong table entry fails here.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import easymamba as em
from easymamba.sharding import ShardingRules, mesh_rules_of
from helpers import hf_logits, jitted, random_hf_model, random_ids, rel_err, to_easymamba

TOL = 1e-5
BATCH, LENGTH, NEW = 8, 12, 6
MESHES = [(8, 1), (1, 8), (2, 4), (4, 2)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # n_groups 2: replicated B/C on a model axis of 4 or 8, sharded on 2; vocab 96 divides every model axis
    hf_model = random_hf_model(seed=31, n_groups=2, vocab_size=96)
    path = tmp_path_factory.mktemp("sharding") / "hf"
    hf_model.save_pretrained(path)
    return hf_model, path


@pytest.fixture(scope="module")
def reference(hf_dir):
    """Unsharded logits and greedy tokens of the same weights."""
    hf_model, _ = hf_dir
    ids = random_ids(np.random.default_rng(5), BATCH, LENGTH, 96)
    model = to_easymamba(hf_model)
    logits = np.asarray(model(jnp.asarray(ids)).logits)
    assert rel_err(logits, hf_logits(hf_model, ids)) <= TOL
    tokens = np.asarray(em.generate(model, ids, max_new_tokens=NEW).sequences)
    return ids, logits, tokens


def expected_spec(path: tuple, mesh_shape: tuple, config) -> P:
    """The rules of docs/sharding.md, written out: batch over data; heads (z, x, dt, the x conv channels,
    dt_bias/A_log/D, the gated norm, out_proj's input) over model; B/C and their conv channels over model
    when n_groups divides it; vocab over model when it divides; d replicated."""
    model = mesh_shape[1]
    groups = "model" if config.n_groups % model == 0 else None
    vocab = "model" if config.vocab_size % model == 0 else None
    names = tuple(p for p in path if not isinstance(p, int))
    leaf, owner = names[-1], names[-2]
    if names == ("backbone", "embeddings", "weight"):
        return P(vocab, None)
    if names == ("lm_head", "kernel"):
        return P(None, vocab)
    if "in_proj" in names:
        axis = groups if owner in ("B", "C") else "model"
        return P(None, axis) if leaf == "kernel" else P(axis)
    if "conv1d" in names:
        axis = "model" if owner == "x" else groups
        return P(axis, None) if leaf == "weight" else P(axis)
    if names[-2:] in (("mixer", "dt_bias"), ("mixer", "A_log"), ("mixer", "D")) or names[-3:] == ("mixer", "norm",
                                                                                                    "weight"):
        return P("model")
    if "out_proj" in names:
        return P("model", None) if leaf == "kernel" else P()
    if leaf == "weight" and owner in ("norm", "norm_f"):
        return P(None)
    raise AssertionError(f"no expectation for {path}")


def same_spec(a: P, b: P) -> bool:
    """Specs equal up to trailing Nones (jax may drop them)."""
    def strip(spec):
        entries = list(spec)
        while entries and entries[-1] is None:
            entries.pop()
        return tuple(entries)
    return strip(a) == strip(b)


def check_param_shardings(model, mesh, mesh_shape):
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        want = expected_spec(path, mesh_shape, model.config)
        assert isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh, path
        assert same_spec(value.sharding.spec, want), (path, value.sharding.spec, want)


def check_cache_shardings(cache, mesh):
    for view in cache.views:
        for leaf, spec in (("conv_states", P("data", None, None)), ("ssm_states", P("data", "model", None, None)),
                           ("positions", P("data"))):
            array = getattr(view, leaf)
            assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), (leaf, array.sharding)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_model_matches_unsharded(hf_dir, reference, mesh_shape):
    _, path = hf_dir
    ids, want_logits, want_tokens = reference
    mesh = em.make_mesh(*mesh_shape)
    model = em.from_pretrained(path, mesh=mesh)            # each device reads its own slices, by the rules
    check_param_shardings(model, mesh, mesh_shape)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, i, c: nnx.merge(graphdef, s)(i, cache=c))
    cache = model.init_cache(BATCH)                         # sharded by the model's rules, on its mesh
    check_cache_shardings(cache, mesh)
    out = forward(state, em.shard_batch(ids, mesh), cache)
    assert rel_err(out.logits, want_logits) <= TOL
    # nothing came back gathered: logits split by rows (and vocab), the cache as it went in
    assert out.logits.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model")), 3)
    check_cache_shardings(out.cache, mesh)


    gen = em.generate(model, em.shard_batch(ids, mesh), max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(gen.sequences), want_tokens)
    check_cache_shardings(gen.cache, mesh)
    assert gen.sequences.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)


def test_init_sharded_equals_unsharded_init():
    config = em.Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                             state_size=16, n_groups=4, chunk_size=8)
    mesh = em.make_mesh(2, 4)
    make = lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(3))  # noqa: E731
    sharded = em.init_sharded(make, mesh)
    check_param_shardings(sharded, mesh, (2, 4))
    # The random bits are sharding-invariant (threefry_partitionable); the float math after them (erfinv of a
    # normal draw, log for A_log) may be fused or constant-folded differently by XLA with and without
    # sharding, or eagerly, which moves the last bit: 1e-6 relative is that rounding, nothing more.
    plain = em.state_dict(make())
    for name, value in em.state_dict(sharded).items():
        assert rel_err(value, plain[name]) <= 1e-6, name


def test_init_sharded_never_holds_a_whole_parameter():
    """The compiled initialiser (after SPMD partitioning) has no value of a sharded parameter's full shape on
    any device, and its per-device temporaries stay below the largest parameter."""
    config = em.Mamba2Config(vocab_size=4096, hidden_size=256, num_hidden_layers=2, num_heads=16, head_dim=32,
                             state_size=32, n_groups=8, chunk_size=8)
    mesh = em.make_mesh(1, 8)
    make = lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0))  # noqa: E731
    abstract = nnx.eval_shape(make)
    flat = nnx.to_flat_state(nnx.state(abstract))
    shardings = em.sharding.param_shardings(abstract, mesh)
    sizes = [v.get_value().size * 4 for _, v in flat]
    state_shardings = nnx.from_flat_state([(p, v.replace(shardings[p])) for p, v in flat])
    compiled = jax.jit(lambda: nnx.state(make()), out_shardings=state_shardings).lower().compile()
    mem = compiled.memory_analysis()
    assert mem.output_size_in_bytes < sum(sizes) / 8 * 1.1       # only the small norms are replicated
    assert mem.temp_size_in_bytes < max(sizes), (mem.temp_size_in_bytes, max(sizes))

    def shape_text(shape):
        return "f32[" + ",".join(str(d) for d in shape) + "]"

    # a full shape that is also some parameter's per-device shape (a shard of another) proves nothing
    per_device = {shape_text(shardings[p].shard_shape(v.get_value().shape)) for p, v in flat}
    whole = {shape_text(v.get_value().shape) for p, v in flat if not shardings[p].is_fully_replicated} - per_device
    assert len(whole) >= 4, whole
    hlo = compiled.as_text()
    assert not [s for s in whole if s in hlo], [s for s in whole if s in hlo]


def test_shard_model_places_an_existing_model(hf_dir, reference):
    hf_model, _ = hf_dir
    ids, want_logits, _ = reference
    mesh = em.make_mesh(4, 2)
    model = em.shard_model(to_easymamba(hf_model), mesh)
    check_param_shardings(model, mesh, (4, 2))
    assert mesh_rules_of(model).groups == "model"            # n_groups 2 divides model 2: B/C sharded
    assert rel_err(jitted(model)(em.shard_batch(ids, mesh)).logits, want_logits) <= TOL
    # the checkpoint boundary still speaks HF: packed in_proj / conv1d, same bytes as the unsharded model
    plain = em.state_dict(to_easymamba(hf_model))
    for name, value in em.state_dict(model).items():
        np.testing.assert_array_equal(value, plain[name], err_msg=name)
    em.load_state_dict(model, hf_model.state_dict())          # overwriting keeps every parameter's sharding
    check_param_shardings(model, mesh, (4, 2))


@pytest.mark.parametrize("heads, groups, mesh_shape", [(8, 2, (2, 4)), (12, 3, (4, 2))])
def test_pallas_kernels_run_per_shard(heads, groups, mesh_shape):
    """impl="pallas" (interpret mode on CPU) under shard_map: the SSD and conv kernels run on each device's heads;
    B/C replicated (n_groups does not divide the model axis) are cut to each shard's groups: all heads of a
    shard in one group (8 heads, 2 groups, 4 shards), or a group per head (12 heads, 3 groups, 2 shards)."""
    config = em.Mamba2Config(vocab_size=96, hidden_size=heads * 8, num_hidden_layers=1, num_heads=heads,
                             head_dim=16, state_size=16, n_groups=groups, chunk_size=8)
    ids = random_ids(np.random.default_rng(1), 4, 8, 96)
    reference = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0), kernel_impl="xla")
    want = np.asarray(jitted(reference)(jnp.asarray(ids)).logits)
    mesh = em.make_mesh(*mesh_shape)
    model = em.init_sharded(lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0), kernel_impl="pallas"), mesh)
    assert mesh_rules_of(model).groups is None
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))
    sharded_ids = em.shard_batch(ids, mesh)
    lowered = forward.lower(state, sharded_ids)
    assert "sdy.manual_computation" in lowered.as_text()                   # the shard_map
    assert rel_err(lowered.compile()(state, sharded_ids).logits, want) <= TOL


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, elements per device) of every collective in a compiled HLO module."""
    out = []
    for m in re.finditer(r"= (\(?[a-z0-9]+\[[0-9,]*\][^ ]*) (all-gather|all-reduce|all-to-all|collective-permute|"
                         r"reduce-scatter)\(", hlo):
        dims = re.search(r"\[([0-9,]*)\]", m.group(1)).group(1)
        out.append((m.group(2), int(np.prod([int(d) for d in dims.split(",") if d]))))
    return out


def test_decode_step_moves_only_a_column():
    """The cache keeps the packed conv state [x | B | C] channel-replicated; a decode step gathers the new
    column of x (b * e / shards elements per device, per layer), never the window, and reshuffles nothing."""
    config = em.Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                             state_size=16, n_groups=2, chunk_size=8)
    mesh = em.make_mesh(2, 4)
    model = em.init_sharded(lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, i, c: nnx.merge(graphdef, s)(i, cache=c))
    ids = em.shard_batch(np.ones((BATCH, 1), np.int32), mesh)
    hlo = step.lower(state, ids, model.init_cache(BATCH)).compile().as_text()
    ops = _collectives(hlo)
    assert not [op for op in ops if op[0] in ("all-to-all", "collective-permute")], ops
    gathers = [n for op, n in ops if op == "all-gather"]
    rows = BATCH // 2
    assert len(gathers) == config.num_hidden_layers and all(n == rows * config.intermediate_size for n in gathers), ops


def test_errors_are_sentences():
    config = em.Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_heads=8, head_dim=8,
                             state_size=16, n_groups=2, chunk_size=8)
    make = lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0))  # noqa: E731
    with pytest.raises(ValueError, match=r"heads \(8\) is not divisible by mesh axis 'model' of size 3"):
        em.init_sharded(make, em.make_mesh(1, 3))
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match=r"not AxisType\.Auto"):
        em.init_sharded(make, explicit)
    with pytest.raises(ValueError, match="lacks"):
        em.init_sharded(make, jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,)))
    model = em.init_sharded(make, em.make_mesh(4, 2))
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by mesh axis 'data' of size 4"):
        jitted(model)(jnp.ones((6, 3), jnp.int32))
    with pytest.raises(ValueError, match="devices"):
        em.make_mesh(4, 4)
    with pytest.raises(ValueError, match="must go to the heads' mesh axis"):
        em.init_sharded(make, em.make_mesh(2, 4), ShardingRules(groups="data"))


def test_parameters_declare_their_axes_where_they_are_made():
    """The sharding of a parameter is the `axes` it declared when it was made; one made without them, or with an
    axis the rules do not know, is refused by name instead of being replicated silently."""
    config = em.Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_heads=8, head_dim=8,
                             state_size=16, n_groups=2, chunk_size=8)
    model = nnx.eval_shape(lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0)))
    axes = em.sharding.declared_axes(model)
    assert axes[("backbone", "layers", 0, "mixer", "in_proj", "B", "kernel")] == ("embed", "groups")
    assert axes[("backbone", "layers", 0, "mixer", "out_proj", "kernel")] == ("heads", "embed")
    assert len(axes) == len(nnx.to_flat_state(nnx.state(model)))          # every parameter declares its axes
    mesh = em.make_mesh(4, 2)
    model.backbone.norm_f.weight = nnx.Param(jax.ShapeDtypeStruct((32,), jnp.float32))
    with pytest.raises(ValueError, match=r"parameter backbone\.norm_f\.weight declares no logical axes"):
        em.sharding.param_shardings(model, mesh)
    model.backbone.norm_f.weight = nnx.Param(jax.ShapeDtypeStruct((32,), jnp.float32), axes=("hidden",))
    with pytest.raises(ValueError, match=r"declares logical axes \['hidden'\], not among"):
        em.sharding.param_shardings(model, mesh)


def test_uneven_vocab_and_custom_rules_replicate():
    config = em.Mamba2Config(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_heads=8, head_dim=8,
                             state_size=16, n_groups=8, chunk_size=8, tie_word_embeddings=True)
    mesh = em.make_mesh(2, 4)
    make = lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0))  # noqa: E731
    B_kernel = ("backbone", "layers", 0, "mixer", "in_proj", "B", "kernel")
    embedding = ("backbone", "embeddings", "weight")
    default = em.sharding.param_shardings(nnx.eval_shape(make), mesh)
    assert same_spec(default[embedding].spec, P())                        # 97 % 4: vocab replicated
    assert same_spec(default[B_kernel].spec, P(None, "model"))            # 8 groups over 4: sharded
    custom = em.sharding.param_shardings(nnx.eval_shape(make), mesh, ShardingRules(groups=None, vocab=None))
    assert same_spec(custom[B_kernel].spec, P())
    ids = random_ids(np.random.default_rng(2), 4, 7, 97)
    want = np.asarray(jitted(make())(jnp.asarray(ids)).logits)
    model = em.init_sharded(make, mesh)                                    # the tied head reads a replicated table
    assert rel_err(jitted(model)(em.shard_batch(ids, mesh)).logits, want) <= TOL


# ---- host memory of a sharded load ------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent('''
    import json, os, sys, threading, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from flax import nnx
    import easymamba as em

    def anon_kib():  # private (anonymous) resident memory: allocations, not the file's mapped pages
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    mesh = em.make_mesh(1, 8)
    em.from_pretrained(sys.argv[2], mesh=mesh)          # warm up: code paths, allocator pools
    sys.setswitchinterval(1e-4)
    base, peak, stop = anon_kib(), [0], [False]
    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = em.from_pretrained(sys.argv[1], mesh=mesh)
    jax.block_until_ready(nnx.state(model))
    stop[0] = True
    sampler.join()
    peak[0] = max(peak[0], anon_kib())
    resident = sum(s.data.nbytes for _, v in nnx.to_flat_state(nnx.state(model))
                   for s in v.get_value().addressable_shards)
    print(json.dumps({"base_kib": base, "peak_kib": peak[0], "resident_bytes": resident}))
''')


def test_sharded_load_peak_host_memory(tmp_path):
    """Load a ~57 MB sharded safetensors checkpoint onto a (1, 8) mesh in a fresh process and sample its
    anonymous RSS every 0.5 ms. On CPU the 8 devices' buffers ARE host memory, so the bound is the model
    (what the devices end up holding) plus one tensor: the loader may never hold a second copy of the model.
    File pages of the memory-mapped checkpoint are page cache, not counted (RssFile)."""
    config = em.Mamba2Config(vocab_size=8192, hidden_size=512, num_hidden_layers=3, num_heads=16, head_dim=64,
                             state_size=64, n_groups=8, chunk_size=64)
    model = em.init_sharded(lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0)), em.make_mesh(8, 1))
    em.save_pretrained(model, tmp_path / "big", max_shard_size="10MB")
    assert len(list((tmp_path / "big").glob("model-*.safetensors"))) > 1
    small = em.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=8, head_dim=8,
                            state_size=16, n_groups=8, chunk_size=8)
    em.save_pretrained(em.Mamba2ForCausalLM(small, rngs=nnx.Rngs(0)), tmp_path / "small")
    sizes = {name: value.nbytes for name, value in em.state_dict(model).items()}
    model_bytes, largest = sum(sizes.values()), max(sizes.values())
    del model

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # glibc keeps freed large blocks in its heap (a dynamic mmap threshold), so RSS would count memory the
    # loader already gave back; a fixed threshold returns every block >= 64 KiB to the kernel on free
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    grew = (got["peak_kib"] - got["base_kib"]) * 1024
    print(f"\nsharded load: model {model_bytes / 2**20:.1f} MiB, largest tensor {largest / 2**20:.1f} MiB, "
          f"device-resident {got['resident_bytes'] / 2**20:.1f} MiB, peak anonymous RSS growth "
          f"{grew / 2**20:.1f} MiB")
    assert got["resident_bytes"] < model_bytes * 1.01          # sharded, not replicated (norms aside)
    assert grew < model_bytes + largest, (grew, model_bytes, largest)
