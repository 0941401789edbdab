"""Where the exits go: ``feature_info`` stages, and blocks inside them.

An exit position is a module of the backbone after which the runner cuts. It is either a ``feature_info``
stage (a ``ScanConfig.exits`` entry giving its index or its module name) or a block inside a stage: a
module that ``forward_features`` calls once and whose output is a feature map (an entry naming it,
``"layer3.0"``, ``"stages.2.blocks.1"``, ``"blocks.3"``). `resolve_exits` turns ``ScanConfig.exits`` into
``Stage``s in the order the forward reaches them, a block's channels and reduction read off its output on
an example batch (its ``Stage.index`` is ``None``); `exit_entry` is the inverse, what a resolved config
records. ``default_exit_indices`` is the papers' placement; `block_positions` lists the blocks a model
offers besides its stages (what ``timm_scan.propose_exits`` measures).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .runner import Stage, feature_stages, forward_features_with, model_name

__all__ = ["block_positions", "default_exit_indices", "exit_entry", "resolve_exits"]

NUM_DEFAULT_SHALLOW_EXITS = 3  # four classifiers in all, as the papers recommend (TPAMI §4.8-4.9)
STEM_MAX_REDUCTION = 2


def default_exit_indices(stages: list[Stage]) -> list[int]:
    """Papers' default placement: three shallow exits at the ends of the main sections.

    Candidates are every stage but the last (whose head is the backbone's) and but the stem
    (stages at reduction <= 2, kept only if nothing else is left). Where more than three remain
    (ViT: 12 equal blocks), exits go at 1/4, 2/4 and 3/4 of the candidates' depth.
    """
    candidates = [s.index for s in stages[:-1] if s.reduction > STEM_MAX_REDUCTION]
    if not candidates:
        candidates = [s.index for s in stages[:-1]]
    m = len(candidates)
    if m <= NUM_DEFAULT_SHALLOW_EXITS:
        return candidates
    n = NUM_DEFAULT_SHALLOW_EXITS + 1
    positions = sorted({int(k * (m + 1) / n + 0.5) for k in range(1, n)})  # 1-based, half-up
    return [candidates[p - 1] for p in positions]


def exit_entry(stage: Stage) -> int | str:
    """What a resolved ``ScanConfig.exits`` records for ``stage``: its ``feature_info`` index, or, for a block
    inside a stage, its module name."""
    return stage.index if stage.index is not None else stage.module


def resolve_exits(model: nn.Module, exits: list[int | str] | None, example: Tensor) -> list[Stage]:
    """``ScanConfig.exits`` → the exits' ``Stage``s in the order the forward reaches them, validated against
    ``model``. Blocks inside stages are probed on ``example`` (``(B, C, H, W)``; a meta tensor will do): each
    must be called once by ``forward_features`` and return a feature map."""
    stages = feature_stages(model)
    if exits is None:
        return [stages[i] for i in default_exit_indices(stages)]
    n = len(stages)
    by_name = {s.module: s for s in stages}
    chosen: list[Stage | str] = []
    for i, e in enumerate(exits):
        if isinstance(e, str) and e not in by_name:
            _check_block_name(model, e, i, stages, example)
            chosen.append(e)
            continue
        if isinstance(e, int) and not -n <= e < n:
            raise ValueError(
                f"ScanConfig.exits[{i}] = {e} is out of range for {model_name(model)!r}: valid "
                f"feature_info indices are 0..{n - 2} (or {-n}..-2)"
            )
        stage = by_name[e] if isinstance(e, str) else stages[e % n]
        if stage.index == n - 1:
            inside = _examples(model, example, stage.module)
            raise ValueError(
                f"ScanConfig.exits[{i}] = {e!r} names the last stage ({stages[-1].module!r}) of "
                f"{model_name(model)!r}, whose head is the backbone's own classifier; choose from "
                f"indices 0..{n - 2}" + (f", or a block inside it ({inside})" if inside else "")
            )
        chosen.append(stage)
    if len({c if isinstance(c, str) else c.module for c in chosen}) != len(chosen):
        raise ValueError(f"ScanConfig.exits {exits!r} names the same stage twice for {model_name(model)!r}")
    blocks = [c for c in chosen if isinstance(c, str)]
    if not blocks:
        return sorted(chosen, key=lambda s: s.index)
    probed, order, outputs = _probe(model, blocks, [s.module for s in stages], example,
                                    required=[c.module for c in chosen if isinstance(c, Stage)])
    for name in blocks:  # a stage's last block returns the stage's own output
        same = next((s for s in stages if s.module in outputs and outputs[s.module] is outputs[name]), None)
        if same is not None:
            raise ValueError(f"ScanConfig.exits names {name!r}, whose output is the output of stage {same.module!r}: " + (
                "name the stage instead" if same.index < n - 1 else
                "the end of the last stage, whose head is the backbone's own classifier; choose an earlier block"))
    return sorted((probed[c] if isinstance(c, str) else c for c in chosen), key=lambda s: order[s.module])


def block_positions(model: nn.Module, example: Tensor) -> list[Stage]:
    """The blocks of ``model`` an exit could follow besides its ``feature_info`` stages, in the order the
    forward reaches them: the elements of its ``nn.Sequential`` containers that hold layers of their own
    (not a lone conv, norm or activation), are called once and return a feature map past the stem
    (reduction above 2) other than a stage's own output (a stage's last block). The runner may still refuse
    some (``wrap`` proves each)."""
    stages = feature_stages(model)
    stage_names = {s.module for s in stages}
    names = []
    for name, module in model.named_modules():
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        inside = any(name.startswith(n + ".") for n in names)  # a block's own layers are not blocks
        if (name and not inside and name not in stage_names and isinstance(parent, nn.Sequential) and parent is not model
                and any(True for _ in module.children()) and not isinstance(module, nn.Sequential)):
            names.append(name)
    probed, order, outputs = _probe(model, names, [s.module for s in stages], example, strict=False)
    ends = [outputs[s.module] for s in stages if s.module in outputs]  # a stage's last block returns its output
    found = [s for s in probed.values()
             if s.reduction > STEM_MAX_REDUCTION and not any(outputs[s.module] is end for end in ends)]
    return sorted(found, key=lambda s: order[s.module])


def _check_block_name(model: nn.Module, name: str, i: int, stages: list[Stage], example: Tensor) -> None:
    try:
        model.get_submodule(name)
    except AttributeError:
        blocks = _examples(model, example)
        raise ValueError(
            f"ScanConfig.exits[{i}] = {name!r} is neither a feature_info module nor a module of "
            f"{model_name(model)!r}; valid stage names are {[s.module for s in stages[:-1]]}"
            + (f", and blocks inside stages are named like {blocks}" if blocks else "")
            + " (timm_scan.propose_exits lists every position)"
        ) from None


def _examples(model: nn.Module, example: Tensor, prefix: str = "") -> str:
    """A few of the blocks an exit could follow (those inside ``prefix``), for an error message."""
    try:
        names = [s.module for s in block_positions(model, example) if s.module.startswith(prefix)]
    except ValueError:
        return ""
    return ", ".join(repr(n) for n in names[:3])


def _probe(model: nn.Module, blocks: list[str], stages: list[str], example: Tensor, strict: bool = True,
           required: list[str] = ()) -> tuple[dict[str, Stage], dict[str, int], dict[str, Any]]:
    """Run ``forward_features`` once on ``example[:1]``: each block's ``Stage`` (channels and reduction of
    its output map), the order in which blocks and stages (those that are modules) return, and what
    those called once returned. ``strict``: a block that is not called once or returns no map is a
    ``ValueError``, else left out; so is a stage of ``required`` that is not a module called once (the
    order of the exits would be unknown). A forward that fails is a ``ValueError``."""
    nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
    calls: dict[str, list[Any]] = {name: [] for name in [*blocks, *stages]}
    order: dict[str, int] = {}
    handles = []

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name].append(output)
            order[name] = len(order)
        return hook

    for name in calls:
        try:
            handles.append(model.get_submodule(name).register_forward_hook(record(name)))
        except AttributeError:
            pass  # a stage that is no module (a list of blocks): ordered by its index alone
    forward_features_with(model, example[:1], handles, f"cannot place exits inside the stages of {model_name(model)!r}")
    height = example.shape[-2]
    probed = {}
    for name in blocks:
        outputs = calls[name]
        out = outputs[0] if len(outputs) == 1 else None
        if isinstance(out, Tensor) and out.dim() == 4:
            chs, h = (out.shape[3], out.shape[1]) if nhwc else (out.shape[1], out.shape[2])
            probed[name] = Stage(None, name, int(chs), max(1, round(height / h)))
        elif strict:
            got = (f"called {len(outputs)} times" if len(outputs) != 1 else
                   f"returns {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}, not a feature map")
            raise ValueError(f"ScanConfig.exits names {name!r}, which {model_name(model)}'s forward_features {got}; an "
                             "exit inside a stage follows a block called once that returns a (B, C, H, W) map")
    missing = [s for s in required if s not in order]
    if missing:
        raise ValueError(f"cannot place exits inside the stages of {model_name(model)!r} beside its stages {missing}: "
                         "they are not modules that forward_features calls, so the order of blocks and stages is "
                         "unknown; give blocks only, or stages only")
    return probed, order, {name: out[0] for name, out in calls.items() if len(out) == 1}
