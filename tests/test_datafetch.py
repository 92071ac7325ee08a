"""`ctxrobot data fetch` against a local mirror of raw.githubusercontent.com.

The mirror is an `http.server` on 127.0.0.1 serving the shared data files under the URL
paths the real sources use (`/OWNER/REPO/COMMIT/PATH`). The shared folder keeps part of
the data back, so those URLs answer 404 here; the tests check that exactly those fail and
that everything else comes out byte-identical to the shared folder.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import math
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from ctxrobot.data import bags, catalogue, signs, slam, speech
from ctxrobot.data import fetch as df
from ctxrobot.data.download import FetchError
from ctxrobot.data.spec import Dataset, Download
from tests.conftest import ctxrobot, require_data

GTSRB = "signs/gtsrb-test-subset"
ROAD = "signs/road-sign-detection-subset"


FETCHED = list(catalogue.GROUPS)
# Folders whose every original is in the shared folder, so a fetch completes them.
COMPLETE = ["slam", "signs/cascades", "signs/classifier-tflite", "speech"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Mirror:
    """A served directory tree; `requests` records every path asked for."""

    root: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)

    def place(self, download: Download, data_or_file: bytes | Path) -> Path:
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


def _catalogue_downloads(shared: Path) -> Iterator[tuple[Dataset, Download]]:
    for ds in catalogue.CATALOGUE:
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
        # A short poll keeps the shutdown of each server at the end quick.
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
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
    """Temp files: ours (.NAME.part, .fetch-*) and pooch's (tmp*)."""
    return [p for p in dest.rglob("*") if p.name.startswith((".", "tmp")) or p.suffix == ".part"]


# -- (1) derivations: the parts the full fetch cannot pin down on its own ----------------------
# (The full fetch below compares every derived file with the shared one, byte for byte.)
def test_constant_files_match_shared(shared: Path) -> None:
    assert signs.signnames_csv() == (shared / GTSRB / "signnames.csv").read_bytes()
    labels = shared / "signs/classifier-tflite/labels.csv"
    assert signs.tflite_labels_csv() == labels.read_bytes()
    assert speech.transcripts_tsv() == (shared / "speech/transcripts.tsv").read_bytes()
    # laser.yaml is ctxrobot's own file (no MANIFEST hash), so the shared copy is the truth.
    for ds in slam.SLAM_DATASETS:
        for der in ds.derivations:
            if not der.inputs and (shared / ds.folder / "laser.yaml").is_file():
                made = der.make({})["laser.yaml"]
                assert made == (shared / ds.folder / "laser.yaml").read_bytes(), ds.folder


def test_killian_stamps_put_every_relation_scan_on_its_exact_stamp(shared: Path) -> None:
    folder = require_data("slam/mit-killian")
    relations = bags.relation_stamps((folder / "mit-killian.relations").read_text())
    assert len(relations) == 3838
    stamps = bags.rebuild_killian_stamps(relations, 17480)
    assert np.all(np.diff(stamps) > 0.42) and np.all(np.diff(stamps) < 0.46)
    # Relation scans sit at 20 + whole periods, and keep their stamp to the microsecond.
    hits = np.searchsorted(stamps, relations)
    assert hits[0] == bags.KILLIAN_FIRST_RELATION_SCAN and hits[-1] == 17475
    assert np.max(np.abs(stamps[hits] - relations)) < 1e-6


def test_killian_stamps_refuse_a_bag_the_relations_do_not_fit(shared: Path) -> None:
    folder = require_data("slam/mit-killian")
    relations = bags.relation_stamps((folder / "mit-killian.relations").read_text())
    # 20 + 17455 steps need 17476 scans: a shorter bag is not the MANIFEST's.
    with pytest.raises(ValueError, match=r"span scans 20\.\.17475 but the bag has 17470"):
        bags.rebuild_killian_stamps(relations, 17470)
    # Stamps a half period off are not whole periods apart.
    skewed = relations.copy()
    skewed[5:] += 0.22
    with pytest.raises(ValueError, match="not whole scan periods"):
        bags.rebuild_killian_stamps(skewed, 17480)


