import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import create
from families import FAMILIES

import timm_scan
from timm_scan import ScanConfig
from timm_scan.model.backbone import default_exit_indices
from timm_scan.model.runner import Stage
from timm_scan.model import count_macs
from timm_scan.model.heads import align_plan, head_macs


def wrap(name, size, config=None, **kwargs):
    backbone = create(name, **kwargs).eval()
    return backbone, timm_scan.wrap(backbone, config, check_input_size=(3, size, size))


@pytest.mark.parametrize("name, size", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_family_deepest_exit_equals_backbone(name, size):
    backbone, model = wrap(name, size)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        out = model(x)
        reference = backbone(x)
    assert model.num_exits == 4 == len(out.logits) == len(out.features)
    assert torch.equal(out.logits[-1], reference)
    feature_dim = out.features[-1].shape[-1]
    for logits, feature in zip(out.logits, out.features):
        assert logits.shape == (3, 10)
        assert feature.shape == (3, feature_dim)
    macs = model.exit_macs((3, size, size))
    assert all(a < b for a, b in zip(macs, macs[1:]))


@pytest.mark.parametrize("name, size, kwargs", [
    ("resnet18", 32, {}),
    ("cait_xxs24_224", 64, dict(img_size=64, depth=4)),  # the traced runner: a class token added halfway
])
def test_staged_subsets_equal_full_run(name, size, kwargs):
    """Run section by section, keeping only some samples after each exit, as early exit does."""
    _, model = wrap(name, size, **kwargs)
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        full = model(x).logits
        keep = torch.arange(8)
        h = x
        for k in range(model.num_exits):
            h = model.forward_section(k, h)
            logits = model.exit_logits(k, h, (size, size))
            torch.testing.assert_close(logits, full[k][keep], rtol=1e-5, atol=1e-5)
            half = torch.arange(len(keep)) % 2 == 1  # half the batch goes on
            h, keep = h[half], keep[half]
    assert len(keep) == 0


def test_vit_staged_subsets_equal_full_run():
    _, model = wrap("test_vit", 160)
    x = torch.randn(4, 3, 160, 160)
    with torch.no_grad():
        full = model(x).logits
        h = model.forward_section(0, x)[2:]
        for k in range(1, model.num_exits):
            h = model.forward_section(k, h)
        torch.testing.assert_close(model.exit_logits(model.num_exits - 1, h, (160, 160)), full[-1][2:])


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("mobilenetv3_large_100", 32), ("test_vit", 160)])
def test_train_mode_is_the_same_computation(name, size):
    """Same seed, same numbers as the backbone in train mode, dropout, drop path and BN statistics
    included (the traced runner: tests/test_traced.py)."""
    backbone = create(name, drop_rate=0.5, drop_path_rate=0.2)
    reference = copy.deepcopy(backbone)
    model = timm_scan.wrap(backbone, check_input_size=(3, size, size))
    assert model.training and backbone.training
    x = torch.randn(4, 3, size, size)
    torch.manual_seed(1)
    expected = reference(x)
    torch.manual_seed(1)
    got = model(x).logits[-1]
    assert torch.equal(got, expected)
    for a, b in zip(backbone.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_wrap_leaves_backbone_untouched():
    backbone = create("resnet18").eval()
    before = copy.deepcopy(backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    expected = backbone(x)
    timm_scan.wrap(backbone, check_input_size=(3, 32, 32))
    assert not backbone.training
    assert backbone.state_dict().keys() == before.keys()
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(backbone(x), expected)


def test_heads_are_initialised_from_the_seed():
    backbone = create("resnet18")
    torch.manual_seed(3)
    a = timm_scan.wrap(backbone, check_input_size=(3, 32, 32))
    torch.manual_seed(3)
    b = timm_scan.wrap(backbone, check_input_size=(3, 32, 32))
    assert all(torch.equal(x, y) for x, y in zip(a.exits.state_dict().values(), b.exits.state_dict().values()))


def test_macs_last_is_backbone_plus_heads():
    _, model = wrap("resnet18", 32)
    macs = model.exit_macs((3, 32, 32))
    heads = 0
    h = torch.zeros(1, 3, 32, 32)
    for k, head in enumerate(model.exits):
        h = model.forward_section(k, h)
        heads += count_macs(head, h)
    assert heads > 0
    assert macs[-1] == model.backbone_macs((3, 32, 32)) + heads
    assert all(a < b for a, b in zip(macs, macs[1:]))


def test_macs_count_cpu_attention():
    q = torch.randn(2, 3, 50, 16)
    assert count_macs(F.scaled_dot_product_attention, q, q, q) == 2 * (2 * 3 * 50 * 50 * 16)


def test_macs_reject_bad_input_size():
    _, model = wrap("resnet18", 32)
    with pytest.raises(ValueError, match="input_size"):
        model.exit_macs((32, 32))


def test_exits_by_index_negative_index_and_name_agree():
    _, a = wrap("resnet18", 32, ScanConfig(exits=[1, 3]))
    _, b = wrap("resnet18", 32, ScanConfig(exits=[-4, -2]))
    _, c = wrap("resnet18", 32, ScanConfig(exits=["layer3", "layer1"]))
    assert a.config.exits == b.config.exits == c.config.exits == [1, 3]
    assert [s.module for s in a.exit_stages] == ["layer1", "layer3", "layer4"]


def test_nested_exits_cut_inside_sequential_containers():
    _, model = wrap("efficientnet_b0", 32, ScanConfig(exits=["blocks.1", "blocks.4"]))
    assert model.num_exits == 3
    _, model = wrap("densenet121", 32, ScanConfig(exits=["features.denseblock2"]))
    assert model.num_exits == 2


def test_no_shallow_exit_is_the_plain_backbone():
    backbone, model = wrap("resnet18", 32, ScanConfig(exits=[]))
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert model.num_exits == 1 and torch.equal(out.logits[0], backbone(x))
    assert model.exit_macs((3, 32, 32)) == [model.backbone_macs((3, 32, 32))]


@pytest.mark.parametrize(
    "exits, message",
    [
        ([7], r"out of range .* 0\.\.3"),
        ([4], "last stage .*layer4"),
        ([-1], "last stage"),
        (["layer9"], "neither a feature_info module nor a module"),
        ([1, -4], "same stage twice"),
        (["fc"], "called 0 times"),  # the classifier: forward_features never calls it
    ],
)
def test_bad_exits_name_the_field(exits, message):
    with pytest.raises(ValueError, match=message):
        wrap("resnet18", 32, ScanConfig(exits=exits))


def test_model_without_feature_info_is_refused():
    with pytest.raises(ValueError, match="no feature_info"):
        timm_scan.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten()))


