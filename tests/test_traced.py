"""Families whose forward is not their children in order: the traced runner, distilled heads, refusals."""

import copy

import pytest
import torch
from helpers import create, mixing_thresholds
from families import FAMILIES_NOT_IN_ORDER
from timm.models.resnet import ResNet
from torch.utils import _pytree as pytree

import timm_scan
from timm_scan import EarlyExitPredictor
from timm_scan.model.traced import TracedState


def wrap(name, kwargs, size, **more):
    backbone = create(name, **kwargs, **more).eval()
    return backbone, timm_scan.wrap(backbone, check_input_size=(3, size, size))


@pytest.mark.parametrize("name, kwargs, size, runner", FAMILIES_NOT_IN_ORDER,
                         ids=[f[0] for f in FAMILIES_NOT_IN_ORDER])
def test_family_wraps_and_its_deepest_exit_is_the_backbone(name, kwargs, size, runner):
    backbone, model = wrap(name, kwargs, size)
    assert model.runner == runner
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out.logits[-1], backbone(x))
    assert all(logits.shape == (3, 10) for logits in out.logits)
    macs = model.exit_macs((3, size, size))
    assert all(a < b for a, b in zip(macs, macs[1:]))


def test_predictor_runs_a_traced_model_as_algorithm_1():
    _, model = wrap("mixer_s16_224", dict(img_size=64), 64)
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        probs = [p.softmax(-1) for p in model(x).logits]
    thresholds = mixing_thresholds(probs, [0.5]) + [0.0, 0.0]  # about half leave at exit 1, the rest at exit 2
    result = EarlyExitPredictor(model, timm_scan.ExitPolicy(thresholds, "deepest"))(x)
    expected = torch.where(probs[0].amax(-1) >= thresholds[0], 0, 1)
    assert torch.equal(result.exit_index.long(), expected)
    for i in range(6):
        torch.testing.assert_close(result.probs[i], probs[int(expected[i])][i], rtol=1e-4, atol=1e-5)


def test_train_mode_is_the_same_computation_on_the_traced_runner():
    """Same seed, same numbers as the backbone in train mode: dropout and drop path included."""
    backbone = create("cait_xxs24_224", img_size=64, depth=4, drop_rate=0.3, drop_path_rate=0.2)
    reference = copy.deepcopy(backbone)
    model = timm_scan.wrap(backbone, check_input_size=(3, 64, 64))
    assert model.runner == "traced" and model.training
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(1)
    expected = reference(x)
    torch.manual_seed(1)
    assert torch.equal(model(x).logits[-1], expected)


def test_truncated_traced_model_holds_only_its_sections(tmp_path):
    _, model = wrap("pit_ti_224", dict(img_size=64), 64)
    x = torch.randn(2, 3, 64, 64)
    small = model.truncate(0).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x).logits[0])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) / 2
    torch.save(small, tmp_path / "small.pt")  # nothing of the full model travels with it
    torch.save(small.state_dict(), tmp_path / "weights.pt")
    assert (tmp_path / "small.pt").stat().st_size < 1.5 * (tmp_path / "weights.pt").stat().st_size


def test_distilled_model_keeps_its_combined_head():
    """The deepest exit is the backbone's own output: the mean of its class and distillation heads."""
    backbone, model = wrap("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=4), 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        features = backbone.forward_features(x)
        head, dist = backbone.get_classifier()
        torch.testing.assert_close(out.logits[-1], (head(features[:, 0]) + dist(features[:, 1])) / 2)
        torch.testing.assert_close(out.features[-1], features[:, 0])


def test_a_forward_features_with_steps_of_its_own_runs_traced():
    class ScaledResNet(ResNet):
        def forward_features(self, x):
            return super().forward_features(x) * 2  # a step that is not a child module

    backbone = ScaledResNet(block=create("resnet18").layer1[0].__class__, layers=[1, 1, 1, 1], num_classes=10).eval()
    model = timm_scan.wrap(backbone, check_input_size=(3, 32, 32))
    assert model.runner == "traced"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).logits[-1], backbone(x))


