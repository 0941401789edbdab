import pytest

from timm_scan import ScanConfig


def test_defaults_are_valid():
    cfg = ScanConfig()
    assert cfg.exits is None and cfg.attention == "none" and cfg.head_budget == 0.05
    assert ScanConfig.papers(exits=[1]) == ScanConfig(exits=[1], attention="sd", head_budget=None)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"exits": 3}, "exits"),
        ({"exits": "layer1"}, "exits"),
        ({"exits": [1, 1.5]}, "exits[1]"),
        ({"exits": [True]}, "exits[0]"),
        ({"exits": [1, 1]}, "duplicates"),
        ({"attention": "cbam"}, "attention"),
        ({"head_channels": 0}, "head_channels"),
        ({"head_blocks": -1}, "head_blocks"),
        ({"head_blocks": 2.0}, "head_blocks"),
        ({"head_budget": 0}, "head_budget"),
        ({"head_budget": 1.5}, "head_budget"),
        ({"head_budget": True}, "head_budget"),
        ({"head_budget": float("nan")}, "head_budget"),
        ({"head_budget": "5%"}, "head_budget"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ScanConfig(**kwargs)


def test_attention_error_lists_valid_choices():
    with pytest.raises(ValueError, match="'sd', 'scan', 'none'"):
        ScanConfig(attention="SD")


def test_json_round_trip():
    cfg = ScanConfig(exits=[1, "layer3", -3], attention="scan", head_channels=256, head_blocks=2)
    assert ScanConfig.from_json(cfg.to_json()) == cfg
    assert ScanConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown ScanConfig field.*'exit'"):
        ScanConfig.from_dict({"exit": [1]})


def test_input_size_is_three_positive_ints_numpy_ones_included():
    import numpy as np

    from timm_scan.model.config import check_input_size

    assert check_input_size([np.int64(3), 32, 32]) == (3, 32, 32)
    for bad in (32, (3, 32), (3, 0, 32), (True, 32, 32), (3.0, 32, 32)):
        with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
            check_input_size(bad)


def test_a_config_saved_before_the_head_budget_keeps_the_papers_heads():
    saved = {"exits": [1, 2, 3], "attention": "sd", "head_channels": None, "head_blocks": None, "head": "sepconv"}
    assert ScanConfig.from_dict(saved).head_budget is None
    assert ScanConfig().head_budget == 0.05  # a new config is sized by cost
