"""``ctxrobot sim``: a discrete-event simulator of the CPU envelope with the real scheduler
core in the loop (docs/sim.md).

- ``workload``: the scenario's readings per source, keyed by content;
- ``trace``: what each sample costs a task, built from recorded runs;
- ``cpu``: the CPU model (CPUs, envelope quota, per-task weights, caps, freezing, idle
  groups, cpusets);
- ``engine``: one simulated run (sources, channels, tasks, the core);
- ``results``: the policies side by side, the bench's figures;
- ``cli``: the command.

Kept light: the command line imports this package to register ``sim``.
"""

#: What ``ctxrobot sim`` can simulate: the runtime's policies, and each task alone.
SIM_POLICIES = ("isolated", "cfs", "static", "weights", "ctx")
