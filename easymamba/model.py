"""Mamba-2 block, backbone and causal language model (HF `Mamba2Block`, `Mamba2Model`, `Mamba2ForCausalLM`).

Official implementation: `mamba_ssm/models/mixer_seq_simple.py` (`MixerModel`, `MambaLMHeadModel`) and
`mamba_ssm/modules/block.py`; module and parameter names follow Hugging Face so checkpoints map one to one:

    Mamba2ForCausalLM
      backbone: Mamba2Model
        embeddings: Embedding [v, d]
        layers[i]: Mamba2Block
          norm: RMSNorm [d]
          mixer: Mamba2Mixer (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj)
        norm_f: RMSNorm [d]
      lm_head: Linear [d, v]   (absent when tie_word_embeddings: the embedding matrix is reused)
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from easymamba.caching import Mamba2Cache, Mamba2CacheMetaData
from easymamba.config import Mamba2Config
from easymamba.layers import Embedding, is_concrete, normal_init
from easymamba.mixer import Mamba2Mixer, sow_hook
from easymamba.norms import RMSNorm
from easymamba.sharding import MeshRules, constrain, constrain_spec, mamba2_logical_axes

IGNORE_INDEX = -100


@struct.dataclass
class Mamba2Output:
    last_hidden_state: jax.Array                     # (b, l, d)
    cache: Mamba2Cache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None  # n_layers + 1 of (b, l, d), see Mamba2Model


@struct.dataclass
class Mamba2CausalLMOutput:
    logits: jax.Array                                # (b, l, v) float32
    loss: jax.Array | None = None                    # scalar float32
    cache: Mamba2Cache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None  # n_layers + 1 of (b, l, d), see Mamba2Model


class Mamba2Block(nnx.Module):
    """Pre-norm residual block: `h + mixer(norm(h))`, the residual kept in float32 if `residual_in_fp32`.

    Hook point: `hook_resid_post` (b, l, d), the block output (see `easymamba.interp.run_with_cache`).
    """

    HOOKS = ("hook_resid_post",)
    MIXER = Mamba2Mixer  # Mamba-1's block is this block with its own mixer (easymamba.mamba1.MambaBlock)

    def __init__(self, config: Mamba2Config, *, layer_idx: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto"):
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, param_dtype=param_dtype)
        self.mixer = self.MIXER(config, layer_idx=layer_idx, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                kernel_impl=kernel_impl)

    # Rematerialise this block in the backward pass (`jax.checkpoint` through `nnx.remat`): its activations are
    # recomputed from its input instead of being kept. Off by default; `easymamba.train.make_train_step(remat=True)`
    # turns it on for the copy of the model it differentiates.
    remat: bool = False

    def __call__(self, hidden: jax.Array, *, attention_mask=None, conv_state=None, ssm_state=None,
                 active_rows=None, decode_weights=None):
        if self.remat:
            return nnx.remat(type(self)._forward)(self, hidden, attention_mask, conv_state, ssm_state, active_rows,
                                                  decode_weights)
        return self._forward(hidden, attention_mask, conv_state, ssm_state, active_rows, decode_weights)

    def _forward(self, hidden, attention_mask, conv_state, ssm_state, active_rows, decode_weights=None):
        residual = hidden.astype(jnp.float32) if self.residual_in_fp32 else hidden
        normed = self.norm(hidden.astype(self.norm.weight.dtype))
        extra = {} if decode_weights is None else {"decode_weights": decode_weights}  # Mamba-1 mixers take none
        out, states = self.mixer(normed, attention_mask=attention_mask, conv_state=conv_state,
                                 ssm_state=ssm_state, active_rows=active_rows, **extra)
        hidden = residual + out
        sow_hook(self, "hook_resid_post", hidden)
        return hidden, states


class Mamba2Model(nnx.Module):
    """Embeddings, `num_hidden_layers` blocks and the final norm (HF `Mamba2Model`).

    Hook point: `hook_embed` (b, l, d), the embeddings (or `inputs_embeds`) entering layer 0.
    A model family (Mamba-1: `easymamba.mamba1.MambaModel`) subclasses this with its own config, block and
    cache classes.
    """

    HOOKS = ("hook_embed",)
    # `output_hidden_states` as the pinned transformers (5.25) returns it, per family; both have
    # num_hidden_layers + 1 entries. Mamba-2 (5.25's generic output capture): the embeddings, blocks 0..n-2's
    # outputs, norm_f(block n-1's output); the last block's raw output is not included. Mamba-1 (its own loop,
    # `MambaModel` sets False): blocks 0..n-1's outputs, then norm_f's.
    HIDDEN_STATES_FROM_EMBEDDINGS: ClassVar[bool] = True
    CONFIG: ClassVar[type] = Mamba2Config
    BLOCK: ClassVar[type] = Mamba2Block
    CACHE: ClassVar[type] = Mamba2Cache
    CACHE_METADATA: ClassVar[type] = Mamba2CacheMetaData
    logical_axes = staticmethod(mamba2_logical_axes)  # the sharding table (easymamba.sharding)

    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_impl: str = "auto"):
        if not isinstance(config, self.CONFIG):
            raise TypeError(f"{type(self).__name__} needs a {self.CONFIG.__name__}, got {type(config).__name__}")
        self.config = config
        self.dtype = dtype
        self.mesh_rules: MeshRules | None = None  # set by easymamba.sharding when the model is sharded
        self.embeddings = Embedding(config.vocab_size, config.hidden_size, init_std=config.initializer_range,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            self.BLOCK(config, layer_idx=i, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                       kernel_impl=kernel_impl)
            for i in range(config.num_hidden_layers)
        ])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, param_dtype=param_dtype)

    def init_cache(self, batch_size: int, *, dtype=None, ssm_dtype=jnp.float32, partition_axis=None,
                   mesh=None) -> Mamba2Cache:
        """A zero cache for this model: conv state in `dtype` (default the model dtype), SSM state float32.

        A sharded model (`easymamba.sharding`) defaults `partition_axis` to its rules' and `mesh` to its mesh, so
        the cache is created sharded as the forward keeps it.
        """
        rules = self.mesh_rules
        if rules is not None:
            partition_axis = rules.partition_axis() if partition_axis is None else partition_axis
            mesh = rules.mesh if mesh is None else mesh
        kwargs = {} if partition_axis is None else {"partition_axis": partition_axis}
        meta = self.CACHE_METADATA.from_config(self.config, batch_size, **kwargs)
        return self.CACHE.init_cache(self.config.num_hidden_layers, meta,
                                     dtype=self.dtype if dtype is None else dtype, mesh=mesh,
                                     ssm_dtype=ssm_dtype)

    def _check_cache(self, cache: Mamba2Cache, batch_size: int) -> None:
        if not isinstance(cache, self.CACHE):
            raise ValueError(f"cache must be a {self.CACHE.__name__} (model.init_cache({batch_size})) for this "
                             f"{type(self).__name__}; got {type(cache).__name__}")
        cache.check_compatible(self.config, batch_size)
        empty = [i for i, v in enumerate(cache.views) if v is None]
        if empty:
            raise ValueError(f"cache layer(s) {empty[:8]} hold no state (an init_empty cache?); build one with "
                             f"model.init_cache({batch_size})")

    def __call__(self, input_ids=None, *, attention_mask=None, cache: Mamba2Cache | None = None,
                 inputs_embeds=None, output_hidden_states: bool = False, active_rows=None,
                 update_seq: bool = True, decode_weights=None) -> Mamba2Output:
        """`active_rows` (b,) bool, with a cache: rows where False keep their cache states as they were (their
        outputs are computed and mean nothing): how generation steps a batch whose rows finish apart.
        `update_seq=False` returns the cache's counters (`positions`, `seqlen_offset`) as given, for a decode loop
        that advances them once at its end (`cache.advance`): per step they cost a small kernel per layer on GPU
        (docs/benchmarks.md), and no layer reads them.
        `decode_weights`: `self.decode_weights()`, made once before a decode loop and passed to every step."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (b, l) and inputs_embeds (b, l, d)")
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {input_ids.shape}")
        d = self.config.hidden_size
        if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != d):
            raise ValueError(f"inputs_embeds must have shape (batch, seq_len, {d}), got {inputs_embeds.shape}")
        b, l = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if attention_mask is not None:
            attention_mask = _check_attention_mask(attention_mask, b, l)
        if cache is not None:  # before any work: a wrong cache is refused by name, not by a shape error later
            self._check_cache(cache, b)
        if active_rows is not None and cache is None:
            raise ValueError("active_rows holds rows of a cache: pass it with cache=")
        if decode_weights is not None and len(decode_weights) != len(self.layers):
            raise ValueError(f"decode_weights has {len(decode_weights)} entries for {len(self.layers)} layers: "
                             "pass what this model's decode_weights() returns")
        rules = self.mesh_rules
        if rules is not None:
            rules.check_batch(b)
        hidden = self.embeddings(input_ids) if input_ids is not None else inputs_embeds.astype(self.dtype)  # (b,l,d)
        hidden = constrain(hidden, rules, "batch", None, "embed")
        sow_hook(self, "hook_embed", hidden)

        embedded = hidden
        all_hidden = [] if output_hidden_states else None  # each block's output
        new_views = []
        for i, layer in enumerate(self.layers):
            view = None if cache is None else cache.views[i]
            conv_state = ssm_state = None
            if view is not None:  # pinned to the cache's layout on the way in and out (see below)
                conv_spec, ssm_spec, _ = view.partition_specs
                conv_state = constrain_spec(view.conv_states, rules, conv_spec)
                ssm_state = constrain_spec(view.ssm_states, rules, ssm_spec)
            hidden, (conv_state, ssm_state) = layer(
                hidden, attention_mask=attention_mask, conv_state=conv_state, ssm_state=ssm_state,
                active_rows=active_rows, decode_weights=None if decode_weights is None else decode_weights[i])
            hidden = constrain(hidden, rules, "batch", None, "embed")
            if view is not None:  # the new states keep the cache's layout (a while_loop carry must)
                new_views.append(view.replace(
                    conv_states=constrain_spec(conv_state.astype(view.conv_states.dtype), rules, conv_spec),
                    ssm_states=constrain_spec(ssm_state.astype(view.ssm_states.dtype), rules, ssm_spec)))
            if all_hidden is not None:
                all_hidden.append(hidden)
        hidden = self.norm_f(hidden)
        if all_hidden is not None:  # the family's order (HIDDEN_STATES_FROM_EMBEDDINGS above)
            all_hidden = ([embedded, *all_hidden[:-1]] if self.HIDDEN_STATES_FROM_EMBEDDINGS else all_hidden)
            all_hidden.append(hidden)
        new_cache = None if cache is None else self.CACHE(views=tuple(new_views))
        if new_cache is not None and update_seq:
            new_cache = new_cache.update_seq(l, active_rows)
        return Mamba2Output(hidden, new_cache, None if all_hidden is None else tuple(all_hidden))

    def decode_weights(self) -> tuple | None:
        """Per layer, weights of the decode step prepared once for a decode loop (`Mamba2Mixer.decode_weights`),
        or None when no layer has any. Compute them outside the loop (under the same jit) and pass them to each
        step as `decode_weights=`: XLA does not hoist them out of the loop by itself. They cost one more copy of
        in_proj's and out_proj's weights while they live."""
        weights = tuple(getattr(layer.mixer, "decode_weights", lambda: None)() for layer in self.layers)
        return None if all(w is None for w in weights) else weights


