"""What the Triton-style Pallas kernels here share: where they can run, how they are compiled, the shape rules.

The GPU kernels in this package (`ssd_pallas_gpu.py`, `conv1d_pallas.py`, `state_update_pallas.py`,
`decode_step_pallas.py`) are written in the pointer style of Pallas' Triton lowering (`pl.pallas_call` with
`BlockSpec`s that pick one (batch, head) or (batch, channel-block) per program, loops and gathers inside):

* on an NVIDIA GPU they are compiled through the Triton backend, named explicitly with
  `pltriton.CompilerParams` because jax >= 0.9 lowers a bare `pallas_call` through Mosaic GPU instead. jax 0.11
  deprecates the Triton backend but still ships it. The SSD forward also has a Mosaic GPU form
  (`ssd_pallas_mgpu.py`, Hopper, the default there); the others do not yet (see docs/kernels.md);
* everywhere else (CPU CI) they run in Pallas' interpret mode, which executes the same kernel body with jnp;
* they are not TPU kernels (Mosaic TPU has no gathers from refs). On a TPU backend impl="pallas" runs their
  Mosaic TPU forms instead (`ssd_pallas_tpu.py`, `conv1d_pallas_tpu.py`, `state_update_pallas_tpu.py`: TPU
  block rules, their own `*_tpu_supported`; from this module only the TPU interpret switch,
  `resolve_tpu_interpret` / `tpu_interpret_params`); `dispatch` picks between the two.

Triton needs every loaded block to have power-of-two sides and a matmul side >= 16; `pow2_at_least` and the
`*_supported` helpers in each kernel file state which shapes compile.
"""

import contextlib
import os

import jax

try:  # the Triton compiler params moved and were renamed across jax versions; keep one spelling here
    from jax.experimental.pallas import triton as pltriton

    TritonParams = pltriton.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - jax builds without the Triton module
    pltriton = None
    TritonParams = None

try:  # the Mosaic TPU forms' interpreter (any backend); absent only from unusual jax builds
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
    pltpu = None

__all__ = ["on_gpu", "gpu_capability", "compiler_params", "interpret_mode", "force_interpret", "is_pow2",
           "pow2_at_least", "resolve_tpu_interpret", "tpu_interpret_params"]

_FORCE_INTERPRET = [False]


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def gpu_capability() -> tuple[int, int] | None:
    """(major, minor) CUDA compute capability of the first GPU, or None off NVIDIA GPUs."""
    if not on_gpu():
        return None
    cap = getattr(jax.devices()[0], "compute_capability", None)
    if cap is None:
        return None
    major, minor = str(cap).split(".")[:2]
    return int(major), int(minor)


def interpret_mode() -> bool:
    """Kernels run compiled on NVIDIA GPUs and interpreted (jnp, any backend) everywhere else."""
    return _FORCE_INTERPRET[0] or not on_gpu()


@contextlib.contextmanager
def force_interpret(enabled: bool = True):
    """Trace kernels in interpret mode even on a GPU (tests use it for shapes Triton would refuse). Read at
    trace time: wrap the call, not an already-jitted function's later calls."""
    previous, _FORCE_INTERPRET[0] = _FORCE_INTERPRET[0], enabled
    try:
        yield
    finally:
        _FORCE_INTERPRET[0] = previous


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params on GPU; None in interpret mode (the interpreter ignores them)."""
    if interpret_mode() or TritonParams is None:
        return None
    if os.environ.get("EASYMAMBA_PALLAS_GPU_BACKEND") == "mosaic":  # probe: let jax pick Mosaic GPU instead
        return None
    return TritonParams(num_warps=num_warps, num_stages=num_stages)


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def pow2_at_least(v: int, floor: int = 1) -> int:
    """The smallest power of two >= max(v, floor)."""
    v = max(v, floor)
    return 1 << (v - 1).bit_length()


def resolve_tpu_interpret(interpret) -> bool:
    """The TPU forms' `interpret` argument: None interprets unless running on a TPU; True / False force it."""
    return jax.default_backend() != "tpu" if interpret is None else bool(interpret)


def tpu_interpret_params(interpret: bool):
    """What `pl.pallas_call(interpret=...)` takes for a TPU form: Pallas' TPU interpreter, or False to compile for
    Mosaic TPU."""
    return pltpu.InterpretParams() if interpret else False
