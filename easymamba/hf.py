"""Hugging Face checkpoints in and out of the flax models, through one declarative key table per model family.

Two families, one code path: `FAMILIES` maps HF's `model_type` to a `ModelFamily` record naming the config
class, the causal-LM class, its key table and its config-versus-tensor checks:

    "mamba2"   Mamba2Config  Mamba2ForCausalLM   mamba2_key_table   (easymamba.model)
    "mamba"    MambaConfig   MambaForCausalLM    mamba1_key_table   (easymamba.mamba1)

`config.json` decides the family (`easymamba.config.config_from_hf`: `model_type`, or for the original
state-spaces layout `ssm_cfg.layer`); everything after that (checks, streaming, sharding, saving) is the same
code reading the family's record. The sharding table is the model class's own `logical_axes`
(`easymamba.sharding`).

The key table maps each HF tensor name to the module path that holds it and a layout transform:

    linear  torch `[out, in]`   <->  flax kernel `[in, out]`   (transpose)
    conv    torch `[c, 1, k]`   <->  flax `[c, k]`             (drop the channel-group axis)
    copy    same layout

and, for the tensors HF packs, how they split into the model's parameters (`KeySpec.parts`):

    mixer.in_proj.weight / .bias  [z | x | B | C | dt]  <->  in_proj.{z,x,B,C,dt}.kernel / .bias
    mixer.conv1d.weight / .bias   [x | B | C]           <->  conv1d.{x,B,C}.weight / .bias

(Mamba-2 only: split on load, concatenated on save: the flax model keeps the parts apart so a mesh can shard
heads and groups independently, docs/sharding.md. Mamba-1 keeps HF's tensors whole.)

Every direction reads the same table, so they cannot drift apart: `load_state_dict` / `state_dict` (in-memory
dicts), `from_pretrained` (a directory) and `save_pretrained` (a directory transformers loads).

`from_pretrained(path)` reads a local directory:
- `config.json` in HF form (`model_type` "mamba2" or "mamba"), or in the original state-spaces/mamba_ssm form
  (`d_model`, `n_layer`, `ssm_cfg`; `ssm_cfg.layer` "Mamba2", else Mamba-1); the config classes read both and
  pad the vocabulary to `pad_vocab_size_multiple`, as the checkpoint's embedding already is. Any other
  `model_type` is refused with a `CheckpointError` naming the file and the two it reads;
- weights, the first found of `model.safetensors`, `model.safetensors.index.json` (shards),
  `pytorch_model.bin`, `pytorch_model.bin.index.json`. The original `backbone.embedding.weight` is renamed
  to HF's `backbone.embeddings.weight` (`LEGACY_RENAMES`), as transformers' load hook does.

Choices:
- Safetensors are read with our own numpy reader (`easymamba.safetensors_io`), so they load without torch,
  bfloat16 included (via ml_dtypes). A `pytorch_model.bin` is a pickle: it is opened only through
  `torch.load(..., weights_only=True, map_location="cpu")`, and only if torch is installed.
- No random initialisation and no second copy of the model: the model is built abstractly
  (`nnx.eval_shape`), every tensor is checked against the config before any is read (names, shapes, dtypes,
  and config fields that contradict the shapes), then tensors stream one at a time from the memory-mapped
  file into their parameter, and the model is assembled (`nnx.merge`) only at the end. Any failure raises
  before a model exists: nothing is ever half-loaded.
- `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters; both default to float32,
  whatever the checkpoint holds (a bfloat16 checkpoint is upcast exactly unless `param_dtype=jnp.bfloat16`).
- With `mesh`, each parameter is placed directly as `NamedSharding(mesh, spec)`, each device's slice read
  from the file on its own (`jax.make_array_from_callback`), so no parameter is ever whole in host memory
  (a packed HF tensor is cut into its parts as views of the mapping, never copied whole). By default `spec`
  comes from the sharding rules (`easymamba.sharding`, `rules=` to change them) and the model knows its mesh
  afterwards (sharded activations, cache and kernels); an explicit `shardings(path) -> PartitionSpec | None`
  hook replaces the rules, where `path` is the parameter's module path
  (`("backbone", "layers", 3, "mixer", "in_proj", "x", "kernel")`) and `None` means replicated `P()`.
- Tied models: a checkpoint without `lm_head.weight` uses the embedding; one whose `lm_head.weight` equals the
  embedding is accepted; one whose `lm_head.weight` differs is refused, since the tied model would differ.
- Every problem raises `CheckpointError` (a `ValueError`) naming the file and the tensor.
- `save_pretrained` writes `config.json` and safetensors in the parameters' own dtype with
  `{"format": "pt"}` metadata, sharded with an index above `max_shard_size`; tied models carry no
  `lm_head.weight`, as transformers writes them. Parameters are fetched to the host one at a time.
"""

