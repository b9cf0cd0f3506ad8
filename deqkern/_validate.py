"""Checks of scalar and path options, shared by the command lines (as argparse ``type=`` functions)
and the library (as argument checks), so that a bound is declared once and every error names the
option it is about."""
from __future__ import annotations

import argparse
import math
import numbers
import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch


class OptionError(ValueError):
    """A bad value for one named option (a function argument or config field): ``name`` says which."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


class Bounded:
    """A finite number of one kind in ``[lo, hi]`` (``lo`` excluded when ``lo_open``).

    As an argparse ``type=`` it parses the flag's text; :meth:`check` validates a value passed in
    code, accepting numpy/torch scalars of the kind and refusing bools (``True`` is not a count).
    """

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
        if kind not in (int, float):
            raise TypeError(f"kind: expected int or float, got {kind!r}")
        self.kind, self.lo, self.hi, self.lo_open = kind, lo, hi, lo_open

    def describe(self) -> str:
        """``"an integer >= 1"``, ``"a finite number > 0"``, ``"an integer in [1, 8]"``, ..."""
        noun = "an integer" if self.kind is int else "a finite number"
        lo, hi = (f"{v:{'d' if self.kind is int else 'g'}}" if v is not None else None for v in (self.lo, self.hi))
        if lo is not None and hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{lo}, {hi}]"
        if lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{noun} <= {hi}"
        return noun

    def _in_range(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self._in_range(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value

    def check(self, name: str, value: Any) -> int | float:
        """``value`` as a Python ``int``/``float``, or :class:`OptionError` naming ``name``."""
        if _is_bool(value):
            raise OptionError(name, f"expected {self.describe()}, got the bool {value!r}")
        try:
            number = _as_number(value, self.kind)
        except TypeError:
            raise OptionError(name, f"expected {self.describe()}, got {type(value).__name__} {value!r}") from None
        if not self._in_range(number):
            raise OptionError(name, f"expected {self.describe()}, got {value!r}")
        return number


def _is_bool(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, (bool, np.bool_))


def _as_number(value: Any, kind: type) -> int | float:
    """A Python ``int`` from anything with ``__index__`` (numpy/torch integer scalars), or a
    Python ``float`` from a real number or a real 0-d tensor; TypeError otherwise."""
    if kind is int:
        return operator.index(value)
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.is_complex():
            raise TypeError(value)
        return float(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(value)
    return float(value)


#: the bounds the command lines share
POSITIVE_INT = Bounded(int, 1)
POSITIVE_FLOAT = Bounded(float, 0.0, lo_open=True)
NONNEGATIVE_FLOAT = Bounded(float, 0.0)


def device(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if dev.type == "cpu":
        return text
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this torch ({torch.__version__}) has no {dev.type} device available"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: only {count} {dev.type} device(s) (indices 0..{count - 1})")
    return text


def device_or_auto(text: str) -> str:
    """argparse type: ``auto`` (cuda when available, else cpu) or a :func:`device`."""
    return text if text == "auto" else device(text)


def _no_file_in_the_way(path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a directory, or nothing can be written under it."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{str(path)!r}: {str(parent)!r} is a file, not a folder")
            return


def output_dir(text: str) -> Path:
    """argparse type: a folder to write into (created if missing), not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder to write into")
    _no_file_in_the_way(path)
    return path


def output_file(text: str) -> Path:
    """argparse type: a file path to write (its folder created if missing), not an existing folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file path")
    _no_file_in_the_way(path)
    return path
