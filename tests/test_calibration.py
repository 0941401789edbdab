"""Per-exit temperature scaling: fitted on validation outputs, used by the predictor, the search and ONNX."""

import pytest
import torch
from helpers import create

import timm_scan
from timm_scan import EarlyExitPredictor, ExitPolicy, apply_temperatures, calibrate
from timm_scan.deploy.calibration import expected_calibration_error, fit_temperature
from timm_scan.deploy.policy import simulate_early_exit


def over_confident(n=4000, classes=10, true_t=2.5, seed=0):
    """Softmax outputs 2.5x too sharp: labels drawn from softmax(z / 2.5), probs = softmax(z)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 4
    labels = torch.multinomial(torch.softmax(z / true_t, -1), 1, generator=g)[:, 0]
    return torch.softmax(z, -1), labels


def test_the_fitted_temperature_recovers_the_one_that_made_the_labels_and_lowers_ece():
    probs, labels = over_confident()
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    calibrated = apply_temperatures([probs], [t])[0]
    assert torch.equal(calibrated.argmax(-1), probs.argmax(-1))  # answers unchanged, confidences softened
    assert expected_calibration_error(calibrated, labels) < 0.5 * expected_calibration_error(probs, labels)
    assert fit_temperature(*over_confident(true_t=1.0)) == pytest.approx(1.0, rel=0.1)


def test_ece_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 0, 0])  # bin of 0.95: accuracy 0.5; bin of 0.6: accuracy 1.0
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.45 + 0.5 * 0.4)


def test_a_calibrated_model_answers_with_its_temperatures_everywhere(tmp_path):
    """Two exits (one shallow) keep the ONNX export short; the temperatures travel the same way for any."""
    model = timm_scan.wrap(create("test_resnet", num_classes=5), timm_scan.ScanConfig(exits=[0]),
                           check_input_size=(3, 32, 32)).eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        probs = [torch.softmax(z, -1) for z in model(x).logits]
    labels = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(1))
    before = model.policy
    report = calibrate(probs, labels)
    assert model.policy is before and len(report.temperatures) == len(report.before) == len(report.after) == 2
    temperatures = [0.5, 2.0]  # far from 1, so a missed division would show
    scaled = apply_temperatures(probs, temperatures)
    thresholds = [torch.quantile(p.amax(-1), 0.5).item() for p in scaled[:-1]]
    model.policy = ExitPolicy(thresholds, temperatures=temperatures)
    result = EarlyExitPredictor(model)(x)
    exit_index, confidence, expected = simulate_early_exit(probs, model.policy)
    assert torch.equal(result.exit_index, exit_index) and 0 < (exit_index < 1).sum() < 32
    torch.testing.assert_close(result.probs, expected, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path / "saved")
    loaded = timm_scan.from_pretrained(tmp_path / "saved")
    assert loaded.policy == model.policy and loaded.policy.temperatures == (0.5, 2.0)
    assert torch.equal(EarlyExitPredictor(loaded)(x).exit_index, exit_index)
    pytest.importorskip("onnxruntime")
    timm_scan.export_onnx(model, tmp_path / "onnx", (3, 32, 32))
    onnx = timm_scan.OnnxEarlyExitPredictor(tmp_path / "onnx")
    assert onnx.policy.temperatures == (0.5, 2.0) and torch.equal(onnx(x).exit_index, exit_index)


def test_the_0_1_0_calibrate_still_sets_the_model_with_a_warning_and_refuses_other_outputs():
    model = timm_scan.wrap(create("test_resnet", num_classes=5), check_input_size=(3, 32, 32))
    probs, labels = over_confident(n=50, classes=5)
    with pytest.warns(DeprecationWarning, match="calibrate"), pytest.raises(ValueError, match="all 4 exits"):
        calibrate(model, [probs] * 3, labels)
    with pytest.warns(DeprecationWarning, match="calibrate"):
        report = calibrate(model, [probs] * 4, labels)
    assert model.policy.temperatures == tuple(report.temperatures) == tuple(calibrate([probs] * 4, labels).temperatures)


def test_degenerate_and_wrong_inputs():
    """An exit right on every sample (or on none) gets a bounded temperature; logits and bad labels are refused."""
    probs, _ = over_confident(n=200)
    assert fit_temperature(probs, probs.argmax(-1)) == pytest.approx(0.05)  # always right: T → 0, held at the bound
    assert fit_temperature(probs, (probs.argmax(-1) + 1) % 10) <= 20.0
    with pytest.raises(ValueError, match="not softmax probabilities"):
        fit_temperature(torch.randn(50, 10), torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match="class indices"):
        expected_calibration_error(probs, torch.full((200,), 10))
    policy = ExitPolicy([0.5] * 3, temperatures=__import__("numpy").array([1.0, 1.5, 2.0, 1.0], dtype="float32"))
    assert policy.temperatures == (1.0, 1.5, 2.0, 1.0)  # any sequence will do
    with pytest.raises(ValueError, match="temperatures must be positive"):
        ExitPolicy(temperatures=[1.0, 0.0, 1.0])
    model = timm_scan.wrap(create("test_resnet", num_classes=5), check_input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="temperatures must be 4"):
        model.policy = ExitPolicy(temperatures=[1.0, 2.0])
