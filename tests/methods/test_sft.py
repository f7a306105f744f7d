import pytest
import torch

from rlhfkit.data.rows import read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.rollout.evaluate import exact_match
from rlhfkit.train.logging import read_metrics


@pytest.mark.slow
def test_sft_learns_the_task(tiny, sft_run):
    base, tok = load_policy(str(tiny["base"]), None)
    rows = read_rows(tiny["data"] / "sft_eval.jsonl")[:300]
    before = exact_match(base, tok, rows, 8)["accuracy"]
    assert before < 0.05  # a random model answers almost nothing right
    # Stated bar for the suite: >= 0.85 held-out exact match within 2000 steps of batch 128
    # (~60-80 s on 2 cores). The demo trains longer and shows >= 0.9.
    model, _ = load_policy(str(sft_run["out"] / "model"), None)
    after = exact_match(model, tok, rows, 8)["accuracy"]
    assert after >= 0.85, sft_run["evals"]
    assert abs(after - sft_run["accuracy"]) < 1e-9  # the saved model is the one evaluated
    losses = [m["train/loss"] for m in read_metrics(sft_run["out"]) if "train/loss" in m]
    assert losses[-1] < 0.2 * losses[0]
    assert sft_run["snapshot"] is not None and 0.5 <= sft_run["snapshot"]["accuracy"] < after


def test_a_mixture_of_experts_adds_its_router_balancing_loss_as_transformers_does(tiny, tmp_path, capfd):
    """SFT adds router_aux_loss_coef x the router's load-balancing loss, as TRL's SFT does (and
    transformers' own loss where the config asks for router logits): the first step's loss is
    transformers' loss with labels on the same rows, padded, to 1e-5, though rlhfkit packs them."""
    import transformers as tf
    from helpers import quiet_train
    from methods_setup import tiny_moe

    from rlhfkit.data.encode import collate_sft, encode_sft
    from rlhfkit.data.rows import read_rows
    from rlhfkit.methods.sft import SFTConfig, run_sft
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.train.config import ConfigError
    from rlhfkit.train.loop import BatchOrder

    folder = tiny_moe(tiny, tmp_path / "moe")
    data = tmp_path / "six.jsonl"  # (small() keeps the first file of that name: 64 rows after another test)
    data.write_text("".join((tiny["data"] / "sft_train.jsonl").read_text().splitlines(keepends=True)[:6]))
    data = str(data)
    tok = load_tokenizer(folder)
    batch = collate_sft(encode_sft(read_rows(data), tok, 64)[0], tok.pad_token_id)
    model = tf.MixtralForCausalLM.from_pretrained(folder)
    labels = batch.input_ids.masked_fill(~batch.completion_mask.bool(), -100)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                    output_router_logits=True)
    logged = {}
    for coef, packing in ((None, False), (0.0, False), (None, True)):  # packed: 110 tokens in 2 rows of 64
        capfd.readouterr()
        out_dir = tmp_path / f"sft-{coef}-{packing}"
        run_sft(SFTConfig(model=folder, train_data=data, max_length=64, packing=packing,
                          train=quiet_train(out_dir, max_steps=1, batch_size=6, router_aux_loss_coef=coef)))
        logged[coef, packing] = read_metrics(out_dir)[0]
        said = "its router's load-balancing loss is added with coefficient 0.02" in capfd.readouterr().err
        assert said == (coef is None)
    for packing in (False, True):  # the packed rows' padding is no token of the balance (2.0017 with it, 2.0015)
        assert abs(logged[None, packing]["train/router_aux_loss"] - float(out.aux_loss)) < 1e-5
        assert abs(logged[None, packing]["train/loss"] - float(out.loss)) < 1e-5  # NLL + 0.02 x balancing loss
    assert "train/router_aux_loss" not in logged[0.0, False]
    assert abs(logged[0.0, False]["train/loss"] - (float(out.loss) - 0.02 * float(out.aux_loss))) < 1e-5
    # micro-batches of 2 rows: the step adds the mean of the 3 forwards' balancing losses (as TRL's accumulation)
    out_dir = tmp_path / "sft-micro"
    run_sft(SFTConfig(model=folder, train_data=data, max_length=64,
                      train=quiet_train(out_dir, max_steps=1, batch_size=6, micro_batch_size=2)))
    examples = encode_sft(read_rows(data), tok, 64)[0]
    rows = BatchOrder(len(examples), 6, 0).indices(0)
    parts = []
    for i in range(0, 6, 2):
        micro = collate_sft([examples[j] for j in rows[i: i + 2]], tok.pad_token_id)
        with torch.no_grad():
            parts.append(float(model(input_ids=micro.input_ids, attention_mask=micro.attention_mask,
                                      output_router_logits=True).aux_loss))
    micro_logged = read_metrics(out_dir)[0]
    assert abs(sum(parts) / 3 - float(out.aux_loss)) > 1e-4  # the whole batch's is another number
    assert abs(micro_logged["train/router_aux_loss"] - sum(parts) / 3) < 1e-5
    assert abs(micro_logged["train/loss"] - (logged[0.0, False]["train/loss"] + 0.02 * sum(parts) / 3)) < 1e-5
    with pytest.raises(ConfigError, match="not a mixture of experts with transformers' router load-balancing loss"):
        run_sft(SFTConfig(model=str(tiny["base"]), train_data=data, max_length=64,
                          train=quiet_train(tmp_path / "dense", max_steps=1, router_aux_loss_coef=0.1)))


