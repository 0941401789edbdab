"""benchmarks/peer_earlyon.py on a tiny budget: a 1-epoch run of ours, earlyon trained for 1 epoch beside it."""

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from timm_scan.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
BACKBONE, OURS, PEER = "plain timm backbone (our weights)", "timm-scan (SD)", "earlyon"
OURS_ONNX, BACKBONE_ONNX = "timm-scan (SD), ONNX Runtime", "plain backbone, ONNX Runtime"


def run_benchmark(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["peer_earlyon.py", *args])
    runpy.run_path(str(ROOT / "benchmarks" / "peer_earlyon.py"), run_name="__main__")


@pytest.fixture
def one_thread():
    """Timings are not the point here; one thread keeps the test quick on a busy machine too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_latency_curves(report, onnx=False):
    """The accuracy-against-latency curves: each method's points timed at batch 1 and 256, the backbone's
    point, accuracies where the protocol says they come from, and a verdict that follows from them.
    ``onnx``: with the ONNX Runtime curve (``--onnx``), checked the same way."""
    curves, methods, rows = report["latency_curves"], report["methods"], report["rows"]
    assert list(curves) == ["1", "256"]
    for key, curve in curves.items():
        b = int(key)
        assert curve["batch_size"] == b and curve["images_timed"] == {1: 4, 256: 16}[b]
        assert curve["memory_format"] == "channels_last"  # the default: the README's advice on CPU
        latency = curve["exit_latency"]  # what our search used as the cost
        assert latency["batch_size"] == min(b, curve["images_timed"]) and latency["memory_format"] == "channels_last"
        assert len(latency["ms_per_image"]) == 4 and latency["backbone_ms_per_image"] > 0
        assert list(curve["methods"]) == [BACKBONE, OURS, PEER] + ([BACKBONE_ONNX, OURS_ONNX] if onnx else [])
        if onnx:
            check_onnx_curve(curve)
        (backbone,) = curve["methods"][BACKBONE]
        ours, peer = curve["methods"][OURS], curve["methods"][PEER]
        assert ours and peer and backbone["speedup_vs_backbone"] == 1 and backbone["timed_macs_fraction"] == 1
        # every search is a point (identical thresholds merged, settings joined) or skipped with a reason
        searched = [s for p in ours for s in p["setting"].split(", ")] + [
            s["setting"] for s in curve["skipped"] if s["method"] == OURS]
        assert sorted(searched) == sorted(["β=0.1", "β=10", "max-drop=1pt", "ms-budget=0.5"])
        assert all(s["reason"] for s in curve["skipped"])
        assert len({tuple(p["thresholds"]) for p in ours}) == len(ours)
        # earlyon: its calibrated policies, identical ones merged (on this tiny run they may all agree)
        assert sorted(s for p in peer for s in p["setting"].split(", ")) == ["budget=0.5", "budget=1", "drop=0.01"]
        calibrated = {r["setting"]: r for r in rows if r["method"] == PEER}
        for p in peer:
            row = calibrated[p["setting"].split(", ")[0]]
            assert p["enabled_exits"] == row["enabled_exits"] and p["simulated_accuracy"] == row["test_accuracy"]
        for p in [backbone, *ours, *peer]:
            assert p["ms_per_image"] > 0 and p["speedup_vs_backbone"] > 0 and p["mean_macs_fraction"] > 0
            assert 0 <= p["accuracy"] <= 1 and 0 <= p["timed_accuracy"] <= 1 and 0 <= p["simulated_accuracy"] <= 1
            if b == 1:  # per-sample decisions: the whole test split, checked against the timed answers
                assert p["accuracy"] == p["simulated_accuracy"] and 0 <= p["agreement_with_simulation"] <= 1
            else:  # earlyon's batched mode is not its per-sample policy: the timed run's own answers
                assert p["accuracy"] == p["timed_accuracy"] and p["mean_macs_fraction"] == p["timed_macs_fraction"]
                assert (p["agreement_with_simulation"] is None) == (p["method"] == PEER)
        assert backbone["simulated_accuracy"] == methods[OURS]["test_exit_accuracy"][-1]
        verdict = curve["verdict"]
        assert len(verdict["margins"]) == len(peer) and len(verdict["reverse_margins"]) == len(ours)
        for p, m in zip(peer, verdict["margins"]):
            as_fast = [q["accuracy"] for q in ours if q["ms_per_image"] <= p["ms_per_image"]]
            assert m["margin"] == (max(as_fast) - p["accuracy"] if as_fast else None)
        assert verdict["ours_above_earlyon"] == all(m["margin"] is not None and m["margin"] >= -1e-9
                                                    for m in verdict["margins"])
        assert isinstance(verdict["ours_above_earlyon_counting_backbone"], bool)
        assert isinstance(verdict["earlyon_above_ours"], bool)


def check_onnx_curve(curve):
    """``--onnx``: our exported model's points, searched against ONNX Runtime's own measured latency,
    and the exported backbone, timed beside the rest, with a verdict of their own."""
    b = curve["batch_size"]
    latency = curve["exit_latency_onnx"]
    assert latency["batch_size"] == min(b, curve["images_timed"]) and "onnxruntime" in latency["device"]
    assert latency["memory_format"] == "contiguous"  # timed by the ONNX predictor, not by torch's timer
    (backbone,) = curve["methods"][BACKBONE_ONNX]
    ours, peer = curve["methods"][OURS_ONNX], curve["methods"][PEER]
    assert backbone["speedup_vs_backbone"] == 1 and backbone["timed_macs_fraction"] == 1
    searched = [s for p in ours for s in p["setting"].split(", ")] + [
        s["setting"] for s in curve["skipped"] if s["method"] == OURS_ONNX]
    assert sorted(searched) == sorted(["β=0.1", "β=10", "max-drop=1pt", "ms-budget=0.5"])
    for p in ours:  # speed-ups over the exported backbone, not torch's
        assert p["method"] == OURS_ONNX and p["ms_per_image"] > 0 and 0 <= p["accuracy"] <= 1
        assert p["speedup_vs_backbone"] == pytest.approx(backbone["ms_per_image"] / p["ms_per_image"])
        assert p["predicted_ms_per_image"] > 0 and 0 <= p["agreement_with_simulation"] <= 1
        if b == 1:
            assert p["accuracy"] == p["simulated_accuracy"]
    verdict = curve["verdict_onnx"]
    assert len(verdict["margins"]) == len(peer) and len(verdict["reverse_margins"]) == len(ours)
    for p, m in zip(peer, verdict["margins"]):
        as_fast = [q["accuracy"] for q in ours if q["ms_per_image"] <= p["ms_per_image"]]
        assert m["margin"] == (max(as_fast) - p["accuracy"] if as_fast else None)


def test_peer_earlyon(tiny_parquet, tmp_path, monkeypatch, capsys, one_thread):
    ours = tmp_path / "runs" / "ours"
    Trainer(TrainConfig(dataset=str(tiny_parquet), output_dir=str(ours), model="test_resnet", input_size=32,
                        crop_pct=1.0, val_size=24, epochs=1, anneal_epochs=0, batch_size=16, num_workers=0)).fit()
    out = tmp_path / "peer.json"
    args = ["--ours", str(ours), "--out", str(out), "--num-workers", "0", "--betas", "0.1", "10",
            "--earlyon-budgets", "0.5", "1", "--earlyon-drops", "0.01", "--latency-images", "16",
            "--latency-images-b1", "4", "--repeats", "1", "--drops", "1", "--latency-budgets", "0.5"]
    run_benchmark(monkeypatch, *args)

    report = json.loads(out.read_text())
    methods = report["methods"]
    assert list(methods) == ["timm-scan (SD)", "earlyon"] and report["exit_layers"] == ["layer1", "layer2", "layer3"]
    assert report["test_samples"] == 32 and report["val_samples"] == 24
    for m in methods.values():
        assert len(m["exit_macs"]) == len(m["test_exit_accuracy"]) == 4
        assert 0 < m["exit_macs"][0] < m["exit_macs"][-1] and all(0 <= a <= 1 for a in m["test_exit_accuracy"])
    # the backbone is the same timm model on both sides: its MACs bound earlyon's exits from below
    assert methods["earlyon"]["exit_macs"][-1] >= report["backbone_macs"] > methods["earlyon"]["exit_macs"][-2]
    rows = report["rows"]
    assert [r["setting"] for r in rows] == ["β=0.1", "β=10", "budget=0.5", "budget=1", "drop=0.01"]
    for r in rows:
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1 and r["test_macs"] > 0
        assert sum(r["test_exit_shares"]) == pytest.approx(1)
    # earlyon at budget 1 disables every exit: the plain backbone, at exactly its MACs
    assert rows[3]["enabled_exits"] == [False] * 3 and rows[3]["test_macs"] == report["backbone_macs"]
    assert rows[3]["test_accuracy"] == methods["earlyon"]["test_exit_accuracy"][-1]
    check_latency_curves(report)
    assert [r["budget_fraction"] for r in report["equal_macs"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for name, m in methods.items():  # at 100% the deepest exit alone (the backbone) fits
        assert report["equal_macs"][-1][name] >= m["test_exit_accuracy"][-1]
    assert out.with_suffix(".png").is_file()
    weights = tmp_path / "runs" / "earlyon" / "model.safetensors"
    assert weights.is_file() and json.loads(weights.with_name("training.json").read_text())["best_epoch"] == 1
    printed = capsys.readouterr().out
    assert "| MACs budget" in printed and "curve above earlyon's" in printed
    assert out.with_name("peer_latency.png").is_file()

    # a second run reuses earlyon's weights and reports the same numbers; with --onnx, a third curve
    onnx = importlib.util.find_spec("onnxruntime") is not None  # the [onnx] extra, which dev installs
    trained_at = weights.stat().st_mtime
    run_benchmark(monkeypatch, *args, *(["--onnx"] if onnx else []))
    printed = capsys.readouterr().out
    assert "earlyon: loaded" in printed and weights.stat().st_mtime == trained_at
    second = json.loads(out.read_text())
    assert second["rows"] == rows
    if onnx:
        assert f"{OURS_ONNX} curve above earlyon's" in printed
        check_latency_curves(second, onnx=True)
    # a different recipe does not silently reuse them
    with pytest.raises(ValueError, match="--retrain"):
        run_benchmark(monkeypatch, *args, "--epochs", "2")


def test_our_budget_targets_are_fractions_of_the_measured_backbone_time():
    """``--latency-budgets f``: the most accurate thresholds whose mean cost on val is within f times the
    backbone's ms per image; below the first exit's own cost, skipped with the search's reason."""
    from timm_scan import ExitCosts
    from timm_scan.deploy.thresholds import ExitTable
    from timm_scan.report import ExitLatency

    bench = runpy.run_path(str(ROOT / "benchmarks" / "peer_earlyon.py"))
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    probs = [torch.softmax(torch.randn(200, 5, generator=g) + (1.0 + i) * torch.nn.functional.one_hot(labels, 5),
                           -1) for i in range(3)]
    outputs = bench["Outputs"](probs, labels, probs, labels)
    latency = ExitLatency([1.0, 2.0, 3.0], 3.0, 1, [3, 32, 32], "float32", "contiguous", "test")
    points, skipped = bench["ours_latency_points"](outputs, latency, [], [], [0.2, 0.5], 0, [10, 20, 30], 30)
    (point,) = points
    assert point.setting == "ms-budget=0.5" and [s["setting"] for s in skipped] == ["ms-budget=0.2"]
    _, speedup = ExitTable.from_outputs(probs, labels, ExitCosts.from_latency(latency)).evaluate([point.thresholds])
    assert 1.0 <= 3.0 / float(speedup[0]) <= 0.5 * 3.0  # within 1.5 ms, not within 0.5 ms (unscaled)
    assert "budget" in skipped[0]["reason"]