def test_finite_difference_odometry_on_a_known_path() -> None:
    """Ahead at 0.5 m/s, a 90° left turn in place across the ±π seam, a stop, then a curve."""
    start = 2.5
    turned = start + math.pi / 2 - 2 * math.pi  # 2·atan2 gives headings in (-2π, 2π]
    ahead = (0.25 * math.cos(start), 0.25 * math.sin(start))
    curve = turned + 0.1  # the mean heading of the last step
    end = (ahead[0] + 0.3 * math.cos(curve), ahead[1] + 0.3 * math.sin(curve))
    stamps = [0.0, 0.5, 1.0, 1.5, 2.0]
    rows = [  # the bag's tv/rv (9.0) are ignored
        (0.0, 0.0, start, 9.0, 9.0),
        (*ahead, start, 9.0, 9.0),
        (*ahead, turned, 9.0, 9.0),
        (*ahead, turned, 9.0, 9.0),
        (*end, turned + 0.2, 9.0, 9.0),
    ]
    out = bags.finite_difference_odometry(stamps, rows)
    assert [row[:3] for row in out] == [row[:3] for row in rows]
    speeds = [(tv, rv) for _x, _y, _theta, tv, rv in out]
    assert speeds[0] == (0.0, 0.0)
    assert speeds[1] == (pytest.approx(0.5), 0.0)
    assert speeds[2] == (0.0, pytest.approx(math.pi))  # +90° in 0.5 s, not -270°
    assert [f"{v:.6f}" for v in speeds[3]] == ["0.000000", "0.000000"]  # no "-0.000000"
    assert speeds[4] == (pytest.approx(0.6), pytest.approx(0.4))


def test_fr_clinic_refuses_a_long_scan_that_does_not_start_at_minus_90() -> None:
    long_scan = np.arange(181, dtype=np.float32)
    bag = bags.LaserBag(
        "x.bag", [1.0], [long_scan], [math.radians(-89.75)], [1.0], [(0, 0, 0, 0, 0)]
    )
    with pytest.raises(ValueError, match=r"starts at -89\.75 deg"):
        slam.fr_clinic_logs(bag)
    ok = bags.LaserBag("x.bag", [1.0], [long_scan], [-math.pi / 2], [1.0], [(0, 0, 0, 0, 0)])
    laser = gzip.decompress(slam.fr_clinic_logs(ok)["fr-clinic_laser.txt.gz"]).decode()
    assert "(last beam of the 1 181-beam scans dropped)" in laser
    assert laser.splitlines()[-1].split()[-1] == "179.00"


def test_gtsrb_subset_is_what_the_manifest_describes(shared: Path) -> None:
    header, rows = signs.gtsrb_subset_rows((shared / GTSRB / "GT-final_test.csv").read_bytes())
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
    # Every folder of the shared data has a catalogue entry.
    described = {p.parent.relative_to(shared).as_posix() for p in shared.rglob("MANIFEST.md")}
    assert described - {d.folder for d in catalogue.CATALOGUE} == set()
    partial = {p.split("/")[0] + "/" + p.split("/")[1] for p in kept_back}
    assert partial <= {GTSRB, ROAD}

    # Exactly the kept-back originals are missing (404); so their folders get no listing.
    missing = {r.path: r.detail for r in report.having("missing")}
    assert set(missing) == kept_back
    assert all("HTTP 404" in detail for detail in missing.values())
    assert report.errors == []
    assert {r.path for r in report.having("blocked")} == {f"{f}/SHA256SUMS" for f in partial}

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
    partial = {r.path.removesuffix("/SHA256SUMS") for r in report.having("blocked")}
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
    (xml,) = signs.CASCADES.downloads
    good = (shared / "signs/cascades" / xml.name).read_bytes()
    bad = good[:1000] + b"X" + good[1001:]
    mirror.place(xml, bad)
    serve(mirror)

    dest = tmp_path / "data"
    report = df.fetch(dest, datasets=["signs/cascades"], mirror=mirror.url)
    (err,) = report.errors
    assert err.path == "signs/cascades/stopsign_classifier.xml"
    assert "sha256 mismatch" in err.detail
    assert xml.sha256 in err.detail
    assert hashlib.sha256(bad).hexdigest() in err.detail
    (blocked,) = report.having("blocked")
    assert blocked.path == "signs/cascades/SHA256SUMS"
    assert sorted(p.name for p in (dest / "signs/cascades").iterdir()) == []


