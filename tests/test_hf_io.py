"""HF checkpoint directories in and out: transformers round trips, the state-spaces layout, bf16 without torch,
sharding across devices, and one crafted bad directory per error message.

Tolerance: logits rel err <= 1e-5 in float32, as in test_model_parity (different summation orders between
XLA and torch move logits by ~1e-7..1e-6; a wrong tensor moves them by 1e-2 or more). Tensors themselves must
come back bit for bit.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import easymamba as em
from easymamba.checkpoints import safetensors_writer
from easymamba.checkpoints.sources import SafetensorsFile
from helpers import hf_logits, random_hf_model, random_ids, rel_err

TOL = 1e-5
REPO = pathlib.Path(__file__).resolve().parents[1]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def _logits(model, ids):
    """Our logits through one module-level jit, so equal configs compile once for the whole file."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(ids)))


def random_model(config: em.Mamba2Config, seed: int = 0, param_dtype=jnp.float32) -> em.Mamba2ForCausalLM:
    """A model with N(0, 0.1^2) numpy weights, built abstractly (eager random init compiles op by op)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0),
                                                                            param_dtype=param_dtype)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(state):
        v = var.get_value()
        var.set_value(jnp.asarray((0.1 * rng.standard_normal(v.shape, np.float32)).astype(v.dtype)))
    return nnx.merge(graphdef, state)


def _files(directory):
    return sorted(p.name for p in pathlib.Path(directory).iterdir())


# Configs are shared between tests (TIED_G2 with the state-spaces test, UNTIED_G1 with the HF .bin test) so
# that `_forward` compiles once per config.
UNTIED_G1 = dict(n_groups=1)
TIED_G2 = dict(n_groups=2, tie_word_embeddings=True, vocab_size=96, pad_token_id=0, bos_token_id=0,
               eos_token_id=0)
ROUND_TRIPS = {
    # name: (HF config overrides, max_shard_size or None for one file)
    "untied_g1_single_file": (UNTIED_G1, None),
    "tied_g2_sharded": (TIED_G2, "20KB"),
    "untied_g4_bias_sharded": (dict(n_groups=4, use_bias=True), 30_000),
}
IDS = random_ids(np.random.default_rng(0), 2, 13, 90)


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_through_transformers(name, tmp_path):
    overrides, shard = ROUND_TRIPS[name]
    hf_model = random_hf_model(seed=len(name), **overrides)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    hf_model.save_pretrained(tmp_path / "hf", **kwargs)
    sharded = (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert sharded == (shard is not None)

    model = em.from_pretrained(tmp_path / "hf")
    theirs = hf_logits(hf_model, IDS)
    assert rel_err(_logits(model, IDS), theirs) <= TOL

    em.save_pretrained(model, tmp_path / "ours", **kwargs)
    files = _files(tmp_path / "ours")
    assert ("model.safetensors.index.json" in files) == sharded
    assert sharded == (sum(f.startswith("model-") for f in files) > 1)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    want = hf_model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert rel_err(hf_logits(back.eval(), IDS), theirs) <= TOL


def _state_spaces_config(hf_config) -> dict:
    """The original mamba_ssm config.json describing the same model as `hf_config`."""
    return {"d_model": hf_config.hidden_size, "d_intermediate": 0, "n_layer": hf_config.num_hidden_layers,
            "vocab_size": 90, "ssm_cfg": {"layer": "Mamba2", "d_state": hf_config.state_size,
                                          "headdim": hf_config.head_dim, "ngroups": hf_config.n_groups,
                                          "chunk_size": hf_config.chunk_size},
            "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
            "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}


def _write_state_spaces(hf_model, directory: pathlib.Path) -> None:
    directory.mkdir()
    sd = hf_model.state_dict()  # tied: holds lm_head.weight sharing the embedding, as mamba_ssm saves it
    sd["backbone.embedding.weight"] = sd.pop("backbone.embeddings.weight")
    torch.save(sd, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(_state_spaces_config(hf_model.config)))


@pytest.mark.parametrize("layout", ["state_spaces", "hf_bin", "hf_bin_sharded"])
def test_pytorch_bin_loads_to_same_logits(layout, tmp_path):
    if layout == "state_spaces":  # vocab 90 padded to a multiple of 16 by the config -> 96 rows
        hf_model = random_hf_model(seed=4, **TIED_G2)
        _write_state_spaces(hf_model, tmp_path / "ckpt")
    elif layout == "hf_bin":
        hf_model = random_hf_model(seed=6, **UNTIED_G1)
        hf_model.config.save_pretrained(tmp_path / "ckpt")
        torch.save(hf_model.state_dict(), tmp_path / "ckpt" / "pytorch_model.bin")
    else:  # pytorch_model-0000i-of-00002.bin + pytorch_model.bin.index.json, as transformers 4.x sharded
        hf_model = random_hf_model(seed=7, **UNTIED_G1)
        hf_model.config.save_pretrained(tmp_path / "ckpt")
        items = list(hf_model.state_dict().items())
        weight_map = {}
        for i, part in enumerate((items[:7], items[7:]), start=1):
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save(dict(part), tmp_path / "ckpt" / name)
            weight_map.update(dict.fromkeys((k for k, _ in part), name))
        (tmp_path / "ckpt" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = em.from_pretrained(tmp_path / "ckpt")
    assert model.config == em.Mamba2Config.from_hf(hf_model.config.to_dict())
    assert rel_err(_logits(model, IDS), hf_logits(hf_model, IDS)) <= TOL


_NO_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None          # any `import torch` now raises ImportError
    import jax.numpy as jnp, numpy as np
    import easymamba as em
    src, out, bin_dir = sys.argv[1:4]
    assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
    m32 = em.from_pretrained(src)
    m16 = em.from_pretrained(src, param_dtype=jnp.bfloat16)
    arrays = {}
    for k, v in em.state_dict(m32).items():
        assert v.dtype == np.float32, (k, v.dtype)
        arrays["f32/" + k] = v
    for k, v in em.state_dict(m16).items():
        assert v.dtype == jnp.bfloat16, (k, v.dtype)
        arrays["bf16/" + k] = v.view(np.uint16)
    np.savez(out, **arrays)
    try:
        em.from_pretrained(bin_dir)
    except em.CheckpointError as exc:
        print("BIN ERROR:", exc)
""")


