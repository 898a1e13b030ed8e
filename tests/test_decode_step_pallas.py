"""The fused Mamba-2 decode-step kernel (`easymamba/kernels/decode_step/triton.py`) against its reference.

Two tiers run the same checks: on CPU the kernel body in Pallas interpret mode at small odd shapes (p, n, k not
powers of two, g = 1 and g > 1, operands packed or in parts), and under `-m gpu` the compiled kernel at the 130M
shape.

Errors are max |a - b| / max |b|. Tolerances:
* float32 inputs, against `decode_step_ref` in float64: 2e-5 (float32 math, sums over n and over e / g for the
  norm; measured ~2e-7). The conv state is a copy of inputs: exact.
* bfloat16 activations (float32 state), against `decode_step_ref` on the same inputs (float32 math, the same bf16
  rounding of the conv output, which the reference makes with `reduce_precision` so XLA's excess-precision mode
  on GPU cannot drop it): 1e-4 with a float32 y (the two differ only in float32 summation order, except
  where that flips a bf16 rounding of x, B or C; measured ~2e-7), one bf16 ulp (2^-8 = 4e-3) with a bf16 y.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err

from easymamba.kernels import mamba2_decode_step
from easymamba.kernels.decode_step.reference import decode_step_ref
from easymamba.kernels.decode_step.triton import decode_step_pallas

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (compiled kernels)")


def inputs(rng, *, b, h, p, n, g, k, dtype, bias=True):
    """Fresh random operands of one decode step (never zeros), activations and parameters in `dtype`, packed as
    Hugging Face packs them."""
    e, c = h * p, h * p + 2 * g * n
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return dict(
        zxbcdt=f(b, 2 * e + 2 * g * n + h), conv_state=f(b, c, k), conv_weight=f(c, k) * 0.5,
        conv_bias=f(c) if bias else None, A=-jnp.exp(jnp.asarray(rng.normal(size=h), jnp.float32)),
        D=f(h), dt_bias=f(h), ssm_state=jnp.asarray(rng.normal(size=(b, h, p, n)), jnp.float32),
        norm_weight=f(e) * 0.5 + 1.0)


def as_parts(ops, *, h, p, n, g, form):
    """The same operands with the in_proj output as (z, xBC, dt) ("parts3") or (z, x, B, C, dt) and the conv
    weight and bias as (x, B, C) ("parts5"), as a mixer that keeps them apart would pass them."""
    if form == "packed":
        return ops
    e, gn = h * p, g * n
    cut = lambda a, sizes, axis: tuple(jnp.split(a, np.cumsum(sizes)[:-1], axis=axis))  # noqa: E731
    out = dict(ops)
    if form == "parts3":
        out["zxbcdt"] = cut(ops["zxbcdt"], [e, e + 2 * gn, h], 1)
    else:
        out["zxbcdt"] = cut(ops["zxbcdt"], [e, e, gn, gn, h], 1)
        out["conv_weight"] = cut(ops["conv_weight"], [e, gn, gn], 0)
        out["conv_bias"] = None if ops["conv_bias"] is None else cut(ops["conv_bias"], [e, gn, gn], 0)
    return out


def as64(ops):
    return jax.tree.map(lambda a: np.asarray(a, bool if a.dtype == bool else np.float64), ops)


def kernel_fn(*, interpret, **kw):
    """The jitted kernel, in interpret mode or compiled."""
    fn = jax.jit(functools.partial(decode_step_pallas, interpret=interpret, **kw))
    return lambda ops: fn(**ops)


def check(seed, *, b, h, p, n, g, k, dtype, interpret, steps=1, bias=True, y_dtype=None, block_p=None,
          form="packed", A_is_log=False, active=None, rms=None):
    rng = np.random.default_rng(seed)
    ops = inputs(rng, b=b, h=h, p=p, n=n, g=g, k=k, dtype=dtype, bias=bias)
    if rms is not None:  # the block's input before its RMS norm (d = rms), folded into in_proj: rows scaled first
        ops["rms_input"] = jnp.asarray(rng.normal(size=(b, rms)) * 3.0, dtype)
    if active is not None:  # rows where False must come out with both states bit for bit as they went in
        ops["active"] = jnp.asarray(active)
    if A_is_log:
        ops["A"] = jnp.asarray(rng.normal(size=h), dtype)
    kw = dict(n_groups=g, eps=1e-5, dt_limit=(0.001, 3.0), y_dtype=y_dtype, A_is_log=A_is_log, rms_eps=1e-6)
    ref_ops = dict(ops)
    kernel = kernel_fn(interpret=interpret, block_p=block_p, **kw)
    ref32 = jax.jit(functools.partial(decode_step_ref, **kw))
    for step in range(steps):
        if step:  # a new token: fresh in_proj output; the states carry over
            ops["zxbcdt"] = ref_ops["zxbcdt"] = jnp.asarray(rng.normal(size=ops["zxbcdt"].shape), dtype)
        y, conv, ssm = kernel(as_parts(ops, h=h, p=p, n=n, g=g, form=form))
        if active is not None:
            held = ~np.asarray(active)
            assert np.array_equal(np.asarray(conv)[held], np.asarray(ops["conv_state"])[held])
            assert np.array_equal(np.asarray(ssm)[held], np.asarray(ops["ssm_state"])[held])
            assert not np.array_equal(np.asarray(ssm)[~held], np.asarray(ops["ssm_state"])[~held])
        if dtype == jnp.float32:
            with jax.enable_x64(True):
                y_r, conv_r, ssm_r = jax.tree.map(np.asarray, decode_step_ref(**as64(ref_ops), **kw))
            tol_y = tol_s = 2e-5
        else:  # same dtypes, float32 math: isolates the kernel's own error from the bf16 rounding both do
            y_r, conv_r, ssm_r = ref32(**ref_ops)
            tol_s = 1e-4
            tol_y = 4e-3 if jnp.dtype(y.dtype) == jnp.bfloat16 else 1e-4
        assert y.dtype == (dtype if y_dtype is None else y_dtype)
        assert conv.dtype == ops["conv_state"].dtype and ssm.dtype == jnp.float32
        # the conv state is a copy of inputs: exact; with rms_input, of inputs times the norm's factor, which the
        # kernel and the reference compute in float32 in different orders: float32 rounding, or one bf16 ulp
        tol_c = 0 if rms is None else (1e-6 if dtype == jnp.float32 else 4e-3)
        assert rel_err(conv, conv_r) <= tol_c, f"conv state, step {step}: {rel_err(conv, conv_r):.2e}"
        assert rel_err(ssm, ssm_r) <= tol_s, f"ssm state, step {step}: {rel_err(ssm, ssm_r):.2e}"
        assert rel_err(y, y_r) <= tol_y, f"y, step {step}: {rel_err(y, y_r):.2e}"
        ops.update(conv_state=conv, ssm_state=ssm)  # the kernel continues from its own states,
        ref_ops.update(conv_state=jnp.asarray(conv_r, conv.dtype), ssm_state=jnp.asarray(ssm_r, jnp.float32))


SHAPES = {  # odd sizes on CPU: the interpreter takes any; g = 1 (a norm group spans all heads) and g > 1
    "g1": dict(b=2, h=3, p=5, n=7, g=1, k=4),
    "g3": dict(b=2, h=6, p=3, n=5, g=3, k=3),
    "g2_b1": dict(b=1, h=4, p=4, n=6, g=2, k=2),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_float32_interpret(shape):
    check(0, **SHAPES[shape], dtype=jnp.float32, interpret=True)


@pytest.mark.parametrize("y_dtype", [None, jnp.float32], ids=["y_bf16", "y_f32"])
def test_bfloat16_interpret(y_dtype):
    check(1, **SHAPES["g3"], dtype=jnp.bfloat16, interpret=True, y_dtype=y_dtype)


@pytest.mark.parametrize("form", ["parts3", "parts5"])
def test_operands_in_parts_interpret(form):
    # (z, xBC, dt) or (z, x, B, C, dt) with the conv weight / bias in (x, B, C) parts: read in place, same result
    check(2, **SHAPES["g3"], dtype=jnp.float32, interpret=True, form=form, A_is_log=True)


def test_chained_steps_no_bias_interpret():
    check(3, **SHAPES["g1"], dtype=jnp.float32, interpret=True, steps=3, bias=False)


def test_channel_blocks_interpret():
    # block_p < p: several programs per head, one of them writing the group's B / C conv windows
    check(4, **SHAPES["g2_b1"], dtype=jnp.float32, interpret=True, block_p=2, form="parts5")
    with pytest.raises(ValueError, match="block_p"):
        check(4, **SHAPES["g2_b1"], dtype=jnp.float32, interpret=True, block_p=3)


def test_held_rows_keep_their_states_interpret():
    # `active`: rows where False keep both states exactly; the others step as without it (3 chained steps, several
    # programs per head so that the group's B / C window writer is a held row's program too)
    check(8, **SHAPES["g2_b1"] | dict(b=3), dtype=jnp.float32, interpret=True, steps=3, block_p=2,
          active=[True, False, True])
    check(9, **SHAPES["g1"], dtype=jnp.bfloat16, interpret=True, steps=2, active=[False, True])
    rng = np.random.default_rng(10)
    ops = inputs(rng, **SHAPES["g1"], dtype=jnp.float32)
    with pytest.raises(ValueError, match="active must be a bool array of shape"):
        mamba2_decode_step(**ops, active=jnp.ones((3,), jnp.bool_), n_groups=1, eps=1e-5, impl="xla")
    with pytest.raises(ValueError, match="active must be a bool array of shape"):
        mamba2_decode_step(**ops, active=jnp.ones((2,), jnp.int32), n_groups=1, eps=1e-5, impl="pallas")


@pytest.mark.parametrize("d", [32, 48, 7])  # 32 in one read, 48 in three of 16, 7 zero-padded to 16
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_input_interpret(d, dtype):
    # the block's RMS norm folded in: each row of the in_proj output times rsqrt(mean(x^2) + eps) of its input row,
    # computed in the kernel; two chained steps, operands in parts and packed, held rows
    check(11, **SHAPES["g3"], dtype=dtype, interpret=True, steps=2, rms=d, form="parts5")
    check(12, **SHAPES["g2_b1"] | dict(b=2), dtype=dtype, interpret=True, block_p=2, rms=d, active=[True, False])


def test_rms_input_is_the_rms_norms_factor():
    # independent of the reference's own helper: rows scaled in float64 by numpy give the same step
    rng = np.random.default_rng(13)
    ops = inputs(rng, **SHAPES["g1"], dtype=jnp.float32)
    x = rng.normal(size=(2, 24)) * 3.0
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=1) + 1e-6)
    kw = dict(n_groups=1, eps=1e-5)
    with jax.enable_x64(True):
        want = decode_step_ref(**{**as64(ops), "zxbcdt": np.asarray(ops["zxbcdt"], np.float64) * scale[:, None]}, **kw)
    got = mamba2_decode_step(**ops, rms_input=jnp.asarray(x, jnp.float32), rms_eps=1e-6, **kw, impl="pallas")
    for a, r in zip(got, want):
        assert rel_err(a, np.asarray(r)) <= 2e-5
    with pytest.raises(ValueError, match="rms_input has shape"):
        mamba2_decode_step(**ops, rms_input=jnp.ones((3, 24)), **kw, impl="xla")


def test_head_dim_a_multiple_of_16_interpret():
    # head dim 48 (like 80, 96: a multiple of 16, no power of two): the default block is its largest power-of-two
    # divisor, 16 channels a program, 3 programs a head, the first of each group writing its B / C windows
    check(14, b=2, h=4, p=48, n=8, g=2, k=4, dtype=jnp.float32, interpret=True, steps=2, form="parts5")
    check(15, b=1, h=2, p=48, n=8, g=1, k=4, dtype=jnp.bfloat16, interpret=True, rms=32, active=[True])


def test_head_dims_the_compiled_kernel_takes(monkeypatch):
    from easymamba.kernels import resolver
    from easymamba.kernels.decode_step.triton import _default_block_p, decode_step_supported
    # real checkpoints' head dims: 64 (Mamba-2, Nemotron-H), 80 (Nemotron-Nano-9B-v2), 128; state 128 / 256
    for p, n in ((64, 128), (80, 128), (96, 128), (128, 256), (80, 256), (48, 16)):
        assert decode_step_supported(p, n, 4), (p, n)
    for p, n, k in ((40, 128, 4), (80, 100, 4), (64, 128, 3), (256, 256, 4)):
        assert not decode_step_supported(p, n, k), (p, n, k)
    # blocks are powers of two: 80 -> 16 always; 96 -> 32 with many programs, 16 with few; 64 as before
    assert _default_block_p(1, 128, 80) == 16 and _default_block_p(64, 128, 80) == 16
    assert _default_block_p(64, 128, 96) == 32 and _default_block_p(1, 24, 96) == 16
    assert _default_block_p(1, 24, 64) == 16 and _default_block_p(64, 24, 64) == 64
    # on a GPU, "auto" takes the kernel at head dim 80; "pallas" refuses head dim 40 with the rule in words
    monkeypatch.setattr(resolver, "_pallas_runs_here", lambda backend: (True, "sm_90 GPU"))
    auto = resolver.resolve("decode_step", "auto", dims=dict(p=80, n=128, k=4), backend="gpu", interpret=False)
    assert auto.form is resolver.Form.TRITON, auto
    with pytest.raises(ValueError, match="a multiple of 16"):
        resolver.resolve("decode_step", "pallas", dims=dict(p=40, n=128, k=4), backend="gpu", interpret=False)


def test_sum_by_halves_is_the_sum():
    # the norm's sum over the kernel's partial sums, as adds of halves (an odd length's last element aside)
    from easymamba.kernels.decode_step.triton import _sum_by_halves
    rng = np.random.default_rng(16)
    for m in (1, 2, 3, 7, 24, 96, 320):
        x = rng.normal(size=(2, 3, m))
        got = np.asarray(_sum_by_halves(jnp.asarray(x, jnp.float32)))
        assert got.shape == (2, 3) and rel_err(got, x.sum(-1)) <= 1e-6, m


def test_public_wrapper():
    rng = np.random.default_rng(5)
    ops = inputs(rng, **SHAPES["g3"], dtype=jnp.float32)
    kw = dict(n_groups=3, eps=1e-5)
    y_ref, conv_ref, ssm_ref = decode_step_ref(**ops, **kw)
    for impl in ("auto", "xla", "pallas"):  # "auto" is XLA on CPU; "pallas" runs interpreted there
        y, conv, ssm = mamba2_decode_step(**ops, **kw, impl=impl)
        assert rel_err(y, y_ref) <= 2e-5 and rel_err(ssm, ssm_ref) <= 2e-5 and rel_err(conv, conv_ref) == 0
    with pytest.raises(ValueError, match="impl must be one of"):
        mamba2_decode_step(**ops, **kw, impl="triton")
    with pytest.raises(ValueError, match="n_groups"):
        mamba2_decode_step(**ops, n_groups=4, eps=1e-5, impl="xla")
    with pytest.raises(ValueError, match="conv_state has shape"):
        mamba2_decode_step(**ops, n_groups=1, eps=1e-5, impl="xla")
    with pytest.raises(ValueError, match="zxbcdt: the array holding z has shape"):
        mamba2_decode_step(**{**ops, "zxbcdt": (ops["zxbcdt"][:, 1:], ops["zxbcdt"], ops["zxbcdt"])}, **kw)
    with pytest.raises(ValueError, match="tuple of 3 or 5"):
        mamba2_decode_step(**{**ops, "zxbcdt": (ops["zxbcdt"], ops["zxbcdt"])}, **kw)


def test_grad_matches_reference_interpret():
    # the custom VJP is the reference's VJP: float32, the same math: 1e-5
    rng = np.random.default_rng(6)
    ops = inputs(rng, **SHAPES["g2_b1"], dtype=jnp.float32)
    kw = dict(n_groups=2, eps=1e-5)

    def loss(fn, zxbcdt, conv_weight, ssm_state):
        y, conv, ssm = fn(**{**ops, "zxbcdt": zxbcdt, "conv_weight": conv_weight, "ssm_state": ssm_state}, **kw)
        return (y ** 2).sum() + (ssm * 0.5).sum() + conv.sum()

    args = (ops["zxbcdt"], ops["conv_weight"], ops["ssm_state"])
    kernel = functools.partial(decode_step_pallas, interpret=True)
    g_kernel = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(*args)
    g_ref = jax.grad(functools.partial(loss, decode_step_ref), argnums=(0, 1, 2))(*args)
    for a, r in zip(g_kernel, g_ref):
        assert rel_err(a, r) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# Compiled (Triton) on a GPU
# --------------------------------------------------------------------------------------------------------------

GPU_SHAPES = {
    "130M": dict(b=3, h=24, p=64, n=128, g=1, k=4),  # one norm group over 24 heads (r = 24, not a power of two)
    "g4": dict(b=2, h=16, p=32, n=64, g=4, k=4),
}


@gpu
@needs_gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_float32_gpu(shape):
    check(7, **GPU_SHAPES[shape], dtype=jnp.float32, interpret=False, steps=3)


@gpu
@needs_gpu
def test_held_rows_keep_their_states_gpu():
    check(11, **GPU_SHAPES["130M"], dtype=jnp.bfloat16, interpret=False, steps=3, active=[True, False, True])


@gpu
@needs_gpu
@pytest.mark.parametrize("form", ["packed", "parts5"])
def test_bfloat16_gpu(form):
    check(8, **GPU_SHAPES["130M"], dtype=jnp.bfloat16, interpret=False, steps=3, form=form, A_is_log=True)


@gpu
@needs_gpu
def test_channel_blocks_gpu():
    check(9, **GPU_SHAPES["130M"], dtype=jnp.bfloat16, interpret=False, steps=2, block_p=16, form="parts3")


@gpu
@needs_gpu
def test_auto_picks_kernel_gpu():
    from easymamba.kernels.resolver import PALLAS_FASTER_ON_GPU, resolve_impl

    assert resolve_impl("auto", "decode_step", dims=dict(p=64, n=128, k=4)) == (
        "pallas" if PALLAS_FASTER_ON_GPU["decode_step"] else "xla")
    assert resolve_impl("auto", "decode_step", dims=dict(p=40, n=128, k=4)) == "xla"  # not a multiple of 16


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_dim_80_with_rms_input_gpu(dtype):
    # Nemotron-Nano-9B-v2's mixer shape (head dim 80 in blocks of 16, 8 groups) with the block's norm folded in
    check(12, b=2, h=16, p=80, n=128, g=8, k=4, dtype=dtype, interpret=False, steps=2, rms=1280, form="parts5",
          A_is_log=True)


# -- the model's decode path ------------------------------------------------------------------------------------
def _model_decode(kernel_impl, config, steps, dtype=jnp.float32, active_rows=None, prefill_states=None):
    """Prefill 5 tokens op by op, then `steps` cached decode steps with the model's kernels set to `kernel_impl`
    (and `active_rows` given to each). Returns (per-step logits, final conv states, final SSM states); the
    prefill's (conv, SSM) states are appended to the list `prefill_states` when one is given."""
    from flax import nnx

    import easymamba as em
    model = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(3), dtype=dtype, kernel_impl="reference")
    ids = jnp.asarray(np.random.default_rng(21).integers(0, config.vocab_size, size=(2, 5 + steps)), jnp.int32)
    cache = model(ids[:, :5], cache=model.init_cache(2)).cache
    if prefill_states is not None:
        prefill_states.append((jnp.stack([v.conv_states for v in cache.views]),
                               jnp.stack([v.ssm_states for v in cache.views]), cache.views[0].positions))
    for layer in model.backbone.layers:
        layer.mixer.kernel_impl = kernel_impl
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, tok, c: nnx.merge(graphdef, s).step(tok, c, active_rows=active_rows))
    logits = []
    for t in range(5, 5 + steps):
        out_logits, cache = step(state, ids[:, t], cache)
        logits.append(out_logits[:, None])
    if prefill_states is not None:
        prefill_states.append(cache.views[0].positions)
    return (jnp.stack(logits), jnp.stack([v.conv_states for v in cache.views]),
            jnp.stack([v.ssm_states for v in cache.views]))


