"""`ctxrobot data fetch` against a local mirror of raw.githubusercontent.com.

The mirror is an `http.server` on 127.0.0.1 serving the shared data files under the URL
paths the real sources use (`/OWNER/REPO/COMMIT/PATH`). The shared folder keeps part of
the data back, so those URLs answer 404 here; the tests check that exactly those fail and
that everything else comes out byte-identical to the shared folder.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.server
import io
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from ctxrobot.data import fetch as df
from tests.conftest import require_data

GTSRB = "signs/gtsrb-test-subset"
ROAD = "signs/road-sign-detection-subset"


# The slam derivation reads ROS bags with `rosbags`; without it the full fetch still
# covers signs and speech.
def _have_rosbags() -> bool:
    try:
        import rosbags  # noqa: F401
    except ImportError:
        return False
    return True


FETCHED = list(df.GROUPS) if _have_rosbags() else ["signs", "speech"]
# Folders whose every original is in the shared folder, so a fetch completes them.
COMPLETE = [
    f for f in ("slam", "signs/cascades", "signs/classifier-tflite", "speech") if f in FETCHED
]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Mirror:
    """A served directory tree; `requests` records every path asked for."""

    root: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)

    def place(self, download: df.Download, data_or_file: bytes | Path) -> Path:
        src = download.source
        target = self.root / src.repo / src.commit / src.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data_or_file, Path):
            target.symlink_to(data_or_file)
        else:
            target.write_bytes(data_or_file)
        return target


@pytest.fixture(scope="module")
def shared() -> Path:
    return require_data()


def _catalogue_downloads(shared: Path) -> Iterator[tuple[df.Dataset, df.Download]]:
    for ds in df.CATALOGUE:
        for d in ds.downloads:
            yield ds, d
        if ds.expand is not None:
            for d in ds.expand(shared / ds.folder):
                yield ds, d


def _build_mirror(root: Path, shared: Path) -> tuple[Mirror, set[str]]:
    """Mirror every original the shared folder holds; return the kept-back ones too."""
    mirror = Mirror(root)
    kept_back: set[str] = set()
    for ds, d in _catalogue_downloads(shared):
        local = shared / ds.folder / d.name
        if d.name == "goforward.raw":
            # The shared WAV is the raw samples behind a 44-byte header (speech MANIFEST).
            mirror.place(d, (shared / ds.folder / "audio/ps_goforward.wav").read_bytes()[44:])
        elif local.is_file():
            mirror.place(d, local)
        else:
            kept_back.add(f"{ds.folder}/{d.name}")
    return mirror, kept_back


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that stops reading (the size-limit test) is expected, not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def serve() -> Iterator[Callable[[Mirror], Mirror]]:
    """Start mirrors on ephemeral 127.0.0.1 ports; all are shut down after the module."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(mirror: Mirror) -> Mirror:
        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(mirror.root), **kwargs)

            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:  # keep pytest output readable
                pass

        server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
        return mirror

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def full_mirror(
    shared: Path, serve, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Mirror, set[str]]:
    mirror, kept_back = _build_mirror(tmp_path_factory.mktemp("mirror"), shared)
    return serve(mirror), kept_back


@pytest.fixture(scope="module")
def fetched(
    full_mirror: tuple[Mirror, set[str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, df.FetchReport]:
    """One fetch of every dataset in FETCHED (the slam derivation takes ~15 s)."""
    mirror, _ = full_mirror
    dest = tmp_path_factory.mktemp("data")
    return dest, df.fetch(dest, datasets=FETCHED, mirror=mirror.url)


def _leftovers(dest: Path) -> list[Path]:
    return [p for p in dest.rglob("*") if p.name.endswith(".part") or p.name.startswith(".")]


# -- (1) bag → text, on the real bags -------------------------------------------------------
@pytest.mark.parametrize("name", ["intel", "aces"])
def test_bag_to_text_reproduces_shared_logs(name: str) -> None:
    pytest.importorskip("rosbags", reason="reading the bags needs `pip install rosbags`")
    folder = require_data(f"slam/{name}")
    logs = df.bag_to_text(folder / f"{name}.orig.bag", name)

    ours = np.loadtxt(io.BytesIO(logs.laser_text))
    theirs = np.loadtxt(folder / f"{name}_laser.txt.gz")
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) < 1e-6
    with gzip.open(folder / f"{name}_laser.txt.gz") as shared_laser:
        assert logs.laser_text.splitlines()[:2] == shared_laser.read().splitlines()[:2]

    ours = np.loadtxt(io.BytesIO(logs.odom_text))
    theirs = np.loadtxt(folder / f"{name}_odom.txt")
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) < 1e-6
    assert np.array_equal(
        np.asarray(logs.stamps), np.loadtxt(folder / f"{name}_laser.txt.gz")[:, 0]
    )


