"""The ``vllm`` rollout backend: a colocated ``vllm.LLM`` engine on the trainer's own GPU(s).

- ``load_weights(model)``, once per rollout step: the policy's current full weights (a sharded
  policy's gathered ones; a LoRA policy's merged ones, ``W0 + (alpha / r) B A``) are handed to
  the engine's model by their Hugging Face names, in place. The engine itself is created on the
  first call, from a ``save_pretrained`` folder of the policy written under the run's out_dir.
  Its ``generation_config.json`` names the end ids and nothing else (``end_ids``: the tokenizer's
  EOS and the policy's generation config's others, where the other backends stop too): vLLM stops
  answers at every end id the file names; ``generation_config="vllm"`` keeps vLLM's sampling
  defaults, not the folder's.
- ``generate(prompts, params)``: token-id prompts in; token ids and the engine's log-probs of
  the sampled tokens out, as ``Samples``.
- ``logprobs_exact`` is always False: another engine's numerics, and its log-probs are those of
  the distribution the samples were drawn from (vLLM's ``processed_logprobs``: after temperature
  and top-k / top-p, as TRL asks for them; a vLLM without ``logprobs_mode`` gives them before
  temperature, and is warned about), so GRPO and PPO recompute pi_old with a forward pass of the
  policy and log the mean absolute gap (``logprob_gap``); GRPO's ``sampling_correction`` divides
  by them.
- ``rollout.sleep``: when the installed vLLM has sleep mode, the engine releases its GPU memory
  (weights offloaded, KV cache dropped) after generating and takes it back before the next
  ``load_weights``, so that training has the memory while it runs.

The engine is made by ``engine_factory(folder, rollout_config)``; the product's is
``make_engine`` (vLLM itself). Tests hand in a recording fake: no fake is used here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models.load import ModelLoadError, full_state_dict, is_sharded, save_model
from ..models.lora import has_adapters, merged_state, unmergeable
from .backend import SamplingParams, end_ids, neutral_generation_config
from .sampler import Samples, _mask_through_eos, finished_rows, left_pad


def vllm_unavailable() -> str | None:
    """Why the vllm backend cannot run here, or None when it can (checked when the config is read)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'rlhfkit[vllm]', on a machine with a GPU)"
    if not torch.cuda.is_available():
        return "no GPU is visible to PyTorch (vLLM generates on GPUs)"
    return None


def make_engine(folder: str, rollout) -> object:
    """A colocated ``vllm.LLM`` on ``folder``, in this process (so its model can take weights in place)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import dataclasses
    import warnings

    import vllm

    options, processed = {f.name for f in dataclasses.fields(vllm.EngineArgs)}, {}
    if "generation_config" in options:  # vLLM's sampling defaults, not the folder's (its end ids: VLLMBackend)
        processed["generation_config"] = "vllm"
    if "logprobs_mode" in options:
        processed["logprobs_mode"] = "processed_logprobs"  # the sampled distribution's: what IS weights divide by
    else:
        warnings.warn("this vLLM has no logprobs_mode (vLLM < 0.10.2): its log-probs are before temperature, so "
                      "GRPO's sampling_correction is biased at a temperature other than 1; set sampling_correction="
                      "none there, or upgrade vLLM", stacklevel=2)
    return vllm.LLM(model=folder, tensor_parallel_size=rollout.tensor_parallel_size,
                    gpu_memory_utilization=rollout.gpu_memory_utilization, enable_sleep_mode=rollout.sleep,
                    dtype="auto", seed=0, **processed)


def sampling_kwargs(params: SamplingParams) -> dict:
    """rlhfkit's sampling parameters as ``vllm.SamplingParams`` arguments (``logprobs=0``: the
    sampled token's own log-prob; top_k -1 = no top-k)."""
    return dict(n=params.num_samples, temperature=params.temperature, top_k=params.top_k or -1, top_p=params.top_p,
                max_tokens=params.max_new_tokens, logprobs=0, detokenize=False)


