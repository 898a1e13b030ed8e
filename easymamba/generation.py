"""Autoregressive generation: one prefill, then the whole decode loop as one jitted `lax.while_loop`.

    out = generate(model, input_ids [b, l], max_new_tokens=m, ...)
    out.sequences [b, l + m]   out.num_generated [b]   out.cache   out.logits [b, m, v] (output_logits=True)

How it runs (letters of `easymamba.typing`; `m` = max_new_tokens):

    prefill  (jit)  the prompt through the backbone (continuing from `cache` if given) and the head on the
                    last position only                              -> next logits [b, v], cache
    start    (jit)  the loop's carry: token buffer, flags, seen-token mask
    step     (jit)  choose a token from the pending logits, then feed it (an L == 1 decode step)
                                                                    -> its logits [b, v], cache
    loop     (jit)  lax.while_loop(step) until m tokens or every row has stopped; the cache's counters
                    (`positions`, `seqlen_offset`) are left alone in the loop and advanced once after it

`step` is one Python function: the loop's body and, jitted alone, the streaming path's step (`streamer=`,
`stream_generate`), so streaming yields exactly the tokens `generate` returns. Every chosen token is fed, so
the returned cache has consumed the whole output (one decode step more than transformers, which never feeds
its last token) and a later `generate(model, next_ids, cache=out.cache)` continues where this one ended.

Compilation: the prefill depends only on the model (graphdef) and the input shapes, so it is shared by all
settings. start / step / loop are cached per (graphdef, settings); two models of the same architecture share
them, and calls with the same shapes and settings never retrace. Settings are what fixes the code: sampling
on/off, top_k, whether top-p / min-p / the penalty apply, the EOS and pad ids, m and `output_logits`. The
values of temperature, top-p, min-p and the penalty are arguments, so changing them reuses compiled code.
The loop and step donate their carry (cache, buffers), which this module created, and so does the prefill
with a cache this module built (attention layers' key/value slots, `state_dtype`); the prefill's cache goes
into the loop's carry outside any jit (a jit returning it would copy it). A cache the caller passes in is only
read, never donated.

Stopping: a row stops when it emits any EOS id (which it still consumes); after that it receives
`pad_token_id` (default: the first EOS id, else 0), its count stops and its cache stops advancing. The loop
exits when every row has stopped. Unlike transformers, `eos_token_id=None` means "never stop early": the
model config's EOS id is not implied (a `generation_config.json` beside the model is: see `generate`).

Models: any family's causal LM (`easymamba.models.CausalLM`: `backbone` for the prefill, `logits` for the head,
`init_cache`, and `step` for each decode step), Mamba-2 and Mamba-1 alike. Official counterpart:
`transformers.GenerationMixin.generate` (greedy and multinomial sampling, 5.25).
"""

import collections
import dataclasses
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from easymamba.caching.cache import BaseCache
from easymamba.config.generation import GenerationDefaults
from easymamba.layers import check_token_ids, is_concrete
from easymamba.models.compiled import merge_flat
from easymamba.sampling import SamplingParams, add_seen, sample_next_token, seen_tokens

