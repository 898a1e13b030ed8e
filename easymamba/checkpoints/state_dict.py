"""In-memory state dicts: `load_state_dict` copies HF-named tensors into a model, `state_dict` reads them
back out, both through the family's key table (the same table `from_pretrained` and `save_pretrained` read,
so the directions cannot drift apart)."""

import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from easymamba.checkpoints.checks import check_source
from easymamba.checkpoints.errors import NonFiniteWeightWarning
from easymamba.models import family_of
from easymamba.checkpoints.layout import param_at, read_flax, split_parts, to_flax_layout, to_hf_layout
from easymamba.checkpoints.sources import DictSource


def load_state_dict(model, state_dict: Mapping, *, strict: bool = True) -> None:
    """Copy an HF-named state dict (torch tensors or arrays) into `model`'s parameters, in place.

    Every tensor is checked (names, shapes, dtypes, tied head) before any parameter is written, so a bad
    state dict raises `CheckpointError` and leaves the model untouched. A tied model accepts a redundant
    `lm_head.weight` equal to the embedding. `strict=False` ignores unexpected tensors.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of HF tensor names to tensors (model.state_dict()); got "
                        f"{type(state_dict).__name__}")
    src = DictSource(state_dict, "the state dict")
    plan = check_source(model, src, "the model's config", strict=strict)
    staged, stacked, nonfinite = [], {}, []
    for spec in family_of(model).key_table(model.config):
        value = to_flax_layout(spec.kind, src.read(plan[spec.hf_name]))
        if not np.isfinite(np.asarray(value)).all():
            nonfinite.append(plan[spec.hf_name])
        if spec.index is not None:  # one entry of a stacked parameter: staged once all its entries are read
            entries = stacked.setdefault(spec.path, [])
            entries.append(np.asarray(value))
            param = param_at(model, spec.path)
            if len(entries) == param.shape[0]:
                staged.append((param, _like(param, np.stack(entries).astype(param.dtype))))
            continue
        for path, part in split_parts(spec, value):
            param = param_at(model, path)
            staged.append((param, _like(param, np.asarray(part).astype(param.dtype))))
    if nonfinite:  # as from_pretrained: loaded, and said once
        more = f" (and {len(nonfinite) - 8} more)" if len(nonfinite) > 8 else ""
        warnings.warn(f"the state dict: tensor(s) hold NaN or infinity (expected finite weights; the model's outputs "
                      f"may be NaN): {'; '.join(nonfinite[:8])}{more}", NonFiniteWeightWarning, stacklevel=2)
    for param, value in staged:
        param[...] = value


def _like(param, value: np.ndarray) -> jax.Array:
    """`value` placed as `param` is: a sharded parameter stays sharded when it is overwritten."""
    sharding = getattr(param[...], "sharding", None)
    if isinstance(sharding, NamedSharding):
        return jax.device_put(value, sharding)
    return jnp.asarray(value)


def state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays under HF names and layouts (tied models have no lm_head)."""
    return {spec.hf_name: to_hf_layout(spec.kind, read_flax(model, spec))
            for spec in family_of(model).key_table(model.config)}


__all__ = ["load_state_dict", "state_dict"]
