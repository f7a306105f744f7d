"""The sampler's lean KV-cache decoder (models/lean.py) against the generic cached forward: the same
tokens and log-probs to 1e-5 for the three architectures it takes (grouped-query attention, biases,
left padding, several samples per prompt), through oneDNN with and without its weight layout and
through BLAS with and without MKL's packed weights (whose products the decode steps do read); its
TorchScript layers give the same numbers bit for bit as the same function run by Python; bf16
models sample too; and it always samples from the model's current weights."""

import pytest
import torch
from test_fused import ARCHES, tiny

from rlhfkit.models import lean
from rlhfkit.models.kernels import mkl_packing_available, onednn_linear_available
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
@pytest.mark.parametrize("kernel", ["onednn", "onednn laid out", "blas", "blas packed"])
@pytest.mark.parametrize("stacked", [True, False], ids=["qkv stacked", "qkv apart"])
def test_lean_decoder_matches_the_generic_cached_forward(arch, temperature, num_samples, kernel, stacked, monkeypatch):
    if kernel.startswith("onednn") and not onednn_linear_available():
        pytest.skip("no oneDNN linear in this build")
    if kernel == "blas packed" and not mkl_packing_available():
        pytest.skip("no MKL packed product in this build")
    # 7 new tokens: the weights stay as they are unless every call lays them out
    monkeypatch.setattr(lean, "LAYOUT_MIN_NEW_TOKENS", 0 if kernel == "onednn laid out" else 10**6)
    monkeypatch.setattr(lean, "MKL_PACKED", kernel == "blas packed")
    monkeypatch.setattr(lean, "MKL_PACK_MIN_NEW_TOKENS", 0)  # pack even these 7 new tokens
    if kernel.startswith("blas"):
        monkeypatch.setattr(lean, "_onednn_applies", lambda dtype: False)
    monkeypatch.setattr(lean, "STACK_MAX_BYTES", 2**62 if stacked else 0)  # larger models keep q, k, v apart
    model = sharp(arch)
    ours = run(model, monkeypatch, True, temperature, num_samples)
    theirs = run(model, monkeypatch, False, temperature, num_samples)
    assert ours.completion_ids.shape == (3 * num_samples, 7)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=1e-5)
    assert ours.logprobs.abs().sum() > 1  # not all zero: the comparison means something


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_rows_that_end_early_sample_as_the_generic_forward_does(arch, monkeypatch):
    # the decode loop's additive mask: a row that has emitted EOS stops attending to its later
    # positions while the other rows go on
    model = sharp(arch)
    eos = run(model, monkeypatch, True, 1.0, 3).completion_ids[0, 2].item()  # row 0's third token: call it EOS

    def with_eos(use_lean: bool):
        monkeypatch.setattr(sampler.LeanDecoder, "applies", staticmethod(lambda m: use_lean))
        return sampler.sample(model, PROMPTS, eos_id=eos, pad_id=0, max_new_tokens=7, temperature=1.0, num_samples=3,
                              generator=torch.Generator().manual_seed(3))

    ours, theirs = with_eos(True), with_eos(False)
    lengths = ours.completion_mask.sum(-1)
    assert bool(ours.finished[0]) and lengths[0] <= 3 and lengths.max() == 7  # row 0 ended; another went on
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.equal(ours.completion_mask, theirs.completion_mask)
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=1e-5)


@pytest.mark.parametrize("packed_layers", [None, 1, 0, "short call"])
def test_decode_steps_read_the_weights_mkl_packed(packed_layers, monkeypatch):
    # MKL's packed product falls back to F.linear on the original weight when the rows differ from
    # those packed for, silently: every decode step's products must have exactly the packed rows.
    # packed_layers: None, no limit; a number: MKL_PACK_MAX_BYTES fits the head and that many
    # layers; "short call": 7 new tokens, under MKL_PACK_MIN_NEW_TOKENS, with new weights: no packs
    if not mkl_packing_available():
        pytest.skip("no MKL packed product in this build")
    monkeypatch.setattr(lean, "_onednn_applies", lambda dtype: False)
    for module in (lean, sampler):  # Python: the calls can be seen
        monkeypatch.setattr(module, "scripted", lambda function: function)
    monkeypatch.setattr(lean, "STACK_MAX_BYTES", 0)  # q, k, v, gate and up apart: 7 products a layer
    calls, packed_product = [], torch.ops.mkl._mkl_linear

    def recorded(x, packed, weight, bias, rows):
        calls.append((x.shape[0], rows, packed.is_mkldnn))
        return packed_product(x, packed, weight, bias, rows)

    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", recorded)
    model = sharp("qwen2")
    layers = len(model.model.layers)
    if packed_layers == "short call":
        assert lean.MKL_PACK_MIN_NEW_TOKENS > 7
        ours = run(model, monkeypatch, True, 1.0, 3)
        assert calls == []
        return
    monkeypatch.setattr(lean, "MKL_PACK_MIN_NEW_TOKENS", 0)
    if packed_layers is not None:
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        layer_bytes = sum(p.nbytes for m in (attn, mlp) for p in m.parameters() if p.dim() == 2)
        monkeypatch.setattr(lean, "MKL_PACK_MAX_BYTES", model.lm_head.weight.nbytes + packed_layers * layer_bytes)
        layers = packed_layers
    ours = run(model, monkeypatch, True, 1.0, 3)  # 3 prompts x 3 samples: 9 rows, 7 new tokens
    decode = [c for c in calls if c[0] == 9]
    assert len(decode) == 6 * (7 * layers + 1)  # the 6 steps after the first token, the head included
    assert all(rows == 9 and is_packed for _, rows, is_packed in calls)
    assert len(calls) == len(decode) + 7 * layers + 1  # the prefill's 3 rows x 6 tokens: F.linear within
    theirs = run(model, monkeypatch, False, 1.0, 3)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=1e-5)


