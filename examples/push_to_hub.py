"""Push a trained run's best model to the Hugging Face Hub, with a model card.

    python examples/push_to_hub.py runs/demo your-name/resnet18-cifar10-scan [--private] [--revision BRANCH]

The card shows the test accuracy and MACs per exit (<run>/results.json), the searched thresholds and
their measured speed-up (<run>/evaluation.json, from examples/evaluate.py) and the trade-off plot,
where those exist. The files are first written to <run>/hub/; if the upload fails they stay there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from timm_scan.hub import model_card, push_to_hub
from timm_scan.runs import load_run


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="output directory of examples/train.py")
    p.add_argument("repo_id", help="owner/name on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="a branch to push to (created if needed)")
    p.add_argument("--license", default="apache-2.0")
    args = p.parse_args()

    run = Path(args.run)
    model, cfg = load_run(run)
    plot = run / "tradeoff_test.png"
    card = model_card(model, repo_id=args.repo_id, license=args.license, dataset=cfg.dataset,
                      train_config=json.loads((run / "train_config.json").read_text()),
                      results=read_json(run / "results.json"), evaluation=read_json(run / "evaluation.json"),
                      plot=plot.name if plot.is_file() else None)
    url = push_to_hub(model, args.repo_id, save_directory=run / "hub", card=card,
                      extra_files=[plot] if plot.is_file() else [], private=args.private or None,
                      revision=args.revision)
    print(f"pushed {run} to {args.repo_id}: {url}")


if __name__ == "__main__":
    main()
