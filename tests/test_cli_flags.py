"""The command line a timm user meets first (issue 35): timm's train.py flag names, --model-kwargs,
--version, --resume, usage errors with suggestions, one-line errors, the mixed precision of the launcher,
and what train and export print."""

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import timm_scan
from timm_scan.cli import main, parse_config
from timm_scan.training import TrainConfig, Trainer, load_run

LEGACY_RUN = Path(__file__).resolve().parent / "fixtures" / "legacy" / "v0_1_0" / "run"
TINY = ["--model", "test_resnet", "--input-size", "32", "--crop-pct", "1.0", "--val-size", "16", "--epochs", "1",
        "-b", "16", "-j", "0"]


@pytest.fixture
def parsed(monkeypatch):
    """``parsed(argv)``: the config ``timm-scan COMMAND ...`` would run, without running it."""
    seen = {}
    monkeypatch.setattr("timm_scan.training.trainer.Trainer.__init__", lambda self, cfg: seen.update(cfg=cfg))
    monkeypatch.setattr("timm_scan.training.trainer.Trainer.fit", lambda self: None)
    monkeypatch.setattr("timm_scan.commands.export.export", lambda cfg: seen.update(cfg=cfg))

    def parse(*argv: str):
        main(list(argv))
        return seen.pop("cfg")
    return parse


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_timm_flag_names_are_aliases_of_ours(parsed):
    cfg = parsed("train", "--dataset", "d", "--img-size", "48", "-b", "8", "-j", "1", "--checkpoint-hist", "5",
                 "--grad-accum-steps", "4", "--initial-checkpoint", "w.safetensors", "--scale", "0.5", "1",
                 "--decay-milestones", "3", "6", "--decay-rate", "0.2", "--amp-dtype", "bfloat16")
    assert (cfg.input_size, cfg.batch_size, cfg.num_workers, cfg.keep_checkpoints, cfg.grad_accum) == (48, 8, 1, 5, 4)
    assert cfg.init_from == "w.safetensors" and cfg.train_scale == (0.5, 1.0)
    assert cfg.milestones == [3, 6] and cfg.gamma == 0.2 and cfg.mixed_precision == "bf16"
    assert parsed("train", "--dataset", "d", "--workers", "3").num_workers == 3
    assert parsed("export", "run", "--output-dir", "out").output == "out"
    # the example script shares the parser
    assert parse_config(TrainConfig, ["--dataset", "d", "-b", "4", "--amp"]).batch_size == 4


@pytest.mark.parametrize("argv, precision", [
    ([], None),  # Accelerate decides
    (["--amp"], "fp16"),  # timm's --amp: float16 unless --amp-dtype says otherwise
    (["--amp", "--amp-dtype", "bfloat16"], "bf16"),
    (["--amp-dtype", "bfloat16", "--amp"], "bf16"),
    (["--mixed-precision", "no", "--amp"], "no"),
    (["--mixed-precision", "float16"], "fp16"),
])
def test_amp_is_timms(parsed, argv, precision):
    assert parsed("train", "--dataset", "d", *argv).mixed_precision == precision


def test_model_kwargs_are_parsed_as_timm_parses_them(parsed):
    cfg = parsed("train", "--dataset", "d", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
                 "drop_path_rate=0.1", "global_pool=avg", "qkv_bias=False")
    assert cfg.model_kwargs == {"img_size": 32, "drop_path_rate": 0.1, "global_pool": "avg", "qkv_bias": False}
    assert cfg.input_size == 32  # the size the model is built for
    assert parsed("train", "--dataset", "d").model_kwargs == {}


@pytest.mark.parametrize("argv, message", [
    (["--model-kwargs", "img_size"], "expected KEY=VALUE (such as img_size=32); got 'img_size'"),
    (["--model-kwargs", "num_classes=3"], "use --num-classes instead"),
    (["--model", "resnt18"], "got 'resnt18' (did you mean resnet18"),
])
def test_bad_model_settings_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dataset", "d", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_fixed_size_models_say_how_to_build_them_for_the_input_size(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--model", "vit_tiny_patch16_224", "--input-size", "32"])
    assert "built for 224x224 inputs only" in exit_.value.code and "--model-kwargs img_size=32" in exit_.value.code
    main(["inspect", "--model", "vit_tiny_patch16_224", "--input-size", "32", "--model-kwargs", "img_size=32"])
    assert "vit_tiny_patch16_224 at 32x32: 4 exits" in capsys.readouterr().out
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10)
    with pytest.raises(ValueError, match=r"at 64x64: it was built for 224x224 inputs only .* img_size=64"):
        timm_scan.wrap(swin, check_input_size=(3, 64, 64))


