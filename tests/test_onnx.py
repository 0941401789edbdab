"""Export that keeps the early exit: ONNX graphs per section and exit, run by ONNX Runtime."""

import asyncio
import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import timm
import torch
from fuzz_folders import mutate_onnx
from helpers import answer_all, create, mixing_thresholds

import timm_scan
from timm_scan import EarlyExitPredictor, ExitPolicy, OnnxEarlyExitPredictor, export_onnx
from timm_scan.deploy.onnx import OnnxManifest, session_options
from timm_scan.deploy.policy import decision_probs, simulate_early_exit

pytest.importorskip("onnxruntime")


LATENCY = {"ms_per_image": [1.0, 2.0, 3.0, 4.0], "backbone_ms_per_image": 3.5, "batch_size": 1,
           "input_size": [3, 32, 32],
           "dtype": "float32", "memory_format": "contiguous", "device": "CPUExecutionProvider: test"}


def probs_of(model, x):
    with torch.no_grad():
        return [torch.softmax(z, -1) for z in model(x).logits]


def thresholds_for(model, x):
    """Thresholds that send some samples out at every shallow exit, clear of float ties."""
    return mixing_thresholds(probs_of(model, x)[:-1], (0.6, 0.5, 0.4, 0.3))


def assert_same_answers(model, folder, x, thresholds, fallback="ensemble", rule="own"):
    policy = ExitPolicy(thresholds, fallback, rule=rule)
    torch_result = EarlyExitPredictor(model, policy)(x)
    onnx_result = OnnxEarlyExitPredictor(folder, policy)(x)
    assert torch.equal(torch_result.exit_index, onnx_result.exit_index)
    assert torch.equal(torch_result.labels, onnx_result.labels)
    assert torch.equal(torch_result.macs, onnx_result.macs)
    torch.testing.assert_close(onnx_result.probs, torch_result.probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(onnx_result.confidence, torch_result.confidence, rtol=1e-4, atol=1e-5)
    return onnx_result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = timm_scan.wrap(create("test_resnet", num_classes=5), check_input_size=(3, 32, 32)).eval()
    model.policy = ExitPolicy([0.5, 0.5, 0.5], "deepest")
    model.class_names = list("abcde")
    model.data_config = timm.data.resolve_model_data_config(model.backbone, args={"input_size": (3, 32, 32)})
    folder = tmp_path_factory.mktemp("onnx")
    return model, folder, export_onnx(model, folder, (3, 32, 32))


@pytest.mark.parametrize("fallback", ["ensemble", "deepest"])
def test_onnx_runtime_answers_as_the_torch_predictor(exported, fallback):
    model, folder, manifest = exported
    assert manifest.sections == [f"section_{k}.onnx" for k in range(4)] and manifest.exit_macs == model.exit_macs((3, 32, 32))
    x = torch.randn(24, 3, 32, 32)
    thresholds = thresholds_for(model, x)
    result = assert_same_answers(model, folder, x, thresholds, fallback)
    assert len(set(result.exit_index.tolist())) == 4  # a real mix of exits
    for image in x[:6]:  # batch 1
        assert_same_answers(model, folder, image[None], thresholds, fallback)


def test_the_service_serves_the_export_batched_per_section(exported):
    """`timm_scan.serve.app.load` of an export, and its graphs run by the service's `SectionBatcher`: each image
    answered as the torch predictor answers it, whatever batch it ran in."""
    pytest.importorskip("ray")
    from timm_scan.serve.app import load
    from timm_scan.serve.batcher import SectionBatcher

    model, folder, _ = exported
    served = load(folder)
    assert served.engine.startswith("onnxruntime") and served.class_names == model.class_names
    assert served.data_config["input_size"] == [3, 32, 32] and served.num_exits == model.num_exits
    x = torch.randn(24, 3, 32, 32)
    policy = ExitPolicy(thresholds_for(model, x), "ensemble", rule="running-mean")
    expected = EarlyExitPredictor(model, policy)(x)

    batcher = SectionBatcher(OnnxEarlyExitPredictor(folder, policy), (32, 32), max_batch_size=8, batch_wait_s=0.01)
    got = asyncio.run(answer_all(batcher, x))
    assert [e for _, e in got] == expected.exit_index.tolist() and len({e for _, e in got}) > 1
    torch.testing.assert_close(torch.stack([p for p, _ in got]), expected.probs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fallback", ["ensemble", "deepest"])
def test_onnx_runtime_runs_the_running_mean_rule_as_simulated(exported, fallback, tmp_path):
    model, folder, _ = exported
    x = torch.randn(24, 3, 32, 32)
    probs = probs_of(model, x)
    thresholds = mixing_thresholds(decision_probs(probs, "running-mean")[:-1], (0.6, 0.5, 0.4))
    result = assert_same_answers(model, folder, x, thresholds, fallback, "running-mean")
    exit_index, confidence, expected = simulate_early_exit(probs, ExitPolicy(thresholds, fallback, rule="running-mean"))
    assert torch.equal(result.exit_index, exit_index) and len(set(exit_index.tolist())) == 4
    torch.testing.assert_close(result.probs, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.confidence, confidence, rtol=1e-4, atol=1e-5)
    for image in x[:6]:  # batch 1
        assert_same_answers(model, folder, image[None], thresholds, fallback, "running-mean")
    carried = tmp_path / "carried"  # a manifest's policy carries the rule
    shutil.copytree(folder, carried)
    manifest = json.loads((carried / "manifest.json").read_text())
    manifest["policy"].update(thresholds=thresholds, fallback=fallback, rule="running-mean")
    (carried / "manifest.json").write_text(json.dumps(manifest))
    assert torch.equal(OnnxEarlyExitPredictor(carried)(x).exit_index, exit_index)


def test_the_manifest_carries_thresholds_classes_and_costs(exported):
    model, folder, manifest = exported
    predictor = OnnxEarlyExitPredictor(folder)  # the manifest's thresholds and fallback
    assert predictor.policy == ExitPolicy([0.5, 0.5, 0.5], "deepest")
    assert manifest.class_names == list("abcde") and manifest.num_classes == 5
    assert manifest.backbone_macs == model.backbone_macs((3, 32, 32)) and manifest.stages[0] == "layer1"
    result = predictor(np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32))  # numpy in
    assert result.labels.shape == (3,) and predictor(torch.zeros(0, 3, 32, 32)).probs.shape == (0, 5)


def test_exit_latency_timed_with_onnx_runtime_travels_in_the_manifest(exported, tmp_path):
    _, folder, _ = exported
    latency = OnnxEarlyExitPredictor(folder).measure_exit_latency(batch_size=2, images=16, repeats=5)
    assert len(latency.ms_per_image) == 4 and latency.backbone_ms_per_image > 0
    assert latency.batch_size == 2 and latency.input_size == [3, 32, 32] and "onnxruntime" in latency.device
    assert "onnxruntime's default threads" in latency.device
    two_threads = OnnxEarlyExitPredictor(folder, session_options=session_options(threads=2))
    assert ", 2 threads," in two_threads.measure_exit_latency(batch_size=2, images=2, repeats=1).device
    assert latency.ms_per_image == sorted(latency.ms_per_image)  # cumulative by construction, not a timing claim
    assert all(0 < v < float("inf") for v in [*latency.ms_per_image, latency.backbone_ms_per_image])  # layer1 alone against the whole network
    copied = tmp_path / "copied"
    shutil.copytree(folder, copied)
    assert "exit_latency" not in json.loads((copied / "manifest.json").read_text())  # unmeasured: 0.1.0's format
    manifest = OnnxManifest.load(copied / "manifest.json")
    manifest.exit_latency = [latency]
    manifest.save(copied / "manifest.json")
    assert OnnxEarlyExitPredictor(copied).exit_latency == [latency]
    manifest.exit_latency = [dataclasses.replace(latency, ms_per_image=latency.ms_per_image[:3])]
    manifest.save(copied / "manifest.json")
    with pytest.raises(ValueError, match="4 values per measurement"):
        OnnxEarlyExitPredictor(copied)
    with pytest.raises(ValueError, match="batch_size"):
        OnnxEarlyExitPredictor(folder).measure_exit_latency(batch_size=0)


def as_version(manifest, version, **changes):
    """``manifest`` (format 4) in an earlier format: without the graphs' checksums, and for versions 1 and 2
    with the policy's fields loose, as they wrote them."""
    if version == 3:
        return {k: v for k, v in manifest.items() if k != "sha256"} | {"format_version": 3, **changes}
    old = {k: v for k, v in manifest.items() if k not in ("policy", "sha256")}
    policy = manifest["policy"]
    old.update(format_version=version, thresholds=policy["thresholds"], fallback=policy["fallback"], **changes)
    if policy["temperatures"] is not None:
        old["temperatures"] = policy["temperatures"]
    return old


def test_a_0_1_0_manifest_still_loads(exported, tmp_path):
    """0.1.0 wrote the policy's fields loose and ``exit_latency_ms: null`` (never a value), read as no measurement."""
    _, folder, _ = exported
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(as_version(manifest, 1, exit_latency_ms=None)))
    predictor = OnnxEarlyExitPredictor(old)
    assert predictor.exit_latency == [] and predictor.policy == ExitPolicy([0.5, 0.5, 0.5], "deepest")
    with pytest.warns(DeprecationWarning, match="ExitPolicy"):
        assert OnnxEarlyExitPredictor(old, [0.9, 0.9, 0.9]).policy == ExitPolicy([0.9, 0.9, 0.9], "ensemble")


