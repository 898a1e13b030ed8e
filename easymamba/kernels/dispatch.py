"""The one place where a kernel implementation is chosen.

    "auto"       the fastest implementation that runs here, by the table below
    "pallas"     the Pallas kernels: compiled (Triton backend) on NVIDIA GPUs of compute capability >= 8.0,
                 interpreted (jnp, slow, exact) on CPU; refused on TPU, where they do not lower
    "xla"        the jnp chunked reference under `jax.jit`: the XLA path IS the jitted reference until a
                 faster XLA form exists
    "reference"  the same jnp chunked reference, un-jitted (traced by whatever jit the caller is in)

What "auto" picks, and why, is `describe()`. It never picks a kernel that cannot run: Pallas only on a GPU whose
capability the Triton backend supports and only for shapes the kernel compiles (powers of two, see each kernel
file's `*_supported`), and only for ops where the kernel was measured faster than XLA on that GPU
(`PALLAS_FASTER_ON_GPU`, from `benchmarks/`, numbers in docs/benchmarks.md). The ground truth for all of them
is `ssd_naive`.
"""

import jax

from easymamba.kernels import pallas_util as pu

__all__ = ["IMPLS", "OPS", "PALLAS_FASTER_ON_GPU", "resolve_impl", "describe"]

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

_MIN_CAPABILITY = (8, 0)  # Pallas' Triton lowering targets Ampere and newer


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
        return False, "the kernels are written for GPUs (Triton-style gathers); no Mosaic TPU form exists yet"
    return False, f"no compiled Pallas kernels on {backend} (impl='pallas' runs them in interpret mode, slowly)"


def _auto(op: str, backend: str, shape_ok: bool = True) -> tuple[str, str]:
    """What "auto" picks for `op` on `backend`, and why."""
    runs, why = _pallas_runs_here(backend)
    if not runs:
        return "xla", why
    if not PALLAS_FASTER_ON_GPU[op]:
        return "xla", f"{why}, but the {op} kernel measured no faster than XLA there (docs/benchmarks.md)"
    if not shape_ok:
        return "xla", f"{why}, but these shapes are outside what the {op} kernel compiles (powers of two)"
    return "pallas", f"{why}: the fused {op} kernel, measured faster than XLA (docs/benchmarks.md)"


def resolve_impl(impl: str, op: str, *, shape_ok: bool = True) -> str:
    """Validate `impl` for `op` and turn "auto" into a concrete choice ("pallas", "xla" or "reference").

    `shape_ok`: whether the op's Pallas kernel compiles for the caller's shapes (only GPUs care).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        return _auto(op, backend, shape_ok)[0]
    if impl == "pallas":
        if backend == "tpu":
            raise NotImplementedError(f"the Pallas kernel for {op} has no TPU form yet; use impl='xla' on TPU")
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
    backend = jax.default_backend()
    return {op: "{}: {}".format(*_auto(op, backend)) for op in OPS}
