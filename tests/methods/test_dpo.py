import copy
import math

import pytest
import torch
from helpers import quiet_train
from methods_setup import method_config, small, tr_dpo_config

from rlhfkit.data.prefs import collate_rankings, encode_rankings
from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.methods.dpo import DPOConfig, DPOLoss, dpo_objective, run_dpo
from rlhfkit.models.lora import Reference
from rlhfkit.models.rankings import precompute_reference


def test_precomputed_and_per_step_reference_agree(tiny):
    model, tok = load_policy(str(tiny["base"]), None)  # exactness needs no trained model
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    for data in ("prefs_train", "rankings_train"):  # pairs and Plackett-Luce rankings
        examples, _ = encode_rankings(read_rows(tiny["data"] / f"{data}.jsonl")[:6], tok, 64)
        with_ref = precompute_reference(reference, examples, tok.pad_token_id, batch_size=4)
        # Move the policy away from the reference so the losses are not trivially ln 2.
        policy = copy.deepcopy(model)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
        pre, fwd = dpo_objective(DPOLoss(beta=0.5)), dpo_objective(DPOLoss(beta=0.5), Reference(module=reference))
        a, b = collate_rankings(with_ref, tok.pad_token_id), collate_rankings(examples, tok.pad_token_id)
        loss_pre, m_pre = pre.loss(policy, a, pre.counts(a))
        loss_fwd, m_fwd = fwd.loss(policy, b, fwd.counts(b))
        assert torch.allclose(loss_pre, loss_fwd, atol=1e-5), data
        assert torch.allclose(m_pre["margin"], m_fwd["margin"], atol=1e-5)
        assert abs(loss_pre.item() - 0.6931) > 1e-3


@pytest.mark.slow
def test_dpo_raises_preference_accuracy_without_collapse(tiny, sft_run, tmp_path):
    data = tiny["data"]
    cfg = DPOConfig(model=str(sft_run["out"] / "snapshot"), train_data=str(data / "prefs_train.jsonl"),
                    eval_data=str(data / "prefs_eval.jsonl"), eval_prompts=str(data / "prompts_eval.jsonl"),
                    max_length=64, eval_limit=300, beta=0.5,
                    train=quiet_train(tmp_path / "dpo", max_steps=150, batch_size=32, lr=3e-4, warmup_steps=10))
    summary = run_dpo(cfg)
    assert summary["preference_accuracy_before"] == 0.5  # policy == reference: every implicit reward is 0
    # Stated bar: +0.25 held-out preference accuracy in 150 steps (measured ~0.9 with the demo's settings).
    assert summary["preference_accuracy"] >= 0.75
    assert summary["accuracy"] >= summary["accuracy_before"] - 0.1  # exact match does not collapse
    assert summary["reference"] == "precompute"


def test_sft_on_chosen_first_when_there_is_no_sft_model(tiny, tmp_path):
    data = tiny["data"]
    cfg = DPOConfig(model=str(tiny["base"]), train_data=str(data / "prefs_train.jsonl"), max_length=64, beta=0.5,
                    sft_first_steps=30, reference="forward",
                    train=quiet_train(tmp_path / "dpo", max_steps=3, batch_size=16, lr=3e-3))
    summary = run_dpo(cfg)
    from rlhfkit.train.logging import read_metrics

    sft_losses = [m["train/loss"] for m in read_metrics(tmp_path / "dpo" / "sft_chosen")]
    assert len(sft_losses) == 30 and sft_losses[-1] < sft_losses[0] - 1.0  # likelihood of y_w maximised first
    first_dpo = read_metrics(tmp_path / "dpo")[0]["train/loss"]
    assert abs(first_dpo - 0.6931) < 1e-3  # then DPO starts with reference == the SFT-on-chosen policy
    assert summary["steps"] == 3


