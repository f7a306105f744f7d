"""train.strategy=fsdp (FSDP2) on 2 spawned gloo ranks against one process: the same losses at
every step and the same final weights for every method, tied (Llama) and untied (Qwen2)
embeddings; sharded checkpoints that resume 2 -> 2 exactly and 2 -> 1; a plain saved folder;
per-rank memory about halved."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from methods_setup import (
    METHODS,
    RUNS,
    gkd_config,
    greedy_ppo_with_ptx,
    method_config,
    seeded_backend,
    small,
    tr_dpo_config,
)

from rlhfkit.methods.common import load_policy
from rlhfkit.models.kernels import onednn_linear_available
from rlhfkit.models.load import load_tokenizer
from rlhfkit.train.checkpoint import CheckpointError, complete_checkpoints
from rlhfkit.train.config import replace
from rlhfkit.train.logging import read_metrics

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def qwen(tiny, tmp_path_factory):
    """An untied Qwen2 of the tiny default's size and tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_tokenizer(tiny["base"])
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("qwen")
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return {"base": out, "data": tiny["data"]}


class Killed(BaseException):
    pass


def _cut_in_one_process(tiny, out: Path) -> None:
    """An fsdp run of one process killed in step 3, for the 2 ranks to resume (1 -> 2); and a
    replicated one (whole weights, no DCP), for the 2 ranks to resume under fsdp."""
    import rlhfkit.train.run as run_module

    original = run_module.Run.step_done

    def dies(self, *args, **kwargs):
        if self.done == 2:
            raise Killed
        return original(self, *args, **kwargs)

    run_module.Run.step_done = dies
    try:
        for name, strategy in (("cut12", "fsdp"), ("cut12-whole", "replicate")):
            try:
                RUNS["sft"](method_config("sft", tiny, out / name, 4, log_every=1, strategy=strategy, save_every=2))
            except Killed:
                pass
        try:  # TR-DPO, its moved reference in reference.safetensors: the 2 ranks resume it into shards
            RUNS["dpo"](tr_dpo_config(tiny, out / "dpo-tr-whole", 4, sync_steps=1, strategy="replicate", save_every=2))
        except Killed:
            pass
    finally:
        run_module.Run.step_done = original


@pytest.fixture(scope="module")
def two_ranks(tiny, qwen, tmp_path_factory):
    for method in METHODS:  # write the small data files once, before the ranks read them
        method_config(method, tiny, "unused", 1)
    small(tiny, "sft_eval.jsonl", 8)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # gloo can abort at exit; the results are written before teardown
        out = tmp_path_factory.mktemp(f"fsdp{attempt}")
        _cut_in_one_process(tiny, out)
        proc = subprocess.run([sys.executable, str(WORKER), str(out), str(Path(tiny["base"]).parent), str(qwen["base"])],
                              env=env, timeout=420, capture_output=True, text=True)
        if all((out / f"rank{r}.json").is_file() for r in range(2)):
            return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    raise AssertionError(f"the 2-rank worker wrote no results: {proc.stderr[-3000:]}")


def _losses(folder, key="train/loss") -> list[float]:
    return [m[key] for m in read_metrics(folder) if key in m]


def _assert_same_weights(a, b, atol=1e-5):
    ma, _ = load_policy(str(Path(a) / "model"), None) if (Path(a) / "model").exists() else (a, None)
    mb, _ = load_policy(str(Path(b) / "model"), None)
    start, _ = load_policy(yaml.safe_load((Path(b) / "config.yaml").read_text())["model"], None)  # where b began
    moved = 0.0
    for (name, p), q, s in zip(ma.state_dict().items(), mb.state_dict().values(), start.state_dict().values()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)
        moved = max(moved, (q - s).abs().max().item())
    assert moved > 1e-5  # the runs trained (Adam moves a weight by about lr a step): unmoved equal weights prove nothing


@pytest.mark.parametrize("model, method", [(model, method) for model in ("tiny", "qwen")  # tied and untied embeddings
                                           for method in ("sft", "rm", "dpo", "kto")] + [("tiny", "orpo")])
