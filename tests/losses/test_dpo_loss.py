import math

import pytest
import torch

from rlhfkit.losses.dpo import dpo_loss, plackett_luce_loss


def test_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    loss, sums = dpo_loss(logps, logps - 2.0, logps, logps - 2.0, beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-7
    assert sums["margin"].item() == 0.0
    assert sums["correct"].item() == 1.5  # three ties, each half right
    ties = torch.tensor([[0.0, 0.0, 1.0]])  # ranked best first: a tie (half), two wrong
    _, pl = plackett_luce_loss(ties, torch.zeros(1, 3), torch.ones(1, 3), beta=1.0)
    assert pl["correct"].item() == 0.5 and pl["pairs"].item() == 3


def test_pairwise_loss_by_hand():
    # beta 0.5; chosen log ratio = -1 - (-2) = 1, rejected = -3 - (-2.5) = -0.5; margin = 0.5 * 1.5 = 0.75
    loss, sums = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5)
    assert abs(loss.item() - math.log(1 + math.exp(-0.75))) < 1e-7
    assert abs(sums["rewards_chosen"].item() - 0.5) < 1e-7 and abs(sums["rewards_rejected"].item() + 0.25) < 1e-7
    assert sums["correct"].item() == 1


def test_plackett_luce_n2_equals_pairwise():
    logps = torch.tensor([[-1.0, -3.0], [-4.0, -2.0]])
    ref = torch.tensor([[-2.0, -2.5], [-3.0, -3.5]])
    pl, _ = plackett_luce_loss(logps, ref, torch.ones(2, 2), beta=0.3)
    pw, _ = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    assert torch.allclose(pl, pw, atol=1e-7)


def test_plackett_luce_n3_by_hand_with_padding():
    # r_hat = beta * (logp - ref) = [1.0, 0.0, 0.5] (beta 1); slot 4 is padding.
    logps = torch.tensor([[1.0, 0.0, 0.5, 99.0]])
    ref = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, sums = plackett_luce_loss(logps, ref, mask, beta=1.0)
    e = math.exp
    expected = -((1.0 - math.log(e(1.0) + e(0.0) + e(0.5))) + (0.0 - math.log(e(0.0) + e(0.5))) + 0.0)
    assert abs(loss.item() - expected) < 1e-6
    assert sums["pairs"].item() == 3 and sums["correct"].item() == 2  # (1 > 0), (1 > 0.5) right; (0 > 0.5) wrong


def test_gradient_is_the_closed_form():
    beta = 0.2
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-1.5, -0.5], requires_grad=True)
    rc, rr = torch.tensor([-1.2, -2.2]), torch.tensor([-1.0, -1.0])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta)
    loss.backward()
    r_w, r_l = beta * (pc - rc), beta * (pr - rr)
    weight = torch.sigmoid(r_l - r_w).detach()
    n = 2  # the loss is a mean over pairs
    assert torch.allclose(pc.grad, -beta * weight / n, atol=1e-7)
    assert torch.allclose(pr.grad, beta * weight / n, atol=1e-7)


