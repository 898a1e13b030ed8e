"""Training: the causal-LM loss over a batch, a jitted optax train step (gradient accumulation, remat), an eval
step, and a reproducible token-stream batcher.

    state = TrainState.create(model, tx, rng=0)          # params, optimizer state, step, rng: one pytree
    train_step = make_train_step(accum_steps=4, remat=True)
    batches = TokenBatcher(tokens, batch_size=8, seq_len=256, seed=0)
    for step in range(steps):
        state, metrics = train_step(state, batches(step))   # metrics: loss, tokens, grad_norm

Works for `Mamba2ForCausalLM` and `MambaForCausalLM` alike (the loss path is shared). Checkpoint the whole
state with `easymamba.checkpoints.save_train_state` / `load_train_state`; resuming gives a bit-identical
continuation (the batcher's batches depend only on its seed and the step).

Choices:
- Functional, like optax itself: the train state is a pytree (`TrainState`, a flax struct) holding the
  `nnx.Param` arrays, the optax state, the step and a PRNG key; the model's structure (`nnx.GraphDef`) and the
  optax transformation ride along as static fields. A step is one `jax.jit` of a pure function that donates
  the old state, with no Python-side graph traversal per step. `state.model()` gives the nnx module back
  (sharing the arrays), for generation or `save_pretrained`.
- A loss function returns a *sum* and the count it sums over (default: `causal_lm_loss_fn`, next-token cross
  entropy summed over the labels that are not -100, and their number). The step minimises sum / count over
  the whole batch, so `accum_steps` micro-batches (a `lax.scan`, gradients accumulated in float32) give the
  update of the whole batch, however the -100s fall among them.
- `remat=True` wraps each block's call in `nnx.remat` (`jax.checkpoint`) in the copy of the model that is
  differentiated: activations inside a block are recomputed in the backward pass. Gradients are unchanged.
- The step's PRNG key (`state.rng` is split every step) reaches the loss function; the built-in models have
  no dropout, so the default loss ignores it, but custom losses (noise, masking) get a reproducible key.

Official counterparts: transformers' `Trainer` loss (`ForCausalLMLoss`, mean over labels != -100) and
`flax.training.train_state.TrainState`.
"""

from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from easymamba.models import IGNORE_INDEX, causal_lm_loss_sum, seq_idx_from_position_ids

# "input_ids" (b, l) int; optional "labels" (b, l) with -100, "attention_mask" (b, l), and for packed sequences
# "seq_idx" (b, l) int or "position_ids" (b, l) restarting at 0 (Hugging Face's DataCollatorWithFlattening)
Batch = Mapping[str, jax.Array]
# loss_fn(model, batch, rng) -> (sum of per-label losses, number of labels summed): the step minimises their ratio.
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, jax.Array]]
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "seq_idx")


