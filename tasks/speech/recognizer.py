"""The engine-neutral recogniser interface and the factory that picks an engine.

The streaming layer (``speech.stream``) only knows this protocol, so the task, the evaluator
and the tests drive PocketSphinx and Vosk through exactly the same code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol, get_args

Engine = Literal["pocketsphinx", "vosk"]
Mode = Literal["dictation", "command"]
ENGINES: tuple[str, ...] = get_args(Engine)
MODES: tuple[str, ...] = get_args(Mode)


class RecognizerError(RuntimeError):
    """An engine could not be set up (missing model, bad configuration)."""


class Recognizer(Protocol):
    """One utterance at a time: ``start_utterance``, any number of ``feed``, ``end_utterance``.

    ``mode`` is fixed at construction: ``"dictation"`` uses the engine's open-vocabulary
    language model, ``"command"`` restricts it to the robot command grammar
    (``speech.commands``).
    """

    engine: str
    mode: str

    def start_utterance(self) -> None:
        """Begin a new utterance, discarding any state of the previous one."""

    def feed(self, pcm: bytes) -> None:
        """Add int16 little-endian mono 16 kHz samples to the current utterance."""

    def end_utterance(self) -> str:
        """Finish the utterance and return its text (lowercase words, possibly empty)."""


def create_recognizer(
    engine: str = "pocketsphinx", mode: str = "dictation", vosk_model: str | Path | None = None
) -> Recognizer:
    """Build the recogniser for ``engine`` in ``mode``.

    Engines are imported lazily so that a container holding only one engine's wheels still
    works with the other one selected.
    """
    if mode not in MODES:
        raise RecognizerError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if engine == "pocketsphinx":
        from speech.pocketsphinx_engine import PocketSphinxRecognizer

        return PocketSphinxRecognizer(mode=mode)
    if engine == "vosk":
        from speech.vosk_engine import VoskRecognizer

        return VoskRecognizer(model_dir=vosk_model, mode=mode)
    raise RecognizerError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