def test_shared_prompt_layout_gives_the_plain_loss_and_gradients(tiny):
    """Each prompt forwarded once for all its answers (share_prompt, the default): the same DPO and
    Plackett-Luce losses, RPO term and gradients as one row per answer, with fewer positions."""
    from rlhfkit.data.prefs import collate_shared_prompt

    model, tok = load_policy(str(tiny["base"]), None)
    reference = Reference(copy.deepcopy(model).eval().requires_grad_(False))
    with torch.no_grad():
        for p in model.parameters():  # a policy away from its reference, so the loss is not ln 2
            p.add_(0.02 * torch.randn_like(p))
    for data in ("prefs_train", "rankings_train"):
        examples, _ = encode_rankings(read_rows(tiny["data"] / f"{data}.jsonl")[:7], tok, 64)
        plain, shared = collate_rankings(examples, tok.pad_token_id), collate_shared_prompt(examples, tok.pad_token_id)
        assert shared.input_ids.numel() < 0.8 * plain.input_ids.numel()
        objective = dpo_objective(DPOLoss(beta=0.5, rpo_alpha=1.0), reference)
        results = []
        for batch in (plain, shared):
            model.zero_grad()
            totals = objective.counts(batch)
            loss, metrics = objective.loss(model, batch, totals)
            loss.backward()
            results.append((loss.item(), totals, metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (loss_a, totals_a, metrics_a, grads_a), (loss_b, totals_b, metrics_b, grads_b) = results
        assert totals_a == totals_b
        assert abs(loss_a - loss_b) < 1e-5 and abs(loss_a - 0.6931) > 1e-3, data
        for key in ("logps_chosen", "logps_rejected", "nll_chosen"):
            assert abs(float(metrics_a[key]) - float(metrics_b[key])) < 1e-4, key
        for name, grad in grads_a.items():
            assert torch.allclose(grad, grads_b[name], atol=1e-5, rtol=1e-4), (data, name)


@pytest.mark.parametrize("loss_type, smoothing", [("ipo", 0.0), ("hinge", 0.0), ("sigmoid", 0.2), ("sppo_hard", 0.0),
                                                  ("apo_zero:0.5,nca_pair:0.5", 0.0)])
def test_ipo_hinge_and_smoothing_reach_their_margins_and_refuse_rankings(tiny, tmp_path, loss_type, smoothing):
    data = tmp_path / "pairs.jsonl"  # one batch of 16 pairs, seen every step: the losses' own targets show
    data.write_text("".join((tiny["data"] / "prefs_train.jsonl").read_text().splitlines(keepends=True)[:16]))
    cfg = DPOConfig(model=str(tiny["base"]), train_data=str(data), max_length=64, beta=0.5, loss_type=loss_type,
                    label_smoothing=smoothing,
                    train=quiet_train(tmp_path / "dpo", max_steps=24, batch_size=16, lr=1e-3))
    run_dpo(cfg)
    from rlhfkit.train.logging import read_metrics

    first, last = read_metrics(tmp_path / "dpo")[0], read_metrics(tmp_path / "dpo")[-1]
    # policy == reference, h = 0: IPO's (0 - 1/(2 beta))^2 = 1, hinge's max(0, 1 - 0) = 1, smoothed ln 2,
    # SPPO's (0 - 1)^2 + (0 + 1)^2 = 2, APO-zero's 1 - 1/2 + 1/2 = 1 and NCA's 2 ln 2 half each
    start = {"ipo": 1.0, "hinge": 1.0, "sigmoid": math.log(2), "sppo_hard": 2.0}.get(loss_type, 0.5 + math.log(2))
    assert abs(first["train/loss"] - start) < 1e-4 and last["train/preference_accuracy"] == 1.0
    if loss_type == "ipo":  # IPO pulls the per-token h to 1/(2 beta) = 1, where its loss is 0
        assert last["train/loss"] < 0.02
    elif loss_type == "hinge":  # the hinge stops pushing a pair once beta h >= 1
        assert last["train/loss"] < 0.05 and last["train/margin"] > 0.9
    elif loss_type == "sppo_hard":  # SPPO pulls each log-ratio to +-1/(2 beta): rewards beta w -> 0.5, beta l -> -0.5
        assert last["train/loss"] < 0.1
        assert abs(last["train/rewards_chosen"] - 0.5) < 0.1 and abs(last["train/rewards_rejected"] + 0.5) < 0.1
    elif loss_type != "sigmoid":  # APO-zero and NCA: the chosen answers' likelihood rises (plain DPO lets it fall)
        assert last["train/loss"] < start - 0.3 and last["train/rewards_chosen"] > 0
    else:  # eps 0.2: the loss is least, 0.8 ln(1 + 1/4) + 0.2 ln(1 + 4) = 0.5004, at beta h = ln 4 = 1.386
        # (measured 0.5011 and 1.375; plain DPO's loss falls to 0.08 here, its margin passes 2.5)
        assert abs(last["train/loss"] - 0.5004) < 0.01 and abs(last["train/margin"] - math.log(4)) < 0.1
    rankings = DPOConfig(model=str(tiny["base"]), train_data=str(tiny["data"] / "rankings_train.jsonl"),
                         max_length=64, loss_type=loss_type, label_smoothing=smoothing,
                         train=quiet_train(tmp_path / "r", max_steps=1))
    what = f"label_smoothing={smoothing}" if smoothing else f"loss_type={loss_type}"
    with pytest.raises(DataError, match=rf"rankings_train.jsonl:1: field 'completions' ranks 6 answers; "
                                        rf"{what} is for pairs"):
        run_dpo(rankings)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_model_saved_with_dropout_starts_at_ln2(tiny, tmp_path):
    """Dropout is off, as TRL's ``disable_dropout``: at step 1 the policy is its reference, so every
    implicit reward is 0 and the loss ln 2 (with attention dropout 0.5 on it was noise)."""
    from methods_setup import dropout_copy

    from rlhfkit.train.logging import read_metrics

    model = dropout_copy(tiny, tmp_path / "drop")
    run_dpo(DPOConfig(model=str(model), train_data=str(tiny["data"] / "prefs_train.jsonl"), max_length=64,
                      reference="forward", train=quiet_train(tmp_path / "dpo", max_steps=1, batch_size=16)))
    first = read_metrics(tmp_path / "dpo")[0]
    assert abs(first["train/loss"] - math.log(2)) < 1e-6


def test_the_objective_refuses_a_ranking_for_a_pairwise_only_loss(tiny):
    model, tok = load_policy(str(tiny["base"]), None)
    examples, _ = encode_rankings(read_rows(tiny["data"] / "rankings_train.jsonl")[:2], tok, 64)
    batch = collate_rankings(precompute_reference(model, examples, tok.pad_token_id), tok.pad_token_id)
    objective = dpo_objective(DPOLoss(beta=0.5, loss_type="ipo"))
    with pytest.raises(ValueError, match="has the Plackett-Luce loss only; loss_type=ipo"):
        objective.loss(model, batch, objective.counts(batch))


def test_a_mixture_of_experts_adds_its_router_balancing_loss_to_dpos(tiny, tmp_path):
    """DPO adds router_aux_loss_coef x the policy's router balancing loss, as TRL's DPO does: at step 1
    (policy = reference) the loss is ln 2 plus it, over the answers forwarded as TRL forwards them."""
    import transformers as tf
    from methods_setup import method_config, tiny_moe

    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.train.config import replace
    from rlhfkit.train.logging import read_metrics
    from rlhfkit.train.loop import BatchOrder

    folder = tiny_moe(tiny, tmp_path / "moe")
    cfg = replace(method_config("dpo", tiny, tmp_path / "dpo", 1), model=folder, share_prompt=False,
                  train__batch_size=4)
    run_dpo(cfg)
    first = read_metrics(tmp_path / "dpo")[0]
    tok = load_tokenizer(folder)
    examples, _ = encode_rankings(read_rows(cfg.train_data), tok, 64)
    model = tf.MixtralForCausalLM.from_pretrained(folder)
    rows = [examples[i] for i in BatchOrder(len(examples), 4, 0).indices(0)]  # the first step's rows
    batch = collate_rankings(rows, tok.pad_token_id)
    with torch.no_grad():
        aux = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True).aux_loss
    assert abs(first["train/router_aux_loss"] - float(aux)) < 1e-5
    assert abs(first["train/loss"] - (math.log(2) + 0.02 * float(aux))) < 1e-5


def test_ld_alpha_and_f_divergence_reach_the_loss_as_their_papers_write_it(tiny, tmp_path):
    """LD-DPO's sums (the shorter answer's length whole, the rest times ld_alpha) on both batch
    layouts, against the token log-probs summed by hand; the objective's loss with js_divergence
    on them, against -log sig(beta (f(w) - f(l))) by hand; a run with ld_alpha gives the same
    losses with the reference precomputed (its sums LD's too) and forwarded."""
    from rlhfkit.data.prefs import collate_shared_prompt
    from rlhfkit.models.forward import token_logprobs
    from rlhfkit.models.rankings import sequence_logps
    from rlhfkit.train.config import ConfigError
    from rlhfkit.train.logging import read_metrics

    model, tok = load_policy(str(tiny["base"]), None)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    examples, _ = encode_rankings(read_rows(tiny["data"] / "prefs_train.jsonl")[:6], tok, 64)
    plain = collate_rankings(examples, tok.pad_token_id)
    alpha = 0.3

    def by_hand(m):
        with torch.no_grad():
            logprobs = token_logprobs(m, plain.input_ids, plain.attention_mask, plain.completion_mask)
        sums = []
        for p, e in enumerate(examples):
            shared = min(len(c) for c in e.completion_ids)
            for j, c in enumerate(e.completion_ids):
                row = logprobs[plain.slot.tolist().index(p * 2 + j)]
                tokens = row[len(e.prompt_ids): len(e.prompt_ids) + len(c)]
                sums.append(float(tokens[:shared].sum() + alpha * tokens[shared:].sum()))
        return torch.tensor(sums).view(-1, 2)

    lengths = {len(c) for e in examples for c in e.completion_ids}
    assert len(lengths) > 1  # answers of different lengths: LD's weights are not all 1
    expected = by_hand(model)
    for batch in (plain, collate_shared_prompt(examples, tok.pad_token_id)):
        with torch.no_grad():
            got = batch.grid(sequence_logps(model, batch, alpha))
            whole = batch.grid(sequence_logps(model, batch))
        assert torch.allclose(got, expected, atol=1e-4)
        assert (got - whole).abs().max() > 1e-2
    u = expected - by_hand(reference)  # the LD log-ratios
    f = math.log(2) + torch.nn.functional.logsigmoid(u)  # js_divergence's f'
    loss_by_hand = float(torch.nn.functional.softplus(-0.5 * (f[:, 0] - f[:, 1])).mean())
    objective = dpo_objective(DPOLoss(beta=0.5, f_divergence_type="js_divergence", ld_alpha=alpha),
                              Reference(module=reference))
    with torch.no_grad():
        loss, _ = objective.loss(model, plain, objective.counts(plain))
    assert abs(loss.item() - loss_by_hand) < 1e-5 and abs(loss_by_hand - math.log(2)) > 1e-3
    # RPO's NLL beside LD-DPO: of every chosen token, as without it (it was the LD sum over all tokens)
    nll = {}
    for ld in (None, alpha):
        rpo = dpo_objective(DPOLoss(beta=0.5, rpo_alpha=1.0, ld_alpha=ld), Reference(module=reference))
        with torch.no_grad():
            nll[ld] = float(rpo.loss(model, plain, rpo.counts(plain))[1]["nll_chosen"])
    assert nll[alpha] == pytest.approx(nll[None], rel=1e-6)
    losses = {}
    for mode in ("precompute", "forward"):
        run_dpo(DPOConfig(model=str(tiny["base"]), train_data=str(tiny["data"] / "prefs_train.jsonl"), max_length=64,
                          beta=0.5, reference=mode, ld_alpha=alpha, f_divergence_type="alpha_divergence",
                          f_alpha_divergence_coef=0.3,
                          train=quiet_train(tmp_path / mode, max_steps=3, batch_size=8, lr=1e-3)))
        losses[mode] = [m["train/loss"] for m in read_metrics(tmp_path / mode) if "train/loss" in m]
    assert losses["precompute"] == pytest.approx(losses["forward"], abs=1e-5)
    assert abs(losses["forward"][0] - math.log(2)) < 1e-6 and abs(losses["forward"][2] - math.log(2)) > 1e-3
    with pytest.raises(ConfigError, match="f_divergence_type=forward_kl replaces the log-ratios .* loss_type nca_pair"):
        DPOConfig(model="m", train_data="d", f_divergence_type="forward_kl", loss_type="sigmoid:0.5,nca_pair:0.5")
    with pytest.raises(ConfigError, match="f_alpha_divergence_coef"):
        DPOConfig(model="m", train_data="d", f_alpha_divergence_coef=0.3)
    with pytest.raises(ConfigError, match="ld_alpha' must be in \\[0, 1\\]"):
        DPOConfig(model="m", train_data="d", ld_alpha=1.5)
    rankings = DPOConfig(model=str(tiny["base"]), train_data=str(tiny["data"] / "rankings_train.jsonl"),
                         max_length=64, ld_alpha=alpha, train=quiet_train(tmp_path / "r", max_steps=1))
    with pytest.raises(DataError, match="ranks 6 answers; ld_alpha=0.3 is for pairs"):
        run_dpo(rankings)


def test_use_weighting_weighs_each_pair_by_wpos_weights_computed_by_hand(tiny):
    """WPO: each pair's loss times w(y_w) w(y_l), w = exp(mean over the answer's tokens of
    log pi(y_t) - log sum_v pi(v)^2), here from the model's full logits by hand, on both batch
    layouts; without gradient through w (the loss's gradient is the weighted losses')."""
    from rlhfkit.data.prefs import collate_shared_prompt
    from rlhfkit.models.rankings import output_logps

    model, tok = load_policy(str(tiny["base"]), None)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    examples, _ = encode_rankings(read_rows(tiny["data"] / "prefs_train.jsonl")[:5], tok, 64)
    aligned = []
    with torch.no_grad():
        for e in examples:
            for c in e.completion_ids:
                ids = torch.tensor([e.prompt_ids + c])
                logp = model(input_ids=ids).logits[0, len(e.prompt_ids) - 1: -1].float().log_softmax(-1)
                per_token = logp.gather(-1, torch.tensor(c)[:, None])[:, 0] - torch.logsumexp(2 * logp, -1)
                aligned.append(float(per_token.mean()))
    aligned = torch.tensor(aligned).view(-1, 2)
    plain = collate_rankings(examples, tok.pad_token_id)
    for batch in (plain, collate_shared_prompt(examples, tok.pad_token_id)):
        with torch.no_grad():
            means = output_logps(model, batch, aligned=True).aligned
        assert torch.allclose(batch.grid(means), aligned, atol=1e-4)
    weights = aligned.exp().prod(-1)
    assert (weights - 1).abs().max() > 0.05 and (weights.max() - weights.min()) > 0.05  # off 1, not all alike
    with torch.no_grad():
        logps = plain.grid(output_logps(model, plain).sums)
        ref = plain.grid(output_logps(reference, plain).sums)
    per_pair = torch.nn.functional.softplus(-0.5 * ((logps - ref)[:, 0] - (logps - ref)[:, 1]))
    objective = dpo_objective(DPOLoss(beta=0.5, use_weighting=True), Reference(module=reference))
    loss, metrics = objective.loss(model, plain, objective.counts(plain))
    assert abs(loss.item() - float((weights * per_pair).mean())) < 1e-5
    assert abs(float(metrics["pair_weight"]) - float(weights.mean())) < 1e-5
    rpo = dpo_objective(DPOLoss(beta=0.5, rpo_alpha=1.0, use_weighting=True), Reference(module=reference))
    with torch.no_grad():
        rpo_loss, rpo_metrics = rpo.loss(model, plain, rpo.counts(plain))
    chosen_tokens = rpo.counts(plain)["chosen_tokens"]
    weighted = float(-(weights * logps[:, 0]).sum()) / chosen_tokens  # TRL weighs the NLL term too
    assert float(rpo_loss) == pytest.approx(float((weights * per_pair).mean()) + weighted, rel=1e-5)
    # the logged nll_chosen is the plain NLL, as its name says
    assert float(rpo_metrics["nll_chosen"]) == pytest.approx(float(-logps[:, 0].sum()) / chosen_tokens, rel=1e-5)
    loss.backward()  # the weights hold no graph: the gradient is that of the weighted per-pair losses
    grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logps = plain.grid(output_logps(model, plain).sums)
    (weights * torch.nn.functional.softplus(-0.5 * ((logps - ref)[:, 0] - (logps - ref)[:, 1]))).mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grad[name], p.grad, atol=1e-6, rtol=1e-4)
    from rlhfkit.methods.dpo import pairwise_only

    assert pairwise_only(DPOConfig(model="m", train_data="d", use_weighting=True)) == "use_weighting=True"
    assert pairwise_only(DPOConfig(model="m", train_data="d")) is None  # plain DPO: rankings take Plackett-Luce
    for plain in (dict(ld_alpha=1.0), dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)):
        assert pairwise_only(DPOConfig(model="m", train_data="d", **plain)) is None  # DPO's own sums and f'
    assert pairwise_only(DPOConfig(model="m", train_data="d", ld_alpha=0.5)) == "ld_alpha=0.5"