def test_bfloat16_safetensors_load_without_torch(tmp_path):
    hf_model = random_hf_model(seed=8, n_groups=2).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bin").mkdir()
    hf_model.config.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read without torch")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path / "bf16"), str(tmp_path / "out.npz"),
                          str(tmp_path / "bin")], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "BIN ERROR:" in run.stdout and "torch is not installed" in run.stdout, run.stdout
    got = np.load(tmp_path / "out.npz")
    for k, v in hf_model.state_dict().items():
        if k == "lm_head.weight":
            continue
        np.testing.assert_array_equal(got["f32/" + k], v.float().numpy(), err_msg=k)  # bf16 -> f32 is exact
        np.testing.assert_array_equal(got["bf16/" + k], v.view(torch.int16).numpy().view(np.uint16), err_msg=k)


def test_mesh_places_each_parameter_with_its_sharding(tmp_path):
    hf_model = random_hf_model(seed=9, n_groups=2)
    hf_model.save_pretrained(tmp_path / "hf")
    mesh = jax.make_mesh((2,), ("model",))

    def spec(path):  # shard matmul kernels over their output features, replicate the rest
        return P(None, "model") if path[-1] == "kernel" and "mixer" in path else None

    model = em.from_pretrained(tmp_path / "hf", mesh=mesh, shardings=spec)
    kernel = model.backbone.layers[1].mixer.in_proj.x.kernel[...]  # HF's packed in_proj, stored in parts
    assert kernel.sharding.spec == P(None, "model") and len(kernel.sharding.device_set) == 2
    assert model.backbone.norm_f.weight[...].sharding.spec == P()
    reference = em.state_dict(em.from_pretrained(tmp_path / "hf"))
    for k, v in em.state_dict(model).items():
        np.testing.assert_array_equal(v, reference[k])
    with pytest.raises(ValueError, match=r"2 entries for a parameter of rank 1"):
        em.from_pretrained(tmp_path / "hf", mesh=mesh, shardings=lambda path: P(None, "model") if "mixer" in path
                           else None)
    with pytest.raises(ValueError, match=r"cannot place lm_head\.weight from .*model\.safetensors of shape \(32, 97\)"):
        em.from_pretrained(tmp_path / "hf", mesh=mesh,
                           shardings=lambda path: P(None, "model") if path[-1] == "kernel" else None)
    with pytest.raises(ValueError, match="without a mesh"):
        em.from_pretrained(tmp_path / "hf", shardings=spec)


# ---- crafted bad directories: one per error -----------------------------------------------------------

def _tiny() -> em.Mamba2ForCausalLM:
    return random_model(em.Mamba2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=8,
                                        head_dim=8, state_size=8, n_groups=2, chunk_size=8))


