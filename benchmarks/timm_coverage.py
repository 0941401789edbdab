"""Which timm families `timm_scan.wrap` handles: wrap each model (random weights, its default input
size), check that the deepest exit equals the backbone, and record the refusals with their reason.

    python benchmarks/timm_coverage.py                  # the list below; results/timm_coverage.json
    python benchmarks/timm_coverage.py resnet50 vit_small_patch16_224
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import warnings
from pathlib import Path

import timm
import torch

import timm_scan

MODELS = [
    "resnet18", "resnext26ts", "seresnet18", "resnet18d", "regnety_002", "efficientnet_b0", "efficientnetv2_rw_t",
    "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv4_conv_small", "convnext_atto", "convnextv2_atto",
    "densenet121", "vgg11_bn", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "cait_xxs24_224", "beit_base_patch16_224",
    "eva02_tiny_patch14_224", "maxvit_nano_rw_256", "coatnet_nano_rw_224", "levit_128s", "poolformer_s12",
    "ghostnet_050", "hrnet_w18_small", "dla34", "cspresnet50", "cspdarknet53", "dpn68", "rexnet_100",
    "ese_vovnet19b_dw", "nfnet_f0", "repvgg_a0", "fastvit_t8", "efficientformer_l1", "mobilevit_xxs",
    "tiny_vit_5m_224", "edgenext_xx_small", "inception_v3", "xception41", "tresnet_m", "hgnet_tiny",
    "focalnet_tiny_srf", "davit_tiny", "pvt_v2_b0", "twins_pcpvt_small", "mixer_s16_224", "crossvit_tiny_240",
    "volo_d1_224", "sequencer2d_s", "nest_tiny", "gcvit_xxtiny", "efficientvit_b0", "rdnet_tiny", "starnet_s1",
    "mambaout_femto",
]


def check(name: str) -> dict:
    started = time.time()
    try:
        backbone = timm.create_model(name, num_classes=10).eval()
        size = tuple(backbone.pretrained_cfg.get("input_size", (3, 224, 224)))
        model = timm_scan.wrap(backbone, check_input_size=size)
        x = torch.randn(1, *size)
        with torch.no_grad():
            equal = torch.equal(model(x).logits[-1], backbone(x))
        return {"model": name, "ok": equal, "exits": [s.module for s in model.exit_stages[:-1]],
                "seconds": round(time.time() - started, 1)}
    except ValueError as exc:
        return {"model": name, "ok": False, "refusal": str(exc)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=MODELS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "timm_coverage.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        rows.append(check(name))
        r = rows[-1]
        print(f"{'ok     ' if r['ok'] else 'refused'} {name:34s} {r.get('exits') or r.get('refusal', '')}", flush=True)
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} wrapped, deepest exit equal to the backbone")
    record = {"date": datetime.date.today().isoformat(), "timm": timm.__version__, "torch": torch.__version__,
              "command": "python benchmarks/timm_coverage.py", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
