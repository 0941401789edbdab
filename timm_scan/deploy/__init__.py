"""Deployment: the exit policy and the ensemble, the early-exit predictor, threshold search, ONNX export,
timing, plots."""

from .calibration import calibrate
from .latency import measure_exit_latency
from .onnx import OnnxEarlyExitPredictor, OnnxManifest, export_onnx
from .plots import plot_exit_shares, plot_tradeoff
from .policy import apply_temperatures, ensemble_probs, simulate_early_exit
from .predictor import EarlyExitPredictor, EarlyExitResult
from .propose import ExitProposal, Position, propose_exits
from .search import search_thresholds, sweep_beta
from .thresholds import ExitTable, SearchResult
from .timing import wall_clocks

__all__ = ["EarlyExitPredictor", "EarlyExitResult", "ExitProposal", "ExitTable", "OnnxEarlyExitPredictor", "OnnxManifest",
           "Position", "SearchResult", "apply_temperatures", "calibrate", "ensemble_probs", "export_onnx",
           "measure_exit_latency", "plot_exit_shares", "plot_tradeoff", "propose_exits", "search_thresholds",
           "simulate_early_exit", "sweep_beta", "wall_clocks"]
