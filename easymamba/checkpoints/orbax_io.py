"""Native checkpoints with orbax: fast save and restore of (sharded) parameters and training states, atomic.

Layout of a checkpoint directory `D`, kept by `orbax.checkpoint.CheckpointManager` (steps named by their
number, no prefix):

    D/<n>/              one version, a step of the manager, n = 1, 2, ...
        params/         every parameter, keyed by its module path ("backbone.layers.0.mixer.in_proj.kernel")
        meta/           JSON: format tag, the HF config, compute dtype, each parameter's shape and dtype
        opt_state/      (a training state only) the optax state's arrays, by position; meta lists their paths
        train/          (a training state only) step and the PRNG key's raw data
    D/<n>.orbax-checkpoint-tmp-<t>/   a save in progress (or one that died); never read

This is the layout the earlier hand-managed version folders had (`Checkpointer(CompositeCheckpointHandler)`
per folder), so checkpoints written before the manager took over load unchanged (FORMAT_VERSION stays 1).

Atomicity. The manager writes a step into a temporary directory and renames it to `D/<n>` only once every byte
is written, and a rename is atomic. A save into a `D` that holds a checkpoint needs `overwrite=True` (without
it a non-empty `D` is refused before anything is written: `destination.py`); it writes step n+1 next to n and
deletes n (`manager.delete`) only after n+1 is committed; loads read the manager's latest step. So a save that
raises or is killed at any point leaves the previous checkpoint loadable (and `D/<n+1>` absent or complete, never
partial). Old steps are not left to `max_to_keep`, which would delete them inside `save`, out of sight of this
order. Leftover temporary directories are removed when the next save opens the manager
(`cleanup_tmp_directories`). Saves are synchronous. A save holds a lock on `D` (`destination.claim`): a second
save into it at the same time, from any process, raises `CheckpointError` at once, and the first is unharmed.

Restore builds the model abstractly (`nnx.eval_shape`) and lets orbax read each array straight into its
destination: `NamedSharding(mesh, shardings(path) or P())` with a mesh (same hook as `from_pretrained`),
the default device otherwise. Parameters come back in their saved dtype (bit-exact) unless `param_dtype` is
given, and the compute dtype as saved unless `dtype` is given.

Training states (`easymamba.train.TrainState`: parameters, optimizer state, step, rng) are saved the same way
by `save_train_state` and restored by `load_train_state` into a state of the same model and optimizer (`like`),
whose arrays give each restored array its dtype and sharding. Their parameters are stored as a model's, so
`load_checkpoint` reads the model of a training checkpoint too.

orbax is imported on first use, so `import easymamba` stays light.
"""

import contextlib
import json
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easymamba.checkpoints.destination import claim
from easymamba.checkpoints.errors import CheckpointError, NonFiniteWeightWarning
from easymamba.models import FAMILIES, abstract_model, config_from_hf
from easymamba.checkpoints.hf_reader import ShardingHook, param_sharding, read_generation_config
from easymamba.config.generation import GenerationDefaults

FORMAT = "easymamba.orbax"
FORMAT_VERSION = 1


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


@contextlib.contextmanager
def _manager(directory: pathlib.Path, *, write: bool = False):
    """The `CheckpointManager` of `directory`; with `write` it creates the directory and removes the temporary
    directories of saves that died. (Readers do not set the manager's `read_only`: it only logs warnings,
    and a reader never calls save or delete.)"""
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(step_prefix=None, enable_async_checkpointing=False, create=write,
                                           cleanup_tmp_directories=write)
    manager = ocp.CheckpointManager(directory, options=options)
    try:
        yield manager
    finally:
        manager.close()


