"""`ctxrobot data fetch`: rebuild the shared data folder from its public originals.

For each catalogue folder: download the originals from raw.githubusercontent.com (or a
mirror with the same paths) with pooch, checking every sha256 the MANIFESTs give; derive the
files our readers use; write a `SHA256SUMS` once the folder is complete.

- **Verified**: an original whose sha256 differs from the MANIFEST is never written. Where a
  MANIFEST gives only the sha256 of its folder's `SHA256SUMS` (GTSRB images, road-sign
  photos), those files are written as they arrive and the listing is checked once the
  folder is complete; on a mismatch the folder gets no `SHA256SUMS` and the next fetch
  downloads them again.
- **Atomic**: every file is written to a temp file in its folder and renamed into place.
- **Idempotent**: files already present with the right hash are neither downloaded nor
  rewritten.
- **Partial sources**: a file the source does not serve (HTTP 404) is reported as missing;
  the rest of its folder is still fetched and derived where its inputs allow.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import os
import sys
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ctxrobot.data.catalogue import CATALOGUE, UnknownDataset, select
from ctxrobot.data.download import FetchError, disk_error, download, pooch_session
from ctxrobot.data.spec import RAW_GITHUB, Dataset, Derivation, Download, Output
from ctxtask.datasets import data_dir

DEFAULT_TIMEOUT_S = 60.0
# The largest original is 4 MB (intel.orig.bag); the cap only stops a wrong URL or a
# misconfigured mirror from filling the disk.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# GTSRB and the road-sign subset are ~400 small files; a few connections in parallel hide
# the round-trip time without hammering the server.
_WORKERS = 8
SUMS_NAME = "SHA256SUMS"

# missing: the source does not serve it (HTTP 404); failed: wrong or broken, fix and re-run;
# blocked: not made because an input or a sibling is missing or failed.
Action = Literal["downloaded", "present", "derived", "unchanged", "missing", "failed", "blocked"]


@dataclass(frozen=True)
class FileResult:
    """What happened to one file; `path` is relative to the data root."""

    folder: str  # the catalogue folder the file belongs to
    path: str
    action: Action
    detail: str = ""


@dataclass
class FetchReport:
    dest: Path
    results: list[FileResult] = field(default_factory=list)

    def having(self, *actions: Action) -> list[FileResult]:
        return [r for r in self.results if r.action in actions]

    @property
    def errors(self) -> list[FileResult]:
        """Files that are wrong or broken (not merely absent at the source)."""
        return self.having("failed")

    @property
    def ok(self) -> bool:
        return not self.having("missing", "failed", "blocked")

    def count(self, action: Action) -> int:
        return len(self.having(action))

    def summary(self) -> str:
        return (
            f"{self.count('downloaded')} downloaded, {self.count('derived')} derived, "
            f"{self.count('present') + self.count('unchanged')} already up to date, "
            f"{self.count('missing')} missing at the source, {self.count('failed')} failed, "
            f"{self.count('blocked')} not made for want of those"
        )


def sha256_file(path: Path) -> str | None:
    """The file's sha256, or None when there is no such file."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def write_atomic(target: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `target`, then rename it into place."""
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise disk_error(target, exc) from exc


def base_url(mirror: str | None) -> str:
    """The URL prefix replacing https://raw.githubusercontent.com (same path layout)."""
    if mirror is None:
        return RAW_GITHUB
    if not mirror.startswith(("http://", "https://")):
        raise FetchError(f"mirror {mirror!r} must be an http:// or https:// URL")
    return mirror.rstrip("/")


@dataclass(frozen=True)
class _Settings:
    """One fetch run's settings (shared by the worker threads, hence immutable)."""

    base: str
    timeout: float
    max_bytes: int
    progressbar: bool


