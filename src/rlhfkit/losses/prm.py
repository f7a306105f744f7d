"""Process reward model loss: binary cross-entropy on every labelled step (Lightman et al. 2023,
"Let's Verify Step by Step"; Uesato et al. 2022).

For steps j with labels y_j in {0, 1} (1: the step is right) and step logits s_j (the head read
at the last token of the separator after step j):

    L = - 1/N * sum_j [ y_j log sigma(s_j) + (1 - y_j) log(1 - sigma(s_j)) ]

averaged over all N labelled steps of the batch (``num_steps``: the global count over
micro-batches and ranks), so a long solution weighs by its steps, as a token mean does in SFT.

A two-class head (num_labels = 2, TRL's PRMTrainer) gives the same loss: softmax cross-entropy
over (l_0, l_1) equals the BCE above with s = l_1 - l_0 (``step_logit``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def step_logit(head_logits: torch.Tensor) -> torch.Tensor:
    """(..., L) head outputs -> (...) logit of "the step is right": the scalar for L = 1, l_1 - l_0 for L = 2."""
    if head_logits.shape[-1] == 1:
        return head_logits[..., 0]
    if head_logits.shape[-1] == 2:
        return head_logits[..., 1] - head_logits[..., 0]
    raise ValueError(f"a process reward head has 1 or 2 outputs, got {head_logits.shape[-1]}")


def step_bce_loss(step_logits: torch.Tensor, labels: torch.Tensor, num_steps: float | None = None):
    """step_logits, labels: (N,) over the labelled steps of a (micro-)batch.

    Returns (loss, sums): ``sums`` holds detached totals (``correct``: steps whose sign
    s_j > 0 matches the label) for the caller to divide by global counts.
    """
    per_step = F.binary_cross_entropy_with_logits(step_logits.float(), labels.float(), reduction="none")  # (N,)
    denom = step_logits.shape[0] if num_steps is None else num_steps
    loss = per_step.sum() / max(float(denom), 1.0)
    sums = {"correct": ((step_logits.detach() > 0) == labels.bool()).sum().float()}
    return loss, sums