def test_model_decode_steps_through_the_fused_kernel_interpret(monkeypatch):
    # A tiny model whose mixers take the fused kernel (interpreted) for each decode step vs the op-by-op path:
    # float32 throughout, so the two differ by float32 rounding of the same operations in another order
    # (tolerance 1e-5 relative, as the kernel's own float32 tests).
    import easymamba as em

    config = em.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=8,
                             state_size=8, n_groups=2, expand=1, conv_kernel=4, chunk_size=4)
    from easymamba.models import mamba2_mixer as mixer

    calls = []
    monkeypatch.setattr(mixer, "mamba2_decode_step", lambda *a, **k: calls.append(1) or mamba2_decode_step(*a, **k))
    fused = _model_decode("pallas", config, steps=2)
    assert len(calls) == config.num_hidden_layers                # traced once per layer: the kernel path ran
    ref = _model_decode("reference", config, steps=2)
    assert len(calls) == config.num_hidden_layers                # not on the op-by-op path
    for got, want in zip(fused, ref):
        assert rel_err(got, want) <= 1e-5, rel_err(got, want)


@pytest.mark.parametrize("kernel_impl", ["pallas", "reference"])
def test_model_holds_inactive_rows_interpret(kernel_impl):
    # `active_rows` through the model, on the fused kernel (interpreted) and the op-by-op path: the held row
    # (row 1) leaves 3 decode steps with the prefill's states and position bit for bit; the active row steps as
    # without the mask (the same path, so the same numbers: exact)
    import easymamba as em

    config = em.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=8,
                             state_size=8, n_groups=2, expand=1, conv_kernel=4, chunk_size=4)
    seen = []
    _, conv, ssm = _model_decode(kernel_impl, config, steps=3, active_rows=jnp.asarray([True, False]),
                                 prefill_states=seen)
    (conv0, ssm0, pos0), pos = seen
    np.testing.assert_array_equal(conv[:, 1], conv0[:, 1])
    np.testing.assert_array_equal(ssm[:, 1], ssm0[:, 1])
    np.testing.assert_array_equal(pos, pos0 + jnp.asarray([3, 0]))
    logits_free, conv_free, ssm_free = _model_decode(kernel_impl, config, steps=3)
    np.testing.assert_array_equal(conv[:, 0], conv_free[:, 0])
    np.testing.assert_array_equal(ssm[:, 0], ssm_free[:, 0])


