"""push_to_hub / from_pretrained("hf-hub:...") end to end: the real huggingface_hub client against
the test Hub (tests/hub_server.py) that HF_ENDPOINT points to (see conftest.py)."""

import runpy
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import HfApi
from test_hub import outputs, trained_like

import timm_scan
from timm_scan import HubUploadError
from timm_scan.report import EarlyExitReport, RunResults
from timm_scan.training import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def assert_same_outputs(a, b, size=32):
    x = torch.randn(2, 3, size, size)
    u, v = outputs(a, x), outputs(b, x)
    assert all(torch.equal(p, q) for p, q in zip(u.logits + u.features, v.logits + v.features))


def test_push_then_load_from_the_hub(hub, tmp_path):
    model = trained_like()
    model.policy = timm_scan.ExitPolicy([0.9, 0.85, 0.8])
    url = model.push_to_hub("tester/scan-roundtrip")
    assert "tester/scan-roundtrip" in url
    loaded = timm_scan.from_pretrained("hf-hub:tester/scan-roundtrip").eval()
    assert_same_outputs(model, loaded)
    assert loaded.policy == model.policy and loaded.class_names == ["a", "b", "c", "d"]
    files = HfApi().list_repo_files("tester/scan-roundtrip")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "scan_config.json", "scan_exits.safetensors"]
    # plain timm still loads the backbone from the same repo
    backbone = timm.create_model("hf-hub:tester/scan-roundtrip", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(backbone(x), outputs(model, x).logits[-1])


def test_revisions(hub):
    first = trained_like()
    first.push_to_hub("tester/scan-revisions")
    main_sha = HfApi().model_info("tester/scan-revisions").sha
    second = trained_like()  # other weights
    second.push_to_hub("tester/scan-revisions", revision="experiment")
    assert_same_outputs(timm_scan.from_pretrained("hf-hub:tester/scan-revisions").eval(), first)
    assert_same_outputs(timm_scan.from_pretrained("hf-hub:tester/scan-revisions", revision="experiment").eval(), second)
    assert_same_outputs(timm_scan.from_pretrained("hf-hub:tester/scan-revisions", revision=main_sha).eval(), first)


def test_a_plain_timm_repo_is_not_a_timm_scan_repo(hub, tmp_path):
    timm.models.push_to_hf_hub(timm.create_model("test_resnet", num_classes=4), "tester/plain-timm",
                               safe_serialization=True)
    with pytest.raises(ValueError, match="not a timm-scan model.*timm.create_model"):
        timm_scan.from_pretrained("hf-hub:tester/plain-timm")


def test_a_damaged_file_on_the_hub(hub, tmp_path):
    model = trained_like()
    model.save_pretrained(str(tmp_path))
    exits = tmp_path / "scan_exits.safetensors"
    exits.write_bytes(exits.read_bytes()[:100])
    HfApi().create_repo("tester/damaged")
    HfApi().upload_folder(repo_id="tester/damaged", folder_path=str(tmp_path))
    with pytest.raises(ValueError, match="scan_exits.safetensors cannot be read"):
        timm_scan.from_pretrained("hf-hub:tester/damaged")


def test_a_failed_upload_keeps_the_files_and_says_what_failed(hub, tmp_path):
    model = trained_like()
    hub.fail_uploads = True
    try:
        with pytest.raises(HubUploadError, match=r"(?s)uploading the files: 403.*intact in .*saved"):
            model.push_to_hub("tester/scan-fails", save_directory=tmp_path / "saved")
    finally:
        hub.fail_uploads = False
    assert (tmp_path / "saved" / "scan_exits.safetensors").is_file()
    assert_same_outputs(timm_scan.from_pretrained(tmp_path / "saved").eval(), model)
    model.push_to_hub("tester/scan-fails", save_directory=tmp_path / "saved")  # the retry the message suggests
    assert "scan_exits.safetensors" in HfApi().list_repo_files("tester/scan-fails")


def test_trainer_pushes_at_the_end_and_the_example_pushes_a_run(hub, tiny_parquet, tmp_path, monkeypatch):
    cfg = TrainConfig(dataset=str(tiny_parquet), output_dir=str(tmp_path / "run"), model="test_resnet", input_size=32,
                      crop_pct=1.0, val_size=16, epochs=1, anneal_epochs=0, batch_size=16, num_workers=0,
                      push_to_hub="tester/trained")
    Trainer(cfg).fit()
    card = (Path(timm_scan.model.hub.snapshot_download("tester/trained")) / "README.md").read_text()
    assert "| 1 | layer1 |" in card and "library_name: timm" in card
    loaded = timm_scan.from_pretrained("hf-hub:tester/trained")
    assert loaded.class_names == ["red", "green", "blue", "grey"]

    timm_scan.model.hub.save_deployment(tmp_path / "run" / "best", timm_scan.ExitPolicy([0.9, 0.9, 0.9]))  # as search does
    results = RunResults.load(tmp_path / "run" / "results.json")
    EarlyExitReport("test", results.test, results.exit_macs, results.backbone_macs, timm_scan.ExitPolicy([0.9] * 3),
                    0.5, 1.2, [0.5, 0.2, 0.1, 0.2]).save(tmp_path / "run" / "evaluation.json")
    monkeypatch.setattr(sys, "argv", ["push_to_hub.py", str(tmp_path / "run"), "tester/from-example"])
    runpy.run_path(str(ROOT / "examples" / "push_to_hub.py"), run_name="__main__")
    card = (Path(timm_scan.model.hub.snapshot_download("tester/from-example")) / "README.md").read_text()
    assert "MACs speed-up 1.20x" in card and "0.900, 0.900, 0.900" in card and "epochs=1" in card
    assert (tmp_path / "run" / "hub" / "scan_config.json").is_file()  # what was uploaded stays local too