# --- TR-DPO: the reference moved toward the policy every ref_model_sync_steps steps ----------------

def _losses(out) -> list:
    from rlhfkit.train.logging import read_metrics

    return [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]


def test_tr_dpo_mixes_the_reference_toward_the_policy_every_tau_steps(tiny, tmp_path, capsys):
    """ref <- alpha x policy + (1 - alpha) x ref after steps 2 and 4 (tau 2, TRL's alpha 0.6), read from
    each step's checkpoint; the steps after a sync compare with the moved reference, those before
    with the start model (the same losses as a run without TR-DPO)."""
    from safetensors.torch import load_file

    from rlhfkit.train.checkpoint import complete_checkpoints

    run_dpo(tr_dpo_config(tiny, tmp_path / "tr", 4, save_every=1, keep_checkpoints=0))
    said = capsys.readouterr().err
    assert "optimizer step 2: the reference moved toward the policy" in said and "optimizer step 4: the" in said
    assert "never moves" not in said and "optimizer step 3: the" not in said
    run_dpo(tr_dpo_config(tiny, tmp_path / "plain", 4, sync=False))
    saved = complete_checkpoints(tmp_path / "tr")
    assert len(saved) == 4
    policy = [load_file(str(c / "model.safetensors")) for c in saved]
    ref = [load_file(str(c / "reference.safetensors")) for c in saved]
    start = load_file(str(tiny["base"] / "model.safetensors"))
    names = set(ref[0]) & set(start)  # one name of each tied tensor is saved
    assert names and names == set(policy[0]) & set(start)
    for name in names:
        torch.testing.assert_close(ref[0][name], start[name], rtol=0, atol=0)  # step 1: no sync yet
        torch.testing.assert_close(ref[1][name], 0.6 * policy[1][name] + 0.4 * start[name], rtol=0, atol=1e-6)  # float rounding of the two orders
        torch.testing.assert_close(ref[2][name], ref[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ref[3][name], 0.6 * policy[3][name] + 0.4 * ref[1][name], rtol=0, atol=1e-6)  # float rounding of the two orders
    assert any(not torch.equal(policy[1][name], start[name]) for name in names)  # the policy moved
    tr, plain = _losses(tmp_path / "tr"), _losses(tmp_path / "plain")
    assert tr[:2] == plain[:2] and abs(tr[2] - plain[2]) > 1e-6


def test_tr_dpo_held_out_accuracy_compares_with_the_moved_reference(tiny, tmp_path):
    """The last eval's preference accuracy is the policy's against the reference the run ends with
    (the last checkpoint's), not against the start model, as TRL's eval reads its synced ref_model."""
    from safetensors.torch import load_file

    from rlhfkit.models.rankings import preference_accuracy
    from rlhfkit.train.checkpoint import complete_checkpoints
    from rlhfkit.train.config import replace

    data = small(tiny, "prefs_eval.jsonl")
    cfg = replace(tr_dpo_config(tiny, tmp_path / "tr", 4, sync_steps=1, save_every=4), eval_data=data,
                  train__eval_every=4)
    summary = run_dpo(cfg)
    policy, tok = load_policy(str(tmp_path / "tr" / "model"), None)
    moved, _ = load_policy(str(tiny["base"]), None)
    moved.load_state_dict(load_file(str(complete_checkpoints(tmp_path / "tr")[-1] / "reference.safetensors")), strict=False)
    start, _ = load_policy(str(tiny["base"]), None)
    examples, _ = encode_rankings(read_rows(data), tok, 64, "skip")
    against = {name: preference_accuracy(policy, precompute_reference(ref, examples, tok.pad_token_id),
                                         tok.pad_token_id) for name, ref in (("moved", moved), ("start", start))}
    assert summary["preference_accuracy"] == pytest.approx(against["moved"], abs=1e-12)
    assert against["moved"] != against["start"]  # the test can tell the two apart


def test_tr_dpo_resumes_with_the_moved_reference(tiny, tmp_path):
    """4 steps straight, and 2 then 2 more after a resume, give the same losses: the checkpoint
    holds the reference as synced after step 2 (reloading the start model would change step 3)."""
    run_dpo(tr_dpo_config(tiny, tmp_path / "full", 4, save_every=2))
    run_dpo(tr_dpo_config(tiny, tmp_path / "cut", 2, save_every=2))
    run_dpo(tr_dpo_config(tiny, tmp_path / "cut", 4, save_every=2, resume=True))
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full") and len(_losses(tmp_path / "full")) == 4


def test_tr_dpo_past_the_runs_steps_is_said(tiny, tmp_path, capsys):
    run_dpo(tr_dpo_config(tiny, tmp_path, 2, sync_steps=512))  # TRL's default, on a short run
    assert "ref_model_sync_steps=512 is past this run's 2 optimizer steps, so the reference never moves" in \
        capsys.readouterr().err


def test_tr_dpo_settings_are_refused_where_they_cannot_apply(tiny, tmp_path):
    from rlhfkit.train.config import ConfigError, LoraConfig, replace

    cfg = tr_dpo_config(tiny, tmp_path, 2)
    with pytest.raises(ConfigError, match="sync_ref_model=true moves the reference .* set reference=forward"):
        replace(cfg, reference="precompute")
    with pytest.raises(ConfigError, match="sync_ref_model=true with LoRA"):
        replace(cfg, lora=LoraConfig(r=4))
    with pytest.raises(ConfigError, match=r"'ref_model_mixup_alpha' must be in \(0, 1\]"):
        replace(cfg, ref_model_mixup_alpha=0.0)
    with pytest.raises(ConfigError, match=r"ref_model_sync_steps=8 is used by TR-DPO's reference sync \(sync_ref_model=true\) only"):
        replace(cfg, sync_ref_model=False, ref_model_sync_steps=8)


def _moved_policy(tiny):
    """The tiny base as a policy moved off its frozen copy by seeded noise: (policy, tokenizer, reference)."""
    model, tok = load_policy(str(tiny["base"]), None)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model, tok, reference


def test_aot_sorts_each_forwards_pairs_and_raises_the_preference_accuracy(tiny, tmp_path):
    """AOT (loss_type=aot, aot_unpaired) through the objective: the loss of one forward's pairs
    equals the sorted columns' by hand, from the policy's and the reference's sums; a forward of
    half the pairs sorts those alone (micro_batch_size changes the loss, as TRL's per-device
    batch does); on 16 pairs seen every step it starts at ln 2 and learns them."""
    from rlhfkit.models.rankings import output_logps
    from rlhfkit.train.logging import read_metrics

    model, tok, reference = _moved_policy(tiny)
    examples, _ = encode_rankings(read_rows(tiny["data"] / "prefs_train.jsonl")[:8], tok, 64)
    plain = collate_rankings(examples, tok.pad_token_id)
    with torch.no_grad():
        logps = plain.grid(output_logps(model, plain).sums)
        ref = plain.grid(output_logps(reference, plain).sums)
    beta = 0.5

    def by_hand(rows, name):
        a, b = ((logps[rows, 0] - logps[rows, 1], ref[rows, 0] - ref[rows, 1]) if name == "aot"
                else (logps[rows, 0] - ref[rows, 0], logps[rows, 1] - ref[rows, 1]))
        return torch.nn.functional.softplus(-beta * (torch.sort(a)[0] - torch.sort(b)[0]))

    for name in ("aot", "aot_unpaired"):
        objective = dpo_objective(DPOLoss(beta=beta, loss_type=name), Reference(module=reference))
        with torch.no_grad():
            whole, _ = objective.loss(model, plain, objective.counts(plain))
            half = collate_rankings(examples[:4], tok.pad_token_id)
            part, _ = objective.loss(model, half, objective.counts(plain))  # a micro-batch: divided by all 8 pairs
        assert abs(whole.item() - float(by_hand(slice(None), name).mean())) < 1e-5, name
        assert abs(part.item() - float(by_hand(slice(0, 4), name).sum() / 8)) < 1e-5, name
        assert abs(float(by_hand(slice(0, 4), name).sum() + by_hand(slice(4, 8), name).sum()) / 8
                   - whole.item()) > 1e-4, name  # sorting in halves is another loss
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((tiny["data"] / "prefs_train.jsonl").read_text().splitlines(keepends=True)[:16]))
    run_dpo(DPOConfig(model=str(tiny["base"]), train_data=str(data), max_length=64, beta=0.5, loss_type="aot",
                      train=quiet_train(tmp_path / "dpo", max_steps=24, batch_size=16, lr=1e-3)))
    first, last = read_metrics(tmp_path / "dpo")[0], read_metrics(tmp_path / "dpo")[-1]
    assert abs(first["train/loss"] - math.log(2)) < 1e-4  # policy == reference: every d_i is 0
    assert last["train/loss"] < 0.3 and last["train/preference_accuracy"] == 1.0


