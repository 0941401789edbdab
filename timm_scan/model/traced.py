"""Staged execution of any timm model whose ``forward_features`` torch.fx can trace.

`TracedRunner`, the runner of last resort (``backbone.build_runner`` tries it after the others), for
families whose forward does more than run its children in order (class tokens added halfway, rotary
embeddings passed to every block, stages in a ``ModuleList``, several branches). ``forward_features`` is
traced once with timm's own FX conventions (its ``register_notrace_*`` modules and functions, as in
``timm.models.FeatureGraphNet``) and every module opaque except the ancestors of the exits' stages (where
that does not trace, as deep as torch.fx goes by default). The graph is then cut after the call of each
exit's stage, or, where ``feature_info`` names no module the forward calls once, after the first value
equal to the stage's ``forward_intermediates`` map. Sections run the graph's own nodes against the live
model, in the original order, so train mode consumes the random generator as ``backbone(x)`` does; a
forward that takes other steps in train mode than in eval mode is refused.

Between sections the hidden state is a ``TracedState``: every value that a later section reads (the
stage's output, a rotary embedding, the batch size read off a shape, …). At wrap time each value is
classified from two batch sizes (batch dimension, batch size, or constant), so that ``state[keep]``
drops samples as early exit needs; a value that follows the batch in another way is refused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from timm.layers import DropBlock2d, DropPath, PatchDropout, get_notrace_functions, get_notrace_modules
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .runner import (
    Runner,
    Stage,
    check_close,
    expected_maps,
    no_checkpointing,
    eval_mode,
    model_name,
    run_mode,
)

__all__ = ["TracedRunner", "TracedState"]

_ROOT = "backbone"  # the traced wrapper's attribute holding the model: node targets start with it
_PROBE_BATCH = 3


class _Features(nn.Module):
    """What is traced: the model's ``forward_features``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, _ROOT, model)

    def forward(self, x: Tensor) -> Any:
        return getattr(self, _ROOT).forward_features(x)


class _Tracer(fx.Tracer):
    """timm's leaf modules and functions, and the exits' stages and blocks, as leaves. ``through``: the only
    modules traced into (the cuts' ancestors, a stage holding a block cut among them); ``None``: every
    module that torch.fx traces by default."""

    def __init__(self, cut_names: set[str], through: set[str] | None) -> None:
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.cut_names = cut_names
        self.through = through
        # random layers read their training flag when they run: never traced into (a flag read while
        # tracing would be frozen into the graph)
        self.notrace = (*get_notrace_modules(), DropPath, DropBlock2d, PatchDropout, nn.Dropout)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.notrace) or module_qualified_name in self.cut_names:
            return True
        if self.through is None:
            return super().is_leaf_module(m, module_qualified_name)
        return module_qualified_name not in self.through


class _CannotTrace(ValueError):
    """Why the traced runner cannot run a model."""


@dataclass(frozen=True)
class _Leaf:
    """How one leaf of the state follows the batch: ``batch_dim`` (tensors), ``batch_size`` (an int
    equal to the batch size; pytree flattens a ``torch.Size`` into such ints), or constant (neither)."""

    batch_dim: int | None = None
    fold: int = 1  # the batch dimension holds ``fold`` rows per sample (TNT's pixel tokens: B * 196)
    batch_size: bool = False

    def samples(self, value: Tensor) -> int:
        """How many samples ``value`` (batched along ``batch_dim``) holds."""
        return value.shape[self.batch_dim] // self.fold

    def select(self, value: Tensor, index: Tensor) -> Tensor:
        """``value`` (batched along ``batch_dim``) at the samples ``index`` selects."""
        d = self.batch_dim
        if self.fold > 1:
            per_sample = value.unflatten(d, (-1, self.fold))
            return per_sample[(slice(None),) * d + (index,)].flatten(d, d + 1)
        return value[(slice(None),) * d + (index,)]