def test_intel_reference_poses_match_shared() -> None:
    pytest.importorskip("rosbags", reason="reading the bags needs `pip install rosbags`")
    folder = require_data("slam/intel")
    logs = df.bag_to_text(folder / "intel.orig.bag", "intel")
    made = df.gfs_reference_poses((folder / "intel-corrected.log.gz").read_bytes(), logs.stamps)
    assert made == (folder / "intel_gfs_reference_poses.txt").read_bytes()


def test_constant_files_match_shared(shared: Path) -> None:
    assert df.signnames_csv() == (shared / GTSRB / "signnames.csv").read_bytes()
    assert df.tflite_labels_csv() == (shared / "signs/classifier-tflite/labels.csv").read_bytes()
    assert df.transcripts_tsv() == (shared / "speech/transcripts.tsv").read_bytes()


def test_gtsrb_subset_is_what_the_manifest_describes(shared: Path) -> None:
    header, rows = df.gtsrb_subset_rows((shared / GTSRB / "GT-final_test.csv").read_bytes())
    classes = [int(r.rstrip(b"\r\n").rsplit(b";", 1)[1]) for r in rows]
    assert len(rows) == 324
    assert classes.count(14) == 30
    assert all(classes.count(c) == 7 for c in range(43) if c != 14)
    # The shared GT-subset.csv holds the rows of the images it kept, unchanged.
    kept = (shared / GTSRB / "GT-subset.csv").read_bytes().splitlines(keepends=True)
    assert kept[0] == header
    assert set(kept[1:]) <= set(rows)


# -- (2) a full fetch from the mirror --------------------------------------------------------
def test_full_fetch_reproduces_shared_folder(
    fetched: tuple[Path, df.FetchReport], full_mirror: tuple[Mirror, set[str]], shared: Path
) -> None:
    dest, report = fetched
    _, kept_back = full_mirror
    partial = {p.split("/")[0] + "/" + p.split("/")[1] for p in kept_back}
    assert partial <= {GTSRB, ROAD}

    # Exactly the kept-back originals fail (404), and so the listings of their folders.
    failed = {r.path: r.detail for r in report.errors}
    assert set(failed) == kept_back | {f"{folder}/SHA256SUMS" for folder in partial}
    assert all("HTTP 404" in failed[p] for p in kept_back)

    # Every shared data file comes out byte-identical, except in a partial folder its
    # listing and GT-subset.csv, which the shared folder cut down to the images it kept
    # (ours is checked against the MANIFEST's hash instead).
    compared = 0
    for path in shared.rglob("*"):
        rel = path.relative_to(shared).as_posix()
        cut_down = rel.startswith(tuple(partial)) and path.name in ("SHA256SUMS", "GT-subset.csv")
        fetched_here = rel.startswith(tuple(f"{g}/" for g in FETCHED))
        if not path.is_file() or path.name in ("MANIFEST.md",) or cut_down or not fetched_here:
            continue
        assert sha(dest / rel) == sha(path), rel
        compared += 1
    assert compared > 300
    assert (
        sha(dest / GTSRB / "GT-subset.csv")
        == "2ede4974d03a2dfe6199a60db1c89068b8a7c2b03309f191dd6d08a53b66a61b"
    )

    # speech has no SHA256SUMS in the shared folder; ours must verify what it lists.
    sums = (dest / "speech/SHA256SUMS").read_text().splitlines()
    assert len(sums) == 12
    for line in sums:
        digest, name = line.split("  ", 1)
        assert sha(dest / "speech" / name) == digest, name
    assert not (dest / "speech/goforward.raw").exists()
    assert _leftovers(dest) == []


