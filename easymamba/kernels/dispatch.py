"""The one place where a kernel implementation is chosen.

    "auto"       the fastest implementation that runs here, by the table below
    "pallas"     the Pallas kernels: on NVIDIA GPUs of compute capability >= 8.0 the Triton-style kernels,
                 compiled; on TPU their Mosaic TPU forms (`*_pallas_tpu.py`), compiled; elsewhere (CPU) the
                 Triton-style kernels interpreted (jnp, slow, exact)
    "xla"        the jnp chunked reference under `jax.jit`: the XLA path IS the jitted reference until a
                 faster XLA form exists
    "reference"  the same jnp chunked reference, un-jitted (traced by whatever jit the caller is in)

What "auto" picks, and why, is `describe()`. It never picks a kernel that cannot run: Pallas only on a GPU whose
capability the Triton backend supports and only for shapes the kernel compiles (powers of two, see each kernel
file's `*_supported`), and only for ops where the kernel was measured faster than XLA on that GPU
(`PALLAS_FASTER_ON_GPU`, from `benchmarks/`, numbers in docs/benchmarks.md). On TPU "auto" stays on XLA: the TPU
kernels lower through Mosaic (checked on CPU by `jax.export(..., platforms=("tpu",))`) and run in Pallas' TPU
interpreter, but have never run on TPU hardware, so they are unmeasured (`PALLAS_FASTER_ON_TPU`); impl="pallas"
selects them. The ground truth for all of them is `ssd_naive`.

Shapes: the GPU and TPU kernels compile for different shapes (`ssd_supported` vs `ssd_tpu_supported`, ...), so
the caller, which holds the arrays, checks them for the backend `platform()` names and passes the answer as
`shape_ok`.
"""

import jax

from easymamba.kernels import pallas_util as pu

__all__ = ["IMPLS", "OPS", "PALLAS_FASTER_ON_GPU", "PALLAS_FASTER_ON_TPU", "TPU_SHAPES", "platform",
           "resolve_impl", "describe"]

IMPLS = ("auto", "pallas", "xla", "reference")
OPS = ("ssd", "causal_conv1d", "causal_conv1d_update", "selective_state_update")

# op -> whether its Pallas kernel beat the jitted XLA path on an H100 (docs/benchmarks.md, benchmarks/ssd.py)
PALLAS_FASTER_ON_GPU = {
    "ssd": True,  # 0.05-0.08x the XLA time at the four benchmark shapes
    "causal_conv1d": True,  # 0.14x (0.34 ms vs 2.52 ms at b4 l8k c5376)
    # decode steps: XLA was as fast or faster (state update 1.08x / 1.24x slower in Pallas at b64 / b256), and
    # inside a jitted decode step XLA fuses them with their neighbours, which a custom call prevents
    "causal_conv1d_update": False,
    "selective_state_update": False,
}

# op -> whether its Mosaic TPU kernel beat XLA on a TPU; None: never measured (no TPU at hand), so "auto" stays on
# XLA there. Set an entry from a benchmark run on TPU hardware, as PALLAS_FASTER_ON_GPU was.
PALLAS_FASTER_ON_TPU: dict[str, bool | None] = dict.fromkeys(OPS)

# op -> the shapes its TPU kernel handles (the `*_tpu_supported` of its file), for the error sentences
TPU_SHAPES = {
    "ssd": "head_dim p a multiple of 8 that divides 128 or is a multiple of 128, state size n a multiple of 128, "
           "heads h and groups g (per shard) whose head block `head_block(h, g, p, n)` spans a multiple of 128 "
           "lanes and fits the VMEM budget, and x, B, C, z in float32 or bfloat16 (ssd_tpu_supported in "
           "easymamba/kernels/ssd_pallas_tpu.py)",
    "causal_conv1d": "conv channels (per shard) a multiple of 128 and 2 <= k <= 16 (conv1d_tpu_supported in "
                     "easymamba/kernels/conv1d_pallas_tpu.py)",
    "causal_conv1d_update": "conv channels (per shard) a multiple of 128 and 2 <= k <= 16 (conv1d_tpu_supported "
                            "in easymamba/kernels/conv1d_pallas_tpu.py)",
    "selective_state_update": "head_dim p a multiple of 8, state size n a multiple of 128 and p * n * 4 <= 1 MiB "
                              "(state_update_tpu_supported in easymamba/kernels/state_update_pallas_tpu.py)",
}

