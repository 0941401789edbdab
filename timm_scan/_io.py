"""Files written whole or not at all, and the one JSON round-trip of the package's dataclasses.

Every file timm-scan writes outside a weights library goes through `atomic_write`: the bytes go to a
temporary name beside the target, are flushed to disk, and replace the target in one rename, so a
reader (or a rerun after a kill) sees the old file or the new one, never a half-written one.
`JsonRecord` is the mixin of every dataclass saved as JSON (results, configs, the exit policy):
nested dataclasses are rebuilt from their field types, unknown fields are an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["JsonRecord", "atomic_write", "read_json"]

T = TypeVar("T")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` by way of ``<path>.partial`` and a rename."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


def read_json(path: str | Path, what: str | None = None) -> Any:
    """The JSON value of ``path``; a missing, unreadable or malformed file is a ``ValueError`` naming it
    (``what``: how to call the file in the message, default its path)."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise ValueError(f"{what} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON ({exc}); the file is damaged") from None


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type holds (``X``, ``X | None``, ``list[X]``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next((found for arg in typing.get_args(hint) if (found := _dataclass_in(arg)) is not None), None)


class JsonRecord:
    """Mixin of the dataclasses saved as JSON: ``to_dict`` / ``from_dict`` (nested dataclasses rebuilt
    from their field types; unknown fields are a ``ValueError``) and ``save`` / ``load`` of a file,
    written atomically."""

    renamed: typing.ClassVar[dict[str, str]] = {}  # old field name -> new, read from files written before a rename

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (nested dataclasses as objects, tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        data = {cls.renamed.get(k, k): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields are {sorted(known)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            nested = _dataclass_in(hints[name])
            if nested is not None and value is not None and issubclass(nested, JsonRecord):
                value = [nested.from_dict(v) for v in value] if isinstance(value, list) else nested.from_dict(value)
            values[name] = value
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise ValueError(f"{cls.__name__}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write the JSON file whole or not at all (`atomic_write`)."""
        return atomic_write(path, self.to_json())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Read a file ``save`` wrote; a missing or damaged file, or one of another record, is a ``ValueError``
        naming the file."""
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path} is not a valid {cls.__name__} file ({type(exc).__name__}: {exc})") from None
