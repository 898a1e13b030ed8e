"""The GPU Pallas SSD, `ssd_pallas`: one fused forward kernel and its custom VJP, same contract as `ssd_chunked`.

The forward has two forms, chosen by `easymamba.kernels.resolver` (through `default_config`): the Triton form
(`triton.py`, whose docstring states the algorithm; any NVIDIA GPU of sm_80 or newer, and Pallas' interpreter
anywhere) and the Mosaic GPU form (`mosaic_gpu.py`, TMA + wgmma, Hopper, bf16 / f16). Both take the same operands
prepared here: dt processed and the chunk-local cumsum of dt A in XLA, the sequence padded to the kernel's chunk.

The custom VJP's backward is the Pallas backward of `triton_bwd.py` (a state pass and a reverse walk over chunks,
derivation in that module's docstring); `backward="reference"` (or a shape the compiled backward does not handle,
`ssd_backward_supported`) takes `jax.vjp` of `ssd_chunked` instead.

`interpret` is an argument of every function here, threaded down to each `pallas_call` (None: compiled on a GPU,
interpreted elsewhere).
"""

import functools
import math

import jax
import jax.numpy as jnp

from easymamba.kernels import pallas_util as pu
from easymamba.kernels import resolver
from easymamba.kernels.ssd_scan.mosaic_gpu import MosaicSSDConfig, mgpu_dims, mgpu_supported, ssd_forward_mgpu
from easymamba.kernels.ssd_scan.reference import _check_ssd_args, _process_dt, _segment_ids, ssd_chunked_vjp
from easymamba.kernels.ssd_scan.triton import SSDBlockConfig, forward_triton, kernel_dims, ssd_supported
from easymamba.kernels.ssd_scan.triton_bwd import (
    SSDBackwardConfig,
    backward_dims,
    default_backward_config,
    ssd_backward_pallas,
    ssd_backward_supported,
)

__all__ = ["ssd_pallas", "SSDBlockConfig", "MosaicSSDConfig", "SSDBackwardConfig", "default_config", "ssd_supported",
           "mosaic_gpu_here"]

BACKWARDS = ("pallas", "reference")


def default_config(l: int, p: int, n: int, dtype, *, interpret: bool | None = None):
    """The kernel form and tiles `ssd_pallas` uses when given no config, for length l, head dim p, state size n
    and operand dtype `dtype`; the form is `resolver.gpu_form`'s, the resolver's answer (easymamba/kernels/resolver.py).

    On a Hopper GPU (sm_90), compiled, for bf16 / f16 operands the Mosaic GPU form takes (`mgpu_supported`):
    `MosaicSSDConfig()`, measured 0.80-0.97x the Triton form's time at the four benchmark shapes
    (docs/benchmarks.md). Everywhere else the Triton form, measured on an H100: q 64 and 4 warps; 2 pipeline
    stages up to l 4096, 3 above (at l 8192 two stages cost 1.1-1.5x, at l 2048 three stages cost 1.1x).
    """
    form = resolver.gpu_form("ssd", dict(p=p, n=n, dtype=dtype), interpret=pu.default_interpret(interpret))
    if form is resolver.Form.MOSAIC_GPU:
        return MosaicSSDConfig()
    return SSDBlockConfig(block_q=64, num_warps=4, num_stages=2 if l <= 4096 else 3)


def mosaic_gpu_here(interpret: bool | None = None) -> bool:
    """Whether the Mosaic GPU form compiles here: kernels compiled (not interpreted) on a Hopper GPU (wgmma is
    sm_90 only)."""
    cap = pu.gpu_capability()
    return not pu.default_interpret(interpret) and cap is not None and cap[0] == 9


def _forward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, *, dt_softplus, dt_limit, y_dtype, config,
             interpret):
    b, l, h, p = x.shape
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    q = config.block_q
    pad = (-l) % q
    lp = l + pad
    nchunks = lp // q

    def pad_l(a):
        return a if pad == 0 else jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

    # dt processing and the chunk-local cumsum in XLA: [b, lp, h] float32 each (padded dt = 0: a no-op step)
    dtp = pad_l(_process_dt(dt, dt_bias, dt_softplus, dt_limit, cdtype))  # [b, lp, h]
    acum = jnp.cumsum((dtp * A.astype(cdtype)).reshape(b, nchunks, q, h), axis=2).reshape(b, lp, h)
    seg = None
    if seq_idx is not None:
        seg = _segment_ids(seq_idx).astype(jnp.int32)
        seg = seg if pad == 0 else jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")  # padding joins the last segment
    x, B, C, z = pad_l(x), pad_l(B), pad_l(C), None if z is None else pad_l(z)
    if isinstance(config, MosaicSSDConfig):
        y, final_state = ssd_forward_mgpu(x, dtp, acum, B, C, D, z, initial_state, seg, y_dtype=y_dtype,
                                          config=config, interpret=interpret)
    else:
        y, final_state = forward_triton(x, dtp, acum, B, C, D, z, initial_state, seg, y_dtype=y_dtype,
                                        config=config, interpret=interpret)
    return (y if pad == 0 else y[:, :l]), final_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static):
    dt_softplus, dt_limit, y_dtype, config, _, _, interpret = static
    return _forward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus=dt_softplus,
                    dt_limit=dt_limit, y_dtype=y_dtype, config=config, interpret=interpret)


def _ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static):
    out = _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static)
    return out, (x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)


def _ssd_bwd(static, residuals, cotangents):
    dt_softplus, dt_limit, y_dtype, _, chunk_size, backward, interpret = static
    *diff, seq_idx = residuals
    if backward != "reference":
        grads = _pallas_grads(diff, seq_idx, cotangents, backward, dt_softplus=dt_softplus, dt_limit=dt_limit,
                              interpret=interpret)
        if grads is not None:
            return (*grads, None)
    return ssd_chunked_vjp(diff, seq_idx, cotangents, chunk_size=chunk_size, dt_softplus=dt_softplus,
                           dt_limit=dt_limit, y_dtype=y_dtype)