def test_model_kwargs_are_recorded_and_rebuild_the_run(tiny_parquet, tmp_path, capsys):
    fixed = ["--model", "test_vit", "--crop-pct", "1.0", "--val-size", "16", "--epochs", "1", "-b", "16", "-j", "0"]
    with pytest.raises(SystemExit) as exit_:  # a ViT of fixed size 160 at 32
        main(["train", "--dataset", str(tiny_parquet), "--output-dir", str(tmp_path / "no"), *fixed,
              "--model-kwargs", "dynamic_img_size=False", "--input-size", "32"])
    assert "--model-kwargs img_size=32" in exit_.value.code
    run = tmp_path / "run"
    main(["train", "--dataset", str(tiny_parquet), "--output-dir", str(run), *fixed,
          "--model-kwargs", "dynamic_img_size=False", "img_size=32"])
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["model_kwargs"] == {"dynamic_img_size": False, "img_size": 32} and saved["input_size"] == 32
    model, cfg = load_run(run)  # what search, evaluate and export rebuild
    assert cfg.model_kwargs == saved["model_kwargs"] and tuple(model.backbone.patch_embed.img_size) == (32, 32)
    assert model(torch.randn(2, 3, 32, 32)).logits[-1].shape == (2, 4)


def test_train_configs_without_the_new_fields_load():
    cfg = TrainConfig.load(LEGACY_RUN)
    assert cfg.model_kwargs == {} and cfg.mixed_precision == "no"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"timm-scan {timm_scan.__version__}"


@pytest.mark.parametrize("argv, flag", [
    (["search", "run", "--max-dorp", "1"], "--max-drop"),
    (["train", "--dataset", "d", "--epoch", "3", "--batch-sise=4"], "--batch-size"),
    (["export", "run", "--outptu-dir", "x"], "--output-dir"),
])
def test_an_unknown_flag_is_reported_by_its_command_with_the_nearest(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"usage: timm-scan {argv[0]} ") and f"timm-scan {argv[0]}: error: unrecognized arguments" in err
    assert f"did you mean {flag}?" in err


def test_an_unknown_flag_of_a_script_is_suggested_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(TrainConfig, ["--dataset", "d", "--batchsize", "3"])
    assert exit_.value.code == 2 and "did you mean --batch-size?" in capsys.readouterr().err


def test_an_unknown_model_is_one_line_with_the_nearest_names():
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--model", "resnt18"])
    message = exit_.value.code  # a string: Python prints it and exits with status 1
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("timm-scan inspect: error: 'resnt18' is not a timm model name (did you mean resnet18")


def test_evaluate_before_search_says_to_search(tmp_path):
    TrainConfig(dataset="d").save(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(tmp_path)])
    assert exit_.value.code == (f"timm-scan evaluate: error: {tmp_path} has no thresholds.json yet: run "
                                f"`timm-scan search {tmp_path}` first (it chooses the exit thresholds on the "
                                "validation split), then evaluate")


def test_resume_takes_a_run_folder(parsed, tmp_path, capsys):
    TrainConfig(dataset="d", epochs=7, batch_size=4).save(tmp_path)
    cfg = parsed("train", "--resume", str(tmp_path), "-j", "0")
    assert (cfg.dataset, cfg.epochs, cfg.batch_size, cfg.num_workers) == ("d", 7, 4, 0)
    assert cfg.output_dir == str(tmp_path)
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path), "--output-dir", str(tmp_path / "other")])
    assert "continues the run in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path / "missing")])
    assert "--resume takes the --output-dir of an earlier timm-scan train run" in capsys.readouterr().err


def test_the_launchers_mixed_precision_is_used_recorded_and_resumed(tiny_parquet, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision bf16 sets
    run = tmp_path / "run"
    cfg = parse_config(TrainConfig, ["--dataset", str(tiny_parquet), "--output-dir", str(run), *TINY])
    assert cfg.mixed_precision is None
    trainer = Trainer(cfg)
    assert trainer.accelerator.mixed_precision == trainer.cfg.mixed_precision == "bf16"
    dtypes = set()

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if module.training:
            dtypes.add(out.dtype)

    conv = next(m for m in trainer.accelerator.unwrap_model(trainer.model).modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(record)
    trainer.fit()
    assert dtypes == {torch.bfloat16}  # training's autocast really ran in bf16 (on CPU too)
    assert json.loads((run / "train_config.json").read_text())["mixed_precision"] == "bf16"
    out = capsys.readouterr().out
    assert "timm-scan train: test_resnet, 4 exits," in out and "input 3x32x32" in out
    assert "4 classes, 80 train / 16 val / 32 test images" in out and "bf16 mixed precision" in out
    assert f"output: {run}" in out and f"timm-scan search {run} --max-drop 1" in out

    _reset_accelerate()  # the same command again resumes
    Trainer(cfg).fit()
    assert "resumed from" in capsys.readouterr().out
    _reset_accelerate()  # and so does --resume
    main(["train", "--resume", str(run)])
    assert "resumed from" in capsys.readouterr().out
    _reset_accelerate()  # an explicit flag wins over the launcher's
    assert Trainer(TrainConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "fp32"),
                                  "mixed_precision": "no"})).accelerator.mixed_precision == "no"


def test_export_says_what_it_does_before_it_does_it(monkeypatch, capsys):
    class Stop(Exception):
        pass

    def export_onnx(*args, **kwargs):
        assert "exporting run to ONNX in out" in capsys.readouterr().out
        raise Stop

    monkeypatch.setattr("timm_scan.commands.export.load_run", lambda run: (None, None))
    monkeypatch.setattr("timm_scan.commands.export.export_onnx", export_onnx)
    with pytest.raises(Stop):
        main(["export", "run", "--output-dir", "out"])
