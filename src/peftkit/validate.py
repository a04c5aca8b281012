"""The checks every number and flag passes where it enters peftkit: one rule per kind of value.

Method configs, run options and the training loop call these on construction, and the
command line hands its values to those same objects, so an option is checked once, by the
same rule, whether it came from a flag, a JSON file or Python. A failure is an
``InvalidValue`` naming the owner, the field, the allowed range and the value given;
``field`` lets the command line add the option that set it.

A bool is never a number here (``True == 1`` in Python, and ``"r": true`` in a JSON file is a
mistake, not a rank), a string is never a number or a flag (``bool("false")`` is True), and
NaN and infinity are never in range (``nan <= 0`` is False, so a plain comparison lets them by).
"""

from __future__ import annotations

import math
from typing import Any


class InvalidValue(ValueError):
    """``owner.field`` was given ``value``, outside what it accepts."""

    def __init__(self, owner: str, field: str, requirement: str, value: Any) -> None:
        self.owner, self.field, self.value = owner, field, value
        super().__init__(f"{owner}.{field} must be {requirement}, got {value!r}.")


def is_real(value: Any) -> bool:
    """A finite int or float (not a bool, a string, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(owner: str, field: str, value: Any, *, minimum: int = 1) -> int:
    """An int >= ``minimum`` (a float such as 8.0 is refused: a rank or a step count is whole)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidValue(owner, field, what, value)
    return value


def number(owner: str, field: str, value: Any, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None, at_most: float | None = None, hint: str = "") -> float:
    """A finite number in the range the keywords give (``above``/``below`` exclusive,
    ``at_least``/``at_most`` inclusive); ``hint`` is added to the message."""
    ok = is_real(value)
    if ok and above is not None:
        ok = value > above
    if ok and at_least is not None:
        ok = value >= at_least
    if ok and below is not None:
        ok = value < below
    if ok and at_most is not None:
        ok = value <= at_most
    if not ok:
        low = f"> {above:g}" if above is not None else f">= {at_least:g}" if at_least is not None else None
        high = f"< {below:g}" if below is not None else f"<= {at_most:g}" if at_most is not None else None
        bounds = " and ".join(b for b in (low, high) if b)
        raise InvalidValue(owner, field, "a finite number" + (f" {bounds}" if bounds else "") + hint, value)
    return value


def flag(owner: str, field: str, value: Any) -> bool:
    """A real boolean: ``"false"`` in a JSON file is a string, and ``bool("false")`` is True."""
    if not isinstance(value, bool):
        raise InvalidValue(owner, field, "true or false", value)
    return value


def one_of(owner: str, field: str, value: Any, choices: tuple) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise InvalidValue(owner, field, f"one of {choices}", value)
    return value
