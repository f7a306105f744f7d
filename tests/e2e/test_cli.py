"""The command line as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhfkit.train.logging import read_metrics

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def rlhfkit(*args, timeout=300, env=ENV):
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_help_lists_the_commands():
    out = rlhfkit("--help")
    assert out.returncode == 0
    for command in ("sft", "eval", "demo", "tiny"):
        assert command in out.stdout


def test_tiny_leaves_a_folder_that_holds_files_alone_unless_forced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("edited by hand")
    out = rlhfkit("tiny", "--out", tmp_path / "mine", "--hidden", 16, "--layers", 1)
    assert out.returncode == 2 and "already holds files" in out.stderr and "--force" in out.stderr
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    out = rlhfkit("tiny", "--out", tmp_path / "mine", "--hidden", 16, "--layers", 1, "--force")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mine" / "base" / "config.json").is_file()
    # the Python API alike: write_tiny_default leaves a folder with files alone unless asked to overwrite
    import pytest

    from rlhfkit.models.tiny import TinySpec, write_tiny_default

    (tmp_path / "mine" / "notes.txt").write_text("edited again")
    with pytest.raises(FileExistsError, match="already holds files"):
        write_tiny_default(tmp_path / "mine", TinySpec(hidden_size=16, num_layers=1, intermediate_size=64))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "edited again"
    paths = write_tiny_default(tmp_path / "mine", TinySpec(hidden_size=16, num_layers=1, intermediate_size=64),
                               overwrite=True)
    assert (paths["base"] / "config.json").is_file()


def test_sft_then_eval_then_plain_transformers(tiny, sft_run, tmp_path):
    data = tiny["data"]
    run = tmp_path / "run"
    out = rlhfkit("sft", "--config", "sft_tiny", f"model={tiny['base']}", f"train_data={data / 'sft_train.jsonl'}",
                  f"eval_data={data / 'sft_eval.jsonl'}", "eval_limit=50", f"train.out_dir={run}",
                  "train.max_steps=30", "train.batch_size=32", "train.eval_every=0", "train.progress=false",
                  "train.log_every=1")
    assert out.returncode == 0, out.stderr
    losses = [m["train/loss"] for m in read_metrics(run) if "train/loss" in m]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5  # it learns the format quickly
    assert (run / "checkpoints" / "step-0000030" / "COMPLETE").is_file()
    assert json.loads((run / "result.json").read_text())["steps"] == 30

    # the CLI reports what the API does, on a model that answers some right (the SFT snapshot)
    snapshot = sft_run["out"] / "snapshot"
    ev = rlhfkit("eval", "--model", snapshot, "--data", data / "prompts_eval.jsonl", "--limit", 40,
                 "--max-new-tokens", 8, "--out", tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    from rlhfkit.data.rows import read_rows
    from rlhfkit.methods.common import load_policy
    from rlhfkit.rollout.evaluate import exact_match

    trained, tok = load_policy(str(snapshot), None)
    in_process = exact_match(trained, tok, read_rows(data / "prompts_eval.jsonl")[:40], 8)
    assert result["n"] == 40 and 0 < result["accuracy"] == in_process["accuracy"] < 1

    # The output folder is an ordinary transformers folder.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run / "model"))
    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    ids = torch.tensor([tok("What is 12+34?")["input_ids"]])
    from rlhfkit.methods.common import load_policy

    ours, _ = load_policy(str(run / "model"), None)
    assert torch.allclose(model(ids).logits, ours(ids).logits, atol=1e-6)


def test_model_without_tokenizer_and_separate_tokenizer(tiny, tmp_path):
    from rlhfkit.methods.common import load_policy

    bare = tmp_path / "bare"
    model, _ = load_policy(str(tiny["base"]), None)
    model.save_pretrained(str(bare))  # weights and config only
    out = rlhfkit("eval", "--model", bare, "--data", tiny["data"] / "prompts_eval.jsonl", "--limit", 4)
    assert out.returncode == 2 and "without a tokenizer: pass tokenizer=PATH" in out.stderr
    out = rlhfkit("eval", "--model", bare, "--tokenizer", tiny["tokenizer"], "--data",
                  tiny["data"] / "prompts_eval.jsonl", "--limit", 4, "--out", tmp_path / "ev")
    assert out.returncode == 0, out.stderr


def test_bad_data_fails_clearly(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "completion": " 2"}\n{"prompt": "What is 2+2?"}\n')
    out = rlhfkit("sft", f"model={tiny['base']}", f"train_data={bad}", f"train.out_dir={tmp_path / 'o'}")
    assert out.returncode == 2
    assert f"{bad}:2: missing field 'completion'" in out.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = rlhfkit("sft", f"model={tiny['base']}", f"train_data={empty}", f"train.out_dir={tmp_path / 'o'}")
    assert out.returncode == 2 and "holds no rows" in out.stderr
    out = rlhfkit("sft", f"model={tiny['base']}", f"train_data={empty}", "train.lr=fast")
    assert out.returncode == 2 and "train.lr" in out.stderr
    corrupt = tmp_path / "bad.parquet"  # the datasets library logged its own line before rlhfkit's
    corrupt.write_bytes(b"PAR1garbage")
    out = rlhfkit("sft", f"model={tiny['base']}", f"train_data={corrupt}", f"train.out_dir={tmp_path / 'o'}")
    assert out.returncode == 2 and "Failed to read schema" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"rlhfkit sft: error: {corrupt}: not a readable parquet file")
    good = tmp_path / "good.jsonl"  # a bad kernel switch: one line too, not a traceback
    good.write_text('{"prompt": "What is 1+1?", "completion": " 2"}\n')
    out = rlhfkit("sft", f"model={tiny['base']}", f"train_data={good}", f"train.out_dir={tmp_path / 'k'}",
                  "train.max_steps=1", env={**ENV, "RLHFKIT_FAST_LINEAR": "yes"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "rlhfkit sft: error: RLHFKIT_FAST_LINEAR='yes': use auto, 1" in out.stderr


def test_tokenizer_too_big_for_the_embedding_is_refused(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    small.save_pretrained(str(tmp_path / "small"))
    out = rlhfkit("eval", "--model", tmp_path / "small", "--tokenizer", tiny["tokenizer"], "--data",
                  tiny["data"] / "prompts_eval.jsonl")
    assert out.returncode == 2 and "embedding table has only 50 rows" in out.stderr


def test_torchrun_two_ranks_match_one_process(tiny, tmp_path):
    """DDP-style gloo run on 2 CPU ranks gives the same losses as 1 process, same global batch."""
    common = [f"model={tiny['base']}", f"train_data={tiny['data'] / 'sft_train.jsonl'}", "max_length=64",
              "train.max_steps=4", "train.batch_size=16", "train.lr=3e-3", "train.progress=false",
              "train.report_to=none", "train.log_every=1"]
    single = rlhfkit("sft", *common, f"train.out_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr
    one = [m["train/loss"] for m in read_metrics(tmp_path / "one")]

    def two_ranks(out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rlhfkit.cli.main", "sft", *common, "train.micro_batch_size=4", f"train.out_dir={out}"]
        try:
            stdout = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV).stdout
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout or ""  # gloo sometimes hangs at teardown on 2 cores; the metrics were written before it
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        path = out / "metrics.jsonl"
        return ([m["train/loss"] for m in read_metrics(out)] if path.exists() else []), stdout

    two, stdout = two_ranks(tmp_path / "two")
    if len(two) != 4:  # one retry, as multi-process gloo runs here sometimes abort
        two, stdout = two_ranks(tmp_path / "two-retry")
    assert len(two) == 4
    assert stdout.count('"steps_unit"') == 1  # the summary, from rank 0 only
    assert torch.allclose(torch.tensor(one), torch.tensor(two), atol=1e-5), (one, two)
    assert one[-1] < one[0]


def test_rm_cli_then_eval_reports_pairwise_accuracy(tiny, tmp_path):
    data = tiny["data"]
    out = rlhfkit("rm", "--config", "rm_tiny", f"model={tiny['base']}", f"train_data={data / 'rankings_train.jsonl'}",
                  f"eval_data={data / 'rankings_eval.jsonl'}", "eval_limit=50", f"train.out_dir={tmp_path / 'rm'}",
                  "train.max_steps=20", "train.batch_size=8", "train.progress=false")
    assert out.returncode == 0, out.stderr
    # the fresh score head is the point of the run: no load report of its missing weights, no bars
    assert "MISSING" not in out.stderr and "Loading weights" not in out.stderr, out.stderr
    from rlhfkit.data.rows import read_rows

    n_eval = len(read_rows(data / "rankings_eval.jsonl"))  # eval_limit=50 of them: said, not silent
    assert f"rankings_eval.jsonl: the first 50 of {n_eval} rows are used (eval_limit=50" in out.stderr, out.stderr
    config = json.loads((tmp_path / "rm" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    ev = rlhfkit("eval", "--model", tmp_path / "rm" / "model", "--data", data / "rankings_eval.jsonl", "--limit", 40)
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "rm" / "model" / "eval.json").read_text())
    from rlhfkit.data.prefs import encode_rankings
    from rlhfkit.data.rows import read_rows
    from rlhfkit.methods.rm import ranking_metrics
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_reward_model

    tok = load_tokenizer(tmp_path / "rm" / "model")
    examples, _ = encode_rankings(read_rows(data / "rankings_eval.jsonl")[:40], tok, 512)
    in_process = ranking_metrics(load_reward_model(tmp_path / "rm" / "model", tok), examples, tok.pad_token_id)
    assert result["pairs"] == in_process["pairs"] > 40 * 6
    assert (result["pairwise_accuracy"], result["kendall_tau"]) == (in_process["pairwise_accuracy"],
                                                                    in_process["kendall_tau"])
    # over-long rows: the error names the row and eval's own flag; --overlong skip says what it dropped
    ev = rlhfkit("eval", "--model", tmp_path / "rm" / "model", "--data", data / "rankings_eval.jsonl", "--limit", 40,
                 "--max-length", 18)
    assert ev.returncode != 0 and "rankings_eval.jsonl" in ev.stderr and "--overlong" in ev.stderr
    ev = rlhfkit("eval", "--model", tmp_path / "rm" / "model", "--data", data / "rankings_eval.jsonl", "--limit", 40,
                 "--max-length", 18, "--overlong", "skip", "--out", tmp_path / "short")
    assert ev.returncode == 0, ev.stderr
    short = json.loads((tmp_path / "short" / "eval.json").read_text())
    assert short["lengths"] == "40 rows, 0 truncated, 20 skipped" and 0 < short["pairs"] < result["pairs"]
    # a DPO reference or a greedy answer's length would be ignored for a reward model: refused, not dropped
    ev = rlhfkit("eval", "--model", tmp_path / "rm" / "model", "--data", data / "rankings_eval.jsonl", "--ref",
                 tiny["base"], "--max-new-tokens", 8)
    assert ev.returncode == 2 and "is a reward model, whose eval reads no --ref or --max-new-tokens" in ev.stderr
    ev = rlhfkit("eval", "--model", tmp_path / "nothing" / "rm", "--data", data / "rankings_eval.jsonl", "--max-length",
                 256)
    assert ev.returncode == 2 and "model folder not found" in ev.stderr and "whose eval" not in ev.stderr


def test_dpo_cli_then_eval_reports_preference_accuracy(tiny, tmp_path):
    data = tiny["data"]
    out = rlhfkit("dpo", "--config", "dpo_tiny", f"model={tiny['base']}", f"train_data={data / 'prefs_train.jsonl'}",
                  "eval_data=null", "train.eval_every=0",
                  "eval_prompts=null", f"train.out_dir={tmp_path / 'dpo'}", "train.max_steps=5",
                  "train.batch_size=8", "train.lr=1e-3", "train.progress=false", "train.log_every=1")
    assert out.returncode == 0, out.stderr
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "dpo")]
    assert abs(losses[0] - 0.693147) < 1e-4  # policy == reference at step 1
    ev = rlhfkit("eval", "--model", tmp_path / "dpo" / "model", "--ref", tiny["base"], "--data",
                 data / "prefs_eval.jsonl", "--limit", 30)
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "dpo" / "model" / "eval.json").read_text())
    assert result["n"] == 30 and result["preference_accuracy"] != 0.5  # 5 steps moved the policy off its reference
    assert result["pairs"] == 30 and result["ref"] == str(tiny["base"])  # pairs: one ordered pair a row
    # --ref on prompts: refused with the row and what to do, before any model loads
    ev = rlhfkit("eval", "--model", tmp_path / "dpo" / "model", "--ref", tiny["base"], "--data",
                 data / "prompts_eval.jsonl")
    assert ev.returncode == 2 and "prompts_eval.jsonl:1 is a prompt-only row: leave --ref out" in ev.stderr
    # preference rows without --ref: told to give one, before any model loads
    ev = rlhfkit("eval", "--model", tmp_path / "dpo" / "model", "--data", data / "prefs_eval.jsonl")
    assert ev.returncode == 2 and ("prefs_eval.jsonl:1: a policy is measured on preference (prompt, chosen, rejected) "
                                   "rows against its reference (the model it was trained from): give --ref REF, or "
                                   "--ref none for a CPO, SimPO or ORPO policy") in ev.stderr


def test_kto_cli_on_unpaired_rows_and_rloo_cli_with_trls_defaults(tiny, tmp_path):
    """`rlhfkit kto` on TRL's unpaired rows: at step 1 the policy is its reference (r = 0, z_0 = 0),
    so each answer's loss is its weight x (1 - sigma(0)): the first loss is (1.5 n_D + n_U) / 2 / N.
    `rlhfkit rloo` records TRL's RLOO settings as its defaults and starts from a KL of exactly 0."""
    rows = [json.loads(line) for line in (tiny["data"] / "prefs_train.jsonl").read_text().splitlines()[:24]]
    unpaired = tmp_path / "unpaired.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}) + "\n"
                                for i, r in enumerate(rows) for k in (("chosen", "rejected") if i % 3 else ("chosen",))))
    n_good, n = 24, 24 + 16
    out = rlhfkit("kto", "--config", "kto_tiny", f"model={tiny['base']}", f"train_data={unpaired}", "eval_data=null",
                  "eval_prompts=null", "train.eval_every=0",
                  "desirable_weight=1.5", f"train.out_dir={tmp_path / 'kto'}", "train.max_steps=2",
                  "train.batch_size=40", "train.progress=false", "train.log_every=1")
    assert out.returncode == 0, out.stderr
    assert f"{n_good} desirable and {n - n_good} undesirable answers" in out.stderr
    assert "the KTO paper advises 1 to 4/3" in out.stderr  # 1.5 x 24 / 16 = 2.25
    first = [m for m in read_metrics(tmp_path / "kto") if "train/loss" in m][0]
    assert first["train/loss"] == pytest.approx((1.5 * n_good + (n - n_good)) * 0.5 / n, abs=1e-6)
    assert first["train/kl"] == 0.0
    ev = rlhfkit("eval", "--model", tmp_path / "kto" / "model", "--ref", tiny["base"], "--data", unpaired)
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "kto" / "model" / "eval.json").read_text())
    assert result["n"] == n and result["rewards_chosen"] != 0  # two steps moved the policy off its reference
    assert result["margin"] == pytest.approx(result["rewards_chosen"] - result["rewards_rejected"])
    mixed = tmp_path / "mixed.jsonl"  # KTO trains on pairs among unpaired rows (two answers each): so does its eval
    mixed.write_text(json.dumps(rows[0]) + "\n" + unpaired.read_text())
    ev = rlhfkit("eval", "--model", tmp_path / "kto" / "model", "--ref", tiny["base"], "--data", mixed, "--out",
                 tmp_path / "mixed.json")
    assert ev.returncode == 0 and json.loads((tmp_path / "mixed.json").read_text())["n"] == n + 2, ev.stderr
    ev = rlhfkit("eval", "--model", tmp_path / "kto" / "model", "--data", unpaired)  # no --ref: told to give one
    assert ev.returncode == 2 and "(prompt, completion, label) rows against its reference (the model it was trained " \
        "from): give --ref REF; without --ref" in ev.stderr
    out = rlhfkit("rloo", "--config", "rloo_tiny", f"model={tiny['base']}", f"train_data={tiny['data'] / 'prompts_train.jsonl'}",
                  "eval_data=null", "train.eval_every=0",
                  "rewards=contains_answer", "group_size=4", "prompts_per_step=4", "max_new_tokens=4",
                  f"train.out_dir={tmp_path / 'rloo'}", "train.max_steps=2", "train.progress=false", "train.log_every=1")
    assert out.returncode == 0, out.stderr
    recorded = yaml.safe_load((tmp_path / "rloo" / "config.yaml").read_text())
    assert (recorded["advantage_estimator"], recorded["loss_type"], recorded["scale_rewards"], recorded["beta"]) == \
        ("rloo", "rloo", "none", 0.05)
    assert [m["train/kl"] for m in read_metrics(tmp_path / "rloo") if "train/loss" in m][0] == 0.0
    bad = rlhfkit("rloo", f"model={tiny['base']}", "scale_rewards=group", f"train.out_dir={tmp_path / 'x'}")
    assert bad.returncode == 2 and "set scale_rewards=none" in bad.stderr


