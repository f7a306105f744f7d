"""A faster fp32 linear layer for CPUs, where this host's oneDNN kernels beat its default BLAS.

On some 2-thread CPU machines rlhfkit is measured on, ``F.linear`` in fp32 reaches about 200
GFLOP/s on a transformer's shapes while oneDNN's kernels (shipped inside every PyTorch CPU
wheel, reached through ``torch.ops.mkldnn._linear_pointwise``) reach 350-450: same fp32
arithmetic (no reduced-precision math mode), only a better kernel. On others (AMX-capable
Xeons among them) MKL's own ``sgemm`` behind ``F.linear`` is as fast in the forward and up to
twice as fast in the weight gradient. So the kernel is chosen per host, by timing both on a
transformer-like product once per process (``onednn_linear_chosen``; about 50 ms). The sampler's
decode steps (models/lean.py) choose apart (``decode_onednn_chosen``): their products are skinny (a
few dozen rows), where the kernels rank differently than on a training step's hundreds of rows.
``FastLinear`` runs the forward and both backward products through oneDNN:

    y = x W^T + b,   dL/dx = g W,   dL/dW = g^T x,   dL/db = sum_rows g

It is used only where it applies (fp32 tensors on the CPU, autocast off); anything else goes
through ``F.linear`` unchanged. ``use_fast_linear(model)`` switches a model's ``nn.Linear``
layers to it in place where oneDNN was chosen (the class changes, the parameters and the saved
folder do not). ``RLHFKIT_FAST_LINEAR``: ``auto`` (the default) times the two, ``1`` uses
oneDNN wherever it exists, ``0`` never. The rows are padded to a few sizes (``bucket``), so
that oneDNN builds few kernels.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

KERNEL_CACHE_CAPACITY = 256


def bound_kernel_caches() -> None:
    """Keep at most ``KERNEL_CACHE_CAPACITY`` kernels in each of oneDNN's two caches (unless the
    environment already sets ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` or ``LRU_CACHE_CAPACITY``).

    oneDNN keeps every kernel it builds for a product's shape, in its primitive cache and in
    ideep's cache of their descriptions (PyTorch's layer over oneDNN), 1024 of each by default,
    and the two entries of one shape hold about 570 KB of the heap (measured on a Zen 5 EPYC,
    the same from (M, 64) x (64, 256) to (M, 2048) x (2048, 2048)). A run whose rows change
    with every step (RL's, above ``BUCKET_MAX_ROWS``) meets new shapes all along, so its memory
    grew by up to about 580 MB (the demo's multi-step GRPO met 395 shapes in 200 steps and ended
    with 375 MB of heap in use, 265 MB at 256 entries); at 256 entries the most is about 145 MB. A step needs far fewer:
    the benchmarks' runs met 37 (SFT) to 104 (PPO) shapes in all. Both are read once, when
    oneDNN first builds a kernel in the process, so this runs before rlhfkit's first product."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(KERNEL_CACHE_CAPACITY))


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """The oneDNN op exists in this PyTorch build and agrees with ``F.linear`` on a small case."""
    if os.environ.get("RLHFKIT_FAST_LINEAR", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    bound_kernel_caches()
    try:
        x, w, b = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
        out = _onednn(x, w, b)
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.allclose(out, F.linear(x, w, b), atol=1e-5))


@functools.lru_cache(maxsize=None)
def mkl_packing_available() -> bool:
    """MKL's packed fp32 product (``torch.ops.mkl._mkl_linear`` on a weight packed by
    ``_mkl_reorder_linear_weight``) exists in this PyTorch build and agrees with ``F.linear`` on a
    small case (the sampler's decoder uses it where BLAS runs the products: models/lean.py)."""
    if not torch.backends.mkl.is_available():
        return False
    gen = torch.Generator().manual_seed(0)  # the global random state is left as it was
    try:
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((4, 8), (3, 8), (3,)))
        out = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 4), w, b, 4)
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.allclose(out, F.linear(x, w, b), atol=1e-5))


ONEDNN_MARGIN = 0.9  # oneDNN is chosen when its products take at most this share of BLAS's time
DECODE_ONEDNN_MARGIN = 1.0  # the sampler's decoder: whichever is faster (see decode_kernel)


@functools.lru_cache(maxsize=None)
def linear_kernel() -> tuple[str, float, float]:
    """("onednn" or "blas", oneDNN's seconds, BLAS's seconds) for this process: see ``onednn_linear_chosen``."""
    # the timer looked up when called (tests replace it)
    return _choose(lambda: time_products(), ONEDNN_MARGIN, _PINNED.get("linear"))


# Choices fixed for this process instead of timed (``pin_kernels``): "linear", "decode", "layout_min_new_tokens"
_PINNED: dict = {}


def pin_kernels(choices: dict) -> None:
    """Make this process take ``choices`` (``kernel_choices``'s form) instead of timing them under
    ``RLHFKIT_FAST_LINEAR=auto``: a resumed run takes the choices of the run it resumes (timing
    can choose the other kernel where the two are near its margin, and the two kernels' results
    differ in float rounding), and ranks take rank 0's. A forced switch still wins; oneDNN where it
    does not exist is still BLAS."""
    _PINNED.clear()
    _PINNED.update(choices)
    linear_kernel.cache_clear()
    decode_kernel.cache_clear()
    layout_min_new_tokens.cache_clear()


def kernel_choices() -> dict:
    """This process's choices, as ``pin_kernels`` takes them (and a checkpoint keeps them)."""
    out = {"linear": linear_kernel()[0], "decode": decode_kernel()[0]}
    if out["decode"] == "onednn":
        out["layout_min_new_tokens"] = layout_min_new_tokens()
    return out


class KernelSettingError(ValueError):
    """A ``RLHFKIT_FAST_LINEAR`` value that is none of the switch's (the CLI prints it in one line)."""


def _choose(timed, margin: float, pinned: str | None = None) -> tuple[str, float, float]:
    """The switch's kernel, or (``auto``) ``pinned``, else oneDNN where ``timed()`` finds it within
    ``margin`` of BLAS's time."""
    mode = os.environ.get("RLHFKIT_FAST_LINEAR", "auto")
    if mode not in ("auto", "0", "1"):
        raise KernelSettingError(f"RLHFKIT_FAST_LINEAR={mode!r}: use auto, 1 (oneDNN wherever it exists) or 0 (never)")
    if not onednn_linear_available():
        return "blas", float("nan"), float("nan")
    if mode == "auto" and pinned in ("onednn", "blas"):
        return pinned, float("nan"), float("nan")
    onednn_s, blas_s = timed() if mode == "auto" else (float("nan"), float("nan"))
    return ("onednn" if mode == "1" or prefer_onednn(onednn_s, blas_s, margin) else "blas"), onednn_s, blas_s


@functools.lru_cache(maxsize=None)
def decode_kernel() -> tuple[str, float, float]:
    """The sampler's kernel for this process, ("onednn" or "blas", oneDNN's seconds, BLAS's seconds):
    chosen as ``linear_kernel`` is (the same switch), by ``time_decode_products``, whichever is
    faster (``DECODE_ONEDNN_MARGIN``: the decode rows, 32 here, are their own bucket, so no padding
    copies; under the training margin the choice flipped between processes where oneDNN was
    0.73-0.84 of BLAS's time, and ``run.py generate`` with it between 0.053-0.061 and 0.072 s).

    Measured 2026-12-05 on an AVX-512 host (AMD EPYC, 2 threads), 32 rows through the reference
    model's shapes: oneDNN 211-378 us against BLAS's 227-490 (MKL's packed product no faster there
    than ``F.linear``), while a training step's 256-row products were a tie (oneDNN 3-12% faster,
    BLAS chosen). Whole 32 x 16 sampling calls there, one process, the two paths alternating (60
    pairs): 1.44x as fast through oneDNN with the weights unchanged (53.1 against 76.4 ms), 1.32x
    with the weights changed before each call as in RL (64.9 against 85.7). On the AMX Xeon of
    sessions 15-20, BLAS was the faster at these rows (``F.linear`` took 0.33-0.99 of oneDNN's time
    at 8-128 rows, MKL's packed product 1.3-1.6x less than ``F.linear`` at 32: models/lean.py), so
    the timing should keep BLAS there (not timed there since this choice was split off)."""
    return _choose(lambda: time_decode_products(), DECODE_ONEDNN_MARGIN, _PINNED.get("decode"))


NEVER = 2**31 - 1  # a layout threshold no call reaches


@functools.lru_cache(maxsize=None)
def layout_min_new_tokens() -> int:
    """The fewest new tokens for which a sampling call whose decoder runs on oneDNN lays its
    weights out in oneDNN's blocked format (models/lean.py, ``_packer``): the layout's cost over what
    it saves a decode step (``time_layout``), rounded up; ``NEVER`` where it saves nothing.

    A property of the host, as the kernel is. Measured 2026-12-05/06 on an AMD EPYC (Zen 4, 2
    threads): this timing gave 5-13 tokens in the processes of one sitting, and whole 32-row
    sampling calls on the reference model (weights changed before each, 40 alternating pairs)
    broke even between 4 and 8 new tokens (laid out 0.91x as fast at 4, 1.03x at 8, 1.11x at 16,
    1.18x at 32). On the earliest host whole calls broke even near 24 tokens; the threshold was
    fixed at 32 before, so RL's 16-token calls never laid their weights out."""
    if "layout_min_new_tokens" in _PINNED:
        return int(_PINNED["layout_min_new_tokens"])
    layout_s, saved_s = time_layout()
    return NEVER if not saved_s > 0 else max(1, math.ceil(layout_s / saved_s))


def time_layout(rows: int = 32, width: int = 512, inter: int = 1024, reps: int = 21) -> tuple[float, float]:
    """(seconds to lay out a decode step's two weights of ``time_decode_products`` for ``rows`` rows,
    seconds the layout saves that step's two oneDNN products), each the median of ``reps`` calls.
    The inputs come from a generator of their own (the global random state is left as it was)."""
    x, w, h, v = _decode_operands(rows, width, inter)

    def lay_out(m: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(m, rows)

    laid_w, laid_v = lay_out(w), lay_out(v)
    laid_s, plain_s = _time_pairs([(lambda: _onednn(x, laid_w, None), lambda: _onednn(x, w, None)),
                                   (lambda: _onednn(h, laid_v, None), lambda: _onednn(h, v, None))], reps)
    times = []
    for _ in range(reps + 2):  # two warm-up calls
        start = time.perf_counter()
        lay_out(w), lay_out(v)
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[reps // 2], plain_s - laid_s


def decode_onednn_chosen() -> bool:
    """Whether the sampler's decoder runs its products through oneDNN in this process."""
    return decode_kernel()[0] == "onednn"


def onednn_linear_chosen() -> bool:
    """Whether rlhfkit's linear layers use oneDNN's products in this process: where it exists and
    (``RLHFKIT_FAST_LINEAR=auto``) its products ran faster than the default BLAS's on this host."""
    return linear_kernel()[0] == "onednn"


def prefer_onednn(onednn_s: float, blas_s: float, margin: float = ONEDNN_MARGIN) -> bool:
    """oneDNN only when clearly faster: its row padding (``bucket``) costs copies BLAS does not make."""
    return onednn_s < margin * blas_s


def time_products(rows: int = 256, width: int = 512, inter: int = 1024, reps: int = 7) -> tuple[float, float]:
    """Seconds of one forward, one input-gradient and one weight-gradient product of a (rows, width)
    input through a (inter, width) weight, summed: (oneDNN's, the default BLAS's), each the median
    of ``reps`` calls, the two kernels alternating. The inputs come from a generator of their own
    (the global random state is left as it was)."""
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(*shape, generator=gen) for shape in ((rows, width), (inter, width), (rows, inter)))
    return _time_pairs([(lambda: _onednn(x, w, None), lambda: F.linear(x, w)),
                        (lambda: _onednn(g, w.t(), None), lambda: torch.mm(g, w)),
                        (lambda: _onednn(g.t(), x.t(), None), lambda: torch.mm(g.t(), x))], reps)


def time_decode_products(rows: int = 32, width: int = 512, inter: int = 1024, reps: int = 21) -> tuple[float, float]:
    """Seconds of a decode step's two kinds of product, (rows, width) through an (inter, width)
    weight and (rows, inter) through an (width, inter) one, summed: (oneDNN's on the weights as
    they lie, as an RL loop's sampler runs them; BLAS's as the sampler runs them: MKL's packed
    product where it exists, else ``F.linear``), each the median of ``reps`` calls, alternating.
    The inputs come from a generator of their own (the global random state is left as it was)."""
    x, w, h, v = _decode_operands(rows, width, inter)
    if mkl_packing_available():
        packs = [torch.ops.mkl._mkl_reorder_linear_weight(m, rows) for m in (w, v)]
        blas = [lambda: torch.ops.mkl._mkl_linear(x, packs[0], w, None, rows),
                lambda: torch.ops.mkl._mkl_linear(h, packs[1], v, None, rows)]
    else:
        blas = [lambda: F.linear(x, w), lambda: F.linear(h, v)]
    return _time_pairs([(lambda: _onednn(x, w, None), blas[0]), (lambda: _onednn(h, v, None), blas[1])], reps)


def _decode_operands(rows: int, width: int, inter: int) -> tuple[torch.Tensor, ...]:
    """A decode step's two products' operands: (rows, width) through (inter, width), and (rows, inter)
    through (width, inter); from a generator of their own (the global random state is left alone)."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=gen)
                 for shape in ((rows, width), (inter, width), (rows, inter), (width, inter)))


def _time_pairs(kinds, reps: int) -> tuple[float, float]:
    """For pairs of calls (oneDNN's, BLAS's): the sums over pairs of each one's median time."""
    totals = [0.0, 0.0]
    for pair in kinds:
        times: list[list[float]] = [[], []]
        for rep in range(reps + 2):  # two warm-up calls each (oneDNN builds its kernel on the first)
            for k, fn in enumerate(pair):
                start = time.perf_counter()
                fn()
                if rep >= 2:
                    times[k].append(time.perf_counter() - start)
        for k in range(2):
            totals[k] += sorted(times[k])[reps // 2]
    return totals[0], totals[1]


def _onednn(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    scalars: List[Optional[Union[int, float, complex]]] = []  # typed for TorchScript (lean.py runs this)
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", scalars, "")


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0  # oneDNN builds no primitive for zero rows: a micro-batch with nothing unmasked
            and not torch.is_autocast_enabled("cpu") and onednn_linear_available())


BUCKET_MAX_ROWS = 2048


def bucket(rows: int) -> int:
    """``rows`` rounded up to one of 8 sizes per power of two (at most 1/8 more).

    oneDNN builds a kernel for each new shape it meets (0.3-4 ms on the 2-core machine, against
    0.3 ms for the product itself), and RLHF batches change their number of rows every step: a
    run that met every row count once would pay that again and again, and steps with a new shape
    took up to twice as long. Padding the rows with zeros to a bucket bounds the shapes a run
    meets; zero rows change no other row's result and add nothing to a weight gradient.
    Above ``BUCKET_MAX_ROWS`` rows a product takes long enough that a new kernel costs little
    beside it, while the padding copy would cost more (measured on the 30M model, 16 x 261 rows:
    padding took 15% of an SFT step). ``RLHFKIT_BUCKET_ROWS=0`` turns it off.
    """
    return bucket_within(rows, row_limit())


def row_limit() -> int:
    """The most rows ``bucket`` pads: ``BUCKET_MAX_ROWS``, or 0 where bucketing is off."""
    return BUCKET_MAX_ROWS if _bucketing() else 0


def bucket_within(rows: int, limit: int) -> int:
    """``bucket`` with its limit given (``row_limit()``), for TorchScript callers (which read no
    module constants): ``rows`` if above ``limit``, else rounded up to a multiple of
    ``max(8, 2^(bit_length(rows) - 4))``."""
    if rows > limit:
        return rows
    top = 1  # 2^bit_length(rows)
    while top <= rows:
        top *= 2
    step = max(8, top // 16)
    return -(-rows // step) * step


@functools.lru_cache(maxsize=None)
def _bucketing() -> bool:
    return os.environ.get("RLHFKIT_BUCKET_ROWS", "1") != "0"


def pad_rows(t2d: torch.Tensor, rows: int) -> torch.Tensor:
    """``t2d`` with zero rows appended up to ``rows`` (only the new rows are zero-filled)."""
    m = t2d.size(0)
    if m == rows:
        return t2d
    out = t2d.new_empty([rows, t2d.size(1)])
    out[:m] = t2d
    out[m:].zero_()
    return out


def padded_product(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    """``x2d @ weight^T + bias`` (M, N) through oneDNN, on the rows padded with zeros to ``rows``.
    TorchScript runs it too (the sampler's decoder, lean.py)."""
    return _onednn(pad_rows(x2d, rows), weight, bias)[: x2d.size(0)]


def product(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ weight^T + bias`` (M, N) with the rows padded to their bucket for oneDNN."""
    return padded_product(x2d, weight, bias, bucket(x2d.shape[0]))


def _onednn_nd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``product`` for inputs of any rank: (..., in) -> (..., out)."""
    return product(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def input_grad(g2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dL/dx = g W`` (M, in) for the gradient ``g2d`` (M, out) of ``x W^T``, through oneDNN."""
    return product(g2d, weight.t(), None)


def weight_grad(g2d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """``dL/dW = g^T x`` (out, in) for ``g2d`` (M, out) and the layer's input ``x2d`` (M, in), through oneDNN."""
    return padded_weight_grad(g2d, x2d, bucket(x2d.shape[0]))  # the rows are the summed dimension: padded alike


def padded_weight_grad(g2d: torch.Tensor, x2d: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight_grad`` on the rows padded with zeros to ``rows`` (TorchScript runs it too: fused.py)."""
    g_rows, x_rows = pad_rows(g2d, rows), pad_rows(x2d, rows)
    # oneDNN copies its first operand to a contiguous one: with many rows, transposing the
    # narrower of g and x (and the result back) pays; with few, the copy back costs more
    # (measured on the reference model: 5-8% of an SFT step at 208 rows, 4-7% the other way at 1280)
    if g2d.size(1) >= 2 * x2d.size(1) and x2d.size(0) > 2 * x2d.size(1):
        return _onednn(x_rows.t(), g_rows.t(), None).t().contiguous()  # ((in, out) = x^T g)^T
    return _onednn(g_rows.t(), x_rows.t(), None)  # (out, in) = g^T x


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]), weight)
        ctx.has_bias = bias is not None
        return _onednn_nd(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x2d, weight = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(g2d, weight).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(g2d, x2d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with oneDNN's kernels where they apply."""
    if not _applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_nd(x, weight, bias)


class FastLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_fast_linear(model: torch.nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to ``FastLinear`` in place where oneDNN is
    this process's kernel (``onednn_linear_chosen``); returns how many."""
    if not onednn_linear_chosen():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = FastLinear
            count += 1
    return count
