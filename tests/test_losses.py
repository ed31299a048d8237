"""Each loss against a slow float64 reference written with plain loops over positions, plus gradient directions.

The references differentiate a float64 copy of the logits with autograd, so values and gradients are both compared.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer import losses

TOL = dict(atol=1e-5, rtol=1e-5)


def make_batch(seed=0, B=3, T=6, V=7, K=3, scale=2.0):
    """Random student/teacher logits, student samples, teacher scores; padded tail of each row holds garbage (nan)."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, T, V, generator=g)).requires_grad_()
    teacher_lp_full = torch.log_softmax(scale * torch.randn(B, T, V, generator=g), -1)
    ids = torch.multinomial(torch.softmax(logits.detach(), -1).view(-1, V), 1, generator=g).view(B, T)
    top_lp, top_ids = teacher_lp_full.topk(K, -1)
    mask = torch.arange(T) < torch.tensor([T, T - 2, T - 3][:B]).unsqueeze(1)
    teacher_lp = teacher_lp_full.gather(-1, ids.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, float("nan"))
    old_lp = (torch.log_softmax(logits.detach(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)) + 0.3 * torch.randn(
        B, T, generator=g
    )
    return dict(logits=logits, ids=ids, teacher_lp=teacher_lp, top_ids=top_ids, top_lp=top_lp, mask=mask, old_lp=old_lp)


def positions(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def ref_fkl(logits_V, top_ids_K, top_lp_K):
    """Forward KL over top-k plus tail, float64, one position."""
    ls = torch.log_softmax(logits_V.double(), -1)
    kl = ls.new_zeros(())
    for i, lp in zip(top_ids_K.tolist(), top_lp_K.double().tolist(), strict=True):
        if lp > -math.inf:
            kl = kl + math.exp(lp) * (lp - ls[i])
    if len(top_ids_K) < len(logits_V):
        pt_tail = max(0.0, 1.0 - sum(math.exp(lp) for lp in top_lp_K.double().tolist()))
        ps_tail = 1.0 - sum(ls[i].exp() for i in top_ids_K.tolist())
        if pt_tail > 0:
            kl = kl + pt_tail * (math.log(pt_tail) - torch.log(ps_tail))
    return kl


def ref_pg(s, adv, old, eps):
    if old is None:
        return -adv * s
    r = torch.exp(s - old)
    return -torch.minimum(r * adv, r.clamp(1 - eps, 1 + eps) * adv)


def leaf64(logits):
    return logits.detach().double().requires_grad_()


def check(loss, grad, ref_loss, ref_logits):
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL)
    torch.testing.assert_close(grad.double(), ref_logits.grad, **TOL)


def exact_reverse_kl_grad(z, w):
    z64 = z.detach().double().requires_grad_()
    ls, lt = torch.log_softmax(z64, -1), torch.log_softmax(w.double(), -1)
    kl = (ls.exp() * (ls - lt)).sum()
    kl.backward()
    return kl.item(), z64.grad.float()


def reverse_kl(z, w):
    ls, lt = torch.log_softmax(z.double(), -1), torch.log_softmax(w.double(), -1)
    return (ls.exp() * (ls - lt)).sum().item()


def categorical(seed=0, V=5, N=200_000):
    """One position, N samples from the student: logits_B_T_V is the student's logits z broadcast to (N, 1, V)."""
    g = torch.Generator().manual_seed(seed)
    z, w = torch.randn(V, generator=g), 2 * torch.randn(V, generator=g)
    ids = torch.multinomial(torch.softmax(z, -1), N, replacement=True, generator=g).view(N, 1)
    teacher_lp = torch.log_softmax(w, -1)[ids]
    return z.requires_grad_(), w, ids, teacher_lp, torch.ones(N, 1, dtype=torch.bool)


# ---------------------------------------------------------------- opd


@pytest.mark.parametrize("discount", [0.0, 0.9])
@pytest.mark.parametrize("stale", [False, True])
def test_opd_matches_reference(discount, stale):
    b = make_batch(1)
    old = b["old_lp"] if stale else None
    loss, m = losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"], old_lp_B_T=old, discount=discount)
    loss.backward()

    L = leaf64(b["logits"])
    pos = positions(b["mask"])
    s = {p: torch.log_softmax(L[p], -1)[b["ids"][p]] for p in pos}
    d = {p: b["teacher_lp"][p].item() - s[p].item() for p in pos}
    ref = L.new_zeros(())
    for bi, ti in pos:
        adv = sum(discount ** (u - ti) * d[(bi, u)] for u in range(ti, b["mask"].shape[1]) if (bi, u) in d)
        ref = ref + ref_pg(s[(bi, ti)], adv, None if old is None else old[bi, ti].double(), 0.2)
    check(loss, b["logits"].grad, ref / len(pos), L)
    assert m["k1"] == pytest.approx(-sum(d.values()) / len(pos), abs=1e-5)
    assert m["loss"] == pytest.approx(loss.item())
    assert set(m) >= {"loss", "k1", "advantage_mean"}


def test_opd_old_lp_equal_to_current_gives_same_gradient():
    b = make_batch(2)
    fresh, _ = losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"])
    (g_fresh,) = torch.autograd.grad(fresh, b["logits"])
    current = losses.token_logprobs(b["logits"], b["ids"]).detach()
    stale, _ = losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"], old_lp_B_T=current)
    (g_stale,) = torch.autograd.grad(stale, b["logits"])
    torch.testing.assert_close(g_stale, g_fresh)


def test_opd_with_truncated_importance_weights_matches_reference():
    """Rows a rollout engine sampled: each token's policy-gradient loss times w_t = min(exp(s_t - s_sampler_t), C),
    detached (no gradient through the weight)."""
    b = make_batch(4)
    sampler = b["old_lp"]  # log-probs that differ from the trainer's, as an engine's may
    s_now = losses.token_logprobs(b["logits"], b["ids"]).detach()
    weight = torch.exp(s_now - sampler).clamp(max=1.5)
    assert (weight < 1.5).any() and (weight == 1.5).any()  # both sides of the cap are exercised
    loss, _ = losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"], is_weight_B_T=weight)
    loss.backward()

    L = leaf64(b["logits"])
    pos = positions(b["mask"])
    ref = L.new_zeros(())
    for p in pos:
        s = torch.log_softmax(L[p], -1)[b["ids"][p]]
        w = min(math.exp(s.item() - sampler[p].double().item()), 1.5)  # a number: no gradient through it
        ref = ref + w * ref_pg(s, b["teacher_lp"][p].item() - s.item(), None, 0.2)
    check(loss, b["logits"].grad, ref / len(pos), L)


def test_truncated_importance_weights_apply_to_fresh_engine_rows_only():
    """`methods.is_weights`: on the tokens the engine sampled of fresh rows; none for stale rows (their clipped
    surrogate already takes the sampler's log-probs as the old policy's), without an engine, or with is_clip 0."""
    from trainer.config import load_config
    from trainer.methods import is_weights
    from trainer.pipeline import Batch

    b = make_batch(5)
    mask = b["mask"]
    prefix = mask & (torch.arange(mask.shape[1]) < 1)
    batch = Batch(1, "student", [[1]] * 3, [[1]] * 3, [1] * 3, b["ids"], mask, prefix, None,
                  sampler_lp_B_T=b["old_lp"])  # fmt: skip
    config = load_config(None, ["rollout.is_clip=1.5"])
    w = is_weights(config, batch, b["logits"])
    s_now = losses.token_logprobs(b["logits"], b["ids"]).detach()
    sampled = mask & ~prefix
    torch.testing.assert_close(w[sampled], torch.exp(s_now - b["old_lp"]).clamp(max=1.5)[sampled])
    assert bool((w[~sampled] == 1).all())
    assert is_weights(load_config(None, ["rollout.is_clip=0"]), batch, b["logits"]) is None
    batch.old_lp_B_T = b["old_lp"]  # stale rows
    assert is_weights(config, batch, b["logits"]) is None
    batch.old_lp_B_T = batch.sampler_lp_B_T = None  # the torch engine
    assert is_weights(config, batch, b["logits"]) is None


def test_opd_monte_carlo_gradient_is_reverse_kl_gradient():
    z, w, ids, teacher_lp, mask = categorical()
    loss, _ = losses.opd(z.expand(len(ids), 1, -1), ids, teacher_lp, mask)
    loss.backward()
    kl, exact = exact_reverse_kl_grad(z, w)
    torch.testing.assert_close(z.grad, exact, atol=0.03, rtol=0.05)
    assert torch.nn.functional.cosine_similarity(z.grad, exact, dim=0) > 0.99
    # a step along the Monte-Carlo gradient moves the student toward the teacher
    assert reverse_kl(z.detach() - 0.1 * z.grad, w) < kl


# ---------------------------------------------------------------- trust region


def test_trust_threshold():
    s = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5]]))
    t = torch.log(torch.tensor([[0.01, 0.04, 0.06, 0.9, 0.01]]))  # P = .02 .08 .12 1 .02
    mask = torch.tensor([[True, True, True, True, False]])
    got = losses.trust_mask(s, t, mask, rule="threshold", tau=0.1)
    assert got.tolist() == [[False, False, True, True, False]]
    assert got.dtype == torch.bool


