import math

import pytest
import torch
from helpers import create

import timm_scan
from timm_scan import EarlyExitPredictor, ExitPolicy, ScanConfig, ensemble_probs
from timm_scan.deploy import fast_heads
from timm_scan.deploy.fast_heads import InferenceSeparableConv, inference_copy
from timm_scan.deploy.policy import decision_probs, simulate_early_exit
from timm_scan.model import heads


def wrapped(name="resnet18", size=32):
    return timm_scan.wrap(create(name).eval(), check_input_size=(3, size, size))


def all_exit_probs(model, x):
    with torch.no_grad():
        return [torch.softmax(z, -1) for z in model(x).logits]


def quantile_thresholds(probs, generator, rule="own"):
    """Thresholds that send some samples out at every shallow exit (on what ``rule`` decides with)."""
    return [torch.quantile(p.max(-1).values, torch.rand(1, generator=generator).item() * 0.6 + 0.3).item()
            for p in decision_probs(probs, rule)[:-1]]


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("test_vit", 160), ("convnext_atto", 64)])
@pytest.mark.parametrize("fallback", ["ensemble", "deepest"])
@pytest.mark.parametrize("optimize", [True, False])
def test_real_early_exit_equals_the_simulated_one(name, size, fallback, optimize):
    model = wrapped(name, size)
    x = torch.randn(24, 3, size, size)
    probs = all_exit_probs(model, x)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        thresholds = quantile_thresholds(probs, generator)
        policy = ExitPolicy(thresholds, fallback)
        result = EarlyExitPredictor(model, policy, optimize_heads=optimize)(x)
        exit_index, confidence, expected_probs = simulate_early_exit(probs, policy)
        assert torch.equal(result.exit_index, exit_index)
        assert torch.equal(result.labels, expected_probs.argmax(-1))
        torch.testing.assert_close(result.probs, expected_probs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.confidence, confidence, rtol=1e-4, atol=1e-5)
        macs = torch.tensor(model.exit_macs((3, size, size)))
        assert torch.equal(result.macs, macs[exit_index])
        assert 0 < (exit_index < model.num_exits - 1).sum() < len(x)  # a real mix of exits


@pytest.mark.parametrize("fallback", ["ensemble", "deepest"])
def test_the_running_mean_rule_runs_as_simulated(fallback):
    model = wrapped()
    x = torch.randn(24, 3, 32, 32)
    probs = all_exit_probs(model, x)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        policy = ExitPolicy(quantile_thresholds(probs, generator, "running-mean"), fallback, rule="running-mean")
        result = EarlyExitPredictor(model, policy)(x)
        exit_index, confidence, expected_probs = simulate_early_exit(probs, policy)
        assert torch.equal(result.exit_index, exit_index) and torch.equal(result.labels, expected_probs.argmax(-1))
        torch.testing.assert_close(result.probs, expected_probs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.confidence, confidence, rtol=1e-4, atol=1e-5)
        assert 0 < (exit_index < model.num_exits - 1).sum() < len(x)  # a real mix of exits
        assert not torch.equal(exit_index, simulate_early_exit(probs, policy.replace(rule="own"))[0])  # the rule counts


@pytest.mark.parametrize("rule", ["own", "running-mean"])
@pytest.mark.parametrize("fallback", ["ensemble", "deepest"])
def test_one_image_at_a_time_equals_the_simulated_one(fallback, rule):
    model = wrapped()
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    probs = all_exit_probs(model, x)
    thresholds = quantile_thresholds(probs, torch.Generator().manual_seed(1), rule)
    policy = ExitPolicy(thresholds, fallback, rule=rule)
    predictor = EarlyExitPredictor(model, policy)
    exit_index, confidence, expected_probs = simulate_early_exit(probs, policy)
    results = [predictor(image[None]) for image in x]  # batch 1 decides with one comparison per exit
    assert torch.equal(torch.cat([r.exit_index for r in results]), exit_index)
    assert len(set(exit_index.tolist())) > 1
    torch.testing.assert_close(torch.cat([r.probs for r in results]), expected_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r.confidence for r in results]), confidence, rtol=1e-4, atol=1e-5)


