"""Mamba-2 kernels: the SSD scan, the depthwise causal conv1d, and their single-token decode steps.

Public entry points (shapes in `easymamba.typing` letters):

    y, final_state = ssd(x [b,l,h,p], dt [b,l,h], A [h], B [b,l,g,n], C [b,l,g,n], *, chunk_size, ...)
    y, conv_state  = causal_conv1d(x [b,l,c], weight [c,k], bias=None, *, activation="silu", ...)
    y, conv_state  = causal_conv1d_update(x [b,c], conv_state [b,c,k], weight, bias=None, *, activation)
    y, ssm_state   = selective_state_update(ssm_state [b,h,p,n], x [b,h,p], dt [b,h], A, B [b,g,n], C, ...)

`impl` is resolved by `resolver.resolve` (one resolver for every op: which `Form` runs here and why; see
`describe()`). `shard=MeshAxes(mesh, batch=..., heads=..., groups=...)` says how the operands are split over a device
mesh: a Pallas kernel then runs once per shard under `jax.shard_map` (GSPMD cannot partition a custom kernel call),
on its batch rows and heads (or conv channels); the XLA and reference forms ignore it and are partitioned by GSPMD.
`interpret` (every op): run a Pallas form in Pallas' interpreter; None lets the resolver say (interpreted where the
form has no compiled backend, e.g. impl="pallas" on CPU).

One folder per op, each with its reference and its forms side by side:

    ssd_scan/      reference.py (ssd_naive, ssd_chunked, segsum), gpu.py (ssd_pallas: custom VJP, picks the forward
                   form), triton.py, triton_bwd.py, mosaic_gpu.py (Hopper), mosaic_tpu.py
    conv1d/        reference.py, triton.py, mosaic_tpu.py         (causal_conv1d and its decode update)
    state_update/  reference.py, triton.py, mosaic_tpu.py         (selective_state_update, one SSD decode step)
    decode_step/   reference.py, triton.py                        (mamba2_decode_step: a whole layer step fused)
    selective_scan/ reference.py                                  (Mamba-1: no kernel yet)

Every TPU form takes the same operands and options as its GPU form (seq_idx, initial states, D, z, dt_bias,
dt_limit), so the choice changes the kernel, never the contract; the shapes each compiles for differ, and are
checked per backend here. The pure-JAX references they are tested against (`ssd_naive`, `ssd_chunked`, `segsum`,
`selective_state_update_ref`, `causal_conv1d_ref`, `causal_conv1d_update_ref`, `decode_step_ref`) are re-exported.

Mamba-1's selective scan (`selective_scan/reference.py`): `selective_scan_naive` (the recurrence, ground truth),
`selective_scan_chunked` (the associative-scan prefill form) and `selective_state_update_mamba1` (one decode step).

The SSD's folder is `ssd_scan/`: a subpackage named `ssd` would shadow the op `ssd` as an attribute of this package.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from easymamba.kernels import resolver as _resolver
from easymamba.kernels.conv1d import mosaic_tpu as _conv1d_tpu
from easymamba.kernels.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from easymamba.kernels.conv1d.triton import causal_conv1d_pallas, causal_conv1d_update_pallas
from easymamba.kernels.decode_step.reference import check_row_mask, decode_step_ref
from easymamba.kernels.decode_step.triton import _static as _decode_static
from easymamba.kernels.decode_step.triton import decode_step_pallas
from easymamba.kernels.resolver import Choice, Form, describe, resolve, resolve_impl
from easymamba.kernels.selective_scan.reference import (
    selective_scan_chunked,
    selective_scan_naive,
    selective_state_update_mamba1,
)
from easymamba.kernels.ssd_scan import mosaic_tpu as _ssd_tpu_mod
from easymamba.kernels.ssd_scan.gpu import SSDBlockConfig, ssd_pallas
from easymamba.kernels.ssd_scan.reference import segsum, ssd_chunked, ssd_naive
from easymamba.kernels.state_update import mosaic_tpu as _state_update_tpu_mod
from easymamba.kernels.state_update.reference import selective_state_update_ref
from easymamba.kernels.state_update.triton import selective_state_update_pallas

__all__ = [
    "MeshAxes",
    "ssd",
    "causal_conv1d",
    "causal_conv1d_update",
    "selective_state_update",
    "mamba2_decode_step",
    "ssd_naive",
    "ssd_chunked",
    "segsum",
    "selective_state_update_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "decode_step_ref",
    "check_row_mask",
    "describe",
    "resolve",
    "resolve_impl",
    "Form",
    "Choice",
    "ssd_pallas",
    "SSDBlockConfig",
    "causal_conv1d_pallas",
    "causal_conv1d_update_pallas",
    "selective_state_update_pallas",
    "decode_step_pallas",
    "selective_scan_naive",
    "selective_scan_chunked",
    "selective_state_update_mamba1",
]

_SSD_STATIC = ("chunk_size", "dt_softplus", "dt_limit", "interpret")
_ssd_xla = jax.jit(ssd_chunked, static_argnames=_SSD_STATIC[:3])
_conv_xla = jax.jit(causal_conv1d_ref, static_argnames=("activation",))
_conv_update_xla = jax.jit(causal_conv1d_update_ref, static_argnames=("activation",))
_state_update_xla = jax.jit(selective_state_update_ref, static_argnames=("dt_softplus", "dt_limit"))
_ssd_pallas = jax.jit(ssd_pallas, static_argnames=_SSD_STATIC + ("y_dtype", "config"))
_conv_pallas = jax.jit(causal_conv1d_pallas, static_argnames=("activation", "interpret"))
_conv_update_pallas = jax.jit(causal_conv1d_update_pallas, static_argnames=("activation", "interpret"))
_state_update_pallas = jax.jit(selective_state_update_pallas, static_argnames=("dt_softplus", "dt_limit", "interpret"))
_ssd_tpu = jax.jit(_ssd_tpu_mod.ssd_pallas_tpu, static_argnames=_SSD_STATIC + ("y_dtype", "config"))
_conv_tpu = jax.jit(_conv1d_tpu.causal_conv1d_tpu, static_argnames=("activation", "interpret", "block_l", "block_c"))
_conv_update_tpu = jax.jit(_conv1d_tpu.causal_conv1d_update_tpu, static_argnames=("activation", "interpret"))
_state_update_tpu = jax.jit(_state_update_tpu_mod.selective_state_update_tpu,
                            static_argnames=("dt_softplus", "dt_limit", "interpret", "block_h"))
_DECODE_STATIC = ("n_groups", "eps", "dt_limit", "A_is_log", "y_dtype", "rms_eps")
_decode_step_xla = jax.jit(decode_step_ref, static_argnames=_DECODE_STATIC)
_decode_step_pallas = jax.jit(decode_step_pallas, static_argnames=_DECODE_STATIC + ("block_p", "interpret"))


def _forms(choice: Choice, pallas_gpu, pallas_tpu, xla, reference):
    """The function `choice` names, and the keyword arguments it takes beyond the op's (`interpret` for a
    Pallas form, which the resolver decided)."""
    if choice.form is Form.MOSAIC_TPU:
        return pallas_tpu, dict(interpret=choice.interpret)
    if choice.form.is_pallas:  # Triton or Mosaic GPU: ssd_pallas picks between them with the same resolver
        return pallas_gpu, dict(interpret=choice.interpret)
    return (xla if choice.form is Form.XLA else reference), {}


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """Where kernel operands live on `mesh` (each entry a mesh axis name, a tuple of names, or None).

    batch   splits `b` of every operand
    heads   splits `h` (SSD, state update) or the conv channels `c` (conv1d) and every per-head parameter
    groups  splits `g` of B and C; None when they are replicated (n_groups not divisible by the heads axis):
            each shard then reads the groups its own heads use

    Given to a kernel entry point as `shard=`, it makes the Pallas form run per shard under `jax.shard_map`;
    the shards are independent (batch rows and heads never interact in these ops), so the result is the
    unsharded one exactly.
    """

    mesh: Mesh
    batch: str | tuple[str, ...] | None = None
    heads: str | tuple[str, ...] | None = None
    groups: str | tuple[str, ...] | None = None

    def size(self, entry) -> int:
        """How many shards a spec entry makes (1 for None)."""
        if entry is None:
            return 1
        names = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(self.mesh.shape[name] for name in names)

    def for_channels(self, channels) -> "MeshAxes":
        """These axes with the conv channels split over `channels` (the conv kernels read `heads`)."""
        return dataclasses.replace(self, heads=channels, groups=None)


def _shard_call(fn, shard: MeshAxes, args: dict, specs: dict, out_specs):
    """`fn(**args)` once per shard of `shard.mesh`; `specs[name]` is each present (not None) arg's spec."""
    present = {name: value for name, value in args.items() if value is not None}
    in_specs = ({name: specs[name] for name in present},)
    body = jax.shard_map(lambda kw: fn(**kw), mesh=shard.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
    return body(present)


def _local_groups(B, shard: MeshAxes, num_heads: int):
    """Inside a shard: B [..., g, n], replicated over the heads axis, cut to the groups this shard's heads
    read (head i reads group i // (h / g)), so the kernel's own head -> group map applies locally."""
    g = B.shape[-2]
    per_shard = num_heads // shard.size(shard.heads)         # heads on this shard
    per_group = num_heads // g                               # heads reading one group
    first = lax.axis_index(shard.heads) * per_shard
    if per_shard % per_group == 0 or per_group % per_shard == 0:  # whole groups, or all heads in one group
        return lax.dynamic_slice_in_dim(B, first // per_group, max(per_shard // per_group, 1), axis=B.ndim - 2)
    return jnp.take(B, (first + jnp.arange(per_shard)) // per_group, axis=B.ndim - 2)  # one group per head


def _local_heads_groups(h: int, g: int, shard: MeshAxes | None) -> tuple[int, int]:
    """(heads, groups) that one shard's kernel call sees: h split over `shard.heads`, and B/C's groups either
    split over `shard.groups` or cut to the groups the shard's heads read (as `_local_groups` cuts them)."""
    if shard is None or shard.heads is None or h % shard.size(shard.heads):
        return h, g  # unsplit heads (or a split shard_map itself refuses)
    local = h // shard.size(shard.heads)
    if shard.groups is not None:
        return local, g // shard.size(shard.groups)
    per_group = h // g
    if local % per_group == 0 or per_group % local == 0:
        return local, max(local // per_group, 1)
    return local, local  # one group per head


def _ssd_shapes(backend: str, x, B, C, z, shard: MeshAxes | None) -> tuple[bool, str]:
    """Whether `backend`'s SSD kernel handles these operands (the TPU kernel: per shard), and them in words."""
    if x.ndim != 4 or B.ndim != 4:
        return False, f"x {x.shape}, B {B.shape}"
    p, n = x.shape[3], B.shape[3]
    if backend != "tpu":
        return _resolver.supported("ssd", Form.TRITON, p=p, n=n), f"p = {p}, n = {n}"
    h, g = _local_heads_groups(x.shape[2], B.shape[2], shard)
    tpu_dtypes = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    dtypes_ok = all(a is None or jnp.dtype(a.dtype) in tpu_dtypes for a in (B, C, z))
    ok = dtypes_ok and _resolver.supported("ssd", Form.MOSAIC_TPU, p=p, n=n, h=h, g=g, dtype=x.dtype)
    per = " per shard" if shard is not None and shard.heads is not None else ""
    return ok, f"p = {p}, n = {n}, h = {h} and g = {g}{per}, x in {jnp.dtype(x.dtype).name}"


def _static_limit(dt_limit) -> tuple[float, float]:
    """dt_limit as a hashable pair of Python floats, so it can be a static jit argument."""
    low, high = dt_limit
    return float(low), float(high)


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit=(0.0, math.inf),
    initial_state=None,
    seq_idx=None,
    impl: str = "auto",
    shard: MeshAxes | None = None,
    interpret: bool | None = None,
    y_dtype=None,
):
    """The Mamba-2 SSD scan; returns (y [b,l,h,p] in `y_dtype`, final_state [b,h,p,n] in promote(x.dtype, float32)).

    `y_dtype`: None (default) gives y in x's dtype, as mamba_ssm does (a bf16 model's prefill writes half the
    bytes); pass jnp.float32 for the compute dtype. Every form computes in float32 and rounds y once at the end.

    Semantics: `ssd_naive` (the recurrence) — see `easymamba.kernels.ssd_scan.reference` for the math, seq_idx and
    dtype rules. `impl` in ("auto", "pallas", "xla", "reference"), resolved by `resolver.resolve`; on a TPU
    "pallas" is `ssd_pallas_tpu` (its chunk is its own `SSDTPUConfig().q`; `chunk_size` sets the backward's).
    `shard`: the operands' mesh layout (`MeshAxes`); the Pallas kernel then runs per shard. `interpret`: run a
    Pallas form in Pallas' interpreter (None: where it has no compiled backend, as `resolve` says).
    """
    backend = _resolver.platform()
    shape_ok, shapes = _ssd_shapes(backend, x, B, C, z, shard)
    dims = dict(p=x.shape[-1], n=B.shape[-1], dtype=x.dtype)
    choice = resolve("ssd", impl, shape_ok=shape_ok, shapes=shapes, dims=dims, backend=backend, interpret=interpret)
    fn, form_kw = _forms(choice, _ssd_pallas, _ssd_tpu, _ssd_xla, ssd_chunked)
    y_dtype = jnp.dtype(x.dtype if y_dtype is None else y_dtype)
    if choice.form.is_pallas:
        form_kw["y_dtype"] = y_dtype
    else:  # the references compute and return float32; one rounding at the end, fused by XLA
        fn = _cast_y(fn, y_dtype)
    static = dict(chunk_size=chunk_size, dt_softplus=bool(dt_softplus), dt_limit=_static_limit(dt_limit), **form_kw)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state, seq_idx=seq_idx)
    if not choice.form.is_pallas or shard is None:
        return fn(**args, **static)
    b_, h_, g_ = shard.batch, shard.heads, shard.groups
    specs = dict(x=PartitionSpec(b_, None, h_, None), dt=PartitionSpec(b_, None, h_), A=PartitionSpec(h_),
                 B=PartitionSpec(b_, None, g_, None), C=PartitionSpec(b_, None, g_, None), D=PartitionSpec(h_),
                 z=PartitionSpec(b_, None, h_, None), dt_bias=PartitionSpec(h_),
                 initial_state=PartitionSpec(b_, h_, None, None), seq_idx=PartitionSpec(b_, None))
    num_heads = x.shape[2]

    def per_shard(B, C, **rest):
        if g_ is None and h_ is not None:
            B, C = _local_groups(B, shard, num_heads), _local_groups(C, shard, num_heads)
        return fn(B=B, C=C, **rest, **static)

    return _shard_call(per_shard, shard, args, specs,
                       (PartitionSpec(b_, None, h_, None), PartitionSpec(b_, h_, None, None)))


def _cast_y(fn, y_dtype):
    """`fn` (an SSD returning (y, final_state)) with y cast to `y_dtype`."""
    def cast(**kw):
        y, state = fn(**kw)
        return y.astype(y_dtype), state
    return cast


def _conv_shapes(backend: str, weight, shard: MeshAxes | None) -> tuple[bool, str]:
    """Whether `backend`'s conv kernel compiles for the channels each shard holds, and the shapes in words."""
    if weight.ndim != 2:
        return False, f"weight {weight.shape}"
    c, k = weight.shape
    split = 1 if shard is None else shard.size(shard.heads)
    form = Form.MOSAIC_TPU if backend == "tpu" else Form.TRITON
    per = f" over {split} shards" if split > 1 else ""
    return (c % split == 0 and _resolver.supported("causal_conv1d", form, c=c // split, k=k),
            f"c = {c} channels{per}, k = {k}")


def causal_conv1d(x, weight, bias=None, *, activation="silu", initial_state=None, seq_idx=None, impl="auto",
                  shard: MeshAxes | None = None, interpret: bool | None = None):
    """Depthwise causal conv1d; returns (y [b,l,c], conv_state [b,c,k]) in x's dtype.

    Semantics: `causal_conv1d_ref` (see `easymamba.kernels.conv1d.reference`). `shard`: channels split over
    `shard.heads`, rows over `shard.batch`; the Pallas kernel (on a TPU `causal_conv1d_tpu`) then runs per shard.
    """
    backend = _resolver.platform()
    shape_ok, shapes = _conv_shapes(backend, weight, shard)
    choice = resolve("causal_conv1d", impl, shape_ok=shape_ok, shapes=shapes, backend=backend, interpret=interpret)
    fn, form_kw = _forms(choice, _conv_pallas, _conv_tpu, _conv_xla, causal_conv1d_ref)
    args = dict(x=x, weight=weight, bias=bias, initial_state=initial_state, seq_idx=seq_idx)
    if not choice.form.is_pallas or shard is None:
        return fn(**args, activation=activation, **form_kw)
    b_, c_ = shard.batch, shard.heads
    specs = dict(x=PartitionSpec(b_, None, c_), weight=PartitionSpec(c_, None), bias=PartitionSpec(c_),
                 initial_state=PartitionSpec(b_, c_, None), seq_idx=PartitionSpec(b_, None))
    return _shard_call(lambda **kw: fn(**kw, activation=activation, **form_kw), shard, args, specs,
                       (PartitionSpec(b_, None, c_), PartitionSpec(b_, c_, None)))


def causal_conv1d_update(x, conv_state, weight, bias=None, *, activation="silu", impl="auto",
                         shard: MeshAxes | None = None, interpret: bool | None = None):
    """One decode step of the causal conv; returns (y [b,c] in x's dtype, new conv_state [b,c,k]). On a TPU
    impl="pallas" is `causal_conv1d_update_tpu`."""
    backend = _resolver.platform()
    shape_ok, shapes = _conv_shapes(backend, weight, shard)
    choice = resolve("causal_conv1d_update", impl, shape_ok=shape_ok, shapes=shapes, backend=backend,
                     interpret=interpret)
    fn, form_kw = _forms(choice, _conv_update_pallas, _conv_update_tpu, _conv_update_xla, causal_conv1d_update_ref)
    args = dict(x=x, conv_state=conv_state, weight=weight, bias=bias)
    if not choice.form.is_pallas or shard is None:
        return fn(**args, activation=activation, **form_kw)
    b_, c_ = shard.batch, shard.heads
    specs = dict(x=PartitionSpec(b_, c_), conv_state=PartitionSpec(b_, c_, None), weight=PartitionSpec(c_, None),
                 bias=PartitionSpec(c_))
    return _shard_call(lambda **kw: fn(**kw, activation=activation, **form_kw), shard, args, specs,
                       (PartitionSpec(b_, c_), PartitionSpec(b_, c_, None)))


def selective_state_update(
    state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
    impl="auto", shard: MeshAxes | None = None, interpret: bool | None = None,
):
    """One decode step of the SSD recurrence; returns (y [b,h,p], new state [b,h,p,n] in state's dtype). On a TPU
    impl="pallas" is `selective_state_update_tpu`."""
    backend = _resolver.platform()
    form = Form.MOSAIC_TPU if backend == "tpu" else Form.TRITON
    shape_ok = state.ndim == 4 and _resolver.supported("selective_state_update", form, p=state.shape[2],
                                                      n=state.shape[3])
    shapes = f"p = {state.shape[2]}, n = {state.shape[3]}" if state.ndim == 4 else f"state {state.shape}"
    choice = resolve("selective_state_update", impl, shape_ok=shape_ok, shapes=shapes, backend=backend,
                     interpret=interpret)
    fn, form_kw = _forms(choice, _state_update_pallas, _state_update_tpu, _state_update_xla, selective_state_update_ref)
    static = dict(dt_softplus=bool(dt_softplus), dt_limit=_static_limit(dt_limit), **form_kw)
    args = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if not choice.form.is_pallas or shard is None:
        return fn(**args, **static)
    b_, h_, g_ = shard.batch, shard.heads, shard.groups
    specs = dict(state=PartitionSpec(b_, h_, None, None), x=PartitionSpec(b_, h_, None), dt=PartitionSpec(b_, h_),
                 A=PartitionSpec(h_), B=PartitionSpec(b_, g_, None), C=PartitionSpec(b_, g_, None),
                 D=PartitionSpec(h_), z=PartitionSpec(b_, h_, None), dt_bias=PartitionSpec(h_))
    num_heads = state.shape[1]

    def per_shard(B, C, **rest):
        if g_ is None and h_ is not None:
            B, C = _local_groups(B, shard, num_heads), _local_groups(C, shard, num_heads)
        return fn(B=B, C=C, **rest, **static)

    return _shard_call(per_shard, shard, args, specs,
                       (PartitionSpec(b_, h_, None), PartitionSpec(b_, h_, None, None)))


def mamba2_decode_step(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight,
                       active=None, rms_input=None, *, n_groups: int, eps: float, dt_limit=(0.0, math.inf),
                       A_is_log: bool = False, y_dtype=None, rms_eps: float = 1e-5, impl: str = "auto",
                       interpret: bool | None = None):
    """A Mamba-2 layer's decode step from the in_proj output to the out_proj input (`decode_step/triton.py`'s
    docstring; operands as `decode_step_ref`). Returns (y [b, e] in y_dtype (default z's dtype), new conv_state,
    new ssm_state). `rms_input` [b, d] (optional): the block's input before its RMS norm, whose weight is folded
    into in_proj; the rows of zxbcdt are scaled by the norm's factor first (`decode_step_ref`).

    impl: "pallas" the kernel (compiled on an sm_80+ GPU, interpreted on CPU; no TPU form), "xla" the jitted
    `decode_step_ref`, "auto" the kernel where it compiles and was measured faster (GPU), else XLA; resolved by
    `resolve("decode_step", ...)`. `active` [b] bool: rows where False keep both states.
    Inside a jitted decode loop, donate the SSM state: the kernel writes it in place.
    """
    if impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"impl must be one of ('auto', 'pallas', 'xla'), got {impl!r}")
    b, _, p, n = ssm_state.shape
    choice = resolve("decode_step", impl, dims=dict(p=p, n=n, k=conv_state.shape[-1]), shapes=f"p = {p}, n = {n}, "
                     f"k = {conv_state.shape[-1]}", interpret=interpret)
    if impl == "pallas" and not choice.form.is_pallas:
        raise NotImplementedError(f"the decode-step kernel cannot run here ({choice.reason}); use impl='xla'")
    n_groups, eps, dt_limit, y_dtype = _decode_static(n_groups, eps, dt_limit, y_dtype)
    kw = dict(n_groups=n_groups, eps=eps, dt_limit=dt_limit, A_is_log=bool(A_is_log), y_dtype=y_dtype,
              rms_eps=float(rms_eps))
    if choice.form.is_pallas:
        return _decode_step_pallas(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight,
                                   active, rms_input, **kw, interpret=choice.interpret)
    return _decode_step_xla(zxbcdt, conv_state, conv_weight, conv_bias, A, D, dt_bias, ssm_state, norm_weight,
                            active, rms_input, **kw)