def test_model_fused_step_asks_for_k_minor_weights():
    # Given the model's decode_weights(), the fused decode step multiplies its few rows by in_proj (packed) and
    # out_proj laid out with the contracted axis contiguous (layers.few_row_kernel: a one-row dot becomes a
    # reduce, which XLA runs along rows only then; docs/benchmarks.md). The request must reach XLA as layout
    # constraints on exactly those two weights; a step without them (a step jitted alone) asks for none, as it
    # would pay the relayout every call. Both give nnx.Linear's numbers (float32, the same dots: 1e-6).
    from flax import nnx

    import easymamba as em
    from easymamba.layers import linear

    config = em.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=8,
                             state_size=8, n_groups=2, expand=1, conv_kernel=4, chunk_size=4)
    model = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(3), kernel_impl="pallas")
    cache = model.init_cache(2)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray([[3], [5]], jnp.int32)

    def step(s, tok, c, prepared):
        m = nnx.merge(graphdef, s)
        return m.step(tok[:, 0], c, decode_weights=m.decode_weights() if prepared else None)[0]

    d, e = config.hidden_size, config.intermediate_size
    packed = 2 * e + 2 * config.n_groups * config.state_size + config.num_heads
    logits = {}
    for prepared in (False, True):
        fn = jax.jit(functools.partial(step, prepared=prepared))
        text = fn.lower(state, ids, cache).as_text()
        constraints = [line for line in text.splitlines() if "@LayoutConstraint" in line]
        if not prepared:
            assert constraints == [], constraints
        else:
            shapes = sorted(line.rsplit("-> tensor<", 1)[1].split("x")[:2] for line in constraints)
            assert shapes == sorted([[str(d), str(packed)], [str(e), str(d)]] * 2), constraints  # made + pinned
            assert all("result_layouts = [dense<[0, 1]>" in line for line in constraints), constraints
        logits[prepared] = fn(state, ids, cache)
    assert rel_err(logits[True], logits[False]) <= 1e-6

    proj = model.backbone.layers[0].mixer.out_proj
    y = jnp.asarray(np.random.default_rng(4).standard_normal((2, 1, e)), jnp.float32)
    want = np.asarray(proj(y))
    for few_rows in (False, True):
        got = jax.jit(lambda y: linear(proj, y, proj.kernel[...], None, few_rows=few_rows))(y)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_generate_through_the_fused_kernel_with_prepared_weights_interpret(monkeypatch):
    # `generate`'s loop makes the model's decode_weights() once, before the loop, and every fused step reads
    # in_proj from them. Against the op-by-op path (kernel_impl="reference"), float32: the same greedy tokens,
    # logits within 1e-5 relative (float32 rounding of the same operations in another order, as above).
    from flax import nnx

    import easymamba as em
    from easymamba.models import mamba2_mixer as mixer

    config = em.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=8,
                             state_size=8, n_groups=2, expand=1, conv_kernel=4, chunk_size=4)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, size=(2, 5)), jnp.int32)
    seen = []
    fused_step = mixer.Mamba2Mixer._fused_decode_step
    monkeypatch.setattr(mixer.Mamba2Mixer, "_fused_decode_step",
                        lambda self, *a: seen.append(a[-1] is not None) or fused_step(self, *a))
    runs = {}
    for impl in ("pallas", "reference"):
        model = em.Mamba2ForCausalLM(config, rngs=nnx.Rngs(3), kernel_impl=impl)
        runs[impl] = em.generate(model, ids, max_new_tokens=4, output_logits=True)
        if impl == "pallas":
            weights = model.decode_weights()
            assert weights is not None and len(weights) == config.num_hidden_layers
            kernel = weights[0]["in_proj_kernel"]
            assert kernel.shape == (config.hidden_size, model.backbone.layers[0].mixer.in_proj.out_features)
            assert seen and all(seen), seen              # every fused step (traced) got the prepared weights
            seen.clear()                                 # decode_weights=False: the steps read the weights as stored
            runs["pallas, not prepared"] = em.generate(model, ids, max_new_tokens=4, output_logits=True,
                                                       decode_weights=False)
            assert seen and not any(seen), seen
    assert model.decode_weights() is None                # the reference path has none to prepare
    for name in ("pallas", "pallas, not prepared"):
        np.testing.assert_array_equal(np.asarray(runs[name].sequences), np.asarray(runs["reference"].sequences))
        assert rel_err(runs[name].logits, runs["reference"].logits) <= 1e-5