def test_trust_stochastic_frequency_matches_acceptance():
    probs = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0])
    n = 8000
    t = torch.log(probs).repeat_interleave(n).unsqueeze(0)
    s = torch.zeros_like(t)  # p_S = 1, so P = p_T
    mask = torch.ones_like(t, dtype=torch.bool)
    got = losses.trust_mask(s, t, mask, rule="stochastic", generator=torch.Generator().manual_seed(0))
    freq = got.view(len(probs), n).float().mean(1)
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)
    again = losses.trust_mask(s, t, mask, rule="stochastic", generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, again)
    assert not losses.trust_mask(s, t, torch.zeros_like(mask), rule="stochastic").any()


def test_trust_stochastic_with_given_draws():
    s = torch.zeros(2, 3)
    t = torch.log(torch.tensor([[0.2, 0.5, 0.9], [0.2, 0.5, 0.9]]))  # P = p_T
    mask = torch.tensor([[True, True, True], [True, True, False]])
    u = torch.tensor([[0.1, 0.6, 0.5], [0.3, 0.4, 0.1]])
    got = losses.trust_mask(s, t, mask, rule="stochastic", uniform_B_T=u)
    assert got.tolist() == [[True, False, True], [False, True, False]]  # u < P, and never off the mask
    # the draws a generator would make are the ones it makes when none are given
    drawn = torch.rand(s.shape, generator=torch.Generator().manual_seed(5))
    by_gen = losses.trust_mask(s, t, mask, rule="stochastic", generator=torch.Generator().manual_seed(5))
    assert torch.equal(by_gen, losses.trust_mask(s, t, mask, rule="stochastic", uniform_B_T=drawn))