def causal_lm_loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy of `batch` under `model` and the number of labels scored.

    `labels` default to `input_ids` (HF shifts inside: position t predicts labels[t + 1]); with an
    `attention_mask` and no `labels`, masked positions are not scored. Packed rows (`seq_idx`, or `position_ids`
    restarting at 0): each sequence runs as if alone (the model's `seq_idx`), and without `labels` the first
    token of every sequence after the first is not scored (nothing before it in its own sequence predicts it),
    as the collator's -100 separators do. `rng` is unused (no dropout).
    """
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown or "input_ids" not in batch:
        raise ValueError(f"a batch holds input_ids and optionally {', '.join(BATCH_KEYS[1:])}; got keys "
                         f"{sorted(batch)}" + (f" (unknown: {unknown})" if unknown else ""))
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    seq_idx, position_ids = batch.get("seq_idx"), batch.get("position_ids")
    if seq_idx is None and position_ids is not None:
        seq_idx = seq_idx_from_position_ids(position_ids)
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else jnp.where(mask != 0, ids, IGNORE_INDEX)
        if seq_idx is not None:  # a sequence's first token: the previous sequence's last must not predict it
            starts = jnp.concatenate([jnp.zeros_like(seq_idx[:, :1], bool), seq_idx[:, 1:] != seq_idx[:, :-1]], 1)
            labels = jnp.where(starts, IGNORE_INDEX, labels)
    logits = model(ids, attention_mask=mask, position_ids=position_ids, seq_idx=seq_idx).logits  # (b, l, v) f32
    return causal_lm_loss_sum(logits, labels, model.config.vocab_size)


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step, as one pytree (checkpointed whole).

    step: () int32, optimizer steps taken. params: the model's `nnx.Param` arrays (an `nnx.State`).
    opt_state: the optax state of `tx`. rng: a PRNG key, split once per step. graphdef, tx: static.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, *, rng: "int | jax.Array" = 0) -> "TrainState":
        """Split `model` into structure and `nnx.Param`s and initialise `tx` on them (sharded params give a
        sharded optimizer state). `rng`: a seed or a PRNG key."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"{type(model).__name__} holds variables other than nnx.Param "
                             f"({sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest)})}); TrainState "
                             "carries parameters only")
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            raise TypeError(f"rng must be an int seed or a typed key from jax.random.key, got an array of dtype "
                            f"{rng.dtype}")
        state = cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                    graphdef=graphdef, tx=tx)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
            return state  # traced, e.g. under jax.eval_shape to make an abstract `like` for load_train_state
        # Commit every array to where it already is, as a restored state's arrays are: `jit` caches on
        # committedness, so a step compiled before `load_train_state` is then reused after it, not compiled again.
        return jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))

    def model(self) -> nnx.Module:
        """The nnx model with this state's parameters (the arrays are shared, not copied)."""
        return nnx.merge(self.graphdef, self.params)

    def apply_gradients(self, grads: nnx.State) -> "TrainState":
        """One optimizer step: `tx.update`, `optax.apply_updates`, step + 1 (the rng is left as it is)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state)


def _model_for_grads(graphdef: nnx.GraphDef, params: nnx.State, remat: bool) -> nnx.Module:
    model = nnx.merge(graphdef, params)
    if remat:  # on this traced copy only; state.graphdef is untouched
        for layer in model.backbone.layers:
            layer.remat = True
    return model


def _split_micro(batch: Batch, accum_steps: int) -> Batch:
    """Each (b, ...) array as (accum_steps, b / accum_steps, ...): micro-batch i is rows i*b/k ... (i+1)*b/k - 1."""
    out = {}
    for key, value in batch.items():
        b = value.shape[0]
        if b % accum_steps:
            raise ValueError(f"batch[{key!r}] has {b} rows, which accum_steps={accum_steps} does not divide; "
                             f"use a batch size that is a multiple of {accum_steps}")
        out[key] = value.reshape(accum_steps, b // accum_steps, *value.shape[1:])
    return out


def loss_and_grads(state: TrainState, batch: Batch, rng: jax.Array, *, loss_fn: LossFn = causal_lm_loss_fn,
                   accum_steps: int = 1, remat: bool = False) -> tuple[nnx.State, dict]:
    """Gradients of sum / count over `batch` (in `accum_steps` micro-batches) and metrics; traceable.

    Returns (grads like `state.params`, {"loss": mean, "tokens": count}). A batch with nothing to score has
    loss NaN (0/0, as HF) and zero gradients, so one such batch cannot poison the parameters.
    """
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")

    def summed(params, micro, key):
        total, count = loss_fn(_model_for_grads(state.graphdef, params, remat), micro, key)
        return total, count

    grad_fn = jax.value_and_grad(summed, has_aux=True)
    if accum_steps == 1:
        (total, count), grads = grad_fn(state.params, dict(batch), rng)
    else:
        def body(carry, xs):
            grad_acc, total_acc, count_acc = carry
            micro, key = xs
            (total, count), grads = grad_fn(state.params, micro, key)
            grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
            return (grad_acc, total_acc + total, count_acc + count), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, total, count), _ = jax.lax.scan(
            body, init, (_split_micro(batch, accum_steps), jax.random.split(rng, accum_steps)))
    scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, state.params)
    return grads, {"loss": total / count, "tokens": count}


def make_train_step(*, loss_fn: LossFn = causal_lm_loss_fn, accum_steps: int = 1, remat: bool = False,
                    donate: bool = True, jit: bool = True) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jitted `train_step(state, batch) -> (state, metrics)`.

    batch: arrays with a leading batch axis (`TokenBatcher` makes them); split into `accum_steps` equal
    micro-batches whose summed gradients give the same update as the whole batch at once. remat: recompute
    each block's activations in the backward pass (less memory, one more forward pass, same gradients).
    donate: reuse the old state's buffers for the new one (the state passed in is then invalid).
    jit=False returns the pure function instead, to wrap in your own `jax.jit` (explicit in/out shardings,
    compiler options) or to call inside a larger traced loop.
    metrics: {"loss": mean loss over the labels scored, "tokens": their number, "grad_norm": global norm of
    the gradient before the optimizer (clipping included in `tx` sees the same)}.
    """
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")

    def train_step(state: TrainState, batch: Batch):
        rng, step_rng = jax.random.split(state.rng)
        grads, metrics = loss_and_grads(state, batch, step_rng, loss_fn=loss_fn, accum_steps=accum_steps,
                                        remat=remat)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.apply_gradients(grads).replace(rng=rng), metrics

    if not jit:
        return train_step
    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(*, loss_fn: LossFn = causal_lm_loss_fn, jit: bool = True) -> Callable[[TrainState, Batch], dict]:
    """A jitted `eval_step(state, batch) -> {"loss": mean, "total": sum, "tokens": count}`; no gradients, the
    state's rng is neither used nor advanced (the loss gets a fixed key). jit=False: the pure function."""

    def eval_step(state: TrainState, batch: Batch):
        total, count = loss_fn(state.model(), batch, jax.random.key(0))
        return {"loss": total / count, "total": total, "tokens": count}

    return jax.jit(eval_step) if jit else eval_step


