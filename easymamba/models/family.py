"""What a model family is: one record, consulted everywhere a family matters.

A family is a config class, the causal LM built from it, the cache its layers keep, the checkpoint key table
that names its tensors as Hugging Face does, its sharding table and what the effective attention reads from its
mixers. Everything else (the residual blocks, the backbone, the output head, the decode step, the loaders, the
decode loop) is shared code that reads this record. The families easymamba knows are the list in
`easymamba/models/__init__.py`; adding one is its own files plus one entry there (docs/architecture.md).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

__all__ = ["KeySpec", "packed_key", "linear_keys", "Operands", "EffectiveAttention", "ModelFamily", "ties_lm_head"]


def ties_lm_head(config) -> bool:
    """Whether the model's LM head reuses the embedding matrix: `tie_word_embeddings`, unless the family's
    config says otherwise (`ties_lm_head`: transformers' Nemotron-H keeps its own head whatever the flag)."""
    return bool(getattr(config, "ties_lm_head", config.tie_word_embeddings))


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """One tensor of a checkpoint: its Hugging Face name, the module path that holds it here, its layout kind.

    kind: "linear" (torch `[out, in]` <-> flax kernel `[in, out]`), "stacked_linear" (torch `[E, out, in]` <->
    flax `[E, in, out]`: experts stacked in one tensor), "conv" (torch `[c, 1, k]` <-> flax `[c, k]`) or "copy"
    (same layout).
    index: the tensor is entry `index` of a parameter stacked along its first axis (one expert of a mixture of
    experts, which HF saves one tensor per expert and the model keeps as one (E, ...) parameter); `kind`
    applies to the entry.
    """

    hf_name: str        # e.g. "backbone.layers.3.mixer.norm.weight"
    path: tuple         # attribute path in the flax model, ints index nnx.List; () for a packed tensor
    kind: str           # "linear" | "stacked_linear" | "conv" | "copy"
    # A tensor HF packs: (module path, length) of each part along the packed axis, in HF's order. The packed
    # axis is HF's out features or channels, i.e. the flax kernel's last axis for "linear" and "stacked_linear".
    parts: tuple[tuple[tuple, int], ...] = ()
    index: int | None = None

    @property
    def targets(self) -> tuple[tuple, ...]:
        """The module paths of the parameters this HF tensor fills (one, or one per part)."""
        return tuple(path for path, _ in self.parts) if self.parts else (self.path,)


def packed_key(hf_name: str, kind: str, at: tuple, leaf: str, sizes: dict[str, int]) -> KeySpec:
    """A tensor HF packs from parts the model keeps apart: `at + (part, leaf)` for each part, in `sizes`' order."""
    return KeySpec(hf_name, (), kind, tuple((at + (name, leaf), size) for name, size in sizes.items()))


def linear_keys(hf: str, at: tuple, bias: bool = False) -> list[KeySpec]:
    """An `nn.Linear` named `hf` held at module path `at`: its weight, and its bias when it has one."""
    table = [KeySpec(hf + ".weight", at + ("kernel",), "linear")]
    if bias:
        table.append(KeySpec(hf + ".bias", at + ("bias",), "copy"))
    return table


class Operands(NamedTuple):
    """One SSM layer's operands as the effective attention reads them, in the compute dtype. `h` here counts the
    channels of the decay: Mamba-2's heads, Mamba-1's inner channels (e of them, one group)."""
    dt: jax.Array                                                     # (b, l, h) step sizes
    A: jax.Array                                                      # (h,) per channel, or (h, n) per state too
    B: jax.Array                                                      # (b, l, g, n); channel c reads group c // (h/g)
    C: jax.Array                                                      # (b, l, g, n)


@dataclasses.dataclass(frozen=True)
class EffectiveAttention:
    """What the effective attention (`easymamba.interp`) reads from one SSM mixer kind: the mixer hooks its
    operands come from (in the order `operands` takes them, after the config and before A = -exp(A_log)), the
    name of M's channel axis and how many channels a config has."""
    mixer: type
    hooks: tuple[str, ...]
    channel_axis: str
    num_channels: Callable[[Any], int]
    operands: Callable[..., Operands]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family.

    model_type       HF's `config.json` `model_type` ("mamba2", "mamba"); also the config class's `model_type`
    config_class     the frozen config dataclass (`from_hf`, `to_hf`)
    causal_lm        the causal LM class built from it (`Mamba2ForCausalLM`, ...), and its backbone
    backbone         (`Mamba2Model`, ...): both are the shared classes of `causal_lm.py` with this record
    blocks           config -> one block class per layer (the layer pattern); each is called
                     `block(config, layer_idx=, rngs=, dtype=, param_dtype=, kernel_impl=)`
    cache_class      the cache `init_cache` builds, and its metadata class (`from_config`)
    cache_metadata
    key_table        config -> every HF tensor as a `KeySpec`, in HF's `state_dict()` order
    mixer_facts      (config, shape_of) -> (field, config value, tensor, implied value) for each mixer size the
                     layer-0 tensors contradict (the embedding, layer count, biases and head are shared)
    sharding_units   config -> {logical axis: count} for the sharding rules' divisibility checks (the parameters
                     declare their axes where they are made; `easymamba.sharding`)
    effective_attention   what `compute_effective_attention` reads from this family's SSM mixers
    hidden_states_with_embeddings   `output_hidden_states` as the pinned transformers returns it for this family:
                     True: (embeddings, block 0 .. n-2 outputs, final normed state); False: (block 0 .. n-1
                     outputs, final normed state). n + 1 entries either way.
    embedding_multiplier   config -> the factor the looked-up embedding rows are multiplied by (muP; not applied
                     to `inputs_embeds`, as HF), or None for none
    logits_multiplier      config -> the factor the output head's logits are multiplied by, or None for none
    multiplies_inputs_embeds   whether `inputs_embeds` are multiplied by the embedding multiplier too (Granite's
                     HF model multiplies whatever enters layer 0; Falcon-H1's only looked-up rows)
    carried_prefixes   config -> the name prefixes of checkpoint tensors the network does not run but a
                     checkpoint holds (Nemotron-H's multi-token-prediction layers, "mtp."): read as they are into
                     `CausalLM.carried_tensors` and written back unchanged, so they load and round-trip
    """

    model_type: str
    config_class: type
    causal_lm: type
    backbone: type
    blocks: Callable[[Any], list[type]]
    cache_class: type
    cache_metadata: type
    key_table: Callable[[Any], list[KeySpec]]
    mixer_facts: Callable
    sharding_units: Callable[[Any], dict[str, int]]
    effective_attention: EffectiveAttention
    hidden_states_with_embeddings: bool = False
    embedding_multiplier: Callable[[Any], float] | None = None
    logits_multiplier: Callable[[Any], float] | None = None
    multiplies_inputs_embeds: bool = False
    carried_prefixes: Callable[[Any], tuple[str, ...]] = lambda config: ()

    def __post_init__(self):
        # The classes find their record here: the record is written after them, in the family's own file.
        self.causal_lm.family = self
        self.backbone.family = self
