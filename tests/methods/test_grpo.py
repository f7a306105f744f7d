import pytest
import torch
from helpers import quiet_train

from rlhfkit.methods.grpo import GRPOConfig, run_grpo
from rlhfkit.rollout.rewards import RewardError
from rlhfkit.train.logging import read_metrics


def _cfg(tiny, model, out, prefix="", steps=300, **kw):
    data = tiny["data"]
    base = dict(model=str(model), train_data=str(data / f"{prefix}prompts_train.jsonl"),
                eval_data=str(data / f"{prefix}prompts_eval.jsonl"), eval_limit=300, group_size=8,
                prompts_per_step=16, beta=0.04, max_new_tokens=16, eval_max_new_tokens=16,
                train=quiet_train(out, max_steps=steps, lr=1e-4, schedule="constant", log_every=10))
    base.update(kw)
    if base["eval_data"] is None:  # no eval: its own keys are refused unless left out
        base.update(eval_limit=GRPOConfig.eval_limit, eval_max_new_tokens=GRPOConfig.eval_max_new_tokens)
    return GRPOConfig(**base)


@pytest.mark.slow
def test_grpo_orm_raises_accuracy(tiny, sft_run, tmp_path):
    from rlhfkit.train.config import replace

    summary = run_grpo(replace(_cfg(tiny, sft_run["out"] / "snapshot", tmp_path / "grpo"), train__log_every=1))
    before, after = summary["accuracy_before"], summary["accuracy"]
    # Stated bar for the suite (300 steps, ~15 s): close >= 20% of the gap to 1.0; the demo runs
    # 600 steps and shows >= 30%.
    assert after >= before + 0.2 * (1 - before), (before, after)
    train_logs = [m for m in read_metrics(tmp_path / "grpo") if "train/reward_mean" in m]
    rewards = [m["train/reward_mean"] for m in train_logs]
    assert sum(rewards[-100:]) / 100 > sum(rewards[:10]) / 10 + 0.05  # the sampled reward rises too
    metrics = train_logs[-1]
    for key in ("train/kl", "train/clip_frac_low", "train/zero_advantage_groups", "train/entropy",
                "train/completion_len_mean", "train/tokens_sampled_per_s", "train/reward/exact_answer_std"):
        assert key in metrics


@pytest.mark.slow
def test_grpo_with_the_ppo_reward_model_raises_accuracy(tiny, sft_run, reward_model, tmp_path):
    """``rewards=rm:PATH``: the reward model PPO uses, as GRPO's outcome reward.

    Stated bar (300 steps, ~70 s): the mean exact match of the evaluations at 200, 250 and 300
    steps closes >= 25% of the gap to 1.0. Learning against the RM plateaus where the RM's own
    errors are (2026-12-03: 0.75 before; every 50 steps 0.79, 0.82, 0.817, 0.833, 0.833, 0.827). The
    bar was +0.08 on the last evaluation alone, set when the SFT start scored 0.547; from 0.75 that
    asked for the plateau itself, and a change of float rounding moved the last point across it."""
    from rlhfkit.train.config import replace

    summary = run_grpo(replace(_cfg(tiny, sft_run["out"] / "snapshot", tmp_path / "grpo_rm", steps=300,
                                    rewards=f"rm:{reward_model}"), train__eval_every=50))
    before = summary["accuracy_before"]
    late = [e["accuracy"] for e in summary["evals"] if e["step"] >= 200]
    assert len(late) == 3 and sum(late) / 3 >= before + 0.25 * (1 - before), summary
    logged = [m for m in read_metrics(tmp_path / "grpo_rm") if "train/reward/rm_mean" in m]
    assert logged[-1]["train/reward/rm_retokenised"] == 0.0


@pytest.mark.slow
def test_grpo_prm_learns_the_multistep_prompts_it_trains_on(tiny, multistep_sft, tmp_path):
    """GRPO with the rule PRM (``process_reward=arithmetic_steps``) on 64 multi-step prompts.

    Stated bar (100 steps, ~25 s): greedy exact match on those prompts closes >= half the gap to
    1.0, and the sampled reward of the last 20 steps beats the first 20 by >= 0.15. Measured
    2026-12-05 on an AVX-512 host: 0.75 -> 0.98 (0.92 after 25 steps); sampled reward 0.49 over the
    first 20 steps, 0.71 over the last 20.

    The test used to ask for +0.03 held-out exact match after 150 steps on 200 held-out prompts.
    That gain is within the noise of those 200 prompts: it held on the AMX host and failed on the
    AVX-512 one (0.555 -> 0.565). There, on 300 held-out prompts from 0.537, nine runs of 150-300
    steps ended between 0.49 and 0.58 at lr 1e-4 and 2e-4 (PRM; ORM; 32 prompts a step; no std scaling;
    beta 0; temperature 0.7) and lower at lr 3e-4 and 1e-3 (0.44, 0.40 with ORM, 0.00).
    From another multi-step SFT model the same GRPO does generalise: the demo on that host took its
    own (0.557 on 300 held-out prompts) to 0.687 in 200 steps with the rule PRM and to 0.677 with
    the learned one. Whether it does from a given start is a matter of the start, not something
    this suite can assert at this size (the demo's figures are in the README)."""
    from rlhfkit.train.config import replace

    rows = (tiny["data"] / "multistep_prompts_train.jsonl").read_text().splitlines()[:64]
    (tmp_path / "train64.jsonl").write_text("\n".join(rows) + "\n")
    cfg = _cfg(tiny, multistep_sft, tmp_path / "prm", prefix="multistep_", steps=100,
               process_reward="arithmetic_steps", max_new_tokens=40, eval_max_new_tokens=40, eval_limit=64,
               train_data=str(tmp_path / "train64.jsonl"), eval_data=str(tmp_path / "train64.jsonl"))
    summary = run_grpo(replace(cfg, train__log_every=1))
    before, after = summary["accuracy_before"], summary["accuracy"]
    assert after >= before + 0.5 * (1 - before), summary
    rewards = [m["train/reward_mean"] for m in read_metrics(tmp_path / "prm") if "train/reward_mean" in m]
    assert len(rewards) == 100
    assert sum(rewards[-20:]) / 20 >= sum(rewards[:20]) / 20 + 0.15, rewards


def test_learned_prm_gives_the_process_advantages(tiny, tmp_path):
    """One step with ``process_reward=prm:PATH``: the PRM's step scores feed process_advantages."""
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_process_reward_model
    from rlhfkit.train.config import replace

    tok = load_tokenizer(tiny["base"])
    prm = load_process_reward_model(tiny["base"], tok)
    prm.config.step_separator = "\n"
    prm.save_pretrained(str(tmp_path / "prm"))
    cfg = _cfg(tiny, tiny["base"], tmp_path / "g", prefix="multistep_", steps=1, eval_data=None, group_size=4,
               prompts_per_step=2, max_new_tokens=12, process_reward=f"prm:{tmp_path / 'prm'}")
    summary = run_grpo(replace(cfg, train__log_every=1))
    (logged,) = [m for m in read_metrics(tmp_path / "g") if "train/loss" in m]
    # the untrained policy's samples get distinct PRM scores, so no group's advantages are all zero
    assert summary["steps"] == 1 and logged["train/zero_advantage_groups"] == 0.0


def test_the_process_rewards_steps_are_logged_and_the_outcome_said_to_be_logged_only(tiny, tmp_path, capfd):
    """With a process reward the update learns from the step rewards: they are logged
    (reward/process_mean, each output's mean step, then the batch's mean), and the run says the
    outcome rewards, still scored and logged as reward_mean, drive nothing."""
    from rlhfkit.train.config import replace

    def steps(prompts, completions, completion_ids, **_):  # output k: steps 0.25 and (k % 2); mean 0.375 + ...
        return [[(0, 0.25), (max(len(ids) - 1, 0), float(k % 2))] for k, ids in enumerate(completion_ids)]

    cfg = _cfg(tiny, tiny["base"], tmp_path / "g", prefix="multistep_", steps=1, eval_data=None, group_size=4,
               prompts_per_step=2, max_new_tokens=6)
    run_grpo(replace(cfg, train__log_every=1), process_fn=steps)
    (logged,) = [m for m in read_metrics(tmp_path / "g") if "train/loss" in m]
    assert logged["train/reward/process_mean"] == pytest.approx((0.125 + 0.625) / 2)  # half 0.125, half 0.625
    assert logged["train/zero_advantage_groups"] == 0.0  # the steps' rewards differ in every group
    assert "the process reward's steps drive the advantages" in capfd.readouterr().err