_MIN_CAPABILITY = (8, 0)  # Pallas' Triton lowering targets Ampere and newer


def platform() -> str:
    """The backend kernels are chosen for: `jax.default_backend()`, read here and nowhere else in the choice (so
    a test can fake a TPU without making the kernels themselves believe they run on one)."""
    return jax.default_backend()


def _pallas_runs_here(backend: str) -> tuple[bool, str]:
    """Whether compiled Pallas kernels run on `backend`, with the reason in words."""
    if backend == "gpu":
        cap = pu.gpu_capability()
        if cap is None:
            return False, "the GPU reports no CUDA compute capability (not an NVIDIA GPU?)"
        if cap < _MIN_CAPABILITY:
            return False, f"the GPU is sm_{cap[0]}{cap[1]}; the Triton-backed kernels need sm_80 or newer"
        if pu.TritonParams is None:
            return False, "this jax has no Pallas Triton backend"
        return True, f"sm_{cap[0]}{cap[1]} GPU"
    if backend == "tpu":
        return True, "TPU"
    return False, f"no compiled Pallas kernels on {backend} (impl='pallas' runs them in interpret mode, slowly)"


def _auto(op: str, backend: str, shape_ok: bool = True) -> tuple[str, str]:
    """What "auto" picks for `op` on `backend`, and why."""
    runs, why = _pallas_runs_here(backend)
    if not runs:
        return "xla", why
    if backend == "tpu":
        if PALLAS_FASTER_ON_TPU[op] is None:
            return "xla", (f"{why}: the TPU kernels lower through Mosaic but are unmeasured on TPU hardware "
                           f"(impl='pallas' selects the {op} kernel's Mosaic TPU form)")
        if not PALLAS_FASTER_ON_TPU[op]:
            return "xla", f"{why}, but the {op} kernel measured no faster than XLA there"
        if not shape_ok:
            return "xla", f"{why}, but these shapes are outside what the {op} kernel handles ({TPU_SHAPES[op]})"
        return "pallas", f"{why}: the {op} kernel, measured faster than XLA"
    if not PALLAS_FASTER_ON_GPU[op]:
        return "xla", f"{why}, but the {op} kernel measured no faster than XLA there (docs/benchmarks.md)"
    if not shape_ok:
        return "xla", f"{why}, but these shapes are outside what the {op} kernel compiles (powers of two)"
    return "pallas", f"{why}: the fused {op} kernel, measured faster than XLA (docs/benchmarks.md)"


def resolve_impl(impl: str, op: str, *, shape_ok: bool = True, shapes: str = "", backend: str | None = None) -> str:
    """Validate `impl` for `op` and turn "auto" into a concrete choice ("pallas", "xla" or "reference").

    `backend`: the backend to choose for (default `platform()`). `shape_ok`: whether the op's Pallas kernel for
    that backend handles the caller's shapes (the GPU kernel's `*_supported` on GPU, the TPU kernel's
    `*_tpu_supported` on TPU; ignored elsewhere, where the kernels run interpreted). `shapes`: those shapes in
    words ("p = 48, n = 128"), named in the error when they are refused. "pallas" on TPU means the Mosaic TPU
    forms: the caller runs those when `backend` is "tpu".
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = platform() if backend is None else backend
    if impl == "auto":
        return _auto(op, backend, shape_ok)[0]
    if impl == "pallas":
        if backend == "tpu" and not shape_ok:
            got = f" ({shapes})" if shapes else ""
            raise ValueError(f"the TPU Pallas kernel for {op} does not handle these shapes{got}: it needs "
                             f"{TPU_SHAPES[op]}; use impl='xla' for these shapes")
        if backend == "gpu":
            runs, why = _pallas_runs_here(backend)
            if not runs:
                raise NotImplementedError(f"the Pallas kernel for {op} cannot run here: {why}; use impl='xla'")
            if not shape_ok:
                raise ValueError(f"the Pallas kernel for {op} compiles only for power-of-two tile sides (see "
                                 f"`*_supported` in easymamba/kernels); use impl='xla' for these shapes")
    return impl


def describe() -> dict[str, str]:
    """Per op, what impl="auto" picks on the current default backend and why (for typical shapes)."""
    backend = platform()
    return {op: "{}: {}".format(*_auto(op, backend)) for op in OPS}
