"""The scheduler core's inputs as rows: the codec of run.db's ``core_inputs`` table.

The decision thread publishes every input it hands the core (bus events, operator
commands, ``Start``, ``Tick``) as a :class:`~ctxrobot.model.events.CoreInput`; the run
store encodes each one here, on the observer pipeline's thread, into ``(kind, body_json)``:
the event type's name and a JSON object of its fields. :func:`decode` turns a row back into
the event, so that a run can be replayed through a fresh core with the recorded ``now``
(``ctxrobot.observe.readers.read_inputs``).

Rows stay small because every input is a summary already: a camera frame reaches the core
as a ``CameraFrame`` (source, time, scene activity), never as pixels. The one event that
may carry a large payload is a task's ``TaskResult``: of its ``result`` only the keys the
core reads (:data:`CORE_RESULT_KEYS`) are kept.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ctxrobot.model.events import TaskResult
from ctxrobot.observe.values import dumps
from ctxrobot.sched.rules import RuleSpec
from ctxrobot.sched.state import TRANSITIONS, ReloadRules

__all__ = ["CORE_RESULT_KEYS", "KINDS", "UnknownInput", "decode", "encode"]

#: The keys of a task's result the core reads: ``shed`` (a shed sample is left out of the
#: deadline feedback and of the sign signal, ``sched.state``/``sched.signals``) and
#: ``detections`` (the sign signal). The core must read no other key: tests/test_replay.py
#: checks it, since a key left out here would make a replayed run decide differently.
CORE_RESULT_KEYS = ("shed", "detections")

#: Event type name → type, for every event the core takes (its transition table).
KINDS: Mapping[str, type] = {event_type.__name__: event_type for event_type in TRANSITIONS}

#: Each kind's field names, looked up once: about 50 inputs a second are encoded.
_FIELD_NAMES: Mapping[type, tuple[str, ...]] = {
    event_type: tuple(f.name for f in dataclasses.fields(event_type)) for event_type in TRANSITIONS
}


class UnknownInput(ValueError):
    """A recorded input of a kind this version's core does not take."""


def _fields(event: object) -> dict[str, Any]:
    """The event's own fields, one level deep (nested values are JSON already)."""
    return {name: getattr(event, name) for name in _FIELD_NAMES[type(event)]}


def encode(event: object) -> tuple[str, str]:
    """``(kind, body_json)`` of one core input."""
    kind = type(event).__name__
    if KINDS.get(kind) is not type(event):
        raise UnknownInput(f"the scheduler core takes no {kind} events")
    body = _fields(event)
    if isinstance(event, TaskResult):
        body["result"] = {k: event.result[k] for k in CORE_RESULT_KEYS if k in event.result}
    elif isinstance(event, ReloadRules):
        body["rules"] = [rule.model_dump(mode="json") for rule in event.rules]
    return kind, dumps(body)


def decode(kind: str, body_json: str) -> object:
    """The event a row of ``core_inputs`` was recorded from."""
    event_type = KINDS.get(kind)
    if event_type is None:
        raise UnknownInput(f"the scheduler core takes no {kind} events")
    body = json.loads(body_json)
    if event_type is ReloadRules:
        # Strict models: from JSON, as the manifest's rules are read.
        body["rules"] = tuple(RuleSpec.model_validate_json(json.dumps(r)) for r in body["rules"])
    return event_type(**body)
