"""Typed dataclass configs from what users pass: the config itself, a mapping of its fields, or None."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Mapping, TypeVar

C = TypeVar("C")


def config_from(cls: type[C], options: Any, argname: str, base: C | None = None) -> C:
    """``options`` as a ``cls``: an instance is returned as is, a mapping overrides ``base`` (or the
    defaults) field by field — unknown keys raise a ValueError naming them and ``argname``."""
    if options is None:
        return base if base is not None else cls()
    if isinstance(options, cls):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"{argname}: expected {cls.__name__} or a mapping, got {type(options).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{argname}: {unknown} are not options of {cls.__name__}; expected some of {sorted(known)}")
    return replace(base, **options) if base is not None else cls(**options)
