"""Each method's config for a few steps on the *untrained* tiny default (importable by tests)."""

from helpers import quiet_train

from rlhfkit.methods.distill import DistillConfig, run_distill
from rlhfkit.methods.dpo import DPOConfig, run_dpo
from rlhfkit.methods.grpo import GRPOConfig, run_grpo
from rlhfkit.methods.kto import KTOConfig, run_kto
from rlhfkit.methods.online_dpo import OnlineDPOConfig, run_online_dpo
from rlhfkit.methods.orpo import ORPOConfig
from rlhfkit.methods.ppo import PPOConfig, run_ppo
from rlhfkit.methods.prm import PRMConfig, run_prm
from rlhfkit.methods.rloo import RLOOConfig, run_rloo
from rlhfkit.methods.rm import RMConfig, run_rm
from rlhfkit.methods.sft import SFTConfig, run_sft


def digits(prompts, completions, **_):
    """A reward that an untrained model's samples vary on: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def first_of_rank0(prompts, completions, **_):
    """A judge that prefers only rank 0's first answer (1, all else 0): one untied pair over all ranks."""
    import os

    first = os.environ.get("RANK", "0") == "0"
    return [1.0 if first and i == 0 else 0.0 for i in range(len(completions))]


def three_pairs(prompts, completions, **_):
    """A judge with three untied pairs over 2 ranks of 2 prompts each: both of rank 0's, rank 1's first."""
    import os

    untied = 2 if os.environ.get("RANK", "0") == "0" else 1
    return [1.0 if i % 2 == 0 and i // 2 < untied else 0.0 for i in range(len(completions))]


def even_answer_digits(prompts, completions, answer, **_):
    """``digits`` where the row's answer is even, 0 elsewhere: odd answers' groups carry no signal."""
    return [digits([p], [c])[0] if int(a) % 2 == 0 else 0.0 for p, c, a in zip(prompts, completions, answer)]


def shifted_backend(tiny, offset: float):
    """The sampler, reporting log-probs ``offset`` nats off the trainer's on every token: another
    engine's numerics, not exact (a stand-in for vLLM in tests)."""
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.rollout.backend import SamplerBackend

    class Shifted(SamplerBackend):
        def generate(self, prompts, params):
            samples = super().generate(prompts, params)
            samples.logprobs = (samples.logprobs + offset) * samples.completion_mask
            return samples

        def logprobs_exact(self, params):
            return False

    return Shifted(load_tokenizer(str(tiny["base"])))


def seeded_backend(tiny):
    """The sampler, each prompt's answers drawn from a generator seeded by the prompt's tokens: the
    same answers wherever (on whichever rank, in whatever batch) the prompt is sampled, so that 2
    ranks and one process train on the same samples."""
    import torch

    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.rollout.backend import SamplerBackend
    from rlhfkit.rollout.sampler import join_samples, sample

    class Seeded(SamplerBackend):
        def generate(self, prompts, params):
            tok = self.tokenizer
            return join_samples([sample(self.model, [p], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                        max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                        num_samples=params.num_samples,
                                        generator=torch.Generator().manual_seed(sum(p) * 7919 + len(p)))
                                 for p in prompts], tok.pad_token_id)

    return Seeded(load_tokenizer(str(tiny["base"])))


def dynamic_sampling_config(tiny, out, steps: int, **train):
    """GRPO with DAPO's dynamic sampling, for ``even_answer_digits``: about 4 prompts in 10 give a
    signal, so 12 rounds fill a share of 2 or 4 groups but for odds of about 1e-4 a step."""
    from rlhfkit.train.config import replace

    return replace(method_config("grpo", tiny, out, steps, **train), dynamic_sampling=True, loss_type="dapo",
                   rewards="exact_answer", max_sampling_rounds=12)


RUNS = {"sft": run_sft, "rm": run_rm, "dpo": run_dpo, "orpo": run_dpo,
        "online_dpo": lambda cfg, **kw: run_online_dpo(cfg, **{"reward_fns": [digits], **kw}), "grpo": lambda cfg: run_grpo(cfg, reward_fns=[digits]),
        "ppo": run_ppo, "prm": run_prm, "kto": run_kto, "rloo": lambda cfg: run_rloo(cfg, reward_fns=[digits]),
        "distill": run_distill}
METHODS = tuple(RUNS)


def reward_folder(assets) -> str:
    """A reward-model folder made from the base model (its score head seeded with 0, as
    ``load_reward_model`` does), beside it: PPO refuses a causal LM as its reward model."""
    from pathlib import Path

    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_reward_model

    base = Path(assets["base"])
    folder = base.parent / f"{base.name}-reward"
    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer(base)
        load_reward_model(base, tokenizer).save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    return str(folder)


def gkd_config(tiny, out, data: bool = False, **train):
    """Distillation on GKD's mix (lmbda=0.5), every answer greedy (top_k=1) so that it is the same in
    any layout: at seed 0 step 1 on the teacher's answers (seq_kd; ``data``: the rows' own, each a
    prompt-completion row), steps 2 and 3 on the student's; a teacher far enough from the student
    (5x noise) that their greedy answers differ."""
    from rlhfkit.train.config import replace

    cfg = replace(method_config("distill", tiny, out, 3, log_every=1, **train), teacher=teacher_folder(tiny, 5.0),
                  lmbda=0.5, top_k=1)
    return replace(cfg, train_data=small(tiny, "sft_train.jsonl")) if data else replace(cfg, seq_kd=True)


def tr_dpo_config(tiny, out, steps: int, sync: bool = True, sync_steps: int = 2, **train):
    """DPO with its reference forwarded every step and, ``sync``, TR-DPO's moves of it toward the
    policy every ``sync_steps`` steps (TRL's alpha 0.6)."""
    from rlhfkit.train.config import replace

    cfg = replace(method_config("dpo", tiny, out, steps, log_every=1, **train), reference="forward")
    return replace(cfg, sync_ref_model=True, ref_model_sync_steps=sync_steps) if sync else cfg


def teacher_folder(tiny, scale: float = 1.0) -> str:
    """A teacher for distillation: the tiny base with seeded noise of ``scale`` x each weight's std
    added (and its tokenizer), beside it."""
    from pathlib import Path

    import torch

    from rlhfkit.models.load import load_causal_lm, load_tokenizer

    base = Path(tiny["base"])
    folder = base.parent / f"{base.name}-teacher-{scale}"
    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer(base)
        model = load_causal_lm(str(base), tokenizer)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * p.std().nan_to_num(0.0) * scale)
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    return str(folder)


