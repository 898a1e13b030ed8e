"""`generate`: greedy parity with transformers' generate, stopping, streaming, compilation, a 10k-token soak.

The reference is transformers' own `generate` on the random HF model our copy was converted from. Greedy
tokens must be equal, not close: an argmax only flips where two logits of the random model lie within float32
rounding of each other, which these seeds do not hit. Shapes are shared between tests on purpose (prompt
width 9, m = 24) so the module compiles each function few times.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import easymamba as em
from easymamba import generation
from helpers import jitted, random_hf_model, random_ids, rel_err, to_easymamba

M = 24                      # max_new_tokens in most tests
LENGTHS = [9, 4, 6]         # the left-padded batch's rows; width 9
PAD = 0


@pytest.fixture(scope="module")
def pair():
    hf_model = random_hf_model(seed=13, eos_token_id=None)  # no implied EOS in transformers' generate either
    return hf_model, to_easymamba(hf_model)


@pytest.fixture(scope="module")
def rows(pair):
    rng = np.random.default_rng(14)
    return [random_ids(rng, 1, n, pair[0].config.vocab_size)[0] for n in LENGTHS]


@pytest.fixture(scope="module")
def padded(rows):
    width = max(LENGTHS)
    ids = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    return ids, mask


def hf_generate(hf_model, ids, mask=None, **kwargs):
    kwargs = {"max_new_tokens": M, "do_sample": False, "pad_token_id": PAD, **kwargs}
    if mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(mask).long()
    with torch.no_grad():
        return hf_model.generate(torch.from_numpy(ids).long(), **kwargs).numpy()


def pick_eos(tokens: np.ndarray, row: int) -> tuple[int, int]:
    """A token that first appears in `row` mid-way and never in the other rows: an EOS that fires in that row
    only. Returns (token, its step)."""
    others = set(np.delete(tokens, row, axis=0).ravel().tolist())
    for step in range(M // 4, 3 * M // 4):
        tok = int(tokens[row, step])
        if tok not in others and tok not in tokens[row, :step]:
            return tok, step
    raise AssertionError("no token fires in one row only; pick another seed")


# -- parity with transformers ----------------------------------------------------------------------------------
def test_greedy_matches_transformers_batch_1(pair, rows):
    hf_model, model = pair
    ids = rows[0][None]
    out = em.generate(model, ids, max_new_tokens=M)
    np.testing.assert_array_equal(out.sequences, hf_generate(hf_model, ids))
    np.testing.assert_array_equal(out.num_generated, [M])


def test_greedy_left_padded_batch_with_eos_matches_transformers_and_rows_alone(pair, rows, padded):
    hf_model, model = pair
    ids, mask = padded
    free = hf_generate(hf_model, ids, mask)[:, ids.shape[1]:]              # (3, M), no EOS
    eos, step = pick_eos(free, row=1)
    want = hf_generate(hf_model, ids, mask, eos_token_id=eos)
    assert want.shape == (3, ids.shape[1] + M) and (want[1, ids.shape[1] + step + 1:] == PAD).all()
    out = em.generate(model, ids, attention_mask=mask, max_new_tokens=M, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(out.sequences, want)
    np.testing.assert_array_equal(out.num_generated, [M, step + 1, M])
    for r, row in enumerate(rows):                                         # each row exactly as it runs alone
        alone = em.generate(model, row[None], max_new_tokens=M, eos_token_id=eos, pad_token_id=PAD)
        np.testing.assert_array_equal(alone.sequences[0, len(row):], out.sequences[r, ids.shape[1]:])


def test_greedy_repetition_penalty_matches_transformers(pair, padded):
    """The penalty applies in greedy decoding too, to the prompt (not its left pads) and the output."""
    hf_model, model = pair
    ids, mask = padded
    out = em.generate(model, ids, attention_mask=mask, max_new_tokens=M, repetition_penalty=1.5)
    np.testing.assert_array_equal(out.sequences, hf_generate(hf_model, ids, mask, repetition_penalty=1.5))
    plain = em.generate(model, ids, attention_mask=mask, max_new_tokens=M)
    assert (np.asarray(out.sequences) != np.asarray(plain.sequences)).any()  # the penalty changed something


# -- stopping, streaming, the returned cache -------------------------------------------------------------------
class Recorder:
    """transformers' streamer protocol: put(prompt [b, l]) once, put(tokens [b]) per step, end()."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(np.array(value))

    def end(self):
        self.ended += 1


