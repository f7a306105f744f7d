"""The sampler's lean KV-cache decoder (models/lean.py) against the generic cached forward: the same
tokens and log-probs to 1e-5 for the three architectures it takes (grouped-query attention, biases,
left padding, several samples per prompt), with and without the weights laid out for oneDNN; its
TorchScript layers give the same numbers bit for bit as the same function run by Python; bf16
models sample too; and it always samples from the model's current weights."""

import pytest
import torch
from test_fused import ARCHES, tiny

from rlhfkit.models import lean
from rlhfkit.models.kernels import onednn_linear_available
from rlhfkit.models.script import scripted
from rlhfkit.rollout import sampler

PROMPTS = [[5, 17, 3, 44, 9, 12], [8, 2], [60, 61, 62, 1]]  # different lengths: left padding


def sharp(arch: str):
    """A tiny model whose attention is far from uniform, so that the scores' details show in the log-probs."""
    model = tiny(arch, kv_heads=2)  # 4 query heads over 2 key/value heads
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def run(model, monkeypatch, use_lean: bool, temperature: float, num_samples: int):
    monkeypatch.setattr(sampler.LeanDecoder, "applies", staticmethod(lambda m: use_lean))
    generator = torch.Generator().manual_seed(3)
    return sampler.sample(model, PROMPTS, eos_id=-1, pad_id=0, max_new_tokens=7, temperature=temperature,
                          num_samples=num_samples, generator=generator)


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize("temperature,num_samples", [(0.0, 1), (1.0, 3)])
@pytest.mark.parametrize("layout", [False, True])
@pytest.mark.parametrize("stacked", [True, False], ids=["qkv stacked", "qkv apart"])
def test_lean_decoder_matches_the_generic_cached_forward(arch, temperature, num_samples, layout, stacked, monkeypatch):
    if layout and not onednn_linear_available():
        pytest.skip("no oneDNN linear in this build: nothing is laid out")
    # 7 new tokens: the weights stay as they are unless every call lays them out
    monkeypatch.setattr(lean, "LAYOUT_MIN_NEW_TOKENS", 0 if layout else 10**6)
    monkeypatch.setattr(lean, "STACK_MAX_BYTES", 2**62 if stacked else 0)  # larger models keep q, k, v apart
    model = sharp(arch)
    ours = run(model, monkeypatch, True, temperature, num_samples)
    theirs = run(model, monkeypatch, False, temperature, num_samples)
    assert ours.completion_ids.shape == (3 * num_samples, 7)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=1e-5)
    assert ours.logprobs.abs().sum() > 1  # not all zero: the comparison means something


def test_sampling_after_an_optimizer_step_sees_the_new_weights(monkeypatch):
    # fused AdamW changes weights in place without bumping their version counters: a decoder that
    # kept its prepared weights across calls keyed on them alone would sample from the old model
    from rlhfkit.train.optim import build_optimizer

    model = sharp("qwen2")
    optimizer = build_optimizer(model, lr=0.05)
    assert optimizer.defaults["fused"]
    for _ in range(2):  # unchanged weights: the second call keeps them laid out, the third reuses them
        run(model, monkeypatch, True, 0.0, 1)
    assert lean._KEPT[model][1] is not None
    before = run(model, monkeypatch, True, 0.0, 1)
    versions = [p._version for p in model.parameters()]
    model(torch.tensor(PROMPTS[0])[None]).logits.square().mean().backward()
    optimizer.step()
    assert [p._version for p in model.parameters()] != versions  # the step hook marked the change
    after, generic = run(model, monkeypatch, True, 0.0, 1), run(model, monkeypatch, False, 0.0, 1)
    assert torch.allclose(after.logprobs, generic.logprobs, atol=1e-5)  # the step was seen
    assert not torch.allclose(after.logprobs, before.logprobs, atol=1e-3)


def test_a_fused_step_between_the_first_two_calls_is_seen(monkeypatch):
    # as in a fresh process: no optimizer hook registered yet. The first sampling call registers
    # it, so a fused AdamW step before the second call changes the versions, and the second call
    # keeps no prepared copy of the weights (before, it took them as unchanged and kept one)
    import importlib
    from collections import OrderedDict

    from rlhfkit.train.optim import build_optimizer

    hooks = importlib.import_module("torch.optim.optimizer")
    monkeypatch.setattr(hooks, "_global_optimizer_post_hooks", OrderedDict())
    lean._watch_optimizers.cache_clear()
    try:
        model = sharp("qwen2")
        optimizer = build_optimizer(model, lr=0.05)
        first = run(model, monkeypatch, True, 0.0, 1)
        model(torch.tensor(PROMPTS[0])[None]).logits.square().mean().backward()
        optimizer.step()
        second = run(model, monkeypatch, True, 0.0, 1)
        assert lean._KEPT[model][1] is None
        assert torch.allclose(second.logprobs, run(model, monkeypatch, False, 0.0, 1).logprobs, atol=1e-5)
        assert not torch.allclose(second.logprobs, first.logprobs, atol=1e-3)
    finally:
        lean._watch_optimizers.cache_clear()  # its hook went into the registry the test replaced


def test_kept_weights_follow_loaded_weights_and_an_rl_loop_keeps_none(monkeypatch):
    model, other = sharp("llama"), tiny("llama", kv_heads=2, seed=1)
    for _ in range(3):
        kept = run(model, monkeypatch, True, 0.0, 1)
    assert torch.allclose(kept.logprobs, run(model, monkeypatch, False, 0.0, 1).logprobs, atol=1e-5)
    model.load_state_dict(other.state_dict())
    loaded = run(model, monkeypatch, True, 0.0, 1)
    assert torch.allclose(loaded.logprobs, run(other, monkeypatch, False, 0.0, 1).logprobs, atol=1e-5)
    assert not torch.allclose(loaded.logprobs, kept.logprobs, atol=1e-3)
    for _ in range(3):  # weights changed before every call, as in RL: no prepared copy is held
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
        run(model, monkeypatch, True, 0.0, 1)
        assert lean._KEPT[model][1] is None


def test_torchscript_layers_give_the_numbers_python_gives(monkeypatch):
    assert isinstance(scripted(lean._step), torch.jit.ScriptFunction)  # compiled, not the fallback
    assert isinstance(scripted(sampler._pick), torch.jit.ScriptFunction)
    model = sharp("qwen2")
    by_torchscript = run(model, monkeypatch, True, 1.0, 3)
    for module in (lean, sampler):
        monkeypatch.setattr(module, "scripted", lambda function: function)
    python = run(model, monkeypatch, True, 1.0, 3)
    assert torch.equal(by_torchscript.completion_ids, python.completion_ids)
    assert torch.equal(by_torchscript.logprobs, python.logprobs)


def test_bf16_model_samples_as_the_generic_forward_does(monkeypatch):
    # its weights must not be laid out for the fp32 oneDNN product (that once failed in the first matmul)
    monkeypatch.setattr(lean, "LAYOUT_MIN_NEW_TOKENS", 0)
    model = sharp("llama").to(torch.bfloat16)
    ours, theirs = run(model, monkeypatch, True, 0.0, 1), run(model, monkeypatch, False, 0.0, 1)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=2e-2)
    assert ours.logprobs.abs().sum() > 1