def test_other_pair_losses_by_hand():
    # log ratios: chosen -1 - (-2) = 1, rejected -3 - (-2.5) = -0.5, so h = 1.5; beta 0.5: beta h = 0.75
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5)
    one = (torch.tensor([1.0]), torch.tensor([1.0]))
    ipo, _ = dpo_loss(*args, loss_type="ipo", lengths=one)
    assert abs(ipo.item() - (1.5 - 1 / (2 * 0.5)) ** 2) < 1e-7  # (h - 1/(2 tau))^2 = 0.25
    ipo, _ = dpo_loss(*args, loss_type="ipo", lengths=(torch.tensor([2.0]), torch.tensor([4.0])))
    assert abs(ipo.item() - (1 / 2 + 0.5 / 4 - 1) ** 2) < 1e-7  # per token: h = 1/2 - (-0.5)/4 = 0.625
    hinge, _ = dpo_loss(*args, loss_type="hinge")
    assert abs(hinge.item() - 0.25) < 1e-7  # max(0, 1 - 0.75)
    smoothed, _ = dpo_loss(*args, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-0.75)) + 0.1 * math.log(1 + math.exp(0.75))
    assert abs(smoothed.item() - expected) < 1e-7
    plain, _ = dpo_loss(*args)
    assert smoothed.item() > plain.item()  # the smoothed loss also pays for the pair being right
    wide = (torch.tensor([-1.0]), torch.tensor([-9.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5)
    assert dpo_loss(*wide, loss_type="hinge")[0].item() == 0.0  # beta h = 3.75 >= 1: no loss past the margin


def test_other_pair_losses_gradients_are_the_closed_forms():
    beta, eps = 0.2, 0.1
    rc, rr = torch.tensor([-1.2, -2.2]), torch.tensor([-1.0, -1.0])
    for loss_type, smoothing in (("ipo", 0.0), ("hinge", 0.0), ("sigmoid", eps)):
        pc = torch.tensor([-1.0, 6.0], requires_grad=True)
        pr = torch.tensor([-1.5, -0.5], requires_grad=True)
        lengths = (torch.tensor([2.0, 1.0]), torch.tensor([3.0, 5.0]))
        loss, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type, label_smoothing=smoothing, lengths=lengths)
        loss.backward()
        h = ((pc - rc) - (pr - rr)).detach()  # [0.7, 7.7]
        if loss_type == "ipo":  # per token: d/d logp_w (h_tok - 1/(2 beta))^2 = 2 (h_tok - 1/(2 beta)) / |y_w|
            h_tok = ((pc - rc) / lengths[0] - (pr - rr) / lengths[1]).detach()
            g = 2 * (h_tok - 1 / (2 * beta))
            assert torch.allclose(pc.grad, g / lengths[0] / 2, atol=1e-6)
            assert torch.allclose(pr.grad, -g / lengths[1] / 2, atol=1e-6)
            continue
        elif loss_type == "hinge":  # -beta where beta h < 1, else 0: the second pair is past the margin
            dh = torch.where(beta * h < 1, torch.full_like(h, -beta), torch.zeros_like(h))
            assert dh[1] == 0 and dh[0] == -beta
        else:  # d/dh of -(1-eps) log sig(beta h) - eps log sig(-beta h)
            dh = beta * (-(1 - eps) * torch.sigmoid(-beta * h) + eps * torch.sigmoid(beta * h))
        assert torch.allclose(pc.grad, dh / 2, atol=1e-6), loss_type  # a mean over the 2 pairs
        assert torch.allclose(pr.grad, -dh / 2, atol=1e-6), loss_type


def _softplus(x: float) -> float:  # -log sigma(-x)
    return math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_trl_pair_forms_by_hand():
    # log ratios w = -1 - (-2) = 1, l = -3 - (-2.5) = -0.5; beta 0.5: beta w = 0.5, beta l = -0.25, beta h = 0.75
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5)
    eps = 0.1
    expected = {
        "robust": (0.9 * _softplus(-0.75) - 0.1 * _softplus(0.75)) / 0.8,
        "exo_pair": _sig(0.75) * (-_softplus(-0.75) - math.log(0.9)) + _sig(-0.75) * (-_softplus(0.75) - math.log(0.1)),
        "nca_pair": _softplus(-0.5) + 0.5 * _softplus(0.5) + 0.5 * _softplus(-0.25),
        "sppo_hard": (1 - 1) ** 2 + (-0.5 + 1) ** 2,  # 1/(2 beta) = 1
        "apo_zero": 1 - _sig(0.5) + _sig(-0.25),
        "apo_down": _sig(0.5) + 1 - _sig(0.75),
        "discopop": (1 - _sig(0.75 / 0.05)) * _softplus(-0.75) + _sig(0.75 / 0.05) * math.exp(-0.75),
        "sigmoid_norm": _softplus(-0.5 * (1 / 2 + 0.5 / 4)),  # per token: h = 1/2 - (-0.5)/4
    }
    lengths = (torch.tensor([2.0]), torch.tensor([4.0]))
    for name, value in expected.items():
        loss, _ = dpo_loss(*args, loss_type=name, label_smoothing=eps, lengths=lengths)
        assert abs(loss.item() - value) < 1e-6, name
    mixed, _ = dpo_loss(*args, loss_type=(("sigmoid", 0.8), ("nca_pair", 0.2)))
    assert abs(mixed.item() - (0.8 * _softplus(-0.75) + 0.2 * expected["nca_pair"])) < 1e-6
    # robust at eps 0 is plain DPO
    assert abs(dpo_loss(*args, loss_type="robust")[0].item() - _softplus(-0.75)) < 1e-7