def test_rows_stop_at_any_eos_the_loop_ends_early_and_streaming_agrees(pair, padded):
    hf_model, model = pair
    ids, mask = padded
    free = hf_generate(hf_model, ids, mask)[:, ids.shape[1]:]
    eos = sorted({int(free[r, 3 + 2 * r]) for r in range(3)})                 # one id of the list per row
    expect = np.array([np.flatnonzero(np.isin(row, eos))[0] + 1 for row in free])
    kwargs = dict(attention_mask=mask, max_new_tokens=M, eos_token_id=eos, pad_token_id=PAD)
    out = em.generate(model, ids, **kwargs)
    np.testing.assert_array_equal(out.num_generated, expect)
    assert expect.max() < M
    gen = np.asarray(out.sequences)[:, ids.shape[1]:]
    for r, n in enumerate(expect):
        np.testing.assert_array_equal(gen[r, :n], free[r, :n])
        assert gen[r, n - 1] in eos and (gen[r, n:] == PAD).all()
    # the loop ran max(num_generated) steps, not M; each row's cache stopped after its EOS
    assert int(out.cache.seqlen_offset) == ids.shape[1] + expect.max()
    np.testing.assert_array_equal(out.cache.views[0].positions, ids.shape[1] + expect)

    streamed = np.stack(list(em.stream_generate(model, ids, **kwargs)), axis=1)
    np.testing.assert_array_equal(streamed, gen[:, :expect.max()])        # the same tokens, and it stopped too
    recorder = Recorder()
    via_streamer = em.generate(model, ids, streamer=recorder, **kwargs)
    np.testing.assert_array_equal(recorder.puts[0], ids)
    np.testing.assert_array_equal(np.stack(recorder.puts[1:], axis=1), gen[:, :expect.max()])
    assert recorder.ended == 1
    np.testing.assert_array_equal(via_streamer.sequences, out.sequences)
    np.testing.assert_array_equal(via_streamer.num_generated, out.num_generated)
    # the loop advances the cache counters once at its end, the streaming path per step: the same counters
    for looped, stepped in zip(out.cache.views, via_streamer.cache.views):
        np.testing.assert_array_equal(looped.positions, stepped.positions)
        assert int(looped.seqlen_offset) == int(stepped.seqlen_offset) == ids.shape[1] + expect.max()

    # the first row to stop keeps the state of its prompt + output, EOS included, pads excluded
    r = int(np.argmin(expect))
    alone = np.concatenate([ids[r, mask[r] == 1], gen[r, :expect[r]]])[None]
    state = jitted(model)(jnp.asarray(alone), cache=model.init_cache(1)).cache
    for got, want in zip(out.cache.views, state.views):
        assert rel_err(got.ssm_states[r], want.ssm_states[0]) <= 1e-5       # decode vs chunked scan rounding
        assert rel_err(got.conv_states[r], want.conv_states[0]) <= 1e-5


def test_returned_cache_continues_the_generation(pair, rows):
    """The cache has consumed every generated token, so feeding the next one continues the same greedy run;
    the caller's cache is read, not donated."""
    _, model = pair
    ids = rows[0][None]
    full = np.asarray(em.generate(model, ids, max_new_tokens=M).sequences)[0, len(rows[0]):]
    part = em.generate(model, ids, max_new_tokens=10)
    assert all(int(v.seqlen_offset) == len(rows[0]) + 10 and v.positions.tolist() == [len(rows[0]) + 10]
               for v in part.cache.views)
    rest = em.generate(model, full[None, 10:11], cache=part.cache, max_new_tokens=M - 11)
    np.testing.assert_array_equal(np.asarray(rest.sequences)[0, 1:], full[11:])
    assert not part.cache.views[0].ssm_states.is_deleted()


def test_the_prefills_cache_reaches_the_loop_without_a_copy(pair, rows, monkeypatch):
    """The loop's first carry holds the very buffers the prefill wrote (no jit in between returns the cache, which
    would copy it: a second cache in memory, 43 GB at 2.7B b256 in float32, out of memory on an 80 GB GPU)."""
    _, model = pair
    entry = generation._split(model)
    seen = []

    def prefill(*args):
        logits, cache = real(*args)
        seen.append([v.ssm_states.unsafe_buffer_pointer() for v in cache.views])
        return logits, cache

    real = entry.prefill
    monkeypatch.setattr(entry, "prefill", prefill)
    settings = dict(do_sample=None, temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                    eos_token_id=None, pad_token_id=None, output_logits=False, decode_weights=True)
    run = generation._start(model, rows[0][None], None, None, None, None, 4, None, 1, settings)
    assert seen and [v.ssm_states.unsafe_buffer_pointer() for v in run.carry.cache.views] == seen[0]