def test_offline_methods_on_two_sharded_ranks_equal_one_process(method, model, two_ranks, tiny, qwen, tmp_path):
    out, _ = two_ranks
    assets = {"tiny": tiny, "qwen": qwen}[model]
    RUNS[method](method_config(method, assets, tmp_path / "one", 3, log_every=1))
    sharded = out / f"{method}-{model}-fsdp"
    assert _losses(sharded) == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    assert len(_losses(sharded)) == 3
    # gradients summed, not averaged, over ranks (Adam and clipping would hide a 0.5x scale)
    norms = _losses(sharded, "train/grad_norm")
    assert norms == pytest.approx(_losses(tmp_path / "one", "train/grad_norm"), rel=1e-5) and norms[0] > 0
    if method == "kto":  # z_0 over both ranks: the same reference point (it differs from 0 by step 3)
        assert _losses(sharded, "train/kl") == pytest.approx(_losses(tmp_path / "one", "train/kl"), abs=1e-5)
        assert _losses(sharded, "train/kl")[-1] > 1e-3
    if method != "rm":  # the RM's folder is a sequence classifier
        # KTO: z_0's float noise (a mean of sums over whole answers, 1e-6 apart) moves a weight whose gradient is
        # near 0 by a share of lr through Adam's normalised step: up to 1.6e-5 of a 3e-3 move (tiny, 3 steps)
        _assert_same_weights(sharded, tmp_path / "one", atol=5e-5 if method == "kto" else 1e-5)


def test_bco_pairs_reward_shift_over_two_sharded_ranks_equals_one_process(two_ranks, tiny, tmp_path):
    out, _ = two_ranks
    RUNS["dpo"](replace(method_config("dpo", tiny, tmp_path / "one", 3, log_every=1), loss_type="bco_pair"))
    for key in ("train/loss", "train/reward_shift"):
        assert _losses(out / "dpo-bco-fsdp", key) == pytest.approx(_losses(tmp_path / "one", key), abs=1e-6), key
    assert len(_losses(out / "dpo-bco-fsdp")) == 3 and abs(_losses(tmp_path / "one", "train/reward_shift")[-1]) > 1e-3


@pytest.mark.parametrize("model", ["tiny", "qwen"])
@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo", "distill", "online_dpo"])
def test_online_methods_sharded_equal_replicated_on_the_same_samples(method, model, two_ranks):
    # Each rank samples with its own seed, so 2 ranks cannot draw one process's samples; with the
    # same ranks and seeds, fsdp and replicate (tested equal to one process) sample alike.
    out, _ = two_ranks
    sharded, replicated = out / f"{method}-{model}-fsdp", out / f"{method}-{model}-replicate"
    for key in ("train/loss", "train/grad_norm"):
        assert _losses(sharded, key) == pytest.approx(_losses(replicated, key), rel=1e-5, abs=1e-6)
    _assert_same_weights(sharded, replicated)


def test_ppos_frozen_reward_model_scores_in_fp32_sharded_under_bf16_as_replicated(two_ranks):
    """FSDP2's bf16 policy is for the models compared with the actor; the reward model keeps the
    dtype it was loaded in (frozen_dtype=fp32), so on the same samples the sharded run's raw scores
    are the replicated run's (it had scored them with bf16 parameters: 0.04628 against 0.04682)."""
    out, _ = two_ranks
    sharded, replicated = (_losses(out / f"ppo-bf16-{s}", "train/rm_score") for s in ("fsdp", "replicate"))
    assert len(sharded) == 1 and sharded == pytest.approx(replicated, abs=1e-6)


def test_distillations_token_mean_over_two_ranks_is_one_processs(two_ranks, tiny, tmp_path):
    """Each rank's loss is its tokens' divergences over the step's tokens on both ranks: on the same
    answers (seeded per prompt), 2 ranks give one process's losses, gradient norms and weights."""
    out, _ = two_ranks
    RUNS["distill"](method_config("distill", tiny, tmp_path / "one", 3, log_every=1), backend=seeded_backend(tiny))
    for key in ("train/loss", "train/grad_norm", "train/entropy"):
        assert _losses(out / "distill-seeded", key) == pytest.approx(_losses(tmp_path / "one", key), rel=1e-5)
    assert len(_losses(out / "distill-seeded")) == 3
    _assert_same_weights(out / "distill-seeded", tmp_path / "one")