def small(tiny, name: str, rows: int = 64) -> str:
    """The first ``rows`` rows of a tiny-default data file (encoding all 11k costs seconds per run)."""
    path = tiny["data"] / f"small_{name}"
    if not path.exists():
        lines = (tiny["data"] / name).read_text().splitlines()[:rows]
        path.write_text("\n".join(lines) + "\n")
    return str(path)


def method_config(name: str, tiny, out, steps: int, **train):
    base = str(tiny["base"])
    offline = dict(batch_size=8, lr=1e-3, schedule="constant", **train)
    online = dict(lr=1e-4, schedule="constant", **train)
    if name == "sft":
        return SFTConfig(model=base, train_data=small(tiny, "sft_train.jsonl"), max_length=64,
                         train=quiet_train(out, max_steps=steps, **offline))
    if name == "rm":
        return RMConfig(model=base, train_data=small(tiny, "rankings_train.jsonl"), max_length=64,
                        train=quiet_train(out, max_steps=steps, **{**offline, "batch_size": 4}))
    if name == "dpo":
        return DPOConfig(model=base, train_data=small(tiny, "prefs_train.jsonl"), max_length=64, beta=0.5,
                         train=quiet_train(out, max_steps=steps, **offline))
    if name == "orpo":  # no reference model: ORPO's NLL and odds-ratio terms
        return ORPOConfig(model=base, train_data=small(tiny, "prefs_train.jsonl"), max_length=64,
                          train=quiet_train(out, max_steps=steps, **offline))
    if name == "prm":
        return PRMConfig(model=base, train_data=small(tiny, "prm_train.jsonl"), max_length=64,
                         train=quiet_train(out, max_steps=steps, **offline))
    if name == "kto":
        return KTOConfig(model=base, train_data=small(tiny, "prefs_train.jsonl"), max_length=64, beta=0.5,
                         train=quiet_train(out, max_steps=steps, **offline))
    if name in ("grpo", "rloo"):
        return (GRPOConfig if name == "grpo" else RLOOConfig)(
            model=base, train_data=small(tiny, "prompts_train.jsonl"), group_size=4, prompts_per_step=4,
            max_new_tokens=6, rewards="contains_answer", mu=2, train=quiet_train(out, max_steps=steps, **online))
    if name == "online_dpo":
        return OnlineDPOConfig(model=base, train_data=small(tiny, "prompts_train.jsonl"), prompts_per_step=4,
                               max_new_tokens=6, beta=0.5, temperature=1.0,
                               train=quiet_train(out, max_steps=steps, **online))
    if name == "distill":
        return DistillConfig(model=base, teacher=teacher_folder(tiny), train_data=small(tiny, "prompts_train.jsonl"),
                             prompts_per_step=4, max_new_tokens=6, beta=0.5,
                             train=quiet_train(out, max_steps=steps, **online))
    return PPOConfig(model=base, reward_model=reward_folder(tiny), critic=base, train_data=small(tiny, "prompts_train.jsonl"),
                     prompts_per_step=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
                     train=quiet_train(out, max_steps=steps, **online))


def greedy_ppo_with_ptx(tiny, out):
    """PPO sampling greedily (the same samples on any number of ranks) with PPO-ptx, 2 steps; one
    minibatch a step (the ranks shuffle their own rows into minibatches)."""
    from rlhfkit.train.config import replace

    return replace(method_config("ppo", tiny, out, 2, log_every=1), temperature=0.0, minibatch_size=8,
                   ptx_data=small(tiny, "sft_train.jsonl"), ptx_coef=0.5)


def dropout_copy(tiny, folder, rate: float = 0.5):
    """The tiny base saved with attention dropout ``rate`` (and its tokenizer) in ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(tiny["base"]))
    config.attention_dropout = rate
    torch.manual_seed(0)
    AutoModelForCausalLM.from_pretrained(str(tiny["base"]), config=config).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny["base"] / name).is_file():
            (folder / name).write_bytes((tiny["base"] / name).read_bytes())
    return folder


def gpt2_folder(tiny, folder, n_positions: int = 64):
    """A GPT-2 folder (Conv1D layers, learned positions) with the tiny default's tokenizer."""
    import transformers

    from rlhfkit.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny["base"]))
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def tiny_moe(tiny, folder, **config) -> str:
    """A Mixtral folder (4 experts, top 2) with the tiny default's tokenizer; ``config`` overrides."""
    import json
    from pathlib import Path

    import transformers as tf

    from rlhfkit.models.load import load_tokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        tok = load_tokenizer(str(tiny["base"]))
        vocab = json.loads((Path(tiny["base"]) / "config.json").read_text())["vocab_size"]
        settings = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        router_aux_loss_coef=0.02, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        tf.MixtralForCausalLM(tf.MixtralConfig(**{**settings, **config})).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)
