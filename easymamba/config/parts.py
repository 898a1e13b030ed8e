"""The settings of one part of a layer: a Mamba-2 mixer, an attention, an MLP, a mixture of experts.

A hybrid family's config (`easymamba/config/<family>.py`) reads its `config.json` with Hugging Face's names and
derives these small frozen records from it; the shared parts (`easymamba/models/attention.py`, `mlp.py`,
`moe.py`, `mamba2_mixer.py`) take them and nothing else, so one implementation of each part serves every family.
The hybrid cache reads the same records (`easymamba.caching.hybrid`): `Mamba2MixerConfig` has the attribute names
`Mamba2CacheMetaData.from_config` reads, `AttentionConfig` gives the key/value view's sizes.

A hybrid family config offers, as properties:
    mixer_config        Mamba2MixerConfig (or None when no layer has an SSM mixer)
    attention_config    AttentionConfig (or None)
    mlp_config          MLPConfig (or None)
    moe_config          MoEConfig (or None)
    layer_cache_kinds   per layer, the cache views it keeps, in order: () for a layer without state,
                        ("mamba2",), ("attention",), or several for a layer with parallel parts
"""

import dataclasses
import math

from easymamba.config.common import _INF, _is_int, _is_real, _require

__all__ = ["Mamba2MixerConfig", "AttentionConfig", "MLPConfig", "MoEConfig", "ACTIVATIONS", "ROUTERS"]

# Activations the MLPs and experts know (HF `ACT2FN` names).
ACTIVATIONS = ("silu", "relu2", "gelu", "gelu_pytorch_tanh", "relu")
# Routers: "softmax_topk" takes the top-k logits and softmaxes them (Granite, Mixtral); "sigmoid_grouped"
# scores experts with a sigmoid, picks groups then experts with a correction bias (Nemotron-H, DeepSeek-V3);
# "softmax" softmaxes all logits then takes the top k (Jamba).
ROUTERS = ("softmax_topk", "sigmoid_grouped", "softmax")


