"""Speech dataset reader and word-error-rate scoring.

A speech dataset is a folder laid out as::

    DATASET/
      transcripts.tsv      # header "filename<TAB>text", then one row per utterance
      audio/*.wav          # 16 kHz, mono, 16-bit signed PCM

The reader is used in two places: by the speech task's evaluator (``speech.evaluate``) and by
the host, which replays the utterances into a simulated microphone stream and scores what the
task heard during a run (``score_run``). Both need the same
guarantees, so every check lives here: the WAV format the recognisers expect, and a well-formed
transcript table. Errors name the file (and line) and say how to fix the input, because a
dataset is usually prepared by hand and the person reading the error is the one who prepared it.
"""

from __future__ import annotations

import re
import wave
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The only audio format the recognisers accept. Resampling inside the robot would cost CPU on
#: every utterance; converting once, offline, with sox costs nothing at run time.
SAMPLE_RATE = 16000
CHANNELS = 1
SAMPLE_WIDTH = 2  # bytes, i.e. 16-bit signed PCM

TRANSCRIPTS = "transcripts.tsv"
_HEADER = ("filename", "text")


class SpeechDatasetError(ValueError):
    """The dataset folder, a WAV file or the transcript table is not usable."""


def _sox_hint(path: Path) -> str:
    return (
        f"convert it with: sox '{path}' -r {SAMPLE_RATE} -c {CHANNELS} -b {SAMPLE_WIDTH * 8} "
        f"-e signed-integer '{path.with_name(path.stem + '-16k.wav')}'"
    )


def read_wav(path: Path | str) -> np.ndarray:
    """Read a 16 kHz mono 16-bit PCM WAV file into an ``int16`` array.

    Raises ``SpeechDatasetError`` naming the file, the format found and the ``sox`` command that
    converts it, instead of silently resampling: a wrong rate would otherwise show up much later
    as a mysteriously bad word error rate.
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as wav:
            rate = wav.getframerate()
            channels = wav.getnchannels()
            width = wav.getsampwidth()
            frames = wav.readframes(wav.getnframes())
    except FileNotFoundError as err:
        raise SpeechDatasetError(f"{path}: file not found") from err
    except (wave.Error, EOFError) as err:
        # The wave module only reads integer PCM; float or compressed WAVs end up here.
        raise SpeechDatasetError(
            f"{path}: not a PCM WAV file ({err}); expected {SAMPLE_RATE} Hz mono 16-bit PCM; "
            + _sox_hint(path)
        ) from err
    if (rate, channels, width) != (SAMPLE_RATE, CHANNELS, SAMPLE_WIDTH):
        raise SpeechDatasetError(
            f"{path}: found {rate} Hz, {channels} channel(s), {width * 8}-bit; "
            f"expected {SAMPLE_RATE} Hz, {CHANNELS} channel, {SAMPLE_WIDTH * 8}-bit PCM; "
            + _sox_hint(path)
        )
    return np.frombuffer(frames, dtype="<i2").astype(np.int16, copy=False)


@dataclass(frozen=True)
class SpeechItem:
    """One utterance of a dataset: its WAV file and reference transcript."""

    name: str  #: path relative to the dataset folder, as written in transcripts.tsv
    path: Path
    text: str

    def load(self) -> np.ndarray:
        """The utterance's samples (int16, 16 kHz mono)."""
        return read_wav(self.path)


def read_transcripts(tsv: Path | str) -> list[tuple[str, str]]:
    """Parse ``transcripts.tsv`` into ``(filename, text)`` rows.

    Errors carry ``FILE:LINE`` so that an editor can jump straight to the bad row.
    """
    tsv = Path(tsv)
    try:
        lines = tsv.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise SpeechDatasetError(f"{tsv}: file not found") from err
    except UnicodeDecodeError as err:
        raise SpeechDatasetError(f"{tsv}: not UTF-8 text ({err})") from err
    if not lines or tuple(c.strip().lower() for c in lines[0].split("\t")) != _HEADER:
        found = lines[0] if lines else "an empty file"
        raise SpeechDatasetError(
            f"{tsv}:1: expected the header 'filename<TAB>text', found {found!r}"
        )
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue  # trailing blank lines are common in hand-edited files and harmless
        fields = line.split("\t")
        if len(fields) != 2:
            raise SpeechDatasetError(
                f"{tsv}:{lineno}: expected 2 tab-separated fields (filename, text), "
                f"found {len(fields)}: {line!r}"
            )
        name, text = fields[0].strip(), fields[1].strip()
        if not name:
            raise SpeechDatasetError(f"{tsv}:{lineno}: empty filename")
        if not text:
            raise SpeechDatasetError(f"{tsv}:{lineno}: empty transcript for {name!r}")
        if name in seen:
            raise SpeechDatasetError(
                f"{tsv}:{lineno}: {name!r} is listed twice (first on line {seen[name]})"
            )
        seen[name] = lineno
        rows.append((name, text))
    if not rows:
        raise SpeechDatasetError(f"{tsv}: no utterances after the header")
    return rows


