"""The task lifecycle, modelled on py_trees behaviours.

`setup` runs once (load models), `initialise` before each stream, `update` per sample,
`terminate` when a stream ends, `shutdown` once at exit. Keeping these apart lets the
runtime restart a stream without reloading a 40 MB model.
"""

from __future__ import annotations

import abc
from typing import Any

from ctxtask.protocol import Sample


class Task(abc.ABC):
    """Base class of every containerized task."""

    name: str = "task"

    def setup(self, config: dict[str, Any]) -> None:
        """Load models and allocate long-lived state. `config` comes from the manifest."""

    def initialise(self) -> None:
        """Reset per-stream state before the first sample of a stream."""

    @abc.abstractmethod
    def update(self, sample: Sample) -> dict[str, Any]:
        """Process one sample; return a small JSON-serialisable result."""

    def set_rate(self, rate_hz: float | None) -> None:
        """The context asks for at most `rate_hz` results per second (None: no limit).

        The runtime already paces samples it sends; a task overrides this only when it
        can cheapen its own work at a low rate (e.g. a coarser search).
        """

    def terminate(self) -> dict[str, Any]:
        """The stream ended; return a summary (it is logged and stored by the host)."""
        return {}

    def shutdown(self) -> None:
        """Release everything; the process exits next."""