def test_model_without_classifier_is_refused():
    with pytest.raises(ValueError, match="num_classes"):
        wrap("resnet18", 32, num_classes=0)


def test_default_placement_follows_the_papers():
    def stages(reductions):
        return [Stage(i, f"s{i}", 8, r) for i, r in enumerate(reductions)]

    assert default_exit_indices(stages([2, 4, 8, 16, 32])) == [1, 2, 3]  # resnet: not on the stem
    assert default_exit_indices(stages([4, 8, 16, 32])) == [0, 1, 2]  # convnext, swin
    assert default_exit_indices(stages([1, 2, 4, 8, 16, 32])) == [2, 3, 4]  # vgg
    assert default_exit_indices(stages([16] * 12)) == [2, 5, 8]  # vit: blocks 3, 6, 9 of 12
    assert default_exit_indices(stages([2, 32])) == [0]  # nothing but a stem: keep it


def test_align_net_follows_the_papers():
    # resnet18's first exit: three SepConvs, widths doubling, each halving the map
    assert align_plan(64, 4, 512, 32, 3) == [(64, 128, 2), (128, 256, 2), (256, 512, 2)]
    # ViT: all stages at the same reduction, so no halving
    assert [s for _, _, s in align_plan(192, 16, 192, 16, 3)] == [1, 1, 1]
    _, model = wrap("resnet18", 32)
    assert [len(head.align) for head in model.exits] == [3, 2, 1]


@pytest.mark.parametrize("attention", ["sd", "scan", "none"])
def test_heads_work_at_any_resolution(attention):
    _, model = wrap("resnet18", 32, ScanConfig(attention=attention, head_channels=96, head_blocks=2))
    for size in (36, 64, 97):  # odd maps at every stage for SCAN's transposed conv
        out = model(torch.randn(2, 3, size, size))
        assert [tuple(t.shape) for t in out.logits] == [(2, 10)] * 4


def test_gradients_reach_backbone_and_every_head():
    _, model = wrap("resnet18", 32, zero_init_last=False)  # timm zero-inits residual BNs by default
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = model(x)
    loss = sum(F.cross_entropy(logits, y) for logits in out.logits)
    loss = loss + sum((f - out.features[-1].detach()).pow(2).mean() for f in out.features[:-1])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_saved_config_recreates_the_same_model():
    backbone, model = wrap("resnet18", 32, ScanConfig(attention="scan", head_blocks=2, head_budget=None))
    again = timm_scan.wrap(backbone, ScanConfig.from_json(model.config.to_json()), check_input_size=(3, 32, 32))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}


def test_backbone_weights_are_registered_once():
    backbone, model = wrap("resnet18", 32)
    keys = model.state_dict().keys()
    assert sum(k.startswith("backbone.") for k in keys) == len(backbone.state_dict())
    assert all(k.startswith(("backbone.", "exits.")) for k in keys)


