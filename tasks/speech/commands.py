"""The robot command language, written once and rendered for both engines.

PocketSphinx takes a JSGF grammar; Vosk takes a JSON list of phrases. Writing both by hand
would let them drift apart, so the language is defined here as data and rendered into each
form. It is deliberately small: a closed grammar is what makes command recognition reliable
on a Pi-class CPU (the search space is a few hundred phrases, not a 130k-word vocabulary).

Language (``[]`` optional, ``|`` alternatives)::

    (go | move) (forward | back | backward) [<number> (meter | meters | centimeters)]
    turn (left | right) [<number> degrees]
    stop | halt

with ``<number>`` one … twenty and the tens thirty … ninety.
"""

from __future__ import annotations

from itertools import product

NUMBERS: tuple[str, ...] = (
    *("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy"),
    *("eighty", "ninety"),
)
MOVE_VERBS: tuple[str, ...] = ("go", "move")
DIRECTIONS: tuple[str, ...] = ("forward", "back", "backward")
DISTANCE_UNITS: tuple[str, ...] = ("meter", "meters", "centimeters")
TURNS: tuple[str, ...] = ("left", "right")
STOP_WORDS: tuple[str, ...] = ("stop", "halt")

GRAMMAR_NAME = "commands"

#: Commands that are safe to act on even when misheard: a spurious "stop" only halts the robot,
#: while a spurious "turn left ninety degrees" moves it. Engines may skip out-of-grammar
#: checks for these to answer faster (see ``speech.pocketsphinx_engine``).
SAFE_COMMANDS: frozenset[str] = frozenset(STOP_WORDS)


def _alt(words: tuple[str, ...]) -> str:
    return "(" + " | ".join(words) + ")"


def jsgf() -> str:
    """The command language as a JSGF grammar (for PocketSphinx)."""
    return "\n".join(
        [
            "#JSGF V1.0;",
            f"grammar {GRAMMAR_NAME};",
            "public <command> = <move> | <turn> | <stop>;",
            f"<move> = {_alt(MOVE_VERBS)} {_alt(DIRECTIONS)} [<number> {_alt(DISTANCE_UNITS)}];",
            f"<turn> = turn {_alt(TURNS)} [<number> degrees];",
            f"<stop> = {_alt(STOP_WORDS)};",
            f"<number> = {_alt(NUMBERS)};",
            "",
        ]
    )


def phrases() -> list[str]:
    """Every sentence of the command language (for a Vosk grammar list).

    Vosk compiles the list into a small decoding graph at recogniser creation; a few hundred
    phrases take milliseconds.
    """
    out: list[str] = []
    for verb, direction in product(MOVE_VERBS, DIRECTIONS):
        out.append(f"{verb} {direction}")
        out.extend(f"{verb} {direction} {n} {unit}" for n, unit in product(NUMBERS, DISTANCE_UNITS))
    for side in TURNS:
        out.append(f"turn {side}")
        out.extend(f"turn {side} {n} degrees" for n in NUMBERS)
    out.extend(STOP_WORDS)
    return out


def vocabulary() -> set[str]:
    """All words the command language uses; each engine checks its dictionary has them."""
    return {word for phrase in phrases() for word in phrase.split()}
