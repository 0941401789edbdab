"""Export that keeps the early exit: one ONNX graph per section and per exit head, run by ONNX Runtime
with the same Algorithm 1 as `EarlyExitPredictor` (batch shrinking, fallback, results in input order).

An exported folder::

    manifest.json          `OnnxManifest`: graphs, input size, exits' MACs, the exit policy, classes
                           and, where measured (`OnnxEarlyExitPredictor.measure_exit_latency`), latency
    section_0.onnx ...     section k: its input (the image for k = 0) → the hidden state after it
    exit_0.onnx ...        exit k's classifier: section k's output → logits (the last: the backbone's head)

Every graph has a dynamic batch dimension; the spatial size is the one exported. A hidden state is
one tensor, batch first (graph input ``input``, output ``output``). A model run by the traced runner
hands on a `TracedState`: its tensors that follow the batch travel between graphs (the constants and
batch counts are rebuilt inside each graph); where that is not one tensor, batch first, the graphs take
``input_0``, ``input_1``, ... and give ``output_0``, ..., and the manifest's ``state_layout`` records
each tensor's batch dimension and rows per sample. Format version 4 records each graph file's SHA-256
(``sha256``), which loading verifies; version 3 holds the exit policy as one object (``policy``);
versions 1 and 2 (with ``state_layout``) held thresholds, fallback and temperatures as loose fields.
All still load.
``onnx`` and ``onnxruntime`` are an optional extra: ``pip install 'timm-scan[onnx]'``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..model.runner import eval_mode, model_name
from ..exit_policy import ExitPolicy
from ..model.config import check_data_config, check_input_size
from ..model.multi_exit import MultiExitModel
from ..model.traced import TracedState
from .._io import JsonRecord, check_sha256, sha256
from ..report import ExitLatency
from .latency import check_timing_arguments, processor_name, time_exits
from .predictor import EarlyExitResult, check_images, chosen_policy, run_early_exit
from .threads import one_torch_thread

__all__ = ["OnnxEarlyExitPredictor", "OnnxManifest", "export_onnx", "session_options", "use_global_thread_pool"]

MANIFEST = "manifest.json"
FORMAT = "timm-scan-onnx"
FORMAT_VERSION = 4  # with the graphs' SHA-256
READ_VERSIONS = (1, 2, 3, 4)  # 1: the first; 2: with state_layout; both with loose thresholds, fallback, temperatures;
# 3: the exit policy as one object
INSTALL = "pip install 'timm-scan[onnx]'"


@dataclass
class OnnxManifest(JsonRecord):
    """What an exported folder holds; exits and sections shallowest first."""

    format: str
    format_version: int
    architecture: str
    input_size: list[int]  # (C, H, W) the graphs take
    num_classes: int
    sections: list[str]  # graph files, section k
    exits: list[str]  # graph files, exit k's classifier; the last is the backbone's head
    exit_macs: list[int]
    backbone_macs: int
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    class_names: list[str] | None = None
    data_config: dict[str, Any] | None = None
    exit_latency: list[ExitLatency] | None = None  # timed with ONNX Runtime, where measured
    opset: int | None = None
    stages: list[str] = field(default_factory=list)  # the backbone modules the exits follow
    # where a section hands on other than one tensor, batch first (the traced runner's): per section but
    # the last, [batch dimension, rows per sample] of each tensor, in the order of its graph's outputs
    # and of the next section's and its exit's inputs
    state_layout: list[list[list[int]]] | None = None
    # each file of the graphs (a graph, and its external data "<graph>.data" where it has some) -> its SHA-256
    # (hex); format 4 on
    sha256: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON; without ``exit_latency`` where nothing was measured, without ``state_layout`` where
        every section hands on one tensor, batch first, and without ``sha256`` (formats before 4)."""
        data = super().to_dict()
        for key in ("exit_latency", "state_layout", "sha256"):
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OnnxManifest:
        """From JSON, in any format version this reads: versions 1 and 2 keep the policy's thresholds,
        fallback and temperatures as loose fields, and an early export's ``exit_latency_ms`` (always null,
        never written) is dropped."""
        if isinstance(data, dict) and data.get("format_version") in (1, 2):
            data = dict(data)
            if data.get("exit_latency_ms", 0) is None:
                del data["exit_latency_ms"]
            loose = {key: data.pop(key) for key in ("thresholds", "fallback", "temperatures") if key in data}
            data["policy"] = ExitPolicy(**loose).to_dict()
        return super().from_dict(data)