_INT32_MAX = 2**31 - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Every `generate` setting, validated at construction (each failure a `ValueError` naming the field).

    max_new_tokens      tokens to generate per row (>= 1)
    do_sample           False: greedy (argmax); True: draw from the processed distribution
    temperature         > 0 when sampling; divides the logits
    top_k               keep the k most likely tokens (0: off)
    top_p               nucleus mass in [0, 1] (1: off)
    min_p               in [0, 1]: drop tokens below min_p * p_max (0: off)
    repetition_penalty  > 0 (1: off); applied in greedy decoding too, as in transformers
    eos_token_id        an id or a list of ids that stop a row (None: rows never stop early)
    pad_token_id        fills a row after it stops (None: the first EOS id, else 0)
    output_logits       also return the raw logits of every step, `[b, m, v]` float32
    decode_weights      make the model's `decode_weights()` once before the decode loop (GPU, fused decode step:
                        in_proj / out_proj laid out for one-row matmuls, 130M b1 1,543 -> 2,046 tok/s on an
                        H100); they are one more copy of those weights while the call runs. False saves that
                        memory. No effect where the model has none to make (CPU, a mesh) or when streaming.

    The sampling warpers (temperature, top_k, top_p, min_p) are ignored when `do_sample` is False.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    output_logits: bool = False
    decode_weights: bool = True

    def __post_init__(self):
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        m = self.max_new_tokens
        require(_is_int(m) and m >= 1, f"max_new_tokens ({m!r}) must be an integer >= 1")
        for name in ("do_sample", "output_logits", "decode_weights"):
            require(isinstance(getattr(self, name), bool), f"{name} ({getattr(self, name)!r}) must be True or False")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            v = getattr(self, name)
            require(_is_real(v) and np.isfinite(v), f"{name} ({v!r}) must be a finite number")
            object.__setattr__(self, name, float(v))
        require(not self.do_sample or self.temperature > 0,
                f"temperature ({self.temperature}) must be > 0 when sampling; for greedy decoding set do_sample=False")
        require(_is_int(self.top_k) and self.top_k >= 0, f"top_k ({self.top_k!r}) must be an integer >= 0 (0: off)")
        require(0.0 <= self.top_p <= 1.0, f"top_p ({self.top_p}) must be in [0, 1] (1: off)")
        require(0.0 <= self.min_p <= 1.0, f"min_p ({self.min_p}) must be in [0, 1] (0: off)")
        require(self.repetition_penalty > 0,
                f"repetition_penalty ({self.repetition_penalty}) must be > 0 (1: off, > 1 discourages repeats)")
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "max_new_tokens", int(m))

        eos = self.eos_token_id
        if eos is not None:
            ids = (eos,) if _is_int(eos) else eos
            require(isinstance(ids, (list, tuple)) and len(ids) > 0 and all(_is_int(i) and i >= 0 for i in ids),
                    f"eos_token_id ({eos!r}) must be a non-negative integer, a non-empty list of them, or None")
            object.__setattr__(self, "eos_token_id", int(eos) if _is_int(eos) else tuple(int(i) for i in ids))
        pad = self.pad_token_id
        require(pad is None or (_is_int(pad) and pad >= 0),
                f"pad_token_id ({pad!r}) must be a non-negative integer or None")
        if pad is not None:
            object.__setattr__(self, "pad_token_id", int(pad))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (empty when there is none)."""
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def resolved_pad_token_id(self) -> int:
        """The pad id rows receive after they stop: `pad_token_id`, else the first EOS id, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)


@struct.dataclass
class GenerateOutput:
    """`generate`'s result (a pytree).

    sequences      [b, l + m] int32  the prompt, then the generated tokens; pad after a row stops
    cache          the state after the prompt and each row's generated tokens, its EOS included (pads after
                   EOS never enter it); `cache.seqlen_offset` counts the batch's decode steps
    num_generated  [b] int32        tokens each row generated, its EOS included (< m when it stopped early)
    logits         [b, m, v] float32 the raw logits (before any processor) each token was chosen from;
                   zero after a row stops; None unless output_logits=True
    """

    sequences: jax.Array
    cache: BaseCache
    num_generated: jax.Array
    logits: jax.Array | None = None


@struct.dataclass
class _Carry:
    """The decode loop's state."""

    step: jax.Array                     # [] int32: tokens chosen so far (the next column to write)
    tokens: jax.Array                   # [b] int32: the tokens chosen last (what streaming yields)
    next_logits: jax.Array              # [b, v] float32: the logits the next token is chosen from
    generated: jax.Array                # [b, m] int32, pad-filled
    num_generated: jax.Array            # [b] int32
    done: jax.Array                     # [b] bool
    cache: BaseCache
    seen: jax.Array | None              # [b, v] bool, only with a repetition penalty
    logits: jax.Array | None            # [b, m, v] float32, only with output_logits


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What fixes the compiled code, besides the graphdef and the input shapes."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    output_logits: bool
    decode_weights: bool

    @classmethod
    def of(cls, config: "GenerationConfig") -> "_Settings":
        return cls(config.max_new_tokens, config.eos_token_ids, config.resolved_pad_token_id, config.output_logits,
                   config.decode_weights)


# Traces per function name, for tests: a call with the same shapes and settings must not add any.
_TRACES: collections.Counter = collections.Counter()


def _jit(name: str, fn, *bound, **jit_kwargs):
    """`jax.jit` of `fn(*bound, *args)`, counting its traces in `_TRACES[name]`."""
    def traced(*args):
        _TRACES[name] += 1
        return fn(*bound, *args)
    traced.__name__ = f"generate_{name}"
    return jax.jit(traced, **jit_kwargs)


