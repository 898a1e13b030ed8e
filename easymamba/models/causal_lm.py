"""The family-neutral parts of every model: the residual block, the backbone, the causal LM and its loss.

A model is a list of blocks, each a kind (a Mamba-2 mixer, a Mamba-1 mixer, and what the hybrids add) chosen by
the family's record (`easymamba.models.family.ModelFamily.blocks`). Official counterparts:
`mamba_ssm/models/mixer_seq_simple.py` (`MixerModel`, `MambaLMHeadModel`), `mamba_ssm/modules/block.py`, and HF's
`Mamba2Model` / `Mamba2ForCausalLM`, whose module names these keep:

    <Family>ForCausalLM (CausalLM)
      backbone: <Family>Model (Backbone)
        embeddings: Embedding [v, d]
        layers[i]: a block kind (ResidualBlock: norm [d], mixer)
        norm_f: RMSNorm [d]
      lm_head: Linear [d, v]   (absent when tie_word_embeddings: the embedding matrix is reused)

Two entry points, as mamba_ssm's `forward` and `step`:
- `__call__` keeps HF's signature (input_ids, attention_mask, cache, labels, inputs_embeds,
  output_hidden_states): a whole sequence, or with a cache a chunked prefill that continues from its state. A
  one-token call with a cache delegates to `step`.
- `step(tokens [b], cache)` is one decode step: it owns the fused decode kernel, the rows the decode loop
  holds (`active_rows`), the weights it prepares once (`decode_weights()`), and the cache counters.
"""

import weakref
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from easymamba.config.common import check_resource_bounds
from easymamba.layers import Embedding, is_concrete, normal_init
from easymamba.models.attention import position_ids_from_mask
from easymamba.models.common import as_array, check_attention_mask, check_left_padded, norm_folded, sow_hook
from easymamba.models.compiled import CompiledLM
from easymamba.models.family import ties_lm_head
from easymamba.norms import RMSNorm
from easymamba.sharding import MeshRules, constrain

