import sys

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.models.kernels import FastLinear, linear, onednn_linear_available, use_fast_linear

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN in this PyTorch build")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
# no rows: a micro-batch whose completions are all masked out (a rank's dropped DAPO groups)
@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16), (2, 3, 4, 16), (5, 8, 16), (0, 16), (2, 0, 16)])
@pytest.mark.parametrize("out_features", [24, 40])  # 40 rows > 2 x 16 and 40 >= 2 x 16: the transposed weight-gradient path
def test_fast_linear_matches_f_linear_forward_and_all_gradients(shape, bias, out_features):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(out_features, 16, requires_grad=True)
    b = torch.randn(out_features, requires_grad=True) if bias else None
    grad_out = torch.randn(*shape[:-1], out_features)
    ours = linear(x, w, b)
    (ours * grad_out).sum().backward()
    got = [x.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if bias else [])
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    theirs = F.linear(x, w, b)
    (theirs * grad_out).sum().backward()
    want = [x.grad, w.grad] + ([b.grad] if bias else [])
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, atol=1e-4, rtol=1e-5)
    # dL/dW = g^T x and dL/db = sum g, written out
    torch.testing.assert_close(got[1], grad_out.reshape(-1, out_features).T @ x.detach().reshape(-1, 16), atol=1e-4,
                               rtol=1e-5)


@needs_onednn
def test_non_contiguous_input_and_frozen_weight():
    torch.manual_seed(1)
    x = torch.randn(16, 6, requires_grad=True)
    w = torch.randn(5, 6)  # frozen: no weight gradient asked for
    ours = linear(x.t().t()[:, :6], w)
    ours.sum().backward()
    torch.testing.assert_close(ours, F.linear(x, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, torch.ones(16, 5) @ w, atol=1e-5, rtol=1e-5)
    x_t = torch.randn(6, 16).t()  # non-contiguous rows
    torch.testing.assert_close(linear(x_t, w), F.linear(x_t, w), atol=1e-5, rtol=1e-5)


def test_other_dtypes_and_autocast_go_through_f_linear():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w), F.linear(x, w))
    xf, wf = torch.randn(4, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(xf, wf).dtype == torch.bfloat16  # autocast still applies


@needs_onednn
def test_use_fast_linear_switches_layers_in_place_and_keeps_outputs():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(10, 8)
    before = net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert use_fast_linear(net) == 2
    assert isinstance(net[0], FastLinear) and isinstance(net[0], torch.nn.Linear)
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_row_buckets_add_at_most_an_eighth_and_are_few():
    from rlhfkit.models.kernels import BUCKET_MAX_ROWS, bucket

    sizes = {bucket(m) for m in range(1, BUCKET_MAX_ROWS + 1)}
    for m in range(1, BUCKET_MAX_ROWS + 1):
        assert m <= bucket(m) <= m + max(7, m // 8) and bucket(bucket(m)) == bucket(m)
    assert len(sizes) <= 8 * 11 + 8  # 8 per power of two (and the multiples of 8 below 128)
    assert bucket(BUCKET_MAX_ROWS + 3) == BUCKET_MAX_ROWS + 3  # large products: as they are


def test_bucket_in_torchscript_is_the_same_and_off_leaves_rows_as_they_are(monkeypatch):
    """``bucket_within``, which the TorchScript node calls with the limit as an argument, compiles
    and gives ``bucket``'s sizes; with bucketing off (limit 0) every count stays as it is."""
    import torch

    from rlhfkit.models import kernels
    from rlhfkit.models.script import LAYERS, scripted

    compiled = scripted(kernels.bucket_within, LAYERS)
    assert isinstance(compiled.script, torch.jit.ScriptFunction)
    for m in range(0, kernels.BUCKET_MAX_ROWS + 40):
        assert compiled(m, kernels.row_limit()) == kernels.bucket(m)
        assert compiled(m, 0) == m or m == 0
    monkeypatch.setattr(kernels, "_bucketing", lambda: False)
    assert kernels.row_limit() == 0 and kernels.bucket(1) == 1 and kernels.bucket(130) == 130


@needs_onednn
def test_padded_rows_change_no_result_and_no_gradient():
    """201 rows go through oneDNN as 208: the same outputs and gradients as F.linear."""
    torch.manual_seed(4)
    x = torch.randn(201, 24, requires_grad=True)
    w = torch.randn(56, 24, requires_grad=True)
    b = torch.randn(56, requires_grad=True)
    g = torch.randn(201, 56)
    ours = linear(x, w, b)
    grads = torch.autograd.grad((ours * g).sum(), (x, w, b))
    theirs = F.linear(x, w, b)
    want = torch.autograd.grad((theirs * g).sum(), (x, w, b))
    assert ours.shape == (201, 56)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-5)


def test_onednn_is_preferred_only_when_clearly_faster():
    from rlhfkit.models.kernels import ONEDNN_MARGIN, prefer_onednn

    assert prefer_onednn(0.5, 1.0) and prefer_onednn(0.89, 1.0)
    assert not prefer_onednn(0.95, 1.0) and not prefer_onednn(1.3, 1.0) and not prefer_onednn(ONEDNN_MARGIN, 1.0)


@needs_onednn
@pytest.mark.parametrize("timings,kernel", [((1.0, 2.0), "onednn"), ((2.0, 1.0), "blas"), ((0.97, 1.0), "blas")])
def test_auto_follows_this_hosts_timing_and_blas_leaves_layers_plain(fresh_choice, monkeypatch, timings, kernel):
    kernels = fresh_choice
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "auto")
    monkeypatch.setattr(kernels, "time_products", lambda: timings)
    assert kernels.linear_kernel() == (kernel, *timings)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    assert kernels.use_fast_linear(net) == (2 if kernel == "onednn" else 0)
    assert isinstance(net[0], FastLinear) == (kernel == "onednn")