# XLA options the decode loop is compiled with (`jax.jit`'s `compiler_options`; read when a model's loop is first
# compiled). Empty: XLA's defaults. E.g. {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,
# CUDNN,WHILE,CONDITIONAL"} records the whole loop as one CUDA graph (benchmarks/generate.py --loop-graphs).
LOOP_COMPILER_OPTIONS: dict[str, Any] = {}

# Decode steps per trip of the loop (`fori_loop`'s unroll), by backend (`jax.default_backend()`; 1 where absent;
# read when a model's loop is first traced). The fused decode step writes each layer's new conv state to a fresh
# buffer (an in-place write would race: kernels/decode_step/triton.py), and a loop body of one step must then copy
# it back into the carry's buffer: one copy kernel per layer and step, 24 of the 201 kernels a 130M step launched
# at b = 1 (the loop compiled for an H100: docs/benchmarks.md, benchmarks/deviceless.py). With two steps a trip
# the two steps' outputs alternate between two buffers and XLA inserts no copy. On the CPU a copy costs no launch
# and a second step in the body only doubles the loop's compile time, so it stays at one.
LOOP_UNROLL: dict[str, int] = {"gpu": 2}


def _loop_unroll() -> int:
    return LOOP_UNROLL.get(jax.default_backend(), 1)


class _Compiled:
    """start / step / loop of one (graphdef, settings), closed over both (so a call hashes the key once, in
    `_lookup`, rather than jit hashing a large graphdef per function)."""

    def __init__(self, graphdef, settings: _Settings):
        self.settings = settings
        self.start = _jit("start", _start_carry, settings)
        self.step = _jit("step", _step, graphdef, settings, donate_argnums=(1,))  # (state, carry, rng, params)
        self.loop = _jit("loop", _loop, graphdef, settings, donate_argnums=(1,),
                         compiler_options=dict(LOOP_COMPILER_OPTIONS) or None)


_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_CACHE_MAX = 32  # least recently used entries beyond this are dropped (with their executables)
_LOCK = threading.Lock()


def _lookup(key: tuple, build):
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            entry = _CACHE[key] = build()
            while len(_CACHE) > _CACHE_MAX:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        return entry


def _prefill_fn(graphdef, donate_cache: bool = False):
    """The jitted prefill; `donate_cache` for a cache generate built itself (a caller's is only read): its
    buffers are then reused for the output, not held beside it (two key/value or SSM caches at the peak)."""
    return _lookup(("prefill", graphdef, donate_cache),
                   lambda: _jit("prefill", _prefill, graphdef, donate_argnums=(3,) if donate_cache else ()))


def _decode_fns(graphdef, settings: _Settings) -> _Compiled:
    return _lookup(("decode", graphdef, settings), lambda: _Compiled(graphdef, settings))


# -- per-model split cache ---------------------------------------------------------------------------------------
# `nnx.split` of a model and hashing its graphdef are Python walks over every module and variable: ~20-40 ms per
# call for a 24-layer model, as much as a hundred decode steps of a 130M model on a GPU. A model generated from
# twice is walked once: its graphdef, its State (whose Variables are the model's own, so later in-place value
# updates are seen) and its compiled functions are kept, weakly keyed by the model. Each call re-checks the
# structure cheaply (the identity of every attribute of every module, ~1 ms): any attribute rebound anywhere
# (a submodule, a Variable, `kernel_impl`, mesh rules) makes it split afresh.
_PYTREE_PRIVATE = frozenset({"_pytree__state"})


def _structure(nodes: list) -> tuple:
    return tuple(tuple(id(v) for k, v in vars(node).items() if k not in _PYTREE_PRIVATE) for node in nodes)


@dataclasses.dataclass
class _ModelEntry:
    graphdef: Any                 # (nnx graphdef, treedef of the State)
    variables: list               # the model's own Variables, in the State's leaf order
    nodes: list
    structure: tuple
    prefill: Any                  # (state, input_ids, attention_mask, cache) -> (logits, cache); reads the cache
    prefill_own: Any              # the same, donating the cache (one generate built)
    decode: dict


_MODELS: "weakref.WeakKeyDictionary[Any, _ModelEntry]" = weakref.WeakKeyDictionary()