def _positive(record, *names):
    for name in names:
        v = getattr(record, name)
        _require(_is_int(v) and v >= 1, f"{type(record).__name__}.{name} ({v!r}) must be a positive integer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2MixerConfig:
    """One Mamba-2 mixer's sizes and settings (the `Mamba2Config` fields the mixer reads; a `Mamba2Config` itself
    also serves). `intermediate_size = num_heads * head_dim` need not be `expand * hidden_size` here.

    Beyond `Mamba2Config`: `gated_norm` (False: y * silu(z), no norm; Falcon-H1's `mamba_rms_norm=False`),
    `norm_before_gate` (Falcon-H1), `norm_groups` (groups of the gated norm; default `n_groups`),
    `zxbcdt_multipliers` (Falcon-H1's muP multipliers of in_proj's five parts, or None), `out_proj_bias` (bias of
    out_proj; None: the same as `use_bias`. Falcon-H1 sets in_proj's from `mamba_proj_bias`, out_proj's from
    `projectors_bias`), `step_time_step_limit` (the dt clamp of transformers' cached one-token step when it differs
    from `time_step_limit`'s, which the sequence path uses; None: the same. Zamba2's HF mixer clamps dt to
    (time_step_min, inf) over a sequence but not at all in its cached one-token step: (0, inf) there). A record
    of transformers' behaviour only: `Mamba2Mixer` clamps with `time_step_limit` in every path, so a model gives
    the same numbers run whole or token by token (tests/test_zamba2.py shows both behaviours).
    """

    model_type = "mamba2"  # what the SSM views of a hybrid cache are checked against (not a field)

    hidden_size: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int
    num_hidden_layers: int
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    time_step_limit: tuple[float, float] = (0.0, _INF)
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = False
    gated_norm: bool = True
    norm_before_gate: bool = False
    norm_groups: int | None = None
    zxbcdt_multipliers: tuple[float, float, float, float, float] | None = None
    out_proj_bias: bool | None = None
    step_time_step_limit: tuple[float, float] | None = None

    def __post_init__(self):
        _positive(self, "hidden_size", "num_heads", "head_dim", "state_size", "n_groups", "conv_kernel",
                  "num_hidden_layers", "chunk_size")
        _require(self.num_heads % self.n_groups == 0,
                 f"mamba heads ({self.num_heads}) must be divisible by the mamba groups ({self.n_groups})")
        lo, hi = (float(x) for x in self.time_step_limit)
        _require(0.0 <= lo <= hi, f"time_step_limit ({lo}, {hi}) must satisfy 0 <= lo <= hi")
        object.__setattr__(self, "time_step_limit", (lo, hi))
        if self.step_time_step_limit is not None:
            slo, shi = (float(x) for x in self.step_time_step_limit)
            _require(0.0 <= slo <= shi, f"step_time_step_limit ({slo}, {shi}) must satisfy 0 <= lo <= hi")
            object.__setattr__(self, "step_time_step_limit", (slo, shi))
        if self.norm_groups is None:
            object.__setattr__(self, "norm_groups", self.n_groups)
        if self.out_proj_bias is None:
            object.__setattr__(self, "out_proj_bias", self.use_bias)
        _require(_is_int(self.norm_groups) and self.norm_groups >= 1
                 and self.intermediate_size % self.norm_groups == 0,
                 f"norm_groups ({self.norm_groups}) must divide the mixer width ({self.intermediate_size})")
        if self.zxbcdt_multipliers is not None:
            m = tuple(self.zxbcdt_multipliers)
            _require(len(m) == 5 and all(_is_real(x) for x in m),
                     f"zxbcdt_multipliers ({self.zxbcdt_multipliers!r}) must be five numbers (z, x, B, C, dt)")
            object.__setattr__(self, "zxbcdt_multipliers", tuple(float(x) for x in m))

    @property
    def intermediate_size(self) -> int:
        """e = num_heads * head_dim, the mixer's inner width."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: [x (e) | B (g*n) | C (g*n)]."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Causal self-attention with grouped key/value heads (GQA) and optional rotary embedding.

    in_size             width of the input (the model's d; Zamba2's shared block reads [h | embeddings], 2d)
    out_size            width of o_proj's output (default `in_size`)
    num_attention_heads, num_key_value_heads, head_dim
    scaling             the softmax scale (default head_dim ** -0.5; Granite's `attention_multiplier`)
    qkv_bias, o_bias    biases of q/k/v and of o
    rope_theta          None: no positional encoding (Nemotron-H, Granite's `position_embedding_type=None`)
    rotary_dim          leading channels of each head that rotate (partial rotary, e.g. Bamba's 0.5)
    key_multiplier      scales the keys after k_proj (Falcon-H1)
    """

    in_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    out_size: int | None = None
    scaling: float | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    rope_theta: float | None = None
    rotary_dim: int | None = None
    key_multiplier: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self):
        _positive(self, "in_size", "num_attention_heads", "num_key_value_heads", "head_dim")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                 f"({self.num_key_value_heads})")
        if self.out_size is None:
            object.__setattr__(self, "out_size", self.in_size)
        if self.scaling is None:
            object.__setattr__(self, "scaling", self.head_dim ** -0.5)
        _require(_is_real(self.scaling) and math.isfinite(self.scaling), f"scaling ({self.scaling!r}) must be a number")
        if self.rope_theta is not None:
            _require(_is_real(self.rope_theta) and self.rope_theta > 0,
                     f"rope_theta ({self.rope_theta!r}) must be a positive number or None")
            if self.rotary_dim is None:
                object.__setattr__(self, "rotary_dim", self.head_dim)
            r = self.rotary_dim
            _require(_is_int(r) and 2 <= r <= self.head_dim and r % 2 == 0,
                     f"rotary_dim ({r!r}) must be an even integer in [2, head_dim={self.head_dim}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """A feed-forward block: gated `down(act(gate(x) * gate_multiplier) * up(x)) * down_multiplier`, or plain
    `down(act(up(x)))` (Nemotron-H's relu2 MLP).

    packed_gate_up      gate and up are one projection d -> 2 * intermediate_size whose output is [gate | up]
                        (Granite-4.0-H's `shared_mlp.input_linear`, output `output_linear`); the same arithmetic
                        as separate gate and up, another parameter layout
    """

    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    gated: bool = True
    bias: bool = False
    gate_multiplier: float = 1.0
    down_multiplier: float = 1.0
    packed_gate_up: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        _positive(self, "hidden_size", "intermediate_size")
        _require(not self.packed_gate_up or self.gated, "packed_gate_up needs a gated MLP (gated=True)")
        _require(self.activation in ACTIVATIONS,
                 f"MLP activation {self.activation!r} is not one easymamba has; known: {list(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Routed experts (each an MLP of `expert_intermediate_size`), optionally with a shared expert MLP.

    router              one of ROUTERS (see there)
    top_k               experts per token
    norm_topk_prob      renormalise the chosen weights to sum to 1 (sigmoid_grouped, softmax)
    routed_scaling_factor   multiplies the chosen weights (sigmoid_grouped)
    n_group, topk_group groups of experts and how many groups a token may use (sigmoid_grouped)
    latent_size         experts run in a latent width: fc1_latent_proj d -> latent, experts, fc2 back (Nemotron-H)
    shared              the shared expert's MLPConfig, or None
    """

    hidden_size: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    activation: str = "silu"
    gated: bool = True
    router: str = "softmax_topk"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    latent_size: int | None = None
    bias: bool = False
    shared: MLPConfig | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        _positive(self, "hidden_size", "num_experts", "top_k", "expert_intermediate_size", "n_group", "topk_group")
        _require(self.top_k <= self.num_experts,
                 f"top_k ({self.top_k}) must be at most the number of experts ({self.num_experts})")
        _require(self.router in ROUTERS, f"router {self.router!r} is not one easymamba has; known: {list(ROUTERS)}")
        _require(self.activation in ACTIVATIONS,
                 f"expert activation {self.activation!r} is not one easymamba has; known: {list(ACTIVATIONS)}")
        _require(self.num_experts % self.n_group == 0,
                 f"n_group ({self.n_group}) must divide the number of experts ({self.num_experts})")
        _require(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.latent_size is not None:
            _positive(self, "latent_size")

    @property
    def expert_in_size(self) -> int:
        """The width the experts read and write: the latent width if any, else d."""
        return self.hidden_size if self.latent_size is None else self.latent_size