def test_trl_pair_forms_gradients_are_the_closed_forms():
    beta, eps = 0.5, 0.1
    rc, rr = torch.tensor([-2.0, -1.0]), torch.tensor([-2.5, -1.0])
    for name in ("robust", "sppo_hard", "apo_zero", "apo_down", "nca_pair"):
        pc = torch.tensor([-1.0, -3.0], requires_grad=True)
        pr = torch.tensor([-3.0, -0.5], requires_grad=True)
        dpo_loss(pc, pr, rc, rr, beta, loss_type=name, label_smoothing=eps if name == "robust" else 0.0)[0].backward()
        w, l = (pc - rc).detach(), (pr - rr).detach()  # noqa: E741
        m = beta * (w - l)
        s = torch.sigmoid
        if name == "robust":  # dL/dh = -beta [(1 - eps) sig(-beta h) + eps sig(beta h)] / (1 - 2 eps)
            gw = -beta * ((1 - eps) * s(-m) + eps * s(m)) / (1 - 2 * eps)
            gl = -gw
        elif name == "sppo_hard":
            gw, gl = 2 * (w - 1 / (2 * beta)), 2 * (l + 1 / (2 * beta))
        elif name == "apo_zero":  # chosen up, rejected down
            gw, gl = -beta * s(beta * w) * s(-beta * w), beta * s(beta * l) * s(-beta * l)
        elif name == "apo_down":
            gw = beta * s(beta * w) * s(-beta * w) - beta * s(m) * s(-m)
            gl = beta * s(m) * s(-m)
        else:  # nca_pair
            gw = -beta * s(-beta * w) + 0.5 * beta * s(beta * w)
            gl = 0.5 * beta * s(beta * l)
        assert torch.allclose(pc.grad, gw / 2, atol=1e-6), name  # a mean over the 2 pairs
        assert torch.allclose(pr.grad, gl / 2, atol=1e-6), name


def test_aot_forms_pair_the_sorted_columns_by_hand_with_their_gradients():
    # three pairs, beta 0.5, eps 0.1: AOT pairs the i-th smallest of two columns, not pair with pair
    beta, eps = 0.5, 0.1
    pc = torch.tensor([-1.0, -4.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0, -2.5], requires_grad=True)
    rc, rr = torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([-1.5, -2.0, -4.0])
    # aot: g = pc - pr = (2, -3, 0.5) sorted (-3, 0.5, 2); g_ref = rc - rr = (-0.5, -1, 3) sorted (-1, -0.5, 3)
    d = [-3 - -1, 0.5 - -0.5, 2 - 3]  # (-2, 1, -1)
    loss, sums = dpo_loss(pc, pr, rc, rr, beta, loss_type="aot", label_smoothing=eps)
    assert abs(loss.item() - sum(0.9 * _softplus(-beta * x) + 0.1 * _softplus(beta * x) for x in d) / 3) < 1e-6
    assert sums["correct"].item() == 1  # the metrics stay the pairs' own: w - l = (2.5, -2, -2.5)
    # dL/dd_i = beta [-(1 - eps) sig(-beta d_i) + eps sig(beta d_i)] / 3 goes to the pair whose g was sort_i(g)
    loss.backward()
    dd = [beta * (-0.9 * _sig(-beta * x) + 0.1 * _sig(beta * x)) / 3 for x in d]
    by_pair = torch.tensor([dd[2], dd[0], dd[1]])  # pair 0 holds g's largest, pair 1 its smallest
    assert torch.allclose(pc.grad, by_pair, atol=1e-6) and torch.allclose(pr.grad, -by_pair, atol=1e-6)
    # aot_unpaired: w = (1, -1, -1) sorted (-1, -1, 1); l = (-1.5, 1, 1.5) sorted (-1.5, 1, 1.5)
    d = [-1 - -1.5, -1 - 1, 1 - 1.5]
    loss, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type="aot_unpaired", label_smoothing=eps)
    assert abs(loss.item() - sum(0.9 * _softplus(-beta * x) + 0.1 * _softplus(beta * x) for x in d) / 3) < 1e-6
    # one pair: nothing to sort, and aot is DPO's sigmoid
    one = [t[:1].detach() for t in (pc, pr, rc, rr)]
    assert abs(dpo_loss(*one, beta, loss_type="aot")[0].item() - dpo_loss(*one, beta)[0].item()) < 1e-7
    with pytest.raises(ValueError, match="sorts the batch: its terms belong to no pair"):
        dpo_loss(pc, pr, rc, rr, beta, loss_type="aot", pair_weights=torch.ones(3))