@pytest.fixture
def good(tmp_path):
    """A valid float32 HF directory written by easymamba; tests break one thing in it."""
    return em.save_pretrained(_tiny(), tmp_path / "good")


def _edit_tensors(directory, edit):
    """Rewrite model.safetensors through the `safetensors` package (independent of our writer)."""
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return path


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_good_directory_loads_and_save_is_idempotent(good):
    model = em.from_pretrained(good)
    np.testing.assert_array_equal(em.state_dict(model)["backbone.layers.1.mixer.in_proj.weight"],
                                  safetensors.numpy.load_file(good / "model.safetensors")[
                                      "backbone.layers.1.mixer.in_proj.weight"])
    # Re-saving sharded into the same directory (overwrite=True) removes the single file (it would shadow the shards).
    em.save_pretrained(model, good, max_shard_size="8KB", overwrite=True)
    assert "model.safetensors" not in _files(good)
    assert em.state_dict(em.from_pretrained(good)).keys() == em.state_dict(model).keys()


def test_missing_tensor(good):
    _edit_tensors(good, lambda t: t.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(em.CheckpointError,
                       match=r"tensor backbone\.layers\.1\.mixer\.D is missing from .*model\.safetensors"):
        em.from_pretrained(good)


def test_unexpected_tensor(good):
    _edit_tensors(good, lambda t: t.update({"backbone.layers.0.mixer.extra": np.ones(3, np.float32)}))
    with pytest.raises(em.CheckpointError, match=r"unexpected tensor.*backbone\.layers\.0\.mixer\.extra in "
                                                 r".*model\.safetensors"):
        em.from_pretrained(good)


def test_shape_mismatch(good):
    _edit_tensors(good, lambda t: t.update({"backbone.layers.1.mixer.dt_bias": np.ones(5, np.float32)}))
    with pytest.raises(em.CheckpointError, match=r"tensor backbone\.layers\.1\.mixer\.dt_bias in .*model\.safetensors: "
                                                 r"expected shape \(8,\) for this config, found \(5,\)"):
        em.from_pretrained(good)


def test_unsupported_dtype(good):
    _edit_tensors(good, lambda t: t.update({"backbone.layers.0.mixer.D": np.ones(8, np.int32)}))
    with pytest.raises(em.CheckpointError, match=r"tensor backbone\.layers\.0\.mixer\.D in .*model\.safetensors has "
                                                 r"dtype I32, which is not supported"):
        em.from_pretrained(good)


def _patch_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_unknown_dtype_code(good):
    _patch_header(good / "model.safetensors", lambda h: h["backbone.norm_f.weight"].update(dtype="F4"))
    with pytest.raises(em.CheckpointError, match=r"tensor backbone\.norm_f\.weight in .*model\.safetensors has dtype "
                                                 r"'F4', which easymamba cannot read"):
        em.from_pretrained(good)


def test_truncated_file(good):
    path = good / "model.safetensors"
    raw = path.read_bytes()
    last = max(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]).items(),
               key=lambda kv: kv[1]["data_offsets"][1] if kv[0] != "__metadata__" else -1)[0]
    path.write_bytes(raw[:-100])
    with pytest.raises(em.CheckpointError, match=rf"model\.safetensors is truncated: tensor {last} needs bytes"):
        em.from_pretrained(good)
    path.write_bytes(raw[:20])
    with pytest.raises(em.CheckpointError, match=r"model\.safetensors is truncated: its header needs"):
        em.from_pretrained(good)


def test_corrupt_file(good):
    path = good / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"{garbage" + raw[16:])
    with pytest.raises(em.CheckpointError, match=r"model\.safetensors is not a valid safetensors file: the header is "
                                                 r"not JSON"):
        em.from_pretrained(good)
    path.write_bytes(raw)
    _patch_header(path, lambda h: h["backbone.norm_f.weight"].update(shape=[16]))
    with pytest.raises(em.CheckpointError, match=r"tensor backbone\.norm_f\.weight: data_offsets .* span 128 bytes but "
                                                 r"shape \[16\] of F32 needs 64"):
        em.from_pretrained(good)


