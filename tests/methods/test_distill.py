"""On-policy distillation (methods/distill.py): the student's own answers, the generalized JSD to
the teacher's distributions at each of their tokens, one step a batch."""

import json
import shutil

import pytest
import torch
from helpers import quiet_train
from methods_setup import method_config, small, teacher_folder, tiny_moe

from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.methods.distill import DistillConfig, answer_source, run_distill
from rlhfkit.models.load import ModelLoadError, load_causal_lm, load_tokenizer
from rlhfkit.rollout.backend import SamplerBackend, SamplingParams
from rlhfkit.rollout.evaluate import row_prompt_ids
from rlhfkit.rollout.sampler import given_samples
from rlhfkit.train.config import ConfigError, replace
from rlhfkit.train.logging import read_metrics
from rlhfkit.train.loop import BatchOrder


class Recording(SamplerBackend):
    """The sampler, keeping each step's samples."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.seen = []

    def generate(self, prompts, params):
        samples = super().generate(prompts, params)
        self.seen.append(samples)
        return samples


def losses(out) -> list:
    return [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]


def by_hand(samples, tiny, cfg) -> float:
    """transformers' own forwards of the student's start model and the teacher on ``samples``; each
    answer token's divergence by the formula, at ``cfg``'s beta and temperature, their mean."""
    beta, temperature = cfg.beta, cfg.temperature
    tokenizer = load_tokenizer(str(tiny["base"]))
    ids, attn = samples.input_ids, samples.attention_mask
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for name, path in (("s", str(tiny["base"])), ("t", cfg.teacher)):
        model = load_causal_lm(path, tokenizer).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits.double()
    width = samples.prompt_ids.shape[1]
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for col in range(samples.completion_ids.shape[1]):
            if not samples.completion_mask[row, col]:
                continue
            at = width + col - 1  # the position that predicts this answer token
            ps = (logits["s"][row, at] / temperature).softmax(-1)
            pt = (logits["t"][row, at] / temperature).softmax(-1)
            if beta == 0.0:
                d = (pt * (pt / ps).log()).sum()
            elif beta == 1.0:
                d = (ps * (ps / pt).log()).sum()
            else:
                m = (1 - beta) * ps + beta * pt
                d = beta * (pt * (pt / m).log()).sum() + (1 - beta) * (ps * (ps / m).log()).sum()
            total, count = total + float(d), count + 1
    assert count == int(samples.completion_mask.sum()) > 0
    return total / count


def test_a_student_that_is_its_own_teacher_starts_at_a_loss_of_zero(tiny, tmp_path):
    """Zero up to float noise: the student's forward keeps its graph for the backward, the teacher's
    does not, and the two may take other kernels (oneDNN's products here: about 1e-9)."""
    cfg = replace(method_config("distill", tiny, tmp_path, 2, log_every=1), teacher=str(tiny["base"]))
    run_distill(cfg)
    first = read_metrics(tmp_path)[0]
    assert abs(first["train/loss"]) < 1e-7 and first["train/loss"] == first["train/divergence"]
    assert first["train/entropy"] == pytest.approx(first["train/teacher_entropy"], abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_first_loss_is_the_divergence_over_the_answers_tokens_by_hand(beta, tiny, tmp_path):
    """transformers' own forwards of both models on the samples the student drew; each token's
    divergence by the formula, at temperature 2, a mean over the step's answer tokens."""
    temperature = 2.0
    tokenizer = load_tokenizer(str(tiny["base"]))
    backend = Recording(tokenizer)
    cfg = replace(method_config("distill", tiny, tmp_path, 1, log_every=1), beta=beta, temperature=temperature)
    run_distill(cfg, backend=backend)
    (samples,) = backend.seen
    assert losses(tmp_path)[0] == pytest.approx(by_hand(samples, tiny, cfg), rel=1e-4)
    assert losses(tmp_path)[0] > 1e-3  # the teacher is another model


def test_micro_batches_give_the_whole_batch_step(tiny, tmp_path):
    """Each micro-batch's loss is its tokens' divergence over the step's tokens: forwards of one
    row give the whole batch's loss and the same step."""
    result = {}
    for micro in (0, 1):
        out = tmp_path / f"m{micro}"
        run_distill(method_config("distill", tiny, out, 1, micro_batch_size=micro, log_every=1))
        model = load_causal_lm(str(out / "model"), load_tokenizer(str(tiny["base"])))
        result[micro] = (losses(out)[0], torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert result[1][0] == pytest.approx(result[0][0], rel=1e-5)
    assert torch.allclose(result[1][1], result[0][1], atol=1e-6)
    base = load_causal_lm(str(tiny["base"]), load_tokenizer(str(tiny["base"])))
    assert not torch.allclose(result[0][1], torch.cat([p.detach().flatten() for p in base.parameters()]), atol=1e-6)


def test_under_bf16_the_first_loss_is_the_fp32_ones(tiny, tmp_path):
    """The teacher loads in bf16 (its logits one bf16 rounding step from transformers' own, which the
    load's check allows) and the student's forward autocasts: the same samples (the sampler is fp32)
    give the fp32 run's first loss to bf16's precision."""
    first = {}
    for dtype in ("fp32", "bf16"):
        run_distill(method_config("distill", tiny, tmp_path / dtype, 1, log_every=1, dtype=dtype))
        first[dtype] = losses(tmp_path / dtype)[0]
    assert first["bf16"] == pytest.approx(first["fp32"], rel=5e-3) and first["fp32"] > 1e-3  # 2.4e-4 apart here


def test_a_teacher_with_other_tokens_is_refused_and_one_with_a_wider_head_compared_over_the_shared_entries(
        tiny, tmp_path, capsys):
    tokenizer = load_tokenizer(str(tiny["base"]))
    vocab = json.loads((tiny["base"] / "config.json").read_text())["vocab_size"]
    cfg = method_config("distill", tiny, tmp_path / "a", 2)
    other = tmp_path / "other-tokens"  # the same model, its tokenizer with one token more
    shutil.copytree(teacher_folder(tiny), other)
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(ModelLoadError, match="the teacher at .* uses another tokenizer than the student.*an-extra-token"):
        run_distill(replace(cfg, teacher=str(other)))
    assert not (tmp_path / "a" / "checkpoints").exists()
    wider = tiny_moe(tiny, tmp_path / "wider", vocab_size=vocab + 8)  # padding rows past the student's (Qwen2.5's)
    assert run_distill(replace(cfg, teacher=wider, train__out_dir=str(tmp_path / "b")))["steps"] == 2
    assert f"the student's head has {vocab} vocabulary entries and the teacher's {vocab + 8}" in capsys.readouterr().err
    # sampling from it (seq_kd), its random padding rows would be drawn (8 of about 100 entries), ids the student's
    # embedding lacks: its head is cut to the student's width
    assert run_distill(replace(cfg, teacher=wider, lmbda=0.0, seq_kd=True, max_new_tokens=16,
                               train__out_dir=str(tmp_path / "b2")))["steps"] == 2
    # the other way round the student would sample its padding rows, which the teacher cannot read: said, by step
    with pytest.raises(RuntimeError, match=r"step \d+: the student sampled token id \d+, a padding row of its head "
                                           rf"past the teacher's {vocab} entries"):
        run_distill(replace(cfg, model=wider, teacher=str(tiny["base"]), max_new_tokens=16,
                            train__out_dir=str(tmp_path / "b3")))
    broken = tmp_path / "broken-tokenizer"  # a tokenizer that does not load is an error, not a check skipped
    shutil.copytree(teacher_folder(tiny), broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="broken-tokenizer"):
        run_distill(replace(cfg, teacher=str(broken), train__out_dir=str(tmp_path / "d")))
    bare = tmp_path / "no-tokenizer"  # a folder without one: the student's is taken
    shutil.copytree(teacher_folder(tiny), bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    assert run_distill(replace(cfg, teacher=str(bare), train__out_dir=str(tmp_path / "e")))["steps"] == 2
    with pytest.raises(ConfigError, match="config key 'teacher' is required"):
        run_distill(replace(cfg, teacher=""))
    with pytest.raises(ConfigError, match="'beta' must be in"):
        replace(cfg, beta=1.5)
    with pytest.raises(Exception, match="distill"):  # preference rows are not prompts: the method is named
        run_distill(replace(cfg, train_data=small(tiny, "prefs_train.jsonl"), train__out_dir=str(tmp_path / "c")))


@pytest.mark.slow
def test_the_student_learns_the_teachers_answers(tiny, sft_run, tmp_path):
    """The SFT snapshot (about 0.5 held-out exact match) distilled from the final SFT model (about
    0.9): its accuracy rises by at least a third of the gap in 150 steps of one answer per prompt."""
    out = sft_run["out"]
    cfg = DistillConfig(model=str(out / "snapshot"), teacher=str(out / "model"),
                        train_data=str(tiny["data"] / "prompts_train.jsonl"),
                        eval_data=str(tiny["data"] / "prompts_eval.jsonl"), eval_limit=200, eval_max_new_tokens=8,
                        prompts_per_step=16, max_new_tokens=8, beta=0.5,
                        train=quiet_train(tmp_path, max_steps=150, lr=1e-4, schedule="constant", eval_every=150,
                                          log_every=10))
    summary = run_distill(cfg)
    before, after, teacher = summary["accuracy_before"], summary["accuracy"], summary["teacher_accuracy"]
    assert teacher > before + 0.2
    assert after >= before + (teacher - before) / 3, summary
    logged = losses(tmp_path)
    assert sum(logged[-5:]) / 5 < sum(logged[:2]) / 2, logged


def test_answers_the_data_carries_and_a_teacher_that_is_the_student_are_said(tiny, tmp_path, capsys):
    rows = small(tiny, "sft_train.jsonl")  # prompt-completion rows (the file another test may have made first)
    n = len(open(rows).read().splitlines())
    cfg = replace(method_config("distill", tiny, tmp_path / "a", 1), train_data=rows, teacher=str(tiny["base"]))
    run_distill(cfg)
    err = capsys.readouterr().err
    assert f"note: {n} rows carry an answer" in err and "the teacher is the student's own start model" in err
    with pytest.raises(ModelLoadError, match="config key 'teacher': .*not found"):
        run_distill(replace(cfg, teacher=str(tmp_path / "nowhere"), train__out_dir=str(tmp_path / "b")))


# --- GKD's mix (lmbda < 1): steps on the rows' own answers, or on the teacher's (seq_kd) ---------

def test_whose_answers_a_step_learns_on_is_drawn_per_step_with_probability_lmbda():
    cfg = DistillConfig(lmbda=0.3)
    drawn = [answer_source(step, cfg) for step in range(1000)]
    assert set(drawn) == {"student", "data"} and 0.26 < drawn.count("student") / 1000 < 0.34
    assert drawn == [answer_source(step, cfg) for step in range(1000)]  # the step and seed alone: every rank, resume
    assert drawn != [answer_source(step, replace(cfg, train__seed=1)) for step in range(1000)]
    assert {answer_source(step, replace(cfg, seq_kd=True)) for step in range(100)} == {"student", "teacher"}
    assert {answer_source(step, replace(cfg, lmbda=1.0)) for step in range(100)} == {"student"}
    assert {answer_source(step, replace(cfg, lmbda=0.0)) for step in range(100)} == {"data"}


def _picked(cfg, step: int = 0) -> list:
    rows = read_rows(cfg.train_data)
    return [rows[i] for i in BatchOrder(len(rows), cfg.prompts_per_step, cfg.train.seed).indices(step)]


def test_off_policy_steps_learn_on_the_rows_own_answers_by_hand(tiny, tmp_path):
    """lmbda=0 (GKD's supervised KD): nothing is sampled, and the first loss is the divergence over
    the step's rows' answers: each prompt, then its completion and EOS, as the tokenizer itself
    encodes them, through transformers' forwards."""
    tokenizer = load_tokenizer(str(tiny["base"]))
    backend = Recording(tokenizer)
    cfg = replace(method_config("distill", tiny, tmp_path, 2, log_every=1), train_data=small(tiny, "sft_train.jsonl"),
                  lmbda=0.0)
    run_distill(cfg, backend=backend)
    assert backend.seen == []
    picked = [row.data for row in _picked(cfg)]
    answers = [tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for r in picked]
    samples = given_samples([tokenizer(r["prompt"])["input_ids"] for r in picked], answers, tokenizer.pad_token_id,
                            tokenizer.eos_token_id)
    logged = read_metrics(tmp_path)
    assert logged[0]["train/loss"] == pytest.approx(by_hand(samples, tiny, cfg), rel=1e-4)
    assert logged[0]["train/completion_len_mean"] == pytest.approx(sum(map(len, answers)) / len(answers))
    assert [m["train/student_answers"] for m in logged] == [0.0, 0.0]
    assert not any("train/completion_clipped" in m for m in logged)  # no answer here was cut off by sampling


def test_seq_kd_steps_learn_on_answers_the_teacher_samples(tiny, tmp_path):
    """lmbda=0 with seq_kd (sequence-level KD): top_k=1 makes the teacher's samples its greedy
    answers, and the first loss is the divergence over those (not over the student's own). A
    teacher far from the student (noise of 5x each weight's spread): nearer, both repeat one token."""
    tokenizer = load_tokenizer(str(tiny["base"]))
    backend = Recording(tokenizer)
    cfg = replace(method_config("distill", tiny, tmp_path, 1, log_every=1), teacher=teacher_folder(tiny, 5.0),
                  lmbda=0.0, seq_kd=True, top_k=1)
    run_distill(cfg, backend=backend)
    assert backend.seen == []
    prompts = row_prompt_ids(tokenizer, _picked(cfg))
    greedy = SamplingParams(cfg.max_new_tokens, temperature=0.0)
    theirs, mine = (SamplerBackend(tokenizer, load_causal_lm(path, tokenizer).eval()).generate(prompts, greedy)
                    for path in (cfg.teacher, cfg.model))
    assert not torch.equal(theirs.completion_ids, mine.completion_ids)
    assert losses(tmp_path)[0] == pytest.approx(by_hand(theirs, tiny, cfg), rel=1e-4)
    assert losses(tmp_path)[0] != pytest.approx(by_hand(mine, tiny, cfg), rel=1e-2)


def test_a_mixed_run_resumes_exactly(tiny, tmp_path):
    """lmbda=0.5 on the rows' answers: 4 steps straight, and 2 then 2 more after a resume, give the
    same losses on the same kinds of steps (each step's draw is its own, not the RNG's)."""
    def cfg(out, steps, **kw):
        return replace(method_config("distill", tiny, tmp_path / out, steps, log_every=1, save_every=2, **kw),
                       train_data=small(tiny, "sft_train.jsonl"), lmbda=0.5)

    run_distill(cfg("full", 4))
    run_distill(cfg("cut", 2))
    run_distill(cfg("cut", 4, resume=True))
    kinds = {run: [m["train/student_answers"] for m in read_metrics(tmp_path / run)] for run in ("full", "cut")}
    assert kinds["cut"] == kinds["full"] and set(kinds["full"]) == {0.0, 1.0}
    shares = [m["train/student_answers_share"] for m in read_metrics(tmp_path / "cut")]
    assert shares == [sum(kinds["full"][: i + 1]) / (i + 1) for i in range(4)]  # of the steps so far
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_gkd_data_and_settings_are_refused_before_any_model_loads(tiny, tmp_path):
    cfg = replace(method_config("distill", tiny, tmp_path / "a", 2), lmbda=0.5)  # prompts with an 'answer' number
    with pytest.raises(DataError, match=r"small_prompts_train.jsonl:1: no answer to read \(fields present: answer, .*; "
                                        r"lmbda=0.5 learns some steps on the rows' own answers: .*seq_kd=true"):
        run_distill(cfg)
    with pytest.raises(DataError, match=r"small_sft_train.jsonl:\d+: its answer is \d+ tokens \(its end token "
                                        r"included\), more than "
                                        r"max_new_tokens=2 .*; \d+ of \d+ rows' answers are longer\)"):
        run_distill(replace(cfg, train_data=small(tiny, "sft_train.jsonl"), max_new_tokens=2))
    assert not (tmp_path / "a" / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"seq_kd=true sets whose answers .* lmbda=1 \(rlhfkit's default, TRL's "
                                          r"DistillationTrainer\) takes none: set lmbda < 1"):
        replace(cfg, lmbda=1.0, seq_kd=True)
    with pytest.raises(ConfigError, match="'lmbda' must be in"):
        replace(cfg, lmbda=1.5)


def test_a_sampling_teachers_generation_config_is_said_once_too(tiny, tmp_path, capsys):
    """seq_kd with lmbda=0: only the teacher samples, and its folder's sampling settings and end ids
    were not said (the student's are, where it samples)."""
    from transformers import GenerationConfig

    tok = load_tokenizer(str(tiny["base"]))
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["base"], teacher)
    GenerationConfig(do_sample=True, temperature=0.7, eos_token_id=[tok.eos_token_id, 7],
                     pad_token_id=tok.pad_token_id).save_pretrained(teacher)
    cfg = replace(method_config("distill", tiny, tmp_path / "out", 1, log_every=1), teacher=str(teacher), lmbda=0.0,
                  seq_kd=True)
    run_distill(cfg)
    said = capsys.readouterr().err
    assert said.count(f"{teacher}'s generation config asks for temperature=0.7; rollouts sample with this run's "
                      "temperature=1") == 1
    assert said.count(f"the other end ids of {teacher}'s generation config") == 1
