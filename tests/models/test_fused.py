"""The lean backbone (models/fused.py) against the model's own forward: hidden states and every
parameter's gradient to 1e-5, for the three architectures it takes, padded, unpadded and block-masked."""

import pytest
import torch

from rlhfkit.models import fused
from rlhfkit.models.forward import position_ids_from_mask

ARCHES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases, grouped-query attention below
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def tiny(arch: str, kv_heads: int = 2, seed: int = 0):
    import transformers

    config_name, model_name, extra = ARCHES[arch]
    config = getattr(transformers, config_name)(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="sdpa", **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float()
    with torch.no_grad():  # biases and norm weights away from their init, so that their gradients are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def own_forward(model, ids, mask, positions):
    return model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


def both(model, ids, mask, positions, read, first=0):
    """(ours, theirs) for ``read`` of the hidden states (columns ``first``.. ), and both sets of
    parameter gradients."""
    results = []
    for forward in (lambda *a: fused.backbone(*a, first), lambda *a: own_forward(*a)[:, first:]):
        model.zero_grad(set_to_none=True)
        hidden = forward(model, ids, mask, positions)
        weights = torch.linspace(-1, 1, hidden.shape[-1])
        (read(hidden) * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((read(hidden).detach(), grads))
    return results


@pytest.mark.parametrize("first", [0, 3])
@pytest.mark.parametrize("node", ["1", "0"], ids=["one node", "per operation"])
@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_lean_backbone_matches_the_models_forward_and_gradients(arch, padding, node, first, monkeypatch):
    """Both lean paths (the layers as one node, and one autograd node per operation, the path of
    GPUs and other dtypes) against the model's own forward: every column, and from column 3 on (the
    last layer then computes queries, output and MLP for those columns only)."""
    monkeypatch.setenv("RLHFKIT_LAYERS_NODE", node)
    model = tiny(arch)
    assert fused.applies(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :4], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[1, 6:], mask[2, 8:] = 0, 0
    positions = position_ids_from_mask(mask)
    # every position, padding included (a query that sees no key gets zeros in both)
    (ours, our_grads), (theirs, their_grads) = both(model, ids, mask, positions, lambda h: h, first)
    assert ours.shape[1] == ids.shape[1] - first
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == len(list(model.parameters())) - 1  # not lm_head
    for name, want in their_grads.items():  # to 1e-5 of each gradient's scale (fp32 sums in another order)
        gap = (our_grads[name] - want).abs().max() / want.abs().max().clamp(min=1.0)
        assert gap < 1e-5, (name, gap.item())


def test_block_mask_of_two_packed_sequences_equals_each_alone():
    """A (B, 1, T, T) mask of two sequences in one row with their own positions: each gives the
    hidden states it has alone (the packing and shared-prompt layouts rely on this)."""
    model = tiny("qwen2")
    torch.manual_seed(2)
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 4))
    ids = torch.cat([a, b], 1)
    seq = torch.tensor([0] * 5 + [1] * 4)
    block = (seq[:, None] == seq[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        packed = fused.backbone(model, ids, block[None, None], positions)
        alone = [fused.backbone(model, x, torch.ones_like(x), position_ids_from_mask(torch.ones_like(x))) for x in (a, b)]
    torch.testing.assert_close(packed[0], torch.cat([alone[0][0], alone[1][0]]), atol=1e-5, rtol=1e-5)


def test_rope_backward_is_the_transpose_of_its_forward():
    """<rope(x), g> = <x, rope^T(g)>: the written-out backward against autograd's gradcheck, and
    the forward against its definition ``x cos + rot(x) sin``, ``rot([x1, x2]) = [-x2, x1]``; also
    with tables whose halves differ (the transpose's table is not the forward's negated)."""
    torch.manual_seed(3)
    q = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 4, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(2, 3, 1, 2, dtype=torch.float64)
    for cos, sin in ((torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)),
                     (torch.randn(2, 3, 1, 4, dtype=torch.float64), torch.randn(2, 3, 1, 4, dtype=torch.float64))):
        tables = fused.rotation_tables(sin)
        assert torch.autograd.gradcheck(lambda q, k: fused._Rope.apply(q, k, cos, tables, 0), (q, k))
        rot = torch.cat([-q[..., 2:], q[..., :2]], -1)
        torch.testing.assert_close(fused.rope(q, k, cos, tables)[0], q * cos + rot * sin)
        window = q[:, 1:].detach().requires_grad_()  # the queries of columns 1.. against every key
        assert torch.autograd.gradcheck(lambda q, k: fused._Rope.apply(q, k, cos, tables, 1), (window, k))
        torch.testing.assert_close(fused.rope(window, k, cos, tables, 1)[0], (q * cos + rot * sin)[:, 1:])
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fused._RMSNorm.apply(x, w, 1e-5), (x, w))
    a, b = (torch.randn(4, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(fused._SwiGLU.apply, (a, b))


def test_refuses_what_it_does_not_compute(monkeypatch):
    from rlhfkit.models.lean import LeanDecoder

    model = tiny("qwen2")
    model.config.sliding_window, model.config.use_sliding_window = 4096, False  # as Qwen2.5's configs ship
    assert fused.applies(model) and LeanDecoder.applies(model)
    model = tiny("llama")
    model.gradient_checkpointing_enable()
    assert not fused.applies(model)  # activation checkpointing: the model's forward does it
    model = tiny("mistral")
    model.config.sliding_window = 4
    assert not fused.applies(model) and not LeanDecoder.applies(model)
    model = tiny("qwen2")
    model.config._attn_implementation = "eager"
    assert not fused.applies(model)
    model = tiny("llama")
    monkeypatch.setenv("RLHFKIT_LEAN_FORWARD", "0")
    assert not fused.applies(model)


def test_lora_on_a_later_layer_only_keeps_the_models_own_forward():
    """``lora.target_modules`` may adapt some layers only: the node reads plain weights, so an
    adapter in any layer (not only the first) sends the model to its own forward."""
    from rlhfkit.models.forward import token_logprobs
    from rlhfkit.models.lora import LoraSettings, apply_lora

    model = apply_lora(tiny("llama"), LoraSettings(r=4, alpha=8, dropout=0.0,
                                                   target_modules="layers.1.self_attn.q_proj,layers.1.mlp.down_proj"),
                       base=None)
    with torch.no_grad():  # a trained adapter: B away from its zero start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert not fused.applies(model)
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    ours = token_logprobs(model, ids, mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    theirs = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(ours[:, 1:], theirs, atol=1e-5)
    ours.sum().backward()  # the adapters get gradients (the node would have left none: an error)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_a_sliding_window_model_reads_no_block_masks():
    """A block mask replaces the model's own (which holds the window): shared-prompt and packed
    layouts are refused where a layer attends within a sliding window, and GRPO's shared-prompt
    log-probs then equal each row's own forward."""
    from rlhfkit.models.forward import reads_block_masks
    from rlhfkit.rollout.sampler import completion_logprobs, sample

    model = tiny("mistral")
    assert reads_block_masks(model)
    model.config.sliding_window = 4
    assert not reads_block_masks(model)
    with torch.no_grad():  # sharp attention, so that the window changes the numbers
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    samples = sample(model.eval(), [[5, 17, 3, 44, 9, 12, 33, 21], [8, 20, 30, 40, 50, 60, 70]], eos_id=1, pad_id=0,
                     max_new_tokens=6, num_samples=3, stop_at_eos=False, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        shared, alone = completion_logprobs(model, samples, group_size=3), completion_logprobs(model, samples)
        logits = model(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits[:, :-1]
    own = logits.log_softmax(-1).gather(-1, samples.input_ids[:, 1:, None]).squeeze(-1)[:, samples.prompt_ids.shape[1] - 1:]
    assert torch.allclose(shared, own, atol=1e-5) and torch.allclose(alone, own, atol=1e-5)


def _grads_both_ways(model, ids, mask, positions, monkeypatch, first=0):
    """(hidden, gradients) with the decoder layers as one node and as one node per operation."""
    results = []
    for node in ("1", "0"):
        monkeypatch.setenv("RLHFKIT_LAYERS_NODE", node)
        model.zero_grad(set_to_none=True)
        hidden = fused.backbone(model, ids, mask, positions, first)
        assert hidden.shape[1] == ids.shape[1] - first
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


ATTENTION = {"products": fused.FEW_KEYS, "flash": 0}  # the node's attention: its own products, or SDPA's kernel


@pytest.mark.parametrize("attention", sorted(ATTENTION))
@pytest.mark.parametrize("first", [0, 3])
@pytest.mark.parametrize("layout", ["block", "causal"])
@pytest.mark.parametrize("fast", [False, True], ids=["F.linear", "oneDNN"])
def test_layers_as_one_node_match_the_per_operation_graph(fast, layout, first, attention, monkeypatch):
    """The whole-layers node (``_Layers``, written-out backward) against the graph autograd records
    op by op, on a shared-prompt block mask whose first query sees no key; grouped-query attention,
    biases, and the products as FastLinear runs them (18 rows: the node pads them to 24 once); also
    unpadded rows (SDPA's causal path), and hidden states asked for from column 3 only (the node's
    last layer then computes queries, MLP and output for those columns alone); the node's attention
    as its own products (short rows) and as SDPA's flash kernel (long rows)."""
    from rlhfkit.models import kernels

    monkeypatch.setattr(fused, "FEW_KEYS", ATTENTION[attention])
    model = tiny("qwen2")
    if fast:
        if not kernels.onednn_linear_available():
            pytest.skip("no oneDNN in this PyTorch build")
        kernels.use_fast_linear(model)
    seq = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 2])  # a pad, a prompt of 3, answers of 2 and 3 that read it
    sees = (seq[None, :] == seq[:, None]) | ((seq[None, :] == 0) & (seq[:, None] > 0))
    block = (sees & (seq[None, :] >= 0) & torch.ones(9, 9, dtype=torch.bool).tril())[None, None].repeat(2, 1, 1, 1)
    positions = torch.tensor([[0, 0, 1, 2, 3, 4, 3, 4, 5]]).repeat(2, 1)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    assert kernels.bucket(18) > 18  # with oneDNN the node carries padding rows
    if layout == "causal":
        block, positions = torch.ones_like(ids), position_ids_from_mask(torch.ones_like(ids))
    (ours, our_grads), (theirs, their_grads) = _grads_both_ways(model, ids, block, positions, monkeypatch, first)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == their_grads.keys()
    for name, want in their_grads.items():
        gap = (our_grads[name] - want).abs().max() / want.abs().max().clamp(min=1.0)
        assert gap < 1e-5, (name, gap.item())
    with torch.no_grad():  # a scoring forward runs the same layers without keeping anything
        monkeypatch.setenv("RLHFKIT_LAYERS_NODE", "1")
        scored = fused.backbone(model, ids, block, positions, first)
    torch.testing.assert_close(scored, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [5, 12, 16, 21])
def test_attention_products_with_the_softmax_widened_or_not_equal_the_closed_form(keys):
    """The node's attention as products (``_attention``, ``_attention_backward``) against the
    closed form in float64 through autograd, with the softmax widened to 16 columns of which the
    extra are -inf (SOFTMAX_MIN_KEYS, on rows of fewer keys) and not widened (0): the same output
    and gradients, the weights of the extra columns exactly 0. A padded key, causal rows, and a
    query that sees no key (zeros out, zero gradients)."""
    torch.manual_seed(11)
    b, heads, d = 2, 3, 8
    q, k, v = (torch.randn(b, heads, keys, d) for _ in range(3))
    allowed = torch.ones(keys, keys, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    allowed[1, :, :, 0] = False  # a padded key; row 0 of batch 1 then sees no key at all
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    g = torch.randn(b, heads, keys, d)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    scores = (0.3 * q64 @ k64.transpose(-1, -2)).masked_fill(~allowed, -1e30)  # exp: exactly 0
    p64 = scores.softmax(-1) * allowed.any(-1, keepdim=True)  # the keyless query's row: 0
    want = p64 @ v64
    want.backward(g.double())
    results = []
    for softmax_keys in (fused.SOFTMAX_MIN_KEYS, 0):
        out, p = fused._attention(q, k, v, mask, False, 0.3, fused.FEW_KEYS, softmax_keys)
        assert p.shape[-1] == max(keys, softmax_keys)
        assert torch.equal(p[..., keys:], torch.zeros_like(p[..., keys:]))
        grads = fused._attention_backward(g, q, k, v, None, p, mask, False, 0.3)
        torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5)
        for grad, x in zip(grads, (q64, k64, v64)):
            torch.testing.assert_close(grad, x.grad.float(), atol=1e-5, rtol=1e-5)
        assert torch.equal(out[1, :, 0], torch.zeros(heads, d))
        results.append((out, *grads))
    for widened, narrow in zip(*results):
        torch.testing.assert_close(widened, narrow, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attention", sorted(ATTENTION))
def test_layers_node_backward_passes_gradcheck(attention, monkeypatch):
    """``_Layers``' written-out backward against finite differences in float64: two layers,
    grouped-query attention, biases, a padding mask; attention by products and by SDPA's kernel."""
    monkeypatch.setattr(fused, "FEW_KEYS", ATTENTION[attention])
    torch.manual_seed(5)
    b, t, heads, kv, d, hidden, inner = 2, 4, 4, 2, 4, 16, 12
    shapes = [(hidden,), (hidden,), (heads * d, hidden), (heads * d,), (kv * d, hidden), (kv * d,),
              (kv * d, hidden), (kv * d,), (hidden, heads * d), (hidden,), (inner, hidden), (inner,),
              (inner, hidden), (inner,), (hidden, inner), (hidden,)]
    params = [(0.3 * torch.randn(*s, dtype=torch.float64)).requires_grad_() for _ in range(2) for s in shapes]
    x = torch.randn(b * t, hidden, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(b, t, 1, d // 2, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keep = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    allowed[1, 0, 0, 0] = True  # no query without a key: finite differences need finite outputs
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill_(~allowed, float("-inf"))
    for first in (0, 2):  # every query, and the last layer's from column 2 on
        shape = (b, t, heads, kv, d, d ** -0.5, (1e-5,) * 4, False, first)
        assert torch.autograd.gradcheck(lambda x, *p: fused._Layers.apply(x, cos, sin, mask, shape, *p), (x, *params))


@pytest.mark.parametrize("forward_keys, backward_keys", [(fused.FEW_KEYS, 0), (0, fused.FEW_KEYS)])
def test_node_backward_follows_its_forwards_attention(forward_keys, backward_keys, monkeypatch):
    """The backward takes the attention's path from what its forward kept (P or the log-sum-exp),
    not from ``FEW_KEYS`` at backward time: switching it between the two (as inprocess.py's A/B
    does between steps) leaves the gradients those of the per-operation graph."""
    model = tiny("qwen2")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    positions = position_ids_from_mask(mask)
    monkeypatch.setenv("RLHFKIT_LAYERS_NODE", "0")
    want = fused.backbone(model, ids, mask, positions)
    (want * torch.linspace(-1, 1, want.shape[-1])).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    monkeypatch.setenv("RLHFKIT_LAYERS_NODE", "1")
    monkeypatch.setattr(fused, "FEW_KEYS", forward_keys)
    hidden = fused.backbone(model, ids, mask, positions)
    monkeypatch.setattr(fused, "FEW_KEYS", backward_keys)
    (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
    for name, grad in expected.items():
        gap = (model.get_parameter(name).grad - grad).abs().max() / grad.abs().max().clamp(min=1.0)
        assert gap < 1e-5, (name, gap.item())


@pytest.mark.parametrize("first", [0, 3])
@pytest.mark.parametrize("attention", sorted(ATTENTION))
def test_node_keeps_no_tensor_its_backward_can_recompute(attention, first, monkeypatch):
    """Per layer the node keeps x_hat of both norms, the attention's input to Wo, gate and up,
    q, k, v and P (or the flash kernel's output and log-sum-exp), and nothing one elementwise
    operation makes from those: not the norms' outputs w x_hat, not silu(gate) up, and not the
    attention's output where its products' backward does not read it. Frozen weights (the
    backward then recomputes less) leave the other gradients those of the per-operation graph."""
    from collections import Counter

    monkeypatch.setattr(fused, "FEW_KEYS", ATTENTION[attention])
    monkeypatch.setenv("RLHFKIT_LAYERS_NODE", "1")
    model = tiny("qwen2")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = position_ids_from_mask(mask)
    node = fused.backbone(model, ids, mask, positions, first).grad_fn
    while type(node).__name__ != "_LayersBackward":
        node = next(f for f, _ in node.next_functions if f is not None)
    shapes = Counter(tuple(a.shape) for a in node.activations if a is not None)
    layers, rows, hidden, inner = 2, 18, 32, 48  # hidden = heads x head_dim in this model
    if not first:  # (from column 3 the last layer's rows are fewer)
        assert shapes[(rows, inner)] == 2 * layers  # gate and up
        assert shapes[(rows, hidden)] == 3 * layers  # x_hat1, x_hat2, a
        assert shapes[(2, 4, 9, 8)] == (3 if attention == "products" else 4) * layers  # q, k, v (and the output)
    for name, p in model.named_parameters():  # the down, gate and q/k/v weights frozen in one layer
        if name.startswith("model.layers.1.") and name.endswith(("down_proj.weight", "gate_proj.weight", "q_proj.weight",
                                                                  "k_proj.weight", "v_proj.weight")):
            p.requires_grad_(False)
    (ours, our_grads), (theirs, their_grads) = _grads_both_ways(model, ids, mask, positions, monkeypatch, first)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == their_grads.keys() and "model.layers.1.mlp.up_proj.weight" in our_grads
    for name, want in their_grads.items():
        gap = (our_grads[name] - want).abs().max() / want.abs().max().clamp(min=1.0)
        assert gap < 1e-5, (name, gap.item())


def test_node_lets_activations_go_in_its_backward_and_computes_them_again_for_a_second(monkeypatch):
    """The node keeps its activations on ctx and lets each layer's go during the backward; a second
    backward through a retained graph computes them again and gives the same gradients bit for bit."""
    monkeypatch.setenv("RLHFKIT_LAYERS_NODE", "1")
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    hidden = fused.backbone(model, ids, mask, position_ids_from_mask(mask))
    node = hidden.grad_fn
    while type(node).__name__ != "_LayersBackward":
        node = next(f for f, _ in node.next_functions if f is not None)
    assert sum(a is not None for a in node.activations) > 0
    loss = (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum()
    loss.backward(retain_graph=True)
    assert node.activations is None
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss.backward()
    assert len(once) == len(list(model.model.parameters()))  # the backbone's, every one
    for name, grad in once.items():
        assert torch.equal(model.get_parameter(name).grad, 2 * grad), name


@pytest.mark.parametrize("fast", [False, True], ids=["F.linear", "oneDNN"])
def test_node_in_torchscript_gives_the_numbers_python_gives(fast, monkeypatch):
    """The node's forward runs compiled by TorchScript (not the fallback) and gives the hidden
    states, and so the gradients, of the same function run in Python (``RLHFKIT_SCRIPTED_LAYERS=0``)
    bit for bit: a padded batch, hidden states from column 3 (the last layer's window),
    grouped-query attention, some weights frozen, both attention paths. The backward's parts
    compile too (they run in Python: see fused.py)."""
    from rlhfkit.models import kernels
    from rlhfkit.models.script import LAYERS, scripted

    assert isinstance(scripted(fused._layers_forward, LAYERS).script, torch.jit.ScriptFunction)
    for function in (fused._mlp_backward, fused._attention_core_backward, fused._projections_backward,
                     fused._input_norm_backward):
        assert isinstance(scripted(function, LAYERS).script, torch.jit.ScriptFunction), function.__name__
    model = tiny("qwen2")
    if fast:
        if not kernels.onednn_linear_available():
            pytest.skip("no oneDNN in this PyTorch build")
        kernels.use_fast_linear(model)
    model.model.layers[1].mlp.gate_proj.weight.requires_grad_(False)
    model.model.layers[0].self_attn.k_proj.weight.requires_grad_(False)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = position_ids_from_mask(mask)
    monkeypatch.setenv("RLHFKIT_LAYERS_NODE", "1")
    for keys in ATTENTION.values():
        monkeypatch.setattr(fused, "FEW_KEYS", keys)
        results = []
        for script in ("1", "0"):
            monkeypatch.setenv(LAYERS, script)
            model.zero_grad(set_to_none=True)
            hidden = fused.backbone(model, ids, mask, positions, 3)
            (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
            results.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (scripted_hidden, scripted_grads), (python_hidden, python_grads) = results
        assert torch.equal(scripted_hidden, python_hidden)
        assert scripted_grads.keys() == python_grads.keys() and "model.layers.1.mlp.up_proj.weight" in python_grads
        assert "model.layers.1.mlp.gate_proj.weight" not in python_grads
        for name, grad in python_grads.items():
            assert torch.equal(scripted_grads[name], grad), name


def test_alibi_models_read_no_block_masks():
    """Falcon with ALiBi builds its position biases from a 2D padding mask: given a 4D block mask it
    crashed (GRPO's and DPO's shared prompts, SFT's packing), so they take their per-row paths."""
    import transformers

    from rlhfkit.models.forward import reads_block_masks

    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, attn_implementation="sdpa")
    plain = transformers.FalconForCausalLM(transformers.FalconConfig(**kw))
    alibi = transformers.FalconForCausalLM(transformers.FalconConfig(alibi=True, **kw))
    assert reads_block_masks(plain) and not reads_block_masks(alibi)