def test_orpo_and_cpo_clis_train_with_no_reference_and_resume(tiny, tmp_path):
    """`rlhfkit orpo --config orpo_tiny` from the tiny base records TRL's ORPO defaults, keeps no
    reference in its checkpoints, resumes to the straight run's losses and writes a folder plain
    transformers loads; `rlhfkit cpo` answers TRL's CPO names."""
    from transformers import AutoModelForCausalLM

    common = ("--config", "orpo_tiny", f"model={tiny['base']}", f"train_data={tiny['data'] / 'prefs_train.jsonl'}",
              "eval_data=null", "eval_prompts=null", "train.eval_every=0", "train.batch_size=8", "train.save_every=2",
              "train.progress=false", "train.log_every=1")
    straight = rlhfkit("orpo", *common, f"train.out_dir={tmp_path / 'straight'}", "train.max_steps=4")
    assert straight.returncode == 0, straight.stderr
    recorded = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    assert (recorded["reference"], recorded["loss_type"], recorded["beta"], recorded["rpo_alpha"]) == \
        ("none", "orpo", 0.1, 1.0)
    assert not any("reference" in p.name for p in (tmp_path / "straight" / "checkpoints").rglob("*"))
    first = rlhfkit("orpo", *common, f"train.out_dir={tmp_path / 'resumed'}", "train.max_steps=2")
    again = rlhfkit("orpo", *common, f"train.out_dir={tmp_path / 'resumed'}", "train.max_steps=4", "train.resume=true")
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    losses = lambda d: [m["train/loss"] for m in read_metrics(tmp_path / d) if "train/loss" in m]  # noqa: E731
    assert losses("resumed") == losses("straight") and len(losses("straight")) == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    bad = rlhfkit("cpo", f"model={tiny['base']}", "cpo_alpha=0", "loss_type=alphapo", f"train.out_dir={tmp_path / 'x'}")
    assert bad.returncode == 2 and "cpo_alpha -> rpo_alpha" in bad.stderr
    # `rlhfkit eval --ref none`: the preference accuracy of log pi alone, by sums and per token
    from rlhfkit.data.prefs import encode_rankings
    from rlhfkit.data.rows import read_rows
    from rlhfkit.methods.common import load_policy
    from rlhfkit.models.rankings import no_reference, preference_accuracy

    ev = rlhfkit("eval", "--model", tmp_path / "straight" / "model", "--ref", "none", "--data",
                 tiny["data"] / "prefs_eval.jsonl", "--limit", "40")
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "straight" / "model" / "eval.json").read_text())
    policy, tok = load_policy(str(tmp_path / "straight" / "model"), None)
    examples = no_reference(encode_rankings(read_rows(tiny["data"] / "prefs_eval.jsonl")[:40], tok, 512)[0])
    by_sum, by_token = (preference_accuracy(policy, examples, tok.pad_token_id, per_token=p) for p in (False, True))
    assert (result["preference_accuracy"], result["preference_accuracy_per_token"]) == (by_sum, by_token)