@pytest.mark.parametrize("q", [0.25, 0.5, 0.9])
def test_trust_adaptive_quantile(q):
    g = torch.Generator().manual_seed(3)
    s = -3 * torch.rand(4, 9, generator=g)
    t = s - 3 * torch.rand(4, 9, generator=g)  # P < 1: no ties at the top
    mask = torch.rand(4, 9, generator=g) < 0.7
    got = losses.trust_mask(s, t, mask, rule="adaptive", quantile=q)
    accept = [min(1.0, math.exp(t[p].item() - s[p].item())) for p in positions(mask)]
    v = sorted(accept)
    x = q * (len(v) - 1)
    lo = math.floor(x)
    thr = v[lo] + (x - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])
    want = torch.zeros_like(mask)
    for p, a in zip(positions(mask), accept, strict=True):
        want[p] = a >= thr - 1e-7
    assert torch.equal(got, want)
    assert got.sum().item() == pytest.approx((1 - q) * mask.sum().item(), abs=1.5)
    assert not losses.trust_mask(s, t, torch.zeros_like(mask), rule="adaptive").any()


def test_bad_names_raise():
    b = make_batch(0)
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="nope"):
        losses.trust_mask(s, s, s > -1, rule="nope")
    args = (b["logits"], b["ids"], b["teacher_lp"], b["top_ids"], b["top_lp"], b["mask"])
    with pytest.raises(ValueError, match="nope"):
        losses.tropd(*args, outlier="nope")
    with pytest.raises(ValueError, match="nope"):
        losses.tropd(*args, rule="nope")


# ---------------------------------------------------------------- top-k forward KL


def test_topk_forward_kl_matches_reference_and_is_never_negative():
    g = torch.Generator().manual_seed(4)
    for case in range(60):
        V = int(torch.randint(2, 12, (1,), generator=g))
        K = V if case % 5 == 0 else int(torch.randint(1, V + 1, (1,), generator=g))
        teacher_scale = [1.0, 10.0, 40.0][case % 3]  # 40: the top-k holds all the mass up to rounding
        logits = (2 * torch.randn(2, 3, V, generator=g)).requires_grad_()
        top_lp, top_ids = torch.log_softmax(teacher_scale * torch.randn(2, 3, V, generator=g), -1).topk(K, -1)
        kl = losses.topk_forward_kl(logits, top_ids, top_lp)
        assert kl.shape == (2, 3) and (kl >= 0).all()
        L = leaf64(logits)
        ref = torch.stack([ref_fkl(L[b, t], top_ids[b, t], top_lp[b, t]) for b in range(2) for t in range(3)])
        torch.testing.assert_close(kl.double().flatten(), ref.detach(), atol=2e-5, rtol=1e-4)
        assert (ref > -1e-6).all()
        kl.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(logits.grad.double(), L.grad, atol=2e-5, rtol=1e-4)


def test_topk_forward_kl_gradient_step_lowers_it_and_zero_at_teacher():
    b = make_batch(5)
    kl = losses.topk_forward_kl(b["logits"], b["top_ids"], b["top_lp"])
    kl.sum().backward()
    stepped = b["logits"].detach() - 0.1 * b["logits"].grad
    assert losses.topk_forward_kl(stepped, b["top_ids"], b["top_lp"]).sum() < kl.sum()
    teacher = torch.log_softmax(torch.randn(2, 3, 6), -1)
    top_lp, top_ids = teacher.topk(2, -1)
    assert losses.topk_forward_kl(teacher, top_ids, top_lp).abs().max() < 1e-6


