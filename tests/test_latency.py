"""Measured exit latency: what leaving at each exit costs here, and whether it predicts a real run."""

import pytest
import torch
from conftest import create

import timm_scan
from timm_scan import EarlyExitPredictor, measure_exit_latency
from timm_scan.deploy import wall_clocks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm_scan.wrap(create("resnet18", num_classes=10), check_input_size=(3, 32, 32)).eval()


def test_latency_is_cumulative_and_describes_where_it_was_measured(model):
    # medians of 5 passes of 32 images: robust to a busy CPU
    latency = measure_exit_latency(model, (3, 32, 32), batch_size=4, images=32, repeats=5)
    assert len(latency.ms_per_image) == model.num_exits and latency.batch_size == 4
    assert latency.backbone_ms_per_image > 0
    assert latency.device.startswith("cpu: ") and "threads" in latency.device and latency.dtype == "float32"
    assert latency.ms_per_image[0] < latency.ms_per_image[-1]  # layer1 alone against the whole network
    with pytest.raises(ValueError, match="memory_format"):
        measure_exit_latency(model, (3, 32, 32), memory_format="nhwc")
    with pytest.raises(ValueError, match="batch_size"):
        measure_exit_latency(model, (3, 32, 32), batch_size=0)


def test_latency_predicts_a_mixed_batch_within_a_third(model):
    """Half the batch leaves at exit 1, the rest runs to the end: the table's prediction (per-image cost
    of each sample's exit, summed) against the predictor timed on that batch, each as a share of the
    plain backbone's time measured with it (in turns), so that a machine whose speed drifts between the
    two measurements does not decide the result. Batch shrinking changes the per-image cost of the
    later sections a little; the tolerance is ±35%."""
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    latency = measure_exit_latency(model, (3, 32, 32), batch_size=64, images=192, repeats=5)
    with torch.no_grad():
        first = torch.softmax(model(x).logits[0], -1).amax(-1)
    k = model.num_exits
    predictor = EarlyExitPredictor(model, [torch.quantile(first, 0.5).item()] + [1.0] * (k - 2))
    exits = predictor(x).exit_index
    assert 20 < (exits == 0).sum() < 44 and set(exits.tolist()) == {0, k - 1}
    seconds = wall_clocks({"backbone": model.backbone, "predictor": predictor}, [x] * 3, repeats=7)
    predicted = latency.predict_ms(exits.tolist()) / (latency.backbone_ms_per_image * len(x))
    assert predicted == pytest.approx(seconds["predictor"] / seconds["backbone"], rel=0.35)
