"""What easymamba refuses (docs/refuses.md), one test per class of hostile or broken input: resource bombs, paths
that leave a checkpoint directory, silently wrong numbers, data loss, concurrent saves, malformed formats, user
errors in the Python API; and property-based fuzzing of the three readers of outside text (safetensors header,
config.json, cache JSON) asserting that only the documented exception types come out.

Kept cheap for CI (two CPU cores): tiny models built abstractly with numpy weights, no torch model, one eager
forward in all, one orbax save, two short subprocesses, <= 50 hypothesis examples per reader.
"""

import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import easymamba as em
from easymamba.checkpoints import destination, hf_reader
from easymamba.checkpoints.safetensors_format import read_header, read_index
from easymamba.checkpoints.sources import open_weights
from easymamba.models import FAMILIES, family_of

CONFIG = em.Mamba2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=8,
                         n_groups=2, chunk_size=8)
MAMBA1 = em.MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2)
FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def random_model(config=CONFIG, seed=0):
    """N(0, 0.1^2) numpy weights in an abstractly built model (no eager init to compile)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: family_of(config).causal_lm(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(state):
        v = var.get_value()
        var.set_value(jnp.asarray((0.1 * rng.standard_normal(v.shape, np.float32)).astype(v.dtype)))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture
def good(tmp_path, model):
    return em.save_pretrained(model, tmp_path / "good")


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def _raw_safetensors(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


# ---- 1. resource bombs ------------------------------------------------------------------------------------------

def test_resource_bombs_refused_before_any_work(good, monkeypatch):
    for family in FAMILIES.values():  # every family, hybrids included, through the one shared check
        for changes, field in ((dict(vocab_size=10**12), "vocab_size"), (dict(vocab_size=2**31 - 1), "parameters")):
            bomb = family.config_class().replace(**changes)
            with pytest.raises(ValueError, match=field):
                family.causal_lm(bomb, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"chunk_size \(8192\) must be at most 4096"):
        em.Mamba2ForCausalLM(CONFIG.replace(chunk_size=8192), rngs=nnx.Rngs(0))

    monkeypatch.setattr(hf_reader, "abstract_model", lambda *a, **k: pytest.fail("built before the names check"))
    for changes, match in ((dict(chunk_size=10**12), r"config\.json: .*chunk_size \(1000000000000\) must be at most"),
                           (dict(num_hidden_layers=10**6), r"num_hidden_layers \(1000000\) must be at most 1024"),
                           (dict(num_hidden_layers=40), r"says num_hidden_layers = 40, but the checkpoint has "
                                                        r"tensors for 2 layers")):
        _edit_config(good, **{"num_hidden_layers": 2, "chunk_size": 8, **changes})
        with pytest.raises(em.CheckpointError, match=match):
            em.from_pretrained(good)


# ---- 2. paths out of the checkpoint directory ------------------------------------------------------------------

def test_index_entries_stay_inside_the_directory(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.bin").write_bytes(b"pickle")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(tmp_path / "outside" / "x.bin", ckpt / "link.bin")
    index = ckpt / "pytorch_model.bin.index.json"
    for shard, match in (("../outside/x.bin", "not a plain file name"),
                         (str(tmp_path / "outside" / "x.bin"), "not a plain file name"),
                         ("link.bin", r"a link to .*outside/x\.bin, outside .*ckpt")):
        index.write_text(json.dumps({"weight_map": {"backbone.embeddings.weight": shard}}))
        with pytest.raises(em.CheckpointError, match=f"pytorch_model.bin.index.json names shard .*{match}"):
            open_weights(ckpt)
    index.unlink()
    os.symlink(tmp_path / "outside" / "x.bin", ckpt / "model-00001-of-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001"
                                                                                       ".safetensors"}}))
    with pytest.raises(em.CheckpointError, match=r"names shard model-00001-of-00001\.safetensors .* outside"):
        open_weights(ckpt)
    # A hub cache snapshot links its files into the repository's blobs/: that is still inside the checkpoint.
    snapshot, blobs = tmp_path / "models--o--n" / "snapshots" / "abc", tmp_path / "models--o--n" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "123").write_bytes(b"x")
    os.symlink("../../blobs/123", snapshot / "s.bin")
    (snapshot / "i.json").write_text(json.dumps({"weight_map": {"a": "s.bin"}}))
    assert read_index(snapshot / "i.json") == {"s.bin": ["a"]}


# ---- 3. silently wrong numbers ---------------------------------------------------------------------------------

def test_cache_refuses_views_in_another_layers_slot():
    for config, cache_cls in ((CONFIG, em.Mamba2Cache), (MAMBA1, em.MambaCache)):
        cache = nnx.eval_shape(lambda c=config: family_of(c).causal_lm(c, rngs=nnx.Rngs(0))).init_cache(1)
        with pytest.raises(ValueError, match=r"views\[0\] has layer_index 1; slot 0 takes layer 0's view"):
            cache_cls(cache.views[::-1])
        doc = cache.to_dict()
        doc["views"] = doc["views"][::-1]
        with pytest.raises(ValueError, match=r"views\[0\] has layer_index 1"):
            cache_cls.from_dict(doc)
        with pytest.raises(ValueError, match=r"views\[0\] has layer_index 1"):
            cache_cls.from_json(json.dumps({**json.loads(cache.to_json()),
                                            "views": json.loads(cache.to_json())["views"][::-1]}))


def test_model_call_takes_array_likes_and_refuses_right_padding_with_a_cache(model):
    ids = [[3, 1, 4, 1, 5]]
    logits = np.asarray(model(ids).logits)  # a list, as generate takes it (one eager forward in this file)
    np.testing.assert_array_equal(logits, np.asarray(model(np.asarray(ids)).logits))
    cache = model.init_cache(2)
    for mask in ([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], [[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]):
        with pytest.raises(ValueError, match=r"attention_mask with a cache must be left padding .* row 0 is"):
            model(jnp.asarray(ids * 2), attention_mask=mask, cache=cache)
    with pytest.raises(ValueError, match=r"input_ids must hold numbers; got list of dtype <U1"):
        model([["a", "b"]])


def test_non_finite_weights_warn_once_naming_the_tensors(good, caplog):
    tensors = safetensors.numpy.load_file(good / "model.safetensors")
    tensors["backbone.norm_f.weight"][3] = np.nan
    tensors["lm_head.weight"][0, 0] = np.inf
    safetensors.numpy.save_file(tensors, good / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        em.from_pretrained(good)
    ours = [w for w in seen if issubclass(w.category, em.NonFiniteWeightWarning)]
    assert len(ours) == 1, [str(w.message) for w in seen]
    assert "backbone.norm_f.weight" in str(ours[0].message) and "lm_head.weight" in str(ours[0].message)
    target = random_model()
    with pytest.warns(em.NonFiniteWeightWarning, match=r"the state dict: .*backbone\.norm_f\.weight"):
        em.load_state_dict(target, tensors)
    # and from an orbax checkpoint of such a model
    saved = em.save_checkpoint(target, good.parent / "orbax-nonfinite")
    with pytest.warns(em.NonFiniteWeightWarning, match=r"norm_f"):
        em.load_checkpoint(saved.parent)

    # A pickle is opened with weights_only=True, and said so in one line.
    torch = pytest.importorskip("torch")
    (good / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, good / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="easymamba"):
        open_weights(good).close()
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "torch.load(weights_only=True)" in caplog.records[0].getMessage()


# ---- 4. data loss in saves -------------------------------------------------------------------------------------

def test_saves_never_replace_what_they_did_not_write(tmp_path, model, good):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for save in (em.save_pretrained, em.save_checkpoint):
        for dst in (other, good):
            before = sorted(p.name for p in dst.iterdir())
            with pytest.raises(em.CheckpointError, match=r"is not empty \(it holds .*\): .* pass overwrite=True"):
                save(model, dst)
            assert sorted(p.name for p in dst.iterdir()) == before
    em.save_pretrained(model, other, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    (tmp_path / "empty").mkdir()
    em.save_checkpoint(model, tmp_path / "empty")  # an empty or new directory needs no flag
    with pytest.raises(em.CheckpointError, match="is not empty"):
        em.save_checkpoint(model, tmp_path / "empty")
    with pytest.raises(em.CheckpointError, match="is a file, not a directory"):
        em.save_pretrained(model, other / "notes.txt")


# ---- 5. concurrent saves ----------------------------------------------------------------------------------------

_SAVER = textwrap.dedent("""
    import os, sys, time
    import easymamba as em
    import jax.numpy as jnp, numpy as np
    from flax import nnx
    config = em.Mamba2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                             state_size=8, n_groups=2, chunk_size=8)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0))))
    for _, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(np.full(var.get_value().shape, 0.5, np.float32)))
    model = nnx.merge(graphdef, state)
    open(sys.argv[3], "w").close()                      # ready; wait for the other process to be ready too
    while not os.path.exists(sys.argv[4]):
        time.sleep(0.01)
    try:
        em.save_pretrained(model, sys.argv[1])
    except em.CheckpointError as exc:
        print(exc)
        sys.exit(3)
