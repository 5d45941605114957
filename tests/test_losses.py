"""Losses against plain reference formulas and torch built-ins, on random tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernelkit.model.losses import (
    LOSSES,
    asl_loss,
    bce_loss,
    bce_sum_loss,
    ce_loss,
    class_balanced_weights,
    complement_entropy,
    complement_loss,
    focal_loss,
    get_loss,
)

MULTILABEL_LOSSES = ["bce", "bce_sum", "focal", "asl"]
MULTICLASS_LOSSES = ["ce", "complement"]


def multilabel_batch(seed=0, n=12, c=7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    targets = (torch.rand(n, c, generator=g) < 0.3).double()
    return logits.float(), targets.float(), torch.ones(n)


def multiclass_batch(seed=0, n=12, c=6, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randint(0, c, (n,), generator=g), torch.ones(n)


# ----------------------------------------------------------------------------- reference formulas

@pytest.mark.parametrize("seed", range(3))
def test_bce_and_bce_sum_match_torch(seed):
    x, y, w = multilabel_batch(seed)
    ref = F.binary_cross_entropy_with_logits(x, y)
    assert torch.allclose(bce_loss(x, y, w), ref, atol=1e-6)
    assert torch.allclose(bce_sum_loss(x, y, w), ref * x.shape[1], atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_bce_sum_with_clamp_is_the_helsinki_formula(seed):
    x, y, w = multilabel_batch(seed)
    s = 0.99 * torch.sigmoid(x.double()) + 0.005  # the seed's s(y) = 0.99 y + 0.005
    ref = -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).sum(1).mean()
    assert bce_sum_loss(x, y, w, eps=0.005).item() == pytest.approx(ref.item(), rel=1e-5)
    # The clamp bounds one label's cost by -log(0.005), even for a confidently wrong logit.
    worst = bce_sum_loss(torch.tensor([[-100.0]]), torch.ones(1, 1), torch.ones(1), eps=0.005)
    assert worst.item() == pytest.approx(-math.log(0.005), rel=1e-4)


def focal_reference(x, y, gamma, alpha=None):
    """The iMet seed's formula, in float64: -(1 - p_t)^gamma log p_t (times alpha_t)."""
    p = torch.sigmoid(x.double())
    pt = p * y + (1 - p) * (1 - y)
    loss = -(1 - pt) ** gamma * torch.log(pt)
    if alpha is not None:
        loss = loss * (alpha * y + (1 - alpha) * (1 - y))
    return loss


@pytest.mark.parametrize("gamma,alpha", [(0.0, None), (0.5, None), (2.0, None), (2.0, 0.25), (1.0, 0.75)])
def test_focal_matches_reference(gamma, alpha):
    x, y, w = multilabel_batch(1)
    ref = focal_reference(x, y, gamma, alpha)
    assert focal_loss(x, y, w, gamma, alpha).item() == pytest.approx(ref.mean().item(), rel=1e-5)
    assert focal_loss(x, y, w, gamma, alpha, reduce="sum").item() == pytest.approx(ref.sum(1).mean().item(), rel=1e-5)


def test_focal_with_gamma_0_is_bce():
    x, y, w = multilabel_batch(2)
    assert torch.allclose(focal_loss(x, y, w, gamma=0.0), bce_loss(x, y, w), atol=1e-7)
    assert torch.allclose(focal_loss(x, y, w, gamma=0.0, reduce="sum"), bce_sum_loss(x, y, w), atol=1e-6)


def asl_reference(x, y, gamma_pos, gamma_neg, clip, eps=1e-8):
    """Transcribed from Ridnik et al.'s AsymmetricLoss.forward (before its final -sum), in float64."""
    xs_pos = torch.sigmoid(x.double())
    xs_neg = 1 - xs_pos
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -loss


@pytest.mark.parametrize("gp,gn,clip", [(0, 4, 0.05), (1, 4, 0.05), (0, 2, 0.0), (2, 2, 0.1), (0, 0, 0.0)])
def test_asl_matches_the_papers_code(gp, gn, clip):
    x, y, w = multilabel_batch(3, scale=2.0)  # moderate logits: the reference clamps at 1e-8
    ref = asl_reference(x, y, gp, gn, clip)
    assert asl_loss(x, y, w, gp, gn, clip).item() == pytest.approx(ref.mean().item(), rel=1e-5)
    assert asl_loss(x, y, w, gp, gn, clip, reduce="sum").item() == pytest.approx(ref.sum(1).mean().item(), rel=1e-5)


