"""Sharded inference over a device mesh: the mesh, the logical-axis rules, and placing a model on them.

    mesh  = make_mesh(data=2, model=4)                  # axes ("data", "model"), AxisType.Auto
    model = shard_model(model, mesh)                    # every parameter as NamedSharding(mesh, rule spec)
    model = init_sharded(lambda: Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)   # born sharded
    model = from_pretrained(path, mesh=mesh)            # the same rules, each device reading its own slice
    cache = model.init_cache(batch, mesh=mesh)          # views sharded by the same rules

Logical axes (letters of `easymamba.typing`) and the default rules (`ShardingRules()`):

    batch   b                                                   -> "data"
    heads   h and every channel that comes in whole heads:       -> "model"
            e = h*p (in_proj's z and x, x's conv channels, the gated norm, out_proj's input), dt (in_proj's
            dt output, dt_bias, A_log, D), the SSM state's h
    groups  g and the B / C channels g*n (in_proj's B and C,     -> "model" when n_groups % size == 0,
            their conv channels)                                    else replicated
    vocab   v (embedding rows, LM head columns)                  -> "model" when vocab_size % size == 0,
                                                                    else replicated
    embed   d (the residual stream)                              -> replicated
    attn_heads  an attention's query heads H (q_proj's outputs,  -> "model" when H % size == 0, else replicated
            o_proj's inputs)
    kv_heads    its key/value heads KV (k_proj, v_proj, the      -> "model" when KV % size == 0, else replicated
            key/value cache)
    mlp     an MLP's inner width f                               -> "model" when f % size == 0, else replicated
    experts the experts E of a mixture of experts                -> "model" when E % size == 0, else replicated

`heads` must divide its mesh axis (an error otherwise); `groups` and `vocab` fall back to replicated, by rule
and documented (docs/sharding.md), never silently for any other axis. Everything else (the sequence, p, n, k)
is replicated. So the mixer is Megatron-style: in_proj column-parallel, the per-head conv, SSD and gated norm
local to each shard (the norm's per-group statistics are local when groups are sharded), out_proj
row-parallel (one all-reduce per layer); batch rows are data-parallel.

Every parameter declares its logical axes where it is made, one name (or None) per dimension, as `axes=`
metadata (`nnx.Param(value, axes=("heads",))`, `nnx.Linear(..., kernel_metadata={"axes": ("embed", "heads")})`);
`ParamRules` reads them off the model and resolves them with one rules object. The family's record gives
`sharding_units(config)`, the count of each logical axis (heads h, groups g, ...) for the divisibility rules.
Mamba-1 has no heads: its inner channels e (each with its own conv filter, A row, D, dt and state row) are
declared `heads` and counted as e, so its mixer is Megatron-style in the same way (in_proj column-parallel, conv
and scan local, x_proj and out_proj row-parallel with one all-reduce each).

Meshes must use `AxisType.Auto` (what `make_mesh` builds): the model relies on GSPMD propagation between the
constraints it places, and jax 0.10's default `Explicit` axes make an embedding gather on batch-sharded ids
raise `ShardingTypeError`. Multi-host: the same calls after `jax.distributed.initialize()`; `make_mesh` then
spans every process's devices and each process places and reads only its own shards (docs/sharding.md).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from easymamba.caching.partition import AxisEntry, PartitionAxis, normalize_entry
from easymamba.kernels import MeshAxes

LOGICAL_AXES = ("batch", "heads", "groups", "vocab", "embed", "attn_heads", "kv_heads", "mlp", "experts")

def make_mesh(data: int | None = None, model: int = 1, *, devices=None) -> Mesh:
    """A 2-D mesh `("data", "model")` of `data * model` devices with `AxisType.Auto` axes (`jax.make_mesh`).

    `data=None` takes every device not used by `model`. Under `jax.distributed` the devices are all
    processes' (`jax.devices()`), so one call describes the whole job.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(model, bool) or not isinstance(model, int) or model < 1:
        raise ValueError(f"model must be a positive int; got {model!r}")
    if data is None:
        if len(devices) % model:
            raise ValueError(f"model={model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if isinstance(data, bool) or not isinstance(data, int) or data < 1:
        raise ValueError(f"data must be a positive int; got {data!r}")
    if data * model > len(devices):
        raise ValueError(f"a ({data}, {model}) mesh needs {data * model} devices; {len(devices)} are available")
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:data * model])