""")


def test_concurrent_saves_one_winner_no_hang(tmp_path, model):
    dst, go = tmp_path / "dst", tmp_path / "go"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(dst), "", str(tmp_path / f"ready{i}"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        go.touch()
        results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert sorted(rc for rc, _, _ in results) == [0, 3], results
    loser = next(out for rc, out, _ in results if rc == 3)
    assert "is being written by another save" in loser or "is not empty" in loser, loser
    assert (em.state_dict(em.from_pretrained(dst))["lm_head.weight"] == 0.5).all()  # the winner's, whole
    # The lock itself, deterministically: while one save holds the directory, another is refused at once.
    with destination.claim(tmp_path / "held", overwrite=False, what="a save"):
        with pytest.raises(em.CheckpointError, match=r"held is being written by another save right now"):
            em.save_checkpoint(model, tmp_path / "held")
    assert list((tmp_path / "held").iterdir()) == []


# ---- 6. format strictness ---------------------------------------------------------------------------------------

def test_malformed_headers_and_json_refused_by_name(tmp_path, good):
    entry = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    cases = [
        (b'{"a":' + entry.encode() + b',"a":' + entry.encode() + b"}", b"\0" * 8, "key 'a' twice"),
        (json.dumps({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}}).encode(), b"",
         r"span 0 bytes but shape \[1099511627776, 1099511627776\] of F32 needs 4835703278458516698824704"),
        (json.dumps({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}).encode(), b"\0" * 8,
         r"has dtype \['F32'\], which easymamba cannot read"),
        (json.dumps({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}).encode(), b"\0" * 8,
         "shape '2' must be a list of non-negative ints"),
        (b'{"__metadata__":' + b"[" * 5000 + b"]" * 5000 + b"}", b"", "nests objects and arrays deeper than 64"),
        (b'{"a\xff":1}', b"", r"not UTF-8 text: byte 0xff at offset 3"),
    ]
    for header, data, match in cases:
        path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
        with pytest.raises(em.CheckpointError, match=match) as info:
            read_header(path)
        assert str(path) in str(info.value)

    config = good / "config.json"
    for raw, match in ((b'{"model_type": "mamba2\xc3\x28"}', "is not UTF-8 text"),
                       (b"[" * 100_000 + b"]" * 100_000, "nests objects and arrays deeper than 64"),
                       (b'{"vocab_size": 40, "vocab_size": 50}', "has key 'vocab_size' twice")):
        config.write_bytes(raw)
        with pytest.raises(em.CheckpointError, match=r"good/config\.json .*" + match):
            em.from_pretrained(good)
        with pytest.raises(ValueError, match=match):
            em.Mamba2Config.from_hf(config)
    with pytest.raises(ValueError, match=r"the cache JSON nests objects and arrays deeper than 64"):
        em.Mamba2Cache.from_json('{"views": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=r"the cache JSON has key 'views' twice"):
        em.HybridCache.from_json('{"views": [], "views": []}')


# ---- fuzzing: only documented exception types out of the readers of outside text --------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=4), max_leaves=12)


def _mutate(doc, path_choice, value):
    """`doc` with the value at a path chosen by `path_choice` (a list of ints) replaced by `value`."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for i, pick in enumerate(path_choice):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = keys[pick % len(keys)]
        child = node[key]
        if i == len(path_choice) - 1 or not isinstance(child, (dict, list)):
            node[key] = value
            break
        node = child
    return doc


