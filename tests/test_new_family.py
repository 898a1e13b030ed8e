"""A new family is its own code plus one entry in the family list: a toy hybrid, written entirely in this file.

The toy interleaves Mamba-2 blocks with a new block kind (a gated MLP with no state), as the hybrids do. It
names its config, block pattern, cache kinds, key table and checkpoint checks in one `ModelFamily` record (its
parameters declare their sharding axes where they are made) and is added to `easymamba.models.FAMILIES` (the
one list). Nothing in the library is edited, yet the shared code
builds it, runs prefill and `step` through its cache, generates, saves and loads it as an HF-style directory and
an orbax checkpoint, shards it and records its hooks. The checks here are of that wiring (each path against
another path of the library, bit for bit or to float32 rounding); the Mamba-2 mixer's numbers are tested
against transformers elsewhere.
"""

import dataclasses
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err

import easymamba as em
from easymamba.models import FAMILIES, Backbone, CausalLM, KeySpec, ModelFamily, ResidualBlock
from easymamba.models.common import sow_hook
from easymamba.models.family import EffectiveAttention
from easymamba.models.mamba2 import (
    Mamba2Block,
    mamba2_key_table,
    mamba2_mixer_facts,
    mamba2_operands,
    mamba2_sharding_units,
)

# ---- the family's own code ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyHybridConfig(em.Mamba2Config):
    """Mamba-2's fields; every `mlp_every`-th layer (1-based) is a gated MLP instead of a Mamba-2 mixer."""

    model_type = "toy_hybrid"
    mlp_every: int = 2

    @classmethod
    def from_hf(cls, cfg):
        cfg = dict(cfg)
        if cfg.pop("model_type", "toy_hybrid") != "toy_hybrid":
            raise ValueError("not a toy_hybrid config")
        mlp_every = cfg.pop("mlp_every")
        parent = em.Mamba2Config.from_hf(cfg)
        return cls(mlp_every=mlp_every,
                   **{f.name: getattr(parent, f.name) for f in dataclasses.fields(em.Mamba2Config)})

    def to_hf(self):
        return {**super().to_hf(), "model_type": "toy_hybrid", "architectures": ["ToyHybridForCausalLM"]}

    def is_mlp(self, i: int) -> bool:
        return (i + 1) % self.mlp_every == 0


# The family's cache kinds: Mamba-2's views, under the family's own name (a cache knows the model_type it fits).
@dataclasses.dataclass(frozen=True)
class ToyCacheMetaData(em.Mamba2CacheMetaData):
    MODEL_TYPE: ClassVar[str] = "toy_hybrid"


@jax.tree_util.register_pytree_with_keys_class
class ToyCacheView(em.Mamba2CacheView):
    METADATA: ClassVar[type] = ToyCacheMetaData


@jax.tree_util.register_pytree_with_keys_class
class ToyCache(em.Mamba2Cache):
    VIEW: ClassVar[type] = ToyCacheView
    FORMAT: ClassVar[str] = "easymamba.toy_hybrid_cache"


class GatedMLP(nnx.Module):
    """A stateless block kind: down(silu(gate(h)) * up(h)). It takes and returns the layer's view unchanged."""

    HOOKS = ("hook_mlp_out",)

    def __init__(self, config, *, layer_idx, rngs, dtype=jnp.float32, param_dtype=jnp.float32, kernel_impl="auto"):
        d, f = config.hidden_size, 2 * config.hidden_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # each parameter says how it shards, where it is made (the residual stream is `embed`; f stays whole here)
        self.gate_proj = nnx.Linear(d, f, kernel_metadata={"axes": ("embed", None)}, **kw)
        self.up_proj = nnx.Linear(d, f, kernel_metadata={"axes": ("embed", None)}, **kw)
        self.down_proj = nnx.Linear(f, d, kernel_metadata={"axes": (None, "embed")}, **kw)

    def __call__(self, hidden):
        out = self.down_proj(jax.nn.silu(self.gate_proj(hidden)) * self.up_proj(hidden))
        sow_hook(self, "hook_mlp_out", out)
        return out

    # the block's mixer protocol: the layer's view (unused by this stateless kind) passes through unchanged
    def run(self, hidden, view, **_):
        return self(hidden), view

    def run_step(self, hidden, view, **_):
        return self(hidden), view

    def decode_weights(self):
        return None


class GatedMLPBlock(ResidualBlock):
    MIXER = GatedMLP


class ToyHybridModel(Backbone):
    pass


class ToyHybridForCausalLM(CausalLM):
    pass


