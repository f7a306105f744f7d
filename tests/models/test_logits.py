"""Every log-prob path equals the model's own forward, for heads that post-process their logits.

Gemma-2 soft-caps its logits (tanh(l / cap) * cap), Granite divides them by ``logits_scaling``,
Cohere multiplies them by ``logit_scale`` and Falcon-H1 by ``lm_head_multiplier``; a forward that applies only the output embedding
gets them wrong (on Gemma-2 by tens of nats per sequence). Tiny random configs, nothing downloaded.
"""

import pytest
import torch
import transformers as tf

from rlhfkit.models import forward
from rlhfkit.models.forward import head_gap, token_logprobs
from rlhfkit.models.load import ModelLoadError, load_causal_lm
from rlhfkit.models.reward import reward_scores, token_values
from rlhfkit.rollout.sampler import completion_logprobs, sample

V = 96
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
CONFIGS = {
    # a cap of 2 bites on every logit of a random model, as Gemma-2's 30 does on a trained one
    "gemma2": lambda: tf.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0, sliding_window=4),
    "granite": lambda: tf.GraniteConfig(**SMALL, logits_scaling=4.0, embedding_multiplier=3.0,
                                        residual_multiplier=0.5, attention_multiplier=0.2),
    "cohere": lambda: tf.CohereConfig(**SMALL, logit_scale=0.25),
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "qwen2": lambda: tf.Qwen2Config(**SMALL),
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, pad_token_id=0, eos_token_id=1),
    # a mixture of experts that asks for its router logits (transformers adds the balancing loss)
    "mixtral": lambda: tf.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True),
    "falcon_h1": lambda: tf.FalconH1Config(**SMALL, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_ssm=64,
                                           mamba_d_state=8, mamba_chunk_size=16, lm_head_multiplier=0.5),
    # hybrids: a convolution layer and a Mamba layer keep a state beside the attention's keys and values
    "lfm2": lambda: tf.Lfm2Config(**SMALL, layer_types=["conv", "full_attention"], conv_L_cache=3),
    "jamba": lambda: tf.JambaConfig(**SMALL, num_experts=1, attn_layer_period=2, attn_layer_offset=1,
                                    expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_expand=2,
                                    mamba_dt_rank=8),
}


def _model(name, head=tf.AutoModelForCausalLM):
    torch.manual_seed(0)
    try:
        config = CONFIGS[name]()
    except AttributeError:  # an architecture newer than the installed transformers (Falcon-H1, LFM2)
        pytest.skip(f"transformers {tf.__version__} has no {name}")
    if head is not tf.AutoModelForCausalLM:
        config.num_labels = 1
    model = head.from_config(config)
    with torch.no_grad():  # a random init's logits are near 0; make them large enough to be capped
        model.get_input_embeddings().weight.mul_(8.0)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            head.weight.mul_(8.0)
    return model.eval()