def _split(model) -> _ModelEntry:
    """(graphdef, state, compiled functions) of `model`, from the cache when its structure is unchanged."""
    with _LOCK:
        entry = _MODELS.get(model)
    if entry is not None and _structure(entry.nodes) == entry.structure:
        return entry
    graphdef, state = nnx.split(model)
    graphdef = (graphdef, jax.tree.structure(state))
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    nodes = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Pytree)]
    entry = _ModelEntry(graphdef, variables, nodes, _structure(nodes), _prefill_fn(graphdef),
                        _prefill_fn(graphdef, donate_cache=True), {})
    with _LOCK:
        _MODELS[model] = entry
    return entry


def _entry_decode_fns(entry: _ModelEntry, settings: _Settings) -> _Compiled:
    fns = entry.decode.get(settings)
    if fns is None:
        fns = entry.decode[settings] = _decode_fns(entry.graphdef, settings)
    return fns


# -- the traced functions (graphdef and settings bound by _Compiled) --------------------------------------------
# `graphdef` here is the pair (nnx graphdef, treedef of the model's State) and `state` the State's leaves: a flat
# list of arrays is what jit flattens fastest (a State is ~10 Python-level flattens per layer and call).
def _prefill(graphdef, state, input_ids, attention_mask, cache):
    """The prompt through the model -> (logits of its last position [b, v] float32, cache)."""
    model = merge_flat(graphdef, state)
    return model.prefill(input_ids, model.init_cache(input_ids.shape[0]) if cache is None else cache,
                         attention_mask=attention_mask)


def _start_carry(settings: _Settings, next_logits, input_ids, attention_mask, params: SamplingParams) -> _Carry:
    """The loop's first carry, with no cache: the caller puts the prefill's cache in outside the jit (a jit that
    returns its input cache copies it, a second cache-sized buffer: 43 GB at 2.7B b256 in float32)."""
    b, v = next_logits.shape
    m = settings.max_new_tokens
    return _Carry(
        step=jnp.int32(0), tokens=jnp.full((b,), settings.pad_token_id, jnp.int32), next_logits=next_logits,
        generated=jnp.full((b, m), settings.pad_token_id, jnp.int32), num_generated=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), jnp.bool_), cache=None,
        seen=seen_tokens(input_ids, v, attention_mask) if params.use_repetition_penalty else None,
        logits=jnp.zeros((b, m, v), jnp.float32) if settings.output_logits else None)


def _step(graphdef, settings: _Settings, state, carry: _Carry, rng, params: SamplingParams,
          update_seq: bool = True, decode_weights=None) -> _Carry:
    """Choose token `carry.step` from the pending logits, record it, feed it. The loop body and the
    streaming step. `update_seq=False` (the loop) leaves the cache's counters to `_advance` at the loop's end;
    `decode_weights` (the loop) are the model's `decode_weights()`, made before the loop."""
    live = ~carry.done
    key = jax.random.fold_in(rng, carry.step) if params.do_sample else None
    token = sample_next_token(carry.next_logits, key, params, carry.seen)
    token = jnp.where(live, token, settings.pad_token_id)                  # (b,)
    generated = jax.lax.dynamic_update_index_in_dim(carry.generated, token, carry.step, axis=1)
    out_logits = carry.logits
    if out_logits is not None:
        row = jnp.where(live[:, None], carry.next_logits, 0.0)[:, None]    # (b, 1, v)
        out_logits = jax.lax.dynamic_update_slice_in_dim(out_logits, row, carry.step, axis=1)
    done = carry.done
    if settings.eos_token_ids:
        done = done | jnp.isin(token, jnp.asarray(settings.eos_token_ids, jnp.int32))
    seen = None if carry.seen is None else add_seen(carry.seen, token)

    model = merge_flat(graphdef, state)
    if settings.eos_token_ids:  # a row stopped before this step keeps its state: pads must not enter it
        next_logits, cache = model.step(token, carry.cache, active_rows=live,  # held in place (the fused kernel's own)
                                        update_seq=update_seq, decode_weights=decode_weights)
        if update_seq:  # seqlen_offset, the batch's count, stays once every row had stopped (as in `_advance`)
            cache = jax.tree.map(lambda old, new: jnp.where(jnp.all(carry.done), old, new) if new.ndim == 0 else new,
                                 carry.cache, cache)
    else:
        next_logits, cache = model.step(token, carry.cache, update_seq=update_seq, decode_weights=decode_weights)
    return carry.replace(step=carry.step + 1, tokens=token, next_logits=next_logits, generated=generated,
                         num_generated=carry.num_generated + live.astype(jnp.int32), done=done, cache=cache,
                         seen=seen, logits=out_logits)


