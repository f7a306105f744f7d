"""Online DPO (methods/online_dpo.py): pairs the policy samples, judged by rewards, DPO's loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_train

from rlhfkit.methods.common import load_policy
from rlhfkit.methods.online_dpo import (
    OnlineDPOConfig,
    answer_scores,
    judged_pairs,
    pair_scores,
    run_online_dpo,
)
from rlhfkit.rollout.backend import SamplerBackend
from rlhfkit.rollout.rewards import score_outcomes
from rlhfkit.rollout.sampler import given_samples
from rlhfkit.train.config import ConfigError, replace
from rlhfkit.train.logging import read_metrics


def by_length(completions, **kwargs):
    """A judge with few ties: the longer answer is the better one."""
    return [float(len(c)) for c in completions]


by_length.__name__ = "by_length"


class Recording(SamplerBackend):
    """rlhfkit's own sampler, keeping what each call returned (for the by-hand checks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def generate(self, prompts, params):
        out = super().generate(prompts, params)
        self.calls.append((prompts, out))
        return out


def _cfg(tiny, out, steps=1, **kw):
    base = dict(model=str(tiny["base"]), train_data=str(tiny["data"] / "prompts_train.jsonl"), prompts_per_step=8,
                max_new_tokens=6, temperature=1.0, beta=0.5,
                train=quiet_train(out, max_steps=steps, lr=1e-2, schedule="constant"))
    base.update(kw)
    return OnlineDPOConfig(**base)


def test_judged_pairs_put_the_better_answer_first_and_skip_or_keep_ties():
    samples = given_samples([[5, 6], [5, 6], [7], [7]], [[1, 99], [2, 3, 99], [4, 99], [8, 9, 99]], pad_id=0, eos_id=99)
    scores = torch.tensor([0.0, 1.0, 2.0, 2.0])  # prompt 0: the second answer wins; prompt 1: a tie
    pairs, tied = judged_pairs(samples, [[5, 6], [7]], scores, "skip")
    assert tied == [False, True] and len(pairs) == 1
    assert pairs[0].prompt_ids == [5, 6] and pairs[0].completion_ids == [[2, 3, 99], [1, 99]]
    pairs, tied = judged_pairs(samples, [[5, 6], [7]], scores, "first")  # TRL's: a tie's first answer is chosen
    assert len(pairs) == 2 and pairs[1].completion_ids == [[4, 99], [8, 9, 99]] and pairs[1].ranks == [0, 1]
    # every reward abstained on an answer (NaN): its pair is not judged, whatever ties says
    pairs, tied = judged_pairs(samples, [[5, 6], [7]], torch.tensor([0.0, 1.0, float("nan"), 2.0]), "first")
    assert tied == [False, True] and [p.prompt_ids for p in pairs] == [[5, 6]]


def test_scores_by_hand_two_rewards_abstentions_errors_and_the_eos_penalty():
    """Three pairs, two rewards (weights 1 and 2): pair 0 scored by both; in pair 1 the second reward
    abstains on one answer only (sums over different rewards: not judged); in pair 2 the first reward
    gives one answer no number (zeroed under reward_errors=zero: not judged). The missing-EOS penalty
    comes off the answers that did not end."""
    def first(completions, **_):
        return [1.0, 0.0, 3.0, 1.0, "oops", 2.0]

    def second(completions, **_):
        return [0.5, 1.0, None, 1.0, 0.0, 0.0]

    outcome = score_outcomes([first, second], [1.0, 2.0], ["p"] * 6, ["c"] * 6, {}, on_error="zero")
    finished = torch.tensor([True, False, True, True, True, True])
    scores = answer_scores(outcome, finished, 0.25)
    assert scores.tolist() == [2.0, 2.0 - 0.25, 3.0, 3.0, 0.0, 2.0]  # 1 + 2 x 0.5; 0 + 2 x 1 - 0.25; ...
    judging = pair_scores(scores, outcome)
    assert judging[:2].tolist() == [2.0, 1.75] and judging[2:].isnan().all()
    assert outcome.errors == {"first": 1}


def _sequence_logps(model, prompt, answer) -> float:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    return F.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).sum().item()


