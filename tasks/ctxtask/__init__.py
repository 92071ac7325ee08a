"""ctxtask: the small library every ctxrobot task container uses.

It holds the wire protocol spoken with the host runtime, the task lifecycle base class,
the runner that drives a task from its socket, and dataset readers shared by the tasks'
evaluators and the host's replay sources.
"""
