"""What validation reports: a problem at a FILE:LINE:COL, and the error that carries them.

Every user value quoted in a message goes through :func:`shown`, so a hostile manifest can
neither flood the terminal with a 100 kB line nor send it control sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Longest user text quoted in a message.
SHOWN_CHARS = 60


@dataclass(frozen=True, order=True)
class Problem:
    """One validation problem, printed the way compilers do so editors can jump to it.

    A warning (``warning=True``) does not make a file invalid; it prints as
    ``FILE:LINE:COL: warning: message``.
    """

    file: str
    line: int
    col: int
    message: str
    warning: bool = False

    def __str__(self) -> str:
        # Messages are built to be one printable line; this is the guarantee.
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in self.message)
        label = "warning: " if self.warning else ""
        return f"{self.file}:{self.line}:{self.col}: {label}{text}"


@dataclass(frozen=True)
class Pos:
    """A 1-based position in the source text."""

    line: int
    col: int


class ManifestError(Exception):
    """Raised by the loaders with every problem found, sorted by file and position."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def shown(value: object) -> str:
    """``repr`` of a user value, cut to :data:`SHOWN_CHARS` characters: quotes, escapes
    control characters, and stays one short line."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 4] + "...'"