def test_torch_compile():
    _, model = wrap("resnet18", 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model)(x)
    for a, b in zip(got.logits + got.features, expected.logits + expected.features):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_an_uncuttable_stage_gets_the_stages_that_can_be_cut():
    backbone = create("resnet18").eval()
    backbone.feature_info[1]["module"] = "layer1.0.act1"  # inside a BasicBlock: not a section boundary
    with pytest.raises(ValueError, match=r"'layer1.0.act1' sits inside 'layer1.0', a BasicBlock.*exits=\.\.\.\) with stages it can cut: \[0, 2, 3\]"):
        timm_scan.wrap(backbone, ScanConfig(exits=[1, 2]), check_input_size=(3, 32, 32))
    assert timm_scan.wrap(backbone, ScanConfig(exits=[2, 3]), check_input_size=(3, 32, 32)).num_exits == 3


@pytest.mark.parametrize("name, size, stage, kwargs", [
    ("resnet18", 32, "layer2", {}),
    ("convnext_atto", 32, "stages.1.blocks.0", {}),
    ("test_vit", 160, "blocks.1", {}),
    ("cait_xxs24_224", 64, "blocks.1", dict(img_size=64, depth=4)),  # the traced runner
])
@pytest.mark.parametrize("when", ["before wrap", "after wrap"])
def test_gradient_checkpointing_is_honoured(name, size, stage, kwargs, when):
    """Checkpointed modules run their forward again in the backward pass; the gradients are unchanged."""
    backbone = create(name, **kwargs)
    reference = timm_scan.wrap(copy.deepcopy(backbone), check_input_size=(3, size, size)).eval()
    if when == "before wrap":
        backbone.set_grad_checkpointing(True)
    model = timm_scan.wrap(backbone, check_input_size=(3, size, size)).eval()
    if when == "after wrap":
        model.set_grad_checkpointing(True)
    model.exits.load_state_dict(reference.exits.state_dict())
    calls = []
    model.backbone.get_submodule(stage).register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, size, size)
    grads = []
    for m in (reference, model):
        sum(z.sum() for z in m(x).logits).backward()
        grads.append([p.grad for p in m.parameters()])
    assert len(calls) == 2  # once forward, once recomputed in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name, published", [("resnet18", 1.81e9), ("vit_tiny_patch16_224", 1.26e9)])
def test_backbone_macs_match_published_figures(name, published):
    """torchvision's model table gives resnet18 1.81 GFLOPS (multiply-adds) at 224x224; timm's results
    give vit_tiny_patch16_224 1.26 GMACs."""
    model = timm_scan.wrap(create(name, num_classes=1000))
    assert model.backbone_macs((3, 224, 224)) == pytest.approx(published, rel=0.01)


def test_default_heads_are_sized_within_the_budget_and_saved_with_their_width():
    # resnet50's papers' heads add 27% of its MACs (RESULTS §18); the budget's are within 5%
    backbone, model = wrap("resnet50", 64, ScanConfig(attention="none"))
    size = (3, 64, 64)
    width = model.config.head_channels
    assert width is not None and width % 8 == 0 and width < 2048
    heads = model.exit_macs(size)[-1] - model.backbone_macs(size)
    assert 0 < heads <= 0.05 * model.backbone_macs(size)
    wider = sum(head_macs(backbone, ScanConfig(exits=model.config.exits, attention="none", head_channels=width + 8),
                          model.exit_stages[:-1], size))
    assert wider > 0.05 * model.backbone_macs(size)  # the widest width within the budget
    # narrower than its input (256 channels), an align net narrows in its first conv
    first, second = model.exits[0].align[0]
    assert first.conv_pw.out_channels == second.conv_pw.out_channels < 256
    again = timm_scan.wrap(backbone, ScanConfig.from_json(model.config.to_json()), check_input_size=size)
    assert again.config == model.config
    papers = timm_scan.wrap(backbone, ScanConfig(attention="none", head_budget=None), check_input_size=size)
    assert papers.config.head_channels is None and papers.exits[0].align[-1][-1].conv_pw.out_channels == 2048
    assert papers.exits[0].align[0][0].conv_pw.out_channels == 256  # the papers': widen after each depthwise conv


def test_a_budget_the_heads_cannot_meet_is_refused_saying_what_costs_what():
    with pytest.raises(ValueError, match=r"'resnet50' cost .*% of its MACs at 64x64 even 8 channels wide "
                                         r"\(.*% is their attention 'sd'\).*head_budget=0.01; pass attention='none'"):
        wrap("resnet50", 64, ScanConfig(attention="sd", head_budget=0.01))