# ---------------------------------------------------------------- tropd


def ref_tropd(b, prefix, tau, outlier, clip_c, lambda_out, lambda_prefix, old, prefix_loss="topk_fkl"):
    L = leaf64(b["logits"])
    pos = positions(b["mask"])
    ref, kinds = L.new_zeros(()), {"trusted": 0, "outlier": 0, "prefix": 0}
    for p in pos:
        s = torch.log_softmax(L[p], -1)[b["ids"][p]]
        d = b["teacher_lp"][p].item() - s.item()
        o = None if old is None else old[p].double()
        if prefix is not None and prefix[p]:
            kinds["prefix"] += 1
            if prefix_loss == "sampled_fkl":  # one-sample estimate of KL(p_T || p_S) on the teacher's token
                ref = ref + lambda_prefix * (b["teacher_lp"][p].double() - s)
            else:
                ref = ref + lambda_prefix * ref_fkl(L[p], b["top_ids"][p], b["top_lp"][p])
        elif min(1.0, math.exp(d)) >= tau:
            kinds["trusted"] += 1
            ref = ref + ref_pg(s, d, o, 0.2)
        else:
            kinds["outlier"] += 1
            if outlier == "clip":
                ref = ref + ref_pg(s, max(d, -clip_c), o, 0.2)
            elif outlier == "topk_fkl":
                ref = ref + lambda_out * ref_fkl(L[p], b["top_ids"][p], b["top_lp"][p])
    return ref / len(pos), L, kinds


@pytest.mark.parametrize("outlier", ["mask", "clip", "topk_fkl"])
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("stale", [False, True])
def test_tropd_matches_reference(outlier, with_prefix, stale):
    b = make_batch(6, B=3, T=8)
    prefix = (torch.arange(8) < 2).expand(3, 8) if with_prefix else None
    old = b["old_lp"] if stale else None
    kw = dict(tau=0.3, outlier=outlier, clip_c=0.5, lambda_out=0.7, lambda_prefix=1.3)
    loss, m = losses.tropd(
        b["logits"],
        b["ids"],
        b["teacher_lp"],
        b["top_ids"],
        b["top_lp"],
        b["mask"],
        prefix_mask_B_T=prefix,
        old_lp_B_T=old,
        **kw,
    )
    loss.backward()
    ref, L, kinds = ref_tropd(b, prefix, kw["tau"], outlier, kw["clip_c"], kw["lambda_out"], kw["lambda_prefix"], old)
    assert kinds["trusted"] > 0 and kinds["outlier"] > 0 and (kinds["prefix"] > 0) == with_prefix
    check(loss, b["logits"].grad, ref, L)
    onpolicy = kinds["trusted"] + kinds["outlier"]
    assert m["trust_share"] == pytest.approx(kinds["trusted"] / onpolicy)
    assert m["outlier_share"] == pytest.approx(kinds["outlier"] / onpolicy)
    assert m["prefix_share"] == pytest.approx(kinds["prefix"] / sum(kinds.values()))
    assert m["loss"] == pytest.approx(m["opd_term"] + m["outlier_term"] + m["prefix_term"], abs=1e-6)
    assert m["fkl_outlier"] > 0
    assert (m["prefix_term"] > 0) == with_prefix
    assert (m["outlier_term"] == 0) == (outlier == "mask")


@pytest.mark.parametrize("outlier", ["mask", "topk_fkl"])
@pytest.mark.parametrize("stale", [False, True])
def test_tropd_sampled_prefix_loss_matches_reference(outlier, stale):
    b = make_batch(17, B=3, T=8)
    prefix = (torch.arange(8) < 3).expand(3, 8)
    old = b["old_lp"] if stale else None
    loss, m = losses.tropd(
        b["logits"], b["ids"], b["teacher_lp"], b["top_ids"], b["top_lp"], b["mask"], prefix_mask_B_T=prefix,
        tau=0.3, outlier=outlier, lambda_prefix=0.001, prefix_loss="sampled_fkl", old_lp_B_T=old,
    )  # fmt: skip
    loss.backward()
    ref, L, kinds = ref_tropd(b, prefix, 0.3, outlier, 2.0, 1.0, 0.001, old, prefix_loss="sampled_fkl")
    assert kinds["prefix"] > 0 and kinds["outlier"] > 0
    check(loss, b["logits"].grad, ref, L)
    assert m["loss"] == pytest.approx(m["opd_term"] + m["outlier_term"] + m["prefix_term"], abs=1e-6)
    # on the prefix, the gradient is that of lambda_prefix * cross-entropy on the teacher's tokens
    only_prefix = torch.ones_like(b["mask"])
    args = (b["logits"], b["ids"], b["teacher_lp"], b["top_ids"], b["top_lp"], b["mask"])
    sampled, _ = losses.tropd(*args, prefix_mask_B_T=only_prefix, prefix_loss="sampled_fkl", lambda_prefix=0.5)
    (g_sampled,) = torch.autograd.grad(sampled, b["logits"])
    (g_ce,) = torch.autograd.grad(0.5 * losses.sft(*args[:2], b["mask"])[0], b["logits"])
    torch.testing.assert_close(g_sampled, g_ce)
    with pytest.raises(ValueError, match="nope"):
        losses.tropd(*args, prefix_loss="nope")


