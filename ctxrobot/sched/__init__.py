"""The scheduler's sans-I/O core: context signals, rules, policies and the state machine
that turns events into actions. No threads, sockets, files or clock; imports only `model`.
"""
