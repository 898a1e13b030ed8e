"""The one place where a kernel implementation is chosen.

    "auto"       the best available for the current default backend: "xla" everywhere today
    "pallas"     the Pallas kernels (GPU/TPU): not built yet, raises NotImplementedError
    "xla"        the jnp chunked reference under `jax.jit`: the XLA path IS the jitted reference until a
                 faster XLA form exists
    "reference"  the same jnp chunked reference, un-jitted (traced by whatever jit the caller is in)

So "xla" and "reference" run the same math today; both stay so that tests and benchmarks can name the one
they mean once the XLA form diverges. The ground truth for all of them is `ssd_naive`.
"""

import jax

__all__ = ["IMPLS", "OPS", "resolve_impl", "describe"]

IMPLS = ("auto", "pallas", "xla", "reference")
OPS = ("ssd", "causal_conv1d", "causal_conv1d_update", "selective_state_update")


def _auto(op: str, backend: str) -> tuple[str, str]:
    """What "auto" picks for `op` on `backend`, and why."""
    return "xla", f"the Pallas kernel for {op} is not built yet, so every backend ({backend} here) uses XLA"


def resolve_impl(impl: str, op: str) -> str:
    """Validate `impl` for `op` and turn "auto" into a concrete choice ("xla" or "reference")."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return _auto(op, jax.default_backend())[0]
    if impl == "pallas":
        raise NotImplementedError(f'the Pallas kernel for {op} is not built yet; use impl="xla"')
    return impl


def describe() -> dict[str, str]:
    """Per op, what impl="auto" picks on the current default backend and why."""
    backend = jax.default_backend()
    return {op: "{}: {}".format(*_auto(op, backend)) for op in OPS}
