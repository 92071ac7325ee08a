"""Build the ctxrobot container images, skipping every image whose inputs did not change.

Called by tools/setup (step 6); usable alone:

    .venv/bin/python tools/build_images.py --base ctxrobot/base:bookworm [--force] [NAME ...]

Every folder ``containers/<name>/`` with a ``Dockerfile`` (except ``base/``) gives the image
``ctxrobot/<name>``, built with the repository root as context. Its label
``ctxrobot.source-hash`` is a SHA-256 over the Dockerfile, every local ``COPY`` source it names
(requirements, wheelhouse, task sources), and the base image's name and id. A build runs only
when that hash differs from the existing image's label, so a warm run costs a few hashes.

Standard library only: it runs before (and independently of) the host venv's packages.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_PREFIX = "ctxrobot/"
CACHE_PREFIX = "ctxrobot-cache/"  # tagged build stages (see build())
HASH_LABEL = "ctxrobot.source-hash"
BASE_LABEL = "ctxrobot.base"
STAGE_LABEL = "ctxrobot.stage"  # set by the Dockerfiles on their `venv` stage
# Same exclusions as the repository's .dockerignore: never part of the build context, so they
# must not make the hash (and thus a rebuild) depend on them either.
IGNORED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
IGNORED_SUFFIXES = (".pyc", ".egg-info")


@dataclass(frozen=True)
class ImageSpec:
    """One image to build: its Dockerfile, the context paths its COPY lines read, and its
    named build stages."""

    name: str
    dockerfile: Path
    sources: tuple[Path, ...]
    stages: tuple[str, ...]

    @property
    def tag(self) -> str:
        return f"{IMAGE_PREFIX}{self.name}:latest"


def say(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True)


def parse_dockerfile(dockerfile: Path, repo: Path) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """Context paths named by COPY/ADD lines (not `COPY --from=<stage>`) and the names of the
    build stages (`FROM <image> AS <name>`)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    sources: list[Path] = []
    stages: list[str] = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        keyword = words[0].upper()
        if keyword == "FROM" and len(words) == 4 and words[2].upper() == "AS":
            stages.append(words[3])
        elif keyword in {"COPY", "ADD"} and not any(w.startswith("--from") for w in words):
            args = [w for w in words[1:] if not w.startswith("--")]
            sources.extend(repo / src for src in args[:-1])
    return tuple(sources), tuple(stages)


def discover(repo: Path) -> list[ImageSpec]:
    """All image specs, sorted by name (burner first is fine: it is the quickest)."""
    specs = []
    for dockerfile in sorted((repo / "containers").glob("*/Dockerfile")):
        name = dockerfile.parent.name
        if name == "base":
            continue
        sources, stages = parse_dockerfile(dockerfile, repo)
        specs.append(ImageSpec(name, dockerfile, sources, stages))
    return specs


def _context_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in IGNORED_DIRS and not d.endswith(".egg-info"))
        files.extend(Path(root) / n for n in sorted(names) if not n.endswith(IGNORED_SUFFIXES))
    return files


