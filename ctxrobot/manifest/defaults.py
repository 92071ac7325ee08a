"""Where the robot's configuration lives, and the size syntax the command line shares with
manifests (`--memory 1Gi` means what `memory: 1Gi` means)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ctxrobot.manifest.units import memory_bytes

#: The repository root: config/, containers/ and the git history the bench records.
REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "config"
DEFAULT_MANIFEST = CONFIG_DIR / "robot.yaml"


def memory_arg(text: str) -> int:
    """An argparse type: `1Gi` → bytes, with the manifest's size syntax."""
    try:
        return int(memory_bytes(text))  # type: ignore[call-overload]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