def _trusted_sums(folder: Path, ds: Dataset) -> dict[str, str]:
    """Hashes from an existing SHA256SUMS whose own sha256 matches the MANIFEST.

    This is what lets a second fetch skip files the MANIFEST has no per-file hash for.
    """
    sums = folder / SUMS_NAME
    if ds.listing_sha256 is None or sha256_file(sums) != ds.listing_sha256:
        return {}
    trusted: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        sha, _sep, name = line.partition("  ")
        trusted[name.removeprefix("./")] = sha
    return trusted


def _output_ok(path: Path, out: Output) -> bool:
    """Whether `path` holds the output the MANIFEST promises (for .gz: its text suffices)."""
    actual = sha256_file(path)
    if actual is None or out.sha256 is None:
        return False
    if actual == out.sha256:
        return True
    return out.text_sha256 is not None and _gunzipped_sha256(path.read_bytes()) == out.text_sha256


def _gunzipped_sha256(data: bytes) -> str | None:
    try:
        return hashlib.sha256(gzip.decompress(data)).hexdigest()
    except (OSError, EOFError, zlib.error):
        return None


class _DatasetRun:
    """Fetch, derive and list one dataset folder."""

    def __init__(
        self,
        ds: Dataset,
        root: Path,
        settings: _Settings,
        pool: concurrent.futures.Executor,
        record: Callable[[FileResult], None],
    ) -> None:
        self.ds, self.settings, self.pool, self._report = ds, settings, pool, record
        self.folder = root / ds.folder
        self.trusted = _trusted_sums(self.folder, ds)
        self.not_ok: dict[str, Action] = {}  # file name → missing / failed / blocked
        self.listed: list[str] = []

    def record(self, name: str, action: Action, detail: str = "") -> None:
        if action in ("missing", "failed", "blocked"):
            self.not_ok[name] = action
        folder = self.ds.folder
        self._report(FileResult(folder, f"{folder}/{name}", action, detail))

    def download_all(self, downloads: Iterable[Download], into: Path) -> None:
        s = self.settings
        futures = {
            self.pool.submit(
                download,
                d,
                into,
                d.sha256 or (self.trusted.get(d.name) if d.keep else None),
                base=s.base,
                timeout=s.timeout,
                max_bytes=s.max_bytes,
                progressbar=s.progressbar,
            ): d
            for d in downloads
        }
        try:
            for future in concurrent.futures.as_completed(futures):
                result = future.result()
                self.record(futures[future].name, result.action, result.detail)
        finally:
            for future in futures:
                future.cancel()

    def _block(self, names: Iterable[str], inputs: Iterable[str]) -> bool:
        """Record `names` as blocked when one of `inputs` is not in place; True if so."""
        bad = [f"{n} is {self.not_ok[n]}" for n in inputs if n in self.not_ok]
        for name in names if bad else ():
            self.record(name, "blocked", f"not made: {', '.join(bad)}")
        return bool(bad)

    def derive(self, der: Derivation, work: Path) -> None:
        names = [o.name for o in der.outputs]
        # Outputs with inputs are skipped on their hashes alone, so their inputs (e.g. the
        # not-kept goforward.raw) need not be fetched again; constant outputs are cheap to
        # remake and compare.
        if der.inputs and all(_output_ok(self.folder / o.name, o) for o in der.outputs):
            for name in names:
                self.record(name, "present")
            return
        if self._block(names, der.inputs):
            return
        by_name = {d.name: d for d in self.ds.downloads}
        # Inputs that are not kept (goforward.raw) are only downloaded when needed.
        self.download_all([by_name[n] for n in der.inputs if not by_name[n].keep], work)
        if self._block(names, der.inputs):
            return
        paths = {n: (self.folder if by_name[n].keep else work) / n for n in der.inputs}
        try:
            made = der.make(paths)
        except (ImportError, ValueError) as exc:
            for name in names:
                self.record(name, "failed", str(exc))
            return
        for out in der.outputs:
            self._write_output(out, made[out.name])

    def _write_output(self, out: Output, data: bytes) -> None:
        actual = hashlib.sha256(data).hexdigest()
        same_text = out.text_sha256 is not None and _gunzipped_sha256(data) == out.text_sha256
        if out.sha256 is not None and actual != out.sha256 and not same_text:
            detail = (
                f"derived sha256 mismatch: expected {out.sha256}, got {actual}; not written "
                "(an original differs from the MANIFEST's, or a library changed its output)"
            )
            self.record(out.name, "failed", detail)
            return
        self._put(out.name, data)

    def _put(self, name: str, data: bytes) -> None:
        target = self.folder / name
        if sha256_file(target) == hashlib.sha256(data).hexdigest():
            self.record(name, "unchanged")
            return
        write_atomic(target, data)
        self.record(name, "derived")

    def write_listing(self) -> None:
        """SHA256SUMS over the MANIFEST's files, once every one of them is in place."""
        # "*" stands for the files of an expansion that could not run.
        if self._block([SUMS_NAME], [*self.listed, "*"]):
            return
        prefix = "./" if self.ds.dot_paths else ""
        hashes = {f"{prefix}{n}": sha256_file(self.folder / n) for n in self.listed}
        data = "".join(f"{hashes[p]}  {p}\n" for p in sorted(hashes)).encode()
        actual = hashlib.sha256(data).hexdigest()
        expected = self.ds.listing_sha256
        if expected is not None and actual != expected:
            detail = (
                f"listing sha256 mismatch: expected {expected}, got {actual}; one of the files "
                "the MANIFEST gives no per-file hash for differs from the original; not "
                "written (the next fetch downloads them again)"
            )
            self.record(SUMS_NAME, "failed", detail)
            return
        self._put(SUMS_NAME, data)

    def run(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(self.folder, exc) from exc
        kept = [d for d in self.ds.downloads if d.keep]
        self.download_all(kept, self.folder)
        self.listed = [d.name for d in kept]
        # The expansion reads the folder's downloads (GTSRB: GT-final_test.csv).
        if self.ds.expand is not None and not self._block(["*"], [d.name for d in kept]):
            try:
                more = self.ds.expand(self.folder)
            except ValueError as exc:  # a list that downloaded fine but makes no sense
                self.record("*", "failed", str(exc))
                more = ()
            self.download_all(more, self.folder)
            self.listed += [d.name for d in more]
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=self.folder) as work:
            for der in self.ds.derivations:
                self.derive(der, Path(work))
                self.listed += [o.name for o in der.outputs if o.listed]
        self.write_listing()