def test_online_dpo_cli_judged_by_a_reward_model(tiny, tmp_path):
    """`rlhfkit online_dpo --config online_dpo_tiny` from the tiny base, each pair judged by a reward
    model (rm:PATH): the run records its settings, logs the model's scores and ties, moves the
    weights, and answers TRL's OnlineDPO names."""
    from methods_setup import reward_folder
    from transformers import AutoModelForCausalLM

    common = ("--config", "online_dpo_tiny", f"model={tiny['base']}", f"train_data={tiny['data'] / 'prompts_train.jsonl'}",
              "eval_data=null", "train.eval_every=0", "eval_max_new_tokens=32", "prompts_per_step=8", "train.progress=false",
              "train.log_every=1")
    out = rlhfkit("online_dpo", *common, f"rewards=rm:{reward_folder(tiny)}", f"train.out_dir={tmp_path / 'odpo'}",
                  "train.max_steps=2", "train.lr=1e-2")
    assert out.returncode == 0, out.stderr
    recorded = yaml.safe_load((tmp_path / "odpo" / "config.yaml").read_text())
    assert (recorded["ties"], recorded["temperature"], recorded["rewards"]) == ("skip", 0.9, f"rm:{reward_folder(tiny)}")
    logged = [m for m in read_metrics(tmp_path / "odpo") if "train/reward_mean" in m]
    assert len(logged) == 2 and all("train/reward/rm_mean" in m and m["train/tied_pairs"] < 1 for m in logged)
    assert logged[0]["train/loss"] == pytest.approx(0.6931, abs=1e-4)  # the policy is its reference at step 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "odpo" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    bad = rlhfkit("online_dpo", *common, "reward_model_path=x", f"train.out_dir={tmp_path / 'x'}")
    assert bad.returncode == 2 and "reward_model_path -> rewards (rm:PATH" in bad.stderr


