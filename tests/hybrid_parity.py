"""The parity checks a Mamba-2 + attention hybrid family runs against transformers (Bamba, Granite-4.0-H): each a
function of one `Case` (an HF reference model with every weight random, saved by transformers, and ours loaded
from that directory), called by the family's test file.

Tolerances (float32, CPU): 1e-5 relative on logits and hidden states (float32 rounding of the chunked SSD scan,
attention and expert sums in another order than torch's); losses 1e-5 relative.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import torch
import transformers
from helpers import check_cache_json_round_trip, fwd, rel_err
from helpers_hybrid import hf_forward, random_hf_model

import easymamba as em

TOL = 1e-5  # float32 rounding, see the module docstring


@dataclasses.dataclass
class Case:
    model_type: str
    variant: int
    hf: torch.nn.Module
    hf_dir: pathlib.Path
    ours: object
    ids: np.ndarray        # (2, 13) fresh random tokens

    @property
    def config(self):
        return self.ours.config


def make_case(model_type: str, variant: int, directory: pathlib.Path, seed: int = 0) -> Case:
    hf = random_hf_model(model_type, seed, variant)
    hf.save_pretrained(directory)
    ours = em.from_pretrained(directory)
    ids = np.random.default_rng(100 + variant).integers(0, hf.config.vocab_size, (2, 13))
    return Case(model_type, variant, hf, directory, ours, ids)


def check_logits_loss_hidden_states(case: Case) -> dict[str, float]:
    """Logits, the labels loss and every hidden state against HF's forward; returns the errors."""
    ids = torch.from_numpy(case.ids).long()
    with torch.no_grad():
        ref = case.hf(ids, labels=ids, output_hidden_states=True, use_cache=False)
    out = fwd(case.ours, jnp.asarray(case.ids), labels=jnp.asarray(case.ids), output_hidden_states=True)
    errors = {"logits": rel_err(out.logits, ref.logits.numpy()),
              "loss": rel_err(out.loss, ref.loss.numpy())}
    assert len(out.hidden_states) == len(ref.hidden_states) == case.config.num_hidden_layers + 1
    errors["hidden_states"] = max(rel_err(a, b.numpy()) for a, b in zip(out.hidden_states, ref.hidden_states))
    for name, err in errors.items():
        assert err <= TOL, (name, err)
    return errors