import dataclasses
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from easymamba.config import Mamba2Config, MambaConfig, config_from_hf
from easymamba.mamba1 import MambaForCausalLM, mamba1_key_table
from easymamba.model import Mamba2ForCausalLM
from easymamba.sharding import ShardingRules, attach, param_rules
from easymamba.safetensors_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    CheckpointError,
    SafetensorsCheckpoint,
    TensorToWrite,
    dtype_code,
    write_sharded,
)

# HF renames the original state-spaces name on load (`Mamba2Model.load_hook`); we accept both.
LEGACY_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
FLOAT_CODES = ("F64", "F32", "F16", "BF16")

# parameter path -> PartitionSpec, or None for replicated; see the module docstring.
ShardingHook = Callable[[tuple], "PartitionSpec | None"]
# progress(done, total, tensor name), called after each tensor is read or written.
ProgressHook = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    hf_name: str        # e.g. "backbone.layers.3.mixer.norm.weight"
    path: tuple         # attribute path in the flax model, ints index nnx.List; () for a packed tensor
    kind: str           # "linear" | "conv" | "copy"
    # A tensor HF packs: (module path, length) of each part along the packed axis, in HF's order. The packed
    # axis is HF's first (out features, channels), i.e. the flax kernel's last axis for "linear".
    parts: tuple[tuple[tuple, int], ...] = ()

    @property
    def targets(self) -> tuple[tuple, ...]:
        """The module paths of the parameters this HF tensor fills (one, or one per part)."""
        return tuple(path for path, _ in self.parts) if self.parts else (self.path,)


def _packed(hf_name: str, kind: str, at: tuple, leaf: str, sizes: dict[str, int]) -> KeySpec:
    return KeySpec(hf_name, (), kind, tuple((at + (name, leaf), size) for name, size in sizes.items()))


