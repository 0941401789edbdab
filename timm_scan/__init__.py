"""timm-scan: multi-exit timm models with self-distillation and early-exit inference."""

from .config import ScanConfig
from .losses import LossOutput, SelfDistillationLoss
from .model import MultiExitModel, MultiExitOutput, wrap

__all__ = ["LossOutput", "MultiExitModel", "MultiExitOutput", "ScanConfig", "SelfDistillationLoss", "wrap"]
__version__ = "0.1.0"
