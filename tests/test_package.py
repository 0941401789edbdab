"""The package users install: the wheel and sdist build, and the installed commands work outside the repository."""

import hashlib
import json
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # setuptools writes build/ and the egg-info in the source tree: one build at a time (xdist workers)
    lock = Path(tempfile.gettempdir()) / f"timm-scan-build-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]}.lock"
    with FileLock(lock):
        run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, ROOT])
    return out


def test_wheel_and_sdist_carry_the_package_metadata_and_license(dist):
    wheel = next(dist.glob("timm_scan-*.whl"))
    assert next(dist.glob("timm_scan-*.tar.gz"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    import timm_scan

    assert f"Version: {timm_scan.__version__}" in metadata  # one source: timm_scan.__version__
    assert "timm_scan/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata and "Classifier: Typing :: Typed" in metadata
    assert "Project-URL:" in metadata and "Provides-Extra: tensorboard" in metadata
    assert "timm-scan = timm_scan.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)


def test_installed_commands_train_search_evaluate_in_an_empty_folder(dist, tiny_parquet, tmp_path_factory):
    """A fresh virtual environment outside the repository gets the wheel; its dependencies (torch, timm, ...)
    are the ones of this environment, made visible through a .pth file rather than installed again."""
    env = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", env])
    python = env / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", next(dist.glob("*.whl"))])
    work = tmp_path_factory.mktemp("empty")
    command = env / "bin" / "timm-scan"
    where = run([python, "-c", "import timm_scan; print(timm_scan.__file__)"], cwd=work).stdout
    assert where.startswith(site), where  # the installed copy, not the repository's
    run([command, "train", "--dataset", tiny_parquet, "--output-dir", "run", "--model", "test_resnet",
         "--input-size", "32", "--crop-pct", "1.0", "--val-size", "24", "--epochs", "2", "--batch-size", "16",
         "--num-workers", "0"], cwd=work)
    run([command, "search", "run", "--betas", "0.1", "10", "--generations", "5"], cwd=work)
    out = run([command, "evaluate", "run", "--latency-images", "16", "--latency-images-b1", "2"], cwd=work).stdout
    assert "measured speed-up" in out
    report = json.loads((work / "run" / "evaluation.json").read_text())
    assert report["split"] == "test" and len(report["per_exit"]["exits"]) == 4
