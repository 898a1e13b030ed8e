"""Checking a tensor source against a model and its config before any tensor is read into it.

Names (with the original state-spaces rename), the config fields the shapes contradict (the embedding,
layer count, biases and head shared by every family, then the family's own mixer sizes), missing and
unexpected tensors, shapes, dtypes, and a tied head that must equal the embedding. Every problem raises
`CheckpointError` naming the file and the tensor.
"""

import re

import numpy as np

from easymamba.checkpoints.errors import CheckpointError
from easymamba.models import ModelFamily, family_of
from easymamba.models.family import ties_lm_head
from easymamba.checkpoints.layout import flax_shape, hf_shape

# HF renames the original state-spaces name on load (`Mamba2Model.load_hook`); we accept both.
LEGACY_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def _embedding_name(table) -> str:
    """The checkpoint name of the token embedding ("backbone.embeddings.weight", "model.embed_tokens.weight")."""
    return next(spec.hf_name for spec in table if spec.path == ("backbone", "embeddings", "weight"))


def _layers_prefix(table) -> str | None:
    """What the checkpoint names of layer i start with, before the i ("backbone.layers.", "model.layers.")."""
    for spec in table:
        if spec.targets[0][:2] == ("backbone", "layers"):
            i = spec.targets[0][2]
            head, sep, _ = spec.hf_name.partition(f"layers.{i}.")
            return head + "layers." if sep else None
    return None


def _config_contradictions(family: ModelFamily, config, src, names: dict[str, str], config_name: str) -> list[str]:
    """Sentences naming each config field that the tensor shapes contradict (empty when they agree)."""
    out = []
    table = family.key_table(config)

    def shape_of(hf_name):
        return tuple(src.shape(names[hf_name])) if hf_name in names else None

    def disagree(field, said, name, implied):
        out.append(f"{config_name} says {field} = {said}, but {name} in {src.file_of(names[name])} has shape "
                   f"{shape_of(name)}, which means {field} = {implied}")

    emb_name = _embedding_name(table)
    emb = shape_of(emb_name)
    if emb is not None and len(emb) == 2:
        if emb[0] != config.vocab_size:
            disagree("vocab_size", config.vocab_size, emb_name, emb[0])
        if emb[1] != config.hidden_size:
            disagree("hidden_size", config.hidden_size, emb_name, emb[1])
    layers = {}
    prefix = _layers_prefix(table)
    for name in names if prefix is not None else ():
        m = re.match(re.escape(prefix) + r"(\d+)\.", name)
        if m:
            layers.setdefault(int(m.group(1)), name)
    if layers and max(layers) + 1 != config.num_hidden_layers:
        last = max(layers)
        out.append(f"{config_name} says num_hidden_layers = {config.num_hidden_layers}, but the checkpoint has "
                   f"tensors for {last + 1} layers ({layers[last]} in {src.file_of(names[layers[last]])})")
    for fact in family.mixer_facts(config, shape_of):
        disagree(*fact)
    mixer = "backbone.layers.0.mixer."
    for field, tensor in (("use_bias", "in_proj.bias"), ("use_conv_bias", "conv1d.bias")):
        has = mixer + tensor in names
        # where layer 0 is a Mamba mixer under this name; elsewhere the key tables check the biases
        if layers and hasattr(config, field) and mixer + "in_proj.weight" in names \
                and has != getattr(config, field):
            where = src.file_of(names[mixer + tensor]) if has else src.description
            out.append(f"{config_name} says {field} = {str(getattr(config, field)).lower()}, but {where} "
                       f"{'has' if has else 'has no'} {mixer + tensor}")
    if not ties_lm_head(config) and "lm_head.weight" not in names and emb is not None:
        out.append(f"{config_name} says tie_word_embeddings = false, but {src.description} has no lm_head.weight "
                   "(tied checkpoints leave it out)")
    return out


