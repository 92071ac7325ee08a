"""Memory sizes as manifests and the command line write them (`768Mi`, `1Gi`, `800M`)."""

from __future__ import annotations

import re
from decimal import Decimal

from ctxrobot.manifest.problems import shown

_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kKMGT]i?)?")
_UNITS = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_UNITS |= {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
#: Docker refuses smaller memory limits.
MIN_MEMORY = 6 * 1024**2
#: More than any robot has; a larger figure is a typo (or an overflow waiting to happen).
MAX_MEMORY = 1024**4


def memory_bytes(value: object) -> object:
    """``"768Mi"``/``"1Gi"``/``"800M"``/``123456`` → bytes, between 6 MiB and 1 TiB.

    Other types are returned unchanged for the schema's strict int to reject.
    """
    if isinstance(value, float):
        raise ValueError(
            f"memory {shown(value)} is not a size: write whole bytes or a number with a unit, "
            "e.g. 768Mi"
        )
    if isinstance(value, bool) or not isinstance(value, int | str):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f"memory {shown(value)} is not a size: write bytes or a number with K/M/G/T "
                "(x1000) or Ki/Mi/Gi/Ti (x1024), e.g. 768Mi"
            )
        # Decimal: exact for any number of digits, where float overflows to inf.
        size = Decimal(match.group(1)) * _UNITS[match.group(2) or ""]
        if size > MAX_MEMORY:
            raise ValueError(f"memory {shown(value)} is more than the 1Ti limit; give at most 1Ti")
        value = int(size)
    if value < MIN_MEMORY:
        raise ValueError(f"memory {value} bytes is below Docker's 6 MiB minimum; give at least 6Mi")
    if value > MAX_MEMORY:
        raise ValueError(f"memory {value} bytes is more than the 1Ti limit; give at most 1Ti")
    return value
