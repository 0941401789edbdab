"""Measured exit latency: what leaving at each exit costs here, and what it predicts for a batch (how well
that holds is measured in benchmarks/, not asserted here)."""

import math

import pytest
import torch
from helpers import create

import timm_scan
from timm_scan import EarlyExitPredictor, measure_exit_latency
from timm_scan.deploy import wall_clocks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm_scan.wrap(create("resnet18", num_classes=10), check_input_size=(3, 32, 32)).eval()


def test_latency_is_cumulative_and_describes_where_it_was_measured(model):
    latency = measure_exit_latency(model, (3, 32, 32), batch_size=4, images=8, repeats=1)
    assert len(latency.ms_per_image) == model.num_exits and latency.batch_size == 4
    assert all(math.isfinite(ms) and ms > 0 for ms in [*latency.ms_per_image, latency.backbone_ms_per_image])
    assert latency.ms_per_image == sorted(latency.ms_per_image)  # cumulative by construction (noise raised)
    assert latency.device.startswith("cpu: ") and "threads" in latency.device and latency.dtype == "float32"
    with pytest.raises(ValueError, match="memory_format"):
        measure_exit_latency(model, (3, 32, 32), memory_format="nhwc")
    with pytest.raises(ValueError, match="batch_size"):
        measure_exit_latency(model, (3, 32, 32), batch_size=0)


def test_latency_predicts_a_mixed_batch_from_its_exits(model):
    """Half the batch leaves at exit 1, the rest runs to the end: the table's prediction is each
    sample's exit's per-image cost, summed, and the predictor can be timed beside the plain backbone.
    How close the prediction comes to the timed run is a timing claim: ``benchmarks/`` measures it,
    the tests do not (they check behaviour, never speed)."""
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    latency = measure_exit_latency(model, (3, 32, 32), batch_size=64, images=64, repeats=1)
    with torch.no_grad():
        first = torch.softmax(model(x).logits[0], -1).amax(-1)
    k = model.num_exits
    predictor = EarlyExitPredictor(model, timm_scan.ExitPolicy([torch.quantile(first, 0.5).item()] + [1.0] * (k - 2)))
    exits = predictor(x).exit_index
    at_first = int((exits == 0).sum())
    assert 20 < at_first < 44 and set(exits.tolist()) == {0, k - 1}
    predicted = latency.predict_ms(exits.tolist())
    per_exit = latency.ms_per_image
    assert predicted == pytest.approx(at_first * per_exit[0] + (len(x) - at_first) * per_exit[-1])
    assert latency.predict_ms([]) == 0 and math.isfinite(predicted) and predicted > 0
    seconds = wall_clocks({"backbone": model.backbone, "predictor": predictor}, [x] * 2, repeats=1)
    assert set(seconds) == {"backbone", "predictor"} and all(math.isfinite(t) and t > 0 for t in seconds.values())
