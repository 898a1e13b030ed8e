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

`heads` must divide its mesh axis (an error otherwise); `groups` and `vocab` fall back to replicated, by rule
and documented (docs/sharding.md), never silently for any other axis. Everything else (the sequence, p, n, k)
is replicated. So the mixer is Megatron-style: in_proj column-parallel, the per-head conv, SSD and gated norm
local to each shard (the norm's per-group statistics are local when groups are sharded), out_proj
row-parallel (one all-reduce per layer); batch rows are data-parallel.

The parameter table is per family: a model class names its `logical_axes(config)` -> (table, units), where
the table maps module-path suffixes to one logical name per dimension and `units` counts each logical axis
(heads h, groups g, ...) for the divisibility rules. `MAMBA2_PARAM_AXES` is Mamba-2's, `MAMBA1_PARAM_AXES`
Mamba-1's: Mamba-1 has no heads, and its inner channels e (each with its own conv filter, A row, D, dt and state
row) play their part, so `heads` counts e there and the mixer is Megatron-style in the same way (in_proj
column-parallel, conv and scan local, x_proj and out_proj row-parallel with one all-reduce each).

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

LOGICAL_AXES = ("batch", "heads", "groups", "vocab", "embed")

# Mamba-2: module-path suffix -> one logical axis per parameter dimension (None: never sharded).
# The first matching suffix wins, so the mixer's own `norm` comes before the blocks' `norm`.
MAMBA2_PARAM_AXES: tuple[tuple[tuple[str, ...], tuple[str | None, ...]], ...] = (
    (("embeddings", "weight"), ("vocab", "embed")),                     # [v, d]
    (("lm_head", "kernel"), ("embed", "vocab")),                        # [d, v]
    (("in_proj", "z", "kernel"), ("embed", "heads")),                   # [d, e]
    (("in_proj", "x", "kernel"), ("embed", "heads")),                   # [d, e]
    (("in_proj", "B", "kernel"), ("embed", "groups")),                  # [d, g*n]
    (("in_proj", "C", "kernel"), ("embed", "groups")),                  # [d, g*n]
    (("in_proj", "dt", "kernel"), ("embed", "heads")),                  # [d, h]
    (("in_proj", "z", "bias"), ("heads",)),
    (("in_proj", "x", "bias"), ("heads",)),
    (("in_proj", "B", "bias"), ("groups",)),
    (("in_proj", "C", "bias"), ("groups",)),
    (("in_proj", "dt", "bias"), ("heads",)),
    (("conv1d", "x", "weight"), ("heads", None)),                       # [e, k]
    (("conv1d", "x", "bias"), ("heads",)),
    (("conv1d", "B", "weight"), ("groups", None)),                      # [g*n, k]
    (("conv1d", "B", "bias"), ("groups",)),
    (("conv1d", "C", "weight"), ("groups", None)),
    (("conv1d", "C", "bias"), ("groups",)),
    (("mixer", "dt_bias"), ("heads",)),                                 # [h]
    (("mixer", "A_log"), ("heads",)),
    (("mixer", "D"), ("heads",)),
    (("mixer", "norm", "weight"), ("heads",)),                          # [e], groups of whole heads
    (("out_proj", "kernel"), ("heads", "embed")),                       # [e, d]
    (("out_proj", "bias"), ("embed",)),
    (("norm", "weight"), ("embed",)),                                   # [d], the blocks' pre-norm
    (("norm_f", "weight"), ("embed",)),
)


def mamba2_logical_axes(config) -> tuple[tuple, dict[str, int]]:
    """Mamba-2's parameter table and the count of each logical axis (for the divisibility rules)."""
    units = {"heads": config.num_heads, "groups": config.n_groups, "vocab": config.vocab_size,
             "embed": config.hidden_size}
    return MAMBA2_PARAM_AXES, units