def test_a_step_is_dpo_on_the_pairs_it_sampled_better_first(tiny, tmp_path):
    """The first step by hand: the policy is its reference, so the loss is ln 2 over the untied pairs
    the sampler drew (judged by length here); after the step each chosen answer gained log-prob on
    its rejected one (transformers' forwards before and after), and the logged statistics are those
    of the recorded samples."""
    model, tok = load_policy(str(tiny["base"]), None)
    backend = Recording(tok, model)
    cfg = _cfg(tiny, tmp_path / "odpo")
    run_online_dpo(cfg, reward_fns=[by_length], backend=backend)
    (prompts, samples), = backend.calls
    texts = [tok.decode(row[mask.bool()], skip_special_tokens=True)
             for row, mask in zip(samples.completion_ids, samples.completion_mask)]
    scores = torch.tensor([float(len(t)) for t in texts])
    answers = [row[mask.bool()].tolist() for row, mask in zip(samples.completion_ids, samples.completion_mask)]
    tied = [bool(scores[2 * p] == scores[2 * p + 1]) for p in range(8)]
    pairs = [(prompts[p], *sorted((answers[2 * p], answers[2 * p + 1]), key=lambda a: -len(tok.decode(
        a, skip_special_tokens=True)))) for p in range(8) if not tied[p]]  # (prompt, longer, shorter)
    assert 0 < len(pairs) < 8  # some untied pairs, some tied
    first = read_metrics(tmp_path / "odpo")[0]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train/tied_pairs"] == pytest.approx(sum(tied) / 8)
    assert first["train/reward_mean"] == pytest.approx(float(scores.mean()))
    assert first["train/score_gap"] == pytest.approx(float((scores[0::2] - scores[1::2]).abs().mean()))
    trained, _ = load_policy(str(tmp_path / "odpo" / "model"), None)
    start, _ = load_policy(str(tiny["base"]), None)
    for prompt, chosen, rejected in pairs:
        gained = [_sequence_logps(trained, prompt, a) - _sequence_logps(start, prompt, a) for a in (chosen, rejected)]
        assert gained[0] > gained[1], (prompt, chosen, rejected)


def test_every_pair_tied_takes_no_step(tiny, tmp_path, capsys):
    """A judge that scores every answer alike: no preference anywhere, no optimizer step, the weights unchanged."""
    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    run_online_dpo(_cfg(tiny, tmp_path / "tied", steps=2), reward_fns=[constant])
    logged = read_metrics(tmp_path / "tied")
    assert [m["train/update_skipped"] for m in logged] == [1.0, 1.0] and logged[-1]["train/tied_pairs"] == 1.0
    assert logged[-1]["train/optimizer_steps"] == 0
    trained, _ = load_policy(str(tmp_path / "tied" / "model"), None)
    start, _ = load_policy(str(tiny["base"]), None)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))

    def abstains(completions, **kwargs):  # None: no opinion on any answer, so no pair is judged, even with ties=first
        return [None] * len(completions)

    run_online_dpo(_cfg(tiny, tmp_path / "abstained", ties="first"), reward_fns=[abstains])
    logged = read_metrics(tmp_path / "abstained")[-1]
    assert logged["train/update_skipped"] == 1.0 and logged["train/tied_pairs"] == 1.0
    said = capsys.readouterr().err
    assert said.count("every pair of every rank tied or was not judged") == 2  # said once in each run
    assert "warning: no step of this run changed the weights" in said

    def every_third(completions, **kwargs):  # abstains on every third answer: those pairs are not judged
        return [None if i % 3 == 0 else float(len(c)) for i, c in enumerate(completions)]

    run_online_dpo(_cfg(tiny, tmp_path / "some"), reward_fns=[every_third])
    logged = read_metrics(tmp_path / "some")[-1]  # reward_mean is every scored answer's, as its reward's own mean
    assert logged["train/reward_mean"] == pytest.approx(logged["train/reward/every_third_mean"])


