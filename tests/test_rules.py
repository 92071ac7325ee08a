"""Rule conditions (parsing, type checks, three-valued evaluation) and the rule book."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from ctxrobot.sched.rules import (
    CONTEXT_SIGNALS,
    ExpressionError,
    RuleBook,
    RuleSpec,
    TaskDirective,
    TaskSetting,
    compile_expression,
)


def rule(name: str, when: str, set_: dict[str, Any], hold_s: float = 0.0) -> RuleSpec:
    return RuleSpec.model_validate({"name": name, "when": when, "hold_s": hold_s, "set": set_})


def test_context_signals_are_the_documented_set() -> None:
    assert dict(CONTEXT_SIGNALS) == {
        "speed": float,
        "turn_rate": float,
        "motion": str,
        "voice_active": bool,
        "sign_ahead": bool,
        "obstacle_distance": float,
        "obstacle_near": bool,
        "cpu_temp_c": float,
        "throttled": bool,
        "battery_pct": float,
        "on_battery": bool,
    }


@pytest.mark.parametrize(
    ("text", "context", "expected"),
    [
        ("voice_active", {"voice_active": True}, True),
        ("voice_active", {"voice_active": False}, False),
        ("speed > 0.2 or turn_rate > 0.3", {"speed": 0.1, "turn_rate": 0.5}, True),
        ("speed > 0.2 or turn_rate > 0.3", {"speed": 0.1, "turn_rate": 0.1}, False),
        ('motion == "stopped"', {"motion": "stopped"}, True),
        ("motion != 'stopped'", {"motion": "stopped"}, False),
        ("not (voice_active and sign_ahead)", {"voice_active": True, "sign_ahead": True}, False),
        ("0.2 < speed <= 0.5", {"speed": 0.5}, True),
        ("0.2 < speed <= 0.5", {"speed": 0.6}, False),
        ("cpu_temp_c >= -10", {"cpu_temp_c": -10.0}, True),
        ("on_battery == true and battery_pct < 20", {"on_battery": True, "battery_pct": 19}, True),
        ("throttled == False", {"throttled": False}, True),
    ],
)
def test_conditions_evaluate(text: str, context: dict[str, object], expected: bool) -> None:
    assert compile_expression(text).evaluate(context) is expected


def test_missing_signals_are_unknown_not_false() -> None:
    # With no battery, neither `battery_pct < 20` nor its negation holds.
    assert not compile_expression("battery_pct < 20").evaluate({})
    assert not compile_expression("not battery_pct < 20").evaluate({})
    # Unknown loses to a decisive operand on either side.
    assert compile_expression("battery_pct < 20 or voice_active").evaluate({"voice_active": True})
    assert not compile_expression("battery_pct < 20 and voice_active").evaluate(
        {"voice_active": True}
    )
    assert not compile_expression("voice_active").evaluate({"voice_active": None})


def test_names_lists_the_signals_read() -> None:
    expression = compile_expression('speed > 0.2 and motion == "moving" or voice_active')
    assert expression.names == {"speed", "motion", "voice_active"}


@pytest.mark.parametrize(
    ("text", "col", "message"),
    [
        ("max(speed, 1) > 2", 0, "function calls are not allowed"),
        ("voice_active.real", 0, "attribute access is not allowed"),
        ("speed[0] > 1", 0, "indexing is not allowed"),
        ("speed * 2 > 1", 0, "arithmetic is not allowed; compare a signal with a constant instead"),
        ("(lambda: True)()", 0, "function calls are not allowed"),
        ("[voice_active][0]", 0, "indexing is not allowed"),
        ("speed in [1, 2]", 9, "only ==, !=, <, <=, > and >= comparisons are allowed"),
        (
            "sped > 1",
            0,
            "unknown context signal 'sped'; did you mean 'speed'? known signals: "
            + ", ".join(CONTEXT_SIGNALS),
        ),
        ("voice_active and speed", 17, "`and` needs a true/false operand, got a number; compare"),
        ("speed > 'fast'", 8, "`>` compares numbers only"),
        ("voice_active == 1", 16, "cannot compare a bool with a number"),
        (
            'motion == "stoped"',
            10,
            "motion is never 'stoped': it is one of 'moving', 'turning', 'stopped'; "
            "did you mean 'stopped'?",
        ),
        ("speed", 0, "the condition is a number, not true/false; compare it, e.g. `speed > 0.2`"),
        ("-voice_active", 0, "a sign (+/-) may only prefix a number"),
        ("speed > None", 8, "the constant None is not allowed"),
        (
            "speed >",
            7,
            "syntax error: the condition ends before it is complete; a condition looks like "
            "`speed > 0.2 and not voice_active`",
        ),
        (
            "speed = 1",
            6,
            "syntax error: invalid syntax; a condition looks like "
            "`speed > 0.2 and not voice_active`",
        ),
        ("   ", 0, "the condition is empty; write e.g. `voice_active`"),
    ],
)
def test_rejections_say_what_and_where(text: str, col: int, message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(text)
    assert (caught.value.col, caught.value.message[: len(message)]) == (col, message)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == f"{caught.value.message} (at column {col + 1})"


def test_rule_spec_rejects_bad_condition_and_empty_or_inconsistent_settings() -> None:
    with pytest.raises(ValidationError, match="function calls are not allowed"):
        rule("r", "len(x) > 1", {"slam": {"critical": True}})
    with pytest.raises(ValidationError, match="sets nothing"):
        rule("r", "voice_active", {"slam": {}})
    with pytest.raises(ValidationError, match=r"share 0\.6 exceeds cpu_max 0\.4"):
        TaskSetting.model_validate({"share": 0.6, "cpu_max": 0.4})


def test_hold_keeps_a_rule_active_after_its_condition_turns_false() -> None:
    book = RuleBook([rule("listen", "voice_active", {"speech": {"critical": True}}, hold_s=2.0)])
    on, off = {"voice_active": True}, {"voice_active": False}

    first = book.evaluate(on, now=10.0)
    assert (first.fired, first.active, first.released) == (["listen"], ["listen"], [])
    assert first.expires_at is None

    held = book.evaluate(off, now=10.5)  # the hold starts when `when` is first seen false
    assert (held.fired, held.active, held.expires_at) == ([], ["listen"], 12.5)
    assert held.directives == {"speech": TaskDirective(critical=True)}

    assert book.evaluate(off, now=12.4).active == ["listen"]
    dropped = book.evaluate(off, now=12.5)
    assert (dropped.active, dropped.released, dropped.directives) == ([], ["listen"], {})
    assert dropped.expires_at is None

    again = book.evaluate(on, now=13.0)
    assert again.fired == ["listen"]


def test_condition_returning_during_hold_restarts_the_hold() -> None:
    book = RuleBook([rule("listen", "voice_active", {"speech": {"share": 0.6}}, hold_s=2.0)])
    book.evaluate({"voice_active": True}, now=0.0)
    assert book.evaluate({"voice_active": False}, now=1.0).expires_at == 3.0
    back = book.evaluate({"voice_active": True}, now=1.5)
    assert (back.fired, back.active) == ([], ["listen"])  # never dropped, so not re-fired
    assert book.evaluate({"voice_active": False}, now=2.5).expires_at == 4.5
    assert book.evaluate({"voice_active": False}, now=3.5).active == ["listen"]


def test_zero_hold_drops_at_once() -> None:
    book = RuleBook([rule("move", "speed > 0.2", {"slam": {"critical": True}})])
    assert book.evaluate({"speed": 0.5}, now=0.0).active == ["move"]
    outcome = book.evaluate({"speed": 0.0}, now=0.1)
    assert (outcome.active, outcome.released) == ([], ["move"])


def test_fired_lists_only_rules_that_became_active() -> None:
    book = RuleBook(
        [
            rule("move", "speed > 0.2", {"slam": {"critical": True}}),
            rule("listen", "voice_active", {"speech": {"critical": True}}),
        ]
    )
    first = book.evaluate({"speed": 0.5, "voice_active": False}, now=0.0)
    assert (first.fired, first.active) == (["move"], ["move"])
    second = book.evaluate({"speed": 0.5, "voice_active": True}, now=0.1)
    assert (second.fired, second.active) == (["listen"], ["move", "listen"])
    third = book.evaluate({"speed": 0.0, "voice_active": True}, now=0.2)
    assert (third.fired, third.active, third.released) == ([], ["listen"], ["move"])


def test_directives_merge_across_active_rules() -> None:
    book = RuleBook(
        [
            rule("a", "voice_active", {"signs": {"share": 0.2, "weight": 300, "cpu_max": 0.8}}),
            rule(
                "b",
                "speed > 0.2",
                {"signs": {"critical": True, "share": 0.4, "cpu_max": 0.5, "rate_hz": 2.0}},
            ),
            rule("c", 'motion == "stopped"', {"signs": {"rate_hz": 1.0, "weight": 50}}),
            rule("d", "sign_ahead", {"signs": {"rate_hz": 0.5}, "slam": {"weight": 10}}),
        ]
    )
    context = {"voice_active": True, "speed": 0.5, "motion": "stopped", "sign_ahead": False}
    outcome = book.evaluate(context, now=0.0)
    assert outcome.active == ["a", "b", "c"]
    assert outcome.directives == {
        "signs": TaskDirective(critical=True, share=0.4, weight=300, cpu_max=0.5, rate_hz=1.0)
    }


def test_null_rate_means_no_limit_from_that_rule() -> None:
    book = RuleBook(
        [
            rule("free", "voice_active", {"signs": {"rate_hz": None}}),
            rule("slow", "voice_active", {"signs": {"rate_hz": 1.0}}),
        ]
    )
    assert book.evaluate({"voice_active": True}, now=0.0).directives["signs"].rate_hz == 1.0


def test_numpy_scalars_from_context_code_are_accepted() -> None:
    expression = compile_expression("voice_active and not sign_ahead and speed > 0.2")
    context = {"voice_active": np.bool_(True), "sign_ahead": np.bool_(False), "speed": 0.5}
    assert expression.evaluate({**context, "speed": np.float32(0.5)})
    assert not expression.evaluate({**context, "speed": np.float64(0.1)})
