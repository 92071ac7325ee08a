"""The runtime as a program: wiring a run, the decision thread, the daemon and its control
API, the guard process, `ps` and `eval`. Imports every layer below it; nothing above.
"""