class VLLMBackend:
    name = "vllm"

    def __init__(self, tokenizer, model=None, copy: bool = False, rollout=None, out_dir: str = "runs/out",
                 engine_factory=make_engine, params_class=None):
        self.tokenizer, self.rollout, self.folder = tokenizer, rollout, Path(out_dir) / "rollout_engine"
        self.engine_factory, self.params_class = engine_factory, params_class
        self.engine, self.asleep, self.weight_loads, self.device = None, False, 0, torch.device("cpu")
        self.ends = end_ids(tokenizer)
        if model is not None:
            self.load_weights(model)

    def load_weights(self, model) -> None:
        why = unmergeable(model) if self.engine is None and has_adapters(model) else None
        if why:
            raise ModelLoadError(f"rollout.backend=vllm gets the policy's adapters merged, and {why}: name other "
                                 "lora.target_modules or use another rollout.backend")
        self.device = next(model.parameters()).device  # where the trainer reads the samples
        state = full_state_dict(model)  # every rank of a sharded policy gathers
        if self.engine is None:  # the engine starts from a folder holding the current weights
            folder = self.folder / f"rank-{os.environ.get('RANK', '0')}"
            self.ends = end_ids(self.tokenizer, model)
            save_model(model, self.tokenizer, folder, state if is_sharded(model) else None, merge=True)
            neutral_generation_config(self.tokenizer, self.ends).save_pretrained(str(folder))  # the end ids alone
            self.engine = self.engine_factory(str(folder), self.rollout)
            return
        weights = merged_state(model, state) if has_adapters(model) else state
        self._wake()
        _apply(self.engine, lambda engine_model: engine_model.load_weights(weights.items()))
        self.weight_loads += 1

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Samples:
        self._wake()
        if self.params_class is None:
            import vllm

            self.params_class = vllm.SamplingParams
        outputs = self.engine.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                       self.params_class(**sampling_kwargs(params)), use_tqdm=False)
        samples = self._samples(prompts, outputs, params.num_samples)
        self._sleep()
        return samples.to(self.device)  # built on the CPU from the engine's lists

    def logprobs_exact(self, params: SamplingParams) -> bool:
        return False

    def _samples(self, prompts, outputs, n: int) -> Samples:
        tok = self.tokenizer
        completions = [o for out in outputs for o in out.outputs]  # prompt-major, n per prompt
        if len(completions) != len(prompts) * n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for {len(prompts)} prompts x {n}")
        prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(n)], tok.pad_token_id)
        width = max(1, max(len(c.token_ids) for c in completions))
        ids = torch.full((len(completions), width), tok.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(completions), width))
        for i, c in enumerate(completions):
            ids[i, : len(c.token_ids)] = torch.tensor(list(c.token_ids), dtype=torch.long)
            for t, (token, per_token) in enumerate(zip(c.token_ids, c.logprobs or [])):
                logprobs[i, t] = float(per_token[token].logprob)
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        mask = _mask_through_eos(ids, tok.pad_token_id, self.ends, True)
        mask = mask * (torch.arange(width)[None, :] < lengths[:, None]).long()
        finished = finished_rows(ids, mask, self.ends)
        return Samples(prompt_ids, prompt_mask, ids, mask, logprobs * mask, finished)

    def _sleep(self) -> None:
        if self.rollout is not None and self.rollout.sleep and hasattr(self.engine, "sleep"):
            self.engine.sleep(level=1)  # weights to CPU memory, KV cache freed
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False


def _apply(engine, fn) -> None:
    """Run ``fn`` on the engine's model: ``LLM.apply_model`` where the installed vLLM has it,
    else the in-process worker's model (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    if hasattr(engine, "apply_model"):
        engine.apply_model(fn)
        return
    executor = engine.llm_engine.model_executor
    worker = executor.driver_worker
    runner = getattr(worker, "worker", worker).model_runner
    fn(runner.model)
