"""Reading an HF or state-spaces checkpoint directory into a flax model: `from_pretrained`.

`from_pretrained(path)` reads a local directory:
- `config.json` in HF form (`model_type` "mamba2", "mamba" or "falcon_mamba": `easymamba.models.FAMILIES`), or in the
  original state-spaces/mamba_ssm form (`d_model`, `n_layer`, `ssm_cfg`; `ssm_cfg.layer` "Mamba2", else Mamba-1);
  the config classes read both and pad the vocabulary to `pad_vocab_size_multiple`, as the checkpoint's embedding
  already is. Any other `model_type` is refused with a `CheckpointError` naming the file and the ones it reads;
- weights, the first found of `model.safetensors`, `model.safetensors.index.json` (shards),
  `pytorch_model.bin`, `pytorch_model.bin.index.json` (`sources.py`). The original
  `backbone.embedding.weight` is renamed to HF's `backbone.embeddings.weight`, as transformers' load hook does.

Choices:
- No random initialisation and no second copy of the model: the model is built abstractly
  (`nnx.eval_shape`), every tensor is checked against the config before any is read (`checks.py`), then
  tensors stream one at a time from the memory-mapped file into their parameter, and the model is assembled
  (`nnx.merge`) only at the end. Any failure raises before a model exists: nothing is ever half-loaded.
- `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters; both default to float32,
  whatever the checkpoint holds (a bfloat16 checkpoint is upcast exactly unless `param_dtype=jnp.bfloat16`).
- With `mesh`, each parameter is placed directly as `NamedSharding(mesh, spec)`, each device's slice read
  from the file on its own (`safe_open`'s `get_slice`, through `layout.FlaxView`), so no parameter is ever
  whole in host memory (a packed HF tensor's parts are read part by part). By default `spec` comes from the
  sharding rules (`easymamba.sharding`, `rules=` to change them) and the model knows its mesh afterwards
  (sharded activations, cache and kernels); an explicit `shardings(path) -> PartitionSpec | None` hook
  replaces the rules, where `path` is the parameter's module path
  (`("backbone", "layers", 3, "mixer", "in_proj", "x", "kernel")`) and `None` means replicated `P()`.
- `generation_config.json`, when the directory has one, becomes `model.generation_config`
  (`easymamba.config.generation.GenerationDefaults`), the defaults `generate` uses.
- Tied models: a checkpoint without `lm_head.weight` uses the embedding; one whose `lm_head.weight` equals the
  embedding is accepted; one whose `lm_head.weight` differs is refused, since the tied model would differ.
"""

import os
import pathlib
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from easymamba.checkpoints.checks import FLOAT_CODES, carried_names, check_names, check_source
from easymamba.checkpoints.errors import CheckpointError, NonFiniteWeightWarning
from easymamba.config.generation import GENERATION_CONFIG_NAME, GenerationDefaults
from easymamba.models import FAMILIES, abstract_model, config_from_hf, family_of
from easymamba.checkpoints.layout import FlaxView, StackedView, split_parts
from easymamba.checkpoints.safetensors_format import load_json
from easymamba.checkpoints.sources import open_weights
from easymamba.sharding import ShardingRules, attach, param_rules

CONFIG_NAME = "config.json"

# parameter path -> PartitionSpec, or None for replicated; see the module docstring.
ShardingHook = Callable[[tuple], "PartitionSpec | None"]
# progress(done, total, tensor name), called after each tensor is read or written.
ProgressHook = Callable[[int, int, str], None]


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


def _place(view: FlaxView, dtype, sharding, what: str, nonfinite: set | None = None) -> jax.Array:
    """`view` (a source tensor in flax layout, unread) as a jax array of `dtype`.

    Every piece handed to jax is a fresh copy: on CPU jax aliases numpy buffers, and a piece may be a view of
    memory the source owns. With a sharding each of this process's devices gets its slice read, copied and
    handed over one at a time, so a sharded parameter never exists whole in host memory and at most one host
    slice is in flight (`make_array_from_callback` would first read every slice).
    """
    def piece(index=()):
        arr = np.array(view[index], dtype=dtype, order="C", copy=True)
        if nonfinite is not None and not np.isfinite(arr).all():
            nonfinite.add(what)
        return arr

    try:
        if sharding is None:
            return jax.device_put(piece())
        shards = [jax.device_put(piece(index), device)
                  for device, index in sharding.addressable_devices_indices_map(view.shape).items()]
        return jax.make_array_from_single_device_arrays(view.shape, sharding, shards)
    except ValueError as exc:
        raise ValueError(f"cannot place {what} of shape {view.shape} with {sharding}: {exc}") from None