_PATHS = st.lists(st.integers(0, 50), min_size=1, max_size=5)


@FUZZ
@given(header=_JSON, edit=_PATHS, value=_JSON, raw=st.binary(max_size=64), use_raw=st.booleans())
def test_fuzz_safetensors_header(tmp_path, header, edit, value, raw, use_raw):
    valid = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]}}
    doc = _mutate(valid, edit, value) if isinstance(header, dict) else header
    body = raw if use_raw else json.dumps(doc).encode()
    path = _raw_safetensors(tmp_path / "f.safetensors", body, b"\0" * 12)
    try:
        read_header(path)
    except em.CheckpointError:
        pass


@FUZZ
@given(edit=_PATHS, value=_JSON)
def test_fuzz_config_reader(good, edit, value):
    valid = json.loads(em.Mamba2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=8,
                                       head_dim=8, state_size=8, n_groups=2, chunk_size=8).to_json_string())
    (good / "config.json").write_text(json.dumps(_mutate(valid, edit, value), allow_nan=True))
    try:
        hf_reader.read_config(good)
    except em.CheckpointError:
        pass


_CACHE_JSON = json.loads(nnx.eval_shape(lambda: em.Mamba2ForCausalLM(CONFIG, rngs=nnx.Rngs(0))).init_cache(1)
                         .to_json())


@FUZZ
@given(edit=st.lists(st.integers(0, 50), min_size=1, max_size=7), value=_JSON)
def test_fuzz_cache_json_reader(edit, value):
    try:
        em.Mamba2Cache.from_json(json.dumps(_mutate(_CACHE_JSON, edit, value)))
    except ValueError:  # CheckpointError is one too; the cache's documented type is ValueError
        pass