def test_sampled_prefix_loss_is_an_unbiased_forward_kl_estimate():
    # teacher samples y ~ p_T at one position; the mean of t - s over them is KL(p_T || p_S)
    g = torch.Generator().manual_seed(2)
    z, w = torch.randn(5, generator=g), 2 * torch.randn(5, generator=g)
    ids = torch.multinomial(torch.softmax(w, -1), 200_000, replacement=True, generator=g).view(-1, 1)
    lt, mask = torch.log_softmax(w, -1), torch.ones(len(ids), 1, dtype=torch.bool)
    top_lp, top_ids = lt.topk(2)
    loss, _ = losses.tropd(
        z.expand(len(ids), 1, -1), ids, lt[ids], top_ids.expand(len(ids), 1, -1), top_lp.expand(len(ids), 1, -1),
        mask, prefix_mask_B_T=mask, prefix_loss="sampled_fkl",
    )  # fmt: skip
    ls = torch.log_softmax(z.double(), -1)
    assert loss.item() == pytest.approx((lt.double().exp() * (lt.double() - ls)).sum().item(), abs=0.01)


def test_guidance_schedules_match_their_formulas():
    from trainer.config import load_config
    from trainer.pipeline import prefix_length, prefix_share

    share = load_config(None, ["guidance.prompt_share=0.6", "guidance.prefix_tokens=16", "guidance.decay_steps=40"])
    length = load_config(None, ["guidance.schedule=length", "guidance.prompt_share=0.6", "guidance.prefix_tokens=16",
                                "guidance.decay_steps=40"])  # fmt: skip
    for step in range(0, 50):
        assert prefix_share(share, step) == pytest.approx(0.6 * max(0.0, 1 - step / 40))
        assert prefix_length(share, step) == 16
        cosine = 16 * (1 + math.cos(math.pi * min(1.0, step / 40))) / 2  # float64
        assert prefix_length(length, step) == round(cosine)
        assert prefix_share(length, step) == (0.6 if round(cosine) > 0 else 0.0)
    assert prefix_length(length, 0) == 16 and prefix_length(length, 40) == 0 and prefix_share(length, 40) == 0
    off = load_config(None, ["guidance.schedule=length", "loss.method=opd"])
    assert prefix_share(off, 0) == 0.0  # guidance is tropd's only


def test_tropd_mask_outliers_get_no_gradient_and_teacher_zero_prob_is_safe():
    b = make_batch(7)
    b["teacher_lp"][0, 1] = -math.inf  # the teacher gives the sampled token zero probability
    for outlier in losses.OUTLIERS:
        logits = b["logits"].detach().clone().requires_grad_()
        loss, m = losses.tropd(logits, b["ids"], b["teacher_lp"], b["top_ids"], b["top_lp"], b["mask"], outlier=outlier)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        if outlier == "mask":
            assert logits.grad[0, 1].abs().max() == 0
        else:
            assert logits.grad[0, 1].abs().max() > 0
    opd_loss, _ = losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"])
    assert not torch.isfinite(opd_loss)  # what the trust region protects against


def test_tropd_all_trusted_is_opd_and_all_prefix_is_forward_kd():
    b = make_batch(8)
    args = (b["logits"], b["ids"], b["teacher_lp"], b["top_ids"], b["top_lp"], b["mask"])
    loss, m = losses.tropd(*args, tau=0.0)
    ref, _ = losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"])
    torch.testing.assert_close(loss, ref)
    assert m["trust_share"] == 1.0 and m["fkl_outlier"] == 0.0

    prefix = torch.ones_like(b["mask"])
    loss, m = losses.tropd(*args, prefix_mask_B_T=prefix, lambda_prefix=1.0)
    kl = losses.topk_forward_kl(b["logits"], b["top_ids"], b["top_lp"])
    torch.testing.assert_close(loss, kl[b["mask"]].mean())
    assert m["prefix_share"] == 1.0 and m["trust_share"] == 0.0
    loss.backward()  # forward KD on the prefix: a step lowers it
    stepped = b["logits"].detach() - 0.1 * b["logits"].grad
    assert losses.tropd(stepped, *args[1:], prefix_mask_B_T=prefix)[0] < loss