def test_online_dpo_on_two_ranks_is_one_processs(two_ranks, tiny, tmp_path):
    """On answers seeded per prompt (the same on whichever rank), 2 ranks dealing the pairs out give
    one process's losses, gradient norms and weights: the loss is normalised over every rank's pairs
    (replicated; sharded equals replicated in the tests above)."""
    out, _ = two_ranks
    one = replace(method_config("online_dpo", tiny, tmp_path / "one", 3, log_every=1), ties="first")
    RUNS["online_dpo"](one, backend=seeded_backend(tiny))
    for key in ("train/loss", "train/grad_norm", "train/reward_mean"):
        assert _losses(out / "online_dpo-seeded", key) == pytest.approx(_losses(tmp_path / "one", key), rel=1e-5)
    assert len(_losses(tmp_path / "one")) == 3
    _assert_same_weights(out / "online_dpo-seeded", tmp_path / "one")


@pytest.mark.parametrize("job, tied", [("one-pair", 0.75), ("three", 0.25)])
def test_online_dpo_with_uneven_ranks_sharded_equals_replicated(two_ranks, job, tied):
    """One untied pair in all (rank 1 is dealt none), or three forwarded one a forward (dealt 2 and 1):
    the rank with fewer forwards adds some at zero weight, joining FSDP2's collectives; the steps are
    the pairs' alone, sharded or replicated, and they are taken (the loss moves off ln 2)."""
    out, _ = two_ranks
    sharded, replicated = out / f"online_dpo-{job}-fsdp", out / f"online_dpo-{job}-replicate"
    for key in ("train/loss", "train/grad_norm", "train/tied_pairs"):
        assert _losses(sharded, key) == pytest.approx(_losses(replicated, key), rel=1e-5, abs=1e-7)
    assert _losses(sharded, "train/tied_pairs") == [tied] * 3
    assert _losses(sharded, "train/update_skipped") == [0.0] * 3 and abs(_losses(sharded)[-1] - 0.6931) > 1e-3
    _assert_same_weights(sharded, replicated)


def test_grpos_reference_sync_sharded_equals_replicated(two_ranks):
    """GRPO with TR-DPO's sync after every optimizer step (mu=2: two a rollout step), each rank mixing
    its shards of the reference: the KL's reference moves as the replicated run's does (the same
    samples), so the losses, KL and weights agree; the KL is not 0 after the first moves."""
    out, _ = two_ranks
    sharded, replicated = out / "grpo-tr-fsdp", out / "grpo-tr-replicate"
    for key in ("train/loss", "train/grad_norm", "train/kl"):
        assert _losses(sharded, key) == pytest.approx(_losses(replicated, key), rel=1e-5, abs=1e-6)
    assert len(_losses(sharded)) == 3
    plain = _losses(out / "grpo-tiny-fsdp", "train/kl")  # the same run without the sync
    assert _losses(sharded, "train/kl")[1:] != pytest.approx(plain[1:], rel=1e-3)  # the reference moved
    _assert_same_weights(sharded, replicated)


def test_tr_dpo_sharded_is_one_processs_and_its_reference_resumes_from_the_shards(two_ranks, tiny, tmp_path):
    """TR-DPO under FSDP2, the reference moved every step: each rank mixes its shards, giving one
    process's losses and weights; the sharded checkpoint holds the moved reference, so one process
    resuming it for a 4th step gives the 4th step of a straight one-process run; and the 2 ranks
    resume a replicated run's checkpoint (the reference whole) into shards, to the same steps."""
    out, _ = two_ranks
    RUNS["dpo"](replace(tr_dpo_config(tiny, tmp_path / "one", 4, sync_steps=1), eval_data=small(tiny, "prefs_eval.jsonl", 16),
                        train__eval_every=3))
    # a replicated run's checkpoint (the reference whole) resumed by the 2 ranks into shards: the same steps 3, 4
    assert not (out / "dpo-tr-whole" / "checkpoints" / "step-0000002" / "dcp").exists()
    assert _losses(out / "dpo-tr-whole")[2:] == pytest.approx(_losses(tmp_path / "one")[2:], rel=1e-5)
    sharded = out / "dpo-tr"
    for key in ("train/loss", "train/grad_norm"):
        assert _losses(sharded, key) == pytest.approx(_losses(tmp_path / "one", key)[:3], rel=1e-5)
    # the held-out accuracy at step 3, against the moved reference: the sharded run's is one process's
    assert _losses(sharded, "eval/preference_accuracy") == _losses(tmp_path / "one", "eval/preference_accuracy")[:1]
    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed)
    RUNS["dpo"](replace(tr_dpo_config(tiny, resumed, 4, sync_steps=1, strategy="fsdp", resume=True),
                        eval_data=small(tiny, "prefs_eval.jsonl", 16), train__eval_every=3))
    assert _losses(resumed)[3] == pytest.approx(_losses(tmp_path / "one")[3], rel=1e-5)
    _assert_same_weights(resumed, tmp_path / "one")
    plain = tmp_path / "plain"  # a sharded DPO run without the sync, forced on: its checkpoint has no reference
    shutil.copytree(out / "dpo-tiny-fsdp", plain)
    with pytest.raises(CheckpointError, match=r"step-0000003 holds no reference: it was written by a run that did not "
                                              "keep it"):
        RUNS["dpo"](tr_dpo_config(tiny, plain, 4, sync_steps=1, strategy="fsdp", resume="force"))


