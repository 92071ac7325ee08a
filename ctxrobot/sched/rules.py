"""Context rules: a small, safe condition language and the rule book that evaluates it.

A rule says *when* (a condition over context signals) a task needs *what* (criticality, a
guaranteed share, a weight, a cap, a processing rate). Conditions are parsed with ``ast``
and compiled into closures over a whitelist of node types, so a manifest can never run
code: no calls, attributes, subscripts, arithmetic or comprehensions. Every name must be a
known context signal and every comparison is type-checked when the manifest is loaded, so a
typo fails validation instead of silently never firing.

Missing signals are *unknown* (three-valued logic): ``unknown and false`` is false,
``unknown or true`` is true, anything else involving unknown stays unknown, and a condition
that ends unknown does not hold. A robot without a battery therefore never matches
``battery_pct < 20`` nor ``not battery_pct < 20``.

``RuleBook`` is pure apart from its hold timers: the caller passes ``now`` in, so it runs the
same in real and virtual time.
"""

from __future__ import annotations

import ast
import difflib
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Every context signal a condition may use, with the Python type its value has.
CONTEXT_SIGNALS: Mapping[str, type] = {
    "speed": float,  # m/s, forward speed over the motion window
    "turn_rate": float,  # rad/s, absolute
    "motion": str,  # one of MOTION_STATES
    "voice_active": bool,
    "sign_ahead": bool,
    "obstacle_distance": float,  # m, nearest laser return in front
    "obstacle_near": bool,
    "cpu_temp_c": float,
    "throttled": bool,
    "battery_pct": float,
    "on_battery": bool,
}

#: The values the `motion` signal takes.
MOTION_STATES = ("moving", "turning", "stopped")

#: Which `context:` section of the manifest produces each signal.
SIGNAL_PROVIDERS: Mapping[str, str] = {
    "speed": "motion",
    "turn_rate": "motion",
    "motion": "motion",
    "voice_active": "voice",
    "sign_ahead": "sign",
    "obstacle_distance": "obstacle",
    "obstacle_near": "obstacle",
    "cpu_temp_c": "host",
    "throttled": "host",
    "battery_pct": "host",
    "on_battery": "host",
}

NAME_PATTERN = r"^[a-z][a-z0-9_-]*$"

# Static types of the language: truth values, numbers and strings.
_Kind = Literal["bool", "number", "str"]
_KIND_OF: Mapping[type, _Kind] = {bool: "bool", float: "number", int: "number", str: "str"}
_Value = bool | float | int | str | None
_Eval = Callable[[Mapping[str, object]], _Value]

_COMPARE: Mapping[type[ast.cmpop], tuple[str, Callable[[object, object], bool]]] = {
    ast.Eq: ("==", lambda a, b: a == b),
    ast.NotEq: ("!=", lambda a, b: a != b),
    ast.Lt: ("<", lambda a, b: a < b),  # type: ignore[operator]
    ast.LtE: ("<=", lambda a, b: a <= b),  # type: ignore[operator]
    ast.Gt: (">", lambda a, b: a > b),  # type: ignore[operator]
    ast.GtE: (">=", lambda a, b: a >= b),  # type: ignore[operator]
}

_FORBIDDEN: Mapping[type[ast.AST], str] = {
    ast.Call: "function calls are not allowed",
    ast.Attribute: "attribute access is not allowed",
    ast.Subscript: "indexing is not allowed",
    ast.BinOp: "arithmetic is not allowed; compare a signal with a constant instead",
    ast.Lambda: "lambdas are not allowed",
    ast.IfExp: "`x if c else y` is not allowed; use `and`/`or`",
    ast.NamedExpr: "`:=` is not allowed",
}


class ExpressionError(ValueError):
    """A rejected condition; ``line`` (1-based) and ``col`` (0-based) locate it in the text."""

    def __init__(self, message: str, line: int = 1, col: int = 0) -> None:
        super().__init__(f"{message} (at column {col + 1})")
        self.message = message
        self.line = line
        self.col = col