def mamba2_key_table(config: Mamba2Config) -> list[KeySpec]:
    """Every tensor a `Mamba2ForCausalLM` with this config has, in HF's naming and order."""
    e, h, gn = config.intermediate_size, config.num_heads, config.n_groups * config.state_size
    in_parts = {"z": e, "x": e, "B": gn, "C": gn, "dt": h}
    conv_parts = {"x": e, "B": gn, "C": gn}
    table = [KeySpec("backbone.embeddings.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i in range(config.num_hidden_layers):
        hf = f"backbone.layers.{i}."
        at = ("backbone", "layers", i)
        table.append(KeySpec(hf + "norm.weight", at + ("norm", "weight"), "copy"))
        mixer = at + ("mixer",)
        table.append(_packed(hf + "mixer.in_proj.weight", "linear", mixer + ("in_proj",), "kernel", in_parts))
        if config.use_bias:
            table.append(_packed(hf + "mixer.in_proj.bias", "copy", mixer + ("in_proj",), "bias", in_parts))
        table.append(_packed(hf + "mixer.conv1d.weight", "conv", mixer + ("conv1d",), "weight", conv_parts))
        if config.use_conv_bias:
            table.append(_packed(hf + "mixer.conv1d.bias", "copy", mixer + ("conv1d",), "bias", conv_parts))
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


def _packed_axis(kind: str) -> int:
    """The flax axis along which a packed tensor's parts sit (HF's first axis in flax layout)."""
    return -1 if kind == "linear" else 0


def flax_shape(model, spec: KeySpec) -> tuple:
    """The flax-layout shape of `spec`'s tensor in `model` (the parts joined along the packed axis)."""
    if not spec.parts:
        return tuple(_param_at(model, spec.path).shape)
    shapes = [list(_param_at(model, path).shape) for path in spec.targets]
    axis = _packed_axis(spec.kind) % len(shapes[0])
    joined = shapes[0]
    joined[axis] = sum(shape[axis] for shape in shapes)
    return tuple(joined)


def split_parts(spec: KeySpec, array: np.ndarray) -> list[tuple[tuple, np.ndarray]]:
    """(module path, view) for each parameter `spec`'s flax-layout `array` fills; views, never copies."""
    if not spec.parts:
        return [(spec.path, array)]
    axis = _packed_axis(spec.kind) % array.ndim
    out, start = [], 0
    for path, size in spec.parts:
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, start + size)
        out.append((path, array[tuple(index)]))
        start += size
    return out


def read_flax(model, spec: KeySpec) -> np.ndarray:
    """`spec`'s tensor from `model` as one host array in flax layout (the parts concatenated)."""
    values = [np.asarray(jax.device_get(_param_at(model, path)[...])) for path in spec.targets]
    return values[0] if len(values) == 1 else np.concatenate(values, axis=_packed_axis(spec.kind))


def to_numpy(value) -> np.ndarray:
    """A torch tensor, jax array or numpy array as numpy (torch bfloat16 via float32, exactly)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


# ---- tensor sources: a dict, safetensors, or torch pickles ----------------------------------------------

_TORCH_CODES = {"torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
                "torch.uint8": "U8", "torch.bool": "BOOL"}


def _dtype_code_of(value) -> str:
    if hasattr(value, "detach"):
        return _TORCH_CODES.get(str(value.dtype), str(value.dtype))
    try:
        return dtype_code(value.dtype)
    except (ValueError, TypeError):
        return str(value.dtype)


def _torch_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy in its own dtype (bfloat16 bit for bit, as ml_dtypes.bfloat16)."""
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        torch = sys.modules["torch"]  # a tensor exists, so torch is imported
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _DictSource:
    """HF-named tensors held in memory (a torch state dict, or numpy / jax arrays)."""

    def __init__(self, tensors: Mapping, description: str):
        self._tensors = dict(tensors)
        self.description = description

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> str:
        return _dtype_code_of(self._tensors[name])

    def file_of(self, name: str) -> str:
        return self.description

    def read(self, name: str) -> np.ndarray:
        value = self._tensors[name]
        return _torch_to_numpy(value) if hasattr(value, "detach") else np.asarray(value)

    def close(self) -> None:
        pass


class _SafetensorsSource:
    def __init__(self, directory: pathlib.Path):
        self._ckpt = SafetensorsCheckpoint(directory)
        self.description = str(self._ckpt.source)

    def names(self) -> list[str]:
        return self._ckpt.names()

    def shape(self, name: str) -> tuple:
        return self._ckpt.info(name).shape

    def dtype(self, name: str) -> str:
        return self._ckpt.info(name).dtype

    def file_of(self, name: str) -> str:
        return str(self._ckpt.file_of(name))

    def read(self, name: str) -> np.ndarray:
        return self._ckpt.get(name)

    def close(self) -> None:
        self._ckpt.close()


def _torch_load(path: pathlib.Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a torch pickle, which easymamba opens only with torch.load(weights_only=True), and torch "
            "is not installed: install torch, or convert the checkpoint to safetensors where torch is "
            "(`easymamba convert SRC DST --to hf`)") from None
    try:
        try:  # mmap keeps the tensors in the file until each is read (zip-format checkpoints only)
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, Mapping) or not all(hasattr(v, "detach") for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict (tensor name -> tensor)")
    return dict(obj)


class _TorchSource(_DictSource):
    """`pytorch_model.bin`, or the shards a `pytorch_model.bin.index.json` lists."""

    def __init__(self, directory: pathlib.Path, index: bool):
        self._file: dict[str, str] = {}
        tensors = {}
        if index:
            path = directory / TORCH_WEIGHTS_INDEX_NAME
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path} is not a checkpoint index (JSON with a weight_map): {exc}") from None
            for shard in dict.fromkeys(weight_map.values()):
                if not (directory / shard).is_file():
                    first = next(k for k, v in weight_map.items() if v == shard)
                    raise CheckpointError(f"{path} names shard {shard} (for tensor {first}) but {directory} "
                                          "has no such file")
                part = _torch_load(directory / shard)
                tensors.update(part)
                self._file.update(dict.fromkeys(part, str(directory / shard)))
            description = str(path)
        else:
            path = directory / TORCH_WEIGHTS_NAME
            tensors = _torch_load(path)
            self._file = dict.fromkeys(tensors, str(path))
            description = str(path)
        super().__init__(tensors, description)

    def file_of(self, name: str) -> str:
        return self._file[name]


