"""A causal LM's forward, prefill and scoring as jitted functions over a state split once (`CausalLM.compile()`).

Why not `nnx.jit(model)`: an `nnx.jit`-ed function walks the model's whole graph in Python on every call (split
its Variables, hash the graph definition, merge them back afterwards), 1 to 2 ms per layer on a CPU host, so a
64-layer model pays 65 to 150 milliseconds per call before any device work (docs/benchmarks.md, "Per-call
overhead"). `CompiledLM` does that walk once, at `compile()` / `refresh()`: it keeps the graph definition and the
flat list of parameter arrays, and each call hands that list to a plain `jax.jit`, whose C++ dispatch flattens a
list of arrays in microseconds.

The price is a snapshot: a `CompiledLM` computes with the arrays the model held when it was compiled (or last
`refresh()`-ed). Training steps and `load_state_dict` give the model new arrays; call `refresh()` afterwards (a
model whose structure changed, a submodule replaced, recompiles there). The snapshot shares the arrays with the
model (no copy), and a sharded model's arrays keep their shardings (nothing is moved).

Compiled code is kept per (graph definition, input shapes and dtypes, which optional inputs are given, static
settings): a new batch size, length, cache shape or `max_length` traces once more; the same ones never do.
"""

import collections
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easymamba.layers import check_token_ids
from easymamba.models.common import as_array, check_left_padded

__all__ = ["CompiledLM"]

IGNORE_INDEX = -100  # causal_lm.IGNORE_INDEX (that module imports this one)

# Traces per function name, for tests: calls with the same shapes, dtypes and optional inputs must not add any.
_TRACES: collections.Counter = collections.Counter()


# -- the traced functions: `graphdef` is (nnx graphdef, treedef of the model's State), `state` the State's leaves ---
def merge_flat(graphdef, state):
    """The model back from `graphdef` = (nnx graphdef, treedef of its State) and `state`, the State's leaves (a
    flat list of arrays is what jit flattens fastest); `easymamba.generation` splits the same way."""
    nnx_graphdef, treedef = graphdef
    return nnx.merge(nnx_graphdef, jax.tree.unflatten(treedef, state))


def _forward(graphdef, output_hidden_states, state, input_ids, attention_mask, cache, labels, position_ids,
             seq_idx):
    _TRACES["forward"] += 1
    model = merge_flat(graphdef, state)
    return model(input_ids, attention_mask=attention_mask, cache=cache, labels=labels, position_ids=position_ids,
                 seq_idx=seq_idx, output_hidden_states=output_hidden_states)


def _prefill(graphdef, max_length, state, input_ids, attention_mask):
    _TRACES["prefill"] += 1
    model = merge_flat(graphdef, state)
    return model.prefill(input_ids, model.init_cache(input_ids.shape[0], max_length=max_length),
                         attention_mask=attention_mask)


def _score(graphdef, state, input_ids, attention_mask):
    _TRACES["score"] += 1
    model = merge_flat(graphdef, state)
    logits = model(input_ids, attention_mask=attention_mask).logits                         # (b, l, v) float32
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)                                      # (b, l-1, v)
    picked = jnp.take_along_axis(logp, input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]  # (b, l-1)
    if attention_mask is not None:
        picked = jnp.where(attention_mask[:, 1:] != 0, picked, 0.0)
    return picked


class _Functions:
    """The jitted functions of one graph definition; compiled code is shared by every `CompiledLM` of it."""

    def __init__(self, graphdef):
        self.forward = jax.jit(lambda *a: _forward(graphdef, *a), static_argnums=(0,))
        self.prefill = jax.jit(lambda *a: _prefill(graphdef, *a), static_argnums=(0,))
        self.score = jax.jit(lambda *a: _score(graphdef, *a))


_FUNCTIONS: "collections.OrderedDict[tuple, _Functions]" = collections.OrderedDict()
_FUNCTIONS_MAX = 8  # graph definitions whose executables are kept; the least recently compiled go first
_LOCK = threading.Lock()


def _functions(graphdef) -> _Functions:
    with _LOCK:
        fns = _FUNCTIONS.get(graphdef)
        if fns is None:
            fns = _FUNCTIONS[graphdef] = _Functions(graphdef)
            while len(_FUNCTIONS) > _FUNCTIONS_MAX:
                _FUNCTIONS.popitem(last=False)
        else:
            _FUNCTIONS.move_to_end(graphdef)
        return fns


def _on_host(x) -> bool:
    """True for inputs that are host values (numpy, from lists): checking their values costs no device wait."""
    return isinstance(x, np.ndarray)