@dataclass(frozen=True)
class Expression:
    """A compiled condition. ``names`` lists the signals it reads."""

    text: str
    names: frozenset[str]
    _fn: _Eval

    def evaluate(self, context: Mapping[str, object]) -> bool:
        """True only when the condition definitely holds (unknown counts as false)."""
        return self._fn(context) is True


class _Compiler:
    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.splitlines() or [""]
        self.names: set[str] = set()

    def error(self, node: ast.AST, message: str) -> ExpressionError:
        line = getattr(node, "lineno", 1)
        # ast offsets count UTF-8 bytes; report characters.
        raw = self.lines[line - 1].encode()[: getattr(node, "col_offset", 0)]
        return ExpressionError(message, line, len(raw.decode(errors="ignore")))

    def compile(self, node: ast.expr) -> tuple[_Eval, _Kind]:
        if isinstance(node, ast.BoolOp):
            return self._boolop(node)
        if isinstance(node, ast.UnaryOp):
            return self._unary(node)
        if isinstance(node, ast.Compare):
            return self._compare(node)
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.Constant):
            return self._constant(node)
        for kind, why in _FORBIDDEN.items():
            if isinstance(node, kind):
                raise self.error(node, why)
        raise self.error(
            node,
            f"{type(node).__name__} is not allowed; use signal names, numbers, strings, "
            "true/false, comparisons, and/or/not and parentheses",
        )

    def _bool_operand(self, node: ast.expr, what: str) -> _Eval:
        fn, kind = self.compile(node)
        if kind != "bool":
            raise self.error(
                node, f"{what} needs a true/false operand, got a {kind}; compare it first"
            )
        return fn

    def _boolop(self, node: ast.BoolOp) -> tuple[_Eval, _Kind]:
        word = "and" if isinstance(node.op, ast.And) else "or"
        parts = [self._bool_operand(value, f"`{word}`") for value in node.values]
        decisive = isinstance(node.op, ast.Or)  # `or` stops at true, `and` at false

        def run(ctx: Mapping[str, object]) -> _Value:
            unknown = False
            for part in parts:
                value = part(ctx)
                if value is None:
                    unknown = True
                elif value is decisive:
                    return decisive
            return None if unknown else not decisive

        return run, "bool"

    def _unary(self, node: ast.UnaryOp) -> tuple[_Eval, _Kind]:
        if isinstance(node.op, ast.Not):
            inner = self._bool_operand(node.operand, "`not`")

            def negate(ctx: Mapping[str, object]) -> _Value:
                value = inner(ctx)
                return None if value is None else not value

            return negate, "bool"
        operand = node.operand
        if (
            isinstance(node.op, ast.USub | ast.UAdd)
            and isinstance(operand, ast.Constant)
            and isinstance(operand.value, int | float)
            and not isinstance(operand.value, bool)
        ):
            number = -operand.value if isinstance(node.op, ast.USub) else operand.value
            return (lambda _ctx: number), "number"
        raise self.error(node, "a sign (+/-) may only prefix a number")

    def _compare(self, node: ast.Compare) -> tuple[_Eval, _Kind]:
        sides = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            if type(op) not in _COMPARE:  # `in`, `is`: report the operator, not its operand
                raise self.error(
                    sides[i + 1], "only ==, !=, <, <=, > and >= comparisons are allowed"
                )
        operands = [self.compile(side) for side in sides]
        checks: list[tuple[_Eval, _Eval, Callable[[object, object], bool]]] = []
        for i, op in enumerate(node.ops):
            symbol, fn = _COMPARE[type(op)]
            (left, left_kind), (right, right_kind) = operands[i], operands[i + 1]
            if symbol in ("==", "!="):
                if left_kind != right_kind:
                    raise self.error(
                        sides[i + 1], f"cannot compare a {left_kind} with a {right_kind}"
                    )
            elif left_kind != "number" or right_kind != "number":
                bad = sides[i] if left_kind != "number" else sides[i + 1]
                raise self.error(bad, f"`{symbol}` compares numbers only")
            self._check_motion(sides[i], sides[i + 1])
            checks.append((left, right, fn))

        def run(ctx: Mapping[str, object]) -> _Value:
            unknown = False
            for left, right, fn in checks:
                a, b = left(ctx), right(ctx)
                if a is None or b is None:
                    unknown = True
                elif not fn(a, b):
                    return False
            return None if unknown else True

        return run, "bool"

    def _check_motion(self, left: ast.expr, right: ast.expr) -> None:
        """`motion == "stoped"` would never hold: reject values motion never takes."""
        for a, b in ((left, right), (right, left)):
            if (
                isinstance(a, ast.Name)
                and a.id == "motion"
                and isinstance(b, ast.Constant)
                and b.value not in MOTION_STATES
            ):
                hint = difflib.get_close_matches(str(b.value), MOTION_STATES, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.error(
                    b,
                    f"motion is never {b.value!r}: it is one of "
                    f"{', '.join(repr(m) for m in MOTION_STATES)}{suggestion}",
                )

    def _name(self, node: ast.Name) -> tuple[_Eval, _Kind]:
        if node.id in ("true", "false"):
            truth = node.id == "true"
            return (lambda _ctx: truth), "bool"
        if node.id not in CONTEXT_SIGNALS:
            hint = difflib.get_close_matches(node.id, CONTEXT_SIGNALS, n=1)
            suggestion = f"did you mean '{hint[0]}'? " if hint else ""
            raise self.error(
                node,
                f"unknown context signal '{node.id}'; {suggestion}"
                f"known signals: {', '.join(CONTEXT_SIGNALS)}",
            )
        name = node.id
        self.names.add(name)
        kind = _KIND_OF[CONTEXT_SIGNALS[name]]

        def lookup(ctx: Mapping[str, object]) -> _Value:
            # Normalise to Python types: context code may hand over numpy scalars, and
            # np.bool_ would break the identity tests of the and/or evaluation.
            value = ctx.get(name)
            if value is None:
                return None
            if kind == "bool":
                return None if isinstance(value, str) else bool(value)
            if kind == "number":
                is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
                return float(value) if is_number else None  # type: ignore[arg-type]
            return value if isinstance(value, str) else None

        return lookup, kind

    def _constant(self, node: ast.Constant) -> tuple[_Eval, _Kind]:
        value = node.value
        if not isinstance(value, bool | int | float | str):
            raise self.error(node, f"the constant {value!r} is not allowed")
        return (lambda _ctx: value), _KIND_OF[type(value)]


def compile_expression(text: str) -> Expression:
    """Parse and type-check a condition; raises ``ExpressionError`` (a ``ValueError``)."""
    if not text.strip():
        raise ExpressionError("the condition is empty; write e.g. `voice_active`")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        indent = len(text) - len(text.lstrip())
        example = "; a condition looks like `speed > 0.2 and not voice_active`"
        if not exc.offset:  # Python reports no column when the text simply stops
            raise ExpressionError(
                f"syntax error: the condition ends before it is complete{example}",
                1,
                len(text.rstrip()),
            ) from None
        raise ExpressionError(
            f"syntax error: {exc.msg}{example}", exc.lineno or 1, exc.offset - 1 + indent
        ) from None
    compiler = _Compiler(text.strip())
    try:
        fn, kind = compiler.compile(tree.body)
    except ExpressionError as exc:
        # Positions were computed on the stripped text; shift back onto the original.
        raise ExpressionError(
            exc.message, exc.line, exc.col + (len(text) - len(text.lstrip()))
        ) from None
    if kind != "bool":
        raise ExpressionError(
            f"the condition is a {kind}, not true/false; compare it, e.g. `speed > 0.2`"
        )
    return Expression(text=text, names=frozenset(compiler.names), _fn=fn)


# --------------------------------------------------------------------------- schema


class TaskSetting(BaseModel):
    """What an active rule asks for one task; unset fields leave the task's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    critical: bool | None = None
    share: Annotated[float, Field(gt=0, le=1)] | None = None
    weight: Annotated[int, Field(ge=1, le=10000)] | None = None
    cpu_max: Annotated[float, Field(gt=0, le=1)] | None = None
    # null is allowed for symmetry with the task's own `rate_hz`; it means "no limit".
    rate_hz: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TaskSetting:
        if not self.model_fields_set:
            raise ValueError(
                "sets nothing; give at least one of critical, share, weight, cpu_max, rate_hz"
            )
        if self.share is not None and self.cpu_max is not None and self.share > self.cpu_max:
            raise ValueError(
                f"share {self.share} exceeds cpu_max {self.cpu_max}; a guarantee cannot be "
                "larger than the cap, lower share or raise cpu_max"
            )
        return self


class RuleSpec(BaseModel):
    """One `rules:` entry."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    when: str
    hold_s: Annotated[float, Field(ge=0)] = 0.0
    set: Annotated[dict[str, TaskSetting], Field(min_length=1)]

    @field_validator("when")
    @classmethod
    def _compiles(cls, text: str) -> str:
        compile_expression(text)
        return text


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class TaskDirective:
    """The merged demand of every active rule on one task."""

    critical: bool = False
    share: float | None = None
    weight: int | None = None
    cpu_max: float | None = None
    rate_hz: float | None = None

    def merge(self, setting: TaskSetting) -> TaskDirective:
        """Combine so that no rule loses: critical if any, the largest share and weight,
        the tightest cap and the lowest rate."""

        def pick(
            mine: float | None, theirs: float | None, choose: Callable[..., float]
        ) -> float | None:
            if mine is None or theirs is None:
                return theirs if mine is None else mine
            return choose(mine, theirs)

        weight = pick(self.weight, setting.weight, max)
        return TaskDirective(
            critical=self.critical or bool(setting.critical),
            share=pick(self.share, setting.share, max),
            weight=None if weight is None else int(weight),
            cpu_max=pick(self.cpu_max, setting.cpu_max, min),
            rate_hz=pick(self.rate_hz, setting.rate_hz, min),
        )


@dataclass(frozen=True)
class RuleOutcome:
    """Result of one evaluation.

    ``fired``/``released``: rules that became active/inactive at this evaluation;
    ``active``: every active rule (in manifest order); ``expires_at``: the earliest time a
    rule held only by its ``hold_s`` drops, so the caller can re-evaluate then even if no
    context changes.
    """

    directives: dict[str, TaskDirective]
    fired: list[str]
    released: list[str]
    active: list[str]
    expires_at: float | None


class RuleBook:
    """Evaluates rules against context snapshots, keeping each rule's hold timer."""

    def __init__(self, rules: Sequence[RuleSpec]) -> None:
        self._rules = [(spec, compile_expression(spec.when)) for spec in rules]
        self._active: set[str] = set()
        # When a still-active rule's condition was first seen false: its hold starts there.
        self._false_since: dict[str, float] = {}

    def evaluate(self, context: Mapping[str, object], now: float) -> RuleOutcome:
        """Evaluate every rule at time ``now`` (seconds, any monotonic clock)."""
        fired: list[str] = []
        released: list[str] = []
        active: list[str] = []
        directives: dict[str, TaskDirective] = {}
        expires_at: float | None = None
        for spec, expression in self._rules:
            was_active = spec.name in self._active
            if expression.evaluate(context):
                self._false_since.pop(spec.name, None)
                is_active = True
            elif was_active:
                since = self._false_since.setdefault(spec.name, now)
                is_active = now < since + spec.hold_s
                if is_active:
                    end = since + spec.hold_s
                    expires_at = end if expires_at is None else min(expires_at, end)
                else:
                    del self._false_since[spec.name]
            else:
                is_active = False
            if is_active:
                self._active.add(spec.name)
                active.append(spec.name)
                if not was_active:
                    fired.append(spec.name)
                for task, setting in spec.set.items():
                    directives[task] = directives.get(task, TaskDirective()).merge(setting)
            elif was_active:
                self._active.discard(spec.name)
                released.append(spec.name)
        return RuleOutcome(directives, fired, released, active, expires_at)


def critical_rules(rules: Iterable[RuleSpec]) -> dict[str, set[str]]:
    """Task → names of the rules whose ``set`` makes it critical."""
    out: dict[str, set[str]] = {}
    for rule in rules:
        for task, directive in rule.set.items():
            if directive.critical:
                out.setdefault(task, set()).add(rule.name)
    return out
