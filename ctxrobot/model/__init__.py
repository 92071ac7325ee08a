"""The vocabulary every layer shares: bus events, the allocation vocabulary, the core's
actions, user errors, and the event bus that carries events. Imports nothing of ctxrobot.
"""