class Mamba2ForCausalLM(nnx.Module):
    """Mamba-2 language model (HF `Mamba2ForCausalLM`): backbone + tied or untied output head.
    `MODEL` is the backbone class (Mamba-1's `MambaForCausalLM` subclasses this with `MambaModel`).

    `output_hidden_states=True` returns `num_hidden_layers + 1` arrays (b, l, d), as transformers 5.25's
    `Mamba2ForCausalLM` does: the embeddings (or `inputs_embeds`), the outputs of blocks 0 to n-2, then the
    final norm applied to block n-1's output (block n-1's own output is not in the tuple)."""

    MODEL: ClassVar[type] = Mamba2Model
    logical_axes = staticmethod(mamba2_logical_axes)  # the sharding table (easymamba.sharding)

    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_impl: str = "auto"):
        self.config = config
        self.dtype = dtype
        self.kernel_impl = kernel_impl
        self.backbone = self.MODEL(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                   kernel_impl=kernel_impl)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            std = config.initializer_range
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=lambda key, shape, dt: normal_init(key, shape, std, dt), rngs=rngs)

    def decode_weights(self) -> tuple | None:
        """The backbone's `decode_weights()` (see `Mamba2Model.decode_weights`)."""
        return self.backbone.decode_weights()

    def init_cache(self, batch_size: int, *, dtype=None, ssm_dtype=jnp.float32, partition_axis=None,
                   mesh=None) -> Mamba2Cache:
        return self.backbone.init_cache(batch_size, dtype=dtype, ssm_dtype=ssm_dtype,
                                        partition_axis=partition_axis, mesh=mesh)

    def __call__(self, input_ids=None, *, attention_mask=None, cache: Mamba2Cache | None = None, labels=None,
                 inputs_embeds=None, output_hidden_states: bool = False, active_rows=None,
                 update_seq: bool = True, decode_weights=None) -> Mamba2CausalLMOutput:
        out = self.backbone(input_ids, attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds,
                            output_hidden_states=output_hidden_states, active_rows=active_rows,
                            update_seq=update_seq, decode_weights=decode_weights)
        hidden = out.last_hidden_state
        if self.lm_head is None:
            logits = self.backbone.embeddings.attend(hidden.astype(self.backbone.embeddings.weight.dtype))
        else:
            logits = self.lm_head(hidden.astype(self.lm_head.kernel.dtype))
        logits = constrain(logits.astype(jnp.float32), self.backbone.mesh_rules, "batch", None, "vocab")  # (b, l, v)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.vocab_size)
        return Mamba2CausalLMOutput(logits, loss, out.cache, out.hidden_states)


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


def _check_attention_mask(mask, b: int, l: int):
    if mask.ndim != 2 or mask.shape[0] != b or mask.shape[1] < l:
        raise ValueError(f"attention_mask must have shape (batch={b}, seq_len>={l}), got {mask.shape}")
    if is_concrete(mask):
        values = np.unique(np.asarray(mask))
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"attention_mask must hold only 0 and 1, found values {values.tolist()[:8]}")
    return mask
