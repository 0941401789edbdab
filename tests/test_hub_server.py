"""The test Hub server works end to end with the real huggingface_hub client (and with timm's hf-hub loading)."""

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import HubServer

REPO_ID = "tester/tiny"


@pytest.fixture(autouse=True)
def _isolated_client(tmp_path, monkeypatch):
    """Keep the client's caches (hub files, hf_xet's session logs) under tmp_path, never in ~/.cache."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet_cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def server(tmp_path):
    with HubServer(tmp_path / "hub") as server:
        yield server


@pytest.fixture
def api(server):
    return HfApi(endpoint=server.url, token="any-token")


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A folder with a small safetensors file, a text file and a nested file."""
    folder = tmp_path / "upload"
    (folder / "extra").mkdir(parents=True)
    weights = {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    safetensors.torch.save_file(weights, folder / "model.safetensors")
    (folder / "notes.txt").write_text("first version\n")
    (folder / "extra" / "labels.txt").write_text("cat\ndog\n")
    return folder


def _download(server: HubServer, filename: str, revision: str | None = None) -> bytes:
    return Path(hf_hub_download(REPO_ID, filename, revision=revision, endpoint=server.url)).read_bytes()


def test_create_repo_exist_ok_and_exists(api):
    repo_url = api.create_repo(REPO_ID, private=True)
    assert (repo_url.repo_id, repo_url.endpoint) == (REPO_ID, api.endpoint)

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO_ID)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(REPO_ID, exist_ok=True) == repo_url

    assert api.repo_exists(REPO_ID)
    assert not api.repo_exists("tester/missing")
    assert api.model_info(REPO_ID).private is True
    assert api.list_repo_files(REPO_ID) == []


def test_upload_folder_then_download_each_file(api, server, model_folder):
    api.create_repo(REPO_ID)
    commit = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder, commit_message="Add model")

    assert sorted(api.list_repo_files(REPO_ID)) == ["extra/labels.txt", "model.safetensors", "notes.txt"]
    assert api.model_info(REPO_ID).sha == commit.oid
    assert [c.title for c in api.list_repo_commits(REPO_ID)] == ["Add model", "initial commit"]
    for filename in ("model.safetensors", "notes.txt", "extra/labels.txt"):
        assert _download(server, filename) == (model_folder / filename).read_bytes()
    assert api.file_exists(REPO_ID, "notes.txt")
    assert not api.file_exists(REPO_ID, "missing.txt")
    # "regular" upload mode: contents travel inline in the commit, with no LFS nor Xet traffic.
    assert not [request for request in server.requests if "lfs" in request or "xet" in request]


def test_upload_file_and_snapshot_download(api, server, model_folder):
    api.create_repo(REPO_ID)
    api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)
    commit = api.upload_file(path_or_fileobj=b"more\n", path_in_repo="more.txt", repo_id=REPO_ID)

    snapshot = Path(snapshot_download(REPO_ID, endpoint=server.url))
    assert snapshot.name == commit.oid
    downloaded = {path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()}
    assert downloaded == {"model.safetensors", "notes.txt", "extra/labels.txt", "more.txt"}
    assert (snapshot / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()
    assert safetensors.torch.load_file(snapshot / "model.safetensors")["weight"].sum() == 66
    assert (snapshot / "more.txt").read_bytes() == b"more\n"


def test_branch_commit_keeps_old_commit_downloadable(api, server, model_folder):
    api.create_repo(REPO_ID)
    first = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)
    api.create_branch(REPO_ID, branch="exp/v2")
    (model_folder / "notes.txt").write_text("second version\n")
    second = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder, revision="exp/v2")

    assert second.oid != first.oid
    assert _download(server, "notes.txt", revision="exp/v2") == b"second version\n"
    assert _download(server, "notes.txt", revision="main") == b"first version\n"
    assert _download(server, "notes.txt", revision=first.oid) == b"first version\n"
    assert Path(snapshot_download(REPO_ID, revision=first.oid, endpoint=server.url)).name == first.oid
    branches = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO_ID).branches}
    assert branches == {"main": first.oid, "exp/v2": second.oid}
    # Only the changed file was committed: the client skips files whose remote oid matches.
    assert api.list_repo_commits(REPO_ID, revision="exp/v2")[1].commit_id == first.oid


def test_missing_file_repo_and_revision_raise_client_errors(api, server, model_folder):
    api.create_repo(REPO_ID)
    api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)

    with pytest.raises(RemoteEntryNotFoundError):
        _download(server, "missing.bin")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/missing", "notes.txt", endpoint=server.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/missing")
    with pytest.raises(RevisionNotFoundError):
        _download(server, "notes.txt", revision="no-such-branch")


def test_failed_upload_is_reported(api, server):
    api.create_repo(REPO_ID)
    server.fail_uploads = True

    with pytest.raises(HfHubHTTPError) as failure:
        api.upload_file(path_or_fileobj=b"data", path_in_repo="data.bin", repo_id=REPO_ID)
    assert failure.value.response.status_code == 403
    assert "fail_uploads" in str(failure.value)
    assert api.list_repo_files(REPO_ID) == []


def test_timm_loads_pretrained_model_pushed_to_server(api, server, tmp_path, monkeypatch):
    # timm calls hf_hub_download without `endpoint=`: point the client's module-level defaults at the server.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    url_template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    timm.models.save_for_hf(model, tmp_path / "timm_model", safe_serialization=True)
    api.create_repo(REPO_ID)
    api.upload_folder(repo_id=REPO_ID, folder_path=tmp_path / "timm_model")

    loaded = timm.create_model(f"hf-hub:{REPO_ID}", pretrained=True).eval()

    inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs))
    assert loaded.pretrained_cfg["hf_hub_id"] == REPO_ID
