"""YAML loading that remembers where every key and value came from.

PyYAML's ``safe_load`` returns plain data and forgets positions, so a schema error could
only be reported as "somewhere in the file". Here the document is *composed* into nodes
(which carry marks) and turned into plain data by hand, recording the 1-based line/column
of every mapping key and every value under its path (a tuple of keys and list indices, the
same shape as a pydantic error ``loc``). On the way it also:

- reports duplicate mapping keys (PyYAML silently keeps the last one, which hides typos);
- expands ``${VAR}`` and ``${VAR:-default}`` in every string value, re-typing unquoted
  scalars after expansion so ``cpus: ${CPUS:-2}`` still yields an integer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]

_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, order=True)
class Problem:
    """One validation problem, printed the way compilers do so editors can jump to it."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


@dataclass(frozen=True)
class Pos:
    """A 1-based position in the source text."""

    line: int
    col: int


@dataclass
class YamlDoc:
    """Plain data plus the position of every key and value in it."""

    data: Any
    key_pos: dict[Path_, Pos] = field(default_factory=dict)
    value_pos: dict[Path_, Pos] = field(default_factory=dict)
    # Single-line plain or quoted scalars → where their text starts relative to the value
    # position (1 after an opening quote). Only for these can a column *inside* the value
    # (of a `${VAR}` or a rule condition's error) be reported exactly.
    inline: dict[Path_, int] = field(default_factory=dict)
    # Values whose ${VAR} expansion failed: already reported, so later layers stay quiet
    # about them instead of adding a confusing second error for the same mistake.
    tainted: set[Path_] = field(default_factory=set)

    def pos(self, path: Path_, *, key: bool = False) -> Pos:
        """Position of the value (or key) at ``path``, else of its closest known ancestor."""
        table = self.key_pos if key else self.value_pos
        if path in table:
            return table[path]
        for cut in range(len(path) - 1, -1, -1):
            if path[:cut] in self.value_pos:
                return self.value_pos[path[:cut]]
        return Pos(1, 1)


def _mark(mark: yaml.Mark) -> Pos:
    return Pos(mark.line + 1, mark.column + 1)


class _Builder:
    """Turns a composed node tree into plain data, recording positions and problems."""

    def __init__(self, file: str, environ: Mapping[str, str] | None) -> None:
        self.file = file
        self.environ = environ
        self.doc = YamlDoc(data=None)
        self.problems: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def problem(self, pos: Pos, message: str) -> None:
        self.problems.append(Problem(self.file, pos.line, pos.col, message))

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.doc.value_pos[path] = _mark(node.start_mark)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if node.style in (None, "'", '"') and node.start_mark.line == node.end_mark.line:
            self.doc.inline[path] = 0 if node.style is None else 1
        try:
            value = self._constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            self.problem(
                _mark(node.start_mark),
                f"cannot read this value ({exc.problem}); remove the tag or quote the value",
            )
            return None
        if isinstance(value, str) and self.environ is not None and "${" in value:
            return self._expand(value, node, path)
        return value

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[Any, Any]:
        # `<<: *anchor` merge keys: flatten_mapping puts the merged entries first, in place,
        # exactly as yaml.safe_load does. Keys written here override merged ones (that is
        # the point of merging), so only repeats among the written keys are reported.
        own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
        self._constructor.flatten_mapping(node)
        written = {
            self._constructor.construct_object(k)
            for k, _ in node.value
            if id(k) in own and isinstance(k, yaml.ScalarNode)
        }
        out: dict[Any, Any] = {}
        first_seen: dict[Any, Pos] = {}
        for key_node, value_node in node.value:
            key_pos = _mark(key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_pos, "a mapping key must be a plain scalar such as `name`")
                continue
            key = self._constructor.construct_object(key_node)
            if id(key_node) not in own and (key in written or key in first_seen):
                continue  # merged, and overridden here or by an earlier merge
            if key in first_seen:
                self.problem(
                    key_pos,
                    f"duplicate key '{key}' (first defined at line {first_seen[key].line}); "
                    "YAML keeps only one of them, so remove or rename one",
                )
                continue
            first_seen[key] = key_pos
            self.doc.key_pos[(*path, key)] = key_pos
            out[key] = self.build(value_node, (*path, key))
        return out

    def _expand(self, text: str, node: yaml.ScalarNode, path: Path_) -> Any:
        """Expand ``${...}`` references; unquoted scalars are re-typed afterwards."""
        start = _mark(node.start_mark)
        offset = self.doc.inline.get(path)

        def where(index: int) -> Pos:
            # Exact for inline scalars (barring escapes before the reference); otherwise
            # the scalar's own start.
            return start if offset is None else Pos(start.line, start.col + offset + index)

        def replace(match: re.Match[str]) -> str:
            body = match.group(1)
            name, sep, default = body.partition(":-")
            if not _ENV_NAME.fullmatch(name):
                self.problem(
                    where(match.start()),
                    f"bad variable reference '${{{body}}}': write ${{NAME}} or "
                    "${NAME:-default} with NAME made of letters, digits and '_'",
                )
                return match.group(0)
            assert self.environ is not None
            if name in self.environ:
                return self.environ[name]
            if sep:
                return default
            self.problem(
                where(match.start()),
                f"environment variable {name} is not set and '${{{name}}}' has no default; "
                f"export {name} or write ${{{name}:-default}}",
            )
            return match.group(0)

        reported = len(self.problems)
        expanded = _ENV_REF.sub(replace, text)
        if len(self.problems) > reported:
            self.doc.tainted.add(path)
        if expanded != text:
            # Columns of the expanded text no longer match the file.
            self.doc.inline.pop(path, None)
        if node.style is None and expanded != text:
            try:
                retyped = yaml.safe_load(expanded)
            except yaml.YAMLError:
                return expanded
            if retyped is None or isinstance(retyped, bool | int | float | str):
                return retyped
        return expanded


def load_yaml(
    text: str, file: str, environ: Mapping[str, str] | None = os.environ
) -> tuple[YamlDoc | None, list[Problem]]:
    """Parse one YAML document; ``None`` plus problems when the text is not valid YAML.

    ``environ`` supplies ``${VAR}`` values; ``None`` turns expansion off.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = _mark(mark) if mark is not None else Pos(1, 1)
        what = exc.problem or "invalid YAML"
        context = ""
        if exc.context:
            started = exc.context_mark
            at = f" started at line {started.line + 1}" if started is not None else ""
            context = f" ({exc.context}{at})"
        message = f"YAML syntax error: {what}{context}; check indentation, colons and quotes here"
        return None, [Problem(file, pos.line, pos.col, message)]
    except yaml.YAMLError as exc:
        return None, [Problem(file, 1, 1, f"YAML syntax error: {exc}")]
    builder = _Builder(file, environ)
    if root is None:
        builder.doc.value_pos[()] = Pos(1, 1)
        return builder.doc, []
    builder.doc.data = builder.build(root, ())
    return builder.doc, builder.problems