def _check_auto(mesh: Mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    explicit = [name for name, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
    if explicit:
        raise ValueError(f"mesh axes {explicit} are not AxisType.Auto; easymamba relies on GSPMD propagation "
                         "(and an embedding gather on batch-sharded ids raises under Explicit axes): build the "
                         "mesh with easymamba.make_mesh or jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)")


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Which mesh axis each logical axis goes to (`None`: replicated), before looking at a mesh.

    `replicate_if_uneven`: the logical axes that fall back to replicated when their count does not divide
    their mesh axes (by default B/C's groups and the vocabulary); any other uneven axis is an error.
    """

    batch: AxisEntry = "data"
    heads: AxisEntry = "model"
    groups: AxisEntry = "model"
    vocab: AxisEntry = "model"
    embed: AxisEntry = None
    attn_heads: AxisEntry = "model"
    kv_heads: AxisEntry = "model"
    mlp: AxisEntry = "model"
    experts: AxisEntry = "model"
    replicate_if_uneven: tuple[str, ...] = ("groups", "vocab", "attn_heads", "kv_heads", "mlp", "experts")

    def __post_init__(self):
        for name in LOGICAL_AXES:
            object.__setattr__(self, name, normalize_entry(getattr(self, name), f"ShardingRules.{name}"))
        unknown = set(self.replicate_if_uneven) - set(LOGICAL_AXES)
        if unknown:
            raise ValueError(f"replicate_if_uneven names unknown logical axes {sorted(unknown)}; "
                             f"known: {LOGICAL_AXES}")
        object.__setattr__(self, "replicate_if_uneven", tuple(self.replicate_if_uneven))

    def resolve(self, mesh: Mesh, units: dict[str, int]) -> "MeshRules":
        """The rules on `mesh` for a model whose logical axes have `units` (e.g. heads h, groups g)."""
        _check_auto(mesh)
        sizes = dict(mesh.shape)
        resolved = {}
        for name in LOGICAL_AXES:
            entry = getattr(self, name)
            for axis in _names(entry):
                if axis not in sizes:
                    raise ValueError(f"the rules put {name} on mesh axis {axis!r}, which the mesh lacks; its axes "
                                     f"are {tuple(mesh.axis_names)}")
            split = math.prod(sizes[a] for a in _names(entry))
            count = units.get(name)
            if entry is not None and count is not None and count % split:
                if name not in self.replicate_if_uneven:
                    raise ValueError(f"{name} ({count}) is not divisible by mesh axis {entry!r} of size {split}; "
                                     f"pick a mesh whose {entry!r} size divides {count}, or map {name} elsewhere")
                entry = None  # documented fallback: replicated (docs/sharding.md)
            resolved[name] = entry
        if resolved["groups"] is not None and resolved["groups"] != resolved["heads"]:
            raise ValueError(f"groups ({resolved['groups']!r}) must go to the heads' mesh axis "
                             f"({resolved['heads']!r}) or nowhere: B and C must sit with the heads that read them")
        # each appears beside embed in some weight ([d, e], [v, d], [d, H hd], [d, f])
        for other in ("heads", "groups", "vocab", "attn_heads", "kv_heads", "mlp"):
            shared = set(_names(resolved[other])) & set(_names(resolved["embed"]))
            if shared:
                raise ValueError(f"{other} ({resolved[other]!r}) and embed ({resolved['embed']!r}) share mesh axis "
                                 f"{sorted(shared)[0]!r}; a weight holding both cannot be split twice over one axis")
        return MeshRules(mesh=mesh, **resolved)


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """`ShardingRules` resolved on one mesh for one model: each logical axis -> mesh axis entry or None.

    Hashable and static: a sharded model keeps one on its mixers and backbone (`mesh_rules`), to place its
    activation constraints, shard its cache and run Pallas kernels per shard.
    """

    mesh: Mesh
    batch: AxisEntry = None
    heads: AxisEntry = None
    groups: AxisEntry = None
    vocab: AxisEntry = None
    embed: AxisEntry = None
    attn_heads: AxisEntry = None
    kv_heads: AxisEntry = None
    mlp: AxisEntry = None
    experts: AxisEntry = None

    def spec(self, *logical: str | None) -> PartitionSpec:
        """The PartitionSpec of an array whose dimensions have these logical names (None: replicated)."""
        return PartitionSpec(*(None if name is None else getattr(self, name) for name in logical))

    def sharding(self, *logical: str | None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(*logical))

    def size(self, name: str) -> int:
        return math.prod(self.mesh.shape[a] for a in _names(getattr(self, name)))

    def partition_axis(self) -> PartitionAxis:
        """The cache's axes: rows over `batch`, the SSM state's heads over `heads`; conv channels replicated
        (the packed `[x | B | C]` channel axis does not split evenly along heads)."""
        return PartitionAxis(batch_axis=self.batch, head_axis=self.heads, kv_head_axis=self.kv_heads)

    def kernel_axes(self) -> MeshAxes:
        return MeshAxes(self.mesh, batch=self.batch, heads=self.heads, groups=self.groups)

    def check_batch(self, batch_size: int) -> None:
        split = self.size("batch")
        if batch_size % split:
            raise ValueError(f"batch size {batch_size} is not divisible by mesh axis {self.batch!r} of size {split} "
                             "that the rules shard the batch over; pad the batch or use a smaller data axis")


def constrain(x: jax.Array, rules: "MeshRules | None", *logical: str | None) -> jax.Array:
    """`x` constrained to the rules' layout for its logical dimensions; unchanged without rules."""
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, rules.sharding(*logical))


def constrain_spec(x: jax.Array, rules: "MeshRules | None", spec: PartitionSpec) -> jax.Array:
    """`x` constrained to `NamedSharding(rules.mesh, spec)`; unchanged without rules."""
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(rules.mesh, spec))


# ---- parameters ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamRules:
    """A model's parameters on one mesh: `spec(path, shape)` -> PartitionSpec, from the logical axes each
    parameter declares where it is made (`axes=` metadata) and the rules resolved for the mesh."""

    axes: dict                # {parameter path: its logical axes}
    rules: MeshRules

    def logical(self, path: tuple, shape: tuple) -> tuple[str | None, ...]:
        dotted = ".".join(str(p) for p in path)
        if path not in self.axes:
            raise ValueError(f"parameter {dotted} declares no logical axes, so easymamba does not know how to shard "
                             "it; give it `axes=(...)` (one logical axis or None per dimension) where it is made")
        axes = self.axes[path]
        if len(axes) != len(shape):
            raise ValueError(f"parameter {dotted} declares {len(axes)} logical axes {axes}, but it has shape "
                             f"{tuple(shape)}")
        unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
        if unknown:
            raise ValueError(f"parameter {dotted} declares logical axes {unknown}, not among {LOGICAL_AXES}")
        return axes

    def spec(self, path: tuple, shape: tuple) -> PartitionSpec:
        return self.rules.spec(*self.logical(path, shape))

    def sharding(self, path: tuple, shape: tuple) -> NamedSharding:
        return NamedSharding(self.rules.mesh, self.spec(path, shape))


def declared_axes(model) -> dict[tuple, tuple[str | None, ...]]:
    """{parameter path: the logical axes it declared where it was made} for `model` (concrete or abstract)."""
    return {path: tuple(var.get_metadata("axes"))
            for path, var in nnx.to_flat_state(nnx.state(model)) if var.get_metadata("axes", None) is not None}


def param_rules(model, config, mesh: Mesh, rules: ShardingRules | None = None) -> ParamRules:
    """`model`'s parameters (concrete or `nnx.eval_shape`-abstract) with `rules` (default `ShardingRules()`) on
    `mesh`; the divisibility rules count each logical axis by the model's `sharding_units(config)`."""
    units = getattr(type(model), "sharding_units", None)
    if units is None:
        raise TypeError(f"{type(model).__name__} has no sharding_units(config), so easymamba does not know how to "
                        "shard it (a family's causal LM has it from its record)")
    return ParamRules(declared_axes(model), (ShardingRules() if rules is None else rules).resolve(mesh, units(config)))


def attach(model, rules: MeshRules | None):
    """Tell every module of `model` that has a `mesh_rules` attribute (mixers, backbones) its mesh layout."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "mesh_rules"):
            module.mesh_rules = rules
    return model


def mesh_rules_of(model) -> MeshRules | None:
    """The `MeshRules` a sharded model carries (None for an unsharded one)."""
    for _, module in nnx.iter_modules(model):
        rules = getattr(module, "mesh_rules", None)
        if rules is not None:
            return rules
    return None


def _place(value, sharding: NamedSharding) -> jax.Array:
    """`value` laid out as `sharding`; under several processes each one builds only its own shards (every
    process holds the same value, as after the same deterministic construction)."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(jax.device_get(value)) if isinstance(value, jax.Array) else np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def param_shardings(model, mesh: Mesh, rules: ShardingRules | None = None) -> dict[tuple, NamedSharding]:
    """{parameter path: NamedSharding} for `model` (concrete or `nnx.eval_shape`-abstract) under the rules."""
    pr = param_rules(model, model.config, mesh, rules)
    return {path: pr.sharding(path, var.get_value().shape)
            for path, var in nnx.to_flat_state(nnx.state(model))}


def shard_model(model, mesh: Mesh, rules: ShardingRules | None = None):
    """Place every parameter of `model` as `NamedSharding(mesh, spec)` by the rules; returns `model`, updated
    in place, whose mixers and backbone now know the mesh (activation layout, cache, per-shard kernels).

    A model built on one device is moved shard by shard; to never hold a whole parameter on one device, build
    it with `init_sharded` or load it with `from_pretrained(path, mesh=mesh)` instead.
    """
    pr = param_rules(model, model.config, mesh, rules)
    state = nnx.state(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        flat.append((path, var.replace(_place(value, pr.sharding(path, value.shape)))))
    nnx.update(model, nnx.from_flat_state(flat))
    return attach(model, pr.rules)


def init_sharded(model_fn: Callable[[], Any], mesh: Mesh, rules: ShardingRules | None = None):
    """`model_fn()` (e.g. `lambda: Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0))`) built directly sharded.

    The model is traced abstractly (`nnx.eval_shape`), then its initialiser runs under `jax.jit` with each
    parameter's `NamedSharding` as `out_shardings`, so every device computes only its own shard. Random
    initialisers draw the bits the unsharded `model_fn()` draws (`jax_threefry_partitionable`, the default);
    the float math after them (erfinv, log) may round differently in the last bit, as any jitted init does.
    """
    abstract = nnx.eval_shape(model_fn)
    pr = param_rules(abstract, abstract.config, mesh, rules)
    graphdef, abstract_state = nnx.split(abstract)
    flat = [(path, var.replace(pr.sharding(path, var.get_value().shape)))
            for path, var in nnx.to_flat_state(abstract_state)]
    shardings = nnx.from_flat_state(flat)

    def init():
        return nnx.split(model_fn())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return attach(nnx.merge(graphdef, state), pr.rules)


def shard_batch(array, mesh: Mesh, rules: ShardingRules | None = None, *, batch_axis: int = 0) -> jax.Array:
    """A host array (ids, a mask: the same full value in every process) as a global array split over the
    batch axis of the rules (rows over `data`), other dimensions replicated. Works with one process or many."""
    host = np.asarray(array)
    entry = (ShardingRules() if rules is None else rules).batch
    spec = PartitionSpec(*([None] * batch_axis), entry)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda index: host[index])


__all__ = ["LOGICAL_AXES", "MeshRules", "ParamRules", "ShardingRules", "attach", "constrain", "declared_axes",
           "init_sharded", "make_mesh", "mesh_rules_of", "param_rules", "param_shardings", "shard_batch",
           "shard_model"]
