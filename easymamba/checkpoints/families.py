"""The model-family record: the one place the checkpoint layer learns which config, model class, key table
and mixer checks belong together. Every other module of `easymamba.checkpoints` asks here (`FAMILIES`,
`family_of`, `abstract_model`), so the record can be replaced in this file alone.

    "mamba2"   Mamba2Config  Mamba2ForCausalLM   mamba2_key_table   (easymamba.model)
    "mamba"    MambaConfig   MambaForCausalLM    mamba1_key_table   (easymamba.mamba1)
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from easymamba.checkpoints.keys import mamba2_key_table
from easymamba.checkpoints.layout import KeySpec, as_key_specs
from easymamba.checkpoints.mixer_facts import mamba1_mixer_facts, mamba2_mixer_facts
from easymamba.config import Mamba2Config, MambaConfig
from easymamba.mamba1 import MambaForCausalLM, mamba1_key_table
from easymamba.model import Mamba2ForCausalLM


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the checkpoint code needs to know about one model family; everything else is shared.

    model_type    HF's `config.json` `model_type` ("mamba2", "mamba"); also the config class's `model_type`
    config_class  the frozen config dataclass (`from_hf`, `to_json_string`)
    model_class   the causal LM built from it (`logical_axes` for sharding, `init_cache` for decoding)
    key_table     config -> every HF tensor as a `KeySpec`, in HF's `state_dict()` order
    mixer_facts   (config, shape_of) -> (field, config value, tensor, implied value) for each mixer size that
                  the layer-0 tensors contradict (the embedding, layer count, biases and head are shared)
    """

    model_type: str
    config_class: type
    model_class: type
    key_table: Callable[[object], list[KeySpec]]
    mixer_facts: Callable


FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (
    ModelFamily("mamba2", Mamba2Config, Mamba2ForCausalLM, mamba2_key_table, mamba2_mixer_facts),
    ModelFamily("mamba", MambaConfig, MambaForCausalLM, lambda config: as_key_specs(mamba1_key_table(config)),
                mamba1_mixer_facts),
)}


def family_of(obj) -> ModelFamily:
    """The `ModelFamily` of a config, a model (by its `.config`), or a config or causal-LM class."""
    # A class by its nearest family base (MambaForCausalLM subclasses Mamba2ForCausalLM); anything else by its
    # config's class.
    bases = obj.__mro__ if isinstance(obj, type) else type(getattr(obj, "config", obj)).__mro__
    for base in bases:
        for family in FAMILIES.values():
            if base in (family.model_class, family.config_class):
                return family
    known = ", ".join(f"{f.model_class.__name__} ({f.config_class.__name__}, model_type {f.model_type!r})"
                      for f in FAMILIES.values())
    name = obj.__name__ if isinstance(obj, type) else type(obj).__name__
    raise TypeError(f"{name} is not a model or config of a family easymamba reads and writes; known: {known}")


def abstract_model(config, *, dtype=jnp.float32, param_dtype=jnp.float32, kernel_impl="auto"):
    """The config's causal LM (`Mamba2ForCausalLM` or `MambaForCausalLM`) with `jax.ShapeDtypeStruct`
    parameters: shapes and dtypes, no memory."""
    model_class = family_of(config).model_class
    return nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                              kernel_impl=kernel_impl))


__all__ = ["FAMILIES", "ModelFamily", "abstract_model", "family_of"]
