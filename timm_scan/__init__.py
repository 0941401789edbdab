"""timm-scan: multi-exit timm models with self-distillation and early-exit inference.

Below them the nouns every layer shares: ``timm_scan.exit_policy`` (`ExitPolicy`), ``timm_scan.exit_costs``
(`ExitCosts`), ``timm_scan.report`` (typed results). Three layers, each a subpackage, in dependency
order: ``timm_scan.model`` (the multi-exit model),
``timm_scan.deploy`` (exit policy and ensemble, predictor, threshold search, ONNX export) and
``timm_scan.training`` (configuration, data, loss, the Accelerate trainer); ``timm_scan.commands`` and
the ``timm-scan`` command (``timm_scan.cli``) are built on them. The names users need are re-exported here.
"""

from .deploy import (
    EarlyExitPredictor,
    EarlyExitResult,
    ExitProposal,
    OnnxEarlyExitPredictor,
    SearchResult,
    apply_temperatures,
    calibrate,
    ensemble_probs,
    export_onnx,
    measure_exit_latency,
    propose_exits,
    search_thresholds,
    sweep_beta,
)
from .exit_costs import ExitCosts
from .exit_policy import ExitPolicy, PolicyOrigin
from .model import HubUploadError, MultiExitModel, MultiExitOutput, ScanConfig, from_pretrained, wrap
from .report import Calibration, ExitLatency
from .training import LossOutput, SelfDistillationLoss, TrainConfig

__all__ = [
    "EarlyExitPredictor",
    "Calibration",
    "EarlyExitResult",
    "ExitCosts",
    "ExitLatency",
    "ExitProposal",
    "ExitPolicy",
    "HubUploadError",
    "LossOutput",
    "MultiExitModel",
    "MultiExitOutput",
    "OnnxEarlyExitPredictor",
    "PolicyOrigin",
    "ScanConfig",
    "SearchResult",
    "SelfDistillationLoss",
    "TrainConfig",
    "apply_temperatures",
    "calibrate",
    "ensemble_probs",
    "export_onnx",
    "from_pretrained",
    "measure_exit_latency",
    "propose_exits",
    "search_thresholds",
    "sweep_beta",
    "wrap",
]
__version__ = "0.1.0"
