"""Checkpoints in and out of the flax models: Hugging Face directories and state dicts, and orbax.

One subject per file, imports running down this list:

    errors.py              CheckpointError, the one error type, and NonFiniteWeightWarning
    layout.py              the HF <-> flax layout transforms, packed-part splitting, FlaxView
    safetensors_format.py  the header and index checks made before safetensors.safe_open reads
    safetensors_writer.py  the streaming safetensors writer and transformers' sharding
    sources.py             tensor sources: safe_open (single or sharded), torch .bin, in-memory dicts
    checks.py              a source checked against a model and config before anything is read
    hf_reader.py           from_pretrained, read_config, checkpoint_dtype
    hf_writer.py           save_pretrained
    state_dict.py          load_state_dict, state_dict
    orbax_io.py            save_checkpoint / load_checkpoint / save_train_state / load_train_state
                           on orbax.checkpoint.CheckpointManager

What a family's checkpoint holds (its key table of `KeySpec`s, the mixer sizes its shapes imply, its config and
model classes) is the family's record (`easymamba.models.FAMILIES`); every direction reads the same key table,
so they cannot drift apart.
"""

from easymamba.checkpoints.errors import CheckpointError, NonFiniteWeightWarning
from easymamba.checkpoints.hf_reader import checkpoint_dtype, from_pretrained, read_config
from easymamba.checkpoints.hf_writer import save_pretrained
from easymamba.checkpoints.orbax_io import (
    checkpoint_config,
    is_checkpoint,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
    save_train_state,
    train_state_step,
    versions,
)
from easymamba.checkpoints.state_dict import load_state_dict, state_dict

__all__ = ["CheckpointError", "checkpoint_config", "checkpoint_dtype", "from_pretrained", "is_checkpoint",
           "load_checkpoint", "load_state_dict", "load_train_state", "NonFiniteWeightWarning", "read_config",
           "save_checkpoint",
           "save_pretrained", "save_train_state", "state_dict", "train_state_step", "versions"]