def _graph_inputs(h: Tensor | TracedState) -> tuple[Tensor, ...]:
    """The tensors a graph takes for hidden state ``h``: ``h`` itself, or a traced state's batched ones."""
    return h.batched() if isinstance(h, TracedState) else (h,)


def _graph_state(state: Tensor | TracedState, inputs: tuple[Tensor, ...]) -> Tensor | TracedState:
    """The hidden state a graph rebuilds from its ``inputs``: ``state`` (an example) is a tensor, or a
    traced state whose constants and batch counts are kept from the example."""
    return state.replace_batched(inputs) if isinstance(state, TracedState) else inputs[0]


class _Section(nn.Module):
    """Section k over graph inputs: its state's tensors in, the next state's out."""

    def __init__(self, model: MultiExitModel, k: int, state: Tensor | TracedState) -> None:
        super().__init__()
        self.model, self.k, self.state = model, k, state

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.model.forward_section(self.k, _graph_state(self.state, inputs))
        return out.batched() if isinstance(out, TracedState) else out


class _ExitLogits(nn.Module):
    """Exit k's classifier over section k's output, as graph inputs."""

    def __init__(self, model: MultiExitModel, k: int, image_size: tuple[int, int], state: Tensor | TracedState) -> None:
        super().__init__()
        self.model, self.k, self.image_size, self.state = model, k, image_size, state

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model.exit_logits(self.k, _graph_state(self.state, inputs), self.image_size)


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"ONNX export and inference need onnx and onnxruntime: {INSTALL}") from exc
    return onnx, onnxruntime