def test_options_mu2_dapo_dynamic_sampling(tiny, tmp_path):
    from methods_setup import digits

    kw = dict(mu=2, loss_type="dapo", eps_high=0.28, dynamic_sampling=True, scale_rewards="none", eval_data=None,
              group_size=4, prompts_per_step=4, max_new_tokens=6)
    from rlhfkit.train.config import replace

    cfg = replace(_cfg(tiny, tiny["base"], tmp_path / "g", steps=2, **kw), train__log_every=1)
    summary = run_grpo(cfg, reward_fns=[digits])
    logged = [m for m in read_metrics(tmp_path / "g") if "train/loss" in m]
    assert summary["optimizer_steps"] == 4 and [m["train/optimizer_steps"] for m in logged] == [2, 4]
    # pi_old is fixed across the mu = 2 updates: the second sees a moved policy, so its ratio is not 1
    # (1.4e-3 to 2.8e-3 from 1 when measured: a pi_old from another kernel path would be 1e-7 off)
    assert abs(logged[-1]["train/ratio_mean"] - 1.0) > 1e-4 and logged[-1]["train/update_skipped"] == 0.0
    # the gap is the sampler's log-probs against the policy that sampled (the first update's forward):
    # the exact sampler's is float noise, where the second update's moved policy was 1e-2 off
    assert all(m["train/logprob_gap"] < 1e-5 for m in logged) and "train/kl" in logged[-1]


def test_dapo_overlong_penalty_is_added_to_the_outcome_reward(tiny, tmp_path):
    """A buffer as long as max_new_tokens: every completion loses |y| / 6 of reward, logged as
    ``reward/overlong_mean`` and summed into ``reward_mean``."""
    from methods_setup import digits

    from rlhfkit.train.config import replace

    cfg = replace(_cfg(tiny, tiny["base"], tmp_path / "g", steps=1, eval_data=None, group_size=4, prompts_per_step=4,
                       max_new_tokens=6, overlong_buffer=6), train__log_every=1)
    run_grpo(cfg, reward_fns=[digits])
    (logged,) = [m for m in read_metrics(tmp_path / "g") if "train/loss" in m]
    assert logged["train/reward/overlong_mean"] == pytest.approx(-logged["train/completion_len_mean"] / 6, abs=1e-6)
    assert logged["train/reward_mean"] == pytest.approx(
        logged["train/reward/digits_mean"] + logged["train/reward/overlong_mean"], abs=1e-6)


def test_a_reward_named_like_the_overlong_penalty_is_refused():
    from rlhfkit.methods.grpo import GRPOConfig, resolve_rewards
    from rlhfkit.train.config import ConfigError

    def overlong(prompts, completions, **_):
        return [0.0] * len(completions)

    resolve_rewards(GRPOConfig(), [overlong])  # without the penalty the name is free
    with pytest.raises(ConfigError, match="a reward named 'overlong'"):
        resolve_rewards(GRPOConfig(overlong_buffer=4), [overlong])


def test_a_failing_reward_stops_the_run_with_its_name(tiny, tmp_path):
    def flaky(prompts, completions, **_):
        return [float("nan")] * len(completions)

    with pytest.raises(RewardError, match="'flaky' returned nan for sample 0"):
        run_grpo(_cfg(tiny, tiny["base"], tmp_path / "f", steps=1, eval_data=None), reward_fns=[flaky])


def test_under_reward_errors_zero_a_failing_reward_is_counted_and_its_first_error_said_once(tiny, tmp_path, capsys):
    def flaky(prompts, completions, **_):  # every other sample gets a NaN
        return [float("nan") if i % 2 else 1.0 for i in range(len(completions))]

    from rlhfkit.train.config import replace

    summary = run_grpo(replace(_cfg(tiny, tiny["base"], tmp_path / "z", steps=2, eval_data=None,
                                    reward_errors="zero"), train__log_every=1), reward_fns=[flaky])
    logged = read_metrics(tmp_path / "z")
    n = 16 * 8  # prompts x group size
    assert [m["train/reward/flaky_errors"] for m in logged] == [n / 2, n / 2]
    assert logged[-1]["train/reward/flaky_mean"] == pytest.approx(0.5)  # the zeroed ones count as 0
    said = capsys.readouterr().err
    assert said.count("reward function 'flaky' returned nan for sample 1 (prompt") == 1
    assert said.count("scored 0 (reward_errors=zero)") == 1
    assert summary["reward_errors"] == {"flaky": n}  # the run's total, also in result.json, and said at the end
    assert f"warning: reward_errors=zero scored 0 where rewards failed: 'flaky' on {n} answers over the run" in said
    # the checkpoints keep the totals: a run of 1 step, then resumed to 2, ends with the same
    cfg = replace(_cfg(tiny, tiny["base"], tmp_path / "r", steps=1, eval_data=None, reward_errors="zero"),
                  train__save_every=1)
    run_grpo(cfg, reward_fns=[flaky])
    again = run_grpo(replace(cfg, train__max_steps=2, train__resume=True), reward_fns=[flaky])
    assert again["reward_errors"] == {"flaky": n}


def test_zero_advantage_groups_counts_groups_not_samples(tiny):
    import torch

    from rlhfkit.methods.grpo import Rollout, step_metrics
    from rlhfkit.rollout.rewards import OutcomeScores
    from rlhfkit.rollout.sampler import Samples

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 0.0])  # groups of 2: one with signal, two without
    adv = torch.tensor([[1.0], [-1.0], [0.0], [0.0], [0.0], [0.0]])
    ones = torch.ones(6, 1, dtype=torch.long)
    samples = Samples(ones, ones, ones, ones, torch.zeros(6, 1), torch.ones(6, dtype=torch.bool))
    metrics = step_metrics(Rollout(samples, OutcomeScores(rewards, {}), adv, 1.0), group_size=2)
    assert metrics["zero_advantage_groups"] == pytest.approx(2 / 3)


def _rounds_of_groups(signals: list[list[bool]], group_size: int = 2):
    """A draw(r) whose round r has one group per entry of signals[r]: a signal gives advantages
    +1/-1, none gives zeros. Each group's prompt token is its number over all rounds; round r's
    completions are r + 1 tokens wide (so joining them pads)."""
    import torch

    from rlhfkit.methods.grpo import Rollout
    from rlhfkit.rollout.rewards import OutcomeScores
    from rlhfkit.rollout.sampler import Samples

    def draw(r: int) -> Rollout:
        first = sum(len(s) for s in signals[:r])
        ids = torch.arange(first, first + len(signals[r])).repeat_interleave(group_size)[:, None]
        width = r + 1
        adv = torch.tensor([[(1.0 if i % 2 == 0 else -1.0) * s] * width for s in signals[r] for i in range(group_size)])
        completion = torch.ones(len(ids), width, dtype=torch.long)
        samples = Samples(ids, torch.ones_like(ids), completion, completion, torch.zeros(len(ids), width),
                          torch.ones(len(ids), dtype=torch.bool))
        return Rollout(samples, OutcomeScores(adv[:, 0].clone(), {}), adv, 1.0)

    return draw


@pytest.mark.parametrize("rounds", [4, 2])
def test_dynamic_sampling_samples_more_prompts_until_the_batch_has_a_signal(rounds):
    """DAPO's Algorithm 1: groups without a signal are dropped and more prompts are sampled until
    prompts_per_step groups have one. With 4 rounds allowed, the third fills the batch; with 2 the
    batch is short by one group, filled with a group without a signal that the loss masks out."""
    from types import SimpleNamespace

    from rlhfkit.methods.grpo import dynamic_batch, informative, keep_informative_groups
    from rlhfkit.train.dist import DistInfo

    signals = [[True, False, True, False], [False, False, True, False], [True, True, False, True],
               [True, True, True, True]]
    drawn = []
    draw = _rounds_of_groups(signals)
    cfg = GRPOConfig(group_size=2, prompts_per_step=4, dynamic_sampling=True, max_sampling_rounds=rounds)
    pool, batch, fill = dynamic_batch(SimpleNamespace(info=DistInfo()), lambda r: drawn.append(r) or draw(r), cfg, 0)
    groups = batch.samples.prompt_ids[::2, 0].tolist()
    if rounds == 4:
        assert drawn == [0, 1, 2] and fill == {"sampling_rounds": 3.0, "informative_fill": 1.0}
        assert groups == [0, 2, 6, 8]  # the first four groups with a signal, in the order sampled
    else:
        assert drawn == [0, 1] and fill == {"sampling_rounds": 2.0, "informative_fill": 0.75}
        assert groups == [0, 2, 6, 1]  # three with a signal, then the first without
    assert pool.samples.prompt_ids.shape[0] == 2 * 4 * len(drawn)  # the step's metrics see every sampled group
    assert pool.advantages.shape[1] == len(drawn) and batch.advantages.shape == (8, len(drawn))
    assert batch.samples.completion_mask[0, 1:].sum() == 0  # round 0's one-token completions padded, masked
    kept = keep_informative_groups(batch.samples, informative(batch.advantages, 2), 2)
    assert (kept.completion_mask.sum(-1) > 0).tolist() == [True] * 6 + [rounds == 4] * 2


