"""Native checkpoints with orbax: fast save and restore of (sharded) parameters, atomic.

Layout of a checkpoint directory `D`:

    D/<n>/              one version, written by orbax (`CompositeCheckpointHandler`), n = 1, 2, ...
        params/         every parameter, keyed by its module path ("backbone.layers.0.mixer.in_proj.kernel")
        meta/           JSON: format tag, the HF config, compute dtype, each parameter's shape and dtype
    D/<n>.orbax-checkpoint-tmp-<t>/   a save in progress (or one that died); never read

Atomicity. Orbax writes a version into a temporary directory and renames it to `D/<n>` only once every byte
is written, and a rename is atomic. `save_checkpoint` writes version n+1 next to n and deletes n only after
n+1 is complete; `load_checkpoint` reads the highest complete version. So a save that raises or is killed at
any point leaves the previous checkpoint loadable (and `D/<n+1>` absent or complete, never partial). Orbax's
own `force=True` overwrite is not used: it deletes the old checkpoint before writing the new one. Leftover
temporary directories are removed by the next save. Two processes saving into one `D` at once is not
supported.

Restore builds the model abstractly (`nnx.eval_shape`) and lets orbax read each array straight into its
destination: `NamedSharding(mesh, shardings(path) or P())` with a mesh (same hook as `from_pretrained`),
the default device otherwise. Parameters come back in their saved dtype (bit-exact) unless `param_dtype` is
given, and the compute dtype as saved unless `dtype` is given.

orbax is imported on first use, so `import easymamba` stays light.
"""

import json
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easymamba.config import Mamba2Config
from easymamba.hf import ShardingHook, abstract_model, param_sharding
from easymamba.model import Mamba2ForCausalLM
from easymamba.safetensors_io import CheckpointError

FORMAT = "easymamba.orbax"
FORMAT_VERSION = 1
_VERSION_RE = re.compile(r"^\d+$")
_TMP_RE = re.compile(r"^\d+\.orbax-checkpoint-tmp")


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def versions(directory: "str | os.PathLike") -> list[pathlib.Path]:
    """The complete versions in `directory`, oldest first (empty when it is not a checkpoint)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
    return sorted(found, key=lambda p: int(p.name))


def is_checkpoint(directory: "str | os.PathLike") -> bool:
    return bool(versions(directory))


def _remove_old(directory: pathlib.Path, keep: pathlib.Path) -> None:
    for p in directory.iterdir():
        if p != keep and p.is_dir() and (_VERSION_RE.match(p.name) or _TMP_RE.match(p.name)):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(model: Mamba2ForCausalLM, directory: "str | os.PathLike") -> pathlib.Path:
    """Save `model` (config, dtypes, every parameter, sharded or not) into `directory`, atomically.

    The new version replaces the previous one only once it is complete; returns its path.
    """
    ocp = _ocp()
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a checkpoint directory")
    directory.mkdir(parents=True, exist_ok=True)
    for p in directory.iterdir():  # debris of saves that died; nothing reads them
        if p.is_dir() and _TMP_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
    existing = versions(directory)
    target = directory / str(int(existing[-1].name) + 1 if existing else 1)

    params = {_key(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": type(model).__name__,
        "config": json.loads(model.config.to_json_string()),
        "dtype": str(np.dtype(model.dtype)),
        "params": {k: {"shape": list(v.shape), "dtype": str(np.dtype(v.dtype))} for k, v in params.items()},
    }
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        checkpointer.save(target, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                          meta=ocp.args.JsonSave(meta)))
    finally:
        checkpointer.close()
    _remove_old(directory, keep=target)
    return target


def _read_meta(version: pathlib.Path) -> dict:
    ocp = _ocp()
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        meta = checkpointer.restore(version, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as exc:
        raise CheckpointError(f"{version} is not a readable easymamba orbax checkpoint: {exc}") from None
    finally:
        checkpointer.close()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{version}/meta does not describe an easymamba checkpoint (format {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("model") != Mamba2ForCausalLM.__name__:
        raise CheckpointError(f"{version} holds format version {meta.get('format_version')} of model "
                              f"{meta.get('model')}; this easymamba reads version {FORMAT_VERSION} of "
                              f"{Mamba2ForCausalLM.__name__}")
    return meta


def checkpoint_config(directory: "str | os.PathLike") -> Mamba2Config:
    """The config saved in the latest version of checkpoint `directory`."""
    return Mamba2Config.from_hf(_read_meta(_latest(directory))["config"])


def _latest(directory: "str | os.PathLike") -> pathlib.Path:
    found = versions(directory)
    if not found:
        raise FileNotFoundError(f"{directory} holds no complete easymamba orbax checkpoint (no version "
                                "directory such as 1/)")
    return found[-1]


def load_checkpoint(directory: "str | os.PathLike", *, dtype=None, param_dtype=None, mesh=None,
                    shardings: ShardingHook | None = None, kernel_impl: str = "auto") -> Mamba2ForCausalLM:
    """The model saved by `save_checkpoint` in `directory` (its latest complete version).

    dtype: compute dtype (default: as saved). param_dtype: cast every parameter to it (default: each as
    saved, bit-exact). mesh / shardings: as `from_pretrained`; arrays are read straight into place.
    """
    ocp = _ocp()
    version = _latest(pathlib.Path(directory).absolute())
    meta = _read_meta(version)
    config = Mamba2Config.from_hf(meta["config"])
    dtype = jnp.dtype(meta["dtype"]) if dtype is None else dtype
    saved = meta["params"]
    module_dtype = param_dtype if param_dtype is not None else jnp.dtype(saved[_key(("backbone", "embeddings",
                                                                                      "weight"))]["dtype"])
    abstract = abstract_model(config, dtype=dtype, param_dtype=module_dtype, kernel_impl=kernel_impl)
    graphdef, state = nnx.split(abstract)
    variables = {_key(path): (path, var) for path, var in nnx.to_flat_state(state)}
    if set(variables) != set(saved):
        missing, extra = sorted(set(variables) - set(saved)), sorted(set(saved) - set(variables))
        raise CheckpointError(f"{version} does not match its config: missing parameters {missing[:8]}, "
                              f"unexpected {extra[:8]}")
    targets = {}
    for key, (path, var) in variables.items():
        shape = tuple(var.get_value().shape)
        if tuple(saved[key]["shape"]) != shape:
            raise CheckpointError(f"parameter {key} in {version}: expected shape {shape} for its config, found "
                                  f"{tuple(saved[key]['shape'])}")
        sharding = param_sharding(path, shape, mesh, shardings)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        want = jnp.dtype(saved[key]["dtype"]) if param_dtype is None else jnp.dtype(param_dtype)
        targets[key] = jax.ShapeDtypeStruct(shape, want, sharding=sharding)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        restored = checkpointer.restore(version, args=ocp.args.Composite(params=ocp.args.StandardRestore(targets)))
    except Exception as exc:
        raise CheckpointError(f"cannot restore the parameters of {version}: {exc}") from None
    finally:
        checkpointer.close()
    for key, (path, var) in variables.items():
        var.set_value(restored["params"][key])
    return nnx.merge(graphdef, state)


__all__ = ["checkpoint_config", "is_checkpoint", "load_checkpoint", "save_checkpoint", "versions"]