def build_from_source(config, src, config_name: str, *, dtype=None, param_dtype=None, mesh=None,
                      shardings: ShardingHook | None = None, rules: ShardingRules | None = None,
                      kernel_impl: str = "auto", progress: ProgressHook | None = None):
    """Check `src` against `config`, then stream its tensors into an abstractly built model."""
    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    if rules is not None and (shardings is not None or mesh is None):
        raise ValueError("rules= shards by the sharding rules on a mesh: pass it with mesh= and without shardings=")
    check_names(config, src, config_name)  # before the abstract build, which grows with the layers the config says
    abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype, kernel_impl=kernel_impl)
    plan = check_source(abstract, src, config_name)
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    family = family_of(config)
    table = family.key_table(config)
    covered = {path for spec in table for path in spec.targets}
    if set(variables) != covered:  # the table must cover the model exactly
        raise AssertionError(f"key table and model disagree: {set(variables) ^ covered}")
    by_rules = None
    if mesh is not None and shardings is None:  # the default: the sharding rules (easymamba.sharding)
        by_rules = param_rules(abstract, config, mesh, rules)
        shardings = lambda path: by_rules.spec(path, variables[path].get_value().shape)  # noqa: E731
    stacked: dict[tuple, list] = {}   # a stacked parameter's entries read so far (one tensor per expert)
    nonfinite: set[str] = set()       # the tensors holding NaN or inf, named in one warning at the end
    for done, spec in enumerate(table, start=1):
        name = plan[spec.hf_name]
        whole = FlaxView(lambda index, name=name: src.read_slice(name, index), spec.kind, src.shape(name))
        if spec.index is not None:
            entries = stacked.setdefault(spec.path, [])
            entries.append(whole)
            var = variables[spec.path]
            target = var.get_value()
            if len(entries) == target.shape[0]:  # the table lists a parameter's entries together, in order
                sharding = param_sharding(spec.path, target.shape, mesh, shardings)
                var.set_value(_place(StackedView(entries), target.dtype, sharding,
                                     f"{name} and the other entries of {'.'.join(map(str, spec.path))}",
                                     nonfinite))
        else:
            for path, view in split_parts(spec, whole):
                var = variables[path]
                target = var.get_value()                          # ShapeDtypeStruct
                sharding = param_sharding(path, target.shape, mesh, shardings)
                part = f"[{path[-2]}]" if spec.parts else ""
                var.set_value(_place(view, target.dtype, sharding, f"{name}{part} from {src.file_of(name)}",
                                     nonfinite))
        if progress is not None:
            progress(done, len(table), spec.hf_name)
    if nonfinite:
        listed = sorted(nonfinite)
        more = f" (and {len(listed) - 8} more)" if len(listed) > 8 else ""
        warnings.warn(f"{src.description}: tensor(s) hold NaN or infinity (expected finite weights; the model's "
                      f"outputs may be NaN): {'; '.join(listed[:8])}{more}", NonFiniteWeightWarning, stacklevel=3)
    model = nnx.merge(graphdef, state)
    # tensors the model carries without running them, read as stored (host memory, the source's dtype)
    model.carried_tensors = {name: np.asarray(src.read(name)) for name in carried_names(config, src)}
    return model if by_rules is None else attach(model, by_rules.rules)


def read_config(path: "str | os.PathLike"):
    """The config of checkpoint directory `path` (HF or state-spaces `config.json`), of its family's class:
    `Mamba2Config` or `MambaConfig` (`easymamba.models.config_from_hf` decides)."""
    file = pathlib.Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}")
    raw = load_json(file.read_bytes(), file)  # bad UTF-8, deep nesting, duplicate keys: CheckpointError
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type is not None and model_type not in FAMILIES:
        known = ", ".join(f"{t!r} ({f.causal_lm.__name__})" for t, f in FAMILIES.items())
        raise CheckpointError(f"{file} has model_type {model_type!r}, which is not a model easymamba loads; it "
                              f"loads model_type {known}")
    try:
        return config_from_hf(raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def from_pretrained(path: "str | os.PathLike", *, dtype=None, param_dtype=None, mesh=None,
                    shardings: ShardingHook | None = None, rules: ShardingRules | None = None,
                    kernel_impl: str = "auto", progress: ProgressHook | None = None):
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
    defaults = read_generation_config(directory)  # before the weights: a refused file costs no reading
    src = open_weights(directory)
    try:
        model = build_from_source(config, src, str(directory / CONFIG_NAME), dtype=dtype, param_dtype=param_dtype,
                                  mesh=mesh, shardings=shardings, rules=rules, kernel_impl=kernel_impl,
                                  progress=progress)
    finally:
        src.close()
    if defaults is not None:
        model.generation_config = defaults
    return model


def read_generation_config(path: "str | os.PathLike") -> GenerationDefaults | None:
    """The `GenerationDefaults` of directory `path`'s `generation_config.json`, None when it has none."""
    file = pathlib.Path(path) / GENERATION_CONFIG_NAME
    if not file.is_file():
        return None
    try:
        return GenerationDefaults.from_hf(file)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def checkpoint_dtype(path: "str | os.PathLike") -> np.dtype:
    """The floating dtype a checkpoint directory stores its weights in (float32 when mixed or float64)."""
    src = open_weights(pathlib.Path(path))
    try:
        codes = {src.dtype(n) for n in src.names()} & set(FLOAT_CODES)
    finally:
        src.close()
    return {"F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}.get(
        codes.pop() if len(codes) == 1 else "F32", np.dtype(np.float32))


__all__ = ["CONFIG_NAME", "ProgressHook", "ShardingHook", "build_from_source", "checkpoint_dtype", "from_pretrained",
           "param_sharding", "read_config", "read_generation_config"]