def export_onnx(
    model: MultiExitModel,
    folder: str | Path,
    input_size: tuple[int, int, int] | None = None,
    *,
    opset: int = 18,
    check_batch: int = 2,
    atol: float = 1e-4,
) -> OnnxManifest:
    """Write ``model`` as one ONNX graph per section and per exit head into ``folder`` (torch's own
    exporter, dynamic batch), with ``manifest.json``. ``input_size`` (C, H, W): default the model's data
    config. Each graph is checked on a random batch against the model, run by ONNX Runtime (to ``atol``
    times the output's largest magnitude where that is above 1, and 1e-3 relative); a part that
    does not export, or exports to different numbers, is a ``ValueError`` naming it, as is a data config
    that loading would refuse (`check_data_config`). The model's exit policy, class names and data config
    go into the manifest, with the SHA-256 of every file of the graphs."""
    _, ort = _onnx_modules()
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("export_onnx runs on CPU: export model.cpu() (the graphs run on any ONNX Runtime provider)")
    if input_size is None:
        input_size = tuple(model.data_config["input_size"]) if model.data_config else tuple(
            model.backbone.pretrained_cfg.get("input_size", (3, 224, 224)))
    input_size = check_input_size(input_size)
    if model.data_config:
        check_data_config(model.data_config)  # what loading will check
    if isinstance(check_batch, bool) or not isinstance(check_batch, Integral) or check_batch < 2:
        raise ValueError(f"check_batch must be an int >= 2 (the exporter fixes a batch dimension of 1); "
                         f"got {check_batch!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_earlier_export(folder)
    name = model_name(model.backbone)
    states = [torch.randn((check_batch, *input_size), generator=torch.Generator().manual_seed(0))]
    sections = [f"section_{k}.onnx" for k in range(model.num_exits)]
    exits = [f"exit_{k}.onnx" for k in range(model.num_exits)]
    with eval_mode(model), torch.no_grad():
        for k in range(model.num_exits):  # the state after each section, image first
            states.append(model.forward_section(k, states[-1]))
        if not isinstance(states[-1], Tensor):
            raise ValueError(f"cannot export {name!r}: its forward_features returns {type(states[-1]).__name__}, "
                             "and the export hands one tensor to the backbone's head")
        for k in range(model.num_exits):
            _export_checked(_Section(model, k, states[k]), states[k], folder / sections[k], f"{name!r}: section {k}",
                            opset, atol, ort)
            _export_checked(_ExitLogits(model, k, input_size[1:], states[k + 1]), states[k + 1], folder / exits[k],
                            f"{name!r}: exit {k}", opset, atol, ort)
    state_layout = [[list(t) for t in h.batch_layout()] for h in states[1:-1] if isinstance(h, TracedState)]
    manifest = OnnxManifest(
        FORMAT, FORMAT_VERSION, name, list(input_size), model.num_classes, sections, exits,
        model.exit_macs(input_size), model.backbone_macs(input_size), model.policy, model.class_names,
        json.loads(json.dumps(model.data_config, default=list)) if model.data_config else None, opset=opset,
        stages=[s.module for s in model.exit_stages],
        state_layout=state_layout if any(layout != [[0, 1]] for layout in state_layout) else None,
        sha256={file.name: sha256(file) for name in [*sections, *exits]
                for file in (folder / name, folder / f"{name}.data") if file.is_file()},
    )
    manifest.save(folder / MANIFEST)
    return manifest


_GLOBAL_POOL: list[int] = []  # the thread count of onnxruntime's process-wide pool, once set up


def use_global_thread_pool(threads: int | None = None) -> None:
    """Make every ONNX Runtime session of this process share one pool of ``threads`` threads (default:
    torch's thread count). The graphs of an export run one after another, and idle per-session pools
    keep cores busy; one shared pool does not. Call it before any session is created: onnxruntime sets
    its global pool once (a later call changes nothing), and every session must then opt into it
    (``session_options`` below does)."""
    if not _GLOBAL_POOL:
        from onnxruntime.capi.onnxruntime_pybind11_state import set_global_thread_pool_sizes

        threads = threads or torch.get_num_threads()
        set_global_thread_pool_sizes(threads, 1)
        _GLOBAL_POOL.append(threads)


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime options for graphs run one after another: the global pool where it is set up
    (`use_global_thread_pool`), else each session's own pool, which spins between the ops of a run
    and stops as soon as the run returns (``session.force_spinning_stop``), so that the idle pools of
    the other graphs do not take cores from the one running (``benchmarks/RESULTS.md`` §12)."""
    _, ort = _onnx_modules()
    options = ort.SessionOptions()
    if _GLOBAL_POOL:
        options.use_per_session_threads = False
    else:
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads:
            options.intra_op_num_threads = threads
    return options


def _thread_count(session: Any) -> str:
    """The intra-op threads ``session`` runs on, in words, e.g. ``"2 threads (global pool)"``."""
    options = session.get_session_options()
    if not options.use_per_session_threads:
        return f"{_GLOBAL_POOL[0]} threads (global pool)" if _GLOBAL_POOL else "onnxruntime's global thread pool"
    n = options.intra_op_num_threads
    if n:
        return f"{n} thread{'s' if n > 1 else ''}"
    return "onnxruntime's default threads (one per physical core)"


def _remove_earlier_export(folder: Path) -> None:
    """Delete an earlier export's manifest and the graphs it names, so that an export that fails half-way
    leaves no folder that loads with a mix of old and new graphs."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    try:
        old = OnnxManifest.load(path)
        names = [*old.sections, *old.exits]
    except (ValueError, TypeError):  # a damaged manifest: only it goes
        names = []
    path.unlink()
    for name in filter(_plain_name, names):
        for file in (folder / name, folder / f"{name}.data"):
            file.unlink(missing_ok=True)


def _check_manifest(m: OnnxManifest, path: Path) -> None:
    """Types and ranges of what the predictor reads from the manifest (of a format version it reads): a
    ``ValueError`` naming the field."""
    def ints(values: Any, least: int = 1) -> bool:
        return isinstance(values, list) and bool(values) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= least for v in values)

    graphs = [g for g in [*m.sections, *m.exits] if _plain_name(g)] if isinstance(m.sections, list) and isinstance(
        m.exits, list) else []
    checks = [
        ("input_size", ints(m.input_size) and len(m.input_size) == 3, "three positive ints (C, H, W)"),
        ("num_classes", ints([m.num_classes]), "a positive int"),
        ("exit_macs", ints(m.exit_macs) and m.exit_macs == sorted(m.exit_macs),
         "positive ints, one per exit, cumulative (never decreasing)"),
        ("backbone_macs", ints([m.backbone_macs]), "a positive int"),
        ("policy", isinstance(m.policy, ExitPolicy), "an exit policy (a JSON object)"),
        ("sections", isinstance(m.sections, list) and all(_plain_name(f) for f in m.sections), "graph file names"),
        ("exits", isinstance(m.exits, list) and bool(m.exits) and all(_plain_name(f) for f in m.exits),
         "graph file names"),
        ("state_layout", m.state_layout is None or (isinstance(m.state_layout, list) and all(
            isinstance(layout, list) and layout and all(
                isinstance(t, list) and len(t) == 2 and ints(t[:1], 0) and ints(t[1:]) for t in layout)
            for layout in m.state_layout)), "a list of [[batch dimension, rows per sample], ...] per section"),
        ("sha256", (m.sha256 is None) == (m.format_version < 4) and (m.sha256 is None or (
            isinstance(m.sha256, dict) and set(graphs) <= set(m.sha256) and all(
                _plain_name(f.removesuffix(".data")) and isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v)
                for f, v in m.sha256.items()))),
         "absent before format version 4, and from 4 on the SHA-256 (64 hex digits) of every graph file named "
         "(and of each external data file <graph>.data) in the folder"),
    ]
    for name, ok, valid in checks:
        if not ok:
            raise ValueError(f"{path}: field {name!r} must be {valid}; got {getattr(m, name)!r}")
    if m.data_config is not None:
        try:
            check_data_config(m.data_config)
        except ValueError as exc:
            raise ValueError(f"{path}: field 'data_config': {exc}") from None


