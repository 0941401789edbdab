"""Files written whole or not at all, and the one JSON round-trip of the package's dataclasses.

Every file timm-scan writes outside a weights library goes through `atomic_write`: the bytes go to a
temporary name beside the target, are flushed to disk, and replace the target in one rename, so a
reader (or a rerun after a kill) sees the old file or the new one, never a half-written one.
`JsonRecord` is the mixin of every dataclass saved as JSON (results, configs, the exit policy):
nested dataclasses are rebuilt from their field types, unknown fields are an error. `sha256` is the
checksum that saved weights and graphs carry, so that loading can tell a damaged file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["JsonRecord", "atomic_write", "check_sha256", "read_json", "sha256"]

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


MAX_JSON_DEPTH = 64  # lists and objects inside one another; the files timm-scan reads nest a few levels


def read_json(path: str | Path, what: str | None = None) -> Any:
    """The JSON value of ``path``; a missing, unreadable or malformed file, or one nested deeper than
    ``MAX_JSON_DEPTH`` (which no later code could walk safely), is a ``ValueError`` naming it (``what``: how
    to call the file in the message, default its path)."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise ValueError(f"{what} does not exist")
    try:
        data = json.loads(path.read_text())
        too_deep = _nests_deeper(data, MAX_JSON_DEPTH)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON ({exc}); the file is damaged") from None
    except RecursionError:  # nested beyond what the parser itself can walk
        too_deep = True
    if too_deep:
        raise ValueError(f"{what} nests lists or objects more than {MAX_JSON_DEPTH} deep; the file is damaged or "
                         "not one timm-scan reads")
    return data


def _nests_deeper(value: Any, depth: int) -> bool:
    """Whether a JSON value holds lists or objects more than ``depth`` inside one another (walked without
    recursion)."""
    stack = [(value, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            if level > depth:
                return True
            stack.extend((child, level + 1) for child in (value.values() if isinstance(value, dict) else value))
    return False


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex; read in 1 MiB chunks, so memory stays flat for large files."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str, what: str) -> None:
    """A ``ValueError`` naming ``what`` (the file, in the message) unless ``path``'s SHA-256 is ``expected``
    (hex, as `sha256` gives)."""
    if sha256(path) != expected:
        raise ValueError(f"{what} does not have the SHA-256 checksum recorded when it was saved: the file is "
                         "damaged or was changed since (save it again, or download it again)")


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type holds (``X``, ``X | None``, ``list[X]``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next((found for arg in typing.get_args(hint) if (found := _dataclass_in(arg)) is not None), None)


def _holds_list(hint: Any) -> bool:
    """Whether a field's type is a list (``list[X]``, ``list[X] | None``)."""
    return typing.get_origin(hint) is list or any(_holds_list(arg) for arg in typing.get_args(hint))


def _plain(value: Any) -> Any:
    """``value`` with every nested ``JsonRecord`` as its ``to_dict`` (so that a record leaving out a field, as
    ``ExitPolicy`` does, leaves it out wherever it is nested)."""
    if isinstance(value, JsonRecord):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class JsonRecord:
    """Mixin of the dataclasses saved as JSON: ``to_dict`` / ``from_dict`` (nested dataclasses rebuilt
    from their field types; unknown fields are a ``ValueError``) and ``save`` / ``load`` of a file,
    written atomically."""

    renamed: typing.ClassVar[dict[str, str]] = {}  # old field name -> new, read from files written before a rename
    # field -> the value that files written before the field existed meant (where it differs from today's default)
    absent: typing.ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (nested records as their own ``to_dict``, other dataclasses as objects,
        tuples as lists)."""
        return json.loads(json.dumps({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}))

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        data = {**cls.absent, **{cls.renamed.get(k, k): v for k, v in data.items()}}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields are {sorted(known)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            nested = _dataclass_in(hints[name])
            if nested is not None and value is not None and issubclass(nested, JsonRecord):
                if isinstance(value, list) != _holds_list(hints[name]):
                    raise ValueError(f"{cls.__name__} field {name!r} must be "
                                     f"{'a list of' if _holds_list(hints[name]) else 'one'} {nested.__name__} "
                                     f"(a JSON {'array' if _holds_list(hints[name]) else 'object'}); got {value!r:.80}")
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