@pytest.mark.parametrize("data", [False, True])
def test_gkds_mix_sharded_is_one_processs(data, two_ranks, tiny, tmp_path):
    """lmbda=0.5 under FSDP2, every answer greedy: with seq_kd the teacher samples on an unsharded copy
    of its own (a sharded module would gather its weights inside the sampling loop); without it each
    rank reads its rows' answers. The same steps on the same answers as one process."""
    out, _ = two_ranks
    RUNS["distill"](gkd_config(tiny, tmp_path / "one", data))
    sharded = out / f"distill-gkd-{data}"
    for key in ("train/loss", "train/grad_norm", "train/completion_len_mean"):
        assert _losses(sharded, key) == pytest.approx(_losses(tmp_path / "one", key), rel=1e-5)
    assert _losses(sharded, "train/student_answers") == [0.0, 1.0, 1.0]
    _assert_same_weights(sharded, tmp_path / "one")


def test_ppos_token_means_and_explained_variance_on_two_ranks_are_one_processs(two_ranks, tiny, tmp_path):
    """Each rank had logged its own token means and explained variance, averaged over the ranks:
    at step 1 a policy loss of -0.006 where one process has 0 (advantages whitened over all)."""
    out, _ = two_ranks
    RUNS["ppo"](greedy_ppo_with_ptx(tiny, tmp_path / "one"))
    keys = ("loss", "grad_norm", "policy_loss", "value_loss", "entropy", "approx_kl", "policy_clip_frac",
            "value_clip_frac", "explained_variance", "ptx_loss", "rm_score", "kl")
    apart = {key: (_losses(out / "ppo-greedy", f"train/{key}"), _losses(tmp_path / "one", f"train/{key}"))
             for key in keys}
    assert {k: v for k, v in apart.items() if v[0] != pytest.approx(v[1], abs=1e-5)} == {}
    assert abs(_losses(tmp_path / "one", "train/policy_loss")[0]) < 1e-6  # whitened over the whole batch


def test_dynamic_sampling_fills_both_ranks_shares_on_two_sharded_ranks(two_ranks):
    """Only even answers give a signal: the ranks sample more rounds (as many on both: none hangs)
    until each holds its 2 of the 4 groups with a signal."""
    out, _ = two_ranks
    fills = _losses(out / "grpo-dynamic", "train/informative_fill")
    rounds = _losses(out / "grpo-dynamic", "train/sampling_rounds")
    assert fills == [1.0] * 3 and max(rounds) > 1 and all(r == int(r) for r in rounds)


def test_beta_zero_leaves_groups_without_a_signal_out_on_two_replicated_ranks_alike(two_ranks):
    """Each rank leaves out its own groups without a signal (a rank with none forwards one): the
    summed gradients, and so the losses and norms, equal those of forwarding every row."""
    out, _ = two_ranks
    skip, every = out / "grpo-skip-True", out / "grpo-skip-False"
    assert min(_losses(skip, "train/update_rows_forwarded")) < 1.0
    assert _losses(every, "train/update_rows_forwarded") == [1.0] * 3
    for key in ("train/loss", "train/grad_norm"):
        assert _losses(skip, key) == pytest.approx(_losses(every, key), rel=1e-5, abs=1e-7)