def test_dynamic_sampling_fills_every_step_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """A reward with a signal only for prompts whose answer is even: a round of 4 prompts has about
    two groups with one, so each step samples more rounds, and every step still trains on 4 groups
    with a signal. The further rounds' prompts are a function of the step: a run killed after its
    second step and resumed logs the straight run's losses and rounds."""
    from helpers import run_killed_in_step
    from methods_setup import dynamic_sampling_config
    from methods_setup import even_answer_digits as even_answers

    def cfg(out, **train):
        return dynamic_sampling_config(tiny, out, 4, log_every=1, save_every=2, **train)

    def logged(out):
        return [(m["train/loss"], m["train/sampling_rounds"], m["train/informative_fill"])
                for m in read_metrics(out) if "train/loss" in m]

    run_grpo(cfg(tmp_path / "full"), reward_fns=[even_answers])
    full = logged(tmp_path / "full")
    assert [fill for _, _, fill in full] == [1.0] * 4 and max(rounds for _, rounds, _ in full) > 1

    run_killed_in_step(monkeypatch, 3, lambda: run_grpo(cfg(tmp_path / "cut"), reward_fns=[even_answers]))
    run_grpo(cfg(tmp_path / "cut", resume=True), reward_fns=[even_answers])
    assert logged(tmp_path / "cut") == full


def test_a_micro_batch_whose_completions_are_all_masked_gives_the_whole_batchs_loss(tiny, tmp_path):
    """One round only: the groups without a signal stay in the batch, masked. With one group per
    micro-batch, some micro-batches have no unmasked token (the output layer then gets no rows,
    which oneDNN's kernel refused); the losses equal those of one micro-batch of all 16 rows."""
    from methods_setup import dynamic_sampling_config, even_answer_digits

    from rlhfkit.train.config import replace

    losses = {}
    for micro in (4, 16):
        cfg = replace(dynamic_sampling_config(tiny, tmp_path / str(micro), 2, log_every=1, micro_batch_size=micro),
                      max_sampling_rounds=1, mu=1)
        run_grpo(cfg, reward_fns=[even_answer_digits])
        logged = [m for m in read_metrics(tmp_path / str(micro)) if "train/loss" in m]
        assert min(m["train/informative_fill"] for m in logged) < 1.0  # some groups were masked
        losses[micro] = [m["train/loss"] for m in logged]
    assert losses[4] == pytest.approx(losses[16], abs=1e-5)


@pytest.mark.parametrize("loss_type,micro", [("grpo", 0), ("dapo", 4), ("dr_grpo", 0)])
def test_beta_zero_updates_alike_without_forwarding_the_groups_without_a_signal(tiny, tmp_path, loss_type, micro):
    """With beta 0 a group whose advantages are all zero adds nothing to the loss or its gradient,
    so the update leaves it out (``skip_zero_advantage``, the default): the losses, gradient norms
    and trained weights equal those of forwarding every row, over mu = 2 updates a step."""
    from methods_setup import even_answer_digits, method_config
    from safetensors.torch import load_file

    from rlhfkit.train.config import replace

    logged, weights = {}, {}
    for skip in (True, False):
        out = tmp_path / str(skip)
        cfg = replace(method_config("grpo", tiny, out, 3, log_every=1, micro_batch_size=micro), beta=0.0,
                      loss_type=loss_type, skip_zero_advantage=skip)
        run_grpo(cfg, reward_fns=[even_answer_digits])
        logged[skip] = [m for m in read_metrics(out) if "train/loss" in m]
        weights[skip] = load_file(str(out / "model" / "model.safetensors"))
    assert [m["train/update_rows_forwarded"] for m in logged[False]] == [1.0] * 3
    assert not any("train/kl" in m for m in logged[True])  # beta 0: no reference, no KL measured or logged
    assert max(m["train/update_rows_forwarded"] for m in logged[True]) < 1.0  # groups were left out
    for key in ("train/loss", "train/grad_norm"):
        assert [m[key] for m in logged[True]] == pytest.approx([m[key] for m in logged[False]], rel=1e-5, abs=1e-7)
    moved = 0.0
    for name, w in weights[False].items():
        torch.testing.assert_close(weights[True][name], w, atol=1e-6, rtol=0)
        moved = max(moved, (w - load_file(str(tiny["base"] / "model.safetensors"))[name]).abs().max().item())
    assert moved > 1e-5  # the runs trained: equal unmoved weights would prove nothing


def test_with_a_kl_term_every_row_is_forwarded(tiny, tmp_path):
    from methods_setup import even_answer_digits, method_config

    from rlhfkit.train.config import replace

    cfg = replace(method_config("grpo", tiny, tmp_path / "g", 2, log_every=1), beta=0.04)
    run_grpo(cfg, reward_fns=[even_answer_digits])
    assert [m["train/update_rows_forwarded"] for m in read_metrics(tmp_path / "g") if "train/loss" in m] == [1.0] * 2


def test_further_rounds_draw_prompts_the_step_has_not_drawn():
    """No prompt twice in a step while the data has rows left (DAPO takes further batches from the
    data), the same rows for the same step (resume), and repeats only once the rows run out."""
    from rlhfkit.methods.grpo import more_prompts

    taken = [3, 7, 1, 9]
    rounds = [more_prompts(20, taken, 5, 0, r, 4) for r in (1, 2, 3, 4)]
    drawn = taken + [i for r in rounds for i in r]
    assert len(set(drawn)) == len(drawn) == 20
    assert rounds[0] == more_prompts(20, list(taken), 5, 0, 1, 4) and rounds[0] != more_prompts(20, taken, 6, 0, 1, 4)
    few = more_prompts(6, [3, 1, 2, 0], 5, 0, 1, 4)  # 2 rows left: they repeat
    assert sorted(few) == [4, 4, 5, 5]
    assert sorted(more_prompts(4, [3, 1, 2, 0], 5, 0, 1, 4)) == [0, 1, 2, 3]  # none left: the step's own again


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_dynamic_sampling_masks_groups_to_the_loss_of_dropping_them(loss_type):
    import torch

    from rlhfkit.losses.grpo import REDUCTIONS, grpo_loss
    from rlhfkit.methods.grpo import informative, keep_informative_groups
    from rlhfkit.rollout.sampler import Samples

    torch.manual_seed(0)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3, [0.0] * 3, [0.0] * 3])  # group 2 (rows 2, 3) has no signal
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    lp, old = torch.randn(4, 3), torch.randn(4, 3)
    ids = torch.zeros(4, 3, dtype=torch.long)
    samples = Samples(ids, torch.ones_like(ids), ids, mask, lp, torch.ones(4, dtype=torch.bool))
    kept = keep_informative_groups(samples, informative(adv, 2), group_size=2)
    assert kept.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    reduction = REDUCTIONS[loss_type]
    masked, _ = grpo_loss(lp, old, adv, kept.completion_mask, reduction=reduction, num_sequences=2,
                          num_tokens=5, max_tokens=3)
    dropped, _ = grpo_loss(lp[:2], old[:2], adv[:2], mask[:2], reduction=reduction, max_tokens=3)
    assert masked.item() == pytest.approx(dropped.item(), abs=1e-7)


def test_rewards_passed_from_python_are_what_the_run_records_and_replace_the_configs_out_loud(tiny, tmp_path, capfd):
    import yaml
    from methods_setup import even_answer_digits, method_config

    from rlhfkit.methods.online_rewards import parse_rewards
    from rlhfkit.train.config import ConfigError

    cfg = method_config("grpo", tiny, tmp_path / "g", 1)  # rewards="contains_answer"
    capfd.readouterr()
    run_grpo(cfg, reward_fns=[even_answer_digits], weights=[0.5])
    assert "rewards='contains_answer' in the config is replaced by the reward functions passed to run_grpo" \
        in capfd.readouterr().err
    recorded = "methods_setup:even_answer_digits:0.5"  # importable: the CLI can run the config again
    assert yaml.safe_load((tmp_path / "g" / "config.yaml").read_text())["rewards"] == recorded
    assert recorded in (tmp_path / "g" / "model" / "README.md").read_text()
    assert parse_rewards(recorded) == ([even_answer_digits], [0.5])

    def nested(prompts, completions, **_):  # no module:function finds it: recorded by name, marked
        return [1.0] * len(completions)

    run_grpo(method_config("grpo", tiny, tmp_path / "n", 1), reward_fns=[even_answer_digits, nested])
    recorded = yaml.safe_load((tmp_path / "n" / "config.yaml").read_text())["rewards"]
    assert recorded == ("methods_setup:even_answer_digits:1.0,nested:1.0 (a Python callable passed to run_grpo: "
                        "not importable, so not re-runnable from the CLI)")
    with pytest.raises(ConfigError, match="config key 'rewards': .* was recorded by a run whose reward was a Python "
                                          "callable that cannot be imported"):
        GRPOConfig(rewards=recorded)
    with pytest.raises(ConfigError, match="was recorded by a run whose reward was a Python callable"):  # older marker
        GRPOConfig(rewards="even_answer_digits:0.5 (Python callables passed to run_grpo)")