# Mamba-1 (easymamba/models/mamba1.py): `heads` is the inner channel axis e, `groups` does not occur (B and C are [n], shared
# by every channel, so they are replicated activations, not parameters).
MAMBA1_PARAM_AXES: tuple[tuple[tuple[str, ...], tuple[str | None, ...]], ...] = (
    (("embeddings", "weight"), ("vocab", "embed")),                     # [v, d]
    (("lm_head", "kernel"), ("embed", "vocab")),                        # [d, v]
    # [d, 2e], HF's packed [x | z]: an even split of 2e over M devices gives the first M/2 devices x and the rest
    # z, so the mixer re-shards x and z over e after the matmul (one exchange of [b, l, 2e] per layer on a mesh;
    # Mamba-2 avoids it by storing in_proj in parts, docs/mamba1.md)
    (("in_proj", "kernel"), ("embed", "heads")),
    (("in_proj", "bias"), ("heads",)),                                  # [2e]
    (("conv1d", "weight"), ("heads", None)),                            # [e, k]
    (("conv1d", "bias"), ("heads",)),                                   # [e]
    (("x_proj", "kernel"), ("heads", None)),                            # [e, r + 2n]: row-parallel
    (("dt_proj", "kernel"), (None, "heads")),                           # [r, e]
    (("dt_proj", "bias"), ("heads",)),                                  # [e]
    (("mixer", "A_log"), ("heads", None)),                              # [e, n]
    (("mixer", "D"), ("heads",)),                                       # [e]
    (("out_proj", "kernel"), ("heads", "embed")),                       # [e, d]: row-parallel
    (("out_proj", "bias"), ("embed",)),
    (("norm", "weight"), ("embed",)),                                   # [d], the blocks' pre-norm
    (("norm_f", "weight"), ("embed",)),
)


def mamba1_logical_axes(config) -> tuple[tuple, dict[str, int]]:
    """Mamba-1's parameter table and the count of each logical axis: `heads` counts the inner channels e."""
    units = {"heads": config.intermediate_size, "vocab": config.vocab_size, "embed": config.hidden_size}
    return MAMBA1_PARAM_AXES, units


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
    replicate_if_uneven: tuple[str, ...] = ("groups", "vocab")

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
        for other in ("heads", "groups", "vocab"):  # each appears beside embed in some weight ([d, e], [v, d])
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
        return PartitionAxis(batch_axis=self.batch, head_axis=self.heads)

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

def _logical_axes_of(model_or_class) -> Callable:
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    fn = getattr(cls, "logical_axes", None)
    if fn is None:
        raise TypeError(f"{cls.__name__} has no logical_axes(config) table, so easymamba does not know how to "
                        "shard it (see MAMBA2_PARAM_AXES in easymamba/sharding.py)")
    return fn


def _match(table, path: tuple) -> tuple[str | None, ...] | None:
    names = tuple(str(p) for p in path if not isinstance(p, int))
    for suffix, axes in table:
        if names[-len(suffix):] == suffix:
            return axes
    return None


@dataclasses.dataclass(frozen=True)
class ParamRules:
    """A model family's parameter table on one mesh: `spec(path, shape)` -> PartitionSpec."""

    table: tuple
    rules: MeshRules

    def logical(self, path: tuple, shape: tuple) -> tuple[str | None, ...]:
        axes = _match(self.table, path)
        dotted = ".".join(str(p) for p in path)
        if axes is None:
            raise ValueError(f"parameter {dotted} matches no entry of the sharding table; add one (its "
                             "module-path suffix and one logical axis per dimension)")
        if len(axes) != len(shape):
            raise ValueError(f"the sharding table gives parameter {dotted} {len(axes)} logical axes {axes}, but it "
                             f"has shape {tuple(shape)}")
        return axes

    def spec(self, path: tuple, shape: tuple) -> PartitionSpec:
        return self.rules.spec(*self.logical(path, shape))

    def sharding(self, path: tuple, shape: tuple) -> NamedSharding:
        return NamedSharding(self.rules.mesh, self.spec(path, shape))


def param_rules(model_or_class, config, mesh: Mesh, rules: ShardingRules | None = None) -> ParamRules:
    """The parameter table of `model_or_class`'s family with `rules` (default `ShardingRules()`) on `mesh`."""
    table, units = _logical_axes_of(model_or_class)(config)
    return ParamRules(table, (ShardingRules() if rules is None else rules).resolve(mesh, units))


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


__all__ = ["LOGICAL_AXES", "MAMBA1_PARAM_AXES", "MAMBA2_PARAM_AXES", "MeshRules", "ParamRules", "ShardingRules",
           "attach", "constrain", "init_sharded", "make_mesh", "mamba1_logical_axes", "mamba2_logical_axes",
           "mesh_rules_of", "param_rules", "param_shardings", "shard_batch", "shard_model"]