def test_aot_matches_trls_form_on_random_batches():
    # TRL 1.16's DPOTrainer: sort(logps_w - logps_l) - sort(ref_w - ref_l) (aot), sort(w) - sort(l) (aot_unpaired),
    # then -(1 - eps) logsigmoid(beta d) - eps logsigmoid(-beta d), averaged; written out here as TRL writes it
    gen = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(64, generator=gen, dtype=torch.float64) * 5 - 20 for _ in range(4))
    beta, eps = 0.1, 0.05
    for name, d in (("aot", torch.sort(c - r)[0] - torch.sort(rc - rr)[0]),
                    ("aot_unpaired", torch.sort(c - rc)[0] - torch.sort(r - rr)[0])):
        trl = (-torch.nn.functional.logsigmoid(beta * d) * (1 - eps)
               - torch.nn.functional.logsigmoid(-beta * d) * eps).mean()
        mine, _ = dpo_loss(c, r, rc, rr, beta, loss_type=name, label_smoothing=eps)
        assert abs(mine.item() - trl.item()) < 1e-12, name


def test_bco_pair_classifies_each_answer_against_the_reward_shift_by_hand():
    # w = 1, l = -0.5, beta 0.5: beta w = 0.5, beta l = -0.25; delta 0.2
    args = (torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True),
            torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5)
    loss, _ = dpo_loss(*args, loss_type="bco_pair", reward_shift=0.2)
    assert abs(loss.item() - (_softplus(-(0.5 - 0.2)) + _softplus(-0.25 - 0.2))) < 1e-6
    loss.backward()  # dL/dw = -beta sig(-(beta w - delta)), dL/dl = beta sig(beta l - delta): each on its own
    assert abs(args[0].grad.item() + 0.5 * _sig(-0.3)) < 1e-6 and abs(args[1].grad.item() - 0.5 * _sig(-0.45)) < 1e-6
    # at delta 0 it is TRL 1.16's bco_pair: -logsigmoid(beta w) - logsigmoid(-beta l)
    plain, _ = dpo_loss(*args, loss_type="bco_pair")
    assert abs(plain.item() - (_softplus(-0.5) + _softplus(-0.25))) < 1e-6


def test_discopop_stays_finite_far_below_its_margin():
    # beta h = -100: TRL's sigma(m / tau) exp(-m) is 0 x inf = NaN in fp32; the loss is -log sigma(m) = 100
    pc = torch.tensor([-100.0], requires_grad=True)
    loss, _ = dpo_loss(pc, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0, loss_type="discopop")
    loss.backward()
    assert abs(loss.item() - 100.0) < 1e-4 and abs(pc.grad.item() + 1.0) < 1e-4


