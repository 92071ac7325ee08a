"""Vosk (Kaldi) recogniser, used when a model directory is configured.

No Vosk model ships with the wheel and none can be fetched at run time (the robot is offline),
so most of this module is about failing clearly: every problem with the model directory is
reported with what to download, and where to put it, before Vosk's C++ loader runs (its own
message, "Failed to create a model", names neither).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ctxtask.datasets import data_dir
from ctxtask.datasets.speech import SAMPLE_RATE
from speech import commands
from speech.recognizer import RecognizerError

RECOMMENDED_MODEL = "vosk-model-small-en-us-0.15"
MODELS_URL = "https://alphacephei.com/vosk/models"
UNKNOWN = "[unk]"


class VoskModelError(RecognizerError):
    """The configured Vosk model directory is missing, incomplete or unreadable."""


def _how_to_get(where: str) -> str:
    return (
        f"Download {RECOMMENDED_MODEL}.zip from {MODELS_URL} and unzip it so that "
        f"{where}/am/final.mdl exists. To use another folder, set the speech task's config "
        "`vosk_model` (speech.evaluate: --vosk-model DIR; or env CTXROBOT_VOSK_MODEL). Without "
        "a model, use engine `pocketsphinx` (bundled, offline)."
    )


def default_model_dir() -> Path:
    """Where to look when no model is configured.

    ``$CTXROBOT_VOSK_MODEL``, else ``speech/model/vosk-model-small-en-us-0.15`` under the data
    root (the place the speech data's MANIFEST.md names), so a model unzipped there is found by
    the task, the evaluator and the tests without any configuration.
    """
    env = os.environ.get("CTXROBOT_VOSK_MODEL")
    return Path(env) if env else data_dir() / "speech" / "model" / RECOMMENDED_MODEL


def check_model_dir(model_dir: str | Path | None, mode: str = "dictation") -> Path:
    """Validate a Vosk model directory's layout; return it as a resolved path.

    ``None`` means ``default_model_dir()``. Checks only what Vosk's loader needs
    (``am/final.mdl``, ``conf/mfcc.conf`` and a decoding graph), so any Vosk model, small or
    large, passes. Command mode also needs a graph that can be rebuilt from a grammar at run
    time (``graph/HCLr.fst`` + ``graph/Gr.fst``, as the small models have); a big model's
    static ``HCLG.fst`` would silently ignore the grammar.
    """
    configured = model_dir is not None and str(model_dir).strip() != ""
    path = Path(model_dir if configured else default_model_dir()).expanduser().resolve()
    if not path.is_dir():
        problem = (
            f"Vosk model directory {path} does not exist."
            if configured
            else f"No Vosk model configured, and none at the default location {path}."
        )
        raise VoskModelError(f"{problem} " + _how_to_get(str(path)))
    missing = [p for p in ("am/final.mdl", "conf/mfcc.conf") if not (path / p).is_file()]
    has_static = (path / "graph/HCLG.fst").is_file()
    has_runtime = (path / "graph/HCLr.fst").is_file() and (path / "graph/Gr.fst").is_file()
    if not (has_static or has_runtime):
        missing.append("graph/HCLG.fst (or graph/HCLr.fst + graph/Gr.fst)")
    if missing:
        nested = sorted(p.parent.parent for p in path.glob("*/am/final.mdl"))
        hint = f" Did you mean {nested[0]}? (the zip unpacks into a subfolder)" if nested else ""
        raise VoskModelError(
            f"{path} is not a complete Vosk model: missing {', '.join(missing)}.{hint} "
            + _how_to_get(str(path))
        )
    if mode == "command" and not has_runtime:
        raise VoskModelError(
            f"{path} has only a static graph (graph/HCLG.fst), which cannot be restricted to "
            f"the command grammar. Command mode needs a model with graph/HCLr.fst and "
            f"graph/Gr.fst, such as {RECOMMENDED_MODEL} from {MODELS_URL}."
        )
    return path


class VoskRecognizer:
    """``speech.recognizer.Recognizer`` backed by a Vosk ``KaldiRecognizer``."""

    engine = "vosk"

    def __init__(self, model_dir: str | Path | None, mode: str = "dictation") -> None:
        if mode not in ("dictation", "command"):
            raise RecognizerError(f"unknown mode {mode!r}; choose dictation or command")
        self.mode = mode
        path = check_model_dir(model_dir, mode)
        try:
            import vosk
        except ImportError as err:  # the optional engine's wheel is not installed
            raise RecognizerError(
                f"engine 'vosk' selected but the vosk package is missing ({err}); "
                "install vosk==0.3.45 (see containers/speech/requirements.txt)"
            ) from err
        vosk.SetLogLevel(-1)  # keep Kaldi's warnings and errors, drop its per-utterance logs
        try:
            self._model = vosk.Model(str(path))
        except Exception as err:  # vosk raises a bare Exception when the C++ loader fails
            raise VoskModelError(
                f"Vosk could not load the model in {path} ({err}); its files are present but "
                "unreadable (an interrupted download or a model for another Vosk version?). "
                + _how_to_get(str(path))
            ) from err
        self._recognizer = self._make_recognizer(vosk)
        self._parts: list[str] = []

    def _make_recognizer(self, vosk: Any) -> Any:
        if self.mode == "dictation":
            return vosk.KaldiRecognizer(self._model, SAMPLE_RATE)
        missing = sorted(
            w for w in commands.vocabulary() if self._model.vosk_model_find_word(w) < 0
        )
        if missing:
            raise VoskModelError(f"the Vosk model's vocabulary lacks command words {missing}")
        # "[unk]" lets out-of-grammar speech map to "unknown" instead of the nearest command.
        grammar = json.dumps([*commands.phrases(), UNKNOWN])
        return vosk.KaldiRecognizer(self._model, SAMPLE_RATE, grammar)

    def start_utterance(self) -> None:
        self._recognizer.Reset()
        self._parts.clear()

    def feed(self, pcm: bytes) -> None:
        # Vosk runs its own endpointer as well; when it closes a segment inside our utterance
        # the text must be collected now, or the next call would overwrite it.
        if self._recognizer.AcceptWaveform(pcm):
            self._parts.append(self._text(self._recognizer.Result()))

    def end_utterance(self) -> str:
        self._parts.append(self._text(self._recognizer.FinalResult()))
        text = " ".join(part for part in self._parts if part)
        self._parts.clear()
        return text

    @staticmethod
    def _text(result_json: str) -> str:
        words = json.loads(result_json).get("text", "").split()
        return " ".join(w for w in words if w != UNKNOWN)