def evaluate(eval_step: Callable[[TrainState, Batch], dict], state: TrainState, batches) -> float:
    """Mean loss over every label of `batches` (weighted by labels, so uneven batches average exactly)."""
    total, count = 0.0, 0
    for batch in batches:
        out = eval_step(state, batch)
        total += float(out["total"])
        count += int(out["tokens"])
    if count == 0:
        raise ValueError("evaluate got no labels to score (no batches, or every label is -100)")
    return total / count


def make_optimizer(learning_rate: float, *, total_steps: int, warmup_steps: int = 0, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, clip_norm: float | None = 1.0,
                   final_lr_fraction: float = 0.1) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to `final_lr_fraction * learning_rate`, global-norm clipping,
    and weight decay on matrices only (norm weights, biases, A_log, D, dt_bias are not decayed), as the shipped
    model was trained (docs/training.md)."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and "
                         "total_steps >= 1")
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
                                                  learning_rate * final_lr_fraction)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    return adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


class TokenBatcher:
    """Windows of `seq_len` tokens cut from one token stream (e.g. a tokenized text file).

    `batcher(step)`: `batch_size` windows at random offsets, drawn from `numpy.random.default_rng((seed, step))`,
    so batch i is the same on every run and after a resume, with no iterator state to checkpoint.
    `batcher.sequential()`: every token in order, in non-overlapping windows, for evaluation: each window's
    first token is context only, so every other token is scored exactly once; the last batch is filled up with
    rows whose labels are all -100 (same shapes every batch: one compilation).
    Batches are dicts of numpy int32 arrays {"input_ids", "labels"} of shape (batch_size, seq_len).
    """

    def __init__(self, tokens, *, batch_size: int, seq_len: int, seed: int = 0):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D array of integer ids, got shape {tokens.shape} of {tokens.dtype}")
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
        if len(tokens) < seq_len:
            raise ValueError(f"the token stream has {len(tokens)} tokens, fewer than seq_len={seq_len}")
        self.tokens = tokens.astype(np.int32)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, int(step)))
        starts = rng.integers(0, len(self.tokens) - self.seq_len + 1, self.batch_size)
        ids = self.tokens[starts[:, None] + np.arange(self.seq_len)]         # (b, l)
        return {"input_ids": ids, "labels": ids}

    def sequential(self) -> Iterator[dict[str, np.ndarray]]:
        n, l = len(self.tokens), self.seq_len
        windows = [self.tokens[i:i + l] for i in range(0, n - 1, l)]          # the last may be short
        for i in range(0, len(windows), self.batch_size):
            ids = np.zeros((self.batch_size, l), np.int32)
            labels = np.full((self.batch_size, l), IGNORE_INDEX, np.int32)
            for row, window in enumerate(windows[i:i + self.batch_size]):
                ids[row, :len(window)] = window
                labels[row, :len(window)] = window
            yield {"input_ids": ids, "labels": labels}

    def num_tokens_scored(self) -> int:
        """How many labels one pass of `sequential()` scores."""
        return sum(len(self.tokens[i:i + self.seq_len]) - 1 for i in range(0, len(self.tokens) - 1, self.seq_len))


__all__ = ["Batch", "LossFn", "TokenBatcher", "TrainState", "causal_lm_loss_fn", "evaluate", "loss_and_grads",
           "make_eval_step", "make_optimizer", "make_train_step"]