def test_index_names_missing_shard(good):
    em.save_pretrained(em.from_pretrained(good), good, max_shard_size="8KB", overwrite=True)
    index = json.loads((good / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (good / shard).unlink()
    with pytest.raises(em.CheckpointError, match=rf"model\.safetensors\.index\.json names shard {shard} \(for tensor "
                                                 r"backbone\.\S+.*\) but .* has no such file"):
        em.from_pretrained(good)


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_size=64, num_heads=16), r"config\.json says hidden_size = 64, but backbone\.embeddings\.weight in "
                                         r".*model\.safetensors has shape \(40, 32\), which means hidden_size = 32"),
    (dict(vocab_size=50), r"says vocab_size = 50, but backbone\.embeddings\.weight .* means vocab_size = 40"),
    (dict(num_hidden_layers=3), r"says num_hidden_layers = 3, but the checkpoint has tensors for 2 layers"),
    (dict(num_heads=4, head_dim=16), r"says num_heads = 4, but backbone\.layers\.0\.mixer\.A_log .* shape \(8,\)"),
    (dict(conv_kernel=3), r"says conv_kernel = 3, but backbone\.layers\.0\.mixer\.conv1d\.weight"),
    (dict(state_size=16), r"says n_groups \* state_size = 32, but backbone\.layers\.0\.mixer\.conv1d\.weight"),
    (dict(use_bias=True), r"says use_bias = true, but .*model\.safetensors has no backbone\.layers\.0\.mixer\.in_proj"),
])
def test_config_contradicting_shapes(good, changes, message):
    _edit_config(good, **changes)
    with pytest.raises(em.CheckpointError, match=message):
        em.from_pretrained(good)


def test_tied_head(good):
    embedding = safetensors.numpy.load_file(good / "model.safetensors")["backbone.embeddings.weight"]
    _edit_config(good, tie_word_embeddings=True)
    # A tied config with lm_head equal to the embedding loads (and is tied).
    _edit_tensors(good, lambda t: t.update({"lm_head.weight": embedding.copy()}))
    assert em.from_pretrained(good).lm_head is None
    # A tied config whose lm_head differs would compute different logits: refused.
    _edit_tensors(good, lambda t: t.update({"lm_head.weight": embedding + 1e-3}))
    with pytest.raises(em.CheckpointError, match=r"says tie_word_embeddings = true, but lm_head\.weight in "
                                                 r".*model\.safetensors differs from backbone\.embeddings\.weight"):
        em.from_pretrained(good)
    # An untied config with no lm_head at all is the opposite contradiction.
    _edit_config(good, tie_word_embeddings=False)
    _edit_tensors(good, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(em.CheckpointError, match=r"says tie_word_embeddings = false, but .* has no lm_head\.weight"):
        em.from_pretrained(good)


def test_no_weights_and_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        em.from_pretrained(tmp_path / "empty")
    em.Mamba2Config(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_heads=8, head_dim=8,
                    state_size=8, n_groups=2).save(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"holds no weights: expected model\.safetensors"):
        em.from_pretrained(tmp_path / "empty")


def test_load_state_dict_checks_everything_before_writing():
    model = _tiny()
    before = em.state_dict(model)
    sd = {k: v + 1 for k, v in before.items()}
    sd["backbone.layers.1.mixer.A_log"] = np.ones(7, np.float32)
    with pytest.raises(em.CheckpointError, match=r"tensor backbone\.layers\.1\.mixer\.A_log in the state dict: "
                                                 r"expected shape \(8,\)"):
        em.load_state_dict(model, sd)
    for k, v in em.state_dict(model).items():  # untouched: nothing half-loaded
        np.testing.assert_array_equal(v, before[k])


def test_safetensors_io_round_trip_and_sizes(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2], ml_dtypes.bfloat16),
              "empty": np.zeros((0, 4), np.float16), "scalar": np.array(7, np.int64)}
    entries = [safetensors_writer.TensorToWrite(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
    safetensors_writer.write_file(tmp_path / "x.safetensors", entries, metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.metadata == {"format": "pt"} and list(f) == list(arrays)
        for k, v in arrays.items():
            got = f.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes()
    assert safetensors_writer.parse_size("5GB") == 5 * 10**9
    assert safetensors_writer.parse_size("10MB") == 10**7
    assert safetensors_writer.parse_size("2MiB") == 2 * 2**20
    assert safetensors_writer.parse_size(4096) == 4096
    with pytest.raises(ValueError, match="max_shard_size"):
        safetensors_writer.parse_size("5 parsecs")
    sizes = [len(s) for s in safetensors_writer.plan_shards(
        [safetensors_writer.TensorToWrite(str(i), (n,), np.dtype(np.float32), lambda: None) for i, n in
         enumerate([10, 10, 30, 5])], 80)]
    assert sizes == [2, 1, 1]  # 40 + 40 fills 80 exactly; the 120-byte tensor still gets a shard of its own