def test_rewards_that_abstain_on_every_sample_are_said_once(tiny, tmp_path, capfd):
    from methods_setup import method_config

    def abstains(prompts, completions, **_):
        return [None] * len(completions)

    capfd.readouterr()
    run_grpo(method_config("grpo", tiny, tmp_path / "g", 2), reward_fns=[abstains])
    err = capfd.readouterr().err
    assert err.count("every outcome reward abstained (returned None) on every sample") == 1
    assert "step 1: every outcome reward abstained" in err
    # no sample has a reward: reward_mean is none (not 0), written as JSON's null, not a bare NaN
    import json

    result = json.loads((tmp_path / "g" / "result.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert result["reward_mean"] is None
    assert "nan" not in (tmp_path / "g" / "model" / "README.md").read_text().lower()


def test_with_overlong_shaping_dynamic_sampling_filters_on_the_outcome_not_the_length():
    """DAPO's eq. 11 keeps a group when 0 < correct < G: answers all wrong (or all right) of
    different lengths get advantages from the length penalty alone, and are still dropped."""
    from rlhfkit.losses.grpo import group_advantages
    from rlhfkit.methods.grpo import Rollout, has_signal, informative
    from rlhfkit.rollout.rewards import OutcomeScores

    task = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0])  # groups of 2: all wrong, one right, all right
    overlong = torch.tensor([0.0, -0.5, 0.0, 0.0, -0.25, 0.0])
    rewards = task + overlong
    advantages = group_advantages(rewards, 2, True)[:, None].expand(-1, 3)
    batch = Rollout(None, OutcomeScores(rewards, {"exact_answer": task, "overlong": overlong}), advantages, 0.0)
    cfg = GRPOConfig(group_size=2, prompts_per_step=3, dynamic_sampling=True, overlong_buffer=4)
    assert informative(advantages, 2).tolist() == [True, True, True]  # every group has a length signal
    assert has_signal(batch, cfg).tolist() == [False, True, False]
    plain = GRPOConfig(group_size=2, prompts_per_step=3, dynamic_sampling=True)  # no shaping: the advantages
    assert has_signal(batch, plain).tolist() == [True, True, True]


@pytest.mark.parametrize("mask, finished, moves", [(True, False, False), (True, True, True), (False, False, True)])
def test_mask_truncated_completions_leaves_cut_off_answers_out_of_the_loss(mask, finished, moves, tiny, tmp_path):
    """TRL's mask_truncated_completions (DAPO's overlong filtering): an answer that did not end
    (no EOS within max_new_tokens) adds no loss. Here the backend's samples are marked all ended
    or all cut off: with the option, cut-off answers leave nothing to learn from."""
    from methods_setup import even_answer_digits, method_config
    from safetensors.torch import load_file

    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.rollout.backend import SamplerBackend
    from rlhfkit.train.config import replace

    class Marked(SamplerBackend):  # the sampler, with every sample's end set by the test
        def generate(self, prompts, params):
            samples = super().generate(prompts, params)
            samples.finished = torch.full_like(samples.finished, finished)
            return samples

    out = tmp_path / "g"
    cfg = replace(method_config("grpo", tiny, out, 2, log_every=1), mask_truncated_completions=mask, beta=0.0)
    run_grpo(cfg, reward_fns=[even_answer_digits], backend=Marked(load_tokenizer(str(tiny["base"]))))
    skipped = [m["train/update_skipped"] for m in read_metrics(out) if "train/update_skipped" in m]
    assert skipped == ([0.0, 0.0] if moves else [1.0, 1.0])
    base = load_file(str(tiny["base"] / "model.safetensors"))
    moved = max((w - base[k]).abs().max().item() for k, w in load_file(str(out / "model" / "model.safetensors")).items())
    assert (moved > 1e-6) == moves


def test_dr_grpos_normaliser_counts_the_cut_off_answers_it_masks(tiny, tmp_path, monkeypatch):
    """Dr. GRPO divides by a constant, answers x max_new_tokens, so the answers that
    mask_truncated_completions leaves out still count in it (as TRL's); grpo's mean over answers
    is over the answers left (as verl's)."""
    from methods_setup import even_answer_digits, method_config

    import rlhfkit.methods.grpo as grpo_module
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.rollout.backend import SamplerBackend
    from rlhfkit.train.config import replace

    class HalfCut(SamplerBackend):  # every other answer marked as not ended (cut off where it is full length)
        def generate(self, prompts, params):
            samples = super().generate(prompts, params)
            samples.finished = torch.arange(len(samples.finished)) % 2 == 0
            return samples

    seen, loss = [], grpo_module.grpo_loss
    monkeypatch.setattr(grpo_module, "grpo_loss", lambda *a, **k: seen.append(a[9]) or loss(*a, **k))
    for loss_type in ("dr_grpo", "grpo"):
        seen.clear()
        cfg = replace(method_config("grpo", tiny, tmp_path / loss_type, 1, log_every=1), loss_type=loss_type,
                      mask_truncated_completions=True, beta=0.0, mu=1)
        run_grpo(cfg, reward_fns=[even_answer_digits], backend=HalfCut(load_tokenizer(str(tiny["base"]))))
        answers = cfg.prompts_per_step * cfg.group_size
        if loss_type == "dr_grpo":
            assert seen and set(seen) == {answers}
        else:
            assert seen and 0 < max(seen) < answers


def test_gspo_is_wired_to_the_update_and_asks_for_the_per_sequence_mean(tiny, tmp_path):
    """With mu = 1 the sequence ratio's gradient equals the tokens' (every ratio is 1); the second
    of mu = 2 updates sees ratios apart from 1, where GSPO's loss differs from GRPO's."""
    from methods_setup import even_answer_digits, method_config

    from rlhfkit.train.config import ConfigError, replace

    losses = {}
    for level in ("token", "sequence"):
        out = tmp_path / level
        run_grpo(replace(method_config("grpo", tiny, out, 1, log_every=1), importance_sampling_level=level, mu=2,
                         beta=0.0), reward_fns=[even_answer_digits])
        losses[level] = [m["train/loss"] for m in read_metrics(out) if "train/loss" in m][0]
    assert abs(losses["token"] - losses["sequence"]) > 1e-7, losses
    with pytest.raises(ConfigError, match="importance_sampling_level=sequence \\(GSPO; RLOO's default\\) averages over "
                                          "sequences.*for loss_type=dapo set importance_sampling_level=token"):
        GRPOConfig(model="m", train_data="d.jsonl", importance_sampling_level="sequence", loss_type="dapo")


def test_scale_rewards_batch_and_delta_reach_the_update(tiny, tmp_path, monkeypatch):
    """The update's advantages are the group-centred rewards over the batch's std (scale_rewards=batch),
    and its loss gets delta."""
    from methods_setup import even_answer_digits, method_config

    import rlhfkit.methods.grpo as grpo
    from rlhfkit.train.config import replace

    seen = {"rewards": [], "centred": [], "advantages": [], "delta": []}
    group_advantages, grpo_loss = grpo.group_advantages, grpo.grpo_loss

    def centring(rewards, group_size, scale_std):
        seen["rewards"].append(rewards.clone())
        seen["centred"].append(group_advantages(rewards, group_size, scale_std))
        return seen["centred"][-1]

    def loss(logprobs, old, advantages, *args, **kw):
        seen["advantages"].append(advantages[:, 0].clone())
        seen["delta"].append(kw["delta"])
        return grpo_loss(logprobs, old, advantages, *args, **kw)

    monkeypatch.setattr(grpo, "group_advantages", centring)
    monkeypatch.setattr(grpo, "grpo_loss", loss)
    run_grpo(replace(method_config("grpo", tiny, tmp_path / "g", 1), scale_rewards="batch", delta=1.5, mu=1),
             reward_fns=[even_answer_digits])
    rewards = seen["rewards"][0]
    expected = seen["centred"][0] / (rewards[~rewards.isnan()].std() + 1e-4)
    assert expected.abs().max() > 0.1  # some group has a signal
    assert torch.allclose(torch.cat(seen["advantages"]).cpu(), expected, atol=1e-6)
    assert set(seen["delta"]) == {1.5}


def test_a_mixture_of_experts_adds_its_router_balancing_loss_to_grpos(tiny, tmp_path):
    """GRPO adds router_aux_loss_coef x the policy's router balancing loss of its training forwards, as
    TRL's GRPO does; with beta 0 the groups without a signal are then forwarded too (their balancing
    loss has a gradient), and the loss is that term alone where no group has a signal."""
    from methods_setup import method_config, tiny_moe

    from rlhfkit.train.config import replace

    folder = tiny_moe(tiny, tmp_path / "moe")
    for coef in (None, 0.0):
        out = tmp_path / f"g-{coef}"
        cfg = replace(method_config("grpo", tiny, out, 1, router_aux_loss_coef=coef), model=folder, beta=0.0, mu=1)
        run_grpo(cfg, reward_fns=[lambda prompts, completions, **_: [0.0] * len(completions)])  # no signal
        first = [m for m in read_metrics(out) if "train/loss" in m][0]
        if coef is None:
            assert first["train/router_aux_loss"] > 1.0 and first["train/update_rows_forwarded"] == 1.0
            assert abs(first["train/loss"] - 0.02 * first["train/router_aux_loss"]) < 1e-6
        else:  # off: nothing to learn, the groups are not forwarded
            assert "train/router_aux_loss" not in first and first["train/loss"] == 0.0
            assert first["train/update_rows_forwarded"] < 1.0