class SpeechDataset(Sequence[SpeechItem]):
    """A folder of ``audio/*.wav`` files with ``transcripts.tsv``.

    The table is validated when the dataset is opened, and every listed file must exist, so a
    long evaluation or replay never dies half-way on a typo. The audio format is checked when an
    item is loaded (reading every file up front would double the start-up I/O on a Pi).
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SpeechDatasetError(f"{self.root}: not a directory")
        tsv = self.root / TRANSCRIPTS
        if not tsv.is_file():
            raise SpeechDatasetError(
                f"{self.root}: no {TRANSCRIPTS} (expected a 'filename<TAB>text' table next to "
                "the audio/ folder)"
            )
        items: list[SpeechItem] = []
        for lineno, (name, text) in enumerate(read_transcripts(tsv), start=2):
            path = self.root / name
            if not path.is_file():
                raise SpeechDatasetError(f"{tsv}:{lineno}: audio file {path} does not exist")
            items.append(SpeechItem(name=name, path=path, text=text))
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> SpeechItem:  # type: ignore[override]
        return self._items[index]

    def __iter__(self) -> Iterator[SpeechItem]:
        return iter(self._items)


def iter_chunks(pcm: np.ndarray, chunk_samples: int) -> Iterator[np.ndarray]:
    """Split an utterance into consecutive chunks, the way a microphone driver delivers it.

    The last chunk may be shorter; nothing is padded, so replayed audio is exactly the file.
    """
    if chunk_samples <= 0:
        raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
    for start in range(0, len(pcm), chunk_samples):
        yield pcm[start : start + chunk_samples]


# --- scoring -------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^\w\s']|_")


def normalise_text(text: str) -> list[str]:
    """Lowercase, strip punctuation and split into words.

    Apostrophes inside words are kept ("don't" stays one word, as in recogniser dictionaries);
    a leading or trailing quote is punctuation.
    """
    words = _NON_WORD.sub(" ", text.lower()).split()
    return [w.strip("'") for w in words if w.strip("'")]


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    ref = normalise_text(reference)
    hyp = normalise_text(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i]
        for j, hyp_word in enumerate(hyp, start=1):
            current.append(
                min(
                    previous[j] + 1,  # deletion of ref_word
                    current[j - 1] + 1,  # insertion of hyp_word
                    previous[j - 1] + (ref_word != hyp_word),  # match or substitution
                )
            )
        previous = current
    return previous[-1]


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Overall word error rate: total errors divided by total reference words.

    Pooling (rather than averaging per-file rates) keeps a two-word file from weighing as much
    as a twenty-word one.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total_words = sum(len(normalise_text(r)) for r in references)
    if total_words == 0:
        raise ValueError("references contain no words; WER is undefined")
    errors = sum(word_errors(r, h) for r, h in zip(references, hypotheses, strict=True))
    return errors / total_words


def _transcripts_by_file_name(dataset_dir: Path) -> dict[str, str]:
    """Reference text per WAV file name: the replay labels a sample with the name only."""
    tsv = dataset_dir / TRANSCRIPTS
    by_name: dict[str, str] = {}
    for name, text in read_transcripts(tsv):
        base = Path(name).name
        if base in by_name:
            raise SpeechDatasetError(
                f"{tsv}: two rows end in the file name {base!r}; a run's samples name only the "
                "file, so give every WAV a distinct name"
            )
        by_name[base] = text
    return by_name


def score_run(
    results: Sequence[Mapping[str, object]], dataset_dir: Path | str
) -> dict[str, object]:
    """Word error rate of what the speech task heard in one run, over the utterances played.

    ``results`` are the task's result dicts in sample-id order (dropped samples simply
    missing). Each carries ``playing``, the replay label of its chunk (the WAV's file name,
    ``None`` in silence), and, when an utterance ended, its text in ``utterance`` with the
    label it was heard in as ``source``. A *playing* is a run of consecutive results with
    the same label, so a file played twice counts twice. Each playing is scored against its
    transcript in ``dataset_dir``'s ``transcripts.tsv``; a playing nothing was heard in
    counts all its words as deleted, and text heard outside any playing (a false trigger in
    silence) counts all its words as inserted. Pooled over words, as ``wer`` is.

    Returns ``{"wer", "utterances", "errors", "words"}``; ``wer`` is NaN when nothing was
    played.
    """
    dataset_dir = Path(dataset_dir)
    references = _transcripts_by_file_name(dataset_dir)
    playings: list[tuple[str, list[str]]] = []  # (label, texts heard in it)
    latest: dict[str, int] = {}  # label -> index of its latest playing
    stray_words = 0
    previous: object = None
    for result in results:
        label = result.get("playing")
        if isinstance(label, str) and label != previous:
            if label not in references:
                raise SpeechDatasetError(
                    f"{dataset_dir / TRANSCRIPTS}: the run played {label!r}, which has no "
                    "transcript there; score the run against the dataset it replayed"
                )
            latest[label] = len(playings)
            playings.append((label, []))
        previous = label
        text = result.get("utterance")
        if isinstance(text, str) and text:
            source = result.get("source")
            if isinstance(source, str) and source in latest:
                playings[latest[source]][1].append(text)
            else:
                stray_words += len(normalise_text(text))
    words = sum(len(normalise_text(references[label])) for label, _ in playings)
    errors = stray_words + sum(
        word_errors(references[label], " ".join(texts)) for label, texts in playings
    )
    return {
        "wer": errors / words if words else float("nan"),
        "utterances": len(playings),
        "errors": errors,
        "words": words,
    }