__all__ = ["ResidualBlock", "Backbone", "CausalLM", "Mamba2Output", "Mamba2CausalLMOutput", "causal_lm_loss",
           "causal_lm_loss_sum", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@struct.dataclass
class Mamba2Output:
    last_hidden_state: jax.Array                     # (b, l, d)
    cache: object | None = None
    hidden_states: tuple[jax.Array, ...] | None = None  # n_layers + 1 of (b, l, d), in the family's order


@struct.dataclass
class Mamba2CausalLMOutput:
    logits: jax.Array                                # (b, l, v) float32
    loss: jax.Array | None = None                    # scalar float32
    cache: object | None = None
    hidden_states: tuple[jax.Array, ...] | None = None  # n_layers + 1 of (b, l, d), in the family's order


class ResidualBlock(nnx.Module):
    """Pre-norm residual block around one mixer: `h + mixer(norm(h))`, the residual kept in float32 if the
    config's `residual_in_fp32`. A block kind names its mixer class (`MIXER`) and, for a hybrid family, the
    settings record the mixer is built from (`mixer_config(config)`; the whole config by default). The mixer's
    state lives in the layer's cache view, which this block hands to the mixer and returns renewed.

    A mixer kind offers the view protocol: `run(hidden, view, attention_mask=, position_ids=) -> (out, view)`,
    `run_step(hidden (b, 1, d), view, attention_mask=, position_ids=, active_rows=, decode_weights=)` and
    `decode_weights()`. The SSM mixers get it from `easymamba.models.common.SSMViewMixer`, the attention from
    `easymamba.models.attention`, the stateless parts (MLP, MoE) pass their view (None) through.

    Hook point: `hook_resid_post` (b, l, d), the block output (see `easymamba.interp.run_with_cache`).
    """

    HOOKS = ("hook_resid_post",)
    MIXER: ClassVar[type]

    def __init__(self, config, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_impl: str = "auto"):
        self.residual_in_fp32 = bool(getattr(config, "residual_in_fp32", False))
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, param_dtype=param_dtype)
        self.mixer = self.MIXER(self.mixer_config(config), layer_idx=layer_idx, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype, kernel_impl=kernel_impl)
        self.mesh_rules: MeshRules | None = None  # set by easymamba.sharding when the model is sharded

    @classmethod
    def mixer_config(cls, config):
        """The settings the mixer is built from: the family config itself (Mamba-2, Mamba-1), or one of a
        hybrid config's part records (`easymamba.config.parts`)."""
        return config

    # Rematerialise this block in the backward pass (`jax.checkpoint` through `nnx.remat`): its activations are
    # recomputed from its input instead of being kept. Off by default; `easymamba.train.make_train_step(remat=True)`
    # turns it on for the copy of the model it differentiates.
    remat: bool = False

    @property
    def takes_packed(self) -> bool:
        """Whether this block takes packed sequences (`seq_idx`): its mixer's class says so (`PACKED`)."""
        return bool(getattr(self.mixer, "PACKED", False))

    def __call__(self, hidden: jax.Array, *, attention_mask=None, view=None, position_ids=None, embeddings=None,
                 seq_idx=None):
        """hidden (b, l, d), the layer's cache view or None -> (hidden (b, l, d), the renewed view or None).
        `position_ids` (b, l) reach position-aware mixers (attention); `embeddings` (the backbone's input, for
        families whose blocks read it) is unused here; `seq_idx` (b, l) int marks packed sequences."""
        del embeddings
        if self.remat:
            return nnx.remat(type(self)._forward)(self, hidden, attention_mask, view, position_ids, seq_idx)
        return self._forward(hidden, attention_mask, view, position_ids, seq_idx)

    def _forward(self, hidden, attention_mask, view, position_ids, seq_idx=None):
        residual, normed = self._pre(hidden)
        out, view = self.mixer.run(normed, view, attention_mask=attention_mask, position_ids=position_ids,
                                   seq_idx=seq_idx)
        return self._post(residual, out), view

    def step(self, hidden: jax.Array, view, *, attention_mask=None, active_rows=None, decode_weights=None,
             position_ids=None, embeddings=None):
        """One token: hidden (b, 1, d), the layer's view -> (hidden (b, 1, d), the renewed view)."""
        del embeddings
        # with the norm folded into the mixer's prepared in_proj, its fused decode step normalises in its kernel
        residual, normed = self._pre(hidden, folded=norm_folded(decode_weights) and attention_mask is None)
        out, view = self.mixer.run_step(normed, view, attention_mask=attention_mask, position_ids=position_ids,
                                        active_rows=active_rows, decode_weights=decode_weights)
        return self._post(residual, out), view

    def decode_weights(self):
        """The mixer's weights prepared once for a decode loop (`Backbone.decode_weights`), or None. A mixer that
        can take this block's RMS norm into its decode step (`FOLDS_PRE_NORM`: the Mamba-2 mixer's fused kernel)
        gets the norm, and its weights then say so (`"rms_eps"`, read by `step`)."""
        if getattr(self.mixer, "FOLDS_PRE_NORM", False) and type(self.norm) is RMSNorm and self.norm.dtype is None:
            return self.mixer.decode_weights(pre_norm=self.norm)
        return self.mixer.decode_weights()

    def _pre(self, hidden, folded: bool = False):
        """(residual, the mixer's input): the norm's output, or with `folded` the input in the norm's dtype (the
        mixer applies the norm itself: `decode_weights`)."""
        residual = hidden.astype(jnp.float32) if self.residual_in_fp32 else hidden
        x = hidden.astype(self.norm.weight.dtype)
        return residual, x if folded else self.norm(x)

    def _post(self, residual, out):
        hidden = residual + out
        sow_hook(self, "hook_resid_post", hidden)
        return hidden