def _check_graph_shapes(first_section: Any, exits: Sequence[Any], m: OnnxManifest, path: Path) -> None:
    """The manifest's input size and class count against what the graphs declare (their fixed dims)."""
    def differs(declared: Sequence[Any], expected: Sequence[int]) -> bool:
        return len(declared) != len(expected) or any(isinstance(d, int) and d != e for d, e in zip(declared, expected))

    if differs(first_section.get_inputs()[0].shape[1:], m.input_size):
        raise ValueError(f"{path}: input_size {m.input_size} does not match graph {m.sections[0]}, which takes "
                         f"{first_section.get_inputs()[0].shape[1:]}; the manifest belongs to another export")
    for name, session in zip(m.exits, exits):
        if differs(session.get_outputs()[0].shape[-1:], [m.num_classes]):
            raise ValueError(f"{path}: num_classes {m.num_classes} does not match graph {name}, whose output is "
                             f"{session.get_outputs()[0].shape}; the manifest belongs to another export")


def _check_graph_chain(sections: Sequence[Any], exits: Sequence[Any], m: OnnxManifest, folder: Path) -> None:
    """What each section's graph gives against what the graphs that take it (the next section's, its exit's)
    declare: the same element types, ranks and fixed sizes, tensor by tensor; and the image in, logits
    ``(batch, classes)`` out. Graphs swapped between places, or from another export, fail here."""
    def describe(arg: Any) -> str:
        return f"{arg.name} {arg.type} {arg.shape}"

    def fits(given: Any, taken: Any) -> bool:
        return given.type == taken.type and len(given.shape) == len(taken.shape) and all(
            not (isinstance(g, int) and isinstance(t, int)) or g == t for g, t in zip(given.shape, taken.shape))

    image, logits = sections[0].get_inputs()[0], [e.get_outputs()[0] for e in exits]
    if image.type != "tensor(float)" or len(image.shape) != 4:
        raise ValueError(f"{folder / m.sections[0]}: takes {describe(image)}, not a float image batch (N, C, H, W); "
                         f"it is not the first section of this export")
    for name, out in zip(m.exits, logits):
        if out.type != "tensor(float)" or len(out.shape) != 2:
            raise ValueError(f"{folder / name}: gives {describe(out)}, not float logits (N, classes); it is not an "
                             "exit of this export")
    for k, section in enumerate(sections):
        takers = [(m.exits[k], exits[k])] + ([(m.sections[k + 1], sections[k + 1])] if k + 1 < len(sections) else [])
        for name, taker in takers:
            for given, taken in zip(section.get_outputs(), taker.get_inputs(), strict=True):
                if not fits(given, taken):
                    raise ValueError(f"{folder / name}: takes {describe(taken)}, but {m.sections[k]} gives "
                                     f"{describe(given)}; the graphs were swapped or come from another export")