def _open_weights(directory: pathlib.Path):
    if (directory / SAFE_WEIGHTS_NAME).is_file() or (directory / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return _SafetensorsSource(directory)
    if (directory / TORCH_WEIGHTS_NAME).is_file():
        return _TorchSource(directory, index=False)
    if (directory / TORCH_WEIGHTS_INDEX_NAME).is_file():
        return _TorchSource(directory, index=True)
    raise FileNotFoundError(f"{directory} holds no weights: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
                            f"{TORCH_WEIGHTS_NAME} or {TORCH_WEIGHTS_INDEX_NAME}")


# ---- checking a checkpoint against a config -------------------------------------------------------------

def _mamba2_mixer_facts(config: Mamba2Config, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, the config's value, tensor, the value its shape implies) for each Mamba-2 mixer size the
    layer-0 tensors contradict."""
    out = []
    mixer = "backbone.layers.0.mixer."
    a_log = shape_of(mixer + "A_log")                                   # [h]
    if a_log is not None and len(a_log) == 1 and a_log[0] != config.num_heads:
        out.append(("num_heads", config.num_heads, mixer + "A_log", a_log[0]))
    norm = shape_of(mixer + "norm.weight")                              # [e]
    if norm is not None and len(norm) == 1 and norm[0] != config.intermediate_size:
        out.append(("expand * hidden_size", config.intermediate_size, mixer + "norm.weight", norm[0]))
    conv = shape_of(mixer + "conv1d.weight")                            # [e + 2gn, 1, k]
    if conv is not None and len(conv) == 3:
        if conv[2] != config.conv_kernel:
            out.append(("conv_kernel", config.conv_kernel, mixer + "conv1d.weight", conv[2]))
        gn = config.n_groups * config.state_size
        if norm is not None and len(norm) == 1 and conv[0] != norm[0] + 2 * gn:
            out.append(("n_groups * state_size", gn, mixer + "conv1d.weight", f"({conv[0]} - {norm[0]}) / 2"))
    return out


def _mamba1_mixer_facts(config: MambaConfig, shape_of) -> list[tuple[str, object, str, object]]:
    """As `_mamba2_mixer_facts`, for a Mamba-1 mixer: A_log [e, n], conv1d [e, 1, k], x_proj [r + 2n, e]."""
    out = []
    mixer = "backbone.layers.0.mixer."
    a_log = shape_of(mixer + "A_log")
    if a_log is not None and len(a_log) == 2:
        if a_log[0] != config.intermediate_size:
            out.append(("intermediate_size", config.intermediate_size, mixer + "A_log", a_log[0]))
        if a_log[1] != config.state_size:
            out.append(("state_size", config.state_size, mixer + "A_log", a_log[1]))
    conv = shape_of(mixer + "conv1d.weight")
    if conv is not None and len(conv) == 3 and conv[2] != config.conv_kernel:
        out.append(("conv_kernel", config.conv_kernel, mixer + "conv1d.weight", conv[2]))
    x_proj = shape_of(mixer + "x_proj.weight")
    if x_proj is not None and len(x_proj) == 2 and a_log is not None and len(a_log) == 2:
        rank = x_proj[0] - 2 * a_log[1]
        if rank != config.resolved_time_step_rank:
            out.append(("time_step_rank", config.resolved_time_step_rank, mixer + "x_proj.weight",
                        f"{x_proj[0]} - 2 * state_size = {rank}"))
    return out


def _config_contradictions(family: "ModelFamily", config, src, names: dict[str, str],
                           config_name: str) -> list[str]:
    """Sentences naming each config field that the tensor shapes contradict (empty when they agree): the
    embedding, layer count, biases and head shared by both families, then the family's own mixer sizes."""
    out = []

    def shape_of(hf_name):
        return tuple(src.shape(names[hf_name])) if hf_name in names else None

    def disagree(field, said, name, implied):
        out.append(f"{config_name} says {field} = {said}, but {name} in {src.file_of(names[name])} has shape "
                   f"{shape_of(name)}, which means {field} = {implied}")

    emb_name = "backbone.embeddings.weight"
    emb = shape_of(emb_name)
    if emb is not None and len(emb) == 2:
        if emb[0] != config.vocab_size:
            disagree("vocab_size", config.vocab_size, emb_name, emb[0])
        if emb[1] != config.hidden_size:
            disagree("hidden_size", config.hidden_size, emb_name, emb[1])
    layers = {}
    for name in names:
        m = re.match(r"backbone\.layers\.(\d+)\.", name)
        if m:
            layers.setdefault(int(m.group(1)), name)
    if layers and max(layers) + 1 != config.num_hidden_layers:
        last = max(layers)
        out.append(f"{config_name} says num_hidden_layers = {config.num_hidden_layers}, but the checkpoint has "
                   f"tensors for {last + 1} layers ({layers[last]} in {src.file_of(names[layers[last]])})")
    for fact in family.mixer_facts(config, shape_of):
        disagree(*fact)
    mixer = "backbone.layers.0.mixer."
    for field, tensor in (("use_bias", "in_proj.bias"), ("use_conv_bias", "conv1d.bias")):
        has = mixer + tensor in names
        if layers and has != getattr(config, field):
            where = src.file_of(names[mixer + tensor]) if has else src.description
            out.append(f"{config_name} says {field} = {str(getattr(config, field)).lower()}, but {where} "
                       f"{'has' if has else 'has no'} {mixer + tensor}")
    if not config.tie_word_embeddings and "lm_head.weight" not in names and emb is not None:
        out.append(f"{config_name} says tie_word_embeddings = false, but {src.description} has no lm_head.weight "
                   "(tied checkpoints leave it out)")
    return out


def _check_source(model, src, config_name: str, *, strict: bool = True) -> dict[str, str]:
    """Validate every tensor of `src` against `model` (concrete or abstract) and its config; returns
    {HF name: name in the source}."""
    config = model.config
    names: dict[str, str] = {}
    for raw in src.names():
        hf_name = LEGACY_RENAMES.get(raw, raw)
        if hf_name in names:
            raise CheckpointError(f"{src.description} has both {names[hf_name]} and {raw}, two names for one tensor")
        names[hf_name] = raw

    family = family_of(config)
    problems = _config_contradictions(family, config, src, names, config_name)
    if problems:
        raise CheckpointError("the config contradicts the tensors:\n  " + "\n  ".join(problems))

    table = family.key_table(config)
    expected = {spec.hf_name for spec in table}
    missing = [spec.hf_name for spec in table if spec.hf_name not in names]
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:8]})" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing from {src.description}{more}")
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = [n for n in names if n not in expected and n not in allowed]
    if unexpected and strict:
        listed = "; ".join(f"{n} in {src.file_of(names[n])}" for n in unexpected[:8])
        raise CheckpointError(f"unexpected tensor(s) that a {family.model_class.__name__} with this config does "
                              f"not have: {listed}"
                              + (f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))

    for spec in table:
        name = names[spec.hf_name]
        want = hf_shape(spec.kind, flax_shape(model, spec))
        found = tuple(src.shape(name))
        if found != want:
            raise CheckpointError(f"tensor {name} in {src.file_of(name)}: expected shape {want} for this config, "
                                  f"found {found}")
        code = src.dtype(name)
        if code not in FLOAT_CODES:
            raise CheckpointError(f"tensor {name} in {src.file_of(name)} has dtype {code}, which is not supported "
                                  f"for weights (supported: {', '.join(FLOAT_CODES)})")
    if config.tie_word_embeddings and "lm_head.weight" in names:
        _check_tied_head(src, names, config_name)
    return {spec.hf_name: names[spec.hf_name] for spec in table}


