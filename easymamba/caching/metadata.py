"""The static description of a cache: sizes and partition axes, checked once at construction.

`BaseCacheMetaData` holds what every family's metadata does (validation of the sizes, reading them from a model
config, the compatibility check that names the first size that differs, lossless dicts, and each leaf's shape,
dimension letters and dtype role, from which the views are built); `Mamba2CacheMetaData` adds the Mamba-2 sizes
and shapes, `easymamba.caching.mamba1.MambaCacheMetaData` the Mamba-1 ones and
`easymamba.caching.attention.AttentionCacheMetaData` an attention layer's key/value sizes.

Metadata is hashable and lives in the pytree's static part, so two caches with equal metadata share one compiled
function, and a cache built for another model or batch is refused by name.
"""

import dataclasses
import numbers
from typing import Any, ClassVar

from jax.sharding import PartitionSpec

from easymamba.caching import partition
from easymamba.caching.partition import PartitionAxis


@dataclasses.dataclass(frozen=True)
class BaseCacheMetaData:
    """Shared machinery of the cache metadata classes (not used on its own).

    A subclass declares its size fields (after `partition_axis`) and sets:
        SIZE_FIELDS   the size fields, in order (all positive ints)
        CONFIG_ATTRS  metadata field -> model config attribute it is read from (all but batch_size)
        LEAF_DIMS     leaf name -> dimension letters (for shape checks, specs and error messages)
        LEAF_DTYPES   leaf name -> dtype role: "dtype" (the cache dtype the view is built with), "ssm_dtype" (the
                      SSM state's), or a fixed "int32" / "bool"
        MODEL_TYPE    the `model_type` of the configs it fits ("mamba2", "mamba"); a config that states another
                      one is refused even if the sizes happen to agree
    and defines `view_specs()` (one PartitionSpec per leaf its view lists in `SPEC_LEAVES`, in that order) and,
    if it has any, `_check_sizes()`. The defaults of `LEAF_DTYPES` and `leaf_shapes()` are the SSM views' (conv
    window, SSM state, positions, offset from `conv_state_shape` / `ssm_state_shape`); a family with other
    leaves overrides both.
    """

    partition_axis: PartitionAxis

    SIZE_FIELDS: ClassVar[tuple[str, ...]] = ()
    CONFIG_ATTRS: ClassVar[dict[str, str]] = {}
    LEAF_DIMS: ClassVar[dict[str, tuple[str, ...]]] = {}
    LEAF_DTYPES: ClassVar[dict[str, str]] = {
        "conv_states": "dtype",
        "ssm_states": "ssm_dtype",
        "positions": "int32",
        "seqlen_offset": "int32",
    }
    MODEL_TYPE: ClassVar[str] = ""

    def __post_init__(self):
        if not isinstance(self.partition_axis, PartitionAxis):
            raise ValueError(f"partition_axis must be a PartitionAxis; got {self.partition_axis!r}")
        for name in self.SIZE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy ints -> int, so the metadata hashes and serializes
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Relations between sizes (a subclass's); raise ValueError naming them."""

    @classmethod
    def _sizes_from_config(cls, config: Any) -> dict[str, int]:
        sizes = {}
        for field, attr in cls.CONFIG_ATTRS.items():
            if not hasattr(config, attr):
                raise ValueError(f"config {type(config).__name__} has no attribute {attr!r}, needed for {field}")
            sizes[field] = getattr(config, attr)
        return sizes

    @classmethod
    def from_config(cls, config: Any, batch_size: int, partition_axis: PartitionAxis = PartitionAxis()):
        """Metadata for `config` (anything with the model config's attribute names) and `batch_size` rows."""
        return cls.create(partition_axis, batch_size=batch_size, **cls._sizes_from_config(config))

    @classmethod
    def create(cls, partition_axis: PartitionAxis = PartitionAxis(), **sizes: int):
        """Validated metadata from `partition_axis` and the size fields (subclasses spell them out)."""
        return cls(partition_axis=partition_axis, **sizes)

    @property
    def positions_shape(self) -> tuple[int]:
        return (self.batch_size,)  # (b,)

    def leaf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Leaf name -> shape, for every leaf in `LEAF_DIMS` (the SSM views' leaves by default)."""
        return {
            "conv_states": self.conv_state_shape,
            "ssm_states": self.ssm_state_shape,
            "positions": self.positions_shape,
            "seqlen_offset": (),
        }

    def view_specs(self) -> tuple[PartitionSpec, ...]:
        """The default PartitionSpecs from `partition_axis`, one per leaf of the view's `SPEC_LEAVES` (for the SSM
        views `(conv, ssm, positions)`)."""
        raise NotImplementedError

    def check_compatible(self, other: Any, batch_size: int | None = None) -> None:
        """Raise `ValueError` naming the first size where this cache and `other` disagree.

        `other` is another metadata of the same class or a model config (read as in `from_config`). For a config,
        `batch_size` is the batch the model is called with; `None` skips the batch check. The partition axes
        are not compared: they change where the numbers live, not what they are.
        """
        if isinstance(other, BaseCacheMetaData):
            if type(other) is not type(self):
                raise ValueError(
                    f"the cache does not fit this model: it was built from a {type(self).__name__}, "
                    f"but the model needs a {type(other).__name__}"
                )
            expected = {name: getattr(other, name) for name in self.SIZE_FIELDS}
        else:
            model_type = getattr(other, "model_type", None)
            if isinstance(model_type, str) and model_type != self.MODEL_TYPE:
                raise ValueError(
                    f"the cache does not fit this model: it was built for model_type {self.MODEL_TYPE!r}, "
                    f"but the model's config has model_type {model_type!r}"
                )
            expected = self._sizes_from_config(other)
        if batch_size is not None:
            expected["batch_size"] = batch_size
        for name in self.SIZE_FIELDS:
            if name in expected and expected[name] != getattr(self, name):
                raise ValueError(
                    f"the cache does not fit this model: it was built with {name}={getattr(self, name)}, "
                    f"but the model needs {name}={expected[name]}"
                )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"partition_axis": self.partition_axis.to_dict()}
        d.update({name: getattr(self, name) for name in self.SIZE_FIELDS})
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "metadata"):
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a dict; got {type(d).__name__}")
        names = ("partition_axis", *cls.SIZE_FIELDS)
        missing = [name for name in names if name not in d]
        if missing:
            raise ValueError(f"{where} is missing fields {missing}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{where} has unknown fields {unknown}; expected {list(names)}")
        partition_axis = PartitionAxis.from_dict(d["partition_axis"], f"{where}.partition_axis")
        try:
            return cls.create(partition_axis, **{name: d[name] for name in cls.SIZE_FIELDS})
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True)
class Mamba2CacheMetaData(BaseCacheMetaData):
    """Sizes of one Mamba-2 cache (EasyDeL's field names) and how it is sharded.

    Shapes it implies (letters of `easymamba/typing.py`): conv window `[b, c, k]` with
    `c = conv_dim = intermediate_size + 2 * n_groups * state_size`, SSM state `[b, h, p, n]`, positions `[b]`.
    Construction validates (see `create`); an invalid instance cannot exist.
    """

    num_hidden_layers: int
    batch_size: int
    intermediate_size: int
    num_heads: int
    head_dim: int
    state_size: int
    conv_kernel_size: int
    n_groups: int

    SIZE_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_hidden_layers",
        "batch_size",
        "intermediate_size",
        "num_heads",
        "head_dim",
        "state_size",
        "conv_kernel_size",
        "n_groups",
    )
    # Config attribute read for each metadata field (Hugging Face `Mamba2Config` names).
    CONFIG_ATTRS: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_hidden_layers",
        "intermediate_size": "intermediate_size",
        "num_heads": "num_heads",
        "head_dim": "head_dim",
        "state_size": "state_size",
        "conv_kernel_size": "conv_kernel",
        "n_groups": "n_groups",
    }
    LEAF_DIMS: ClassVar[dict[str, tuple[str, ...]]] = {
        "conv_states": partition.CONV_DIMS,
        "ssm_states": partition.SSM_DIMS,
        "positions": partition.POSITIONS_DIMS,
        "seqlen_offset": (),
    }
    MODEL_TYPE: ClassVar[str] = "mamba2"

    def _check_sizes(self) -> None:
        h, p, e = self.num_heads, self.head_dim, self.intermediate_size
        if h * p != e:
            fixes = [f"intermediate_size={h * p}"]  # the SSM heads fix e = h * p; each of the three may be wrong
            fixes += [f"num_heads={e // p}"] if e % p == 0 else []
            fixes += [f"head_dim={e // h}"] if e % h == 0 else []
            raise ValueError(
                f"num_heads * head_dim ({h} * {p} = {h * p}) must equal intermediate_size ({e}); change one of "
                f"them: {' or '.join(fixes)} (intermediate_size is expand * hidden_size of the model config)"
            )
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by n_groups ({self.n_groups}): "
                "each group of B/C serves num_heads // n_groups heads"
            )

    @classmethod
    def create(
        cls,
        partition_axis: PartitionAxis = PartitionAxis(),
        *,
        num_hidden_layers: int,
        batch_size: int,
        intermediate_size: int,
        num_heads: int,
        head_dim: int,
        state_size: int,
        conv_kernel_size: int,
        n_groups: int,
    ) -> "Mamba2CacheMetaData":
        """Validated metadata. Raises `ValueError` when a size is not a positive int, when
        `num_heads * head_dim != intermediate_size`, or when `n_groups` does not divide `num_heads`."""
        return cls(
            partition_axis=partition_axis,
            num_hidden_layers=num_hidden_layers,
            batch_size=batch_size,
            intermediate_size=intermediate_size,
            num_heads=num_heads,
            head_dim=head_dim,
            state_size=state_size,
            conv_kernel_size=conv_kernel_size,
            n_groups=n_groups,
        )

    @classmethod
    def from_config(
        cls, config: Any, batch_size: int, partition_axis: PartitionAxis = PartitionAxis()
    ) -> "Mamba2CacheMetaData":
        """Metadata for `config` (anything with `Mamba2Config`'s attribute names) and `batch_size` rows."""
        return super().from_config(config, batch_size, partition_axis)

    @property
    def conv_dim(self) -> int:
        """`c`: the conv channels `[x | B | C]`, `intermediate_size + 2 * n_groups * state_size`."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def conv_state_shape(self) -> tuple[int, int, int]:
        return (self.batch_size, self.conv_dim, self.conv_kernel_size)  # (b, c, k)

    @property
    def ssm_state_shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, self.num_heads, self.head_dim, self.state_size)  # (b, h, p, n)

    def view_specs(self) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
        """`partition_axis.view_specs()`: conv `[b, c, k]`, SSM `[b, h, p, n]`, positions `[b]`."""
        return self.partition_axis.view_specs()