def test_f_divergence_scores_by_hand_and_in_the_loss():
    """f-DPO: w = f'(pi / pi_ref) at u = log 2 (pi / pi_ref = 2) and u = -log 2, by hand; the
    sigmoid loss on them, and its gradient: d/du_w of -log sig(beta (f(u_w) - f(u_l))) is
    -beta sig(-beta h_f) f''(e^u) e^u."""
    from rlhfkit.losses.dpo import f_divergence_scores

    u = torch.tensor([math.log(2), -math.log(2)])
    expected = {"reverse_kl": [math.log(2), -math.log(2)], "forward_kl": [1 - 1 / 2, 1 - 2],
                "js_divergence": [math.log(4 / 3), math.log(2 / 3)],  # log(2t / (1 + t)) at t = 2, 1/2
                "alpha_divergence": [(2 ** -0.5 - 1) / -0.5, (2 ** 0.5 - 1) / -0.5]}
    for kind, values in expected.items():
        assert torch.allclose(f_divergence_scores(u, kind, 0.5), torch.tensor(values), atol=1e-6), kind
    assert torch.equal(f_divergence_scores(u, "alpha_divergence", 1.0), u)  # a -> 1: reverse KL
    # f'(t) t: d f'(e^u) / du for forward_kl is e^-u; beta 0.5, u_w = log 2, u_l = -log 2
    pc = torch.tensor([math.log(2)], requires_grad=True)
    loss, sums = dpo_loss(pc, torch.tensor([-math.log(2)]), torch.tensor([0.0]), torch.tensor([0.0]), 0.5,
                          f_divergence="forward_kl")
    h = 0.5 * (0.5 - (-1.0))
    assert abs(loss.item() - _softplus(-h)) < 1e-6
    loss.backward()
    assert abs(pc.grad.item() - (-0.5 * _sig(-h) * 0.5)) < 1e-6
    assert abs(sums["rewards_chosen"].item() - 0.5 * math.log(2)) < 1e-6  # the logged reward: beta log(pi / pi_ref)
    try:
        dpo_loss(pc, pc, pc, pc, 0.5, loss_type="nca_pair", f_divergence="js_divergence")
        raise AssertionError("nca_pair has no f-divergence form")
    except ValueError as e:
        assert "forms on the margin" in str(e)


def test_ld_weights_count_the_shorter_answers_length_whole_and_the_rest_by_alpha():
    from rlhfkit.losses.dpo import ld_weights

    place = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    shared = torch.tensor([[3], [5]])
    assert ld_weights(place, shared, 0.25).tolist() == [[1, 1, 1, 0.25, 0.25], [1, 1, 1, 1, 1]]


def odds_of(a: float) -> float:  # log(P / (1 - P)), P = e^a
    return a - math.log(-math.expm1(a))


def test_reference_free_forms_by_hand():
    """SimPO and ORPO's odds-ratio term on log-probs (reference zeros): chosen -2 over 2 tokens
    (mean -1), rejected -6 over 4 (mean -1.5), beta 2; SimPO gamma 0.5, eps 0.1."""
    args = (torch.tensor([-2.0]), torch.tensor([-6.0]), torch.zeros(1), torch.zeros(1), 2.0)
    lengths = (torch.tensor([2.0]), torch.tensor([4.0]))
    m = 2.0 * (-1.0 + 1.5) - 0.5
    loss, _ = dpo_loss(*args, loss_type="simpo", label_smoothing=0.1, lengths=lengths, simpo_gamma=0.5)
    assert abs(loss.item() - (0.9 * _softplus(-m) + 0.1 * _softplus(m))) < 1e-6
    # gamma 0 and eps 0: length-normalised DPO (sigmoid_norm)
    plain, _ = dpo_loss(*args, loss_type="simpo", lengths=lengths, simpo_gamma=0.0)
    assert abs(plain.item() - dpo_loss(*args, loss_type="sigmoid_norm", lengths=lengths)[0].item()) < 1e-7

    d = math.log(math.exp(-1.0) / (1 - math.exp(-1.0))) - math.log(math.exp(-1.5) / (1 - math.exp(-1.5)))
    loss, _ = dpo_loss(*args, loss_type="orpo", lengths=lengths)
    assert abs(loss.item() - 2.0 * _softplus(-d)) < 1e-6


