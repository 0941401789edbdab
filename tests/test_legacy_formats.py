"""Folders, runs and ONNX exports written by older timm-scan load with this code and answer as they did
(issue 32): the same labels and exits, and the same logits to float32 precision across CPUs.

The fixtures in ``tests/fixtures/legacy/<version>/`` were written by that version's own code
(``tests/fixtures/legacy/make_fixtures.py`` says how): ``v0_1_0`` by the 0.1.0 release, ``pre_policy``
by the code before the ExitPolicy refactor (loose thresholds, fallback and temperatures). Each holds a
saved model with thresholds (and for ``pre_policy`` a calibrated copy with temperatures and a measured
exit latency, and the ONNX exports of both), a finished training run searched and evaluated, and
``expected.safetensors``: a fixed batch and what that version answered for it.

Only public behaviour is used: the predictors are built without thresholds (they run the saved ones),
and saved thresholds are read from the JSON files, whose old layout (``thresholds``, ``fallback``,
``temperatures`` at the top level) is part of what is tested.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import timm_scan
from timm_scan.commands.search import ThresholdRecord
from timm_scan.training import epoch_metrics, load_run, run_results

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
VERSIONS = ["v0_1_0", "pre_policy"]
MODELS = [("v0_1_0", "model"), ("pre_policy", "model"), ("pre_policy", "model_calibrated")]
ONNX = [("pre_policy", "onnx"), ("pre_policy", "onnx_calibrated")]
# logits: float32 computed on another CPU differs in its last bits (other kernels, other summation orders);
# on a second machine, up to 2e-4 relative on large logits and 1e-3 on one near zero beside large ones.
# A wrong weight or config moves them by whole units.
RTOL, ATOL_OF_LARGEST = 1e-3, 1e-4
TOL = dict(atol=1e-5, rtol=1e-5)  # confidences and probabilities, in [0, 1]


@cache
def expected(version: str) -> dict[str, torch.Tensor]:
    return load_file(str(LEGACY / version / "expected.safetensors"))


def stored_logits(version: str, prefix: str) -> list[torch.Tensor]:
    exp = expected(version)
    k = sum(1 for key in exp if key.startswith(f"{prefix}/logits/"))
    assert k == 4, f"the fixture stores {k} exits' logits"
    return [exp[f"{prefix}/logits/{i}"] for i in range(k)]


def assert_logits(model, images: torch.Tensor, want: list[torch.Tensor]) -> None:
    with torch.no_grad():
        got = model(images).logits
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        atol = ATOL_OF_LARGEST * max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, rtol=RTOL, atol=atol, msg=lambda m, i=i: f"exit {i}: {m}")


def assert_answers(result, version: str, prefix: str) -> None:
    """The same labels and exits as the old version gave, and its confidences and probabilities."""
    exp = expected(version)
    assert torch.equal(result.exit_index.cpu(), exp[f"{prefix}/exit_index"]), (
        f"exits {result.exit_index.tolist()} != stored {exp[f'{prefix}/exit_index'].tolist()}")
    assert torch.equal(result.labels.cpu(), exp[f"{prefix}/labels"])
    torch.testing.assert_close(result.confidence.cpu(), exp[f"{prefix}/confidence"], **TOL)
    torch.testing.assert_close(result.probs.cpu(), exp[f"{prefix}/probs"], **TOL)


def scan_json(folder: Path) -> dict:
    return json.loads((folder / "scan_config.json").read_text())


def test_the_fixtures_are_there_and_mix_exits():
    """A guard on the fixtures themselves: the batch leaves at every exit (so the saved thresholds,
    not a default, decide where), and the old files use the layout this test reads."""
    for version, folder in MODELS:
        exits = expected(version)[f"{folder}/predictor/exit_index"]
        assert sorted(set(exits.tolist())) == [0, 1, 2, 3], (version, folder, exits)
        meta = scan_json(LEGACY / version / folder)
        assert len(meta["thresholds"]) == 3 and meta["fallback"] == "ensemble"
    assert scan_json(LEGACY / "pre_policy" / "model_calibrated")["temperatures"] == [1.6, 0.7, 1.3, 0.9]


@pytest.mark.parametrize(("version", "folder"), MODELS)
def test_a_saved_model_loads_and_answers_as_before(version, folder):
    model = timm_scan.from_pretrained(LEGACY / version / folder).eval()
    images = expected(version)["images"]
    assert_logits(model, images, stored_logits(version, folder))
    assert_answers(timm_scan.EarlyExitPredictor(model)(images), version, f"{folder}/predictor")


@pytest.mark.parametrize(("version", "folder"), ONNX)
def test_an_onnx_export_loads_and_answers_as_before(version, folder):
    pytest.importorskip("onnxruntime")
    images = expected(version)["images"]
    result = timm_scan.OnnxEarlyExitPredictor(LEGACY / version / folder)(images)
    assert_answers(result, version, f"{folder}/predictor")
    # and as the torch model it was exported from
    model_folder = folder.replace("onnx", "model")
    assert torch.equal(result.exit_index.cpu(), expected(version)[f"{model_folder}/predictor/exit_index"])


@pytest.mark.parametrize("version", VERSIONS)
def test_a_training_run_loads_and_answers_as_before(version):
    run = LEGACY / version / "run"
    model, cfg = load_run(run)
    assert cfg.model == "test_efficientnet" and cfg.epochs == 3 and cfg.input_size == 32
    images = expected(version)["run/images"]
    assert_logits(model, images, stored_logits(version, "run"))
    assert_answers(timm_scan.EarlyExitPredictor(model)(images), version, "run/predictor")


@pytest.mark.parametrize("version", VERSIONS)
def test_a_training_runs_records_load(version):
    run = LEGACY / version / "run"
    results = run_results(run)
    raw = json.loads((run / "results.json").read_text())
    assert results.model == raw["model"] == "test_efficientnet"
    assert results.best_epoch == raw["best_epoch"]
    assert list(results.val.exits) == raw["val"]["exits"] and list(results.test.exits) == raw["test"]["exits"]
    assert list(results.exit_macs) == raw["exit_macs"]

    metrics = epoch_metrics(run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert [m.epoch for m in metrics] == [line["epoch"] for line in lines] == [1, 2, 3]
    assert [list(m.val.exits) for m in metrics] == [line["val"]["exits"] for line in lines]
    assert [list(m.ce) for m in metrics] == [line["ce"] for line in lines]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_runs_threshold_record_loads_and_matches_its_best_model(version):
    run = LEGACY / version / "run"
    record = ThresholdRecord.load(run / "thresholds.json")
    saved = scan_json(run / "best")["thresholds"]
    assert len(saved) == 3
    assert [float(t) for t in record.thresholds] == saved
    assert [float(t) for t in record.thresholds] == json.loads((run / "thresholds.json").read_text())["chosen"]["thresholds"]
    raw = json.loads((run / "thresholds.json").read_text())
    assert record.chosen.accuracy == pytest.approx(raw["chosen"]["accuracy"] / 100)  # percent then, fractions now
    assert record.chosen.speedup == raw["chosen"]["acceleration"]
    assert record.baseline_accuracy == pytest.approx(raw["baseline_accuracy"] / 100)
    assert record.policy.fallback == raw["fallback"] and record.policy.origin.objective == "beta"
    assert [p.speedup for p in record.sweep] == [p["acceleration"] for p in raw["sweep"]]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_runs_evaluation_loads(version):
    from timm_scan.report import EarlyExitReport

    path = LEGACY / version / "run" / "evaluation.json"
    report, raw = EarlyExitReport.load(path), json.loads(path.read_text())
    assert report.speedup == raw["macs_speedup"] and report.accuracy == raw["accuracy"]
    assert list(report.policy.thresholds) == raw["thresholds"] and report.policy.fallback == raw["fallback"]
    assert [p.speedup for p in report.sweep] == [p["macs_speedup"] for p in raw["sweep"]]
