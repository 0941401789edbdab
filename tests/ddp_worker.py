"""Run by test_training under torch.distributed.run with 2 CPU processes: trains one epoch and
reports whether the ranks form one data-parallel job."""

import json
import sys
from pathlib import Path

import torch

from timm_scan.training import Trainer, TrainConfig

data, out = sys.argv[1], Path(sys.argv[2])
cfg = TrainConfig(dataset=data, output_dir=str(out / "run"), model="test_resnet", input_size=32, crop_pct=1.0,
                  val_size=16, epochs=1, anneal_epochs=0, batch_size=16, lr=0.05, num_workers=0)
trainer = Trainer(cfg)
acc = trainer.accelerator
model = acc.unwrap_model(trainer.model)
before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
trainer._train_epoch(0)
after = torch.cat([p.detach().flatten() for p in model.parameters()])
val = trainer.evaluate(trainer.val_loader)
checksums = acc.gather(torch.stack([after.double().sum(), after.double().pow(2).sum()])[None])
if acc.is_main_process:
    report = {
        "world_size": acc.num_processes,
        "val_samples": val.samples,
        "val_size": len(trainer.data.val),
        "train_batches_per_rank": len(trainer.train_loader),
        "weights_equal_across_ranks": bool(torch.equal(checksums[0], checksums[1])),
        "weights_changed": bool(not torch.equal(before, after)),
    }
    (out / "report.json").write_text(json.dumps(report))
acc.wait_for_everyone()
acc.end_training()
