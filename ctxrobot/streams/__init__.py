"""Samples in and out: sensor sources (replayed recordings, live devices) and the host end
of each task's socket. Imports `model` and `ctxtask` (wire protocol, dataset readers).
"""
