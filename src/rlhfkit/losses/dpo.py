"""Direct Preference Optimization (Rafailov et al. 2023), pairwise and Plackett-Luce.

Pairwise (eq. 7 of the paper), with r_hat(x, y) = beta * log(pi_theta(y|x) / pi_ref(y|x)):

    L_DPO = - log sigma( r_hat(x, y_w) - r_hat(x, y_l) )

Rankings of n answers tau (best first), the Plackett-Luce model (paper, appendix A.3):

    L_PL = - sum_{i=1..n} [ r_hat(x, y_tau(i)) - log sum_{j=i..n} exp r_hat(x, y_tau(j)) ]

For n = 2 the two are equal. Log-probabilities are sums over completion tokens only. The
gradient w.r.t. log pi(y_w) is -beta * sigma(r_hat_l - r_hat_w), the opposite on log pi(y_l).

DPO can raise the margin while the chosen answers' own likelihood falls (likelihood
displacement). RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 2;
TRL's ``rpo_alpha``, later its ``sft`` loss term) adds the chosen answers' negative log-likelihood:

    L_RPO = L_DPO + alpha * NLL(y_w | x)

with the NLL here a mean over all chosen tokens of the global batch (as SFT's loss; the paper
divides each answer by its own length).

Other pairwise losses (TRL's ``loss_type`` names), on the log-ratios to the reference
w = log(pi(y_w)/pi_ref(y_w)), l = log(pi(y_l)/pi_ref(y_l)), the margin h = w - l, sigma the
logistic function and eps the ``label_smoothing``:

    conservative DPO, sigmoid with eps > 0 (Mitchell 2023, "A note on DPO with noisy preferences"):
        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    robust, rDPO (Chowdhury et al. 2024, "Provably Robust DPO", its robust loss): unbiased when a
    share eps of the labels is flipped:
        L = [ -(1 - eps) log sigma(beta h) + eps log sigma(-beta h) ] / (1 - 2 eps)
    exo_pair, EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of LM Alignment", its
    pairwise form, eq. 16): KL(q || p) between q = softmax(beta w, beta l) and the label
    distribution p = (1 - eps, eps); eps > 0 (the paper's is 1e-3):
        L = sigma(beta h) [log sigma(beta h) - log(1 - eps)] + sigma(-beta h) [log sigma(-beta h) - log eps]
    ipo, IPO (Azar et al. 2023, eq. 17, tau = beta), with each answer's log-ratio per token:
        L = (h_tok - 1 / (2 beta))^2,  h_tok = w / |y_w| - l / |y_l|
    sigmoid_norm, length-normalised DPO (Lambert et al. 2024, the Tulu 3 report):
        L = -log sigma(beta h_tok)
    hinge, SLiC-HF (Zhao et al. 2023, its calibration loss on the log-ratio to the reference):
        L = max(0, 1 - beta h)
    nca_pair, NCA (Chen et al. 2024, "Noise Contrastive Alignment", its pairwise loss):
        L = -log sigma(beta w) - 1/2 log sigma(-beta w) - 1/2 log sigma(-beta l)
    sppo_hard, SPPO (Wu et al. 2024, eq. 4.7) with the hard win probabilities 1 and 0, eta = 1/beta:
        L = (w - 1 / (2 beta))^2 + (l + 1 / (2 beta))^2
    bco_pair, BCO (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment") on pairs: each answer classified on its own, the chosen above and the rejected
    below the reward shift delta, the running mean of the implicit rewards beta w, beta l of every
    answer trained on before this step (methods/common.py ``RewardShift``; TRL's BCOTrainer's
    RunningMoments, which also counts the batch at hand; TRL's DPO form drops delta):
        L = -log sigma(beta w - delta) - log sigma(-(beta l - delta))
    apo_zero, APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7),
    the chosen answer up, the rejected one down (plus the constant 1, as TRL):
        L = 1 - sigma(beta w) + sigma(beta l)
    apo_down, APO-down (eq. 8), both down, the rejected one more (plus 1, as TRL):
        L = sigma(beta w) + 1 - sigma(beta h)
    discopop, DiscoPOP's log-ratio modulated loss (Lu et al. 2024, eq. 5), tau its temperature
    (``discopop_tau``, the paper's 0.05):
        L = (1 - sigma(beta h / tau)) (-log sigma(beta h)) + sigma(beta h / tau) exp(-beta h)

Two forms of AOT (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
Transport"), which compare distributions over the batch rather than pair with pair: the
(relaxed) first-order stochastic dominance of one distribution over another is, in one dimension,
optimal transport solved by sorting, so each form sorts two (B,) columns apart and pairs their
i-th smallest values (sort_i), with the logistic loss and label smoothing as the sigmoid form:

    aot, paired: the policy's log-ratio of chosen to rejected, g = log pi(y_w) - log pi(y_l), is to
    dominate the reference's, g_ref = log pi_ref(y_w) - log pi_ref(y_l):
        L_i = -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i),  d_i = sort_i(g) - sort_i(g_ref)
    aot_unpaired: the chosen answers' log-ratios are to dominate the rejected ones':
        the same L_i with d_i = sort_i(w) - sort_i(l)

The batch is what one loss call sees (one forward's pairs on one rank, as TRL sorts each device's
batch), so ``micro_batch_size`` and the rank count change these two losses. L_i belongs to no pair.

Two forms are for preference optimization without a reference (``reference=none`` in
methods/dpo.py, where w and l are the answers' log-probs log pi(y|x) themselves; TRL's
CPOTrainer and ORPOTrainer):

    simpo, SimPO (Meng et al. 2024, eq. 6), the per-token margin minus a target margin gamma
    (``gamma``), with label smoothing as TRL's CPOTrainer:
        L = -(1 - eps) log sigma(beta h_tok - gamma) - eps log sigma(-(beta h_tok - gamma))
    orpo, ORPO's odds-ratio term (Hong et al. 2024, eqs. 4 and 7; lambda = beta), on the answers'
    per-token mean log-probs a = log pi(y|x) / |y|, the odds of P = e^a being P / (1 - P):
        L = -beta log sigma( log odds(y_w) - log odds(y_l) ),   log odds(y) = a - log(1 - e^a)
    with a's value capped at ODDS_CAP (P = 1 has infinite odds: NaN gradients, as TRL's form has
    there) and its gradient that of the cap above it, so a near-certain rejected answer is still pushed down.
    ORPO's whole loss adds the chosen answers' NLL (RPO's term above, weight 1).

AlphaPO (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment"; TRL's CPOTrainer
``alpha``), without a reference: each answer's log-prob a (its mean over its tokens for the
per-token forms, as SimPO's length-normalised reward, else its sum) is read through the reward
shape r_alpha(a) = (1 - e^(-alpha a)) / alpha before the form, which tends to a as alpha -> 0.
AlphaPO itself is simpo so shaped (no NLL):
        L = -log sigma( beta r_alpha(w / |y_w|) - beta r_alpha(l / |y_l|) - gamma ),
    r_alpha(w / |y_w|) = (1 - pi(y_w|x)^(-alpha / |y_w|)) / alpha
(-alpha a capped at 80, as alpha_divergence's exponent below).

f-DPO (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
Diverse Divergence Constraints"; TRL's ``f_divergence_type``): under an f-divergence
constraint the implicit reward is beta f'(pi / pi_ref) in place of beta log(pi / pi_ref), so the
forms built on the margin (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop) read
w = f'(e^u_w), l = f'(e^u_l) of the log-ratios u:

    reverse_kl   f'(t) = log t                          (DPO: w = u_w)
    forward_kl   f'(t) = 1 - 1/t                        w = 1 - exp(-u_w)
    js_divergence f'(t) = log(2t / (1 + t))             w = log 2 + log sigma(u_w)
    alpha_divergence f'(t) = (t^(a-1) - 1) / (a - 1)    w = (exp((a - 1) u_w) - 1) / (a - 1), a != 1
                                                        (a -> 1: reverse_kl; (a - 1) u capped at 80, as TRL)

WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization"; TRL's
``use_weighting``, its form) weighs each pair's loss by how likely the policy now finds both
answers, per token and relative to how peaked its next-token distributions are, without gradient:

    L = w(x, y_w) w(x, y_l) L_pair,   w(x, y) = exp( 1/|y| sum_t [ log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2 ] )

Eq. 17 writes IPO's h over whole answers; the per-token form is what the paper's experiments
used, as TRL (whose IPO is this one) confirmed with its authors, and it keeps 1/(2 beta)
comparable across answer lengths. Several forms may be weighed together (TRL's ``loss_type``
list with ``loss_weights``): L = sum_k weight_k L_k. All apply to pairs only: a ranking of more
than two answers has the Plackett-Luce loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reduce import pairs_right


@dataclass(frozen=True)
class Pairs:
    """A batch of pairs as the loss forms read them: (B,) log-ratios to the reference and settings."""

    w: torch.Tensor  # log pi(y_w) / pi_ref(y_w)
    l: torch.Tensor  # log pi(y_l) / pi_ref(y_l)  # noqa: E741
    beta: float
    eps: float = 0.0  # label_smoothing
    tau: float = 0.05  # discopop's temperature
    lengths: tuple | None = None  # the (B,) token counts of y_w and y_l, for the per-token forms
    gamma: float = 0.5  # simpo's target margin
    alpha: float = 0.0  # AlphaPO's reward shape (``shaped``); 0: none
    gaps: tuple | None = None  # (B,) log pi(y_w) - log pi(y_l) and the reference's, for aot
    shift: float = 0.0  # bco_pair's delta


    def shaped(self, a: torch.Tensor) -> torch.Tensor:
        """r_alpha(a) = (1 - e^(-alpha a)) / alpha, AlphaPO's reward shape; a itself at alpha 0."""
        if self.alpha == 0:
            return a
        return -torch.expm1((-self.alpha * a).clamp(max=80.0)) / self.alpha

    @property
    def margin(self) -> torch.Tensor:  # beta h
        return self.beta * (self.shaped(self.w) - self.shaped(self.l))

    @property
    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:  # w / |y_w|, l / |y_l|
        if self.lengths is None:
            raise ValueError(f"a per-token loss form ({', '.join(PER_TOKEN)}) needs the answers' lengths")
        return self.shaped(self.w / self.lengths[0].clamp(min=1)), self.shaped(self.l / self.lengths[1].clamp(min=1))

    @property
    def margin_per_token(self) -> torch.Tensor:  # h_tok
        w, l = self.per_token  # noqa: E741
        return w - l