def test_corrupted_input_blocks_its_derivation(shared: Path, serve, tmp_path: Path) -> None:
    require_data("speech")
    mirror = Mirror(tmp_path / "mirror")
    raw = next(d for d in speech.SPEECH.downloads if d.name == "goforward.raw")
    samples = (shared / "speech/audio/ps_goforward.wav").read_bytes()[44:]
    mirror.place(raw, samples[:-2])  # truncated in transit
    for d in speech.SPEECH.downloads:
        if d.keep:
            mirror.place(d, shared / "speech" / d.name)
    serve(mirror)

    dest = tmp_path / "data"
    report = df.fetch(dest, datasets=["speech"], mirror=mirror.url)
    failed = {r.path: r.detail for r in report.errors}
    assert set(failed) == {"speech/goforward.raw"}
    assert "sha256 mismatch" in failed["speech/goforward.raw"]
    blocked = {r.path: r.detail for r in report.having("blocked")}
    assert set(blocked) == {"speech/audio/ps_goforward.wav", "speech/SHA256SUMS"}
    assert "goforward.raw is failed" in blocked["speech/audio/ps_goforward.wav"]
    assert not (dest / "speech/audio/ps_goforward.wav").exists()
    assert not (dest / "speech/SHA256SUMS").exists()
    assert _leftovers(dest) == []


def test_size_limit_stops_a_download(shared: Path, serve, tmp_path: Path) -> None:
    require_data("signs/cascades")
    mirror = Mirror(tmp_path / "mirror")
    (xml,) = signs.CASCADES.downloads
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
    (xml,) = signs.CASCADES.downloads
    mirror.place(xml, shared / "signs/cascades" / xml.name)
    serve(mirror)
    dest = tmp_path / "data"
    (dest / "signs").mkdir(parents=True)
    (dest / "signs/cascades").write_text("a file where the folder should be")
    with pytest.raises(FetchError, match=r"cannot write .*signs/cascades.*--dest"):
        df.fetch(dest, datasets=["signs/cascades"], mirror=mirror.url)


def test_no_network_names_url_and_remedies(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as info:
        df.fetch(tmp_path, datasets=["signs/cascades"], mirror=f"http://127.0.0.1:{port}")
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/markgaynor/stopsigns/" in message
    assert "Connection refused" in message
    assert "--mirror" in message and "CTXROBOT_DATA" in message


# -- (4) a second fetch is a no-op ------------------------------------------------------------
def test_second_fetch_is_a_no_op(
    fetched: tuple[Path, df.FetchReport], full_mirror: tuple[Mirror, set[str]]
) -> None:
    dest, _ = fetched
    mirror, _ = full_mirror
    folders = [d.folder for d in catalogue.select(COMPLETE)]
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
    shared: Path, serve, tmp_path: Path
) -> None:
    """Road-sign files have no per-file hash: the listing hash vouches for them."""
    require_data(ROAD)
    mirror = Mirror(tmp_path / "mirror")
    road = signs.ROAD_SIGN_SUBSET.downloads
    picked = [d for d in road if (shared / ROAD / d.name).is_file()][:4]
    for d in picked:
        mirror.place(d, shared / ROAD / d.name)
    serve(mirror)
    listing = "".join(
        f"{sha(shared / ROAD / p[2:])}  {p}\n" for p in sorted(f"./{d.name}" for d in picked)
    ).encode()

    def run(listing_sha: str, dest: Path) -> df.FetchReport:
        mini = Dataset(
            folder=ROAD, downloads=tuple(picked), listing_sha256=listing_sha, dot_paths=True
        )
        return df.fetch(dest, datasets=[ROAD], mirror=mirror.url, catalogue=(mini,))

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


# -- command line: a real `ctxrobot` process -------------------------------------------------
def _fetch_cli(dest: Path, only: str, mirror: str) -> subprocess.CompletedProcess[str]:
    return ctxrobot("data", "fetch", "--dest", str(dest), "--only", only, "--mirror", mirror)


def _one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, no traceback, one line on stderr that names the problem and its fix."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("ctxrobot data fetch: "), line
    for needle in needles:
        assert needle in line, line
    return line