class TracedState:
    """The values one section hands to the next (``values``: one per graph value read later).

    ``state[index]`` keeps the samples ``index`` selects (a boolean mask or integer positions along
    the batch), as ``tensor[index]`` does; the rest of the values are carried unchanged.
    """

    def __init__(self, values: tuple[Any, ...], section: int, leaves: list[_Leaf], spec: pytree.TreeSpec) -> None:
        self.values = values
        self.section = section  # the section that handed it on
        self._leaves = leaves
        self._spec = spec

    @classmethod
    def of_tensors(cls, tensors: Sequence[Tensor], layout: Sequence[tuple[int, int]], section: int) -> TracedState:
        """A state of ``tensors`` alone, each batched as ``layout`` says (see `batch_layout`): how an
        exported model's state travels between ONNX graphs."""
        values = tuple(tensors)
        if len(values) != len(layout):
            raise ValueError(f"{len(values)} tensors for a layout of {len(layout)}")
        leaves = [_Leaf(batch_dim=d, fold=fold) for d, fold in layout]
        return cls(values, section, leaves, pytree.tree_flatten(values)[1])

    def batched(self) -> tuple[Tensor, ...]:
        """The tensors that follow the batch, in order (the rest is constant or counts the batch)."""
        return tuple(v for v, leaf in zip(pytree.tree_leaves(self.values), self._leaves) if leaf.batch_dim is not None)

    def batch_layout(self) -> list[tuple[int, int]]:
        """``(batch dimension, rows per sample)`` of each of `batched`'s tensors."""
        return [(leaf.batch_dim, leaf.fold) for leaf in self._leaves if leaf.batch_dim is not None]

    def replace_batched(self, tensors: Sequence[Tensor]) -> TracedState:
        """This state with `batched`'s tensors replaced by ``tensors`` (in order, of any one batch size),
        and the ints that count the batch counted again (pytree flattens a ``torch.Size`` into ints and
        gives it back as a tuple)."""
        batched = sum(leaf.batch_dim is not None for leaf in self._leaves)
        if len(tensors) != batched:
            raise ValueError(f"{len(tensors)} tensors for a state of {batched} batched ones")
        flat, given = pytree.tree_leaves(self.values), iter(tensors)
        kept = [next(given) if leaf.batch_dim is not None else value for value, leaf in zip(flat, self._leaves)]
        size = next(leaf.samples(v) for v, leaf in zip(kept, self._leaves) if leaf.batch_dim is not None)
        kept = [size if leaf.batch_size else value for value, leaf in zip(kept, self._leaves)]
        return TracedState(pytree.tree_unflatten(kept, self._spec), self.section, self._leaves, self._spec)

    def __getitem__(self, index: Tensor) -> TracedState:
        batched = [leaf for leaf in self._leaves if leaf.batch_dim is not None]
        return self.replace_batched([leaf.select(v, index) for v, leaf in zip(self.batched(), batched)])

    @staticmethod
    def cat(states: Sequence[TracedState]) -> TracedState:
        """The samples of ``states`` (states the same section handed on), in order, as one state."""
        batched = [leaf for leaf in states[0]._leaves if leaf.batch_dim is not None]
        columns = zip(*(state.batched() for state in states))
        return states[0].replace_batched([torch.cat(column, dim=leaf.batch_dim) for column, leaf in zip(columns, batched)])

    def __len__(self) -> int:
        return next(leaf.samples(v) for v, leaf in zip(pytree.tree_leaves(self.values), self._leaves)
                    if leaf.batch_dim is not None)


@dataclass
class _Section:
    """Graph nodes of one section: reads ``inputs`` (section 0: the image), runs ``nodes``, hands on
    ``outputs`` (the last section: the value ``forward_features`` returns)."""

    inputs: list[fx.Node]
    nodes: list[fx.Node]
    outputs: list[fx.Node]
    cut: fx.Node | None  # the exit's stage call (None for the last section)
    free: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # values last read by a node, dropped after it

    def plan_frees(self) -> None:
        """Fill ``free``: each value the section no longer needs, after the node that reads it last."""
        kept = set(self.outputs) | {a for out in self.outputs if out.op == "output" for a in out.all_input_nodes}
        seen: set[fx.Node] = set()
        for node in reversed(self.nodes):
            last = [a for a in node.all_input_nodes if a not in seen and a not in kept]
            seen.update(node.all_input_nodes)
            if last:
                self.free[node] = last


def _resolve(root: nn.Module, target: str, constants: dict[str, Tensor]) -> Any:
    """A node target (``backbone.blocks.3``, ``backbone.cls_token``) on ``root``, a model of the same
    architecture as the traced one (the live backbone, or a copy of it); ``constants``: the tensors
    torch.fx made of the forward's Python constants (``_tensor_constant0``), put on ``root``'s device."""
    if target in constants:
        return constants[target].to(next(root.parameters()).device)
    value: Any = root
    for part in target.split(".")[1:]:
        value = getattr(value, part)
    return value