def test_a_reward_that_fails_under_reward_errors_zero_is_said_once_and_judges_nothing(tiny, tmp_path, capsys):
    """A reward that raises on every call, beside one that would judge: under reward_errors=zero
    the exception's text is said once a run, every call's errors are counted, and no pair is judged
    on the remaining reward alone (with ties=first a constant 0 would otherwise prefer the first)."""
    def broken(completions, **kwargs):
        raise ValueError("the grader's service is down")

    run_online_dpo(_cfg(tiny, tmp_path / "broken", steps=2, ties="first", reward_errors="zero"),
                   reward_fns=[broken, by_length])
    logged = read_metrics(tmp_path / "broken")
    assert [m["train/reward/broken_errors"] for m in logged] == [16.0, 16.0]
    assert [m["train/update_skipped"] for m in logged] == [1.0, 1.0]
    said = capsys.readouterr().err
    assert said.count("the grader's service is down") == 1
    assert ("reward function 'broken' failed on the batch starting with prompt" in said
            and "ValueError: the grader's service is down (" in said
            and "in broken): scored 0 (reward_errors=zero); later errors of 'broken' are counted in "
                "reward/broken_errors, not said" in said)
    assert "warning: reward_errors=zero scored 0 where rewards failed: 'broken' on 32 answers over the run" in said


def test_resume_gives_the_straight_runs_steps(tiny, tmp_path):
    straight = _cfg(tiny, tmp_path / "straight", steps=4, ties="first",
                    train=quiet_train(tmp_path / "straight", max_steps=4, lr=1e-3, save_every=2,
                                        schedule="constant"))
    run_online_dpo(straight, reward_fns=[by_length])
    cut = replace(straight, train__out_dir=str(tmp_path / "cut"), train__max_steps=2)
    run_online_dpo(cut, reward_fns=[by_length])
    run_online_dpo(replace(cut, train__max_steps=4, train__resume=True), reward_fns=[by_length])
    losses = lambda d: [m["train/loss"] for m in read_metrics(tmp_path / d) if "train/loss" in m]  # noqa: E731
    assert losses("cut") == losses("straight") and len(losses("straight")) == 4


def test_settings_refused_by_name(tiny):
    with pytest.raises(ConfigError, match="loss_type=orpo: online DPO takes DPO's forms"):
        OnlineDPOConfig(loss_type="orpo")
    with pytest.raises(ConfigError, match="'temperature' must be > 0"):
        OnlineDPOConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="'ties' must be one of skip, first"):
        OnlineDPOConfig(ties="random")
    for form, setting in (("robust", "label_smoothing"), ("simpo", "simpo_gamma"), ("exo_pair", "label_smoothing")):
        with pytest.raises(ConfigError, match=f"loss_type={form}: .*{form} needs {setting}"):
            OnlineDPOConfig(loss_type=form)
    with pytest.raises(ConfigError, match=r"reward_fns=\[\] passes no reward"):
        run_online_dpo(_cfg(tiny, "unused"), reward_fns=[])
    with pytest.raises(ConfigError, match="config key 'rewards' names no reward"):
        OnlineDPOConfig(rewards="")
    with pytest.raises(ConfigError, match="online_dpo: train.batch_size does not apply"):
        run_online_dpo(replace(_cfg(tiny, "unused"), train__batch_size=8))
    cfg = OnlineDPOConfig()
    assert (cfg.beta, cfg.loss_type, cfg.temperature, cfg.ties) == (0.1, "sigmoid", 0.9, "skip")


@pytest.mark.slow
def test_online_dpo_raises_exact_match(tiny, sft_run, tmp_path):
    """From the SFT snapshot, judged by exact_answer: held-out exact match rises (measured 0.60 ->
    0.74 in 30 steps of 64 prompts)."""
    data = tiny["data"]
    cfg = OnlineDPOConfig(model=str(sft_run["out"] / "snapshot"), train_data=str(data / "prompts_train.jsonl"),
                          eval_data=str(data / "prompts_eval.jsonl"), eval_limit=300, eval_max_new_tokens=8,
                          max_new_tokens=8, prompts_per_step=64,
                          train=quiet_train(tmp_path / "odpo", max_steps=30, lr=5e-5, eval_every=10, log_every=5))
    summary = run_online_dpo(cfg)
    assert summary["accuracy"] >= summary["accuracy_before"] + 0.08, summary
    logged = [m for m in read_metrics(tmp_path / "odpo") if "train/tied_pairs" in m]
    assert all(0 < m["train/tied_pairs"] < 1 for m in logged)
