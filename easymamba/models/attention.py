"""Causal self-attention with grouped key/value heads and optional rotary embedding: the attention layer of every
hybrid family (Nemotron-H, Bamba, Granite-4.0-H, Falcon-H1, Zamba2, Jamba), one implementation.

Hugging Face counterparts: `NemotronHAttention`, `BambaAttention`, `GraniteMoeHybridAttention`,
`FalconH1Attention`, `Zamba2Attention` (transformers 5.25); their parameter names are kept:

    hidden (b, l, in) --q_proj--> q (b, l, H, hd)   --k_proj--> k (b, l, KV, hd) * key_multiplier   --v_proj--> v
    q, k rotated on their first rotary_dim channels by the token's position (rope_theta; none when None)
    o = softmax(q k^T * scaling + causal/padding mask) v    (each KV head serves H / KV query heads)
    out = o_proj(o)                                     (b, l, out)

Positions are counted in real tokens: a row's first unpadded token is position 0 (transformers' `generate`
builds `position_ids` from the attention mask the same way), so a left-padded row computes what it computes
alone. With a cache the keys and values live in an `AttentionCacheView` preallocated to `max_length` slots; a call
writes its l tokens at the view's `seqlen_offset` and attends over every valid slot up to its own, so prefill,
chunked prefill and decode are one code path and a decode step never changes shape (no recompilation).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from easymamba.config.parts import AttentionConfig
from easymamba.layers import low_rank_delta, normal_linear
from easymamba.models.common import sow_hook
from easymamba.sharding import MeshRules, constrain

__all__ = ["Attention", "rotary_cos_sin", "apply_rotary", "position_ids_from_mask"]


def rotary_cos_sin(position_ids: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (b, l, rotary_dim) float32 for integer positions (b, l): HF's default rope, frequencies
    theta^(-2i/rotary_dim) for i < rotary_dim / 2, each used twice ([f | f])."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))   # (r/2,)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq                               # (b, l, r/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)                                                # (b, l, r)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first r = cos.shape[-1] channels of each head of x (b, l, heads, hd) as HF's
    `apply_rotary_pos_emb` (rotate_half: [-x2, x1]); the other hd - r channels pass through."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)                  # (b, l, 1, r)
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    rotated = rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated


def position_ids_from_mask(attention_mask: jax.Array | None, b: int, l: int,
                           start: jax.Array | None = None) -> jax.Array:
    """Positions (b, l) int32 of l new tokens: `start` (b,) real tokens already seen (0 without a cache) plus the
    real tokens before each one in this call (`attention_mask`'s last l columns). A padded slot gets its row's
    next position; its key is masked, so the value does not matter."""
    start = jnp.zeros((b,), jnp.int32) if start is None else start.astype(jnp.int32)
    if attention_mask is None:
        return start[:, None] + jnp.arange(l, dtype=jnp.int32)[None]
    mask = attention_mask[:, -l:].astype(jnp.int32)
    return start[:, None] + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


class Attention(nnx.Module):
    """Grouped-query causal self-attention (see the module docstring).

    Hook points (`easymamba.interp.run_with_cache`): `hook_q` (b, l, H, hd) and `hook_k` (b, l, KV, hd) after
    the rotary embedding, `hook_v` (b, l, KV, hd), `hook_attn_pattern` (b, H, l, t) the softmax weights over the
    t attended slots (l without a cache, the cache's max_length with one), `hook_attn_out` (b, l, out).
    """

    HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_pattern", "hook_attn_out")

    def __init__(self, config: AttentionConfig, *, layer_idx: int = 0, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_impl: str = "auto", params_from: "Attention | None" = None):
        """`params_from`: another `Attention` of the same config whose q/k/v/o projections this one runs (the
        same parameter objects: stored, loaded and sharded once)."""
        del kernel_impl  # one form today: jax.nn.dot_product_attention (XLA; cuDNN where JAX picks it)
        self.config = config
        self.layer_idx = layer_idx
        self.dtype = dtype
        self.mesh_rules: MeshRules | None = None  # set by easymamba.sharding when the model is sharded
        if params_from is not None:
            if params_from.config != config:
                raise ValueError("params_from must be an Attention of the same AttentionConfig")
            self.q_proj, self.k_proj = params_from.q_proj, params_from.k_proj
            self.v_proj, self.o_proj = params_from.v_proj, params_from.o_proj
            return
        c = config
        std = c.initializer_range

        def linear(n_in, n_out, bias, axes):
            return normal_linear(n_in, n_out, bias=bias, axes=axes, std=std, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

        hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = linear(c.in_size, hq * hd, c.qkv_bias, ("embed", "attn_heads"))
        self.k_proj = linear(c.in_size, hkv * hd, c.qkv_bias, ("embed", "kv_heads"))
        self.v_proj = linear(c.in_size, hkv * hd, c.qkv_bias, ("embed", "kv_heads"))
        self.o_proj = linear(hq * hd, c.out_size, c.o_bias, ("attn_heads", "embed"))

    # -- the mixer protocol of easymamba.models.causal_lm.ResidualBlock ------------------------------------------
    PACKED = True  # takes seq_idx: packed sequences attend within their own segment

    def run(self, hidden, view, *, attention_mask=None, position_ids=None, seq_idx=None, **_):
        """hidden (b, l, in), the layer's `AttentionCacheView` or None -> (out (b, l, out), the renewed view)."""
        return self(hidden, attention_mask=attention_mask, position_ids=position_ids, view=view, seq_idx=seq_idx)

    def run_step(self, hidden, view, *, attention_mask=None, position_ids=None, active_rows=None, **_):
        """One token (b, 1, in) with its view; rows where `active_rows` is False write an invalid slot (their
        output means nothing and later tokens never attend to it)."""
        if view is None:
            raise ValueError("an attention decode step needs the layer's AttentionCacheView")
        return self(hidden, attention_mask=attention_mask, position_ids=position_ids, view=view,
                    active_rows=active_rows)

    def decode_weights(self):
        return None

    def __call__(self, hidden: jax.Array, *, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, view=None, active_rows: jax.Array | None = None,
                 lora=None, seq_idx: jax.Array | None = None):
        """hidden (b, l, in) -> (out (b, l, out), the renewed view or None).

        attention_mask (b, >= l) of 0/1: its last l columns mark this call's real tokens (padding is masked as a
        key; a padded query's output means nothing). position_ids (b, l): rotary positions; by default counted
        in real tokens from the view's (`position_ids_from_mask`). view: the layer's `AttentionCacheView`; the l
        tokens are written at its `seqlen_offset` (the caller advances it, as for the SSM views).
        lora: {"q" | "k" | "v": (down (in, r), up (r, out of that projection))}, low-rank adapters added to those
        projections' outputs for this call.
        seq_idx (b, l) int: packed sequences (no view): a query attends only to keys of its own segment.
        """
        c = self.config
        b, l, _ = hidden.shape
        hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        rules = self.mesh_rules
        lora = {} if lora is None else lora
        unknown = set(lora) - {"q", "k", "v"}
        if unknown:
            raise ValueError(f"lora adapts the projections 'q', 'k', 'v'; got {sorted(unknown)}")

        def project(proj, name):
            out = proj(hidden)
            if name in lora:
                out = out + low_rank_delta(hidden, *lora[name], out.dtype)
            return out

        q = constrain(project(self.q_proj, "q"), rules, "batch", None, "attn_heads").reshape(b, l, hq, hd)
        k = constrain(project(self.k_proj, "k"), rules, "batch", None, "kv_heads").reshape(b, l, hkv, hd)
        v = constrain(project(self.v_proj, "v"), rules, "batch", None, "kv_heads").reshape(b, l, hkv, hd)
        if c.key_multiplier != 1.0:
            k = k * jnp.asarray(c.key_multiplier, k.dtype)
        if c.rope_theta is not None:
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask, b, l,
                                                      None if view is None else view.real_tokens())
            cos, sin = rotary_cos_sin(position_ids, c.rotary_dim, c.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        sow_hook(self, "hook_q", q)
        sow_hook(self, "hook_k", k)
        sow_hook(self, "hook_v", v)

        new_valid = (jnp.ones((b, l), bool) if attention_mask is None
                     else attention_mask[:, -l:].astype(bool))                                  # (b, l)
        if active_rows is not None:
            new_valid = new_valid & active_rows[:, None]
        if view is None:
            keys, values, key_valid = k, v, new_valid                                          # t = l
            q_slot = jnp.arange(l, dtype=jnp.int32)
        else:
            q_slot = view.seqlen_offset + jnp.arange(l, dtype=jnp.int32)
            view = view.write(k, v, new_valid)
            keys, values, key_valid = view.keys, view.values, view.valid                       # t = max_length
        t = keys.shape[1]
        k_slot = jnp.arange(t, dtype=jnp.int32)
        mask = (k_slot[None, :] <= q_slot[:, None])[None, None] & key_valid[:, None, None, :]  # (b, 1, l, t)
        if seq_idx is not None:
            if view is not None:
                raise ValueError("seq_idx (packed sequences) is for a forward without a cache; got a cache view")
            mask = mask & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])              # same segment
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        o = jax.nn.dot_product_attention(q, keys, values, mask=mask, scale=c.scaling)          # (b, l, H, hd)
        sow_hook(self, "hook_attn_pattern", lambda: _pattern(q, keys, mask, c.scaling))
        o = constrain(o.reshape(b, l, hq * hd), rules, "batch", None, "attn_heads")
        out = self.o_proj(o)                                                                   # (b, l, out)
        sow_hook(self, "hook_attn_out", out)
        return out, view


def _pattern(q, keys, mask, scaling) -> jax.Array:
    """The attention weights (b, H, l, t), float32 (only for `hook_attn_pattern`)."""
    hq, hkv = q.shape[2], keys.shape[2]
    k = jnp.repeat(keys, hq // hkv, axis=2)                                                    # (b, t, H, hd)
    logits = jnp.einsum("blhd,bthd->bhlt", q.astype(jnp.float32), k.astype(jnp.float32)) * scaling
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)