def test_high_entropy_keeps_the_top_share_of_the_real_tokens():
    from rlhfkit.methods.grpo import high_entropy
    from rlhfkit.train.dist import DistInfo

    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.7, 0.2, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # the 5.0s are padding
    # real values sorted [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]: the 0.5 quantile is 0.3 + 0.5 (0.5 - 0.3) = 0.4
    kept = high_entropy(entropy, mask, 0.5, DistInfo())
    assert kept.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert high_entropy(entropy, mask, 1.0, DistInfo()).tolist() == mask.bool().tolist()
    assert high_entropy(entropy, mask, 0.0, DistInfo()).tolist() == [[False, False, True, False], [False] * 4]
    g = torch.Generator().manual_seed(0)
    values, ones = torch.rand(1, 1001, generator=g), torch.ones(1, 1001)
    for share in (0.2, 0.37, 0.9):  # torch.quantile's threshold, without its 2^24 limit
        assert torch.equal(high_entropy(values, ones, share, DistInfo())[0], values[0] >= torch.quantile(values, 1 - share))


def test_top_entropy_quantile_leaves_the_low_entropy_tokens_out_of_the_policy_loss(tiny, tmp_path, monkeypatch):
    from methods_setup import even_answer_digits, method_config

    import rlhfkit.methods.grpo as grpo
    from rlhfkit.train.config import replace

    seen = []
    grpo_loss = grpo.grpo_loss

    def loss(logprobs, old, advantages, mask, *args, **kw):
        seen.append((advantages.clone(), mask.clone()))
        return grpo_loss(logprobs, old, advantages, mask, *args, **kw)

    monkeypatch.setattr(grpo, "grpo_loss", loss)
    run_grpo(replace(method_config("grpo", tiny, tmp_path / "g", 1), top_entropy_quantile=0.2, mu=1, beta=0.0),
             reward_fns=[even_answer_digits])
    advantages, mask = (torch.cat(t) for t in zip(*seen))
    signal = advantages.abs().sum(-1) > 0  # the rows kept some token: those of the groups with a signal
    assert signal.any() and len(advantages) == 16  # beta 0, yet every row is forwarded: the threshold is the batch's
    kept = (advantages != 0).sum().item()
    assert 0 < kept <= 0.2 * mask.sum().item() + 1  # at most the top 20% of all tokens (but ties)


def test_samples_from_an_inexact_engine_are_weighed_to_pi_old(tiny, tmp_path):
    """An engine whose log-probs sit 0.1 below the trainer's on every token: token_truncate weighs each
    token's policy loss by pi_old / pi_engine = e^0.1; the same samples unweighed (none) give a gradient
    e^0.1 smaller."""
    import math

    from methods_setup import even_answer_digits, method_config, shifted_backend

    from rlhfkit.train.config import replace

    logged = {}
    for mode in ("token_truncate", "none"):
        out = tmp_path / mode
        cfg = replace(method_config("grpo", tiny, out, 1), sampling_correction=mode, loss_type="dapo", mu=1, beta=0.0)
        run_grpo(cfg, reward_fns=[even_answer_digits], backend=shifted_backend(tiny, -0.1))
        logged[mode] = [m for m in read_metrics(out) if "train/loss" in m][0]
    # the gradient (the loss is 0 here: all answers have the same length and the advantages sum to 0)
    assert logged["none"]["train/grad_norm"] > 1e-3
    assert abs(logged["token_truncate"]["train/grad_norm"] / logged["none"]["train/grad_norm"] - math.exp(0.1)) < 1e-5
    assert abs(logged["token_truncate"]["train/sampling_weight_mean"] - math.exp(0.1)) < 1e-5
    assert "train/sampling_weight_mean" not in logged["none"]


def test_cispo_and_vespo_are_wired_and_have_dapos_gradient_at_the_first_update(tiny, tmp_path):
    """At mu = 1 every ratio is 1: CISPO's gradient -A grad log pi is the clipped surrogate's, and so
    is VESPO's (phi(1) = 1), while their loss value -A log pi is another number than DAPO's (0 here:
    equal lengths, centred advantages). VESPO's second pass (mu = 2) reads ratios off 1: phi moves."""
    from methods_setup import even_answer_digits, method_config

    from rlhfkit.train.config import replace

    logged = {}
    for loss_type in ("dapo", "cispo", "vespo"):
        out = tmp_path / loss_type
        run_grpo(replace(method_config("grpo", tiny, out, 1), loss_type=loss_type, mu=1, beta=0.0),
                 reward_fns=[even_answer_digits])
        logged[loss_type] = [m for m in read_metrics(out) if "train/loss" in m][0]
    assert logged["dapo"]["train/grad_norm"] > 1e-3
    for other in ("cispo", "vespo"):
        assert abs(logged[other]["train/grad_norm"] / logged["dapo"]["train/grad_norm"] - 1) < 1e-5, other
        assert abs(logged[other]["train/loss"] - logged["dapo"]["train/loss"]) > 1e-3, other
    assert logged["vespo"]["train/vespo_phi_mean"] == 1.0
    out = tmp_path / "vespo-mu2"
    run_grpo(replace(method_config("grpo", tiny, out, 1), loss_type="vespo", mu=2, beta=0.0, train__lr=1e-2),
             reward_fns=[even_answer_digits])
    assert abs([m for m in read_metrics(out) if "train/loss" in m][0]["train/vespo_phi_mean"] - 1) > 1e-3
    # the sampler in bf16 is not exact: its whole-answer sampling weights (the default sequence_mask) are refused
    from rlhfkit.train.config import ConfigError

    with pytest.raises(ConfigError, match="loss_type=vespo puts the sampling weights .* set token_truncate, token_mask"):
        run_grpo(replace(method_config("grpo", tiny, tmp_path / "bf16", 1), loss_type="vespo", train__dtype="bf16"),
                 reward_fns=[even_answer_digits])


def test_minibatches_take_one_optimizer_step_each_against_pi_old_of_the_whole_batch(tiny, tmp_path, monkeypatch):
    """minibatch_size = prompts_per_step / 2: two optimizer steps per pass over each batch (rewards
    see TRL's global_step and max_steps in optimizer steps). A minibatch's loss is normalised over
    its own sequences, so with a negligible step the whole batch's gradient is the mean of the two
    steps' (the same samples: the same seed and start; GRPO's loss at ratio 1 is 0, its gradient is
    not). The second step's ratios are against pi_old of the whole batch, from before the first
    step: with a large step they move off 1 and clip, where one step a batch (mu = 1) has ratio 1."""
    from methods_setup import digits, method_config

    import rlhfkit.train.run as run_module
    from rlhfkit.train.config import replace

    seen, grads = {}, []
    original = run_module.Run.optimizer_step

    def recording(self, loss, *args, **kwargs):
        grads.append(torch.cat([p.grad.flatten() for p in self.modules[0].parameters() if p.grad is not None]))
        return original(self, loss, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "optimizer_step", recording)

    def reward(prompts, completions, trainer_state, **kw):
        seen.setdefault(trainer_state.max_steps, []).append(trainer_state.global_step)
        return digits(prompts, completions, **kw)

    logged, steps = {}, {}
    for size, lr in ((None, 1e-12), (2, 1e-12), (None, 3e-3), (2, 3e-3)):
        out = tmp_path / f"{size}-{lr}"
        cfg = method_config("grpo", tiny, out, 2, log_every=1)
        cfg = replace(cfg, beta=0.0, mu=1, minibatch_size=size, train=replace(cfg.train, lr=lr))
        grads.clear()
        run_grpo(cfg, reward_fns=[reward])
        logged[size, lr], steps[size, lr] = [m for m in read_metrics(out) if "train/loss" in m], list(grads)
    assert seen == {2: [0, 1, 0, 1], 4: [0, 2, 0, 2]}  # two runs each: steps before each rollout
    whole, halves = steps[None, 1e-12], steps[2, 1e-12]
    assert len(whole) == 2 and len(halves) == 4
    for step in range(2):
        torch.testing.assert_close((halves[2 * step] + halves[2 * step + 1]) / 2, whole[step], atol=1e-7, rtol=1e-5)
        assert whole[step].abs().max() > 1e-4 and (halves[2 * step] - halves[2 * step + 1]).abs().max() > 1e-4
    assert [m["train/ratio_mean"] for m in logged[None, 1e-12] + logged[2, 1e-12]] == pytest.approx([1.0] * 4, abs=1e-6)
    assert [m["train/clip_frac_low"] + m["train/clip_frac_high"] for m in logged[None, 3e-3]] == [0.0, 0.0]
    moved = logged[2, 3e-3]
    assert max(abs(m["train/ratio_mean"] - 1) for m in moved) > 1e-3
    assert max(m["train/clip_frac_low"] + m["train/clip_frac_high"] for m in moved) > 0.0
    with pytest.raises(Exception, match="prompts_per_step \\(4\\) must be a multiple of minibatch_size \\(3\\)"):
        replace(cfg, minibatch_size=3)


