"""Reading the host's health (temperature, throttling, battery): sysfs and psutil, at the
edge. The readings become ``HostReading`` events for the ``host`` context signals."""

from __future__ import annotations

from pathlib import Path

import psutil

from ctxrobot.model.events import HostReading

__all__ = ["PI_THROTTLED", "read_host"]

# Raspberry Pi firmware's throttle report; bits 0-3 are the *current* conditions
# (under-voltage, frequency capped, throttled, soft temperature limit).
PI_THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
_THROTTLED_NOW_MASK = 0xF
# psutil sensor groups that carry the CPU/SoC temperature, best first.
_CPU_SENSORS = ("cpu_thermal", "cpu-thermal", "soc_thermal", "coretemp", "k10temp", "zenpower")


def _cpu_temperature() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)  # absent on macOS and Windows
    if read is None:
        return None
    try:
        groups = read()
    except (OSError, RuntimeError):
        return None
    for name in (*_CPU_SENSORS, *groups):
        readings = [s.current for s in groups.get(name, ()) if s.current is not None]
        if readings:
            return float(max(readings))
    return None


def _pi_throttled(path: Path) -> bool:
    try:
        return bool(int(path.read_text().strip(), 16) & _THROTTLED_NOW_MASK)
    except (OSError, ValueError):
        return False


def read_host(t: float, throttled_path: Path = PI_THROTTLED) -> HostReading:
    """Host health now; a sensor the machine lacks reads as None (or not throttled)."""
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return HostReading(
        t=t,
        cpu_temp_c=_cpu_temperature(),
        throttled=_pi_throttled(throttled_path),
        battery_pct=None if battery is None else float(battery.percent),
        on_battery=battery is not None and battery.power_plugged is False,
    )