def _exo(p: Pairs) -> torch.Tensor:
    m = p.margin
    return (torch.sigmoid(m) * (F.logsigmoid(m) - math.log1p(-p.eps))
            + torch.sigmoid(-m) * (F.logsigmoid(-m) - math.log(p.eps)))


def _discopop(p: Pairs) -> torch.Tensor:
    # sigma(m / tau) exp(-m) as one exponent: TRL's product is 0 x inf = NaN below m = -88 in fp32
    m = p.margin
    return torch.sigmoid(-m / p.tau) * -F.logsigmoid(m) + torch.exp(F.logsigmoid(m / p.tau) - m)


def _smoothed_sigmoid(m: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)


def _aot(p: Pairs) -> torch.Tensor:
    policy, reference = (torch.sort(gap).values for gap in p.gaps)
    return _smoothed_sigmoid(p.beta * (policy - reference), p.eps)


def _aot_unpaired(p: Pairs) -> torch.Tensor:
    return _smoothed_sigmoid(p.beta * (torch.sort(p.w).values - torch.sort(p.l).values), p.eps)


def _simpo(p: Pairs) -> torch.Tensor:
    return _smoothed_sigmoid(p.beta * p.margin_per_token - p.gamma, p.eps)


ODDS_CAP = -1e-6  # ORPO: a mean log-prob above it is read as it (P <= 1 - 1e-6: log odds <= 13.8)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) of P = exp(a), a the (B,) mean log-probs, capped at ODDS_CAP (its value; the
    gradient above the cap is the cap's, not 0); log(1 - e^a) as log(-expm1(a)) near 0 and
    log1p(-e^a) below -log 2 (each where it keeps its digits)."""
    a = mean_logps - (mean_logps - mean_logps.clamp(max=ODDS_CAP)).detach()
    return a - torch.where(a < -math.log(2), torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def _orpo(p: Pairs) -> torch.Tensor:
    w, l = p.per_token  # noqa: E741
    return -p.beta * F.logsigmoid(log_odds(w) - log_odds(l))


# loss_type -> per-pair loss (B,); the equations are in the module docstring
PAIR_LOSSES = {
    "sigmoid": lambda p: _smoothed_sigmoid(p.margin, p.eps),
    "robust": lambda p: (-(1 - p.eps) * F.logsigmoid(p.margin) + p.eps * F.logsigmoid(-p.margin)) / (1 - 2 * p.eps),
    "exo_pair": _exo,
    "ipo": lambda p: (p.margin_per_token - 1 / (2 * p.beta)) ** 2,
    "sigmoid_norm": lambda p: -F.logsigmoid(p.beta * p.margin_per_token),
    "hinge": lambda p: torch.relu(1 - p.margin),
    "nca_pair": lambda p: (-F.logsigmoid(p.beta * p.w) - 0.5 * F.logsigmoid(-p.beta * p.w)
                           - 0.5 * F.logsigmoid(-p.beta * p.l)),
    "sppo_hard": lambda p: (p.w - 1 / (2 * p.beta)) ** 2 + (p.l + 1 / (2 * p.beta)) ** 2,
    "bco_pair": lambda p: -F.logsigmoid(p.beta * p.w - p.shift) - F.logsigmoid(p.shift - p.beta * p.l),
    "apo_zero": lambda p: 1 - torch.sigmoid(p.beta * p.w) + torch.sigmoid(p.beta * p.l),
    "apo_down": lambda p: torch.sigmoid(p.beta * p.w) + 1 - torch.sigmoid(p.margin),
    "discopop": _discopop,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "simpo": _simpo,
    "orpo": _orpo,
}
SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo", "aot", "aot_unpaired")  # the forms that read label_smoothing
PER_TOKEN = ("ipo", "sigmoid_norm", "simpo", "orpo")  # the forms that read the answers' lengths
REFERENCE_FREE = ("orpo",)  # forms of log-probs alone (reference=none): the odds of a log-ratio mean nothing
MEAN_LOGPROB = ("simpo", "orpo")  # forms of each answer's mean log-prob over all its tokens
SORTED = ("aot", "aot_unpaired")  # forms over the batch's sorted columns: a loss term belongs to no pair
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_FORMS = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")  # on the margin
# the forms that read w and l only through their margin, and simpo and orpo: those that pull w or l toward a fixed
# value (nca_pair, sppo_hard, apo_zero, apo_down) need log-ratios, as log pi of a whole answer is far below 0
ON_THE_MARGIN = F_DIVERGENCE_FORMS + MEAN_LOGPROB


def f_divergence_scores(logratios: torch.Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f'(pi / pi_ref) of f-DPO for log-ratios u = log(pi / pi_ref) (the module docstring's table)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        return torch.expm1(((alpha - 1) * logratios).clamp(max=80.0)) / (alpha - 1)
    raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}; got {kind!r}")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, num_pairs: float | None = None,
             loss_type: str | tuple = "sigmoid", label_smoothing: float = 0.0, lengths: tuple | None = None,
             discopop_tau: float = 0.05, f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
             pair_weights: torch.Tensor | None = None, simpo_gamma: float = 0.5, per_token_rewards: bool = False,
             alphapo_alpha: float = 0.0, reward_shift: float = 0.0):
    """All inputs (B,) sequence log-probs. Returns (loss, metrics of detached sums over the B pairs).
    ``loss_type``: one name of PAIR_LOSSES, or ((name, weight), ...) for a weighted sum of forms.
    ``label_smoothing``: eps of the SMOOTHED forms. ``lengths``: the (B,) token counts of the chosen
    and rejected answers, for the PER_TOKEN forms. ``f_divergence``, ``f_alpha``: f-DPO's f'
    applied to the log-ratios (the F_DIVERGENCE_FORMS only). ``pair_weights`` (B,): each pair's
    loss weight, WPO's w(x, y_w) w(x, y_l) (``wpo_weights``). ``simpo_gamma``: simpo's target
    margin. Without a reference (CPO, SimPO, ORPO) its log-probs are zeros. The metrics' rewards
    are beta log(pi / pi_ref) whatever the f, and with ``per_token_rewards`` beta times each answer's
    log-ratio per token (as TRL's CPOTrainer and ORPOTrainer log their per-token forms).
    ``alphapo_alpha``: AlphaPO's reward shape of the answers' log-probs (no reference: its
    log-probs are zeros), the rewards logged shaped too, as TRL's. ``reward_shift``: bco_pair's delta."""
    weighted = ((loss_type, 1.0),) if isinstance(loss_type, str) else loss_type
    gaps = ((chosen_logps - rejected_logps, ref_chosen_logps - ref_rejected_logps)  # aot's two columns
            if "aot" in dict(weighted) else None)
    pairs = Pairs(f_divergence_scores(chosen_logps - ref_chosen_logps, f_divergence, f_alpha),
                  f_divergence_scores(rejected_logps - ref_rejected_logps, f_divergence, f_alpha), beta,
                  label_smoothing, discopop_tau, lengths, simpo_gamma, alphapo_alpha,
                  gaps, reward_shift)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # (B,)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)  # (B,)
    if per_token_rewards:
        if lengths is None:
            raise ValueError("per_token_rewards needs the answers' lengths")
        chosen_rewards, rejected_rewards = (chosen_rewards / lengths[0].clamp(min=1),
                                            rejected_rewards / lengths[1].clamp(min=1))
    if alphapo_alpha:  # beta times the shaped log-probs (per token where the rewards are), as TRL's
        n_w, n_l = (lengths[0].clamp(min=1), lengths[1].clamp(min=1)) if per_token_rewards else (1.0, 1.0)
        chosen_rewards = beta * pairs.shaped((chosen_logps - ref_chosen_logps) / n_w)
        rejected_rewards = beta * pairs.shaped((rejected_logps - ref_rejected_logps) / n_l)
    losses = 0.0
    for name, weight in weighted:
        if name not in PAIR_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(PAIR_LOSSES)}; got {name!r}")
        if f_divergence != "reverse_kl" and name not in F_DIVERGENCE_FORMS:
            raise ValueError(f"f_divergence_type={f_divergence} is for the forms on the margin "
                             f"({', '.join(F_DIVERGENCE_FORMS)}); got {name!r}")
        losses = losses + weight * PAIR_LOSSES[name](pairs)
    if pair_weights is not None:
        if sorted_forms := [name for name, _ in weighted if name in SORTED]:
            raise ValueError(f"loss_type={','.join(sorted_forms)} sorts the batch: its terms belong to no pair to weigh")
        losses = losses * pair_weights
    denom = chosen_logps.shape[0] if num_pairs is None else max(float(num_pairs), 1.0)
    sums = _sums(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    if "orpo" in dict(weighted):  # TRL's ORPO metrics: the log odds ratio and its log sigma
        w, l = pairs.per_token  # noqa: E741
        gap = (log_odds(w) - log_odds(l)).detach()
        sums.update(log_odds_chosen=gap.sum(), log_odds_ratio=F.logsigmoid(gap).sum())
    return losses.sum() / denom, sums


def chosen_nll(chosen_logps: torch.Tensor, num_tokens: float):
    """RPO's term: -(sum of the chosen answers' (B,) log-probs) / the chosen tokens of the global batch."""
    return -chosen_logps.sum() / max(float(num_tokens), 1.0)


def plackett_luce_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float,
                       num_rankings: float | None = None):
    """logps, ref_logps, mask: (P, K), each row's answers best first, padding slots at the end."""
    valid = mask.bool()
    rewards = beta * (logps - ref_logps)  # (P, K)
    masked = rewards.masked_fill(~valid, float("-inf"))
    tail_lse = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)  # (P, K): log sum_{j >= i} exp r_j
    terms = torch.where(valid, rewards - tail_lse, torch.zeros_like(rewards))
    denom = logps.shape[0] if num_rankings is None else max(float(num_rankings), 1.0)
    loss = -terms.sum() / denom
    others = valid.clone()
    others[:, 0] = False
    n_others = others.sum(-1).clamp(min=1)
    rejected = (rewards * others).sum(-1) / n_others  # (P,) mean implicit reward of the non-best answers
    rejected_logps = (logps * others).sum(-1) / n_others
    sums = _sums(rewards[:, 0], rejected, logps[:, 0], rejected_logps)
    # Preference accuracy over all ordered pairs of each ranking.
    better = torch.triu(torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=valid.device), 1)
    pair_ok = better & valid[:, :, None] & valid[:, None, :]  # (P, K, K)
    sums["correct"] = pairs_right(rewards[:, :, None] - rewards[:, None, :], pair_ok)
    sums["pairs"] = pair_ok.sum().float().detach()
    return loss, sums


