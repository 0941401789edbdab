"""Which timm families `timm_scan.wrap` handles: one model of every model module in the installed timm
(``timm.list_models()`` grouped by the module that defines each model), random weights, its default
input size. A model passes when it wraps with the default exits and heads, its deepest exit equals
``backbone(x)`` bit for bit in eval mode and ``exit_macs`` is strictly increasing; a refusal is
recorded with its reason. Each row also records what the default heads and the papers' heads (SepConv to
the deepest stage's width, SD attention) add to the backbone's MACs and parameters at that size.

    python benchmarks/timm_coverage.py                       # every module; results/timm_coverage.json
    python benchmarks/timm_coverage.py --models resnet50 vit_small_patch16_224 --out /tmp/cov.json

The model of a module is its smallest by parameter count among the (at most ``CANDIDATES``) names
that look smallest (``atto`` < ``nano`` < ``tiny`` < ``small`` …); timm's ``test_*`` models only where
a module has nothing else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import time
import warnings
from pathlib import Path

import timm
import torch
from tqdm import tqdm

import timm_scan
from timm_scan.model.heads import exit_heads, head_macs

CANDIDATES = 6
_SIZE_WORDS = ["atto", "femto", "pico", "nano", "xxxs", "xxs", "xs", "mini", "tiny", "t", "lite", "small", "s", "b0"]


def _looks_small(name: str) -> tuple:
    words = re.split(r"[_.\-]", name)
    stems = [re.sub(r"\d+$", "", w) for w in words]  # "xxs24" → "xxs"
    size = min((_SIZE_WORDS.index(w) for w in stems if w in _SIZE_WORDS), default=len(_SIZE_WORDS))
    number = next((int(n) for n in re.findall(r"\d+", words[0])), 0)  # resnet18 before resnet152
    return (name.startswith("test_"), size, number, len(name))


def pick_model(module: str) -> str:
    """The smallest model of ``module`` (parameters counted on the meta device)."""
    names = sorted(timm.list_models(module=module), key=_looks_small)[:CANDIDATES]
    sizes = {}
    for name in names:
        try:
            with torch.device("meta"):
                sizes[name] = sum(p.numel() for p in timm.create_model(name).parameters())
        except Exception:  # a model that cannot be built on the meta device is judged by its name
            sizes.setdefault(name, float("inf"))
    return min(names, key=lambda n: (sizes[n], _looks_small(n)))


def _inference_params(heads: list[torch.nn.Module]) -> int:
    return sum(p.numel() for h in heads for n, p in h.named_parameters() if not n.startswith("proj."))


def head_costs(backbone: torch.nn.Module, model: timm_scan.MultiExitModel, size: tuple[int, int, int]) -> dict:
    """What the default heads and the papers' (SepConv to the deepest width, SD attention) add at ``size``:
    backbone MACs and parameters, the heads' MACs and inference parameters (the hint's projection left
    out), the default heads' align width."""
    cuts = model.exit_stages[:-1]
    papers = timm_scan.ScanConfig(exits=model.config.exits, attention="sd", head_budget=None)
    with torch.device("meta"):
        papers_params = _inference_params(exit_heads(backbone, papers, cuts))
    return {"backbone_macs": model.backbone_macs(size), "backbone_params": sum(p.numel() for p in backbone.parameters()),
            "head_channels": model.config.head_channels, "attention": model.config.attention,
            "heads_macs": sum(head_macs(backbone, model.config, cuts, size)), "heads_params": _inference_params(model.exits),
            "papers_heads_macs": sum(head_macs(backbone, papers, cuts, size)), "papers_heads_params": papers_params}


def check(name: str) -> dict:
    started = time.time()
    row: dict = {"model": name}
    try:
        backbone = timm.create_model(name, num_classes=10).eval()
        size = tuple(backbone.pretrained_cfg.get("input_size", (3, 224, 224)))
        row["input_size"] = list(size)
        model = timm_scan.wrap(backbone, check_input_size=size)
        x = torch.randn(1, *size)
        with torch.no_grad():
            equal = torch.equal(model(x).logits[-1], backbone(x))
        macs = model.exit_macs(size)
        increasing = all(a < b for a, b in zip(macs, macs[1:]))
        row.update(ok=equal and increasing, deepest_equal=equal, macs_increasing=increasing,
                   runner=model.runner, exits=[s.module for s in model.exit_stages[:-1]],
                   exit_macs=macs, **head_costs(backbone, model, size))
    except ValueError as exc:
        row.update(ok=False, refusal=str(exc))
    except Exception as exc:  # not a refusal: a bug to fix
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.time() - started, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", help="these models instead of one per timm module")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "timm_coverage.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.models:
        targets = [(None, name) for name in args.models]
    else:
        targets = [(module, pick_model(module)) for module in tqdm(timm.list_modules(), desc="choosing models")
                   if timm.list_models(module=module)]
    rows = []
    for module, name in tqdm(targets, desc="wrapping"):
        rows.append({"module": module, **check(name)})
        r = rows[-1]
        detail = r.get("runner") or r.get("refusal") or r.get("error")
        outcome = "ok" if r["ok"] else "error" if "error" in r else "refused"
        tqdm.write(f"{outcome:7s} {module or '':22s} {name:34s} {detail}")
    passed = sum(r["ok"] for r in rows)
    print(f"{passed} of {len(rows)} wrapped ({100 * passed / len(rows):.1f}%): deepest exit equal to the backbone, "
          "exit MACs increasing")
    record = {"date": datetime.date.today().isoformat(), "timm": timm.__version__, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": " ".join(["python", "benchmarks/timm_coverage.py", *(["--models", *args.models] if args.models
                                                                             else [])]),
              "passed": passed, "total": len(rows), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