class Backbone(nnx.Module):
    """Embeddings, the family's blocks and the final norm (HF `Mamba2Model`, `MambaModel`). A family's backbone
    (`Mamba2Model`, ...) is this class with the family's record as `family`.

    The embeddings (or `inputs_embeds`) are multiplied by the config's `embedding_multiplier` when it has one
    (default 1).

    Hook point: `hook_embed` (b, l, d), the embeddings (or `inputs_embeds`) entering layer 0.
    """

    HOOKS = ("hook_embed",)
    family: ClassVar  # the ModelFamily, set by the family's record

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_impl: str = "auto"):
        family = self.family
        if not isinstance(config, family.config_class):
            raise TypeError(f"{type(self).__name__} needs a {family.config_class.__name__}, got "
                            f"{type(config).__name__}")
        if config.model_type != family.model_type:  # a subclass's config is another family's (FalconMambaConfig)
            raise TypeError(f"{type(self).__name__} needs a {family.config_class.__name__} of model_type "
                            f"{family.model_type!r}, got a {type(config).__name__} of model_type "
                            f"{config.model_type!r}")
        check_resource_bounds(config)  # a bomb of a config is refused here, before any parameter is built
        self.config = config
        self.dtype = dtype
        self.mesh_rules: MeshRules | None = None  # set by easymamba.sharding when the model is sharded
        self.embeddings = Embedding(config.vocab_size, config.hidden_size, init_std=config.initializer_range,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            block(config, layer_idx=i, rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_impl=kernel_impl)
            for i, block in enumerate(family.blocks(config))
        ])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, param_dtype=param_dtype)

    @classmethod
    def sharding_units(cls, config) -> dict[str, int]:
        """The family's count of each logical axis, for the sharding rules (`easymamba.sharding`)."""
        return cls.family.sharding_units(config)

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """The embedding rows of `input_ids`, times the family's `embedding_multiplier` when it has one."""
        hidden = self.embeddings(input_ids)
        multiplier = self.family.embedding_multiplier
        return hidden if multiplier is None else hidden * multiplier(self.config)

    def init_cache(self, batch_size: int, *, max_length: int | None = None, dtype=None, ssm_dtype=jnp.float32,
                   partition_axis=None, mesh=None):
        """A zero cache for this model: conv windows and key/value slots in `dtype` (default the model dtype),
        SSM states float32. `max_length` (tokens the cache will hold, prompt included) is required by families
        with attention layers, whose key/value views are preallocated; a pure SSM cache does not grow and
        ignores it.

        A sharded model (`easymamba.sharding`) defaults `partition_axis` to its rules' and `mesh` to its mesh, so
        the cache is created sharded as the forward keeps it.
        """
        rules = self.mesh_rules
        if rules is not None:
            partition_axis = rules.partition_axis() if partition_axis is None else partition_axis
            mesh = rules.mesh if mesh is None else mesh
        kwargs = {} if partition_axis is None else {"partition_axis": partition_axis}
        dtype = self.dtype if dtype is None else dtype
        family = self.family
        if hasattr(self.config, "layer_cache_kinds"):  # a hybrid family: one view kind per layer part
            meta = family.cache_metadata.from_config(self.config, batch_size, max_length=max_length, **kwargs)
            return family.cache_class.init_cache(meta, dtype=dtype, ssm_dtype=ssm_dtype, mesh=mesh)
        meta = family.cache_metadata.from_config(self.config, batch_size, **kwargs)
        return family.cache_class.init_cache(self.config.num_hidden_layers, meta, dtype=dtype, mesh=mesh,
                                             ssm_dtype=ssm_dtype)

    @property
    def uses_positions(self) -> bool:
        """Whether some layer reads token positions (an attention layer)."""
        kinds = getattr(self.config, "layer_cache_kinds", ())
        return any("attention" in layer for layer in kinds)

    def _check_cache(self, cache, batch_size: int) -> None:
        cache_class = self.family.cache_class
        if not isinstance(cache, cache_class):
            raise ValueError(f"cache must be a {cache_class.__name__} (model.init_cache({batch_size})) for this "
                             f"{type(self).__name__}; got {type(cache).__name__}")
        cache.check_compatible(self.config, batch_size)
        empty = cache.missing_layers()
        if empty:
            raise ValueError(f"cache layer(s) {empty[:8]} hold no state (an init_empty cache?); build one with "
                             f"model.init_cache({batch_size})")

    def _positions(self, position_ids, attention_mask, cache, b: int, l: int):
        """The rotary positions (b, l) of this call's tokens, counted in real tokens (None when no layer needs
        them): given, or from the mask and the real tokens the cache has seen."""
        if not self.uses_positions:
            return None
        if position_ids is not None:
            position_ids = jnp.asarray(position_ids)
            if position_ids.shape != (b, l):
                raise ValueError(f"position_ids must have shape {(b, l)} (batch, seq_len); got {position_ids.shape}")
            return position_ids.astype(jnp.int32)
        start = None if cache is None else _real_tokens(cache)
        return position_ids_from_mask(attention_mask, b, l, start)

    @property
    def takes_packed(self) -> bool:
        """Whether every layer takes packed sequences (`seq_idx`; the Mamba-2 mixer, attention, MLP and MoE do)."""
        return all(getattr(layer, "takes_packed", False) for layer in self.layers)

    def _segments(self, seq_idx, position_ids, attention_mask, cache, b: int, l: int):
        """The packed-sequence ids (b, l) int32 of this call, or None. Given as `seq_idx`, or read from
        `position_ids` in Hugging Face's packing convention (`DataCollatorWithFlattening`: positions restart at 0
        where a sequence starts) when the model takes packed sequences and the call has no cache and no mask."""
        if seq_idx is None:
            if position_ids is None or cache is not None or attention_mask is not None or not self.takes_packed:
                return None
            return seq_idx_from_position_ids(jnp.asarray(position_ids).reshape(b, l))
        if not self.takes_packed:
            raise ValueError(f"this {self.family.model_type} model does not take packed sequences (seq_idx): its "
                             f"layers are not all Mamba-2, attention, MLP or MoE blocks; run each sequence as its "
                             f"own row")
        if cache is not None:
            raise ValueError("seq_idx (packed sequences) is for a forward without a cache; got a cache")
        seq_idx = jnp.asarray(seq_idx)
        if seq_idx.shape != (b, l) or not jnp.issubdtype(seq_idx.dtype, jnp.integer):
            raise ValueError(f"seq_idx must be an integer array of shape {(b, l)} (batch, seq_len), one segment id "
                             f"per token; got shape {seq_idx.shape}, dtype {seq_idx.dtype}")
        return seq_idx.astype(jnp.int32)

    def __call__(self, input_ids=None, *, attention_mask=None, cache=None, inputs_embeds=None,
                 output_hidden_states: bool = False, position_ids=None, seq_idx=None) -> Mamba2Output:
        """A sequence (b, l), or with `cache` its continuation from the cache's state (chunked prefill; one token
        is a decode step). `output_hidden_states` follows the pinned transformers for the family (its record's
        `hidden_states_with_embeddings`). `seq_idx` (b, l) int, or `position_ids` that restart at 0: packed
        sequences, each computed as if alone (`_segments`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (b, l) and inputs_embeds (b, l, d)")
        input_ids, inputs_embeds = as_array(input_ids, "input_ids"), as_array(inputs_embeds, "inputs_embeds")
        attention_mask = as_array(attention_mask, "attention_mask")
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {input_ids.shape}")
        d = self.config.hidden_size
        if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != d):
            raise ValueError(f"inputs_embeds must have shape (batch, seq_len, {d}), got {inputs_embeds.shape}")
        b, l = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if attention_mask is not None:
            attention_mask = check_attention_mask(attention_mask, b, l)
        if cache is not None:  # before any work: a wrong cache is refused by name, not by a shape error later
            self._check_cache(cache, b)
        seq_idx = self._segments(seq_idx, position_ids, attention_mask, cache, b, l)
        rules = self.mesh_rules
        if rules is not None:
            rules.check_batch(b)
        if input_ids is not None:
            hidden = self._embed(input_ids)                                                      # (b, l, d)
        else:
            hidden = inputs_embeds.astype(self.dtype)
            multiplier = self.family.embedding_multiplier
            if multiplier is not None and self.family.multiplies_inputs_embeds:
                hidden = hidden * multiplier(self.config)
        hidden = constrain(hidden, rules, "batch", None, "embed")
        sow_hook(self, "hook_embed", hidden)
        position_ids = self._positions(position_ids, attention_mask, cache, b, l)
        packed = {} if seq_idx is None else {"seq_idx": seq_idx}

        embeddings = hidden
        outputs = [hidden] if output_hidden_states else None
        views = []
        for i, layer in enumerate(self.layers):
            hidden, view = layer(hidden, attention_mask=attention_mask, view=None if cache is None else cache.views[i],
                                 position_ids=position_ids, embeddings=embeddings, **packed)
            hidden = constrain(hidden, rules, "batch", None, "embed")
            views.append(view)
            if outputs is not None:
                outputs.append(hidden)
        hidden = self.norm_f(hidden)
        all_hidden = None
        if outputs is not None:  # the entries the pinned transformers returns for this family, in its order
            kept = outputs[:-1] if self.family.hidden_states_with_embeddings else outputs[1:]
            all_hidden = (*kept, hidden)
        new_cache = None if cache is None else cache.with_views(views).update_seq(l)
        return Mamba2Output(hidden, new_cache, all_hidden)

    def step(self, tokens: jax.Array, cache, *, attention_mask=None, active_rows=None, decode_weights=None,
             update_seq: bool = True):
        """One decode step: tokens (b,) int -> (hidden (b, d) after norm_f, the new cache).

        `attention_mask` (b, >= 1): its last column masks this token, as in `__call__`.
        `active_rows` (b,) bool: rows where False keep their cache states as they were (their outputs are
        computed and mean nothing): how generation steps a batch whose rows finish apart.
        `decode_weights`: `self.decode_weights()`, made once before a decode loop and passed to every step.
        `update_seq=False` returns the cache's counters (`positions`, `seqlen_offset`) as given, for a decode loop
        that advances them once at its end (`cache.advance`): per step they cost a small kernel per layer on GPU
        (docs/benchmarks.md), and no layer reads them.
        """
        tokens, attention_mask = as_array(tokens, "tokens"), as_array(attention_mask, "attention_mask")
        if tokens.ndim != 1:
            raise ValueError(f"step takes one token per row, tokens of shape (batch,); got {tokens.shape}")
        b = tokens.shape[0]
        if attention_mask is not None:
            attention_mask = check_attention_mask(attention_mask, b, 1)
        self._check_cache(cache, b)
        if decode_weights is not None and len(decode_weights) != len(self.layers):
            raise ValueError(f"decode_weights has {len(decode_weights)} entries for {len(self.layers)} layers: "
                             "pass what this model's decode_weights() returns")
        rules = self.mesh_rules
        if rules is not None:
            rules.check_batch(b)
        hidden = constrain(self._embed(tokens[:, None]), rules, "batch", None, "embed")         # (b, 1, d)
        sow_hook(self, "hook_embed", hidden)
        position_ids = None if not self.uses_positions else _real_tokens(cache)[:, None]             # (b, 1)
        embeddings = hidden
        views = []
        for i, layer in enumerate(self.layers):
            hidden, view = layer.step(hidden, cache.views[i], attention_mask=attention_mask, active_rows=active_rows,
                                      decode_weights=None if decode_weights is None else decode_weights[i],
                                      position_ids=position_ids, embeddings=embeddings)
            hidden = constrain(hidden, rules, "batch", None, "embed")
            views.append(view)
        new_cache = cache.with_views(views)
        if update_seq:
            new_cache = new_cache.update_seq(1, active_rows)
        return self.norm_f(hidden)[:, 0], new_cache

    def decode_weights(self) -> tuple | None:
        """Per layer, weights of the decode step prepared once for a decode loop (each mixer's
        `decode_weights()`), or None when no layer has any. Compute them outside the loop (under the same jit)
        and pass them to each step as `decode_weights=`: XLA does not hoist them out of the loop by itself. They
        cost one more copy of in_proj's and out_proj's weights while they live."""
        weights = tuple(layer.decode_weights() for layer in self.layers)
        return None if all(w is None for w in weights) else weights


def seq_idx_from_position_ids(position_ids: jax.Array) -> jax.Array:
    """(b, l) int32 segment ids of packed sequences from position ids (b, l) in Hugging Face's packing convention
    (`DataCollatorWithFlattening`): a segment starts wherever the position is 0."""
    return jnp.cumsum(jnp.asarray(position_ids) == 0, axis=1, dtype=jnp.int32)


# model -> its GenerationDefaults (`CausalLM.generation_config`), its carried tensors (`CausalLM.carried_tensors`)
_GENERATION_CONFIGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CARRIED_TENSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_BESIDE = {"generation_config": _GENERATION_CONFIGS, "carried_tensors": _CARRIED_TENSORS}


def _real_tokens(cache) -> jax.Array:
    """(b,) int32: the real tokens the cache's attention views hold (the next token's rotary position)."""
    for entry in cache.views:
        for view in entry if isinstance(entry, tuple) else (entry,):
            if hasattr(view, "real_tokens"):
                return view.real_tokens()
    raise ValueError("the cache has no attention view to count positions from")


class CausalLM(nnx.Module):
    """A family's language model: backbone + tied or untied output head (HF `Mamba2ForCausalLM`, ...). A family's
    causal LM (`Mamba2ForCausalLM`, ...) is this class with the family's record as `family`.

    Hugging Face's methods are here as thin forms of easymamba's functions: `from_pretrained` (a classmethod,
    `easymamba.from_pretrained` / `easymamba.load_checkpoint`), `save_pretrained`, `generate`
    (`easymamba.generate`, which returns a `GenerateOutput`, not transformers' bare ids) and `num_parameters`.
    `generation_config` is the `GenerationDefaults` of the `generation_config.json` the model was loaded with
    (None without one); `generate` takes the settings its caller leaves out from it.
    """

    family: ClassVar  # the ModelFamily, set by the family's record

    @property
    def generation_config(self):
        """The `GenerationDefaults` of the directory the model was loaded from, or None. Kept beside the model,
        not in it: it is no part of the graph (`nnx.split` / `nnx.clone` leave it behind), so two models that
        differ only in their defaults share compiled code."""
        return _GENERATION_CONFIGS.get(self)

    @property
    def carried_tensors(self) -> dict:
        """{HF name: numpy array} of the checkpoint tensors this model carries but does not run (its family's
        `carried_prefixes`: Nemotron-H's multi-token-prediction layers), as read, in their stored dtype;
        `save_pretrained` and `save_checkpoint` write them back unchanged. Empty when there are none. Kept beside
        the model like `generation_config` (no parameters: not sharded, trained or part of the graph)."""
        return _CARRIED_TENSORS.get(self, {})

    def __setattr__(self, name: str, value) -> None:
        if name in _BESIDE:  # beside the model: nnx's own __setattr__ would record it in the graph
            if value is None or (name == "carried_tensors" and not value):
                _BESIDE[name].pop(self, None)
            else:
                _BESIDE[name][self] = dict(value) if name == "carried_tensors" else value
            return
        super().__setattr__(name, value)

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_impl: str = "auto"):
        self.config = config
        self.dtype = dtype
        self.kernel_impl = kernel_impl
        self.backbone = self.family.backbone(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                             kernel_impl=kernel_impl)
        if ties_lm_head(config):
            self.lm_head = None
        else:
            std = config.initializer_range
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=lambda key, shape, dt: normal_init(key, shape, std, dt), rngs=rngs,
                kernel_metadata={"axes": ("embed", "vocab")})

    @classmethod
    def sharding_units(cls, config) -> dict[str, int]:
        """The family's count of each logical axis, for the sharding rules (`easymamba.sharding`)."""
        return cls.family.sharding_units(config)

    # -- Hugging Face's methods, as thin forms of easymamba's functions -------------------------------------------
    # The checkpoint and generation modules sit above the models in the import order (they read the family
    # records), so these import them when called.
    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "CausalLM":
        """The model of directory `path`: a Hugging Face or state-spaces checkpoint (`easymamba.from_pretrained`)
        or an easymamba orbax checkpoint (`easymamba.load_checkpoint`); `kwargs` go to that function (`dtype`,
        `param_dtype`, `mesh`, ...). On a family's class (`Mamba2ForCausalLM`), a directory of another family is
        refused with a `ValueError` naming both; `CausalLM.from_pretrained` reads any family."""
        from easymamba.checkpoints import checkpoint_config, from_pretrained, is_checkpoint, load_checkpoint
        from easymamba.checkpoints.hf_reader import read_config

        orbax = is_checkpoint(path)
        if cls is not CausalLM:
            config = checkpoint_config(path) if orbax else read_config(path)
            if config.model_type != cls.family.model_type:
                from easymamba.models import family_of

                raise ValueError(f"{path} holds a {family_of(config).causal_lm.__name__} (model_type "
                                 f"{config.model_type!r}), not a {cls.__name__} (model_type "
                                 f"{cls.family.model_type!r}); load it with {family_of(config).causal_lm.__name__}"
                                 ".from_pretrained or easymamba.from_pretrained")
        return load_checkpoint(path, **kwargs) if orbax else from_pretrained(path, **kwargs)

    def save_pretrained(self, path, **kwargs):
        """`easymamba.save_pretrained(self, path, **kwargs)`: a directory transformers loads (`max_shard_size`,
        `progress`, ...), with `generation_config.json` when the model has a `generation_config`. Returns it."""
        from easymamba.checkpoints import save_pretrained

        return save_pretrained(self, path, **kwargs)

    def generate(self, input_ids, **kwargs):
        """`easymamba.generate(self, input_ids, **kwargs)`: a `GenerateOutput` (`.sequences [b, l + m]`,
        `.num_generated`, `.cache`), where transformers returns the ids alone."""
        from easymamba.generation import generate

        return generate(self, input_ids, **kwargs)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters, as transformers' `num_parameters`: a tied head is the embedding, counted
        once; `exclude_embeddings` leaves out the token embedding matrices (an untied `lm_head` still counts).
        `only_trainable` is accepted for transformers' signature: every parameter here is trainable."""
        del only_trainable
        skip = set()
        if exclude_embeddings:
            skip = {id(node.weight) for _, node in nnx.iter_graph(self) if isinstance(node, Embedding)}
        params = nnx.state(self, nnx.Param)
        return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(params) if id(v) not in skip)

    def compile(self) -> CompiledLM:
        """This model's forward, `prefill` and `score` jitted over its parameters split once (`CompiledLM`): a
        call costs the device time and microseconds more, where `nnx.jit` walks the model's graph in Python on
        every call (1-2 ms per layer on a CPU host; docs/getting-started.md). It reflects the parameters at this
        call: after training or loading weights, call its `refresh()`."""
        return CompiledLM(self)

    @classmethod
    def key_table(cls, config):
        """The family's checkpoint key table: every HF tensor as a `KeySpec`, in HF's `state_dict()` order."""
        return cls.family.key_table(config)

    def decode_weights(self) -> tuple | None:
        """The backbone's `decode_weights()` (see `Backbone.decode_weights`)."""
        return self.backbone.decode_weights()

    def init_cache(self, batch_size: int, *, max_length: int | None = None, dtype=None, ssm_dtype=jnp.float32,
                   partition_axis=None, mesh=None):
        """A zero cache for this model (`Backbone.init_cache`)."""
        return self.backbone.init_cache(batch_size, max_length=max_length, dtype=dtype, ssm_dtype=ssm_dtype,
                                        partition_axis=partition_axis, mesh=mesh)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The output head: hidden (..., d) -> logits (..., v) float32 (times the family's `logits_multiplier`,
        in the model dtype, when it has one)."""
        if self.lm_head is None:
            emb = self.backbone.embeddings
            logits = emb.attend(hidden.astype(emb.weight.dtype))
        else:
            logits = self.lm_head(hidden.astype(self.lm_head.kernel.dtype))
        multiplier = self.family.logits_multiplier
        if multiplier is not None:
            logits = logits * multiplier(self.config)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids=None, *, attention_mask=None, cache=None, labels=None, inputs_embeds=None,
                 output_hidden_states: bool = False, position_ids=None, seq_idx=None) -> Mamba2CausalLMOutput:
        """Logits (b, l, v) float32 of input_ids (b, l) (an array or a nested list) or inputs_embeds (b, l, d);
        with `cache`, the continuation from its state and the new cache. An `attention_mask` (b, >= l) given with
        a cache must be left padding (checked when concrete, skipped under jit: `check_left_padded`). `seq_idx` /
        `position_ids`: packed sequences (`Backbone._segments`)."""
        input_ids, attention_mask = as_array(input_ids, "input_ids"), as_array(attention_mask, "attention_mask")
        if cache is not None and attention_mask is not None and getattr(attention_mask, "ndim", 0) == 2:
            check_left_padded(attention_mask)
        if (cache is not None and input_ids is not None and getattr(input_ids, "ndim", 0) == 2
                and input_ids.shape[1] == 1 and labels is None and not output_hidden_states
                and position_ids is None and seq_idx is None):
            logits, cache = self.step(input_ids[:, 0], cache, attention_mask=attention_mask)
            return Mamba2CausalLMOutput(logits[:, None], None, cache)
        out = self.backbone(input_ids, attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds,
                            output_hidden_states=output_hidden_states, position_ids=position_ids, seq_idx=seq_idx)
        logits = constrain(self.logits(out.last_hidden_state), self.backbone.mesh_rules, "batch", None, "vocab")
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.vocab_size)
        return Mamba2CausalLMOutput(logits, loss, out.cache, out.hidden_states)               # logits (b, l, v)

    def prefill(self, input_ids: jax.Array, cache, *, attention_mask=None) -> tuple[jax.Array, object]:
        """A prompt (b, l) into `cache` -> (logits of its last position (b, v) float32, the new cache): the head
        runs on the last position only, since XLA does not push that slice through the full (b, l, v) product.
        What `generate` and `CompiledLM.prefill` jit."""
        out = self.backbone(input_ids, attention_mask=attention_mask, cache=cache)
        return self.logits(out.last_hidden_state[:, -1]), out.cache

    def step(self, tokens: jax.Array, cache, *, attention_mask=None, active_rows=None, decode_weights=None,
             update_seq: bool = True) -> tuple[jax.Array, object]:
        """One decode step: tokens (b,) int -> (logits (b, v) float32, the new cache). The options are
        `Backbone.step`'s; the decode loop (`easymamba.generation`) is its main caller."""
        hidden, cache = self.backbone.step(tokens, cache, attention_mask=attention_mask, active_rows=active_rows,
                                           decode_weights=decode_weights, update_seq=update_seq)
        return constrain(self.logits(hidden), self.backbone.mesh_rules, "batch", "vocab"), cache


def causal_lm_loss(logits: jax.Array, labels: jax.Array, vocab_size: int | None = None) -> jax.Array:
    """Mean next-token cross entropy as HF computes it: position t predicts labels[t + 1]; -100 is ignored.

    logits (b, l, v), labels (b, l). With no label left to score the mean is 0/0 = NaN, as in HF.
    """
    total, count = causal_lm_loss_sum(logits, labels, vocab_size)
    return total / count


def causal_lm_loss_sum(logits: jax.Array, labels: jax.Array,
                       vocab_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed next-token cross entropy, number of scored labels): `causal_lm_loss` before its division.

    Sums add across micro-batches, so gradient accumulation (`easymamba.train`) can divide once by the
    total count and give the update of the whole batch, however the -100s fall.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {logits.shape[:2]} (batch, seq_len), got {labels.shape}")
    v = logits.shape[-1] if vocab_size is None else vocab_size
    if is_concrete(labels):
        lab = np.asarray(labels)
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= v))
        if bad.any():
            raise ValueError(f"label {int(lab[tuple(np.argwhere(bad)[0])])} is outside the vocabulary [0, {v}) "
                             f"and is not the ignore index {IGNORE_INDEX}")
    targets = labels[:, 1:]                                                 # (b, l-1)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # (b, l-1, v)
    valid = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid)
