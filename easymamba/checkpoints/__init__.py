"""Checkpoints in and out of the flax models: Hugging Face directories and state dicts, and orbax.

One subject per file, imports running down this list:

    errors.py              CheckpointError, the one error type
    layout.py              KeySpec, the HF <-> flax layout transforms, packed-part splitting, FlaxView
    keys.py                Mamba-2's key table (Mamba-1's is easymamba.mamba1.mamba1_key_table)
    mixer_facts.py         the mixer sizes a checkpoint's shapes imply, per family
    families.py            the model-family record (config, model class, key table, mixer facts)
    safetensors_format.py  the header and index checks made before safetensors.safe_open reads
    safetensors_writer.py  the streaming safetensors writer and transformers' sharding
    sources.py             tensor sources: safe_open (single or sharded), torch .bin, in-memory dicts
    checks.py              a source checked against a model and config before anything is read
    hf_reader.py           from_pretrained, read_config, checkpoint_dtype
    hf_writer.py           save_pretrained
    state_dict.py          load_state_dict, state_dict
    orbax_io.py            save_checkpoint / load_checkpoint / save_train_state / load_train_state
                           on orbax.checkpoint.CheckpointManager

Every direction reads the same key table, so they cannot drift apart.
"""

from easymamba.checkpoints.errors import CheckpointError
from easymamba.checkpoints.families import FAMILIES, ModelFamily, abstract_model, family_of
from easymamba.checkpoints.hf_reader import checkpoint_dtype, from_pretrained, read_config
from easymamba.checkpoints.hf_writer import save_pretrained
from easymamba.checkpoints.keys import mamba2_key_table
from easymamba.checkpoints.layout import KeySpec
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

__all__ = ["CheckpointError", "FAMILIES", "KeySpec", "ModelFamily", "abstract_model", "checkpoint_config",
           "checkpoint_dtype", "family_of", "from_pretrained", "is_checkpoint", "load_checkpoint", "load_state_dict",
           "load_train_state", "mamba2_key_table", "read_config", "save_checkpoint", "save_pretrained",
           "save_train_state", "state_dict", "train_state_step", "versions"]