def versions(directory: "str | os.PathLike") -> list[pathlib.Path]:
    """The complete versions (the manager's steps) in `directory`, oldest first (empty when it is not a
    checkpoint)."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        return []
    with _manager(directory) as manager:
        return [directory / str(step) for step in sorted(manager.all_steps())]


def is_checkpoint(directory: "str | os.PathLike") -> bool:
    return bool(versions(directory))


def _remove_old(manager, keep: int) -> None:
    """Delete every step but `keep`, once `keep` is committed."""
    for step in manager.all_steps():
        if step != keep:
            manager.delete(step)


def _save_version(directory: "str | os.PathLike", items: dict, overwrite: bool, what: str) -> pathlib.Path:
    """Write `items` ({name: orbax save args}) as the next step of `directory`, then drop the older ones (there
    are any only with `overwrite`: `destination.claim` refuses a directory that holds anything otherwise)."""
    ocp = _ocp()
    with claim(directory, overwrite=overwrite, what=what) as directory, _manager(directory, write=True) as manager:
        step = (manager.latest_step() or 0) + 1
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
        _remove_old(manager, keep=step)
    return directory / str(step)


def _restore(version: pathlib.Path, items: dict) -> dict:
    """Restore `items` ({name: orbax restore args}) of step `version` (a path `D/<n>`)."""
    ocp = _ocp()
    with _manager(version.parent) as manager:
        return manager.restore(int(version.name), args=ocp.args.Composite(**items))


def _model_meta(model, params: dict) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": type(model).__name__,
        "config": json.loads(model.config.to_json_string()),
        "dtype": str(np.dtype(model.dtype)),
        "params": {k: {"shape": list(v.shape), "dtype": str(np.dtype(v.dtype))} for k, v in params.items()},
    }


def save_checkpoint(model, directory: "str | os.PathLike", *, overwrite: bool = False) -> pathlib.Path:
    """Save `model` (config, dtypes, every parameter, sharded or not) into `directory`, atomically.

    `directory` must be new or empty unless `overwrite=True`; then the new version replaces the previous one only
    once it is complete (files that are not versions are kept). A save running into the same directory makes this
    one raise. Both refusals are a `CheckpointError` raised before anything is written. Returns the version's path.
    """
    ocp = _ocp()
    params = {_key(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    meta = _model_meta(model, params)
    items = {"params": ocp.args.StandardSave(params)}
    carried = getattr(model, "carried_tensors", {})
    if carried:  # tensors carried without being run (CausalLM.carried_tensors), under keys orbax takes as names
        meta["carried"] = [{"name": name, "key": f"t{i}", "shape": list(a.shape), "dtype": str(np.dtype(a.dtype))}
                           for i, (name, a) in enumerate(carried.items())]
        items["carried"] = ocp.args.StandardSave({f"t{i}": a for i, a in enumerate(carried.values())})
    defaults = getattr(model, "generation_config", None)
    if defaults is not None:  # the generation_config.json the model was loaded with, as it was read
        meta["generation_config"] = defaults.to_hf()
    items["meta"] = ocp.args.JsonSave(meta)
    return _save_version(directory, items, overwrite, "save_checkpoint")


def _read_meta(version: pathlib.Path, *, any_model: bool = False) -> dict:
    ocp = _ocp()
    try:
        meta = _restore(version, {"meta": ocp.args.JsonRestore()})["meta"]
    except Exception as exc:
        raise CheckpointError(f"{version} is not a readable easymamba orbax checkpoint: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{version}/meta does not describe an easymamba checkpoint (format {FORMAT!r})")
    models = [family.causal_lm.__name__ for family in FAMILIES.values()]  # every family (easymamba.models)
    if meta.get("format_version") != FORMAT_VERSION or (meta.get("model") not in models and not any_model):
        raise CheckpointError(f"{version} holds format version {meta.get('format_version')} of model "
                              f"{meta.get('model')}; this easymamba reads version {FORMAT_VERSION} of "
                              f"{' or '.join(models)}")
    return meta


def checkpoint_config(directory: "str | os.PathLike"):
    """The config saved in the latest version of checkpoint `directory`."""
    return config_from_hf(_read_meta(_latest(directory))["config"])


def _latest(directory: "str | os.PathLike") -> pathlib.Path:
    found = versions(directory)
    if not found:
        raise FileNotFoundError(f"{directory} holds no complete easymamba orbax checkpoint (no version "
                                "directory such as 1/)")
    return found[-1]


def load_checkpoint(directory: "str | os.PathLike", *, dtype=None, param_dtype=None, mesh=None,
                    shardings: ShardingHook | None = None, kernel_impl: str = "auto"):
    """The model saved by `save_checkpoint` in `directory` (its latest complete version).

    dtype: compute dtype (default: as saved). param_dtype: cast every parameter to it (default: each as
    saved, bit-exact). mesh / shardings: as `from_pretrained`; arrays are read straight into place.
    """
    ocp = _ocp()
    version = _latest(pathlib.Path(directory).absolute())
    meta = _read_meta(version)
    config = config_from_hf(meta["config"])
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
    try:
        restored = _restore(version, {"params": ocp.args.StandardRestore(targets)})
    except Exception as exc:
        raise CheckpointError(f"cannot restore the parameters of {version}: {exc}") from None
    for key, (path, var) in variables.items():
        var.set_value(restored["params"][key])
    finite = jax.device_get({key: jnp.isfinite(value).all() for key, value in restored["params"].items()})
    nonfinite = [key for key in variables if not finite[key]]  # one transfer for all flags, not one per parameter
    if nonfinite:  # as from_pretrained warns: one warning naming the parameters
        more = f" (and {len(nonfinite) - 8} more)" if len(nonfinite) > 8 else ""
        warnings.warn(f"{version}: parameter(s) hold NaN or infinity (expected finite weights; the model's outputs "
                      f"may be NaN): {'; '.join(nonfinite[:8])}{more}", NonFiniteWeightWarning, stacklevel=2)
    model = nnx.merge(graphdef, state)
    carried = meta.get("carried") or []
    if carried:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # read, then kept on the host
        try:
            found = _restore(version, {"carried": ocp.args.StandardRestore(
                {e["key"]: jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]), sharding=one)
                 for e in carried})})["carried"]
        except Exception as exc:
            raise CheckpointError(f"cannot restore the carried tensors of {version}: {exc}") from None
        model.carried_tensors = {e["name"]: np.asarray(found[e["key"]]) for e in carried}
    saved_defaults = meta.get("generation_config")
    # the generation_config.json saved with the model, else one kept beside the versions (easymamba convert)
    defaults = (GenerationDefaults.from_hf(saved_defaults) if isinstance(saved_defaults, dict)
                else read_generation_config(directory))
    if defaults is not None:
        model.generation_config = defaults
    return model


# ---- training state: parameters, optimizer state, step and rng -----------------------------------------

def _sharding_of(leaf):
    sharding = getattr(leaf, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _key_impl(key) -> str:
    """The PRNG implementation of a key array, or of an abstract one (`jax.ShapeDtypeStruct`) of the default's."""
    if isinstance(key, jax.Array):
        return str(jax.random.key_impl(key))
    default = jax.random.key(0)
    if key.dtype != default.dtype:
        raise CheckpointError(f"the abstract rng given in like has dtype {key.dtype}; only the default PRNG "
                              f"implementation ({default.dtype}) can be read into an abstract key")
    return str(jax.random.key_impl(default))


