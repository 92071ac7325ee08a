"""The SLAM task's accuracy targets on every shared log with ground truth, in its container.

`ctxrobot eval slam LOG` runs ``python -m slam.evaluate`` in the slam image (dataset read-only,
no network, pinned to one CPU) with the task's one configuration; the logs run side by side,
one per CPU (`--cpu`). Each log is held to the same targets: mean Freiburg relation error
≤ 0.10 m and ≤ 1.5°; where the task does not meet them yet (``NOT_YET``) the run is still
checked and a missed target is an expected failure. The
95 % intervals and the real-time factor are printed; the factor is asserted below 1 only as
"keeps up with its sensor on one core" (a wide margin on a shared 2-core machine). A variant
run (fr-clinic at another odometry margin) shares the same CPUs.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import require_data
from tests.test_eval_docker import evaluate_side_by_side

pytestmark = pytest.mark.docker

TRANS_TARGET_M = 0.10
ROT_TARGET_DEG = 1.5
SCANS = {"intel": 13631, "aces": 7374, "fr-clinic": 6917, "mit-killian": 17480}


#: Logs where the task does not meet the targets yet (docs/slam.md, "What is left"): the run
#: must still work and its figures are printed; a missed target is reported as an expected
#: failure, and meeting it fails the test until the log is taken off this list.
NOT_YET = {"fr-clinic"}


#: fr-clinic at an odometry margin next to the default (2): its return to the start is the
#: closure its figure hangs on, and must not be a draw of the margin (see its test).
FR_CLINIC_AT_1_8 = "fr-clinic, odom_noise_scale 1.8"
VARIANTS = {FR_CLINIC_AT_1_8: ("fr-clinic", ("--set", "odom_noise_scale=1.8"))}

#: Longest first, so that two CPUs finish together (CPU seconds measured: 149, 74, 71, 49, 15).
BY_COST = ("mit-killian", "fr-clinic", FR_CLINIC_AT_1_8, "intel", "aces")


@pytest.fixture(scope="module")
def evaluated(
    request: pytest.FixtureRequest,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every selected log and variant evaluated at once, each on a CPU of its own."""
    # Every test here names its run (a log, or a variant of one) in its `log` parameter.
    selected = {
        item.callspec.params["log"]
        for item in request.session.items
        if item.module is request.module
    }
    runs = {name: VARIANTS.get(name, (name, ())) for name in BY_COST if name in selected}
    datasets = {name: require_data(f"slam/{log}") for name, (log, _) in runs.items()}
    return evaluate_side_by_side("slam", datasets, {name: a for name, (_, a) in runs.items()})


@pytest.mark.parametrize(
    "log",
    [
        "aces",
        "fr-clinic",
        pytest.param("intel", marks=pytest.mark.slow),
        pytest.param("mit-killian", marks=pytest.mark.slow),
    ],
)
def test_slam_targets_in_container(
    log: str, evaluated: tuple[dict[str, dict[str, Any]], dict[str, str]]
) -> None:
    results, failures = evaluated
    assert log not in failures, failures[log]
    m = results[log]
    assert m["scans"] == SCANS[log]
    figures = (
        f"{log}: {m['trans_error_m']:.4f} m {m['trans_error_ci95_m']}, "
        f"{m['rot_error_deg']:.3f} deg {m['rot_error_ci95_deg']}, {m['scans']} scans, "
        f"RTF {m['realtime_factor']:.4f}, closures {m['loop_closures']} accepted / "
        f"{m['rejected_closures']} rejected"
    )
    print(figures)
    lo, hi = m["trans_error_ci95_m"]
    assert lo <= m["trans_error_m"] <= hi
    assert m["realtime_factor"] < 1.0, "keeps up with the log's real time on one core"
    met = m["trans_error_m"] <= TRANS_TARGET_M and m["rot_error_deg"] <= ROT_TARGET_DEG
    if log in NOT_YET:
        assert not met, f"{log} now meets the targets: take it off NOT_YET"
        pytest.xfail(f"targets not met yet: {figures}")
    assert m["trans_error_m"] <= TRANS_TARGET_M
    assert m["rot_error_deg"] <= ROT_TARGET_DEG


@pytest.mark.parametrize(
    "log", [pytest.param(FR_CLINIC_AT_1_8, marks=pytest.mark.slow, id="fr-clinic-margin-1.8")]
)
def test_the_return_of_fr_clinic_closes_at_a_neighbouring_odometry_margin_too(
    log: str, evaluated: tuple[dict[str, dict[str, Any]], dict[str, str]]
) -> None:
    """fr-clinic's return to its start, driven the other way, closes through place matches
    near the fitness bar. Whether the pair test got its second match was a draw: at odometry
    margins of 1.8 and 2.2 it did not, and the whole log was 1.49 and 1.00 m off (0.129 and
    0.128 m when it closes; the 99 relations joining the last scans to the first ones 26-40 m
    against 0.80-0.92 m). A lone place match now has the keyframes before its query searched as
    its partner (slam/loops.py); at 1.8 the return must close.
    """
    results, failures = evaluated
    assert log not in failures, failures[log]
    m = results[log]
    print(f"{log}: {m['trans_error_m']:.4f} m, {m['loop_closures']} closures")
    assert m["scans"] == SCANS["fr-clinic"]
    assert m["trans_error_m"] < 0.3
