"""Training gradients against torch autograd through transformers' models (random weights, CPU, float32).

One train step (`easymamba.train.make_train_step`, the function users call) on a batch whose labels hold -100s;
the gradient it hands the optimizer is recorded (`record_grads`) and compared, parameter by parameter in HF
names and layouts, with `loss.backward()` through transformers' `Mamba2ForCausalLM` / `MambaForCausalLM` on the
same weights, batch and labels. Our gradients reach HF layout through `easymamba.state_dict` (the loader's key
table: packed in_proj / conv1d joined, kernels transposed), as parameters do.

Tolerance: rel err (max |diff| / max |torch grad|, per tensor) <= 1e-4. Both sides compute in float32 with
different summation orders (XLA vs torch, chunked SSD on both); measured worst 1.6e-6 over every tensor. A
semantic error (a missing term of the chain rule, a -100 counted, a wrong group in the gated norm) moves a
gradient by 1e-2 or more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from helpers import random_hf_model, rel_err
from helpers_mamba1 import random_hf_mamba, to_easymamba_mamba1

import easymamba as em
from easymamba import train

TOL = 1e-4
LR = 0.5
# make_train_step's own function, compiled with LLVM's optimisation off: a third of the compile time, IEEE float32
# arithmetic all the same (the tolerance above is unchanged).
STEP = jax.jit(train.make_train_step(jit=False), compiler_options={"xla_backend_optimization_level": 0})

MAMBA2_CASES = {
    # transformers 5.23's grouped gated norm matches ours, so n_groups > 1 is compared as well
    "groups1_untied": dict(n_groups=1),
    "groups2_tied_bias_1layer": dict(n_groups=2, tie_word_embeddings=True, use_bias=True, num_hidden_layers=1),
}


def record_grads() -> optax.GradientTransformation:
    """Passes the gradient through unchanged and keeps it as its state, so the test sees exactly what the
    optimizer was given."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (grads, grads))


def labelled_batch(seed: int, vocab: int, batch: int = 2, length: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and labels with ~30% set to -100 (at least one scored label per row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, length)).astype(np.int32)
    labels = ids.copy()
    labels[rng.random(ids.shape) < 0.3] = -100
    labels[:, -1] = ids[:, -1]
    return ids, labels


def torch_grads(hf_model, ids, labels) -> tuple[float, dict[str, np.ndarray]]:
    hf_model.zero_grad()
    out = hf_model(torch.from_numpy(ids).long(), labels=torch.from_numpy(labels).long(), use_cache=False)
    out.loss.backward()
    return out.loss.item(), {name: p.grad.numpy() for name, p in hf_model.named_parameters()}


def check_step_against_torch(model, hf_model, ids, labels, name) -> train.TrainState:
    """One step with SGD(LR) after `record_grads`: the recorded gradient equals torch's, the loss equals HF's
    loss, and the parameters moved by -LR * gradient. Returns the state after the step."""
    before = em.state_dict(model)
    state = train.TrainState.create(model, optax.chain(record_grads(), optax.sgd(LR)))
    state, metrics = STEP(state, {"input_ids": ids, "labels": labels})
    hf_loss, expected = torch_grads(hf_model, ids, labels)

    ours = em.state_dict(nnx.merge(state.graphdef, state.opt_state[0]))
    assert set(ours) == set(expected), set(ours) ^ set(expected)
    errors = {key: rel_err(ours[key], expected[key]) for key in expected}
    worst = max(errors, key=errors.get)
    print(f"{name}: loss {float(metrics['loss']):.6f} (HF {hf_loss:.6f}); worst grad rel err {errors[worst]:.2e} "
          f"({worst})")
    assert abs(float(metrics["loss"]) - hf_loss) <= 1e-5 * abs(hf_loss)
    assert int(metrics["tokens"]) == int((labels[:, 1:] != -100).sum())
    for key in expected:
        assert errors[key] <= TOL, (key, errors[key])
        assert np.max(np.abs(expected[key])) > 0, f"{key} has an all-zero gradient: the test would not see it"
    after = em.state_dict(state.model())
    for key in expected:  # p - LR * g, the same float32 operations on both sides
        np.testing.assert_allclose(after[key], before[key] - np.float32(LR) * ours[key], rtol=1e-6, atol=0,
                                   err_msg=key)
    return state


@pytest.mark.parametrize("name", sorted(MAMBA2_CASES))
def test_mamba2_gradients_match_torch(name, tmp_path):
    hf_model = random_hf_model(seed=3 + len(name), **MAMBA2_CASES[name])
    ids, labels = labelled_batch(len(name), hf_model.config.vocab_size)
    hf_model.save_pretrained(tmp_path)  # from_pretrained builds abstractly: no eager random init to compile
    check_step_against_torch(em.from_pretrained(tmp_path), hf_model, ids, labels, name)


def test_mamba1_gradients_match_torch(tmp_path):
    """The loss path is shared with Mamba-2; one step of a Mamba-1 model against `MambaForCausalLM`, and its
    train state through an orbax checkpoint and back, bit for bit."""
    hf_model = random_hf_mamba(seed=5, tie_word_embeddings=False, use_bias=True)
    ids, labels = labelled_batch(9, hf_model.config.vocab_size, length=13)
    state = check_step_against_torch(to_easymamba_mamba1(hf_model), hf_model, ids, labels, "mamba1")

    em.save_train_state(state, tmp_path / "ckpt")
    like = train.TrainState.create(to_easymamba_mamba1(random_hf_mamba(seed=6, tie_word_embeddings=False,
                                                                      use_bias=True)), state.tx, rng=7)
    back = em.load_train_state(tmp_path / "ckpt", like)
    assert type(back.model()).__name__ == "MambaForCausalLM" and int(back.step) == 1
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        x, y = (jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v for v in (x, y))
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
