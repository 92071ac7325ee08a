"""Field types every schema module shares: the model settings, names, bounded numbers.

Every number in a manifest has a finite range stated here or at its field, and the
range is printed in the error (``… = 1e-09 is out of range: it must be >= 0.1``);
``allow_inf_nan=False`` refuses ``.inf`` and ``.nan`` before any bound is compared.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

from ctxrobot.manifest.problems import shown
from ctxrobot.sched.rules import NAME_PATTERN

MODEL = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

#: Task, source and rule names: short, lowercase, usable in container names and labels.
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
#: A share of the whole machine. Below 1 % the CPU quota falls under the kernel's
#: 1 ms-per-period minimum.
Fraction = Annotated[float, Field(ge=0.01, le=1)]
#: Longest path a manifest may write (Linux PATH_MAX).
MAX_PATH = 4096
#: Longest run a scenario describes, and the latest time anything in it may happen.
WEEK_S = 7 * 86_400.0


def describe(value: object) -> str:
    """A user value in words, for "expected X, got Y" messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {shown(value)}"
    if isinstance(value, str):
        return f"the string {shown(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
