"""Distillation losses: pure functions of tensors, each returning `(loss, metrics)`.

Shapes: B sequences, T response positions, V vocabulary, K teacher top-k. Position t of `logits_B_T_V` predicts
`ids_B_T[:, t]`. Notation (docs/design.md, "Losses"): s_t = log p_S(y_t) with gradient, t_t = log p_T(y_t) from the
teacher (constant), d_t = t_t - s_t (detached), m_t the response mask. Every loss is a mean over the mask's True
tokens, sum_t m_t l_t / max(1, sum_t m_t). Student log-probs are computed in float32 whatever the logits' dtype.
Values at positions off the mask (padding) never reach the loss or its gradient, even when they are inf or nan.
The metric `k1` (its name in metrics.jsonl) is mean_t(s_t - t_t) = -mean_t(d_t): the K1 estimate of the reverse KL
KL(p_S || p_T) on the student's samples. The teacher's and student's "top k and rest" are distributions over K+1
outcomes (the top-k ids, then one bucket for all other ids): the `_K1` shape suffix.

A loss needs only per-position reductions of the student's logits over V, so its first argument `student` is either
`logits_B_T_V` or those reductions (`StudentScores`, computed chunk by chunk by trainer/student.py: no B*T*V tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Metrics = dict[str, float]
TRUST_RULES = ("threshold", "stochastic", "adaptive")
OUTLIERS = ("mask", "clip", "topk_fkl")
PREFIX_LOSSES = ("topk_fkl", "sampled_fkl")
LOG_FLOOR = math.log(1e-10)  # the teacher's log-prob floor in the reverse-KL limit of `gkd`


def token_logprobs(logits_B_T_V: torch.Tensor, ids_B_T: torch.Tensor) -> torch.Tensor:
    """s_t = log_softmax(logits_t)[y_t] in float32, as gather minus logsumexp (no B*T*V log-prob tensor)."""
    logits = logits_B_T_V.float()
    return logits.gather(-1, ids_B_T.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


@dataclass
class StudentScores:
    """The reductions over V of the student's logits that the losses use (float32; None where not computed):
    lp_B_T = s_t (with gradient); topk_lp_B_T_K1 = the student's log-probs over the teacher's top-k ids plus the tail
    bucket (`_student_top_k_and_rest`, with gradient); entropy_B_T = H_S,t = -sum_v p_S(v) log p_S(v) (detached);
    argmax_B_T = argmax_v logits_t (long); vocab_size = V."""

    lp_B_T: torch.Tensor | None
    topk_lp_B_T_K1: torch.Tensor | None
    entropy_B_T: torch.Tensor | None
    argmax_B_T: torch.Tensor | None
    vocab_size: int

    def need(self, field: str, loss: str) -> torch.Tensor:
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"{loss} needs StudentScores.{field}, which was not computed")
        return value


def student_scores(
    logits_B_T_V: torch.Tensor, ids_B_T: torch.Tensor | None, top_ids_B_T_K: torch.Tensor | None = None, *,
    entropy: bool = False, argmax: bool = False,
) -> StudentScores:  # fmt: skip
    """The reductions of `logits_B_T_V` (any leading shape) that the losses need; lp_B_T is None when ids_B_T is."""
    lp_B_T = token_logprobs(logits_B_T_V, ids_B_T) if ids_B_T is not None else None
    topk_lp_B_T_K1 = _student_top_k_and_rest(logits_B_T_V, top_ids_B_T_K) if top_ids_B_T_K is not None else None
    with torch.no_grad():
        entropy_B_T = torch.special.entr(torch.softmax(logits_B_T_V.float(), -1)).sum(-1) if entropy else None
        argmax_B_T = logits_B_T_V.argmax(-1) if argmax else None
    return StudentScores(lp_B_T, topk_lp_B_T_K1, entropy_B_T, argmax_B_T, logits_B_T_V.shape[-1])


def _scores(student: torch.Tensor | StudentScores, ids_B_T=None, top_ids_B_T_K=None, **kw) -> StudentScores:
    return student if isinstance(student, StudentScores) else student_scores(student, ids_B_T, top_ids_B_T_K, **kw)


def _mean(x_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    return torch.where(mask_B_T, x_B_T, 0.0).sum() / mask_B_T.sum().clamp(min=1)


def _pg_B_T(
    s_B_T: torch.Tensor,
    adv_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    old_lp_B_T: torch.Tensor | None,
    eps: float,
    is_weight_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token policy-gradient loss -A s; for stale rollouts the clipped surrogate -min(r A, clip(r, 1-eps, 1+eps) A)
    with r = exp(s - s_old), whose gradient equals that of -A s when s_old = s. A must be 0 off the mask.
    `is_weight_B_T` (truncated importance sampling of rows another engine sampled, detached): each token's loss
    times w_t = min(p_trainer(y_t) / p_sampler(y_t), C)."""
    if old_lp_B_T is None:
        loss_B_T = -adv_B_T * s_B_T
    else:
        old_lp_B_T = torch.where(mask_B_T, old_lp_B_T.float(), s_B_T.detach())  # padding: r = 1, not inf
        ratio_B_T = torch.exp(s_B_T - old_lp_B_T)
        loss_B_T = -torch.minimum(ratio_B_T * adv_B_T, ratio_B_T.clamp(1 - eps, 1 + eps) * adv_B_T)
    return loss_B_T if is_weight_B_T is None else loss_B_T * is_weight_B_T.detach()


