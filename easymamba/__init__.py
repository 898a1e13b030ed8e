"""easymamba: Mamba-2, Mamba-1 and the hybrids built on them (Nemotron-H, Jamba, Falcon-Mamba, ...) in JAX /
flax.nnx, exact against Hugging Face.

Start with `TextGenerator.from_pretrained(model_dir)` (text in, text out), or `from_pretrained`, `generate` and
`Mamba2ForCausalLM`; the notation used everywhere is in
`easymamba.typing`.

The names below are imported on first use (PEP 562 `__getattr__`): `import easymamba` and the `easymamba`
command's `--help` do not start JAX; `from easymamba import Mamba2ForCausalLM` and `easymamba.generate` work as
if everything were imported here.
"""

import importlib

__version__ = "0.1.0.dev0"

# submodule -> the public names it exports through `easymamba`
_EXPORTS = {
    "easymamba.caching": ("AttentionCacheMetaData", "AttentionCacheView", "FalconMambaCache",
        "FalconMambaCacheMetaData", "FalconMambaCacheView", "HybridCache", "HybridCacheMetaData", "Mamba2Cache",
        "Mamba2CacheMetaData", "Mamba2CacheView", "MambaCache", "MambaCacheMetaData", "MambaCacheView",
        "PartitionAxis"),
    "easymamba.checkpoints": ("CheckpointError", "NonFiniteWeightWarning", "from_pretrained", "load_checkpoint",
        "load_state_dict", "load_train_state", "save_checkpoint", "save_pretrained", "save_train_state", "state_dict"),
    "easymamba.config": ("BambaConfig", "FalconH1Config", "FalconMambaConfig", "GraniteMoeHybridConfig",
        "JambaConfig", "Mamba2Config", "MambaConfig", "NemotronHConfig", "Zamba2Config"),
    "easymamba.generation": ("GenerationConfig", "generate", "stream_generate"),
    "easymamba.interp": ("compute_effective_attention", "run_with_cache"),
    "easymamba.models": ("Attention", "BambaForCausalLM", "BambaModel", "FalconH1Block", "FalconH1ForCausalLM",
        "FalconH1Model", "FalconMambaBlock", "FalconMambaForCausalLM", "FalconMambaMixer", "FalconMambaModel",
        "GraniteMoeHybridForCausalLM", "GraniteMoeHybridModel", "HybridDecoderLayer", "JambaForCausalLM",
        "JambaMambaMixer", "JambaModel", "MLP", "Mamba2Block", "Mamba2CausalLMOutput", "Mamba2ForCausalLM",
        "Mamba2Mixer", "Mamba2Model", "Mamba2Output", "MambaBlock", "MambaForCausalLM", "MambaMixer", "MambaModel",
        "MoE", "NemotronHForCausalLM", "NemotronHModel", "Zamba2ForCausalLM", "Zamba2Model", "causal_lm_loss",
        "seq_idx_from_position_ids", "CompiledLM"),
    "easymamba.norms": ("GatedRMSNorm", "RMSNorm"),
    "easymamba.pipeline": ("TextGenerator",),
    "easymamba.sharding": ("ShardingRules", "init_sharded", "make_mesh", "shard_batch", "shard_model"),
    "easymamba.train": ("TokenBatcher", "TrainState", "make_eval_step", "make_optimizer", "make_train_step"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    """A public name (imported from its submodule on first use, then kept here) or a submodule."""
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
