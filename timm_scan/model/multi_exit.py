"""MultiExitModel and ``wrap``: a timm backbone plus shallow exits, run section by section."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..exit_costs import ExitCosts
from ..exit_policy import ExitPolicy
from ..report import ExitLatency
from . import hub
from .backbone import build_runner, check_input_fits
from .positions import exit_entry, resolve_exits
from .config import ScanConfig, check_input_size
from .heads import ExitHead, exit_heads, sized_head_channels
from .macs import count_macs
from .runner import Runner, Stage, eval_mode, feature_stages, model_name, without_capture_hooks

__all__ = ["MultiExitModel", "MultiExitOutput", "TruncatedModel", "from_pretrained", "wrap"]

CHECK_BATCH = 2


class MultiExitOutput(NamedTuple):
    """Outputs of all K exits, shallowest first, deepest (the backbone's own head) last.

    ``logits[i]``: ``(B, num_classes)``. ``features[i]``: ``(B, feature_dim)``, exit i's pooled
    feature projected to the deepest classifier's pre-logits width; ``features[-1]`` is that
    pre-logits feature itself (the input of the backbone's classifier).
    """

    logits: list[Tensor]
    features: list[Tensor]


class MultiExitModel(nn.Module):
    """A timm backbone with shallow exits; build it with ``timm_scan.wrap``.

    Exits are numbered 0..K-1 from the shallowest; exit K-1 is the backbone's own head. Section k
    (0-based) runs the backbone from exit k-1's stage to exit k's, so a sample can stop after any
    exit without computing deeper sections. The backbone stays a plain timm model under
    ``self.backbone``; the heads are ``self.exits`` (K-1 of them).
    """

    def __init__(self, backbone: nn.Module, config: ScanConfig, runner: Runner, heads: list[ExitHead]) -> None:
        super().__init__()
        self.backbone = backbone
        self.exits = nn.ModuleList(heads)
        self.config = config
        self._runner = runner  # plain object: the backbone's modules stay registered once
        self.exit_stages: list[Stage] = [*runner.cuts, feature_stages(backbone)[-1]]
        # What travels with the weights (save_pretrained): set by the trainer and threshold search.
        self.class_names: list[str] | None = None
        self.data_config: dict | None = None  # timm data config: input_size, mean, std, crop
        self._policy = ExitPolicy()
        self._check_size: tuple[int, int, int] | None = None  # the input size wrap proved it at (keep_exits)
        self.exit_latency: list[ExitLatency] = []  # measured costs per exit (timm_scan.measure_exit_latency)
        self.train(backbone.training)

    @property
    def policy(self) -> ExitPolicy:
        """The exit policy deployment runs (thresholds, fallback, temperatures, how they were chosen);
        saved with the model. Replace it (``model.policy = result.policy``); it is frozen."""
        return self._policy

    @policy.setter
    def policy(self, policy: ExitPolicy) -> None:
        if not isinstance(policy, ExitPolicy):
            raise ValueError(f"model.policy must be an ExitPolicy; got {type(policy).__name__}")
        self._policy = policy.check(self.num_exits)

    def _deprecated_policy_field(self, name: str, value: object = None, *, setting: bool = False) -> object:
        warnings.warn(f"MultiExitModel.{name} is deprecated: use model.policy.{name}" + (
            f" and replace the policy, model.policy = model.policy.replace({name}=...)" if setting else ""),
            DeprecationWarning, stacklevel=3)
        if setting:
            self.policy = self._policy.replace(**{name: value})
        return getattr(self._policy, name)

    thresholds = property(lambda self: self._deprecated_policy_field("thresholds"),
                          lambda self, v: self._deprecated_policy_field("thresholds", v, setting=True))
    fallback = property(lambda self: self._deprecated_policy_field("fallback"),
                        lambda self, v: self._deprecated_policy_field("fallback", v, setting=True))
    temperatures = property(lambda self: self._deprecated_policy_field("temperatures"),
                            lambda self, v: self._deprecated_policy_field("temperatures", v, setting=True))

    @property
    def num_exits(self) -> int:
        return len(self.exits) + 1

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def runner(self) -> str:
        """How the backbone runs section by section: ``"sequential"`` (its children in order),
        ``"vit"`` (timm's VisionTransformer by hand) or ``"traced"`` (its ``forward_features`` traced
        with torch.fx; a section then hands several values to the next, ``traced.TracedState``)."""
        return self._runner.kind

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the backbone (timm's ``set_grad_checkpointing``); the sections
        honour it whether it was turned on before or after ``wrap``."""
        self.backbone.set_grad_checkpointing(enable)

    def forward_section(self, k: int, h: Tensor) -> Tensor:
        """Run section k on hidden state ``h`` (the image ``(B, 3, H, W)`` for k = 0). Between sections
        the state is a tensor in the backbone's layout, or, for the traced runner, a ``TracedState``;
        either keeps some samples with ``h[keep]`` (a boolean mask or positions along the batch)."""
        return self._runner.run_section(k, h)

    def exit_logits(self, k: int, h: Tensor, image_size: tuple[int, int], head: nn.Module | None = None) -> Tensor:
        """Logits ``(B, num_classes)`` of exit k from section k's output; ``image_size`` is the
        input's ``(H, W)`` (ViTs need it to lay tokens out as a map). ``head`` stands in for shallow
        exit k's head (the predictor passes its inference copies, `heads.inference_copy`)."""
        if k == self.num_exits - 1:
            return self._runner.forward_head(h)[0]
        head = self.exits[k] if head is None else head
        return head(self._runner.to_map(h, image_size))[0]

    def forward(self, x: Tensor) -> MultiExitOutput:
        image_size = (x.shape[-2], x.shape[-1])
        logits, features = [], []
        h = x
        for k in range(self.num_exits):
            h = self._runner.run_section(k, h)
            if k < self.num_exits - 1:
                head = self.exits[k]
                out, pooled = head(self._runner.to_map(h, image_size))
                feature = head.proj(pooled)
            else:
                out, feature = self._runner.forward_head(h)
            logits.append(out)
            features.append(feature)
        return MultiExitOutput(logits, features)

    def truncate(self, exit_index: int) -> nn.Module:
        """A standalone copy that computes exit ``exit_index``'s logits from images, holding only the
        sections up to that exit and its head (the compact model the papers deploy). For the deepest
        exit it is a copy of the plain backbone."""
        if isinstance(exit_index, bool) or not isinstance(exit_index, int) or not 0 <= exit_index < self.num_exits:
            raise ValueError(f"exit_index must be an int in 0..{self.num_exits - 1}; got {exit_index!r}")
        if exit_index == self.num_exits - 1:
            return without_capture_hooks(copy.deepcopy(self.backbone))
        head = copy.deepcopy(self.exits[exit_index])
        head.proj = nn.Identity()  # the hint projection only serves training
        return TruncatedModel(self._runner.trunk(exit_index), head)

    def keep_exits(self, keep: list[int]) -> MultiExitModel:
        """A copy with only the shallow exits ``keep`` (0-based indices of this model's exits, the deepest
        always kept), trained weights and all: candidate exits trained once, narrowed to the ones a
        deployment takes without retraining. The kept heads are the same modules (their block counts are
        pinned in ``config.head_blocks``); the copy's policy is the default one, so search its thresholds
        again (a deployment's costs change with its exits)."""
        shallow = self.num_exits - 1
        if (not isinstance(keep, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in keep)
                or not all(0 <= i < shallow for i in keep) or len(set(keep)) != len(keep)):
            which = f"in 0..{shallow - 1}" if shallow else "and this model has none"
            raise ValueError(f"keep_exits takes distinct indices of shallow exits, {which} (the deepest, exit "
                             f"{shallow}, is always kept); got {keep!r}")
        keep = sorted(keep)
        blocks = [len(self.exits[i].align) for i in keep] if self.config.head == "sepconv" and keep else None
        config = dataclasses.replace(self.config, exits=[self.config.exits[i] for i in keep], head_blocks=blocks)
        with torch.no_grad():
            kept = wrap(without_capture_hooks(copy.deepcopy(self.backbone)), config, check_input_size=self._check_size)
        kept.exits.load_state_dict(nn.ModuleList([self.exits[i] for i in keep]).state_dict(), strict=True)
        kept.class_names, kept.data_config = self.class_names, self.data_config
        return kept.train(self.training)

    def save_pretrained(self, save_directory: str | Path, card: str | None = None) -> Path:
        """Save to a folder that ``from_pretrained`` and plain timm can read (layout: ``timm_scan.model.hub``);
        ``card``: the README.md text (default: a card from the model alone)."""
        return hub.save_pretrained(self, save_directory, card)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
        token: str | None = None, max_parameters: int = hub.MAX_PARAMETERS,
    ) -> MultiExitModel:
        """Load a saved model from a folder or from the Hub (``"hf-hub:owner/name"``), strictly: every
        tensor with its shape. Raises ``ValueError`` when the source is not a timm-scan model, a file is
        missing, truncated, corrupt (its SHA-256 differs from the one saved) or of the wrong shape, or the
        model would hold more than ``max_parameters`` values (parameters and buffers, default
        ``hub.MAX_PARAMETERS``, two billion: raise it to load a larger model); everything is checked before
        anything is allocated (`hub.read_pretrained`)."""
        saved = hub.read_pretrained(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                                    max_parameters=max_parameters)
        model = wrap(saved.backbone.eval(), saved.config, check_input_size=saved.check_size)
        exits = hub.read_tensors(saved.exits_file, model.exits.state_dict(), saved.source)
        hub.load_strict(model.exits, exits, hub.EXITS_WEIGHTS, saved.source)
        labels = saved.backbone.pretrained_cfg.get("label_names")
        model.class_names = list(labels) if labels else None
        model.data_config = saved.data_config
        model.policy, model.exit_latency = saved.policy, saved.exit_latency
        return model

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Save and upload to a Hub model repo; see ``timm_scan.model.hub.push_to_hub`` for the options."""
        return hub.push_to_hub(self, repo_id, **kwargs)

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[int]:
        """Cumulative MACs for one sample of ``input_size`` (C, H, W) to leave at each exit.

        Entry i counts sections 0..i and the heads of exits 0..i (a sample reaching exit i has had
        every shallower head evaluated). The last entry is ``backbone_macs`` plus all shallow heads.
        """
        x = self._dummy(input_size)
        image_size = (x.shape[-2], x.shape[-1])
        total, cumulative = 0, []
        with eval_mode(self), torch.no_grad():
            h = x
            for k in range(self.num_exits):
                total += count_macs(self._runner.run_section, k, h)
                h = self._runner.run_section(k, h)
                total += count_macs(self.exit_logits, k, h, image_size)
                cumulative.append(total)
        return cumulative

    def exit_costs(self, input_size: tuple[int, int, int]) -> ExitCosts:
        """`exit_macs` and `backbone_macs` as the threshold search's cost (unit ``"macs"``)."""
        return ExitCosts.macs(self.exit_macs(input_size), self.backbone_macs(input_size))

    def backbone_macs(self, input_size: tuple[int, int, int]) -> int:
        """MACs of the plain backbone for one sample: the baseline of every speed-up."""
        with eval_mode(self):
            return count_macs(self.backbone, self._dummy(input_size))

    def _dummy(self, input_size: tuple[int, int, int]) -> Tensor:
        p = next(self.parameters())
        return torch.zeros((1, *check_input_size(input_size)), device=p.device, dtype=p.dtype)


class TruncatedModel(nn.Module):
    """``trunk`` (images → NCHW map) then a shallow ``head``; ``forward`` returns logits ``(B, C)``."""

    def __init__(self, trunk: nn.Module, head: ExitHead) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))[0]


