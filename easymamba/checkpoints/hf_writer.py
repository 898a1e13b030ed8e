"""Writing a flax model as an HF checkpoint directory that `transformers` loads: `save_pretrained`.

`config.json` (and `generation_config.json` when the model carries one) plus safetensors in the parameters' own
dtype with `{"format": "pt"}` metadata, sharded with an index above `max_shard_size`; tied models carry no
`lm_head.weight`, as transformers writes them. Parameters are fetched to the host one tensor at a time
(`safetensors_writer.py` says why it streams).
"""

import json
import os
import pathlib

import numpy as np

from easymamba.models import family_of
from easymamba.checkpoints.hf_reader import CONFIG_NAME, ProgressHook
from easymamba.config.generation import GENERATION_CONFIG_NAME
from easymamba.checkpoints.layout import flax_shape, hf_shape, param_at, read_flax, to_hf_layout
from easymamba.checkpoints.destination import claim
from easymamba.checkpoints.safetensors_writer import TensorToWrite, parse_size, write_sharded


def save_pretrained(model, path: "str | os.PathLike", *, max_shard_size: "int | str" = "5GB",
                    progress: ProgressHook | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write `config.json` and safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Tensors keep the parameters' dtype. Above `max_shard_size` (an int of bytes, or "5GB", "500MiB", ...)
    the weights are sharded with a `model.safetensors.index.json`. Returns the directory.

    `path` must be new or empty unless `overwrite=True`, which replaces `config.json` and the weight files in it
    and keeps every other file; a save running into the same directory makes this one raise (`destination.py`).
    Both refusals are a `CheckpointError`, raised before anything is written.
    """
    parse_size(max_shard_size)  # a bad size or a non-model is refused before the directory is created
    family_of(model)
    with claim(path, overwrite=overwrite, what="save_pretrained") as directory:
        return _write(model, directory, max_shard_size, progress)


def _write(model, directory: pathlib.Path, max_shard_size, progress) -> pathlib.Path:
    table = family_of(model).key_table(model.config)
    entries = []
    for spec in table:
        param = param_at(model, spec.targets[0])
        entries.append(TensorToWrite(
            spec.hf_name, hf_shape(spec.kind, flax_shape(model, spec)), np.dtype(param.dtype),
            lambda spec=spec: to_hf_layout(spec.kind, read_flax(model, spec))))
    for name, array in getattr(model, "carried_tensors", {}).items():  # written back as they were read
        entries.append(TensorToWrite(name, tuple(array.shape), array.dtype, lambda array=array: array))
    done = [0]

    def on_tensor(name):
        done[0] += 1
        if progress is not None:
            progress(done[0], len(entries), name)

    write_sharded(directory, entries, max_shard_size=max_shard_size, metadata={"format": "pt"},
                  on_tensor=on_tensor)
    config = json.loads(model.config.to_json_string())
    config["dtype"] = str(np.dtype(param_at(model, table[0].targets[0]).dtype))  # transformers 5's name for it
    files = {CONFIG_NAME: config}
    defaults = getattr(model, "generation_config", None)
    if defaults is not None:  # the generation_config.json the model was loaded with, as it was read
        files[GENERATION_CONFIG_NAME] = defaults.to_hf()
    for name, content in files.items():
        tmp = directory / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, directory / name)
    return directory


__all__ = ["save_pretrained"]
