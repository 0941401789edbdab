import pytest
import torch
import torch.nn.functional as F

from timm_scan import MultiExitOutput, SelfDistillationLoss
from timm_scan.losses import soft_kl

T = 3.0


def outputs(k=4, batch=6, classes=5, dim=8, requires_grad=False):
    logits = [torch.randn(batch, classes, requires_grad=requires_grad) for _ in range(k)]
    features = [torch.randn(batch, dim, requires_grad=requires_grad) for _ in range(k)]
    return MultiExitOutput(logits, features), torch.randint(0, classes, (batch,))


def test_without_distillation_it_is_the_mean_cross_entropy():
    out, y = outputs()
    loss = SelfDistillationLoss(alpha=0.0, lam=0.0)(out, y)
    expected = torch.stack([F.cross_entropy(z, y) for z in out.logits]).mean()
    torch.testing.assert_close(loss.total, expected)


def test_one_exit_is_plain_cross_entropy():
    out, y = outputs(k=1)
    for teacher in ("deepest", "ensemble", "transitive", "dense"):
        loss = SelfDistillationLoss(alpha=0.6, lam=0.04, teacher=teacher)(out, y)
        torch.testing.assert_close(loss.total, F.cross_entropy(out.logits[0], y))


def test_kl_of_a_distribution_with_itself_is_zero():
    z = torch.randn(4, 7)
    assert soft_kl(z, F.softmax(z / T, -1), T).abs() < 1e-6


def reference_total(out, y, alpha, lam, refs):
    """Direct transcription of TPAMI eq. 3-5 with explicit per-exit reference sets."""
    k = len(out.logits)
    total = 0.0
    for i in range(k):
        ce = F.cross_entropy(out.logits[i], y)
        if not refs[i]:
            total = total + ce
            continue
        kd = sum(
            T**2 * F.kl_div(F.log_softmax(out.logits[i] / T, -1), t, reduction="batchmean") for t in refs[i]["probs"]
        ) / len(refs[i]["probs"])
        hint = sum(((out.features[i] - f) ** 2).sum(-1).mean() for f in refs[i]["feats"]) / len(refs[i]["feats"])
        total = total + (1 - alpha) * ce + alpha * kd + lam * hint
    return total / k


@pytest.mark.parametrize("teacher", ["deepest", "transitive", "dense", "ensemble"])
def test_teacher_paths_match_the_paper(teacher):
    out, y = outputs()
    k = 4
    probs = [F.softmax(z / T, -1) for z in out.logits]
    if teacher == "ensemble":
        ens_p, ens_f = torch.stack(probs).mean(0), torch.stack(out.features).mean(0)
        refs = [{"probs": [ens_p], "feats": [ens_f]} for _ in range(k - 1)]
    else:
        sources = {
            "deepest": lambda i: [k - 1],
            "transitive": lambda i: [i + 1],
            "dense": lambda i: list(range(i + 1, k)),
        }[teacher]
        refs = [{"probs": [probs[j] for j in sources(i)], "feats": [out.features[j] for j in sources(i)]} for i in range(k - 1)]
    refs.append(None)
    loss = SelfDistillationLoss(alpha=0.6, lam=0.04, temperature=T, teacher=teacher)(out, y)
    torch.testing.assert_close(loss.total, reference_total(out, y, 0.6, 0.04, refs))
    assert loss.kd[-1] == 0 and loss.hint[-1] == 0
    assert all(v > 0 for v in loss.kd[:-1] + loss.hint[:-1])


def test_hint_mean_is_the_sum_over_the_width():
    out, y = outputs(dim=8)
    total = SelfDistillationLoss(alpha=0.0, lam=1.0, hint_reduction="sum")(out, y)
    mean = SelfDistillationLoss(alpha=0.0, lam=1.0, hint_reduction="mean")(out, y)
    torch.testing.assert_close(torch.stack(total.hint), 8 * torch.stack(mean.hint))


def test_references_are_detached():
    out, y = outputs(requires_grad=True)
    loss = SelfDistillationLoss(alpha=0.9, lam=0.5)(out, y)
    grad_deepest_logits, grad_deepest_feature = torch.autograd.grad(
        loss.total, [out.logits[-1], out.features[-1]], retain_graph=True, allow_unused=True
    )
    ce_only = torch.autograd.grad(F.cross_entropy(out.logits[-1], y) / 4, out.logits[-1])[0]
    torch.testing.assert_close(grad_deepest_logits, ce_only)  # the deepest learns from labels only
    assert grad_deepest_feature is None  # the deepest feature is only ever a (detached) reference
    grads = torch.autograd.grad(loss.total, [out.logits[0], out.features[0]])
    assert all(g.abs().sum() > 0 for g in grads)  # the students do learn from their teacher


def test_external_teacher_replaces_the_label_term():
    out, y = outputs()
    teacher_logits = torch.randn(6, 5)
    loss = SelfDistillationLoss(alpha=0.0, lam=0.0, external_weight=1.0)(out, y, teacher_logits)
    target = F.softmax(teacher_logits / T, -1)
    expected = torch.stack([soft_kl(z, target, T) for z in out.logits]).mean()
    torch.testing.assert_close(loss.total, expected)
    mixed = SelfDistillationLoss(alpha=0.6, lam=0.04, external_weight=0.5)(out, y, teacher_logits)
    plain = SelfDistillationLoss(alpha=0.6, lam=0.04)(out, y)
    assert not torch.isclose(mixed.total, plain.total)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"alpha": 1.5}, "alpha"), ({"lam": -1}, "lam"), ({"temperature": 0}, "temperature"),
     ({"teacher": "oracle"}, "teacher"), ({"external_weight": 2}, "external_weight"),
     ({"hint_reduction": "max"}, "hint_reduction")],
)
def test_invalid_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SelfDistillationLoss(**kwargs)


def test_loss_trains_a_wrapped_model():
    import timm

    import timm_scan

    model = timm_scan.wrap(timm.create_model("test_resnet", num_classes=5), check_input_size=(3, 32, 32))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    loss = SelfDistillationLoss()(model(x), y)
    loss.total.backward()
    assert all(p.grad is not None for p in model.exits.parameters())
