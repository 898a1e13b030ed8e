"""easymamba: Mamba-2 (and Mamba-1) language models in JAX / flax.nnx, exact against Hugging Face.

Start with `Mamba2Config`, `Mamba2ForCausalLM` and `load_state_dict`; the notation used everywhere is in
`easymamba.typing`.
"""

from easymamba.caching import (
    Mamba2Cache,
    Mamba2CacheMetaData,
    Mamba2CacheView,
    MambaCache,
    MambaCacheMetaData,
    MambaCacheView,
    PartitionAxis,
)
from easymamba.checkpoints import (
    CheckpointError,
    from_pretrained,
    load_checkpoint,
    load_state_dict,
    load_train_state,
    save_checkpoint,
    save_pretrained,
    save_train_state,
    state_dict,
)
from easymamba.config import BambaConfig, GraniteMoeHybridConfig, Mamba2Config, MambaConfig
from easymamba.generation import GenerationConfig, generate, stream_generate
from easymamba.interp import compute_effective_attention, run_with_cache
from easymamba.models import (
    BambaForCausalLM,
    BambaModel,
    GraniteMoeHybridForCausalLM,
    GraniteMoeHybridModel,
    HybridDecoderLayer,
    Mamba2Block,
    Mamba2CausalLMOutput,
    Mamba2ForCausalLM,
    Mamba2Mixer,
    Mamba2Model,
    Mamba2Output,
    MambaBlock,
    MambaForCausalLM,
    MambaMixer,
    MambaModel,
    causal_lm_loss,
)
from easymamba.norms import GatedRMSNorm, RMSNorm
from easymamba.sharding import ShardingRules, init_sharded, make_mesh, shard_batch, shard_model
from easymamba.train import TokenBatcher, TrainState, make_eval_step, make_optimizer, make_train_step

__version__ = "0.1.0.dev0"

__all__ = [
    "ShardingRules",
    "init_sharded",
    "make_mesh",
    "shard_batch",
    "shard_model",
    "CheckpointError",
    "BambaConfig",
    "BambaForCausalLM",
    "BambaModel",
    "GatedRMSNorm",
    "GenerationConfig",
    "GraniteMoeHybridConfig",
    "GraniteMoeHybridForCausalLM",
    "GraniteMoeHybridModel",
    "HybridDecoderLayer",
    "Mamba2Block",
    "Mamba2Cache",
    "Mamba2CacheMetaData",
    "Mamba2CacheView",
    "Mamba2CausalLMOutput",
    "Mamba2Config",
    "Mamba2ForCausalLM",
    "Mamba2Mixer",
    "Mamba2Model",
    "Mamba2Output",
    "MambaBlock",
    "MambaCache",
    "MambaCacheMetaData",
    "MambaCacheView",
    "MambaConfig",
    "MambaForCausalLM",
    "MambaMixer",
    "MambaModel",
    "PartitionAxis",
    "RMSNorm",
    "causal_lm_loss",
    "compute_effective_attention",
    "from_pretrained",
    "generate",
    "load_checkpoint",
    "load_state_dict",
    "run_with_cache",
    "save_checkpoint",
    "save_pretrained",
    "state_dict",
    "stream_generate",
    "TokenBatcher",
    "TrainState",
    "load_train_state",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "save_train_state",
]
