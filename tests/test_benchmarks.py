"""Each benchmark script runs on a tiny budget, so none can rot (the real runs are in benchmarks/)."""

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")


def test_early_exit_speed(tmp_path, monkeypatch):
    out = tmp_path / "speed.json"
    run("early_exit_speed.py", monkeypatch, "--sizes", "32", "--batch-sizes", "1", "4", "--images", "8",
        "--repeats", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 4] and all(r["macs_speedup"] > 1 for r in rows)


def test_timm_coverage(tmp_path, monkeypatch):
    out = tmp_path / "coverage.json"
    run("timm_coverage.py", monkeypatch, "test_resnet", "deit_tiny_distilled_patch16_224", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["ok"] for r in rows] == [True, False] and "several classifiers" in rows[1]["refusal"]


def test_threshold_search_speed(monkeypatch, capsys):
    run("threshold_search_speed.py", monkeypatch)
    assert "median" in capsys.readouterr().out