def test_asl_special_cases_are_bce_and_focal():
    x, y, w = multilabel_batch(4)
    assert torch.allclose(asl_loss(x, y, w, 0.0, 0.0, 0.0), bce_loss(x, y, w), atol=1e-7)
    assert torch.allclose(asl_loss(x, y, w, 2.0, 2.0, 0.0), focal_loss(x, y, w, 2.0), atol=1e-7)
    # Negatives below the clip margin cost nothing at all.
    easy_neg = asl_loss(torch.full((2, 3), -10.0), torch.zeros(2, 3), torch.ones(2), clip=0.05)
    assert easy_neg.item() == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_ce_matches_torch_and_label_smoothing(seed):
    x, t, w = multiclass_batch(seed)
    assert torch.allclose(ce_loss(x, t, w), F.cross_entropy(x, t), atol=1e-6)
    assert torch.allclose(ce_loss(x, t, w, label_smoothing=0.0), ce_loss(x, t, w))
    eps, logp = 0.1, torch.log_softmax(x.double(), 1)
    ref = (1 - eps) * -logp.gather(1, t[:, None]).squeeze(1) + eps * -logp.mean(1)
    assert ce_loss(x, t, w, label_smoothing=eps).item() == pytest.approx(ref.mean().item(), rel=1e-5)


def complement_entropy_reference(x, t):
    """COT's formula step by step: q_j = p_j / (1 - p_g) over j != g, entropy / log(C - 1)."""
    p = torch.softmax(x.double(), 1)
    pg = p.gather(1, t[:, None])
    q = p / (1 - pg)
    mask = torch.ones_like(p).scatter_(1, t[:, None], 0.0)
    return -(q * torch.log(q) * mask).sum(1) / math.log(x.shape[1] - 1)


@pytest.mark.parametrize("seed", range(3))
def test_complement_loss_is_ce_minus_normalised_complement_entropy(seed):
    x, t, w = multiclass_batch(seed, scale=2.0)
    ent = complement_entropy_reference(x, t)
    assert torch.allclose(complement_entropy(x, t).double(), ent, atol=1e-5)
    ref = F.cross_entropy(x.double(), t) - 0.5 * ent.mean()
    assert complement_loss(x, t, w, coef=0.5).item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(complement_loss(x, t, w, coef=0.0), ce_loss(x, t, w), atol=1e-7)


def test_complement_entropy_is_1_for_flat_wrong_classes_and_finite_when_saturated():
    x = torch.tensor([[5.0, 1.0, 1.0, 1.0]])
    assert complement_entropy(x, torch.tensor([0])).item() == pytest.approx(1.0, abs=1e-6)
    x = torch.tensor([[80.0, -80.0, 0.0, 3.0]], requires_grad=True)  # p_target rounds to 1
    loss = complement_loss(x, torch.tensor([0]), torch.ones(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="3 classes"):
        complement_entropy(torch.zeros(1, 2), torch.tensor([0]))


# ----------------------------------------------------------------------------- class-balanced weights

def test_class_balanced_weights_follow_the_effective_number():
    counts = [1000, 100, 10, 1]
    w = class_balanced_weights(counts, beta=0.99)
    raw = torch.tensor([(1 - 0.99) / (1 - 0.99 ** n) for n in counts])
    assert torch.allclose(w, raw * 4 / raw.sum(), rtol=1e-6)
    assert w.sum().item() == pytest.approx(4.0) and (w[:-1] < w[1:]).all()
    assert torch.allclose(class_balanced_weights(counts, beta=0.0), torch.ones(4))
    assert torch.isfinite(class_balanced_weights([5, 0, 2])).all()  # an empty class does not give inf
    with pytest.raises(ValueError):
        class_balanced_weights(counts, beta=1.0)


def test_class_weights_in_ce_bce_and_focal():
    x, t, w = multiclass_batch(5)
    cw = torch.rand(x.shape[1]) + 0.5
    ref = (F.cross_entropy(x, t, reduction="none") * cw[t]).mean()
    assert torch.allclose(ce_loss(x, t, w, class_weights=cw), ref, atol=1e-6)
    x, y, w = multilabel_batch(5)
    cw = torch.rand(x.shape[1]) + 0.5
    per_label = F.binary_cross_entropy_with_logits(x, y, reduction="none") * cw
    assert torch.allclose(bce_loss(x, y, w, class_weights=cw), per_label.mean(), atol=1e-6)
    assert torch.allclose(bce_sum_loss(x, y, w, class_weights=cw), per_label.sum(1).mean(), atol=1e-5)
    assert torch.allclose(focal_loss(x, y, w, 0.0, class_weights=cw), per_label.mean(), atol=1e-6)
    # get_loss builds the weights from counts.
    counts = list(range(1, x.shape[1] + 1))
    fn = get_loss("focal", "multilabel", class_counts=counts, cb_beta=0.9, gamma=0.0)
    assert torch.allclose(fn(x, y, w), bce_loss(x, y, w, class_weights=class_balanced_weights(counts, 0.9)))


# ----------------------------------------------------------------------------- weights, gradients, selection

def all_losses():
    """(name, task, loss_fn, batch) for every loss, with non-default parameters where they exist."""
    out = []
    for name in MULTILABEL_LOSSES:
        params = {"bce_sum": {"eps": 0.005}, "focal": {"gamma": 2.0, "alpha": 0.25}}.get(name, {})
        out.append((name, get_loss(name, "multilabel", **params), multilabel_batch(6)))
    for name in MULTICLASS_LOSSES:
        out.append((name, get_loss(name, "multiclass", label_smoothing=0.1), multiclass_batch(6)))
    return out


@pytest.mark.parametrize("name,fn,batch", all_losses(), ids=lambda v: v if isinstance(v, str) else "")
def test_weight_zero_samples_do_not_contribute(name, fn, batch):
    x, y, _ = batch
    w = torch.ones(len(x))
    w[::3] = 0.0
    x2, y2 = x.clone(), y.clone()
    x2[::3] = torch.randn_like(x2[::3]) * 10  # what an unreadable image gives: anything
    if y.ndim == 2:
        y2[::3] = 1 - y2[::3]
    else:
        y2[::3] = (y2[::3] + 1) % x.shape[1]
    kept = w.bool()
    assert torch.allclose(fn(x, y, w), fn(x2, y2, w), atol=1e-6)
    assert torch.allclose(fn(x, y, w), fn(x[kept], y[kept], torch.ones(int(kept.sum()))), atol=1e-6)
    xg = x.clone().requires_grad_(True)
    fn(xg, y, w).backward()
    assert (xg.grad[::3] == 0).all() and xg.grad[1].abs().sum() > 0
    assert fn(x, y, torch.zeros(len(x))).item() == 0.0  # all unreadable: 0, not NaN


@pytest.mark.parametrize("name,fn,batch", all_losses(), ids=lambda v: v if isinstance(v, str) else "")
def test_gradients_flow_and_stay_finite_for_extreme_and_half_precision_logits(name, fn, batch):
    x, y, w = batch
    for logits in (x, x * 40, x.half(), x.bfloat16()):  # saturated sigmoid/softmax; AMP outputs
        leaf = logits.detach().clone().requires_grad_(True)
        loss = fn(leaf, y, w)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(leaf.grad.float()).all() and leaf.grad.float().abs().sum() > 0


def test_fractional_gamma_keeps_gradients_finite_where_p_t_rounds_to_1():
    x = torch.tensor([[30.0, -30.0, 0.5]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0]])
    for loss in (focal_loss(x, y, torch.ones(1), gamma=0.5), asl_loss(x, y, torch.ones(1), 0.5, 0.5, 0.05)):
        x.grad = None
        loss.backward()
        assert torch.isfinite(x.grad).all()