def test_a_forward_with_tensor_constants_runs_traced():
    class ConstantResNet(ResNet):
        def forward_features(self, x):
            return super().forward_features(x) * torch.tensor([2.0])  # torch.fx keeps it as a constant

    backbone = ConstantResNet(block=create("resnet18").layer1[0].__class__, layers=[1, 1, 1, 1], num_classes=10)
    model = timm_scan.wrap(backbone.eval(), check_input_size=(3, 32, 32))
    assert model.runner == "traced"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).logits[-1], backbone(x))
        assert torch.equal(model.double()(x.double()).logits[-1], backbone(x.double()))


def test_a_value_that_does_not_follow_dropped_samples_is_refused():
    class IndexResNet(ResNet):
        def forward_features(self, x):
            positions = torch.arange(x.shape[0])  # kept for the end: not something early exit can shrink
            return super().forward_features(x).index_select(0, positions) * 2

    backbone = IndexResNet(block=create("resnet18").layer1[0].__class__, layers=[1, 1, 1, 1], num_classes=10)
    with pytest.raises(ValueError, match="cannot wrap.*samples are dropped"):
        timm_scan.wrap(backbone, check_input_size=(3, 32, 32))


def test_data_dependent_forward_is_refused_with_both_reasons():
    class MoodyResNet(ResNet):
        def forward_features(self, x):
            x = super().forward_features(x)
            return x * 2 if x.mean() > 0 else x  # depends on the values: neither runner can follow it

    backbone = MoodyResNet(block=create("resnet18").layer1[0].__class__, layers=[1, 1, 1, 1], num_classes=10)
    with pytest.raises(ValueError, match="staged logits differ.*torch.fx.*cannot trace"):
        timm_scan.wrap(backbone, check_input_size=(3, 32, 32))


@pytest.mark.parametrize("name, kwargs, size, reason", [
    ("hiera_tiny_224", dict(img_size=(64, 64)), 64, "does not lay out as its forward_intermediates map"),
    ("crossvit_tiny_240", {}, 240, "cannot trace its forward_features"),
])
def test_families_still_refused_say_why(name, kwargs, size, reason):
    with pytest.raises(ValueError, match=f"cannot wrap {name!r}.*{reason}"):
        wrap(name, kwargs, size)


def test_a_state_rebuilds_from_its_batched_tensors():
    """What an exported traced model's graphs hand on: the batched tensors alone (`tests/test_onnx.py`
    exports TNT)."""
    _, model = wrap("twins_pcpvt_small", dict(img_size=64, depths=(1, 1, 1, 1)), 64)  # (B, 16, 16, map): B counted
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        state = model.forward_section(0, x)
        kept = state[torch.tensor([True, False, True])]
        carried = TracedState.of_tensors(kept.batched(), state.batch_layout(), 0)
        assert len(carried) == 2 and len(state.batched()) == 1 and pytree.tree_leaves(state.values)[0] == 3
        rebuilt = state.replace_batched(carried.batched())  # constants from the 3-sample state, counts from 2
        for a, b in zip(pytree.tree_leaves(rebuilt.values), pytree.tree_leaves(kept.values), strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        after = [model.forward_section(1, h).batched() for h in (rebuilt, kept)]
        torch.testing.assert_close(*after)
    # a torch.Size in a state is counted again through its ints: pytree must flatten it into them
    assert pytree.tree_leaves(torch.Size([3, 16])) == [3, 16]


def test_traced_model_saves_and_loads(tmp_path):
    _, model = wrap("pit_ti_224", dict(img_size=64), 64)
    model.save_pretrained(tmp_path / "pit")
    again = timm_scan.from_pretrained(tmp_path / "pit").eval()
    assert again.runner == "traced"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.eval()(x).logits, again(x).logits):
            torch.testing.assert_close(a, b)


def test_inspect_shows_a_distilled_model(capsys):
    from timm_scan.commands.inspect import InspectConfig, inspect

    model = inspect(InspectConfig(model="levit_128s", input_size=224))
    assert model.runner == "traced"
    assert "levit_128s at 224x224" in capsys.readouterr().out
