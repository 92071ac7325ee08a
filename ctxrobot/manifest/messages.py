"""Pydantic's validation errors as ``FILE:LINE:COL`` problems that say how to fix them.

Each error's ``loc`` is followed through the schema types (to find the field's description
and allowed keys) and through the YAML document (to find where the value was written).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import annotated_types
from pydantic import BaseModel, ValidationError

from ctxrobot.manifest.fields import describe
from ctxrobot.manifest.problems import Pos, Problem, shown
from ctxrobot.manifest.scenario import SOURCE_KINDS
from ctxrobot.manifest.yamlload import YamlDoc
from ctxrobot.sched.rules import NAME_PATTERN, ExpressionError

_EXPECTED = {
    "string_type": 'a string (quote it: "...")',
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list (`- item` lines or [a, b])",
    "dict_type": "a mapping (`key: value` lines)",
    "model_type": "a mapping (`key: value` lines)",
}
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_MEANING = {
    "cpu_min": "a fraction of the whole machine",
    "cpu_max": "a fraction of the whole machine",
    "share": "a fraction of the whole machine",
    "weight": "a cgroup weight",
    "miss_boost": "a fraction of the whole machine",
    "slack_release": "a fraction of the whole machine",
}
_MISSING = object()


def dotted(path: Sequence[object]) -> str:
    """``tasks[0].resources.cpu_max``; long or odd keys are shortened and quoted."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
            continue
        text = str(part)
        if len(text) > 40 or not re.fullmatch(r"[\w-]+", text):
            text = shown(part)
        out += f".{text}" if out else text
    return out or "the top level"


