"""Mamba-1 test helpers: random Hugging Face `MambaForCausalLM`s and our converted copies.

`load_hf_state_dict` reads HF tensors through `easymamba.models.mamba1_key_table`, the table the library's
loader uses for Mamba-1.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from helpers import randomize_

from easymamba.config import MambaConfig
from easymamba.checkpoints.layout import to_flax_layout
from easymamba.models import MambaForCausalLM, mamba1_key_table


def tiny_hf_mamba_config(**overrides) -> transformers.MambaConfig:
    kwargs = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                  use_bias=False, use_conv_bias=True, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    kwargs.update(overrides)
    return transformers.MambaConfig(**kwargs)


@torch.no_grad()
def randomize_mamba1_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`helpers.randomize_`, then dt_proj.bias redrawn so that softplus(bias) ~ 0.05 as in trained models (the
    generic 0.1 * noise bias would make dt ~ 0.7 and the state forget everything within a few tokens)."""
    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, p in model.named_parameters():
        if name.endswith("dt_proj.bias"):
            p.copy_(math.log(math.expm1(0.05)) + 0.5 * torch.randn(p.shape, generator=gen))
    return model


def random_hf_mamba(seed: int = 0, **overrides) -> transformers.MambaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(tiny_hf_mamba_config(**overrides)).eval()
    return randomize_mamba1_(model, seed + 1)


def load_hf_state_dict(model: MambaForCausalLM, state_dict) -> None:
    """Copy HF-named tensors into `model` by the key table; a tied model's `lm_head.weight` must equal the
    embedding. Every table entry must be present with its HF shape, and nothing else may be left over."""
    table = mamba1_key_table(model.config)
    names = {spec.hf_name for spec in table}
    extra = set(state_dict) - names
    if model.config.tie_word_embeddings and "lm_head.weight" in extra:
        np.testing.assert_array_equal(state_dict["lm_head.weight"].numpy(),
                                      state_dict["backbone.embeddings.weight"].numpy())
        extra.discard("lm_head.weight")
    assert not extra, f"tensors the key table does not know: {sorted(extra)}"
    for name, path, kind in ((spec.hf_name, spec.path, spec.kind) for spec in table):
        obj = model
        for step in path:
            obj = obj[step] if isinstance(step, int) else getattr(obj, step)
        value = to_flax_layout(kind, state_dict[name].detach().float().numpy())
        assert value.shape == tuple(obj.shape), (name, value.shape, obj.shape)
        obj.set_value(jnp.asarray(value, obj.dtype))
    unfilled = [path for path, leaf in nnx.to_flat_state(nnx.state(model))
                if not isinstance(leaf.get_value(), jax.Array)]
    assert not unfilled, f"parameters the key table does not cover: {unfilled}"


def to_easymamba_mamba1(hf_model, **kwargs) -> MambaForCausalLM:
    """Our copy of `hf_model`, built abstractly (`nnx.eval_shape`: no random init to compile) and then filled."""
    config = MambaConfig.from_hf(hf_model.config.to_dict())
    model = nnx.eval_shape(lambda: MambaForCausalLM(config, rngs=nnx.Rngs(0), **kwargs))
    load_hf_state_dict(model, hf_model.state_dict())
    return model