def test_loop_compiler_options_reach_the_loops_compilation(pair, rows, monkeypatch):
    """`LOOP_COMPILER_OPTIONS` is what the decode loop is compiled with: an option XLA does not know is refused
    when the loop compiles, and a known one (a GPU option, inert on the CPU) leaves the tokens unchanged."""
    _, model = pair
    want = np.asarray(em.generate(model, rows[0][None], max_new_tokens=5).sequences)
    for options in ({"xla_no_such_option": 1}, {"xla_gpu_graph_min_graph_size": 1}):
        # a fresh copy and an empty function cache: the loop compiles afresh, with the options
        monkeypatch.setattr(generation, "_CACHE", collections.OrderedDict())
        monkeypatch.setattr(generation, "LOOP_COMPILER_OPTIONS", options)
        fresh = nnx.clone(model)
        if "xla_no_such_option" in options:
            with pytest.raises(Exception, match="xla_no_such_option"):
                em.generate(fresh, rows[0][None], max_new_tokens=5)
        else:
            out = em.generate(fresh, rows[0][None], max_new_tokens=5)
            np.testing.assert_array_equal(np.asarray(out.sequences), want)


def test_two_steps_a_trip_match_transformers(pair, padded, monkeypatch):
    """`LOOP_UNROLL` (two decode steps a trip of the loop, the GPU's default) generates what transformers does, with
    an even and an odd step count (the remainder runs after the loop) and with an EOS that stops one row mid-way
    (the early-stop loop's inner trips); the loop really is traced with unroll=2."""
    hf_model, model = pair
    ids, mask = padded
    free = hf_generate(hf_model, ids, mask)[:, ids.shape[1]:]
    eos, step = pick_eos(free, row=1)
    monkeypatch.setattr(generation, "_CACHE", collections.OrderedDict())  # the loop traces afresh
    monkeypatch.setattr(generation, "LOOP_UNROLL", {jax.default_backend(): 2})
    unrolls = []
    fori_loop = jax.lax.fori_loop

    def recording(*args, unroll=None, **kwargs):
        unrolls.append(unroll)
        return fori_loop(*args, unroll=unroll, **kwargs)

    monkeypatch.setattr(jax.lax, "fori_loop", recording)
    fresh = nnx.clone(model)
    for m, eos_id in ((M, None), (7, None), (M, eos)):
        extra = {} if eos_id is None else {"eos_token_id": eos_id}
        want = hf_generate(hf_model, ids, mask, max_new_tokens=m, **extra)
        out = em.generate(fresh, ids, attention_mask=mask, max_new_tokens=m, eos_token_id=eos_id, pad_token_id=PAD)
        np.testing.assert_array_equal(out.sequences, want)
    np.testing.assert_array_equal(out.num_generated, [M, step + 1, M])
    assert unrolls and set(unrolls) == {2}


def test_fused_decode_with_each_blocks_norm_folded_matches_transformers(pair, padded):
    """With the fused decode step (kernel_impl="pallas"; Pallas' interpreter on the CPU), `generate`'s prepared
    weights fold each block's RMS norm weight into in_proj (`"rms_eps"`) and the kernel forms the norm's factor
    from the block's input: the tokens transformers generates (random norm weights, left padding), and logits
    within float32 rounding (1e-5) of the op-by-op path's."""
    hf_model, model = pair
    ids, mask = padded
    fused = to_easymamba(hf_model, kernel_impl="pallas")
    weights = fused.decode_weights()
    assert all(w is not None and "rms_eps" in w for w in weights)
    assert not np.allclose(np.asarray(fused.backbone.layers[0].norm.weight[...]), 1.0)  # a weight to fold
    m = 8
    out = em.generate(fused, ids, attention_mask=mask, max_new_tokens=m, output_logits=True)
    np.testing.assert_array_equal(out.sequences, hf_generate(hf_model, ids, mask, max_new_tokens=m))
    ref = em.generate(model, ids, attention_mask=mask, max_new_tokens=m, output_logits=True)
    assert model.decode_weights() is None or "rms_eps" not in model.decode_weights()[0]  # the CPU path: unfused
    assert rel_err(out.logits, ref.logits) <= 1e-5, rel_err(out.logits, ref.logits)