def test_the_groups_with_a_signal_are_dealt_evenly_over_two_replicated_ranks(two_ranks):
    """With beta 0 only the groups with a signal are forwarded, and they are dealt so that each
    rank forwards about as many tokens: both ranks deal alike, every group once, the ranks' loads
    apart by at most one group's, and the update the same as each rank forwarding its own."""
    out, ranks = two_ranks
    deals = [r["balanced"]["deals"] for r in ranks]
    assert deals[0] == deals[1] and len(deals[0]) == 3  # one deal a step, the same on both ranks
    group_size = 4  # methods_setup's GRPO
    for step, deal in enumerate(deals[0]):
        loads, shares = deal["loads"], deal["shares"]
        assert sorted(shares[0] + shares[1]) == list(range(len(loads)))
        totals = [sum(loads[g] for g in share) for share in shares]
        assert abs(totals[0] - totals[1]) <= max(loads, default=0)
        for rank, share in enumerate(shares):  # a rank dealt none forwards one group, with no gradient
            assert ranks[rank]["balanced"]["forwarded"][step] == group_size * max(len(share), 1)
    # some group was forwarded by the rank that did not sample it
    assert any(deal["owners"][g] != r for deal in deals[0] for r, share in enumerate(deal["shares"]) for g in share)
    balanced, own, every = (out / "grpo-skip-True", out / "grpo-skip-True-own", out / "grpo-skip-False")
    for key in ("train/loss", "train/grad_norm"):
        assert _losses(balanced, key) == pytest.approx(_losses(own, key), rel=1e-5, abs=1e-7)
        assert _losses(balanced, key) == pytest.approx(_losses(every, key), rel=1e-5, abs=1e-7)
    _assert_same_weights(balanced, own, atol=1e-6)


def test_grpo_minibatches_on_two_ranks_are_normalised_over_both_ranks_rows(two_ranks):
    """minibatch_size=2 of 4 prompts on 2 ranks: each step holds one prompt of each rank, and its
    loss's normaliser counts both ranks' sequences: with a negligible step the whole batch's
    gradient (the ranks' summed; beta 0 deals groups between them) is the mean of its two steps'
    (the same samples: the same seeds)."""
    out, _ = two_ranks
    ranks = [torch.load(out / f"grads-rank{rank}.pt") for rank in range(2)]
    whole, halves = ([sum(step) for step in zip(*(r[name] for r in ranks))]
                     for name in ("grpo-minibatch-None", "grpo-minibatch-2"))
    assert len(whole) == 2 and len(halves) == 4
    for step in range(2):
        torch.testing.assert_close((halves[2 * step] + halves[2 * step + 1]) / 2, whole[step], atol=1e-7, rtol=1e-5)
    assert max(float(g.abs().max()) for g in whole) > 1e-4


def test_every_rank_takes_rank_0s_kernel_choice(two_ranks):
    """Rank 0's timing chose oneDNN, rank 1's would have chosen BLAS: both compute alike."""
    _, ranks = two_ranks
    if not onednn_linear_available():
        pytest.skip("no oneDNN in this PyTorch build")
    assert [r["linear_kernel"] for r in ranks] == ["onednn", "onednn"]


def test_sharded_checkpoints_resume_2_to_2_exactly_and_2_to_1_and_1_to_2(two_ranks, tiny, tmp_path):
    out, _ = two_ranks
    full = _losses(out / "full")
    assert len(full) == 4 and _losses(out / "cut22")[2:] == full[2:]  # bit for bit
    assert _losses(out / "cut12")[2:] == pytest.approx(full[2:], abs=1e-6)  # one process's shards on 2 ranks
    assert not (out / "cut12-whole" / "checkpoints" / "step-0000002" / "dcp").exists()
    assert _losses(out / "cut12-whole")[2:] == pytest.approx(full[2:], abs=1e-6)  # a replicated run's, under fsdp
    for method in ("grpo", "ppo"):  # 2 replicated ranks, each with its own sampling RNG (#17)
        online = _losses(out / f"{method}-full")
        assert len(online) == 4 and _losses(out / f"{method}-cut")[2:] == online[2:] and online[3] != online[2]
        _assert_same_weights(out / f"{method}-full", out / f"{method}-cut", atol=0)
    assert (out / "cut21" / "checkpoints" / "step-0000002" / "dcp").is_dir()
    one = tmp_path / "cut21"
    shutil.copytree(out / "cut21", one)
    cfg = method_config("sft", tiny, one, 4, log_every=1, strategy="fsdp", save_every=2)
    RUNS["sft"](replace(cfg, train__resume=True))  # one process, the 2-rank shards
    assert _losses(one)[2:] == pytest.approx(full[2:], abs=1e-6)