def test_a_router_balancing_loss_asked_of_a_method_that_adds_none_is_refused(tiny, tmp_path):
    """The RM, PRM and PPO add no router balancing loss (neither do TRL's): setting its weight there
    is refused rather than ignored."""
    from methods_setup import method_config

    from rlhfkit.methods.rm import run_rm
    from rlhfkit.train.config import ConfigError, replace

    cfg = replace(method_config("rm", tiny, tmp_path / "rm", 1), train__router_aux_loss_coef=0.1)
    with pytest.raises(ConfigError, match="train.router_aux_loss_coef=0.1: rm does not add a router balancing loss"):
        run_rm(cfg)


def test_the_balancing_loss_is_found_for_a_subclass_made_elsewhere(tiny, tmp_path):
    """FSDP2's fully_shard swaps the model's class for a subclass defined in torch: the balancing
    loss is still the one of the model's own modeling file."""
    import transformers as tf
    from methods_setup import tiny_moe

    from rlhfkit.models.forward import balancing_loss

    model = tf.MixtralForCausalLM.from_pretrained(tiny_moe(tiny, tmp_path / "moe"))
    model.__class__ = type("FSDPMixtralForCausalLM", (type(model),), {"__module__": "torch.distributed.fsdp"})
    function, experts, top_k, coef = balancing_loss(model)
    assert function is tf.models.mixtral.modeling_mixtral.load_balancing_loss_func
    assert (experts, top_k, coef) == (4, 2, 0.02)