def _load(value: Any, env: dict[fx.Node, Any]) -> Any:
    """A node's argument with graph values filled in from ``env``, in plain (mutable) lists and dicts:
    modules may edit what they are given (HRNet's branch lists)."""
    if isinstance(value, fx.Node):
        return env[value]
    if isinstance(value, list):
        return [_load(v, env) for v in value]
    if isinstance(value, tuple):
        return tuple(_load(v, env) for v in value)
    if isinstance(value, slice):
        return slice(_load(value.start, env), _load(value.stop, env), _load(value.step, env))
    if isinstance(value, dict):
        return {k: _load(v, env) for k, v in value.items()}
    return value


def _run_nodes(root: nn.Module, section: _Section | list[fx.Node], env: dict[fx.Node, Any],
               constants: dict[str, Tensor]) -> None:
    """Run a section's graph nodes (or a list of nodes) in order on ``root``'s modules and parameters,
    writing values into ``env`` and dropping each value after its last reader in the section."""
    nodes, free = (section.nodes, section.free) if isinstance(section, _Section) else (section, {})
    for node in nodes:
        args = _load(node.args, env)
        kwargs = _load(node.kwargs, env)
        if node.op == "call_module":
            env[node] = _resolve(root, node.target, constants)(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "get_attr":
            env[node] = _resolve(root, node.target, constants)
        else:
            raise AssertionError(f"unexpected node {node.op}")
        for done in free.get(node, ()):
            del env[done]


def _trace(model: nn.Module, cut_names: list[str], training: bool) -> tuple[fx.Graph, dict[str, Tensor]]:
    """``forward_features`` as a graph, each stage in ``cut_names`` one ``call_module`` node (but a stage
    holding another cut, a block inside it, which is traced into), and the tensors torch.fx made of the
    forward's Python constants.

    Every other module is a leaf where that traces (it then runs as the model runs it); where it does
    not (a module returning a tuple that the caller unpacks), the modules are traced into as torch.fx
    does by default.
    """
    through = {""}  # the wrapper
    for name in cut_names:
        parts = f"{_ROOT}.{name}".split(".")
        through.update(".".join(parts[:i]) for i in range(1, len(parts)))
    cuts = {f"{_ROOT}.{name}" for name in cut_names} - through
    # checkpointing off while tracing: the graph runs blocks one by one; sections checkpoint as a whole
    try:
        with run_mode(model, training), no_checkpointing(model):
            root = _Features(model)
            try:
                graph = _Tracer(cuts, through).trace(root)
            except Exception:
                graph = _Tracer(cuts, None).trace(root)
    except Exception as exc:
        raise _CannotTrace(f"torch.fx cannot trace its forward_features ({type(exc).__name__}: {exc})") from None
    constants = {n.target: getattr(root, n.target) for n in graph.nodes
                 if n.op == "get_attr" and not n.target.startswith(f"{_ROOT}.")}
    return graph, constants


def _split(graph: fx.Graph, cuts: list[fx.Node]) -> list[_Section]:
    """Cut ``graph`` after each node of ``cuts`` (in graph order); each section's inputs are the values
    defined before it and read in it or later."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    output = next(n for n in graph.nodes if n.op == "output")
    position = {n: i for i, n in enumerate(nodes)}
    bounds = [-1, *(position[c] for c in cuts), len(nodes) - 1]

    def section_of(n: fx.Node) -> int:
        if n.op == "output":
            return len(cuts)
        return next(k for k in range(len(bounds) - 1) if position[n] <= bounds[k + 1])

    sections = []
    for k in range(len(bounds) - 1):
        own = [n for n in nodes[bounds[k] + 1 : bounds[k + 1] + 1] if n.op not in ("get_attr", "placeholder")]
        # parameters and buffers are read where they are used, never handed between sections
        reads = {a for n in own for a in n.all_input_nodes if a.op == "get_attr"}
        if k == len(cuts):
            reads |= {a for a in output.all_input_nodes if a.op == "get_attr"}
        sections.append(_Section(inputs=[], nodes=[n for n in nodes if n in reads] + own, outputs=[],
                                 cut=cuts[k] if k < len(cuts) else None))
    for k in range(len(cuts)):  # what crosses from section k to k + 1 and later
        live = [n for n in nodes if n.op != "get_attr" and section_of(n) <= k
                and any(section_of(u) > k for u in n.users)]
        if cuts[k] not in live:
            live.append(cuts[k])
        sections[k].outputs = live
        sections[k + 1].inputs = live
    sections[0].inputs = [n for n in nodes if n.op == "placeholder"]
    sections[-1].outputs = [output]
    for section in sections:
        section.plan_frees()
    return sections


def _find_cuts(model: nn.Module, graph: fx.Graph, env: dict[fx.Node, Any], expected: list[Tensor | None],
               stages: list[Stage], image_size: tuple[int, int]) -> tuple[list[fx.Node], list[_Layout]]:
    """For each exit's stage or block, the graph node whose value (``env``, on the check batch) is its map,
    and how to read the map off it: the call of the module where ``forward_features`` calls it once, else
    the first later node whose value lays out as its expected map (``expected_maps``: stages that are not
    modules of the model, a list of blocks or a name timm uses in features_only mode, and stages traced
    into because a block inside them is a cut too)."""
    cuts: list[fx.Node] = []
    layouts: list[_Layout] = []
    nodes = [n for n in graph.nodes if n.op not in ("output", "placeholder", "get_attr")]
    for k, stage in enumerate(stages):
        want = expected[k]
        after = nodes[nodes.index(cuts[-1]) + 1 :] if cuts else nodes
        calls = [n for n in after if n.op == "call_module" and n.target == f"{_ROOT}.{stage.module}"]
        if len(calls) == 1:
            cuts.append(calls[0])
            layouts.append(_layout(env[calls[0]], want, stage.num_chs, image_size, stage.module))
            continue
        if want is None:
            raise _CannotTrace(f"its forward_features does not call stage {stage.module!r} once and it has no "
                                   "forward_intermediates to find the stage's output by")
        for node in after:
            try:
                layout = _layout(env[node], want, stage.num_chs, image_size, stage.module)
            except _CannotTrace:
                continue
            cuts.append(node)
            layouts.append(layout)
            break
        else:
            raise _CannotTrace(f"no value of its forward_features is the map forward_intermediates returns for "
                                   f"stage {stage.module!r} {tuple(want.shape)}")
    return cuts, layouts


def _same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in a.nodes] == [
        (n.op, str(n.target), str(n.args), str(n.kwargs)) for n in b.nodes]


def _classify(one: Any, other: Any, b_one: int, b_other: int, what: str) -> _Leaf:
    """How a state leaf follows the batch, from its values at batch sizes ``b_one`` and ``b_other``."""
    if isinstance(one, Tensor):
        if one.dim() == other.dim():
            changed = [d for d in range(one.dim()) if one.shape[d] != other.shape[d]]
            if not changed:
                return _Leaf()
            if len(changed) == 1:
                d = changed[0]
                fold, rest = divmod(one.shape[d], b_one)
                if rest == 0 and other.shape[d] == fold * b_other:
                    return _Leaf(batch_dim=d, fold=fold)
        raise _CannotTrace(f"{what} has shape {tuple(one.shape)} at batch {b_one} and {tuple(other.shape)} at "
                           f"batch {b_other}: it does not follow the batch in one dimension")
    if isinstance(one, int) and not isinstance(one, bool):
        if one == other:
            return _Leaf()
        if one == b_one and other == b_other:
            return _Leaf(batch_size=True)
    elif type(one) is type(other) and (one is other or one == other):
        return _Leaf()
    raise _CannotTrace(f"{what} ({one!r} at batch {b_one}, {other!r} at batch {b_other}) depends on the batch in a "
                       "way early exit cannot follow when it drops samples")


@dataclass(frozen=True)
class _Layout:
    """How a stage's output becomes the ``(B, C, H', W')`` map its exit reads: ``element`` of a tuple or
    list output (or the output itself: ``None``), as ``"NCHW"``, ``"NHWC"`` or ``"NLC"`` (tokens, the
    first ``prefix`` of them not spatial: class, distillation, register tokens)."""

    kind: str
    element: int | None = None
    reduction: tuple[float, float] = (1.0, 1.0)
    prefix: int = 0

    def to_map(self, h: Any, image_size: tuple[int, int]) -> Tensor:
        if self.element is not None:
            h = h[self.element]
        if self.kind == "NCHW":
            return h
        if self.kind == "NHWC":
            return h.permute(0, 3, 1, 2)
        tokens = h[:, self.prefix :]
        grid_h, grid_w = self.grid(tokens.shape[1], image_size)
        return tokens.reshape(h.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)

    def grid(self, n: int, image_size: tuple[int, int]) -> tuple[int, int]:
        rh, rw = image_size[0] / self.reduction[0], image_size[1] / self.reduction[1]
        for grid_h in (math.floor(rh), math.ceil(rh)):
            for grid_w in (math.floor(rw), math.ceil(rw)):
                if grid_h * grid_w == n:
                    return grid_h, grid_w
        raise ValueError(f"{n} tokens do not form a grid for an image of {image_size}")


def _layout(value: Any, expected: Tensor | None, num_chs: int, image_size: tuple[int, int], stage: str) -> _Layout:
    """The layout that turns a stage's output ``value`` into ``expected`` (its ``forward_intermediates``
    map; without one, the 4-d tensor whose channels number ``num_chs``)."""
    elements = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
    for element, tensor in elements:
        if not isinstance(tensor, Tensor):
            continue
        if expected is None:
            if tensor.dim() == 4 and tensor.shape[1] == num_chs:
                return _Layout("NCHW", element)
            if tensor.dim() == 4 and tensor.shape[3] == num_chs:
                return _Layout("NHWC", element)
            continue
        _, channels, grid_h, grid_w = expected.shape
        reduction = (image_size[0] / grid_h, image_size[1] / grid_w)
        if tensor.dim() == 4:
            candidates = [_Layout("NCHW", element, reduction), _Layout("NHWC", element, reduction)]
        elif tensor.dim() == 3 and tensor.shape[1] >= grid_h * grid_w and tensor.shape[2] == channels:
            candidates = [_Layout("NLC", element, reduction, tensor.shape[1] - grid_h * grid_w)]
        else:
            continue
        for layout in candidates:
            got = layout.to_map(value, image_size)
            if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                return layout
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for _, t in elements]
    want = f"its forward_intermediates map {tuple(expected.shape)}" if expected is not None else \
        f"a map of {num_chs} channels"
    raise _CannotTrace(f"stage {stage!r} returns {shapes}, which does not lay out as {want}")


class TracedRunner(Runner):
    """Any model whose ``forward_features`` torch.fx can trace; hidden states are ``TracedState``s."""

    kind = "traced"

    def __init__(self, model: nn.Module, cuts: list[Stage], example: Tensor) -> None:
        super().__init__(model, cuts)
        stages = self.cuts
        names = [s.module for s in stages]
        graph, self._constants = _trace(model, names, training=False)
        if not _same_graph(graph, _trace(model, names, training=True)[0]):
            raise _CannotTrace("its forward_features takes other steps in train mode than in eval mode")
        self._graph = graph  # the sections' nodes belong to it
        image_size = (example.shape[-2], example.shape[-1])
        with eval_mode(model), torch.no_grad():
            env = {next(n for n in graph.nodes if n.op == "placeholder"): example}
            try:
                _run_nodes(model, [n for n in graph.nodes if n.op not in ("placeholder", "output")], env,
                           self._constants)
            except Exception as exc:
                raise _CannotTrace(f"its traced forward_features fails to run ({type(exc).__name__}: {exc})") \
                    from None
            expected = expected_maps(model, stages, example)
        cut_nodes, self._layouts = _find_cuts(model, graph, env, expected, stages, image_size)
        self._traced = _split(graph, cut_nodes)
        self.sections = [[] for _ in self._traced]  # the base class counts sections on it
        self._cut_slot = [s.outputs.index(s.cut) for s in self._traced[:-1]]
        self._leaves: list[list[_Leaf]] = []
        self._specs: list[pytree.TreeSpec] = []
        try:
            self._classify_state(example)
            self._check_dropping(example, model_name(model))
        except ValueError:
            raise
        except Exception as exc:  # a value taken for batched that is not (an index kept for the end, ...)
            raise _CannotTrace(f"its sections fail when samples are dropped between them ({type(exc).__name__}: "
                               f"{exc})") from None

    def _run(self, root: nn.Module, k: int, h: Any) -> Any:
        """Section ``k`` on ``root`` (the backbone, or a copy of it): the image or a state in, a state
        (the last section: what ``forward_features`` returns) out."""
        section = self._traced[k]
        values = (h,) if k == 0 else h.values
        env = dict(zip(section.inputs, values))
        _run_nodes(root, section, env, self._constants)
        if k == self.num_sections - 1:
            return _load(section.outputs[0].args[0], env)
        values = tuple(env[n] for n in section.outputs)
        if len(self._leaves) <= k:  # probing: how the values follow the batch is not known yet
            return _Raw(values)
        return TracedState(values, k, self._leaves[k], self._specs[k])

    def run_section(self, k: int, h: Any) -> Any:
        if getattr(self.model, "grad_checkpointing", False) and torch.is_grad_enabled():
            # the state's tensors go to checkpoint as arguments: it saves the random state of their devices
            leaves = [h] if k == 0 else pytree.tree_leaves(h.values)

            def rerun(*values: Any) -> Any:
                state = values[0] if k == 0 else TracedState(
                    pytree.tree_unflatten(list(values), h._spec), h.section, h._leaves, h._spec)
                return self._run(self.model, k, state)

            return torch.utils.checkpoint.checkpoint(rerun, *leaves, use_reentrant=False)
        return self._run(self.model, k, h)

    def to_map(self, h: TracedState, image_size: tuple[int, int]) -> Tensor:
        return self._layouts[h.section].to_map(h.values[self._cut_slot[h.section]], image_size)

    def trunk(self, k: int) -> nn.Module:
        """Sections 0..k as a standalone ``torch.fx.GraphModule`` holding copies of the modules and
        parameters they use (nothing else), then exit k's map."""
        wanted = {n for section in self._traced[: k + 1] for n in (*section.inputs, *section.nodes)}
        graph, env = fx.Graph(), {}
        for node in self._graph.nodes:  # graph order; get_attr nodes read by several sections once
            if node in wanted:
                env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(env[self._traced[k].cut])
        root = _Features(self.model)
        for target, value in self._constants.items():
            setattr(root, target, value)
        return _TracedTrunk(copy.deepcopy(fx.GraphModule(root, graph)), self._layouts[k])

    def _classify_state(self, example: Tensor) -> None:
        """How each value handed between sections follows the batch, from runs at two batch sizes."""
        other = torch.randn((_PROBE_BATCH, *example.shape[1:]), generator=torch.Generator().manual_seed(1))
        runs = []
        with eval_mode(self.model), torch.no_grad():
            for x in (example, other.to(example)):
                h, states = x, []
                for k in range(self.num_sections - 1):
                    h = self._run(self.model, k, h)
                    states.append(h.values)
                runs.append(states)
        for k, (one, two) in enumerate(zip(*runs)):
            flat_one, spec = pytree.tree_flatten(one)
            flat_two, spec_two = pytree.tree_flatten(two)
            if spec != spec_two:
                raise _CannotTrace(f"the values after section {k} change structure with the batch size")
            leaves = [_classify(u, v, len(example), _PROBE_BATCH, f"a value handed from section {k} on")
                      for u, v in zip(flat_one, flat_two)]
            if all(leaf.batch_dim is None for leaf in leaves):
                raise _CannotTrace(f"no value handed from section {k} on follows the batch")
            self._leaves.append(leaves)
            self._specs.append(spec)

    def _check_dropping(self, example: Tensor, name: str) -> None:
        """Drop a sample after every section and compare with the kept samples run alone."""
        x = torch.randn((self.num_sections, *example.shape[1:]), generator=torch.Generator().manual_seed(2))
        x = x.to(example)
        image_size = (x.shape[-2], x.shape[-1])
        with eval_mode(self.model), torch.no_grad():
            kept = torch.arange(len(x))
            h: Any = x
            for k in range(self.num_sections):
                h = self._run(self.model, k, h)
                if k < self.num_sections - 1 and len(kept) > 1:
                    keep = torch.arange(len(kept)) != 0
                    h, kept = h[keep], kept[keep]
                    alone = x[kept]
                    for j in range(k + 1):
                        alone = self._run(self.model, j, alone)
                    want = self.to_map(alone, image_size)
                    check_close(name, f"map of {self.cuts[k].module!r} after dropping samples",
                                 self.to_map(h, image_size), want, atol=_batch_noise(want))
            want = self.model(x[kept])
            check_close(name, "logits after dropping samples", self.model.forward_head(h), want,
                         atol=_batch_noise(want))


def _batch_noise(want: Tensor) -> float:
    """The absolute tolerance between runs at two batch sizes: CPU kernels change with the batch, and
    random weights give activations in the hundreds (visformer), so it scales with the largest one."""
    return 1e-4 * max(0.1, float(want.abs().max()))


@dataclass
class _Raw:
    """A probing state: the values, before how they follow the batch is known."""

    values: tuple[Any, ...]


class _TracedTrunk(nn.Module):
    """Images → exit k's ``(B, C, H', W')`` map: the graph of sections 0..k, then the stage's layout."""

    def __init__(self, graph_module: fx.GraphModule, layout: _Layout) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return self.layout.to_map(self.graph_module(x), (x.shape[-2], x.shape[-1]))