def test_eval_steps_of_a_sharded_run_are_checkpointed_and_resume_as_the_straight_run(two_ranks, tiny, tmp_path):
    """save_every=100, an eval every 2 steps: step 2's checkpoint, written before its eval and
    completed after it, is kept until step 4's is complete; resumed from it in one process (the run
    killed in step 3), the run ends with the straight run's losses and evals."""
    out, _ = two_ranks
    full, evals = _losses(out / "full"), [m for m in read_metrics(out / "evals") if "eval/loss" in m]
    assert _losses(out / "evals") == full and [m["step"] for m in evals] == [2, 4]  # evals leave training alone
    assert [p.name for p in complete_checkpoints(out / "evals")] == ["step-0000004"]
    assert [p.name for p in complete_checkpoints(out / "evals-cut")] == ["step-0000002"]
    state = json.loads((out / "evals-cut" / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["pending_eval"] is False and state["rng_after_eval"] and [e["step"] for e in state["evals"]] == [2]
    one = tmp_path / "evals-cut"
    shutil.copytree(out / "evals-cut", one)
    cfg = method_config("sft", tiny, one, 4, log_every=1, strategy="fsdp", save_every=100)
    resumed = RUNS["sft"](replace(cfg, train__resume=True, train__eval_every=2, eval_data=small(tiny, "sft_eval.jsonl", 8),
                                  eval_max_new_tokens=4))
    assert _losses(one)[2:] == pytest.approx(full[2:], abs=1e-6)
    assert [e["step"] for e in resumed["evals"]] == [2, 4]
    assert resumed["evals"][1]["loss"] == pytest.approx(evals[1]["eval/loss"], abs=1e-5)
    assert [p.name for p in complete_checkpoints(one)] == ["step-0000004"]
    # an eval step's training line comes before its eval's, in one process (steps 3-4 here) as on 2 ranks
    order = [[(m["step"], "eval/loss" in m) for m in read_metrics(folder)] for folder in (one, out / "evals")]
    assert order[0] == order[1] == [(1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]


def test_the_saved_folder_of_a_sharded_run_is_plain_and_holds_the_trained_weights(two_ranks, tiny):
    from transformers import AutoModelForCausalLM

    from rlhfkit.train.checkpoint import latest_checkpoint, load_checkpoint
    from rlhfkit.train.optim import build_optimizer, build_scheduler

    out, _ = two_ranks
    plain = AutoModelForCausalLM.from_pretrained(str(out / "sft-tiny-fsdp" / "model"))
    assert type(plain).__name__ == "LlamaForCausalLM"
    model, _ = load_policy(str(tiny["base"]), None)
    optimizer = build_optimizer(model, 1e-3)
    load_checkpoint(latest_checkpoint(out / "sft-tiny-fsdp"), model, optimizer, build_scheduler(optimizer, 3, 0,
                                                                                                 "constant"))
    for (name, p), q in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), name


def test_per_rank_parameter_and_optimizer_bytes_about_halve(two_ranks, tiny, tmp_path, monkeypatch):
    import rlhfkit.train.run as run_module

    out, ranks = two_ranks
    seen = {}
    original = run_module.Run.step_done

    def measuring(self, *args, **kwargs):
        seen.setdefault("one", self.resident_bytes())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "step_done", measuring)
    RUNS["sft"](method_config("sft", tiny, tmp_path / "one", 1))
    for r in ranks:
        sharded = r["bytes"][str(out / "sft-tiny-fsdp")]
        print(json.dumps({"per_rank_bytes": sharded, "one_process_bytes": seen["one"]}))
        assert sharded <= 0.55 * seen["one"], (sharded, seen["one"])