def toy_key_table(config) -> list[KeySpec]:
    mixer_keys = [spec for spec in mamba2_key_table(config) if ".mixer." not in spec.hf_name
                  or not config.is_mlp(int(spec.hf_name.split(".")[2]))]
    for i in range(config.num_hidden_layers):
        if config.is_mlp(i):
            for name in ("gate_proj", "up_proj", "down_proj"):
                mixer_keys.append(KeySpec(f"backbone.layers.{i}.mixer.{name}.weight",
                                          ("backbone", "layers", i, "mixer", name, "kernel"), "linear"))
    return mixer_keys


TOY = ModelFamily(
    model_type="toy_hybrid",
    config_class=ToyHybridConfig,
    causal_lm=ToyHybridForCausalLM,
    backbone=ToyHybridModel,
    blocks=lambda config: [GatedMLPBlock if config.is_mlp(i) else Mamba2Block
                           for i in range(config.num_hidden_layers)],
    cache_class=ToyCache,
    cache_metadata=ToyCacheMetaData,
    key_table=toy_key_table,
    mixer_facts=mamba2_mixer_facts,
    sharding_units=mamba2_sharding_units,
    effective_attention=EffectiveAttention(em.Mamba2Mixer, ("hook_conv", "hook_dt"), "heads (h)",
                                           lambda cfg: cfg.num_heads, mamba2_operands),
    hidden_states_with_embeddings=True,
)


# ---- the one list entry, and the library's shared paths on it ---------------------------------------------------

@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy_hybrid", TOY)
    config = ToyHybridConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_heads=4, head_dim=16,
                             state_size=8, n_groups=2, chunk_size=4, mlp_every=2, pad_token_id=0, eos_token_id=1,
                             bos_token_id=2)
    model = ToyHybridForCausalLM(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 9)), jnp.int32)
    return model, ids


def test_blocks_follow_the_pattern(toy):
    model, _ = toy
    kinds = [type(layer).__name__ for layer in model.backbone.layers]
    assert kinds == ["Mamba2Block", "GatedMLPBlock", "Mamba2Block", "GatedMLPBlock"]
    assert em.models.family_of(model) is TOY and em.models.family_of(model.config) is TOY


def test_prefill_then_steps_equal_the_full_forward(toy):
    model, ids = toy
    full = np.asarray(model(ids).logits)
    out = model(ids[:, :5], cache=model.init_cache(2))
    steps = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(5, ids.shape[1]):
        logits, cache = model.step(ids[:, t], cache)
        steps.append(np.asarray(logits)[:, None])
    # float32 rounding of the chunked scan against the recurrent decode update: 1e-5 relative
    assert rel_err(np.concatenate(steps, axis=1), full) <= 1e-5
    assert int(cache.seqlen_offset) == ids.shape[1]


def test_greedy_generate_equals_argmax_of_the_full_forward(toy):
    model, ids = toy
    seq = np.asarray(em.generate(model, ids[:, :4], max_new_tokens=5).sequences)
    for t in range(4, seq.shape[1]):  # each generated token is the argmax of the full forward before it
        want = np.argmax(np.asarray(model(jnp.asarray(seq[:, :t])).logits)[:, -1], -1)
        np.testing.assert_array_equal(seq[:, t], want)


def test_checkpoints_round_trip(toy, tmp_path):
    model, ids = toy
    em.save_pretrained(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "toy_hybrid"
    loaded = em.from_pretrained(tmp_path / "hf")
    assert type(loaded) is ToyHybridForCausalLM
    np.testing.assert_array_equal(np.asarray(loaded(ids).logits), np.asarray(model(ids).logits))
    em.save_checkpoint(model, tmp_path / "orbax")
    restored = em.load_checkpoint(tmp_path / "orbax")
    np.testing.assert_array_equal(np.asarray(restored(ids).logits), np.asarray(model(ids).logits))


def test_sharded_forward_and_hooks(toy):
    model, ids = toy
    want = np.asarray(model(ids).logits)
    mesh = em.make_mesh(data=2, model=2, devices=jax.devices()[:4])
    sharded = em.shard_model(nnx.clone(model), mesh)
    # the same float32 math split over devices (sums in another order): 1e-5 relative
    assert rel_err(np.asarray(sharded(ids).logits), want) <= 1e-5
    _, acts = em.run_with_cache(model, ids, names=lambda n: n.endswith(("hook_mlp_out", "hook_resid_post")))
    assert sorted(acts) == sorted([f"layers.{i}.mixer.hook_mlp_out" for i in (1, 3)]
                                  + [f"layers.{i}.hook_resid_post" for i in range(4)])