def _check_tied_head(src, names: dict[str, str], config_name: str) -> None:
    emb_name, head_name = names["backbone.embeddings.weight"], names["lm_head.weight"]
    if tuple(src.shape(head_name)) != tuple(src.shape(emb_name)):
        raise CheckpointError(f"{config_name} says tie_word_embeddings = true, but lm_head.weight in "
                              f"{src.file_of(head_name)} has shape {tuple(src.shape(head_name))}, not the "
                              f"embedding's {tuple(src.shape(emb_name))}")
    emb, head = src.read(emb_name), src.read(head_name)
    rows = max(1, 2**22 // max(1, emb.shape[1]))  # compare in slices: never a float64 copy of the whole matrix
    worst = 0.0
    for i in range(0, emb.shape[0], rows):
        a, b = emb[i:i + rows].astype(np.float64), head[i:i + rows].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
    if worst != 0.0:
        raise CheckpointError(f"{config_name} says tie_word_embeddings = true, but lm_head.weight in "
                              f"{src.file_of(head_name)} differs from backbone.embeddings.weight (max |diff| "
                              f"{worst:.3g}): a tied model would compute different logits; set "
                              "tie_word_embeddings to false to load both")


# ---- model families -------------------------------------------------------------------------------------

def _as_key_specs(table) -> list[KeySpec]:
    """A key table whose entries are `KeySpec`s or `(hf_name, path, kind)` triples, as `KeySpec`s."""
    return [entry if isinstance(entry, KeySpec) else KeySpec(*entry) for entry in table]


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
    ModelFamily("mamba2", Mamba2Config, Mamba2ForCausalLM, mamba2_key_table, _mamba2_mixer_facts),
    ModelFamily("mamba", MambaConfig, MambaForCausalLM, lambda config: _as_key_specs(mamba1_key_table(config)),
                _mamba1_mixer_facts),
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


# ---- building a model from a source --------------------------------------------------------------------

def abstract_model(config: "Mamba2Config | MambaConfig", *, dtype=jnp.float32, param_dtype=jnp.float32,
                   kernel_impl="auto"):
    """The config's causal LM (`Mamba2ForCausalLM` or `MambaForCausalLM`) with `jax.ShapeDtypeStruct`
    parameters: shapes and dtypes, no memory."""
    model_class = family_of(config).model_class
    return nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                              kernel_impl=kernel_impl))


