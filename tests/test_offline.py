"""Without the Hugging Face Hub: pretrained weights that cannot be had are one clear error at once
(``check_pretrained_weights``); cached or fetchable ones pass. (A Hub dataset: tests/test_data.py.)"""

import io
import json
import os
import socket
import subprocess
import sys

import huggingface_hub
import pytest
import timm
from safetensors.torch import save

from timm_scan.model.hub import check_pretrained_weights

TIMED_CHECK = """
import json, time
from timm_scan.model.backbone import create_backbone
start = time.monotonic()
try:
    create_backbone("resnet18", 10, pretrained=True)  # what timm-scan train --pretrained builds
    message = None
except ValueError as exc:
    message = str(exc)
print(json.dumps({"seconds": time.monotonic() - start, "message": message}))
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("setting", ["HF_HUB_OFFLINE=1", "HF_ENDPOINT unreachable"])
def test_pretrained_weights_that_cannot_be_had_fail_at_once(tmp_path, setting):
    """In a fresh process, as a user's environment sets it (huggingface_hub reads both at import)."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path)}
    if setting == "HF_HUB_OFFLINE=1":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    out = subprocess.run([sys.executable, "-c", TIMED_CHECK], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["message"] is not None and result["message"].startswith(
        f"the pretrained weights of resnet18 (timm/resnet18.a1_in1k on the Hugging Face Hub) are not in the local "
        f"cache ({tmp_path}) and the Hub ")
    assert "no --pretrained" in result["message"] and "--init-from" in result["message"]
    assert result["seconds"] < 30  # no retries: timm alone retries for about a minute


def test_weights_the_hub_answers_for_or_that_are_cached_pass(hub, monkeypatch):
    check_pretrained_weights("test_resnet")  # the Hub answers (it has no such repo): timm's download says the rest
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    api = huggingface_hub.HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_file(path_or_fileobj=io.BytesIO(save(timm.create_model("test_resnet").state_dict())),
                    path_in_repo="model.safetensors", repo_id=repo)
    timm.create_model("test_resnet", pretrained=True, num_classes=3)  # fetched into the cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    check_pretrained_weights("test_resnet")
    timm.create_model("test_resnet", pretrained=True, num_classes=3)  # offline, from the cache
