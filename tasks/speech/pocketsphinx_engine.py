"""PocketSphinx 5 recogniser: the offline default (the wheel bundles the en-us model).

Why the audio of an utterance is buffered and decoded when it ends
-------------------------------------------------------------------
The bundled acoustic model was trained with *batch* cepstral mean normalisation (its
``feat.params`` says ``-cmn batch``): each utterance's mean cepstrum is subtracted using the
whole utterance. Fed incrementally, PocketSphinx must fall back to *live* CMN, which starts
from a fixed prior and only converges after a few utterances from the same microphone. On the
shared test set (four different recordings) that raised the word error rate from 0.17 to 0.28.
Decoding the utterance in one call with ``full_utt=True`` gives the model the normalisation it
was trained with. The cost is latency, not CPU: the same frames are decoded either way, but the
work happens after the end-pointer closes the utterance (about 0.15 x its duration at the
settings below), rather than while the user speaks.

Spreading that work over the utterance was measured and rejected (docs/speech.md): decoding
incrementally with the cepstral mean of the utterance's first 1 s or 2 s (computed in batch,
then held) gives 24 or 20 errors out of 96 instead of 16; with the whole utterance's mean it
gives exactly 16, so the loss is the normalisation, not the incremental search. Cutting the
utterance at its internal pauses keeps the WER but finds no pause inside these sentences.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pocketsphinx import Decoder

from ctxtask.datasets.speech import word_errors
from speech import commands
from speech.recognizer import RecognizerError, Transcript, Word

#: Alternate pronunciations come back as "word(2)"; the word is the part before.
_ALTERNATE = re.compile(r"\(\d+\)$")

#: Decoder settings for dictation, relative to the PocketSphinx defaults, chosen by
#: ``python -m speech.tune`` (two-fold cross-validation over language weight, word insertion
#: penalty, ``topn``, the ``fwdflat`` and ``bestpath`` passes and the VAD boundaries; see
#: docs/speech.md for the full figures). Both extra search passes are off, so the first-pass
#: tree search's best path is the answer:
#:
#: ``fwdflat`` off: the second, flat-lexicon pass re-searches the words the first pass proposed
#:     with a heavier language weight (``fwdflatlw`` 8.5 against ``lw`` 6.5); on this audio that
#:     prior overrode acoustically clear words ("prudently", "himself").
#: ``bestpath`` off: the lattice rescoring pass then has nothing left to add here.
#:
#: Errors out of 96 words on the shared recordings: PocketSphinx defaults 21, these settings
#: 16, at the least CPU of any setting tried. Cross-validated, no setting measurably beats
#: the defaults on the held-out half (WER 0.220 and 0.216 on halves A and B, the same as
#: the defaults): the gain rests on two recordings, so it is a cheaper search that costs no
#: accuracy here, not a proven accuracy gain. Wider beams change nothing but CPU time: the
#: remaining errors are model errors, not search errors.
DICTATION_OPTIONS: Mapping[str, object] = {"fwdflat": False, "bestpath": False}

#: Command mode rejects an utterance when free dictation of the same audio confirms fewer than
#: half of the grammar hypothesis's words (see ``PocketSphinxRecognizer._confirmed``).
MAX_COMMAND_DISAGREEMENT = 0.5


class PocketSphinxRecognizer:
    """``speech.recognizer.Recognizer`` backed by a PocketSphinx ``Decoder``.

    Command mode and out-of-grammar speech
    --------------------------------------
    A grammar search has no way to say "none of these": whatever is said, it returns the
    closest command ("he might even have been made amiable himself" came out as "turn right
    eleven degrees"). A robot must not act on that. So in command mode the same decoder also
    holds the dictation language model, and an utterance the grammar matched is decoded a
    second time without the grammar. The grammar result is kept only when that unconstrained
    hypothesis confirms it (word-level edit distance at most half the command's length), the
    classic "background model" test for rejecting out-of-vocabulary input. It costs one
    dictation decode per matched utterance (real-time factor ~0.2 instead of ~0.02); on the
    shared data the real command agreed exactly (distance 0) and every other recording was
    1.75 or more command-lengths away, so the 0.5 threshold is not a fine-tuned value.
    "stop" and "halt" skip the check (``commands.SAFE_COMMANDS``): acting on a misheard stop is
    harmless, and it is the command that must not wait for a second decode.
    """

    engine = "pocketsphinx"
    language = "en-us"  #: the bundled model's

    def __init__(
        self, mode: str = "dictation", options: Mapping[str, object] | None = None
    ) -> None:
        if mode not in ("dictation", "command"):
            raise RecognizerError(f"unknown mode {mode!r}; choose dictation or command")
        self.mode = mode
        try:
            self._decoder = Decoder(**(DICTATION_OPTIONS if options is None else options))
            self._frame_s = 1.0 / float(self._decoder.config["frate"])
            # Read before any other search exists: current_search() crashes without one.
            self._dictation_search: str = self._decoder.current_search()
            if mode == "command":
                self._decoder.add_jsgf_string(commands.GRAMMAR_NAME, commands.jsgf())
                self._decoder.activate_search(commands.GRAMMAR_NAME)
        except (RuntimeError, ValueError, KeyError) as err:
            raise RecognizerError(f"PocketSphinx setup failed ({mode} mode): {err}") from err
        if mode == "command":
            missing = sorted(w for w in commands.vocabulary() if not self._decoder.lookup_word(w))
            if missing:
                raise RecognizerError(f"command words missing from the dictionary: {missing}")
        self._audio = bytearray()

    def start_utterance(self) -> None:
        self._audio.clear()

    def feed(self, pcm: bytes) -> None:
        self._audio += pcm

    def end_utterance(self) -> Transcript:
        audio = bytes(self._audio)
        self._audio.clear()
        if not audio:
            return Transcript("")
        text = self._decode(audio)
        words = self._words()  # before a confirming decode replaces the segmentation
        if (
            self.mode == "command"
            and text
            and text not in commands.SAFE_COMMANDS
            and not self._confirmed(text, audio)
        ):
            return Transcript("")
        return Transcript(text, words)

    def _decode(self, audio: bytes) -> str:
        self._decoder.start_utt()
        self._decoder.process_raw(audio, full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        # hypstr already omits <s>, </s>, <sil> and noise fillers.
        return hyp.hypstr if hyp is not None else ""

    def _words(self) -> tuple[Word, ...]:
        """The last decode's words with their times; fillers (<sil>, [NOISE]) and a grammar's
        null transitions ("(NULL)") are not words."""
        return tuple(
            Word(
                _ALTERNATE.sub("", seg.word),
                seg.start_frame * self._frame_s,
                (seg.end_frame + 1) * self._frame_s,
            )
            for seg in self._decoder.seg() or ()  # None when the search found no path
            if not seg.word.startswith(("<", "[", "+", "("))
        )

    def _confirmed(self, command: str, audio: bytes) -> bool:
        """Does free dictation of ``audio`` agree with the grammar's ``command``?"""
        self._decoder.activate_search(self._dictation_search)
        try:
            free = self._decode(audio)
        finally:
            self._decoder.activate_search(commands.GRAMMAR_NAME)
        return word_errors(command, free) <= MAX_COMMAND_DISAGREEMENT * len(command.split())
