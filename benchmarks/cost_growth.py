"""How does early exit's wall-clock grow with the batch and with the input, against the backbone?

The setting of ``early_exit_speed.py`` (resnet18, default exits, half of the images leave at the
first exit, the rest run every section and get the ensemble), measured along two axes: the batch
grows from 1 to 1024 at 32x32, and the input grows from 32x32 to 224x224 at a fixed batch.

    python benchmarks/cost_growth.py
    python benchmarks/cost_growth.py --batch-sizes 1 16 256 --sizes 32 224 --size-batch 16

Writes ``results/cost_growth.json`` and ``results/cost_growth.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from early_exit_speed import measure  # noqa: E402

HERE = Path(__file__).parent


def plot(batch_rows: list[dict], size_rows: list[dict], size_batch: int, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, key, xlabel in ((axes[0], batch_rows, "batch_size", "batch size (32x32 input)"),
                                  (axes[1], size_rows, "input", f"input side (pixels, batch {size_batch})")):
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["backbone_ms_per_image"] for r in rows], "o-", label="plain backbone")
        ax.plot(xs, [r["early_exit_ms_per_image"] for r in rows], "s-", label="early exit (half leave at exit 1)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per image")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("resnet18: wall-clock per image")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    p.add_argument("--size-batch", type=int, default=64, help="batch size of the input-size sweep")
    p.add_argument("--images", type=int, default=256, help="images per setting (at least one batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "cost_growth.json"))
    args = p.parse_args()
    rows = {"batch": [], "input": []}
    for axis, settings in (("batch", [(32, b) for b in args.batch_sizes]),
                           ("input", [(s, args.size_batch) for s in args.sizes])):
        for size, bs in settings:
            r = measure(size, bs, max(args.images, bs), args.repeats, args.channels_last)
            rows[axis].append(r)
            print(f"{size:>4}px batch {bs:>5}: backbone {r['backbone_ms_per_image']:.3f} ms/img, early exit "
                  f"{r['early_exit_ms_per_image']:.3f} ms/img, measured {r['measured_speedup']:.2f}x, "
                  f"MACs {r['macs_speedup']:.2f}x, ratio {r['ratio']:.2f}", flush=True)
    record = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "size_batch": args.size_batch, **rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    plot(rows["batch"], rows["input"], args.size_batch, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