def test_distill_cli_writes_a_plain_transformers_folder_and_answers_trls_names(tiny, tmp_path):
    """`rlhfkit distill --config distill_tiny` with the tiny base as its student: the first loss is
    the divergence to another model (positive), the folder loads in plain transformers and differs
    from the start; TRL's teacher key gets rlhfkit's name."""
    from methods_setup import teacher_folder
    from transformers import AutoModelForCausalLM

    out = rlhfkit("distill", "--config", "distill_tiny", f"model={tiny['base']}", f"teacher={teacher_folder(tiny)}",
                  f"train_data={tiny['data'] / 'prompts_train.jsonl'}", "eval_data=null", "train.eval_every=0",
                  "prompts_per_step=4",
                  "max_new_tokens=4", f"train.out_dir={tmp_path / 'd'}", "train.max_steps=2", "train.progress=false",
                  "train.log_every=1")
    assert out.returncode == 0, out.stderr
    logged = [m for m in read_metrics(tmp_path / "d") if "train/loss" in m]
    assert len(logged) == 2 and logged[0]["train/loss"] > 1e-3
    assert (tmp_path / "d" / "plots" / "teacher.png").is_file()  # the divergence and the teacher's entropy
    assert yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())["beta"] == 0.5
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "d" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))
    bad = rlhfkit("distill", f"model={tiny['base']}", "teacher_model_name_or_path=x", f"train.out_dir={tmp_path / 'x'}")
    assert bad.returncode == 2 and "teacher_model_name_or_path -> teacher" in bad.stderr


