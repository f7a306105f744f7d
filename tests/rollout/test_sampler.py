import math

import pytest
import torch

from rlhfkit.methods.common import load_policy
from rlhfkit.rollout.rewards import RewardError, score_outcomes
from rlhfkit.rollout.sampler import completion_logprobs, given_samples, sample
from rlhfkit.tasks.arithmetic import arithmetic_steps, contains_answer, exact_answer


@pytest.fixture(scope="module")
def policy(tiny):
    return load_policy(str(tiny["base"]), None)  # exactness needs no trained model


def _prompts(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def test_sampler_logprobs_equal_a_fresh_forward(policy):
    model, tok = policy
    prompts = _prompts(tok, ["What is 12+34?", "What is 99-9?", "What is 10+10?"])  # different lengths: left padding
    torch.manual_seed(0)
    samples = sample(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=12,
                     temperature=1.0, num_samples=4)
    with torch.no_grad():
        fresh = completion_logprobs(model, samples)
    assert samples.completion_ids.shape[0] == 12
    assert torch.allclose(samples.logprobs, fresh * samples.completion_mask, atol=1e-4)
    assert samples.logprobs[samples.completion_mask.bool()].abs().sum() > 0


@pytest.mark.parametrize("top_k", [0, 5])
def test_at_another_temperature_the_forwards_score_the_sampling_distribution(policy, top_k):
    """Sampled at T = 0.7 (and top-k): the sampler's log-probs are of softmax(logits / T) before
    truncation, and so are the trainers' forwards (plain and shared-prompt), pi_old = pi_theta
    on the samples; at T = 1 the same forward gives other numbers."""
    from rlhfkit.rollout.backend import SamplerBackend, SamplingParams

    model, tok = policy
    prompts = _prompts(tok, ["What is 12+34?", "What is 99-9?"])
    torch.manual_seed(0)
    samples = sample(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=8,
                     temperature=0.7, top_k=top_k, num_samples=3)
    mask = samples.completion_mask
    with torch.no_grad():
        for group in (1, 3):
            fresh = completion_logprobs(model, samples, group_size=group, temperature=0.7)
            assert torch.allclose(samples.logprobs, fresh * mask, atol=1e-4), group
        plain = completion_logprobs(model, samples)
    assert ((plain - fresh) * mask).abs().max() > 1e-2
    assert SamplerBackend(tok, model).logprobs_exact(SamplingParams(8, temperature=0.7, top_k=top_k))


def test_temperature_zero_is_greedy_decoding(policy):
    model, tok = policy
    texts = ["What is 12+34?", "What is 99-9?"]
    samples = sample(model, _prompts(tok, texts), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                     max_new_tokens=8, temperature=0.0)
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        ours = samples.completion_ids[i][samples.completion_mask[i].bool()]
        assert ours.tolist() == ref.tolist()[: len(ours)] and len(ours) == len(ref)


def test_sequences_stop_at_eos_and_are_masked_after(policy):
    model, tok = policy
    prompt = _prompts(tok, ["What is 40+41?"])
    greedy = sample(model, prompt, eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=6, temperature=0.0)
    stop = greedy.completion_ids[0, 2].item()  # the untrained model never emits EOS: call its 3rd token "EOS"
    first = greedy.completion_ids[0].tolist().index(stop)
    s = sample(model, prompt, eos_id=stop, pad_id=tok.pad_token_id, max_new_tokens=6, temperature=0.0)
    assert s.completion_ids[0].tolist() == greedy.completion_ids[0, : first + 1].tolist()  # ends at the "EOS"
    assert s.completion_mask[0].tolist() == [1] * (first + 1) and bool(s.finished[0])
    torch.manual_seed(1)
    s = sample(model, prompt * 2, eos_id=stop, pad_id=tok.pad_token_id, max_new_tokens=20, temperature=1.0,
               num_samples=8)
    ended = 0
    for ids, mask, finished in zip(s.completion_ids.tolist(), s.completion_mask.tolist(), s.finished.tolist()):
        assert finished == (stop in ids)
        if stop in ids:
            k, ended = ids.index(stop), ended + 1
            assert mask[: k + 1] == [1] * (k + 1) and sum(mask[k + 1:]) == 0
            assert all(t == tok.pad_token_id for t in ids[k + 1:])
        else:
            assert sum(mask) == len(ids)
    assert 0 < ended < 16  # both branches were exercised


def test_reward_errors_name_the_function_and_sample():
    def broken(prompts, completions, **_):
        raise ValueError("boom")

    def short(prompts, completions, **_):
        return [1.0]

    def nan_at_1(prompts, completions, **_):
        return [0.0, float("nan")]

    prompts, completions = ["What is 1+1?", "What is 2+2?"], [" 2", " 5"]
    with pytest.raises(RewardError, match="'broken' failed"):
        score_outcomes([broken], [1.0], prompts, completions, {})
    with pytest.raises(RewardError, match="'short' returned 1 values for 2 completions"):
        score_outcomes([short], [1.0], prompts, completions, {})
    with pytest.raises(RewardError, match=r"'nan_at_1' returned nan for sample 1 \(prompt 'What is 2\+2\?'"):
        score_outcomes([nan_at_1], [1.0], prompts, completions, {})
    scores = score_outcomes([nan_at_1, broken], [1.0, 1.0], prompts, completions, {}, on_error="zero")
    assert scores.rewards.tolist() == [0.0, 0.0] and scores.errors == {"nan_at_1": 1, "broken": 2}


def test_outcome_rewards_combine_with_weights_and_abstain():
    def abstain_on_first(prompts, completions, **_):
        return [None, 1.0]

    scores = score_outcomes([exact_answer, abstain_on_first], [2.0, 0.5], ["What is 1+1?", "What is 2+2?"],
                            [" 2", " 5"], {"answer": [2, 4]})
    assert scores.rewards.tolist() == [2.0, 0.5]
    assert math.isnan(scores.per_function["abstain_on_first"][0].item())
    assert contains_answer(["q"], [" 12+34=46. Answer: 46"], answer=[46]) == [1.0]
    assert contains_answer(["q"], [" 146"], answer=[46]) == [0.0]


def test_process_reward_marks_each_step_at_its_last_token(tiny):
    from rlhfkit.models.load import load_tokenizer

    tok = load_tokenizer(tiny["base"])
    text = " 12+34=46\n46-5=40\nAnswer: 40"  # second step wrong, answer wrong
    ids = tok(text, add_special_tokens=False)["input_ids"]
    (steps,) = arithmetic_steps(["What is 12+34-5?"], [text], completion_ids=[ids], tokenizer=tok)
    assert steps == [(text.index("=46") + 2, 1.0), (text.index("=40") + 2, 0.0), (len(text) - 1, 0.0)]


def test_inverse_cdf_draws_follow_the_distribution():
    from rlhfkit.rollout.sampler import _draw

    probs = torch.tensor([[0.0, 0.2, 0.5, 0.0, 0.3]]).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(_draw(probs, g), minlength=5).float() / 20000
    assert counts[0] == 0 and counts[3] == 0  # zero-probability tokens are never drawn
    assert torch.allclose(counts, probs[0], atol=0.015)  # 4 standard errors at n = 20000


def test_shared_prompt_forward_gives_the_plain_logprobs_entropy_loss_and_gradients(policy):
    from rlhfkit.losses.grpo import REDUCTIONS, group_advantages, grpo_loss
    from rlhfkit.rollout.sampler import _groups_share_prompts, shared_prompt_view

    model, tok = policy
    prompts = _prompts(tok, ["What is 12+34?", "What is 99-9?", "What is 10+10?"])  # left padding
    torch.manual_seed(0)
    samples = sample(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=10,
                     temperature=1.0, num_samples=4)
    for row, end in ((0, 3), (5, 1), (6, 7)):  # completions that ended (EOS) at different lengths
        samples.completion_mask[row, end:] = 0
    mask = samples.completion_mask.float()
    advantages = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1]), 4)[:, None].expand(-1, 10)
    results = []
    for group in (1, 4):
        model.zero_grad()
        logprobs, entropy = completion_logprobs(model, samples, with_entropy=True, group_size=group)
        old = logprobs.detach() + 0.3 * torch.linspace(-1, 1, 120).view(12, 10) * mask  # ratios on both sides of 1
        loss, _ = grpo_loss(logprobs, old, advantages, mask, None, 0.0, 0.2, None,
                            REDUCTIONS["grpo"], 12, mask.sum(), 10)
        loss.backward()
        results.append((logprobs.detach(), entropy, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp_a, ent_a, loss_a, grads_a), (lp_b, ent_b, loss_b, grads_b) = results
    assert torch.allclose(lp_a, lp_b, atol=1e-5) and torch.allclose(ent_a, ent_b, atol=1e-5)
    assert (lp_b * (1 - mask)).abs().sum() == 0 and lp_b.abs().sum() > 1.0  # 0 after EOS, non-trivial before
    assert abs(loss_a.item() - loss_b.item()) < 1e-5 and abs(loss_a.item()) > 1e-3
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=1e-5, rtol=1e-4), name
    # Each prompt's tokens pass once for its 4 samples: fewer positions than 12 full rows.
    assert shared_prompt_view(samples, 4).input_ids.numel() < 0.7 * samples.input_ids.numel()
    assert not _groups_share_prompts(samples, 3)  # groups of 3 would mix prompts: the plain forward


