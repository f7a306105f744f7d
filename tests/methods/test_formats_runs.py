"""Each method runs on TRL's conversational formats end to end, from the inputs a user has:
a saved DatasetDict folder (CLI), datasets.Dataset objects (API); RPO's NLL term in DPO."""

import math
import os
import subprocess
import sys

import datasets
import pytest
import torch
from helpers import quiet_train

from rlhfkit.data.prefs import collate_rankings, encode_rankings
from rlhfkit.data.rows import read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.methods.dpo import DPOConfig, DPOLoss, dpo_objective, run_dpo
from rlhfkit.methods.grpo import GRPOConfig, run_grpo
from rlhfkit.methods.rm import RMConfig, run_rm
from rlhfkit.models.rankings import precompute_reference
from rlhfkit.train.logging import read_metrics


def rlhfkit(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def _chat(q, a=None):
    user = {"role": "user", "content": f"What is {q}?"}
    return [user] if a is None else [user, {"role": "assistant", "content": f" {a}"}]


def test_sft_cli_on_multi_turn_messages_from_a_saved_dataset_dict(tiny, tmp_path):
    rows = [{"messages": _chat("1+2", 3) + _chat("2+2", 4)}, {"messages": _chat("5-1", 4)}] * 8
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "chat"))
    out = rlhfkit("sft", f"model={tiny['base']}", f"train_data={tmp_path / 'chat'}:train", "max_length=64",
                  f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=4",
                  "train.progress=false", "train.report_to=none", "train.plots=false")
    assert out.returncode == 0, out.stderr
    out = rlhfkit("sft", f"model={tiny['base']}", "train_data=trl-lib/Capybara", f"train.out_dir={tmp_path / 'x'}")
    assert out.returncode == 2 and "trl-lib/Capybara: a Hub dataset name needs the network" in out.stderr


def test_rm_on_conversational_implicit_preference_dataset(tiny, tmp_path, capsys):
    rows = [{"chosen": _chat(f"{a}+1", a + 1), "rejected": _chat(f"{a}+1", a + 2)} for a in range(16)]
    too_long = {"chosen": _chat("1+1", "2" * 80), "rejected": _chat("1+1", 3)}  # a held-out row is skipped, and said so
    summary = run_rm(RMConfig(model=str(tiny["base"]), train_data=datasets.Dataset.from_list(rows), max_length=64,
                              eval_data=datasets.Dataset.from_list(rows[:4] + [too_long]),
                              train=quiet_train(tmp_path / "rm", max_steps=2, batch_size=8)))
    assert "(held out, over-long rows skipped): 5 rows, 0 truncated, 1 skipped" in capsys.readouterr().err
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = str(tmp_path / "rm" / "model")  # plain transformers on the whole conversations: the same accuracy
    plain, tok = AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def score(messages) -> float:
        ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            return plain(**ids).logits.item()

    right = [score(r["chosen"]) > score(r["rejected"]) for r in rows[:4]]
    assert summary["steps"] == 2 and summary["pairwise_accuracy"] == sum(right) / 4


def test_dpo_on_conversational_pairs_with_rpo_alpha(tiny, tmp_path):
    rows = [{"prompt": _chat(f"{a}+1"), "chosen": _chat("", a + 1)[1:], "rejected": _chat("", a + 2)[1:]}
            for a in range(16)]
    summary = run_dpo(DPOConfig(model=str(tiny["base"]), train_data=datasets.Dataset.from_list(rows), max_length=64,
                                rpo_alpha=1.0, train=quiet_train(tmp_path / "dpo", max_steps=2, batch_size=8)))
    first = read_metrics(tmp_path / "dpo")[0]  # step 1: the policy is its reference, so DPO's part is ln 2
    assert summary["steps"] == 2 and first["train/nll_chosen"] > 0.5
    assert first["train/loss"] == pytest.approx(math.log(2) + 1.0 * first["train/nll_chosen"], abs=1e-5)


def test_rpo_adds_alpha_times_the_chosen_tokens_nll(tiny):
    model, tok = load_policy(str(tiny["base"]), None)
    examples, _ = encode_rankings(read_rows(tiny["data"] / "prefs_train.jsonl")[:4], tok, 64)
    batch = collate_rankings(precompute_reference(model, examples, tok.pad_token_id), tok.pad_token_id)
    plain, rpo = dpo_objective(DPOLoss(beta=0.5)), dpo_objective(DPOLoss(beta=0.5, rpo_alpha=0.3))
    with torch.no_grad():
        base, _ = plain.loss(model, batch, plain.counts(batch))
        totals = rpo.counts(batch)
        value, metrics = rpo.loss(model, batch, totals)
    chosen_tokens = sum(len(e.completion_ids[0]) for e in examples)
    assert totals["chosen_tokens"] == chosen_tokens
    # the NLL by hand: -sum of the chosen answers' summed log-probs / their token count
    nll = -sum(r[0] for r in (e.ref_logps for e in precompute_reference(model, examples, tok.pad_token_id))) \
        / chosen_tokens
    assert abs(metrics["nll_chosen"].item() - nll) < 1e-5
    assert abs(value.item() - (base.item() + 0.3 * nll)) < 1e-5 and abs(base.item() - 0.693147) < 1e-5


