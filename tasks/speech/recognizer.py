"""The engine-neutral recogniser interface and the factory that picks an engine.

The streaming layer (``speech.stream``) only knows this protocol, so the task, the evaluator
and the tests drive PocketSphinx and Vosk through exactly the same code path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

Engine = Literal["pocketsphinx", "vosk"]
Mode = Literal["dictation", "command"]
ENGINES: tuple[str, ...] = get_args(Engine)
MODES: tuple[str, ...] = get_args(Mode)


class RecognizerError(RuntimeError):
    """An engine could not be set up (missing model, bad configuration)."""


@dataclass(frozen=True)
class Word:
    """One recognised word and where it lies, in seconds from the start of its utterance."""

    word: str
    start_s: float
    end_s: float

    def as_json(self) -> list[object]:
        """``[word, start_s, end_s]``: compact for the wire (an utterance has many words)."""
        return [self.word, round(self.start_s, 2), round(self.end_s, 2)]


@dataclass(frozen=True)
class Transcript:
    """What an engine heard in one utterance: the text and, word by word, when."""

    text: str  #: lowercase words separated by single spaces; empty when nothing was heard
    words: tuple[Word, ...] = ()


class Recognizer(Protocol):
    """One utterance at a time: ``start_utterance``, any number of ``feed``, ``end_utterance``.

    ``mode`` is fixed at construction: ``"dictation"`` uses the engine's open-vocabulary
    language model, ``"command"`` restricts it to the robot command grammar
    (``speech.commands``). ``language`` is the model's language tag (``"en-us"``, ``"ko"``),
    or ``None`` when the model does not say.
    """

    engine: str
    mode: str
    language: str | None

    def start_utterance(self) -> None:
        """Begin a new utterance, discarding any state of the previous one."""

    def feed(self, pcm: bytes) -> None:
        """Add int16 little-endian mono 16 kHz samples to the current utterance."""

    def end_utterance(self) -> Transcript:
        """Finish the utterance and return what was heard (possibly nothing)."""


def create_recognizer(
    engine: str = "pocketsphinx",
    mode: str = "dictation",
    vosk_model: str | Path | None = None,
    decoder_options: Mapping[str, object] | None = None,
) -> Recognizer:
    """Build the recogniser for ``engine`` in ``mode``.

    ``vosk_model`` (engine vosk) is a model directory or the name of an installed Python
    package holding one (see ``speech.vosk_engine.resolve_model``). ``decoder_options``
    (engine pocketsphinx) replaces the tuned dictation settings; ``speech.tune`` uses it.
    Engines are imported lazily so that a container holding only one engine's wheels still
    works with the other one selected.
    """
    if mode not in MODES:
        raise RecognizerError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if engine == "pocketsphinx":
        from speech.pocketsphinx_engine import PocketSphinxRecognizer

        return PocketSphinxRecognizer(mode=mode, options=decoder_options)
    if engine == "vosk":
        from speech.vosk_engine import VoskRecognizer

        return VoskRecognizer(model=vosk_model, mode=mode)
    raise RecognizerError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