def test_the_latency_device_names_the_thread_pool(monkeypatch):
    from types import SimpleNamespace

    from timm_scan.deploy import onnx

    def session(per_session: bool, threads: int):
        options = SimpleNamespace(use_per_session_threads=per_session, intra_op_num_threads=threads)
        return SimpleNamespace(get_session_options=lambda: options)

    assert onnx._thread_count(session(True, 1)) == "1 thread"
    assert onnx._thread_count(session(False, 0)) == "onnxruntime's global thread pool"  # set up elsewhere
    monkeypatch.setattr(onnx, "_GLOBAL_POOL", [2])
    assert onnx._thread_count(session(False, 0)) == "2 threads (global pool)"


def test_the_predictor_leaves_torch_threads_and_sessions_as_documented(exported):
    _, folder, _ = exported
    assert session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        predictor = OnnxEarlyExitPredictor(folder)
        predictor(torch.randn(2, 3, 32, 32))
        assert torch.get_num_threads() == 2  # one thread inside the call, restored after
        with pytest.raises(ValueError):
            predictor(torch.randn(2, 3, 16, 16))
        assert torch.get_num_threads() == 2  # restored after an error too
    finally:
        torch.set_num_threads(threads)


def test_bad_inputs_and_damaged_folders(exported, tmp_path):
    model, folder, _ = exported
    predictor = OnnxEarlyExitPredictor(folder)
    for images, message in ((torch.randn(2, 3, 64, 64), r"float32 \(batch, 3, 32, 32\)"),
                            (torch.randn(2, 3, 32, 32, dtype=torch.float64), "float32"),
                            (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float tensor"),
                            (torch.full((1, 3, 32, 32), float("nan")), "NaN")):
        with pytest.raises(ValueError, match=message):
            predictor(images)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / "exit_2.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="exit_2.onnx does not have the SHA-256 checksum recorded"):
        OnnxEarlyExitPredictor(damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    (damaged / "manifest.json").write_text(json.dumps(as_version(manifest, 3)))  # no checksums: the graph is read
    with pytest.raises(ValueError, match="exit_2.onnx: cannot be loaded as an ONNX graph"):
        OnnxEarlyExitPredictor(damaged)
    (damaged / "exit_2.onnx").unlink()
    with pytest.raises(ValueError, match="graph exit_2.onnx named in manifest.json is missing"):
        OnnxEarlyExitPredictor(damaged)
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="exit_2.onnx named in manifest.json is missing"):
        OnnxEarlyExitPredictor(damaged)
    shutil.copy(folder / "exit_2.onnx", damaged / "exit_2.onnx")
    manifest = json.loads((damaged / "manifest.json").read_text())
    for change, message in ((lambda m: m["sections"].pop(), "do not match"),
                            (lambda m: m.update(exits=["../../etc/passwd"] * 4), "field 'exits'"),
                            (lambda m: m.update(input_size=[3, "32", 32]), "field 'input_size'"),
                            (lambda m: m.update(input_size=[3, 64, 64]), "does not match graph section_0.onnx"),
                            (lambda m: m.update(num_classes=7), "does not match graph exit_0.onnx"),
                            (lambda m: m.update(surprise=1), "unknown OnnxManifest field"),
                            (lambda m: m["policy"].update(thresholds=[0.5, 2.0, 0.5]), r"thresholds\[1\]"),
                            (lambda m: m["policy"].update(temperatures=[1.0, 2.0]), "temperatures must be 4"),
                            (lambda m: m.update(exit_latency=[{"ms_per_image": [1.0] * 4}]), "not a valid|missing"),
                            (lambda m: m.update(exit_latency=LATENCY), "field .exit_latency. must be a list of ExitLatency"),
                            (lambda m: m.update(exit_latency=[{**LATENCY, "ms_per_image": [2.0, 1.0, 3.0, 4.0]}]),
                             "cumulative"),
                            (lambda m: m.update(format_version=5), "versions 1, 2, 3, 4"),
                            (lambda m: m.update(format_version=True), "version True"),
                            (lambda m: m.update(exit_macs=m["exit_macs"][::-1]), "never decreasing"),
                            (lambda m: m.update(backbone_macs=0), "field 'backbone_macs'"),
                            (lambda m: m.update(sha256=None), "field 'sha256'"),
                            (lambda m: m["sha256"].pop("exit_1.onnx"), "field 'sha256'"),
                            (lambda m: m["sha256"].update({"../model.safetensors": "0" * 64}), "field 'sha256'"),
                            (lambda m: as_version(m, 3, sha256=m["sha256"]), "absent before format version 4"),
                            (lambda m: m["data_config"].update(std=[0.0, 1.0, 1.0]), "data config field 'std'"),
                            (lambda m: m["data_config"].update(mean=[float("nan")] * 3), "data config field 'mean'"),
                            (lambda m: m["data_config"].update(crop_pct=1e-9), "data config field 'crop_pct'"),
                            (lambda m: m["policy"].update(temperatures=[1e-300, 1.0, 1.0, 1.0]), "temperatures"),
                            (lambda m: as_version(m, 2), "version 2 needs state_layout"),
                            (lambda m: as_version(m, 1, state_layout=[[[0, 1]]] * 3), "version 1 has no state_layout"),
                            (lambda m: m.update(state_layout=[[[0, 0]]] * 3), "field 'state_layout'"),
                            (lambda m: as_version(m, 2, state_layout=[[[0, 1]]] * 2), "must describe 3 states"),
                            (lambda m: m.update(state_layout=[[[0, 1], [1, 1]]] * 3),
                             "section_0.onnx: not a timm-scan graph of this manifest .* and 2 outputs"),
                            (lambda m: as_version(m, 2, state_layout=[[[1, 1]]] * 3),
                             r"state_layout\[0\] puts the batch in dimension 1 of input 'input' of graph section_1")):
        broken = json.loads(json.dumps(manifest))
        changed = change(broken)
        broken = changed if isinstance(changed, dict) else broken  # as_version gives a new manifest
        (damaged / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            OnnxEarlyExitPredictor(damaged)
    (damaged / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="damaged or not a manifest"):
        OnnxEarlyExitPredictor(damaged)
    for depth in (65, 100_000):  # past what is walked safely, past what the parser can walk
        (damaged / "manifest.json").write_text(json.dumps({**manifest, "exit_latency": "_"}).replace(
            '"_"', "[" * depth + "]" * depth))
        with pytest.raises(ValueError, match="manifest.json nests lists or objects more than 64 deep"):
            OnnxEarlyExitPredictor(damaged)


def nan_filled(graph):
    """``graph`` (an ONNX file) with every float weight NaN, as bytes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(np.full_like(array, np.nan), init.name))
    return model.SerializeToString()


def test_tampered_or_swapped_graphs_are_refused_at_load(exported, tmp_path):
    """A graph changed since export fails its checksum; without checksums (format 3), graphs swapped between
    places fail the check of what each graph gives against what the next takes, at load, not at the first call."""
    _, folder, _ = exported
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    (tampered / "section_1.onnx").write_bytes(nan_filled(folder / "section_1.onnx"))
    with pytest.raises(ValueError, match="section_1.onnx does not have the SHA-256 checksum recorded"):
        OnnxEarlyExitPredictor(tampered)
    for first, second, message in (("exit_0.onnx", "exit_1.onnx", "exit_0.onnx: takes input .* but section_0.onnx gives"),
                                   ("section_1.onnx", "section_2.onnx", "section_1.onnx: takes input .* but section_0"),
                                   ("section_0.onnx", "exit_3.onnx", "does not match graph section_0.onnx")):
        swapped = tmp_path / f"{first}-{second}"
        shutil.copytree(folder, swapped)
        (swapped / first).write_bytes((folder / second).read_bytes())
        (swapped / second).write_bytes((folder / first).read_bytes())
        with pytest.raises(ValueError, match="does not have the SHA-256 checksum recorded"):
            OnnxEarlyExitPredictor(swapped)
        manifest = json.loads((swapped / "manifest.json").read_text())
        (swapped / "manifest.json").write_text(json.dumps(as_version(manifest, 3)))
        with pytest.raises(ValueError, match=message):
            OnnxEarlyExitPredictor(swapped)


def test_fuzz_onnx_folder_refuses_naming_the_file_or_answers(exported, tmp_path):
    """One field of the manifest changed, a few bytes of a graph (or its external data) changed, or two graphs
    swapped in an export without checksums (format 3) (``benchmarks/fuzz_folders.py``'s `mutate_onnx`, which
    runs thousands): a ``ValueError`` at load that names the manifest or the graph, or (a harmless change: a
    class name, a threshold) a predictor whose answers are finite."""
    _, folder, _ = exported
    rng = random.Random(0)
    outcomes = {"answered": 0, "refused": 0}
    for i in range(60):
        case = tmp_path / str(i)
        shutil.copytree(folder, case)
        kind, named = mutate_onnx(case, rng)
        try:
            predictor = OnnxEarlyExitPredictor(case)
        except ValueError as exc:
            assert any(name in str(exc) for name in named), f"case {i} ({kind}): not naming {named}: {exc}"
            outcomes["refused"] += 1
            continue
        assert kind == "manifest", f"case {i}: {kind} ({named}) loaded"
        result = predictor(torch.randn(3, 3, 32, 32))
        assert torch.isfinite(result.probs).all() and result.labels.shape == (3,), f"case {i} ({kind})"
        outcomes["answered"] += 1
    assert outcomes["refused"] > outcomes["answered"] > 0


def test_a_failed_export_leaves_no_mix_of_old_and_new_graphs(exported, tmp_path, monkeypatch):
    import timm_scan.deploy.onnx as onnx_module

    model, folder, _ = exported
    again = tmp_path / "again"
    shutil.copytree(folder, again)
    (again / "notes.txt").write_text("kept")
    for size, check_batch, message in (((32, 32), 2, r"\(channels, height, width\) of positive ints"),
                                       ((3, 32, 32), 1, "check_batch")):
        with pytest.raises(ValueError, match=message):
            export_onnx(model, again, size, check_batch=check_batch)
    assert (again / "manifest.json").is_file()  # refused before anything was touched

    def fails(*args, **kwargs):
        raise ValueError("cannot export section 0 (simulated)")

    monkeypatch.setattr(onnx_module, "_export_checked", fails)
    with pytest.raises(ValueError, match="simulated"):
        export_onnx(model, again, (3, 32, 32))
    assert sorted(p.name for p in again.iterdir()) == ["notes.txt"]  # the earlier export is gone, nothing else
    with pytest.raises(ValueError, match="has no manifest.json"):
        OnnxEarlyExitPredictor(again)


# One model per runner and layout besides the CNN of `exported` (NHWC stages, ViT tokens, and two traced
# states: TNT's two tensors, one with 16 rows per sample, and Twins' batch count, rebuilt inside the
# graphs), each with one shallow exit to keep the exports short; `python benchmarks/onnx_export.py
# --families` exports every family of the suite with the default exits.
EXPORTED_IN_TESTS = [("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}, 224, 1),
                     ("test_vit", {}, 160, 1),
                     ("tnt_s_patch16_224", {"img_size": 64, "depth": 4}, 64, 2),
                     ("twins_pcpvt_small", {"img_size": 64, "depths": (1, 1, 1, 1)}, 64, 1)]


@pytest.mark.parametrize("name, kwargs, size, tensors", EXPORTED_IN_TESTS, ids=[e[0] for e in EXPORTED_IN_TESTS])
def test_each_runner_exports(name, kwargs, size, tensors, tmp_path):
    model = timm_scan.wrap(create(name, **kwargs), timm_scan.ScanConfig(exits=[0]), check_input_size=(3, size, size))
    manifest = export_onnx(model.eval(), tmp_path, (3, size, size))
    assert manifest.format_version == 4 and (manifest.state_layout is not None) == (tensors == 2)
    x = torch.randn(3, 3, size, size)
    thresholds = thresholds_for(model, x)
    assert_same_answers(model, tmp_path, x, thresholds)
    assert_same_answers(model, tmp_path, x[1:2], thresholds)
    if tensors == 2:  # the traced state's tensors travel between graphs, and the latency is timed through them
        assert manifest.state_layout == [[[0, 16], [0, 1]]]
        latency = OnnxEarlyExitPredictor(tmp_path, ExitPolicy(thresholds)).measure_exit_latency(2, images=2, repeats=1)
        assert len(latency.ms_per_image) == 2


def test_export_a_trained_run_and_push_it(hub, tiny_parquet, tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    from huggingface_hub import HfApi

    from timm_scan.cli import main

    run = tmp_path / "run"
    main(["train", "--dataset", str(tiny_parquet), "--output-dir", str(run), "--model", "test_resnet", "--input-size",
          "32", "--crop-pct", "1.0", "--val-size", "24", "--epochs", "2", "--batch-size", "16", "--num-workers", "0"])
    main(["search", str(run), "--betas", "1", "--generations", "5"])
    with pytest.raises(SystemExit, match="batch_size"):  # refused before anything is written
        main(["export", str(run), "--output", str(tmp_path / "bad"), "--latency-batch-sizes", "0"])
    assert not (tmp_path / "bad").exists()
    monkeypatch.setattr(sys, "argv", ["export_onnx.py", str(run), "--latency-batch-sizes", "1", "4"])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "export_onnx.py"), run_name="__main__")
    model, _ = timm_scan.training.load_run(run)
    manifest = OnnxManifest.load(run / "onnx" / "manifest.json")
    assert manifest.policy == model.policy and model.policy.origin.objective == "beta"
    assert [latency.batch_size for latency in manifest.exit_latency] == [1, 4]  # timed with ONNX Runtime
    assert OnnxEarlyExitPredictor(run / "onnx").exit_latency == manifest.exit_latency
    images = torch.stack([timm_scan.training.eval_dataset(timm_scan.training.run_splits(
        timm_scan.TrainConfig.load(run)), "test", model.data_config)[i][0] for i in range(16)])
    assert_same_answers(model, run / "onnx", images, model.policy.thresholds)
    main(["push", str(run), "tester/with-onnx", "--onnx"])
    assert "onnx/exit_3.onnx" in HfApi().list_repo_files("tester/with-onnx")


def test_an_exporter_failure_is_told_by_its_root_cause():
    from timm_scan.deploy.onnx import _exporter_error

    def fail():
        try:
            try:
                raise AssertionError("only 4D query, key, and value are supported")
            except AssertionError as exc:
                raise RuntimeError("Error when translating node %sdpa : [num_users=1] = call_function["
                                   "target=torch.ops.aten.scaled_dot_product_attention.default]") from exc
        except RuntimeError as exc:
            raise ValueError("Failed to convert the exported program.\nNext steps: ...") from exc

    with pytest.raises(ValueError) as info:
        fail()
    message = _exporter_error(info.value)
    assert message.startswith("AssertionError: only 4D query, key, and value are supported, translating "
                              "torch.ops.aten.scaled_dot_product_attention.default")
    assert "timm.layers.set_fused_attn(False)" in message and "TIMM_FUSED_ATTN=0" in message
    assert _exporter_error(KeyError("x")) == "KeyError: 'x'"