def test_sapo_off_policy_masking_and_the_unbiased_kl_are_wired(tiny, tmp_path):
    """loss_type=sapo at mu = 1: every ratio is 1, where SAPO's gradient is the plain policy
    gradient, GRPO's (the same per-answer mean): the first step's gradient norms agree, their loss
    values not. off_policy_mask_threshold, with an engine 0.5 nats above the trainer on every token:
    at delta 0.3 the answers with A < 0 lose their policy term, at 1.0 none. use_bias_correction_kl:
    at step 1 the policy is its reference (k3 = 0, the same update); at step 2 the same KL in value
    (the ratio is 1), another gradient."""
    from methods_setup import even_answer_digits, method_config, shifted_backend

    from rlhfkit.train.config import ConfigError, replace

    def first(out, cfg, steps=1, **kw):
        run_grpo(replace(method_config("grpo", tiny, out, steps), mu=1, **cfg), reward_fns=[even_answer_digits], **kw)
        return [m for m in read_metrics(out) if "train/loss" in m]

    grpo, sapo = (first(tmp_path / name, dict(loss_type=name, beta=0.0))[0] for name in ("grpo", "sapo"))
    assert grpo["train/grad_norm"] > 1e-3
    assert abs(sapo["train/grad_norm"] / grpo["train/grad_norm"] - 1) < 1e-5
    assert abs(sapo["train/loss"] - grpo["train/loss"]) > 1e-3  # -2 A / tau against GRPO's -A
    masked = {}
    for delta in (0.3, 1.0):
        out = tmp_path / f"opsm-{delta}"
        logged = first(out, dict(beta=0.0, sampling_correction="none", off_policy_mask_threshold=delta),
                       backend=shifted_backend(tiny, 0.5))[0]
        masked[delta] = (logged["train/off_policy_masked"], logged["train/grad_norm"])
    assert 0 < masked[0.3][0] < 1 and masked[1.0][0] == 0.0 and abs(masked[0.3][1] - masked[1.0][1]) > 1e-4
    # the exact sampler, one step a batch: no drift, so even a threshold of 0 masks nothing (its log-probs
    # differ from the trainer's forward by float noise, which had masked about half the negative answers)
    on_policy = first(tmp_path / "opsm-0", dict(beta=0.0, off_policy_mask_threshold=0.0))[0]
    assert on_policy["train/off_policy_masked"] == 0.0
    assert on_policy["train/grad_norm"] == pytest.approx(grpo["train/grad_norm"], rel=1e-6)
    plain, unbiased = (first(tmp_path / f"kl-{flag}", dict(beta=0.5, use_bias_correction_kl=flag), steps=2)
                       for flag in (False, True))
    assert unbiased[0]["train/grad_norm"] == pytest.approx(plain[0]["train/grad_norm"], rel=1e-6)
    assert unbiased[1]["train/kl"] == pytest.approx(plain[1]["train/kl"], rel=1e-5) and plain[1]["train/kl"] > 1e-6
    assert abs(unbiased[1]["train/grad_norm"] - plain[1]["train/grad_norm"]) > 1e-6
    with pytest.raises(ConfigError, match="use_bias_correction_kl"):
        replace(method_config("grpo", tiny, tmp_path / "x", 1), beta=0.0, use_bias_correction_kl=True)
    with pytest.raises(ConfigError, match="sapo_temperature_neg"):
        replace(method_config("grpo", tiny, tmp_path / "x", 1), sapo_temperature_neg=2.0)
    with pytest.raises(ConfigError, match="sapo has no clip"):
        replace(method_config("grpo", tiny, tmp_path / "x", 1), loss_type="sapo", delta=2.0)
    with pytest.raises(ConfigError, match="eps_high.*a clipped loss_type .not sapo."):
        replace(method_config("grpo", tiny, tmp_path / "x", 1), loss_type="sapo", eps_high=0.28)
    assert replace(method_config("grpo", tiny, tmp_path / "x", 1), off_policy_mask_threshold=0.0)  # TRL takes 0 too


def test_normalize_then_sum_gives_the_update_gdpos_advantages(tiny, tmp_path, monkeypatch):
    """multi_objective_aggregation=normalize_then_sum (GDPO): the update receives each reward
    normalised in its group, summed with its weight, then normalised over the batch, as computed
    here by hand from the logged per-function rewards; the default sums first (another number)."""
    import statistics

    from methods_setup import even_answer_digits, method_config

    import rlhfkit.methods.grpo as grpo_module
    from rlhfkit.train.config import ConfigError, replace

    seen = []
    original = grpo_module.update
    monkeypatch.setattr(grpo_module, "update", lambda run, policy, ref, batch, *a: seen.append(batch) or
                        original(run, policy, ref, batch, *a))

    def length(completions, **_):  # a second objective on another scale: the answer's length in characters
        return [float(len(c)) for c in completions]

    for how in ("normalize_then_sum", "sum_then_normalize"):
        cfg = replace(method_config("grpo", tiny, tmp_path / how, 1), beta=0.0, multi_objective_aggregation=how)
        run_grpo(cfg, reward_fns=[even_answer_digits, length], weights=[1.0, 0.1])
    gdpo, plain = seen
    rewards = gdpo.outcome.per_function
    columns = [rewards["even_answer_digits"].tolist(), rewards["length"].tolist()]

    def in_groups(values):
        out = []
        for g in range(0, len(values), 4):
            group = values[g: g + 4]
            mean, std = statistics.mean(group), statistics.stdev(group)
            out += [0.0 if max(group) == min(group) else (v - mean) / (std + 1e-4) for v in group]
        return out

    summed = [a + 0.1 * b for a, b in zip(in_groups(columns[0]), in_groups(columns[1]))]
    mean, std = statistics.mean(summed), statistics.stdev(summed)
    expected = torch.tensor([(v - mean) / (std + 1e-4) for v in summed])
    assert torch.allclose(gdpo.advantages[:, 0], expected, atol=1e-4)
    assert (gdpo.advantages - gdpo.advantages[:, :1]).abs().max() == 0  # one value over each answer's tokens
    assert (plain.advantages[:, 0] - expected).abs().max() > 0.1
    with pytest.raises(ConfigError, match="normalize_then_sum .GDPO. .*scale_rewards=none"):
        replace(cfg, multi_objective_aggregation="normalize_then_sum", scale_rewards="none")


def test_logprob_gap_with_minibatches_is_the_backends_not_the_steps_drift(tiny, tmp_path):
    """With two minibatches the second's forward follows a step: logprob_gap is measured before
    any step (the first minibatch's forward, pi_old's forward for the rest), so the exact sampler
    shows float noise and an engine 0.1 nats off shows 0.1, however far a large step moves the
    policy (it was 0.06 with the exact sampler, the step's drift)."""
    from methods_setup import even_answer_digits, method_config, shifted_backend

    from rlhfkit.train.config import replace

    gaps = {}
    for name, backend in (("exact", None), ("shifted", shifted_backend(tiny, -0.1))):
        cfg = method_config("grpo", tiny, tmp_path / name, 2, log_every=1)
        cfg = replace(cfg, beta=0.0, mu=1, minibatch_size=2, sampling_correction="none", train=replace(cfg.train, lr=3e-3))
        run_grpo(cfg, reward_fns=[even_answer_digits], backend=backend)
        logged = [m for m in read_metrics(tmp_path / name) if "train/loss" in m]
        gaps[name] = [m["train/logprob_gap"] for m in logged]
        assert max(abs(m["train/ratio_mean"] - 1) for m in logged) > 1e-3  # the steps moved the policy
    assert max(gaps["exact"]) < 1e-5
    assert gaps["shifted"] == pytest.approx([0.1, 0.1], abs=1e-5)


def test_luspo_reaches_the_loss_as_gspos_ratio_with_its_length_weighted_sum(tiny, tmp_path, monkeypatch):
    from methods_setup import even_answer_digits, method_config

    import rlhfkit.methods.grpo as grpo_module
    from rlhfkit.train.config import ConfigError, replace

    seen, original = [], grpo_module.grpo_loss

    def recording(*args, **kwargs):
        seen.append((args[8], kwargs["sequence_ratio"]))  # the reduction, GSPO's ratio
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_loss", recording)
    cfg = replace(method_config("grpo", tiny, tmp_path / "l", 1), loss_type="luspo", importance_sampling_level="sequence")
    run_grpo(cfg, reward_fns=[even_answer_digits])
    assert seen and set(seen) == {("seq_mean_token_sum", True)}
    with pytest.raises(ConfigError, match="luspo .* set importance_sampling_level=sequence"):
        replace(cfg, importance_sampling_level="token")


