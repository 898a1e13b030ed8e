"""What every block kind shares: hook points, row holding for the decode loop, input checks, the dt init."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easymamba.kernels import check_row_mask
from easymamba.layers import is_concrete
from easymamba.sharding import constrain_spec

__all__ = ["HookValue", "sow_hook", "init_dt_bias", "check_active_rows", "hold_rows", "check_attention_mask",
           "SSMViewMixer"]


class HookValue(nnx.Intermediate):
    """An activation recorded at a `hook_*` point; `easymamba.interp.run_with_cache` is what asks for them."""


def sow_hook(module: nnx.Module, name: str, value) -> None:
    """Record `value` (an array, or a zero-argument function returning one) as `name` on `module`, but only
    when `run_with_cache` requested that hook (it marks `module.__hooks__` on the copy of the model it runs).
    Otherwise nothing happens and nothing is traced: the forward without hooks is op for op the
    forward before hooks existed. A function is called only when requested, so a hook that needs extra math
    (`hook_dt`) costs nothing unless asked for.
    """
    if name in getattr(module, "__hooks__", ()):
        module.sow(HookValue, name, value() if callable(value) else value,
                   reduce_fn=lambda _, new: new, init_fn=lambda: None)


def _inverse_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


def init_dt_bias(key, num_heads: int, config, dtype) -> jax.Array:
    """HF/mamba_ssm: dt log-uniform in [time_step_min, time_step_max], floored, stored as softplus^-1(dt)."""
    lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = jnp.exp(jax.random.uniform(key, (num_heads,), jnp.float32) * (hi - lo) + lo)
    dt = jnp.maximum(dt, config.time_step_floor)
    return _inverse_softplus(dt).astype(dtype)


def norm_folded(decode_weights) -> bool:
    """Whether a mixer's prepared decode weights hold its block's RMS norm (`Mamba2Mixer.decode_weights(pre_norm=)`):
    the block then hands the mixer its input un-normalised, and the fused decode step normalises."""
    return isinstance(decode_weights, dict) and "rms_eps" in decode_weights


def check_active_rows(active_rows, b: int, conv_state) -> None:
    """A mixer's `active_rows`: (b,) bool, and only with states to hold."""
    if active_rows is None:
        return
    if conv_state is None:
        raise ValueError("active_rows holds rows of a cache: pass it with conv_state and ssm_state")
    check_row_mask(active_rows, b, "active_rows")


def hold_rows(active_rows, old_states, new_states):
    """The new states, except the rows where `active_rows` is False, which keep the old ones (a finished row of a
    batch that generation keeps stepping). One `where` per state: in the op-by-op decode step XLA fuses it into
    the state update's own pass; the fused decode kernel holds the rows itself instead."""
    if active_rows is None:
        return new_states
    return tuple(jnp.where(active_rows.reshape((-1,) + (1,) * (new.ndim - 1)), new, old.astype(new.dtype))
                 for old, new in zip(old_states, new_states))


def check_attention_mask(mask, b: int, l: int):
    """`attention_mask` (b, >= l) of 0/1 (checked when concrete), as the model calls take it."""
    if mask.ndim != 2 or mask.shape[0] != b or mask.shape[1] < l:
        raise ValueError(f"attention_mask must have shape (batch={b}, seq_len>={l}), got {mask.shape}")
    if is_concrete(mask):
        values = np.unique(np.asarray(mask))
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"attention_mask must hold only 0 and 1, found values {values.tolist()[:8]}")
    return mask


def as_array(x, name: str):
    """`x` as an array: arrays (jax, numpy, tracers) as they are, array-likes (nested lists, tuples) through
    `np.asarray`, as `generate` takes them; anything that is not numeric is a `ValueError` naming `name`."""
    if x is None or (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
        return x
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be an array of shape (batch, seq_len) or a nested list of numbers; "
                         f"{type(x).__name__} does not convert: {exc}") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must hold numbers; got {type(x).__name__} of dtype {arr.dtype}")
    return arr


def check_left_padded(mask) -> None:
    """Refuse an `attention_mask` (b, L) that is not left padding (zeros, then ones to the last column) when
    it is concrete; under jit (a tracer) nothing is checked. A model call that continues or fills a cache reads
    each row's state after its last column: a row ending in padding would hand on a state and next-token logits
    that belong to no real token, so it is refused as `generate` refuses it."""
    if not is_concrete(mask) or mask.ndim != 2 or mask.shape[1] == 0:
        return  # a tracer is left unchecked; a wrong shape is check_attention_mask's to name
    mask = np.asarray(mask).astype(np.int64)
    bad = np.flatnonzero((np.diff(mask, axis=1) < 0).any(axis=1) | (mask[:, -1] == 0))
    if bad.size:
        raise ValueError(f"attention_mask with a cache must be left padding (zeros, then ones to the end), as "
                         f"generate takes it; row {int(bad[0])} is {mask[bad[0]].tolist()[:16]}")


class SSMViewMixer:
    """The mixer protocol of `easymamba.models.causal_lm.ResidualBlock` for an SSM mixer (Mamba-2, Mamba-1): the
    layer's cache view holds its conv window and SSM state; `run` / `run_step` read them (pinned to the cache's
    layout: a while_loop carry must keep it) and return the view renewed, in the cache's dtypes and layout.

    A mixer using it offers `__call__(hidden, attention_mask=, conv_state=, ssm_state=) -> (out, states)`,
    `step(hidden (b, 1, d), conv_state, ssm_state, attention_mask=, active_rows=, decode_weights=)` and
    `mesh_rules`.
    """

    def run(self, hidden, view, *, attention_mask=None, seq_idx=None, **_):
        """A sequence (b, l, d) with the layer's view (or None) -> (out (b, l, d), the renewed view or None).
        `seq_idx` (b, l) int: packed sequences (mixers whose class sets `PACKED`)."""
        if seq_idx is None:
            out, states = self(hidden, attention_mask=attention_mask, **self._states_in(view))
        else:
            if not getattr(self, "PACKED", False):
                raise ValueError(f"{type(self).__name__} does not take packed sequences (seq_idx); run each "
                                 f"sequence as its own row")
            out, states = self(hidden, attention_mask=attention_mask, seq_idx=seq_idx, **self._states_in(view))
        return out, self._view_out(view, states)

    def run_step(self, hidden, view, *, attention_mask=None, active_rows=None, decode_weights=None, **_):
        """One token (b, 1, d) with the layer's view -> (out (b, 1, d), the renewed view)."""
        states = self._states_in(view)
        out, states = self.step(hidden, states["conv_state"], states["ssm_state"], attention_mask=attention_mask,
                                active_rows=active_rows, decode_weights=decode_weights)
        return out, self._view_out(view, states)

    def _states_in(self, view) -> dict:
        if view is None:
            return {"conv_state": None, "ssm_state": None}
        conv_spec, ssm_spec = view.partition_specs[:2]
        return {"conv_state": constrain_spec(view.conv_states, self.mesh_rules, conv_spec),
                "ssm_state": constrain_spec(view.ssm_states, self.mesh_rules, ssm_spec)}

    def _view_out(self, view, states):
        if view is None:
            return None
        conv_state, ssm_state = states
        conv_spec, ssm_spec = view.partition_specs[:2]
        return view.replace(
            conv_states=constrain_spec(conv_state.astype(view.conv_states.dtype), self.mesh_rules, conv_spec),
            ssm_states=constrain_spec(ssm_state.astype(view.ssm_states.dtype), self.mesh_rules, ssm_spec))