def test_the_verdict_on_hand_made_curves():
    """Ours lies above earlyon's curve when every earlyon point has a point of ours at most as slow and at
    least as accurate; one earlyon point faster than all of ours breaks it."""
    peer = runpy.run_path(str(ROOT / "benchmarks" / "peer_earlyon.py"))
    point = peer["CurvePoint"]

    def curve(ours, theirs):
        return {BACKBONE: [point(BACKBONE, "-", ms_per_image=5.0, accuracy=0.60)],
                OURS: [point(OURS, f"o{i}", ms_per_image=ms, accuracy=a) for i, (ms, a) in enumerate(ours)],
                PEER: [point(PEER, f"p{i}", ms_per_image=ms, accuracy=a) for i, (ms, a) in enumerate(theirs)]}

    found = peer["verdict"](curve([(1.0, 0.50), (3.0, 0.58)], [(2.0, 0.45), (4.0, 0.55)]))
    assert found["ours_above_earlyon"] and not found["earlyon_above_ours"]
    assert [m["margin"] for m in found["margins"]] == pytest.approx([0.05, 0.03])
    found = peer["verdict"](curve([(1.0, 0.50), (3.0, 0.58)], [(0.5, 0.40), (4.0, 0.55)]))
    assert not found["ours_above_earlyon"] and found["margins"][0]["margin"] is None
    found = peer["verdict"](curve([(1.0, 0.50)], [(4.0, 0.55)]))  # the backbone (5 ms) is slower than earlyon
    assert not found["ours_above_earlyon"] and not found["ours_above_earlyon_counting_backbone"]
    found = peer["verdict"](curve([(1.0, 0.50)], [(6.0, 0.55)]))
    assert not found["ours_above_earlyon"] and found["ours_above_earlyon_counting_backbone"]


