"""Exits inside stages (``ScanConfig.exits`` naming a block), narrowing trained exits to a subset
(``keep_exits``) and exit positions proposed from measured costs (``propose_exits``, ``timm-scan propose``)."""

import dataclasses

import pytest
import torch
from helpers import create

import timm_scan
from timm_scan import ScanConfig
from timm_scan._io import JsonRecord
from timm_scan.cli import main
from timm_scan.commands.train import TrainConfig
from timm_scan.deploy.policy import simulate_early_exit


def wrap(name, size, config=None, **kwargs):
    backbone = create(name, **kwargs).eval()
    return backbone, timm_scan.wrap(backbone, config, check_input_size=(3, size, size))


def block_output(backbone, name, x):
    """What the block ``name`` returns when the backbone runs on ``x``."""
    seen = []
    handle = backbone.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        backbone(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name, size, exits, runner", [
    ("resnet18", 32, ["layer3", "layer2.0", 1], "sequential"),  # given out of order: run in forward order
    ("convnext_atto", 64, ["stages.2.blocks.1", "stages.1"], "traced"),  # a block inside a ConvNeXtStage
])
def test_an_exit_inside_a_stage_reads_that_block_s_output(name, size, exits, runner):
    backbone, model = wrap(name, size, ScanConfig(exits=exits))
    inner = next(e for e in exits if isinstance(e, str) and "." in e)
    assert model.runner == runner and inner in model.config.exits
    x = torch.randn(3, 3, size, size)
    k = model.config.exits.index(inner)
    with torch.no_grad():
        out = model(x)
        h = x
        for j in range(k + 1):
            h = model.forward_section(j, h)
    want = block_output(backbone, inner, x)
    torch.testing.assert_close(model._runner.to_map(h, (size, size)), want)  # the section ends after the block
    stage = model.exit_stages[k]
    assert stage.index is None and stage.num_chs == want.shape[1] and stage.reduction == size // want.shape[-1]
    assert torch.equal(out.logits[-1], backbone(x))  # the backbone's answer is untouched


def test_resnet_exits_sorted_in_forward_order():
    _, model = wrap("resnet18", 32, ScanConfig(exits=["layer3", "layer2.0", 1]))
    assert model.config.exits == [1, "layer2.0", 3]
    assert [s.module for s in model.exit_stages] == ["layer1", "layer2.0", "layer3", "layer4"]


def test_a_model_with_blocks_inside_stages_saves_and_loads(tmp_path):
    _, model = wrap("resnet18", 32, ScanConfig(exits=["layer2.0", "layer3.0"]))
    model.save_pretrained(tmp_path)
    loaded = timm_scan.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x).logits, loaded(x).logits):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name, size, exits, message", [
    ("resnet18", 32, ["layer2.9"], "neither a feature_info module nor a module"),
    ("test_vit", 160, ["blocks.1.attn"], "not a feature map"),  # a ViT block's inside is tokens
])
def test_a_block_that_cannot_take_an_exit_is_refused(name, size, exits, message):
    with pytest.raises(ValueError, match=message):
        wrap(name, size, ScanConfig(exits=exits))


def test_head_blocks_per_exit():
    _, model = wrap("resnet18", 32, ScanConfig(exits=[1, "layer2.0", 3], head_blocks=[3, 1, 2]))
    assert [len(h.align) for h in model.exits] == [3, 1, 2]
    with pytest.raises(ValueError, match="lists 2 counts"):
        wrap("resnet18", 32, ScanConfig(exits=[1, 2, 3], head_blocks=[3, 1]))
    with pytest.raises(ValueError, match="head_blocks must be"):
        ScanConfig(head_blocks=[2, 0])
    # the command line takes one count for every head, or one per exit
    assert TrainConfig(dataset="d", head_blocks=[2]).scan_config().head_blocks == 2
    assert TrainConfig(dataset="d", exits=[1, 2], head_blocks=[2, 1]).scan_config().head_blocks == [2, 1]
    assert TrainConfig.from_dict({**TrainConfig(dataset="d").to_dict(), "head_blocks": 2}).head_blocks == [2]


def test_keep_exits_narrows_without_retraining(tmp_path):
    _, model = wrap("resnet18", 32, ScanConfig(exits=[1, "layer2.0", 2, "layer3.0", 3]))
    model.data_config = {"input_size": (3, 32, 32)}
    kept = model.keep_exits([3, 0])
    assert kept.config.exits == [1, "layer3.0"] and kept.config.head_blocks == [5, 2]  # K - i of the 6-exit model
    assert kept.config.head_channels == model.config.head_channels and kept.policy == timm_scan.ExitPolicy()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full, narrow = model(x).logits, kept(x).logits
    for i, j in ((0, 0), (3, 1), (5, 2)):
        assert torch.equal(full[i], narrow[j])
    macs = model.exit_macs((3, 32, 32))
    assert kept.exit_macs((3, 32, 32))[0] == macs[0] and kept.exit_macs((3, 32, 32))[-1] < macs[-1]
    kept.save_pretrained(tmp_path)  # a narrowed model is a model like any other
    assert timm_scan.from_pretrained(tmp_path).config == kept.config
    assert model.keep_exits([]).num_exits == 1
    for bad in ([5], [0, 0], [True], 1):
        with pytest.raises(ValueError, match="keep_exits takes distinct indices"):
            model.keep_exits(bad)