def fetch(
    dest: Path,
    *,
    datasets: list[str] | None = None,
    mirror: str | None = None,
    progress: Callable[[FileResult], None] | None = None,
    progressbar: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    catalogue: Iterable[Dataset] = CATALOGUE,
) -> FetchReport:
    """Download, verify and derive `datasets` (groups or folders; None = all) under `dest`.

    Per-file problems (HTTP errors, hash mismatches) are collected in the report and the
    other files still proceed; a missing network or a disk error raises `FetchError`.
    `mirror` replaces the https://raw.githubusercontent.com prefix of every URL;
    `progressbar` shows a download bar on stderr for each large file.
    """
    settings = _Settings(base_url(mirror), timeout, max_bytes, progressbar)
    try:
        chosen = select(datasets, catalogue)
    except UnknownDataset as exc:
        raise FetchError(str(exc)) from exc
    report = FetchReport(dest=Path(dest))

    def record(result: FileResult) -> None:
        report.results.append(result)
        if progress is not None:
            progress(result)

    with pooch_session(), concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        for ds in chosen:
            _DatasetRun(ds, Path(dest), settings, pool, record).run()
    return report


# -- command line -----------------------------------------------------------------------------
def _missing_lines(report: FetchReport) -> list[str]:
    """One line per folder for the files its source does not serve."""
    by_folder: dict[str, list[FileResult]] = defaultdict(list)
    for result in report.having("missing"):
        by_folder[result.folder].append(result)
    return [
        f"{folder}: {len(results)} file(s) not served by the source ({results[0].detail}, …); "
        "the folder stays partial"
        for folder, results in by_folder.items()
    ]


