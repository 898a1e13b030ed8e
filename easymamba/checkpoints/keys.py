"""Mamba-2's key table: every tensor of a `Mamba2ForCausalLM`, in HF's naming and order (Mamba-1's is
`easymamba.mamba1.mamba1_key_table`). `families.py` pairs each table with its model."""

from easymamba.checkpoints.layout import KeySpec, packed
from easymamba.config import Mamba2Config


def mamba2_key_table(config: Mamba2Config) -> list[KeySpec]:
    """Every tensor a `Mamba2ForCausalLM` with this config has, in HF's naming and order."""
    e, h, gn = config.intermediate_size, config.num_heads, config.n_groups * config.state_size
    in_parts = {"z": e, "x": e, "B": gn, "C": gn, "dt": h}
    conv_parts = {"x": e, "B": gn, "C": gn}
    table = [KeySpec("backbone.embeddings.weight", ("backbone", "embeddings", "weight"), "copy")]
    for i in range(config.num_hidden_layers):
        hf = f"backbone.layers.{i}."
        at = ("backbone", "layers", i)
        table.append(KeySpec(hf + "norm.weight", at + ("norm", "weight"), "copy"))
        mixer = at + ("mixer",)
        table.append(packed(hf + "mixer.in_proj.weight", "linear", mixer + ("in_proj",), "kernel", in_parts))
        if config.use_bias:
            table.append(packed(hf + "mixer.in_proj.bias", "copy", mixer + ("in_proj",), "bias", in_parts))
        table.append(packed(hf + "mixer.conv1d.weight", "conv", mixer + ("conv1d",), "weight", conv_parts))
        if config.use_conv_bias:
            table.append(packed(hf + "mixer.conv1d.bias", "copy", mixer + ("conv1d",), "bias", conv_parts))
        for name in ("dt_bias", "A_log", "D"):
            table.append(KeySpec(hf + f"mixer.{name}", mixer + (name,), "copy"))
        table.append(KeySpec(hf + "mixer.norm.weight", mixer + ("norm", "weight"), "copy"))
        table.append(KeySpec(hf + "mixer.out_proj.weight", mixer + ("out_proj", "kernel"), "linear"))
        if config.use_bias:
            table.append(KeySpec(hf + "mixer.out_proj.bias", mixer + ("out_proj", "bias"), "copy"))
    table.append(KeySpec("backbone.norm_f.weight", ("backbone", "norm_f", "weight"), "copy"))
    if not config.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return table


__all__ = ["mamba2_key_table"]