def test_grpo_rewards_from_a_module_and_a_file_on_the_command_line(tiny, tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "myrewards.py").write_text(
        "def digits(prompts, completions, **_):\n    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n")
    (tmp_path / "short.py").write_text("def short(prompts, completions, **_):\n    return [-len(c) / 10 for c in completions]\n")
    env = {**ENV, "PYTHONPATH": str(tmp_path / "mods")}
    out = tmp_path / "g"
    run = rlhfkit("grpo", f"model={tiny['base']}", f"train_data={tiny['data'] / 'prompts_train.jsonl'}",
                  f"rewards=myrewards:digits:2.0,{tmp_path / 'short.py'}:short", "group_size=2", "prompts_per_step=2",
                  "max_new_tokens=4", f"train.out_dir={out}", "train.max_steps=1", "train.progress=false", env=env)
    assert run.returncode == 0, run.stderr
    (logged,) = [m for m in read_metrics(out) if "train/reward_mean" in m]
    # reward_mean = 2.0 * digits + 1.0 * short, over the same samples
    assert logged["train/reward_mean"] == pytest.approx(2.0 * logged["train/reward/digits_mean"]
                                                       + logged["train/reward/short_mean"], abs=1e-6)
    bad = rlhfkit("grpo", f"model={tiny['base']}", "rewards=myrewards:nope", f"train.out_dir={tmp_path / 'b'}", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "reward 'myrewards:nope' cannot be loaded: AttributeError" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()  # before any model loads
    # the installed `rlhfkit` command, run where the module is, without PYTHONPATH, finds it too
    script = Path(sys.executable).with_name("rlhfkit")
    here = subprocess.run([str(script), "grpo", f"model={tiny['base']}", "rewards=myrewards:nope",
                           f"train.out_dir={tmp_path / 'c'}"], capture_output=True, text=True, timeout=120, env=ENV,
                          cwd=tmp_path / "mods")
    assert "reward 'myrewards:nope' cannot be loaded: AttributeError" in here.stderr, here.stderr


def test_lora_from_the_command_line_and_vllm_refused_without_a_gpu(tiny, tmp_path):
    data, run = tiny["data"], tmp_path / "lora"
    out = rlhfkit("sft", "--config", "sft_tiny", f"model={tiny['base']}", f"train_data={data / 'sft_train.jsonl'}",
                  "eval_data=null", "train.eval_every=0",
                  "stop_at_accuracy=null", "snapshot_at_accuracy=null", "eval_max_new_tokens=16",
                  f"train.out_dir={run}",
                  "train.max_steps=5", "train.batch_size=16",
                  "train.progress=false", "lora.r=4", "lora.alpha=8", "lora.merge=true",
                  "train.activation_checkpointing=true")
    assert out.returncode == 0, out.stderr
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "adapter" / "adapter_config.json").is_file()
    if torch.cuda.is_available():
        return
    out = rlhfkit("grpo", "--config", "grpo_tiny", f"model={tiny['base']}", "rollout.backend=vllm",
                  f"train.out_dir={tmp_path / 'g'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "rollout.backend' is vllm but" in out.stderr and not (tmp_path / "g").exists()  # before anything runs


def test_grpo_with_a_reward_model_and_a_rule_weighted_on_the_command_line(tiny, tmp_path):
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_reward_model

    tok = load_tokenizer(tiny["base"])
    load_reward_model(tiny["base"], tok).save_pretrained(str(tmp_path / "rm"))  # an untrained RM scores too
    tok.save_pretrained(str(tmp_path / "rm"))
    out = tmp_path / "g"
    run = rlhfkit("grpo", f"model={tiny['base']}", f"train_data={tiny['data'] / 'prompts_train.jsonl'}",
                  f"rewards=rm:{tmp_path / 'rm'}:1.0,exact_answer:0.5", "group_size=2", "prompts_per_step=2",
                  "max_new_tokens=4", f"train.out_dir={out}", "train.max_steps=1", "train.progress=false")
    assert run.returncode == 0, run.stderr
    (logged,) = [m for m in read_metrics(out) if "train/reward_mean" in m]
    assert logged["train/reward_mean"] == pytest.approx(logged["train/reward/rm_mean"]
                                                       + 0.5 * logged["train/reward/exact_answer_mean"], abs=1e-6)
    assert logged["train/reward/rm_retokenised"] == 0.0 and logged["train/reward/rm_std"] > 0
    bad = rlhfkit("grpo", f"model={tiny['base']}", f"rewards=rm:{tiny['base']}", f"train.out_dir={tmp_path / 'b'}")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1  # a causal LM is no reward model
    assert "is not a ...ForSequenceClassification model folder" in bad.stderr and not (tmp_path / "b").exists()


def test_prm_cli_then_eval_reports_step_metrics(tiny, tmp_path):
    data = tiny["data"]
    rows = tmp_path / "prm_rows.jsonl"  # a few rows: encoding all 16000 costs seconds
    rows.write_text("".join((data / "prm_train.jsonl").read_text().splitlines(keepends=True)[:64]))
    out = rlhfkit("prm", "--config", "prm_tiny", f"model={tiny['base']}", f"train_data={rows}",
                  "eval_data=null", "train.eval_every=0",
                  f"train.out_dir={tmp_path / 'prm'}", "train.max_steps=3", "train.batch_size=8",
                  "train.progress=false")
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "prm" / "model" / "config.json").read_text())
    # prm_tiny reads steps from the causal LM's own likelihoods at the tiny default's "; " separator
    assert config["architectures"] == ["LlamaForCausalLM"] and config["step_separator"] == "; "
    assert config["step_readout"] == "likelihood"
    ev = rlhfkit("eval", "--model", tmp_path / "prm" / "model", "--data", data / "prm_eval.jsonl", "--limit", 30)
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "prm" / "model" / "eval.json").read_text())
    from rlhfkit.data.rows import read_rows
    from rlhfkit.data.steps import encode_step_rows
    from rlhfkit.methods.prm import step_metrics
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_process_reward_model

    tok = load_tokenizer(tmp_path / "prm" / "model")
    examples, _ = encode_step_rows(read_rows(data / "prm_eval.jsonl")[:30], tok, "; ", 512)
    in_process = step_metrics(load_process_reward_model(tmp_path / "prm" / "model", tok), examples, tok.pad_token_id)
    assert result["scored_steps"] == in_process["scored_steps"] > 30
    assert (result["step_accuracy"], result["wrong_step_f1"]) == (in_process["step_accuracy"],
                                                                  in_process["wrong_step_f1"])


