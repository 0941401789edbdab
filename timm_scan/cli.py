"""The ``timm-scan`` command: ``train``, ``search``, ``evaluate``, ``export``, ``push`` and ``inspect``.

Each command's flags are generated from its config dataclass (`timm_scan.commands`), one flag per
field, with the field's metadata as help, so the flags and the docs cannot drift. Training runs under
Accelerate unchanged: ``accelerate launch -m timm_scan train ...`` (or ``python -m timm_scan train``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["add_arguments", "config_from_args", "main", "parse_config"]


def _number(text: str) -> float | int:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _int_or_name(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None``; any other annotation as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint


def _scalar_type(hint: Any) -> Callable[[str], Any] | None:
    """The argparse ``type`` for a field's annotation (``None`` for plain strings)."""
    args = set(typing.get_args(hint)) - {type(None)} or {hint}
    if args == {int, str}:
        return _int_or_name
    if args == {float, int}:
        return _number
    for kind in (int, float):
        if args == {kind}:
            return kind
    return None


def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argument per field of the dataclass ``config_cls``: ``--field-name`` (or positional where
    the field's metadata says so), typed from the annotation, its help from the metadata."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        hint = hints[f.name]
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if not required and "default" not in help_text:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text += f" (default: {default})" if default is not None else ""
        base = _without_none(hint)
        kwargs: dict[str, Any] = {"help": help_text}
        if hint is bool:
            kwargs["action"] = "store_true"
        elif base is bool:  # bool | None: unset means "the default of what it configures"
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs.update(nargs="*" if f.default is None else "+", type=_scalar_type(typing.get_args(base)[0]))
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs=len(typing.get_args(base)), type=_scalar_type(typing.get_args(base)[0]))
        else:
            kwargs["type"] = _scalar_type(base)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                                required=required, **kwargs)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """The dataclass from parsed arguments: fields not given keep their defaults."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def parse_config(config_cls: type, argv: Sequence[str] | None = None, description: str | None = None) -> Any:
    """Parse ``argv`` into ``config_cls`` (a script's whole command line); a config's own validation
    error becomes a usage error."""
    parser = argparse.ArgumentParser(description=description or config_cls.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, config_cls)
    args = parser.parse_args(argv)
    try:
        return config_from_args(config_cls, args)
    except ValueError as exc:
        parser.error(str(exc))


def _commands() -> dict[str, tuple[type, Callable[[Any], Any], str]]:
    """Each command: its config dataclass, what runs it, and a one-line summary."""
    from .commands.evaluate import EvaluateConfig, evaluate
    from .commands.export import ExportConfig, export
    from .commands.inspect import InspectConfig, inspect
    from .commands.push import PushConfig, push
    from .commands.search import SearchConfig, search
    from .commands.train import TrainConfig, train

    return {
        "train": (TrainConfig, train, "train with self-distillation (or --baseline) under Accelerate"),
        "search": (SearchConfig, search, "search early-exit thresholds on a run's validation split"),
        "evaluate": (EvaluateConfig, evaluate, "report early exit on a run's test split"),
        "export": (ExportConfig, export, "export a run's best model to ONNX, one graph per section and exit"),
        "push": (PushConfig, push, "push a run's best model to the Hugging Face Hub"),
        "inspect": (InspectConfig, inspect, "print a wrapped model's exits and MACs"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    commands = _commands()
    parser = argparse.ArgumentParser(prog="timm-scan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_cls, run, summary) in commands.items():
        doc = sys.modules[run.__module__].__doc__
        add_arguments(sub.add_parser(name, help=summary, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter), config_cls)
    args = parser.parse_args(argv)
    config_cls, run, _ = commands[args.command]
    try:
        cfg = config_from_args(config_cls, args)
    except ValueError as exc:
        parser.error(f"{args.command}: {exc}")
    from .model.hub import HubUploadError

    try:
        run(cfg)
    except (ValueError, FloatingPointError, HubUploadError) as exc:  # the message says what to do
        sys.exit(f"timm-scan {args.command}: error: {exc}")
