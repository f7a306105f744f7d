"""The vllm backend's weight sync, sleep/wake and recompute logic, against a recording fake
engine (it stands in for ``vllm.LLM`` in this file only; the product never uses a fake)."""

from types import SimpleNamespace

import pytest
import torch
from methods_setup import digits, method_config

from rlhfkit.methods.grpo import GRPOConfig, run_grpo
from rlhfkit.methods.ppo import run_ppo
from rlhfkit.models.load import load_causal_lm, load_tokenizer
from rlhfkit.rollout.sampler import sample
from rlhfkit.rollout.vllm import VLLMBackend, sampling_kwargs
from rlhfkit.train.config import ConfigError, LoraConfig, RolloutConfig, load_config, replace
from rlhfkit.train.logging import read_metrics

OFFSET = 0.5  # the fake engine's log-probs are off by this much: another engine's numerics


class FakeLLM:
    """Generates with rlhfkit's sampler on its own model, loaded from the folder it was started
    on and then updated only through ``load_weights``; answers in vLLM's output shapes and
    records every call."""

    def __init__(self, folder, rollout):
        import json
        from pathlib import Path

        self.tok = load_tokenizer(folder)
        self.model = load_causal_lm(folder, self.tok).eval()
        named = json.loads((Path(folder) / "generation_config.json").read_text()).get("eos_token_id")
        # as vLLM stops: at the tokenizer's EOS and every end id of the folder's generation config
        self.ends = [self.tok.eos_token_id, *(named if isinstance(named, list) else [named])]
        self.folder, self.rollout, self.calls, self.loads = folder, rollout, ["start"], []

    def apply_model(self, fn):
        fn(self)

    def load_weights(self, weights):  # what vLLM's model.load_weights takes: (HF name, tensor) pairs
        weights = dict(weights)
        self.loads.append(weights)
        self.calls.append("load")
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append("generate")
        ids = [p["prompt_token_ids"] for p in prompts]
        s = sample(self.model, ids, eos_id=self.ends, pad_id=self.tok.pad_token_id,
                   max_new_tokens=params.max_tokens, temperature=params.temperature, top_k=max(params.top_k, 0),
                   top_p=params.top_p, num_samples=params.n)
        outs = []
        for i in range(len(ids)):
            completions = []
            for j in range(params.n):
                row = i * params.n + j
                n = int(s.completion_mask[row].sum())
                tokens = s.completion_ids[row, :n].tolist()
                logprobs = [{t: SimpleNamespace(logprob=float(lp) + OFFSET)} for t, lp in zip(tokens, s.logprobs[row])]
                completions.append(SimpleNamespace(token_ids=tokens, logprobs=logprobs))
            outs.append(SimpleNamespace(outputs=completions))
        return outs

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake")


def _backend(tmp_path, rollout=RolloutConfig()):
    engines = []

    def factory(folder, rollout):
        engines.append(FakeLLM(folder, rollout))
        return engines[-1]

    return engines, lambda tok: VLLMBackend(tok, rollout=rollout, out_dir=str(tmp_path / "engine"),
                                            engine_factory=factory, params_class=SimpleNamespace)


def test_sampling_parameters_as_vllm_takes_them():
    from rlhfkit.rollout.backend import SamplingParams

    kw = sampling_kwargs(SamplingParams(max_new_tokens=7, temperature=0.8, top_k=0, top_p=0.9, num_samples=4))
    assert kw == dict(n=4, temperature=0.8, top_k=-1, top_p=0.9, max_tokens=7, logprobs=0, detokenize=False)


