"""timm-scan: multi-exit timm models with self-distillation and early-exit inference."""

from .config import ScanConfig
from .hub import HubUploadError, from_pretrained
from .inference import EarlyExitPredictor, EarlyExitResult, ensemble_probs
from .losses import LossOutput, SelfDistillationLoss
from .model import MultiExitModel, MultiExitOutput, wrap
from .thresholds import SearchResult, search_thresholds, sweep_beta

__all__ = [
    "EarlyExitPredictor",
    "EarlyExitResult",
    "HubUploadError",
    "LossOutput",
    "MultiExitModel",
    "MultiExitOutput",
    "ScanConfig",
    "SearchResult",
    "SelfDistillationLoss",
    "ensemble_probs",
    "from_pretrained",
    "search_thresholds",
    "sweep_beta",
    "wrap",
]
__version__ = "0.1.0"