def _check_state_layout(layout: list[list[tuple[int, int]]], sections: Sequence[Any], exits: Sequence[Any],
                        m: OnnxManifest, path: Path) -> None:
    """Each state's batch dimensions against the graphs that take it (section k+1's and exit k's inputs):
    the batch dimension is the one dynamic dimension of each input."""
    for k, state in enumerate(layout):
        for name, session in ((m.sections[k + 1], sections[k]), (m.exits[k], exits[k])):
            for (d, _), declared in zip(state, session.get_inputs()):
                dynamic = [i for i, size in enumerate(declared.shape) if not isinstance(size, int)]
                if dynamic != [d]:
                    raise ValueError(f"{path}: state_layout[{k}] puts the batch in dimension {d} of input "
                                     f"{declared.name!r} of graph {name}, whose shape is {declared.shape}; the "
                                     "manifest belongs to another export")


def _plain_name(name: Any) -> bool:
    """A file name inside the folder: no directory part."""
    return isinstance(name, str) and name.endswith(".onnx") and Path(name).name == name and name not in (".", "..")


def _io_names(kind: str, n: int) -> list[str]:
    """A graph's input or output names: ``"input"`` for one, ``"input_0"``, ``"input_1"``, ... for several."""
    return [kind] if n == 1 else [f"{kind}_{i}" for i in range(n)]