def test_alphapo_by_hand_its_limit_and_gradient():
    """AlphaPO on the same pair: simpo on r(a) = (1 - e^(-alpha a)) / alpha of the mean log-probs
    (-1 and -1.5), alpha 0.25, beta 2, gamma 0.5; the logged rewards are beta r. The sigmoid form
    shapes the sums. alpha -> 0 is SimPO. The gradient of the chosen sum is the closed form
    -beta sigma(-m) e^(-alpha a_w) / |y_w|."""
    lengths = (torch.tensor([2.0]), torch.tensor([4.0]))
    alpha, beta = 0.25, 2.0
    r = lambda a: (1 - math.exp(-alpha * a)) / alpha  # noqa: E731
    m = beta * (r(-1.0) - r(-1.5)) - 0.5
    chosen = torch.tensor([-2.0], requires_grad=True)
    loss, sums = dpo_loss(chosen, torch.tensor([-6.0]), torch.zeros(1), torch.zeros(1), beta, loss_type="simpo",
                          lengths=lengths, simpo_gamma=0.5, per_token_rewards=True, alphapo_alpha=alpha)
    assert loss.item() == pytest.approx(_softplus(-m), abs=1e-6)
    assert sums["rewards_chosen"].item() == pytest.approx(beta * r(-1.0), abs=1e-6)
    assert sums["rewards_rejected"].item() == pytest.approx(beta * r(-1.5), abs=1e-6)
    loss.backward()
    sig = 1 / (1 + math.exp(m))  # sigma(-m)
    assert chosen.grad.item() == pytest.approx(-beta * sig * math.exp(alpha * 1.0) / 2.0, abs=1e-6)
    args = (torch.tensor([-2.0]), torch.tensor([-6.0]), torch.zeros(1), torch.zeros(1), beta)
    summed, _ = dpo_loss(*args, loss_type="sigmoid", alphapo_alpha=alpha)
    assert summed.item() == pytest.approx(_softplus(-beta * (r(-2.0) - r(-6.0))), abs=1e-6)
    near, _ = dpo_loss(*args, loss_type="simpo", lengths=lengths, alphapo_alpha=1e-6)
    simpo, _ = dpo_loss(*args, loss_type="simpo", lengths=lengths)
    assert near.item() == pytest.approx(simpo.item(), abs=1e-5)


def test_per_token_rewards_need_the_lengths():
    with pytest.raises(ValueError, match="per_token_rewards needs the answers' lengths"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.1, per_token_rewards=True)


def test_orpo_gradient_is_the_closed_form_and_finite_at_certainty():
    """d/d log pi(y_w) of -beta log sigma(LO_w - LO_l) is -beta sigma(-(LO_w - LO_l)) / (1 - P_w) / |y_w|
    (d log odds / da = 1 / (1 - e^a)); an answer of probability 1 (a = 0 in fp32) gives finite values."""
    from rlhfkit.losses.dpo import ODDS_CAP, log_odds

    beta = 0.1
    pc = torch.tensor([-0.3, -2.0], requires_grad=True)
    pr = torch.tensor([-1.2, -0.8], requires_grad=True)
    lengths = (torch.tensor([3.0, 2.0]), torch.tensor([1.0, 4.0]))
    dpo_loss(pc, pr, torch.zeros(2), torch.zeros(2), beta, loss_type="orpo", lengths=lengths)[0].backward()
    aw, al = pc.detach() / lengths[0], pr.detach() / lengths[1]
    d = log_odds(aw) - log_odds(al)
    gw = -beta * torch.sigmoid(-d) / (1 - aw.exp()) / lengths[0]
    gl = beta * torch.sigmoid(-d) / (1 - al.exp()) / lengths[1]
    assert torch.allclose(pc.grad, gw / 2, atol=1e-6) and torch.allclose(pr.grad, gl / 2, atol=1e-6)
    # near 0 the expm1 branch keeps its digits (log1p(-e^a) would lose them at a = -1e-4)
    assert abs(log_odds(torch.tensor([-1e-4])).item() - odds_of(-1e-4)) < 1e-4
    certain = torch.tensor([0.0], requires_grad=True)
    loss, _ = dpo_loss(torch.tensor([-1.0]), certain, torch.zeros(1), torch.zeros(1), beta, loss_type="orpo",
                       lengths=(torch.tensor([1.0]), torch.tensor([1.0])))
    loss.backward()
    gap = odds_of(-1.0) - odds_of(ODDS_CAP)
    assert abs(loss.item() - -beta * math.log(_sig(gap))) < 1e-5
    # the cap's gradient, not 0: the certain rejected answer is pushed down (beta sigma(-gap) / (1 - e^cap))
    assert certain.grad.item() == pytest.approx(beta * _sig(-gap) / -math.expm1(ODDS_CAP), rel=1e-3)
