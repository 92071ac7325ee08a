"""Measuring policies: `ctxrobot bench` (real runs side by side against the stock Linux
scheduler) and `ctxrobot sim` (the same policies in a simulated envelope, virtual time).
Imports `service`, `observe`, `manifest`, `sched` and `model`; never the command line.
"""