def test_gdpo_batch_normalisation_leaves_a_group_without_a_signal_at_exactly_zero():
    """GDPO's centring over the batch subtracts a mean that is 0 but for rounding: a group whose
    summed values are all 0 keeps advantages of exactly 0 (it was -mean / std, 1e-8, and
    skip_zero_advantage forwarded it); the others are scaled by the batch's std."""
    from types import SimpleNamespace

    from rlhfkit.methods.grpo import Rollout, normalised_over_batch
    from rlhfkit.train.dist import DistInfo

    summed = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]) + torch.tensor([1e-8] * 4 + [0.0] * 4)
    batch = Rollout(SimpleNamespace(), SimpleNamespace(rewards=torch.zeros(8)), summed[:, None].expand(8, 3).clone(), 0.0)
    got = normalised_over_batch(batch, DistInfo()).advantages
    assert torch.equal(got[4:], torch.zeros(4, 3))
    expected = (summed[:4] - summed.mean()) / (summed.std() + 1e-4)
    assert torch.allclose(got[:4, 0], expected, atol=1e-6) and (got[:4] - got[:4, :1]).abs().max() == 0


def test_gdpo_keeps_every_reward_its_own_column_and_refuses_a_process_reward(tiny, tmp_path, monkeypatch):
    """Two rewards of one name (two lambdas) had one column between them, and GDPO dropped the first
    and shifted the weights: they are NAME and NAME_2 now, each normalised on its own. A process
    reward passed in Python is refused with GDPO (its per-step advantages were flattened to one value);
    a sample every reward abstained on has no GDPO value, its overlong penalty alone is none."""
    from methods_setup import method_config

    import rlhfkit.methods.grpo as grpo_module
    from rlhfkit.train.config import ConfigError, replace

    seen = []
    original = grpo_module.update
    monkeypatch.setattr(grpo_module, "update", lambda run, policy, ref, batch, *a: seen.append(batch) or
                        original(run, policy, ref, batch, *a))
    first = lambda completions, **_: [float(len(c)) for c in completions]  # noqa: E731
    second = lambda completions, **_: [None if i % 4 == 0 else float(c.count("1")) for i, c in enumerate(completions)]  # noqa: E731
    cfg = replace(method_config("grpo", tiny, tmp_path / "g", 1), beta=0.0, overlong_buffer=2,
                  multi_objective_aggregation="normalize_then_sum")
    run_grpo(cfg, reward_fns=[first, second], weights=[1.0, 0.5])
    batch = seen[0]
    assert list(batch.outcome.per_function) == ["<lambda>", "<lambda>_2", "overlong"]
    lengths = torch.tensor([float(v) for v in batch.outcome.per_function["<lambda>"]])
    assert not lengths.isnan().any() and (batch.outcome.per_function["<lambda>_2"].isnan().sum() > 0)
    steps = lambda prompts, completions, **_: [[(0, 1.0)] for _ in completions]  # noqa: E731
    with pytest.raises(ConfigError, match="a process reward passed to run_grpo .*normalize_then_sum .GDPO."):
        run_grpo(replace(cfg, overlong_buffer=0, train__out_dir=str(tmp_path / "p")), reward_fns=[first], process_fn=steps)
    # one passed in Python meets every check the config key does, before the run starts: scale_rewards=batch
    # (it had scaled the step advantages by the outcome rewards' std) and overlong_buffer (ignored) too
    for bad, said in ((dict(scale_rewards="batch"), "scale_rewards=batch scales outcome advantages"),
                      (dict(overlong_buffer=2), "overlong_buffer shapes the outcome reward")):
        out = tmp_path / f"p-{said[:8]}"
        with pytest.raises(ConfigError, match=f"a process reward passed to run_grpo .*{said}"):
            run_grpo(replace(cfg, multi_objective_aggregation="sum_then_normalize", train__out_dir=str(out),
                             **{"overlong_buffer": 0, **bad}), reward_fns=[first], process_fn=steps)
        assert not out.exists()


def test_gdpo_leaves_a_sample_every_reward_abstained_on_out_of_every_column():
    """The overlong penalty has a value for every sample; a sample every reward abstained on has no
    score, so it stays out of the penalty's group statistics too (it had shifted them), and its
    advantage is 0."""
    import statistics
    from types import SimpleNamespace

    from rlhfkit.methods.grpo import GRPOConfig, advantages_for
    from rlhfkit.rollout.rewards import OutcomeScores

    nan = float("nan")
    task, penalty = torch.tensor([nan, 1.0, 0.0, 1.0]), torch.tensor([-1.0, 0.0, -0.5, -0.25])
    outcome = OutcomeScores(task + penalty, {"task": task, "overlong": penalty}, {})
    cfg = GRPOConfig(model="m", train_data="d", group_size=4, multi_objective_aggregation="normalize_then_sum")
    adv, _ = advantages_for(cfg, SimpleNamespace(completion_ids=torch.zeros(4, 3)), None, None, None, None, None,
                            None, outcome, [1.0])

    def normalised(values):
        mean, std = statistics.mean(values), statistics.stdev(values)
        return [(v - mean) / (std + 1e-4) for v in values]

    expected = [a + b for a, b in zip(normalised([1.0, 0.0, 1.0]), normalised([0.0, -0.5, -0.25]))]
    assert adv[0].abs().max() == 0 and torch.allclose(adv[1:, 0], torch.tensor(expected), atol=1e-5)


def test_the_entropy_bonus_reaches_the_loss_and_the_gradient_through_the_forward(tiny, tmp_path):
    """entropy_coef: the first step's loss is the plain run's minus coef x the logged mean entropy
    (the same samples), with beta 0 every row forwarded (a group without a signal still has an
    entropy to raise), and the entropy's gradient reaches the weights on both forward paths
    (finite differences of the entropy along the gradient direction)."""
    from methods_setup import even_answer_digits, method_config

    from rlhfkit.methods.common import load_policy
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.rollout.sampler import completion_logprobs, sample
    from rlhfkit.train.config import ConfigError, replace

    logged = {}
    for coef in (0.0, 0.1):
        out = tmp_path / str(coef)
        run_grpo(replace(method_config("grpo", tiny, out, 1, log_every=1), beta=0.0, mu=1, entropy_coef=coef),
                 reward_fns=[even_answer_digits])
        logged[coef] = [m for m in read_metrics(out) if "train/loss" in m][0]
    assert logged[0.1]["train/update_rows_forwarded"] == 1.0 and logged[0.0]["train/update_rows_forwarded"] < 1.0
    expected = logged[0.0]["train/loss"] - 0.1 * logged[0.1]["train/entropy"]
    assert logged[0.1]["train/loss"] == pytest.approx(expected, abs=1e-5)
    model, _ = load_policy(str(tiny["base"]), None)
    tok = load_tokenizer(str(tiny["base"]))
    torch.manual_seed(0)
    samples = sample(model, [tok("1+2=")["input_ids"]] * 2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                     max_new_tokens=4, num_samples=2)
    for group in (1, 4):  # one row a sample; each prompt once for its group
        model.zero_grad()
        _, h = completion_logprobs(model, samples, with_entropy=True, group_size=group, entropy_grad=True)
        mean = (h * samples.completion_mask).sum() / samples.completion_mask.sum()
        mean.backward()
        direction = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.add_(1e-3 * d)
            _, moved = completion_logprobs(model, samples, with_entropy=True, group_size=group)
            for p, d in zip(model.parameters(), direction):
                p.sub_(1e-3 * d)
        gained = float((moved * samples.completion_mask).sum() / samples.completion_mask.sum() - mean)
        assert gained == pytest.approx(1e-3 * sum(float((d * d).sum()) for d in direction), rel=0.05)
    with pytest.raises(ConfigError, match="entropy_coef's bonus is over every answer token"):
        replace(method_config("grpo", tiny, tmp_path / "x", 1), entropy_coef=0.1, top_entropy_quantile=0.2)


# --- TR-DPO's reference sync in GRPO (TRL's GRPO options) ------------------------------------------

def digits(prompts, completions, **_):  # a reward the untrained model's answers differ in: groups with a signal
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _synced(tiny, out, steps, **train):
    from methods_setup import method_config

    from rlhfkit.train.config import replace

    return replace(method_config("grpo", tiny, out, steps, log_every=1, **train), sync_ref_model=True,
                   ref_model_sync_steps=4)  # mu=2: two optimizer steps a rollout step, a sync after the 2nd step


