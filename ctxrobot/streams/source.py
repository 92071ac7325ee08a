"""What every sensor source hands the runtime, replayed or live.

A source turns a reading into a :class:`Fired`: the summaries the context needs (published
on the bus, e.g. an ``AudioLevel``) and the full sample for the tasks that read the source.
Replay sources are timelines the :class:`~ctxrobot.streams.replay.ScenarioPlayer` fires on
the clock; live sources (:class:`LiveSource`) read a device on their own thread and emit as
readings arrive. Both call the same :class:`Emit`, so the rest of the runtime cannot tell
a recording from a robot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ctxrobot.model.bus import EventBus
from ctxtask.protocol import Sample

__all__ = ["Emit", "Fired", "LiveSource"]


@dataclass(frozen=True, slots=True)
class Fired:
    """One reading: ``(topic, event)`` pairs to publish in order, and the sample itself.
    The sample's ``t_sensor`` is the host's monotonic time at capture."""

    events: tuple[tuple[str, object], ...]
    sample: Sample


class Emit(Protocol):
    """Publish a reading of ``source`` and deliver its sample to the tasks reading it.
    Safe from any thread; never blocks on a task."""

    def __call__(self, source: str, fired: Fired) -> None: ...


class LiveSource(Protocol):
    """A device read on its own thread until stopped (py_trees-style lifecycle: the
    runtime calls ``attach`` and ``start`` once every task is ready, ``stop`` once at the end).

    Device faults are not exceptions: the source publishes a ``SourceStateChanged`` (topic
    ``source.state``) on the bus it was attached to, logs one line and reopens with back-off.
    """

    name: str

    def attach(self, bus: EventBus) -> None:
        """The bus for the source's state changes (and, for ``pose_odometry``, the task
        results it turns into odometry)."""

    def start(self, emit: Emit, t0: float | None = None) -> None:
        """Open the device and begin emitting; returns at once. ``t0`` is the run's time zero
        on the monotonic clock (default: now): a recorded stream's offsets count from it, as
        the replayed sources' do, however long the sources started before this one took."""

    def stop(self) -> None:
        """Stop reading and release the device; idempotent."""