def _spec(leaf) -> dict:
    return {"shape": list(np.shape(leaf)), "dtype": str(np.dtype(leaf.dtype))}


def save_train_state(state, directory: "str | os.PathLike", *, overwrite: bool = False) -> pathlib.Path:
    """Save a whole `easymamba.train.TrainState` (parameters, optimizer state, step, rng) into `directory`,
    atomically; returns its path. `directory` must be new or empty unless `overwrite=True` (a training loop that
    saves every N steps passes it): then the new version replaces the previous one once it is complete.

    The parameters are stored as `save_checkpoint` stores them, so `load_checkpoint(directory)` reads the model
    of a (Mamba-2) training checkpoint as well. Resume with `load_train_state`.
    """
    ocp = _ocp()
    model = state.model()
    params = {_key(path): var.get_value() for path, var in nnx.to_flat_state(state.params)}
    entries = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    opt = {f"{i:05d}": leaf for i, (_, leaf) in enumerate(entries)}  # by position: optax paths are not file names
    train = {"step": state.step, "rng": jax.random.key_data(state.rng)}
    meta = _model_meta(model, params)
    meta["train_state"] = {
        "step": int(state.step), "rng_impl": str(jax.random.key_impl(state.rng)),
        "opt_state": [{"path": jax.tree_util.keystr(p), **_spec(v)} for p, v in entries],
    }
    items = {"params": ocp.args.StandardSave(params), "train": ocp.args.StandardSave(train),
             "meta": ocp.args.JsonSave(meta)}
    if opt:  # a stateless optimizer (plain SGD) has none
        items["opt_state"] = ocp.args.StandardSave(opt)
    return _save_version(directory, items, overwrite, "save_train_state")


