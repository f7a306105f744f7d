"""The rollout-backend seam: two backends, the same greedy tokens, the same training result."""

import pytest
import torch
from helpers import quiet_train
from methods_setup import reward_folder

from rlhfkit.data.rows import read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.methods.ppo import PPOConfig, run_ppo
from rlhfkit.rollout.backend import GenerateBackend, SamplerBackend, SamplingParams
from rlhfkit.train.config import RolloutConfig
from rlhfkit.train.logging import read_metrics


def _prompts(tiny, tok, n=6):
    return [tok(r.data["prompt"])["input_ids"] for r in read_rows(tiny["data"] / "prompts_train.jsonl")[:n]]


def test_both_backends_decode_the_same_greedy_tokens_and_follow_weight_updates(tiny):
    model, tok = load_policy(str(tiny["base"]), None)
    prompts = _prompts(tiny, tok)  # different lengths: left padding in both
    params = SamplingParams(max_new_tokens=8, temperature=0.0, num_samples=2)
    ours, theirs = SamplerBackend(tok, model), GenerateBackend(tok, model)
    a, b = ours.generate(prompts, params), theirs.generate(prompts, params)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)  # greedy: raw log-softmax in both
    with torch.no_grad():  # the policy moves; the generate backend holds a copy until load_weights
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    moved = ours.generate(prompts, params)
    assert not torch.equal(moved.completion_ids, a.completion_ids)
    assert torch.equal(theirs.generate(prompts, params).completion_ids, b.completion_ids)  # stale copy
    theirs.load_weights(model)
    assert torch.equal(theirs.generate(prompts, params).completion_ids, moved.completion_ids)
    assert ours.logprobs_exact(SamplingParams(8)) and not ours.logprobs_exact(params)
    assert not theirs.logprobs_exact(SamplingParams(8))


def test_the_generate_backend_samples_the_policy_whatever_its_generation_config_says(tiny):
    """A folder's generation_config.json (Qwen2.5-Instruct's repetition_penalty 1.05, ...) was
    applied by ``generate`` on top of the sampling parameters: PPO's samples were not pi_old's
    (a gap of 0.24 nats a token with a penalty of 1.5), with no warning."""
    model, tok = load_policy(str(tiny["base"]), None)
    prompts = _prompts(tiny, tok)
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.5, 1
    model.generation_config.min_p = 0.5
    params = SamplingParams(max_new_tokens=8, temperature=0.0, num_samples=1)
    a, b = SamplerBackend(tok, model).generate(prompts, params), GenerateBackend(tok, model).generate(prompts, params)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    penalised = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False)
    assert penalised[0, len(prompts[0]):].tolist() != a.completion_ids[0].tolist()  # the settings do bite
    assert model.generation_config.repetition_penalty == 1.5  # the policy's own config is left as it is


@pytest.mark.parametrize("backend", ["sampler", "sampler, generic loop", "generate"])
def test_answers_end_at_every_end_id_of_the_policys_generation_config(tiny, backend, monkeypatch):
    """Gemma-it's generation config ends answers at <end_of_turn> beside the tokenizer's <eos>
    (Llama 3's at <|eom_id|>): every backend stops there, as TRL 1.16's GRPO, RLOO and
    distillation do; the answer is finished, masked through the end token, and its text and ids
    for rewards are without it."""
    from rlhfkit.models.lean import LeanDecoder
    from rlhfkit.rollout.sampler import decode, ids_before_end

    if backend == "sampler, generic loop":  # the model's own forward a token at a time (non-lean architectures)
        monkeypatch.setattr(LeanDecoder, "applies", staticmethod(lambda model: False))
    model, tok = load_policy(str(tiny["base"]), None)
    prompts = _prompts(tiny, tok, 4)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    plain = SamplerBackend(tok, model).generate(prompts, params)
    turn_end = plain.completion_ids[0, 2].item()  # the untrained model's 3rd token, called a turn's end
    assert turn_end != tok.eos_token_id and not plain.finished.any()
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    make = GenerateBackend if backend == "generate" else SamplerBackend
    s = make(tok, model).generate(prompts, params)
    for row in range(len(prompts)):
        greedy = plain.completion_ids[row].tolist()
        n = greedy.index(turn_end) + 1 if turn_end in greedy else len(greedy)
        assert s.completion_ids[row, :n].tolist() == greedy[:n]
        assert s.completion_mask[row].tolist() == [1] * n + [0] * (s.completion_ids.shape[1] - n)
        assert bool(s.finished[row]) == (turn_end in greedy)
        kept = greedy[: n - 1 if turn_end in greedy else n]
        assert ids_before_end(tok, s)[row] == kept and decode(tok, s)[row] == tok.decode(kept, skip_special_tokens=True)
    assert s.finished.any() and s.completion_mask.sum() < plain.completion_mask.sum()