def param_sharding(path: tuple, shape: tuple, mesh, shardings: ShardingHook | None):
    """The sharding a parameter is placed with: `NamedSharding(mesh, shardings(path) or P())`, or None
    (jax's default device) without a mesh. A spec longer than the parameter's rank is an error."""
    if mesh is None:
        if shardings is not None:
            raise ValueError("shardings was given without a mesh: pass mesh=... as well")
        return None
    spec = PartitionSpec() if shardings is None else shardings(path)
    spec = PartitionSpec() if spec is None else spec
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"shardings({path}) must return a PartitionSpec or None, got {spec!r}")
    if len(spec) > len(shape):
        raise ValueError(f"shardings({path}) returned {spec}, with {len(spec)} entries for a parameter of rank "
                         f"{len(shape)} (shape {shape})")
    return NamedSharding(mesh, spec)


def _place(view: np.ndarray, dtype, sharding, what: str) -> jax.Array:
    """`view` (flax layout, possibly a view into a memory-mapped file) as a jax array of `dtype`.

    Every piece handed to jax is a fresh copy: on CPU jax aliases numpy buffers, and aliasing the mapping
    would tie the parameter to the file. With a sharding each of this process's devices gets its slice read,
    copied and handed over one at a time, so a sharded parameter never exists whole in host memory and at
    most one host slice is in flight (`make_array_from_callback` would first read every slice).
    """
    def piece(index=()):
        return np.array(view[index], dtype=dtype, order="C", copy=True)

    try:
        if sharding is None:
            return jax.device_put(piece())
        shards = [jax.device_put(piece(index), device)
                  for device, index in sharding.addressable_devices_indices_map(view.shape).items()]
        return jax.make_array_from_single_device_arrays(view.shape, sharding, shards)
    except ValueError as exc:
        raise ValueError(f"cannot place {what} of shape {view.shape} with {sharding}: {exc}") from None


