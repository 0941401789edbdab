import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_scan
from timm_scan import MultiExitOutput, SelfDistillationLoss
from timm_scan.training.losses import PRESETS, hint, soft_kl

T = 3.0


def outputs(k=4, batch=6, classes=5, dim=8, requires_grad=False):
    logits = [torch.randn(batch, classes, requires_grad=requires_grad) for _ in range(k)]
    features = [torch.randn(batch, dim, requires_grad=requires_grad) for _ in range(k)]
    return MultiExitOutput(logits, features), torch.randint(0, classes, (batch,))


def test_without_distillation_it_is_the_cross_entropy_of_every_exit():
    out, y = outputs()
    ce = torch.stack([F.cross_entropy(z, y) for z in out.logits])
    summed = SelfDistillationLoss(alpha=0.0, lam=0.0, exit_reduction="sum")(out, y)
    torch.testing.assert_close(summed.total, ce.sum())
    averaged = SelfDistillationLoss(alpha=0.0, lam=0.0, exit_reduction="mean")(out, y)
    torch.testing.assert_close(averaged.total, ce.mean())
    shallow_mean = SelfDistillationLoss(alpha=0.0, lam=0.0, exit_reduction="shallow-mean")(out, y)
    torch.testing.assert_close(shallow_mean.total, ce[-1] + ce[:-1].mean())


def test_one_exit_is_plain_cross_entropy():
    out, y = outputs(k=1)
    for preset in PRESETS:
        for teacher in ("deepest", "ensemble", "transitive", "dense"):
            loss = SelfDistillationLoss.from_preset(preset, teacher=teacher)(out, y)
            torch.testing.assert_close(loss.total, F.cross_entropy(out.logits[0], y))


def test_kl_of_a_distribution_with_itself_is_zero():
    z = torch.randn(4, 7)
    assert soft_kl(z, F.softmax(z / T, -1), T).abs() < 1e-6


def tpami_reference(out, y, alpha, lam, refs):
    """TPAMI eq. 3-5 written out with explicit per-exit reference sets: 1/K, T²·KL, summed squared hint."""
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


@pytest.mark.parametrize("teacher", ["deepest", "transitive", "ensemble"])
def test_tpami_preset_is_the_paper_equation(teacher):
    out, y = outputs()
    k = 4
    probs = [F.softmax(z / T, -1) for z in out.logits]
    if teacher == "ensemble":
        ens_p, ens_f = torch.stack(probs).mean(0), torch.stack(out.features).mean(0)
        refs = [{"probs": [ens_p], "feats": [ens_f]} for _ in range(k - 1)]
    else:
        source = {"deepest": lambda i: k - 1, "transitive": lambda i: i + 1}[teacher]
        refs = [{"probs": [probs[source(i)]], "feats": [out.features[source(i)]]} for i in range(k - 1)]
    refs.append(None)
    loss = SelfDistillationLoss.from_preset("tpami", teacher=teacher)(out, y)
    torch.testing.assert_close(loss.total, tpami_reference(out, y, 0.6, 0.04, refs))
    assert loss.kd[-1] == 0 and loss.hint[-1] == 0
    assert all(v > 0 for v in loss.kd[:-1] + loss.hint[:-1])


def test_dense_teacher_sums_over_deeper_exits_as_eq_6():
    out, y = outputs()
    loss = SelfDistillationLoss(alpha=0.5, lam=0.1, teacher="dense", exit_reduction="sum")(out, y)
    probs = [F.softmax(z / T, -1) for z in out.logits]
    for i in range(3):
        kd = sum(soft_kl(out.logits[i], probs[j], T) for j in range(i + 1, 4))
        hn = sum(((out.features[i] - out.features[j]) ** 2).mean(-1).mean() for j in range(i + 1, 4))
        torch.testing.assert_close(loss.kd[i], kd)
        torch.testing.assert_close(loss.hint[i], hn)


def released_code_loss(out, y, projections=None):
    """The loss of the authors' released training loop (pytorch-self-distillation-final, train.py),
    transcribed: their model returns exits deepest first; soft cross-entropy without T²; the hint
    `torch.dist` of the adapted feature, skipped for ``index == 1``; everything summed."""
    outputs = out.logits[::-1]
    outputs_feature = out.features[::-1]

    def cross_entropy(outputs, targets):
        log_softmax_outputs = F.log_softmax(outputs / T, dim=1)
        softmax_targets = F.softmax(targets / T, dim=1)
        return -(log_softmax_outputs * softmax_targets).sum(dim=1).mean()

    loss = F.cross_entropy(outputs[0], y)
    teacher_output = outputs[0].detach()
    teacher_feature = outputs_feature[0].detach()
    for index in range(1, len(outputs)):
        loss += cross_entropy(outputs[index], teacher_output) * 0.3
        loss += F.cross_entropy(outputs[index], y) * (1 - 0.3)
        if index != 1:
            loss += torch.dist(outputs_feature[index], teacher_feature) * 0.03
    return loss


