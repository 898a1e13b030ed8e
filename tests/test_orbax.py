"""Orbax checkpoints: bit-exact save/restore (float32 and bfloat16, sharded), and atomicity: a save that raises
or is killed mid-write leaves the previous checkpoint loadable."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import easymamba as em
from easymamba.checkpoints import orbax_io as orbax_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = em.Mamba2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=8,
                         n_groups=2, chunk_size=8)


def random_model(config=CONFIG, seed=0, param_dtype=jnp.float32, dtype=jnp.float32) -> em.Mamba2ForCausalLM:
    """N(0, 0.1^2) numpy weights in an abstractly built model (eager random init compiles op by op)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: em.Mamba2ForCausalLM(
        config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(state):
        v = var.get_value()
        var.set_value(jnp.asarray((0.1 * rng.standard_normal(v.shape, np.float32)).astype(v.dtype)))
    return nnx.merge(graphdef, state)


def assert_same_params(a, b):
    sa, sb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    assert [p for p, _ in sa] == [p for p, _ in sb]
    for (path, va), (_, vb) in zip(sa, sb):
        x, y = np.asarray(va.get_value()), np.asarray(vb.get_value())
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path  # bit for bit


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_save_restore_is_bit_exact(tmp_path, param_dtype):
    model = random_model(param_dtype=param_dtype, dtype=jnp.bfloat16 if param_dtype == jnp.bfloat16 else jnp.float32)
    path = em.save_checkpoint(model, tmp_path / "ckpt")
    assert path == (tmp_path / "ckpt" / "1").absolute()
    back = em.load_checkpoint(tmp_path / "ckpt")
    assert back.config == model.config and back.dtype == model.dtype
    assert_same_params(back, model)
    upcast = em.load_checkpoint(tmp_path / "ckpt", param_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(upcast.backbone.norm_f.weight[...]),
                                  np.asarray(model.backbone.norm_f.weight[...]).astype(np.float32))


def test_tied_model_and_sharded_restore(tmp_path):
    model = random_model(CONFIG.replace(tie_word_embeddings=True), seed=1)
    em.save_checkpoint(model, tmp_path / "ckpt")
    mesh = jax.make_mesh((2,), ("model",))
    back = em.load_checkpoint(tmp_path / "ckpt", mesh=mesh,
                              shardings=lambda path: P(None, "model") if path[-1] == "kernel" else None)
    kernel = back.backbone.layers[0].mixer.out_proj.kernel[...]
    assert kernel.sharding.spec == P(None, "model") and len(kernel.sharding.device_set) == 2
    assert back.lm_head is None
    assert_same_params(back, model)
    # ... and a sharded model saves and restores the same way.
    em.save_checkpoint(back, tmp_path / "again")
    assert_same_params(em.load_checkpoint(tmp_path / "again"), model)


def test_new_save_replaces_old_version(tmp_path):
    old, new = random_model(seed=2), random_model(seed=3)
    em.save_checkpoint(old, tmp_path / "ckpt")
    assert em.save_checkpoint(new, tmp_path / "ckpt", overwrite=True).name == "2"
    assert [p.name for p in orbax_checkpoint.versions(tmp_path / "ckpt")] == ["2"]
    assert_same_params(em.load_checkpoint(tmp_path / "ckpt"), new)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")  # orbax's other item
@pytest.mark.parametrize("where", ["array_write", "before_commit"])
def test_raising_save_leaves_old_checkpoint(tmp_path, monkeypatch, where):
    old, new = random_model(seed=4), random_model(seed=5)
    em.save_checkpoint(old, tmp_path / "ckpt")

    class DiskFull(RuntimeError):
        pass

    def boom(*args, **kwargs):
        raise DiskFull("simulated failure")

    with monkeypatch.context() as m:
        if where == "array_write":  # fails while the parameters are being written
            m.setattr(ocp.handlers.StandardCheckpointHandler, "async_save", boom)
        else:                       # everything written, the final rename never happens
            m.setattr(ocp.CompositeCheckpointHandler, "finalize", boom)
        with pytest.raises(DiskFull):
            em.save_checkpoint(new, tmp_path / "ckpt", overwrite=True)
    assert [p.name for p in orbax_checkpoint.versions(tmp_path / "ckpt")] == ["1"]
    assert_same_params(em.load_checkpoint(tmp_path / "ckpt"), old)
    # The next save cleans the debris up and wins.
    em.save_checkpoint(new, tmp_path / "ckpt", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2"]
    assert_same_params(em.load_checkpoint(tmp_path / "ckpt"), new)


def test_crash_after_commit_loads_the_new_version(tmp_path, monkeypatch):
    old, new = random_model(seed=6), random_model(seed=7)
    em.save_checkpoint(old, tmp_path / "ckpt")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_checkpoint, "_remove_old", crash)
    with pytest.raises(KeyboardInterrupt):
        em.save_checkpoint(new, tmp_path / "ckpt", overwrite=True)
    assert [p.name for p in orbax_checkpoint.versions(tmp_path / "ckpt")] == ["1", "2"]
    assert_same_params(em.load_checkpoint(tmp_path / "ckpt"), new)


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, jax.numpy as jnp
    import orbax.checkpoint as ocp
    import easymamba as em
    sys.path.insert(0, sys.argv[2])
    from test_orbax import random_model

    def die(self, *args, **kwargs):   # SIGKILL halfway: the parameters are written, nothing is committed
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.handlers.JsonCheckpointHandler.async_save = die
    em.save_checkpoint(random_model(seed=9), sys.argv[1], overwrite=True)
    print("not reached")
""")


def test_killed_save_leaves_old_checkpoint(tmp_path):
    old = random_model(seed=8)
    em.save_checkpoint(old, tmp_path / "ckpt")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "ckpt"), str(REPO / "tests")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert run.returncode == -signal.SIGKILL, (run.returncode, run.stdout, run.stderr)
    leftovers = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert leftovers[0] == "1" and len(leftovers) == 2 and leftovers[1].startswith("2.orbax-checkpoint-tmp"), leftovers
    assert_same_params(em.load_checkpoint(tmp_path / "ckpt"), old)


def test_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no complete easymamba orbax checkpoint"):
        em.load_checkpoint(tmp_path / "empty")
    model = random_model(seed=10)
    em.save_checkpoint(model, tmp_path / "ckpt")
    meta_file = tmp_path / "ckpt" / "1" / "meta" / "metadata"  # orbax's JsonCheckpointHandler file
    meta = json.loads(meta_file.read_text())
    meta["params"]["backbone.norm_f.weight"]["shape"] = [31]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(em.CheckpointError, match=r"parameter backbone\.norm_f\.weight in .*1: expected shape \(32,\) "
                                                 r"for its config, found \(31,\)"):
        em.load_checkpoint(tmp_path / "ckpt")


def test_version_folder_written_without_the_manager_loads(tmp_path):
    """A checkpoint as easymamba wrote it before `CheckpointManager` kept the steps (one
    `Checkpointer(CompositeCheckpointHandler)` per numbered folder) still loads, and a new save continues it."""
    model = random_model(seed=11)
    params = {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save((tmp_path / "ckpt" / "1").absolute(), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(orbax_checkpoint._model_meta(model, params))))
    checkpointer.close()
    assert_same_params(em.load_checkpoint(tmp_path / "ckpt"), model)
    assert em.save_checkpoint(random_model(seed=12), tmp_path / "ckpt", overwrite=True).name == "2"
    assert [p.name for p in orbax_checkpoint.versions(tmp_path / "ckpt")] == ["2"]
