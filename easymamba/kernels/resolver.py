"""The one place that answers "which form of this op runs here", for every op of `easymamba.kernels`.

Forms (`Form`):

    REFERENCE   the jnp reference, un-jitted (traced by whatever jit the caller is in)
    XLA         the same reference under `jax.jit`: the XLA path IS the jitted reference until a faster XLA
                form exists
    TRITON      the Pallas kernel written for Pallas' Triton lowering (`<op>/triton.py`): compiled on NVIDIA GPUs
                of compute capability >= 8.0, run in Pallas' interpreter elsewhere (CPU: jnp, slow, exact)
    MOSAIC_GPU  the Pallas kernel for Mosaic GPU (`ssd_scan/mosaic_gpu.py`, TMA + wgmma): the SSD forward on sm_90
    MOSAIC_TPU  the Pallas kernel for Mosaic TPU (`<op>/mosaic_tpu.py`): what impl="pallas" runs on a TPU

`impl` names what a caller asks for: "auto" (the fastest form that runs here, by the tables below), "pallas" (the
Pallas form of this backend), "xla", "reference". `resolve(op, impl, ...)` turns it into a `Choice`: the form,
whether that form runs interpreted, and the reason in words; `describe()` prints the reasons.

The rule. "auto" never picks a kernel that cannot run: Pallas only on a GPU whose capability the Triton backend
supports, only for shapes the kernel compiles (each kernel file's `*_supported`), and only for ops where the kernel
was measured faster than XLA on that GPU (`PALLAS_FASTER_ON_GPU`, from `benchmarks/`, numbers in
docs/benchmarks.md). On a Hopper GPU (sm_90) the SSD's Pallas form is MOSAIC_GPU for bf16 / f16 operands whose
p and n it takes (measured 0.80-0.97x the Triton form's time), else TRITON. On TPU "auto" stays on XLA: the TPU
kernels lower through Mosaic (checked on CPU by `jax.export(..., platforms=("tpu",))`) and run in Pallas' TPU
interpreter, but have never run on TPU hardware (`PALLAS_FASTER_ON_TPU`); impl="pallas" selects them. Elsewhere
(CPU) "auto" is XLA and "pallas" runs the Triton-style kernels interpreted, for any shape.

Two ops have fewer forms. The fused Mamba-2 decode step ("decode_step") has a Triton form and no TPU form: on a
TPU, "pallas" asks for the op-by-op step (`Form.XLA` here), whose conv and state updates run their Mosaic TPU
forms. Mamba-1's selective scan ("selective_scan") has no Pallas form at all: "pallas" and "xla" run the jitted
chunked associative scan (`Form.XLA`, the reason says so), "reference" and "auto" on CPU the sequential recurrence
(`Form.REFERENCE`, measured faster there).

Interpret mode is an argument, never a global: `resolve(..., interpret=None)` answers True where the chosen
Pallas form has no compiled backend here (the caller passes `choice.interpret` down to the kernel); True forces
the interpreter (any shape), False insists on compiling.
"""

import dataclasses
import enum

import jax
import jax.numpy as jnp

from easymamba.kernels import pallas_util as pu
from easymamba.kernels.conv1d.mosaic_tpu import conv1d_tpu_supported
from easymamba.kernels.conv1d.triton import conv1d_supported
from easymamba.kernels.decode_step.triton import decode_step_supported
from easymamba.kernels.ssd_scan.mosaic_gpu import mgpu_supported
from easymamba.kernels.ssd_scan.mosaic_tpu import SSDTPUConfig, ssd_tpu_supported
from easymamba.kernels.ssd_scan.triton import ssd_supported
from easymamba.kernels.state_update.mosaic_tpu import state_update_tpu_supported
from easymamba.kernels.state_update.triton import state_update_supported

__all__ = ["Form", "Choice", "IMPLS", "OPS", "ALL_OPS", "PALLAS_FASTER_ON_GPU", "PALLAS_FASTER_ON_TPU", "TPU_SHAPES",
           "platform", "resolve", "resolve_impl", "supported", "gpu_form", "describe"]

IMPLS = ("auto", "pallas", "xla", "reference")
OPS = ("ssd", "causal_conv1d", "causal_conv1d_update", "selective_state_update")  # the public ops
ALL_OPS = OPS + ("decode_step", "selective_scan")


