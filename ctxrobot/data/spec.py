"""What a catalogue entry is: originals at pinned public URLs and the files derived from them.

Every file in the data folder either is a verbatim copy of a file in a public GitHub
repository (pinned to the commit its folder's MANIFEST.md names) or is derived from such
files by a fixed rule that MANIFEST.md describes.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

RAW_GITHUB = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Source:
    """One file in a public GitHub repository at a pinned commit."""

    repo: str  # owner/name
    commit: str  # 40-hex snapshot commit from the MANIFEST
    path: str  # path inside the repository

    def url(self, base: str = RAW_GITHUB) -> str:
        return f"{base}/{self.repo}/{self.commit}/{self.path}"


@dataclass(frozen=True)
class Download:
    """An original to download; `name` is its path inside the dataset folder."""

    name: str
    source: Source
    sha256: str | None  # None where the MANIFEST only gives the hash of the folder's listing
    keep: bool = True  # False: only an input of a derivation (goforward.raw), not kept


@dataclass(frozen=True)
class Output:
    """A derived file and the sha256 its MANIFEST gives (None: not in any MANIFEST)."""

    name: str
    sha256: str | None
    # For .gz outputs: the sha256 of the uncompressed text. Another zlib build (zlib-ng on
    # some distributions) may deflate differently; the content is still what we promise.
    text_sha256: str | None = None
    listed: bool = True  # False: ctxrobot's own reader config, not part of the MANIFEST


Inputs = Mapping[str, Path]
Make = Callable[[Inputs], dict[str, bytes]]  # inputs by Download name → outputs by name


@dataclass(frozen=True)
class Derivation:
    """Files made from downloaded inputs (or from constants when `inputs` is empty)."""

    inputs: tuple[str, ...]  # Download names
    outputs: tuple[Output, ...]
    make: Make


@dataclass(frozen=True)
class Dataset:
    """One folder of the data root and everything needed to rebuild it."""

    folder: str  # e.g. "slam/intel"
    downloads: tuple[Download, ...]
    derivations: tuple[Derivation, ...] = ()
    # Downloads chosen from the content of an earlier download (GTSRB images from the CSV).
    expand: Callable[[Path], tuple[Download, ...]] | None = None
    listing_sha256: str | None = None  # sha256 of the folder's SHA256SUMS, from the MANIFEST
    dot_paths: bool = False  # SHA256SUMS names files "./sub/x" (as `find . | sha256sum`)

    @property
    def group(self) -> str:
        return self.folder.split("/", 1)[0]


def constant(name: str, sha256: str | None, data: bytes, *, listed: bool = True) -> Derivation:
    """A derived file that needs no download (a reader config, a class-name table)."""
    return Derivation(
        inputs=(), outputs=(Output(name, sha256, listed=listed),), make=lambda _in: {name: data}
    )


def deterministic_gzip(name: str, data: bytes) -> bytes:
    """gzip as the shared files are written: level 9, mtime 0, stored name `name`."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()