def test_state_dtype_bfloat16_keeps_bf16_states_close_to_float32(pair, padded):
    """`state_dtype=jnp.bfloat16`: the cache keeps its SSM states in bf16 through prefill and loop, and the logits
    stay within bf16 rounding of the float32-state run (checked over the steps whose tokens agree so far)."""
    _, model = pair
    ids, mask = padded
    ref = em.generate(model, ids, attention_mask=mask, max_new_tokens=M, output_logits=True)
    low = em.generate(model, ids, attention_mask=mask, max_new_tokens=M, output_logits=True,
                      state_dtype=jnp.bfloat16)
    assert all(v.ssm_states.dtype == jnp.bfloat16 for v in low.cache.views)
    assert all(v.ssm_states.dtype == jnp.float32 for v in ref.cache.views)
    a, b = np.asarray(ref.sequences)[:, ids.shape[1]:], np.asarray(low.sequences)[:, ids.shape[1]:]
    same = int(np.argmin(np.all(a == b, axis=0))) if not np.array_equal(a, b) else M
    assert same >= M // 2, f"bf16 states changed a greedy token at step {same}"
    err = rel_err(np.asarray(low.logits)[:, :same], np.asarray(ref.logits)[:, :same])
    assert 0 < err < 2e-2, err  # differs (the state is rounded) but only by bf16 rounding


@pytest.mark.parametrize("family", ["mamba1", "nemotron_h"])
def test_state_dtype_reaches_every_familys_ssm_views(family):
    """Mamba-1's views and a hybrid's SSM views (beside its key/value views) take state_dtype too."""
    if family == "mamba1":
        cfg = em.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=8)
        model = em.MambaForCausalLM(cfg, rngs=nnx.Rngs(3))
    else:
        cfg = em.NemotronHConfig(vocab_size=128, hidden_size=32, layers_block_type=("mamba", "mlp", "attention"),
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                 mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8,
                                 chunk_size=8)
        model = em.NemotronHForCausalLM(cfg, rngs=nnx.Rngs(3))
    ids = np.random.default_rng(4).integers(1, 128, (2, 7))
    ref = em.generate(model, ids, max_new_tokens=6, output_logits=True)
    low = em.generate(model, ids, max_new_tokens=6, output_logits=True, state_dtype=jnp.bfloat16)
    ssm = [v.ssm_states for v in low.cache.views if getattr(v, "ssm_states", None) is not None]
    assert ssm and all(s.dtype == jnp.bfloat16 for s in ssm)
    np.testing.assert_array_equal(np.asarray(low.sequences), np.asarray(ref.sequences))
    assert rel_err(np.asarray(low.logits), np.asarray(ref.logits)) < 2e-2


