"""Config dataclass fields whose help lives in their metadata, where the command line reads it."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["option"]


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with ``help`` (and e.g. ``positional=True``) in its metadata; list and dict
    defaults are copied for each instance."""
    metadata = {"help": help, **metadata}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