def test_full_fetch_lines_match_shared_listings_of_partial_folders(
    fetched: tuple[Path, df.FetchReport], shared: Path
) -> None:
    """The partial folders get no SHA256SUMS, but every file the shared one lists matches."""
    dest, report = fetched
    partial = {r.path.removesuffix("/SHA256SUMS") for r in report.errors if r.path.endswith("SUMS")}
    for folder in partial:
        assert not (dest / folder / "SHA256SUMS").exists()
        for line in (shared / folder / "SHA256SUMS").read_text().splitlines():
            digest, name = line.split("  ", 1)
            if name != "./GT-subset.csv":
                assert sha(dest / folder / name) == digest, name


# -- (3) corruption: a clear error, nothing half-written ------------------------------------
def test_corrupted_download_is_rejected_and_not_written(
    shared: Path, serve, tmp_path: Path
) -> None:
    require_data("signs/cascades")
    mirror = Mirror(tmp_path / "mirror")
    (xml,) = df.CASCADES.downloads
    good = (shared / "signs/cascades" / xml.name).read_bytes()
    bad = good[:1000] + b"X" + good[1001:]
    mirror.place(xml, bad)
    serve(mirror)

    dest = tmp_path / "data"
    report = df.fetch(dest, datasets=["signs/cascades"], mirror=mirror.url)
    (err, sums_err) = report.errors
    assert err.path == "signs/cascades/stopsign_classifier.xml"
    assert "sha256 mismatch" in err.detail
    assert xml.sha256 in err.detail
    assert hashlib.sha256(bad).hexdigest() in err.detail
    assert sums_err.path == "signs/cascades/SHA256SUMS"
    assert sorted(p.name for p in (dest / "signs/cascades").iterdir()) == []


def test_corrupted_input_blocks_its_derivation(shared: Path, serve, tmp_path: Path) -> None:
    require_data("speech")
    mirror = Mirror(tmp_path / "mirror")
    raw = next(d for d in df.SPEECH.downloads if d.name == "goforward.raw")
    samples = (shared / "speech/audio/ps_goforward.wav").read_bytes()[44:]
    mirror.place(raw, samples[:-2])  # truncated in transit
    for d in df.SPEECH.downloads:
        if d.keep:
            mirror.place(d, shared / "speech" / d.name)
    serve(mirror)

    dest = tmp_path / "data"
    report = df.fetch(dest, datasets=["speech"], mirror=mirror.url)
    failed = {r.path: r.detail for r in report.errors}
    assert "sha256 mismatch" in failed["speech/goforward.raw"]
    assert "goforward.raw" in failed["speech/audio/ps_goforward.wav"]
    assert not (dest / "speech/audio/ps_goforward.wav").exists()
    assert not (dest / "speech/SHA256SUMS").exists()
    assert _leftovers(dest) == []


def test_size_limit_stops_a_download(shared: Path, serve, tmp_path: Path) -> None:
    require_data("signs/cascades")
    mirror = Mirror(tmp_path / "mirror")
    (xml,) = df.CASCADES.downloads
    mirror.place(xml, shared / "signs/cascades" / xml.name)
    serve(mirror)
    report = df.fetch(
        tmp_path / "d", datasets=["signs/cascades"], mirror=mirror.url, max_bytes=1000
    )
    assert "limit" in report.errors[0].detail
    assert not (tmp_path / "d/signs/cascades" / xml.name).exists()


def test_disk_error_is_a_clear_fetch_error(shared: Path, serve, tmp_path: Path) -> None:
    require_data("signs/cascades")
    mirror = Mirror(tmp_path / "mirror")
    (xml,) = df.CASCADES.downloads
    mirror.place(xml, shared / "signs/cascades" / xml.name)
    serve(mirror)
    dest = tmp_path / "data"
    (dest / "signs").mkdir(parents=True)
    (dest / "signs/cascades").write_text("a file where the folder should be")
    with pytest.raises(df.FetchError, match=r"cannot write .*signs/cascades"):
        df.fetch(dest, datasets=["signs/cascades"], mirror=mirror.url)


