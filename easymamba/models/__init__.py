"""The models: shared blocks, backbone and causal LM (`causal_lm.py`), one file per mixer kind and one per family.

`FAMILIES` below is the one list of the families easymamba builds, loads and saves; everything that depends on
the family (loaders, sharding, the cache, the effective attention) reads the family's record
(`family.ModelFamily`) through `family_of`. A new family is its own files plus one entry here
(docs/architecture.md).
"""

import jax.numpy as jnp
from flax import nnx

from easymamba.config import check_resource_bounds, hf_config_dict
from easymamba.models import (
    bamba,
    falcon_h1,
    falcon_mamba,
    granitemoehybrid,
    jamba,
    mamba1,
    mamba2,
    nemotron_h,
    zamba2,
)
from easymamba.models.bamba import BambaForCausalLM, BambaModel, HybridDecoderLayer, bamba_key_table
from easymamba.models.causal_lm import (
    IGNORE_INDEX,
    Backbone,
    CausalLM,
    Mamba2CausalLMOutput,
    Mamba2Output,
    ResidualBlock,
    causal_lm_loss,
    causal_lm_loss_sum,
    seq_idx_from_position_ids,
)
from easymamba.models.compiled import CompiledLM
from easymamba.models.falcon_h1 import FalconH1Block, FalconH1ForCausalLM, FalconH1Model, falcon_h1_key_table
from easymamba.models.falcon_mamba import (
    FalconMambaBlock,
    FalconMambaForCausalLM,
    FalconMambaMixer,
    FalconMambaModel,
    falcon_mamba_key_table,
)
from easymamba.models.attention import Attention
from easymamba.models.family import KeySpec, ModelFamily
from easymamba.models.jamba import JambaForCausalLM, JambaMambaMixer, JambaModel, jamba_key_table
from easymamba.models.granitemoehybrid import (
    GraniteMoeHybridForCausalLM,
    GraniteMoeHybridModel,
    granitemoehybrid_key_table,
)
from easymamba.models.mamba1 import MambaBlock, MambaForCausalLM, MambaModel, mamba1_key_table
from easymamba.models.mamba1_mixer import MambaMixer
from easymamba.models.mamba2 import Mamba2Block, Mamba2ForCausalLM, Mamba2Model, mamba2_key_table
from easymamba.models.mamba2_mixer import Mamba2Mixer
from easymamba.models.mlp import MLP, MoE
from easymamba.models.nemotron_h import NemotronHForCausalLM, NemotronHModel, nemotron_h_key_table
from easymamba.models.zamba2 import (
    Zamba2ForCausalLM,
    Zamba2HybridBlock,
    Zamba2MambaBlock,
    Zamba2Model,
    zamba2_key_table,
)

# The families easymamba knows, by HF `model_type`.
FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (
    mamba2.FAMILY,
    mamba1.FAMILY,
    nemotron_h.FAMILY,
    falcon_mamba.FAMILY,
    jamba.FAMILY,
    falcon_h1.FAMILY,
    bamba.FAMILY,
    granitemoehybrid.FAMILY,
    zamba2.FAMILY,
)}


def family_of(obj) -> ModelFamily:
    """The `ModelFamily` of a config, a model (its `.config`), a config or causal-LM class, or a `model_type`."""
    if isinstance(obj, str):
        if obj in FAMILIES:
            return FAMILIES[obj]
        raise ValueError(f"model_type {obj!r} is not a family easymamba builds; known: {sorted(FAMILIES)}")
    family = getattr(obj, "family", None)  # a causal LM or backbone, or its class
    if isinstance(family, ModelFamily):
        return family
    config_class = obj if isinstance(obj, type) else type(getattr(obj, "config", obj))
    for family in FAMILIES.values():
        if config_class is family.config_class:
            return family
    known = ", ".join(f"{f.causal_lm.__name__} ({f.config_class.__name__}, model_type {f.model_type!r})"
                      for f in FAMILIES.values())
    name = obj.__name__ if isinstance(obj, type) else type(obj).__name__
    raise TypeError(f"{name} is not a model or config of a family easymamba reads and writes; known: {known}")


def config_from_hf(cfg):
    """The config a `config.json` (dict, file or directory) describes, of its family's class: its `model_type`
    (or, for files without one, `easymamba.config.hf_config_dict`'s reading of the layout) names the family.
    Loaders call this, then `family_of(config)` gives the rest."""
    model_type, cfg = hf_config_dict(cfg)
    if model_type not in FAMILIES:
        known = " or ".join(f"{t!r} ({f.config_class.__name__})" for t, f in FAMILIES.items())
        raise ValueError(f"model_type ({model_type!r}) must be {known}")
    config = FAMILIES[model_type].config_class.from_hf(cfg)
    check_resource_bounds(config)  # before any caller builds or reads anything for it
    return config


def abstract_model(config, *, dtype=jnp.float32, param_dtype=jnp.float32, kernel_impl="auto"):
    """The config's causal LM with `jax.ShapeDtypeStruct` parameters: shapes and dtypes, no memory (what the
    loaders fill)."""
    causal_lm = family_of(config).causal_lm
    return nnx.eval_shape(lambda: causal_lm(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                            kernel_impl=kernel_impl))


__all__ = [
    "FAMILIES", "family_of", "config_from_hf", "abstract_model", "ModelFamily", "KeySpec", "IGNORE_INDEX",
    "Backbone", "CausalLM", "CompiledLM", "ResidualBlock",
    "Mamba2Output", "Mamba2CausalLMOutput", "causal_lm_loss", "causal_lm_loss_sum",
    "seq_idx_from_position_ids", "Mamba2Block", "Mamba2Model", "Mamba2ForCausalLM", "Mamba2Mixer", "mamba2_key_table",
    "MambaBlock", "MambaModel", "MambaForCausalLM", "MambaMixer", "mamba1_key_table",
    "Attention", "MLP", "MoE", "NemotronHModel", "NemotronHForCausalLM", "nemotron_h_key_table",
    "FalconMambaBlock", "FalconMambaModel", "FalconMambaForCausalLM", "FalconMambaMixer", "falcon_mamba_key_table",
    "JambaModel", "JambaForCausalLM", "JambaMambaMixer", "jamba_key_table",
    "FalconH1Block", "FalconH1Model", "FalconH1ForCausalLM", "falcon_h1_key_table",
    "HybridDecoderLayer", "BambaModel", "BambaForCausalLM", "bamba_key_table",
    "GraniteMoeHybridModel", "GraniteMoeHybridForCausalLM", "granitemoehybrid_key_table",
    "Zamba2MambaBlock", "Zamba2HybridBlock", "Zamba2Model", "Zamba2ForCausalLM", "zamba2_key_table",
]