def test_dft_trains_and_its_first_loss_is_the_probability_weighted_nll(tiny, tmp_path):
    """loss_type=dft (TRL's): the first step's loss is -1/N sum p log p of the start model on the
    step's rows, by hand from its forward; 40 steps lower the held-out NLL (eval/loss stays the NLL)."""
    from methods_setup import method_config

    from rlhfkit.data.encode import collate_sft, encode_sft
    from rlhfkit.methods.sft import heldout_loss, run_sft
    from rlhfkit.models.forward import token_logprobs
    from rlhfkit.train.config import replace
    from rlhfkit.train.loop import BatchOrder

    held_out = tmp_path / "eval32.jsonl"  # its own file: small() keeps the first row count asked of a name
    held_out.write_text("\n".join((tiny["data"] / "sft_eval.jsonl").read_text().splitlines()[:32]) + "\n")
    cfg = replace(method_config("sft", tiny, tmp_path / "dft", 40, log_every=1), loss_type="dft", train__eval_every=40,
                  eval_data=str(held_out), eval_max_new_tokens=4)
    model, tok = load_policy(str(tiny["base"]), None)
    examples, _ = encode_sft(read_rows(cfg.train_data), tok, cfg.max_length)
    first = collate_sft([examples[i] for i in BatchOrder(len(examples), 8, cfg.train.seed).indices(0)], tok.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(model, first.input_ids, first.attention_mask, first.completion_mask)
    by_hand = float((-lp * lp.exp() * first.completion_mask).sum() / first.completion_mask[:, 1:].sum())
    held, _ = encode_sft(read_rows(cfg.eval_data), tok, cfg.max_length)
    before = heldout_loss(model, held, tok.pad_token_id)
    summary = run_sft(cfg)
    logged = read_metrics(tmp_path / "dft")
    assert logged[0]["train/loss"] == pytest.approx(by_hand, rel=1e-4)
    assert summary["evals"][-1]["loss"] < before - 0.3, (before, summary["evals"])


@pytest.mark.parametrize("kind", ["prompt_completion", "messages"])
def test_completion_only_loss_false_trains_every_token_as_transformers_labels_do(tiny, tmp_path, kind):
    """completion_only_loss=false (TRL's; its default for messages): the first step's loss is
    transformers' loss with labels = input_ids on every real token, padded or packed; the default's
    is the completion's (assistant turns') alone, a different number; the held-out loss is over the
    same tokens as the training's."""
    import json

    import transformers as tf
    from helpers import quiet_train

    from rlhfkit.data.encode import collate_sft, encode_sft
    from rlhfkit.methods.sft import SFTConfig, heldout_loss, run_sft
    from rlhfkit.models.load import load_tokenizer

    data = tmp_path / "six.jsonl"
    if kind == "messages":
        def chat(q, a):
            return [{"role": "user", "content": f"What is {q}?"}, {"role": "assistant", "content": f" {a}"}]
        rows = [{"messages": chat("1+2", 3) + chat("2+2", 4)}, {"messages": chat("5-1", 4)}] * 3
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        data.write_text("".join((tiny["data"] / "sft_train.jsonl").read_text().splitlines(keepends=True)[:6]))
    tok = load_tokenizer(str(tiny["base"]))
    examples, _ = encode_sft(read_rows(str(data)), tok, 64, completion_only=False)
    batch = collate_sft(examples, tok.pad_token_id)
    labels = batch.input_ids.masked_fill(~batch.attention_mask.bool(), -100)
    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny["base"]))
    with torch.no_grad():
        everything = float(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss)
    assert abs(heldout_loss(model, examples, tok.pad_token_id) - everything) < 1e-5
    logged = {}
    for only, packing in ((False, False), (False, True), (True, False)):
        out = tmp_path / f"run-{only}-{packing}"
        result = run_sft(SFTConfig(model=str(tiny["base"]), train_data=str(data), eval_data=str(data), max_length=64,
                                   completion_only_loss=only, packing=packing,
                                   train=quiet_train(out, max_steps=1, batch_size=6, eval_every=1)))
        logged[only, packing] = (next(m["train/loss"] for m in read_metrics(out) if "train/loss" in m), result)
    for packing in (False, True):
        assert abs(logged[False, packing][0] - everything) < 1e-5
    answers = collate_sft(encode_sft(read_rows(str(data)), tok, 64)[0], tok.pad_token_id)  # the default's targets
    with torch.no_grad():
        completion = float(model(input_ids=answers.input_ids, attention_mask=answers.attention_mask,
                                 labels=answers.input_ids.masked_fill(~answers.completion_mask.bool(), -100)).loss)
    assert abs(logged[True, False][0] - completion) < 1e-5 and abs(completion - everything) > 1e-3
    # the held-out loss after the step: over every token (the same rows, one step later), not the answers'
    trained, _ = load_policy(str(tmp_path / "run-False-False" / "model"), None)
    assert abs(logged[False, False][1]["eval_loss"] - heldout_loss(trained, examples, tok.pad_token_id)) < 1e-5


def test_every_token_training_cuts_a_prompt_that_fills_max_length_and_counts_targets_alone(tiny, tmp_path):
    """completion_only_loss=false: a row whose prompt alone fills max_length still has targets, so
    overlong=truncate cuts it (TRL trains it) where the default skips it; TRL's null is refused;
    train/tokens counts the targets, a text row's first token not among them."""
    import json

    from helpers import quiet_train

    from rlhfkit.data.encode import encode_sft
    from rlhfkit.methods.sft import SFTConfig, run_sft
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.train.config import load_config

    tok = load_tokenizer(str(tiny["base"]))
    rows = read_rows(tiny["data"] / "sft_train.jsonl")[:4]
    longest_prompt = max(len(tok(r.data["prompt"])["input_ids"]) for r in rows)
    cut, report = encode_sft(rows, tok, longest_prompt - 2, "truncate", completion_only=False)
    assert len(cut) == 4 and report.truncated == 4 and {len(e.input_ids) for e in cut} == {longest_prompt - 2}
    with pytest.raises(Exception, match="no usable rows"):
        encode_sft(rows, tok, 3, "truncate")  # the prompts alone fill 3 tokens: nothing to train on
    with pytest.raises(Exception, match="completion_only_loss=null is TRL's default, which trains .* set true"):
        load_config(SFTConfig, None, ["completion_only_loss=null"])  # TRL's null means two things: refused
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a}+{a}={2 * a}"}) + "\n" for a in range(10, 18)))
    logged = {}
    for only in (True, False):
        out = tmp_path / f"text-{only}"
        run_sft(SFTConfig(model=str(tiny["base"]), train_data=str(data), max_length=32, completion_only_loss=only,
                          train=quiet_train(out, max_steps=1, batch_size=8)))
        logged[only] = next(m for m in read_metrics(out) if "train/loss" in m)
    assert logged[True]["train/tokens"] == logged[False]["train/tokens"]
    assert logged[True]["train/loss"] == pytest.approx(logged[False]["train/loss"], abs=1e-6)