class Form(enum.Enum):
    """A form an op can run in (module docstring)."""

    REFERENCE = "reference"
    XLA = "xla"
    TRITON = "triton"
    MOSAIC_GPU = "mosaic_gpu"
    MOSAIC_TPU = "mosaic_tpu"

    @property
    def is_pallas(self) -> bool:
        return self in (Form.TRITON, Form.MOSAIC_GPU, Form.MOSAIC_TPU)

    @property
    def impl(self) -> str:
        """The `impl` name that asks for this form: "pallas" for the three Pallas forms."""
        return "pallas" if self.is_pallas else self.value


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs: `form`; `interpret`, whether a Pallas form runs in Pallas' interpreter (False for the
    others); `reason`, why, in words."""

    op: str
    form: Form
    interpret: bool
    reason: str

    def __str__(self) -> str:
        form = f" ({self.form.value}{', interpreted' if self.interpret else ''})" if self.form.is_pallas else ""
        return f"{self.form.impl}{form}: {self.reason}"


# op -> whether its Pallas kernel beat the jitted XLA path on an H100 (docs/benchmarks.md, benchmarks/ssd.py,
# benchmarks/decode_step.py)
PALLAS_FASTER_ON_GPU = {
    "ssd": True,  # 0.05-0.08x the XLA time at the four benchmark shapes
    "causal_conv1d": True,  # 0.14x (0.34 ms vs 2.52 ms at b4 l8k c5376)
    # decode steps: XLA was as fast or faster (state update 1.08x / 1.24x slower in Pallas at b64 / b256), and
    # inside a jitted decode step XLA fuses them with their neighbours, which a custom call prevents
    "causal_conv1d_update": False,
    "selective_state_update": False,
    "decode_step": True,  # the whole layer step in one kernel ("Fused decode step" in docs/benchmarks.md)
    "selective_scan": False,  # no Pallas form
}

# op -> whether its Mosaic TPU kernel beat XLA on a TPU; None: never measured (no TPU at hand), so "auto" stays on
# XLA there. Set an entry from a benchmark run on TPU hardware, as PALLAS_FASTER_ON_GPU was.
PALLAS_FASTER_ON_TPU: dict[str, bool | None] = dict.fromkeys(OPS)

# op -> the shapes its GPU (Triton-form) kernel compiles (the `*_supported` of its file), for the error sentences
GPU_SHAPES = {
    "ssd": "head_dim p and state size n of any size whose padding to powers of two >= 16 (`kernel_dims`) gives a "
           "state of at most 128 * 256 elements: p <= 128 with n <= 256, or p <= 256 with n <= 128 (ssd_supported "
           "in easymamba/kernels/ssd_scan/triton.py)",
    "causal_conv1d": "a power-of-two conv width k and channels in blocks of >= 16 (conv1d_supported in "
                     "easymamba/kernels/conv1d/triton.py)",
    "causal_conv1d_update": "a power-of-two conv width k and channels in blocks of >= 16 (conv1d_supported in "
                            "easymamba/kernels/conv1d/triton.py)",
    "selective_state_update": "head_dim p and state size n powers of two with p * n <= 128 * 256 "
                              "(state_update_supported in easymamba/kernels/state_update/triton.py)",
    "decode_step": "state size n and conv width k powers of two, head_dim p a power of two or a multiple of 16, "
                   "p * n <= 128 * 256 (decode_step_supported in easymamba/kernels/decode_step/triton.py)",
}

# op -> the shapes its TPU kernel handles (the `*_tpu_supported` of its file), for the error sentences
TPU_SHAPES = {
    "ssd": "head_dim p a multiple of 8 that divides 128 or is a multiple of 128, state size n a multiple of 128, "
           "heads h and groups g (per shard) whose head block `head_block(h, g, p, n)` spans a multiple of 128 "
           "lanes and fits the VMEM budget, and x, B, C, z in float32 or bfloat16 (ssd_tpu_supported in "
           "easymamba/kernels/ssd_scan/mosaic_tpu.py)",
    "causal_conv1d": "conv channels (per shard) a multiple of 128 and 2 <= k <= 16 (conv1d_tpu_supported in "
                     "easymamba/kernels/conv1d/mosaic_tpu.py)",
    "causal_conv1d_update": "conv channels (per shard) a multiple of 128 and 2 <= k <= 16 (conv1d_tpu_supported "
                            "in easymamba/kernels/conv1d/mosaic_tpu.py)",
    "selective_state_update": "head_dim p a multiple of 8, state size n a multiple of 128 and p * n * 4 <= 1 MiB "
                              "(state_update_tpu_supported in easymamba/kernels/state_update/mosaic_tpu.py)",
}

_MIN_CAPABILITY = (8, 0)  # Pallas' Triton lowering targets Ampere and newer


def platform() -> str:
    """The backend kernels are chosen for: `jax.default_backend()`, read here and nowhere else in the choice (so
    a test can fake a TPU without making the kernels themselves believe they run on one)."""
    return jax.default_backend()


def supported(op: str, form: Form, **dims) -> bool:
    """Whether `form` of `op` handles these dims (letters of `easymamba.typing`: ssd p, n, and on TPU h, g and
    `dtype`, x's dtype; conv c, k; state update p, n; decode step p, n, k). The kernel files' `*_supported`."""
    if form is Form.TRITON:
        return {"ssd": lambda: ssd_supported(dims["p"], dims["n"]),
                "causal_conv1d": lambda: conv1d_supported(dims["c"], dims["k"]),
                "causal_conv1d_update": lambda: conv1d_supported(dims["c"], dims["k"]),
                "selective_state_update": lambda: state_update_supported(dims["p"], dims["n"]),
                "decode_step": lambda: decode_step_supported(dims["p"], dims["n"], dims["k"])}[op]()
    if form is Form.MOSAIC_GPU:
        return op == "ssd" and mgpu_supported(dims["p"], dims["n"], dims["dtype"])
    if form is Form.MOSAIC_TPU:
        return {"ssd": lambda: ssd_tpu_supported(dims["p"], dims["n"], h=dims["h"], g=dims["g"], q=SSDTPUConfig().q,
                                                 dtype=dims["dtype"]),
                "causal_conv1d": lambda: conv1d_tpu_supported(dims["c"], dims["k"]),
                "causal_conv1d_update": lambda: conv1d_tpu_supported(dims["c"], dims["k"]),
                "selective_state_update": lambda: state_update_tpu_supported(dims["p"], dims["n"])}.get(
                    op, lambda: False)()
    return True  # the references take any shape


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


def gpu_form(op: str, dims: dict | None, *, interpret: bool) -> Form:
    """The Pallas form on a GPU: the SSD's Mosaic GPU form where it compiles (sm_90, compiled, bf16 / f16 operands
    of the p and n it takes), else the Triton form."""
    if op == "ssd" and not interpret and dims and "dtype" in dims:
        cap = pu.gpu_capability()
        if cap is not None and cap[0] == 9 and supported("ssd", Form.MOSAIC_GPU, **dims):
            return Form.MOSAIC_GPU
    return Form.TRITON


def _auto(op: str, backend: str, shape_ok: bool = True) -> tuple[Form, str]:
    """What "auto" picks for `op` on `backend` (a Pallas form, or XLA), and why."""
    runs, why = _pallas_runs_here(backend)
    if not runs:
        return Form.XLA, why
    if backend == "tpu":
        if op not in PALLAS_FASTER_ON_TPU:
            return Form.XLA, f"{why}: the {op} kernel has no TPU form"
        if PALLAS_FASTER_ON_TPU[op] is None:
            return Form.XLA, (f"{why}: the TPU kernels lower through Mosaic but are unmeasured on TPU hardware "
                              f"(impl='pallas' selects the {op} kernel's Mosaic TPU form)")
        if not PALLAS_FASTER_ON_TPU[op]:
            return Form.XLA, f"{why}, but the {op} kernel measured no faster than XLA there"
        if not shape_ok:
            return Form.XLA, f"{why}, but these shapes are outside what the {op} kernel handles ({TPU_SHAPES[op]})"
        return Form.MOSAIC_TPU, f"{why}: the {op} kernel, measured faster than XLA"
    if not PALLAS_FASTER_ON_GPU[op]:
        return Form.XLA, f"{why}, but the {op} kernel measured no faster than XLA there (docs/benchmarks.md)"
    if not shape_ok:
        return Form.XLA, f"{why}, but these shapes are outside what the {op} kernel compiles ({GPU_SHAPES[op]})"
    return Form.TRITON, f"{why}: the fused {op} kernel, measured faster than XLA (docs/benchmarks.md)"


def _selective_scan(impl: str, backend: str) -> Choice:
    """Mamba-1's selective scan: no Pallas form (module docstring)."""
    if impl == "reference" or (impl == "auto" and backend == "cpu"):
        why = "asked for" if impl == "reference" else "on CPU the recurrence measured faster than the associative scan"
        return Choice("selective_scan", Form.REFERENCE, False, f"the sequential recurrence ({why})")
    why = {"auto": f"the chunked associative scan under jit on {backend}",
           "xla": "the chunked associative scan under jit",
           "pallas": "the selective scan has no Pallas kernel yet: impl='pallas' runs the jitted chunked "
                     "associative scan"}[impl]
    return Choice("selective_scan", Form.XLA, False, why)


