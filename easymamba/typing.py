"""One notation for the whole library.

Letters (used in shape comments, jaxtyping aliases, einsum strings and PartitionSpec names):

    b  batch                     l  sequence length            d  hidden size (d_model)
    e  intermediate size = expand * d                          h  SSM heads
    p  head dim (e = h * p)      n  state size (d_state)       g  groups of B/C (h % g == 0)
    k  conv kernel width         c  conv channels = e + 2 * g * n (Mamba-2), or chunks in the SSD
    q  chunk length              s  source position inside a chunk (the "j" of C_i . B_j)
    v  vocabulary size           z  a chunk index that includes the initial state (c + 1 of them)

Paper symbols (Mamba-2, "Transformers are SSMs", Dao & Gu 2024):

    x_t  SSM input per head [h, p]        dt_t  step size per head, softplus(dt_raw + dt_bias)
    A    per-head scalar decay (A = -exp(A_log) < 0)    B_t, C_t  input / output projections [g, n]
    h_t  the state [h, p, n]:  h_t = exp(dt_t A) h_{t-1} + dt_t x_t (x) B_t ;  y_t = h_t C_t + D x_t
"""

from typing import TypeAlias

import jax
from jaxtyping import Array, Float, Int

Tokens: TypeAlias = Int[Array, "b l"]
Mask: TypeAlias = Int[Array, "b l"]
Hidden: TypeAlias = Float[Array, "b l d"]
Logits: TypeAlias = Float[Array, "b l v"]

SSMInput: TypeAlias = Float[Array, "b l h p"]
StepSize: TypeAlias = Float[Array, "b l h"]
GroupProj: TypeAlias = Float[Array, "b l g n"]
SSMState: TypeAlias = Float[Array, "b h p n"]
ConvInput: TypeAlias = Float[Array, "b l c"]
ConvState: TypeAlias = Float[Array, "b c k"]
ConvWeight: TypeAlias = Float[Array, "c k"]

PRNGKey: TypeAlias = jax.Array