def cmd_data_fetch(args: argparse.Namespace) -> int:
    """`ctxrobot data fetch`: 0 complete, 1 partial (the source lacks files), 2 bad input."""
    dest = Path(args.dest) if args.dest else data_dir()
    only = [s for s in args.only.split(",") if s.strip()] if args.only else None

    bars = _bars_wanted()

    def show(result: FileResult) -> None:
        if result.action in ("downloaded", "derived"):
            line = f"{result.action:>10}  {result.path}"
            if bars:  # above the bars, not through them
                from tqdm import tqdm

                tqdm.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    try:
        report = fetch(dest, datasets=only, mirror=args.mirror, progress=show, progressbar=bars)
    except FetchError as exc:
        print(f"ctxrobot data fetch: {exc}", file=sys.stderr)
        return 2
    print(f"{dest}: {report.summary()}")
    problems = [f"{r.path}: {r.detail}" for r in report.errors] + _missing_lines(report)
    for line in problems:
        print(f"ctxrobot data fetch: {line}", file=sys.stderr)
    if report.errors:
        return 2
    return 0 if report.ok else 1


def _bars_wanted() -> bool:
    """Download bars need tqdm (pooch's choice) and a terminal to draw on."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return sys.stderr.isatty()


_EPILOG = """\
datasets (--only takes group names or folders, comma-separated):
  slam    slam/intel, slam/aces, slam/fr-clinic, slam/mit-killian (ROS bags ->
          *_laser.txt.gz, *_odom.txt, laser.yaml),
          slam/breezyslam-mines
  signs   signs/gtsrb-test-subset, signs/road-sign-detection-subset,
          signs/cascades, signs/classifier-tflite
  speech  speech (11 clips + transcripts.tsv)

Every original comes from a pinned commit on raw.githubusercontent.com and is
checked against the sha256 in its folder's MANIFEST.md; files already present
with the right hash are skipped, so re-running is cheap. Without internet, copy
a shared data folder instead and set CTXROBOT_DATA to it.

exit status:
  0  every file is in place
  1  the source does not serve some files (HTTP 404); the rest is in place
  2  bad input: an unknown dataset, an unwritable --dest, an unreachable
     mirror, or a file that arrived wrong (sha256 mismatch); one line each
     says which and what to do

The Vosk speech model is not fetched (about 40 MB): download
vosk-model-small-en-us-0.15 from https://alphacephei.com/vosk/models and unpack
it to <dest>/speech/model/vosk-model-small-en-us-0.15/.
"""


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data fetch` to the ctxrobot command line; returns the `data` parser."""
    data = subparsers.add_parser(
        "data",
        help="download and verify the public datasets ctxrobot replays",
        description="Manage the data folder ctxrobot replays and evaluates on.",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "fetch",
        help="download the public originals, verify them and derive the reader files",
        description=(
            "Download the public originals of the datasets, verify their sha256, derive the\n"
            "files ctxrobot's readers use and write SHA256SUMS per folder: the same layout as\n"
            "the shared data folder."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dest",
        metavar="DIR",
        help="data root to fill (default: where ctxrobot reads data: $CTXROBOT_DATA, else "
        "../shared/data beside the repository)",
    )
    p.add_argument(
        "--only",
        metavar="LIST",
        help="comma-separated groups or folders, e.g. slam,signs or speech,slam/intel "
        "(default: all)",
    )
    p.add_argument(
        "--mirror",
        metavar="URL",
        help=f"use URL instead of {RAW_GITHUB} (same /OWNER/REPO/COMMIT/PATH layout)",
    )
    p.set_defaults(func=cmd_data_fetch)
    return data