def _batch():
    """Right-padded rows of different lengths, targets on the last few real tokens."""
    ids = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 5 + [0] * 4])
    target = mask.clone()
    target[:, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask, target


def _reference_logprobs(model, ids, mask):
    """log pi(ids[t] | ids[<t]) from the model's own forward (HF's logits), 0 at position 0."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=forward.position_ids_from_mask(mask)).logits
    picked = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_token_logprobs_equal_the_models_own_forward(name):
    model = _model(name)
    ids, mask, target = _batch()
    with torch.no_grad():
        ours = token_logprobs(model, ids, mask, target)
        theirs = _reference_logprobs(model, ids, mask) * target
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert head_gap(model) < 1e-6
    assert theirs.sum() < -10  # the sums compared are real, not zeros


@pytest.mark.parametrize("name", ["gemma2", "granite", "cohere", "falcon_h1"])
def test_without_the_final_processing_the_sum_is_wrong_and_loading_refuses(name, monkeypatch):
    model = _model(name)
    ids, mask, target = _batch()
    with torch.no_grad():
        right = token_logprobs(model, ids, mask, target).sum()
        monkeypatch.setattr(forward, "LOGIT_PROCESSING", {})
        wrong = token_logprobs(model, ids, mask, target).sum()
    assert abs(right - wrong) > 1.0  # the bug this guards against: tens of nats on Gemma-2
    with pytest.raises(ModelLoadError, match="differ from the model's own forward by .* LOGIT_PROCESSING"):
        load_causal_lm(model)
    with pytest.raises(ModelLoadError, match="LOGIT_PROCESSING"):  # a bf16 load's wider tolerance still refuses
        load_causal_lm(model, dtype="bf16", copy=True)


@pytest.mark.parametrize("name", ["gemma2", "granite", "cohere", "llama", "gpt2", "mixtral", "lfm2", "jamba"])
def test_sampler_logprobs_equal_the_models_own_forward(name):
    """Two samples a prompt: a hybrid's state is prefilled per sample (repeating its cache's rows
    left the state at one row: a crash), and a mixture of experts' balancing loss is not computed
    on the one-token steps (a crash on the mask's length)."""
    model = _model(name)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]  # different lengths: left padding
    samples = sample(model, prompts, eos_id=1, pad_id=0, max_new_tokens=6, temperature=1.0, num_samples=2,
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = completion_logprobs(model, samples)
        theirs = _reference_logprobs(model, samples.input_ids, samples.attention_mask)[:, samples.prompt_ids.shape[1]:]
    keep = samples.completion_mask
    assert torch.allclose(samples.logprobs, theirs * keep, atol=1e-4)
    assert torch.allclose(ours * keep, theirs * keep, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "llama", "qwen2", "gpt2"])
def test_reward_and_critic_read_the_classifiers_own_scores(name):
    model = _model(name, tf.AutoModelForSequenceClassification)
    ids, mask, _ = _batch()
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, position_ids=forward.position_ids_from_mask(mask)).logits
        assert torch.allclose(reward_scores(model, ids, mask), own.squeeze(-1), atol=1e-5)
        backbone = getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=mask,
                                                           position_ids=forward.position_ids_from_mask(mask))
        values = model.score(backbone.last_hidden_state).squeeze(-1)
    assert torch.allclose(token_values(model, ids, mask), values, atol=1e-5)


def test_a_recurrent_model_is_refused_by_name(tmp_path):
    """RWKV reads no attention mask (left-padded rows' log-probs come out wrong) and keeps a state,
    not a KV cache: refused when loaded, in one line, rather than wrong numbers or a traceback."""
    import transformers

    from rlhfkit.models.load import ModelLoadError, load_causal_lm

    config = transformers.RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                     intermediate_size=64, context_length=64)
    transformers.RwkvForCausalLM(config).save_pretrained(tmp_path / "rwkv")
    with pytest.raises(ModelLoadError, match=r"rwkv is a recurrent model \(rwkv\); rlhfkit trains attention decoders"):
        load_causal_lm(str(tmp_path / "rwkv"))


def test_the_sampler_keeps_no_cache_once_it_returns(monkeypatch):
    """A cache decorator put on the function that judges a cache kept every prefill's keys and
    values (B x G x T, all layers) alive for the life of the process."""
    import gc
    import weakref

    from rlhfkit.rollout import sampler as sampler_module

    made = []
    original = sampler_module.forward_with_cache

    def recording(*args, **kwargs):
        logits, cache = original(*args, **kwargs)
        made.append(weakref.ref(cache))
        return logits, cache

    monkeypatch.setattr(sampler_module, "forward_with_cache", recording)
    sample(_model("gpt2"), [[5, 6, 7], [8, 9]], eos_id=1, pad_id=0, max_new_tokens=3, num_samples=2,
           generator=torch.Generator().manual_seed(0))
    gc.collect()
    assert made and all(ref() is None for ref in made)