# Steps per trip of the outer loop when rows can stop early (see `_loop`).
STEPS_PER_CHECK = 8


def _loop(graphdef, settings: _Settings, state, carry: _Carry, rng, params: SamplingParams) -> _Carry:
    """All decode steps. A `while_loop` whose condition depends on device values makes the GPU runtime read the
    condition back to the host every trip, a stall between steps (measured in docs/benchmarks.md); a loop of
    static trip count runs without it. So: with no EOS id every row runs to the end and the loop has a static
    trip count; with EOS ids, the early-stop check runs every `STEPS_PER_CHECK` steps (an inner loop of static
    count), then single checked steps finish the count. Steps after every row stopped change nothing in the
    result: the rows' tokens are pads, their states are held (the model's `active_rows`) and so is
    `seqlen_offset`."""
    m = settings.max_new_tokens
    model = merge_flat(graphdef, state)
    # made once, outside the loop (GenerationConfig.decode_weights)
    weights = model.decode_weights() if settings.decode_weights else None
    # A model with attention layers writes each token's key and value at the cache's `seqlen_offset`, so its
    # counters advance every step; a pure SSM model leaves them to `_advance` at the end.
    per_step = model.backbone.uses_positions
    advance = (lambda c: c) if per_step else _advance  # noqa: E731
    step = lambda c: _step(graphdef, settings, state, c, rng, params, update_seq=per_step,  # noqa: E731
                           decode_weights=weights)
    unroll = _loop_unroll()  # steps a trip (LOOP_UNROLL); a remainder of m runs after the loop
    if not settings.eos_token_ids:  # the carry is fresh: step 0
        return advance(jax.lax.fori_loop(0, m, lambda _, c: step(c), carry, unroll=unroll))

    def running(c: _Carry, ahead: int = 1):
        return (c.step + ahead <= m) & ~jnp.all(c.done)

    group = min(STEPS_PER_CHECK, m)
    carry = jax.lax.while_loop(lambda c: running(c, group),
                               lambda c: jax.lax.fori_loop(0, group, lambda _, c: step(c), c, unroll=unroll),
                               carry)
    return advance(jax.lax.while_loop(running, step, carry))


def _advance(carry: _Carry) -> _Carry:
    """The cache's counters after a loop that started fresh (`num_generated` zero) and left them alone: each
    row's position by the tokens it consumed (`num_generated`: a row consumes each token it emits, its EOS
    included, and nothing after), `seqlen_offset` by the steps in which some row was live, the largest count.
    What stepping them per step (`_step(update_seq=True)`, the streaming path) gives; per step they cost a small
    kernel per layer on GPU (docs/benchmarks.md)."""
    return carry.replace(cache=carry.cache.advance(carry.num_generated, jnp.max(carry.num_generated)))


# -- the public entry points -----------------------------------------------------------------------------------
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationConfig) if f.name != "max_new_tokens"}


def model_defaults(model) -> dict[str, Any]:
    """The settings `model.generation_config` (a `GenerationDefaults`, from the `generation_config.json` of the
    directory the model was loaded from) sets; empty when it has none."""
    defaults = getattr(model, "generation_config", None)
    return defaults.settings() if isinstance(defaults, GenerationDefaults) else {}


def _length(name: str, value) -> int | None:
    if value is not None and not (_is_int(value) and value >= 1):
        raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
    return value