def test_eval_of_a_policy_gives_the_held_out_loss_on_text_and_answered_rows(tiny, tmp_path):
    """TRL's eval_loss: the mean NLL per answer token, as SFT's held-out loss computes it, and its
    perplexity; on text rows alone (no prompts to answer) there is no exact match."""
    import math

    from rlhfkit.data.encode import encode_sft
    from rlhfkit.data.rows import read_rows
    from rlhfkit.methods.common import load_policy
    from rlhfkit.methods.sft import heldout_loss

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"What is {a}+{a}? {2 * a}"}) + "\n" for a in range(6)))
    ev = rlhfkit("eval", "--model", tiny["base"], "--data", text, "--out", tmp_path / "ev" / "text.json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "ev" / "text.json").read_text())  # --out a .json file: that file
    model, tok = load_policy(str(tiny["base"]), None)
    loss = heldout_loss(model, encode_sft(read_rows(text), tok, 512)[0], tok.pad_token_id)
    assert "accuracy" not in result and result["loss_rows"] == 6
    assert result["loss"] == pytest.approx(loss, rel=1e-6) and result["perplexity"] == pytest.approx(math.exp(loss))
    sft_rows = tiny["data"] / "sft_eval.jsonl"
    ev = rlhfkit("eval", "--model", tiny["base"], "--data", sft_rows, "--limit", 8, "--max-new-tokens", 4,
                 "--out", tmp_path / "ev2")
    assert ev.returncode == 0, ev.stderr
    both = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert both["n"] == 8 and "accuracy" in both and both["loss_rows"] == 8 and both["loss"] > 0
    assert both["max_new_tokens"] == 4 and both["limit"] == 8 and "greedy" in both["measured"]
    assert "answer tokens" in both["loss_measured"] and "every token" in result["loss_measured"]
    ev = rlhfkit("eval", "--model", tiny["base"], "--data", tiny["data"] / "prompts_eval.jsonl", "--max-length", 10,
                 "--tokenizer", tmp_path / "no-such-tokenizer")  # refused before anything loads or is sampled
    assert ev.returncode == 2 and "is a policy on prompt rows, whose eval reads no --max-length" in ev.stderr
