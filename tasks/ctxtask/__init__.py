"""ctxtask: the small library every ctxrobot task container uses.

It holds the wire protocol spoken with the host runtime, the task lifecycle base class,
the runner that drives a task from its socket, dataset readers shared by the tasks'
evaluators and the host's replay sources, and the SE(2) pose algebra (`se2`) that the laser
reader's mount chain, the Freiburg metric and the SLAM task share.
"""