def test_grpos_reference_moves_toward_the_policy_every_tau_optimizer_steps(tiny, tmp_path):
    """tau counts optimizer steps (TRL's global_step), two a rollout step here (mu=2): the reference
    is the start model after rollout step 1 and alpha x the policy + (1 - alpha) x the start after
    step 2, read from each step's checkpoint."""
    from safetensors.torch import load_file

    from rlhfkit.train.checkpoint import complete_checkpoints

    run_grpo(_synced(tiny, tmp_path, 3, save_every=1, keep_checkpoints=0), reward_fns=[digits])
    saved = complete_checkpoints(tmp_path)
    policy = [load_file(str(c / "model.safetensors")) for c in saved]
    ref = [load_file(str(c / "reference.safetensors")) for c in saved]
    start = load_file(str(tiny["base"] / "model.safetensors"))
    names = set(ref[0]) & set(start)
    assert len(saved) == 3 and names
    for name in names:
        torch.testing.assert_close(ref[0][name], start[name], rtol=0, atol=0)
        torch.testing.assert_close(ref[1][name], 0.6 * policy[1][name] + 0.4 * start[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(ref[2][name], ref[1][name], rtol=0, atol=0)
    assert any(not torch.equal(policy[1][name], start[name]) for name in names)


def test_grpos_synced_reference_resumes(tiny, tmp_path):
    """4 rollout steps straight, and 2 then 2 more after a resume, give the same losses and KLs: the
    checkpoint holds the reference as moved after step 2."""
    run_grpo(_synced(tiny, tmp_path / "full", 4, save_every=2), reward_fns=[digits])
    run_grpo(_synced(tiny, tmp_path / "cut", 2, save_every=2), reward_fns=[digits])
    run_grpo(_synced(tiny, tmp_path / "cut", 4, save_every=2, resume=True), reward_fns=[digits])
    for key in ("train/loss", "train/kl"):
        full, cut = ([m[key] for m in read_metrics(tmp_path / run)] for run in ("full", "cut"))
        assert cut == full and len(full) == 4


def test_grpos_reference_sync_is_refused_without_a_reference(tiny, tmp_path):
    from rlhfkit.train.config import ConfigError, LoraConfig, replace

    cfg = _synced(tiny, tmp_path, 1)
    with pytest.raises(ConfigError, match="sync_ref_model=true moves the KL's reference, and beta=0 has no KL"):
        replace(cfg, beta=0.0)
    with pytest.raises(ConfigError, match="sync_ref_model=true with LoRA"):
        replace(cfg, lora=LoraConfig(r=4))


def test_adaptive_entropy_moves_its_coefficient_by_the_steps_entropy_and_resumes(tiny, tmp_path):
    """Skywork-OR1's control (TRL's form): after each optimizer step c moves by delta, up where the
    step's mean token entropy is at or below the target, down otherwise, within [min, max]; a step
    applies c only where the entropy before it was at or below the target (none at the first). By
    hand on a stand-in run, then wired: with a target above every entropy c climbs by delta a step
    and is logged as it stands; step 1 applies none (the plain update's gradient), step 2 does; a run
    cut after step 2 and resumed goes on with the kept c and entropy."""
    from types import SimpleNamespace

    from methods_setup import even_answer_digits, method_config

    from rlhfkit.methods.grpo import EntropyBonus
    from rlhfkit.train.config import replace
    from rlhfkit.train.dist import DistInfo

    cfg = GRPOConfig(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=0.5, entropy_coef_delta=0.005,
                     entropy_coef_max=0.012)
    run = SimpleNamespace(state={}, keep={}, info=DistInfo())
    bonus = EntropyBonus(run, cfg)
    assert EntropyBonus(run, GRPOConfig(use_adaptive_entropy=True, entropy_coef=0.2, entropy_coef_min=0.1)).coef == 0.2
    assert bonus.applied == 0.0  # no entropy measured yet
    bonus.observe(entropy_sum=4.0, tokens=10.0)  # H = 0.4 <= 0.5: up, capped at 0.012
    assert bonus.coef == pytest.approx(0.012) and bonus.applied == pytest.approx(0.012)
    bonus.observe(entropy_sum=6.0, tokens=10.0)  # H = 0.6: down by delta, and not applied
    assert bonus.coef == pytest.approx(0.007) and bonus.applied == 0.0
    assert run.keep["entropy_control"] == pytest.approx((0.007, 0.6))
    run.state = {"entropy_control": [0.3, 0.1]}
    assert EntropyBonus(run, GRPOConfig(entropy_coef=0.02)).applied == 0.02  # not adaptive: the config's, as set
    assert EntropyBonus(SimpleNamespace(state={"entropy_control": [0.007, 0.6]}, keep={}, info=DistInfo()), cfg).coef \
        == 0.007
    fixed = EntropyBonus(run, GRPOConfig(entropy_coef=0.02))  # run.state's saved coefficient is not its own
    fixed.observe(1.0, 1.0)
    assert fixed.applied == 0.02

    def config(out, steps, **more):
        return replace(method_config("grpo", tiny, out, steps, log_every=1, save_every=2), mu=1, beta=0.0, **more)

    adaptive = dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=50.0, entropy_coef_delta=0.02)
    run_grpo(config(tmp_path / "full", 4, **adaptive), reward_fns=[even_answer_digits])
    run_grpo(config(tmp_path / "plain", 2), reward_fns=[even_answer_digits])
    lines = [m for m in read_metrics(tmp_path / "full") if "train/loss" in m]
    plain = [m for m in read_metrics(tmp_path / "plain") if "train/loss" in m]
    assert [m["train/entropy_coef"] for m in lines] == pytest.approx([0.03, 0.05, 0.07, 0.09])
    assert lines[0]["train/grad_norm"] == pytest.approx(plain[0]["train/grad_norm"], rel=1e-6)  # step 1: no bonus
    run_grpo(config(tmp_path / "cut", 2, **adaptive), reward_fns=[even_answer_digits])
    run_grpo(config(tmp_path / "cut", 4, train__resume=True, **adaptive), reward_fns=[even_answer_digits])
    cut = [m for m in read_metrics(tmp_path / "cut") if "train/loss" in m]
    assert [m["train/loss"] for m in cut] == [m["train/loss"] for m in lines]
    assert [m["train/entropy_coef"] for m in cut] == [m["train/entropy_coef"] for m in lines]


def test_sampled_ids_the_tokenizer_lacks_are_said_once_a_run(capsys):
    """A head padded past the vocabulary (Qwen's) can be sampled into ids that decode to nothing:
    counted over the answers' real tokens (not their padding) and said once, by the rank that saw them."""
    from rlhfkit.methods.common import say_foreign_ids
    from rlhfkit.models.tokenizer import build_char_tokenizer
    from rlhfkit.rollout.sampler import Samples
    from rlhfkit.train.config import TrainConfig
    from rlhfkit.train.dist import DistInfo
    from rlhfkit.train.run import Run

    tok = build_char_tokenizer()
    n = len(tok)
    ids = torch.tensor([[5, n, n + 3], [n + 1, 6, n + 2]])  # the last one of row 1 is padding (mask 0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    samples = Samples(ids, torch.ones_like(ids), ids, mask, torch.zeros(2, 3), torch.ones(2, dtype=torch.bool))
    run = Run(TrainConfig(), {}, DistInfo(), "grpo", "rollout step")
    say_foreign_ids(run, samples.rows(torch.tensor([0])), tok)
    say_foreign_ids(run, samples, tok)
    said = capsys.readouterr().err
    assert said.count("sampled tokens") == 1 and f"grpo: warning: 2 sampled tokens of this batch are ids >= {n}" in said
    quiet = Run(TrainConfig(), {}, DistInfo(), "grpo", "rollout step")
    say_foreign_ids(quiet, Samples(ids, torch.ones_like(ids), ids % n, mask, torch.zeros(2, 3),
                                   torch.ones(2, dtype=torch.bool)), tok)
    assert "sampled tokens" not in capsys.readouterr().err


def test_a_folders_generation_config_that_rollouts_do_not_follow_is_said_once(tiny, tmp_path, capsys):
    """An instruct model's generation_config.json asks for its own sampling settings and end ids;
    rollouts use the run's settings (as TRL's) and say so once, naming what differs, before the
    first rollout; they stop at the other end ids too (as TRL's GRPO), and say that once."""
    import shutil
    from dataclasses import replace

    from methods_setup import digits, method_config
    from transformers import GenerationConfig

    from rlhfkit.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny["base"]))
    turn_end = 7  # any id but the EOS: a template's turn end
    folder = tmp_path / "instruct"
    shutil.copytree(tiny["base"], folder)
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                     eos_token_id=[tok.eos_token_id, turn_end], pad_token_id=tok.pad_token_id).save_pretrained(folder)
    cfg = replace(method_config("grpo", tiny, tmp_path / "out", 2, log_every=1), model=str(folder), top_k=20)
    run_grpo(cfg, reward_fns=[digits])
    said = capsys.readouterr().err
    assert said.count("generation config asks for") == 1 and said.count("the other end ids") == 1
    # top_k 20 is the run's own too: not named; the others are, with the values rollouts use
    assert (f"{folder}'s generation config asks for temperature=0.7, top_p=0.8, repetition_penalty=1.05; rollouts "
            "sample with this run's temperature=1, top_p=1, repetition_penalty=1") in said
    assert (f"answers end at the tokenizer's EOS {tok.eos_token!r} and at {tok.convert_ids_to_tokens(turn_end)!r}, "
            f"the other end ids of {folder}'s generation config") in said
    run_grpo(replace(cfg, model=str(tiny["base"]), train=replace(cfg.train, out_dir=str(tmp_path / "plain"))),
             reward_fns=[digits])
    assert "generation config" not in capsys.readouterr().err  # the tiny default's asks for nothing else