BOTH_CHOICES = pytest.mark.parametrize("choice,timer,chosen", [
    ("linear_kernel", "time_products", "onednn_linear_chosen"),  # the training layers'
    ("decode_kernel", "time_decode_products", "decode_onednn_chosen"),  # the sampler's decoder's
])


@needs_onednn
@BOTH_CHOICES
def test_the_switch_forces_either_kernel_without_timing(fresh_choice, monkeypatch, choice, timer, chosen):
    kernels = fresh_choice
    monkeypatch.setattr(kernels, timer, lambda: pytest.fail("timed although the switch decides"))
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "1")
    assert getattr(kernels, chosen)()
    getattr(kernels, choice).cache_clear()
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "0")
    kernels.onednn_linear_available.cache_clear()
    assert not getattr(kernels, chosen)() and not kernels.onednn_linear_available()
    getattr(kernels, choice).cache_clear()
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "yes")
    with pytest.raises(ValueError, match="RLHFKIT_FAST_LINEAR='yes'"):
        getattr(kernels, choice)()


@needs_onednn
@BOTH_CHOICES
def test_timing_the_kernels_leaves_the_random_state_alone(choice, timer, chosen):
    from rlhfkit.models import kernels

    state = torch.get_rng_state()
    onednn_s, blas_s = getattr(kernels, timer)(rows=16, width=32, inter=64, reps=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert 0 < onednn_s < 1 and 0 < blas_s < 1


@needs_onednn
@pytest.mark.parametrize("timings,kernel", [((1.0, 2.0), "onednn"), ((2.0, 1.0), "blas"), ((0.97, 1.0), "onednn"),
                                             ((1.0, 1.0), "blas")])
def test_the_samplers_kernel_follows_its_own_timing(fresh_choice, monkeypatch, timings, kernel):
    """The decoder's choice is timed on decode-shaped products, apart from the training layers', and
    takes oneDNN wherever it is faster (no margin: the training layers' would keep BLAS at 0.97)."""
    from rlhfkit.models import lean

    kernels = fresh_choice
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "auto")
    monkeypatch.setattr(kernels, "time_products", lambda: (2.0, 1.0))  # training: BLAS
    monkeypatch.setattr(kernels, "time_decode_products", lambda: timings)
    assert kernels.decode_kernel() == (kernel, *timings)
    assert not kernels.onednn_linear_chosen()
    assert lean._onednn_applies(torch.float32) == (kernel == "onednn")
    assert not lean._onednn_applies(torch.bfloat16)
    assert (lean._mkl_packer(32, torch.float32) is None) == (kernel == "onednn" or not kernels.mkl_packing_available())


