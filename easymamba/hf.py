"""Hugging Face state dicts in and out of the flax model, through one declarative key table.

The table maps each HF tensor name to the module path that holds it and a layout transform:

    linear  torch `[out, in]`   <->  flax kernel `[in, out]`   (transpose)
    conv    torch `[c, 1, k]`   <->  flax `[c, k]`             (drop the channel-group axis)
    copy    same layout

Both directions (`load_state_dict`, `state_dict`) read the same table, so they cannot drift apart. The file
and directory loaders (`from_pretrained`, `save_pretrained`, sharded safetensors, the state-spaces layout) are
built on these two functions.
"""

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from easymamba.config import Mamba2Config

# HF renames the original state-spaces name on load (`Mamba2Model.load_hook`); we accept both.
LEGACY_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


@dataclasses.dataclass(frozen=True)
class KeySpec:
    hf_name: str        # e.g. "backbone.layers.3.mixer.in_proj.weight"
    path: tuple         # attribute path in the flax model, ints index nnx.List
    kind: str           # "linear" | "conv" | "copy"


def mamba2_key_table(config: Mamba2Config) -> list[KeySpec]:
    """Every tensor a `Mamba2ForCausalLM` with this config has, in HF's naming and order."""
    table = [KeySpec("backbone.embeddings.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i in range(config.num_hidden_layers):
        hf = f"backbone.layers.{i}."
        at = ("backbone", "layers", i)
        table.append(KeySpec(hf + "norm.weight", at + ("norm", "weight"), "copy"))
        mixer = at + ("mixer",)
        table.append(KeySpec(hf + "mixer.in_proj.weight", mixer + ("in_proj", "kernel"), "linear"))
        if config.use_bias:
            table.append(KeySpec(hf + "mixer.in_proj.bias", mixer + ("in_proj", "bias"), "copy"))
        table.append(KeySpec(hf + "mixer.conv1d.weight", mixer + ("conv1d", "weight"), "conv"))
        if config.use_conv_bias:
            table.append(KeySpec(hf + "mixer.conv1d.bias", mixer + ("conv1d", "bias"), "copy"))
        for name in ("dt_bias", "A_log", "D"):
            table.append(KeySpec(hf + f"mixer.{name}", mixer + (name,), "copy"))
        table.append(KeySpec(hf + "mixer.norm.weight", mixer + ("norm", "weight"), "copy"))
        table.append(KeySpec(hf + "mixer.out_proj.weight", mixer + ("out_proj", "kernel"), "linear"))
        if config.use_bias:
            table.append(KeySpec(hf + "mixer.out_proj.bias", mixer + ("out_proj", "bias"), "copy"))
    table.append(KeySpec("backbone.norm_f.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return table


def to_flax_layout(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array[:, 0, :]
    return array


def to_hf_layout(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array[:, None, :]
    return array


def hf_shape(kind: str, flax_shape: tuple) -> tuple:
    if kind == "linear":
        return tuple(reversed(flax_shape))
    if kind == "conv":
        return (flax_shape[0], 1, flax_shape[1])
    return tuple(flax_shape)


def _param_at(model, path) -> nnx.Param:
    obj = model
    for step in path:
        obj = obj[step] if isinstance(step, int) else getattr(obj, step)
    return obj


def to_numpy(value) -> np.ndarray:
    """A torch tensor, jax array or numpy array as numpy (torch bfloat16 via float32, exactly)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def load_state_dict(model, state_dict: Mapping, *, strict: bool = True) -> None:
    """Copy an HF-named state dict (torch tensors or arrays) into `model`'s parameters, in place.

    Every tensor is checked (names, shapes) before any parameter is written, so a bad state dict leaves the
    model untouched. A tied model accepts and ignores a redundant `lm_head.weight`.
    """
    table = mamba2_key_table(model.config)
    sd = {LEGACY_RENAMES.get(k, k): v for k, v in state_dict.items()}
    expected = {spec.hf_name for spec in table}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing:
        raise KeyError(f"state dict is missing {len(missing)} tensor(s): {sorted(missing)[:8]}")
    if unexpected and strict:
        raise KeyError(f"state dict has {len(unexpected)} unexpected tensor(s): {sorted(unexpected)[:8]}")

    staged = []
    for spec in table:
        param = _param_at(model, spec.path)
        value = to_numpy(sd[spec.hf_name])
        want = hf_shape(spec.kind, param.shape)
        if tuple(value.shape) != want:
            raise ValueError(f"tensor {spec.hf_name}: expected shape {want} for this config, found {tuple(value.shape)}")
        staged.append((param, jnp.asarray(to_flax_layout(spec.kind, value), dtype=param.dtype)))
    for param, value in staged:
        param[...] = value


def state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays under HF names and layouts (tied models have no lm_head)."""
    return {spec.hf_name: to_hf_layout(spec.kind, np.asarray(_param_at(model, spec.path)[...]))
            for spec in mamba2_key_table(model.config)}