def build_from_source(config: "Mamba2Config | MambaConfig", src, config_name: str, *, dtype=None, param_dtype=None,
                      mesh=None, shardings: ShardingHook | None = None, rules: ShardingRules | None = None,
                      kernel_impl: str = "auto", progress: ProgressHook | None = None,
                      ) -> "Mamba2ForCausalLM | MambaForCausalLM":
    """Check `src` against `config`, then stream its tensors into an abstractly built model."""
    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    if rules is not None and (shardings is not None or mesh is None):
        raise ValueError("rules= shards by the sharding rules on a mesh: pass it with mesh= and without shardings=")
    abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype, kernel_impl=kernel_impl)
    plan = _check_source(abstract, src, config_name)
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    family = family_of(config)
    table = family.key_table(config)
    covered = {path for spec in table for path in spec.targets}
    if set(variables) != covered:  # the table must cover the model exactly
        raise AssertionError(f"key table and model disagree: {set(variables) ^ covered}")
    by_rules = None
    if mesh is not None and shardings is None:  # the default: the sharding rules (easymamba.sharding)
        by_rules = param_rules(family.model_class, config, mesh, rules)
        shardings = lambda path: by_rules.spec(path, variables[path].get_value().shape)  # noqa: E731
    for done, spec in enumerate(table, start=1):
        name = plan[spec.hf_name]
        for path, view in split_parts(spec, to_flax_layout(spec.kind, src.read(name))):
            var = variables[path]
            target = var.get_value()                          # ShapeDtypeStruct
            sharding = param_sharding(path, target.shape, mesh, shardings)
            part = f"[{path[-2]}]" if spec.parts else ""
            var.set_value(_place(view, target.dtype, sharding, f"{name}{part} from {src.file_of(name)}"))
        if progress is not None:
            progress(done, len(table), spec.hf_name)
    model = nnx.merge(graphdef, state)
    return model if by_rules is None else attach(model, by_rules.rules)