def test_joined_samples_pad_prompts_on_the_left_and_completions_on_the_right():
    from rlhfkit.rollout.sampler import Samples, join_samples

    def samples(prompt: list[int], completion: list[int], finished: bool) -> Samples:
        p, c = torch.tensor([prompt]), torch.tensor([completion])
        return Samples(p, torch.ones_like(p), c, torch.ones_like(c), c.float() / 10, torch.tensor([finished]))

    joined = join_samples([samples([5, 6], [7], True), samples([8], [9, 3, 4], False)], pad_id=0)
    assert joined.prompt_ids.tolist() == [[5, 6], [0, 8]] and joined.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert joined.completion_ids.tolist() == [[7, 0, 0], [9, 3, 4]]
    assert joined.completion_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert torch.allclose(joined.logprobs, torch.tensor([[0.7, 0.0, 0.0], [0.9, 0.3, 0.4]]))
    assert joined.finished.tolist() == [True, False]


def test_given_answers_take_the_samplers_layout():
    """A data set's answers (distillation's off-policy steps): prompts left-padded, answers
    right-padded, every answer token in the mask, finished where one ends with EOS."""
    pad, eos = 0, 9
    s = given_samples([[5, 6, 7], [8]], [[1, 9], [2, 3, 4]], pad, eos)
    assert s.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and s.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert s.completion_ids.tolist() == [[1, 9, 0], [2, 3, 4]]
    assert s.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert s.finished.tolist() == [True, False] and not s.logprobs.any()
    assert s.input_ids.tolist() == [[5, 6, 7, 1, 9, 0], [0, 0, 8, 2, 3, 4]]