def test_released_preset_has_the_gradient_of_the_authors_code():
    out, y = outputs(requires_grad=True)
    ours = SelfDistillationLoss.from_preset("released")(out, y).total
    theirs = released_code_loss(out, y)
    tensors = [*out.logits, *out.features]
    for t, a, b in zip(tensors, torch.autograd.grad(ours, tensors, allow_unused=True),
                       torch.autograd.grad(theirs, tensors, allow_unused=True)):
        zero = torch.zeros_like(t)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b)
    assert torch.autograd.grad(theirs, out.features[2], allow_unused=True)[0] is None  # exit 3 of 4 has no hint
    # same value up to the teacher's entropy (KL = soft cross-entropy − H(teacher)), per shallow exit
    p = F.softmax(out.logits[-1].detach() / T, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(ours + 3 * 0.3 * entropy, theirs)


def test_hint_reductions():
    out, y = outputs(dim=8)
    summed = SelfDistillationLoss(alpha=0.0, lam=1.0, hint_reduction="sum")(out, y)
    mean = SelfDistillationLoss(alpha=0.0, lam=1.0, hint_reduction="mean")(out, y)
    dist = SelfDistillationLoss(alpha=0.0, lam=1.0, hint_reduction="dist")(out, y)
    torch.testing.assert_close(torch.stack(summed.hint), 8 * torch.stack(mean.hint))
    torch.testing.assert_close(dist.hint[0], torch.dist(out.features[0], out.features[-1]))


def test_references_are_detached():
    out, y = outputs(requires_grad=True)
    loss = SelfDistillationLoss(alpha=0.9, lam=0.5)(out, y)
    grad_deepest_logits, grad_deepest_feature = torch.autograd.grad(
        loss.total, [out.logits[-1], out.features[-1]], retain_graph=True, allow_unused=True
    )
    ce_only = torch.autograd.grad(F.cross_entropy(out.logits[-1], y), out.logits[-1])[0]
    torch.testing.assert_close(grad_deepest_logits, ce_only)  # the deepest learns from labels only
    assert grad_deepest_feature is None  # the deepest feature is only ever a (detached) reference
    grads = torch.autograd.grad(loss.total, [out.logits[0], out.features[0]])
    assert all(g.abs().sum() > 0 for g in grads)  # the students do learn from their teacher


@pytest.mark.parametrize("exit_reduction, scale", [("sum", 1.0), ("mean", 0.25), ("shallow-mean", 1.0)])
def test_deepest_classifier_gets_the_gradient_of_plain_training(exit_reduction, scale):
    """On a real model in train mode: the layers only the deepest classifier uses (resnet's layer4
    and fc) get exactly plain training's gradient when summing over exits or adding the shallow exits'
    mean, 1/K of it when averaging."""
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=10)
    plain = copy.deepcopy(backbone).train()
    model = timm_scan.wrap(backbone, check_input_size=(3, 32, 32)).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(plain(x), y).backward()
    SelfDistillationLoss(alpha=0.5, lam=0.1, exit_reduction=exit_reduction)(model(x), y).total.backward()
    for (name, p), q in zip(model.backbone.named_parameters(), plain.parameters()):
        if name.startswith(("layer4", "fc")):
            torch.testing.assert_close(p.grad, scale * q.grad, rtol=1e-4, atol=1e-6)


def test_the_learned_projection_lets_the_hint_reach_zero_on_signed_features():
    """ConvNeXt's pre-logits are signed; an exit's pooled feature (after a ReLU) is not. Through its
    learned projection the hint can still go to zero (it could not through an identity)."""
    model = timm_scan.wrap(timm.create_model("convnext_atto", num_classes=10), check_input_size=(3, 32, 32)).eval()
    with torch.no_grad():
        target = model(torch.randn(4, 3, 32, 32)).features[-1]  # the pre-logits, the hint's reference
    head = model.exits[0]
    pooled = F.relu(torch.randn(4, head.fc.in_features))  # a shallow exit's pooled feature, after a ReLU
    assert (target < 0).any()
    assert isinstance(head.proj, torch.nn.Linear) and head.proj.out_features == target.shape[-1]
    with torch.no_grad():  # the best linear map, by least squares
        solution = torch.linalg.lstsq(torch.cat([pooled, torch.ones(4, 1)], 1), target).solution
        head.proj.weight.copy_(solution[:-1].T)
        head.proj.bias.copy_(solution[-1])
        reached = hint(head.proj(pooled), target, "mean")
    floor = F.relu(-target).pow(2).mean()  # the least an identity map of a non-negative feature can reach
    assert reached < 1e-3 * floor


def test_external_teacher_replaces_the_label_term():
    out, y = outputs()
    teacher_logits = torch.randn(6, 5)
    loss = SelfDistillationLoss(alpha=0.0, lam=0.0, external_weight=1.0, exit_reduction="sum")(out, y, teacher_logits)
    target = F.softmax(teacher_logits / T, -1)
    expected = torch.stack([soft_kl(z, target, T) for z in out.logits]).sum()
    torch.testing.assert_close(loss.total, expected)
    mixed = SelfDistillationLoss(alpha=0.6, lam=0.04, external_weight=0.5)(out, y, teacher_logits)
    plain = SelfDistillationLoss(alpha=0.6, lam=0.04)(out, y)
    assert not torch.isclose(mixed.total, plain.total)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"alpha": 1.5}, "alpha"), ({"lam": -1}, "lam"), ({"lam": float("nan")}, "lam"), ({"temperature": 0}, "temperature"),
     ({"teacher": "oracle"}, "teacher"), ({"external_weight": 2}, "external_weight"),
     ({"hint_reduction": "max"}, "hint_reduction"), ({"exit_reduction": "max"}, "exit_reduction")],
)
def test_invalid_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SelfDistillationLoss(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown loss preset 'paper'.*released"):
        SelfDistillationLoss.from_preset("paper")