def channel_major(t):
    return t.transpose(0, 1).is_contiguous()


def laid_out(x):
    """``x`` in each memory layout the inference heads take."""
    channels_last = x.contiguous(memory_format=torch.channels_last)
    return {"nchw": x, "channels_last": channels_last, "channel_major": fast_heads.channel_major(x)}


@pytest.mark.parametrize("attention", ["sd", "scan", "none"])
@pytest.mark.parametrize("size", [32, 128])
def test_inference_heads_compute_the_same_function_without_batchnorm(attention, size):
    # with attention, the papers' heads (SCAN's attention alone is over the default budget here); without, the
    # default's budgeted heads, narrowed to 32 channels in their first conv
    config = ScanConfig(attention=attention, head_budget=None) if attention != "none" else ScanConfig(head_channels=32)
    model = timm_scan.wrap(create("resnet18"), config)
    generator = torch.Generator().manual_seed(0)
    for m in model.exits.modules():  # trained-looking statistics, so folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=generator))
    model.eval()
    x = torch.randn(3, 3, size, size)
    h = x
    with torch.no_grad():
        for k, head in enumerate(model.exits):
            h = model.forward_section(k, h)
            fast = inference_copy(head)
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
            attention_input, blocks_called = [], []
            if fast.attention is not None:
                fast.attention.register_forward_pre_hook(lambda m, args: attention_input.append(args[0]))
            for block in fast.modules():
                if isinstance(block, InferenceSeparableConv):
                    block.register_forward_pre_hook(lambda m, args: blocks_called.append(args[0]))
            expected = head(h)
            for batch in (h, h[:1]):  # batch 1 too: (B, C, H, W) and channel-major coincide there
                for layout, inp in laid_out(batch).items():
                    logits, pooled = fast(inp)
                    torch.testing.assert_close(logits, expected[0][: len(batch)], rtol=1e-4, atol=1e-4, msg=layout)
                    torch.testing.assert_close(pooled, expected[1][: len(batch)], rtol=1e-4, atol=1e-4, msg=layout)
            attention_input.clear(), blocks_called.clear()
            fast(h)
            if h.shape[-1] <= 8 and attention != "scan":  # small maps: flat matrix products, no module calls
                assert not blocks_called
            elif h.shape[-1] <= 8:  # the SCAN attention's convs: the head runs module by module, channel-major
                assert channel_major(attention_input[0]) and not attention_input[0].is_contiguous() and blocks_called
            else:  # oneDNN's convs, fastest in channels_last
                assert blocks_called[0].is_contiguous(memory_format=torch.channels_last)
    assert all(isinstance(m.bn, torch.nn.BatchNorm2d) for m in model.exits.modules() if hasattr(m, "bn"))  # untouched