def test_a_reward_model_reads_an_answer_ended_at_another_end_id_with_the_eos_after_it(policy):
    """rlhfkit's chat data ends a Gemma answer <end_of_turn><eos> (one EOS appended where the template
    writes none), so its reward models learn to score at the EOS; rollouts end at <end_of_turn> (an
    end id of the generation config), and were scored there, a token the RM never scored. They
    get the EOS after it for the RM; an answer ended at the EOS, or cut off, is read as sampled."""
    from rlhfkit.rollout.sampler import Samples, as_trained_on

    _, tok = policy
    eos, turn_end, pad = tok.eos_token_id, 7, tok.pad_token_id
    prompt = torch.tensor([[pad, 5], [5, 6], [5, 6]])
    ids = torch.tensor([[8, turn_end, pad], [8, eos, pad], [8, 9, 9]])  # ended at <end_of_turn>; at EOS; cut off
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    samples = Samples(prompt, torch.tensor([[0, 1], [1, 1], [1, 1]]), ids, mask, torch.zeros(3, 3),
                      torch.tensor([True, True, False]))
    seq, attn = as_trained_on(samples, eos)
    assert seq.tolist() == [[pad, 5, 8, turn_end, eos, eos], [5, 6, 8, eos, pad, eos], [5, 6, 8, 9, 9, eos]]
    assert attn.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    plain = Samples(prompt[1:], samples.prompt_mask[1:], ids[1:], mask[1:], torch.zeros(2, 3), torch.tensor([True, False]))
    assert torch.equal(as_trained_on(plain, eos)[0], plain.input_ids)  # nothing to add: the sequences as sampled
