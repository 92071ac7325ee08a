"""Reading a manifest's YAML so that no file can hurt: bounded, plain, positioned.

ruamel.yaml parses (YAML 1.2) and its round-trip constructor builds ``CommentedMap`` and
``CommentedSeq`` containers that remember the line and column of every key and value
(``.lc``); :meth:`YamlDoc.pos` walks them to place a schema error. Around the library:

- only a regular file is read (a FIFO would block forever, ``/dev/zero`` never ends), and
  at most :data:`MAX_BYTES` of it;
- the composer counts every value as the document *expands* through aliases and stops at
  :data:`MAX_NODES` (a nine-level "billion laughs" bomb is refused after 10 000 values,
  not built), refuses an alias used inside the value it names (a value cannot contain
  itself), stops nesting at :data:`MAX_DEPTH` (ruamel's ``max_depth``, and the scanner
  for ``[[[…``, far below Python's recursion limit), and gives up after
  :data:`MAX_CPU_SECONDS` of CPU;
- only plain YAML 1.2 is read: no ``%TAG`` or other ``%YAML`` version, and explicit tags
  only where they agree with the value (``!!str``, ``!!int 5``); ``!!timestamp``,
  ``!!binary``, ``!foo`` and friends are problems, not crashes;
- scalars become plain ``str``/``int``/``float``/``bool``/``None`` by rules written here
  rather than ruamel's round-trip scalar types, so a number too long to convert or a
  malformed one (``-_``) stays text for the schema to reject, and a date stays a string;
- duplicate keys and a ``${VAR}`` that cannot be expanded are collected (all of them are
  reported at once), the other problems above stop the file at the first one.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer, MaxDepthExceededError
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scanner import RoundTripScanner

from ctxrobot.manifest.envvars import expand
from ctxrobot.manifest.problems import Pos, Problem, shown

Path_ = tuple[str | int, ...]

#: Largest file read: 50 times the default robot; ruamel (pure Python) reads it in well
#: under a second even when it is all comments or one long plain scalar.
MAX_BYTES = 128 * 1024
#: Most values a document may expand to, aliases counted each time they are used. The
#: default robot holds 230 and its 3-minute scenario 187; ruamel composes 10 000 in about
#: 0.4 s of CPU on the x86 machines CI runs on (a Pi 4 is some 4 times slower).
MAX_NODES = 10_000
#: Deepest nesting: manifests need 6 levels, `config:` a few more.
MAX_DEPTH = 32
#: CPU time the YAML stage may take. A backstop for slow paths nobody has found yet: the
#: limits above already keep every known input under a second, so it is set well above
#: what a slow board needs for the largest document they allow.
MAX_CPU_SECONDS = 5.0
#: Characters all ``${VAR}`` expansions of one file may produce together.
MAX_EXPANDED_CHARS = 1024 * 1024
#: A number written with more characters is read as text (Python refuses to convert
#: integers of more than 4 300 digits; no manifest value needs 40).
MAX_NUMBER_CHARS = 40

_FIRST = Pos(1, 1)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CORE = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_CORE + t for t in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP, _MERGE = (_CORE + t for t in ("seq", "map", "merge"))
# Implicit tags of YAML 1.2 that name no manifest type: their text is the value.
_AS_TEXT = (_STR, _CORE + "timestamp", _CORE + "value")


@dataclass
class YamlDoc:
    """Plain data in ruamel containers that know where each key and value was written."""

    data: Any
    root: Pos = field(default_factory=lambda: _FIRST)  # where the top-level value starts
    # Start of a single-line plain or quoted string → where its text begins relative to
    # that start (1 after an opening quote). Only inside these can a column of a `${VAR}`
    # or of a rule condition's error be reported exactly.
    inline: dict[Pos, int] = field(default_factory=dict)
    # Values already reported (bad tag, failed ${VAR} expansion): later layers stay quiet
    # about them instead of adding a confusing second error for the same mistake.
    tainted: set[Pos] = field(default_factory=set)

    def pos(self, path: Path_, *, key: bool = False) -> Pos:
        """Position of the value (or key) at ``path``, else of its closest known ancestor."""
        value_pos, key_pos = self._locate(path)
        return key_pos if key and key_pos is not None else value_pos

    def has_key(self, path: Path_) -> bool:
        """Whether ``path`` ends at a mapping key written in the file."""
        return self._locate(path)[1] is not None

    def is_tainted(self, path: Path_) -> bool:
        return self.pos(path) in self.tainted

    def _locate(self, path: Path_) -> tuple[Pos, Pos | None]:
        """Value position of the deepest part of ``path`` found, and the key position of
        its last part when the whole path was found and ends at a mapping key."""
        node, found = self.data, self.root
        for depth, part in enumerate(path):
            key_pos = None
            # An empty flow collection (`{}`, `[]`) has no position table at all.
            positions = node.lc.data or {} if isinstance(node, CommentedMap | CommentedSeq) else {}
            if isinstance(node, CommentedMap) and _hashable(part) and part in positions:
                key_line, key_col, line, col = positions[part]
                key_pos = Pos(key_line + 1, key_col + 1)
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and part in positions:
                line, col = positions[part]
            else:
                return found, None
            found, node = Pos(line + 1, col + 1), node[part]
            if depth == len(path) - 1:
                return found, key_pos
        return found, None


def _hashable(part: object) -> bool:
    return isinstance(part, str | int | float | bool) or part is None


class _Refused(Exception):
    """A limit or rule that stops reading the file, at a position."""

    def __init__(self, mark: Any, message: str) -> None:
        super().__init__(message)
        self.pos = _pos(mark)
        self.message = message


def _pos(mark: Any) -> Pos:
    return Pos(mark.line + 1, mark.column + 1)


@dataclass
class _Session:
    """What one load counts and collects; the composer and constructor share it."""

    environ: Mapping[str, str] | None
    doc: YamlDoc = field(default_factory=lambda: YamlDoc(data=None))
    problems: list[tuple[Pos, str]] = field(default_factory=list)
    cpu_deadline: float = field(default_factory=lambda: time.thread_time() + MAX_CPU_SECONDS)
    values: int = 0  # values composed so far, aliases counted with everything they hold
    sizes: dict[int, int] = field(default_factory=dict)  # id(node) → values it expands to
    keys: set[int] = field(default_factory=set)  # id() of key nodes: never ${}-expanded
    expansion_room: int = MAX_EXPANDED_CHARS

    def problem(self, mark: Any, message: str) -> None:
        pos = _pos(mark)
        self.problems.append((pos, message))
        self.doc.tainted.add(pos)

    def grow(self, count: int, mark: Any) -> None:
        self.values += count
        if self.values > MAX_NODES:
            raise _Refused(
                mark,
                f"the document holds more than {MAX_NODES} values by here (an alias counts "
                "every value it repeats); a manifest needs a few hundred, so split the file "
                "or remove the aliases that multiply it",
            )
        if time.thread_time() > self.cpu_deadline:
            raise _Refused(
                mark,
                f"reading stopped here after {MAX_CPU_SECONDS:g} s of CPU; the file is too "
                "complex for a manifest, simplify it",
            )


# --------------------------------------------------------------------------- composing


def _too_deep(mark: Any) -> _Refused:
    return _Refused(
        mark,
        f"values are nested more than {MAX_DEPTH} deep here; no manifest needs that, flatten it",
    )


class _Scanner(RoundTripScanner):
    """Stops flow nesting (``[[[[…``) at :data:`MAX_DEPTH` as it reads it. The composer's
    depth limit comes too late for flow collections: until a ``[`` is 1 024 characters
    behind, ruamel keeps it as a possible simple key and checks every open one at every
    token, so a long run of ``[`` costs quadratic time before any of them is composed."""

    def fetch_flow_collection_start(self, token_class: Any, to_push: str) -> None:
        if len(self.flow_context) >= MAX_DEPTH:
            raise _too_deep(self.reader.get_mark())
        super().fetch_flow_collection_start(token_class, to_push)


class _Composer(Composer):
    """ruamel's composer with the limits above; also checks tags, keys and merges."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.warn_double_anchors = False  # reusing an anchor name is valid YAML

    @property
    def session(self) -> _Session:
        return self.loader.session  # type: ignore[no-any-return]

    def compose_document(self) -> Any:
        event = self.parser.peek_event()
        if event.tags:
            raise _Refused(
                event.start_mark, "%TAG directives are not supported in manifests; remove them"
            )
        if event.version is not None and tuple(event.version) != (1, 2):
            version = ".".join(str(v) for v in event.version)
            raise _Refused(
                event.start_mark,
                f"this file asks for YAML {version}; manifests are YAML 1.2, remove the "
                "%YAML line (and write true/false, not yes/no)",
            )
        root = super().compose_document()
        if root is not None:
            self.session.doc.root = _pos(root.start_mark)
        return root

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if isinstance(event, AliasEvent):
            node = super().compose_node(parent, index)
            size = self.session.sizes.get(id(node))
            if size is None:
                raise _Refused(
                    event.start_mark,
                    f"the alias *{event.anchor} is used inside the value its anchor names, "
                    "so that value would contain itself; remove the alias",
                )
            self.session.grow(size, event.start_mark)
            return node
        self.session.grow(1, event.start_mark)
        tag = getattr(event, "ctag", None)
        node = super().compose_node(parent, index)
        if tag is not None and not (tag.handle is None and tag.suffix == "!"):
            self._check_tag(node, tag)
        self.session.sizes[id(node)] = 1 + sum(self.session.sizes[id(c)] for c in _children(node))
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        kept: list[tuple[Node, Node]] = []
        merged = False
        for key, value in node.value:
            if not isinstance(key, ScalarNode):
                self.session.problem(
                    key.start_mark, "a mapping key must be a plain scalar such as `name`"
                )
                continue
            if key.tag == _MERGE:
                if merged:
                    self.session.problem(
                        key.start_mark,
                        "a second `<<` in one mapping; merge several with `<<: [*a, *b]`",
                    )
                    continue
                if not _mergeable(value):
                    self.session.problem(
                        value.start_mark,
                        "`<<` merges a mapping (`<<: *base`) or a list of mappings "
                        "(`<<: [*a, *b]`)",
                    )
                    continue
                merged = True
            self.session.keys.add(id(key))
            kept.append((key, value))
        node.value = kept
        return node

    def _check_tag(self, node: Node, tag: Any) -> None:
        """Keep an explicit tag only when it says what the value already is."""
        if tag.handle == "!!":
            full, written = _CORE + tag.suffix, "!!" + tag.suffix
        elif tag.handle is None:  # verbatim: !<tag:yaml.org,2002:int>
            full, written = tag.suffix, f"!<{tag.suffix}>"
        else:
            full, written = None, f"{tag.handle}{tag.suffix or ''}"
        if isinstance(node, ScalarNode):
            plain = str(self.resolver.resolve(ScalarNode, node.value, (True, False)))
            if full == _STR or (full in (_INT, _FLOAT, _BOOL, _NULL) and full == plain):
                node.tag = full
                return
            self.session.problem(
                node.start_mark,
                f"the tag {shown(written)} does not fit the value {shown(node.value)}; remove "
                "the tag (quote the value to make it a string)",
            )
            node.tag = _STR  # the text as written; the schema's verdict on it is suppressed
            return
        default = _MAP if isinstance(node, MappingNode) else _SEQ
        if full != default:
            self.session.problem(
                node.start_mark,
                f"the tag {shown(written)} is not supported in manifests; remove it (only plain "
                "mappings, lists, strings, numbers and true/false are read)",
            )
        node.tag = default


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _mergeable(node: Node) -> bool:
    if isinstance(node, SequenceNode):
        return all(isinstance(item, MappingNode) for item in node.value)
    return isinstance(node, MappingNode)


# --------------------------------------------------------------------------- constructing


class _Constructor(RoundTripConstructor):
    """ruamel's round-trip containers (they carry ``.lc``) with plain scalars."""

    @property
    def session(self) -> _Session:
        return self.loader.session  # type: ignore[no-any-return]

    def check_mapping_key(
        self, node: Any, key_node: Any, mapping: Any, key: Any, value: Any
    ) -> bool:
        if key not in mapping:
            return True
        first = mapping.lc.data[key][0] + 1 if key in mapping.lc.data else node.start_mark.line + 1
        self.session.problem(
            key_node.start_mark,
            f"duplicate key {shown(key)} (first defined at line {first}); YAML keeps "
            "only one of them, so remove or rename one",
        )
        return False

    def construct_plain_scalar(self, node: ScalarNode) -> Any:
        text: str = node.value
        if node.tag not in _AS_TEXT:  # a number, true/false or null, by the YAML 1.2 rules
            return scalar_value(node.tag, text)
        session = self.session
        start = _pos(node.start_mark)
        if node.style in (None, "'", '"') and node.start_mark.line == node.end_mark.line:
            session.doc.inline[start] = 0 if node.style is None else 1
        if "\0" in text:
            session.problem(
                node.start_mark,
                "this string holds a NUL character (\\0), which no name, path or command "
                "can contain; remove it",
            )
            return None
        if session.environ is None or "${" not in text or id(node) in session.keys:
            return text
        result = expand(text, session.environ, session.expansion_room)
        if result.error_at is not None:
            offset = session.doc.inline.get(start)
            at = start if offset is None else Pos(start.line, start.col + offset + result.error_at)
            session.problems.append((at, result.error))
            session.doc.tainted.add(start)
            return text
        session.expansion_room -= len(result.text)
        if result.text == text:
            return text
        session.doc.inline.pop(start, None)  # columns of the expanded text match no file
        if node.style is not None:
            return result.text
        retyped = str(self.resolver.resolve(ScalarNode, result.text, (True, False)))
        return result.text if retyped in _AS_TEXT else scalar_value(retyped, result.text)


for _tag in (*_AS_TEXT, _INT, _FLOAT, _BOOL, _NULL):
    _Constructor.add_constructor(_tag, _Constructor.construct_plain_scalar)


_FLOATS = {
    ".inf": float("inf"),
    "+.inf": float("inf"),
    "-.inf": float("-inf"),
    ".nan": float("nan"),
}


def scalar_value(tag: str, text: str) -> Any:
    """The Python value of a plain scalar ruamel resolved to ``tag``; text whenever the
    text does not convert cleanly (the schema then says what was expected)."""
    if tag == _NULL:
        return None
    if tag == _BOOL:
        return text.lower() == "true"
    digits = text.replace("_", "")
    if tag == _FLOAT and digits.lower() in _FLOATS:
        return _FLOATS[digits.lower()]
    if tag not in (_INT, _FLOAT) or len(digits) > MAX_NUMBER_CHARS:
        return text
    try:
        if tag == _FLOAT:
            return float(digits)
        sign = -1 if digits.startswith("-") else 1
        body = digits.lstrip("+-")
        base = {"0x": 16, "0o": 8, "0b": 2}.get(body[:2].lower(), 10)
        return sign * int(body[2:] if base != 10 else body, base)
    except ValueError:
        return text


def plain(value: Any) -> Any:
    """``value`` with ruamel's containers turned into plain ``dict`` and ``list``, for code
    that keeps or dumps the data (positions are no longer needed there)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


# --------------------------------------------------------------------------- reading


def read_text(path: Path) -> tuple[str | None, Problem | None]:
    """The text of a regular file of at most :data:`MAX_BYTES` bytes, or why not."""
    file = str(path)

    def refuse(message: str, pos: Pos = _FIRST) -> tuple[None, Problem]:
        return None, Problem(file, pos.line, pos.col, message)

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. The type is checked on the
        # opened file, so a path swapped between a check and the open changes nothing.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "the path holds a NUL character"
        return refuse(f"cannot read {file}: {reason}; check the path")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            return refuse(f"{file} is a folder; give the manifest or scenario file in it")
        return refuse(
            f"{file} is not a regular file (a pipe, device or socket); ctxrobot reads "
            "manifests only from regular files"
        )
    with os.fdopen(fd, "rb") as stream:
        data = stream.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        return refuse(
            f"{file} is larger than {MAX_BYTES // 1024} KiB, the most a manifest or scenario "
            "may be; a robot manifest is a few KiB, check that this is the right file"
        )
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return refuse(
            "this file is not UTF-8 text (the byte here is not UTF-8); save it as UTF-8",
            _index_pos(data[: exc.start].decode("utf-8")),
        )


def _index_pos(before: str) -> Pos:
    """Position just after ``before``, counted as ruamel counts in YAML 1.2: only LF, CR
    and CRLF break lines, and a byte-order mark takes no column."""
    last = _LINE_BREAK.split(before)
    return Pos(len(last), len(last[-1]) - last[-1].count("\ufeff") + 1)


def load_yaml(
    text: str, file: str, environ: Mapping[str, str] | None = os.environ
) -> tuple[YamlDoc | None, list[Problem]]:
    """Parse one YAML document; ``None`` plus problems when it cannot be read.

    ``environ`` supplies ``${VAR}`` values; ``None`` turns expansion off.
    """
    session = _Session(environ)
    yaml = YAML(typ="rt", pure=True)
    yaml.Scanner = _Scanner
    yaml.Composer = _Composer
    yaml.Constructor = _Constructor
    yaml.max_depth = MAX_DEPTH
    yaml.session = session  # type: ignore[attr-defined]

    def refuse(pos: Pos, message: str) -> tuple[None, list[Problem]]:
        return None, [Problem(file, pos.line, pos.col, message)]

    if len(text) > MAX_BYTES:
        return refuse(_FIRST, f"the text is longer than {MAX_BYTES} characters")
    try:
        session.doc.data = yaml.load(text)
    except _Refused as exc:
        return refuse(exc.pos, exc.message)
    except MaxDepthExceededError as exc:
        return refuse(_pos(exc.problem_mark), _too_deep(exc.problem_mark).message)
    except MarkedYAMLError as exc:
        return refuse(*_syntax_error(exc))
    except ReaderError as exc:
        code = exc.character if isinstance(exc.character, int) else 0
        return refuse(
            _index_pos(text[: exc.position]),
            f"YAML cannot hold the character U+{code:04X} written here; remove it, or write "
            "it as an escape inside double quotes",
        )
    except YAMLError as exc:  # no position known
        return refuse(_FIRST, f"YAML syntax error: {str(exc).splitlines()[0]}")
    problems = [Problem(file, pos.line, pos.col, message) for pos, message in session.problems]
    return session.doc, problems


def _syntax_error(exc: MarkedYAMLError) -> tuple[Pos, str]:
    mark = exc.problem_mark or exc.context_mark
    pos = _pos(mark) if mark is not None else _FIRST
    what = exc.problem or "invalid YAML"
    context = ""
    if exc.context:
        started = exc.context_mark
        at = f" started at line {started.line + 1}" if started is not None else ""
        context = f" ({exc.context}{at})"
    return pos, f"YAML syntax error: {what}{context}; check indentation, colons and quotes here"
