"""Cross references no single schema model can see: task input → scenario source, rule
and context task names, which context sections a rule's signals need, overlapping timed
events. They run on the raw YAML data, so they still report when the schema found
something else wrong, and tolerate any shape of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ctxrobot.manifest.document import CONTEXT_SOURCE_KINDS, MAX_CONDITION
from ctxrobot.manifest.messages import did_you_mean, dotted
from ctxrobot.manifest.problems import Problem, shown
from ctxrobot.manifest.yamlload import YamlDoc
from ctxrobot.sched.rules import SIGNAL_PROVIDERS, ExpressionError, compile_expression

#: Source kinds that publish context readings but no samples a task could process.
_NO_SAMPLES = frozenset({"pose_odometry"})


def number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _dict_items(data: object) -> Iterator[tuple[int, dict[str, Any]]]:
    """The mapping entries of a list, with their indices; anything else was already
    reported by the schema layer."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            if isinstance(item, dict):
                yield i, item


def _listed(names: Sequence[object]) -> str:
    """Names for a message: at most 20, each kept short."""
    shown_names = [n if isinstance(n, str) and len(n) <= 40 else shown(n) for n in names[:20]]
    return ", ".join(shown_names) + (", ..." if len(names) > 20 else "")


class Checker:
    """Cross-reference checks over the raw YAML data of one file."""

    def __init__(self, doc: YamlDoc, file: str) -> None:
        self.doc = doc
        self.file = file
        self.problems: list[Problem] = []

    def add(self, path: tuple[str | int, ...], message: str, *, key: bool = False) -> None:
        pos = self.doc.pos(path, key=key)
        if pos in self.doc.tainted or self.doc.is_tainted(path):
            return
        self.problems.append(Problem(self.file, pos.line, pos.col, message))

    def unique_names(self, section: str, what: str) -> list[str]:
        """Report repeated `name:` values in a list section; returns the names in order."""
        seen: dict[str, int] = {}
        names: list[str] = []
        for i, item in _dict_items(self.doc.data.get(section)):
            name = item.get("name")
            if not isinstance(name, str):
                continue
            if name in seen:
                first = self.doc.pos((section, seen[name], "name")).line
                self.add(
                    (section, i, "name"),
                    f"duplicate {what} name {shown(name)} (first used at line {first}); "
                    f"{what} names must be unique, rename one",
                )
            else:
                seen[name] = i
                names.append(name)
        return names

    def scenario(self) -> None:
        data = self.doc.data
        duration = number(data.get("duration_s"))
        sources = data.get("sources")
        if not isinstance(sources, dict):
            return
        for name, source in sources.items():
            if not isinstance(source, dict):
                continue
            for events in ("show", "play"):
                self._events(("sources", name, events), source.get(events), duration)

    def _events(self, path: tuple[str | int, ...], events: object, duration: float | None) -> None:
        timed: list[tuple[float, float | None, int]] = []
        for i, event in _dict_items(events):
            at = number(event.get("at_s"))
            if at is None:
                continue
            if duration is not None and at >= duration:
                self.add(
                    (*path, i, "at_s"),
                    f"{dotted((*path, i))}.at_s = {at:g} is not before the scenario ends "
                    f"(duration_s {duration:g}); move it earlier or lengthen duration_s",
                )
            hold = number(event.get("hold_s", 2.0)) if "image" in event else None
            timed.append((at, hold, i))
        timed.sort()
        for (at, hold, _), (next_at, _, j) in itertools.pairwise(timed):
            if hold is not None and next_at < at + hold:
                self.add(
                    (*path, j, "at_s"),
                    f"{dotted((*path, j))} at {next_at:g} s overlaps the image shown at "
                    f"{at:g} s for {hold:g} s; start it at {at + hold:g} s or later, or "
                    "shorten the earlier hold_s",
                )

    def manifest(self, sources: Mapping[str, object] | None, scenario_file: str) -> None:
        """``sources``: each scenario source's kind."""
        data = self.doc.data
        tasks = self.unique_names("tasks", "task")
        self.unique_names("rules", "rule")
        total_min = 0.0
        for i, task in _dict_items(data.get("tasks")):
            name = task.get("input")
            if sources is not None and isinstance(name, str) and name not in sources:
                self.add(
                    ("tasks", i, "input"),
                    f"task input {shown(name)} is not a source of {scenario_file}; "
                    f"{did_you_mean(name, list(sources))}sources: {_listed(list(sources))}",
                )
            elif sources is not None and isinstance(name, str) and sources[name] in _NO_SAMPLES:
                self.add(
                    ("tasks", i, "input"),
                    f"task input {shown(name)} is a {sources[name]} source, which makes "
                    "odometry for the context but no samples; give the task a sensor source",
                )
            resources = task.get("resources")
            cpu_min = resources.get("cpu_min", 0.05) if isinstance(resources, dict) else 0.05
            total_min += number(cpu_min) or 0.0
        if total_min > 1.0 + 1e-9:
            self.add(
                ("tasks",),
                f"the tasks' cpu_min add up to {total_min:.2f} of the machine, more than all "
                "of it; lower them so they sum to at most 1",
                key=True,
            )
        self._context(data.get("context"), sources, scenario_file, tasks)
        self._rules(data.get("rules"), data.get("context"), tasks)

    def _context(
        self,
        context: object,
        sources: Mapping[str, object] | None,
        scenario_file: str,
        tasks: list[str],
    ) -> None:
        if not isinstance(context, dict):
            return
        for section, wanted in CONTEXT_SOURCE_KINDS.items():
            spec = context.get(section)
            source = spec.get("source") if isinstance(spec, dict) else None
            if sources is None or not isinstance(source, str):
                continue
            path = ("context", section, "source")
            if source not in sources:
                self.add(
                    path,
                    f"context.{section}.source {shown(source)} is not a source of "
                    f"{scenario_file}; {did_you_mean(source, list(sources))}sources: "
                    f"{_listed(list(sources))}",
                )
            elif sources[source] not in wanted:
                fitting = [n for n, k in sources.items() if k in wanted]
                hint = f" such as {shown(fitting[0])}" if fitting else ""
                self.add(
                    path,
                    f"context.{section}.source {shown(source)} is of kind "
                    f"{_listed([sources[source]])}, but {section} needs a source of kind "
                    f"{' or '.join(wanted)}{hint}",
                )
        sign = context.get("sign")
        task = sign.get("task") if isinstance(sign, dict) else None
        if isinstance(task, str) and task not in tasks:
            self.add(
                ("context", "sign", "task"),
                f"context.sign.task {shown(task)} is not a task; "
                f"{did_you_mean(task, tasks)}tasks: {_listed(tasks)}",
            )

    def _rules(self, rules: object, context: object, tasks: list[str]) -> None:
        configured = {
            section
            for section, spec in (context.items() if isinstance(context, dict) else ())
            if spec is not None
        }
        for i, rule in _dict_items(rules):
            label = rule.get("name", f"rules[{i}]")
            targets = rule.get("set")
            for task in targets if isinstance(targets, dict) else ():
                if isinstance(task, str) and task not in tasks:
                    self.add(
                        ("rules", i, "set", task),
                        f"rule {shown(label)} sets unknown task {shown(task)}; "
                        f"{did_you_mean(task, tasks)}tasks: {_listed(tasks)}",
                        key=True,
                    )
            when = rule.get("when")
            if not isinstance(when, str) or len(when) > MAX_CONDITION:
                continue  # the schema layer reports it
            try:
                names = compile_expression(when).names
            except ExpressionError:
                continue  # reported by the schema layer with its column
            for section in sorted({SIGNAL_PROVIDERS[n] for n in names} - configured):
                used = ", ".join(sorted(n for n in names if SIGNAL_PROVIDERS[n] == section))
                self.add(
                    ("rules", i, "when"),
                    f"rule {shown(label)} uses {used}, which context.{section} produces, but "
                    f"context.{section} is not configured; add a `{section}:` section under "
                    "`context:`",
                )
