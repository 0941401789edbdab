"""Nothing lost, nothing silent: interrupted runs, diverging runs."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from timm_scan.training import TrainConfig, Trainer, epoch_metrics, run_results
from timm_scan.training.trainer import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fault_worker.py"
TRAIN_ARGS = ["--model", "test_resnet", "--input-size", "32", "--crop-pct", "1.0", "--val-size", "16",
              "--batch-size", "16", "--num-workers", "0"]


@pytest.fixture(scope="module")
def server():
    """fault_worker.py --serve: one process that pays the imports once and forks a child per run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(WORKER), "--serve"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def worker(server, tmp_path_factory):
    """``worker(data, out, *fault)``: the run of fault_worker.py (killed at ``fault``, or to the end), as
    ``subprocess.run`` would answer it: its exit code and stderr."""
    logs = tmp_path_factory.mktemp("worker_logs")

    def run(data, out, *fault):
        err = logs / f"{len(list(logs.iterdir()))}.txt"
        server.stdin.write("\t".join(map(str, (data, out, *fault, err))) + "\n")
        server.stdin.flush()
        code = server.stdout.readline()
        assert code, "the fault worker server died"
        return subprocess.CompletedProcess([], int(code), "", err.read_text())

    return run


@pytest.fixture(scope="module")
def uninterrupted(worker, tiny_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = worker(tiny_parquet, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def same_files(a: Path, b: Path, names=("model.safetensors", "scan_exits.safetensors")) -> bool:
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        if x.keys() != y.keys() or any(not (x[k] == y[k]).all() for k in x):
            return False
    return True


@pytest.mark.parametrize("kills", [
    [("step", 3)],                   # in the middle of epoch 1, before any checkpoint
    [("step", 12)],                  # in the middle of epoch 3
    [("torch.save", 2)],             # in the middle of epoch 1's checkpoint
    [("os.replace", 1)],             # epoch 1: best/ written (as best.partial), not yet renamed in
    [("os.replace", 2)],             # epoch 1's checkpoint written, not yet renamed in
    [("os.replace", 4)],             # epoch 3 (epoch 2 is no better, and 2's checkpoint is the 3rd): the new best/
                                     # written, the old one not yet renamed away
    [("os.replace", 5)],             # epoch 3: the old best/ renamed away (best.previous), the new one not yet in
    [("checkpoint", 2)],             # epoch 2's metrics line written, its checkpoint not
    # one run killed after another, each writing a file of the run folder whole: epoch 2's metrics line; the
    # rerun as it rewrites its config; the next one in epoch 2's checkpoint manifest; the next in results.json
    [("write:metrics.jsonl", 2), ("write:train_config.json", 1), ("write:manifest.json", 1),
     ("write:results.json", 1)],
], ids=lambda kills: "+".join(f"{point}-{count}" for point, count in kills))
def test_a_killed_run_reruns_to_the_same_best_model(worker, tiny_parquet, tmp_path, uninterrupted, kills):
    for point, count in kills:
        killed = worker(tiny_parquet, tmp_path, point, count)
        assert killed.returncode == 9, killed.stderr[-3000:]  # it did die at that point
    rerun = worker(tiny_parquet, tmp_path)  # the same command again
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert same_files(tmp_path / "best", uninterrupted / "best")
    assert [m.epoch for m in epoch_metrics(tmp_path)] == [1, 2, 3]  # nothing lost, nothing twice
    assert run_results(tmp_path).test == run_results(uninterrupted).test
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]
    assert not list(tmp_path.glob("best.*")) and not list(tmp_path.rglob("*.partial"))


@pytest.fixture(scope="module")
def killed_in_epoch_3(worker, tiny_parquet, tmp_path_factory):
    """A run killed in epoch 3 (checkpoints 1 and 2 written), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("killed")
    assert worker(tiny_parquet, out, "step", 12).returncode == 9
    return out


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # in the tensors' data: the file still loads
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, said", [
    (lambda ckpt: (ckpt / "optimizer.bin").write_bytes(b"damaged"), "optimizer.bin is damaged"),
    (lambda ckpt: (ckpt / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),  # Accelerate skips it
    (lambda ckpt: flip_last_byte(ckpt / "model.safetensors"), "model.safetensors is damaged"),
    (lambda ckpt: (ckpt / "manifest.json").write_text("{"), "manifest.json is damaged"),
], ids=["optimizer-overwritten", "rng-missing", "weights-flipped", "manifest-damaged"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(worker, tiny_parquet, tmp_path, uninterrupted,
                                                                 killed_in_epoch_3,
                                                                 damage, said):
    shutil.copytree(killed_in_epoch_3, tmp_path, dirs_exist_ok=True)
    damage(tmp_path / "checkpoints" / "epoch_0002")
    rerun = worker(tiny_parquet, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"epoch_0002 cannot be loaded ({said}" in rerun.stderr and "resuming from the one before" in rerun.stderr
    assert same_files(tmp_path / "best", uninterrupted / "best")
    assert [m.epoch for m in epoch_metrics(tmp_path)] == [1, 2, 3]


def test_a_checkpoint_without_manifest_loads_with_a_warning(worker, tiny_parquet, tmp_path, uninterrupted,
                                                             killed_in_epoch_3):
    shutil.copytree(killed_in_epoch_3, tmp_path, dirs_exist_ok=True)
    (tmp_path / "checkpoints" / "epoch_0002" / "manifest.json").unlink()  # as an earlier timm-scan wrote it
    rerun = worker(tiny_parquet, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "epoch_0002 has no manifest.json" in rerun.stderr and "resuming from the one before" not in rerun.stderr
    assert same_files(tmp_path / "best", uninterrupted / "best")


def test_a_second_run_on_the_folder_is_refused_until_the_first_ends(worker, tiny_parquet, tmp_path, uninterrupted):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, str(WORKER), str(tiny_parquet), str(tmp_path), "pause", "3"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # the banner, then "paused": in epoch 1, holding the folder
            if line.strip() == "paused":
                break
        else:
            pytest.fail("the first run ended before it paused")
        second = subprocess.run([sys.executable, "-m", "timm_scan", "train", *TRAIN_ARGS, "--dataset",
                                 str(tiny_parquet), "--output-dir", str(tmp_path), "--seed", "1"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith(f"timm-scan train: error: {tmp_path} is in use by another training run (process "
                                f"{first.pid} on ")
        assert TrainConfig.load(tmp_path).seed == 0  # the folder is still the first run's
    finally:
        first.kill()  # as SIGKILL leaves it: the OS releases the lock
        first.wait()
    rerun = worker(tiny_parquet, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert same_files(tmp_path / "best", uninterrupted / "best")
    assert [m.epoch for m in epoch_metrics(tmp_path)] == [1, 2, 3]


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing_non_finite(tiny_parquet, tmp_path):
    cfg = TrainConfig(dataset=str(tiny_parquet), output_dir=str(tmp_path), model="test_resnet", input_size=32,
                      crop_pct=1.0, val_size=16, epochs=2, batch_size=16, lr=1e6, num_workers=0)
    with pytest.raises(TrainingDiverged, match="not finite|the loss is nan|the loss is inf"):
        Trainer(cfg).fit()
    if (tmp_path / "best").exists():
        assert all(t.isfinite().all() for t in load_file(tmp_path / "best" / "model.safetensors").values())


def test_the_advice_after_divergence_is_a_rerun_that_trains(tiny_parquet, tmp_path):
    def poison(trainer, metrics):  # after epoch 1's checkpoint: epoch 2 diverges at its first step
        next(trainer.model.parameters()).data.fill_(float("nan"))

    run = tmp_path / "run"
    cfg = TrainConfig(dataset=str(tiny_parquet), output_dir=str(run), model="test_resnet", input_size=32, crop_pct=1.0,
                      val_size=16, epochs=2, batch_size=16, lr=0.5, num_workers=0)
    with pytest.raises(TrainingDiverged) as diverged:
        Trainer(cfg, callbacks=[poison]).fit()
    advice = str(diverged.value)
    assert "rerunning this command would diverge again" in advice
    lower = re.search(r"a lower --lr \(such as (\S+)\)", advice).group(1)
    assert float(lower) == 0.05 and "another --output-dir" in advice and f"--init-from {run / 'best'}" in advice
    anew = dataclasses.replace(cfg, output_dir=str(tmp_path / "anew"), lr=float(lower), init_from=str(run / "best"))
    assert Trainer(anew).fit().best_epoch in (1, 2)  # the advised run trains


@pytest.mark.parametrize("command", [["-m", "timm_scan", "train"], [str(ROOT / "examples" / "train.py")]],
                         ids=["timm-scan", "examples-train"])
def test_the_command_exits_non_zero_when_training_diverges(tiny_parquet, tmp_path, command):
    proc = subprocess.run([sys.executable, *command, *TRAIN_ARGS, "--dataset", str(tiny_parquet), "--output-dir",
                           str(tmp_path), "--epochs", "1", "--lr", "1e6"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    prog = "timm-scan train" if "timm_scan" in command else "train.py"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]  # one line: the message, not a traceback
    assert error.startswith(f"{prog}: error: the loss is not finite") and "a lower --lr" in error
