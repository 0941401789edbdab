"""timm-scan: multi-exit timm models with self-distillation and early-exit inference."""

from .config import ScanConfig
from .model import MultiExitModel, MultiExitOutput, wrap

__all__ = ["MultiExitModel", "MultiExitOutput", "ScanConfig", "wrap"]
__version__ = "0.1.0"