def source_hash(spec: ImageSpec, repo: Path, base: str, base_id: str) -> str:
    """SHA-256 over everything that decides the image's content."""
    digest = hashlib.sha256()
    digest.update(f"base {base} {base_id}\n".encode())
    for path in (spec.dockerfile, *spec.sources):
        for file in _context_files(path):
            digest.update(f"file {file.relative_to(repo)}\n".encode())
            with file.open("rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def image_id(ref: str) -> str | None:
    result = docker("image", "inspect", "-f", "{{.Id}}", ref, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def image_label(ref: str, label: str) -> str | None:
    result = docker(
        "image", "inspect", "-f", f'{{{{ index .Config.Labels "{label}" }}}}', ref, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else None


@functools.cache
def build_env() -> dict[str, str]:
    """BuildKit when the buildx plugin exists; else the classic builder (Debian's docker.io
    has no buildx, and a CLI that defaults to BuildKit would refuse to build)."""
    env = dict(os.environ)
    has_buildx = docker("buildx", "version", check=False).returncode == 0
    env["DOCKER_BUILDKIT"] = "1" if has_buildx else "0"
    return env


def prune_superseded() -> list[str]:
    """Delete our images that a rebuild left untagged: old task images (they carry the
    source-hash label) and old `venv` stages (label ctxrobot.stage). Docker keeps any image a
    container still uses. Returns Docker's "reclaimed space" figures that are not zero."""
    reclaimed = []
    for label in (HASH_LABEL, STAGE_LABEL):
        out = docker("image", "prune", "-f", "--filter", f"label={label}", check=False).stdout
        for line in out.splitlines():
            if line.startswith("Total reclaimed space:") and line.split(":")[1].strip() != "0B":
                reclaimed.append(line.split(":")[1].strip())
    return reclaimed


def _docker_build(
    spec: ImageSpec, repo: Path, base: str, extra: list[str], force: bool, log: Path
) -> None:
    """One `docker build` of `spec` with the repository root as context, output to `log`."""
    command = ["docker", "build", "-f", str(spec.dockerfile.relative_to(repo))]
    command += ["--build-arg", f"BASE_IMAGE={base}", *extra]
    if force:
        command.append("--no-cache")
    with log.open("a") as out:
        out.write(f"$ {shlex.join(command)} .\n")
        out.flush()
        result = subprocess.run(
            [*command, "."], cwd=repo, env=build_env(), stdout=out, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        sys.stderr.write("\n".join(log.read_text().splitlines()[-30:]) + "\n")
        raise SystemExit(f"[setup] ERROR: building {spec.tag} failed (full log: {log})")


def build(spec: ImageSpec, repo: Path, base: str, digest: str, force: bool, log_dir: Path) -> float:
    """Build one image (output in `log_dir/build-<name>.log`); return the seconds it took.

    Named stages (`FROM ... AS venv`) are built and tagged first as `ctxrobot-cache/<name>:
    <stage>`: the tag keeps the stage's layers as build cache (a task-source change then
    skips the pip install), and a superseded stage image is dropped instead of piling up as
    an anonymous dangling image. With `force`, the stages are built without cache and the
    final build reuses exactly those fresh stages (a second `--no-cache` would build them
    again, untagged); its remaining steps hit the cache only where their inputs are identical.
    """
    log = log_dir / f"build-{spec.name}.log"
    log.write_text("")
    start = time.monotonic()
    for stage in spec.stages:
        cache_tag = f"{CACHE_PREFIX}{spec.name}:{stage}"
        _docker_build(spec, repo, base, ["--target", stage, "-t", cache_tag], force, log)
    labels = ["--label", f"{HASH_LABEL}={digest}", "--label", f"{BASE_LABEL}={base}"]
    final_force = force and not spec.stages
    _docker_build(spec, repo, base, [*labels, "-t", spec.tag], final_force, log)
    return time.monotonic() - start


def ensure_image(
    spec: ImageSpec, repo: Path, base: str, base_id: str, args: argparse.Namespace
) -> None:
    """Build `spec` unless its image exists with the same source hash."""
    missing = [p.relative_to(repo) for p in spec.sources if not p.exists()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        say(f"image {spec.tag}: SKIPPED, missing {names}")
        return
    digest = source_hash(spec, repo, base, base_id)
    if not args.force and image_label(spec.tag, HASH_LABEL) == digest:
        say(f"image {spec.tag}: up to date")
        return
    seconds = build(spec, repo, base, digest, args.force, args.log_dir)
    say(f"image {spec.tag}: built ({seconds:.0f} s)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only these images (default: all)")
    parser.add_argument("--base", required=True, help="BASE_IMAGE for every Dockerfile")
    parser.add_argument("--force", action="store_true", help="rebuild without the build cache")
    parser.add_argument(
        "--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="repo root"
    )
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="build logs (default: <repo>/.cache/setup)"
    )
    args = parser.parse_args(argv)
    args.repo = args.repo.resolve()
    if args.log_dir is None:
        args.log_dir = args.repo / ".cache" / "setup"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_id = image_id(args.base)
    if base_id is None:
        raise SystemExit(f"[setup] ERROR: base image {args.base} not found (run tools/setup)")
    specs = discover(args.repo)
    unknown = set(args.names) - {s.name for s in specs}
    if unknown:
        raise SystemExit(f"[setup] ERROR: no containers/<name>/Dockerfile for {sorted(unknown)}")
    for spec in specs:
        if not args.names or spec.name in args.names:
            ensure_image(spec, args.repo, args.base, base_id, args)
    # Every run, not only after a build: an old image a container still used is kept by
    # Docker and can only go once that container is gone.
    reclaimed = prune_superseded()
    if reclaimed:
        say(f"superseded images: removed ({' + '.join(reclaimed)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