def test_mkl_packed_product_is_the_plain_product_at_the_packed_rows_only():
    # what lean.py relies on: the packed copy at the rows it was packed for, the original weight otherwise
    if not mkl_packing_available():
        pytest.skip("no MKL packed product in this build")
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(9, 24, generator=gen), torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 9)
    assert torch.allclose(torch.ops.mkl._mkl_linear(x, packed, w, b, 9), x @ w.t() + b, atol=1e-5)
    zeros = torch.zeros_like(w)  # the original weight is not read at the packed rows ...
    assert torch.allclose(torch.ops.mkl._mkl_linear(x, packed, zeros, b, 9), x @ w.t() + b, atol=1e-5)
    assert torch.equal(torch.ops.mkl._mkl_linear(x[:5], packed, zeros, b, 9), b.expand(5, 40))  # ... and only it elsewhere


@pytest.fixture(params=["onednn", "blas packed"])
def kernel(request, monkeypatch):
    """The kernel whose prepared weights (oneDNN's layout, MKL's packs) a test keeps across calls."""
    if request.param == "onednn" and not onednn_linear_available():
        pytest.skip("no oneDNN linear in this build")
    if request.param == "blas packed":
        if not mkl_packing_available():
            pytest.skip("no MKL packed product in this build")
        monkeypatch.setattr(lean, "_onednn_applies", lambda dtype: False)
        monkeypatch.setattr(lean, "MKL_PACK_MIN_NEW_TOKENS", 0)  # packed in every call, kept where unchanged
    return request.param


def test_sampling_after_an_optimizer_step_sees_the_new_weights(kernel, monkeypatch):
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


def test_a_run_starts_from_the_weights_a_caller_wrote_through_data(tmp_path, monkeypatch):
    """Writes through ``.data`` (a notebook's ``p.data.copy_``, peft's ``merge_and_unload``) bump no
    version counter: a later run in the same process sampled from the kept prepared weights of the
    old ones (0.21 nats a token off). A run's start drops every kept copy."""
    from rlhfkit.train.config import TrainConfig
    from rlhfkit.train.run import start_run

    model = sharp("qwen2")
    for _ in range(2):
        run(model, monkeypatch, True, 0.0, 1)
    assert lean._KEPT[model][1] is not None
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(0.5)  # no version bump
    assert lean._KEPT[model][1] is not None
    stale, generic = run(model, monkeypatch, True, 0.0, 1), run(model, monkeypatch, False, 0.0, 1)
    assert not torch.allclose(stale.logprobs, generic.logprobs, atol=1e-3)  # what a kept copy did
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    started = start_run(TrainConfig(out_dir=str(tmp_path / "out"), report_to="none", progress=False), {}, "sft")
    assert model not in lean._KEPT and not hf_logging.is_progress_bar_enabled()
    assert torch.allclose(run(model, monkeypatch, True, 0.0, 1).logprobs, generic.logprobs, atol=1e-5)
    started.close()  # transformers' progress bars as the caller had them (a run with progress=false left them off)
    assert hf_logging.is_progress_bar_enabled() == bars
    if bars:  # a run that fails before its end: the bars are back once it is let go
        import gc

        failed = start_run(TrainConfig(out_dir=str(tmp_path / "failed"), report_to="none", progress=False), {}, "sft")
        assert not hf_logging.is_progress_bar_enabled()
        del failed
        gc.collect()
        assert hf_logging.is_progress_bar_enabled()


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


def test_kept_weights_follow_loaded_weights_and_an_rl_loop_keeps_none(kernel, monkeypatch):
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
    for _ in range(2):  # unchanged again: kept; then only the output head changes, which is seen
        run(model, monkeypatch, True, 0.0, 1)
    assert lean._KEPT[model][1] is not None
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    head_changed = run(model, monkeypatch, True, 0.0, 1)
    assert torch.allclose(head_changed.logprobs, run(model, monkeypatch, False, 0.0, 1).logprobs, atol=1e-5)


def test_torchscript_layers_give_the_numbers_python_gives(monkeypatch):
    for function in (lean.step, sampler._decode, sampler._next):  # compiled, not the fallback
        assert isinstance(scripted(function).script, torch.jit.ScriptFunction)
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


def test_a_model_in_training_mode_samples_as_in_eval_mode_and_stays_in_training_mode(monkeypatch):
    # the lean decoder reads the weights alone (no dropout), without switching the modules' modes;
    # the generic forward switches to eval mode for the call and back
    model = sharp("qwen2")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    ours = run(model, monkeypatch, True, 1.0, 3)
    assert model.training and all(m.training for m in model.modules())
    theirs = run(model, monkeypatch, False, 1.0, 3)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=1e-5)


def test_a_larger_model_keeps_no_prepared_copies(kernel, monkeypatch):
    # kept copies stay held through whatever runs before the next call (a training step after an
    # evaluation): above KEEP_MAX_BYTES of projection weights they are made anew each call instead
    small, large = sharp("qwen2"), sharp("qwen2")
    for _ in range(3):  # unchanged weights
        kept = run(small, monkeypatch, True, 0.0, 1)
    assert lean._KEPT[small][1] is not None
    monkeypatch.setattr(lean, "KEEP_MAX_BYTES", large.lm_head.weight.nbytes)  # less than the model's weights
    for _ in range(3):
        fresh = run(large, monkeypatch, True, 0.0, 1)
        assert lean._KEPT[large][1] is None
    assert torch.equal(fresh.completion_ids, kept.completion_ids)
    assert torch.allclose(fresh.logprobs, kept.logprobs, atol=1e-6)