def test_earlyon_training_resumes_exactly_after_an_interruption(tmp_path, one_thread):
    """The peer's training saves its state after each epoch; a run stopped after epoch 1 and started again
    ends with the same weights, bit for bit, as one that was never stopped (torch's and Python's RNG
    restored)."""
    import random

    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, TensorDataset

    peer = runpy.run_path(str(ROOT / "benchmarks" / "peer_earlyon.py"))
    cfg = TrainConfig(dataset="unused", model="resnet18", epochs=2, batch_size=8, lr=0.05, num_workers=0)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 3, 32, 32, generator=generator),
                         torch.randint(0, 10, (40,), generator=generator))

    class Jittered(torch.utils.data.Dataset):  # a transform that draws from Python's RNG, as timm's do
        def __len__(self):
            return 32

        def __getitem__(self, i):
            image, label = data[i]
            return image * (1 + 0.1 * random.random()), label

    train = DataLoader(Jittered(), batch_size=8, shuffle=True, drop_last=True)  # no workers: the main process draws
    val = DataLoader(torch.utils.data.Subset(data, range(32, 40)), batch_size=8)
    layers, trained_on = ["layer1", "layer2", "layer3"], {"recipe": {"epochs": 2}, "exit_layers": ["layer1"]}

    def train_in(folder):
        model = peer["build_earlyon"](cfg, layers, 10, 32)
        return model, peer["train_earlyon"](model, cfg, train, val, folder, trained_on)

    whole, whole_meta = train_in(tmp_path / "whole")
    save = peer["save_earlyon_progress"]

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt

    peer["train_earlyon"].__globals__["save_earlyon_progress"] = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train_in(tmp_path / "stopped")
    finally:
        peer["train_earlyon"].__globals__["save_earlyon_progress"] = save
    assert json.loads((tmp_path / "stopped" / "training_state.json").read_text())["progress"]["epochs_done"] == 1
    resumed, resumed_meta = train_in(tmp_path / "stopped")
    assert resumed_meta["val_accuracy_per_epoch"] == whole_meta["val_accuracy_per_epoch"]
    assert resumed_meta["best_epoch"] == whole_meta["best_epoch"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # the best epoch's weights
    last = [load_file(str(tmp_path / run / "training_state.safetensors")) for run in ("whole", "stopped")]
    assert last[0].keys() == last[1].keys()
    for name in last[0]:
        assert torch.equal(last[0][name], last[1][name]), name  # the last epoch's weights, optimizer and RNG
    with pytest.raises(ValueError, match="another recipe"):
        peer["train_earlyon"](peer["build_earlyon"](cfg, layers, 10, 32), cfg, train, val, tmp_path / "stopped",
                              {**trained_on, "exit_layers": ["layer2"]})
