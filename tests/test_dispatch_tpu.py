"""How `easymamba.kernels` chooses on a TPU backend, checked on a CPU machine by faking the backend.

Two fakes, for two questions:
* `resolver.platform` -> "tpu": only the choice believes it is on a TPU. The public ops then run the Mosaic TPU
  forms, which themselves still see the CPU and run in Pallas' TPU interpreter; the results are compared with
  the XLA path (the kernels' own accuracy against float64 is tests/test_kernels_tpu_*.py's job).
* `jax.default_backend` -> "tpu": the whole stack believes it, so `jax.export(..., platforms=("tpu",))` of a
  public op with impl="pallas" lowers the real kernel through Mosaic; the module must hold a `tpu_custom_call`
  (and none with impl="auto", which stays on XLA).

Tolerance: 2e-5 relative (max |a - b| / max |b|), float32 against the float32 XLA path: both compute in float32
(the TPU SSD with float32-accurate matmuls), ~1e-7 per op over sums of at most a chunk's terms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err

import easymamba as em
from easymamba import kernels
from easymamba.kernels import resolver
from easymamba.kernels.resolver import OPS, describe, resolve_impl

TOL = 2e-5


def normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.fixture
def on_tpu(monkeypatch):
    """The kernel choice sees a TPU; the kernels see the real (CPU) backend and run interpreted."""
    monkeypatch.setattr(resolver, "platform", lambda: "tpu")


@pytest.fixture
def spies(monkeypatch):
    """Which jitted kernel each public op ran: the TPU forms record their calls; the GPU forms must not run."""
    calls = []
    for name in ("_ssd_tpu", "_conv_tpu", "_conv_update_tpu", "_state_update_tpu"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    for name in ("_ssd_pallas", "_conv_pallas", "_conv_update_pallas", "_state_update_pallas"):
        monkeypatch.setattr(kernels, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran on a TPU"))
    return calls


def test_auto_stays_on_xla_on_tpu(on_tpu):
    for op in OPS:
        assert resolve_impl("auto", op) == "xla"
        assert resolve_impl("auto", op, backend="tpu") == "xla"
    for op, entry in describe().items():
        assert entry.startswith("xla: TPU") and "unmeasured on TPU hardware" in entry and "impl='pallas'" in entry


@pytest.mark.parametrize("op", OPS)
def test_pallas_on_tpu_needs_tpu_shapes(op):
    assert resolve_impl("pallas", op, shape_ok=True, backend="tpu") == "pallas"
    with pytest.raises(ValueError, match=rf"TPU Pallas kernel for {op} does not handle these shapes \(p = 48\): "
                                         r"it needs .*_tpu_supported.*; use impl='xla'"):
        resolve_impl("pallas", op, shape_ok=False, shapes="p = 48", backend="tpu")
    assert resolve_impl("pallas", op, shape_ok=False, backend="cpu") == "pallas"  # interpreted: any shape


def test_shape_checks_are_per_backend():
    # shapes one backend's kernel takes and the other's refuses (GPU: powers of two; TPU: 128-lane multiples)
    rng = np.random.default_rng(0)
    w384 = normal(rng, 384, 3)  # c = 384, k = 3: TPU yes, GPU no (k not a power of two)
    w64 = normal(rng, 64, 4)  # c = 64: GPU yes, TPU no (a channel block is 128 lanes)
    assert kernels._conv_shapes("tpu", w384, None)[0] and not kernels._conv_shapes("gpu", w384, None)[0]
    assert kernels._conv_shapes("gpu", w64, None)[0] and not kernels._conv_shapes("tpu", w64, None)[0]
    x, B = jnp.zeros((1, 4, 2, 64)), jnp.zeros((1, 4, 1, 16))  # p = 64, n = 16: GPU yes, TPU no (n < 128 lanes)
    assert kernels._ssd_shapes("gpu", x, B, B, None, None)[0]
    ok, shapes = kernels._ssd_shapes("tpu", x, B, B, None, None)
    assert not ok and shapes == "p = 64, n = 16, h = 2 and g = 1, x in float32"
    # per shard on TPU: 256 conv channels over 2 shards are 128 each (taken), over 4 shards 64 (refused)
    mesh = em.make_mesh(2, 4)
    assert kernels._conv_shapes("tpu", normal(rng, 256, 4), kernels.MeshAxes(mesh, heads="data"))[0]
    ok, shapes = kernels._conv_shapes("tpu", normal(rng, 256, 4), kernels.MeshAxes(mesh, heads="model"))
    assert not ok and shapes == "c = 256 channels over 4 shards, k = 4"
    # the SSD's head block is per shard: 8 heads of p = 64 over 4 shards leave 2 (128 lanes), over 8 one (64)
    x8, B8 = jnp.zeros((2, 4, 8, 64)), jnp.zeros((2, 4, 2, 128))
    assert kernels._ssd_shapes("tpu", x8, B8, B8, None, kernels.MeshAxes(mesh, heads="model"))[0]
    assert not kernels._ssd_shapes("tpu", x8, B8, B8, None, kernels.MeshAxes(mesh, heads=("data", "model")))[0]


def test_public_ops_refuse_unsupported_tpu_shapes(on_tpu):
    rng = np.random.default_rng(1)
    x, dt, B = normal(rng, 1, 4, 2, 48), normal(rng, 1, 4, 2), normal(rng, 1, 4, 1, 128)
    with pytest.raises(ValueError, match=r"kernel for ssd does not handle these shapes \(p = 48, n = 128"):
        kernels.ssd(x, dt, -jnp.ones(2), B, B, chunk_size=8, impl="pallas")
    with pytest.raises(ValueError, match=r"kernel for causal_conv1d does not handle these shapes \(c = 96 "):
        kernels.causal_conv1d(normal(rng, 1, 4, 96), normal(rng, 96, 4), impl="pallas")
    with pytest.raises(ValueError, match=r"kernel for selective_state_update does not .* \(p = 8, n = 16\)"):
        kernels.selective_state_update(normal(rng, 1, 2, 8, 16), normal(rng, 1, 2, 8), normal(rng, 1, 2),
                                       -jnp.ones(2), normal(rng, 1, 1, 16), normal(rng, 1, 1, 16), impl="pallas")
    y, _ = kernels.ssd(x, dt, -jnp.ones(2), B, B, chunk_size=8)  # "auto" takes XLA for any shape
    assert y.shape == x.shape


def test_public_ops_run_the_tpu_forms(on_tpu, spies):
    # the smallest shapes the TPU kernels take (p = 64: two heads fill a 128-lane block; n, c 128), with every
    # option each op has, so that the arguments are seen to reach the kernel
    rng = np.random.default_rng(2)
    b, l, h, p, g, n = 2, 20, 2, 64, 1, 128
    x, dt, A = normal(rng, b, l, h, p), normal(rng, b, l, h), -jnp.exp(normal(rng, h))
    B, C = normal(rng, b, l, g, n), normal(rng, b, l, g, n)
    seq_idx = jnp.asarray(np.repeat([[0] * 7 + [1] * 13], b, axis=0), jnp.int32)
    kw = dict(chunk_size=8, D=normal(rng, h), z=normal(rng, b, l, h, p), dt_bias=normal(rng, h), dt_softplus=True,
              dt_limit=(0.05, 2.0), initial_state=normal(rng, b, h, p, n), seq_idx=seq_idx)
    out = kernels.ssd(x, dt, A, B, C, impl="pallas", **kw)
    want = kernels.ssd(x, dt, A, B, C, impl="xla", **kw)
    assert all(rel_err(o, w) <= TOL for o, w in zip(out, want))

    xc, w, bias = normal(rng, b, 5, 128), normal(rng, 128, 4), normal(rng, 128)
    conv_kw = dict(initial_state=normal(rng, b, 128, 4), seq_idx=seq_idx[:, 5:10])
    out = kernels.causal_conv1d(xc, w, bias, impl="pallas", **conv_kw)
    want = kernels.causal_conv1d(xc, w, bias, impl="xla", **conv_kw)
    assert all(rel_err(o, w_) <= TOL for o, w_ in zip(out, want))
    state = normal(rng, b, 128, 4)
    out = kernels.causal_conv1d_update(xc[:, 0], state, w, bias, impl="pallas")
    want = kernels.causal_conv1d_update(xc[:, 0], state, w, bias, impl="xla")
    assert all(rel_err(o, w_) <= TOL for o, w_ in zip(out, want))

    step = (normal(rng, b, h, 8, n), normal(rng, b, h, 8), dt[:, 0], A, B[:, 0], C[:, 0])
    step_kw = dict(D=kw["D"], z=normal(rng, b, h, 8), dt_bias=kw["dt_bias"], dt_softplus=True, dt_limit=(0.05, 2.0))
    out = kernels.selective_state_update(*step, impl="pallas", **step_kw)
    want = kernels.selective_state_update(*step, impl="xla", **step_kw)
    assert all(rel_err(o, w_) <= TOL for o, w_ in zip(out, want))
    assert spies == ["_ssd_tpu", "_conv_tpu", "_conv_update_tpu", "_state_update_tpu"]


def test_tpu_form_runs_per_shard(on_tpu, spies):
    # shard= under a faked TPU: the TPU SSD per shard of a (2, 4) mesh; 8 heads over 4 shards, B/C's 2 groups
    # replicated and cut to the one group each shard's 2 heads read
    rng = np.random.default_rng(3)
    b, l, h, p, g, n = 2, 12, 8, 64, 2, 128
    x, dt, A = normal(rng, b, l, h, p), normal(rng, b, l, h), -jnp.exp(normal(rng, h))
    B, C = normal(rng, b, l, g, n), normal(rng, b, l, g, n)
    shard = kernels.MeshAxes(em.make_mesh(2, 4), batch="data", heads="model")
    out = jax.jit(lambda *a: kernels.ssd(*a, chunk_size=8, dt_softplus=True, impl="pallas", shard=shard))(
        x, dt, A, B, C)
    want = kernels.ssd(x, dt, A, B, C, chunk_size=8, dt_softplus=True, impl="xla")
    assert all(rel_err(o, w) <= TOL for o, w in zip(out, want))
    assert spies == ["_ssd_tpu"]


def test_public_ops_lower_to_mosaic_on_tpu(monkeypatch):
    # everything believes it is on a TPU: impl="pallas" must lower the Mosaic kernels (nothing runs), "auto" XLA
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    S, bf16, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    b, l, h, p, g, n, c = 2, 256, 4, 64, 1, 128, 384

    def ops(impl):
        def fn(x, dt, A, B, C, init, seq_idx, xc, w, conv_state, ssm_state):
            return (kernels.ssd(x, dt, A, B, C, chunk_size=256, D=A, dt_bias=A, dt_softplus=True, initial_state=init,
                                seq_idx=seq_idx, impl=impl),
                    kernels.causal_conv1d(xc, w, A[0] + w[:, 0], seq_idx=seq_idx, impl=impl),
                    kernels.causal_conv1d_update(xc[:, 0], conv_state, w, impl=impl),
                    kernels.selective_state_update(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=A,
                                                   dt_softplus=True, impl=impl))
        return fn

    args = (S((b, l, h, p), bf16), S((b, l, h), bf16), S((h,), f32), S((b, l, g, n), bf16), S((b, l, g, n), bf16),
            S((b, h, p, n), f32), S((b, l), jnp.int32), S((b, l, c), bf16), S((c, 4), f32), S((b, c, 4), bf16),
            S((b, h, p, n), f32))
    lower = lambda impl: jax.export.export(jax.jit(ops(impl)), platforms=("tpu",))(*args).mlir_module()  # noqa: E731
    assert lower("pallas").count("stablehlo.custom_call @tpu_custom_call") == 4  # one kernel per op
    assert "tpu_custom_call" not in lower("auto")


def test_model_with_pallas_kernels_prefills_and_decodes_on_tpu(on_tpu, spies):
    # kernel_impl="pallas" on a TPU: the prefill runs the TPU SSD and conv, each cached decode step the op-by-op
    # path (the fused decode-step kernel has no TPU form) with the TPU conv and state updates; the logits equal
    # the same model on the XLA path (float32, TOL as above)
    from flax import nnx

    config = em.Mamba2Config(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_heads=2, head_dim=64,
                             state_size=128, n_groups=1, expand=2, conv_kernel=4, chunk_size=8)
    model = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(0), kernel_impl="pallas")
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, size=(2, 7)), jnp.int32)

    def run():
        out = model(ids[:, :5], cache=model.init_cache(2))
        logits, cache = [out.logits[:, -1]], out.cache
        for t in (5, 6):
            out = model(ids[:, t:t + 1], cache=cache)
            logits.append(out.logits[:, 0])
            cache = out.cache
        return jnp.stack(logits)

    got = run()
    assert {"_ssd_tpu", "_conv_tpu", "_conv_update_tpu", "_state_update_tpu"} <= set(spies)
    for layer in model.backbone.layers:
        layer.mixer.kernel_impl = "xla"
    assert rel_err(got, run()) <= TOL