@pytest.mark.parametrize("padding", ["", "same"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("depthwise_bias", [False, True])
def test_inference_separable_conv_matches_timm_on_small_and_large_maps(padding, stride, depthwise_bias):
    from timm.layers import SeparableConvNormAct

    torch.manual_seed(0)
    timm_block = SeparableConvNormAct(16, 24, kernel_size=3, stride=stride, padding=padding)
    if depthwise_bias:  # timm's have none; a block built otherwise may
        timm_block.conv_dw.bias = torch.nn.Parameter(torch.randn(16))
    bn = timm_block.bn
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 1.5), bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.normal_()
    timm_block.eval()
    block = InferenceSeparableConv(timm_block)
    with torch.no_grad():
        for size, batch in [(1, 1), (2, 3), (3, 1), (5, 2), (8, 1), (11, 1), (16, 2)]:
            for channels_last in (False, True):
                x = torch.randn(batch, 16, size, size)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(block(x), timm_block(x), rtol=1e-4, atol=1e-5)
            out = timm_block(x).shape[-1]
            small = (size * out) ** 2 <= fast_heads.SMALL_MAP  # the matrix path where it is cheap, oneDNN elsewhere
            assert (block._matrices[(size, size, x.dtype, x.device)] is not None) == small, (size, stride)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_major"])
def test_a_chain_of_inference_blocks_computes_channel_major_without_copies(layout):
    torch.manual_seed(0)
    chain = torch.nn.Sequential(heads.SepConv(8, 16, stride=2), heads.SepConv(16, 32, stride=2)).eval()
    fast = torch.nn.Sequential(*(InferenceSeparableConv(block) for sep_conv in chain for block in sep_conv))
    x = laid_out(torch.randn(5, 8, 8, 8))[layout]
    assert channel_major(fast_heads.channel_major(x)) and (fast_heads.channel_major(x) is x) == (layout == "channel_major")
    outputs = []
    for block in fast:
        block.register_forward_hook(lambda m, args, out: outputs.append((args[0], out)))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), chain(x), rtol=1e-4, atol=1e-5)
    assert len(outputs) == 4 and all(channel_major(out) for _, out in outputs)
    for (_, out), (inp, _) in zip(outputs, outputs[1:]):
        assert inp is out  # each block reads the one before it in place


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_major"])
def test_inference_head_pools_like_timm_in_every_layout(layout):
    """On a large map the head runs its modules; its pooling reads any layout."""
    head = heads.ExitHead(8, 4, 16, 8, 1, num_classes=3, feature_dim=16, attention="none").eval()
    fast = inference_copy(head)
    x = laid_out(torch.randn(2, 8, 40, 40))[layout]
    with torch.no_grad():
        for got, want in zip(fast(x), head(x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_inference_separable_conv_caches_plain_tensors_even_when_called_with_grad():
    block = InferenceSeparableConv(heads.SepConv(8, 8, stride=2).eval()[0])
    block(torch.randn(1, 8, 4, 4))  # grad mode on, as a user calling the head directly might
    matrices = block._matrices[(4, 4, torch.float32, torch.device("cpu"))]
    assert not any(t.requires_grad for t in matrices[:4] if t is not None)


def test_batch_order_is_preserved():
    model = wrapped()
    x = torch.randn(16, 3, 32, 32)
    probs = all_exit_probs(model, x)
    predictor = EarlyExitPredictor(model, ExitPolicy(quantile_thresholds(probs, torch.Generator().manual_seed(1))))
    perm = torch.randperm(16)
    a, b = predictor(x), predictor(x[perm])
    assert torch.equal(a.exit_index[perm], b.exit_index) and torch.equal(a.labels[perm], b.labels)
    single = [predictor(x[i : i + 1]) for i in range(16)]  # batch size 1 too
    assert torch.equal(torch.cat([r.exit_index for r in single]), a.exit_index)


def test_zero_thresholds_send_everyone_to_the_first_exit_and_skip_the_rest():
    model = wrapped()
    predictor = EarlyExitPredictor(model, ExitPolicy([0.0, 0.0, 0.0]))
    predictor.exit_macs((3, 32, 32))  # counting MACs runs every section once; cached from here on
    calls = []
    model.backbone.layer2.register_forward_hook(lambda *args: calls.append("layer2"))
    x = torch.randn(8, 3, 32, 32)
    result = predictor(x)
    assert result.exit_index.tolist() == [0] * 8
    assert calls == []  # deeper sections never ran
    assert result.macs.tolist() == [model.exit_macs((3, 32, 32))[0]] * 8
    with torch.no_grad():
        assert torch.equal(result.labels, model(x).logits[0].argmax(-1))


def test_thresholds_above_every_confidence_send_everyone_to_the_fallback():
    model = wrapped()
    x = torch.randn(8, 3, 32, 32)
    probs = all_exit_probs(model, x)
    result = EarlyExitPredictor(model, ExitPolicy([1.0, 1.0, 1.0]))(x)
    assert result.exit_index.tolist() == [3] * 8
    with torch.no_grad():
        torch.testing.assert_close(result.probs, ensemble_probs(probs))
    deepest = EarlyExitPredictor(model, ExitPolicy([1.0, 1.0, 1.0], fallback="deepest"))(x)
    torch.testing.assert_close(deepest.probs, probs[-1])


@pytest.mark.parametrize(
    "thresholds, message",
    [([0.9, 0.9], "need one per shallow exit, 3"), ([0.9, math.nan, 0.9], r"thresholds\[1\]"),
     ([0.9, 0.9, 1.2], r"thresholds\[2\]"), ([-0.1, 0.9, 0.9], r"thresholds\[0\]"), (["0.9", 0.9, 0.9], "number")],
)
def test_threshold_validation(thresholds, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitPredictor(wrapped(), ExitPolicy(thresholds))


def test_fallback_validation():
    with pytest.raises(ValueError, match="fallback"):
        ExitPolicy([0.9] * 3, fallback="vote")


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("swin_tiny_patch4_window7_224", 224), ("test_vit", 160)])
def test_truncate_equals_the_exit(name, size):
    model = wrapped(name, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x).logits
        sizes = []
        for k in range(model.num_exits):
            small = model.truncate(k).eval()
            torch.testing.assert_close(small(x), logits[k], rtol=1e-4, atol=1e-5)
            sizes.append(sum(p.numel() for p in small.parameters()))
    assert sizes == sorted(sizes) and sizes[-1] == sum(p.numel() for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="exit_index"):
        model.truncate(model.num_exits)


@pytest.mark.parametrize("attention", ["none", "sd"])
def test_pooled_heads_are_cheap_and_run_like_the_model(attention, tmp_path):
    """The latency-oriented head: pooling then a two-layer MLP; the predictor, truncate and a save/load
    round trip give the model's own answers, and a pooled exit costs less than a SepConv one."""
    model = timm_scan.wrap(create("resnet18").eval(), timm_scan.ScanConfig(head="pooled", attention=attention),
                           check_input_size=(3, 32, 32))
    sepconv = wrapped("resnet18", 32)
    assert all(a < b for a, b in zip(model.exit_macs((3, 32, 32))[:-1], sepconv.exit_macs((3, 32, 32))[:-1]))
    assert [head.fc[0].out_features for head in model.exits] == [128] * 3 and len(model.exits[0].align) == 0
    x = torch.randn(24, 3, 32, 32)
    probs = all_exit_probs(model, x)
    thresholds = quantile_thresholds(probs, torch.Generator().manual_seed(0))
    result = EarlyExitPredictor(model, ExitPolicy(thresholds))(x)
    exit_index, _, expected = simulate_early_exit(probs, ExitPolicy(thresholds))
    assert torch.equal(result.exit_index, exit_index) and 0 < (exit_index < 3).sum() < 24
    torch.testing.assert_close(result.probs, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.truncate(0)(x), model(x).logits[0])
    model.save_pretrained(tmp_path)
    loaded = timm_scan.from_pretrained(tmp_path)
    assert loaded.config.head == "pooled"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits[0], model(x).logits[0])
    with pytest.raises(ValueError, match="head_blocks applies to 'sepconv' heads"):
        timm_scan.ScanConfig(head="pooled", head_blocks=2)


def test_a_fixed_size_model_refuses_other_sizes_and_says_how_to_resize():
    vit = timm_scan.wrap(create("vit_tiny_patch16_224", img_size=32, depth=4).eval(), check_input_size=(3, 32, 32))
    predictor = EarlyExitPredictor(vit, ExitPolicy([0.5] * (vit.num_exits - 1)))
    assert predictor(torch.randn(2, 3, 32, 32)).labels.shape == (2,)
    with pytest.raises(ValueError, match=r"images are 48x48; this model takes 32x32 only .*resize them"):
        predictor(torch.randn(2, 3, 48, 48))
    convolutional = EarlyExitPredictor(wrapped("resnet18", 32), ExitPolicy([0.5, 0.5, 0.5]))
    assert convolutional(torch.randn(2, 3, 48, 48)).labels.shape == (2,)  # any size a CNN can take
