"""CPU burner for scheduler tests: spin on one core and report how much work got done.

The loop does a fixed amount of integer arithmetic per iteration, so the iteration count is a
direct measure of the CPU time the container received. Progress is reported two ways:

- stdout: one JSON line per report, ``{"t": <monotonic s>, "iterations": <total>}``;
- the file named by ``--counter-file`` / ``$BURNER_COUNTER_FILE`` (optional): the total count
  as decimal text, replaced atomically, so a host test can read it from a bind mount without
  parsing container logs.

Reports happen every ``--interval`` seconds; ``--seconds`` bounds the run (default: forever;
the container is usually stopped from outside).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

# Iterations between clock reads: small enough that reports stay punctual on a throttled
# container, large enough that time.monotonic() is a negligible part of the work.
_CHUNK = 2_000


class _Stop(Exception):
    """Raised from the SIGTERM handler so `docker stop` ends the loop with a final report."""


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def _write_counter(path: Path, iterations: int) -> None:
    """Replace the counter file atomically: readers never see a half-written number."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{iterations}\n")
    os.replace(tmp, path)


def _report(iterations: int, counter_file: Path | None) -> None:
    print(json.dumps({"t": time.monotonic(), "iterations": iterations}), flush=True)
    if counter_file is not None:
        _write_counter(counter_file, iterations)


def burn(seconds: float | None, interval: float, counter_file: Path | None) -> int:
    """Spin until `seconds` have passed (or SIGTERM); return the total iteration count."""
    start = time.monotonic()
    deadline = None if seconds is None else start + seconds
    next_report = start + interval
    iterations = reported = 0
    acc = 1
    try:
        while True:
            for i in range(_CHUNK):
                acc = (acc * 1_103_515_245 + i) & 0xFFFF_FFFF
            iterations += _CHUNK
            now = time.monotonic()
            if now >= next_report:
                _report(iterations, counter_file)
                reported = iterations
                next_report = now + interval
            if deadline is not None and now >= deadline:
                break
    except (_Stop, KeyboardInterrupt):
        pass
    if iterations != reported:
        _report(iterations, counter_file)
    return iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="burner", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=None, help="stop after this long (default: never)"
    )
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between reports (default 0.5)"
    )
    parser.add_argument(
        "--counter-file",
        type=Path,
        default=os.environ.get("BURNER_COUNTER_FILE") or None,
        help="also write the running total here (default: $BURNER_COUNTER_FILE)",
    )
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    signal.signal(signal.SIGTERM, _on_sigterm)
    burn(args.seconds, args.interval, args.counter_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
