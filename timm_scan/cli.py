"""The ``timm-scan`` command: ``train``, ``search``, ``evaluate``, ``export``, ``push``, ``inspect``, ``propose`` and ``serve``.

Each command's flags are generated from its config dataclass (`timm_scan.commands`), one flag per
field, with the field's metadata as help, so the flags and the docs cannot drift. Training runs under
Accelerate unchanged: ``accelerate launch -m timm_scan train ...`` (or ``python -m timm_scan train``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import __version__
from .options import did_you_mean

__all__ = ["add_arguments", "command_errors", "config_from_args", "main", "parse_config"]


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


class _KeyValues(argparse.Action):
    """``KEY=VALUE ...`` into a dict, as timm's ``train.py`` reads ``--model-kwargs``: each value a Python
    literal where it parses as one, else the string; given twice, the entries add up."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        kwargs = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, text = item.partition("=")
            if not sep or not key.isidentifier():
                raise argparse.ArgumentError(self, f"expected KEY=VALUE (such as img_size=32); got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text
        setattr(namespace, self.dest, kwargs)


class _Switch(argparse.Action):
    """A flag without a value that sets its field to ``const`` unless the field's own flag is given
    (before or after it): ``--amp`` is ``--mixed-precision fp16``, and ``--amp --amp-dtype bfloat16`` bf16."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if not hasattr(namespace, self.dest):
            setattr(namespace, self.dest, self.const)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argument per field of the dataclass ``config_cls``: ``--field-name`` and the field's ``aliases``
    (or positional where the metadata says so), typed from the annotation, its help from the metadata,
    and its ``switches``. A config with a ``for_resume`` classmethod also takes ``--resume RUN``, and then
    needs none of its fields (``config_from_args`` checks them)."""
    hints = typing.get_type_hints(config_cls)
    resumable = hasattr(config_cls, "for_resume")
    if resumable:
        parser.add_argument("--resume", metavar="RUN", default=argparse.SUPPRESS,
                            help="continue the run in RUN (an earlier --output-dir) with the settings it saved; flags "
                                 "given with it replace those a resume may change (timm's --resume; running the same "
                                 "command again resumes too)")
    for f in dataclasses.fields(config_cls):
        hint = hints[f.name]
        help_text = f.metadata.get("help", "")
        required = _is_required(f)
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
        elif typing.get_origin(base) is dict:
            kwargs.update(nargs="*", action=_KeyValues, metavar="KEY=VALUE")
        else:
            kwargs["type"] = _scalar_type(base)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        flags = [_flag(f.name), *f.metadata.get("aliases", ())]
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, required=required and not resumable, **kwargs)
        for switch, value in f.metadata.get("switches", {}).items():
            parser.add_argument(switch, dest=f.name, action=_Switch, const=value, default=argparse.SUPPRESS,
                                help=f"{flags[0]} {value}, unless {' or '.join(flags)} is given")


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """The dataclass from parsed arguments: fields not given keep their defaults; with ``--resume RUN``,
    ``config_cls.for_resume(RUN, **given)``."""
    fields = dataclasses.fields(config_cls)
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in fields}}
    if "resume" in args:
        return config_cls.for_resume(args.resume, **given)
    missing = [_flag(f.name) for f in fields if _is_required(f) and not f.metadata.get("positional") and f.name not in given]
    if missing:  # only where add_arguments left them optional for --resume
        raise ValueError(f"the following arguments are required: {', '.join(missing)} (or --resume RUN, to continue "
                         "an earlier run)")
    return config_cls(**given)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
           subparsers: dict[str, argparse.ArgumentParser] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """``parser.parse_args(argv)`` and the parser of the command it names (``subparsers[args.command]``, or
    ``parser``); unknown arguments are a usage error of that parser, with the nearest flags it has."""
    args, unknown = parser.parse_known_args(argv)
    owner = subparsers[args.command] if subparsers else parser
    if unknown:
        flags = [s for action in owner._actions for s in action.option_strings]
        hints = [f"{token}{hint}" for token in unknown if token.startswith("--")
                 and (hint := did_you_mean(token.split("=", 1)[0], flags, n=1))]
        owner.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; {'; '.join(hints)}" if hints else ""))
    return args, owner


def parse_config(config_cls: type, argv: Sequence[str] | None = None, description: str | None = None) -> Any:
    """Parse ``argv`` into ``config_cls`` (a script's whole command line); a config's own validation
    error becomes a usage error."""
    parser = argparse.ArgumentParser(description=description or config_cls.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, config_cls)
    args, _ = _parse(parser, argv)
    try:
        return config_from_args(config_cls, args)
    except ValueError as exc:
        parser.error(str(exc))


@contextlib.contextmanager
def command_errors(prog: str) -> Iterator[None]:
    """Errors whose message says what to do (a ``ValueError``, a diverging run's ``FloatingPointError``, a failed
    upload) end the program with ``{prog}: error: {message}`` and exit status 1, without a traceback."""
    from .model.hub import HubUploadError

    try:
        yield
    except (ValueError, FloatingPointError, HubUploadError) as exc:
        sys.exit(f"{prog}: error: {exc}")


def _commands() -> dict[str, tuple[type, Callable[[Any], Any], str]]:
    """Each command: its config dataclass, what runs it, and a one-line summary."""
    from .commands.evaluate import EvaluateConfig, evaluate
    from .commands.export import ExportConfig, export
    from .commands.inspect import InspectConfig, inspect
    from .commands.propose import ProposeConfig, propose
    from .commands.push import PushConfig, push
    from .commands.search import SearchConfig, search
    from .commands.serve import ServeConfig, serve
    from .commands.train import TrainConfig, train

    return {
        "train": (TrainConfig, train, "train with self-distillation (or --baseline) under Accelerate"),
        "search": (SearchConfig, search, "search early-exit thresholds on a run's validation split"),
        "evaluate": (EvaluateConfig, evaluate, "report early exit on a run's test split"),
        "export": (ExportConfig, export, "export a run's best model to ONNX, one graph per section and exit"),
        "push": (PushConfig, push, "push a run's best model to the Hugging Face Hub"),
        "inspect": (InspectConfig, inspect, "print a wrapped model's exits and MACs"),
        "propose": (ProposeConfig, propose, "propose exit positions from costs measured on this device"),
        "serve": (ServeConfig, serve, "serve a model over HTTP with early exit, on Ray Serve (timm-scan[serve])"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    commands = _commands()
    parser = argparse.ArgumentParser(prog="timm-scan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {}
    for name, (config_cls, run, summary) in commands.items():
        doc = sys.modules[run.__module__].__doc__
        subparsers[name] = sub.add_parser(name, help=summary, description=doc,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(subparsers[name], config_cls)
    args, command_parser = _parse(parser, argv, subparsers)
    config_cls, run, _ = commands[args.command]
    try:
        cfg = config_from_args(config_cls, args)
    except ValueError as exc:
        command_parser.error(str(exc))
    with command_errors(f"timm-scan {args.command}"):
        run(cfg)
