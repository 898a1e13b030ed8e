"""What the Pallas kernels here share: where they can run, how they are compiled, the shape rules.

The Triton-style kernels (`ssd_scan/triton.py`, `ssd_scan/triton_bwd.py`, `conv1d/triton.py`, `state_update/triton.py`,
`decode_step/triton.py`) are written in the pointer style of Pallas' Triton lowering (`pl.pallas_call` with
`BlockSpec`s that pick one (batch, head) or (batch, channel-block) per program, loops and gathers inside):

* on an NVIDIA GPU they are compiled through the Triton backend, named explicitly with
  `pltriton.CompilerParams` because jax >= 0.9 lowers a bare `pallas_call` through Mosaic GPU instead. jax 0.11
  deprecates the Triton backend but still ships it. The SSD forward also has a Mosaic GPU form
  (`ssd_scan/mosaic_gpu.py`, Hopper, the default there); the others do not yet (see docs/kernels.md);
* everywhere else (CPU CI) they run in Pallas' interpret mode, which executes the same kernel body with jnp.
  Interpret mode is an argument of every kernel entry (`interpret`, None: `default_interpret`), never a global;
* they are not TPU kernels (Mosaic TPU has no gathers from refs). On a TPU backend impl="pallas" runs their
  Mosaic TPU forms instead (`*/mosaic_tpu.py`: TPU block rules, their own `*_tpu_supported`; from this module only
  the TPU interpret switch, `resolve_tpu_interpret` / `tpu_interpret_params`); `resolver.py` picks between them.

Triton needs every loaded block to have power-of-two sides and a matmul side >= 16; `pow2_at_least` and the
`*_supported` helpers in each kernel file state which shapes compile.
"""

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

__all__ = ["on_gpu", "gpu_capability", "compiler_params", "default_interpret", "is_pow2", "pow2_at_least",
           "resolve_tpu_interpret", "tpu_interpret_params"]


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


def default_interpret(interpret: bool | None) -> bool:
    """A GPU form's `interpret` argument: None compiles on an NVIDIA GPU and interprets (jnp, any backend)
    everywhere else; True / False force it. Every kernel entry resolves it once and passes the bool down."""
    return not on_gpu() if interpret is None else bool(interpret)


def compiler_params(num_warps: int, num_stages: int, *, interpret: bool):
    """Triton compiler params for a compiled kernel; None when interpreted (the interpreter ignores them)."""
    if interpret or TritonParams is None:
        return None
    return TritonParams(num_warps=num_warps, num_stages=num_stages)


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def pow2_at_least(v: int, floor: int = 1) -> int:
    """The smallest power of two >= max(v, floor)."""
    v = max(v, floor)
    return 1 << (v - 1).bit_length()


def round_up(v: int, m: int) -> int:
    """The smallest multiple of m >= v."""
    return -(-v // m) * m


def resolve_tpu_interpret(interpret) -> bool:
    """The TPU forms' `interpret` argument: None interprets unless running on a TPU; True / False force it."""
    return jax.default_backend() != "tpu" if interpret is None else bool(interpret)


def tpu_interpret_params(interpret: bool):
    """What `pl.pallas_call(interpret=...)` takes for a TPU form: Pallas' TPU interpreter, or False to compile for
    Mosaic TPU."""
    return pltpu.InterpretParams() if interpret else False
