"""The run folder's protocol without training: one owner at a time, damaged files named with what to do."""

import json
import os

import pytest

from timm_scan.report import EpochMetrics, ExitAccuracy
from timm_scan.training import RunFolder, TrainConfig, Trainer, epoch_metrics, run_results
from timm_scan.training.config import TRAIN_CONFIG


def config(data, out, **kwargs):
    base = dict(dataset=str(data), output_dir=str(out), model="test_resnet", input_size=32, crop_pct=1.0, val_size=16,
                epochs=1, batch_size=16, num_workers=0)
    return TrainConfig(**{**base, **kwargs})


def test_one_process_at_a_time_holds_a_folder(tmp_path):
    first = RunFolder(tmp_path / "run")
    first.lock()
    assert f"process {os.getpid()} on " in first.lock_file.read_text()
    with pytest.raises(ValueError, match=f"{tmp_path / 'run'} is in use by another training run \\(process "
                                         f"{os.getpid()} on .*another --output-dir"):
        RunFolder(tmp_path / "run").lock()
    first.unlock()
    second = RunFolder(tmp_path / "run")
    second.lock()  # released: the next one takes it
    second.unlock()


def test_a_trainer_is_refused_a_held_folder_before_loading_anything(tmp_path):
    holder = RunFolder(tmp_path)
    holder.lock()
    with pytest.raises(ValueError, match="is in use by another training run"):
        Trainer(config(tmp_path / "no such data", tmp_path))  # refused before the dataset is looked at
    holder.unlock()


class Stop(Exception):
    pass


def test_a_trainer_holds_its_folder_in_every_fit_and_not_after(tiny_parquet, tmp_path):
    held = []

    def probe(trainer, metrics):  # after each epoch: may another RunFolder take the folder?
        with pytest.raises(ValueError, match="is in use"):
            RunFolder(tmp_path).lock()
        held.append(metrics.epoch)
        if metrics.epoch == 1:
            raise Stop

    trainer = Trainer(config(tiny_parquet, tmp_path, epochs=2), callbacks=[probe])
    with pytest.raises(Stop):
        trainer.fit()
    free = RunFolder(tmp_path)
    free.lock()  # released when fit ended
    free.unlock()
    trainer.fit()  # the same trainer again: it holds the folder again, resumes and finishes
    assert held == [1, 2]
    free.lock()
    free.unlock()


def test_a_trainer_that_fails_to_start_releases_its_folder(tiny_parquet, tmp_path):
    with pytest.raises(ValueError, match="num_classes=10"):
        Trainer(config(tiny_parquet, tmp_path, num_classes=10))
    folder = RunFolder(tmp_path)
    folder.lock()
    folder.unlock()


@pytest.mark.parametrize("text", ["", '{"dataset": "d", "lr": ', '{"dataset": "d", "milestones": [3, 2]}'],
                         ids=["empty", "cut-short", "invalid"])
def test_a_damaged_train_config_is_named_with_what_to_do(tmp_path, text):
    (tmp_path / TRAIN_CONFIG).write_text(text)
    with pytest.raises(ValueError, match=f"{tmp_path / TRAIN_CONFIG}.*restore it from a copy"):
        TrainConfig.load(tmp_path)


def test_checkpoints_without_their_train_config_are_refused(tiny_parquet, tmp_path):
    (tmp_path / "checkpoints" / "epoch_0001").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{tmp_path} holds checkpoints but no {TRAIN_CONFIG}"):
        Trainer(config(tiny_parquet, tmp_path)).fit()


def metrics_line(epoch: int) -> str:
    accuracy = ExitAccuracy([0.5], None, 16)
    record = EpochMetrics(epoch=epoch, seconds=1.0, val=accuracy, lr=0.1, step_seconds=0.1, loss=1.0, ce=[1.0],
                          kd=[0.0], hint=[0.0])
    return json.dumps(record.to_dict()) + "\n"


@pytest.mark.parametrize("lines, said", [
    ([metrics_line(1), metrics_line(2)[:40] + "\n"], "line 2, is not an EpochMetrics record"),
    ([metrics_line(1), metrics_line(1)], "line 2, is epoch 1 where epoch 2 was expected"),
], ids=["cut-short", "epoch-twice"])
def test_a_damaged_metrics_line_is_named_not_dropped(tmp_path, lines, said):
    folder = RunFolder(tmp_path)
    folder.metrics.write_text("".join(lines))
    with pytest.raises(ValueError, match=f"metrics.jsonl, {said}"):
        epoch_metrics(tmp_path)
    with pytest.raises(ValueError, match=f"metrics.jsonl, {said}"):
        folder.keep_metrics(1)  # on resume: refused, not silently cut


def test_metrics_lines_are_appended_whole(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append_metrics(EpochMetrics.from_json(metrics_line(1)))
    folder.append_metrics(EpochMetrics.from_json(metrics_line(2)))
    assert [m.epoch for m in epoch_metrics(tmp_path)] == [1, 2]
    folder.keep_metrics(1)
    assert folder.metrics.read_text() == metrics_line(1)


def test_damaged_results_say_how_to_write_them_again(tmp_path):
    (tmp_path / "results.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="results.json is not valid JSON.*Rerun the run's timm-scan train command"):
        run_results(tmp_path)
