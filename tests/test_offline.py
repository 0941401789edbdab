"""Without the Hugging Face Hub: pretrained weights that cannot be had are one clear error at once
(``check_pretrained_weights``); cached or fetchable ones pass. (A Hub dataset: tests/test_data.py.)"""

import io
import socket
import time

import huggingface_hub
import pytest
import timm
from safetensors.torch import save

from timm_scan.model.hub import check_pretrained_weights


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", [False, True])
def test_pretrained_weights_that_cannot_be_had_fail_at_once(monkeypatch, offline):
    if offline:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"the pretrained weights of resnet18 \(timm/resnet18.a1_in1k on the Hugging "
                                         r"Face Hub\) are not in the local cache .* cannot be reached .*"
                                         r"no --pretrained.*--init-from.*pretrained_cfg_overlay"):
        check_pretrained_weights("resnet18")
    assert time.monotonic() - start < 10  # timm alone retries for about a minute


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