def test_propose_exits_spaces_exits_in_measured_time():
    backbone = create("resnet18").eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    proposal = timm_scan.propose_exits(backbone, (3, 32, 32), num_exits=2, images=2, repeats=1)
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())  # the model is left alone
    modules = [p.module for p in proposal.positions]
    assert {"layer1", "layer2", "layer3", "layer2.0", "layer3.0"} <= set(modules) and "layer4" not in modules
    assert "layer1.1" not in modules  # a stage's last block returns the stage's own output
    macs = [p.macs for p in proposal.positions]
    assert macs == sorted(macs) and macs[-1] < proposal.backbone_macs
    assert [p.share for p in proposal.positions] == sorted(p.share for p in proposal.positions)
    assert len(proposal.chosen) == 2 and proposal.chosen == sorted(proposal.chosen)
    assert proposal.config.exits == [proposal.positions[i].entry for i in proposal.chosen]
    assert proposal.exit_macs[-1] <= 1.05 * proposal.backbone_macs  # the heads are sized by the budget
    # the flags give the same exits to a training run
    flags = proposal.flags().split()
    cfg = TrainConfig(dataset="d", exits=[int(f) if f.isdigit() else f for f in flags[1:flags.index("--head-blocks")]],
                      head_blocks=[int(f) for f in flags[flags.index("--head-blocks") + 1:]])
    assert timm_scan.wrap(create("resnet18"), cfg.scan_config(), check_input_size=(3, 32, 32)).config.exits == \
        proposal.config.exits
    with pytest.raises(ValueError, match="num_exits must be a positive int"):
        timm_scan.propose_exits(backbone, (3, 32, 32), num_exits=0)


def test_propose_command(capsys):
    main(["propose", "--model", "resnet18", "--input-size", "32", "--num-classes", "10", "--images", "2",
          "--repeats", "1", "--num-exits", "2"])
    out = capsys.readouterr().out
    assert "layer2.0" in out and "time to here" in out and "train with: timm-scan train --model resnet18" in out
    assert sum(line.startswith("*  ") for line in out.splitlines()) == 2


@pytest.mark.parametrize("name, size, exits", [("resnet18", 32, [1, "layer2.0", "layer3.0"]),
                                               ("convnext_atto", 64, ["stages.1.blocks.0", "stages.2.blocks.1"])])
def test_early_exit_from_blocks_inside_stages_equals_the_simulated_one(name, size, exits):
    _, model = wrap(name, size, ScanConfig(exits=exits))
    x = torch.randn(24, 3, size, size)
    with torch.no_grad():
        probs = [torch.softmax(z, -1) for z in model(x).logits]
    policy = timm_scan.ExitPolicy([torch.quantile(p.max(-1).values, 0.5).item() for p in probs[:-1]], "deepest")
    result = timm_scan.EarlyExitPredictor(model, policy)(x)
    exit_index, _, expected = simulate_early_exit(probs, policy)
    assert torch.equal(result.exit_index, exit_index) and torch.equal(result.labels, expected.argmax(-1))
    assert len(set(exit_index.tolist())) > 2


def test_head_blocks_follow_their_exits_into_forward_order():
    _, model = wrap("resnet18", 32, ScanConfig(exits=["layer3", 1, "layer2.0"], head_blocks=[1, 3, 2]))
    assert model.config.exits == [1, "layer2.0", 3] and model.config.head_blocks == [3, 2, 1]
    assert [len(h.align) for h in model.exits] == [3, 2, 1]
    _, default = wrap("resnet18", 32, ScanConfig(head_blocks=[1, 2, 1]))  # the default exits, one count each
    assert default.config.exits == [1, 2, 3] and [len(h.align) for h in default.exits] == [1, 2, 1]


@pytest.mark.parametrize("exits, message", [
    (["layer3.1", "layer3"], "output of stage 'layer3': name the stage instead"),
    (["layer4.1"], "the end of the last stage"),
])
def test_a_block_that_ends_a_stage_is_refused(exits, message):
    with pytest.raises(ValueError, match=message):
        wrap("resnet18", 32, ScanConfig(exits=exits))


def test_a_single_proposed_exit_keeps_its_head_blocks_in_the_flags():
    proposal = timm_scan.propose_exits(create("resnet18").eval(), (3, 32, 32), num_exits=1, images=1, repeats=1,
                                       attention="sd")
    flags = proposal.flags().split()
    assert flags[flags.index("--head-blocks") + 1] == str(proposal.config.head_blocks)
    assert flags[flags.index("--attention") + 1] == "sd"


def test_a_nested_policy_with_algorithm_1_s_rule_is_saved_without_the_field():
    @dataclasses.dataclass
    class Holder(JsonRecord):
        policy: timm_scan.ExitPolicy

    own, mean = timm_scan.ExitPolicy([0.5]), timm_scan.ExitPolicy([0.5], rule="running-mean")
    assert "rule" not in Holder(own).to_dict()["policy"]
    assert Holder(mean).to_dict()["policy"]["rule"] == "running-mean"
    assert Holder.from_dict(Holder(mean).to_dict()).policy == mean and Holder.from_dict(Holder(own).to_dict()).policy == own