def test_grpo_on_vllm_syncs_merged_lora_weights_and_trains_as_the_exact_sampler(tiny, tmp_path):
    """With mu = 2 the sampler's log-probs serve as pi_old; the engine's are not exact, so pi_old
    is recomputed with a forward pass: the losses agree (without the importance weights of the
    engine's offset, tested in tests/methods/test_grpo.py), and the gap is the engine's offset."""
    losses = {}
    engines, make = _backend(tmp_path, SimpleNamespace(sleep=True))  # the engine's knobs, without vLLM installed
    for name in ("sampler", "vllm"):
        cfg = replace(method_config("grpo", tiny, tmp_path / name, 3), lora=LoraConfig(r=4, alpha=8),
                      train__lr=1e-2, sampling_correction="none")  # the fake engine's offset is not to be weighed
        tok = load_tokenizer(str(tiny["base"]))
        run_grpo(cfg, reward_fns=[digits], backend=make(tok) if name == "vllm" else None)
        logs = [m for m in read_metrics(tmp_path / name) if "train/loss" in m]
        losses[name] = [m["train/loss"] for m in logs]
        gaps = [m["train/logprob_gap"] for m in logs]
    engine = engines[0]
    assert len(losses["vllm"]) == 3 and losses["sampler"][0] != losses["sampler"][2]
    for a, b in zip(losses["sampler"], losses["vllm"]):
        assert abs(a - b) < 1e-4, losses  # the engine followed every update, merged adapters included
    assert all(abs(g - OFFSET) < 0.05 for g in gaps), gaps
    # started once from a plain (merged) folder; one load per later rollout step, woken before, asleep after
    assert len(engines) == 1 and len(engine.loads) == 2
    assert engine.calls == ["start", "generate", "sleep1", "wake", "load", "generate", "sleep1",
                            "wake", "load", "generate", "sleep1"]
    assert not any("lora_" in k or "base_layer" in k for k in engine.loads[-1])
    assert (tmp_path / "engine" / "rollout_engine" / "rank-0" / "config.json").is_file()


def test_distillation_on_vllm_trains_as_on_the_sampler_and_gets_its_samples_on_the_policys_device(tiny, tmp_path):
    """Distillation reads no log-probs of the engine: on its samples (the sampler's, through the
    fake engine) the losses are the sampler's. The engine's outputs, built on the CPU, come back on
    the device of the policy it was loaded from (the meta device stands in for a GPU here)."""
    from rlhfkit.rollout.backend import SamplingParams

    engines, make = _backend(tmp_path, SimpleNamespace(sleep=False))
    tok = load_tokenizer(str(tiny["base"]))
    losses = {}
    for name in ("sampler", "vllm"):
        from rlhfkit.methods.distill import run_distill

        run_distill(method_config("distill", tiny, tmp_path / name, 3, log_every=1),
                    backend=make(tok) if name == "vllm" else None)
        losses[name] = [m["train/loss"] for m in read_metrics(tmp_path / name) if "train/loss" in m]
    assert len(losses["vllm"]) == 3 and losses["vllm"] == pytest.approx(losses["sampler"], rel=1e-5)
    assert len(engines[0].loads) == 2  # the engine followed the student's updates
    backend = make(tok)
    policy = load_causal_lm(str(tiny["base"]), tok)
    backend.load_weights(policy)
    assert backend.device == next(policy.parameters()).device  # recorded from the policy it was loaded from
    backend.device = torch.device("meta")
    samples = backend.generate([[5, 6, 7]], SamplingParams(4, 1.0))
    assert samples.completion_ids.device.type == "meta" and samples.logprobs.device.type == "meta"


def test_ppo_on_vllm_recomputes_pi_old_and_logs_the_gap(tiny, tmp_path):
    engines, make = _backend(tmp_path, SimpleNamespace(sleep=False))
    cfg = method_config("ppo", tiny, tmp_path / "ppo", 2)
    summary = run_ppo(cfg, backend=make(load_tokenizer(str(tiny["base"]))))
    logs = [m for m in read_metrics(tmp_path / "ppo") if "train/logprob_gap" in m]
    assert summary["steps"] == 2 and len(logs) == 2
    assert all(abs(m["train/logprob_gap"] - OFFSET) < 1e-4 for m in logs), logs  # pi_old from the actor's forward
    assert "sleep1" not in engines[0].calls and len(engines[0].loads) == 1