def test_a_loss_decreases_when_trained():
    torch.manual_seed(0)
    x, y, w = multilabel_batch(7)
    for name in MULTILABEL_LOSSES:
        logits = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.SGD([logits], lr=1.0)
        fn = get_loss(name, "multilabel")
        first = fn(logits, y, w).item()
        for _ in range(50):
            opt.zero_grad()
            fn(logits, y, w).backward()
            opt.step()
        assert fn(logits, y, w).item() < first, name
        assert ((logits > 0) == y.bool()).float().mean() > 0.95, name


def test_get_loss_selects_binds_and_refuses():
    assert get_loss("auto", "multilabel") is bce_loss and get_loss("auto", "multiclass") is ce_loss
    assert get_loss("bce", "multilabel") is bce_loss and get_loss("ce", "multiclass") is ce_loss
    assert set(LOSSES) == set(MULTILABEL_LOSSES + MULTICLASS_LOSSES)
    x, t, w = multiclass_batch(8)
    assert torch.allclose(get_loss("ce", "multiclass", label_smoothing=0.2)(x, t, w),
                          ce_loss(x, t, w, label_smoothing=0.2))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge", "multilabel")
    with pytest.raises(ValueError, match="does not fit a multilabel task"):
        get_loss("ce", "multilabel")
    with pytest.raises(ValueError, match="does not fit a multiclass task"):
        get_loss("focal", "multiclass")
    with pytest.raises(ValueError, match="does not fit a multiclass task"):
        get_loss("bce", "multiclass")
    with pytest.raises(ValueError, match="unknown task"):
        get_loss("bce", "regression")
    with pytest.raises(ValueError, match="unknown parameters \\['gama'\\]"):
        get_loss("focal", "multilabel", gama=2.0)
    with pytest.raises(ValueError, match="class-balanced"):
        get_loss("asl", "multilabel", class_counts=[1, 2, 3])
    with pytest.raises(ValueError, match="not both"):
        get_loss("ce", "multiclass", class_counts=[1, 2], class_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="reduce"):
        get_loss("focal", "multilabel", reduce="max")(*multilabel_batch(0))