def test_ppo_trains_the_same_on_either_backend_when_both_sample_greedily(tiny, tmp_path, capsys):
    base = str(tiny["base"])
    losses = {}
    for backend in ("sampler", "generate"):
        cfg = PPOConfig(model=base, reward_model=reward_folder(tiny), critic=base, rollout=RolloutConfig(backend=backend),
                        temperature=0.0,
                        train_data=str(tiny["data"] / "prompts_train.jsonl"), prompts_per_step=8, minibatch_size=4,
                        ppo_epochs=1, max_new_tokens=6,
                        train=quiet_train(tmp_path / backend, max_steps=3, lr=1e-2, schedule="constant"))
        run_ppo(cfg)
        losses[backend] = [(m["train/loss"], m["train/rm_score"]) for m in read_metrics(tmp_path / backend)]
    assert len(losses["sampler"]) == 3
    assert capsys.readouterr().err.count("warning: temperature=0 rolls out the greedy answers") == 2  # said, not silent
    for (la, ra), (lb, rb) in zip(losses["sampler"], losses["generate"]):
        assert abs(la - lb) < 1e-4 and abs(ra - rb) < 1e-4
    assert losses["sampler"][0] != losses["sampler"][2]  # lr 1e-2: the policy (and its greedy answers) move
    a, _ = load_policy(str(tmp_path / "sampler" / "model"), None)
    b, _ = load_policy(str(tmp_path / "generate" / "model"), None)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


def test_sampler_logprobs_are_not_called_exact_where_the_rotary_frequencies_follow_the_length():
    """Dynamic NTK scaling recomputes its frequencies from the sequence's length, so a token's
    log-prob from its decode step differs from a forward over the finished sequence; GRPO with
    mu > 1 then recomputes pi_old instead of taking the sampler's as the first ratio's."""
    import transformers as tf

    from rlhfkit.rollout.sampler import completion_logprobs

    if int(tf.__version__.split(".")[0]) < 5:
        pytest.skip("rope_parameters is transformers 5's")
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, pad_token_id=0, eos_token_id=1, max_position_embeddings=8)
    made = {}
    for kind in ("default", "dynamic"):
        torch.manual_seed(0)
        config = tf.LlamaConfig(**small, rope_parameters={"rope_type": kind, "rope_theta": 10000.0,
                                                          **({"factor": 4.0} if kind == "dynamic" else {})})
        made[kind] = tf.AutoModelForCausalLM.from_config(config).eval()
    params = SamplingParams(max_new_tokens=12, temperature=1.0)  # past the 8 positions: the frequencies change
    for kind, model in made.items():
        backend = SamplerBackend(None, model)
        backend.tokenizer = type("Ids", (), {"eos_token_id": 1, "pad_token_id": 0})()
        torch.manual_seed(1)
        samples = backend.generate([[5, 6, 7, 8, 9, 10]], params)
        with torch.no_grad():
            gap = (samples.logprobs - completion_logprobs(model, samples) * samples.completion_mask).abs().max()
        assert backend.logprobs_exact(params) == (kind == "default")
        assert (gap < 1e-5) == (kind == "default"), (kind, gap)