def test_bco_pairs_reward_shift_is_the_running_mean_of_earlier_steps_rewards_and_resumes(tiny, tmp_path):
    """bco_pair's delta at step t is the mean implicit reward of every answer of steps 1..t-1 (0 at
    step 1), read from the logged rewards of those steps (each step has as many answers); a run
    cut after step 2 and resumed gives the straight run's losses and deltas (the checkpoint holds
    the running mean), and delta reaches the loss (another delta, another loss)."""
    from rlhfkit.train.config import replace
    from rlhfkit.train.logging import read_metrics

    def config(out, steps, **train):
        return replace(method_config("dpo", tiny, out, steps, log_every=1, save_every=2, **train), loss_type="bco_pair")

    run_dpo(config(tmp_path / "full", 5))
    lines = [m for m in read_metrics(tmp_path / "full") if "train/loss" in m]
    step_means = [(m["train/rewards_chosen"] + m["train/rewards_rejected"]) / 2 for m in lines]
    for t, m in enumerate(lines):
        expected = sum(step_means[:t]) / t if t else 0.0
        assert abs(m["train/reward_shift"] - expected) < 1e-6, t
    assert abs(lines[-1]["train/reward_shift"]) > 1e-3  # it moved: the rewards are not 0 past step 1
    run_dpo(config(tmp_path / "cut", 2))
    run_dpo(config(tmp_path / "cut", 5, resume=True))
    cut = [m for m in read_metrics(tmp_path / "cut") if "train/loss" in m]
    assert [m["train/loss"] for m in cut] == [m["train/loss"] for m in lines]
    assert [m["train/reward_shift"] for m in cut] == [m["train/reward_shift"] for m in lines]
    # through the objective: delta as the shift holds it, each answer's reward against it
    from types import SimpleNamespace

    from rlhfkit.methods.dpo import RewardShift
    from rlhfkit.models.rankings import output_logps
    from rlhfkit.train.dist import DistInfo

    model, tok, reference = _moved_policy(tiny)
    examples, _ = encode_rankings(read_rows(tiny["data"] / "prefs_train.jsonl")[:6], tok, 64)
    batch = collate_rankings(examples, tok.pad_token_id)
    with torch.no_grad():
        r = 0.5 * (batch.grid(output_logps(model, batch).sums) - batch.grid(output_logps(reference, batch).sums))
    run = SimpleNamespace(state={"reward_shift": [0.3, 10]}, keep={}, info=DistInfo())
    shift = RewardShift(run)
    objective = dpo_objective(DPOLoss(beta=0.5, loss_type="bco_pair"), Reference(module=reference), shift=shift)
    with torch.no_grad():
        loss, metrics = objective.loss(model, batch, objective.counts(batch))
    by_hand = torch.nn.functional.softplus(-(r[:, 0] - 0.3)) + torch.nn.functional.softplus(r[:, 1] - 0.3)
    assert abs(loss.item() - float(by_hand.mean())) < 1e-5 and abs(float(metrics["reward_shift"]) - 0.3) < 1e-7
    shift.update(1)  # 10 earlier answers at 0.3, then these 12
    assert run.keep["reward_shift"][1] == 22
    assert abs(run.keep["reward_shift"][0] - (3.0 + float(r.sum())) / 22) < 1e-6


def test_in_bf16_the_precomputed_reference_is_computed_as_the_forwarded_one(tiny, tmp_path):
    """With ``train.dtype=bf16`` the precomputed reference ran in fp32 while the policy's log-probs
    were bf16 autocast's: at step 1, where the policy is its reference, the loss was ln 2 + 1.4e-4
    here (a forwarded reference gives ln 2 exactly). Under the same autocast it is ln 2 + 1.5e-5:
    the rest is bf16's sums over the precompute's other batch shapes."""
    from rlhfkit.train.config import replace
    from rlhfkit.train.logging import read_metrics

    first = {}
    for mode in ("precompute", "forward"):
        run_dpo(replace(method_config("dpo", tiny, tmp_path / mode, 1, log_every=1, dtype="bf16"), reference=mode))
        first[mode] = next(m for m in read_metrics(tmp_path / mode) if "train/loss" in m)
    assert first["forward"]["train/loss"] == pytest.approx(math.log(2), abs=2e-6), first["forward"]
    assert first["precompute"]["train/loss"] == pytest.approx(math.log(2), abs=5e-5), first["precompute"]