def test_no_network_names_url_and_remedies(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(df.FetchError) as info:
        df.fetch(tmp_path, datasets=["signs/cascades"], mirror=f"http://127.0.0.1:{port}")
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/markgaynor/stopsigns/" in message
    assert "--mirror" in message and "CTXROBOT_DATA" in message


# -- (4) a second fetch is a no-op ------------------------------------------------------------
def test_second_fetch_is_a_no_op(
    fetched: tuple[Path, df.FetchReport], full_mirror: tuple[Mirror, set[str]]
) -> None:
    dest, _ = fetched
    mirror, _ = full_mirror
    folders = [d.folder for d in df.select(COMPLETE)]
    before = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns)
        for f in folders
        for p in (dest / f).rglob("*")
        if p.is_file()
    }
    mirror.requests.clear()
    report = df.fetch(dest, datasets=COMPLETE, mirror=mirror.url)
    assert report.ok, report.errors
    assert report.count("downloaded") == report.count("derived") == 0
    assert mirror.requests == []
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before}
    assert after == before
    assert _leftovers(dest) == []


def test_listing_hash_verifies_and_then_trusts_files_without_own_hash(
    shared: Path, serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Road-sign files have no per-file hash: the listing hash vouches for them."""
    require_data(ROAD)
    mirror = Mirror(tmp_path / "mirror")
    picked = [d for d in df.ROAD_SIGN_SUBSET.downloads if (shared / ROAD / d.name).is_file()][:4]
    for d in picked:
        mirror.place(d, shared / ROAD / d.name)
    serve(mirror)
    listing = "".join(
        f"{sha(shared / ROAD / p[2:])}  {p}\n" for p in sorted(f"./{d.name}" for d in picked)
    ).encode()

    def run(listing_sha: str, dest: Path) -> df.FetchReport:
        mini = df.Dataset(
            folder=ROAD, downloads=tuple(picked), listing_sha256=listing_sha, dot_paths=True
        )
        monkeypatch.setattr(df, "CATALOGUE", (mini,))
        return df.fetch(dest, datasets=[ROAD], mirror=mirror.url)

    wrong = run("0" * 64, tmp_path / "wrong")
    (err,) = wrong.errors
    assert err.path == f"{ROAD}/SHA256SUMS" and "listing sha256 mismatch" in err.detail
    assert not (tmp_path / "wrong" / ROAD / "SHA256SUMS").exists()

    dest = tmp_path / "right"
    first = run(hashlib.sha256(listing).hexdigest(), dest)
    assert first.ok and first.count("downloaded") == len(picked)
    assert (dest / ROAD / "SHA256SUMS").read_bytes() == listing
    mirror.requests.clear()
    second = run(hashlib.sha256(listing).hexdigest(), dest)
    assert second.ok and second.count("present") == len(picked)
    assert mirror.requests == []


# -- command line ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxrobot")
    df.add_data_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_fetch_and_bad_input(
    shared: Path, serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_data("signs/classifier-tflite")
    mirror = Mirror(tmp_path / "mirror")
    for d in df.CLASSIFIER_TFLITE.downloads:
        mirror.place(d, shared / "signs/classifier-tflite" / d.name)
    serve(mirror)
    dest = tmp_path / "data"
    argv = ["data", "fetch", "--dest", str(dest), "--only", "signs/classifier-tflite"]
    args = _parser().parse_args([*argv, "--mirror", mirror.url])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "downloaded  signs/classifier-tflite/traffic_sign_model.tflite" in out
    assert "0 failed" in out
    assert (dest / "signs/classifier-tflite/SHA256SUMS").read_bytes() == (
        shared / "signs/classifier-tflite/SHA256SUMS"
    ).read_bytes()

    args = _parser().parse_args(["data", "fetch", "--dest", str(dest), "--only", "maps"])
    assert args.func(args) == 2
    assert "unknown dataset 'maps'" in capsys.readouterr().err
    args = _parser().parse_args([*argv, "--mirror", "ftp://example"])
    assert args.func(args) == 2


def test_cli_help_names_the_vosk_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "fetch", "--help"])
    text = capsys.readouterr().out
    assert "alphacephei.com/vosk/models" in text and "vosk-model-small-en-us-0.15" in text
    assert "--mirror URL" in text and "--only LIST" in text