def _sums(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    return {
        "rewards_chosen": chosen_rewards.sum().detach(),
        "rewards_rejected": rejected_rewards.sum().detach(),
        "margin": (chosen_rewards - rejected_rewards).sum().detach(),
        "correct": pairs_right(chosen_rewards - rejected_rewards, torch.ones_like(chosen_rewards, dtype=torch.bool)),
        "pairs": torch.tensor(float(chosen_rewards.shape[0])),
        "logps_chosen": chosen_logps.sum().detach(),
        "logps_rejected": rejected_logps.sum().detach(),
    }


def ld_weights(place: torch.Tensor, shared: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Directed Preference Optimization";
    TRL's ``ld_alpha``): an answer's log-likelihood counts its first l_p
    tokens whole and the rest times alpha, l_p = min(|y_w|, |y_l|) the shorter answer's length,

        log p_hat(y|x) = sum_{i <= l_p} log pi(y_i | x, y_<i) + alpha sum_{i > l_p} log pi(y_i | x, y_<i)

    for the policy and the reference alike. ``place``: each token's index in its answer from 0."""
    return torch.where(place < shared, 1.0, ld_alpha)


def wpo_weights(aligned: torch.Tensor) -> torch.Tensor:
    """WPO's w(x, y) (module docstring) from each answer's ``aligned`` mean over its tokens of
    log pi(y_t | .) - log sum_v pi(v | .)^2, kept out of the gradient."""
    return torch.exp(aligned.detach())
