"""The daemon's restart policies mean what Docker's do (`restart: never|on-failure|always`)."""

from __future__ import annotations

import pytest

from ctxrobot.manifest.schema import RestartSpec
from ctxrobot.service.daemon import MAX_BACKOFF_S, backoff_s, should_restart


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarts", "expected"),
    [
        ("never", 1, 0, False),
        ("never", None, 0, False),
        ("on-failure", 1, 0, True),
        ("on-failure", 137, 2, True),
        ("on-failure", None, 0, True),  # the container runs but broke the protocol
        ("on-failure", 0, 0, False),  # a clean exit is not a failure
        ("on-failure", 1, 3, False),  # max_retries reached
        ("always", 0, 0, True),  # a clean exit too
        ("always", 1, 1000, True),  # no limit on the count
    ],
)
def test_restart_policies(
    policy: str, exit_code: int | None, restarts: int, expected: bool
) -> None:
    spec = RestartSpec(policy=policy, max_retries=3)
    assert should_restart(spec, exit_code, restarts) is expected


def test_backoff_doubles_up_to_a_cap() -> None:
    spec = RestartSpec(policy="always", backoff_s=0.5)
    assert [backoff_s(spec, n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(spec, 50) == MAX_BACKOFF_S
