"""Streaming recognition: microphone chunks in, finished utterances out.

This is the one path audio takes through the speech task; the task (``speech.task``) and the
evaluator (``speech.evaluate``) both drive it, so the numbers the evaluator reports are the
numbers the robot gets.
"""

from __future__ import annotations

import numpy as np

from speech.recognizer import Recognizer
from speech.vad import Segmenter, VadEvent


class StreamingRecognizer:
    """Glue a ``Segmenter`` (where are the utterances?) to a ``Recognizer`` (what was said?)."""

    def __init__(self, recognizer: Recognizer, segmenter: Segmenter) -> None:
        self.recognizer = recognizer
        self.segmenter = segmenter
        self.utterances = 0  #: utterances closed so far, including empty ones

    @property
    def speaking(self) -> bool:
        """True while an utterance is open (its text is not known yet)."""
        return self.segmenter.speaking

    def push(self, pcm: np.ndarray | bytes) -> list[str]:
        """Process one chunk; returns the texts of utterances that ended in it (usually none)."""
        return self._apply(self.segmenter.push(pcm))

    def flush(self) -> list[str]:
        """End of stream: close an open utterance and return its text."""
        return self._apply(self.segmenter.flush())

    def _apply(self, events: list[VadEvent]) -> list[str]:
        texts: list[str] = []
        for event in events:
            if event.start:
                self.recognizer.start_utterance()
            if event.pcm:
                self.recognizer.feed(event.pcm)
            if event.end:
                self.utterances += 1
                texts.append(self.recognizer.end_utterance())
        return texts