def resolve(op: str, impl: str = "auto", *, shape_ok: bool | None = None, shapes: str = "", dims: dict | None = None,
            backend: str | None = None, interpret: bool | None = None) -> Choice:
    """Which form of `op` runs for `impl` here, whether interpreted, and why.

    `backend`: the backend to choose for (default `platform()`). The caller's shapes, either as `dims` (see
    `supported`; then this function checks them against the backend's Pallas form) or as `shape_ok` (the caller
    checked, e.g. per shard) with `shapes`, those shapes in words for the error sentences. Neither: typical shapes
    (what `describe()` answers). `interpret`: None derives it (True where the chosen Pallas form has no compiled
    backend here); True runs a Pallas form interpreted, for any shape.

    Raises ValueError for an unknown op or impl, or a Pallas form asked for shapes it does not compile;
    NotImplementedError for a Pallas form that cannot run here.
    """
    if op not in ALL_OPS:
        raise ValueError(f"op must be one of {ALL_OPS}, got {op!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = platform() if backend is None else backend
    if op == "selective_scan":
        return _selective_scan(impl, backend)
    if impl in ("xla", "reference"):
        return Choice(op, Form(impl), False, "asked for")
    pallas_form = Form.MOSAIC_TPU if backend == "tpu" else Form.TRITON
    if shape_ok is None:
        shape_ok = True if dims is None or (backend == "tpu" and op not in TPU_SHAPES) else supported(
            op, pallas_form, **dims)
    if interpret is None:  # the form's own backend compiles it; anywhere else, Pallas' interpreter
        interpret = jax.default_backend() != ("tpu" if backend == "tpu" else "gpu")
    if impl == "auto":
        form, why = _auto(op, backend, shape_ok)
        if form is Form.TRITON:
            form = gpu_form(op, dims, interpret=interpret)
            why += " (Mosaic GPU form, sm_90)" if form is Form.MOSAIC_GPU else ""
        return Choice(op, form, form.is_pallas and interpret, why)
    # impl == "pallas"
    if backend == "tpu":
        if op not in TPU_SHAPES:  # the fused decode step: no TPU form; its ops have theirs
            return Choice(op, Form.XLA, False, f"the {op} kernel has no TPU form: the op-by-op path, whose ops run "
                                               f"their Mosaic TPU forms")
        if not shape_ok:
            got = f" ({shapes})" if shapes else ""
            raise ValueError(f"the TPU Pallas kernel for {op} does not handle these shapes{got}: it needs "
                             f"{TPU_SHAPES[op]}; use impl='xla' for these shapes")
        return Choice(op, Form.MOSAIC_TPU, interpret, "asked for (Mosaic TPU form)")
    if backend == "gpu" and not interpret:
        runs, why = _pallas_runs_here(backend)
        if not runs:
            raise NotImplementedError(f"the Pallas kernel for {op} cannot run here: {why}; use impl='xla'")
        if not shape_ok:
            got = f" (got {shapes})" if shapes else ""
            raise ValueError(f"the Pallas kernel for {op} does not compile these shapes{got}: it needs "
                             f"{GPU_SHAPES[op]}; use impl='xla' for these shapes")
        form = gpu_form(op, dims, interpret=interpret)
        return Choice(op, form, False, f"asked for ({form.value} form, compiled)")
    return Choice(op, Form.TRITON, True, f"asked for (Triton-style form, interpreted on {jax.default_backend()})")


def resolve_impl(impl: str, op: str, *, shape_ok: bool = True, shapes: str = "", dims: dict | None = None,
                 backend: str | None = None) -> str:
    """`resolve(...)`'s answer as an impl name: "pallas", "xla" or "reference"."""
    return resolve(op, impl, shape_ok=None if dims is not None else shape_ok, shapes=shapes, dims=dims,
                   backend=backend).form.impl


def describe(op: str | None = None, impl: str = "auto", **dims) -> dict[str, str] | str:
    """What `impl` ("auto" by default) runs on the current default backend, and why.

    No `op`: per public op (`OPS`), for typical shapes, a dict of "impl: reason" lines. With `op` (any of
    `ALL_OPS`) and its dims (`supported`'s letters, e.g. `describe("ssd", p=64, n=128, dtype=jnp.bfloat16)`):
    the one answer for those shapes, naming the form.
    """
    if op is None:
        backend = platform()
        return {name: "{0.impl}: {1}".format(*_auto(name, backend)) for name in OPS}
    dims = {k: (jnp.dtype(v) if k == "dtype" else v) for k, v in dims.items()}
    return str(resolve(op, impl, dims=dims or None))
