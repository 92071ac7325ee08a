"""Readers for the dataset layouts ctxrobot replays and evaluates on.

One module per sensor family (`laser`, `signs`, `speech`); `data_dir()` says where the data live.
"""

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]


def data_dir() -> Path:
    """The data root: `$CTXROBOT_DATA`, else `../shared/data` beside the repository."""
    env = os.environ.get("CTXROBOT_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (_REPO.parent / "shared" / "data").resolve()