def _config(model, input_ids, generation_config: GenerationConfig | None, max_new_tokens, max_length,
            settings: dict) -> GenerationConfig:
    """The call's settings: the keywords given (not None), else `model.generation_config`'s, else the defaults of
    `GenerationConfig`; or `generation_config` as is. `max_length` counts the prompt: m = max_length - l."""
    max_new_tokens, max_length = _length("max_new_tokens", max_new_tokens), _length("max_length", max_length)
    l = np.shape(input_ids)[-1] if np.ndim(input_ids) == 2 else None  # a wrong shape is _validate's to name
    if max_new_tokens is not None and max_length is not None and l is not None and l + max_new_tokens != max_length:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and max_length ({max_length}) disagree for a prompt "
                         f"of {l} tokens ({l} + {max_new_tokens} != {max_length}); pass only one of them")
    if generation_config is not None:
        if not isinstance(generation_config, GenerationConfig):
            raise ValueError(f"generation_config must be a GenerationConfig; got {type(generation_config).__name__}")
        clashes = [k for k, v in settings.items() if v is not None and v != _DEFAULTS[k]]
        clashes[:0] = [k for k, v in (("max_new_tokens", max_new_tokens), ("max_length", max_length)) if v is not None]
        if clashes:
            raise ValueError(f"{', '.join(clashes)} given both as keyword arguments and through generation_config; "
                             f"pass generation_config.replace({clashes[0]}=...) instead")
        return generation_config
    defaults = model_defaults(model)
    if max_new_tokens is None and max_length is None:
        max_new_tokens, max_length = defaults.get("max_new_tokens"), defaults.get("max_length")
    if max_new_tokens is None and max_length is not None and l is not None:
        if max_length <= l:
            raise ValueError(f"max_length ({max_length}) counts the prompt and must exceed its {l} tokens; pass "
                             f"a larger max_length or max_new_tokens")
        max_new_tokens = max_length - l
    if max_new_tokens is None:
        raise ValueError("generate needs max_new_tokens or max_length (or a generation_config, or a model whose "
                         "generation_config.json sets one)")
    values = {k: v if v is not None else defaults.get(k, _DEFAULTS[k]) for k, v in settings.items()}
    return GenerationConfig(max_new_tokens=max_new_tokens, **values)


def _is_key(rng) -> bool:
    if not isinstance(rng, jax.Array):
        return False
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.shape == ()
    return rng.dtype == jnp.uint32 and rng.shape == (2,)                   # a raw (legacy) threefry key


