"""Config dataclass fields whose help lives in their metadata, where the command line reads it.

A field's metadata: ``help``; ``positional=True`` for an argument rather than a ``--flag``; ``aliases``,
other names of its flag (timm's ``train.py`` names, such as ``-b`` for ``--batch-size``); ``switches``,
flags that take no value and set the field to a constant unless it is given (timm's ``--amp``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["did_you_mean", "option"]


def option(default: Any = dataclasses.MISSING, help: str = "", *, aliases: Sequence[str] = (),
           switches: dict[str, Any] | None = None, **metadata: Any) -> Any:
    """A dataclass field with ``help``, ``aliases``, ``switches`` (and e.g. ``positional=True``) in its
    metadata; list and dict defaults are copied for each instance."""
    metadata = {"help": help, **metadata}
    if aliases:
        metadata["aliases"] = tuple(aliases)
    if switches:
        metadata["switches"] = dict(switches)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """``" (did you mean X?)"`` with the ``n`` nearest of ``choices`` to ``word`` (`difflib`), or ``""`` if none is near."""
    close = difflib.get_close_matches(word, list(choices), n=n)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