def test_a_cache_generate_builds_is_donated_to_the_prefill_a_callers_is_not(pair, rows, monkeypatch):
    """generate builds the cache itself for state_dtype (and for attention layers' key/value slots): the prefill
    then reuses its buffers rather than holding a second cache beside it. A caller's cache stays readable."""
    _, model = pair
    built = []
    init_cache = type(model).init_cache

    def recording(self, *args, **kwargs):
        built.append(init_cache(self, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(type(model), "init_cache", recording)
    em.generate(model, rows[0][None], max_new_tokens=3, state_dtype=jnp.bfloat16)
    assert len(built) == 1 and all(v.ssm_states.is_deleted() for v in built[0].views)
    mine = model.init_cache(1)
    em.generate(model, rows[0][None], max_new_tokens=3, cache=mine)
    assert not any(v.ssm_states.is_deleted() for v in mine.views)


def test_state_dtype_refuses_a_cache_and_non_float_dtypes(pair, rows):
    _, model = pair
    ids = rows[0][None]
    cache = model.init_cache(1)
    with pytest.raises(ValueError, match="state_dtype applies to the cache generate builds"):
        em.generate(model, ids, max_new_tokens=2, cache=cache, state_dtype=jnp.bfloat16)
    for bad in (jnp.int32, "nonsense"):
        with pytest.raises(ValueError, match="state_dtype must be a floating dtype"):
            em.generate(model, ids, max_new_tokens=2, state_dtype=bad)


# -- sampling through generate ---------------------------------------------------------------------------------
def test_sampling_reproduces_with_a_fixed_rng_and_top_k_1_is_greedy(pair, rows):
    _, model = pair
    ids = rows[0][None]
    kwargs = dict(max_new_tokens=M, do_sample=True, temperature=1.3)
    a = em.generate(model, ids, rng=jax.random.key(3), **kwargs).sequences
    b = em.generate(model, ids, rng=jax.random.key(3), **kwargs).sequences
    c = em.generate(model, ids, rng=jax.random.key(4), **kwargs).sequences
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    streamed = np.stack(list(em.stream_generate(model, ids, rng=jax.random.key(3), **kwargs)), axis=1)
    np.testing.assert_array_equal(streamed, np.asarray(a)[:, len(rows[0]):])  # token t draws with fold_in(rng, t)
    greedy = em.generate(model, ids, max_new_tokens=M).sequences
    top1 = em.generate(model, ids, max_new_tokens=M, do_sample=True, top_k=1, temperature=0.5, rng=jax.random.key(5))
    np.testing.assert_array_equal(top1.sequences, greedy)


# -- compilation -------------------------------------------------------------------------------------------------
def test_same_shapes_and_settings_never_retrace(pair, rows, padded):
    hf_model, model = pair
    ids, mask = padded
    sample = dict(do_sample=True, top_p=0.9, max_new_tokens=M)
    em.generate(model, ids, attention_mask=mask, max_new_tokens=M)            # whatever these compile, once
    em.generate(model, ids, attention_mask=mask, temperature=0.8, rng=jax.random.key(0), **sample)
    list(em.stream_generate(model, ids, attention_mask=mask, max_new_tokens=M))
    before = collections.Counter(generation._TRACES)

    other_ids = random_ids(np.random.default_rng(99), *ids.shape, hf_model.config.vocab_size)
    twin = em.Mamba2ForCausalLM(model.config, rngs=nnx.Rngs(7))          # same architecture, other weights
    em.generate(model, other_ids, attention_mask=mask, max_new_tokens=M)
    em.generate(twin, ids, attention_mask=np.ones_like(mask), max_new_tokens=M)
    em.generate(twin, ids, attention_mask=mask, temperature=1.7, rng=jax.random.key(1), **{**sample, "top_p": 0.5})
    list(em.stream_generate(twin, other_ids, attention_mask=mask, max_new_tokens=M))
    assert generation._TRACES == before, generation._TRACES - before


def test_a_new_setting_traces_each_function_once(pair, rows):
    _, model = pair
    ids = rows[0][None]
    em.generate(model, ids, max_new_tokens=2)  # the prefill sees this shape here, whichever tests ran before
    before = collections.Counter(generation._TRACES)
    for _ in range(2):
        em.generate(model, ids, max_new_tokens=7, eos_token_id=[5, 6])      # settings no other test uses
    assert generation._TRACES - before == collections.Counter({"start": 1, "loop": 1})  # prefill: shape seen


def test_a_model_generated_from_again_sees_its_new_weights_and_structure(pair, rows):
    """generate keeps a model's split between calls (generation._split); values assigned in place, a Variable
    rebound and a static attribute changed must all be seen, each equal to a freshly built model's result."""
    _, model = pair
    ids = rows[1][None]
    model = nnx.clone(model)                                             # the fixture stays untouched
    first = np.asarray(em.generate(model, ids, max_new_tokens=6).sequences)
    entry = generation._split(model)
    assert generation._split(model) is entry                               # unchanged: the walk is not redone

    def fresh():  # the same weights in a model generate has never seen
        return np.asarray(em.generate(nnx.clone(model), ids, max_new_tokens=6).sequences)

    head = model.backbone.embeddings.weight
    head[...] = head[...] * -1.0                                           # in place: same Variable
    assert generation._split(model) is entry
    flipped = np.asarray(em.generate(model, ids, max_new_tokens=6).sequences)
    np.testing.assert_array_equal(flipped, fresh())
    assert not np.array_equal(flipped, first)

    model.backbone.norm_f.weight = nnx.Param(model.backbone.norm_f.weight[...] * 3.0)  # a Variable rebound
    assert generation._split(model) is not entry
    np.testing.assert_array_equal(np.asarray(em.generate(model, ids, max_new_tokens=6).sequences), fresh())

    entry = generation._split(model)
    model.backbone.layers[0].mixer.kernel_impl = "reference"              # a static attribute: a new graphdef
    assert generation._split(model) is not entry


# -- soak --------------------------------------------------------------------------------------------------------
def test_soak_10k_tokens_stays_finite_and_matches_a_full_forward(pair):
    """10,000 greedy tokens, batch 2, float32 states. The last 64 steps' logits (recorded with
    output_logits) must equal one full forward over the whole sequence to 1e-4 rel: the decode loop runs the
    recurrence one step at a time, the forward runs it as a chunked scan, so they differ only by float32
    rounding, which does not accumulate because every step decays the state by exp(dt A) < 1 (measured
    ~7e-7). A cache that drifted or mis-advanced over 10k steps would be off by O(1)."""
    _, model = pair
    n = 10_000
    ids = random_ids(np.random.default_rng(15), 2, 5, model.config.vocab_size)
    out = em.generate(model, ids, max_new_tokens=n, output_logits=True)
    logits = np.asarray(out.logits)                                        # (2, n, v)
    assert logits.shape == (2, n, model.config.vocab_size) and np.isfinite(logits).all()
    assert out.cache.views[0].ssm_states.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.cache.views[-1].ssm_states)).all()
    full = np.asarray(jitted(model)(out.sequences[:, :-1]).logits)         # position 4 + t predicts token t
    assert rel_err(logits[:, -64:], full[:, -64:]) <= 1e-4