def check_names(config, src, config_name: str, *, strict: bool = True) -> dict[str, str]:
    """Check the tensor names of `src` against `config` (the config fields the shapes contradict, missing and
    unexpected tensors) without any model: cheap, so loaders run it before building even an abstract model (a
    `num_hidden_layers` far above the file's is refused here, not after building it). Returns
    {HF name: name in the source} of every tensor of `src`."""
    names: dict[str, str] = {}
    for raw in src.names():
        hf_name = LEGACY_RENAMES.get(raw, raw)
        if hf_name in names:
            raise CheckpointError(f"{src.description} has both {names[hf_name]} and {raw}, two names for one tensor")
        names[hf_name] = raw

    family = family_of(config)
    problems = _config_contradictions(family, config, src, names, config_name)
    if problems:
        raise CheckpointError("the config contradicts the tensors:\n  " + "\n  ".join(problems))

    table = family.key_table(config)
    expected = {spec.hf_name for spec in table}
    missing = [spec.hf_name for spec in table if spec.hf_name not in names]
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:8]})" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing from {src.description}{more}")
    allowed = {"lm_head.weight"} if ties_lm_head(config) else set()
    carried = family.carried_prefixes(config)
    unexpected = [n for n in names if n not in expected and n not in allowed and not n.startswith(carried)]
    if unexpected and strict:
        listed = "; ".join(f"{n} in {src.file_of(names[n])}" for n in unexpected[:8])
        raise CheckpointError(f"unexpected tensor(s) that a {family.causal_lm.__name__} with this config does "
                              f"not have: {listed}"
                              + (f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    return names


def check_source(model, src, config_name: str, *, strict: bool = True) -> dict[str, str]:
    """Validate every tensor of `src` against `model` (concrete or abstract) and its config; returns
    {HF name: name in the source}."""
    config = model.config
    names = check_names(config, src, config_name, strict=strict)
    table = family_of(config).key_table(config)
    for spec in table:
        name = names[spec.hf_name]
        want = hf_shape(spec.kind, flax_shape(model, spec))
        found = tuple(src.shape(name))
        if found != want:
            raise CheckpointError(f"tensor {name} in {src.file_of(name)}: expected shape {want} for this config, "
                                  f"found {found}")
        code = src.dtype(name)
        if code not in FLOAT_CODES:
            raise CheckpointError(f"tensor {name} in {src.file_of(name)} has dtype {code}, which is not supported "
                                  f"for weights (supported: {', '.join(FLOAT_CODES)})")
    if ties_lm_head(config) and "lm_head.weight" in names:
        _check_tied_head(src, names, config_name, _embedding_name(table))
    return {spec.hf_name: names[spec.hf_name] for spec in table}


def carried_names(config, src) -> list[str]:
    """The names in `src` of the tensors its model carries without running them (the family's
    `carried_prefixes`), in the source's order."""
    prefixes = family_of(config).carried_prefixes(config)
    return [n for n in src.names() if prefixes and LEGACY_RENAMES.get(n, n).startswith(prefixes)]


def _check_tied_head(src, names: dict[str, str], config_name: str, embedding: str) -> None:
    emb_name, head_name = names[embedding], names["lm_head.weight"]
    shape = tuple(src.shape(emb_name))
    if tuple(src.shape(head_name)) != shape:
        raise CheckpointError(f"{config_name} says tie_word_embeddings = true, but lm_head.weight in "
                              f"{src.file_of(head_name)} has shape {tuple(src.shape(head_name))}, not the "
                              f"embedding's {shape}")
    rows = max(1, 2**22 // max(1, shape[1]))  # compare in row blocks: never a whole copy of either matrix
    worst = 0.0
    for i in range(0, shape[0], rows):
        block = (slice(i, min(i + rows, shape[0])), slice(0, shape[1]))
        a = src.read_slice(emb_name, block).astype(np.float64)
        b = src.read_slice(head_name, block).astype(np.float64)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
    if worst != 0.0:
        raise CheckpointError(f"{config_name} says tie_word_embeddings = true, but lm_head.weight in "
                              f"{src.file_of(head_name)} differs from {embedding} (max |diff| "
                              f"{worst:.3g}): a tied model would compute different logits; set "
                              "tie_word_embeddings to false to load both")


__all__ = ["FLOAT_CODES", "LEGACY_RENAMES", "check_names", "check_source"]