@needs_onednn
@pytest.mark.parametrize("timings,tokens", [((6e-4, 8e-5), 8), ((6e-4, 7.9e-5), 8), ((6.4e-4, 8e-5), 8),
                                           ((6.5e-4, 8e-5), 9), ((1e-6, 1e-3), 1), ((6e-4, 0.0), None),
                                           ((6e-4, -1e-5), None)])
def test_the_layout_threshold_is_its_cost_over_what_it_saves_a_decode_step(fresh_choice, monkeypatch, timings,
                                                                           tokens):
    kernels = fresh_choice
    monkeypatch.setattr(kernels, "time_layout", lambda: timings)
    assert kernels.layout_min_new_tokens() == (kernels.NEVER if tokens is None else tokens)


@needs_onednn
def test_timing_the_layout_leaves_the_random_state_alone_and_measures_both():
    from rlhfkit.models import kernels

    state = torch.get_rng_state()
    layout_s, saved_s = kernels.time_layout(rows=16, width=32, inter=64, reps=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert 0 < layout_s < 1 and abs(saved_s) < 1


@needs_onednn
@pytest.mark.parametrize("new_tokens", [7, 8, 9])
def test_a_sampling_call_lays_its_weights_out_from_the_timed_threshold(fresh_choice, monkeypatch, new_tokens):
    """Weights changed before each call (as in RL): laid out where the call decodes at least the
    timed threshold's tokens (8 here), else read as they lie; the first call too."""
    from test_lean import sharp

    from rlhfkit.models import lean
    from rlhfkit.rollout import sampler

    kernels = fresh_choice
    monkeypatch.setattr(kernels, "time_layout", lambda: (6e-4, 8e-5))
    asked = []
    packer = lean._packer
    monkeypatch.setattr(lean, "_packer", lambda rows, dtype, layout: asked.append(layout) or packer(rows, dtype, layout))
    model = sharp("qwen2")
    for _ in range(2):
        with torch.no_grad():
            model.lm_head.weight.add_(0.0)  # a new version: not the previous call's weights
        sampler.sample(model, [[5, 17, 3]], eos_id=-1, pad_id=0, max_new_tokens=new_tokens, temperature=1.0)
    assert asked == [new_tokens >= 8] * 2


_SHAPES = """
import ctypes, json, os
import torch
from rlhfkit.models.kernels import _onednn, onednn_linear_available
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def in_use_mb():
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20
assert onednn_linear_available()
x, w = torch.randn(640, 64), torch.randn(64, 64)
before = in_use_mb()
for rows in range(1, 641):  # 640 shapes, each a kernel of its own
    _onednn(x[:rows], w, None)
print(json.dumps({"grew_mb": in_use_mb() - before, "caps": [os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                                                            os.environ.get("LRU_CACHE_CAPACITY")]}))
"""


@needs_onednn
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_onednn_keeps_a_bounded_number_of_kernels_unless_the_environment_says_otherwise():
    # oneDNN keeps every shape's kernel (about 570 KB of heap a shape on a Zen 5 EPYC); a run
    # whose rows change every step met new shapes all along. rlhfkit caps both of its caches at
    # 256 before its first product; a user's own setting wins.
    import json
    import os
    import subprocess

    caps = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")

    def run(**env):  # this process set both when it checked for oneDNN: the child starts without them
        env = {**{k: v for k, v in os.environ.items() if k not in caps}, **env}
        out = subprocess.run([sys.executable, "-c", _SHAPES], capture_output=True, text=True, timeout=120, check=True,
                             env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    capped, default = run(), run(**dict.fromkeys(caps, "1024"))
    assert capped["caps"] == ["256", "256"] and default["caps"] == ["1024", "1024"]
    # 640 shapes: all of them kept against 256 of them (2.5x); the rest of what grows is the same in both
    # (Zen 5 EPYC: 106 MB against 321). Where oneDNN's kernels for these shapes are small (another
    # implementation on another processor) the caps matter little, and growth within noise says nothing
    if default["grew_mb"] > 32:
        assert capped["grew_mb"] < 0.6 * default["grew_mb"], (capped, default)
