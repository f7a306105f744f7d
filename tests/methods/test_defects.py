"""Defects found by an independent check of the methods' data paths, each pinned by a test."""

import json

import datasets
import pytest
import torch
from helpers import quiet_train
from methods_setup import method_config, reward_folder, small

import rlhfkit.train.run as run_module
from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.methods.dpo import run_dpo
from rlhfkit.methods.grpo import run_grpo
from rlhfkit.methods.ppo import PPOConfig, evaluate, load_models
from rlhfkit.methods.sft import SFTConfig, run_sft
from rlhfkit.models.reward import reward_scores
from rlhfkit.rollout.backend import SamplerBackend
from rlhfkit.rollout.evaluate import HeldOut
from rlhfkit.train.config import replace
from rlhfkit.train.logging import read_metrics


def test_dpo_refuses_tied_rankings_before_loading_a_model(tiny, tmp_path):
    tied = tmp_path / "tied.jsonl"
    tied.write_text(json.dumps({"prompt": "What is 1+1?", "completions": [" 2", " 3", " 4"], "ranks": [0, 1, 1]}) + "\n")
    cfg = replace(method_config("dpo", tiny, tmp_path / "d", 1), train_data=str(tied))
    with pytest.raises(DataError, match=r"tied.jsonl:1: field 'ranks' has ties"):
        run_dpo(cfg)
    assert not (tmp_path / "d" / "metrics.jsonl").exists()


class Killed(BaseException):
    pass


def test_dpo_with_sft_first_resumes_against_the_same_reference(tiny, tmp_path, monkeypatch):
    def cfg(out):
        return replace(method_config("dpo", tiny, out, 4, save_every=2), sft_first_steps=5, reference="forward")

    run_dpo(cfg(tmp_path / "full"))
    original = run_module.Run.step_done

    def dies(self, *args, **kwargs):
        if self.name == "dpo" and self.done == 2:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "step_done", dies)
    with pytest.raises(Killed):
        run_dpo(cfg(tmp_path / "cut"))
    monkeypatch.setattr(run_module.Run, "step_done", original)
    run_dpo(replace(cfg(tmp_path / "cut"), train__resume=True))
    full, cut = (read_metrics(tmp_path / p) for p in ("full", "cut"))
    # Before the fix the resumed run rebuilt its reference from the un-tuned model: another objective.
    assert [m["train/loss"] for m in cut][2:] == [m["train/loss"] for m in full][2:]


def test_dapo_dropping_every_group_skips_the_update_without_crashing(tiny, tmp_path):
    cfg = replace(method_config("grpo", tiny, tmp_path / "g", 2), dynamic_sampling=True, loss_type="dapo")
    summary = run_grpo(cfg, reward_fns=[lambda prompts, completions, **_: [0.5] * len(completions)])
    logged = [m for m in read_metrics(tmp_path / "g") if "train/reward_mean" in m]
    assert [m["train/update_skipped"] for m in logged] == [1.0, 1.0]
    assert [m["train/zero_advantage_groups"] for m in logged] == [1.0, 1.0]
    # every round allowed was sampled in search of a signal, and none was found
    assert [(m["train/sampling_rounds"], m["train/informative_fill"]) for m in logged] == [(4.0, 0.0)] * 2
    assert summary["optimizer_steps"] == 0


def test_ppo_eval_scores_the_generated_tokens_as_they_are(tiny):
    base = str(tiny["base"])
    cfg = PPOConfig(model=base, reward_model=reward_folder(tiny), critic=base, eval_max_new_tokens=5,
                    eval_data=str(tiny["data"] / "prompts_eval.jsonl"))
    models, tok = load_models(cfg)
    rows = HeldOut(read_rows(tiny["data"] / "prompts_eval.jsonl")[:6])
    result = evaluate(models, SamplerBackend(tok, models["actor"]), tok, rows, cfg)
    by_hand = []
    for row in rows.rows:  # prompt + greedy tokens, no EOS appended, no decode/re-encode round trip
        ids = tok(row.data["prompt"])["input_ids"]
        for _ in range(5):
            logits = models["actor"](torch.tensor([ids])).logits[0, -1]
            ids = ids + [int(logits.argmax())]
            if ids[-1] == tok.eos_token_id:
                break
        by_hand.append(reward_scores(models["reward"], torch.tensor([ids]), torch.ones(1, len(ids))).item())
    assert result["rm_score"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


def test_a_datasets_dataset_as_train_data_trains_checkpoints_and_saves(tiny, tmp_path):
    rows = [json.loads(line) for line in open(small(tiny, "sft_train.jsonl"))]
    cfg = replace(method_config("sft", tiny, tmp_path / "s", 2, save_every=1), train_data=datasets.Dataset.from_list(rows))
    run_sft(cfg)
    assert (tmp_path / "s" / "model" / "config.json").is_file()
    written = (tmp_path / "s" / "config.yaml").read_text()
    assert "train_data: <datasets.arrow_dataset.Dataset, 64 rows>" in written


def test_sft_eval_without_integer_answers_checks_against_the_reference(tiny, tmp_path):
    eval_rows = tmp_path / "words.jsonl"
    eval_rows.write_text("".join(json.dumps({"prompt": f"Say {w}:", "completion": f" {w}"}) + "\n"
                                 for w in ("yes", "no", "maybe")))
    cfg = SFTConfig(model=str(tiny["base"]), train_data=small(tiny, "sft_train.jsonl"), eval_data=str(eval_rows),
                    max_length=64, train=quiet_train(tmp_path / "w", max_steps=2, batch_size=8))
    summary = run_sft(cfg)  # before: trained, then failed at the end with "no 'answer' field"
    assert summary["accuracy"] == 0.0 and summary["eval_loss"] > 1.0  # the untrained model matches none
    strict = replace(cfg, eval_task="arithmetic", train__out_dir=str(tmp_path / "x"))
    with pytest.raises(DataError, match=r"words.jsonl:1: no integer 'answer'"):
        run_sft(strict)  # refused at the start, before any training
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