def _pallas_grads(diff, seq_idx, cotangents, config, *, dt_softplus, dt_limit, interpret):
    """The backward kernels' gradients of (x, dt, A, B, C, D, z, dt_bias, initial_state), at the kernels' sizes
    (`backward_dims`: the forward's form may have run at others, e.g. head dim 80 at 80 in the Mosaic form, which
    the backward runs at 128, or at 80 in blocks) and sliced back; None for a shape they do not compile."""
    x, dt, A, B, C, D, z, dt_bias, init = diff
    p, n = x.shape[3], B.shape[3]
    kp, kn = backward_dims(p, n, config)
    if not (interpret or ssd_backward_supported(min(kp, config.block_p or kp), kn)):
        return None
    dy, dfinal = cotangents
    if (kp, kn) != (p, n):
        x, z, B, C, init = _pad_operands(x, z, B, C, init, kp, kn)
        dy, dfinal = _pad_last(dy, kp), _pad_state(dfinal, kp, kn)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = ssd_backward_pallas(
        x, dt, A, B, C, D, z, dt_bias, init, seq_idx, dy, dfinal, dt_softplus=dt_softplus, dt_limit=dt_limit,
        config=config, interpret=interpret)
    return (dx[..., :p], ddt, dA, dB[..., :n], dC[..., :n], dD, None if dz is None else dz[..., :p], ddt_bias,
            None if dinit is None else dinit[:, :, :p, :n])


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int = 256,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit=(0.0, math.inf),
    initial_state=None,
    seq_idx=None,
    y_dtype=None,
    config: SSDBlockConfig | None = None,
    backward: str = "pallas",
    backward_config: SSDBackwardConfig | None = None,
    interpret: bool | None = None,
):
    """The SSD forward as one fused Pallas kernel; same contract as `ssd_chunked` (shapes, dt rules, seq_idx,
    any l), returning (y [b, l, h, p], final_state [b, h, p, n]).

    y comes back in `y_dtype` (default: the compute dtype promote(x, float32), as the references do; pass
    x.dtype to halve the output bytes as mamba_ssm does); final_state in the compute dtype. `chunk_size` only
    sets the chunking of the backward (the reference's); the kernel's own chunk is `config.block_q`. The config's
    type picks the form: `SSDBlockConfig` the Triton form, `MosaicSSDConfig` the Mosaic GPU form (Hopper, bf16 /
    f16); None takes `default_config`, which picks the Mosaic form where it compiles.

    Gradients: `backward="pallas"` (default) runs the backward kernels of `triton_bwd.py` with
    `backward_config` (`default_backward_config(l)` when None), falling back to the reference VJP for shapes the
    compiled backward does not handle; `backward="reference"` always takes `jax.vjp` of `ssd_chunked`.

    `interpret`: run the kernels in Pallas' interpreter (any backend, any shape); None: compiled on a GPU,
    interpreted elsewhere.
    """
    interpret = pu.default_interpret(interpret)
    _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_limit)
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    y_dtype = jnp.dtype(cdtype if y_dtype is None else y_dtype)
    p, n = x.shape[3], B.shape[3]
    if config is None:
        config = default_config(x.shape[1], p, n, x.dtype, interpret=interpret)
    if isinstance(config, MosaicSSDConfig) and not mgpu_supported(p, n, x.dtype, config):
        raise ValueError(
            f"the Mosaic GPU SSD form (MosaicSSDConfig) takes bf16 / f16 x with head_dim <= 128, a state size "
            f"that rounds up to a power of two of 64 to 256 and head_dim x state <= 128 x 128 (rounded up: "
            f"`mgpu_dims`); got x {x.dtype}, head_dim {p}, state size {n}"
        )
    if backward == "pallas":
        backward = default_backward_config(x.shape[1]) if backward_config is None else backward_config
    static = (bool(dt_softplus), (float(dt_limit[0]), float(dt_limit[1])), y_dtype, config, int(chunk_size),
              backward, interpret)
    # the forward form's sizes: powers of two for the Triton form (`kernel_dims`), multiples of 16 for head dims
    # in the Mosaic form with `native_head_dim` (`mgpu_dims`: head dim 80 runs at 80); the backward pads further
    # where it must
    kp, kn = mgpu_dims(p, n, config) if isinstance(config, MosaicSSDConfig) else kernel_dims(p, n)
    if (kp, kn) == (p, n):
        return _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static)
    # Run at the kernels' sizes (exact, zero columns stay zero); autodiff slices the gradients back.
    x, z, B, C, initial_state = _pad_operands(x, z, B, C, initial_state, kp, kn)
    y, final_state = _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, static)
    return y[..., :p], final_state[:, :, :p, :n]


def _pad_last(a, size):
    """`a` zero-padded at the end of its last axis to `size`."""
    return a if a.shape[-1] == size else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, size - a.shape[-1])])


def _pad_operands(x, z, B, C, initial_state, kp, kn):
    """x and z zero-padded along the head dim to kp, B and C along the state to kn, the state [b, h, p, n] both
    ways (z and the state may be None)."""
    return (_pad_last(x, kp), None if z is None else _pad_last(z, kp), _pad_last(B, kn), _pad_last(C, kn),
            None if initial_state is None else _pad_state(initial_state, kp, kn))


def _pad_state(s, kp, kn):
    """A state [b, h, p, n] zero-padded to [b, h, kp, kn]."""
    return jnp.pad(s, [(0, 0), (0, 0), (0, kp - s.shape[2]), (0, kn - s.shape[3])])
