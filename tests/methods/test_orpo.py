"""CPO, SimPO and ORPO: DPO's loop with no reference model (methods/cpo.py, methods/orpo.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_train

from rlhfkit.data.prefs import encode_rankings
from rlhfkit.data.rows import read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.methods.cpo import CPOConfig, run_cpo
from rlhfkit.methods.dpo import DPOConfig
from rlhfkit.methods.orpo import ORPOConfig, run_orpo
from rlhfkit.train.config import ConfigError, replace
from rlhfkit.train.logging import read_metrics


def answer_logps(model, examples):
    """(chosen, rejected) x (sums, token counts) of each pair, from transformers' own forward of
    prompt + answer, one row at a time."""
    sums, counts = [[], []], [[], []]
    with torch.no_grad():
        for e in examples:
            for k in range(2):
                ids = torch.tensor([list(e.prompt_ids) + list(e.completion_ids[k])])
                logits = model(input_ids=ids).logits[0, len(e.prompt_ids) - 1: -1]
                picked = F.log_softmax(logits.float(), -1).gather(-1, ids[0, len(e.prompt_ids):, None])
                sums[k].append(picked.sum().item())
                counts[k].append(len(e.completion_ids[k]))
    return [torch.tensor(s, dtype=torch.float64) for s in sums], [torch.tensor(c, dtype=torch.float64) for c in counts]


def log_odds(a):
    return a - torch.log(-torch.expm1(a))


@pytest.mark.parametrize("method", ["orpo", "cpo", "simpo", "alphapo"])
def test_first_loss_is_the_papers_by_hand_with_no_reference(tiny, tmp_path, method, monkeypatch):
    """The first logged loss of `rlhfkit orpo` / `cpo` (and cpo with loss_type=simpo), on one batch
    of 16 pairs, against the paper's equation on transformers' forwards; no reference is loaded."""
    import rlhfkit.methods.dpo as dpo

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference model was loaded")

    monkeypatch.setattr(dpo, "frozen_reference", no_reference)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((tiny["data"] / "prefs_train.jsonl").read_text().splitlines(keepends=True)[:16]))
    model, tok = load_policy(str(tiny["base"]), None)
    examples, _ = encode_rankings(read_rows(data), tok, 64)
    (sw, sl), (nw, nl) = answer_logps(model, examples)
    nll = -sw.sum() / nw.sum()  # the chosen answers' NLL per token over the batch
    train = quiet_train(tmp_path / method, max_steps=1, batch_size=16, lr=1e-6)
    if method == "orpo":
        cfg, run = ORPOConfig(model=str(tiny["base"]), train_data=str(data), max_length=64, train=train), run_orpo
        beta = 0.1
        expected = nll + (-beta * F.logsigmoid(log_odds(sw / nw) - log_odds(sl / nl))).mean()
        rewards = beta * sw / nw, beta * sl / nl  # per token, as TRL's ORPOTrainer logs them
    elif method == "cpo":
        cfg, run = CPOConfig(model=str(tiny["base"]), train_data=str(data), max_length=64, beta=0.5, train=train), run_cpo
        expected = (-F.logsigmoid(0.5 * (sw - sl))).mean() + nll
        rewards = 0.5 * sw, 0.5 * sl
    elif method == "alphapo":  # AlphaPO: SimPO on (1 - e^(-alpha a)) / alpha of the mean log-probs a, alpha 0.25
        cfg = CPOConfig(model=str(tiny["base"]), train_data=str(data), max_length=64, beta=2.0, loss_type="simpo",
                        simpo_gamma=0.3, alphapo_alpha=0.25, rpo_alpha=0.0, train=train)
        run = run_cpo
        shape = lambda a: -torch.expm1(-0.25 * a) / 0.25  # noqa: E731
        m = 2.0 * (shape(sw / nw) - shape(sl / nl)) - 0.3
        expected = (-F.logsigmoid(m)).mean()
        rewards = 2.0 * shape(sw / nw), 2.0 * shape(sl / nl)
    else:  # SimPO: no NLL, gamma 0.3, label smoothing 0.1
        cfg = CPOConfig(model=str(tiny["base"]), train_data=str(data), max_length=64, beta=2.0, loss_type="simpo",
                        simpo_gamma=0.3, label_smoothing=0.1, rpo_alpha=0.0, train=train)
        run = run_cpo
        m = 2.0 * (sw / nw - sl / nl) - 0.3
        expected = (-0.9 * F.logsigmoid(m) - 0.1 * F.logsigmoid(-m)).mean()
        rewards = 2.0 * sw / nw, 2.0 * sl / nl
    summary = run(cfg)
    first = read_metrics(tmp_path / method)[0]
    assert abs(first["train/loss"] - expected.item()) < 1e-5, (first["train/loss"], expected.item())
    assert abs(first["train/rewards_chosen"] - rewards[0].mean().item()) < 1e-5
    assert abs(first["train/rewards_rejected"] - rewards[1].mean().item()) < 1e-5
    assert summary["reference"] == "none"
    if method in ("orpo", "cpo"):
        assert abs(first["train/nll_chosen"] - nll.item()) < 1e-5
    if method == "orpo":  # TRL's ORPO metrics
        gap = log_odds(sw / nw) - log_odds(sl / nl)
        assert abs(first["train/log_odds_chosen"] - gap.mean().item()) < 1e-5
        assert abs(first["train/log_odds_ratio"] - F.logsigmoid(gap).mean().item()) < 1e-5
    else:
        assert "train/log_odds_chosen" not in first


def test_reference_free_settings_refused_by_name():
    with pytest.raises(ConfigError, match="loss_type=orpo reads the answers' own probabilities .* set reference=none"):
        DPOConfig(loss_type="orpo")
    with pytest.raises(ConfigError, match="f_divergence_type reads the ratio to a reference, and reference=none"):
        ORPOConfig(f_divergence_type="forward_kl")
    with pytest.raises(ConfigError, match="sync_ref_model=true moves the reference during training, and "
                                          "reference=none has none to move .*: leave it out"):
        CPOConfig(sync_ref_model=True)
    with pytest.raises(ConfigError, match="simpo_gamma=1.0 is used by loss_type=simpo only"):
        CPOConfig(simpo_gamma=1.0)
    with pytest.raises(ConfigError, match="alphapo is TRL's; AlphaPO is `rlhfkit cpo loss_type=simpo "
                                          "alphapo_alpha=A rpo_alpha=0` here"):
        CPOConfig(loss_type="alphapo")
    with pytest.raises(ConfigError, match=r"alphapo_alpha shapes the reward .* with a reference set reference=none"):
        DPOConfig(alphapo_alpha=0.25)
    with pytest.raises(ConfigError, match="alphapo_alpha shapes .* loss_type=orpo reads their odds instead"):
        ORPOConfig(alphapo_alpha=0.25)
    with pytest.raises(ConfigError, match="must be a number"):
        CPOConfig(alphapo_alpha=float("nan"), loss_type="simpo")
    with pytest.raises(ConfigError, match="alphapo_alpha shapes each answer's mean log-prob .* loss_type=sigmoid reads "
                                          "whole answers' sums"):
        CPOConfig(alphapo_alpha=0.25)  # CPO's sigmoid
    from rlhfkit.methods.dpo import pairwise_only  # its per-token forms are for pairs: rankings are refused

    assert pairwise_only(CPOConfig(loss_type="sigmoid_norm", alphapo_alpha=0.25)) == "loss_type=sigmoid_norm"
    for anchored in ("sppo_hard", "apo_zero", "apo_down", "nca_pair"):  # they pull log pi toward a fixed value
        with pytest.raises(ConfigError, match=f"loss_type={anchored} pulls each answer's log-ratio toward a fixed "
                                              "value, and with reference=none"):
            CPOConfig(loss_type=anchored)
    assert CPOConfig(loss_type="sigmoid:0.5,hinge:0.5").reference == "none"  # forms on the margin mix
    with pytest.raises(ConfigError, match="ld_alpha weighs DPO's sums; loss_type=orpo reads each answer's mean"):
        ORPOConfig(ld_alpha=0.5)
    cfg = replace(CPOConfig(), loss_type="simpo", rpo_alpha=0.0, simpo_gamma=1.0)
    assert (cfg.reference, cfg.simpo_gamma, cfg.train.out_dir) == ("none", 1.0, "runs/cpo")
    orpo = ORPOConfig()
    assert (orpo.reference, orpo.loss_type, orpo.beta, orpo.rpo_alpha) == ("none", "orpo", 0.1, 1.0)


@pytest.mark.slow
def test_orpo_raises_exact_match_and_preference_accuracy(tiny, sft_run, tmp_path):
    """ORPO from the SFT snapshot (its SFT term and its odds-ratio term at once): greedy exact match
    rises (measured 0.60 -> 0.77 in 150 steps) and so does the held-out preference accuracy by mean
    log-prob (0.97 -> 0.99)."""
    data = tiny["data"]
    cfg = ORPOConfig(model=str(sft_run["out"] / "snapshot"), train_data=str(data / "prefs_train.jsonl"),
                     eval_data=str(data / "prefs_eval.jsonl"), eval_prompts=str(data / "prompts_eval.jsonl"),
                     max_length=64, eval_limit=300,
                     train=quiet_train(tmp_path / "orpo", max_steps=150, batch_size=32, lr=3e-4, warmup_steps=10,
                                       eval_every=50, log_every=10))
    summary = run_orpo(cfg)
    assert summary["accuracy"] >= summary["accuracy_before"] + 0.1
    assert summary["preference_accuracy"] > summary["preference_accuracy_before"]
    assert all(math.isfinite(m["train/loss"]) for m in read_metrics(tmp_path / "orpo") if "train/loss" in m)
