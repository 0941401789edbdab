"""Untrusted model folders, Hub repos and inputs: every bad one is a ValueError that says what is wrong."""

import copy
import json
import random
import re
import time

import numpy as np
import pytest
import timm
import torch
from fuzz_folders import edit_json, mutate_saved, save_weights, saved_folder
from huggingface_hub import HfApi
from safetensors.torch import load_file

import timm_scan
from timm_scan import EarlyExitPredictor, ExitCosts, ExitPolicy, search_thresholds
from timm_scan.deploy.predictor import check_images
from timm_scan.model.hub import CHECK_SIDE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """test_resnet with exits, 4 classes, saved (as ``benchmarks/fuzz_folders.py`` fuzzes it)."""
    folder = tmp_path_factory.mktemp("saved")
    saved_folder(folder)
    return folder


def copy_of(saved, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


@pytest.mark.parametrize("file, change, message", [
    ("config.json", lambda d: d.pop("architecture"), "'architecture' is None, not a model"),
    ("config.json", lambda d: d.update(architecture="resnet_9000"), "'architecture' is 'resnet_9000'"),
    ("config.json", lambda d: d.update(architecture=5), "'architecture' is 5"),
    ("config.json", lambda d: d.update(model_args="depth=5"), "'model_args' must be a JSON object"),
    ("config.json", lambda d: d.update(model_args={"no_such_arg": 1}), "does not describe a model timm can build"),
    ("config.json", lambda d: d.update(num_classes="four"), "'num_classes' must be a positive int"),
    ("config.json", lambda d: d.update(label_names=["a", 2]), "'label_names' must be 4 class names"),
    ("config.json", lambda d: d["pretrained_cfg"].update(input_size=[3, 9000, 9000]), "up to 4096 pixels"),
    ("scan_config.json", lambda d: d.pop("scan_config"), "'scan_config' must be a JSON object"),
    ("scan_config.json", lambda d: d.update(extra=1), r"unknown \['extra'\]"),
    ("scan_config.json", lambda d: d["scan_config"].update(head_channels=1e9), "head_channels must be an int"),
    ("scan_config.json", lambda d: d["scan_config"].update(head_channels=None),
     "has a head_budget but no head_channels; a saved config records the width"),
    ("scan_config.json", lambda d: d["scan_config"].update(head_channels=10**9), r"head_channels must be an int in \[1, 16384\]"),
    ("scan_config.json", lambda d: d["scan_config"].update(attention=5), "attention must be one of"),
    ("scan_config.json", lambda d: d["scan_config"].update(exits="layer1"), "exits must be a list"),
    ("scan_config.json", lambda d: d["scan_config"].update(exits=[1, 2, 9]), "out of range"),
    ("scan_config.json", lambda d: d["policy"].update(thresholds=[0.9, float("nan"), 0.7]), r"thresholds\[1\]"),
    ("scan_config.json", lambda d: d["policy"].update(thresholds=[0.9, 0.8]), "need one per shallow exit"),
    ("scan_config.json", lambda d: d["policy"].update(thresholds=["0.9", 0.8, 0.7]), r"thresholds\[0\]"),
    ("scan_config.json", lambda d: d["policy"].update(fallback="vote"), "fallback must be one of"),
    ("scan_config.json", lambda d: d["policy"].update(rule="vote"), "rule must be one of"),
    ("scan_config.json", lambda d: d["policy"].update(temperatures=[1e-300, 1.0, 1.0, 1.0]), r"temperatures .*\[0.01, 100\]"),
    ("scan_config.json", lambda d: d["policy"].update(temperatures=[1.0, 1.0, 1.0, 1e6]), r"temperatures .*\[0.01, 100\]"),
    ("scan_config.json", lambda d: d.update(format_version=True), "version True"),
    ("scan_config.json", lambda d: d.pop("sha256"), "field 'sha256' must map"),
    ("scan_config.json", lambda d: d["sha256"].update({"model.safetensors": "00"}), "field 'sha256' must map"),
    ("scan_config.json", lambda d: d["sha256"].update({"../secret": "0" * 64}), "field 'sha256' must map"),
    ("scan_config.json", lambda d: d.update(format_version=2), r"unknown \['sha256'\]"),  # format 2 had none
    ("config.json", lambda d: d["pretrained_cfg"].update(mean=[float("nan")] * 3), "config.json .*'mean' must be 3 numbers"),
    ("config.json", lambda d: d["pretrained_cfg"].update(mean=[0.5, 0.5]), "config.json .*'mean' must be 3 numbers"),
    ("config.json", lambda d: d["pretrained_cfg"].update(std=[0.0, 1.0, 1.0]), "config.json .*'std' must be 3 numbers"),
    ("config.json", lambda d: d["pretrained_cfg"].update(std=[1e-30] * 3), "config.json .*'std' must be 3 numbers"),
    ("config.json", lambda d: d["pretrained_cfg"].update(crop_pct=1e-9), "config.json .*'crop_pct' must be a number"),
    ("config.json", lambda d: d["pretrained_cfg"].update(crop_pct="0.9"), "config.json .*'crop_pct' must be a number"),
    ("config.json", lambda d: d["pretrained_cfg"].update(interpolation="magic"), "config.json .*'interpolation' must"),
    ("config.json", lambda d: d["pretrained_cfg"].update(crop_mode=5), "config.json .*'crop_mode' must be one of"),
    ("config.json", lambda d: d["pretrained_cfg"].update(input_size=[3, 0, 32]), "config.json .*'input_size'"),
])
def test_a_bad_config_field_is_named(saved, tmp_path, file, change, message):
    folder = copy_of(saved, tmp_path)
    edit_json(folder / file, change)
    with pytest.raises(ValueError, match=message):
        timm_scan.from_pretrained(folder)


def test_invalid_json_is_a_value_error(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        timm_scan.from_pretrained(folder)


def test_a_large_input_size_is_not_run_when_loading(saved, tmp_path):
    """The proof that the loaded model runs section by section uses at most ``CHECK_SIDE`` pixels a side,
    whatever input size the config names; the data config keeps the size it names."""
    folder = copy_of(saved, tmp_path)
    edit_json(folder / "config.json", lambda d: d["pretrained_cfg"].update(input_size=[3, 2048, 2048]))
    sides = []

    def record(module, args):
        sides.extend(max(a.shape[-2:]) for a in args if isinstance(a, torch.Tensor) and a.dim() == 4)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        model = timm_scan.from_pretrained(folder)
    finally:
        handle.remove()
    assert sides and max(sides) <= CHECK_SIDE and model.data_config["input_size"] == (3, 2048, 2048)


@pytest.mark.parametrize("file, dtype", [("model.safetensors", torch.int8), ("scan_exits.safetensors", torch.bool),
                                         ("scan_exits.safetensors", torch.int32)])
def test_tensors_of_another_kind_are_refused(saved, tmp_path, file, dtype):
    folder = copy_of(saved, tmp_path)
    state = load_file(folder / file)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].to(dtype)
    save_weights(folder, file, state)
    with pytest.raises(ValueError, match=f"{file} tensor '{name}' is"):
        timm_scan.from_pretrained(folder)


def test_half_precision_weights_load_as_the_models_dtype(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(folder / "scan_exits.safetensors").items()}
    save_weights(folder, "scan_exits.safetensors", state)
    model = timm_scan.from_pretrained(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("file", ["model.safetensors", "scan_exits.safetensors"])
def test_non_finite_weights_are_refused(saved, tmp_path, file):
    folder = copy_of(saved, tmp_path)
    state = load_file(folder / file)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][0] = float("nan")
    save_weights(folder, file, state)
    with pytest.raises(ValueError, match=f"{file} tensor '{name}' holds NaN"):
        timm_scan.from_pretrained(folder)


def test_a_loaded_model_saves_again(saved, tmp_path):
    model = timm_scan.from_pretrained(saved)
    model.save_pretrained(tmp_path / "again")
    again = timm_scan.from_pretrained(tmp_path / "again")
    assert again.class_names == ["a", "b", "c", "d"] and again.policy == model.policy
    assert again.policy.thresholds == (0.9, 0.8, 0.7)


def test_hub_loads_fetch_only_the_formats_files(hub, saved, tmp_path):
    api = HfApi()
    api.create_repo("tester/with-extras", exist_ok=True)
    api.upload_folder(repo_id="tester/with-extras", folder_path=str(saved))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle: never fetched")
    (tmp_path / "notes.txt").write_text("unrelated")
    for extra in ("pytorch_model.bin", "notes.txt"):
        api.upload_file(repo_id="tester/with-extras", path_or_fileobj=str(tmp_path / extra), path_in_repo=extra)
    cache = tmp_path / "cache"
    timm_scan.from_pretrained("hf-hub:tester/with-extras", cache_dir=cache)
    fetched = {p.name for p in cache.rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert fetched == {"config.json", "model.safetensors", "scan_config.json", "scan_exits.safetensors"}


def flip_data_byte(path):
    """Change one byte in the data region of a safetensors file (after its header), as a bad disk would."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + (len(data) - start) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["model.safetensors", "scan_exits.safetensors"])
def test_flipped_bytes_in_the_weights_are_a_damaged_file(saved, tmp_path, file):
    """The README's promise: a damaged file is a ValueError, even where the damage leaves finite weights of
    the right shapes; whoever loads the folder's weights (from_pretrained, --init-from, the trainer's
    load_weights) checks their SHA-256."""
    from timm_scan.model.hub import load_initial_weights, load_weights

    folder = copy_of(saved, tmp_path)
    flip_data_byte(folder / file)
    for load in (timm_scan.from_pretrained,
                 lambda f: load_initial_weights(timm_scan.from_pretrained(saved), f),
                 lambda f: load_weights(timm_scan.from_pretrained(saved), f)):
        with pytest.raises(ValueError, match=f"{file} does not have the SHA-256 checksum recorded"):
            load(folder)


def test_a_folder_saved_before_checksums_loads_and_gains_them_when_its_policy_is_saved(saved, tmp_path):
    """Format 2 (no checksums) still loads; ``save_deployment`` rewrites it in the current format, with the
    checksums of the weights it holds."""
    from timm_scan.model.hub import save_deployment

    folder = copy_of(saved, tmp_path)
    edit_json(folder / "scan_config.json", lambda d: (d.pop("sha256"), d.update(format_version=2)))
    model = timm_scan.from_pretrained(folder)
    save_deployment(folder, model.policy.replace(thresholds=[0.5, 0.5, 0.5]))
    meta = json.loads((folder / "scan_config.json").read_text())
    assert meta["format_version"] == 3 and meta["sha256"] == json.loads((saved / "scan_config.json").read_text())["sha256"]
    assert timm_scan.from_pretrained(folder).policy.thresholds == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("file, change, message", [
    # exit heads of 4.4e9 values (17.6 GB) that scan_config.json's ranges allow
    ("scan_config.json", lambda d: d["scan_config"].update(head_channels=16384, head_blocks=32),
     r"scan_config.json field 'scan_config' .* gives exit heads of 4,401,889,852 values, above"),
    # a backbone of 100000 blocks in its first stage: stopped once it outgrows model.safetensors
    ("config.json", lambda d: d.setdefault("model_args", {}).update(layers=[100000, 1, 1, 1]),
     "config.json .* describes a larger model than model.safetensors holds"),
    ("config.json", lambda d: d["model_args"].update(num_classes=10**9), "config.json .* describes a larger model"),
])
def test_what_a_folder_would_cost_is_refused_before_anything_is_built(saved, tmp_path, file, change, message):
    """Within seconds, and before any parameter is allocated (all are built on the meta device)."""
    folder = copy_of(saved, tmp_path)
    edit_json(folder / file, change)
    allocated = []

    def record(module, name, param):
        if param is not None and param.device.type != "meta":
            allocated.append(param.numel())

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(record)
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=message):
            timm_scan.from_pretrained(folder)
    finally:
        handle.remove()
    assert time.perf_counter() - start < 10 and allocated == []


def test_max_parameters_is_a_limit_a_user_can_raise(saved):
    model = timm_scan.from_pretrained(saved)
    size = sum(t.numel() for t in [*model.backbone.state_dict().values(), *model.exits.state_dict().values()])
    assert timm_scan.from_pretrained(saved, max_parameters=size).num_exits == 4
    with pytest.raises(ValueError, match=rf"model.safetensors and scan_exits.safetensors hold .* above "
                                         rf"max_parameters={size - 1:,}; .* pass a larger max_parameters"):
        timm_scan.from_pretrained(saved, max_parameters=size - 1)
    for bad in (0, True, 1.5, "1e9"):
        with pytest.raises(ValueError, match="max_parameters must be a positive int"):
            timm_scan.from_pretrained(saved, max_parameters=bad)


@pytest.mark.parametrize("file, change, message", [
    ("config.json", lambda d: d.setdefault("model_args", {}).update(layers=[2, 1, 1, 1]),
     r"model.safetensors does not match the model config.json describes: missing \['layer1.1"),
    ("config.json", lambda d: d.setdefault("model_args", {}).update(layers=[1, 1, 1]),
     "config.json does not describe a model timm can build|model.safetensors does not match the model config.json"),
    ("scan_config.json", lambda d: d["scan_config"].update(head_channels=16),
     "scan_exits.safetensors tensor .* has shape .*; in the exits scan_config.json describes it is"),
    ("scan_config.json", lambda d: (d["scan_config"].update(exits=[1, 2]), d["policy"].update(thresholds=[0.9, 0.8])),
     "scan_exits.safetensors does not match the exits scan_config.json describes"),
])
def test_a_config_that_disagrees_with_its_weights_names_both_files(saved, tmp_path, file, change, message):
    folder = copy_of(saved, tmp_path)
    edit_json(folder / file, change)
    with pytest.raises(ValueError, match=message):
        timm_scan.from_pretrained(folder)


@pytest.mark.parametrize("depth", [65, 100_000])
@pytest.mark.parametrize("file, where", [("config.json", lambda d, v: d.update(model_args=v)),
                                         ("scan_config.json", lambda d, v: d["policy"].update(thresholds=v)),
                                         ("scan_config.json", None)])
def test_deeply_nested_json_is_a_value_error_naming_the_file(saved, tmp_path, file, where, depth):
    folder = copy_of(saved, tmp_path)
    nested = "[" * depth + "]" * depth
    if where is None:
        (folder / file).write_text(nested)
    else:
        text = json.dumps(json.loads((folder / file).read_text()) | {"__marker__": 0})
        data = json.loads(text)
        where(data, "__nested__")
        (folder / file).write_text(json.dumps(data).replace('"__nested__"', nested))
    with pytest.raises(ValueError, match=f"{file} nests lists or objects more than 64 deep"):
        timm_scan.from_pretrained(folder)


def test_temperatures_are_sane_by_construction_and_calibration_stays_inside():
    from timm_scan.deploy.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE, fit_temperature
    from timm_scan.exit_policy import TEMPERATURE_RANGE

    for bad in (1e-300, 0.0, -1.0, 1e300, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"temperatures must be positive numbers in \[0.01, 100\]"):
            ExitPolicy(temperatures=[1.0, bad])
    assert TEMPERATURE_RANGE[0] <= MIN_TEMPERATURE and MAX_TEMPERATURE <= TEMPERATURE_RANGE[1]
    assert ExitPolicy(temperatures=[MIN_TEMPERATURE, MAX_TEMPERATURE]).temperatures == (MIN_TEMPERATURE, MAX_TEMPERATURE)
    labels = torch.arange(4)
    right = torch.eye(4) * 0.96 + 0.01
    fitted = [fit_temperature(right, labels), fit_temperature(right.roll(1, 0), labels)]  # right, or wrong, on all
    assert ExitPolicy(temperatures=fitted).temperatures[1] == MAX_TEMPERATURE


def test_a_data_config_loading_would_refuse_is_not_saved(tmp_path):
    model = timm_scan.wrap(timm.create_model("test_resnet", num_classes=4), check_input_size=(3, 32, 32))
    model.data_config = {**timm.data.resolve_model_data_config(model.backbone), "std": (0.2, 0.0, 0.2)}
    with pytest.raises(ValueError, match="data config field 'std'"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------ predictor and search inputs
@pytest.fixture(scope="module")
def model():
    return timm_scan.wrap(timm.create_model("test_resnet", num_classes=4), check_input_size=(3, 32, 32)).eval()


def test_predictor_inputs(model):
    predictor = EarlyExitPredictor(model, ExitPolicy(np.array([0.5, 0.5, 0.5], dtype=np.float32)))  # numpy numbers
    empty = predictor(torch.zeros(0, 3, 32, 32))
    assert empty.labels.shape == (0,) and empty.probs.shape == (0, 4)
    x = torch.randn(4, 3, 32, 32)
    x[2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"images \[2\] hold NaN"):
        predictor(x)
    x[2, 0, 5, 5], x[1, 0, 0, 0], x[3, 1, 2, 3] = 0.0, float("inf"), float("-inf")  # they sum to NaN
    with pytest.raises(ValueError, match=r"images \[1, 3\] hold NaN or infinite"):
        predictor(x)
    check_images(torch.full((2, 3, 4, 4), 3e38))  # finite pixels whose sum overflows pass
    with pytest.raises(ValueError, match="float tensor"):
        predictor(torch.zeros(2, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("images, message", [
    (torch.randn(2, 1, 32, 32), "images have 1 channels; this model takes 3"),
    (torch.randn(2, 4, 32, 32), "images have 4 channels; this model takes 3"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float16), r"images are torch.float16 on cpu; the model is torch.float32 on cpu: "
                                                       r"pass images.to\('cpu', torch.float32\)"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float64), "images are torch.float64"),
    (torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), "images are torch.bfloat16"),
])
def test_predictor_refuses_images_the_model_cannot_take(model, images, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitPredictor(model, ExitPolicy([0.5, 0.5, 0.5]))(images)


def test_non_finite_logits_are_refused_not_answered(model):
    """What pixels far outside the normalised range can do deep in a network (overflow, then inf - inf), here by
    a NaN-filled stage, as in a damaged export: the shared `run_early_exit` refuses the answer."""
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for p in damaged.backbone.layer2.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"images \[0, 1\] produced non-finite logits .*far outside the normalised"):
        EarlyExitPredictor(damaged, ExitPolicy([0.99, 0.99, 0.99]))(torch.randn(2, 3, 32, 32))


def test_predictor_answers_in_eval_mode_whatever_the_models_mode(model):
    predictor = EarlyExitPredictor(model, ExitPolicy([0.5, 0.5, 0.5]))
    x = torch.randn(8, 3, 32, 32)
    before = predictor(x)
    statistics = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    model.train()
    after = predictor(x)
    assert model.training  # the user's mode is left as it was
    model.eval()
    assert torch.equal(before.labels, after.labels) and torch.equal(before.exit_index, after.exit_index)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in statistics.items())


def outputs(n=200, k=4, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(n, classes, generator=g) * 3, -1) for _ in range(k)], torch.randint(0, classes, (n,), generator=g)


MACS = [10, 20, 30, 42]


@pytest.mark.parametrize("mutate, message", [
    (lambda p, y, kw: (([torch.log(q) for q in p]), y, kw), "not softmax probabilities"),
    (lambda p, y, kw: ([q * float("nan") for q in p], y, kw), "not softmax probabilities"),
    (lambda p, y, kw: ([q - 0.5 for q in p], y, kw), "not softmax probabilities"),
    (lambda p, y, kw: (p, y + 10, kw), "class indices in"),
    (lambda p, y, kw: (p, y.float(), kw), "labels must be integers"),
    (lambda p, y, kw: (p, np.array(["cat"] * len(y)), kw), "integers|labels"),
    (lambda p, y, kw: (p, y[:-1], kw), "one per row"),
    (lambda p, y, kw: (p, y, {**kw, "beta": -1.0}), "beta must be"),
    (lambda p, y, kw: (p, y, {**kw, "fallback": "vote"}), "fallback must be"),
    (lambda p, y, kw: (p, y, {**kw, "population": 0}), "population must be"),
    (lambda p, y, kw: (p, y, {**kw, "bits": 0}), "bits must be"),
    (lambda p, y, kw: (p, y, {**kw, "max_accuracy_drop": -1}), "max_accuracy_drop must be"),
    (lambda p, y, kw: (p, y, {**kw, "min_threshold": 1.5}), "min_threshold must be"),
    (lambda p, y, kw: (p, y, {**kw, "budget": 0}), "budget must be"),
    (lambda p, y, kw: (p, y, {**kw, "budget": float("nan")}), "budget must be"),
])
def test_search_inputs(mutate, message):
    probs, labels = outputs()
    probs, labels, kwargs = mutate(probs, labels, {"generations": 2})
    with pytest.raises(ValueError, match=message):
        search_thresholds(probs, labels, ExitCosts.macs(MACS, 40), **kwargs)


# ------------------------------------------------------------------ fuzz
def test_fuzz_from_pretrained_refuses_naming_the_file_or_loads_a_working_model(saved, tmp_path):
    """One field, tensor or a few bytes of one file changed, a size field grown, or a field nested deep
    (``benchmarks/fuzz_folders.py``'s `mutate_saved`, which runs thousands): a ``ValueError`` that names
    that file, within seconds, or (a harmless change: a label name, a float spelling) a model that answers."""
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(80):
        folder = copy_of(saved, tmp_path / str(i))
        kind, (name,) = mutate_saved(folder, rng)
        start = time.perf_counter()
        try:
            model = timm_scan.from_pretrained(folder)
        except ValueError as exc:
            assert name in str(exc), f"case {i} ({kind}): the refusal does not name {name}: {exc}"
            assert time.perf_counter() - start < 10, f"case {i} ({kind}): refused after {time.perf_counter() - start:.0f} s"
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        with torch.no_grad():
            logits = model.eval()(torch.randn(2, 3, 32, 32)).logits
        assert len(logits) == model.num_exits == 4, f"case {i} ({kind})"
        assert all(z.shape == (2, 4) and torch.isfinite(z).all() for z in logits), f"case {i} ({kind})"
    assert outcomes["refused"] > outcomes["loaded"] > 0


# what a refusal of each option of the search names (a fuzzed value may also be a valid one)
OPTION_REFUSALS = {"beta": "beta", "bits": "bits", "population": "population", "generations": "generations",
                   "crossover": "crossover", "mutation": "mutation", "min_threshold": "min_threshold",
                   "max_accuracy_drop": "max_accuracy_drop|no thresholds reach accuracy",
                   "budget": "budget", "baseline_accuracy": "baseline accuracy|baseline_accuracy"}


def test_fuzz_search_thresholds_refuses_naming_the_input_or_finds_thresholds():
    """One input of the search spoiled: a ``ValueError`` that names it, or (an option fuzzed to a valid
    value, or fewer exits) thresholds, one per shallow exit, that send every sample somewhere."""
    rng = random.Random(1)
    probs, labels = outputs(n=50)
    outcomes = {"found": 0, "refused": 0}
    for i in range(150):
        p, y = [q.clone() for q in probs], labels.clone()
        kwargs = {"generations": 2, "population": 4}
        choice = rng.randrange(6)
        refusal = None  # what the refusal must name; None: the search may succeed
        if choice == 0:
            bad = p[rng.randrange(4)]
            bad[rng.randrange(50), rng.randrange(5)] = rng.choice([float("nan"), -1.0, 2.0, float("inf")])
            refusal = r"probs\[\d\] are not softmax probabilities"
        elif choice == 1:
            y[rng.randrange(50)] = rng.choice([-1, 5, 10**9])
            refusal = "labels must be class indices in"
        elif choice == 2:
            p[rng.randrange(4)] = p[0][:, : rng.randrange(1, 5)]
            refusal = "probs must be K float arrays of one shape"
        elif choice == 3:
            option = rng.choice(sorted(OPTION_REFUSALS))
            kwargs[option] = rng.choice([-1, 0, float("nan"), float("inf"), "1", None, 1.5, 10**9])
            refusal = OPTION_REFUSALS[option]
        elif choice == 4:
            p = p[: rng.randrange(0, 4)]
            refusal = "probs must be K float arrays" if not p else None
        elif rng.random() < 0.5:
            y = y.reshape(5, 10)
            refusal = "one per row of probs"
        else:
            y = y.float()
            refusal = "labels must be integers"
        costs = ExitCosts.macs((MACS[: len(p)] or MACS) if choice == 4 else MACS, 40)
        try:
            result = search_thresholds(p, y, costs, **kwargs)
        except ValueError as exc:
            assert refusal is not None and re.search(refusal, str(exc)), f"case {i} (choice {choice}): {exc}"
            outcomes["refused"] += 1
            continue
        assert choice in (3, 4), f"case {i} (choice {choice}): {kwargs} was not refused"
        outcomes["found"] += 1
        assert len(result.thresholds) == len(p) - 1 and all(0 <= t <= 1 for t in result.thresholds), f"case {i}"
        assert len(result.exit_shares) == len(p) and sum(result.exit_shares) == pytest.approx(1), f"case {i}"
    assert outcomes["refused"] > outcomes["found"] > 0