def test_cli_fetch_complete_then_partial(shared: Path, serve, tmp_path: Path) -> None:
    require_data("speech")
    mirror = serve(Mirror(tmp_path / "mirror"))
    for d in signs.CLASSIFIER_TFLITE.downloads:
        mirror.place(d, shared / "signs/classifier-tflite" / d.name)
    dest = tmp_path / "data"
    proc = _fetch_cli(dest, "signs/classifier-tflite", mirror.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "downloaded  signs/classifier-tflite/traffic_sign_model.tflite" in proc.stdout
    assert "0 missing at the source, 0 failed" in proc.stdout
    assert (dest / "signs/classifier-tflite/SHA256SUMS").read_bytes() == (
        shared / "signs/classifier-tflite/SHA256SUMS"
    ).read_bytes()

    # A source without two of the speech clips: the rest is fetched, exit 1, one line.
    clips = [d for d in speech.SPEECH.downloads if d.keep]
    for d in clips[2:]:
        mirror.place(d, shared / "speech" / d.name)
    (raw,) = (d for d in speech.SPEECH.downloads if not d.keep)
    mirror.place(raw, (shared / "speech/audio/ps_goforward.wav").read_bytes()[44:])
    proc = _fetch_cli(dest, "speech", mirror.url)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("ctxrobot data fetch: speech: 2 file(s) not served"), line
    assert "HTTP 404" in line and "partial" in line
    for d in clips[2:]:
        assert sha(dest / "speech" / d.name) == d.sha256


class _GarbageHandler(http.server.BaseHTTPRequestHandler):
    """A web server that answers every path with the same HTML page."""

    def do_GET(self) -> None:
        body = b"<html><body>Welcome to the hotel network</body></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _not_http_server() -> str:
    """A TCP server that answers the first few connections with noise; stops by itself."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)

    def answer() -> None:
        with server:
            for _ in range(4):  # the download and pooch's one retry, with room to spare
                try:
                    conn, _addr = server.accept()
                except TimeoutError:
                    return
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"\x00\x01 not http at all\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize(
    "case", ["unknown dataset", "not a URL", "unwritable dest", "checksum", "garbage", "not http"]
)
def test_cli_bad_input_is_one_line_and_exit_2(
    case: str, shared: Path, serve, tmp_path: Path
) -> None:
    require_data("signs/cascades")
    (xml,) = signs.CASCADES.downloads
    mirror = serve(Mirror(tmp_path / "mirror"))
    mirror.place(xml, shared / "signs/cascades" / xml.name)
    dest = tmp_path / "data"
    only = "signs/cascades"
    if case == "unknown dataset":
        _one_line(_fetch_cli(dest, "maps", mirror.url), "unknown dataset 'maps'", "slam/intel")
    elif case == "not a URL":
        _one_line(_fetch_cli(dest, only, "ftp://example"), "must be an http:// or https:// URL")
    elif case == "unwritable dest":
        dest.write_text("a file where the data folder should be")
        _one_line(_fetch_cli(dest, only, mirror.url), f"cannot write {dest}", "--dest")
    elif case == "checksum":
        corrupted = serve(Mirror(tmp_path / "corrupted"))
        good = (shared / "signs/cascades" / xml.name).read_bytes()
        corrupted.place(xml, good[:1000] + b"X" + good[1001:])
        line = _one_line(_fetch_cli(dest, only, corrupted.url), "sha256 mismatch", "--mirror")
        assert line.startswith(f"ctxrobot data fetch: signs/cascades/{xml.name}: ")
    elif case == "garbage":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GarbageHandler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            _one_line(_fetch_cli(dest, only, url), xml.name, "sha256 mismatch", "--mirror")
        finally:
            server.shutdown()
            server.server_close()
    else:
        _one_line(_fetch_cli(dest, only, _not_http_server()), "does not answer HTTP", "--mirror")
    assert not (dest / "signs/cascades" / xml.name).exists()


def test_cli_help_reads_well() -> None:
    proc = ctxrobot("data", "fetch", "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "--mirror URL" in text and "--only LIST" in text and "--dest DIR" in text
    assert "slam/fr-clinic" in text and "slam/mit-killian" in text
    assert "exit status" in text
    assert "alphacephei.com/vosk/models" in text and "vosk-model-small-en-us-0.15" in text
    assert max(len(line) for line in text.splitlines()) <= 80