class CompiledLM:
    """A causal LM's calls, jitted over its parameters split once: `model.compile()` (any family's `CausalLM`).

        fast = model.compile()
        out = fast(ids)                          # as model(ids): a Mamba2CausalLMOutput, logits (b, l, v) float32
        logits, cache = fast.prefill(ids, max_length=64)   # last-token logits (b, v) and the filled cache
        out = fast(next_ids, cache=cache)        # continue: (b, 1) is a decode step, (b, l') a chunked prefill
        logp = fast.score(ids)                   # (b, l-1) log-probabilities of ids[:, 1:]

    It reflects the model's parameters at `compile()` time: after training or loading weights into the model,
    call `refresh()`. Input values are checked as the model checks them (token ids in the vocabulary, left
    padding with a cache, labels in the vocabulary) when they are host values (numpy arrays, lists); device
    arrays are passed on unchecked, as under any jit, since reading them would wait for the device.
    """

    def __init__(self, model):
        if not callable(getattr(model, "init_cache", None)) or not hasattr(model, "backbone"):
            raise TypeError(f"CompiledLM needs a causal LM (an easymamba *ForCausalLM); got {type(model).__name__}")
        self.model = model
        self._graphdef = None
        self.refresh()

    def refresh(self) -> "CompiledLM":
        """Split the model again: take its current parameters (after training, `load_state_dict`, ...) and, if
        its structure changed, the compiled code for the new structure. Returns self."""
        graphdef, state = nnx.split(self.model)
        graphdef = (graphdef, jax.tree.structure(state))
        if graphdef != self._graphdef:
            self._graphdef, self._fns = graphdef, _functions(graphdef)
        self._state = jax.tree.leaves(state)
        return self

    @property
    def config(self):
        return self.model.config

    def __call__(self, input_ids, attention_mask=None, cache=None, labels=None, position_ids=None, seq_idx=None,
                 *, output_hidden_states: bool = False):
        """`model(input_ids, ...)`, jitted: the model's `Mamba2CausalLMOutput` (logits (b, l, v) float32, loss
        with `labels` (b, l), the new cache with `cache`, hidden states on request). A (b, 1) call with a cache
        is a decode step. The cache passed in is not consumed: it stays valid."""
        input_ids, attention_mask = self._check(input_ids, attention_mask, cache is not None)
        labels = as_array(labels, "labels")
        if _on_host(labels):
            v = self.model.config.vocab_size
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= v))
            if bad.any():
                raise ValueError(f"label {int(labels[tuple(np.argwhere(bad)[0])])} is outside the vocabulary "
                                 f"[0, {v}) and is not the ignore index {IGNORE_INDEX}")
        return self._fns.forward(bool(output_hidden_states), self._state, input_ids, attention_mask, cache, labels,
                                 as_array(position_ids, "position_ids"), as_array(seq_idx, "seq_idx"))

    def prefill(self, input_ids, attention_mask=None, max_length: int | None = None):
        """A prompt (b, l) into a new cache: (logits of the last position (b, v) float32, the cache). The cache
        is the model's `init_cache(b, max_length=max_length)`: families with attention layers need `max_length`
        (tokens the cache will hold, prompt included); a pure SSM cache ignores it. With `attention_mask`, the
        prompt must be left padded (the last column real)."""
        input_ids, attention_mask = self._check(input_ids, attention_mask, True)
        if max_length is not None:
            if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool):
                raise ValueError(f"max_length must be an int (tokens the cache will hold); got {max_length!r}")
            l = np.shape(input_ids)[1] if np.ndim(input_ids) == 2 else 0
            if max_length < l:
                raise ValueError(f"max_length ({max_length}) must be at least the prompt's length ({l})")
            max_length = int(max_length)
        elif self.model.backbone.uses_positions:
            raise ValueError(f"prefill of a {type(self.model).__name__} needs max_length (tokens the cache will "
                             f"hold, prompt included): its attention layers preallocate their key/value slots")
        return self._fns.prefill(max_length, self._state, input_ids, attention_mask)

    def score(self, input_ids, attention_mask=None):
        """Per-token log-probabilities (b, l-1) float32 of `input_ids[:, 1:]`, each given the tokens before it:
        `log_softmax(logits[:, :-1])` gathered at the next token. With `attention_mask`, positions whose token is
        padding hold 0, so `score(...).sum(-1)` is a sequence's log-likelihood."""
        input_ids, attention_mask = self._check(input_ids, attention_mask, False)
        if np.ndim(input_ids) != 2 or np.shape(input_ids)[1] < 2:
            raise ValueError(f"score needs input_ids of shape (batch, seq_len) with seq_len >= 2; got "
                             f"{np.shape(input_ids)}")
        return self._fns.score(self._state, input_ids, attention_mask)

    def _check(self, input_ids, attention_mask, with_cache: bool):
        input_ids, attention_mask = as_array(input_ids, "input_ids"), as_array(attention_mask, "attention_mask")
        if _on_host(input_ids):
            check_token_ids(input_ids, self.model.config.vocab_size)
        if with_cache and _on_host(attention_mask):
            check_left_padded(attention_mask)
        return input_ids, attention_mask

    def __repr__(self) -> str:
        return f"CompiledLM({type(self.model).__name__}, {len(self._state)} arrays)"
