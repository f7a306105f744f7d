"""The rollout-backend seam: what GRPO, RLOO, PPO, distillation and evaluation call to generate.

A backend is a small object with three methods:

    load_weights(model)            take the policy's current weights (once per rollout step)
    generate(prompts, params)      token-id prompts -> ``Samples`` (completions, masks, log-probs), on the
                                   device of the policy it was loaded from
    logprobs_exact(params) -> bool whether ``Samples.logprobs`` are the policy's own log-probs
                                   (of logits / temperature, before any top-k / top-p
                                   truncation, as the trainers' forwards compute them) to
                                   rounding; when not, the trainers recompute pi_old with a
                                   forward pass and log the gap

Three ship: ``sampler`` (rlhfkit's KV-cache sampler on the live policy: nothing to copy, exact at
any temperature above 0) and ``generate`` (transformers' ``model.generate`` on the backend's own copy of
the policy, into which ``load_weights`` copies the current weights: the hand-over a sharded
policy or an inference engine needs), and ``vllm`` (rollout/vllm.py: a colocated vLLM engine on
the GPU, its weights refreshed from the policy). Adding one: a class with these three methods, an entry
in ``BACKENDS``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..models.lean import length_dependent_rope
from ..models.load import full_state_dict
from .sampler import Samples, _mask_through_eos, finished_rows, left_pad, sample


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1  # completions per prompt, consecutive in the returned rows


GREEDY = dict(temperature=0.0)


class SamplerBackend:
    """rlhfkit's sampler (rollout/sampler.py), on the policy module itself or, with ``copy=True``
    (a sharded policy), on its own unsharded copy that ``load_weights`` refreshes with the
    gathered full weights: no collective runs inside the sampling loop, so ranks that stop
    sampling at different steps cannot hang each other."""

    name = "sampler"

    def __init__(self, tokenizer, model=None, copy: bool = False):
        self.tokenizer, self.copy, self.model = tokenizer, copy, None
        self.ends = end_ids(tokenizer)
        if model is not None:
            self.load_weights(model)

    @torch.no_grad()
    def load_weights(self, model) -> None:
        if self.model is None:
            self.ends = end_ids(self.tokenizer, model)
        if not self.copy:
            self.model = model  # the live module: its weights are always the current ones
        elif self.model is None:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)  # before the policy is sharded
        else:
            self.model.load_state_dict(full_state_dict(model))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Samples:
        return sample(self.model, prompts, eos_id=self.ends, pad_id=self.tokenizer.pad_token_id,
                      max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_k=params.top_k,
                      top_p=params.top_p, num_samples=params.num_samples)

    def logprobs_exact(self, params: SamplingParams) -> bool:
        # the sampler's log-probs: of logits / temperature, before top-k / top-p; not where the
        # rotary frequencies follow the length (each step's differ from the finished sequence's)
        return params.temperature > 0 and not length_dependent_rope(self.model)


class GenerateBackend:
    """``transformers``' ``generate`` on a copy of the policy that ``load_weights`` refreshes.

    Its log-probs come from the processed scores ``generate`` returns (after temperature and
    top-k / top-p), so they are not treated as exact. The copy's generation config is a plain one
    (``neutral_generation_config``): ``generate`` would otherwise apply what the folder's
    ``generation_config.json`` says (a repetition penalty, min-p, a no-repeat n-gram size) on top
    of the sampling parameters, and the samples would not be the policy's.
    """

    name = "generate"

    def __init__(self, tokenizer, model=None, copy: bool = True):  # it always keeps a copy
        self.tokenizer, self.model = tokenizer, None
        self.ends = end_ids(tokenizer)
        if model is not None:
            self.load_weights(model)

    @torch.no_grad()
    def load_weights(self, model) -> None:
        if self.model is None:
            self.ends = end_ids(self.tokenizer, model)
            self.model = copy.deepcopy(model).eval().requires_grad_(False)  # before the policy is sharded
            self.model.generation_config = neutral_generation_config(self.tokenizer, self.ends)
        else:
            self.model.load_state_dict(full_state_dict(model))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Samples:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, tok.pad_token_id))
        n = params.num_samples  # each prompt repeated (greedy generate refuses num_return_sequences > 1)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
        greedy = params.temperature == 0
        sampling = {} if greedy else dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=not greedy,
                                  max_new_tokens=params.max_new_tokens,
                                  eos_token_id=list(self.ends), pad_token_id=tok.pad_token_id,
                                  output_scores=True, return_dict_in_generate=True, **sampling)
        width = prompt_ids.shape[1]
        completion_ids = out.sequences[:, width:]
        mask = _mask_through_eos(completion_ids, tok.pad_token_id, self.ends, True)
        scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # (N, C, V)
        logprobs = scores.gather(-1, completion_ids[..., None]).squeeze(-1).nan_to_num(0.0, neginf=0.0) * mask
        return Samples(prompt_ids, prompt_mask, completion_ids, mask, logprobs,
                       finished_rows(completion_ids, mask, self.ends))

    def logprobs_exact(self, params: SamplingParams) -> bool:
        return False


def neutral_generation_config(tokenizer, ends: tuple[int, ...] = ()):
    """A ``GenerationConfig`` that sets nothing but the special tokens (``ends``: the end ids,
    ``end_ids``'s): under it, ``generate`` samples from the policy as the sampling parameters
    passed say and nothing else (transformers fills every setting a call leaves unset from the
    model's generation config)."""
    from transformers import GenerationConfig

    ends = list(ends) or [tokenizer.eos_token_id]
    return GenerationConfig(eos_token_id=ends if len(ends) > 1 else ends[0], pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id)


def end_ids(tokenizer, model=None) -> tuple[int, ...]:
    """The ids an answer ends at: the tokenizer's EOS, then every other end id the policy's
    generation config names (Gemma's ``<end_of_turn>``, Llama 3's ``<|eom_id|>``, ...), as TRL
    1.16's GRPO, RLOO and distillation trainers stop."""
    config = getattr(model, "generation_config", None)
    named = getattr(config, "eos_token_id", None)
    named = named if isinstance(named, (list, tuple)) else [named]
    ends = [int(i) for i in [getattr(tokenizer, "eos_token_id", None), *named] if i is not None]
    return tuple(dict.fromkeys(ends))


BACKENDS = {"sampler": SamplerBackend, "generate": GenerateBackend}


def make_backend(rollout, tokenizer, model, copy: bool = False, out_dir: str = "runs/out"):
    """The backend ``rollout.backend`` names (``rollout``: a RolloutConfig, or just the name).

    ``copy``: the policy will be sharded, so the backend keeps its own copy (make it before
    sharding). ``vllm`` (rollout/vllm.py) is imported only when chosen."""
    name = getattr(rollout, "backend", rollout)
    if name == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend(tokenizer, model, copy=copy, rollout=rollout, out_dir=out_dir)
    if name not in BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; one of {', '.join(BACKENDS)}, vllm")
    return BACKENDS[name](tokenizer, model, copy=copy)