def test_choosing_vllm_without_it_or_a_gpu_is_a_config_error():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="rollout.backend' is vllm but (vLLM is not installed|no GPU)"):
            GRPOConfig(model="m", train_data="p.jsonl", rollout=RolloutConfig(backend="vllm"))
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        RolloutConfig(gpu_memory_utilization=1.5)
    # the engine's knobs with another backend would be silently unused: refused, by their keys
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size=2, rollout.sleep=False are read by "
                                          r"rollout.backend=vllm only, and rollout.backend is generate"):
        RolloutConfig(backend="generate", sleep=False, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization=0.5 is read by rollout.backend=vllm"):
        load_config(GRPOConfig, None, ["rollout.gpu_memory_utilization=0.5"])


def test_vllm_refuses_merging_adapters_on_tied_embeddings(tiny, tmp_path):
    """vLLM always gets the adapters merged (whatever lora.merge says): on the tiny default's tied
    lm_head the update would be lost in the engine's copy, so the first weight load refuses."""
    from rlhfkit.models.load import ModelLoadError

    engines, make = _backend(tmp_path)
    cfg = replace(method_config("grpo", tiny, tmp_path / "g", 1),
                  lora=LoraConfig(r=4, alpha=8, target_modules="q_proj,lm_head"))
    with pytest.raises(ModelLoadError, match="rollout.backend=vllm gets the policy's adapters merged"):
        run_grpo(cfg, reward_fns=[digits], backend=make(load_tokenizer(str(tiny["base"]))))
    assert not engines  # refused before the engine started


@pytest.mark.parametrize("has_mode", [True, False])
def test_the_engine_is_asked_for_the_sampled_distributions_logprobs(monkeypatch, has_mode):
    """GRPO's sampling_correction divides pi_old (at the sampling temperature) by the engine's
    log-probs: vLLM's default ones are before temperature, so the engine is made with
    logprobs_mode=processed_logprobs (as TRL makes it), and a vLLM without that option is warned about.
    vLLM's sampling defaults, not the folder's, where the vLLM has the option."""
    import dataclasses
    import sys
    import types

    from rlhfkit.rollout.vllm import make_engine

    made = {}
    fields = {"model": str, **({"logprobs_mode": str, "generation_config": str} if has_mode else {})}
    fake = types.ModuleType("vllm")
    fake.EngineArgs = dataclasses.make_dataclass("EngineArgs", list(fields.items()))
    fake.LLM = lambda **kwargs: made.update(kwargs) or "engine"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    if has_mode:
        assert make_engine("folder", RolloutConfig()) == "engine" and made["logprobs_mode"] == "processed_logprobs"
        assert made["generation_config"] == "vllm"
    else:
        with pytest.warns(UserWarning, match="no logprobs_mode .vLLM < 0.10.2.: its log-probs are before temperature"):
            make_engine("folder", RolloutConfig())
        assert "logprobs_mode" not in made and "generation_config" not in made


def test_the_engines_folder_names_the_end_ids_alone_and_answers_end_at_each(tiny, tmp_path):
    """vLLM stops at every end id of the folder's generation_config.json: the engine's folder names
    the tokenizer's EOS and the policy's other end ids (Gemma's <end_of_turn>), where the other
    backends stop too, and an answer stopped at one is finished; the policy's repetition_penalty is
    no part of the policy and is not written."""
    import json

    from rlhfkit.rollout.backend import SamplingParams

    tok = load_tokenizer(str(tiny["base"]))
    model = load_causal_lm(str(tiny["base"]), tok)
    prompts = [tok("What is 40+41?")["input_ids"], tok("What is 3+4?")["input_ids"]]
    greedy = sample(model, prompts, eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=6, temperature=0.0)
    turn_end = greedy.completion_ids[0, 2].item()  # the untrained model's 3rd token, called a turn's end
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    model.generation_config.repetition_penalty = 1.05
    engines, make = _backend(tmp_path)
    backend = make(tok)
    backend.load_weights(model)
    written = json.loads((tmp_path / "engine" / "rollout_engine" / "rank-0" / "generation_config.json").read_text())
    assert written["eos_token_id"] == [tok.eos_token_id, turn_end] and "repetition_penalty" not in written
    assert len(engines) == 1 and model.generation_config.eos_token_id == [tok.eos_token_id, turn_end]
    s = backend.generate(prompts, SamplingParams(6, temperature=0.0))
    first = greedy.completion_ids[0].tolist().index(turn_end)
    assert s.completion_ids[0, : first + 1].tolist() == greedy.completion_ids[0, : first + 1].tolist()
    assert s.completion_mask[0].tolist() == [1] * (first + 1) + [0] * (s.completion_ids.shape[1] - first - 1)
    assert bool(s.finished[0])