def test_tropd_stochastic_and_adaptive_rules_use_trust_mask():
    b = make_batch(9)
    args = (b["logits"], b["ids"], b["teacher_lp"], b["top_ids"], b["top_lp"], b["mask"])
    s = losses.token_logprobs(b["logits"], b["ids"])
    for rule in ["stochastic", "adaptive"]:
        _, m = losses.tropd(*args, rule=rule, quantile=0.3, generator=torch.Generator().manual_seed(1))
        want = losses.trust_mask(
            s, b["teacher_lp"], b["mask"], rule=rule, quantile=0.3, generator=torch.Generator().manual_seed(1)
        )
        assert m["trust_share"] == pytest.approx(want.sum().item() / b["mask"].sum().item())


# ---------------------------------------------------------------- eopd, reopold


@pytest.mark.parametrize("stale", [False, True])
def test_eopd_matches_reference(stale):
    b = make_batch(10, K=3)
    old = b["old_lp"] if stale else None
    threshold = 0.8
    loss, m = losses.eopd(
        b["logits"],
        b["ids"],
        b["teacher_lp"],
        b["top_ids"],
        b["top_lp"],
        b["mask"],
        entropy_threshold=threshold,
        lambda_fkl=0.6,
        old_lp_B_T=old,
    )
    loss.backward()
    L = leaf64(b["logits"])
    pos, ref, n_high = positions(b["mask"]), L.new_zeros(()), 0
    for p in pos:
        s = torch.log_softmax(L[p], -1)[b["ids"][p]]
        ref = ref + ref_pg(s, b["teacher_lp"][p].item() - s.item(), None if old is None else old[p].double(), 0.2)
        pt = [math.exp(x) for x in b["top_lp"][p].double().tolist()]
        pt.append(max(0.0, 1 - sum(pt)))
        if -sum(x * math.log(x) for x in pt if x > 0) > threshold:
            n_high += 1
            ref = ref + 0.6 * ref_fkl(L[p], b["top_ids"][p], b["top_lp"][p])
    assert 0 < n_high < len(pos)
    check(loss, b["logits"].grad, ref / len(pos), L)
    assert m["high_entropy_share"] == pytest.approx(n_high / len(pos))
    assert m["loss"] == pytest.approx(m["opd_term"] + m["fkl_term"], abs=1e-6)
    plain, _ = losses.eopd(
        *[b[k] for k in ("logits", "ids", "teacher_lp", "top_ids", "top_lp", "mask")], entropy_threshold=9
    )
    torch.testing.assert_close(plain, losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"])[0])


def test_trust_adaptive_never_trusts_acceptance_below_float32_or_zero():
    # log P = t - s: three tokens whose P underflows to 0 in float32, one with p_T = 0, two near the teacher. The
    # median of P would be 0 and trust every token; the median of log P over P > 0 trusts only the upper half.
    s = torch.zeros(1, 6)
    t = torch.tensor([[-300.0, -250.0, -200.0, -math.inf, -1.0, 0.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    got = losses.trust_mask(s, t, mask, rule="adaptive", quantile=0.5)
    assert got.tolist() == [[False, False, True, False, True, True]]
    none = losses.trust_mask(s, torch.full((1, 6), -math.inf), mask, rule="adaptive")
    assert not none.any()  # no token the teacher can produce: none trusted


def test_reopold_selects_exactly_the_share_of_tokens():
    # 0.14 * 50 = 7.000000000000001 in floating point: 7 tokens, not 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 10, 7, generator=g)
    ids = torch.randint(0, 7, (5, 10), generator=g)
    mask = torch.ones(5, 10, dtype=torch.bool)
    _, m = losses.reopold(logits, ids, torch.full((5, 10), -1.0), mask, token_share=0.14)
    assert m["selected_share"] == pytest.approx(7 / 50)


@pytest.mark.parametrize("lam,share", [(0.2, 0.5), (0.05, 1.0), (0.4, 0.3)])
@pytest.mark.parametrize("stale", [False, True])
def test_reopold_matches_reference(lam, share, stale):
    b = make_batch(11)
    b["teacher_lp"][0, 0] = -math.inf  # the teacher rejects a token: its reward is the floor, finite
    old = b["old_lp"] if stale else None
    loss, m = losses.reopold(
        b["logits"], b["ids"], b["teacher_lp"], b["mask"], floor_lambda=lam, token_share=share, old_lp_B_T=old
    )
    loss.backward()
    L = leaf64(b["logits"])
    pos = positions(b["mask"])
    entropy = {p: -(torch.softmax(L[p].detach(), -1) * torch.log_softmax(L[p].detach(), -1)).sum().item() for p in pos}
    chosen = sorted(pos, key=lambda p: -entropy[p])[: math.ceil(share * len(pos))]
    floor = math.log(lam / (1 - lam))
    ref, rewards = L.new_zeros(()), []
    for p in chosen:
        s = torch.log_softmax(L[p], -1)[b["ids"][p]]
        reward = max(b["teacher_lp"][p].item() - s.item(), floor)
        rewards.append(reward)
        ref = ref + ref_pg(s, reward, None if old is None else old[p].double(), 0.2)
    check(loss, b["logits"].grad, ref / len(chosen), L)  # a mean over the selected tokens
    assert m["selected_share"] == pytest.approx(len(chosen) / len(pos))
    assert m["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    assert m["floored_share"] == pytest.approx(sum(r == floor for r in rewards) / len(rewards))
    assert min(rewards) == floor  # some selected token is floored (at least the rejected one when chosen)


def test_reopold_refine_is_opd_and_bad_args_raise():
    b = make_batch(12)
    refine, _ = losses.reopold(b["logits"], b["ids"], b["teacher_lp"], b["mask"], refine=True)
    torch.testing.assert_close(refine, losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"])[0])
    for bad in (dict(floor_lambda=0.0), dict(floor_lambda=1.0), dict(token_share=1.5)):
        with pytest.raises(ValueError):
            losses.reopold(b["logits"], b["ids"], b["teacher_lp"], b["mask"], **bad)


def test_reopold_monte_carlo_gradient_lowers_reverse_kl():
    z, w, ids, teacher_lp, mask = categorical(seed=1)
    loss, _ = losses.reopold(z.expand(len(ids), 1, -1), ids, teacher_lp, mask, token_share=1.0)
    loss.backward()
    kl, exact = exact_reverse_kl_grad(z, w)
    assert torch.nn.functional.cosine_similarity(z.grad, exact, dim=0) > 0.5
    assert reverse_kl(z.detach() - 0.1 * z.grad, w) < kl


# ---------------------------------------------------------------- topd


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("stale", [False, True])
def test_topd_matches_reference(alpha, stale):
    b = make_batch(18)
    b["teacher_lp"][1, 0] = -math.inf  # a token the teacher rejects: reward log(1 - alpha), finite for alpha < 1
    old = b["old_lp"] if stale else None
    if alpha == 1.0:
        b["teacher_lp"][1, 0] = -3.0  # alpha = 1 is OPD: unbounded
    loss, m = losses.topd(b["logits"], b["ids"], b["teacher_lp"], b["mask"], alpha=alpha, old_lp_B_T=old)
    loss.backward()
    L = leaf64(b["logits"])
    pos = positions(b["mask"])
    ref, rewards = L.new_zeros(()), []
    for p in pos:
        s = torch.log_softmax(L[p], -1)[b["ids"][p]]
        behaviour = s.item() if old is None else old[p].item()  # the log-ratio against the sampling student
        p_t = math.exp(b["teacher_lp"][p].item())
        reward = math.log(alpha * p_t / math.exp(behaviour) + 1 - alpha)
        rewards.append(reward)
        ref = ref + ref_pg(s, reward, None if old is None else old[p].double(), 0.2)
    check(loss, b["logits"].grad, ref / len(pos), L)
    assert m["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    if alpha < 1:
        assert min(rewards) >= math.log(1 - alpha) - 1e-9
    elif old is None:  # a = 1 is OPD (stale, the reward is taken against the sampling student, OPD's against s)
        torch.testing.assert_close(loss, losses.opd(b["logits"], b["ids"], b["teacher_lp"], b["mask"])[0])
    with pytest.raises(ValueError):
        losses.topd(b["logits"], b["ids"], b["teacher_lp"], b["mask"], alpha=0.0)


def test_topd_monte_carlo_gradient_lowers_reverse_kl():
    z, w, ids, teacher_lp, mask = categorical(seed=3)
    loss, _ = losses.topd(z.expand(len(ids), 1, -1), ids, teacher_lp, mask, alpha=0.2)
    loss.backward()
    kl, exact = exact_reverse_kl_grad(z, w)
    assert torch.nn.functional.cosine_similarity(z.grad, exact, dim=0) > 0.5
    assert reverse_kl(z.detach() - 0.1 * z.grad, w) < kl


# ---------------------------------------------------------------- gkd, sft


def ref_gkd(L_V, top_ids, top_lp, beta):
    ls = torch.log_softmax(L_V, -1)
    pt = [math.exp(x) for x in top_lp.double().tolist()]
    ps = [ls[i].exp() for i in top_ids.tolist()]
    if len(top_ids) < len(L_V):
        pt.append(max(0.0, 1 - sum(pt)))
        ps.append(1 - sum(ps))
    if beta == 0:
        return sum(a * (math.log(a) - torch.log(c)) for a, c in zip(pt, ps, strict=True) if a > 0)
    if beta == 1:
        return sum(c * (torch.log(c) - math.log(a)) for a, c in zip(pt, ps, strict=True))
    out = L_V.new_zeros(())
    for a, c in zip(pt, ps, strict=True):
        mix = beta * a + (1 - beta) * c
        out = out + (1 - beta) * c * torch.log(c / mix)
        if a > 0:
            out = out + beta * a * torch.log(a / mix)
    return out


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("K", [3, 7])
def test_gkd_matches_reference(beta, K):
    b = make_batch(13, K=K)
    loss, m = losses.gkd(b["logits"], b["top_ids"], b["top_lp"], b["mask"], beta=beta)
    loss.backward()
    L = leaf64(b["logits"])
    pos = positions(b["mask"])
    ref = sum(ref_gkd(L[p], b["top_ids"][p], b["top_lp"][p], beta) for p in pos) / len(pos)
    check(loss, b["logits"].grad, ref, L)
    assert loss > 0 and m["loss"] == pytest.approx(loss.item())
    stepped = b["logits"].detach() - 0.1 * b["logits"].grad
    assert losses.gkd(stepped, b["top_ids"], b["top_lp"], b["mask"], beta=beta)[0] < loss


def test_gkd_endpoints_are_limits_of_normalised_jsd():
    b = make_batch(14)
    args = (b["logits"], b["top_ids"], b["top_lp"], b["mask"])
    eps = 1e-3
    fwd, rev = losses.gkd(*args, beta=0.0)[0], losses.gkd(*args, beta=1.0)[0]
    assert losses.gkd(*args, beta=eps)[1]["loss"] / eps == pytest.approx(fwd.item(), rel=2e-2)
    assert losses.gkd(*args, beta=1 - eps)[1]["loss"] / eps == pytest.approx(rev.item(), rel=2e-2)
    kl = losses.topk_forward_kl(*args[:3])
    torch.testing.assert_close(fwd, kl[b["mask"]].mean())


def test_sft_matches_reference():
    b = make_batch(15)
    loss, m = losses.sft(b["logits"], b["ids"], b["mask"])
    loss.backward()
    L = leaf64(b["logits"])
    pos = positions(b["mask"])
    ref = sum(-torch.log_softmax(L[p], -1)[b["ids"][p]] for p in pos) / len(pos)
    check(loss, b["logits"].grad, ref, L)
    hits = sum(int(L[p].argmax() == b["ids"][p]) for p in pos)
    assert m["token_accuracy"] == pytest.approx(hits / len(pos))
    stepped = b["logits"].detach() - 0.1 * b["logits"].grad
    assert losses.sft(stepped, b["ids"], b["mask"])[0] < loss


# ---------------------------------------------------------------- every loss


def all_losses(b, mask):
    args = (b["logits"], b["ids"], b["teacher_lp"])
    tops = (b["top_ids"], b["top_lp"])
    yield losses.opd(*args, mask, old_lp_B_T=b["old_lp"], discount=0.5)
    for outlier in losses.OUTLIERS:
        yield losses.tropd(*args, *tops, mask, prefix_mask_B_T=torch.ones_like(mask), outlier=outlier)
        yield losses.tropd(*args, *tops, mask, rule="adaptive", outlier=outlier, old_lp_B_T=b["old_lp"])
    yield losses.eopd(*args, *tops, mask, entropy_threshold=0.0, old_lp_B_T=b["old_lp"])
    yield losses.reopold(*args, mask, old_lp_B_T=b["old_lp"])
    yield losses.topd(*args, mask, old_lp_B_T=b["old_lp"])
    yield losses.tropd(*args, *tops, mask, prefix_mask_B_T=torch.ones_like(mask), prefix_loss="sampled_fkl")
    yield losses.gkd(b["logits"], *tops, mask)
    yield losses.sft(b["logits"], b["ids"], mask)


def test_padding_never_leaks_and_empty_mask_is_zero():
    b = make_batch(16)
    b["top_lp"] = b["top_lp"].masked_fill(~b["mask"].unsqueeze(-1), float("nan"))
    b["old_lp"] = b["old_lp"].masked_fill(~b["mask"], float("inf"))
    for loss, metrics in all_losses(b, b["mask"]):
        (grad,) = torch.autograd.grad(loss, b["logits"])
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[~b["mask"]].abs().max() == 0
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    empty = torch.zeros_like(b["mask"])
    for loss, metrics in all_losses(b, empty):
        (grad,) = torch.autograd.grad(loss, b["logits"], allow_unused=True)
        assert loss.item() == 0 and (grad is None or grad.abs().max() == 0)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