def wrap(
    model: nn.Module,
    config: ScanConfig | None = None,
    *,
    check_input_size: tuple[int, int, int] | None = None,
) -> MultiExitModel:
    """Turn a timm model into a ``MultiExitModel`` with shallow exits after ``config.exits``.

    The model is used as is (weights, head and ``pretrained_cfg`` included) and what it computes is
    unchanged: one forward pre-hook on its classifier records the pre-logits while the wrapper
    runs. Wrapping proves staged execution on a random batch of ``check_input_size`` (default: the
    model's ``pretrained_cfg`` input size) against ``forward_intermediates`` and ``model(x)``; SepConv
    heads are sized by ``config.head_budget`` at that input size too (`sized_head_channels`), and the
    returned model's config holds the exits and the width used.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"wrap expects a timm model (torch.nn.Module); got {type(model).__name__}")
    config = config if config is not None else ScanConfig()
    name = model_name(model)
    feature_stages(model)  # a model without feature_info is refused first, whatever else it lacks
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise ValueError(
            f"cannot wrap {name!r}: it has no classifier (num_classes={num_classes}); create it with "
            "timm.create_model(..., num_classes=N)"
        )
    example = _check_input(model, check_input_size)
    check_input_fits(model, example)
    cuts = resolve_exits(model, config.exits, example)
    runner = build_runner(model, cuts, example)
    blocks = config.head_blocks
    if isinstance(blocks, list) and config.exits is not None and len(blocks) == len(cuts):
        # one per exit as given: put them in forward order (the default exits are in it already)
        stages = feature_stages(model)
        given = [stages[e].module if isinstance(e, int) else e for e in config.exits]
        blocks = [dict(zip(given, blocks))[c.module] for c in cuts]
    config = dataclasses.replace(config, exits=[exit_entry(c) for c in cuts], head_blocks=blocks)
    if config.head == "sepconv" and config.head_channels is None and config.head_budget is not None and cuts:
        with eval_mode(model):
            macs = count_macs(model, example[:1])
        config = dataclasses.replace(config, head_channels=sized_head_channels(
            model, config, cuts, tuple(example.shape[1:]), macs))
    heads = [head.to(device=example.device, dtype=example.dtype) for head in exit_heads(model, config, cuts)]
    wrapped = MultiExitModel(model, config, runner, heads)
    wrapped._check_size = tuple(example.shape[1:])  # keep_exits wraps again at it
    return wrapped


def _check_input(model: nn.Module, input_size: tuple[int, int, int] | None) -> Tensor:
    """A small random batch for the equivalence check, drawn without touching the global RNG."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    p = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((CHECK_BATCH, *input_size), generator=generator)
    return x.to(device=p.device, dtype=p.dtype)


def from_pretrained(name_or_path: str | Path, **kwargs) -> MultiExitModel:
    """``MultiExitModel.from_pretrained``: a saved multi-exit model from a folder or ``"hf-hub:owner/name"``."""
    return MultiExitModel.from_pretrained(name_or_path, **kwargs)