def _validate(model, input_ids, attention_mask, cache, rng, config: GenerationConfig):
    """Eager checks with sentences for errors (inside jit the ids would only turn into NaN logits)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None or not hasattr(model, "backbone"):
        raise ValueError(f"generate needs a causal LM such as Mamba2ForCausalLM; got {type(model).__name__}")
    if not hasattr(input_ids, "shape") or not hasattr(input_ids, "dtype"):
        input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (batch >= 1, seq_len >= 1); got {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers; got dtype {input_ids.dtype}")
    check_token_ids(input_ids, vocab)
    b, l = input_ids.shape
    if attention_mask is not None:
        if not hasattr(attention_mask, "shape"):
            attention_mask = np.asarray(attention_mask)
        if tuple(attention_mask.shape) != (b, l):
            raise ValueError(f"attention_mask must have the shape of input_ids {(b, l)}; "
                             f"got {tuple(attention_mask.shape)}")
        if is_concrete(attention_mask):
            mask = np.asarray(attention_mask)
            if not np.isin(mask, (0, 1)).all():
                raise ValueError(f"attention_mask must hold only 0 and 1; found {np.unique(mask).tolist()[:8]}")
            bad = np.flatnonzero((np.diff(mask, axis=1) < 0).any(axis=1) | (mask[:, -1] == 0))
            if bad.size:
                raise ValueError(f"attention_mask must be left padding (zeros, then ones to the end); row "
                                 f"{int(bad[0])} is {mask[bad[0]].tolist()[:16]}")
    offset = 0
    if cache is not None:
        if not isinstance(cache, BaseCache):
            raise ValueError(f"cache must be the model's cache (model.init_cache(batch)); got {type(cache).__name__}")
        cache.check_compatible(model.config, b)
        if cache.seqlen_offset is not None and is_concrete(cache.seqlen_offset):
            offset = int(cache.seqlen_offset)
        slots = getattr(cache.metadata, "max_length", None)  # a hybrid cache's key/value slots
        if slots is not None and offset + l + config.max_new_tokens > slots:
            raise ValueError(f"the cache holds {slots} key/value slots (max_length), but its {offset} tokens + the "
                             f"prompt's {l} + max_new_tokens ({config.max_new_tokens}) need "
                             f"{offset + l + config.max_new_tokens}; build it with "
                             f"model.init_cache({b}, max_length={offset + l + config.max_new_tokens}) or more")
    if offset + l + config.max_new_tokens > _INT32_MAX:
        raise ValueError(f"max_new_tokens ({config.max_new_tokens}) does not fit: the cache's {offset} tokens + the "
                         f"prompt's {l} + max_new_tokens exceed int32 positions ({_INT32_MAX})")
    for name, ids in (("eos_token_id", config.eos_token_ids), ("pad_token_id", (config.resolved_pad_token_id,))):
        out = [i for i in ids if not 0 <= i < vocab]
        if out:
            raise ValueError(f"{name} {out[0]} is outside the vocabulary [0, {vocab})")
    if config.do_sample and rng is None:
        raise ValueError("do_sample=True needs rng, e.g. rng=jax.random.key(0)")
    if rng is not None and not _is_key(rng):
        raise ValueError(f"rng must be one JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); "
                         f"got {type(rng).__name__} {getattr(rng, 'shape', '')}")
    return input_ids, attention_mask


@dataclasses.dataclass
class _Run:
    """A prefilled generation, ready for the loop or for streaming steps."""

    fns: _Compiled
    state: Any
    carry: _Carry
    rng: Any
    params: SamplingParams
    input_ids: jax.Array

    def loop(self) -> _Carry:
        return self.fns.loop(self.state, self.carry, self.rng, self.params)

    def steps(self) -> Iterator[_Carry]:
        """The streaming path: one jitted `_step` per token, each carry yielded as it is ready, until m tokens
        or every row has stopped (the loop's condition, read back from the device each step)."""
        carry, m = self.carry, self.fns.settings.max_new_tokens
        while int(carry.step) < m and not np.asarray(carry.done).all():
            carry = self.fns.step(self.state, carry, self.rng, self.params)
            yield carry

    def output(self, carry: _Carry) -> GenerateOutput:
        return GenerateOutput(sequences=jnp.concatenate([self.input_ids, carry.generated], axis=1),
                              cache=carry.cache, num_generated=carry.num_generated, logits=carry.logits)


def _start(model, input_ids, attention_mask, cache, rng, generation_config, max_new_tokens, max_length,
           num_return_sequences, settings, state_dtype=None) -> _Run:
    """Validate, prefill, and build the loop's carry."""
    if state_dtype is not None:
        if cache is not None:
            raise ValueError("state_dtype applies to the cache generate builds; with cache=..., build that cache "
                             "with model.init_cache(batch, ssm_dtype=...) instead")
        try:
            state_dtype = np.dtype(state_dtype)
        except TypeError as exc:
            raise ValueError(f"state_dtype must be a floating dtype (jnp.float32, jnp.bfloat16); got "
                             f"{state_dtype!r}") from exc
        if not jnp.issubdtype(state_dtype, jnp.floating):
            raise ValueError(f"state_dtype must be a floating dtype (jnp.float32, jnp.bfloat16); got {state_dtype}")
    config = _config(model, input_ids, generation_config, max_new_tokens, max_length, settings)
    input_ids, attention_mask = _validate(model, input_ids, attention_mask, cache, rng, config)
    n = num_return_sequences
    if not (_is_int(n) and n >= 1):
        raise ValueError(f"num_return_sequences ({n!r}) must be an integer >= 1")
    if n > 1 and not config.do_sample:
        raise ValueError(f"num_return_sequences ({n}) > 1 needs do_sample=True: greedy decoding would return "
                         f"{n} copies of one sequence (transformers refuses it too)")
    if n > 1 and cache is not None:
        raise ValueError(f"num_return_sequences ({n}) > 1 with a cache: a cache holds one state per row of "
                         "input_ids; repeat the rows of both yourself, or leave num_return_sequences at 1")
    static = _Settings.of(config)
    params = SamplingParams.from_config(config)
    entry = _split(model)
    state, fns = [v.get_raw_value() for v in entry.variables], _entry_decode_fns(entry, static)
    rng = jax.random.key(0) if rng is None else rng  # unused when greedy; a fixed key keeps one signature
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if n > 1:  # each row n times in a row, as transformers' _expand_inputs_for_generation
        input_ids = jnp.repeat(input_ids, n, axis=0)
        attention_mask = None if attention_mask is None else jnp.repeat(attention_mask, n, axis=0)
    prefill = entry.prefill
    if cache is None and (model.backbone.uses_positions or state_dtype is not None):
        # key/value slots for the prompt and every new token; SSM states in state_dtype. Ours: prefill donates it
        kw = {} if state_dtype is None else {"ssm_dtype": state_dtype}
        cache = model.init_cache(input_ids.shape[0], max_length=input_ids.shape[1] + config.max_new_tokens, **kw)
        prefill = entry.prefill_own
    next_logits, cache = prefill(state, input_ids, attention_mask, cache)
    carry = fns.start(next_logits, input_ids, attention_mask, params).replace(cache=cache)
    return _Run(fns, state, carry, rng, params, input_ids)


def generate(model, input_ids, *, attention_mask=None, max_new_tokens: int | None = None,
             max_length: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, eos_token_id=None, pad_token_id=None, rng=None,
             num_return_sequences: int = 1, cache: BaseCache | None = None, streamer=None,
             output_logits: bool = False, decode_weights: bool = True, state_dtype=None,
             generation_config: GenerationConfig | None = None) -> GenerateOutput:
    """Generate `max_new_tokens` tokens after `input_ids [b, l]` (see the module docstring and
    `GenerationConfig` for the settings; pass them as keywords or as one `generation_config`, not both).

    A setting left at None is taken from `model.generation_config` (the `generation_config.json` of the
    directory the model was loaded from, `easymamba.config.generation.GenerationDefaults`) when it sets it,
    else it is `GenerationConfig`'s default: greedy, temperature 1, top_k 0 (off), top_p 1, min_p 0,
    repetition_penalty 1, no EOS (rows never stop early).

    max_length      the length of `out.sequences`, prompt included: max_new_tokens = max_length - l (as
                    transformers' `max_length`); give one of the two, or both when they agree
    attention_mask  [b, l] of 0/1, left padding only; each row then gets exactly the tokens it gets alone
    rng             a `jax.random.key`, required when do_sample (token t uses `fold_in(rng, t)`)
    num_return_sequences  sample each row this many times: the rows are repeated (row i becomes rows
                    i*n .. i*n+n-1, transformers' order) and the result has b * n rows; needs do_sample
    cache           continue from this state (read, not donated); default: a fresh `model.init_cache(b)`.
                    The repetition penalty then sees only `input_ids` and what is generated.
    state_dtype     the dtype the fresh cache keeps SSM states in (default float32). `jnp.bfloat16` halves the
                    bytes each decode step reads and writes, and the cache's memory (what mamba_ssm and
                    transformers keep in a bf16 model): faster at large batch, at the cost of rounding the state
                    to bf16 after every token. Not with `cache` (build it with `init_cache(..., ssm_dtype=)`).
    streamer        an object with `put(ids)` / `end()` (transformers' `BaseStreamer` protocol, so
                    `transformers.TextStreamer` works for b = 1): `put` gets the prompt `[b, l]` once, then
                    each step's tokens `[b]` (numpy) as they come, from the same step the loop runs

    Returns `GenerateOutput(sequences [b, l + m], cache, num_generated [b], logits)`.
    """
    settings = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                    output_logits=output_logits, decode_weights=decode_weights)
    run = _start(model, input_ids, attention_mask, cache, rng, generation_config, max_new_tokens, max_length,
                 num_return_sequences, settings, state_dtype)
    if streamer is None:
        return run.output(run.loop())
    streamer.put(np.asarray(run.input_ids))
    carry = run.carry
    for carry in run.steps():
        streamer.put(np.asarray(carry.tokens))
    streamer.end()
    return run.output(carry)


def stream_generate(model, input_ids, *, attention_mask=None, max_new_tokens: int | None = None,
                    max_length: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None, eos_token_id=None, pad_token_id=None, rng=None,
                    num_return_sequences: int = 1, cache: BaseCache | None = None, state_dtype=None,
                    generation_config: GenerationConfig | None = None) -> Iterator[np.ndarray]:
    """`generate` as an iterator: yields each step's tokens `[b]` (numpy int32; pad for rows that have
    stopped) as soon as they are chosen, and stops once every row has stopped or m tokens are out.

    The arguments are checked and the prompt is prefilled when this is called, so errors surface here.
    Stopping the iteration early (leaving the loop) runs no further step.
    """
    settings = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                    output_logits=False, decode_weights=True)
    run = _start(model, input_ids, attention_mask, cache, rng, generation_config, max_new_tokens, max_length,
                 num_return_sequences, settings, state_dtype)
    return (np.asarray(carry.tokens) for carry in run.steps())