# -- settings and errors -----------------------------------------------------------------------------------------
def test_generation_config_is_the_same_as_keywords(pair, padded):
    _, model = pair
    ids, mask = padded
    config = em.GenerationConfig(max_new_tokens=M, repetition_penalty=1.5)
    a = em.generate(model, ids, attention_mask=mask, generation_config=config)
    b = em.generate(model, ids, attention_mask=mask, max_new_tokens=M, repetition_penalty=1.5)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    with pytest.raises(ValueError, match="top_p given both"):
        em.generate(model, ids, attention_mask=mask, generation_config=config, top_p=0.5)
    with pytest.raises(ValueError, match="max_new_tokens given both"):
        em.generate(model, ids, attention_mask=mask, generation_config=config, max_new_tokens=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), r"max_new_tokens \(0\) must be an integer >= 1"),
    (dict(max_new_tokens=2.0), r"max_new_tokens \(2.0\)"),
    (dict(max_new_tokens=4, do_sample=True, temperature=0.0), r"temperature \(0.0\) must be > 0 when sampling"),
    (dict(max_new_tokens=4, top_p=1.5), r"top_p \(1.5\) must be in \[0, 1\]"),
    (dict(max_new_tokens=4, top_k=-1), r"top_k \(-1\) must be an integer >= 0"),
    (dict(max_new_tokens=4, min_p=-0.1), r"min_p \(-0.1\) must be in \[0, 1\]"),
    (dict(max_new_tokens=4, repetition_penalty=0.0), r"repetition_penalty \(0.0\) must be > 0"),
    (dict(max_new_tokens=4, eos_token_id=[]), r"eos_token_id \(\[\]\)"),
    (dict(max_new_tokens=4, pad_token_id=-1), r"pad_token_id \(-1\)"),
    (dict(max_new_tokens=4, decode_weights="yes"), r"decode_weights \('yes'\) must be True or False"),
])
def test_generation_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        em.GenerationConfig(**kwargs)


def test_generation_config_normalises():
    config = em.GenerationConfig(max_new_tokens=3, temperature=0, eos_token_id=[4, 9])  # greedy: any temperature
    assert config.eos_token_ids == (4, 9) and config.resolved_pad_token_id == 4 and config.temperature == 0.0
    assert em.GenerationConfig(max_new_tokens=3).resolved_pad_token_id == 0
    assert em.GenerationConfig(max_new_tokens=3, eos_token_id=7, pad_token_id=1).resolved_pad_token_id == 1


