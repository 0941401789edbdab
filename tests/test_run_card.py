"""The card in a run's ``best/``: the full card (``card.run_card``, the one ``timm-scan push`` uploads) from
training on, rewritten when ``search`` saves a policy and when ``evaluate`` tests it."""

import timm_scan
from timm_scan.commands.search import ThresholdRecord
from timm_scan.model.card import run_card
from timm_scan.report import EarlyExitReport


def test_search_and_evaluate_keep_the_card_in_best_complete(tiny_parquet, tmp_path):
    from timm_scan.cli import main

    run = tmp_path / "run"
    card = run / "best" / "README.md"
    main(["train", "--dataset", str(tiny_parquet), "--output-dir", str(run), "--model", "test_resnet", "--input-size",
          "32", "--crop-pct", "1.0", "--val-size", "24", "--epochs", "1", "--batch-size", "16", "--num-workers", "0"])
    assert "## Exits" in card.read_text() and "## Early exit" not in card.read_text()

    main(["search", str(run), "--betas", "1", "--max-drop", "5", "--generations", "3"])
    policy = ThresholdRecord.load(run / "thresholds.json").policy
    thresholds = ", ".join(f"{t:.3f}" for t in policy.thresholds)
    text = card.read_text()
    assert f"Thresholds (max softmax, one per shallow exit): {thresholds}" in text
    assert policy.origin.promise in text and "## Exits" in text and "epochs=1" in text  # still the whole card
    assert "\n# run\n" in text and 'from_pretrained("hf-hub:<owner>/run")' in text  # named after the run
    assert "On the test split" not in text

    main(["evaluate", str(run), "--latency-images", "4", "--latency-images-b1", "2"])
    report = EarlyExitReport.load(run / "evaluation.json")
    text = card.read_text()
    assert f"On the test split: accuracy {100 * report.accuracy:.2f}%, MACs speed-up {report.speedup:.2f}x" in text
    assert thresholds in text and policy.origin.promise in text
    assert text == run_card(run / "best", timm_scan.from_pretrained(run / "best"))  # push's card, from the model

    main(["search", str(run), "--betas", "1", "--max-drop", "10", "--generations", "3", "--rule", "running-mean"])
    assert "On the test split" not in card.read_text()  # the earlier test results were another policy's
    policy = ThresholdRecord.load(run / "thresholds.json").policy
    assert policy.rule == "running-mean" and timm_scan.from_pretrained(run / "best").policy == policy
    assert (f"Thresholds (rule running-mean: the max of the mean softmax of the exit and every exit before it, one "
            f"per shallow exit): {', '.join(f'{t:.3f}' for t in policy.thresholds)}") in card.read_text()
    main(["evaluate", str(run), "--latency-images", "4", "--latency-images-b1", "2"])  # evaluated under the rule
    assert EarlyExitReport.load(run / "evaluation.json").policy == policy and "On the test split" in card.read_text()
