"""Acting on containers: the cgroup fast path (v1/v2 files, sub-millisecond) and, kept
apart, the Docker lifecycle path (create, start, stop, remove). Imports `model` only.
"""