def test_generate_refuses_bad_inputs(pair, padded):
    _, model = pair
    ids, mask = padded
    v = model.config.vocab_size
    bad = ids.copy()
    bad[2, 5] = v
    cases = [
        (dict(input_ids=bad), rf"token id {v} at position \(2, 5\) is outside the vocabulary"),
        (dict(input_ids=ids[0]), r"input_ids must have shape \(batch >= 1, seq_len >= 1\)"),
        (dict(input_ids=ids[:, :0]), r"input_ids must have shape"),
        (dict(input_ids=ids.astype(np.float32)), r"input_ids must be integers"),
        (dict(attention_mask=mask[:, 1:]), r"attention_mask must have the shape of input_ids"),
        (dict(attention_mask=mask * 2), r"attention_mask must hold only 0 and 1"),
        (dict(attention_mask=mask[:, ::-1]), r"attention_mask must be left padding.*row 1"),
        (dict(do_sample=True), r"do_sample=True needs rng"),
        (dict(do_sample=True, rng=3), r"rng must be one JAX PRNG key"),
        (dict(do_sample=True, rng=jax.random.split(jax.random.key(0), 2)), r"rng must be one JAX PRNG key"),
        (dict(eos_token_id=v), rf"eos_token_id {v} is outside the vocabulary"),
        (dict(pad_token_id=v + 3), rf"pad_token_id {v + 3} is outside the vocabulary"),
        (dict(max_new_tokens=2**31 - 5), r"max_new_tokens \(2147483643\) does not fit"),
        (dict(max_new_tokens=None), r"generate needs max_new_tokens"),
        (dict(cache=model.init_cache(2)), r"batch_size"),
        (dict(generation_config={"max_new_tokens": 3}, max_new_tokens=None), r"must be a GenerationConfig"),
    ]
    for change, message in cases:
        kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 4, **change}
        if kwargs["input_ids"] is not ids:
            kwargs["attention_mask"] = None
        with pytest.raises(ValueError, match=message):
            em.generate(model, kwargs.pop("input_ids"), **kwargs)
    with pytest.raises(ValueError, match="do_sample=True needs rng"):
        em.stream_generate(model, ids, max_new_tokens=4, do_sample=True)  # checked at the call, not at next()


# -- transformers' length and sampling options, and a model directory's defaults ------------------------------
def test_max_length_num_return_sequences_and_model_defaults(pair, padded):
    """max_length counts the prompt; num_return_sequences repeats each row in place (transformers' order) and
    samples them apart; model.generation_config fills what the call leaves out. Shapes as the tests above, so
    only the sampled b = 6 loop compiles anew."""
    _, model = pair
    ids, mask = padded
    want = em.generate(model, ids, attention_mask=mask, max_new_tokens=M, repetition_penalty=1.5).sequences
    got = model.generate(ids, attention_mask=mask, max_length=ids.shape[1] + M, repetition_penalty=1.5)
    np.testing.assert_array_equal(got.sequences, want)
    key = jax.random.key(5)
    many = em.generate(model, ids, attention_mask=mask, max_new_tokens=M, do_sample=True, rng=key,
                       num_return_sequences=2)
    rep = em.generate(model, np.repeat(ids, 2, axis=0), attention_mask=np.repeat(mask, 2, axis=0),
                      max_new_tokens=M, do_sample=True, rng=key)
    np.testing.assert_array_equal(many.sequences, rep.sequences)
    assert many.sequences.shape == (6, ids.shape[1] + M)
    assert (np.asarray(many.sequences[0::2]) != np.asarray(many.sequences[1::2])).any()  # sampled apart
    model.generation_config = em.config.generation.GenerationDefaults.from_hf(
        {"max_new_tokens": M, "repetition_penalty": 1.5, "transformers_version": "5.25.0"})
    try:
        np.testing.assert_array_equal(em.generate(model, ids, attention_mask=mask).sequences, want)
        with pytest.raises(ValueError, match=r"max_length \(9\) counts the prompt"):  # the call's length wins
            em.generate(model, ids, attention_mask=mask, max_length=9)
    finally:
        model.generation_config = None
    for kwargs, message in [
        (dict(max_new_tokens=3, max_length=9 + 4), r"max_new_tokens \(3\) and max_length \(13\) disagree"),
        (dict(max_length=9), r"max_length \(9\) counts the prompt and must exceed its 9 tokens"),
        (dict(max_length=0), r"max_length \(0\) must be an integer >= 1"),
        (dict(max_new_tokens=4, num_return_sequences=2), r"num_return_sequences \(2\) > 1 needs do_sample=True"),
        (dict(max_new_tokens=4, num_return_sequences=0), r"num_return_sequences \(0\) must be an integer >= 1"),
        (dict(max_new_tokens=4, num_return_sequences=2, do_sample=True, rng=key, cache=model.init_cache(3)),
         r"num_return_sequences \(2\) > 1 with a cache"),
    ]:
        with pytest.raises(ValueError, match=message):
            em.generate(model, ids, attention_mask=mask, **kwargs)