def _export_checked(module: nn.Module, example: Tensor | TracedState, path: Path, what: str, opset: int, atol: float,
                    ort: Any) -> None:
    """Export ``module`` on ``example``'s graph inputs (dynamic batch) and check ONNX Runtime's outputs
    against torch's, on ``example`` and on a batch one larger (a batch size frozen into the graph shows)."""
    layout = example.batch_layout() if isinstance(example, TracedState) else [(0, 1)]
    batch = torch.export.Dim("batch")
    dynamic = (tuple({d: batch if fold == 1 else fold * batch} for d, fold in layout),)  # forward(*inputs)
    n = len(example)
    checks = []  # (batch size, graph inputs, torch's outputs) at the example's batch and at one more
    for batch_example in (example, example[torch.arange(n + 1) % n]):
        batch_inputs = _graph_inputs(batch_example)
        expected = module(*batch_inputs)
        checks.append((len(batch_example), batch_inputs, list(expected) if isinstance(expected, tuple) else [expected]))
    _, inputs, expected = checks[0]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporter's deprecation and progress chatter (and its optimiser's)
            torch.onnx.export(module, inputs, str(path), input_names=_io_names("input", len(inputs)),
                              output_names=_io_names("output", len(expected)), dynamic_shapes=dynamic,
                              opset_version=opset, dynamo=True, verbose=False)
    except ModuleNotFoundError as exc:  # torch's exporter needs onnxscript
        raise ImportError(f"ONNX export needs {exc.name}: {INSTALL}") from exc
    except Exception as exc:  # the exporter raises many types
        raise ValueError(f"cannot export {what} to ONNX ({_exporter_error(exc)})") from None
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own types
        raise ValueError(f"cannot export {what}: ONNX Runtime cannot load the exported graph "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from None
    for b, batch_inputs, expected in checks:
        try:
            got = session.run(None, dict(zip(_io_names("input", len(batch_inputs)), (x.numpy() for x in batch_inputs))))
        except Exception as exc:  # ONNX Runtime raises its own types
            raise ValueError(f"cannot export {what}: ONNX Runtime cannot run the exported graph at batch "
                             f"{b} ({type(exc).__name__}: {str(exc)[:300]})") from None
        for g, e in zip(got, expected, strict=True):
            _check_same_output(g, e.numpy(), atol, f"{what}: at batch {b}")


def _check_same_output(got: np.ndarray, expected: np.ndarray, atol: float, what: str) -> None:
    """A ``ValueError`` unless ONNX Runtime's ``got`` equals torch's ``expected`` in shape and, within
    ``atol`` times the largest magnitude where that is above 1 (float32 rounding grows with the values)
    and 1e-3 relative, in value."""
    if got.shape != expected.shape:
        raise ValueError(f"cannot export {what}: ONNX Runtime gives shape {got.shape} where torch gives "
                         f"{expected.shape}")
    largest = float(np.abs(expected).max()) if expected.size else 0.0
    tolerance = atol * max(1.0, largest)
    if not np.allclose(got, expected, atol=tolerance, rtol=1e-3):
        raise ValueError(f"cannot export {what}: ONNX Runtime computes other numbers (max difference "
                         f"{np.abs(got - expected).max():.3g} against a tolerance of {tolerance:.3g} and 1e-3 "
                         f"relative; largest value {largest:.3g})")


def _exporter_error(exc: BaseException) -> str:
    """What went wrong in torch's exporter, in a line: the innermost cause of its chain of errors, the
    op it was translating where it says, and what to do where we know."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    op = next((m.group(1) for e in chain if (m := re.search(r"target=([\w.]+)", str(e)))), None)
    message = f"{type(chain[-1]).__name__}: {str(chain[-1]).splitlines()[0][:300] if str(chain[-1]) else ''}"
    if op:
        message += f", translating {op}"
    if op and "scaled_dot_product_attention" in op:
        message += ("; timm's fused attention does not export here: create the model after "
                    "timm.layers.set_fused_attn(False), or run with the environment variable TIMM_FUSED_ATTN=0")
    return message


class OnnxEarlyExitPredictor:
    """Early exit with ONNX Runtime from an `export_onnx` folder; no torch model needed.
    ``predictor(images)`` → `EarlyExitResult` (labels, exit index, confidence, probabilities, MACs per
    sample, in input order), as `EarlyExitPredictor` gives, by the same Algorithm 1.

    ``policy``: the `ExitPolicy` to run; default the manifest's (the model's at export). The earlier form
    ``OnnxEarlyExitPredictor(folder, thresholds, fallback)`` still works, with a deprecation warning, as
    for `EarlyExitPredictor`. ``providers``: ONNX Runtime execution providers (default CPU).
    ``session_options``: default `session_options()` (the graphs run one after another: they share
    onnxruntime's global thread pool where `use_global_thread_pool` set it up, and otherwise their own
    pools stop spinning when a run returns). A missing or damaged graph (from format 4 on, every file of the
    graphs must have the SHA-256 the manifest records), graphs swapped between places or from another
    export (what each section gives must be what the graphs after it take: names, element types, ranks,
    fixed sizes), or a manifest that does not match the graphs (their number, input size, class count) is
    a ``ValueError`` here; images of the wrong shape or dtype are one at call time.
    """

    def __init__(
        self,
        folder: str | Path,
        policy: ExitPolicy | None = None,
        *legacy: Any,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options: Any = None,
        **legacy_keywords: Any,
    ) -> None:
        _, ort = _onnx_modules()
        session_options = session_options if session_options is not None else globals()["session_options"]()
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise ValueError(f"{folder} is not an exported timm-scan model: it has no {MANIFEST}")
        try:
            self.manifest = OnnxManifest.load(folder / MANIFEST)
        except ValueError as exc:
            raise ValueError(f"{folder / MANIFEST} is damaged or not a manifest: {exc}") from None
        m = self.manifest
        if m.format != FORMAT or m.format_version not in READ_VERSIONS or isinstance(m.format_version, bool):
            raise ValueError(f"{folder / MANIFEST}: format {m.format!r} version {m.format_version}; this reads "
                             f"{FORMAT!r} versions {', '.join(map(str, READ_VERSIONS))}")
        _check_manifest(m, folder / MANIFEST)
        k = len(m.exits)
        if len(m.sections) != k or len(m.exit_macs) != k:
            raise ValueError(f"{folder / MANIFEST}: {len(m.sections)} sections, {k} exits and {len(m.exit_macs)} MACs "
                             "do not match (one each per exit)")
        try:
            m.policy.check(k)
        except ValueError as exc:
            raise ValueError(f"{folder / MANIFEST}: {exc}") from None
        self.policy = chosen_policy(m.policy, policy, legacy, legacy_keywords, "OnnxEarlyExitPredictor").check(
            k, needs_thresholds=f"export a model that has some (model.policy): {folder / MANIFEST} has none")
        self.exit_latency = list(m.exit_latency or [])
        if any(len(latency.ms_per_image) != k for latency in self.exit_latency):
            raise ValueError(f"{folder / MANIFEST}: exit_latency must hold {k} values per measurement, one per exit")
        if m.format_version < FORMAT_VERSION and (m.format_version == 2) != (m.state_layout is not None):
            raise ValueError(f"{folder / MANIFEST}: format version {m.format_version} "
                             f"{'needs' if m.state_layout is None else 'has no'} state_layout; the manifest is damaged")
        self._layout = [[tuple(t) for t in layout] for layout in m.state_layout] if m.state_layout else None
        if self._layout is not None and len(self._layout) != k - 1:
            raise ValueError(f"{folder / MANIFEST}: state_layout must describe {k - 1} states, one per section "
                             f"but the last; it has {len(self._layout)}")
        handed = [len(layout) for layout in self._layout] if self._layout else [1] * (k - 1)
        taken, given = [1, *handed], [*handed, 1]  # tensors into and out of each section's graph
        for name, digest in (m.sha256 or {}).items():
            if not (folder / name).is_file():
                raise ValueError(f"{folder}: {name} named in {MANIFEST} is missing")
            check_sha256(folder / name, digest, f"{folder / name}")
        self.sections = [self._session(folder / f, ort, providers, session_options, taken[i], given[i])
                         for i, f in enumerate(m.sections)]
        self.exits = [self._session(folder / f, ort, providers, session_options, given[i], 1)
                      for i, f in enumerate(m.exits)]
        _check_graph_shapes(self.sections[0], self.exits, m, folder / MANIFEST)
        _check_graph_chain(self.sections, self.exits, m, folder)
        if self._layout is not None:
            _check_state_layout(self._layout, self.sections[1:], self.exits, m, folder / MANIFEST)
        self._macs = torch.tensor(m.exit_macs, dtype=torch.int64)

    @staticmethod
    def _session(path: Path, ort: Any, providers: Sequence[str], options: Any, inputs: int, outputs: int) -> Any:
        """The session of one graph, which must take ``inputs`` tensors and give ``outputs``."""
        if not path.is_file():
            raise ValueError(f"{path.parent}: graph {path.name} named in {MANIFEST} is missing")
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as exc:  # ONNX Runtime raises its own types for damaged graphs
            raise ValueError(f"{path}: cannot be loaded as an ONNX graph ({type(exc).__name__}: {exc})") from None
        names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if names != (_io_names("input", inputs), _io_names("output", outputs)):
            raise ValueError(f"{path}: not a timm-scan graph of this manifest (inputs {names[0]}, outputs "
                             f"{names[1]}; expected {inputs} inputs and {outputs} outputs, named "
                             f"{_io_names('input', inputs)} and {_io_names('output', outputs)})")
        return session

    @staticmethod
    def _run(session: Any, h: Tensor | TracedState) -> list[Tensor]:
        inputs = _graph_inputs(h)
        feed = {name: np.ascontiguousarray(x.numpy()) for name, x in zip(_io_names("input", len(inputs)), inputs)}
        return [torch.from_numpy(out) for out in session.run(None, feed)]

    def _section(self, k: int, h: Tensor | TracedState) -> Tensor | TracedState:
        """Section k's graph on hidden state ``h``; a traced model's state comes back as a `TracedState`."""
        outputs = self._run(self.sections[k], h)
        if self._layout is None or k == len(self.sections) - 1:
            return outputs[0]
        return TracedState.of_tensors(outputs, self._layout[k], k)

    def __call__(self, images: Tensor | np.ndarray) -> EarlyExitResult:
        """Answer a batch ``(B, C, H, W)`` of float32 images of the exported size (numpy or torch, CPU).
        torch runs on one thread during the call (`one_torch_thread`): its ops here are small, and its
        idle workers would otherwise spin on the cores ONNX Runtime needs. That setting is process-wide:
        torch work in other Python threads runs on one thread meanwhile, so do not share a process
        between this predictor and concurrent torch inference."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        with one_torch_thread():
            check_images(images)
            expected = tuple(self.manifest.input_size)
            if tuple(images.shape[1:]) != expected or images.dtype != torch.float32:
                raise ValueError(f"images must be float32 (batch, {', '.join(map(str, expected))}) as exported; got "
                                 f"{images.dtype} {tuple(images.shape)}")
            return run_early_exit(images.cpu(), len(self.exits), self._section, self._exit_logits, self.policy,
                                  self._macs, self.manifest.num_classes)

    def _exit_logits(self, k: int, h: Tensor | TracedState) -> Tensor:
        return self._run(self.exits[k], h)[0]

    def section_functions(self, image_size: tuple[int, int] | None = None) -> tuple[Callable[[int, Any], Any],
                                                                          Callable[[int, Any], Tensor]]:
        """``(section, exit_logits)`` as `run_early_exit` takes them (and `EarlyExitPredictor.section_functions` gives):
        each graph on CPU tensors; ``image_size`` must be the exported one (it is fixed)."""
        if image_size is not None and tuple(image_size) != tuple(self.manifest.input_size[1:]):
            raise ValueError(f"this export takes {self.manifest.input_size[1]}x{self.manifest.input_size[2]} images; "
                             f"got {image_size[0]}x{image_size[1]}: resize them so, or export again at that size "
                             "(timm-scan export RUN --input-size)")
        return self._section, self._exit_logits

    @property
    def exit_macs(self) -> list[int]:
        return list(self.manifest.exit_macs)

    def measure_exit_latency(self, batch_size: int = 1, *, images: int = 64, repeats: int = 5) -> ExitLatency:
        """Milliseconds per image of leaving at each exit with these ONNX Runtime sessions, at
        ``batch_size``, as `timm_scan.measure_exit_latency` times a torch model (`time_exits`: this
        predictor, with its fallback, and thresholds that send every sample to exit i, in turns with the
        backbone; ``images`` random images per pass, rounded up to whole batches; the median of
        ``repeats`` passes). The backbone here is what the folder holds of it: every section graph and
        the deepest exit's graph, one after another, not a one-graph export of the backbone (which can
        be faster at small inputs, ``benchmarks/RESULTS.md`` §12). Store the result in the manifest's
        ``exit_latency`` (``timm-scan export --latency-batch-sizes`` does) to keep it with the graphs."""
        check_timing_arguments(batch_size, images, repeats)
        size = tuple(self.manifest.input_size)
        batches = [torch.randn(batch_size, *size) for _ in range(math.ceil(images / batch_size))]

        def backbone(x: Tensor) -> Tensor:
            h = x
            for k in range(len(self.sections)):
                h = self._section(k, h)
            return self._run(self.exits[-1], h)[0]

        exits_ms, backbone_ms = time_exits(self, backbone, len(self.exits), batches, repeats)
        _, ort = _onnx_modules()
        providers = "/".join(self.sections[0].get_providers())
        return ExitLatency(exits_ms, backbone_ms, batch_size, list(size), "float32", "contiguous",
                           f"{providers}: {processor_name()}, {_thread_count(self.sections[0])}, "
                           f"onnxruntime {ort.__version__}")
