"""Per family, the mixer sizes that layer 0's tensor shapes imply, for refusing a config that contradicts its
checkpoint (`checks.py`). Each function is a family's `mixer_facts` (`families.py`)."""

from easymamba.config import Mamba2Config, MambaConfig

_MIXER = "backbone.layers.0.mixer."


def mamba2_mixer_facts(config: Mamba2Config, shape_of) -> list[tuple[str, object, str, object]]:
    """(field, the config's value, tensor, the value its shape implies) for each Mamba-2 mixer size the
    layer-0 tensors contradict."""
    out = []
    a_log = shape_of(_MIXER + "A_log")                                  # [h]
    if a_log is not None and len(a_log) == 1 and a_log[0] != config.num_heads:
        out.append(("num_heads", config.num_heads, _MIXER + "A_log", a_log[0]))
    norm = shape_of(_MIXER + "norm.weight")                             # [e]
    if norm is not None and len(norm) == 1 and norm[0] != config.intermediate_size:
        out.append(("expand * hidden_size", config.intermediate_size, _MIXER + "norm.weight", norm[0]))
    conv = shape_of(_MIXER + "conv1d.weight")                           # [e + 2gn, 1, k]
    if conv is not None and len(conv) == 3:
        if conv[2] != config.conv_kernel:
            out.append(("conv_kernel", config.conv_kernel, _MIXER + "conv1d.weight", conv[2]))
        gn = config.n_groups * config.state_size
        if norm is not None and len(norm) == 1 and conv[0] != norm[0] + 2 * gn:
            out.append(("n_groups * state_size", gn, _MIXER + "conv1d.weight", f"({conv[0]} - {norm[0]}) / 2"))
    return out


def mamba1_mixer_facts(config: MambaConfig, shape_of) -> list[tuple[str, object, str, object]]:
    """As `mamba2_mixer_facts`, for a Mamba-1 mixer: A_log [e, n], conv1d [e, 1, k], x_proj [r + 2n, e]."""
    out = []
    a_log = shape_of(_MIXER + "A_log")
    if a_log is not None and len(a_log) == 2:
        if a_log[0] != config.intermediate_size:
            out.append(("expand * hidden_size", config.intermediate_size, _MIXER + "A_log", a_log[0]))
        if a_log[1] != config.state_size:
            out.append(("state_size", config.state_size, _MIXER + "A_log", a_log[1]))
    conv = shape_of(_MIXER + "conv1d.weight")
    if conv is not None and len(conv) == 3 and conv[2] != config.conv_kernel:
        out.append(("conv_kernel", config.conv_kernel, _MIXER + "conv1d.weight", conv[2]))
    x_proj = shape_of(_MIXER + "x_proj.weight")
    if x_proj is not None and len(x_proj) == 2 and a_log is not None and len(a_log) == 2:
        rank = x_proj[0] - 2 * a_log[1]
        if rank != config.resolved_time_step_rank:
            out.append(("time_step_rank", config.resolved_time_step_rank, _MIXER + "x_proj.weight",
                        f"{x_proj[0]} - 2 * state_size = {rank}"))
    return out


__all__ = ["mamba1_mixer_facts", "mamba2_mixer_facts"]