def read_config(path: "str | os.PathLike") -> "Mamba2Config | MambaConfig":
    """The config of checkpoint directory `path` (HF or state-spaces `config.json`), of its family's class:
    `Mamba2Config` or `MambaConfig` (`easymamba.config.config_from_hf` decides)."""
    file = pathlib.Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type is not None and model_type not in FAMILIES:
        known = ", ".join(f"{t!r} ({f.model_class.__name__})" for t, f in FAMILIES.items())
        raise CheckpointError(f"{file} has model_type {model_type!r}, which is not a model easymamba loads; it "
                              f"loads model_type {known}")
    try:
        return config_from_hf(raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def from_pretrained(path: "str | os.PathLike", *, dtype=None, param_dtype=None, mesh=None,
                    shardings: ShardingHook | None = None, rules: ShardingRules | None = None,
                    kernel_impl: str = "auto", progress: ProgressHook | None = None,
                    ) -> "Mamba2ForCausalLM | MambaForCausalLM":
    """The causal LM of a local HF or state-spaces checkpoint directory: a `Mamba2ForCausalLM` or a
    `MambaForCausalLM`, as its `config.json` says (see the module docstring).

    dtype: compute dtype (default float32). param_dtype: parameter dtype (default float32: a bfloat16
    checkpoint is upcast exactly unless `param_dtype=jnp.bfloat16`). mesh: place each parameter sharded by
    the sharding rules (`rules`, default `easymamba.sharding.ShardingRules()`), each device reading its own
    slice; the model then keeps its activations and cache sharded the same way. shardings: instead of the
    rules, `NamedSharding(mesh, shardings(path) or P())` per parameter (the model is then left to GSPMD).
    progress(done, total, name) is called after each tensor. Raises `CheckpointError` naming the file and
    tensor on any mismatch.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: from_pretrained reads a local checkpoint directory "
                                "(download a hub model first, e.g. huggingface_hub.snapshot_download)")
    config = read_config(directory)
    src = _open_weights(directory)
    try:
        return build_from_source(config, src, str(directory / CONFIG_NAME), dtype=dtype, param_dtype=param_dtype,
                                 mesh=mesh, shardings=shardings, rules=rules, kernel_impl=kernel_impl,
                                 progress=progress)
    finally:
        src.close()


def checkpoint_dtype(path: "str | os.PathLike") -> np.dtype:
    """The floating dtype a checkpoint directory stores its weights in (float32 when mixed or float64)."""
    src = _open_weights(pathlib.Path(path))
    try:
        codes = {src.dtype(n) for n in src.names()} & set(FLOAT_CODES)
    finally:
        src.close()
    return {"F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}.get(
        codes.pop() if len(codes) == 1 else "F32", np.dtype(np.float32))


# ---- writing ------------------------------------------------------------------------------------------

def save_pretrained(model: "Mamba2ForCausalLM | MambaForCausalLM", path: "str | os.PathLike", *,
                    max_shard_size: "int | str" = "5GB", progress: ProgressHook | None = None) -> pathlib.Path:
    """Write `config.json` and safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Tensors keep the parameters' dtype. Above `max_shard_size` (an int of bytes, or "5GB", "500MiB", ...)
    the weights are sharded with a `model.safetensors.index.json`. Returns the directory.
    """
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    table = family_of(model).key_table(model.config)
    entries = []
    for spec in table:
        param = _param_at(model, spec.targets[0])
        entries.append(TensorToWrite(
            spec.hf_name, hf_shape(spec.kind, flax_shape(model, spec)), np.dtype(param.dtype),
            lambda spec=spec: to_hf_layout(spec.kind, read_flax(model, spec))))
    done = [0]

    def on_tensor(name):
        done[0] += 1
        if progress is not None:
            progress(done[0], len(entries), name)

    write_sharded(directory, entries, max_shard_size=max_shard_size, metadata={"format": "pt"},
                  on_tensor=on_tensor)
    config = json.loads(model.config.to_json_string())
    config["dtype"] = str(np.dtype(_param_at(model, table[0].targets[0]).dtype))  # transformers 5's name for it
    tmp = directory / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / CONFIG_NAME)
    return directory


# ---- in-memory state dicts ------------------------------------------------------------------------------

def load_state_dict(model, state_dict: Mapping, *, strict: bool = True) -> None:
    """Copy an HF-named state dict (torch tensors or arrays) into `model`'s parameters, in place.

    Every tensor is checked (names, shapes, dtypes, tied head) before any parameter is written, so a bad
    state dict raises `CheckpointError` and leaves the model untouched. A tied model accepts a redundant
    `lm_head.weight` equal to the embedding. `strict=False` ignores unexpected tensors.
    """
    src = _DictSource(state_dict, "the state dict")
    plan = _check_source(model, src, "the model's config", strict=strict)
    staged = []
    for spec in family_of(model).key_table(model.config):
        value = to_flax_layout(spec.kind, src.read(plan[spec.hf_name]))
        for path, part in split_parts(spec, value):
            param = _param_at(model, path)
            staged.append((param, _like(param, np.asarray(part).astype(param.dtype))))
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


__all__ = ["CheckpointError", "FAMILIES", "KeySpec", "LEGACY_RENAMES", "ModelFamily", "checkpoint_dtype",
           "family_of", "flax_shape", "from_pretrained", "load_state_dict", "mamba2_key_table", "param_sharding",
           "read_config", "save_pretrained", "split_parts", "state_dict"]
