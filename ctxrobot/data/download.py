"""Downloading originals with pooch: sha256-checked, written atomically, retried once.

pooch does the download, the hash check, the temp-file-and-rename and the retry. What it
lacks is added here: a size cap (a wrong URL must not fill the disk), no retry when the
server answers with a client error (a 404 stays a 404), and errors that name the file, the
URL and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from ctxrobot.data.spec import Download

# pooch (and requests under it) are the `data` extra: imported when a fetch starts, so that
# the rest of the `ctxrobot` command line works without them.
if TYPE_CHECKING:
    import pooch
    import requests

# One retry covers a dropped connection or a transfer corrupted on the way; a second copy
# that is still wrong is a wrong mirror.
RETRIES = 1
CHUNK_BYTES = 1 << 16
BAR_MIN_BYTES = 1 << 20  # the ROS bags and BreezySLAM logs; seconds each on a slow link
USER_AGENT = "ctxrobot-data-fetch"


class FetchError(Exception):
    """A problem that stops the whole fetch: no network, a disk error, or bad arguments."""


class _Refused(Exception):
    """The server answered, but not with the file; trying again would not help."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing  # the server says it has no such file (HTTP 404/410)


def disk_error(path: Path, exc: OSError) -> FetchError:
    hint = " (disk full?)" if exc.errno == 28 else ""
    return FetchError(f"cannot write {path}: {exc.strerror or exc}{hint}; choose a writable --dest")


class _CappedSink:
    """The file pooch's downloader writes into: stops at `max_bytes` and hashes what arrives,
    so that a mismatch can name the hash of the bytes that came."""

    def __init__(self, out: BinaryIO, url: str, max_bytes: int) -> None:
        self.out, self.url, self.max_bytes = out, url, max_bytes
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise _Refused(f"{self.url} is over the {self.max_bytes}-byte limit")
        self.digest.update(chunk)
        self.out.write(chunk)

    def flush(self) -> None:
        self.out.flush()


class _LargeFileBar:
    """pooch's progress-bar hook: a tqdm bar on stderr for files of `BAR_MIN_BYTES` or more.
    The small files, most of them and fetched several at a time, would only flicker."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    @property
    def total(self) -> int:
        return 0 if self.bar is None else int(self.bar.total)

    @total.setter
    def total(self, size: int) -> None:  # pooch sets it once it knows the Content-Length
        if size >= BAR_MIN_BYTES:
            from tqdm import tqdm

            self.bar = tqdm(total=size, desc=self.label, unit="B", unit_scale=True, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def reset(self) -> None:
        if self.bar is not None:
            self.bar.reset(total=self.bar.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Downloader:
    """A pooch downloader: pooch's HTTPDownloader writing through a `_CappedSink`."""

    def __init__(self, *, timeout: float, max_bytes: int, progressbar: bool) -> None:
        self.timeout, self.max_bytes, self.progressbar = timeout, max_bytes, progressbar
        self.received_sha256 = ""

    def __call__(self, url: str, output_file: str, pup: pooch.Pooch | None) -> None:
        import pooch
        import requests

        bar = _LargeFileBar(url.rsplit("/", 1)[-1]) if self.progressbar else False
        http = pooch.HTTPDownloader(
            progressbar=bar,
            chunk_size=CHUNK_BYTES,
            timeout=self.timeout,
            headers={"User-Agent": USER_AGENT},
        )
        with open(output_file, "wb") as out:
            sink = _CappedSink(out, url, self.max_bytes)
            try:
                http(url, sink, pup)
            except requests.HTTPError as exc:
                response = exc.response
                if response is not None and response.status_code < 500:
                    raise _Refused(
                        f"HTTP {response.status_code} {response.reason} from {url}",
                        missing=response.status_code in (404, 410),
                    ) from exc
                raise
            finally:
                self.received_sha256 = sink.digest.hexdigest()
                if bar:
                    bar.close()


@contextlib.contextmanager
def pooch_session() -> Iterator[None]:
    """Load pooch, and keep it quiet: it logs every download at INFO on stderr, where we print
    our own one line per file."""
    try:
        import pooch
    except ImportError as exc:
        raise FetchError(f"downloading needs pooch ({exc}): pip install 'ctxrobot[data]'") from exc
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class Downloaded:
    """What happened to one original."""

    action: Literal["downloaded", "present", "missing", "failed"]
    detail: str = ""


def _record_action(actions: list[str]) -> Callable[[str, str, pooch.Pooch | None], str]:
    """A pooch processor that notes whether pooch downloaded the file or found it in place."""

    def record(path: str, action: str, _pup: pooch.Pooch | None) -> str:
        actions.append(action)
        return path

    return record


def _why_unreachable(exc: requests.RequestException) -> str:
    """The socket- or protocol-level reason under requests' and urllib3's wrappers."""
    import requests

    if isinstance(exc, requests.Timeout):
        return "no answer within the timeout"
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        cause = todo.pop(0)
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, http.client.HTTPException):
            return f"the server does not answer HTTP ({type(cause).__name__})"
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause.strerror or str(cause)
        linked = (getattr(cause, "reason", None), cause.__cause__, cause.__context__, *cause.args)
        todo += [e for e in linked if isinstance(e, BaseException)]
    return str(exc)


def _unreachable(url: str, exc: requests.RequestException) -> FetchError:
    return FetchError(
        f"cannot download {url}: {_why_unreachable(exc)}. No network, or a wrong --mirror? "
        "Point --mirror at a mirror of raw.githubusercontent.com, or copy the shared data "
        "folder here and set CTXROBOT_DATA to it"
    )


def download(
    d: Download,
    folder: Path,
    expected: str | None,
    *,
    base: str,
    timeout: float,
    max_bytes: int,
    progressbar: bool,
) -> Downloaded:
    """Make `folder/d.name` the original `d`; per-file problems become a failed result.

    A file already there with the `expected` sha256 is kept. Without an expected hash the
    file cannot be vouched for, so it is downloaded again. Call within `pooch_session()`.
    """
    import pooch
    import requests

    url = d.source.url(base)
    target = folder / d.name
    # The registry is this one file: pooch then keeps, fetches or replaces it by its hash.
    pup = pooch.create(
        path=folder,
        base_url=f"{base}/",
        registry={d.name: expected},
        urls={d.name: url},
        retry_if_failed=RETRIES,
    )
    downloader = _Downloader(timeout=timeout, max_bytes=max_bytes, progressbar=progressbar)
    actions: list[str] = []
    try:
        if expected is None:
            target.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)  # pooch's own makedirs races
        pup.fetch(d.name, downloader=downloader, processor=_record_action(actions))
    except _Refused as exc:
        return Downloaded("missing" if exc.missing else "failed", str(exc))
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _unreachable(url, exc) from exc
    except requests.RequestException as exc:  # a 5xx after the retry, a broken transfer
        return Downloaded("failed", f"download from {url} failed: {exc}; run again")
    except ValueError:  # pooch's hash mismatch, after the retry
        return Downloaded(
            "failed",
            f"sha256 mismatch for {url}: expected {expected}, got "
            f"{downloader.received_sha256}; not written. Run again; if it recurs, the server "
            "does not serve the pinned originals (is --mirror a copy of "
            "raw.githubusercontent.com?)",
        )
    except OSError as exc:
        raise disk_error(target, exc) from exc
    return Downloaded("present" if actions == ["fetch"] else "downloaded")