def did_you_mean(name: object, known: Sequence[str]) -> str:
    """``did you mean 'x'? `` or nothing; only among a few names (difflib is quadratic)."""
    if not isinstance(name, str) or len(known) > 100 or len(name) > 100:
        return ""
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional so the model or container type shows."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _step(tp: Any, part: str | int) -> tuple[Any, bool]:
    """Follow one pydantic ``loc`` element; returns the new type and whether it was a
    discriminator tag rather than a data key."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and part in typing.get_args(kind.annotation):
                return member, True
        return None, False
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(part))
        return (field.annotation if field else None), False
    if origin in (list, tuple) and isinstance(part, int):
        args = typing.get_args(tp)
        return (args[0] if origin is list else args[min(part, len(args) - 1)]), False
    if origin is dict:
        return typing.get_args(tp)[1], False
    return None, False


def _child(data: Any, part: str | int) -> Any:
    if isinstance(data, dict):
        return data.get(part, _MISSING)
    if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
        return data[part]
    return _MISSING


def _resolve(
    doc: YamlDoc, root: type[BaseModel], loc: Sequence[str | int]
) -> tuple[tuple[str | int, ...], Any, bool]:
    """Data path, the schema type at the *parent* of the last element, and whether the last
    element is a dict key being validated (pydantic's ``[key]``)."""
    path: list[str | int] = []
    data: Any = doc.data
    tp: Any = root
    parent_tp: Any = root
    for i, part in enumerate(loc):
        if part == "[key]":
            return tuple(path), parent_tp, True
        new_tp, is_tag = _step(tp, part) if tp is not None else (None, False)
        if is_tag:
            tp = new_tp
            continue
        parent_tp = tp
        tp = new_tp
        child = _child(data, part)
        if child is _MISSING and i != len(loc) - 1:
            continue  # a pydantic-internal step (e.g. a validator name), not data
        data = child
        path.append(part)
    return tuple(path), parent_tp, False


def _field(tp: Any, name: str) -> Any:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp.model_fields.get(name)
    return None


def _fields(tp: Any) -> list[str]:
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _bounds(annotation: Any) -> list[Any]:
    """Constraints inside ``annotation`` (as in ``Annotated[float, Field(le=1)] | None``)."""
    if typing.get_origin(annotation) is Annotated:
        inner, *extra = typing.get_args(annotation)
        found = [m for item in extra for m in getattr(item, "metadata", [item])]
        return found + _bounds(inner)
    return [b for arg in typing.get_args(annotation) for b in _bounds(arg)]


def _range(tp: Any, name: str) -> str:
    """`` between 0.1 and 3600`` from a field's bounds, or nothing."""
    field = _field(tp, name)
    low = high = None
    for bound in [*field.metadata, *_bounds(field.annotation)] if field is not None else ():
        if isinstance(bound, annotated_types.Ge | annotated_types.Gt):
            low = getattr(bound, "ge", getattr(bound, "gt", None))
        if isinstance(bound, annotated_types.Le | annotated_types.Lt):
            high = getattr(bound, "le", getattr(bound, "lt", None))
    return f" between {low:g} and {high:g}" if low is not None and high is not None else ""


@dataclass(frozen=True)
class _Error:
    """One pydantic error, located."""

    kind: str
    value: Any
    ctx: dict[str, Any]
    path: tuple[str | int, ...]
    parent_tp: Any
    pos: Pos
    doc: YamlDoc
    msg: str

    @property
    def name(self) -> str:
        return str(self.path[-1]) if self.path else ""

    @property
    def where(self) -> str:
        return dotted(self.path)


def pydantic_problems(
    exc: ValidationError, doc: YamlDoc, file: str, root: type[BaseModel]
) -> list[Problem]:
    """Every error of ``exc`` as a problem, except at values already reported."""
    problems: list[Problem] = []
    for error in exc.errors(include_url=False):
        path, parent_tp, is_key = _resolve(doc, root, error["loc"])
        if doc.is_tainted(path):
            continue
        located = _Error(
            kind=error["type"],
            value=error.get("input"),
            ctx=error.get("ctx") or {},
            path=path,
            parent_tp=parent_tp,
            pos=doc.pos(path),
            doc=doc,
            msg=error["msg"],
        )
        pos, message = _key_message(located) if is_key else _message(located)
        if pos not in doc.tainted:
            problems.append(Problem(file, pos.line, pos.col, message))
    return problems


def _key_message(e: _Error) -> tuple[Pos, str]:
    pos = e.doc.pos(e.path, key=True)
    if e.kind == "string_type":
        return pos, f"the key {shown(e.path[-1])} in {dotted(e.path[:-1])} must be a string"
    if e.ctx.get("pattern") == NAME_PATTERN:  # a source name
        return pos, bad_name(e.where, e.name)
    if e.kind == "string_too_long":
        return pos, f"{e.where}: the key is longer than {e.ctx.get('max_length')} characters"
    fixed = re.sub(r"\W", "_", e.name).upper().lstrip("0123456789")[:40] or "NAME"
    return pos, (
        f"{shown(e.name)} in {dotted(e.path[:-1])} is not a valid environment variable name; "
        f"use letters, digits and '_', not starting with a digit (e.g. {fixed!r})"
    )


def _message(e: _Error) -> tuple[Pos, str]:
    handler = _HANDLERS.get(e.kind)
    if handler is not None:
        return handler(e)
    if e.kind in _BOUNDS:
        limit = next(iter(e.ctx.values()))
        meaning = f" ({_MEANING[e.name]})" if e.name in _MEANING else ""
        return e.pos, (
            f"{e.where} = {shown(e.value)} is out of range{meaning}: it must be "
            f"{_BOUNDS[e.kind]} {limit}"
        )
    if e.kind in _EXPECTED:
        return e.pos, f"{e.where}: expected {_EXPECTED[e.kind]}, got {describe(e.value)}"
    return e.pos, f"{e.where}: {e.msg}"


def _missing(e: _Error) -> tuple[Pos, str]:
    parent = e.path[:-1]
    pos = e.doc.pos(parent, key=e.doc.has_key(parent))
    field = _field(e.parent_tp, e.name)
    example = f" ({field.description})" if field is not None and field.description else ""
    return pos, f"missing required field '{e.name}' in {dotted(parent)}; add `{e.name}:`{example}"


def _extra(e: _Error) -> tuple[Pos, str]:
    allowed = _fields(e.parent_tp)
    hint = did_you_mean(e.name, allowed) or "remove it; "
    return e.doc.pos(e.path, key=True), (
        f"unknown key {shown(e.path[-1])} in {dotted(e.path[:-1])}; {hint}"
        f"allowed keys: {', '.join(allowed)}"
    )


def _literal(e: _Error) -> tuple[Pos, str]:
    if e.path == ("version",):
        return e.pos, f"version {shown(e.value)} is not supported; this ctxrobot reads `version: 1`"
    expected = e.ctx.get("expected", "")
    choices = [a or b for a, b in re.findall(r"'([^']*)'|(\d+)", expected)]
    hint = did_you_mean(str(e.value), choices)
    return e.pos, f"{e.where}: {shown(e.value)} is not allowed; {hint}use one of {expected}"


def _unknown_kind(e: _Error) -> tuple[Pos, str]:
    tag = e.ctx.get("tag")
    return e.doc.pos((*e.path, "kind")), (
        f"{e.where}: unknown kind {shown(tag)}; {did_you_mean(tag, SOURCE_KINDS)}use one of "
        f"{', '.join(SOURCE_KINDS)}"
    )


def _no_kind(e: _Error) -> tuple[Pos, str]:
    pos = e.doc.pos(e.path, key=e.doc.has_key(e.path))
    return pos, f"{e.where} has no 'kind'; add `kind:` with one of {', '.join(SOURCE_KINDS)}"


def _value_error(e: _Error) -> tuple[Pos, str]:
    cause = e.ctx.get("error")
    if isinstance(cause, ExpressionError):
        return _expression_pos(e.doc, e.path, cause), f"bad condition in {e.where}: {cause.message}"
    return e.pos, f"{e.where}: {cause}"


def _finite(e: _Error) -> tuple[Pos, str]:
    span = _range(e.parent_tp, e.name)
    return e.pos, f"{e.where} = {shown(e.value)} is not a finite number; give a number{span}"


_HANDLERS: dict[str, Callable[[_Error], tuple[Pos, str]]] = {
    "missing": _missing,
    "extra_forbidden": _extra,
    "literal_error": _literal,
    "union_tag_invalid": _unknown_kind,
    "union_tag_not_found": _no_kind,
    "value_error": _value_error,
    "finite_number": _finite,
    # Every other pattern is NAME_PATTERN (environment names are keys, handled apart).
    "string_pattern_mismatch": lambda e: (e.pos, bad_name(e.where, e.value)),
    "too_short": lambda e: (
        e.pos,
        f"{e.where} is empty; it needs at least {e.ctx.get('min_length', 1)} entry",
    ),
    "too_long": lambda e: (
        e.pos,
        f"{e.where} has too many entries; at most {e.ctx.get('max_length')} allowed",
    ),
    "string_too_short": lambda e: (e.pos, f"{e.where} is empty; write a value"),
    "string_too_long": lambda e: (
        e.pos,
        f"{e.where} is longer than {e.ctx.get('max_length')} characters; shorten it",
    ),
}


def bad_name(where: str, name: object) -> str:
    text = str(name)
    fixed = re.sub(r"[^a-z0-9_-]", "-", text.lower()).lstrip("-_0123456789")[:40]
    return (
        f"{where}: {shown(name)} is not a valid name; use lowercase letters, digits, '_' and "
        f"'-', starting with a letter (e.g. {fixed or 'slam'!r})"
    )


def _expression_pos(doc: YamlDoc, path: tuple[str | int, ...], error: ExpressionError) -> Pos:
    """Point inside the `when:` value when the column is exact (single line, no escapes)."""
    pos = doc.pos(path)
    if error.line == 1 and pos in doc.inline:
        return Pos(pos.line, pos.col + doc.inline[pos] + error.col)
    return pos