def padded_batch(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of 13: the first unpadded, the second left-padded by 4 (its last 9 tokens of `case.ids[1]`)."""
    ids = case.ids.copy()
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = case.config.pad_token_id or 0
    return ids, mask


def check_left_padding(case: Case) -> dict[str, float]:
    """A left-padded batch against HF's padded forward (HF `position_ids` = real-token counts, as `generate`
    passes) on the real positions, and against each row alone. Where the Mamba-2 in_proj has a bias, HF's
    padded positions carry it into the convolution (the mask zeroes in_proj's input, not its output): the
    padded row then differs from the row alone, and this reproduces it."""
    ids, mask = padded_batch(case)
    position_ids = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = hf_forward(case.hf, ids, mask, position_ids)
    got = np.asarray(fwd(case.ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    real = mask.astype(bool)
    errors = {"padded_vs_hf": rel_err(got[real], ref[real])}
    alone = np.asarray(fwd(case.ours, jnp.asarray(ids[1:, 4:])).logits)[0]
    errors["padded_vs_alone"] = rel_err(got[1, 4:], alone)
    assert errors["padded_vs_hf"] <= TOL, errors
    if case.config.mamba_proj_bias and "linear_attention" in case.config.layers_block_type:
        assert errors["padded_vs_alone"] > 1e-3, errors  # the bias leak HF has, reproduced
    else:
        assert errors["padded_vs_alone"] <= TOL, errors
    return errors


def hf_class_kwargs(model_type: str) -> dict:
    kwargs = {"attn_implementation": "eager", "dtype": torch.float32}
    if model_type == "granitemoehybrid":
        kwargs["experts_implementation"] = "eager"
    return kwargs


def check_save_load_both_ways(case: Case, directory: pathlib.Path) -> dict[str, float]:
    """Ours saved by `save_pretrained` has HF's tensor names, shapes and config, and transformers loads it to the
    same logits; HF's directory (the case's) already loaded into ours."""
    em.save_pretrained(case.ours, directory)
    with safetensors.safe_open(directory / "model.safetensors", "np") as f:
        ours = {k: f.get_slice(k).get_shape() for k in f.keys()}
    with safetensors.safe_open(case.hf_dir / "model.safetensors", "np") as f:
        theirs = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert ours == theirs
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory, **hf_class_kwargs(case.model_type)).eval()
    want = np.asarray(fwd(case.ours, jnp.asarray(case.ids)).logits)
    errors = {"hf_from_ours": rel_err(hf_forward(reloaded, case.ids), want),
              "ours_from_hf": rel_err(want, hf_forward(case.hf, case.ids))}
    assert all(err <= TOL for err in errors.values()), errors
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == case.model_type
    again = em.from_pretrained(directory)
    np.testing.assert_array_equal(np.asarray(fwd(again, jnp.asarray(case.ids)).logits), want)
    return errors


def check_sharded(case: Case) -> float:
    """Loaded on a (data 2, model 4) mesh of 8 CPU devices, each device reading its slices: the unsharded logits
    (padded batch, so the masks shard too)."""
    ids, mask = padded_batch(case)
    want = np.asarray(fwd(case.ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    mesh = em.make_mesh(2, 4)
    sharded = em.from_pretrained(case.hf_dir, mesh=mesh)
    got = np.asarray(fwd(sharded, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    err = rel_err(got, want)
    assert err <= TOL, err
    return err


def check_hooks(case: Case) -> dict[str, float]:
    """run_with_cache: the layer outputs are HF's hidden states, the attention pattern's rows are distributions,
    and the effective attention of each Mamba-2 layer reproduces its SSD output (y = M x + D x)."""
    cfg = case.config
    ids = jnp.asarray(case.ids)
    kinds = cfg.layers_block_type
    logits, acts = em.run_with_cache(case.ours, ids)
    with torch.no_grad():
        ref = case.hf(torch.from_numpy(case.ids).long(), output_hidden_states=True, use_cache=False).hidden_states
    errors = {"resid_post": max(rel_err(acts[f"layers.{i}.hook_resid_post"], ref[i + 1].numpy())
                                for i in range(cfg.num_hidden_layers - 1))}
    errors["embed"] = rel_err(acts["hook_embed"], ref[0].numpy())
    errors["hooked_logits"] = rel_err(logits, fwd(case.ours, ids).logits)  # the hooked run is traced apart
    for i, kind in enumerate(kinds):
        if kind == "full_attention":
            pattern = np.asarray(acts[f"layers.{i}.mixer.hook_attn_pattern"])
            assert pattern.shape == (2, cfg.num_attention_heads, 13, 13)
            np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
            assert np.all(np.triu(pattern, 1) == 0)
            for name in ("hook_q", "hook_k", "hook_v", "hook_attn_out"):
                assert f"layers.{i}.mixer.{name}" in acts
        else:
            assert f"layers.{i}.mixer.hook_conv" in acts
    mamba = [i for i, kind in enumerate(kinds) if kind == "linear_attention"]
    M = np.asarray(em.compute_effective_attention(case.ours, acts, include_dt_scaling=True))
    h, p, e = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_heads * cfg.mamba_d_head
    assert M.shape == (len(mamba), 2, h, 13, 13)
    worst = 0.0
    for z, i in enumerate(mamba):
        x = np.asarray(acts[f"layers.{i}.mixer.hook_conv"])[..., :e].reshape(2, 13, h, p)
        D = np.asarray(case.ours.backbone.layers[i].mixer.D[...])
        y = np.einsum("bhij,bjhp->bihp", M[z], x) + D[:, None] * x
        worst = max(worst, rel_err(y, np.asarray(acts[f"layers.{i}.mixer.hook_ssm_out"])))
    errors["effective_attention"] = worst
    attention = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    try:
        em.compute_effective_attention(case.ours, ids, layer=attention[0])
    except ValueError as exc:
        assert f"layer {attention[0]}" in str(exc)
    else:
        raise AssertionError("an attention layer's effective attention was not refused")
    assert all(err <= TOL for err in errors.values()), errors
    return errors


def hf_pieces(hf, ids: np.ndarray, cuts: tuple[int, ...], with_positions: bool = True) -> np.ndarray:
    """HF's logits of `ids` fed through its cache in pieces split at `cuts` (prefill, chunks, one-token steps),
    each call given its `position_ids` unless `with_positions` is False."""
    out, cache, start, pieces = None, None, 0, []
    with torch.no_grad():
        for stop in (*cuts, ids.shape[1]):
            positions = torch.arange(start, stop)[None].expand(ids.shape[0], -1)
            kwargs = {"position_ids": positions} if with_positions else {}
            out = hf(torch.from_numpy(ids[:, start:stop]).long(), cache=cache, use_cache=True, **kwargs)
            cache, start = out.cache, stop
            pieces.append(out.logits.numpy())
    return np.concatenate(pieces, axis=1)


def check_cached_steps(case: Case) -> dict[str, float]:
    """Prefill (7), a chunk (4), then 5 one-token `step`s: equal to our full forward, and to HF's cached calls
    given the positions (HF's Bamba numbers a call's tokens from 0 without them) where time_step_limit is
    (0, inf): HF's one-token update skips the dt clamp that its full forward and every path here apply."""
    ids = np.random.default_rng(7).integers(3, case.config.vocab_size, (2, 16))
    full = np.asarray(fwd(case.ours, jnp.asarray(ids)).logits)
    cache = case.ours.init_cache(2, max_length=16)
    assert isinstance(cache, em.HybridCache)
    out = fwd(case.ours, jnp.asarray(ids[:, :7]), cache=cache)
    pieces = [np.asarray(out.logits)]
    out = fwd(case.ours, jnp.asarray(ids[:, 7:11]), cache=out.cache)
    pieces.append(np.asarray(out.logits))
    cache = out.cache
    step = jax.jit(lambda m, t, c: m.step(t, c))
    for t in range(11, 16):
        logits, cache = step(case.ours, jnp.asarray(ids[:, t]), cache)
        pieces.append(np.asarray(logits)[:, None])
    assert int(cache.seqlen_offset) == 16
    got = np.concatenate(pieces, axis=1)
    hf_got = hf_pieces(case.hf, ids, (7, 11, 12, 13, 14, 15))
    errors = {"pieces_vs_full": rel_err(got, full), "prefill_chunk_vs_hf": rel_err(got[:, :11], hf_got[:, :11])}
    if case.config.time_step_limit == (0.0, float("inf")):  # else HF's steps skip the clamp (docs/status.md)
        errors["pieces_vs_hf_pieces"] = rel_err(got, hf_got)
    assert all(err <= TOL for err in errors.values()), errors
    return errors


def check_generate(case: Case) -> np.ndarray:
    """Greedy tokens of a left-padded batch equal to transformers' `generate`."""
    ids = np.random.default_rng(8).integers(3, case.config.vocab_size, (2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    with torch.no_grad():
        ref = case.hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=8,
                               do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    out = em.generate(case.ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    return ref


def check_cache_json(case: Case) -> None:
    """A bfloat16 cache written to JSON and read back continues bit-identically."""
    ids = np.random.default_rng(9).integers(3, case.config.vocab_size, (2, 10))
    check_cache_json_round_trip(case.ours, ids)


__all__ = ["Case", "make_case", "TOL", "check_logits_loss_hidden_states", "check_left_padding",
           "check_save_load_both_ways", "check_sharded", "check_hooks", "padded_batch", "hf_pieces",
           "check_cached_steps", "check_generate", "check_cache_json"]