def load_train_state(directory: "str | os.PathLike", like):
    """The `TrainState` saved by `save_train_state` in `directory` (its latest complete version).

    like: a `TrainState` of the same model config and optimizer (e.g. `TrainState.create(model, tx)` with a
    freshly built model): it gives the structure, dtypes and shardings every array is read into. It may be
    abstract, so that no initial state is ever materialised:
    `jax.eval_shape(lambda m: TrainState.create(m, tx), nnx.eval_shape(lambda: Model(config, rngs=nnx.Rngs(0))))`.
    Everything is checked against the checkpoint first; a mismatch raises `CheckpointError` naming what differs.
    """
    ocp = _ocp()
    version = _latest(pathlib.Path(directory).absolute())
    meta = _read_meta(version, any_model=True)
    if "train_state" not in meta:
        raise CheckpointError(f"{version} holds a model (save_checkpoint), not a training state: it has no optimizer "
                              "state; load it with load_checkpoint and start a new TrainState from that model")
    saved = meta["train_state"]
    model = like.model()
    config = json.loads(model.config.to_json_string())
    if meta["model"] != type(model).__name__ or meta["config"] != config:
        diff = sorted(k for k in set(config) | set(meta["config"]) if config.get(k) != meta["config"].get(k))
        raise CheckpointError(f"{version} holds a {meta['model']} whose config differs from the state given as like "
                              f"({type(model).__name__}) in {diff[:8]}")

    flat = list(nnx.to_flat_state(like.params))
    param_targets = {}
    for path, var in flat:
        key, leaf = _key(path), var.get_value()
        want = meta["params"].get(key)
        if want is None or want != _spec(leaf):
            raise CheckpointError(f"parameter {key}: the state given as like has {_spec(leaf)}, {version} has "
                                  f"{want or 'no such parameter'}")
        param_targets[key] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_sharding_of(leaf))
    if len(param_targets) != len(meta["params"]):
        extra = sorted(set(meta["params"]) - set(param_targets))
        raise CheckpointError(f"{version} has parameters the state given as like does not: {extra[:8]}")

    opt_leaves, opt_def = jax.tree.flatten(like.opt_state)
    if len(opt_leaves) != len(saved["opt_state"]):
        raise CheckpointError(f"the optimizer state given as like has {len(opt_leaves)} arrays, {version} has "
                              f"{len(saved['opt_state'])}: was it saved with a different optimizer (tx)?")
    opt_targets = {}
    for i, (leaf, want) in enumerate(zip(opt_leaves, saved["opt_state"])):
        if _spec(leaf) != {"shape": want["shape"], "dtype": want["dtype"]}:
            raise CheckpointError(f"optimizer state {want['path']}: the state given as like has {_spec(leaf)}, "
                                  f"{version} has shape {want['shape']} of {want['dtype']}; a different optimizer?")
        opt_targets[f"{i:05d}"] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_sharding_of(leaf))
    impl = _key_impl(like.rng)
    if saved["rng_impl"] != impl:
        raise CheckpointError(f"{version} holds a {saved['rng_impl']} rng key, the state given as like a {impl} one")
    rng_data = jax.random.key_data(like.rng) if isinstance(like.rng, jax.Array) else jax.eval_shape(
        jax.random.key_data, like.rng)
    train_targets = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=_sharding_of(like.step)),
                     "rng": jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=_sharding_of(like.rng))}

    items = {"params": ocp.args.StandardRestore(param_targets), "train": ocp.args.StandardRestore(train_targets)}
    if opt_targets:
        items["opt_state"] = ocp.args.StandardRestore(opt_targets)
    try:
        restored = _restore(version, items)
    except Exception as exc:
        raise CheckpointError(f"cannot restore the training state of {version}: {exc}") from None
    params = nnx.from_flat_state([(path, var.replace(restored["params"][_key(path)])) for path, var in flat])
    opt_state = jax.tree.unflatten(opt_def, [restored["opt_state"][f"{i:05d}"] for i in range(len(opt_leaves))])
    return like.replace(step=restored["train"]["step"], params=params, opt_state=opt_state,
                        rng=jax.random.wrap_key_data(restored["train"]["rng"], impl=impl))


def train_state_step(directory: "str | os.PathLike") -> int | None:
    """The step of the latest training state saved in `directory`, or None when there is none to resume."""
    found = versions(directory)
    if not found:
        return None
    meta = _read_meta(found[-1], any_model=True)
    return meta["train_state"]["step"] if "train_state" in meta else None


__all__ = ["checkpoint_config", "is_checkpoint", "load_checkpoint", "load_train_state", "save_checkpoint",
           "save_train_state", "train_state_step", "versions"]
