"""What ``timm-scan`` runs, usable from Python too: each command is a config dataclass (its fields are
the command's flags) and a function of it.

- ``train`` (`TrainConfig`, `train`): self-distillation training under Accelerate;
- ``search`` (`SearchConfig`, `search`): thresholds for a trained run, on its validation split;
- ``evaluate`` (`EvaluateConfig`, `evaluate`): early exit on a run's test split;
- ``export`` (`ExportConfig`, `export`): a run's best model as ONNX graphs that keep the early exit;
- ``push`` (`PushConfig`, `push`): a run's best model to the Hub with its card;
- ``inspect`` (`InspectConfig`, `inspect`): a wrapped model's exits and MACs;
- ``propose`` (`ProposeConfig`, `propose`): exit positions proposed from costs measured on a device.
"""
