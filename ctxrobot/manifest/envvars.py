"""``${VAR}`` and ``${VAR:-default}`` in manifest strings, expanded in one linear pass.

A reference is ``${`` up to the next ``}``; text without a closing brace stays as written.
Each ``${`` is looked at once and the scan never goes back, so the time is linear in the
text (a regular expression that retries at every ``${`` was quadratic: 40 k characters of
``${${${…`` took 15 s). The output is capped too: a short manifest must not expand a large
variable into gigabytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ctxrobot.manifest.problems import shown

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_NAME = 100  # longer names are typos or attacks; the message quotes the name thrice


@dataclass(frozen=True)
class Expanded:
    """The expanded text, or the first problem: its index in the input and the message."""

    text: str
    error_at: int | None = None
    error: str = ""


def expand(text: str, environ: Mapping[str, str], room: int) -> Expanded:
    """Expand every reference in ``text``; the result may hold at most ``room`` characters.

    Stops at the first bad or unset reference (one message per value is enough to fix it).
    """
    pieces: list[str] = []
    size = 0
    done = 0  # text[:done] is already in pieces
    while done <= len(text):
        start = text.find("${", done)
        end = text.find("}", start + 2) if start >= 0 else -1
        if end < 0:
            start, value, end = len(text), "", len(text)
        else:
            found = _lookup(text[start + 2 : end], environ)
            if isinstance(found, _Refusal):
                return Expanded(text, start, found.message)
            value = found
        pieces += (text[done:start], value)
        size += start - done + len(value)
        if size > room:
            return Expanded(
                text,
                min(start, len(text) - 1),
                f"this value expands to more than {room} characters; no manifest value is "
                "that long, check the variables it uses",
            )
        done = end + 1
    return Expanded("".join(pieces))


@dataclass(frozen=True)
class _Refusal:
    message: str


def _lookup(body: str, environ: Mapping[str, str]) -> str | _Refusal:
    name, sep, default = body.partition(":-")
    if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
        return _Refusal(
            f"bad variable reference {shown('${' + body + '}')}: write ${{NAME}} or "
            "${NAME:-default} with NAME made of letters, digits and '_', at most 100 of them"
        )
    if name in environ:
        return environ[name]
    if sep:
        return default
    return _Refusal(
        f"environment variable {name} is not set and '${{{name}}}' has no default; "
        f"export {name} or write ${{{name}:-default}}"
    )