def _teacher_minus_student_B_T(
    s_B_T: torch.Tensor, teacher_lp_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> torch.Tensor:
    """d_t = t_t - s_t, detached, 0 off the mask (the negative of the K1 reverse-KL estimate per token)."""
    return torch.where(mask_B_T, teacher_lp_B_T.float() - s_B_T, 0.0).detach()


def _discounted_B_T(d_B_T: torch.Tensor, mask_B_T: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = sum_{u >= t} discount^(u-t) m_u d_u within each sequence; A_t = d_t when discount = 0."""
    if discount == 0.0:
        return d_B_T
    adv_B_T = torch.zeros_like(d_B_T)
    acc_B = torch.zeros_like(d_B_T[:, 0])
    for t in reversed(range(d_B_T.shape[1])):
        acc_B = d_B_T[:, t] + discount * acc_B
        adv_B_T[:, t] = acc_B
    return torch.where(mask_B_T, adv_B_T, 0.0)


def opd(
    student: torch.Tensor | StudentScores,
    ids_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    old_lp_B_T: torch.Tensor | None = None,
    ratio_eps: float = 0.2,
    is_weight_B_T: torch.Tensor | None = None,
    discount: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """On-policy distillation, K1 reverse KL in policy-gradient form.

    A_t = d_t, or with a discount g, A_t = sum_{u>=t} g^(u-t) d_u.   loss = mean_t(-A_t s_t).
    Since E_{y~p_S}[grad s] = 0, E[-d grad s] = E[(s - t) grad s] = grad KL(p_S || p_T) per position.
    Stale rollouts (old_lp_B_T = s_old): loss = mean_t(-min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)),
    r_t = exp(s_t - s_old_t), whose gradient at s_old = s is that of the fresh loss.
    Rows another engine sampled, fresh (is_weight_B_T = w, truncated importance sampling):
    loss = mean_t(-w_t A_t s_t), w_t = min(exp(s_t - s_sampler_t), C) detached, which corrects the expectation for
    the sampler's small differences from the trainer (kernels, precision); the same weight multiplies every other
    method's policy-gradient terms.
    Metrics: loss, k1 = mean(s - t) (the K1 estimate of the reverse KL), advantage_mean.
    """
    s_B_T = _scores(student, ids_B_T).need("lp_B_T", "opd")
    d_B_T = _teacher_minus_student_B_T(s_B_T, teacher_lp_B_T, mask_B_T)
    adv_B_T = _discounted_B_T(d_B_T, mask_B_T, discount)
    loss = _mean(_pg_B_T(s_B_T, adv_B_T, mask_B_T, old_lp_B_T, ratio_eps, is_weight_B_T), mask_B_T)
    metrics = {
        "loss": loss.item(),
        "k1": -_mean(d_B_T, mask_B_T).item(),
        "advantage_mean": _mean(adv_B_T, mask_B_T).item(),
    }
    return loss, metrics


def trust_mask(
    student_lp_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    rule: str = "threshold",
    tau: float = 0.1,
    quantile: float = 0.5,
    generator: torch.Generator | None = None,
    uniform_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which tokens lie in the trust region (bool B_T, False off the mask).

    P_t = min(1, exp(t_t - s_t)), the speculative-decoding acceptance probability of y_t.
    rule "threshold": P_t >= tau.  "stochastic": Bernoulli(P_t), i.e. u_t < P_t with u_t ~ U(0, 1) taken from
    `uniform_B_T` when given (data-parallel ranks pass their slice of the global batch's draws), else drawn
    with `generator`.  "adaptive": log P_t >= the `quantile` quantile of log P over the batch's masked tokens with
    P_t > 0 (taken in log space, so that P below float32's range still ranks; P_t = 0 is never trusted).
    """
    if rule not in TRUST_RULES:
        raise ValueError(f"unknown trust rule {rule!r}; expected one of {TRUST_RULES}")
    log_accept_B_T = (teacher_lp_B_T.float() - student_lp_B_T.detach().float()).clamp(max=0.0)
    accept_B_T = torch.exp(log_accept_B_T)
    if rule == "threshold":
        trusted_B_T = accept_B_T >= tau
    elif rule == "stochastic":
        if uniform_B_T is None:
            uniform_B_T = torch.rand(accept_B_T.shape, generator=generator, device=accept_B_T.device)
        trusted_B_T = uniform_B_T < accept_B_T
    else:
        # the quantile of log P over the tokens where P > 0: P itself underflows to 0 in float32 below ~1e-38 (the
        # quantile would then be 0 and trust the worst outliers), and a token the teacher gives p_T = 0 is never
        # trusted
        possible_B_T = mask_B_T & (log_accept_B_T > float("-inf"))
        if not possible_B_T.any():
            return torch.zeros_like(mask_B_T)
        trusted_B_T = possible_B_T & (log_accept_B_T >= torch.quantile(log_accept_B_T[possible_B_T], quantile))
    return trusted_B_T & mask_B_T


def _teacher_top_k_and_rest(top_lp_N_K: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Teacher log-probs over K+1 outcomes: its top-k, then log p_T_tail = log(1 - sum_K p_T), summed in float64 and
    clamped so that a top-k holding all the mass up to rounding gives a tail of exactly 0 (log = -inf).
    When K covers the vocabulary there is no tail bucket."""
    top_lp_N_K = top_lp_N_K.float()
    if top_lp_N_K.shape[-1] >= vocab_size:
        return top_lp_N_K
    top_mass_N = top_lp_N_K.double().exp().sum(-1, keepdim=True)
    return torch.cat([top_lp_N_K, torch.log1p(-top_mass_N.clamp(max=1.0)).float()], -1)


def _student_top_k_and_rest(logits_N_V: torch.Tensor, top_ids_N_K: torch.Tensor) -> torch.Tensor:
    """Student log-probs over the same K+1 outcomes. Its tail is the logsumexp of the logits outside K, exact even
    where log(1 - sum_K p_S) would round to log(0) in float32 (tails below ~1e-7)."""
    logits = logits_N_V.float()
    logz_N = logits.logsumexp(-1, keepdim=True)
    s_N_K = logits.gather(-1, top_ids_N_K) - logz_N
    if top_ids_N_K.shape[-1] >= logits.shape[-1]:
        return s_N_K
    s_tail_N = logits.scatter(-1, top_ids_N_K, float("-inf")).logsumexp(-1, keepdim=True) - logz_N
    return torch.cat([s_N_K, s_tail_N], -1)


def _kl(lp_N_K: torch.Tensor, lq_N_K: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_k p_k (log p_k - log q_k), with 0 log 0 = 0."""
    p_N_K = lp_N_K.exp()
    return torch.where(p_N_K > 0, p_N_K * (lp_N_K - lq_N_K), 0.0).sum(-1)


def topk_forward_kl(
    student: torch.Tensor | StudentScores, teacher_top_ids_B_T_K: torch.Tensor, teacher_top_lp_B_T_K: torch.Tensor
) -> torch.Tensor:
    """Forward KL from the teacher's top-k distribution plus one tail bucket, per position (kl_B_T, any leading shape).

    KL_t = sum_{v in K} p_T(v) (log p_T(v) - log p_S(v)) + p_T_tail (log p_T_tail - log p_S_tail),
    p_T_tail = 1 - sum_K p_T,  p_S_tail = 1 - sum_K p_S,  0 log 0 = 0.
    A true KL over k+1 outcomes, so never negative; the result is clamped at 0 only to absorb float rounding (e.g. a
    teacher top-k whose probabilities sum to slightly over 1). The gradient flows through the student's logits.
    Given StudentScores, their topk_lp_B_T_K1 must have been computed for `teacher_top_ids_B_T_K`.
    """
    scores = _scores(student, None, teacher_top_ids_B_T_K)
    s_K1 = scores.need("topk_lp_B_T_K1", "topk_forward_kl")
    return _kl(_teacher_top_k_and_rest(teacher_top_lp_B_T_K, scores.vocab_size), s_K1).clamp(min=0.0)


def _fkl_at(scores: StudentScores, top_lp_B_T_K: torch.Tensor, sel_B_T: torch.Tensor, loss: str) -> torch.Tensor:
    """topk_forward_kl at the selected positions, 0 elsewhere; teacher values off the selection are never read."""
    s_N_K1 = scores.need("topk_lp_B_T_K1", loss)[sel_B_T]
    fkl_N = _kl(_teacher_top_k_and_rest(top_lp_B_T_K[sel_B_T], scores.vocab_size), s_N_K1).clamp(min=0.0)
    return fkl_N.new_zeros(sel_B_T.shape).masked_scatter(sel_B_T, fkl_N)


def tropd(
    student: torch.Tensor | StudentScores,
    ids_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    teacher_top_ids_B_T_K: torch.Tensor,
    teacher_top_lp_B_T_K: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    prefix_mask_B_T: torch.Tensor | None = None,
    rule: str = "threshold",
    tau: float = 0.1,
    quantile: float = 0.5,
    outlier: str = "topk_fkl",
    clip_c: float = 2.0,
    lambda_out: float = 1.0,
    lambda_prefix: float = 1.0,
    prefix_loss: str = "topk_fkl",
    old_lp_B_T: torch.Tensor | None = None,
    ratio_eps: float = 0.2,
    is_weight_B_T: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    uniform_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Trust Region On-Policy Distillation.

    Prefix tokens (teacher-written, prefix_mask): lambda_prefix * F_t, where F_t is, by `prefix_loss`,
      "topk_fkl":    FKL_t (topk_forward_kl, a true KL over the teacher's top-k plus tail), or
      "sampled_fkl": t_t - s_t, the one-sample estimate of KL(p_T || p_S) on the teacher's own token (unbiased, noisy,
                     can be negative); its gradient is that of the cross-entropy -s_t on the teacher's token.
    The student's own tokens are split by trust_mask(s, t, rule, tau, quantile):
      trusted:  -A_t s_t with A_t = d_t (the OPD term; the clipped surrogate of `opd` when old_lp_B_T is given);
      outliers: outlier="mask": 0;  "clip": the OPD term with A_t = max(d_t, -clip_c);  "topk_fkl": lambda_out * FKL_t.
    loss = mean over all masked tokens = opd_term + outlier_term + prefix_term.
    Metrics: loss, k1 = mean(s - t) over on-policy tokens, trust_share and outlier_share (of on-policy tokens),
    prefix_share (of masked tokens), fkl_outlier (mean FKL on outliers, 0 if none), opd_term, outlier_term,
    prefix_term.
    """
    if outlier not in OUTLIERS:
        raise ValueError(f"unknown outlier treatment {outlier!r}; expected one of {OUTLIERS}")
    if prefix_loss not in PREFIX_LOSSES:
        raise ValueError(f"unknown prefix loss {prefix_loss!r}; expected one of {PREFIX_LOSSES}")
    scores = _scores(student, ids_B_T, teacher_top_ids_B_T_K)
    s_B_T = scores.need("lp_B_T", "tropd")
    d_B_T = _teacher_minus_student_B_T(s_B_T, teacher_lp_B_T, mask_B_T)
    prefix_B_T = mask_B_T & prefix_mask_B_T if prefix_mask_B_T is not None else torch.zeros_like(mask_B_T)
    onpolicy_B_T = mask_B_T & ~prefix_B_T
    trusted_B_T = trust_mask(
        s_B_T, teacher_lp_B_T, onpolicy_B_T, rule=rule, tau=tau, quantile=quantile, generator=generator,
        uniform_B_T=uniform_B_T,
    )  # fmt: skip
    outlier_B_T = onpolicy_B_T & ~trusted_B_T
    sampled = prefix_loss == "sampled_fkl"
    fkl_B_T = _fkl_at(scores, teacher_top_lp_B_T_K, outlier_B_T if sampled else prefix_B_T | outlier_B_T, "tropd")

    opd_B_T = _pg_B_T(s_B_T, torch.where(trusted_B_T, d_B_T, 0.0), mask_B_T, old_lp_B_T, ratio_eps, is_weight_B_T)
    if outlier == "mask":
        outlier_loss_B_T = torch.zeros_like(s_B_T)
    elif outlier == "clip":
        clipped_B_T = torch.where(outlier_B_T, d_B_T.clamp(min=-clip_c), 0.0)
        outlier_loss_B_T = _pg_B_T(s_B_T, clipped_B_T, mask_B_T, old_lp_B_T, ratio_eps, is_weight_B_T)
    else:
        outlier_loss_B_T = torch.where(outlier_B_T, lambda_out * fkl_B_T, 0.0)
    prefix_fkl_B_T = torch.where(prefix_B_T, teacher_lp_B_T.float() - s_B_T, 0.0) if sampled else fkl_B_T
    prefix_loss_B_T = torch.where(prefix_B_T, lambda_prefix * prefix_fkl_B_T, 0.0)

    opd_term = _mean(opd_B_T, mask_B_T)
    outlier_term = _mean(outlier_loss_B_T, mask_B_T)
    prefix_term = _mean(prefix_loss_B_T, mask_B_T)
    loss = opd_term + outlier_term + prefix_term
    n_onpolicy = onpolicy_B_T.sum().clamp(min=1)
    metrics = {
        "loss": loss.item(),
        "k1": -_mean(d_B_T, onpolicy_B_T).item(),
        "trust_share": (trusted_B_T.sum() / n_onpolicy).item(),
        "outlier_share": (outlier_B_T.sum() / n_onpolicy).item(),
        "prefix_share": (prefix_B_T.sum() / mask_B_T.sum().clamp(min=1)).item(),
        "fkl_outlier": _mean(fkl_B_T.detach(), outlier_B_T).item(),
        "opd_term": opd_term.item(),
        "outlier_term": outlier_term.item(),
        "prefix_term": prefix_term.item(),
    }
    return loss, metrics


def eopd(
    student: torch.Tensor | StudentScores,
    ids_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    teacher_top_ids_B_T_K: torch.Tensor,
    teacher_top_lp_B_T_K: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    entropy_threshold: float = 1.0,
    lambda_fkl: float = 1.0,
    old_lp_B_T: torch.Tensor | None = None,
    ratio_eps: float = 0.2,
    is_weight_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Entropy-aware OPD: the OPD term on every token, plus forward KL where the teacher is uncertain.

    H_t = -sum_{v in K} p_T(v) log p_T(v) - p_T_tail log p_T_tail   (the teacher's entropy from its top-k plus tail)
    loss = mean_t(-A_t s_t + lambda_fkl [H_t > entropy_threshold] FKL_t),  A_t = d_t, FKL_t = topk_forward_kl.
    This is a documented reading of the EOPD paper (arXiv 2603.07079); its exact formula is not public.
    Metrics: loss, k1, advantage_mean, high_entropy_share, teacher_entropy (mean H), fkl_high (mean FKL where
    H > threshold, 0 if none), opd_term, fkl_term.
    """
    scores = _scores(student, ids_B_T, teacher_top_ids_B_T_K)
    s_B_T = scores.need("lp_B_T", "eopd")
    d_B_T = _teacher_minus_student_B_T(s_B_T, teacher_lp_B_T, mask_B_T)
    t_K1 = _teacher_top_k_and_rest(teacher_top_lp_B_T_K, scores.vocab_size)
    entropy_B_T = torch.where(t_K1 > float("-inf"), -t_K1.exp() * t_K1, 0.0).sum(-1)
    high_B_T = mask_B_T & (entropy_B_T > entropy_threshold)
    fkl_B_T = _fkl_at(scores, teacher_top_lp_B_T_K, high_B_T, "eopd")

    opd_term = _mean(_pg_B_T(s_B_T, d_B_T, mask_B_T, old_lp_B_T, ratio_eps, is_weight_B_T), mask_B_T)
    fkl_term = lambda_fkl * _mean(fkl_B_T, mask_B_T)  # fkl_B_T is 0 off the high-entropy tokens
    loss = opd_term + fkl_term
    metrics = {
        "loss": loss.item(),
        "k1": -_mean(d_B_T, mask_B_T).item(),
        "advantage_mean": _mean(d_B_T, mask_B_T).item(),
        "high_entropy_share": (high_B_T.sum() / mask_B_T.sum().clamp(min=1)).item(),
        "teacher_entropy": _mean(entropy_B_T, mask_B_T).item(),
        "fkl_high": _mean(fkl_B_T.detach(), high_B_T).item(),
        "opd_term": opd_term.item(),
        "fkl_term": fkl_term.item(),
    }
    return loss, metrics


def _selected_by_entropy(entropy_B_T: torch.Tensor, mask_B_T: torch.Tensor, share: float) -> torch.Tensor:
    """The ceil(share * n) of the n masked tokens with the highest entropy (bool B_T)."""
    with torch.no_grad():
        # rounded first: 0.14 * 50 is 7.000000000000001 in floating point, whose ceiling would be 8
        n_selected = math.ceil(round(share * int(mask_B_T.sum()), 9))
        top_N = entropy_B_T.masked_fill(~mask_B_T, float("-inf")).flatten().topk(n_selected).indices
        return torch.zeros_like(mask_B_T).flatten().index_fill(0, top_N, True).view_as(mask_B_T) & mask_B_T


def reopold(
    student: torch.Tensor | StudentScores,
    ids_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    floor_lambda: float = 0.2,
    token_share: float = 0.5,
    refine: bool = False,
    old_lp_B_T: torch.Tensor | None = None,
    ratio_eps: float = 0.2,
    is_weight_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """REOPOLD (arXiv 2603.11137): OPD's log-ratio reward, floored, on the student's highest-entropy tokens (explore
    stage); plain OPD (`opd`, every token, no floor) in the refine stage, refine=True.

    R_t = max(d_t, log(lambda / (1 - lambda)))     mixture-based reward clipping (lambda = 0.2: floor log 0.25 = -1.39)
    M_t = [H_S,t is among the ceil(token_share * n) highest of the batch's n masked tokens],
          H_S,t = -sum_v p_S(v) log p_S(v) (the student's entropy, detached)
    loss = sum_t M_t (-R_t s_t) / max(1, sum_t M_t)   (a mean over the selected tokens; the clipped surrogate of `opd`
    when old_lp_B_T is given)
    A token the teacher rejects costs at most -floor, and R_t = d_t above the floor, so the student still moves toward
    the teacher where the teacher's signal is not extreme.
    Readings (the paper's text was read through third-party summaries of its equations): the floor (its Eq. 7), the
    top-share entropy mask (Eq. 8) and the normalisation by the selected tokens (Eq. 4) are as summarised; the
    defaults lambda = 0.2 and token_share = 0.5 are the values its sensitivity figures favour. What each stage does is
    our reading: one summary has the explore stage mask the tokens whose reward is floored and the refine stage use
    the entropy mask; we follow the reading of the explore stage as the relaxed objective and the refine stage as plain
    OPD. The step of the switch is not stated (the trainer's default: half of the steps).
    Metrics: loss, k1, reward_mean and floored_share (over selected tokens), selected_share, student_entropy.
    """
    if not 0.0 < floor_lambda < 1.0 or not 0.0 <= token_share <= 1.0:
        raise ValueError(
            f"need 0 < floor_lambda < 1 and 0 <= token_share <= 1, got floor_lambda={floor_lambda}, "
            f"token_share={token_share}"
        )
    if refine:
        return opd(
            student,
            ids_B_T,
            teacher_lp_B_T,
            mask_B_T,
            old_lp_B_T=old_lp_B_T,
            ratio_eps=ratio_eps,
            is_weight_B_T=is_weight_B_T,
        )
    scores = _scores(student, ids_B_T, entropy=True)
    s_B_T = scores.need("lp_B_T", "reopold")
    d_B_T = _teacher_minus_student_B_T(s_B_T, teacher_lp_B_T, mask_B_T)
    entropy_B_T = scores.need("entropy_B_T", "reopold").detach()
    selected_B_T = _selected_by_entropy(entropy_B_T, mask_B_T, token_share)
    floor = math.log(floor_lambda / (1.0 - floor_lambda))
    reward_B_T = d_B_T.clamp(min=floor)
    adv_B_T = torch.where(selected_B_T, reward_B_T, 0.0)
    loss = _mean(_pg_B_T(s_B_T, adv_B_T, mask_B_T, old_lp_B_T, ratio_eps, is_weight_B_T), selected_B_T)
    metrics = {
        "loss": loss.item(),
        "k1": -_mean(d_B_T, mask_B_T).item(),
        "reward_mean": _mean(reward_B_T, selected_B_T).item(),
        "floored_share": _mean((d_B_T < floor).float(), selected_B_T).item(),
        "selected_share": (selected_B_T.sum() / mask_B_T.sum().clamp(min=1)).item(),
        "student_entropy": _mean(entropy_B_T, mask_B_T).item(),
    }
    return loss, metrics


def topd(
    student: torch.Tensor | StudentScores,
    ids_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    alpha: float = 0.2,
    old_lp_B_T: torch.Tensor | None = None,
    ratio_eps: float = 0.2,
    is_weight_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """TOP-D (arXiv 2607.04751): OPD against a proximal teacher a p_T + (1 - a) p_S.

    r_t = log((a p_T(y_t) + (1 - a) p_S(y_t)) / p_S(y_t)) = log(a exp(d_t) + 1 - a) >= log(1 - a),
    with d_t = t_t - s_t^old, the log-ratio against the sampling student (s^old = s when on-policy).
    loss = mean_t(-r_t s_t) (the clipped surrogate of `opd` when old_lp_B_T is given). r_t is increasing in d_t, so
    the expected gradient still lowers KL(p_S || p_T); a = 1 is `opd`. The weight a is constant over training, as
    TOP-D reports it (0.1 or 0.2; 0.1 to 0.3 alike in its ablation): the proximal teacher moves toward p_T because
    p_S does. Not reproduced (documented reading): its token-level return (r_t plus the mean of the later rewards)
    normalised over each prompt's group of samples, and its several PPO mini-batch updates per batch.
    Metrics: loss, k1, reward_mean.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"need 0 < alpha <= 1, got alpha={alpha}")
    s_B_T = _scores(student, ids_B_T).need("lp_B_T", "topd")
    d_B_T = _teacher_minus_student_B_T(s_B_T, teacher_lp_B_T, mask_B_T)
    sampled_B_T = (
        d_B_T if old_lp_B_T is None else _teacher_minus_student_B_T(old_lp_B_T.float(), teacher_lp_B_T, mask_B_T)
    )
    floor = math.log1p(-alpha) if alpha < 1.0 else float("-inf")
    reward_B_T = torch.logaddexp(sampled_B_T + math.log(alpha), torch.full_like(sampled_B_T, floor))
    reward_B_T = torch.where(mask_B_T, reward_B_T, 0.0)
    loss = _mean(_pg_B_T(s_B_T, reward_B_T, mask_B_T, old_lp_B_T, ratio_eps, is_weight_B_T), mask_B_T)
    metrics = {
        "loss": loss.item(),
        "k1": -_mean(d_B_T, mask_B_T).item(),
        "reward_mean": _mean(reward_B_T, mask_B_T).item(),
    }
    return loss, metrics


def gkd(
    student: torch.Tensor | StudentScores,
    teacher_top_ids_B_T_K: torch.Tensor,
    teacher_top_lp_B_T_K: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    beta: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """Generalized Jensen-Shannon divergence (GKD, arXiv 2306.13649) over the k+1 outcomes top-k plus tail.

    M = beta P_T + (1 - beta) P_S,   JSD_beta = beta KL(P_T || M) + (1 - beta) KL(P_S || M),   loss = mean_t JSD_beta.
    JSD_beta itself tends to 0 at both ends; as in the GKD paper (and TRL), the ends are defined by the limits of the
    normalized divergence: beta = 0 gives KL(P_T || P_S) (forward, = topk_forward_kl), beta = 1 gives
    KL(P_S || P_T) (reverse), where the teacher's log-probs are floored at log(1e-10) so a zero tail stays finite.
    The gradient flows through the student (also through M).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"need 0 <= beta <= 1, got beta={beta}")
    scores = _scores(student, None, teacher_top_ids_B_T_K)
    s_N_K1 = scores.need("topk_lp_B_T_K1", "gkd")[mask_B_T]
    t_N_K1 = _teacher_top_k_and_rest(teacher_top_lp_B_T_K[mask_B_T], scores.vocab_size)
    if beta == 0.0:
        div_N = _kl(t_N_K1, s_N_K1)
    elif beta == 1.0:
        div_N = _kl(s_N_K1, t_N_K1.clamp(min=LOG_FLOOR))
    else:
        m_N_K1 = torch.logaddexp(t_N_K1 + math.log(beta), s_N_K1 + math.log1p(-beta))
        div_N = beta * _kl(t_N_K1, m_N_K1) + (1 - beta) * _kl(s_N_K1, m_N_K1)
    loss = div_N.clamp(min=0.0).sum() / mask_B_T.sum().clamp(min=1)
    return loss, {"loss": loss.item()}


def sft(
    student: torch.Tensor | StudentScores, ids_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, Metrics]:
    """Supervised fine-tuning on given (teacher-written) tokens: loss = mean_t(-s_t), the cross-entropy.

    Metrics: loss, token_accuracy (share of masked tokens where the student's argmax is y_t).
    """
    scores = _scores(student, ids_B_T, argmax=True)
    loss = _mean(-scores.need("lp_B_T", "sft"), mask_B_T)
    accuracy = _mean((scores.need("argmax_B_T", "sft") == ids_B_T).float(), mask_B_T)
    return loss, {"loss": loss.item(), "token_accuracy": accuracy.item()}