def test_grpo_on_conversational_prompts_rewards_see_the_prompt_as_written(tiny, tmp_path):
    rows = [{"prompt": _chat(f"{a}+1"), "answer": a + 1} for a in range(8)]
    seen = []

    def record(prompts, completions, answer=None, **_):
        seen.extend(prompts)
        return [float(len(c) < 4) for c in completions]

    run_grpo(GRPOConfig(model=str(tiny["base"]), train_data=datasets.Dataset.from_list(rows), group_size=2,
                        prompts_per_step=4, max_new_tokens=4, beta=0.0,
                        train=quiet_train(tmp_path / "grpo", max_steps=1)), reward_fns=[record])
    assert len(seen) == 8 and all(p in [r["prompt"] for r in rows] for p in seen)
    assert all(p == [{"role": "user", "content": p[0]["content"]}] for p in seen)  # the messages, as written


def test_grpo_calls_trl_style_rewards_by_name_with_ids_state_and_chat_completions(tiny, tmp_path):
    """TRL's reward signature: every argument by name, the completions of chat prompts as one
    assistant message each, ``completion_ids`` (decoding to the completion's text) and
    ``trainer_state`` (optimizer steps done: 0, then mu = 2)."""
    from rlhfkit.models.load import load_tokenizer

    rows = [{"prompt": _chat(f"{a}+1"), "solution": str(a + 1)} for a in range(8)]
    seen = []

    def accuracy(completions, solution, **kwargs):  # as TRL's docs write one
        seen.append((completions, solution, kwargs))
        return [c[0]["content"].strip() == s for c, s in zip(completions, solution)]  # bools, as TRL allows

    run_grpo(GRPOConfig(model=str(tiny["base"]), train_data=datasets.Dataset.from_list(rows), group_size=2,
                        prompts_per_step=4, max_new_tokens=4, beta=0.0, mu=2,
                        train=quiet_train(tmp_path / "grpo", max_steps=2)), reward_fns=[accuracy])
    tok = load_tokenizer(str(tiny["base"]))
    assert [kw["trainer_state"].global_step for _, _, kw in seen] == [0, 2]
    assert all(kw["trainer_state"].max_steps == 4 for _, _, kw in seen)
    for completions, solution, kw in seen:
        assert len(completions) == len(solution) == 8 and set(kw) >= {"prompts", "completion_ids", "trainer_state"}
        assert all(c == [{"role": "assistant", "content": c[0]["content"]}] for c in completions)
        assert [tok.decode(ids, skip_special_tokens=True) for ids in kw["completion_ids"]] == [
            c[0]["content"] for c in completions]
        assert all(p in [r["prompt"] for r in rows] for p in kw["prompts"])


def test_sft_held_out_conversational_answers_and_text_rows(tiny, tmp_path):
    """TRL's conversational prompt-completion rows as eval data give the accuracy (the reference is
    the assistant message's content) and the loss; language-modeling ``text`` rows give the loss
    alone, the held-out NLL of the final model."""
    from rlhfkit.methods.sft import SFTConfig, run_sft

    chat = [{"prompt": _chat(f"{a}+1"), "completion": _chat("", a + 1)[1:]} for a in range(16)]
    text = [{"text": f"What is {a}+1? {a + 1}"} for a in range(4)]
    base = dict(model=str(tiny["base"]), train_data=datasets.Dataset.from_list(chat), max_length=64,
                eval_max_new_tokens=4)
    summary = run_sft(SFTConfig(**base, eval_data=datasets.Dataset.from_list(chat[:4]),
                                train=quiet_train(tmp_path / "chat", max_steps=2, batch_size=8)))
    assert summary["accuracy"] == 0.0 and summary["eval_loss"] > 0  # 2 steps from random weights: no right answer
    summary = run_sft(SFTConfig(**base, eval_data=datasets.Dataset.from_list(text),
                                train=quiet_train(tmp_path / "text", max_steps=2, batch_size=8)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain, tok = (cls.from_pretrained(str(tmp_path / "text" / "model")) for cls in (AutoModelForCausalLM, AutoTokenizer))
    nll = tokens = 0.0
    for row in text:  # plain transformers: each text and its EOS, every token after the first predicted
        ids = torch.tensor([tok(row["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            logits = plain(input_ids=ids).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    assert summary["accuracy"] is None and abs(summary["eval_loss"] - nll / tokens) < 1e-5
